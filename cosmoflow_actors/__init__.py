"""cosmoflow_actors: a workflow engine built as an actor system on trio.

Flows of prep/exec/post nodes joined by action routes; every node is an actor with a
mailbox, a router actor forwards runs, and store actors own the storage.
"""

from cosmoflow_actors.action import Action, ActionCondition
from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.errors import (
    ActorCrashedError,
    ConditionError,
    CosmoFlowError,
    DamagedRecordError,
    FlowValidationError,
    MaxStepsExceeded,
    NodeError,
    NoRouteError,
    RunCancelledError,
    RunConflictError,
    RunRecordedError,
    StorageError,
    StoreKeyError,
    StoreTypeError,
    StoreValueError,
    UnreadableValueError,
)
from cosmoflow_actors.events import (
    Event,
    EventsDropped,
    EventStream,
    Fallback,
    Retry,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
)
from cosmoflow_actors.flow import END, BatchFlow, Flow, FlowBuilder, FlowResult, Route
from cosmoflow_actors.node import BatchNode, FunctionNode, Node, ParallelBatchNode, node
from cosmoflow_actors.progress import Progress, ProgressSnapshot
from cosmoflow_actors.runtime.engine import Engine, forget_run, list_runs, open_engine
from cosmoflow_actors.runtime.queue import (
    QueuedResult,
    QueuedRun,
    RunQueue,
    UnreadableEntryError,
    queue_status,
    requeue,
    result,
    submit,
)
from cosmoflow_actors.runtime.ray_executor import RayDisconnectedError
from cosmoflow_actors.runtime.run import Run, RunState, RunStateValue
from cosmoflow_actors.runtime.run_record import RunRecord
from cosmoflow_actors.runtime.statistics import ActorStatistics, EngineStatistics
from cosmoflow_actors.runtime.store_client import SharedStore
from cosmoflow_actors.runtime.transfer import WorkerInterruptedError, WorkerTransferError
from cosmoflow_actors.storage import (
    CodecName,
    FileStorage,
    MemoryStorage,
    RedisStorage,
    SQLiteStorage,
    Storage,
)
from cosmoflow_actors.tracing import format_event, trace_events

__all__ = [
    "END",
    "Action",
    "ActionCondition",
    "ActorCrashedError",
    "ActorStatistics",
    "BatchFlow",
    "BatchNode",
    "CodecName",
    "ConditionError",
    "CosmoFlowError",
    "DamagedRecordError",
    "Engine",
    "EngineStatistics",
    "Event",
    "EventStream",
    "EventsDropped",
    "ExecutionContext",
    "Fallback",
    "FileStorage",
    "Flow",
    "FlowBuilder",
    "FlowResult",
    "FlowValidationError",
    "FunctionNode",
    "MaxStepsExceeded",
    "MemoryStorage",
    "NoRouteError",
    "Node",
    "NodeError",
    "ParallelBatchNode",
    "Progress",
    "ProgressSnapshot",
    "QueuedResult",
    "QueuedRun",
    "RayDisconnectedError",
    "RedisStorage",
    "Retry",
    "Route",
    "Run",
    "RunCancelled",
    "RunCancelledError",
    "RunConflictError",
    "RunFailed",
    "RunFinished",
    "RunQueue",
    "RunRecord",
    "RunRecordedError",
    "RunStarted",
    "RunState",
    "RunStateValue",
    "SQLiteStorage",
    "SharedStore",
    "StepFinished",
    "StepStarted",
    "Storage",
    "StorageError",
    "StoreKeyError",
    "StoreTypeError",
    "StoreValueError",
    "UnreadableEntryError",
    "UnreadableValueError",
    "WorkerInterruptedError",
    "WorkerTransferError",
    "__version__",
    "forget_run",
    "format_event",
    "list_runs",
    "node",
    "open_engine",
    "queue_status",
    "requeue",
    "result",
    "submit",
    "trace_events",
]

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"
