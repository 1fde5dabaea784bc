"""The SQLite backend: one row per key in a WAL-mode database, via the stdlib ``sqlite3``."""

from __future__ import annotations

import errno
import functools
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar, final

import outcome
import trio

from cosmoflow_actors.errors import StorageError, with_article
from cosmoflow_actors.storage.base import (
    RESERVED_PREFIX,
    StagedOp,
    check_steps,
    stored_with,
    value_or,
)
from cosmoflow_actors.storage.codec import (
    Codec,
    CodecName,
    check_database_meta,
    check_json_key,
    database_meta,
    get_codec,
    unreadable,
    utf8_key,
)
from cosmoflow_actors.storage.staged import DatabaseStorage, DeleteOp, Op, SetOp
from cosmoflow_actors.validation import checked_path, require_seconds

STORE_TABLE: Final = "cosmoflow_store"
META_TABLE: Final = "cosmoflow_meta"
SCHEMA: Final = {
    STORE_TABLE: f"CREATE TABLE {STORE_TABLE} (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL)",
    META_TABLE: f"CREATE TABLE {META_TABLE} (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
}
LOCK_WAIT_SLICE: Final = 0.05
"""Seconds: the connections' busy timeout, how long SQLite waits for another connection's
lock before it gives up. A call waits for a lock in tries of one slice each, until its
``timeout`` has passed or its caller was cancelled (see :func:`_retrying`)."""
LOCK_RETRY_SECONDS: Final = 0.005
"""How long a call waits before it tries again for a lock that SQLite refused at once,
without waiting (as when two connections switch a new database to WAL mode at once: no
busy handler is called there)."""

UPSERT_ROWS: Final = 200
"""Most rows one INSERT upserts: 400 parameters, under the 999 of SQLite before 3.32."""


@functools.cache
def _upsert(rows: int) -> str:
    """An INSERT of ``rows`` (key, value) rows that replaces the values of existing keys
    (a key given twice takes its last value)."""
    values = ", ".join(["(?, ?)"] * rows)
    return (
        f"INSERT INTO {STORE_TABLE} (key, value) VALUES {values} "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )


_UPSERT: Final = _upsert(1)

_SELECT: Final = f"SELECT value FROM {STORE_TABLE} WHERE key = ?"
READ_BATCH: Final = 500
"""Keys a query of ``get_many`` reads at most (SQLite bounds a query's parameters)."""
_DELETE: Final = f"DELETE FROM {STORE_TABLE} WHERE key = ?"
_DELETE_USER_KEYS: Final = f"DELETE FROM {STORE_TABLE} WHERE substr(key, 1, ?) <> ?"
"""Every key outside the engine's reserved prefix (LIKE would read ``_`` as a wildcard)."""

T = TypeVar("T")

_open_here: dict[int, Path] = {}
"""The database files (resolved paths) this process has connections open to, by the id
of their :class:`_TrackedConnection`. Connections open and close in worker threads: a
dict's item assignment and ``pop`` are atomic."""

_open_at_fork: set[Path] = set()
"""The database files the process this one was forked from, or an ancestor of it, had
connections open to when it forked (see ``_refuse_if_open_at_fork``)."""


def _remember_at_fork() -> None:
    """In a child just forked: the files its parent has open are files open at a fork.
    The child's copies of the parent's connections are not its own: closing one there
    changes nothing here."""
    _open_at_fork.update(_open_here.values())
    _open_here.clear()


os.register_at_fork(after_in_child=_remember_at_fork)


class _TrackedConnection(sqlite3.Connection):
    """A connection that :data:`_open_here` lists from before it opens its file until it
    is closed (or collected unclosed)."""

    def __init__(self, database: Path, *args: Any, **kwargs: Any) -> None:
        _open_here[id(self)] = database.resolve()
        try:
            super().__init__(database, *args, **kwargs)
        except BaseException:
            del _open_here[id(self)]
            raise

    def close(self) -> None:
        super().close()
        _open_here.pop(id(self), None)

    def __del__(self) -> None:
        _open_here.pop(id(self), None)


def _refuse_if_open_at_fork(path: Path) -> None:
    """Raise StorageError when this process was forked while it (or an ancestor) had the
    database at ``path`` open (blocks, to resolve the path).

    SQLite keeps, per process, the locks it holds on each open file and the mapping of
    its ``-shm`` file; a forked child has a copy of them, true only of its parent at the
    fork. A connection the child opens to that file uses that copy: it lost commits,
    failed with ``SQLITE_IOERR_SHORT_READ`` or hung for good in ``sqlite3.connect`` (on
    a mutex held at the fork by another thread of the parent).
    """
    if path.resolve() in _open_at_fork:
        raise StorageError(
            f"{path}: cannot open the database in this process: it was forked while its "
            "parent (or an ancestor) had the database open, and SQLite's state of that "
            "file (its locks, the mapping of its -shm file) was copied into it at the "
            "fork; a connection opened here could lose commits, fail or hang. Open it "
            "in a process started with the spawn or forkserver start method of "
            "multiprocessing, or in a subprocess, or fork before opening it"
        )


def _refuse_if_inherited(storage: SQLiteStorage, connection: sqlite3.Connection) -> None:
    """Raise StorageError when ``connection``, ``storage``'s, was opened by the process
    this one was forked from: its state in SQLite is that process's (see
    ``_refuse_if_open_at_fork``). Does not block."""
    if id(connection) not in _open_here:
        raise StorageError(
            f"{storage!r}: this instance's connection was opened by the process this one "
            "was forked from, and an SQLite connection must not be used across a fork: "
            "open the store in a process started with the spawn or forkserver start "
            "method of multiprocessing, or in a subprocess"
        )


