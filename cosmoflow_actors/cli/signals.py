"""How a command runs trio and how it stops: Ctrl-C (SIGINT) cancels its runs (or
asks the command to stop them, see :func:`trio_run`'s ``on_interrupt``) and waits for
them :data:`STOP_GRACE` seconds at most, and a second one exits at once, with status
:data:`INTERRUPTED`; a :class:`Deadline` ends the process when a step does not stop (a
worker's SIGTERM arms one too, with status :data:`TERMINATED`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Final, NoReturn, TypeVar, TypeVarTuple

import trio

INTERRUPTED: Final = 130
"""The exit status after Ctrl-C (SIGINT): 128 + 2, as a shell reports it."""
TERMINATED: Final = 143
"""The exit status of ``worker`` stopped by SIGTERM: 128 + 15, as a shell reports it."""
STOP_GRACE: Final = 1.0
"""Seconds a command that was interrupted (Ctrl-C) waits for its runs to stop before it
exits without them (a worker waits
:data:`~cosmoflow_actors.runtime.queue.claims.HAND_BACK_SECONDS` longer, to hand its runs
back; for SIGTERM too)."""
FLUSH_WAIT: Final = 0.2
"""Seconds a command that exits at once waits for stdout and stderr to be flushed."""
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def trio_run(
    function: Callable[[*Ts], Awaitable[T]],
    *args: *Ts,
    grace: float = STOP_GRACE,
    on_interrupt: Callable[[], None] | None = None,
) -> T:
    """``trio.run(function, *args)``, where Ctrl-C ends the process ``grace`` seconds on
    at the latest, and a second Ctrl-C at once (see :func:`_interrupts_end`). Given
    ``on_interrupt``, the first Ctrl-C calls it on the trio thread instead of raising
    KeyboardInterrupt: the command stops its runs itself, and ``function`` returns."""
    deadline = Deadline(grace, INTERRUPTED, "interrupted")
    try:
        return trio.run(_interrupts_end, deadline, on_interrupt, function, *args)
    finally:
        deadline.disarm()


async def _interrupts_end(
    deadline: Deadline,
    on_interrupt: Callable[[], None] | None,
    function: Callable[[*Ts], Awaitable[T]],
    *args: *Ts,
) -> T:
    """``await function(*args)``. The first Ctrl-C (SIGINT) goes to trio's handler as
    always (the command cancels its runs and waits for them to stop), or, given
    ``on_interrupt``, is handed to it, called soon on the trio thread (a step that
    blocks the trio thread holds it back). It also arms ``deadline``: a step that does
    not stop (a call on a thread executor, code that ignores the cancellation) keeps the
    command no longer than that. A second Ctrl-C prints ``cosmoflow: interrupted`` and
    exits at once, with status 130 (the process ends there: nothing is cleaned up)."""
    trio_handler = signal.getsignal(signal.SIGINT)
    if (
        threading.current_thread() is not threading.main_thread()
        or not callable(trio_handler)
        or trio_handler is signal.default_int_handler  # trio did not take SIGINT over
    ):
        return await function(*args)
    token = trio.lowlevel.current_trio_token()

    def handler(signum: int, frame: FrameType | None) -> None:
        if deadline.armed:
            _exit_now(INTERRUPTED, "cosmoflow: interrupted")
        deadline.arm()
        if on_interrupt is None:
            trio_handler(signum, frame)
        else:
            token.run_sync_soon(on_interrupt)

    signal.signal(signal.SIGINT, handler)
    try:
        return await function(*args)
    finally:
        signal.signal(signal.SIGINT, trio_handler)


class Deadline:
    """Ends the process ``grace`` seconds after :meth:`arm`, unless :meth:`disarm` comes
    first, with ``status`` and the line ``cosmoflow: WORD (...)``. A command that stops
    (Ctrl-C, a worker's SIGTERM) cancels its runs and waits for them, but a step in a
    thread cannot be cancelled and may never end. For the runs, the exit is a crash: a
    durable run resumes after its last committed step."""

    def __init__(self, grace: float, status: int, word: str) -> None:
        self._grace = grace
        self._status = status
        self._line = (
            f"cosmoflow: {word} (stopped without waiting for a step still running"
            f" after {grace:g} s)"
        )
        self._timer: threading.Timer | None = None

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def arm(self) -> None:
        """Start counting (in a daemon thread, which the trio thread cannot block)."""
        if self._timer is None:
            self._timer = threading.Timer(self._grace, _exit_now, (self._status, self._line))
            self._timer.daemon = True
            self._timer.start()

    def disarm(self) -> None:
        """Stop counting: the command stopped in time."""
        if self._timer is not None:
            self._timer.cancel()


def _exit_now(status: int, line: str) -> NoReturn:
    """Flush what can be flushed within :data:`FLUSH_WAIT`, write ``line`` on stderr and
    end the process now, with ``status`` (called from a signal handler or a timer's
    thread: the line is a raw write)."""
    flushing = threading.Thread(target=_flush_output, daemon=True)
    flushing.start()
    flushing.join(FLUSH_WAIT)  # a pipe nobody reads, or a lock the trio thread holds
    with contextlib.suppress(OSError):
        os.write(2, line.encode() + b"\n")
    os._exit(status)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
