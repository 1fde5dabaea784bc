"""The GIL switch interval while the engine waits for a worker thread.

A worker thread that returns from a system call (a storage backend's write or fsync)
needs the GIL back. CPython gives it to the waiting thread only once its wait has lasted
the switch interval (5 ms by default) without the GIL changing hands. A busy trio thread
releases and retakes the GIL at every scheduler pass (its ``epoll`` call), which wakes
the waiting thread, lets it lose the race, and restarts its wait: a commit that takes
0.3 ms on an idle loop took 5 to 120 ms while thousands of runs were starting. With a
switch interval shorter than most scheduler passes, the waiting thread asks for the GIL
and gets it within that interval.

The interval is a setting of the whole process, so :data:`SHORT_SWITCH_INTERVAL`
shortens it only while the store actor of a backend instance opens it or applies a
batch (when the engine waits for a backend's threads), and puts back the value it found
when the last one is done, unless the program set another interval meanwhile (that one
is kept). The engine-wide actor of memory storage, whose backends never
await, leaves it alone. With no other thread wanting the GIL, a shorter interval changes
nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from types import TracebackType
from typing import Final, final

SWITCH_INTERVAL: Final = 0.0001
"""Seconds: 100 µs, shorter than a busy scheduler pass. Measured on 10,000 concurrent
FileStorage sets: 1.15 s at the default 5 ms, 0.61 to 0.65 s with 100 µs around each
batch."""

_lock = threading.Lock()
"""Guards every :class:`ShortSwitchInterval`'s count of users and saved interval."""


def _unlock_in_child() -> None:
    """In a child just forked: a new lock, since a thread of the parent may have held
    the old one at the fork, and no thread of the child would ever release it. A user
    inside in another thread at the fork stays counted in the child, which then keeps
    the short interval."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_unlock_in_child)


@final
class ShortSwitchInterval:
    """A context manager, re-entrant across tasks and threads, that makes
    ``sys.getswitchinterval()`` at most ``seconds`` when the first user enters it. When
    the last one leaves, it puts back the interval it found, if the interval is still
    the one it set: an interval the program set meanwhile is the program's choice.

    Never blocks (beyond a lock all instances share, held only to count) and is not a
    checkpoint. A child forked while another thread was entering or leaving it can use
    it (see :func:`_unlock_in_child`).
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._users = 0
        self._saved = 0.0
        self._set = 0.0

    def __enter__(self) -> None:
        with _lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, self._seconds))
                # As sys reads it back (it keeps whole microseconds).
                self._set = sys.getswitchinterval()
            self._users += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with _lock:
            self._users -= 1
            if self._users == 0 and sys.getswitchinterval() == self._set:
                sys.setswitchinterval(self._saved)


SHORT_SWITCH_INTERVAL: Final = ShortSwitchInterval(SWITCH_INTERVAL)
"""The one the store actors share."""
