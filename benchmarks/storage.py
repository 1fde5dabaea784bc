"""storage: 10,000 durable sets through the engine, per backend, against a rewrite baseline.

    python benchmarks/storage.py            # the full run, three rounds (about six minutes)
    python benchmarks/storage.py --smoke    # a few seconds, for CI

Two scenarios, each run through ``cf.open_engine`` so the store actor's batching applies:

- ``concurrent``: N runs at once, each setting one key.
- ``sequential``: one run setting N keys one after the other (every set is its own commit).

Backends: ``rewrite`` is the baseline, a Storage that rewrites the whole JSON file
atomically (temporary file, fsync, rename, directory fsync) on every set, as a file store
without a journal must. ``file`` is FileStorage (snapshot plus journal), ``sqlite`` is
SQLiteStorage (WAL, synchronous=FULL), ``memory`` is MemoryStorage (no disk: the engine's
own cost). Every persistent backend syncs each commit to disk. Each result is checked by
reading the store back. ``fsync floor`` is N one-line writes, each followed by fdatasync,
with no engine at all, done two ways: appended to a file, and written over space that was
written and synced beforehand (fdatasync then has no file size to sync). The faster of the
two is the least a durable sequential writer can take on this disk.

Every measurement is repeated ``--rounds`` times (3; 1 with ``--smoke``), the rounds
interleaved so that a slow spell of the machine hits every backend alike: the concurrent
scenario varies by tens of percent from one run to the next (docs/storage.md says why).
Prints a table with each backend's median, range and median speedup over the baseline,
and writes JSON with every round's seconds (``benchmarks/results/storage.json``, or
``storage-smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.storage import SQLiteStorage

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 50.0
"""The speedup over the baseline the file backend should reach in both scenarios."""


class RewriteFileStorage(cf.Storage):
    """The baseline: every set rewrites the whole pretty JSON file, atomically and synced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, msgspec.Raw] = {}

    async def open(self) -> None:
        if self.path.exists():
            self.data = msgspec.json.decode(self.path.read_bytes(), type=dict[str, msgspec.Raw])

    async def get(self, key: str) -> Any:
        return msgspec.json.decode(self.data[key])

    async def set(self, key: str, value: Any) -> None:
        self.data[key] = msgspec.Raw(msgspec.json.encode(value))
        content = msgspec.json.format(msgspec.json.encode(self.data), indent=2)
        await trio.to_thread.run_sync(rewrite, self.path, content)

    async def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    async def keys(self) -> list[str]:
        return list(self.data)


def rewrite(path: Path, content: bytes) -> None:
    """Replace ``path`` atomically and durably (blocks)."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def record(index: int) -> dict[str, Any]:
    """The value stored under each key: a small JSON record."""
    return {"index": index, "name": f"item {index}", "tags": ["a", "b"], "score": index * 0.5}


def key(index: int) -> str:
    return f"key-{index:05d}"


BACKENDS: dict[str, Callable[[Path], cf.Storage]] = {
    "rewrite": lambda directory: RewriteFileStorage(directory / "store.json"),
    "file": lambda directory: cf.FileStorage(directory / "store.json"),
    "sqlite": lambda directory: SQLiteStorage(directory / "store.db"),
    "memory": lambda directory: cf.MemoryStorage(),
}


@cf.node
async def set_one(ctx: cf.ExecutionContext) -> None:
    index: int = ctx.params["index"]
    await ctx.store.set(key(index), record(index))


async def concurrent(storage: cf.Storage, sets: int) -> None:
    """``sets`` runs at once, each setting one key."""
    flow = cf.Flow.builder("set-one").add_node("set", set_one).build()
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow, storage, params={"index": i}) for i in range(sets)]
        for run in runs:
            await run.wait()


async def sequential(storage: cf.Storage, sets: int) -> None:
    """One run setting ``sets`` keys in sequence."""

    @cf.node
    async def set_all(ctx: cf.ExecutionContext) -> None:
        for index in range(sets):
            await ctx.store.set(key(index), record(index))

    flow = cf.Flow.builder("set-all").add_node("set", set_all).build()
    async with cf.open_engine() as engine:
        await engine.run(flow, storage)


SCENARIOS: dict[str, Callable[[cf.Storage, int], Awaitable[None]]] = {
    "concurrent": concurrent,
    "sequential": sequential,
}


@dataclasses.dataclass
class Result:
    scenario: str
    backend: str
    rounds: list[float]
    """Seconds of each round."""
    seconds: float = 0.0
    """The median round."""
    sets_per_second: float = 0.0
    speedup: float = 0.0
    """Baseline median / this median, in the same scenario."""


async def measure(scenario: str, backend: str, sets: int) -> float:
    """Run one scenario on a fresh store in a fresh directory, check what it stored, and
    return the seconds it took."""
    with tempfile.TemporaryDirectory(prefix="cosmoflow-bench-") as name:
        directory = Path(name)
        storage = BACKENDS[backend](directory)
        await trio.to_thread.run_sync(os.sync)  # start without an earlier run's writeback
        started = time.perf_counter()
        await SCENARIOS[scenario](storage, sets)
        seconds = time.perf_counter() - started
        await check(storage if backend == "memory" else BACKENDS[backend](directory), sets)
        await storage.aclose()
    return seconds


async def check(storage: cf.Storage, sets: int) -> None:
    """Fail loudly unless ``storage`` (a fresh instance: what is on disk) holds every key
    with its value: a fast wrong benchmark is worthless."""
    await storage.open()
    keys = await storage.keys()
    if len(keys) != sets:
        raise RuntimeError(f"{storage!r} holds {len(keys)} keys, not {sets}")
    for index in (0, sets // 2, sets - 1):
        if await storage.get(key(index)) != record(index):
            raise RuntimeError(f"{storage!r} holds a wrong value for {key(index)}")


def fsync_floor(sets: int) -> dict[str, float]:
    """Seconds for ``sets`` one-line writes, each followed by fdatasync, appended and
    written over preallocated space (blocks)."""
    line = msgspec.json.encode([["set", key(0), record(0)]]) + b"\n"
    with tempfile.TemporaryDirectory(prefix="cosmoflow-bench-") as name:
        return {
            "append": synced_writes(Path(name) / "append", line, sets, preallocate=False),
            "overwrite": synced_writes(Path(name) / "overwrite", line, sets, preallocate=True),
        }


def synced_writes(path: Path, line: bytes, count: int, *, preallocate: bool) -> float:
    """Seconds for ``count`` writes of ``line`` one after another, each followed by
    fdatasync; with ``preallocate``, over zeros written and synced first (blocks)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if preallocate:
            os.write(fd, bytes(len(line) * count))
            os.fsync(fd)
        started = time.perf_counter()
        for offset in range(0, len(line) * count, len(line)):
            os.pwrite(fd, line, offset)
            os.fdatasync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)


