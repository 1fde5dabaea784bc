"""What the storage tests share: the backends under test, a real redis-server, disk limits.

Every backend is described by a :class:`Backend`: ``open()`` returns a new storage
instance over the same data each time (so a second call shows what the first one
committed), and the flags say what the backend promises beyond the common contract.

A backend of your own joins the suite through the environment variable
:data:`EXTERNAL_VARIABLE` (see :func:`external_backends` and
docs/howto-custom-storage.md).
"""

from __future__ import annotations

import array
import dataclasses
import fcntl
import importlib
import json
import os
import re
import resource
import shutil
import socket
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest
import redis
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.storage.file import FileStorage
from cosmoflow_actors.storage.redis import RedisStorage
from cosmoflow_actors.storage.sqlite import SQLiteStorage
from tests.support import received_until, single

T = TypeVar("T")

READY_TIMEOUT = 30.0
"""Seconds redis-server may take to report that it accepts connections."""


def refuses_nothing(key: str, value: Any) -> bool:
    """A backend that keeps every value as it is (memory)."""
    return False


def refuses_unless_json_text(key: str, value: Any) -> bool:
    """A backend that stores ``json.dumps(value, allow_nan=False)``: it refuses what that
    cannot write (an object JSON has no type for, NaN, an infinity). A lone surrogate
    in a string is written escaped, so it is kept."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return True
    return False


def refuses_unless_utf8_json(key: str, value: Any) -> bool:
    """A backend that stores keys and values as JSON in UTF-8 (the built-in persistent
    ones): it also refuses a key or a string that is not valid Unicode (a lone
    surrogate), which UTF-8 cannot hold."""
    try:
        json.dumps([key, value], allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return True
    return False


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend under test, over data of its own."""

    name: str
    open: Callable[..., cf.Storage]
    """``open(codec=...)``: a new instance over this backend's data."""
    ordered: bool = True
    """``keys()`` keeps insertion order, as a ``dict`` does: a key set again keeps its
    place, one deleted and set again goes to the end."""
    exclusive: bool = False
    """One instance at a time may be open over the data (FileStorage's lock)."""
    encoding: bool = True
    """Values are stored encoded: ``get`` returns a fresh copy, and a value the backend
    cannot encode (see :attr:`refuses`) is refused with StorageError, storing nothing."""
    refuses: Callable[[str, Any], bool] = refuses_unless_json_text
    """``refuses(key, value)``: whether the backend refuses to store ``value`` under
    ``key``."""
    names_key: bool = True
    """A refused write raises StoreValueError naming its key (else any StorageError)."""
    staged: bool = True
    """Writes wait for a commit: an instance closed (or dropped) without one loses them.
    False: a write lands at once (memory, the custom backend)."""
    update_commits: bool = False
    """Its own ``update`` commits the writes staged before it with its own (Redis)."""
    write_raw: Callable[[str, bytes], None] | None = None
    """``write_raw(key, data)``: store ``data`` as the encoded value of ``key`` behind the
    backend's back, committed, as another client of its database would (a backend that
    no other client writes has none)."""
    made: list[cf.Storage] = dataclasses.field(default_factory=list)
    """The instances :meth:`instance` made and :meth:`aclose` has not closed yet."""

    @property
    def persistent(self) -> bool:
        """What its storage class says (``Storage.persistent``): a new instance sees what
        an earlier one committed, writes wait for a commit, and runs given a ``run_id``
        on it are durable."""
        return type(self.open()).persistent

    async def instance(self, **options: Any) -> cf.Storage:
        """Return :attr:`open` ``(**options)``, opened (``Storage.open``), as the store
        actor opens a storage before its first call; for an exclusive backend, first
        close the instances this method made before, as one process closes a store
        before another one opens it."""
        if self.exclusive:
            await self.aclose()
        storage = self.open(**options)
        self.made.append(storage)
        await storage.open()
        return storage

    async def aclose(self) -> None:
        """Close the instances :meth:`instance` made (the ``backend`` fixture does at the
        end of a test), so that none is left for the garbage collector to close."""
        made = self.made.copy()
        self.made.clear()
        for storage in made:
            await storage.aclose()


class JsonDictStorage(cf.Storage):
    """A custom backend as a user would write one: JSON text in a dict, four methods."""

    def __init__(self, data: dict[str, str]) -> None:
        self.data = data

    async def get(self, key: str) -> Any:
        return json.loads(self.data[key])

    async def set(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"keys must be str, not {type(key).__name__}")
        try:
            self.data[key] = json.dumps(value, allow_nan=False, default=_as_dict)
        except (TypeError, ValueError) as exc:
            raise cf.StorageError(f"cannot store {key!r}: {exc}") from exc

    async def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    async def keys(self) -> list[str]:
        return list(self.data)


