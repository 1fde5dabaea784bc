"""Shared by the tests of the run queue (tests/test_queue_*.py): a flow whose steps
count themselves in the run's store, in-process workers, real redis-servers that keep
their data, and watchers of what a server is sent and what the workers log."""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.queue.client import RunQueue
from cosmoflow_actors.runtime.queue.worker import per_run_redis
from tests.storage_suite import RedisServer
from tests.support import received_until

FAILURES: dict[str, int] = {}
"""Times ``Count`` still fails in step ``b`` of a run (by run id); tests set it."""


GATES: dict[str, tuple[trio.Event, trio.Event]] = {}
"""Step ``a`` of a run in here sets the first event and waits for the second (once)."""


SLOW: dict[str, float] = {}
"""Seconds each step of a run in here takes."""


STUCK: dict[str, trio.Event] = {}
"""Step ``b`` of a run in here sets the event and waits until it is cancelled (once)."""


class Count(cf.Node):
    """Counts its own step in the run's store: a per-run counter and a key per step."""

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        await trio.sleep(SLOW.get(ctx.run_id, 0))
        if ctx.node_id == "a" and ctx.run_id in GATES:
            entered, release = GATES.pop(ctx.run_id)
            entered.set()
            await release.wait()
        if ctx.node_id == "b" and ctx.run_id in STUCK:
            STUCK.pop(ctx.run_id).set()
            await trio.sleep_forever()
        if ctx.node_id == "b" and FAILURES.get(ctx.run_id, 0) > 0:
            FAILURES[ctx.run_id] -= 1
            raise RuntimeError("b is down")

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action | None:
        await store.update("count", lambda n: n + 1, default=0)
        await store.update(f"step:{ctx.node_id}", lambda n: n + 1, default=0)
        if ctx.node_id == "c":
            return cf.Action.complete(f"done {ctx.run_id}")
        return None


FLOW = (
    cf.Flow.builder("count")
    .add_node("a", Count())
    .add_node("b", Count())
    .add_node("c", Count())
    .add_route("a", "b")
    .add_route("b", "c")
    .build()
)


OTHER = cf.Flow.builder("other").add_node("a", Count()).build()
"""A flow of another name: a worker that has only this one lacks ``count``."""


def new_queue(server: RedisServer, lease: float = 1.0) -> RunQueue:
    return RunQueue(server.url, f"q-{uuid.uuid4().hex[:8]}", lease=lease)


def store_url(server: RedisServer) -> str:
    return f"{server.url}#runs-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def worker(
    queue: RunQueue,
    store: str | Callable[[str], cf.Storage],
    name: str,
    concurrency: int = 4,
    flows: tuple[cf.Flow, ...] = (FLOW,),
) -> AsyncIterator[cf.Engine]:
    """An engine serving ``queue`` with ``flows`` in this process until the block ends."""
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        serve = functools.partial(engine.serve, concurrency=concurrency, name=name)
        await nursery.start(serve, queue, flows, store)
        yield engine
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def held_in_step_a(
    queue: RunQueue, store: str, run_id: str, name: str = "w1"
) -> AsyncIterator[trio.Event]:
    """A worker ``name`` serving ``queue`` until the block ends, with ``run_id`` submitted
    and held in its step a; yields the event that lets the run go on."""
    entered, release = trio.Event(), trio.Event()
    GATES[run_id] = (entered, release)
    async with worker(queue, store, name):
        await cf.submit(queue, "count", run_id=run_id)
        await entered.wait()
        yield release


async def interrupted_in_b(store: str, run_id: str) -> None:
    """Run ``run_id`` of FLOW durably on its store of ``store`` (see per_run_redis)
    until it is in step b, its step a committed, then stop it there, as a worker that
    dies in step b leaves it: its record says it is running, at node a."""
    entered = trio.Event()
    STUCK[run_id] = entered
    storage = per_run_redis(store)(run_id)
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(engine.run, FLOW, storage, run_id=run_id))
        await entered.wait()
        nursery.cancel_scope.cancel()


async def counts(store: str, run_id: str) -> dict[str, Any]:
    storage = per_run_redis(store)(run_id)
    await storage.open()
    try:
        keys = [key for key in await storage.keys() if not key.startswith("__cosmoflow__/")]
        return {key: await storage.get(key) for key in keys}
    finally:
        await storage.aclose()


