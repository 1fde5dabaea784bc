"""contention: writes/s of many RedisStorage writers in several processes on one namespace.

Starts a redis-server of its own on a free loopback port, then, for each number of
writers, 2 processes, each with that many writers (a ``RedisStorage`` each, on one
namespace, as the worker processes of a run queue have one per store), all writing at
once. Four kinds of write, one row each:

- ``step``: a durable step's commit (``commit_step``) of one set, each writer on a run
  of its own, as steps of different runs in different workers are;
- ``update``: ``update`` of a key of the writer's own;
- ``shared update``: ``update`` of one key every writer updates (fewer writes: each
  one may start again when another writer changed the key);
- ``hset``: redis-py's ``HSET`` of a key of the writer's own on the namespace's hash,
  with no check, script or thread: the floor, which the other rows are divided by.

Each row reports the writes per second from the first writer's start to the last
writer's end (the processes share the clock), how many writes failed and the first
failure's message. Every writer checks its own keys at the end (an update's count, a
step's record), so a write reported done and not stored fails the benchmark.

Run it: ``python -m benchmarks.contention`` (``--smoke`` for tiny sizes). Needs
redis-server on PATH; without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.synchronize import Event
from typing import Any

import redis
import trio

from benchmarks.redis_server import no_redis_server, throwaway_redis
from cosmoflow_actors import RedisStorage
from cosmoflow_actors.storage.base import RECORD_PREFIX

PROCESSES = 2
"""Processes writing at once, each with its writers in one trio run."""

WRITERS = {True: (1, 4), False: (1, 4, 20)}
"""Writers per process, one row group each, by ``--smoke``."""

WRITES = {"step": 8000, "update": 8000, "shared update": 2000, "hset": 8000}
"""Writes of each kind in a row, shared among its writers (divided by 40 for
``--smoke``)."""

TIMEOUT = 10.0
"""Every storage's ``timeout``: the default."""

READY_TIMEOUT = 60.0
"""Seconds the writing processes have to start and connect."""


