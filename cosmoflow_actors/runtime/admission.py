"""Admission: the bound on the runs an engine has in flight (``max_runs``)."""

from __future__ import annotations

from collections import OrderedDict
from typing import final

import trio


@final
class Admission:
    """At most ``limit`` slots taken at once; takers beyond that wait, first come first
    served, and a freed slot goes straight to the longest waiter.

    What ``trio.Semaphore`` promises, for the one use the engine makes of it, with less
    held by each waiter: a waiting caller holds its task's entry here and one frame, no
    exception (a semaphore's waiter keeps the WouldBlock it caught, with its traceback,
    for as long as it waits).
    """

    __slots__ = ("_free", "_limit", "_waiting")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._free = limit
        """Slots nobody holds. Never above 0 while a task waits: a freed slot goes to
        a waiter."""
        self._waiting: OrderedDict[trio.lowlevel.Task, None] = OrderedDict()
        """The tasks waiting for a slot, longest first."""

    @property
    def waiting(self) -> int:
        """How many tasks wait for a slot."""
        return len(self._waiting)

    @trio.lowlevel.enable_ki_protection
    async def acquire(self) -> None:
        """Take a slot; block while none is free (after the tasks that came first).

        A checkpoint. Cancelled before it has the slot, it takes none.
        """
        if self._free:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._free -= 1
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        task = trio.lowlevel.current_task()
        self._waiting[task] = None

        def abort(_: object) -> trio.lowlevel.Abort:
            del self._waiting[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def acquire_nowait(self) -> None:
        """Take a slot; raise trio.WouldBlock, naming the limit, when none is free.
        Never blocks."""
        if not self._free:
            raise trio.WouldBlock(
                f"max_runs={self._limit} runs are in flight: start_run waits for one to "
                "end, or open the engine with a higher max_runs"
            )
        self._free -= 1

    @trio.lowlevel.enable_ki_protection
    def release(self) -> None:
        """Free a slot: the longest waiter, if any, takes it and wakes. Never blocks."""
        if self._waiting:
            task, _ = self._waiting.popitem(last=False)
            trio.lowlevel.reschedule(task)
        else:
            self._free += 1
