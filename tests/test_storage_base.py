"""Tests for :mod:`cosmoflow_actors.storage.base`: the checks the engine shares."""

from __future__ import annotations

import pytest

from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.storage.base import RESERVED_PREFIX, check_user_key


@pytest.mark.parametrize("key", ["__cosmoflow__/runs/r1", "__cosmoflow__/", RESERVED_PREFIX + "x"])
def test_a_key_under_the_reserved_prefix_is_refused_naming_it(key: str) -> None:
    with pytest.raises(StorageError) as info:
        check_user_key(key)

    message = str(info.value)
    assert repr(key) in message
    assert "'__cosmoflow__/' are reserved for the engine's run records" in message


@pytest.mark.parametrize(
    "key", ["", "runs/r1", "__cosmoflow__", "__cosmoflow_/x", "a/__cosmoflow__/"]
)
def test_any_other_key_may_be_written(key: str) -> None:
    check_user_key(key)


def test_a_key_that_is_not_a_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="must be str"):
        check_user_key(1)  # type: ignore[arg-type]
