"""Tests for :mod:`cosmoflow_actors.storage.file` and its on-disk format."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import enum
import fcntl
import gc
import json
import os
import pickle
import re
import shutil
import signal
import stat
import sys
import textwrap
import threading
import types
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors import cli
from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.runtime.run_record import PATH_CHUNK, record_key
from cosmoflow_actors.storage import file as file_backend
from cosmoflow_actors.storage import journal as journal_format
from cosmoflow_actors.storage.base import (
    RECORD_PREFIX,
    RESERVED_PREFIX,
    forgotten_prefixes,
    path_chunk_key,
)
from cosmoflow_actors.storage.codec import get_codec
from cosmoflow_actors.storage.file import COMPACT_MIN_BYTES, FileStorage
from tests.storage_suite import (
    file_size_limit,
    holder,
    read_only,
    skip_unless_read_only_works,
)
from tests.support import (
    CHILDREN_ON_THE_BRANCHES,
    Recorder,
    batch_flow_twice_in_a_loop,
    batch_flows_on_two_branches,
    ki_protection_seen,
    received_until,
    single,
    ticking,
)

STRAY_SUFFIX = ".0123456789abcdef.tmp"
SNAPSHOT = (
    b'{"format": "cosmoflow-store", "version": 1, "codec": "json", "generation": 1, "data": {}}'
)
HEADER = '{"format":"cosmoflow-journal","version":1,"codec":"json","generation":%d}\n'


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
    """Return a storage at ``path`` holding ``values``, committed; it stays open."""
    storage = FileStorage(path)
    for key, value in values.items():
        await storage.set(key, value)
    await storage.commit()
    return storage


async def saved(path: Path, **values: Any) -> None:
    """Leave a closed store at ``path`` holding ``values``: the files are as
    :func:`stored` leaves them (its one commit compacts, so closing writes nothing)."""
    await (await stored(path, **values)).aclose()


def on_disk(path: Path, codec: str = "json") -> dict[str, Any]:
    """What the files hold, in key order: the committed state, loaded as an instance
    loads it, but without the lock, so beside an instance that holds it."""
    loaded = journal_format.load(path, get_codec(codec))
    return {key: get_codec(codec).decode_json(raw) for key, raw in loaded.entries.items()}


def snapshot(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_bytes())
    return document


def journal_of(path: Path) -> Path:
    return path.with_name(f"{path.name}.journal")


def journal(path: Path) -> str:
    return journal_of(path).read_text()


def append(path: Path, text: str) -> None:
    with open(path, "a") as file:
        file.write(text)


def listing(directory: Path) -> list[str]:
    """The names in ``directory``, but for the lock files of open stores."""
    return sorted(name for name in os.listdir(directory) if not name.endswith(".lock"))


def files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in listing(directory)}


@pytest.fixture
def read_only_works(tmp_path: Path) -> None:
    skip_unless_read_only_works(tmp_path)


def cyclic_list() -> list[Any]:
    items: list[Any] = []
    items.append(items)
    return items


# --- the format --------------------------------------------------------------------------


async def test_the_snapshot_is_pretty_json_with_a_header(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await stored(path, a={"b": [1, 2]}, c="d")

    assert path.read_text() == (
        "{\n"
        '  "format": "cosmoflow-store",\n'
        '  "version": 1,\n'
        '  "codec": "json",\n'
        '  "generation": 1,\n'
        '  "data": {\n'
        '    "a": {\n      "b": [\n        1,\n        2\n      ]\n    },\n'
        '    "c": "d"\n'
        "  }\n"
        "}\n"
    )
    assert journal(path) == HEADER % 1


async def test_a_commit_appends_one_line_and_leaves_the_snapshot_alone(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1, b=2)
    before = path.read_bytes(), path.stat().st_ino

    await storage.set("c", {"d": [3]})
    await storage.delete("a")
    await storage.commit()
    await storage.clear()
    await storage.set("e", None)
    await storage.commit()

    assert (path.read_bytes(), path.stat().st_ino) == before
    assert journal(path) == (
        HEADER % 1 + '[["set","c",{"d":[3]}],["delete","a"]]\n[["clear"],["set","e",null]]\n'
    )
    assert on_disk(path) == {"e": None}


async def test_the_journal_is_replayed_in_order_at_open(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, z=1, a=2)
    for key, value in [("m", 3), ("z", 4)]:
        await storage.set(key, value)
        await storage.commit()
    await storage.delete("a")
    await storage.set("a", 5)
    await storage.commit()

    assert list(on_disk(path).items()) == [("z", 4), ("m", 3), ("a", 5)]


async def test_a_commit_syncs_its_line_in_a_worker_thread_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    trio_thread = threading.get_ident()
    real_fdatasync = os.fdatasync
    synced: list[tuple[bool, str]] = []

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        synced.append((threading.get_ident() != trio_thread, journal(path)))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    await storage.set("b", 2)
    await storage.commit()

    assert synced == [(True, HEADER % 1 + '[["set","b",2]]\n')]


async def test_a_commit_cancelled_while_it_writes_still_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    token = trio.lowlevel.current_trio_token()
    real_append = journal_format.append
    returned = False

    with trio.CancelScope() as scope:

        def append(*args: Any) -> None:
            trio.from_thread.run_sync(scope.cancel, trio_token=token)
            real_append(*args)

        monkeypatch.setattr(journal_format, "append", append)
        await storage.set("b", 2)
        await storage.commit()
        returned = True
        await trio.lowlevel.checkpoint()

    assert returned
    assert scope.cancelled_caught
    assert await storage.keys() == ["a", "b"]
    assert on_disk(path) == {"a": 1, "b": 2}


async def test_set_without_commit_is_not_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = FileStorage(path)

    await storage.set("a", 1)
    assert listing(tmp_path) == []

    await storage.commit()
    await storage.set("b", 2)
    assert on_disk(path) == {"a": 1}


async def test_commit_without_changes_does_not_write(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    before = files(tmp_path)

    await storage.commit()
    await storage.delete("absent")
    await storage.commit()

    assert files(tmp_path) == before


async def test_missing_file_is_an_empty_store_until_a_commit_writes(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store.json")

    await storage.open()
    await storage.clear()
    await storage.commit()
    await storage.aclose()

    assert os.listdir(tmp_path) == []
    assert await storage.keys() == []


async def test_constructor_does_no_io(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "store.json"

    storage = FileStorage(path)

    assert (storage.path, storage.journal_path) == (
        path,
        tmp_path / "missing" / "store.json.journal",
    )
    assert storage.codec == "json"
    assert not path.parent.exists()


async def test_a_missing_directory_is_a_storage_error_at_open(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "missing" / "store.json")

    with pytest.raises(StorageError) as info:
        await storage.open()

    assert str(info.value) == (
        f"cannot open {storage.path}: the folder {tmp_path / 'missing'} does not exist"
    )
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert os.listdir(tmp_path) == []


async def test_relative_path_is_made_absolute() -> None:
    assert FileStorage("store.json").path == Path.cwd() / "store.json"


async def test_open_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await saved(path, a=1)
    storage = FileStorage(path)

    await storage.open()
    (tmp_path / "store.json.journal").write_text(HEADER % 1 + '[["set","a",2]]\n')
    await storage.open()

    assert await storage.get("a") == 1


async def test_repr_names_the_path(tmp_path: Path) -> None:
    assert repr(FileStorage(tmp_path / "s.json")) == f"FileStorage({str(tmp_path / 's.json')!r})"


# --- values ------------------------------------------------------------------------------


async def test_dataclasses_round_trip_through_msgspec_convert(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    started = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.UTC)
    track = Track("t", [Point(1, 2.5, "p"), Point(3, 4.0)], started)
    await saved(path, p=Point(1, 2.5, "p"), track=track)

    reopened = FileStorage(path)

    assert await reopened.get("p") == {"x": 1, "y": 2.5, "label": "p"}
    assert msgspec.convert(await reopened.get("track"), Track) == track


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "object"),
        ({"a": [object()]}, "dict"),
        ({(1, 2): 3}, "dict"),
        (cyclic_list(), "list"),
        ("\ud800", "str"),
        ({"d": {1: "one", "1": "uno"}}, "dict"),
    ],
)
async def test_unencodable_value_raises_and_stores_nothing(
    tmp_path: Path, value: Any, type_name: str
) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, kept=1)
    before = files(tmp_path)

    with pytest.raises(StorageError) as info:
        await storage.set("bad key", value)
    await storage.commit()

    assert "'bad key'" in str(info.value)
    assert f"type {type_name}" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError | ValueError | RecursionError)
    assert files(tmp_path) == before


async def test_pickled_values_are_base64_strings_in_both_files(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = FileStorage(path, codec="pickle")
    await storage.set("a", {1, 2})
    await storage.commit()
    await storage.set("b", Point(1, 2.0))
    await storage.commit()

    data = snapshot(path)["data"]
    line = json.loads(journal(path).splitlines()[1])

    assert snapshot(path)["codec"] == "pickle"
    assert pickle.loads(base64.b64decode(data["a"])) == {1, 2}
    assert pickle.loads(base64.b64decode(line[0][2])) == Point(1, 2.0)
    assert on_disk(path, codec="pickle") == {"a": {1, 2}, "b": Point(1, 2.0)}


async def test_a_local_class_read_with_a_typed_get_is_pickled_again(tmp_path: Path) -> None:
    """A typed get leaves msgspec's cache on the class, which cloudpickle writes (the
    class is pickled by value): the pickle codec leaves it out."""

    @dataclasses.dataclass
    class Local:
        x: int

    class Shade(enum.Enum):
        DARK = "dark"

    storage = FileStorage(tmp_path / "store.json", codec="pickle")
    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        for key, value in (("point", Local(1)), ("shade", Shade.DARK)):
            await store.set(key, value)
            assert await store.get(key, type=type(value)) == value
            await store.set(key, value)
            assert await store.get(key) == value
    reopened = FileStorage(tmp_path / "store.json", codec="pickle")
    await reopened.open()
    assert await reopened.get("point") == Local(1)
    await reopened.aclose()


# --- files written by someone else, or cut short by a crash -------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[1, 2]",
        b'"text"',
        b"",
        bytes(range(256)),
        b'{"a": 1}',
        SNAPSHOT.replace(b"cosmoflow-store", b"other"),
        SNAPSHOT.replace(b'"version": 1', b'"version": 2'),
        SNAPSHOT.replace(b'"data": {}', b'"data": []'),
        SNAPSHOT.replace(b'"data": {}', b'"data": {}, "extra": 1'),
        SNAPSHOT.replace(b'"generation": 1', b'"generation": "1"'),
    ],
)
async def test_a_snapshot_written_by_someone_else_is_refused_and_untouched(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "store.json"
    path.write_bytes(content)
    storage = FileStorage(path)

    with pytest.raises(StorageError, match=re.escape(str(path))):
        await storage.open()
    with pytest.raises(StorageError):
        await storage.get("a")

    assert files(tmp_path) == {"store.json": content}


async def test_a_pickle_value_that_is_not_base64_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await saved(path, a="not base64!")
    journal_of(path).unlink()
    path.write_text(path.read_text().replace('"json"', '"pickle"'))

    with pytest.raises(StorageError, match="'a' was not written by codec 'pickle'"):
        await FileStorage(path, codec="pickle").open()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not a header\n", "does not start with a journal header"),
        (HEADER.replace("cosmoflow-journal", "other") % 1, "is not a 'cosmoflow-journal'"),
        (HEADER.replace("json", "pickle") % 1, "codec 'pickle'"),
        (HEADER % 7, "do not belong together"),
        (HEADER % 1 + '[["set","a",1]]\nnot json\n[["set","b",2]]\n', "line 3"),
        (HEADER % 1 + '[["set","a",1]]\n[["rename","a"]]\n[["set","b",2]]\n', "line 3"),
        (HEADER % 1 + '[["set","a",1]]\n[[\n', "line 3"),
        (HEADER % 1 + '[["set","a",1]]\n[["rename","a"]]\n', "line 3"),
    ],
)
async def test_a_bad_journal_is_refused_and_untouched(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "store.json"
    await saved(path, a=0)
    journal_of(path).write_text(content)
    before = files(tmp_path)

    with pytest.raises(StorageError, match=message):
        await FileStorage(path).open()

    assert files(tmp_path) == before


async def test_a_journal_without_its_snapshot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await saved(path, a=1)
    path.unlink()

    with pytest.raises(StorageError, match="do not belong together"):
        await FileStorage(path).open()


@pytest.mark.parametrize(
    "torn", ['[["set","x",', '[["set","x",1]]', "\x00\x00\x00\n", '\x00\x00"x",1]]\n']
)
async def test_a_torn_last_line_is_ignored_and_the_next_commit_compacts(
    tmp_path: Path, torn: str
) -> None:
    path = tmp_path / "store.json"
    await saved(path, a=1)
    append(journal_of(path), '[["set","b",2]]\n' + torn)
    before = files(tmp_path)

    reopened = FileStorage(path)
    assert await reopened.keys() == ["a", "b"]
    assert files(tmp_path) == before

    await reopened.set("c", 3)
    await reopened.commit()
    assert journal(path) == HEADER % 2
    assert snapshot(path)["data"] == {"a": 1, "b": 2, "c": 3}


async def test_a_journal_header_without_its_newline_is_compacted_not_appended_to(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.json"
    await saved(path, a=1)
    journal_of(path).write_text(journal(path).rstrip("\n"))

    reopened = await stored(path, b=2)

    assert on_disk(path) == {"a": 1, "b": 2}
    assert journal(path) == HEADER % 2
    await reopened.aclose()


async def test_a_journal_one_generation_behind_was_already_compacted(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    await storage.set("x", 1)
    await storage.commit()
    stale = journal(path)
    await storage.delete("x")
    await storage.commit()
    await storage.aclose()  # compacts: generation 2, without "x"

    journal_of(path).write_text(stale)  # as if a crash hit before its replacement

    assert on_disk(path) == {"a": 1}


async def test_two_compactions_stopped_before_the_journal_leave_a_store_that_opens(
    tmp_path: Path,
) -> None:
    """The first compaction left the journal behind, so the next commit compacted, and
    stopped at the same point: the journal is two generations behind."""
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    await storage.set("x", 1)
    await storage.commit()
    stale = journal(path)
    await storage.aclose()  # compacts: generation 2
    journal_of(path).write_text(stale)  # as if a crash hit before its replacement
    storage = await stored(path, b=2)  # the journal is behind: this commit compacts
    await storage.aclose()
    journal_of(path).write_text(stale)  # the same crash again

    assert on_disk(path) == {"a": 1, "x": 1, "b": 2}
    reopened = await stored(path, c=3)
    await reopened.aclose()
    assert on_disk(path) == {"a": 1, "x": 1, "b": 2, "c": 3}


async def test_stray_temporary_files_are_removed_at_open(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await saved(path, a=1)
    (tmp_path / f".store.json{STRAY_SUFFIX}").write_bytes(b'{"a": ')
    (tmp_path / f".store.json.journal{STRAY_SUFFIX}").write_bytes(b"{")
    others = [f".other.json{STRAY_SUFFIX}", ".store.json.notes.tmp", "store.json.tmp"]
    for name in others:
        (tmp_path / name).write_bytes(b"keep")

    await FileStorage(path).open()

    assert listing(tmp_path) == sorted(["store.json", "store.json.journal", *others])


# --- compaction --------------------------------------------------------------------------


async def test_the_journal_is_compacted_once_it_outgrows_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=0)
    value = "v" * 65536
    commits = COMPACT_MIN_BYTES // len(value) + 2
    for index in range(commits):
        await storage.set(f"k{index % 10}", value)
        await storage.commit()

    assert snapshot(path)["generation"] == 2
    assert len(journal(path)) < COMPACT_MIN_BYTES
    assert on_disk(path) == {"a": 0} | {f"k{index}": value for index in range(10)}


async def test_a_growing_store_compacts_only_when_the_journal_outgrows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each compaction rewrites the whole store, so the journal must grow as large as the
    snapshot before the next one: with a 256 KiB minimum, 256 commits of new 8 KiB values
    compact 4 times."""
    monkeypatch.setattr(file_backend, "COMPACT_MIN_BYTES", 256 * 1024)
    path = tmp_path / "store.json"
    storage = FileStorage(path)
    value = "v" * 8192
    for index in range(256):
        await storage.set(f"k{index}", value)
        await storage.commit()

    assert snapshot(path)["generation"] == 4
    assert len(on_disk(path)) == 256