@final
class SQLiteStorage(DatabaseStorage):
    """Storage in an SQLite database file: one row per key, values encoded by the codec.

    The database runs in WAL mode with ``synchronous=FULL``, so every commit is synced to
    disk before :meth:`commit` returns, and other processes may read it while this one
    writes. It holds two tables, ``cosmoflow_store (key, value)`` and ``cosmoflow_meta``
    (the format and the codec); a database holding anything else is refused. A file this
    backend creates gets mode 0600 (SQLite gives its ``-wal`` and ``-shm`` files the same).

    Writes are staged in memory, encoded at once (an unencodable value fails :meth:`set`
    and stores nothing), and written by :meth:`commit` in one transaction. Reads ask the
    database each time, so they see what other processes committed, with the staged
    writes laid over it. :meth:`update` is atomic against other processes too: it opens
    the transaction that :meth:`commit` then commits (``BEGIN IMMEDIATE``, which holds
    other writers off meanwhile) before it reads. So is a durable step:
    :meth:`commit_step` applies it, updates included, in a transaction of its own, or in
    a savepoint of the one an update opened. And so is :meth:`forget_record`, which opens
    that transaction before it reads the record it checks.

    ``codec`` is ``"json"`` (the default) or ``"pickle"`` (trusted data only).
    ``timeout`` (seconds, >= 0) is how long :meth:`open` waits for other connections' locks
    in all, and so do the calls that write between two commits (a batch of the store
    actor): an :meth:`update` that waited 3 of 5 s leaves 2 s to the :meth:`commit`
    after it. A read waits up to ``timeout`` on its own (in WAL mode a read waits only
    for a connection that holds the database exclusively or is recovering it). A call
    that runs out of time raises :class:`~cosmoflow_actors.StorageError` saying the file
    is locked, with the ``sqlite3`` error as ``__cause__``.

    Every call to the database runs in a worker thread (``trio.to_thread``, one call at
    a time per instance). Cancellation does not interrupt a call, except while it waits
    for another connection's lock: it waits in tries of :data:`LOCK_WAIT_SLICE` (50 ms),
    and the call of a cancelled caller gives up at the end of the try under way, having
    written nothing, before its caller raises ``Cancelled``. A write that holds the lock
    runs to its end. :meth:`set` and staged reads block nothing. The connection is
    opened by :meth:`open` and closed by :meth:`aclose`.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, codec: CodecName = "json", timeout: float = 5.0
    ) -> None:
        require_seconds("timeout", timeout, zero=True)
        super().__init__(codec)
        self._path = checked_path("path", path)
        self._timeout = timeout
        self._connection: sqlite3.Connection | None = None
        self._file: _DatabaseFile | None = None
        """The file the connection opened, which every commit checks is still there."""
        self._waits = _LockWaits(timeout)

    def __repr__(self) -> str:
        return f"SQLiteStorage({str(self._path)!r})"

    @property
    def path(self) -> Path:
        """The database file's absolute path."""
        return self._path

    async def open(self) -> None:
        """Open the database, creating it if needed; later calls return at once.

        Blocks in a worker thread. Raises :class:`~cosmoflow_actors.StorageError` when the
        file cannot be opened (a directory, or a loop of symbolic links, is named as
        one), is not an SQLite database, holds tables this backend did not create or was
        written with another codec; such a file is not changed. Raises it too, opening
        nothing, in a process forked while its parent (or an ancestor) had a connection
        to that file open: SQLite's state of the file was copied at the fork, and a
        connection opened with that copy could lose commits, fail or hang.
        """
        await self._connected()

    async def get(self, key: str) -> Any:
        """Return a fresh decoded copy of the value; raise ``KeyError`` when it is missing.

        Blocks in a worker thread unless the key has a staged write.
        """
        staged = self._staged.lookup(key)
        if isinstance(staged, bytes):
            return self._codec.read(repr(self), key, staged)
        if staged is None or utf8_key(key) is None:
            raise KeyError(key)
        row = await self._query(_SELECT, key)
        if row is None:
            raise KeyError(key)
        return _decoded(self._codec, repr(self), key, row[0])

    async def contains(self, key: str) -> bool:
        """Return whether ``key`` is stored (blocks in a worker thread, as :meth:`get`)."""
        staged = self._staged.lookup(key)
        if isinstance(staged, bytes) or staged is None:
            return staged is not None
        if utf8_key(key) is None:
            return False
        return await self._query(f"SELECT 1 FROM {STORE_TABLE} WHERE key = ?", key) is not None

    async def keys(self) -> list[str]:
        """Return every key, in insertion order (blocks in a worker thread)."""
        rows = await self._query_all(f"SELECT key FROM {STORE_TABLE} ORDER BY rowid")
        where = repr(self)
        return self._staged.merge_keys(_text_key(where, row[0]) for row in rows)

    async def _read_many(self, keys: list[str]) -> dict[str, bytes]:
        """One query per :data:`READ_BATCH` keys, all in one call to the worker thread."""
        connection = await self._connected()
        rows = await self._in_thread(_read, connection, self._timeout, _fetch_keys, keys)
        where = repr(self)
        return {key: _as_bytes(where, key, value) for key, value in rows}

    async def _stored_count(self) -> int:
        count: int = (await self._query(f"SELECT count(*) FROM {STORE_TABLE}"))[0]
        return count

    async def commit(self) -> None:
        """Write the staged writes in one transaction, synced to disk; all or nothing.

        Blocks in a worker thread. On failure the transaction is rolled back, the staged
        writes are dropped and :class:`~cosmoflow_actors.StorageError` names the file,
        with the ``sqlite3`` error as ``__cause__``. So it is, before ``COMMIT``, when
        the file this instance opened is no longer at its path (removed or replaced):
        the connection would commit to a file that no later open finds. A commit
        cancelled while it waits for another connection's write lock stops waiting
        within :data:`LOCK_WAIT_SLICE`, writes nothing and drops the staged writes too.
        """
        connection = self._connection
        try:
            if self._staged or (connection is not None and connection.in_transaction):
                ops = self._staged.ops
                self._staged.reset()
                connection = await self._connected()
                await self._in_thread(_write, connection, self._opened_file, ops, self._waits)
        finally:
            self._waits.forget()  # the next batch waits for locks afresh

    async def update(self, key: str, function: Callable[[Any], Any], default: Any) -> Any:
        """Store ``function(value)`` under ``key`` atomically across processes; return it.

        Opens the transaction :meth:`commit` commits, unless it is open (``BEGIN
        IMMEDIATE``: other processes' writes wait until the commit), then reads the key
        (the staged writes laid over the database) and stages the new value, as
        :meth:`Storage.update <cosmoflow_actors.Storage.update>` does. While the
        transaction is open nobody else writes, so the read stays true until the commit,
        and further updates of a batch cost no more than a staged read and write. Blocks
        in a worker thread to open the transaction and to read a key not staged.
        """
        await self._hold_writers_off()
        return await super().update(key, function, default)

    async def forget_record(self, record_key: str, check: Callable[[Any], None]) -> bool:
        """Delete the run record under ``record_key`` and its BatchFlow children's, and
        the parts (path chunks, places) of them all, once ``check(record)`` has
        passed, atomically across processes; return whether there was a record.

        Opens the transaction :meth:`commit` commits, unless it is open (``BEGIN
        IMMEDIATE``: other processes' writes wait until the commit), then reads the
        record (the staged writes laid over the database), checks it and stages the
        deletes: the record the commit deletes is the one checked. A check that raises
        stages nothing. Blocks in a worker thread to open the transaction and read.
        """
        await self._hold_writers_off()
        record = await value_or(self, record_key, None)
        if record is None:
            return False
        check(record)
        for key in await stored_with(self, record_key):
            self._staged.delete(key)
        return True

    async def keys_with_prefix(self, prefix: str) -> list[str]:
        """Return the keys that start with ``prefix``, in insertion order, with the
        staged writes laid over: one range query on the key's index when ``prefix`` ends
        in an ASCII character (the character after it ends the range; the engine's
        prefixes all do), whatever the size of the store; else a filter of :meth:`keys`.
        Blocks in a worker thread."""
        if not prefix or not prefix[-1].isascii() or utf8_key(prefix) is None:
            return await super().keys_with_prefix(prefix)
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        sql = f"SELECT key FROM {STORE_TABLE} WHERE key >= ? AND key < ? ORDER BY rowid"
        rows = await self._query_all(sql, prefix, end)
        merged = self._staged.merge_keys(_text_key(repr(self), row[0]) for row in rows)
        return [key for key in merged if key.startswith(prefix)]

    async def _hold_writers_off(self) -> None:
        """Open the transaction :meth:`commit` commits, unless it is open: ``BEGIN
        IMMEDIATE``, which blocks (in a worker thread) while another process writes, up
        to what the batch has left of the timeout, and then holds other writers off
        until the commit."""
        connection = await self._connected()
        if not connection.in_transaction:
            await self._in_thread(_begin, connection, self._waits)

    async def commit_step(
        self, ops: list[StagedOp], record_key: str, record: Any, steps_before: int
    ) -> bool:
        """Commit a durable step in one transaction, atomic across processes; returns True.

        In one ``BEGIN IMMEDIATE`` transaction, which holds other writers off: the writes
        staged before, a check that the run's record still counts ``steps_before`` steps
        (else RunConflictError), the step's ops (updates applied to the values stored
        then, their functions called in the worker thread) and the record. Any failure
        rolls it all back, and the writes staged before stay staged for :meth:`commit`.
        When an :meth:`update` has opened a transaction, the step goes in a savepoint of
        it instead, all or nothing too, and is durable once :meth:`commit` returns.
        Blocks in a worker thread.
        """
        connection = await self._connected()
        await self._in_thread(self._write_step, connection, ops, record_key, record, steps_before)
        self._staged.reset()
        return True

    def _write_step(
        self,
        stop: threading.Event,
        connection: sqlite3.Connection,
        ops: list[StagedOp],
        record_key: str,
        record: Any,
        steps_before: int,
    ) -> None:
        """:meth:`commit_step`'s transaction (blocks)."""
        with _atomically(stop, connection, self._opened_file, self._waits):
            _apply(connection, self._staged.ops)
            check_steps(record_key, self._stored(connection, record_key, None), steps_before)
            for kind, key, argument in ops:
                self._apply_step_op(connection, kind, key, argument)
            connection.execute(_UPSERT, (record_key, self._codec.encode(record_key, record)))

    def _apply_step_op(
        self, connection: sqlite3.Connection, kind: str, key: str, argument: Any
    ) -> None:
        """Apply one op of a durable step inside the open transaction (blocks)."""
        if kind == "clear":
            connection.execute(_DELETE_USER_KEYS, (len(RESERVED_PREFIX), RESERVED_PREFIX))
        elif kind == "delete":
            if utf8_key(key) is not None:  # a key that is not valid Unicode is never stored
                connection.execute(_DELETE, (key,))
        else:
            check_json_key(key)
            value = argument
            if kind == "update":
                function, default = argument
                value = function(self._stored(connection, key, default))
            connection.execute(_UPSERT, (key, self._codec.encode(key, value)))

    def _stored(self, connection: sqlite3.Connection, key: str, missing: Any) -> Any:
        """The decoded value of ``key`` in the database, ``missing`` when absent (blocks)."""
        row = _fetch_one(connection, _SELECT, (key,))
        return missing if row is None else _decoded(self._codec, repr(self), key, row[0])

    async def aclose(self) -> None:
        """Drop staged writes and close the connection (blocks in a worker thread).

        The storage can be used again: the next call opens the database afresh.
        """
        self._staged.reset()
        self._waits = _LockWaits(self._timeout)
        connection, self._connection = self._connection, None
        self._file = None
        if connection is not None:
            await self._in_thread(_close, connection)

    async def _connected(self) -> sqlite3.Connection:
        """Return the connection, opening the database the first time; StorageError for
        a connection this process did not open (see :func:`_refuse_if_inherited`)."""
        if self._connection is None:
            connection, file = await self._in_thread(
                _connect, self._path, self._codec, self._timeout
            )
            self._connection, self._file = connection, file
            return connection
        _refuse_if_inherited(self, self._connection)
        return self._connection

    @property
    def _opened_file(self) -> _DatabaseFile:
        assert self._file is not None  # set with the connection
        return self._file

    async def _query(self, sql: str, *parameters: Any) -> Any:
        connection = await self._connected()
        return await self._in_thread(_read, connection, self._timeout, _fetch_one, sql, parameters)

    async def _query_all(self, sql: str, *parameters: Any) -> list[Any]:
        connection = await self._connected()
        return await self._in_thread(_read, connection, self._timeout, _fetch_all, sql, parameters)

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Return ``function(stop, *args)``, run in a worker thread as this instance's
        only call in flight; sqlite3 errors become StorageError naming the file (see
        :func:`_translated`).

        ``stop`` is a :class:`threading.Event`, set when the caller is cancelled. The
        caller waits for the call even then (shielded), so that no thread uses the
        connection once its caller has moved on: a wait for another connection's lock
        checks ``stop`` after each try of :data:`LOCK_WAIT_SLICE` and gives up (see
        :func:`_retrying`), and the caller raises ``Cancelled``. A call that runs to its
        end (a commit that holds the lock, a read) returns what it returned or raises
        what it raised, and the cancellation comes at the caller's next checkpoint, as
        with ``trio.to_thread.run_sync``'s default. A caller cancelled before the thread
        began never makes the call.
        """
        path, timeout = self._path, self._timeout
        call = _Call(lambda stop: _translated(path, timeout, function, stop, *args))
        try:
            return await trio.to_thread.run_sync(
                call.run, limiter=self._limiter, abandon_on_cancel=True
            )
        except trio.Cancelled:
            returned = await call.stopped()
            if returned is None or _gave_up(returned):
                raise
        return returned.unwrap()


def _translated(path: Path, timeout: float, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, the database at ``path`` opened with ``timeout``; sqlite3
    and OS errors become StorageError naming the file (and saying it is locked, when it
    is). Blocks; called in the thread that runs ``function``, so that what
    :func:`_described` checks after a failure is checked right after it."""
    try:
        return function(*args)
    except sqlite3.Error as exc:
        raise _failure(path, timeout, exc) from exc
    except OSError as exc:
        raise StorageError(f"{path}: {exc}") from exc


