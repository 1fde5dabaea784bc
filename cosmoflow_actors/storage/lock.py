"""The lock that keeps a :class:`~cosmoflow_actors.FileStorage`'s files to one user.

``PATH.lock``, beside the snapshot ``PATH``, is locked with ``flock`` for as long as a
FileStorage over ``PATH`` is open. A ``flock`` lock belongs to an open file description,
so it keeps two instances in one process apart as well as two processes, and the
operating system drops it when its process dies: a crash leaves no stale lock. A lock
stays its holder's alone: a child forked while it is held closes its copy of the
descriptor at once, so that the child neither keeps the lock after its parent died nor
lets go of it for the parent. The holder writes its pid into the file, for the error
another opener gets, and removes the file when it lets go, while it still holds the
lock; an opener that locked a file which was removed meanwhile locks the new one
instead.

Every function here blocks on the file system (briefly: none waits for the holder). Run
them in a worker thread.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Held:
    """A lock process ``pid`` holds: the lock file and the descriptor that locks it."""

    path: Path
    fd: int
    pid: int


@dataclass(frozen=True, slots=True)
class Busy:
    """The lock is held by another holder: process ``pid``, or None when the holder
    has not written its pid yet."""

    pid: int | None


_held_here: set[int] = set()
"""The descriptors of the locks this process holds (a set's add and discard are atomic,
and locks are taken and released in worker threads)."""


def _close_in_child() -> None:
    """In a child just forked: close its copies of its parent's lock descriptors."""
    for fd in _held_here:
        with suppress(OSError):
            os.close(fd)
    _held_here.clear()


os.register_at_fork(after_in_child=_close_in_child)


def lock_path(path: Path) -> Path:
    """Return the lock file's path for the snapshot at ``path``."""
    return path.with_name(f"{path.name}.lock")


def try_lock(path: Path, mode: int) -> Held | Busy:
    """Lock the file ``path``, created with permission bits ``mode`` if missing, unless
    another holder has it locked (blocks, never for long).

    Raises OSError when the file cannot be created, opened or written (a full disk);
    then no descriptor is left open and no lock kept.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            found = _lock(path, fd)
        except BaseException:
            os.close(fd)
            raise
        if isinstance(found, Held):
            return found
        os.close(fd)
        if isinstance(found, Busy):
            return found


def _lock(path: Path, fd: int) -> Held | Busy | None:
    """Lock ``fd``, the file opened at ``path``, and write this process's pid into it;
    Busy when another holder has it locked, None when the holder removed it as it let
    go (then lock the file at ``path`` now)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return Busy(_read_pid(fd))
    if not _is_at(path, fd):
        return None
    _write_pid(fd)
    _held_here.add(fd)
    return Held(path, fd, os.getpid())


def release(held: Held) -> None:
    """Remove the lock file, then unlock it (blocks). In a forked child, whose copy of
    the descriptor was closed at the fork, do nothing.

    A lock file that cannot be removed (a read-only directory) is left: the next holder
    locks it and writes its own pid.
    """
    if held.pid != os.getpid():
        return
    with suppress(OSError):
        if _is_at(held.path, held.fd):
            os.unlink(held.path)
    _held_here.discard(held.fd)
    os.close(held.fd)


def _is_at(path: Path, fd: int) -> bool:
    """Whether ``fd`` is the file at ``path`` (not one removed since it was opened)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (status.st_dev, status.st_ino) == (opened.st_dev, opened.st_ino)


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdecimal() else None
