"""Tests for :mod:`cosmoflow_actors.storage.file`."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import resource
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.storage.file import FileStorage

STRAY_SUFFIX = ".0123456789abcdef.tmp"


@dataclasses.dataclass
class Point:
    x: int
    y: float
    label: str = ""


@dataclasses.dataclass
class Track:
    name: str
    points: list[Point]
    started: datetime.datetime


async def stored(path: Path, **values: Any) -> FileStorage:
    """Return a storage at ``path`` holding ``values``, committed."""
    storage = FileStorage(path)
    for key, value in values.items():
        await storage.set(key, value)
    await storage.commit()
    return storage


def cyclic_list() -> list[Any]:
    items: list[Any] = []
    items.append(items)
    return items


async def test_values_survive_a_new_instance(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    values = {"n": 1, "f": 2.5, "s": "text", "b": True, "none": None, "obj": {"l": [1, "a"]}}
    await stored(path, **values)

    reopened = FileStorage(path)

    assert {key: await reopened.get(key) for key in await reopened.keys()} == values


async def test_file_is_pretty_json(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await stored(path, a={"b": [1, 2]}, c="d")

    text = path.read_text()

    assert json.loads(text) == {"a": {"b": [1, 2]}, "c": "d"}
    assert text == '{\n  "a": {\n    "b": [\n      1,\n      2\n    ]\n  },\n  "c": "d"\n}\n'


async def test_dataclass_round_trips_through_msgspec_convert(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    point = Point(1, 2.5, "p")
    started = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.UTC)
    track = Track("t", [point, Point(3, 4.0)], started)
    await stored(path, p=point, track=track)

    reopened = FileStorage(path)

    assert await reopened.get("p") == {"x": 1, "y": 2.5, "label": "p"}
    assert msgspec.convert(await reopened.get("p"), Point) == point
    assert msgspec.convert(await reopened.get("track"), Track) == track


async def test_tuples_and_structs_are_stored_as_json(tmp_path: Path) -> None:
    class Pair(msgspec.Struct):
        left: int
        right: int

    storage = FileStorage(tmp_path / "store.json")
    await storage.set("tuple", (1, 2))
    await storage.set("struct", Pair(1, 2))

    assert await storage.get("tuple") == [1, 2]
    assert await storage.get("struct") == {"left": 1, "right": 2}


async def test_get_returns_a_fresh_copy(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store.json")
    await storage.set("d", {"l": [1]})

    (await storage.get("d"))["l"].append(2)

    assert await storage.get("d") == {"l": [1]}


async def test_set_without_commit_is_not_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = FileStorage(path)

    await storage.set("a", 1)
    assert not path.exists()

    await storage.commit()
    await storage.set("b", 2)
    assert json.loads(path.read_bytes()) == {"a": 1}
    assert await FileStorage(path).keys() == ["a"]


async def test_commit_without_changes_does_not_write(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    inode = path.stat().st_ino

    await storage.commit()
    await storage.delete("absent")
    await storage.commit()

    assert path.stat().st_ino == inode


async def test_missing_file_is_an_empty_store_until_a_commit_writes(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = FileStorage(path)

    await storage.open()
    await storage.commit()
    assert await storage.keys() == []
    assert not path.exists()

    await storage.clear()
    await storage.commit()
    assert not path.exists()


async def test_constructor_does_no_io(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "store.json"

    storage = FileStorage(path)

    assert storage.path == path
    assert not path.parent.exists()


async def test_relative_path_is_made_absolute() -> None:
    assert FileStorage("store.json").path == Path.cwd() / "store.json"


async def test_open_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await stored(path, a=1)
    storage = FileStorage(path)

    await storage.open()
    path.write_bytes(b'{"a": 2}')
    await storage.open()

    assert await storage.get("a") == 1


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "object"),
        ({object()}, "set"),
        ({"a": [object()]}, "dict"),
        ({(1, 2): 3}, "dict"),
        (cyclic_list(), "list"),
        ("\ud800", "str"),
    ],
)
async def test_unencodable_value_raises_and_stores_nothing(
    tmp_path: Path, value: Any, type_name: str
) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, kept=1)
    before = path.read_bytes()

    with pytest.raises(StorageError) as info:
        await storage.set("bad key", value)
    with pytest.raises(StorageError):
        await storage.set("kept", value)
    await storage.commit()

    assert "'bad key'" in str(info.value)
    assert f"type {type_name}" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError | ValueError | RecursionError)
    assert await storage.contains("bad key") is False
    assert await storage.get("kept") == 1
    assert path.read_bytes() == before


async def test_non_str_key_raises_type_error(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store.json")

    with pytest.raises(TypeError, match="int"):
        await storage.set(1, "one")  # type: ignore[arg-type]

    assert await storage.size() == 0


async def test_key_that_is_not_valid_unicode_raises(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store.json")

    with pytest.raises(StorageError, match="key"):
        await storage.set("\ud800", 1)

    assert await storage.size() == 0


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'"text"', b"", b'{"a": 1} trailing', bytes(range(256))],
)
async def test_unreadable_file_raises_at_open_and_is_left_as_is(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "store.json"
    path.write_bytes(content)
    storage = FileStorage(path)

    with pytest.raises(StorageError, match=re.escape(str(path))) as info:
        await storage.open()
    with pytest.raises(StorageError):
        await storage.get("a")

    assert isinstance(info.value.__cause__, msgspec.DecodeError)
    assert path.read_bytes() == content


async def test_path_that_is_a_directory_raises_at_open(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=re.escape(str(tmp_path))) as info:
        await FileStorage(tmp_path).open()

    assert isinstance(info.value.__cause__, OSError)


@contextmanager
def read_only_directory(directory: Path) -> Iterator[None]:
    """Make ``directory`` unwritable for a non-root user."""
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    directory.chmod(0o500)
    try:
        yield
    finally:
        directory.chmod(0o700)


@contextmanager
def file_size_limit(directory: Path) -> Iterator[None]:
    """Make writing more than 64 KiB to any file fail with EFBIG, even for root."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("failure", [read_only_directory, file_size_limit])