@dataclass(frozen=True, slots=True)
class Row:
    """One row's writes: the server, their kind, the namespace, the writers in each
    process and the writes of each writer."""

    url: str
    kind: str
    namespace: str
    per_process: int
    each: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one process's writers did: when they began and ended (``time.monotonic``,
    shared by the processes), how many writes succeeded and failed, and the first
    failure's message."""

    start: float
    end: float
    done: int
    failed: int
    first_failure: str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.contention", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args(argv)
    if no_redis_server():
        return 0
    scale = 40 if args.smoke else 1
    with throwaway_redis() as url:
        print(f"contention: {PROCESSES} processes writing on one namespace, one redis-server")
        print("writers  kind            writes/s  / hset  failed  first failure")
        for per_process in WRITERS[args.smoke]:
            rows = {
                kind: _row(url, kind, per_process, total // scale) for kind, total in WRITES.items()
            }
            _print_rows(per_process * PROCESSES, rows)
    return 0


def _print_rows(writers: int, rows: dict[str, tuple[float, list[Outcome]]]) -> None:
    """One line per kind of write: its rate, its ratio to ``hset``'s and its failures."""
    floor = rows["hset"][0]
    for kind, (rate, outcomes) in rows.items():
        failed = sum(outcome.failed for outcome in outcomes)
        first = next((outcome.first_failure for outcome in outcomes if outcome.first_failure), "")
        ratio = rate / floor
        print(f"{writers:7d}  {kind:14s}  {rate:8,.0f}  {ratio:6.2f}  {failed:6d}  {first:.100s}")


def _row(url: str, kind: str, per_process: int, writes: int) -> tuple[float, list[Outcome]]:
    """Writes/s of ``kind`` by ``per_process`` writers in each of the processes, and
    what each process reported."""
    each = max(1, writes // (PROCESSES * per_process))
    row = Row(url, kind, f"{kind}-{time.time_ns()}", per_process, each)
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    with context.Manager() as manager:
        outcomes = manager.list()
        ready = manager.Semaphore(0)
        processes = [
            context.Process(target=_process, args=(row, index, go, ready, outcomes))
            for index in range(PROCESSES)
        ]
        try:
            for process in processes:
                process.start()
            for _ in processes:
                if not ready.acquire(timeout=READY_TIMEOUT):
                    raise RuntimeError(f"{kind}: a writing process was not ready in time")
            go.set()
            for process in processes:
                process.join()
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
        reported = list(outcomes)
    if len(reported) != PROCESSES:
        raise RuntimeError(f"{kind}: {PROCESSES - len(reported)} processes reported nothing")
    seconds = max(o.end for o in reported) - min(o.start for o in reported)
    return sum(o.done for o in reported) / seconds, reported


def _process(row: Row, index: int, go: Event, ready: Any, outcomes: Any) -> None:
    """Process ``index`` of ``row``: its writers connect, release ``ready``, wait for
    ``go``, make their writes and check them; the outcome goes to ``outcomes`` (a
    manager's list; ``ready`` is a manager's semaphore)."""
    names = [f"p{index}w{number}" for number in range(row.per_process)]
    writers = [Writer(row.url, row.namespace, name) for name in names]
    outcomes.append(trio.run(_written, writers, row, go, ready))


async def _written(writers: list[Writer], row: Row, go: Event, ready: Any) -> Outcome:
    """What ``writers`` did once ``go`` was set (see :func:`_process`)."""
    for writer in writers:
        await writer.open()
    ready.release()
    await trio.to_thread.run_sync(go.wait)
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for writer in writers:
            nursery.start_soon(writer.write, row.kind, row.each)
    end = time.monotonic()
    for writer in writers:
        await writer.check(row.kind)
        await writer.storage.aclose()
    failures = [writer.first_failure for writer in writers if writer.first_failure]
    done = sum(writer.done for writer in writers)
    failed = sum(writer.failed for writer in writers)
    return Outcome(start, end, done, failed, failures[0] if failures else "")


class Writer:
    """One writer: a RedisStorage of its own (and a redis-py client for ``hset``), its
    run's record and its own key, and its counts."""

    def __init__(self, url: str, namespace: str, name: str) -> None:
        self.storage = RedisStorage(url, namespace=namespace, timeout=TIMEOUT)
        self.client = redis.Redis.from_url(url)
        self.hash = f"cosmoflow:{namespace}:data"
        self.key = name
        self.record_key = RECORD_PREFIX + name
        self.done = 0
        self.failed = 0
        self.first_failure = ""

    async def open(self) -> None:
        """Connect, and store the record of this writer's run (no step done). Blocks in
        a worker thread."""
        await self.storage.set(self.record_key, {"steps": 0, "path": []})
        await self.storage.commit()

    async def write(self, kind: str, count: int) -> None:
        """Make ``count`` writes of ``kind``, counting those done and failed; a failed
        step ends them (the run's record no longer says how many steps are done)."""
        write = self._writes()[kind]
        for _ in range(count):
            try:
                await write()
            except Exception as exc:  # counted and shown: the benchmark reports failures
                self.failed += 1
                self.first_failure = self.first_failure or f"{type(exc).__name__}: {exc}"
                if kind == "step":
                    return
            else:
                self.done += 1

    async def check(self, kind: str) -> None:
        """Raise RuntimeError when what is stored is not what the writes done left (a
        write that failed by running out of time may still have been applied)."""
        if kind == "step":
            stored = (await self.storage.get(self.record_key))["steps"]
        elif kind == "update":
            stored = await self.storage.get(self.key)
        else:
            return
        if not self.done <= stored <= self.done + self.failed:
            raise RuntimeError(f"{self.key}: {self.done} {kind}s done, the store holds {stored}")

    def _writes(self) -> dict[str, Callable[[], Awaitable[object]]]:
        return {
            "step": self._step,
            "update": partial(self.storage.update, self.key, _plus_one, 0),
            "shared update": partial(self.storage.update, "shared", _plus_one, 0),
            "hset": partial(trio.to_thread.run_sync, self.client.hset, self.hash, self.key, b"1"),
        }

    async def _step(self) -> None:
        steps = self.done
        record = {"steps": steps + 1, "path": ["write"] * (steps + 1)}
        ops = [("set", self.key, steps)]
        await self.storage.commit_step(ops, self.record_key, record, steps)


def _plus_one(value: int) -> int:
    return value + 1


if __name__ == "__main__":
    raise SystemExit(main())
