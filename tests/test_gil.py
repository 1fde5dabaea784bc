"""The GIL switch interval: short while someone is inside, put back after the last
unless the program set its own meanwhile."""

from __future__ import annotations

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