async def test_failed_commit_keeps_the_file_and_rolls_back(tmp_path: Path, failure: Any) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1, b=2)
    before = path.read_bytes()
    await storage.set("a", "x" * 100_000)
    await storage.set("new", "y" * 100_000)
    await storage.delete("b")

    with failure(tmp_path), pytest.raises(StorageError, match=re.escape(str(path))) as info:
        await storage.commit()

    assert isinstance(info.value.__cause__, OSError)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["store.json"]
    assert await storage.keys() == ["a", "b"]
    assert await storage.get("a") == 1
    with pytest.raises(KeyError):
        await storage.get("new")


async def test_failed_commit_onto_a_directory_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = FileStorage(path)
    await storage.set("a", 1)
    path.mkdir()

    with pytest.raises(StorageError, match=re.escape(str(path))):
        await storage.commit()

    assert await storage.keys() == []
    assert os.listdir(tmp_path) == ["store.json"]
    assert path.is_dir()


async def test_storage_works_again_after_a_failed_commit(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    await storage.set("a", "x" * 100_000)
    with file_size_limit(tmp_path), pytest.raises(StorageError):
        await storage.commit()

    await storage.set("b", 2)
    await storage.commit()

    assert json.loads(path.read_bytes()) == {"a": 1, "b": 2}


async def test_stray_temporary_files_are_removed_at_open(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await stored(path, a=1)
    (tmp_path / f".store.json{STRAY_SUFFIX}").write_bytes(b'{"a": ')
    others = [f".other.json{STRAY_SUFFIX}", ".store.json.notes.tmp", "store.json.tmp"]
    for name in others:
        (tmp_path / name).write_bytes(b"keep")

    await FileStorage(path).open()

    assert sorted(os.listdir(tmp_path)) == sorted(["store.json", *others])


async def test_commit_leaves_no_temporary_file(tmp_path: Path) -> None:
    storage = await stored(tmp_path / "store.json", a=1)
    await storage.set("b", 2)
    await storage.commit()

    assert os.listdir(tmp_path) == ["store.json"]


async def test_new_file_has_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await stored(path, a=1)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    path.chmod(0o640)

    await storage.set("a", 2)
    await storage.commit()

    assert stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_keys_are_never_paths(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    keys = ["", "ünïcødé ключ 🔑", "a/b", "..", "../../etc/passwd", "/abs", "\\", "."]
    await stored(path, **{key: index for index, key in enumerate(keys)})

    reopened = FileStorage(path)

    assert os.listdir(tmp_path) == ["store.json"]
    assert await reopened.keys() == keys
    assert [await reopened.get(key) for key in keys] == list(range(len(keys)))


async def test_delete_keys_contains_size_and_clear(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, z=1, a=2, m=3)

    assert await storage.keys() == ["z", "a", "m"]
    assert await storage.delete("a") is True
    assert await storage.delete("a") is False
    assert await storage.contains("z") is True
    assert await storage.contains("a") is False
    assert await storage.size() == 2
    with pytest.raises(KeyError):
        await storage.get("a")

    await storage.commit()
    assert await FileStorage(path).keys() == ["z", "m"]

    await storage.clear()
    await storage.commit()
    assert json.loads(path.read_bytes()) == {}


async def test_repr_names_the_path(tmp_path: Path) -> None:
    assert repr(FileStorage(tmp_path / "s.json")) == f"FileStorage({str(tmp_path / 's.json')!r})"