def _failure(path: Path, timeout: float, exc: sqlite3.Error) -> StorageError:
    """The StorageError for ``exc``, raised using the database at ``path`` opened with
    ``timeout``: it says the file is locked, when it is, else what failed
    (:func:`_described`). Blocks briefly (see :func:`_out_of_descriptors`)."""
    if _is_locked(exc):
        return StorageError(
            f"{path} is locked by another connection, in this process or "
            f"another; gave up waiting for it (timeout={timeout:g} s): {exc}"
        )
    return StorageError(f"{path}: {_described(exc)}")


@final
class _Call(Generic[T]):
    """A call for an instance's worker thread, made with a :class:`threading.Event`,
    :attr:`stop`, that its caller sets once it is cancelled (see
    :meth:`SQLiteStorage._in_thread`)."""

    __slots__ = ("_call", "_outcome", "_returned", "_started", "_token", "stop")

    def __init__(self, call: Callable[[threading.Event], T]) -> None:
        self._call = call
        self.stop = threading.Event()
        self._started = threading.Event()
        self._outcome: outcome.Outcome[T] | None = None
        """What the call returned or raised, once it has finished."""
        self._returned = trio.Event()
        """Set in trio's thread when the call finished with :attr:`stop` set."""
        self._token = trio.lowlevel.current_trio_token()

    def run(self) -> T:
        """Make the call (in the worker thread; blocks); raise :class:`_Stopped` without
        making it when :attr:`stop` is set already."""
        self._started.set()
        try:
            if self.stop.is_set():
                raise _Stopped
            value = self._call(self.stop)
        except BaseException as exc:
            self._outcome = outcome.Error(exc)
            raise
        else:
            self._outcome = outcome.Value(value)
            return value
        finally:
            if self.stop.is_set():  # its caller may wait for it: see stopped
                with suppress(trio.RunFinishedError):  # a caller that did not wait
                    self._token.run_sync_soon(self._returned.set)

    async def stopped(self) -> outcome.Outcome[T] | None:
        """Set :attr:`stop`, then wait (shielded) until the call has finished, if the
        thread began it; return what it returned or raised, None when the thread has not
        begun (then it never makes the call). :meth:`run` sets ``_outcome`` before it
        reads ``stop``, and this sets ``stop`` before it reads ``_outcome``: one of them
        sees the other's, so the wait ends."""
        self.stop.set()
        if not self._started.is_set():
            return None
        if self._outcome is None:
            with trio.CancelScope(shield=True):
                await self._returned.wait()
        return self._outcome


