"""Tests for :mod:`cosmoflow_actors.storage.staged`.

:class:`DatabaseStorage` is tested through :class:`SQLiteStorage` on a real file: a
second instance over the same file shows what reached the database.
"""

from __future__ import annotations

import re
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.storage.sqlite import SQLiteStorage
from cosmoflow_actors.storage.staged import UNKNOWN, ClearOp, DeleteOp, SetOp, StagedWrites
from tests.storage_suite import thread_calls


async def commit(path: Path, **values: Any) -> None:
    """Commit ``values`` to the database at ``path`` from an instance of its own."""
    async with aclosing(SQLiteStorage(path)) as other:
        for key, value in values.items():
            await other.set(key, value)
        await other.commit()


async def committed(path: Path) -> dict[str, Any]:
    """What the database at ``path`` holds, read by a fresh instance."""
    async with aclosing(SQLiteStorage(path)) as other:
        return {key: await other.get(key) for key in await other.keys()}


# --- StagedWrites ------------------------------------------------------------------------


def test_nothing_staged_is_false_and_knows_no_key() -> None:
    staged: StagedWrites[bytes] = StagedWrites()

    assert not staged
    assert staged.lookup("a") is UNKNOWN
    assert repr(UNKNOWN) == "UNKNOWN"
    assert staged.merge_keys(["b", "a"]) == ["b", "a"]
    assert (staged.ops, staged.cleared) == ([], False)

    staged.delete("a")
    assert staged


def test_roll_back_forgets_what_was_staged_since_the_mark() -> None:
    staged: StagedWrites[bytes] = StagedWrites()
    staged.set("a", b"1")
    mark = staged.mark()
    staged.delete("a")
    staged.clear()
    staged.set("b", b"2")

    staged.roll_back(mark)

    assert [type(op) for op in staged.ops] == [SetOp]
    assert (staged.lookup("a"), staged.lookup("b"), staged.cleared) == (b"1", UNKNOWN, False)
    assert staged.merge_keys(["c", "a"]) == ["c", "a"]


def test_ops_are_recorded_in_order_with_their_types() -> None:
    staged: StagedWrites[bytes] = StagedWrites()

    staged.set("a", b"1")
    staged.delete("b")
    staged.clear()
    staged.set("a", b"2")

    first, second, third, fourth = staged.ops
    assert isinstance(first, SetOp) and (first.key, first.value) == ("a", b"1")
    assert isinstance(second, DeleteOp) and second.key == "b"
    assert isinstance(third, ClearOp)
    assert isinstance(fourth, SetOp) and (fourth.key, fourth.value) == ("a", b"2")
    assert staged.cleared


def test_staged_writes_overlay_and_merge_in_dict_order() -> None:
    staged: StagedWrites[int] = StagedWrites()
    staged.set("b", 1)
    staged.delete("a")
    staged.set("a", 2)
    staged.delete("c")

    assert staged.merge_keys(["a", "c", "d"]) == ["d", "b", "a"]
    assert (staged.lookup("a"), staged.lookup("c"), staged.lookup("d")) == (2, None, UNKNOWN)

    staged.clear()
    staged.set("e", 3)
    assert staged.merge_keys(["d"]) == ["e"]
    assert (staged.lookup("d"), staged.lookup("e")) == (None, 3)
    assert len(staged.ops) == 6

    staged.reset()
    assert not staged
    assert staged.lookup("d") is UNKNOWN


def test_merge_keys_keeps_an_overwritten_key_in_place() -> None:
    staged: StagedWrites[bytes] = StagedWrites()
    staged.set("b", b"new")
    staged.set("x", b"1")
    staged.set("x", b"2")
    staged.delete("missing")

    assert staged.merge_keys(["a", "b", "c"]) == ["a", "b", "c", "x"]
    assert staged.lookup("x") == b"2"


def test_reset_forgets_everything_but_leaves_the_ops_taken_before_it() -> None:
    """A commit takes :attr:`StagedWrites.ops`, resets, then writes what it took."""
    staged: StagedWrites[bytes] = StagedWrites()
    staged.set("a", b"1")
    staged.clear()
    taken = staged.ops

    staged.reset()

    assert [type(op) for op in taken] == [SetOp, ClearOp]
    assert (staged.ops, staged.cleared) == ([], False)
    assert staged.lookup("a") is UNKNOWN
    assert staged.merge_keys(["z"]) == ["z"]


