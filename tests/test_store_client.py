"""SharedStore: the whole API, as nodes use it, through the store actor."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

import cosmoflow_actors as cf
from tests.support import in_run


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def test_get_set_delete_contains_keys_size_clear() -> None:
    async def body(store: cf.SharedStore) -> list[Any]:
        await store.set("a", 1)
        await store.set("b", [1, 2])
        seen = [
            await store.get("a"),
            await store.contains("b"),
            await store.keys(),
            await store.size(),
        ]
        seen += [await store.delete("a"), await store.delete("a"), await store.get("a", "fallback")]
        await store.clear()
        return [*seen, await store.size()]

    assert await in_run(body) == [1, True, ["a", "b"], 2, True, False, "fallback", 0]


async def test_get_many_omits_missing_keys_and_set_many_writes_all() -> None:
    async def body(store: cf.SharedStore) -> dict[str, Any]:
        await store.set_many({"a": 1, "b": 2})
        return await store.get_many(["a", "b", "missing"])

    assert await in_run(body) == {"a": 1, "b": 2}


async def store_error(body: Any, store: Any = None) -> BaseException:
    """The exception ``body`` raised inside a run (the NodeError's cause)."""
    with pytest.raises(cf.NodeError) as info:
        await in_run(body, store)
    assert info.value.__cause__ is not None
    return info.value.__cause__


async def test_a_missing_key_without_default_is_store_key_error() -> None:
    error = await store_error(lambda store: store.get("nope"))
    assert isinstance(error, cf.StoreKeyError)
    assert isinstance(error, KeyError)
    assert str(error) == "key 'nope' is not in the store"


async def test_a_value_of_the_wrong_type_is_store_type_error() -> None:
    error = await store_error(lambda store: store.get("n", type=int), {"n": "three"})
    assert isinstance(error, cf.StoreTypeError)
    assert isinstance(error, TypeError)
    assert "'n' holds a str, not a int" in str(error)


async def test_a_default_is_returned_without_a_type_check() -> None:
    assert await in_run(lambda store: store.get("missing", None, type=int)) is None


async def test_a_non_str_key_is_refused_before_it_reaches_the_actor() -> None:
    error = await store_error(lambda store: store.set(3, "x"))
    assert isinstance(error, TypeError)
    assert "str" in str(error)


async def test_update_is_a_read_modify_write_returning_the_new_value() -> None:
    async def body(store: cf.SharedStore) -> list[Any]:
        first = await store.update("n", lambda n: n + 1, default=10)
        second = await store.update("n", lambda n: n * 2)
        return [first, second, await store.get("n")]

    assert await in_run(body) == [11, 22, 22]


async def test_update_of_a_missing_key_without_default_is_store_key_error() -> None:
    assert isinstance(await store_error(lambda store: store.update("n", abs)), cf.StoreKeyError)


async def test_update_whose_function_raises_stores_nothing() -> None:
    def explode(value: int) -> int:
        raise ArithmeticError("no")

    store = {"n": 1}
    assert isinstance(await store_error(lambda s: s.update("n", explode), store), ArithmeticError)
    assert store == {"n": 1}


async def test_dataclasses_round_trip_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "points.json"
    await in_run(lambda store: store.set("p", Point(1, 2)), cf.FileStorage(path))
    assert await in_run(lambda store: store.get("p", type=Point), cf.FileStorage(path)) == Point(
        1, 2
    )


async def test_a_value_the_file_cannot_encode_stores_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await in_run(lambda store: store.set("kept", 1), cf.FileStorage(path))
    before = path.read_bytes()
    error = await store_error(lambda store: store.set("bad", object()), cf.FileStorage(path))
    assert isinstance(error, cf.StorageError)
    assert "'bad'" in str(error) and "object" in str(error)
    assert path.read_bytes() == before


async def test_set_many_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = cf.FileStorage(path)
    await in_run(lambda store: store.set("a", "old"), storage)
    error = await store_error(lambda store: store.set_many({"a": "new", "b": object()}), storage)
    assert isinstance(error, cf.StorageError)
    assert await in_run(lambda store: store.get_many(["a", "b"]), storage) == {"a": "old"}


async def test_get_many_refuses_keys_that_are_not_str() -> None:
    error = await store_error(lambda store: store.get_many([["x"]]))
    assert isinstance(error, TypeError)
    assert "str" in str(error)