def _gave_up(returned: outcome.Outcome[Any]) -> bool:
    """Whether a call stopped waiting for a lock because its caller was cancelled."""
    return isinstance(returned, outcome.Error) and isinstance(returned.error, _Stopped)


class _Stopped(Exception):
    """Raised in a worker thread that gave up waiting for a lock because its caller was
    cancelled (see :func:`_retrying`); the caller raises ``Cancelled`` instead."""


def _retrying(
    stop: threading.Event,
    connection: sqlite3.Connection,
    deadline: float,
    action: Callable[..., T],
    *args: Any,
) -> T:
    """Return ``action(connection, *args)``, tried again while another connection holds
    a lock it needs, until ``deadline`` (``time.monotonic``): then the last try's error
    is raised. Raises :class:`_Stopped` once ``stop`` is set (blocks).

    SQLite waits for a lock in its busy handler, which nothing cuts short
    (``Connection.interrupt`` does not): so each try waits no longer than
    :data:`LOCK_WAIT_SLICE`, the connection's busy timeout (less when ``deadline`` is
    nearer), and the thread checks ``stop`` after each. A try refused sooner than its
    wait (SQLite calls no busy handler in some cases) is tried again after
    :data:`LOCK_RETRY_SECONDS`. ``action`` must leave nothing behind when it fails: a
    read, a ``BEGIN``, a pragma. The connection's busy timeout is the slice again after.
    """
    busy = LOCK_WAIT_SLICE
    try:
        while True:
            left = max(0.0, deadline - time.monotonic())
            if left < busy:  # the last try waits no longer than the deadline
                busy = left
                _set_busy_timeout(connection, busy)
            tried = time.monotonic()
            try:
                return action(connection, *args)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or (time.monotonic() >= deadline and not stop.is_set()):
                    raise
            refused_at_once = time.monotonic() - tried < busy
            if stop.wait(LOCK_RETRY_SECONDS if refused_at_once else 0.0):
                raise _Stopped
    finally:
        if busy != LOCK_WAIT_SLICE:
            _set_busy_timeout(connection, LOCK_WAIT_SLICE)


