"""A durable run's record: its format, written as the run goes and read to put the run
back where it was.

A durable run (a ``run_id`` on a persistent storage) keeps one record under
``__cosmoflow__/runs/<run_id>``. It is written when the run starts, with each step's
writes in the same commit as the step finishes, and when the run ends. Records are
plain JSON, so every codec can store them; store keys under ``__cosmoflow__/`` are
hidden from ``keys()``, ``size()`` and ``clear()``.

A step's record says where every branch of the run goes on after a crash: the step's
own branch routes its action again, a branch whose step was under way is sent to that
node again, and a branch whose fan-out ended without a join ends its flow again. The
fan-outs in progress are saved with their parent branch and their count of branches
still out, so branches that had reached the join or ended are not waited for twice.

Nothing here blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, TypeGuard

from cosmoflow_actors.action import Action
from cosmoflow_actors.errors import (
    CosmoFlowError,
    RunRecordedError,
    StorageError,
    type_and_message,
)
from cosmoflow_actors.flow import Flow, FlowResult
from cosmoflow_actors.runtime.messages import FlowEnded, Step, StepDone
from cosmoflow_actors.runtime.run import ActiveRun, Branch, Fork, Frame
from cosmoflow_actors.storage.base import RECORD_PREFIX, Storage, batch_parent

if TYPE_CHECKING:
    from cosmoflow_actors.runtime.node_actor import NodeActor


def record_key(run_id: str) -> str:
    """The store key of ``run_id``'s record."""
    return RECORD_PREFIX + run_id


_RECORD_FIELDS: Final = ("run_id", "flow", "state", "params", "path", "last")
_STEP_FIELDS: Final = ("branches", "forks")
"""The fields of a record once a step of its run is recorded (see :func:`step_done`)."""


def checked_record(key: str, value: Any) -> dict[str, Any]:
    """``value``, read from the store under ``key``, as a run record.

    Raises StorageError naming the key when it is not a record the engine wrote.
    """
    if not _is_record(value):
        raise StorageError(
            f"the store holds no valid run record under {key!r} (found {type(value).__name__}):"
            " it was not written by the engine"
        )
    return value


def require_ended(key: str, value: Any) -> None:
    """Raise RunRecordedError unless ``value``, the record under ``key``, is of a run
    that has ended (succeeded or failed), so that it may be forgotten; StorageError
    when it is not a record the engine wrote."""
    record = checked_record(key, value)
    if record["state"] == "running":
        run_id = record["run_id"]
        raise RunRecordedError(
            f"run {run_id!r} is recorded as running (in flight, or interrupted): finish "
            "it with engine.resume before forgetting it",
            run_id,
            record["flow"],
            record["state"],
        )


def refuse_child(key: str, value: Any, parent: str) -> NoReturn:
    """Raise RunRecordedError: ``value``, the record under ``key``, is of a BatchFlow's
    child run of the recorded run ``parent``, which is forgotten with its parent only
    (a resume of the parent would run the child's steps again); StorageError when it
    is not a record the engine wrote."""
    record = checked_record(key, value)
    run_id = record["run_id"]
    raise RunRecordedError(
        f"run {run_id!r} is a child run of the recorded run {parent!r} (a step of its "
        f"BatchFlow started it): forget {parent!r}, whose children are forgotten with it",
        run_id,
        record["flow"],
        record["state"],
    )


def require_flow(run: ActiveRun, record: Mapping[str, Any]) -> None:
    """Raise RunRecordedError unless ``record`` is of a run of ``run``'s flow (whatever
    the state it records)."""
    if record["flow"] != run.flow.name:
        raise RunRecordedError(
            f"run {run.run_id!r} belongs to flow {record['flow']!r}, not {run.flow.name!r}",
            run.run_id,
            record["flow"],
            record["state"],
        )


def _is_record(value: Any) -> TypeGuard[dict[str, Any]]:
    """Whether ``value`` has a record's fields, and, once a step of it is recorded,
    where its branches go on."""
    if not isinstance(value, dict) or not all(field in value for field in _RECORD_FIELDS):
        return False
    return value["last"] is None or all(field in value for field in _STEP_FIELDS)


