"""Fixtures shared by the test modules."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_support import COUNTER
from tests.storage_suite import RedisServer, running_redis


def pytest_configure(config: pytest.Config) -> None:
    _deliver_ctrl_c()
    config.addinivalue_line("markers", "slow: a long trial, left out unless asked for with -m slow")
    config.addinivalue_line(
        "markers", "ray: a test on a local Ray cluster (skipped when ray is not installed)"
    )


def _deliver_ctrl_c() -> None:
    """Let SIGINT reach the tests that send it (to this process, or to a cosmoflow
    process they start) when the suite itself was started with SIGINT ignored, as a
    shell does for a command put in the background: a process started then inherits
    the ignoring, so the Ctrl-C tests would wait for an exit that never comes."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server on a free loopback port per test module; tests keep apart by
    namespace."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def plain_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let rich see what the test sees (a pipe), whatever the environment says (every
    tests/test_cli_*.py module uses it)."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def without_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every import of redis or of one of its modules fails, as when the redis package
    is not installed: those other tests imported are hidden too."""
    for name in ["redis", *(name for name in sys.modules if name.startswith("redis."))]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def counter_file(tmp_path: Path) -> Path:
    """A flow file defining ``counter``, with ``checks`` nested in it (COUNTER)."""
    path = tmp_path / "counter.py"
    path.write_text(COUNTER)
    return path