def _read(
    stop: threading.Event,
    connection: sqlite3.Connection,
    timeout: float,
    fetch: Callable[..., T],
    *args: Any,
) -> T:
    """Return ``fetch(connection, *args)``, a read, waiting for another connection's
    lock up to ``timeout`` seconds (see :func:`_retrying`; blocks)."""
    return _retrying(stop, connection, time.monotonic() + timeout, fetch, *args)


def _close(stop: threading.Event, connection: sqlite3.Connection) -> None:
    """Close the connection (blocks; waits for no lock)."""
    connection.close()


class _LockWaits:
    """How long the writes of one batch (up to :meth:`SQLiteStorage.commit`) may still
    wait for another connection's write lock: ``timeout`` seconds in all.

    Each ``BEGIN IMMEDIATE`` of the batch gets what the ones before it left, and
    :meth:`SQLiteStorage.commit` gives the next batch the whole timeout again. Used in
    the instance's worker thread, one call at a time.
    """

    __slots__ = ("_timeout", "_waited")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._waited = 0.0

    def begin(self, stop: threading.Event, connection: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, waiting for another writer no longer than the batch has
        left, in tries of :data:`LOCK_WAIT_SLICE` until ``stop`` is set (see
        :func:`_retrying`; blocks)."""
        start = time.monotonic()
        try:
            _retrying(stop, connection, start + self._timeout - self._waited, _begin_immediate)
        finally:
            self._waited += time.monotonic() - start

    def forget(self) -> None:
        """Start a new batch: nothing waited yet. Does not block."""
        self._waited = 0.0


def _begin_immediate(connection: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``: take the write lock (blocks up to the busy timeout)."""
    connection.execute("BEGIN IMMEDIATE")


def _milliseconds(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _set_busy_timeout(connection: sqlite3.Connection, seconds: float) -> None:
    """Make the connection's statements wait up to ``seconds`` for another connection's
    lock (blocks, briefly: it does no I/O)."""
    connection.execute(f"PRAGMA busy_timeout = {_milliseconds(seconds)}")


_EXPLAINED: Final = {
    "SQLITE_IOERR_SHMSIZE": "its -shm file could not grow: a full disk, or a file size limit",
}
"""What an SQLite error name means, for the names whose message says only ``disk I/O
error``."""


def _described(exc: sqlite3.Error) -> str:
    """``exc``'s message with SQLite's name for its error, which says what failed where
    the message does not: ``disk I/O error (SQLITE_IOERR_WRITE)`` is a refused write;
    with what it means for a name in :data:`_EXPLAINED`, and for SQLITE_CANTOPEN when
    the process is out of file descriptors (:func:`_out_of_descriptors`)."""
    name = getattr(exc, "sqlite_errorname", None)
    if not name:
        return str(exc)
    cant_open = name.startswith("SQLITE_CANTOPEN")
    meaning = _out_of_descriptors() if cant_open else _EXPLAINED.get(name)
    return f"{exc} ({name}: {meaning})" if meaning else f"{exc} ({name})"


def _out_of_descriptors() -> str | None:
    """What opening one more file says when the process cannot (EMFILE, ENFILE), tried
    by opening and closing the null device; None when it can, or fails otherwise. SQLite
    does not say why it could not open a file: this tells, right after its failure,
    whether the process was out of file descriptors. Blocks for that open."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return f"out of file descriptors: opening another file right after failed with {exc}"
    return None


def _is_locked(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says that another connection holds the lock that was needed."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLITE_BUSY (an extended code too): another connection holds
    a lock that was needed, and a later try may get it."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


def _text_key(where: str, key: object) -> str:
    """``key``, the key column of a row; StorageError naming ``where`` (the store) and
    the key unless it is text (another client wrote a BLOB there)."""
    if not isinstance(key, str):
        raise StorageError(
            f"{where}: a row's key is the {type(key).__name__} {key!r}, not text, and so no "
            "key of this store (another client wrote it)"
        )
    return key


def _as_bytes(where: str, key: str, value: object) -> bytes:
    """``value``, the value column of ``key``'s row; UnreadableValueError naming
    ``where`` (the store) and ``key`` unless it is bytes (another client wrote it)."""
    if not isinstance(value, bytes):
        reason = f"its stored value is {with_article(type(value).__name__)}, not bytes"
        raise unreadable(where, key, reason)
    return value


def _fetch_one(connection: sqlite3.Connection, sql: str, parameters: tuple[Any, ...]) -> Any:
    """Run one query and return its first row or None (blocks)."""
    return connection.execute(sql, parameters).fetchone()


def _fetch_keys(connection: sqlite3.Connection, keys: list[str]) -> list[Any]:
    """The ``(key, value)`` rows of those of ``keys`` that are stored, fetched
    :data:`READ_BATCH` keys a query; several queries share one read transaction, so that
    they see the store at one moment, as one query does (blocks)."""
    if len(keys) <= READ_BATCH or connection.in_transaction:
        return _fetch_batches(connection, keys)
    connection.execute("BEGIN")
    try:
        return _fetch_batches(connection, keys)
    finally:
        _roll_back(connection)  # it only read


def _fetch_batches(connection: sqlite3.Connection, keys: list[str]) -> list[Any]:
    """:func:`_fetch_keys`, a query per :data:`READ_BATCH` keys (blocks)."""
    rows: list[Any] = []
    for start in range(0, len(keys), READ_BATCH):
        batch = keys[start : start + READ_BATCH]
        marks = ", ".join("?" * len(batch))
        sql = f"SELECT key, value FROM {STORE_TABLE} WHERE key IN ({marks})"
        rows.extend(connection.execute(sql, batch).fetchall())
    return rows


def _fetch_all(
    connection: sqlite3.Connection, sql: str, parameters: tuple[Any, ...] = ()
) -> list[Any]:
    """Run one query and return every row (blocks)."""
    return connection.execute(sql, parameters).fetchall()


def _connect(
    stop: threading.Event, path: Path, codec: Codec, timeout: float
) -> tuple[sqlite3.Connection, _DatabaseFile]:
    """Open (or create) the database and check it is a store of ours (blocks), waiting
    for other connections' locks ``timeout`` seconds in all, until ``stop`` is set (see
    :func:`_retrying`); return the connection, whose busy timeout is
    :data:`LOCK_WAIT_SLICE`, and the file it opened. An sqlite3 error checking it is
    raised as StorageError (see :func:`_failure`), described before the connection
    closes."""
    deadline = time.monotonic() + timeout
    _refuse_unusable(path)
    _refuse_if_open_at_fork(path)
    _create_private(path)
    connection = sqlite3.connect(
        path,
        timeout=LOCK_WAIT_SLICE,
        isolation_level=None,
        check_same_thread=False,
        factory=_TrackedConnection,
    )
    try:
        _prepare(stop, connection, path, codec, deadline)
        opened = _DatabaseFile.at(path)
    except sqlite3.Error as exc:
        failure = _failure(path, timeout, exc)  # while the connection holds its files
        connection.close()
        raise failure from exc
    except BaseException:
        connection.close()
        raise
    return connection, opened


@dataclass(frozen=True, slots=True)
class _DatabaseFile:
    """The database file a connection opened: its path, device and inode.

    A connection keeps the file it opened, so once that file is removed or replaced its
    commits go where no later open finds them: every commit checks first.
    """

    path: Path
    device: int
    inode: int

    @classmethod
    def at(cls, path: Path) -> _DatabaseFile:
        """The file at ``path`` now (blocks)."""
        status = os.stat(path)
        return cls(path, status.st_dev, status.st_ino)

    def check(self) -> None:
        """Raise StorageError unless ``path`` still names this file (blocks, briefly)."""
        try:
            now = _DatabaseFile.at(self.path)
        except FileNotFoundError:
            now = None
        if now != self:
            raise StorageError(
                f"{self.path} was removed or replaced while this store had it open: a "
                "commit would go to a file that no later open finds, so nothing was "
                "committed (close the store; the next use opens the file at that path)"
            )


def _refuse_unusable(path: Path) -> None:
    """Raise the OSError naming ``path`` when it cannot be a database file, which SQLite
    reports only as a file it cannot open or read: a directory (or a link to one), a
    loop of symbolic links (blocks, briefly). A missing file is usable: it is created."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))


def _create_private(path: Path) -> None:
    """Create an empty file with mode 0600 unless ``path`` exists (blocks)."""
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _prepare(
    stop: threading.Event,
    connection: sqlite3.Connection,
    path: Path,
    codec: Codec,
    deadline: float,
) -> None:
    """Check the schema without writing; then switch to WAL and create what is missing.
    Each step waits for other connections' locks until ``deadline`` (``time.monotonic``)
    or until ``stop`` is set (see :func:`_retrying`)."""
    tables = _retrying(stop, connection, deadline, _tables)
    if tables:
        _retrying(stop, connection, deadline, _check_store, path, codec, tables)
    _check_writable(path)
    mode = _retrying(stop, connection, deadline, _switch_to_wal)
    if mode != "wal":
        raise StorageError(f"{path}: cannot switch to WAL mode (journal mode is {mode!r})")
    connection.execute("PRAGMA synchronous = FULL")
    if not tables:
        _create_schema(stop, connection, path, codec, deadline)


def _check_writable(path: Path) -> None:
    """Raise StorageError naming what this process may not write of the database: the
    file, its ``-wal`` or ``-shm`` file, or their folder (where SQLite makes those).
    SQLite would open it read-only without a word, and only the first write would fail.
    Asks the system, as for the process's effective user and capabilities; takes no
    lock (blocks only for the ``access`` calls)."""
    real = path.resolve()  # SQLite writes the file a link points to, and beside it
    parts = [real, *(real.with_name(real.name + end) for end in ("-wal", "-shm"))]
    present = [part for part in parts if part.exists()]
    read_only = [str(part) for part in [*present, real.parent] if not _writable(part)]
    if read_only:
        raise StorageError(
            f"{path}: the database is read-only for this process: it may not write "
            f"{', '.join(read_only)}"
        )


def _writable(path: Path) -> bool:
    """Whether this process may write ``path``, as the system says for its effective
    user and capabilities (blocks only for the ``access`` call)."""
    return os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids)


