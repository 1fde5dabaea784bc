"""What the storage tests share: the backends under test, a real redis-server, disk limits.

Every backend is described by a :class:`Backend`: ``open()`` returns a new storage
instance over the same data each time (so a second call shows what the first one
committed), and the flags say what the backend promises beyond the common contract.
"""

from __future__ import annotations

import array
import dataclasses
import fcntl
import json
import os
import resource
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.storage.file import FileStorage
from cosmoflow_actors.storage.redis import RedisStorage
from cosmoflow_actors.storage.sqlite import SQLiteStorage
from tests.support import received_until

READY_TIMEOUT = 30.0
"""Seconds redis-server may take to report that it accepts connections."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend under test, over data of its own."""

    name: str
    open: Callable[..., cf.Storage]
    """``open(codec=...)``: a new instance over this backend's data."""
    ordered: bool = True
    """``keys()`` keeps insertion order."""
    exclusive: bool = False
    """One instance at a time may be open over the data (FileStorage's lock)."""
    made: list[cf.Storage] = dataclasses.field(default_factory=list)
    """The instances :meth:`instance` made so far, of an exclusive backend."""

    async def instance(self, **options: Any) -> cf.Storage:
        """Return :attr:`open` ``(**options)``; for an exclusive backend, first close the
        instances this method made before, as one process closes a store before another
        one opens it."""
        if self.exclusive:
            for storage in self.made:
                await storage.aclose()
            self.made.clear()
        storage = self.open(**options)
        if self.exclusive:
            self.made.append(storage)
        return storage


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


BACKENDS = ["memory", "file", "sqlite", "redis", "custom"]
ENCODING = ["file", "sqlite", "redis", "custom"]
"""Values are stored encoded: copies come back, unencodable values are refused."""
PERSISTENT = ["file", "sqlite", "redis"]
"""A new instance sees what an earlier one committed; ``codec=`` is accepted."""


def make_backend(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    """Return the backend called ``name`` over fresh data of this test's own."""
    if name == "memory":
        memory: dict[str, Any] = {}
        return Backend(name, lambda: cf.MemoryStorage(memory))
    if name == "custom":
        text: dict[str, str] = {}
        return Backend(name, lambda: JsonDictStorage(text))
    if name == "file":
        path = tmp_path / "store.json"
        return Backend(name, lambda **options: FileStorage(path, **options), exclusive=True)
    if name == "sqlite":
        return Backend(name, lambda **options: SQLiteStorage(tmp_path / "store.db", **options))
    server: RedisServer = request.getfixturevalue("redis_server")
    namespace = unique_namespace()
    return Backend(name, lambda **options: server.storage(namespace, **options), ordered=False)


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
