"""A run: the engine's record of it, which its actors move along, and the handle a caller
gets."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, final

import trio

from cosmoflow_actors.errors import RunCancelledError
from cosmoflow_actors.events import LOGGER
from cosmoflow_actors.flow import Flow, FlowResult
from cosmoflow_actors.runtime.observed_state import ObservedState
from cosmoflow_actors.trio_run import require_trio_run

if TYPE_CHECKING:
    from cosmoflow_actors.action import Action
    from cosmoflow_actors.runtime.durability import Durability
    from cosmoflow_actors.runtime.store_actor import StoreActor
    from cosmoflow_actors.storage.base import Storage


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
        # Identity tests: an Enum's == is Python-level.
        return self is not RunState.PENDING and self is not RunState.RUNNING


class RunStateValue(Protocol):
    """What :attr:`Run.state` is, typed: a ``trio_util.AsyncValue[RunState]`` (see
    trio_util's documentation for each call). A predicate is given the state (and, for
    a transition, the state before)."""

    @property
    def value(self) -> RunState:
        """The state now."""

    async def wait_value(
        self, value_or_predicate: RunState | Callable[[RunState], bool], *, held_for: float = 0.0
    ) -> RunState:
        """Block until the state is ``value`` (or meets the predicate); return it."""

    async def wait_transition(
        self, value_or_predicate: RunState | Callable[[RunState, RunState], bool] = ...
    ) -> tuple[RunState, RunState]:
        """Block until the state next changes (to ``value``, or meeting the predicate);
        return the new state and the one before."""

    def eventual_values(
        self,
        value_or_predicate: RunState | Callable[[RunState], bool] = ...,
        held_for: float = 0.0,
    ) -> AsyncGenerator[RunState, None]:
        """The state now and each later one (that is ``value``, or meets the predicate).
        Left early, close it (``contextlib.aclosing``)."""

    def transitions(
        self, value_or_predicate: RunState | Callable[[RunState, RunState], bool] = ...
    ) -> AsyncGenerator[tuple[RunState, RunState], None]:
        """Each later change of state (to ``value``, or meeting the predicate): the new
        state and the one before. Left early, close it (``contextlib.aclosing``)."""

    def open_transform(self, function: Callable[[RunState], Any]) -> AbstractContextManager[Any]:
        """A context manager giving a derived AsyncValue: ``function`` of the state."""


@dataclass(slots=True)
class Frame:
    """Where a branch is inside one flow: the node it is at and the steps taken there.

    A branch has one frame per flow it is inside; a nested flow pushes a frame.
    """

    flow: Flow
    node_id: str
    steps: int = 0


@dataclass(slots=True, eq=False)
class Branch:
    """One line of execution of a run: a frame stack, and the fan-out it is part of.

    A run starts with one branch; a route to several nodes forks the branch into one
    child per target, each with a copy of its frames.
    """

    frames: list[Frame]
    fork: Fork | None = None
    label: str = ""
    """Names the branch among the run's: ``""`` for the first, ``"<count>.<i>/"`` added
    for the ``i``-th child of a fork (see :meth:`child`)."""
    count: int = 0
    """The steps taken on this branch and the branches it came from, plus one per fork:
    its steps' numbers, which a resumed durable run gives its steps again."""
    resume_at: dict[str, Any] | None = None
    """In a durable run, where the branch goes on after a crash, as JSON for the record
    (see runtime.durability); None in other runs."""

    def child(self, fork: Fork, index: int) -> Branch:
        """The ``index``-th branch of ``fork``, starting where this one is."""
        frames = [Frame(f.flow, f.node_id, f.steps) for f in self.frames]
        return Branch(frames, fork, f"{self.label}{self.count}.{index}/", self.count)


@dataclass(slots=True, eq=False)
class Fork:
    """A fan-out in progress: its branches gather at a join node or end.

    When every branch has arrived or ended, ``parent`` goes on at the join with the
    arrivals' params merged (see :meth:`params`), or, if none arrived, ends as the last
    branch did.
    """

    parent: Branch
    depth: int
    pending: int
    join_id: str | None = None
    arrivals: list[Mapping[str, Any]] = field(default_factory=list)
    """The params of each arrival at the join that brought any (a branch, or a target
    of the fan-out itself), in arrival order."""

    def params(self) -> dict[str, Any]:
        """The join's params: the arrivals' params merged, a later arrival's value of a
        key winning."""
        merged: dict[str, Any] = {}
        for params in self.arrivals:
            merged.update(params)
        return merged


