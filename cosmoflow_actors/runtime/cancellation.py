"""What a caller cancelled from outside gets from the engine: one trio.Cancelled.

Two situations would give it something else. A step made of many tasks (a batch node's
items, a BatchFlow's child runs, a nursery the node's own code opens) ends, when it is
cancelled, with a group of their Cancelled, which ``except trio.Cancelled`` misses:
:data:`CANCELLED_ALONE` lets the first of them through instead. And an engine that
closes may wake a caller, whose own scope was cancelled meanwhile, with no checkpoint
since: :func:`refuse_closed` gives it its Cancelled before the engine's refusal, which
would otherwise leave its cancelled scope as an error.

It also holds :func:`cancelled_when`, which cancels a scope when something happens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, NoReturn, final

import trio


def only_cancelled(error: BaseException) -> bool:
    """Whether ``error`` is a trio.Cancelled, or a group holding nothing else (nested
    groups too)."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[1] is None
    return isinstance(error, trio.Cancelled)


@final
class CancelledAlone:
    """A context manager: a group of nothing but trio.Cancelled (see
    :func:`only_cancelled`) that leaves the block leaves as the first of them, the
    instance itself; anything else leaves unchanged. Never blocks; reusable and
    re-entrant (it holds no state)."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not isinstance(exc, BaseExceptionGroup) or not only_cancelled(exc):
            return
        cancelled: BaseException = exc
        while isinstance(cancelled, BaseExceptionGroup):
            cancelled = cancelled.exceptions[0]
        # Raised here, it would take the group, which holds it, as its __context__.
        context = cancelled.__context__
        try:
            raise cancelled
        finally:
            cancelled.__context__ = context


CANCELLED_ALONE: Final = CancelledAlone()
"""The one the engine uses around the steps a caller of ``engine.run`` carries."""


async def refuse_closed(error: Exception) -> NoReturn:
    """Raise ``error``, the refusal of an engine (or a part of it) that has closed, or
    trio.Cancelled instead to a caller whose own scope is cancelled. A checkpoint (call
    it only once the engine has closed, so that the open path takes none)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    raise error


async def cancelled_when(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once ``wait()`` returns (an event was set, say); blocks until
    then. Started in the nursery of ``scope``, it ends that nursery's work then."""
    await wait()
    scope.cancel()