class Monitor:
    """The commands a server was sent (MONITOR), as it prints them, those that Lua
    scripts ran left out."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self._grown = trio.Event()

    def add(self, lines: list[str]) -> None:
        self.commands.extend(lines)
        self._grown.set()
        self._grown = trio.Event()

    async def until(self, enough: Callable[[list[str]], bool]) -> list[str]:
        """The commands so far, once ``enough`` of them says so."""
        while not enough(self.commands):
            await self._grown.wait()
        return list(self.commands)


@asynccontextmanager
async def monitored(server: RedisServer) -> AsyncIterator[Monitor]:
    """A Monitor of what ``server`` is sent while the block runs."""
    monitor = Monitor()
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b"MONITOR\r\n")
    pending = await received_until(stream, b"+OK\r\n", "MONITOR")

    async def read() -> None:
        nonlocal pending
        while True:
            *lines, pending = pending.split(b"\r\n")
            monitor.add([line.decode() for line in lines if b" lua] " not in line])
            chunk = await stream.receive_some()
            assert chunk, "MONITOR ended"
            pending += chunk

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(read)
        yield monitor
        nursery.cancel_scope.cancel()


async def persistent_redis(directory: Path, port: int) -> trio.Process:
    """A redis-server on ``port`` that keeps its data in ``directory`` (an append-only
    file, synced at every write), once it accepts connections."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory)]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    await received_until(process.stdout, b"Ready to accept connections", "redis-server")
    return process


async def killed(process: trio.Process) -> None:
    """SIGKILL ``process`` (unless it has exited) and wait for it."""
    if process.returncode is None:
        process.kill()
    await process.wait()
    assert process.stdout is not None
    await process.stdout.aclose()


class Warnings(logging.Handler):
    """The messages logged to ``cosmoflow_actors.queue``; :meth:`wait_for` blocks until
    one contains a text."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self._logged = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._logged.set()
        self._logged = trio.Event()

    async def wait_for(self, text: str) -> None:
        while not any(text in message for message in self.messages):
            await self._logged.wait()


DEEP = "[" * 100_000 + "]" * 100_000
"""JSON nested far deeper than Python's recursion limit."""


def pending_entry(**fields: str) -> str:
    """A pending run's entry of flow ``count``, as JSON text, with ``fields`` (each one
    JSON text) added or replacing the usual ones."""
    usual = {"flow": '"count"', "state": '"pending"', "params": "{}"}
    return "{" + ", ".join(f'"{key}": {value}' for key, value in {**usual, **fields}.items()) + "}"


BAD_ENTRIES: dict[str, tuple[bytes | str, bytes | str, str]] = {
    "not JSON": ("evil", "{", "the entry of run 'evil' is not JSON: Expecting property name"),
    "flow not a str": (
        "evil",
        pending_entry(flow='["count"]'),
        "the entry of run 'evil' was not written by a queue: its 'flow' is ['count'], "
        "not a non-empty str",
    ),
    "attempts not an int": (
        "evil",
        pending_entry(attempts='"x"'),
        "its 'attempts' is 'x', not an int >= 0",
    ),
    "attempts infinite": ("evil", pending_entry(attempts="1e400"), "its 'attempts' is inf"),
    "nested too deep": (
        "evil",
        pending_entry(params='{"a": ' + DEEP + "}"),
        "the entry of run 'evil' is JSON nested too deep",
    ),
    "params not an object": (
        "evil",
        pending_entry(params="[1, 2]"),
        "its 'params' is [1, 2], not an object of finite JSON values",
    ),
    "NaN param": (
        "evil",
        pending_entry(params='{"a": NaN}'),
        "its 'params' is {'a': nan}, not an object of finite JSON values",
    ),
    "unknown state": (
        "evil",
        pending_entry(state='"weird"'),
        "its 'state' is 'weird', not one of pending, running, succeeded, failed",
    ),
    "a key twice": (
        "evil",
        '{"flow": "count", "state": "pending", "params": {}, "flow": "other"}',
        "the entry of run 'evil' is not JSON: the key 'flow' is there twice",
    ),
    "entry not UTF-8": (
        "evil",
        b'{"flow": "count", "state": "pending", "params": {"a": "\xff"}}',
        "the entry of run 'evil' is not UTF-8: 'utf-8' codec can't decode byte 0xff",
    ),
    "succeeded without a result": (
        "evil",
        pending_entry(state='"succeeded"'),
        "its 'result' is None, not {value, final_action, path, duration}",
    ),
    "run id not UTF-8": (b"\xff\xfe", pending_entry(), "the run id b'\\xff\\xfe' of the "),
}
"""Entries no queue writes, by kind: the run id, what the queue's hash holds for it,
and what the error about it says (after the queue's repr)."""


def shown_id(run_id: bytes | str) -> str:
    """How the status shows the run id ``run_id`` (bytes not UTF-8 as escapes)."""
    return run_id.decode(errors="backslashreplace") if isinstance(run_id, bytes) else run_id


async def put_entry(queue: RunQueue, run_id: bytes | str, data: bytes | str) -> None:
    """Write ``data`` as the entry of ``run_id`` in ``queue``'s hash and add the run to
    its stream, as ``submit`` would, but unchecked."""
    await queue.ensure_group()
    await queue.call("HSET", queue.runs, run_id, data)
    await queue.call("XADD", queue.stream, "*", "run_id", run_id)