@final
class ActiveRun:
    """The engine's record of one run: what its actors move along (its branches, path,
    step count and the cancel scopes of its steps in flight), its durability, and how
    it ended. Only the engine and its actors hold it; a caller gets a :class:`Run`.
    """

    __slots__ = (
        "_done",
        "_error",
        "_error_traceback",
        "_observed",
        "_on_finish",
        "_result",
        "_state",
        "condition_keys",
        "durability",
        "finished",
        "flow",
        "main",
        "path",
        "run_id",
        "scopes",
        "settled",
        "started_at",
        "steps",
        "storage",
        "store",
        "store_actor",
    )

    def __init__(
        self,
        run_id: str,
        flow: Flow,
        store_actor: StoreActor,
        storage: Storage,
        on_finish: Callable[[ActiveRun], None],
        durability: Durability,
        condition_keys: frozenset[str],
    ) -> None:
        self.run_id = run_id
        self.flow = flow
        self.storage = storage
        self.store_actor = store_actor
        """The store actor serving ``storage``; the run holds one use of it."""
        self.store = store_actor.client(storage)
        self._state = RunState.PENDING
        self.finished = False
        """Whether the run has ended (succeeded, failed or was cancelled)."""
        self.settled = False
        """Whether the run has ended or routing has decided its end (the task that
        routed the outcome ends it, after writing a durable run's record): no step of
        it starts from then on, and its outcomes lead nowhere."""
        self._observed: ObservedState | None = None
        self._done: trio.Event | None = None
        self.main = Branch([Frame(flow, flow.start_id)])
        self.path: list[str] = []
        self.steps = 0
        self.scopes: dict[trio.CancelScope, None] = {}
        """The cancel scopes of the run's steps in flight (and of the senders waiting for
        room in a full mailbox), in the order they came: a dict, so a step that ends
        takes its scope out without a scan of the others (a fan-out has one per branch
        in flight). A scope is in it at most once: it is its task's, and a task runs
        one step, or waits to send one, at a time."""
        self.started_at = trio.current_time()
        self._on_finish = on_finish
        self._result: FlowResult | None = None
        self._error: BaseException | None = None
        self._error_traceback: TracebackType | None = None
        """The error's traceback as it ended the run: each :meth:`unwrap` raises the
        error from there, so its traceback does not grow with every wait."""
        self.durability = durability
        """What keeps the run's record at the actors' fixed points (runtime.durability)."""
        self.condition_keys = condition_keys
        """The store keys the flow's route conditions read (read after each step)."""

    def observed(self, trio_token: trio.lowlevel.TrioToken) -> RunStateValue:
        """The state as an observable AsyncValue (see :attr:`Run.state`) whose waits
        belong to the trio run of ``trio_token`` (the engine's), made on first use, so
        runs nobody observes carry none."""
        if self._observed is None:
            self._observed = ObservedState(self._state, trio_token)
        # trio_util carries no type marker: to mypy an AsyncValue is Any.
        observed: RunStateValue = self._observed
        return observed

    @property
    def result(self) -> FlowResult | None:
        """The result of a run that succeeded; None until then."""
        return self._result

    @property
    def error(self) -> BaseException | None:
        """The error of a run that failed or was cancelled; None otherwise."""
        return self._error

    @property
    def current_state(self) -> RunState:
        """The state now (no AsyncValue needed)."""
        return self._state

    def mark_running(self) -> None:
        """Mark the run RUNNING (its first step has started)."""
        if self._state is RunState.PENDING:
            self._set_state(RunState.RUNNING)

    def _set_state(self, state: RunState) -> None:
        """Record ``state``; its observers (if any) see it. An observer of a value
        derived from the state (by trio_util, outside ObservedState's guard) that
        raises is logged: the engine's task goes on."""
        self._state = state
        if self._observed is None:
            return
        try:
            self._observed.value = state
        except KeyboardInterrupt:
            raise
        except BaseException:
            LOGGER.exception("an observer of run %s's state raised at %s", self.run_id, state)

    async def wait(self) -> FlowResult:
        """What :meth:`Run.wait` does. A checkpoint."""
        if not self.finished:
            if self._done is None:
                self._done = trio.Event()
            await self._done.wait()
        else:
            await trio.lowlevel.checkpoint()
        return self.unwrap()

    def unwrap(self) -> FlowResult:
        """The result of a run that has ended, or its error raised. Never blocks."""
        if self._error is not None:
            raise self._error.with_traceback(self._error_traceback)
        assert self._result is not None, "the run has not ended"
        return self._result

    def cancel(self) -> None:
        """What :meth:`Run.cancel` does. Never blocks."""
        if self.finished:
            return
        self.fail(RunCancelledError(f"run {self.run_id} was cancelled"), RunState.CANCELLED)

    def result_of(self, action: Action, last_node_id: str, result: Any) -> FlowResult:
        """The FlowResult this run would have if it ended now with ``action``."""
        return FlowResult(
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

    def succeed(self, result: FlowResult) -> None:
        """End the run successfully with ``result``.

        Does nothing if the run has already ended (it was cancelled meanwhile).
        """
        if self.finished:
            return
        self._result = result
        self._finish(RunState.SUCCEEDED)

    def fail(self, error: BaseException, state: RunState = RunState.FAILED) -> None:
        """End the run with ``error`` (FAILED, or CANCELLED for a cancellation).

        Does nothing if the run has already ended.
        """
        if self.finished:
            return
        self._error = error
        self._error_traceback = error.__traceback__
        self._finish(state)

    def _finish(self, state: RunState) -> None:
        """Record the end, cancel every step still in flight (other branches), notify."""
        self.finished = True
        self.settled = True
        self._set_state(state)
        if self._done is not None:
            self._done.set()
        for scope in self.scopes:
            scope.cancel()
        self._on_finish(self)

    def __repr__(self) -> str:
        return f"<Run {self.run_id} of {self.flow.name!r}: {self._state.value}>"


@final
class Run:
    """Handle on a run started with ``Engine.start_run``: watch it, wait for it, cancel
    it.

    ``state`` is an observable ``trio_util.AsyncValue[RunState]``. The engine moves the
    run along; nothing the handle offers changes where the run is.
    """

    __slots__ = ("_run", "_trio_token")

    def __init__(self, run: ActiveRun, trio_token: trio.lowlevel.TrioToken) -> None:
        self._run = run
        self._trio_token = trio_token
        """The trio run of the engine: the only one the run may be awaited in."""

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self._run.run_id

    @property
    def flow(self) -> Flow:
        """The flow the run runs."""
        return self._run.flow

    @property
    def state(self) -> RunStateValue:
        """The run's state as an observable ``trio_util.AsyncValue[RunState]`` (made
        on first use), typed as :class:`RunStateValue`. Its waits raise RuntimeError
        outside the engine's trio run."""
        return self._run.observed(self._trio_token)

    @property
    def current_state(self) -> RunState:
        """The state now (no AsyncValue needed)."""
        return self._run.current_state

    @property
    def result(self) -> FlowResult | None:
        """The result of a run that succeeded; None until then."""
        return self._run.result

    @property
    def error(self) -> BaseException | None:
        """The error of a run that failed or was cancelled; None otherwise."""
        return self._run.error

    async def wait(self) -> FlowResult:
        """Block until the run ends; return its result or raise its error.

        Raises RunCancelledError for a cancelled run, RuntimeError outside the
        engine's trio run. Cancelling the waiter does not cancel the run
        (``Engine.run`` does). A checkpoint.
        """
        require_trio_run(self._trio_token, "the run's wait")
        return await self._run.wait()

    def cancel(self) -> None:
        """Cancel the run: it ends now as CANCELLED and its steps in flight are cancelled.

        Does nothing if the run has already ended. Never blocks.
        """
        self._run.cancel()

    def __repr__(self) -> str:
        return repr(self._run)