def _switch_to_wal(connection: sqlite3.Connection) -> str:
    """Switch the database to WAL mode; return the journal mode it is in (blocks).

    Two connections switching a new database at once make one of them fail at once with
    SQLITE_BUSY (SQLite calls no busy handler there): :func:`_retrying` tries it again
    after :data:`LOCK_RETRY_SECONDS`.
    """
    mode: str = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    return mode


def _tables(connection: sqlite3.Connection) -> dict[str, str | None]:
    rows = connection.execute(
        "SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
    ).fetchall()
    return {name: sql for name, sql in rows}


def _check_store(
    connection: sqlite3.Connection, path: Path, codec: Codec, tables: dict[str, str | None]
) -> None:
    """Raise StorageError unless ``tables`` and the metadata are exactly ours."""
    if tables != SCHEMA:
        foreign = sorted(name for name in tables if tables[name] != SCHEMA.get(name))
        missing = sorted(set(SCHEMA) - set(tables))
        raise StorageError(
            f"{path} is not a cosmoflow store: it holds tables or indexes this backend did "
            f"not create ({', '.join(foreign) or 'none'}) or lacks its own "
            f"({', '.join(missing) or 'none'})"
        )
    _check_meta(connection, path, codec)


def _check_meta(connection: sqlite3.Connection, path: Path, codec: Codec) -> None:
    meta = dict(connection.execute(f"SELECT name, value FROM {META_TABLE}").fetchall())
    check_database_meta(str(path), meta, codec)