async def run_all(sets: int, rounds: int) -> list[Result]:
    results = []
    for scenario in SCENARIOS:
        rows = [Result(scenario, backend, []) for backend in BACKENDS]
        for _ in range(rounds):
            for row in rows:
                row.rounds.append(await measure(scenario, row.backend, sets))
        for row in rows:
            row.seconds = statistics.median(row.rounds)
            row.sets_per_second = sets / row.seconds
            row.speedup = rows[0].seconds / row.seconds
        results += rows
    return results


def sequential_baseline(results: list[Result]) -> Result:
    return next(r for r in results if r.scenario == "sequential" and r.backend == "rewrite")


def render(sets: int, results: list[Result], floor: dict[str, float]) -> str:
    rounds = len(results[0].rounds)
    lines = [
        f"storage: {sets:,} sets of a {len(msgspec.json.encode(record(sets)))}-byte JSON record;"
        f" every persistent commit is synced to disk; median of {rounds} round(s)",
        f"{'scenario':<12}{'backend':<10}{'seconds':>10}{'range':>18}{'sets/s':>12}"
        f"{'vs rewrite':>12}",
    ]
    for row in results:
        spread = f"{min(row.rounds):.3f}-{max(row.rounds):.3f}"
        lines.append(
            f"{row.scenario:<12}{row.backend:<10}{row.seconds:>10.3f}{spread:>18}"
            f"{row.sets_per_second:>12,.0f}{row.speedup:>11.1f}x"
        )
    ceiling = sequential_baseline(results).seconds / min(floor.values())
    lines.append(
        f"fsync floor: {sets:,} x (append + fdatasync) = {floor['append']:.3f} s, "
        f"{sets:,} x (overwrite preallocated + fdatasync) = {floor['overwrite']:.3f} s here, "
        f"so a durable sequential writer is at most {ceiling:.1f}x faster than rewrite"
    )
    for row in results:
        if row.backend == "file":
            verdict = "met" if row.speedup >= TARGET else "NOT met"
            lines.append(f"target >= {TARGET:.0f}x, file, {row.scenario}: {verdict}")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="200 sets: seconds, for CI")
    parser.add_argument("--sets", type=int, help="sets per measurement (default 10,000)")
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default 3, smoke 1)")
    parser.add_argument("--json", type=Path, help="where to write the results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    sets = args.sets or (200 if args.smoke else 10_000)
    rounds = args.rounds or (1 if args.smoke else 3)
    results = trio.run(run_all, sets, rounds)
    floor = fsync_floor(sets)
    print(render(sets, results, floor))
    output = args.json or RESULTS / ("storage-smoke.json" if args.smoke else "storage.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "storage",
        "smoke": args.smoke,
        "sets": sets,
        "rounds": rounds,
        "python": platform.python_version(),
        "system": platform.system(),
        "fsync_floor_seconds": floor,
        "fsync_floor_speedup": sequential_baseline(results).seconds / min(floor.values()),
        "target_speedup": TARGET,
        "results": [dataclasses.asdict(row) for row in results],
    }
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
