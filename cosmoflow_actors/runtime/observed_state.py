"""The AsyncValue a run's state is observed through (``run.state``).

trio_util's AsyncValue calls its observers' predicates and transforms in the task that
sets its value: for a run's state, an engine task ending a step or the run. Here no
observer's code can fail that task: a predicate that raises there wakes its own
waiter, which raises the error in its own task (as it would have raised there had the
predicate failed on its first test); a transform that raises there is logged and its
derived value keeps its last value.

Its waits belong to the engine's trio run: one from another trio run raises
RuntimeError (trio could not wake it).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import TYPE_CHECKING, Any, Final

import trio
from trio_util import AsyncValue

from cosmoflow_actors.events import LOGGER
from cosmoflow_actors.trio_run import require_trio_run

if TYPE_CHECKING:
    from cosmoflow_actors.runtime.run import RunState

_NOTHING: Final = object()


def _any_change(*_: RunState) -> bool:
    return True


class _Guarded:
    """A waiter's predicate (or the value it waits for) that never raises: it keeps its
    error, answers True so that its waiter wakes, and :meth:`check` raises the error in
    the waiter's task. A KeyboardInterrupt goes on up."""

    __slots__ = ("_function", "_value", "error")

    def __init__(self, value_or_predicate: Any) -> None:
        self._function: Callable[..., Any] | None = (
            value_or_predicate if callable(value_or_predicate) else None
        )
        self._value = value_or_predicate
        self.error: BaseException | None = None

    def __call__(self, state: RunState, *before: RunState) -> bool:
        if self.error is not None:
            return True
        try:
            if self._function is None:
                return bool(state == self._value)
            return bool(self._function(state, *before))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self.error = exc
            return True

    def check(self) -> None:
        """Raise the error the predicate raised, if it did."""
        if self.error is not None:
            raise self.error


class _Transform:
    """A derived value's function. Its first result (computed in the task opening the
    transform) is raised as it is; later, when the state changes, an error is logged
    and the last result kept."""

    __slots__ = ("_function", "_last")

    def __init__(self, function: Callable[[RunState], Any]) -> None:
        self._function = function
        self._last: Any = _NOTHING

    def __call__(self, state: RunState) -> Any:
        if self._last is _NOTHING:
            self._last = self._function(state)
            return self._last
        try:
            self._last = self._function(state)
        except KeyboardInterrupt:
            raise
        except BaseException:
            LOGGER.exception(
                "%r, a transform of a run's state, raised at %s", self._function, state
            )
        return self._last


class ObservedState(AsyncValue):  # type: ignore[misc]  # trio_util is untyped
    """A ``trio_util.AsyncValue[RunState]`` whose observers' code cannot fail the task
    that changes the state (see the module's docstring). Each method blocks, and is
    a checkpoint, as AsyncValue's does; each raises RuntimeError outside the trio run
    of ``trio_token`` (the engine's)."""

    def __init__(self, state: RunState, trio_token: trio.lowlevel.TrioToken) -> None:
        super().__init__(state)
        self._trio_token = trio_token

    def _guarded(self, value_or_predicate: Any) -> _Guarded:
        """``value_or_predicate`` guarded for a wait, once the waiter is found to be in
        the engine's trio run. Never blocks."""
        require_trio_run(self._trio_token, "a wait on the run's state")
        return _Guarded(value_or_predicate)

    async def wait_value(self, value_or_predicate: Any, *, held_for: float = 0.0) -> RunState:
        guarded = self._guarded(value_or_predicate)
        state: RunState = await super().wait_value(guarded, held_for=held_for)
        guarded.check()
        return state

    async def wait_transition(
        self, value_or_predicate: Any = _any_change
    ) -> tuple[RunState, RunState]:
        guarded = self._guarded(value_or_predicate)
        change: tuple[RunState, RunState] = await super().wait_transition(guarded)
        guarded.check()
        return change

    async def eventual_values(
        self, value_or_predicate: Any = _any_change, held_for: float = 0.0
    ) -> AsyncGenerator[RunState, None]:
        guarded = self._guarded(value_or_predicate)
        async with aclosing(super().eventual_values(guarded, held_for)) as states:
            async for state in states:
                guarded.check()
                yield state

    async def transitions(
        self, value_or_predicate: Any = _any_change
    ) -> AsyncGenerator[tuple[RunState, RunState], None]:
        guarded = self._guarded(value_or_predicate)
        async with aclosing(super().transitions(guarded)) as changes:
            async for change in changes:
                guarded.check()
                yield change

    @contextmanager
    def open_transform(self, function: Callable[[RunState], Any]) -> Iterator[Any]:
        with super().open_transform(_Transform(function)) as derived:
            yield derived