def _as_dict(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@dataclasses.dataclass
class RedisServer:
    """A redis-server started for the tests on a free loopback port."""

    process: subprocess.Popen[bytes]
    port: int
    log: list[str]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def storage(self, namespace: str | None = None, **options: Any) -> RedisStorage:
        return RedisStorage(self.url, namespace=namespace or unique_namespace(), **options)


def unique_namespace() -> str:
    return f"test-{uuid.uuid4().hex}"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """Start redis-server (no persistence) and stop it at exit.

    Skips the test when the binary is missing. Waits for the server's own
    "Ready to accept connections" line (read by a thread; bounded by READY_TIMEOUT),
    then checks it answers PING.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    command += ["no", "--dir", str(directory), "--loglevel", "notice"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = RedisServer(process, port, [])
    ready = threading.Event()
    reader = threading.Thread(target=_read_log, args=(server, ready), daemon=True)
    reader.start()
    try:
        if not ready.wait(READY_TIMEOUT) or process.poll() is not None:
            raise RuntimeError(f"redis-server did not start: {''.join(server.log)}")
        with server.client() as client:
            assert client.ping()
        yield server
    finally:
        process.terminate()
        process.wait(timeout=READY_TIMEOUT)
        reader.join(timeout=READY_TIMEOUT)  # it ends at the end of the output
        assert process.stdout is not None
        process.stdout.close()


def _read_log(server: RedisServer, ready: threading.Event) -> None:
    """Collect the server's output; set ``ready`` once it accepts connections or exits."""
    assert server.process.stdout is not None
    for line in server.process.stdout:
        server.log.append(line.decode(errors="replace"))
        if b"Ready to accept connections" in line:
            ready.set()
    ready.set()


@asynccontextmanager
async def holder(command: list[str], ready: bytes) -> AsyncIterator[trio.Process]:
    """Run ``command``, a real process that takes hold of something (a lock, a store)
    and then prints ``ready`` and a newline; yield it once it has. At exit its stdin is
    closed, which tells it to let go and exit, and it is waited for."""
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        output = await received_until(process.stdout, b"\n", f"{command[:3]}")
        assert output == ready + b"\n"
        yield process
    finally:
        await process.stdin.aclose()
        await process.wait()


EXTERNAL_VARIABLE: Final = "COSMOFLOW_TEST_STORAGE"
"""The environment variable that names backends of your own for the suite to test:
``module:function``, several separated by commas. ``function(directory)`` returns a
:class:`Backend` whose data lives in ``directory`` (a new one for each test); its tests
are named after the function. The module is imported when its first test runs."""


def external_backends(names: str) -> dict[str, str]:
    """The entries of ``names`` (the value of :data:`EXTERNAL_VARIABLE`), by the name of
    their function. Raises ValueError naming an entry not of the form
    ``module:function``, or whose function has the name of another backend. Does not
    import anything."""
    found: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in names.split(","))):
        module_name, _, function_name = entry.partition(":")
        if not module_name or not function_name.isidentifier():
            raise ValueError(
                f"{EXTERNAL_VARIABLE}: {entry!r} is not of the form module:function "
                "(for example mypackage.test_backends:json_directory)"
            )
        if function_name in BUILT_IN or function_name in found:
            raise ValueError(
                f"{EXTERNAL_VARIABLE}: {entry!r}: the name {function_name!r} is taken by "
                "another backend of the suite; rename the function"
            )
        found[function_name] = entry
    return found


def external_backend(entry: str) -> Callable[[Path], Backend]:
    """The function the entry ``module:function`` names. Imports the module; raises
    ValueError naming the entry when it cannot be imported or has no such function."""
    module_name, _, function_name = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"{EXTERNAL_VARIABLE}: {entry!r}: cannot import module {module_name!r} ({exc}); "
            "is its directory on PYTHONPATH?"
        ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(
            f"{EXTERNAL_VARIABLE}: {entry!r}: module {module_name!r} has no function "
            f"{function_name!r}"
        )
    backend: Callable[[Path], Backend] = function
    return backend


BUILT_IN = ["memory", "file", "sqlite", "redis", "custom"]
"""The suite's own backends: the four the library ships, and JsonDictStorage."""
EXTERNAL = external_backends(os.environ.get(EXTERNAL_VARIABLE, ""))
"""The backends :data:`EXTERNAL_VARIABLE` names: ``module:function`` by function name."""
BACKENDS = [*BUILT_IN, *EXTERNAL]
ORDERED = ["memory", "file", "sqlite", "custom"]
"""The built-in backends whose ``keys()`` keep insertion order (:attr:`Backend.ordered`)."""
ENCODING = ["file", "sqlite", "redis", "custom"]
"""The built-in backends that store values encoded: copies come back, unencodable
values are refused (:attr:`Backend.encoding`)."""
PERSISTENT = ["file", "sqlite", "redis"]
"""The built-in backends whose data outlives the instance (:attr:`Backend.persistent`)."""
CODECS = PERSISTENT
"""The built-in backends that take ``codec="json"`` or ``"pickle"`` and record it."""
WRITTEN_RAW = ["sqlite", "redis"]
"""The built-in backends other clients may write to (:attr:`Backend.write_raw`)."""


