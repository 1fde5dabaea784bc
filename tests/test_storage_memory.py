"""Tests for :mod:`cosmoflow_actors.storage.memory`."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

from cosmoflow_actors.storage.memory import MemoryStorage


async def test_set_writes_into_the_callers_dict() -> None:
    shared: dict[str, Any] = {"seed": 1}
    storage = MemoryStorage(shared)
    value = {"nested": [1, 2]}

    await storage.set("result", value)

    assert storage.data is shared
    assert shared == {"seed": 1, "result": value}
    assert shared["result"] is value


async def test_get_returns_the_stored_object_itself() -> None:
    value = [object()]
    storage = MemoryStorage({"given": value})

    assert await storage.get("given") is value
    await storage.set("again", value)
    assert await storage.get("again") is value


async def test_without_data_each_storage_gets_a_new_dict() -> None:
    first, second = MemoryStorage(), MemoryStorage()
    await first.set("a", 1)

    assert first.data == {"a": 1}
    assert second.data == {}


def test_data_that_is_not_a_dict_is_refused() -> None:
    with pytest.raises(TypeError, match="data must be a dict or None, got list"):
        MemoryStorage([("k", 1)])  # type: ignore[arg-type]


async def test_snapshot_is_a_shallow_copy_taken_now() -> None:
    value = {"x": 1}
    storage = MemoryStorage({"a": value})

    snapshot = storage.snapshot()
    await storage.set("b", 2)
    await storage.delete("a")

    assert snapshot == {"a": value}
    assert snapshot is not storage.data
    assert snapshot["a"] is value


async def test_missing_key_raises_key_error() -> None:
    storage = MemoryStorage()

    with pytest.raises(KeyError) as info:
        await storage.get("absent")

    assert info.value.args == ("absent",)


async def test_get_does_not_create_keys_in_a_defaultdict() -> None:
    shared: defaultdict[str, list[int]] = defaultdict(list)
    storage = MemoryStorage(shared)

    with pytest.raises(KeyError):
        await storage.get("absent")

    assert shared == {}


async def test_delete_reports_whether_the_key_was_there() -> None:
    shared: dict[str, Any] = {"a": None}
    storage = MemoryStorage(shared)

    assert await storage.delete("a") is True
    assert await storage.delete("a") is False
    assert shared == {}


async def test_keys_contains_and_size() -> None:
    storage = MemoryStorage()
    for key in ("z", "a", "m"):
        await storage.set(key, None)

    assert await storage.keys() == ["z", "a", "m"]
    assert await storage.contains("a") is True
    assert await storage.contains("b") is False
    assert await storage.size() == 3


async def test_clear_empties_the_same_dict() -> None:
    shared: dict[str, Any] = {"a": 1, "b": 2}
    storage = MemoryStorage(shared)

    await storage.clear()

    assert storage.data is shared
    assert shared == {}
    assert await storage.size() == 0


async def test_non_str_key_raises_type_error_and_stores_nothing() -> None:
    storage = MemoryStorage()

    with pytest.raises(TypeError, match="int"):
        await storage.set(1, "one")  # type: ignore[arg-type]

    assert storage.data == {}


async def test_commit_changes_nothing() -> None:
    shared: dict[str, Any] = {"a": 1}
    storage = MemoryStorage(shared)

    await storage.open()
    await storage.commit()
    await storage.aclose()

    assert shared == {"a": 1}