async def test_aclose_compacts_into_one_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    await storage.set("b", 2)
    await storage.commit()
    await storage.set("uncommitted", 3)

    await storage.aclose()

    assert snapshot(path)["data"] == {"a": 1, "b": 2}
    assert journal(path) == HEADER % 2
    assert sorted(os.listdir(tmp_path)) == ["store.json", "store.json.journal"]
    assert await storage.keys() == ["a", "b"]
    await storage.aclose()
    assert snapshot(path)["generation"] == 2


async def test_two_closes_at_once_compact_once_and_raise_nothing(tmp_path: Path) -> None:
    """A second close while the first compacts does nothing (it used to compact too,
    and fail on the lock the first had released)."""
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    await storage.set("b", 2)
    await storage.commit()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(storage.aclose)
        nursery.start_soon(storage.aclose)
    assert snapshot(path)["data"] == {"a": 1, "b": 2}
    assert snapshot(path)["generation"] == 2
    assert journal(path) == HEADER % 2
    assert await storage.keys() == ["a", "b"]
    await storage.aclose()


# --- one open instance at a time: the lock ---------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, trio
    from cosmoflow_actors.storage.file import FileStorage

    async def main(path):
        storage = FileStorage(path)
        await storage.set("first", 1)
        await storage.commit()
        print("open", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes stdin
        await storage.set("last", 2)
        await storage.commit()
        await storage.aclose()

    trio.run(main, sys.argv[1])
    """
)
"""A process that holds a FileStorage open until its stdin is closed, then writes once
more and closes it."""


def holding(path: Path) -> AbstractAsyncContextManager[trio.Process]:
    """A real second process holding the store at ``path`` open (see :data:`HOLDER`);
    at exit it is told to close it, and waited for."""
    return holder([sys.executable, "-c", HOLDER, str(path)], b"open")


async def test_a_store_another_process_holds_open_is_refused_naming_its_pid(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.json"

    async with holding(path) as process:
        with pytest.raises(StorageError) as info:
            await FileStorage(path).open()
        message = str(info.value)
        assert str(path) in message
        assert f"process {process.pid} holds its lock file {path}.lock" in message
        assert "wait=" in message

    assert process.returncode == 0
    assert on_disk(path) == {"first": 1, "last": 2}


async def test_an_opener_that_waits_opens_once_the_other_process_closes(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = FileStorage(path, wait=60)
    opened = trio.Event()

    async def open_it() -> None:
        await storage.open()
        opened.set()

    async with holding(path) as process, trio.open_nursery() as nursery:
        nursery.start_soon(open_it)
        await trio.testing.wait_all_tasks_blocked()
        assert not opened.is_set()
        assert process.stdin is not None
        await process.stdin.aclose()  # the holder closes the store and exits
        await opened.wait()

    assert await storage.get("last") == 2
    await storage.aclose()


async def test_a_holder_that_dies_leaves_no_lock(tmp_path: Path) -> None:
    path = tmp_path / "store.json"

    async with holding(path) as process:
        process.send_signal(signal.SIGKILL)
        await process.wait()
        storage = FileStorage(path)
        assert await storage.get("first") == 1

    assert (tmp_path / "store.json.lock").read_text() == f"{os.getpid()}\n"
    await storage.aclose()


async def test_a_second_instance_in_this_process_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.json"
    first = await stored(path, a=1)
    second = FileStorage(path)

    with pytest.raises(StorageError, match=rf"process {os.getpid()} \(this process"):
        await second.set("b", 2)
    await first.set("c", 3)
    await first.commit()
    await first.aclose()

    await second.set("b", 2)
    await second.commit()
    assert on_disk(path) == {"a": 1, "c": 3, "b": 2}
    with pytest.raises(StorageError, match="in use"):
        await first.open()
    await second.aclose()


async def test_an_opener_that_waits_opens_once_the_holder_closes(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    first = await stored(path, a=1)
    second = FileStorage(path, wait=60)
    opened = trio.Event()

    async def open_second() -> None:
        await second.open()
        opened.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_second)
        await trio.testing.wait_all_tasks_blocked()
        assert not opened.is_set()
        await first.aclose()
        await opened.wait()

    assert await second.get("a") == 1
    await second.aclose()


async def test_an_opener_waits_no_longer_than_asked(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "store.json"
    first = await stored(path, a=1)
    start = trio.current_time()

    with pytest.raises(StorageError, match=r"in use after waiting 2\.5 s"):
        await FileStorage(path, wait=2.5).open()

    assert trio.current_time() - start == pytest.approx(2.5)
    await first.aclose()


@pytest.mark.parametrize("wait", [-1, float("nan"), "1", None])
async def test_wait_must_be_seconds(tmp_path: Path, wait: Any) -> None:
    with pytest.raises(ValueError, match="wait must be >= 0 seconds"):
        FileStorage(tmp_path / "store.json", wait=wait)


async def test_a_holder_that_has_not_written_its_pid_yet_is_not_said_to_be_another_process(
    tmp_path: Path,
) -> None:
    """Between taking the lock and writing its pid, the holder may be another
    FileStorage of this process (another thread's ``flow.run_sync``, say): the refusal
    does not call it another process."""
    path = tmp_path / "store.json"
    holder = os.open(tmp_path / "store.json.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # and no pid written

        with pytest.raises(StorageError, match=r"in use: another FileStorage \(of this") as info:
            await FileStorage(path).open()
    finally:
        os.close(holder)

    assert "another process" not in str(info.value)


async def test_the_lock_file_names_the_holder_while_open_and_goes_at_close(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path / "store.json")

    await storage.open()
    assert storage.lock_path == tmp_path / "store.json.lock"
    assert storage.lock_path.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(storage.lock_path.stat().st_mode) == 0o600

    await storage.aclose()
    assert os.listdir(tmp_path) == []


async def test_a_second_opener_through_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    await saved(path, a=1)
    (tmp_path / "link.json").symlink_to("a.json")
    first = FileStorage(path)
    await first.open()

    with pytest.raises(StorageError, match=rf"in use: process {os.getpid()}") as info:
        await FileStorage(tmp_path / "link.json").open()

    assert str(info.value).startswith(f"{path} is in use")
    assert f"holds its lock file {path}.lock" in str(info.value)
    await first.aclose()


async def test_a_store_opened_through_a_link_writes_the_real_file_and_keeps_the_link(
    tmp_path: Path,
) -> None:
    real = tmp_path / "data" / "a.json"
    real.parent.mkdir()
    await saved(real, a=1)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    storage = FileStorage(link)
    assert (storage.path, repr(storage)) == (real, f"FileStorage({str(real)!r})")

    await storage.set("b", 2)
    await storage.commit()  # appends to the real file's journal
    assert journal(real) == HEADER % 1 + '[["set","b",2]]\n'
    await storage.aclose()  # compacts: replaces the snapshot

    assert link.is_symlink() and link.resolve() == real
    assert snapshot(real)["data"] == {"a": 1, "b": 2}
    assert sorted(os.listdir(tmp_path)) == ["data", "link.json"]


async def test_a_link_to_a_missing_file_creates_that_file(tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to("new.json")

    await saved(link, a=1)

    assert link.is_symlink()
    assert snapshot(tmp_path / "new.json")["data"] == {"a": 1}


async def test_open_after_aclose_locks_and_loads_afresh(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    await storage.aclose()
    other = FileStorage(path)
    await other.set("b", 2)
    await other.commit()
    await other.aclose()

    await storage.open()

    assert await storage.keys() == ["a", "b"]
    with pytest.raises(StorageError, match="in use"):
        await other.open()
    await storage.aclose()
    await storage.aclose()


def values_held(storage: FileStorage) -> list[msgspec.Raw]:
    """The encoded values ``storage`` refers to, directly or through the objects it
    holds (classes, modules and functions are not followed)."""
    seen = {id(storage)}
    pending: list[object] = [storage]
    found: list[msgspec.Raw] = []
    while pending:
        for referent in gc.get_referents(pending.pop()):
            if id(referent) in seen or isinstance(referent, type | types.ModuleType):
                continue
            if isinstance(referent, types.FunctionType | types.BuiltinFunctionType):
                continue
            seen.add(id(referent))
            if isinstance(referent, msgspec.Raw):
                found.append(referent)
            pending.append(referent)
    return found


async def test_a_closed_instance_holds_no_value_and_opens_again(tmp_path: Path) -> None:
    """The engine closes a storage when its last run ends: one a program keeps (a
    global) must not keep the store in memory while closed."""
    path = tmp_path / "store.json"
    storage = await stored(path, doc="x" * 100_000, n=1)
    await storage.set("staged", 2)
    assert len(values_held(storage)) == 3

    await storage.aclose()

    assert values_held(storage) == []
    assert await storage.get("doc") == "x" * 100_000
    assert await storage.keys() == ["doc", "n"]
    await storage.aclose()


async def test_aclose_of_an_instance_never_opened_does_nothing(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store.json")

    await storage.aclose()
    await storage.aclose()

    assert os.listdir(tmp_path) == []


async def test_an_empty_file_is_refused_saying_so_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    path.write_bytes(b"")

    with pytest.raises(StorageError, match=r"store.json is empty, which no store leaves"):
        await FileStorage(path).open()

    assert (os.listdir(tmp_path), path.read_bytes()) == (["store.json"], b"")


async def test_a_failed_open_keeps_no_lock(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    path.write_text("{not json")
    storage = FileStorage(path)

    with pytest.raises(StorageError, match="does not hold a cosmoflow store"):
        await storage.open()

    assert os.listdir(tmp_path) == ["store.json"]
    path.unlink()
    await storage.open()
    await storage.aclose()


async def test_an_instance_collected_while_open_unlocks(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await stored(path, a=1)  # dropped at once, still open
    gc.collect()

    storage = FileStorage(path)
    assert await storage.get("a") == 1
    await storage.aclose()


async def test_aclose_unlocks_even_when_its_compaction_fails(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    await storage.set("b", 2)
    await storage.commit()
    append(journal_of(path), '[["set","c",3]]\n')  # a writer that ignored the lock

    with pytest.raises(StorageError, match="another process"):
        await storage.aclose()

    assert values_held(storage) == []
    other = FileStorage(path)
    assert {key: await other.get(key) for key in await other.keys()} == {"a": 1, "b": 2, "c": 3}
    await other.aclose()


# --- failures ----------------------------------------------------------------------------


async def test_a_full_disk_fails_an_append_and_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1, b=2)
    before = files(tmp_path)
    await storage.set("a", "x" * 100_000)
    await storage.delete("b")

    with file_size_limit(), pytest.raises(StorageError, match="journal") as info:
        await storage.commit()  # the append fails; so does the compaction it falls back to

    assert f"cannot append to {journal_of(path)}" in str(info.value)
    assert f"nor compact instead: cannot write {path}" in str(info.value)

    assert isinstance(info.value.__cause__, OSError)
    assert files(tmp_path) == before
    assert await storage.keys() == ["a", "b"]
    await storage.set("c", 3)
    await storage.commit()
    assert on_disk(path) == {"a": 1, "b": 2, "c": 3}


async def test_a_full_disk_fails_a_compaction_and_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = FileStorage(path)
    await storage.set("a", "x" * 100_000)

    with file_size_limit(), pytest.raises(StorageError, match=re.escape(str(path))):
        await storage.commit()

    assert listing(tmp_path) == []
    assert await storage.keys() == []


async def test_a_commit_the_journal_has_no_room_for_compacts_instead(tmp_path: Path) -> None:
    """The journal holds the store's history, the snapshot the store once: under a file
    size limit the journal reaches, the commit that cannot append still fits."""
    path = tmp_path / "store.json"
    storage = await stored(path, big="a" * 30_000)
    for letter in "bc":
        await storage.set("big", letter * 30_000)
        await storage.commit()  # appends: the journal holds two 30 kB values
    await storage.set("big", "d" * 30_000)
    await storage.set("small", 1)

    with file_size_limit(64 * 1024):
        await storage.commit()

    assert journal(path) == HEADER % 2
    assert snapshot(path)["data"] == {"big": "d" * 30_000, "small": 1}
    await storage.aclose()
    assert listing(tmp_path) == ["store.json", "store.json.journal"]


def cut_short(journal: Path) -> None:
    os.truncate(journal, 10)


@pytest.mark.parametrize("damage", [os.unlink, cut_short], ids=["removed", "cut short"])
async def test_a_journal_damaged_while_open_gets_its_commits_back_at_the_next_commit(
    tmp_path: Path, damage: Any
) -> None:
    """A journal removed or cut short under an open store lost commits that the store
    still holds: the next commit, which cannot append, compacts them back into the
    files. No writer removes the journal or cuts it short, so no other writer's commit
    is dropped."""
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    await storage.set("b", 2)
    await storage.commit()
    damage(journal_of(path))
    await storage.set("c", 3)

    await storage.commit()

    assert on_disk(path) == {"a": 1, "b": 2, "c": 3}
    assert journal(path) == HEADER % 2
    await storage.aclose()
    assert file_backend.peek(path).keys() == {"a", "b", "c"}


@pytest.mark.parametrize("damage", [os.unlink, cut_short], ids=["removed", "cut short"])
async def test_a_snapshot_damaged_while_open_is_written_back_at_close(
    tmp_path: Path, damage: Any
) -> None:
    """Even with no commit since it opened (so no compaction was due), a store whose
    snapshot was removed or cut short writes back what it holds when it closes."""
    path = tmp_path / "store.json"
    await saved(path, a=1)
    storage = FileStorage(path)
    await storage.open()
    damage(path)

    await storage.aclose()

    assert on_disk(path) == {"a": 1}
    assert journal(path) == HEADER % 2


async def test_a_journal_replaced_by_a_directory_fails_the_commit_naming_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    await storage.set("b", 2)
    await storage.commit()
    journal_of(path).unlink()
    journal_of(path).mkdir()
    await storage.set("c", 3)

    with pytest.raises(StorageError, match=re.escape(f"{journal_of(path)}: [Errno 21]")):
        await storage.commit()

    assert await storage.keys() == ["a", "b"]
    journal_of(path).rmdir()
    await storage.aclose()  # compacts: the commits the journal held are back
    assert on_disk(path) == {"a": 1, "b": 2}


@pytest.mark.usefixtures("read_only_works")
async def test_a_read_only_directory_fails_the_first_commit(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    storage = FileStorage(directory / "store.json")
    await storage.set("a", 1)

    with read_only(directory), pytest.raises(StorageError) as info:
        await storage.commit()

    assert isinstance(info.value.__cause__, OSError)
    assert listing(directory) == []
    assert await storage.keys() == []


@pytest.mark.usefixtures("read_only_works")
async def test_read_only_files_fail_a_commit_and_keep_the_last_one(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    path = directory / "store.json"
    storage = await stored(path, a=1)
    before = files(directory)
    await storage.set("a", 2)

    with read_only(directory, path, journal_of(path)), pytest.raises(StorageError):
        await storage.commit()

    assert files(directory) == before
    assert await storage.get("a") == 1
    await storage.set("b", 2)
    await storage.commit()
    assert on_disk(path) == {"a": 1, "b": 2}


async def test_a_directory_that_moved_away_fails_the_commit(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    storage = await stored(directory / "store.json", a=1)
    await storage.set("a", 2)
    directory.rename(tmp_path / "moved")

    with pytest.raises(StorageError, match="journal"):
        await storage.commit()

    (tmp_path / "moved").rename(directory)
    assert on_disk(directory / "store.json") == {"a": 1}


async def test_a_commit_onto_a_directory_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = FileStorage(path)
    await storage.set("a", 1)
    path.mkdir()

    with pytest.raises(StorageError, match=re.escape(str(path))):
        await storage.commit()

    assert await storage.keys() == []
    assert listing(tmp_path) == ["store.json"]


async def test_a_path_that_is_a_directory_raises_at_open(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=re.escape(str(tmp_path))) as info:
        await FileStorage(tmp_path).open()

    assert isinstance(info.value.__cause__, OSError)


async def test_a_journal_another_writer_appended_to_fails_the_commit(tmp_path: Path) -> None:
    """A writer that ignores the lock (or a file system where flock locks nothing) is
    still caught at the next commit."""
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    append(journal_of(path), '[["set","b",2]]\n')
    await storage.set("c", 3)

    with pytest.raises(StorageError, match="another process") as info:
        await storage.commit()

    assert "compact" not in str(info.value)  # nor would a compaction keep "b"
    assert on_disk(path) == {"a": 1, "b": 2}


async def test_a_compaction_over_another_writers_commit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction writes the snapshot from this instance's state: had another writer
    (one that ignores the lock) appended since this one looked, its commit would be
    lost. The compaction is refused and no file changes."""
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    await storage.set("big", "x" * 1024)
    await storage.commit()  # appends: the journal is now larger than the snapshot
    append(journal_of(path), '[["set","b",2]]\n')
    before = files(tmp_path)
    monkeypatch.setattr(file_backend, "COMPACT_MIN_BYTES", 0)
    await storage.set("c", 3)

    with pytest.raises(StorageError, match="another process"):
        await storage.commit()  # compacts, from a state without "b"

    assert files(tmp_path) == before
    assert on_disk(path) == {"a": 1, "big": "x" * 1024, "b": 2}


# --- permissions -------------------------------------------------------------------------


async def test_new_files_have_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await saved(path, a=1)

    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in os.listdir(tmp_path)}

    assert modes == {"store.json": 0o600, "store.json.journal": 0o600}


async def test_an_existing_snapshot_keeps_its_mode_and_the_journal_follows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    path.chmod(0o640)

    await storage.set("a", 2)
    await storage.commit()
    await storage.aclose()

    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(journal_of(path).stat().st_mode) == 0o640


async def test_a_commit_leaves_no_temporary_file(tmp_path: Path) -> None:
    storage = await stored(tmp_path / "store.json", a=1)
    await storage.set("b", 2)
    await storage.commit()
    await storage.aclose()

    assert sorted(os.listdir(tmp_path)) == ["store.json", "store.json.journal"]


async def test_a_copied_store_opens_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = await stored(path, a=1)
    (tmp_path / "copy").mkdir()
    for name in ("store.json", "store.json.journal"):
        shutil.copy(tmp_path / name, tmp_path / "copy" / name)

    copy = FileStorage(tmp_path / "copy" / "store.json")
    assert await copy.get("a") == 1
    await storage.aclose()
    await copy.aclose()


@pytest.mark.usefixtures("read_only_works")
async def test_a_read_only_store_fails_the_writing_run_only(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    path = directory / "store.json"
    storage = await stored(path, kept=1)

    @cf.node
    async def write(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set("new", ctx.params["value"])

    flow = cf.Flow.builder("write").add_node("write", write).build()
    async with cf.open_engine() as engine:
        with (
            read_only(directory, path, journal_of(path)),
            pytest.raises(cf.NodeError) as info,
            # Retired after the run, its store actor cannot compact the read-only file:
            # a warning, nothing lost.
            pytest.warns(RuntimeWarning, match="closing failed"),
        ):
            await engine.run(flow, storage, params={"value": 1})
        assert isinstance(info.value.__cause__, StorageError)
        assert (await engine.run(flow, {}, params={"value": 2})).success
        assert (await engine.run(flow, storage, params={"value": 3})).success

    assert on_disk(path) == {"kept": 1, "new": 3}


COMPACTOR = textwrap.dedent(
    """
    import sys, trio
    from cosmoflow_actors.storage.file import FileStorage

    async def main(path):
        storage = FileStorage(path)
        i = 0
        while True:
            i += 1
            await storage.set("i", i)
            await storage.set("copy", i)
            await storage.commit()
            await storage.aclose()  # compacts: a new snapshot, then a new journal
            print(f"compacted {i}", flush=True)
            if not await trio.to_thread.run_sync(sys.stdin.readline):
                return  # the test closed stdin

    trio.run(main, sys.argv[1])
    """
)
"""A process that commits ``i`` and ``copy`` together and closes the store (compacting
it) once, then again for each line the test sends."""


async def test_peek_reads_again_when_another_process_compacts_between_its_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cosmoflow inspect`` reads without the lock while an engine in another process
    works: a compaction there can replace the snapshot it read and then the journal
    before it reads that. The reads are made to meet that compaction every time."""
    path = tmp_path / "store.json"
    read_journal = journal_format._read_journal
    async with holder([sys.executable, "-c", COMPACTOR, str(path)], b"compacted 1") as writer:
        assert writer.stdin is not None and writer.stdout is not None
        compacted = 1

        async def compact() -> None:
            nonlocal compacted
            compacted += 1
            await writer.stdin.send_all(b"next\n")
            done = await received_until(writer.stdout, b"\n", "the compactor")
            assert done == f"compacted {compacted}\n".encode()

        def read_after_a_compaction(name: Path) -> Any:
            """The journal's read, once a compaction replaced both files after the
            snapshot's read: the first read of each peek."""
            if not reread.is_set():
                reread.set()
                trio.from_thread.run(compact)
            return read_journal(name)

        monkeypatch.setattr(journal_format, "_read_journal", read_after_a_compaction)
        reread = threading.Event()
        entries = await trio.to_thread.run_sync(file_backend.peek, path)
        assert {key: entry.unwrap() for key, entry in entries.items()} == {"i": 2, "copy": 2}

        reread.clear()
        status = await trio.to_thread.run_sync(cli.main, ["inspect", "--json", f"file:{path}"])
        assert (status, json.loads(capsys.readouterr().out)["keys"]) == (0, {"i": 3, "copy": 3})


def files_of(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``directory`` with its content and mtime."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in directory.iterdir()}


async def test_peek_reads_the_journal_without_changing_a_file(tmp_path: Path) -> None:
    path = tmp_path / "peeked.json"
    storage = FileStorage(path)
    await storage.set("a", 1)
    await storage.commit()
    await storage.set("b", [1, 2])
    await storage.commit()
    del storage  # not closed, so not compacted: as if its process died
    gc.collect()
    with journal_format.journal_path(path).open("ab") as journal:
        journal.write(b'[["set","c",')
    stray = journal_format.temp_path(path)
    stray.write_bytes(b"left by a crash")
    before = files_of(tmp_path)
    entries = file_backend.peek(path)
    assert {key: entry.unwrap() for key, entry in entries.items()} == {"a": 1, "b": [1, 2]}
    assert files_of(tmp_path) == before


async def test_peek_through_a_symbolic_link_reads_the_real_files_journal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.json"
    storage = await stored(path, a=1)
    await storage.set("b", 2)
    await storage.commit()  # in the journal only
    (tmp_path / "link.json").symlink_to("a.json")

    entries = file_backend.peek(tmp_path / "link.json")

    assert {key: entry.unwrap() for key, entry in entries.items()} == {"a": 1, "b": 2}
    await storage.aclose()


async def test_a_refused_durable_step_leaves_the_keys_in_their_order(tmp_path: Path) -> None:
    """A durable step that deletes a key and then sets it to a value that cannot be
    encoded stores nothing: the key stays where it was, not at the end."""
    path = tmp_path / "store.json"
    storage = FileStorage(path)
    await storage.set("a", 1)
    await storage.set("b", 2)
    await storage.commit()
    await storage.aclose()

    @cf.node
    async def refused(ctx: cf.ExecutionContext) -> None:
        await ctx.store.delete("a")
        await ctx.store.set("a", object())

    with pytest.raises(cf.NodeError) as info:
        await cf.Flow.builder("r").add_node("r", refused).build().run(storage, run_id="r")
    assert isinstance(info.value.__cause__, cf.StoreValueError)
    reopened = FileStorage(path)
    user_keys = [key for key in await reopened.keys() if not key.startswith("__cosmoflow__/")]
    assert user_keys == ["a", "b"]
    assert await reopened.get("a") == 1
    await reopened.aclose()


async def test_a_call_in_a_worker_thread_is_started_and_waited_for_protected_from_ki(
    tmp_path: Path,
) -> None:
    """A Ctrl-C landing between starting the thread and parking would let the thread's
    answer wake the task wherever it waits next (trio then fails with an internal
    error): those lines run protected."""
    with ki_protection_seen(file_backend._in_thread) as seen:
        await single(Recorder()).run(cf.FileStorage(tmp_path / "store.json"), run_id="r")
    assert seen == {"_in_thread": {True}}


# --- the index of the engine's keys ----------------------------------------------------


async def assert_reserved_keys_indexed(storage: FileStorage) -> list[str]:
    """Check that the engine's keys listed by prefix (from the index) are those that
    :meth:`FileStorage.keys` holds, under the reserved prefix and under the prefixes a
    forget of each run lists; return the reserved keys."""
    reserved = sorted(key for key in await storage.keys() if key.startswith(RESERVED_PREFIX))
    assert sorted(await storage.keys_with_prefix(RESERVED_PREFIX)) == reserved
    for record in [key for key in reserved if key.startswith(RECORD_PREFIX)]:
        for prefix in (record, *forgotten_prefixes(record)):
            under = [key for key in reserved if key.startswith(prefix)]
            assert sorted(await storage.keys_with_prefix(prefix)) == under
    return reserved


@cf.node
async def clears(ctx: cf.ExecutionContext) -> None:
    await ctx.store.clear()


async def test_the_index_of_reserved_keys_follows_runs_forgets_clears_and_reopens(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.json"
    storage = FileStorage(path)
    await storage.set("steps", PATH_CHUNK + 2)  # the ticking run seals a path chunk
    await storage.commit()
    async with cf.open_engine() as engine, engine.open_store(storage):
        await engine.run(ticking(), storage, run_id="long")
        await engine.run(batch_flows_on_two_branches(), storage, run_id="job")  # fan-out
        await engine.run(batch_flow_twice_in_a_loop(), storage, run_id="loop")
        await engine.run(single(clears), storage, run_id="clearing")
        reserved = await assert_reserved_keys_indexed(storage)
        assert path_chunk_key("long", 0) in reserved
        assert {f"{RECORD_PREFIX}{child}" for child in CHILDREN_ON_THE_BRANCHES} <= {*reserved}
        assert await engine.forget_run(storage, "job")
        after_forget = await assert_reserved_keys_indexed(storage)
        assert not [key for key in after_forget if "job" in key]
    assert await assert_reserved_keys_indexed(storage) == after_forget  # reopened
    await storage.delete(record_key("long"))
    await storage.set(record_key("extra"), {"steps": 0})
    await storage.commit()
    del storage  # not closed, so not compacted: the next open replays the journal
    gc.collect()
    reopened = FileStorage(path)
    replayed = await assert_reserved_keys_indexed(reopened)
    await reopened.aclose()
    assert record_key("long") not in replayed
    assert record_key("extra") in replayed