def _create_schema(
    stop: threading.Event,
    connection: sqlite3.Connection,
    path: Path,
    codec: Codec,
    deadline: float,
) -> None:
    """Create the tables, unless another process created them since they were checked;
    ``BEGIN IMMEDIATE`` waits for another writer until ``deadline`` or ``stop`` (see
    :func:`_retrying`)."""
    _retrying(stop, connection, deadline, _begin_immediate)
    try:
        tables = _tables(connection)
        if tables:
            _check_store(connection, path, codec, tables)
        else:
            for sql in SCHEMA.values():
                connection.execute(sql)
            connection.executemany(
                f"INSERT INTO {META_TABLE} (name, value) VALUES (?, ?)",
                list(database_meta(codec).items()),
            )
        connection.execute("COMMIT")
    except BaseException:
        _roll_back(connection)
        raise


def _write(
    stop: threading.Event,
    connection: sqlite3.Connection,
    file: _DatabaseFile,
    ops: list[Op[bytes]],
    waits: _LockWaits,
) -> None:
    """Apply ``ops`` in the open transaction (or a new one) and commit it, if ``file`` is
    still at its path (blocks); roll it all back on failure."""
    with _transaction(stop, connection, file, waits):
        _apply(connection, ops)


def _begin(stop: threading.Event, connection: sqlite3.Connection, waits: _LockWaits) -> None:
    """``BEGIN IMMEDIATE`` unless a transaction is open (blocks while another process
    writes, up to what the batch has left of the timeout or until ``stop`` is set)."""
    if not connection.in_transaction:
        waits.begin(stop, connection)


