"""Rate limits for node actors."""

from __future__ import annotations

from collections import deque

import trio


class RateLimiter:
    """At most ``calls`` acquisitions in any window of ``per_seconds`` (trio clock).

    Each caller reserves a start time in arrival order: now, or ``per_seconds`` after
    the start reserved ``calls`` acquisitions earlier, whichever is later. Reserving
    happens without a checkpoint, so concurrent callers never exceed the limit, and
    they are served first come, first served.
    """

    def __init__(self, calls: int, per_seconds: float) -> None:
        self.calls = calls
        self.per_seconds = per_seconds
        self._starts: deque[float] = deque(maxlen=calls)
        self.waiting = 0

    async def acquire(self) -> None:
        """Return at this caller's reserved start time; blocks until then.

        A checkpoint only when it has to wait. A cancelled caller's slot stays used.
        """
        now = trio.current_time()
        starts = self._starts
        start = now
        if len(starts) == self.calls:
            start = max(now, starts[0] + self.per_seconds)
        starts.append(start)
        if start > now:
            self.waiting += 1
            try:
                await trio.sleep_until(start)
            finally:
                self.waiting -= 1