# --- DatabaseStorage ---------------------------------------------------------------------


async def test_set_encodes_the_value_at_once(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    value: dict[str, list[int]] = {"a": [1]}

    async with aclosing(SQLiteStorage(path)) as storage:
        await storage.set("k", value)
        value["a"].append(2)
        assert await storage.get("k") == {"a": [1]}
        await storage.commit()

    assert await committed(path) == {"k": {"a": [1]}}


async def test_an_unencodable_value_stages_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.db"

    async with aclosing(SQLiteStorage(path)) as storage:
        await storage.set("k", 1)
        with pytest.raises(StorageError, match="'k'"):
            await storage.set("k", object())
        with pytest.raises(StorageError, match="'new'"):
            await storage.set("new", object())
        await commit(path, new=2)

        assert await storage.get("k") == 1
        assert await storage.get("new") == 2  # no staged write hides the database's
        await storage.commit()

    assert await committed(path) == {"new": 2, "k": 1}


async def test_deleting_a_missing_key_returns_false_and_stages_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.db"

    async with aclosing(SQLiteStorage(path)) as storage:
        assert await storage.delete("k") is False
        await commit(path, k=1)

        assert await storage.get("k") == 1
        await storage.commit()

    assert await committed(path) == {"k": 1}


async def test_deleting_a_key_stages_it_until_commit(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await commit(path, k=1, j=2)

    async with aclosing(SQLiteStorage(path)) as storage:
        assert await storage.delete("k") is True
        assert not await storage.contains("k")
        assert await committed(path) == {"k": 1, "j": 2}
        await storage.commit()

    assert await committed(path) == {"j": 2}


async def test_delete_many_stages_deletes_without_asking_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker-thread call until the commit, which leaves a key that is not stored
    alone; a key that is not valid Unicode (never stored) stages nothing."""
    path = tmp_path / "store.db"
    await commit(path, a=1, b=2, c=3)

    async with aclosing(SQLiteStorage(path)) as storage:
        await storage.open()
        calls = thread_calls(storage, monkeypatch)
        await storage.delete_many(["a", "missing", "c", "lone \udcff"])
        assert calls == []
        assert not await storage.contains("a")
        assert await committed(path) == {"a": 1, "b": 2, "c": 3}
        await storage.commit()

    assert await committed(path) == {"b": 2}


async def test_size_with_staged_writes_counts_the_merged_keys(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await commit(path, a=1, b=2)

    async with aclosing(SQLiteStorage(path)) as storage:
        for key in ["a", "c", "d", "c"]:
            await storage.set(key, 0)
        await storage.delete("b")
        assert await storage.size() == 3

        await commit(path, e=5)  # the database's keys count, staged writes laid over
        assert await storage.size() == 4
        assert await storage.keys() == ["a", "e", "c", "d"]

        await storage.commit()
        assert await storage.size() == 4
        await commit(path, f=6)
        assert await storage.size() == 5


async def test_clear_stages_removing_every_key(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await commit(path, a=1, b=2)

    async with aclosing(SQLiteStorage(path)) as storage:
        await storage.clear()
        assert (await storage.keys(), await storage.size()) == ([], 0)
        assert await committed(path) == {"a": 1, "b": 2}

        await commit(path, c=3)
        assert not await storage.contains("c")  # the staged clear hides it too
        await storage.set("d", 4)
        assert await storage.keys() == ["d"]
        await storage.commit()

    assert await committed(path) == {"d": 4}


async def test_set_clear_and_delete_many_open_the_database_first(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"not a database" * 100)
    storage = SQLiteStorage(path)

    with pytest.raises(StorageError, match=re.escape(str(path))):
        await storage.set("a", 1)
    with pytest.raises(StorageError, match=re.escape(str(path))):
        await storage.clear()
    with pytest.raises(StorageError, match=re.escape(str(path))):
        await storage.delete_many(["a"])

    assert path.read_bytes() == b"not a database" * 100
    await storage.aclose()
