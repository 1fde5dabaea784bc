"""A run: its handle for callers and its record for the actors that move it along."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

import trio
from trio_util import AsyncValue

from cosmoflow_actors.errors import RunCancelledError
from cosmoflow_actors.flow import Flow, FlowResult

if TYPE_CHECKING:
    from cosmoflow_actors.action import Action
    from cosmoflow_actors.storage.base import Storage
    from cosmoflow_actors.store import SharedStore


class RunState(enum.Enum):
    """Where a run is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the run has ended (succeeded, failed or cancelled)."""
        return self in _FINISHED


_FINISHED = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})


@dataclass(slots=True)
class Frame:
    """Where a run is inside one flow: the node it is at and the steps taken there.

    A run has one frame per flow it is inside; a nested flow pushes a frame.
    """

    flow: Flow
    node_id: str
    steps: int = 0


@final
class Run:
    """Handle on a run started with ``Engine.start_run``.

    ``state`` is an observable ``trio_util.AsyncValue[RunState]``. The actors keep the
    run's position (its frames) and its path here; only they change them.
    """

    __slots__ = (
        "_error",
        "_on_finish",
        "_result",
        "flow",
        "frames",
        "path",
        "run_id",
        "scope",
        "started_at",
        "state",
        "storage",
        "store",
    )

    def __init__(
        self,
        run_id: str,
        flow: Flow,
        storage: Storage,
        store: SharedStore,
        on_finish: Callable[[Run], None],
    ) -> None:
        self.run_id = run_id
        self.flow = flow
        self.storage = storage
        self.store = store
        self.state: AsyncValue[RunState] = AsyncValue(RunState.PENDING)
        self.frames: list[Frame] = []
        self.path: list[str] = []
        self.scope: trio.CancelScope | None = None
        self.started_at = trio.current_time()
        self._on_finish = on_finish
        self._result: FlowResult | None = None
        self._error: BaseException | None = None

    @property
    def finished(self) -> bool:
        """Whether the run has ended."""
        state: RunState = self.state.value
        return state.finished

    async def wait(self) -> FlowResult:
        """Block until the run ends; return its result or raise its error.

        Raises RunCancelledError for a cancelled run. Cancelling the waiter does not
        cancel the run (``Engine.run`` does).
        """
        await self.state.wait_value(lambda state: state.finished)
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Cancel the run: it ends now as CANCELLED and its step in flight is cancelled.

        Does nothing if the run has already ended. Never blocks.
        """
        if self.finished:
            return
        if self.scope is not None:
            self.scope.cancel()
        self.fail(RunCancelledError(f"run {self.run_id} was cancelled"), RunState.CANCELLED)

    def succeed(self, action: Action, last_node_id: str, result: Any) -> None:
        """End the run successfully with ``action`` as its final action.

        Does nothing if the run has already ended (it was cancelled meanwhile).
        """
        if self.finished:
            return
        self._result = FlowResult(
            run_id=self.run_id,
            flow_name=self.flow.name,
            final_action=action,
            last_node_id=last_node_id,
            steps_executed=len(self.path),
            execution_path=tuple(self.path),
            result=result,
            success=True,
            duration=trio.current_time() - self.started_at,
            store=self.storage,
        )
        self._finish(RunState.SUCCEEDED)

    def fail(self, error: BaseException, state: RunState = RunState.FAILED) -> None:
        """End the run with ``error`` (FAILED, or CANCELLED for a cancellation).

        Does nothing if the run has already ended.
        """
        if self.finished:
            return
        self._error = error
        self._finish(state)

    def _finish(self, state: RunState) -> None:
        self.state.value = state
        self._on_finish(self)

    def __repr__(self) -> str:
        return f"<Run {self.run_id} of {self.flow.name!r}: {self.state.value.value}>"