RecordedState = Literal["running", "succeeded", "failed", "orphaned"]
"""What :class:`RunRecord` says of a run (see there)."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """What a store says about one durable run (see :func:`list_runs`).

    ``state`` is "running" (in flight, or interrupted by a crash or a cancel),
    "succeeded" or "failed"; ``last_node_id`` is the node of the last committed step.

    A run that a worker of a run queue claimed names it: ``owner`` is the worker's
    name and ``queue`` the queue's URL (``redis://HOST:PORT/DB/NAME``, without a
    password); both are None for a run started otherwise. Where the queue's leases can
    be read (see ``queue.leases_checked``), ``lease_left`` is the seconds left on the
    owner's lease, and a running run whose lease is gone is "orphaned": no worker runs
    it now, and the queue gives it to another worker.

    A child run of a BatchFlow names its parent: ``parent_id`` is the id of the run
    whose step started it (``job`` for ``job:3/0``), when that run is recorded in the
    same store; None for any other run. A child's record is forgotten with its parent's.
    """

    run_id: str
    flow_name: str
    state: RecordedState
    last_node_id: str | None
    steps: int
    owner: str | None = None
    queue: str | None = None
    lease_left: float | None = None
    parent_id: str | None = None

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> RunRecord:
        """The summary of a record (see :func:`checked_record`)."""
        last = record.get("last")
        owner = record.get("owner") or {}
        return cls(
            run_id=record["run_id"],
            flow_name=record["flow"],
            state=record["state"],
            last_node_id=None if last is None else last["node"],
            steps=len(record["path"]),
            owner=owner.get("worker"),
            queue=owner.get("queue"),
        )


def with_parents(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """``runs``, the runs recorded in one store, each BatchFlow child among them naming
    its parent (see :attr:`RunRecord.parent_id`)."""
    runs = list(runs)
    recorded = {run.run_id for run in runs}
    return [_with_parent(run, recorded) for run in runs]


def _with_parent(run: RunRecord, recorded: set[str]) -> RunRecord:
    parent = batch_parent(run.run_id)
    return run if parent not in recorded else replace(run, parent_id=parent)


def new_record(run_id: str, flow_name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The record of the run ``run_id`` of ``flow_name`` before its first step."""
    return {
        "run_id": run_id,
        "flow": flow_name,
        "state": "running",
        "params": dict(params),
        "path": [],
        "last": None,
        "result": None,
        "error": None,
    }


def owned(
    stored: Any, run_id: str, flow_name: str, params: Mapping[str, Any], owner: Mapping[str, Any]
) -> Any:
    """The record of ``run_id`` once the worker ``owner`` (``{"worker": NAME, "queue":
    URL}``) has claimed it: ``stored`` (the record as stored, None when there is none
    yet) naming ``owner``, or a new record naming it.

    A succeeded record, or a value that is no record, is returned as it is: the engine
    returns the one's result and refuses the other.
    """
    if stored is None:
        return {**new_record(run_id, flow_name, params), "owner": dict(owner)}
    if not _is_record(stored) or stored["state"] == "succeeded":
        return stored
    return {**stored, "owner": dict(owner)}


