"""Tests for :mod:`cosmoflow_actors.storage.lock`, the FileStorage lock file."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cosmoflow_actors.storage import lock


def test_a_second_try_is_refused_with_the_holders_pid_until_release(tmp_path: Path) -> None:
    path = tmp_path / "store.json.lock"

    held = lock.try_lock(path, 0o600)

    assert isinstance(held, lock.Held)
    assert path.read_text() == f"{os.getpid()}\n"
    assert lock.try_lock(path, 0o600) == lock.Busy(os.getpid())
    lock.release(held)
    assert not path.exists()
    again = lock.try_lock(path, 0o600)
    assert isinstance(again, lock.Held)
    lock.release(again)


def test_a_holder_that_has_not_written_its_pid_yet_is_busy_without_one(tmp_path: Path) -> None:
    path = tmp_path / "store.json.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)

        assert lock.try_lock(path, 0o600) == lock.Busy(None)
    finally:
        os.close(fd)


def test_a_file_removed_by_the_holder_letting_go_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last holder removes the file after this opener opened it and before it locked
    it: the lock it would get is on a file nobody else sees, so it locks the new one."""
    path = tmp_path / "store.json.lock"
    real_flock = fcntl.flock
    calls: list[int] = []

    def flock(fd: int, operation: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(path)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    held = lock.try_lock(path, 0o600)

    assert isinstance(held, lock.Held)
    assert len(calls) == 2
    assert os.fstat(held.fd).st_ino == path.stat().st_ino
    assert path.read_text() == f"{os.getpid()}\n"
    lock.release(held)


def test_release_leaves_a_file_that_replaced_the_lock_file(tmp_path: Path) -> None:
    path = tmp_path / "store.json.lock"
    held = lock.try_lock(path, 0o600)
    assert isinstance(held, lock.Held)
    path.unlink()
    path.write_text("another holder's file\n")

    lock.release(held)

    assert path.read_text() == "another holder's file\n"


def test_a_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        lock.try_lock(tmp_path / "missing" / "store.json.lock", 0o600)


UNWRITABLE_PID = """
import errno, resource, sys
from pathlib import Path
from cosmoflow_actors.storage import lock

path = Path(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
try:
    lock.try_lock(path, 0o600)
except OSError as exc:
    assert exc.errno == errno.EFBIG, exc
else:
    raise AssertionError("the pid was written past the file size limit")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
held = lock.try_lock(path, 0o600)
assert isinstance(held, lock.Held), held
print("locked after the failure")
"""


def test_a_pid_that_cannot_be_written_leaves_no_lock_behind(tmp_path: Path) -> None:
    """Writing the pid fails as on a full disk (here past a file size limit of 0 bytes,
    in a process of its own): the error is raised and the lock let go, so the next try
    in the same process locks the file instead of finding it busy."""
    path = tmp_path / "store.json.lock"

    done = subprocess.run(
        [sys.executable, "-c", UNWRITABLE_PID, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == "locked after the failure\n"


CHILD_LETS_GO = """
import os, sys
from pathlib import Path
from cosmoflow_actors.storage import lock

path = Path(sys.argv[1])
held = lock.try_lock(path, 0o600)
child = os.fork()
if child == 0:
    lock.release(held)  # as a FileStorage's finalizer does when the child exits
    os._exit(0)
os.waitpid(child, 0)
assert path.read_text() == f"{os.getpid()}\\n", "the child removed the lock file"
assert lock.try_lock(path, 0o600) == lock.Busy(os.getpid()), "the child unlocked it"
print("still held")
"""


def test_a_forked_child_letting_go_leaves_the_parents_lock(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD_LETS_GO, str(tmp_path / "store.json.lock")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == "still held\n"


CHILD_OUTLIVES_PARENT = """
import os, sys
from pathlib import Path
from cosmoflow_actors.storage import lock

lock.try_lock(Path(sys.argv[1]), 0o600)
started, running = os.pipe()
if os.fork() == 0:
    os.write(running, b"x")  # the fork's handlers, which close the lock's copy, have run
    sys.stdin.read()  # lives until the test closes its stdin
    print("child done", flush=True)
    os._exit(0)
os.read(started, 1)
print("forked", flush=True)
sys.stdin.read()
"""


def test_a_lock_ends_with_its_holder_though_a_forked_child_lives_on(tmp_path: Path) -> None:
    """The holder is killed while a child it forked still runs: the lock is free."""
    path = tmp_path / "store.json.lock"
    command = [sys.executable, "-c", CHILD_OUTLIVES_PARENT, str(path)]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "forked\n"
        holder.kill()
        holder.wait()

        held = lock.try_lock(path, 0o600)

        holder.stdin.close()
        assert holder.stdout.read() == "child done\n"
    assert isinstance(held, lock.Held)
    lock.release(held)


def test_the_lock_file_is_beside_the_snapshot() -> None:
    assert lock.lock_path(Path("/data/state.json")) == Path("/data/state.json.lock")