def make_backend(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    """Return the backend called ``name`` over fresh data of this test's own."""
    if name in EXTERNAL:
        return external_backend(EXTERNAL[name])(tmp_path)
    if name == "memory":
        memory: dict[str, Any] = {}
        return Backend(
            name,
            lambda: cf.MemoryStorage(memory),
            encoding=False,
            refuses=refuses_nothing,
            staged=False,
        )
    if name == "custom":
        text: dict[str, str] = {}
        return Backend(name, lambda: JsonDictStorage(text), names_key=False, staged=False)
    if name == "file":
        path = tmp_path / "store.json"
        return Backend(
            name,
            lambda **options: FileStorage(path, **options),
            exclusive=True,
            refuses=refuses_unless_utf8_json,
        )
    if name == "sqlite":
        database = tmp_path / "store.db"
        return Backend(
            name,
            lambda **options: SQLiteStorage(database, **options),
            refuses=refuses_unless_utf8_json,
            write_raw=lambda key, data: _write_row(database, key, data),
        )
    server: RedisServer = request.getfixturevalue("redis_server")
    namespace = unique_namespace()
    return Backend(
        name,
        lambda **options: server.storage(namespace, **options),
        ordered=False,
        refuses=refuses_unless_utf8_json,
        update_commits=True,
        write_raw=lambda key, data: _write_field(server, namespace, key, data),
    )


def _write_row(database: Path, key: str, data: bytes) -> None:
    """Store ``data`` as the value of ``key`` in an SQLiteStorage's ``database``, with
    a connection of its own."""
    with closing(sqlite3.connect(database, isolation_level=None)) as connection:
        connection.execute("INSERT OR REPLACE INTO cosmoflow_store VALUES (?, ?)", (key, data))


def _write_field(server: RedisServer, namespace: str, key: str, data: bytes) -> None:
    """Store ``data`` as the value of ``key`` in a RedisStorage's ``namespace``, with a
    client of its own."""
    with server.client() as client:
        client.hset(f"cosmoflow:{namespace}:data", key, data)


@contextmanager
def file_size_limit(limit: int = 64 * 1024) -> Iterator[None]:
    """Make writing past ``limit`` bytes of any file fail with EFBIG (a full disk), even
    for root. Python ignores SIGXFSZ, so the write just fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make ``paths`` unwritable: immutable (chattr +i) for root, who ignores modes; mode
    0o500 for others. See :func:`skip_unless_read_only_works`."""
    undo: list[Callable[[], None]] = []
    try:
        for path in paths:
            undo.append(_make_read_only(path))
        yield
    finally:
        for restore in undo:
            restore()


def _make_read_only(path: Path) -> Callable[[], None]:
    if os.geteuid() == 0:
        _set_immutable(path, True)
        return lambda: _set_immutable(path, False)
    mode = path.stat().st_mode
    path.chmod(0o500)
    return lambda: path.chmod(mode)


_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x10


def _set_immutable(path: Path, immutable: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        flags[0] = flags[0] | _FS_IMMUTABLE_FL if immutable else flags[0] & ~_FS_IMMUTABLE_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
    finally:
        os.close(fd)


def skip_unless_read_only_works(directory: Path) -> None:
    """Skip (call it from a sync fixture) when :func:`read_only` cannot work here: root on
    a file system without the immutable attribute, or without CAP_LINUX_IMMUTABLE."""
    if os.geteuid() != 0:
        return
    try:
        with read_only(directory):
            pass
    except OSError as exc:
        pytest.skip(f"root cannot make files read-only here (chattr +i): {exc}")


async def foreign_key_fails_only_what_meets_it(
    storage: cf.Storage, named: str, *, records_by_prefix: bool = False
) -> None:
    """``storage`` (holding ``a`` = 1) also holds a key another client wrote that is no
    text: a step listing the keys fails with the StorageError matching ``named``, and so
    does ``list_runs`` unless the store lists its run records by prefix without meeting
    other keys (``records_by_prefix``: then it lists no run), while a run on another
    store, writes and reads of other keys go on."""
    async with cf.open_engine() as engine:
        other = await engine.start_run(single(cf.node(lambda ctx: None)), {})
        with pytest.raises(cf.NodeError) as info:
            await engine.run(single(cf.node(lambda ctx: ctx.store.keys())), storage)
        assert re.search(named, str(info.value.__cause__))
        if records_by_prefix:
            assert await engine.list_runs(storage) == []
        else:
            with pytest.raises(cf.StorageError, match=named):
                await engine.list_runs(storage)
        await engine.run(single(cf.node(lambda ctx: ctx.store.set("b", 2))), storage)
        assert await storage.get("a") == 1
        assert (await other.wait()).success


def thread_calls(
    storage: SQLiteStorage | RedisStorage, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """The names of the functions ``storage`` runs in its worker thread from now on, one
    per call, in order: its ``_in_thread`` wrapped (until the test ends) to note them."""
    calls: list[str] = []
    in_thread = storage._in_thread

    async def noting(function: Callable[..., T], *args: Any) -> T:
        calls.append(function.__name__)
        return await in_thread(function, *args)

    monkeypatch.setattr(storage, "_in_thread", noting)
    return calls
