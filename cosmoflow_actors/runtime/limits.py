"""Rate limits for node actors."""

from __future__ import annotations

import math
from collections import deque

import trio


class RateLimiter:
    """At most ``calls`` grants in any window of ``per_seconds`` (trio clock).

    A grant's time is read by the caller's own task at the moment it is granted, and
    ``acquire`` returns it with no checkpoint in between. The limiter keeps the last
    ``calls`` grant times and grants only once the oldest of them is ``per_seconds``
    old, so the limit holds over the times callers really go on, however late a
    waiting task is scheduled.

    Callers are served first come, first served. A caller that cannot go at once joins
    a queue. The first one in the queue keeps time: it sleeps until its slot opens.
    Then it *releases* itself and every waiter behind it whose slot is open too; each
    released waiter reads the clock and records its grant when its task runs. Until
    then its slot stays reserved for it, so nobody who came later takes it.
    """

    def __init__(self, calls: int, per_seconds: float) -> None:
        self.calls = calls
        self.per_seconds = per_seconds
        self._grants: deque[float] = deque(maxlen=calls)
        """The times of the last ``calls`` grants, oldest first."""
        self._queue: deque[_Waiter] = deque()
        """Waiters not yet released, in arrival order (cancelled ones are skipped)."""
        self._released = 0
        """Waiters released whose task has not recorded its grant yet."""
        self.waiting = 0
        """Callers waiting now (queued or released), for the engine's statistics."""

    async def acquire(self) -> float:
        """Return the trio time of this caller's grant; blocks until it is granted.

        A checkpoint only when it has to wait. A cancelled waiter takes no slot; a
        granted one keeps its slot.
        """
        now = trio.current_time()
        if not self._queue and not self._released and self._open(now):
            self._grants.append(now)
            return now
        return await self._wait()

    def _open(self, now: float) -> bool:
        """Whether a grant at ``now`` keeps every window within the limit."""
        grants = self._grants
        return len(grants) < self.calls or grants[0] + self.per_seconds <= now

    async def _wait(self) -> float:
        """Queue, wait to be released, then record the grant."""
        waiter = _Waiter()
        self._queue.append(waiter)
        self.waiting += 1
        try:
            # First in line: keep time from here (or go at once if its slot is open).
            self._release(trio.current_time())
            while not waiter.released:
                with waiter.scope:
                    await waiter.event.wait()
                if not waiter.released:
                    # Its slot opened (the scope's deadline passed): release it and
                    # whoever else may go now.
                    waiter.scope = trio.CancelScope()
                    self._release(trio.current_time())
        except BaseException:
            self._leave(waiter)
            raise
        finally:
            self.waiting -= 1
        return self._grant()

    def _grant(self) -> float:
        """Record a released waiter's grant at this moment and return its time."""
        now = trio.current_time()
        # Released waiters' slots opened at or before their release, and nobody else
        # takes a slot while any of them has not recorded its grant.
        assert self._open(now), "a released waiter found its slot taken"
        self._released -= 1
        self._grants.append(now)
        self._release(now)
        return now

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter was cancelled: hand its slot (or its place in line) on."""
        if waiter.released:
            self._released -= 1
        else:
            waiter.gone = True
        self._release(trio.current_time())

    def _release(self, now: float) -> None:
        """Release, in arrival order, the waiters whose slot is open at ``now``; the
        first one left sleeps until its slot opens."""
        queue = self._queue
        while queue:
            waiter = queue[0]
            if waiter.gone:
                queue.popleft()
                continue
            opens = self._opening(self._released)
            if opens > now:
                waiter.scope.deadline = opens
                return
            queue.popleft()
            waiter.released = True
            self._released += 1
            waiter.event.set()

    def _opening(self, index: int) -> float:
        """When the ``index``-th slot from now opens (0: the next one).

        -inf if it is open already; inf while it depends on a grant still to come
        (a released waiter that has not recorded its grant yet).
        """
        grants = self._grants
        spare = self.calls - len(grants)
        if index < spare:
            return -math.inf
        index -= spare
        if index < len(grants):
            return grants[index] + self.per_seconds
        return math.inf


class _Waiter:
    """One caller in the queue: released by an event, timed by its scope's deadline."""

    __slots__ = ("event", "gone", "released", "scope")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.scope = trio.CancelScope()
        self.released = False
        self.gone = False
