"""The GIL switch interval: short while someone is inside, put back after the last
unless the program set its own meanwhile."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from cosmoflow_actors.runtime.gil import SWITCH_INTERVAL, ShortSwitchInterval


@pytest.fixture(autouse=True)
def default_interval() -> Iterator[None]:
    saved = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(saved)


def test_the_interval_is_short_inside_and_restored_after() -> None:
    short = ShortSwitchInterval(SWITCH_INTERVAL)
    with short:
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_the_interval_is_restored_only_when_the_last_user_leaves() -> None:
    short = ShortSwitchInterval(SWITCH_INTERVAL)
    with short:
        with short:
            pass
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_an_interval_already_shorter_is_kept() -> None:
    sys.setswitchinterval(SWITCH_INTERVAL / 10)
    with ShortSwitchInterval(SWITCH_INTERVAL):
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL / 10)
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL / 10)


def test_the_interval_is_restored_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError), ShortSwitchInterval(SWITCH_INTERVAL):
        raise RuntimeError("boom")
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_an_interval_the_program_sets_inside_is_kept_after() -> None:
    short = ShortSwitchInterval(SWITCH_INTERVAL)
    with short:
        with short:
            sys.setswitchinterval(0.002)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    assert sys.getswitchinterval() == pytest.approx(0.002)
    with short:
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
    assert sys.getswitchinterval() == pytest.approx(0.002)


FORK_WHILE_A_THREAD_HOLDS_THE_LOCK = """
import os, signal, sys, threading
from cosmoflow_actors.runtime import gil

held, forked = threading.Event(), threading.Event()


def hold() -> None:
    with gil._lock:  # as a thread entering or leaving a ShortSwitchInterval does
        held.set()
        forked.wait()


thread = threading.Thread(target=hold)
thread.start()
held.wait()
child = os.fork()
if child == 0:
    signal.alarm(30)  # kills a child that waits for the lock for good
    with gil.ShortSwitchInterval(gil.SWITCH_INTERVAL):
        short = sys.getswitchinterval() < 0.001
    os._exit(0 if short and sys.getswitchinterval() == 0.005 else 1)
forked.set()
thread.join()
print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
"""


def test_a_child_forked_while_another_thread_holds_the_lock_can_use_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORK_WHILE_A_THREAD_HOLDS_THE_LOCK],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == "0\n"  # not -14: killed by the alarm, deadlocked
