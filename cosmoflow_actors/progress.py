"""Run counts for progress displays: exact, and nearly free when nobody watches.

The engine keeps one :class:`Progress` and updates it as runs start and end, with plain
method calls that never block. A display reads a :class:`ProgressSnapshot` and waits for
the next change with :meth:`Progress.wait_changed`. Unlike an event stream, nothing is
ever lost: however far behind the display is, the snapshot it gets holds every count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import trio

from cosmoflow_actors.trio_run import require_trio_run


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    """The run counts at one moment."""

    started: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def finished(self) -> int:
        """Runs that ended, however they ended."""
        return self.succeeded + self.failed + self.cancelled

    @property
    def in_flight(self) -> int:
        """Runs started and not ended yet."""
        return self.started - self.finished


@final
class Progress:
    """Counts of the runs started, succeeded, failed and cancelled.

    The updates cost an addition and a test while nobody waits in :meth:`wait_changed`.
    """

    __slots__ = ("_cancelled", "_changed", "_failed", "_started", "_succeeded", "_trio_token")

    def __init__(self, trio_token: trio.lowlevel.TrioToken | None = None) -> None:
        self._trio_token = trio_token
        """The trio run whose tasks may wait for a change (the engine's); None: any."""
        self._started = 0
        self._succeeded = 0
        self._failed = 0
        self._cancelled = 0
        self._changed: trio.Event | None = None
        """Set at the next change; made only when someone waits for one."""

    def run_started(self) -> None:
        """Count a run that started (the engine's call). Never blocks."""
        self._started += 1
        if self._changed is not None:
            self._notify(self._changed)

    def run_finished(self, state: str) -> None:
        """Count a run that ended in ``state``: "succeeded", "failed" or "cancelled"
        (the engine's call). Never blocks; raises ValueError for any other state."""
        if state == "succeeded":
            self._succeeded += 1
        elif state == "failed":
            self._failed += 1
        elif state == "cancelled":
            self._cancelled += 1
        else:
            raise ValueError(f"a run ends succeeded, failed or cancelled, not in state {state!r}")
        if self._changed is not None:
            self._notify(self._changed)

    def snapshot(self) -> ProgressSnapshot:
        """The counts now. Never blocks."""
        return ProgressSnapshot(self._started, self._succeeded, self._failed, self._cancelled)

    async def wait_changed(self, since: ProgressSnapshot) -> ProgressSnapshot:
        """Block until the counts differ from ``since``; return them. A checkpoint.

        Returns at once (after the checkpoint) when they differ already, so a loop
        ``snapshot = await progress.wait_changed(snapshot)`` misses no change: each
        snapshot holds every count up to its moment. Raises RuntimeError outside the
        engine's trio run.
        """
        if self._trio_token is not None:
            require_trio_run(self._trio_token, "the engine's progress")
        if self.snapshot() != since:
            await trio.lowlevel.checkpoint()
        while self.snapshot() == since:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
        return self.snapshot()

    def _notify(self, changed: trio.Event) -> None:
        """Wake the tasks waiting for a change; the next waiter makes a new event."""
        self._changed = None
        changed.set()