def step_done(
    record: Mapping[str, Any],
    in_flight: Iterable[Branch],
    branch: Branch,
    node_id: str,
    action: Action,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``record`` once the step of ``branch`` at ``node_id`` returned the (resolved)
    ``action``, the branches ``in_flight`` (``branch`` among them) going on; and where
    the branch goes on from after a crash until it is routed.

    The record holds the step under ``"last"``, where every branch in flight goes on
    under ``"branches"`` and the fan-outs they belong to under ``"forks"``.
    """
    resume_at = {**position(branch), "node": node_id, "action": encode_action(action)}
    forks = _Forks()
    branches = []
    for other in in_flight:
        saved = resume_at if other is branch else other.resume_at
        assert saved is not None
        branches.append({**saved, "fork": forks.index(other.fork)})
    record = {
        **record,
        "path": [*record["path"], node_id],
        "last": resume_at,
        "branches": branches,
        "forks": forks.saved,
    }
    return record, resume_at


def position(branch: Branch) -> dict[str, Any]:
    """Where ``branch`` is (its frames) and what its steps are numbered (its label and
    count), as JSON."""
    frames = [[frame.node_id, frame.steps] for frame in branch.frames]
    return {"frames": frames, "label": branch.label, "count": branch.count}


class _Forks:
    """The fan-outs a record refers to, numbered as they are saved (a fork's parent's
    fork comes before it)."""

    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []
        self._numbers: dict[Fork, int] = {}

    def index(self, fork: Fork | None) -> int | None:
        if fork is None:
            return None
        if fork not in self._numbers:
            parent = {**position(fork.parent), "fork": self.index(fork.parent.fork)}
            self._numbers[fork] = len(self.saved)
            self.saved.append(
                {
                    "parent": parent,
                    "depth": fork.depth,
                    "pending": fork.pending,
                    "join": fork.join_id,
                    "params": dict(fork.params),
                }
            )
        return self._numbers[fork]


def succeeded(record: Mapping[str, Any], result: FlowResult) -> dict[str, Any]:
    """``record`` of a run that ended with ``result``."""
    return {
        **record,
        "state": "succeeded",
        "path": list(result.execution_path),
        "result": {
            "final_action": encode_action(result.final_action),
            "last_node_id": result.last_node_id,
            "value": result.result,
            "duration": result.duration,
        },
    }


def failed(record: Mapping[str, Any], error: BaseException) -> dict[str, Any]:
    """``record`` of a run that failed with ``error``."""
    return {**record, "state": "failed", "error": type_and_message(error)}


def recorded_result(record: Mapping[str, Any], storage: Storage) -> FlowResult:
    """The FlowResult of a run whose record says it succeeded."""
    result = record["result"]
    path = tuple(record["path"])
    return FlowResult(
        run_id=record["run_id"],
        flow_name=record["flow"],
        final_action=_decode_action(result["final_action"]),
        last_node_id=result["last_node_id"],
        steps_executed=len(path),
        execution_path=path,
        result=result["value"],
        success=True,
        duration=result["duration"],
        store=storage,
    )


def restore(run: ActiveRun, record: Mapping[str, Any]) -> list[Branch]:
    """Put ``run`` back where its record says; return its branches in flight, each with
    its ``resume_at`` (none when no step had completed).

    Raises CosmoFlowError when the record does not fit the flow (it was changed).
    """
    run.path.extend(record["path"])
    run.steps = len(run.path)
    if record["last"] is None:
        return []
    forks: list[Fork] = []
    for saved in record["forks"]:
        parent = _branch(run, saved["parent"], forks)
        fork = Fork(parent, saved["depth"], saved["pending"], saved["join"], saved["params"])
        forks.append(fork)
    branches = []
    for saved in record["branches"]:
        branch = _branch(run, saved, forks)
        branch.resume_at = {key: value for key, value in saved.items() if key != "fork"}
        if "params" in saved:
            run.steps += 1  # its step was under way: counted when it was sent
        branches.append(branch)
    return branches


def resumed(
    run: ActiveRun, branch: Branch, actor: NodeActor, values: Mapping[str, Any]
) -> Step | StepDone | FlowEnded:
    """What sends a restored ``branch`` on: a Step for ``actor``, the node its frames
    point at (its step was under way), or a StepDone or FlowEnded for the router to
    route with the store ``values`` the run's conditions read."""
    saved = branch.resume_at
    assert saved is not None
    if "params" in saved:
        return Step(run, branch, MappingProxyType(saved["params"]), actor)
    if "end" in saved:
        end = saved["end"]
        return FlowEnded(run, branch, end["node"], _decode_action(end["action"]), values)
    return StepDone(run, branch, actor, _decode_action(saved["action"]), values)


def _branch(run: ActiveRun, saved: Mapping[str, Any], forks: list[Fork]) -> Branch:
    """The branch a record saved."""
    number = saved.get("fork")
    return Branch(
        _frames(run.flow, saved["frames"], run.run_id),
        None if number is None else forks[number],
        saved["label"],
        saved["count"],
    )


def _frames(flow: Flow, saved: list[list[Any]], run_id: str) -> list[Frame]:
    frames: list[Frame] = []
    current: Flow | None = flow
    parent = ""
    for node_id, steps in saved:
        if current is None:
            raise CosmoFlowError(
                f"run {run_id!r}: its record names node {node_id!r} inside node {parent!r}, "
                "which is no longer a flow"
            )
        if node_id not in current.nodes:
            raise CosmoFlowError(
                f"run {run_id!r}: its record names node {node_id!r}, which flow "
                f"{current.name!r} lacks (removed or renamed since the run was recorded)"
            )
        frames.append(Frame(current, node_id, steps))
        parent = node_id
        inner = current.nodes[node_id]
        current = inner if isinstance(inner, Flow) else None
    return frames


def encode_action(action: Action) -> dict[str, Any]:
    """``action`` as JSON."""
    return {
        "name": action.name,
        "params": dict(action.params),
        "complete": action.is_complete,
        "result": action.result,
    }


def _decode_action(data: Mapping[str, Any]) -> Action:
    if data["complete"]:
        return Action.complete(data["result"])
    return Action.with_params(data["name"], **data["params"])