@contextmanager
def _atomically(
    stop: threading.Event, connection: sqlite3.Connection, file: _DatabaseFile, waits: _LockWaits
) -> Iterator[None]:
    """A transaction of its own (``BEGIN IMMEDIATE`` ... ``COMMIT``, see
    :func:`_transaction`), or a savepoint of the open one; rolled back on failure
    (blocks)."""
    if not connection.in_transaction:
        with _transaction(stop, connection, file, waits):
            yield
        return
    connection.execute("SAVEPOINT step")
    try:
        yield
        connection.execute("RELEASE step")
    except BaseException:
        connection.execute("ROLLBACK TO step")
        connection.execute("RELEASE step")
        raise


@contextmanager
def _transaction(
    stop: threading.Event, connection: sqlite3.Connection, file: _DatabaseFile, waits: _LockWaits
) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (unless an update opened the transaction; it waits for
    another writer until the batch's time is up or ``stop`` is set), then ``COMMIT`` if
    ``file`` is still at its path, or a rollback on failure (blocks)."""
    _begin(stop, connection, waits)
    try:
        yield
        file.check()
        connection.execute("COMMIT")
    except BaseException:
        _roll_back(connection)
        raise


def _apply(connection: sqlite3.Connection, ops: list[Op[bytes]]) -> None:
    """Apply staged ``ops`` inside the open transaction, in order (blocks).

    Consecutive sets go in multi-row statements: ``sqlite3`` releases the GIL for every
    statement it runs, and a worker thread must win the GIL back each time from the
    event loop. One statement per set made 10,000 concurrent sets 20 % slower.
    """
    parameters: list[str | bytes] = []
    for op in ops:
        if isinstance(op, SetOp):
            parameters += (op.key, op.value)
            continue
        _upsert_all(connection, parameters)
        parameters.clear()
        if isinstance(op, DeleteOp):
            connection.execute(_DELETE, (op.key,))
        else:
            connection.execute(f"DELETE FROM {STORE_TABLE}")
    _upsert_all(connection, parameters)


def _upsert_all(connection: sqlite3.Connection, parameters: list[str | bytes]) -> None:
    """Upsert the rows ``parameters`` holds (key, value, key, value, ...), in statements
    of up to :data:`UPSERT_ROWS` rows (blocks)."""
    chunk = 2 * UPSERT_ROWS
    for start in range(0, len(parameters), chunk):
        rows = parameters[start : start + chunk]
        connection.execute(_upsert(len(rows) // 2), rows)


def _roll_back(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        connection.execute("ROLLBACK")


def peek(
    path: str | os.PathLike[str], *, codec: CodecName = "json"
) -> dict[str, outcome.Outcome[Any]]:
    """Every key of the database at ``path`` (the engine's reserved keys too), each with
    its decoded value or the error decoding it raised (blocks).

    Opens the database read-only (see :func:`_read_only_uri`): it creates no table and
    changes no row. A process that may write the database takes SQLite's locks, as any
    reader does, so that a writer in another process neither changes the file under
    the read nor has it see part of a commit. For that SQLite creates a closed
    database's ``-wal`` (empty) and ``-shm`` files, which the next writer to close it
    removes, and the ``-shm`` index gets this reader's marks. A database without tables
    (an empty file) holds no key.
    Raises :class:`~cosmoflow_actors.StorageError` naming the file when it cannot be
    read (a directory among others), is not an SQLite database, holds tables this
    backend did not create, holds a key that is not text or was written with another
    codec.
    """
    absolute = Path(path).absolute()
    reader = get_codec(codec)
    try:
        _refuse_unusable(absolute)
    except OSError as exc:
        raise StorageError(f"{absolute}: {exc}") from exc
    try:
        connection = sqlite3.connect(_read_only_uri(absolute), uri=True)
        try:
            rows = _read_rows(connection, absolute, reader)
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise StorageError(f"{absolute}: {_described(exc)}") from exc
    where = str(absolute)
    return {
        _text_key(where, key): outcome.capture(_decoded, reader, where, key, value)
        for key, value in rows
    }


def _read_only_uri(path: Path) -> str:
    """The URI that opens ``path`` read-only (blocks only to check its files).

    ``mode=ro``, which takes SQLite's locks, when this process may write the database
    and its folder: SQLite creates the ``-wal`` and ``-shm`` files a database in WAL
    mode needs for that when they are missing, as a writer would, with the database's
    mode (and owner, for root). A process that may not write the database would create
    them as its own, and the database's owner could no longer write them (nor can it
    create them in a folder it may not write): it gets ``mode=ro`` only while the
    ``-wal`` file exists (a writer's commits may be in it), else ``immutable=1`` (every
    commit is in the database file then), which creates nothing but takes no lock: a
    writer that opens the database meanwhile can make that read fail or see part of a
    commit.
    """
    real = path.resolve()  # SQLite makes those files beside the file a link points to
    wal = real.with_name(f"{real.name}-wal")
    locked = (_writable(real) and _writable(real.parent)) or wal.exists()
    return f"{path.as_uri()}?{'mode=ro' if locked else 'immutable=1'}"


def _read_rows(connection: sqlite3.Connection, path: Path, codec: Codec) -> list[Any]:
    """Every (key, value) row in insertion order, once the schema is checked (blocks)."""
    tables = _tables(connection)
    if not tables:
        return []
    _check_store(connection, path, codec, tables)
    return _fetch_all(connection, f"SELECT key, value FROM {STORE_TABLE} ORDER BY rowid")


def _decoded(codec: Codec, where: str, key: str, value: object) -> Any:
    """The value of ``key``'s row decoded; StorageError naming ``where`` (the store) and
    ``key`` when it cannot be."""
    return codec.read(where, key, _as_bytes(where, key, value))
