"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.storage_suite import RedisServer, running_redis


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: a test that takes seconds (deselect with -m 'not slow')"
    )
    config.addinivalue_line(
        "markers", "ray: a test on a local Ray cluster (skipped when ray is not installed)"
    )


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server on a free loopback port per test module; tests keep apart by
    namespace."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server
