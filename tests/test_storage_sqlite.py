"""Tests for :mod:`cosmoflow_actors.storage.sqlite`, on real database files."""

from __future__ import annotations

import os
import re
import resource
import shutil
import sqlite3
import stat
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.run_record import record_key
from cosmoflow_actors.storage import sqlite as sqlite_backend
from cosmoflow_actors.storage.sqlite import READ_BATCH, UPSERT_ROWS, SQLiteStorage, peek
from tests.storage_suite import (
    file_size_limit,
    foreign_key_fails_only_what_meets_it,
    holder,
    read_only,
    skip_unless_read_only_works,
    thread_calls,
)
from tests.support import FailsOnce, single


async def stored(path: Path, **values: Any) -> SQLiteStorage:
    storage = SQLiteStorage(path)
    for key, value in values.items():
        await storage.set(key, value)
    await storage.commit()
    return storage


async def read_back(path: Path) -> dict[str, Any]:
    """What a new instance over ``path`` holds, in its key order; the instance is closed."""
    storage = SQLiteStorage(path)
    try:
        return {key: await storage.get(key) for key in await storage.keys()}
    finally:
        await storage.aclose()


@contextmanager
def database(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection of another writer, closed at exit."""
    with closing(sqlite3.connect(path, isolation_level=None)) as connection:
        yield connection


async def test_the_database_is_in_wal_mode_with_its_schema_and_codec(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    storage = await stored(path, a={"b": 1})

    with database(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = other.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        assert sorted(tables) == [("cosmoflow_meta",), ("cosmoflow_store",)]
        assert dict(other.execute("SELECT name, value FROM cosmoflow_meta")) == {
            "format": "cosmoflow-store",
            "version": "1",
            "codec": "json",
        }
        assert other.execute("SELECT key, value FROM cosmoflow_store").fetchall() == [
            ("a", b'{"b":1}')
        ]
    await storage.aclose()


async def test_files_are_created_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    storage = await stored(path, a=1)

    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in os.listdir(tmp_path)}

    assert modes == {"store.db": 0o600, "store.db-wal": 0o600, "store.db-shm": 0o600}
    await storage.aclose()


async def test_staged_writes_are_invisible_to_other_connections_until_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    storage = await stored(path, a=1)
    await storage.set("b", 2)
    await storage.delete("a")

    with database(path) as other:
        assert other.execute("SELECT key FROM cosmoflow_store").fetchall() == [("a",)]
        assert await storage.keys() == ["b"]
        await storage.commit()
        assert other.execute("SELECT key FROM cosmoflow_store").fetchall() == [("b",)]
    await storage.aclose()


async def test_reads_see_what_other_instances_commit(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    reader = await stored(path, a=1)
    assert await reader.get("a") == 1

    await (await stored(path, a=2, b=3)).aclose()

    assert await reader.get("a") == 2
    assert await reader.keys() == ["a", "b"]
    assert await reader.size() == 2
    await reader.aclose()


async def test_get_many_is_one_worker_thread_call_of_one_query_per_read_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many keys it reads (here two batches and a bit), over staged writes."""
    path = tmp_path / "store.db"
    stored_keys = [f"k{i}" for i in range(READ_BATCH * 2 + 100)]
    storage = await stored(path, **dict.fromkeys(stored_keys, 1))
    await storage.set("k5", "staged")
    await storage.delete("k7")
    wanted = ["missing", *reversed(stored_keys), "k3"]
    calls = thread_calls(storage, monkeypatch)
    statements: list[str] = []
    assert storage._connection is not None
    storage._connection.set_trace_callback(statements.append)

    found = await storage.get_many(wanted)

    assert calls == ["_read"]
    assert len([sql for sql in statements if sql.startswith("SELECT")]) == 3
    assert list(found) == [key for key in reversed(stored_keys) if key != "k7"]
    assert found["k5"] == "staged"
    assert found["k3"] == found["k0"] == 1
    await storage.aclose()


async def test_get_many_of_several_queries_sees_the_store_at_one_moment(tmp_path: Path) -> None:
    """Another writer commits between get_many's first and second query: the second
    still sees the store as the first did."""
    path = tmp_path / "store.db"
    stored_keys = [f"k{i}" for i in range(READ_BATCH + 1)]
    storage = await stored(path, **dict.fromkeys(stored_keys, "before"))
    queries = 0

    def write_after_the_first_query(sql: str) -> None:
        nonlocal queries
        if sql.startswith("SELECT"):
            queries += 1
            if queries == 2:
                with database(path) as other:
                    other.execute(
                        "UPDATE cosmoflow_store SET value = ? WHERE key = ?",
                        (b'"after"', stored_keys[-1]),
                    )

    assert storage._connection is not None
    storage._connection.set_trace_callback(write_after_the_first_query)
    found = await storage.get_many(stored_keys)
    storage._connection.set_trace_callback(None)

    assert queries == 2
    assert set(found.values()) == {"before"}
    assert await storage.get(stored_keys[-1]) == "after"
    await storage.aclose()


async def test_insertion_order_survives_overwrites_and_moves_on_re_insert(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    storage = await stored(path, a=1, b=2, c=3)

    await storage.set("a", 10)
    await storage.commit()
    assert await storage.keys() == ["a", "b", "c"]

    await storage.delete("a")
    await storage.set("a", 11)
    assert await storage.keys() == ["b", "c", "a"]
    await storage.commit()
    await storage.aclose()
    assert list(await read_back(path)) == ["b", "c", "a"]


async def test_one_commit_applies_many_sets_deletes_and_a_clear_in_order(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    storage = await stored(path, old=0)
    expected: dict[str, int] = {"old": 0}
    writes = [("set", f"k{i % 300}", i) for i in range(UPSERT_ROWS * 2 + 50)]
    writes[100:100] = [("delete", "k5", 0), ("clear", "", 0), ("set", "old", 1)]
    writes.append(("delete", "k7", 0))
    for op, key, value in writes:
        if op == "set":
            await storage.set(key, value)
            expected[key] = value
        elif op == "delete":
            await storage.delete(key)
            expected.pop(key, None)
        else:
            await storage.clear()
            expected.clear()
    await storage.commit()
    await storage.aclose()

    assert list((await read_back(path)).items()) == list(expected.items())


@pytest.mark.parametrize(
    "schema",
    [
        ["CREATE TABLE users (name TEXT)", "INSERT INTO users VALUES ('ada')"],
        [
            "CREATE TABLE cosmoflow_store (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL)",
            "CREATE TABLE cosmoflow_meta (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
            "CREATE TABLE extra (x)",
        ],
        ["CREATE TABLE cosmoflow_store (key TEXT, value TEXT)"],
        [
            "CREATE TABLE cosmoflow_store (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL)",
            "CREATE TABLE cosmoflow_meta (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
            "INSERT INTO cosmoflow_meta VALUES ('format', 'something-else')",
        ],
    ],
)
async def test_a_database_written_by_someone_else_is_refused_and_untouched(
    tmp_path: Path, schema: list[str]
) -> None:
    path = tmp_path / "store.db"
    with database(path) as other:
        for sql in schema:
            other.execute(sql)
    before = path.read_bytes()

    with pytest.raises(cf.StorageError, match=re.escape(str(path))):
        await SQLiteStorage(path).open()

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["store.db"]


@pytest.mark.parametrize("content", [b"not a database at all, just text" * 10, b"{}"])
async def test_a_file_that_is_not_a_database_is_refused_and_untouched(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(content)

    with pytest.raises(cf.StorageError, match="not a database") as info:
        await SQLiteStorage(path).open()

    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert path.read_bytes() == content


async def test_two_instances_creating_one_database_at_once_both_open(tmp_path: Path) -> None:
    """Switching a new database to WAL mode fails at once with SQLITE_BUSY for the
    second of two connections doing it together (about one try in thirty here): the
    switch is tried again. Both open, every round."""
    for index in range(100):
        path = tmp_path / f"store-{index}.db"
        pair = [SQLiteStorage(path), SQLiteStorage(path)]
        async with trio.open_nursery() as nursery:
            for storage in pair:
                nursery.start_soon(storage.open)
        for storage in pair:
            await storage.aclose()


async def test_a_durable_step_after_an_update_commits_in_a_savepoint(tmp_path: Path) -> None:
    """An update opens the batch's transaction; a durable step of the same batch goes in
    a savepoint of it: a conflicting one is rolled back alone, the others land with the
    update at the commit."""
    path = tmp_path / "store.db"
    key = record_key("r")
    storage = await stored(path, **{key: {"steps": 0, "path": []}})
    assert await storage.update("n", lambda n: n + 1, 0) == 1
    with pytest.raises(cf.RunConflictError):
        await storage.commit_step([("set", "lost", 1)], key, {"steps": 1, "path": ["x"]}, 5)
    assert await storage.commit_step([("set", "kept", 2)], key, {"steps": 1, "path": ["a"]}, 0)
    await storage.commit()
    await storage.aclose()

    assert await read_back(path) == {key: {"steps": 1, "path": ["a"]}, "n": 1, "kept": 2}


async def test_an_update_that_raises_leaves_no_lock_held(tmp_path: Path) -> None:
    """The update opened the transaction before its function raised: the store actor
    commits the batch anyway, so another process can write at once."""
    path = tmp_path / "store.db"

    @cf.node
    async def refused(ctx: cf.ExecutionContext) -> None:
        await ctx.store.update("n", lambda n: 1 / 0, default=0)

    first = SQLiteStorage(path)
    with pytest.raises(cf.NodeError):
        await single(refused).run(first)
    other = SQLiteStorage(path, timeout=0.5)
    await other.set("after", 1)
    await other.commit()
    await first.aclose()
    await other.aclose()
    assert await read_back(path) == {"after": 1}


class Waits(cf.Node):
    """Sets ``arrived`` in exec, then waits there until ``go_on`` is set."""

    def __init__(self) -> None:
        self.arrived = trio.Event()
        self.go_on = trio.Event()

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.arrived.set()
        await self.go_on.wait()


async def test_a_forget_never_deletes_the_record_of_a_run_another_process_goes_on_with(
    tmp_path: Path,
) -> None:
    """Engine a forgets the failed run "r" while engine b resumes it (another process
    would do the same, over an SQLiteStorage of its own): b commits the run's first
    step just before the forget takes the write lock. The forget reads the record once
    it holds the lock: the run is running, and the forget is refused. b's run goes on
    and succeeds. (Read before the lock, the record said "failed": the forget deleted
    the record of the running run, whose next commit then failed with
    RunConflictError.)"""
    path = tmp_path / "store.db"
    first, second = FailsOnce(), Waits()
    flow = cf.Flow.builder("two").add_node("first", first).add_node("second", second)
    flow = flow.add_route("first", "second").build()
    forgetting = SQLiteStorage(path)
    resumed: list[cf.FlowResult] = []

    async with cf.open_engine() as engine_a, cf.open_engine() as engine_b:
        with pytest.raises(cf.NodeError):
            await engine_a.run(flow, SQLiteStorage(path), run_id="r")

        async def resume_in_b() -> None:
            resumed.append(await engine_b.resume(flow, SQLiteStorage(path), run_id="r"))

        async def b_commits_the_first_step() -> None:
            nursery.start_soon(resume_in_b)
            await second.arrived.wait()

        def before_the_write_lock(sql: str) -> None:
            """In the forget's worker thread, before each statement it runs."""
            if sql == "BEGIN IMMEDIATE" and not second.arrived.is_set():
                trio.from_thread.run(b_commits_the_first_step)

        await forgetting.open()
        assert forgetting._connection is not None
        forgetting._connection.set_trace_callback(before_the_write_lock)
        async with trio.open_nursery() as nursery:
            with pytest.raises(cf.RunRecordedError, match="'r' is recorded as running"):
                await engine_a.forget_run(forgetting, "r")
            second.go_on.set()
        runs = await engine_a.list_runs(SQLiteStorage(path))

    assert [result.execution_path for result in resumed] == [("first", "second")]
    assert runs == [cf.RunRecord("r", "two", "succeeded", "second", 2)]
    assert (await read_back(path))["n"] == 1  # the first step, committed once


async def test_a_missing_directory_is_a_storage_error_at_open(tmp_path: Path) -> None:
    with pytest.raises(cf.StorageError, match="missing"):
        await SQLiteStorage(tmp_path / "missing" / "store.db").open()


@pytest.mark.parametrize("kind", ["directory", "link loop"])
async def test_a_path_that_cannot_be_a_database_file_is_a_storage_error_saying_why(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "store.db"
    if kind == "directory":
        path.mkdir()
        said = f"{path}: [Errno 21] Is a directory: '{path}'"
    else:
        path.symlink_to(tmp_path / "other.db")
        (tmp_path / "other.db").symlink_to(path)
        said = f"{path}: [Errno 40] Too many levels of symbolic links: '{path}'"
    before = sorted(os.listdir(tmp_path))

    with pytest.raises(cf.StorageError) as info:
        await SQLiteStorage(path).open()
    assert str(info.value) == said
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(cf.StorageError) as info:
        peek(path)
    assert str(info.value) == said
    assert isinstance(info.value.__cause__, OSError)
    assert sorted(os.listdir(tmp_path)) == before


OPEN_READ_ONLY = """
import sys

import trio

import cosmoflow_actors as cf


async def main() -> None:
    try:
        await cf.SQLiteStorage(sys.argv[1]).open()
    except cf.StorageError as exc:
        print(exc)


trio.run(main)
"""


def as_the_files_owner() -> list[str]:
    """A command prefix under which a process obeys the files' permissions: as they are
    for a user; for root, setpriv dropping the capabilities that bypass them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to open a file as read-only for root")
    capabilities = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", capabilities, "--inh-caps", capabilities]


async def test_a_read_only_database_is_refused_at_open_not_at_the_first_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    await (await stored(path, a=1)).aclose()
    path.chmod(0o444)
    command = [*as_the_files_owner(), sys.executable, "-c", OPEN_READ_ONLY, str(path)]
    process = await trio.run_process(command, capture_stdout=True, check=True)
    assert process.stdout.decode().startswith(
        f"{path}: the database is read-only for this process: it may not write {path}"
    )
    path.chmod(0o600)
    assert await read_back(path) == {"a": 1}


def _files_of_8_kib_at_most() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))


async def test_a_shm_file_that_cannot_grow_is_explained(tmp_path: Path) -> None:
    """SQLite says only "disk I/O error" when its -shm file cannot grow (a full disk;
    here a file size limit below the -shm file's 32 KiB, in a process of its own)."""
    path = tmp_path / "store.db"
    await (await stored(path, a=1)).aclose()
    command = [sys.executable, "-c", OPEN_READ_ONLY, str(path)]

    process = await trio.run_process(
        command, capture_stdout=True, check=True, preexec_fn=_files_of_8_kib_at_most
    )

    assert process.stdout.decode() == (
        f"{path}: disk I/O error (SQLITE_IOERR_SHMSIZE: its -shm file could not grow: "
        "a full disk, or a file size limit)\n"
    )
    assert await read_back(path) == {"a": 1}


OPEN_WITH_FEW_DESCRIPTORS = """
import os
import sys

import trio

import cosmoflow_actors as cf


async def main() -> None:
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    for _ in range(int(sys.argv[2])):
        os.close(held.pop())
    try:
        await cf.SQLiteStorage(sys.argv[1]).open()
    except cf.StorageError as exc:
        print(exc)


trio.run(main)
"""


def _32_open_files_at_most() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))


@pytest.mark.parametrize("left", [1, 2])
async def test_a_database_that_cannot_be_opened_for_want_of_descriptors_says_so(
    tmp_path: Path, left: int
) -> None:
    """SQLite says only "unable to open database file" when the process has no file
    descriptor left for the database, its -wal or its -shm file (here a process of its
    own with ``left`` of them free when it opens the store)."""
    path = tmp_path / "store.db"
    await (await stored(path, a=1)).aclose()
    command = [sys.executable, "-c", OPEN_WITH_FEW_DESCRIPTORS, str(path), str(left)]

    process = await trio.run_process(
        command, capture_stdout=True, check=True, preexec_fn=_32_open_files_at_most
    )

    assert process.stdout.decode() == (
        f"{path}: unable to open database file (SQLITE_CANTOPEN: out of file descriptors: "
        "opening another file right after failed with [Errno 24] Too many open files: "
        f"{os.devnull!r})\n"
    )
    assert await read_back(path) == {"a": 1}


async def test_a_database_that_cannot_be_opened_otherwise_is_not_blamed_on_descriptors(
    tmp_path: Path,
) -> None:
    """A link into a missing folder: SQLite cannot open the file it points to."""
    link = tmp_path / "store.db"
    link.symlink_to(tmp_path / "missing" / "store.db")
    with pytest.raises(cf.StorageError) as info:
        await SQLiteStorage(link).open()
    assert str(info.value) == f"{link}: unable to open database file (SQLITE_CANTOPEN)"


WRITE_THROUGH = """
import sys

import trio

import cosmoflow_actors as cf


async def main() -> None:
    storage = cf.SQLiteStorage(sys.argv[1])
    await storage.set("b", 2)
    await storage.commit()
    await storage.aclose()


trio.run(main)
"""


async def test_a_link_in_a_read_only_folder_to_a_writable_database_opens(
    tmp_path: Path,
) -> None:
    """The check looks where SQLite writes: beside the file the link points to."""
    data, links = tmp_path / "data", tmp_path / "links"
    data.mkdir()
    links.mkdir()
    await (await stored(data / "store.db", a=1)).aclose()
    (links / "store.db").symlink_to(data / "store.db")
    links.chmod(0o555)
    command = [*as_the_files_owner(), sys.executable, "-c", WRITE_THROUGH, str(links / "store.db")]
    try:
        await trio.run_process(command, check=True)
    finally:
        links.chmod(0o755)
    assert await read_back(data / "store.db") == {"a": 1, "b": 2}


async def test_a_full_disk_fails_the_commit_and_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    storage = await stored(path, a=1)
    await storage.set("a", "x" * 200_000)
    await storage.set("b", 2)

    with file_size_limit(), pytest.raises(cf.StorageError) as info:
        await storage.commit()

    # SQLite's message alone ("disk I/O error") does not say that a write failed.
    assert str(info.value) == f"{path}: disk I/O error (SQLITE_IOERR_WRITE)"
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert await storage.keys() == ["a"]
    assert await storage.get("a") == 1
    await storage.set("c", 3)
    await storage.commit()
    await storage.aclose()
    assert list(await read_back(path)) == ["a", "c"]


def removed(path: Path) -> None:
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        (path.parent / name).unlink()


def replaced_by_a_copy(path: Path) -> None:
    with database(path) as connection:
        connection.execute(f"VACUUM INTO '{path}.copy'")
    os.replace(f"{path}.copy", path)


@pytest.mark.parametrize("change", [removed, replaced_by_a_copy], ids=["removed", "replaced"])
@pytest.mark.parametrize("write", ["commit", "step"])
async def test_a_database_removed_or_replaced_while_open_fails_the_commit(
    tmp_path: Path, change: Any, write: str
) -> None:
    """The connection still has the file it opened: a commit would land where no later
    open looks, and be lost once the connection closes. It is refused instead."""
    path = tmp_path / "store.db"
    key = record_key("r")
    storage = await stored(path, a=1, **{key: {"steps": 0, "path": []}})
    change(path)
    await storage.set("b", 2)

    with pytest.raises(cf.StorageError, match=re.escape(f"{path} was removed or replaced")):
        if write == "commit":
            await storage.commit()
        else:
            await storage.commit_step([("set", "c", 3)], key, {"steps": 1, "path": ["x"]}, 0)

    await storage.aclose()
    after = list(await read_back(path))
    assert after == ([] if change is removed else ["a", key])


async def test_a_database_locked_by_another_writer_fails_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await (await stored(path, a=1)).aclose()
    storage = SQLiteStorage(path, timeout=0.01)
    await storage.set("a", 2)

    with database(path) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(cf.StorageError, match="locked"):
            await storage.commit()
        other.execute("ROLLBACK")

    assert await storage.get("a") == 1
    await storage.aclose()


async def test_aclose_drops_staged_writes_and_reopens_on_use(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    storage = await stored(path, a=1)
    await storage.set("b", 2)

    await storage.aclose()

    assert os.listdir(tmp_path) == ["store.db"]
    assert await storage.keys() == ["a"]
    await storage.aclose()


async def test_repr_path_and_codec(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "s.db", codec="pickle")

    assert repr(storage) == f"SQLiteStorage({str(tmp_path / 's.db')!r})"
    assert storage.path == tmp_path / "s.db"
    assert storage.codec == "pickle"


# --- another process holding a lock ------------------------------------------------------

LOCKER = textwrap.dedent(
    """
    import sqlite3, sys

    connection = sqlite3.connect(sys.argv[1], isolation_level=None)
    for statement in sys.argv[2:]:
        connection.execute(statement)
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin
    """
)
"""A process that runs SQL statements on a database, then keeps its connection (and the
locks it holds) until its stdin is closed."""

TIMEOUT = 1.0
"""The ``timeout`` of the storages these tests lock out."""
BOUND = TIMEOUT * 1.5 + 0.25
"""How long a call may wait for a lock, in real seconds: the timeout with room to spare
for a busy machine, yet short of two timeouts."""
WRITE = "INSERT INTO cosmoflow_store (key, value) VALUES ('other', x'31')"


def locking(path: Path, *statements: str) -> AbstractAsyncContextManager[trio.Process]:
    """Another process that ran ``statements`` on the database at ``path`` and keeps
    its locks until exit."""
    return holder([sys.executable, "-c", LOCKER, str(path), *statements], b"locked")


async def test_the_writes_of_a_batch_wait_for_a_lock_one_timeout_in_all(tmp_path: Path) -> None:
    """An update that waited the whole timeout for another process's write lock leaves
    nothing to the commit after it: together they fail within one timeout. The next
    batch waits the whole timeout again."""
    path = tmp_path / "store.db"
    await (await stored(path, n=1)).aclose()
    storage = SQLiteStorage(path, timeout=TIMEOUT)
    await storage.open()

    async with locking(path, "BEGIN IMMEDIATE", WRITE):
        start = trio.current_time()
        with pytest.raises(cf.StorageError, match="locked"):
            await storage.update("n", lambda n: n + 1, 0)
        await storage.set("a", 1)
        with pytest.raises(cf.StorageError, match="locked"):
            await storage.commit()
        batch = trio.current_time() - start

        start = trio.current_time()
        await storage.set("b", 2)
        with pytest.raises(cf.StorageError, match="locked"):
            await storage.commit()
        next_batch = trio.current_time() - start

    assert batch < BOUND, f"timeout={TIMEOUT}, the batch waited {batch:.2f} s"
    assert next_batch >= TIMEOUT * 0.9
    await storage.set("c", 3)
    await storage.commit()
    assert await storage.keys() == ["n", "c"]
    await storage.aclose()


async def test_an_exclusive_lock_elsewhere_fails_open_saying_the_file_is_locked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    await (await stored(path, n=1)).aclose()
    storage = SQLiteStorage(path, timeout=TIMEOUT)

    async with locking(path, "PRAGMA locking_mode = EXCLUSIVE", WRITE):
        start = trio.current_time()
        with pytest.raises(cf.StorageError) as info:
            await storage.open()
        waited = trio.current_time() - start

    assert str(info.value).startswith(f"{path} is locked by another connection")
    assert "timeout=1 s" in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert waited < BOUND
    assert await storage.get("other") == 1
    await storage.aclose()


# --- waiting for a lock in slices -------------------------------------------------------

LONG_TIMEOUT = 30.0
"""The ``timeout`` of a storage whose waits must end long before it runs out."""
PROMPTLY = 1.0
"""Seconds: how soon a cancelled call must be back, a slice (50 ms) with room to spare
for a busy machine, and far short of :data:`LONG_TIMEOUT`."""


def tries_of(storage: SQLiteStorage, prefix: str, *, wanted: int) -> trio.Event:
    """An event set once the storage's connection has begun ``wanted`` statements that
    start with ``prefix`` (tries to take a lock, each waiting up to a slice): the
    trace callback runs in the worker thread as each statement begins."""
    assert storage._connection is not None
    begun = trio.Event()
    tries: list[str] = []

    def traced(sql: str) -> None:
        if sql.startswith(prefix):
            tries.append(sql)
            if len(tries) == wanted:
                trio.from_thread.run_sync(begun.set)

    storage._connection.set_trace_callback(traced)
    return begun


def stored_keys(path: Path) -> list[str]:
    """The keys committed to the database at ``path``, read by a plain connection."""
    with database(path) as reader:
        return [key for (key,) in reader.execute("SELECT key FROM cosmoflow_store")]


async def cancelled_write(storage: SQLiteStorage, write: str) -> None:
    """``write``, one of the storage's calls that take the write lock."""
    if write == "commit":
        await storage.commit()
    elif write == "update":
        await storage.update("n", lambda n: n + 1, 0)
    elif write == "forget_record":
        await storage.forget_record(record_key("r"), lambda record: None)
    else:
        await storage.commit_step([("set", "c", 3)], record_key("r"), {"steps": 1}, 0)


async def cancelled_once(
    waiting: trio.Event, call: Callable[[], Awaitable[object]]
) -> tuple[trio.CancelScope, float]:
    """Await ``call()``, cancelled once ``waiting`` is set; return the scope it ran in
    and the trio time it was cancelled at."""
    cancelled_at = 0.0
    with trio.CancelScope() as scope:

        async def cancel_once_waiting() -> None:
            nonlocal cancelled_at
            await waiting.wait()
            cancelled_at = trio.current_time()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_once_waiting)
            await call()
    return scope, cancelled_at


async def b_staged_over(path: Path) -> SQLiteStorage:
    """A storage with a long timeout, open over a database at ``path`` that holds a,
    with b staged (its commit takes the write lock)."""
    await (await stored(path, a=1)).aclose()
    storage = SQLiteStorage(path, timeout=LONG_TIMEOUT)
    await storage.open()
    await storage.set("b", 2)
    return storage


@pytest.mark.parametrize("write", ["commit", "update", "forget_record", "commit_step"])
async def test_a_write_cancelled_while_another_connection_holds_the_write_lock_leaves_at_once(
    tmp_path: Path, write: str
) -> None:
    """SQLite's busy wait cannot be cut (``Connection.interrupt`` does not): the call
    waits in tries of a slice, and the one of a cancelled caller gives up after the try
    under way, not after the timeout. It wrote nothing, holds no transaction, and the
    storage works on once the lock is free."""
    path = tmp_path / "store.db"
    storage = await b_staged_over(path)
    with trio.fail_after(LONG_TIMEOUT / 2), database(path) as other:
        other.execute("BEGIN IMMEDIATE")
        waiting = tries_of(storage, "BEGIN IMMEDIATE", wanted=2)  # a slice was refused
        scope, cancelled_at = await cancelled_once(waiting, lambda: cancelled_write(storage, write))
        returned_at = trio.current_time()
        other.execute("ROLLBACK")

        assert scope.cancelled_caught
        assert storage._connection is not None
        assert not storage._connection.in_transaction
        assert stored_keys(path) == ["a"]
    assert returned_at - cancelled_at < PROMPTLY
    storage._connection.set_trace_callback(None)
    await storage.set("after", 1)
    await storage.commit()
    assert "after" in stored_keys(path)
    await storage.aclose()


async def test_an_open_cancelled_while_another_connection_holds_the_database_leaves_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening reads the schema, waiting for the lock in slices too: a cancelled open
    leaves within one, with its connection closed; the next use opens afresh."""
    path = tmp_path / "store.db"
    await (await stored(path, a=1)).aclose()
    storage = SQLiteStorage(path, timeout=LONG_TIMEOUT)
    waiting = trio.Event()
    tries: list[sqlite3.Connection] = []
    read_tables = sqlite_backend._tables

    def noted(connection: sqlite3.Connection) -> dict[str, str | None]:
        tries.append(connection)
        if len(tries) == 2:
            trio.from_thread.run_sync(waiting.set)
        return read_tables(connection)

    monkeypatch.setattr(sqlite_backend, "_tables", noted)
    with trio.fail_after(LONG_TIMEOUT / 2), database(path) as other:
        other.execute("PRAGMA locking_mode = EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        scope, cancelled_at = await cancelled_once(waiting, storage.open)
        returned_at = trio.current_time()
        other.execute("ROLLBACK")
        other.execute("PRAGMA locking_mode = NORMAL")

    assert returned_at - cancelled_at < PROMPTLY
    assert scope.cancelled_caught
    assert storage._connection is None
    assert id(tries[0]) not in sqlite_backend._open_here  # closed
    monkeypatch.undo()
    assert await storage.get("a") == 1
    await storage.aclose()


async def test_a_write_lock_released_during_the_wait_is_taken_and_the_write_succeeds(
    tmp_path: Path,
) -> None:
    """The lock is let go after a whole slice of waiting for it: the next try takes it,
    long before the timeout."""
    path = tmp_path / "store.db"
    storage = await b_staged_over(path)
    with trio.fail_after(LONG_TIMEOUT / 2), database(path) as other:
        other.execute("BEGIN IMMEDIATE")
        waiting = tries_of(storage, "BEGIN IMMEDIATE", wanted=2)
        async with trio.open_nursery() as nursery:

            async def release_once_waiting() -> None:
                await waiting.wait()
                other.execute("ROLLBACK")

            nursery.start_soon(release_once_waiting)
            start = trio.current_time()
            await storage.commit()

    assert trio.current_time() - start < LONG_TIMEOUT / 2
    assert stored_keys(path) == ["a", "b"]
    await storage.aclose()


async def test_a_write_lock_held_past_the_timeout_fails_saying_the_file_is_locked(
    tmp_path: Path,
) -> None:
    """Waiting in slices changes nothing for a lock that outlasts ``timeout``: the call
    fails after it, saying so, the staged writes dropped as before; the connection
    waits a slice a try again after."""
    path = tmp_path / "store.db"
    await (await stored(path, a=1)).aclose()
    storage = SQLiteStorage(path, timeout=TIMEOUT)
    await storage.set("b", 2)
    with trio.fail_after(BOUND * 4), database(path) as other:
        other.execute("BEGIN IMMEDIATE")
        start = trio.current_time()
        with pytest.raises(cf.StorageError) as info:
            await storage.commit()
        waited = trio.current_time() - start
        other.execute("ROLLBACK")

    assert str(info.value).startswith(f"{path} is locked by another connection")
    assert "gave up waiting for it (timeout=1 s): database is locked" in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert TIMEOUT * 0.9 <= waited < BOUND
    assert storage._connection is not None
    assert storage._connection.execute("PRAGMA busy_timeout").fetchone() == (50,)
    await storage.commit()
    assert stored_keys(path) == ["a"]
    await storage.aclose()


def files_of(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``directory`` with its content and mtime."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in directory.iterdir()}


async def test_peek_reads_without_creating_or_changing_a_file(tmp_path: Path) -> None:
    path = tmp_path / "peeked.db"
    path.touch()
    assert peek(path) == {}
    storage = await stored(path, a=1)
    await storage.set("b", b"x")
    await storage.commit()
    with database(path) as connection:
        connection.execute("UPDATE cosmoflow_store SET value = 'text' WHERE key = 'b'")
    before = files_of(tmp_path)
    # The writer is open: its commits are in the -wal file, and the -shm index (shared
    # memory, not data) gets the marks of every reader.
    before.pop(f"{path.name}-shm")
    entries = peek(path)
    assert entries["a"].unwrap() == 1
    with pytest.raises(cf.StorageError, match="its stored value is a str, not bytes"):
        entries["b"].unwrap()
    assert {name: file for name, file in files_of(tmp_path).items() if name in before} == before
    await storage.aclose()
    path.write_bytes(b"garbage garbage garbage")
    with pytest.raises(cf.StorageError, match="file is not a database"):
        peek(path)


COMMIT_BY_TURNS = """
import sys

import trio

import cosmoflow_actors as cf


async def main() -> None:
    for commit in range(1, int(sys.argv[2]) + 1):
        storage = cf.SQLiteStorage(sys.argv[1])
        await storage.set("first", commit)
        await storage.set("last", commit)
        await storage.commit()
        await storage.aclose()


trio.run(main)
"""


async def test_peek_beside_a_writer_process_sees_every_commit_whole(tmp_path: Path) -> None:
    """Another process opens the database, commits and closes it, 300 times, as an
    engine whose runs come one at a time does: each close copies the commit into the
    database file and removes the -wal file. Every peek meanwhile reads a whole commit
    ("first" and "last" are set together, 8 MB of rows between them), never an error.
    Read without SQLite's locks when the -wal file was missing, about one peek in
    twelve here saw part of a commit."""
    path = tmp_path / "store.db"
    between = {f"big{index}": "x" * 100_000 for index in range(80)}
    await (await stored(path, first=0, **between, last=0)).aclose()
    command = [sys.executable, "-c", COMMIT_BY_TURNS, str(path), "300"]
    seen: list[tuple[int, int]] = []
    writer = await trio.lowlevel.open_process(command)
    try:
        while writer.poll() is None:
            entries = peek(path)
            seen.append((entries["first"].unwrap(), entries["last"].unwrap()))
    finally:
        writer.kill()  # when a peek failed; a process that has exited is left alone
        await writer.wait()
    assert writer.returncode == 0
    assert [(first, last) for first, last in seen if first != last] == []
    assert len(set(seen)) > 1  # the peeks went on while the writer committed


async def test_peek_of_a_closed_database_creates_the_files_of_a_reader(tmp_path: Path) -> None:
    """Reading with SQLite's locks needs the -wal and -shm files: SQLite creates them,
    the -wal empty, and the next writer to close removes them."""
    path = tmp_path / "store.db"
    await (await stored(path, a=1)).aclose()
    content = path.read_bytes()

    assert peek(path)["a"].unwrap() == 1

    assert sorted(os.listdir(tmp_path)) == ["store.db", "store.db-shm", "store.db-wal"]
    assert (tmp_path / "store.db-wal").read_bytes() == b""
    assert path.read_bytes() == content
    await (await stored(path, b=2)).aclose()
    assert os.listdir(tmp_path) == ["store.db"]


@pytest.fixture
def read_only_works(tmp_path: Path) -> None:
    skip_unless_read_only_works(tmp_path)


@pytest.mark.usefixtures("read_only_works")
async def test_peek_reads_a_database_in_a_folder_it_may_not_write(tmp_path: Path) -> None:
    """There SQLite cannot create the -wal and -shm files that reading with its locks
    needs: the database file is read as it is, which creates nothing. Once a reader
    has left those files, they are used."""
    path = tmp_path / "store.db"
    await (await stored(path, a=1)).aclose()

    with read_only(tmp_path):
        assert peek(path)["a"].unwrap() == 1
        assert os.listdir(tmp_path) == ["store.db"]
    peek(path)
    with read_only(tmp_path):
        assert peek(path)["a"].unwrap() == 1


PEEK = """
import sys

from cosmoflow_actors.storage.sqlite import peek

print({key: entry.unwrap() for key, entry in peek(sys.argv[1]).items()})
"""


async def test_peek_of_a_database_it_may_not_write_creates_no_file(tmp_path: Path) -> None:
    """The -wal and -shm files SQLite would create for the read would be this
    process's: the database's owner could no longer write them, nor so the database.
    The database file is read as it is."""
    path = tmp_path / "store.db"
    await (await stored(path, a=1)).aclose()
    path.chmod(0o444)
    command = [*as_the_files_owner(), sys.executable, "-c", PEEK, str(path)]

    process = await trio.run_process(command, capture_stdout=True, check=True)

    assert process.stdout == b"{'a': 1}\n"
    assert os.listdir(tmp_path) == ["store.db"]


async def test_a_durable_step_with_a_key_that_is_not_valid_unicode_fails_alone(
    tmp_path: Path,
) -> None:
    """Such a key is never stored: a step's delete of it deletes nothing, and a set or
    update of it is StoreValueError naming it, with nothing of the step stored. Neither
    may raise anything else: the store actor would take it for a broken backend."""
    path = tmp_path / "store.db"
    key, bad = record_key("r"), "bad \udc80"
    storage = await stored(path, **{key: {"steps": 0, "path": []}}, kept=1)
    assert await storage.commit_step([("delete", bad, None)], key, {"steps": 1, "path": ["a"]}, 0)
    for op in [("set", bad, 1), ("update", bad, (lambda value: value, 0))]:
        with pytest.raises(cf.StoreValueError) as info:
            await storage.commit_step(
                [("set", "x", 2), op], key, {"steps": 2, "path": ["a", "b"]}, 1
            )
        assert info.value.key == bad
    await storage.commit()
    await storage.aclose()

    fresh = SQLiteStorage(path)
    assert {k: await fresh.get(k) for k in await fresh.keys()} == {
        key: {"steps": 1, "path": ["a"]},
        "kept": 1,
    }
    await fresh.aclose()


async def test_a_value_that_cannot_be_decoded_is_an_error_naming_the_store_and_key(
    tmp_path: Path,
) -> None:
    """Another client wrote a row this backend cannot read: every read of it says which
    store and which key, and a damaged run record fails the engine call that read it."""
    path = tmp_path / "store.db"
    async with cf.open_engine() as engine:
        await engine.run(single(cf.node(lambda ctx: None)), SQLiteStorage(path), run_id="r1")
    with database(path) as connection:
        connection.execute("INSERT INTO cosmoflow_store VALUES ('x', ?)", (b"{oops",))
        connection.execute("INSERT INTO cosmoflow_store VALUES ('t', 'text')")
        connection.execute(
            "UPDATE cosmoflow_store SET value = ? WHERE key = ?", (b"[", record_key("r1"))
        )
    storage = SQLiteStorage(path)
    where = re.escape(repr(storage))

    with pytest.raises(cf.StorageError, match=f"^{where}: cannot read key 'x': .*not valid JSON"):
        await storage.get("x")
    with pytest.raises(cf.StorageError, match=f"^{where}: cannot read key 'x'"):
        await storage.get_many(["x"])
    with pytest.raises(cf.StorageError, match=f"^{where}: cannot read key 't': .*a str, not"):
        await storage.get("t")
    assert "cannot read key 'x'" in str(peek(path)["x"].error)  # type: ignore[union-attr]
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError, match=f"cannot read key '{record_key('r1')}'"):
            await engine.list_runs(storage)
    await storage.aclose()


async def test_a_blob_key_another_client_wrote_fails_the_calls_that_meet_it(
    tmp_path: Path,
) -> None:
    """keys() (and so a user's keys, peek) gets a StorageError naming the store and the
    key's bytes; list_runs, which reads the range of the run records' keys, never meets
    it; a run on another store and reads of other keys go on."""
    path = tmp_path / "store.db"
    storage = await stored(path, a=1)
    with database(path) as connection:
        connection.execute("INSERT INTO cosmoflow_store VALUES (?, ?)", (b"\xff", b"1"))
    named = f"^{re.escape(repr(storage))}: a row's key is the bytes b'\\\\xff', not text"

    with pytest.raises(cf.StorageError, match=named):
        await storage.keys()
    with pytest.raises(cf.StorageError, match="key is the bytes b'\\\\xff'"):
        peek(path)
    await foreign_key_fails_only_what_meets_it(storage, named, records_by_prefix=True)
    await storage.aclose()


FORKS_AROUND_AN_OPEN_STORE = """
import multiprocessing
import os
import signal
import sys
import threading

import trio

import cosmoflow_actors as cf


async def try_open(path: str) -> str:
    storage = cf.SQLiteStorage(path)
    try:
        await storage.open()
    except cf.StorageError as exc:
        return str(exc)
    await storage.aclose()
    return "opened"


def open_in_spawned(path: str) -> None:
    print("spawned:", trio.run(try_open, path), flush=True)


def open_in_forked(path: str, tag: str) -> None:
    # Forks from the main thread, outside the trio run of the thread holding the store.
    child = os.fork()
    if child == 0:
        signal.alarm(30)  # kills a child that hangs in sqlite3.connect
        try:
            print(f"{tag}:", trio.run(try_open, path), flush=True)
        finally:
            os._exit(0)
    assert os.waitpid(child, 0)[1] == 0


held: list[cf.SQLiteStorage] = []


async def use_inherited() -> str:
    try:
        await held[0].get("a")
    except cf.StorageError as exc:
        return str(exc)
    return "used"


def use_in_forked() -> None:
    child = os.fork()
    if child == 0:
        signal.alarm(30)
        try:
            print("inherited instance:", trio.run(use_inherited), flush=True)
        finally:
            os._exit(0)
    assert os.waitpid(child, 0)[1] == 0


async def hold_open(path: str, opened: threading.Event, close: threading.Event) -> None:
    storage = cf.SQLiteStorage(path)
    held.append(storage)
    await storage.set("a", 1)
    await storage.commit()
    opened.set()
    await trio.to_thread.run_sync(close.wait)
    await storage.set("b", 2)
    await storage.commit()
    await storage.aclose()


if __name__ == "__main__":
    path, other = sys.argv[1], sys.argv[2]
    opened, close = threading.Event(), threading.Event()
    holder = threading.Thread(target=trio.run, args=(hold_open, path, opened, close))
    holder.start()
    opened.wait()
    open_in_forked(path, "forked while open")
    use_in_forked()
    open_in_forked(other, "other file")
    spawned = multiprocessing.get_context("spawn").Process(target=open_in_spawned, args=(path,))
    spawned.start()
    spawned.join()
    close.set()
    holder.join()
    open_in_forked(path, "forked after close")
"""


async def test_a_child_forked_while_the_database_is_open_may_not_open_it(
    tmp_path: Path,
) -> None:
    """A process forked while its parent had the database open holds a copy of SQLite's
    state of that file (its locks, the -shm mapping): its own connection lost commits,
    failed or hung. It is refused; the parent's store goes on; a spawned process, or a
    child forked with no connection to the file open, opens it."""
    path, other = tmp_path / "store.db", tmp_path / "other.db"
    script = tmp_path / "forks.py"
    script.write_text(FORKS_AROUND_AN_OPEN_STORE)
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, str(script), str(path), str(other)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    said = dict(line.split(": ", 1) for line in done.stdout.decode().splitlines())
    assert said["forked while open"] == (
        f"{path}: cannot open the database in this process: it was forked while its "
        "parent (or an ancestor) had the database open, and SQLite's state of that "
        "file (its locks, the mapping of its -shm file) was copied into it at the fork; "
        "a connection opened here could lose commits, fail or hang. Open it in a process "
        "started with the spawn or forkserver start method of multiprocessing, or in a "
        "subprocess, or fork before opening it"
    )
    assert said["inherited instance"] == (
        f"SQLiteStorage({str(path)!r}): this instance's connection was opened by the process "
        "this one was forked from, and an SQLite connection must not be used across a "
        "fork: open the store in a process started with the spawn or forkserver start "
        "method of multiprocessing, or in a subprocess"
    )
    assert said == {
        "forked while open": said["forked while open"],
        "inherited instance": said["inherited instance"],
        "other file": "opened",
        "spawned": "opened",
        "forked after close": "opened",
    }
    assert await read_back(path) == {"a": 1, "b": 2}
