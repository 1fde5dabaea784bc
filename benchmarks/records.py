"""records: what a store's run records cost as they pile up, per backend.

    python -m benchmarks.records            # N = 1,000 and 10,000 (a few minutes)
    python -m benchmarks.records --smoke    # N = 50 and 200, a few seconds, for CI

For each backend (``file``: FileStorage, ``sqlite``: SQLiteStorage, ``redis``:
RedisStorage on a redis-server that this script starts on a free loopback port with no
persistence, skipped with a note when ``redis-server`` is not on PATH) and each N, a
fresh store is filled with N ended durable runs of a 5-node chain, run at once on one
engine; each run also writes one key of its own, so the store holds N user keys beside
the records. Then, with the store held open (``engine.open_store``, so that no
measurement opens or closes it), three costs are measured:

- ``list_runs``: seconds per record of one ``engine.list_runs`` (median of some rounds);
- ``new run``: seconds of one more durable run of the chain (median of some runs);
- ``forget_run``: seconds of one ``engine.forget_run`` of an ended run (median over
  forgets of distinct runs).

Each table gives the cost at each N and the ratio of the larger N's to the smaller N's:
1.0 is a cost that does not grow with the store, and a cost proportional to the store's
size gives the ratio of the sizes (10 in the full run). What was stored is checked: every
run listed as succeeded, each forget finding its record, a fast wrong benchmark being
worthless. Writes JSON (``benchmarks/results/records.json``, ``records-smoke.json`` with
``--smoke``). Never timed in tests: ``tests/test_records_benchmark.py`` runs ``--smoke``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import trio

import cosmoflow_actors as cf
from benchmarks.redis_server import throwaway_redis

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {True: (50, 200), False: (1_000, 10_000)}
"""The two store sizes (ended runs), by ``--smoke``."""
REPEATS = {True: {"list": 3, "run": 5, "forget": 20}, False: {"list": 5, "run": 20, "forget": 100}}
"""How many times each cost is measured at each size (its median counts), by ``--smoke``."""
METRICS = {"list": "list_runs, per record", "run": "new run (5 nodes)", "forget": "forget_run"}


@cf.node
async def hop(ctx: cf.ExecutionContext) -> None:
    key = f"item-{ctx.run_id}"
    await ctx.store.set(key, await ctx.store.get(key, 0) + 1)


def chain() -> cf.Flow:
    """Five nodes in a row, each adding one to the run's own key."""
    builder = cf.Flow.builder("chain")
    for index in range(5):
        builder.add_node(f"n{index}", hop)
        if index:
            builder.add_route(f"n{index - 1}", f"n{index}")
    return builder.build()


@dataclasses.dataclass
class Result:
    backend: str
    runs: int
    """Ended runs in the store when the measurements began."""
    fill_seconds: float
    seconds: dict[str, list[float]]
    """Every measurement of each metric (list: per record)."""
    median: dict[str, float] = dataclasses.field(default_factory=dict)


async def timed(work: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = await work()
    return time.perf_counter() - started, value


async def fill(engine: cf.Engine, flow: cf.Flow, storage: cf.Storage, runs: int) -> None:
    """Start ``runs`` durable runs of ``flow`` at once and wait for each to succeed."""
    started = [await engine.start_run(flow, storage, run_id=f"run-{i:06d}") for i in range(runs)]
    for run in started:
        await run.wait()


async def measure(storage: cf.Storage, backend: str, runs: int, repeats: dict[str, int]) -> Result:
    """Fill ``storage`` with ``runs`` ended runs and measure each metric on it."""
    flow = chain()
    result = Result(backend, runs, 0.0, {metric: [] for metric in METRICS})
    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        result.fill_seconds, _ = await timed(partial(fill, engine, flow, storage, runs))
        last = f"item-run-{runs - 1:06d}"
        if (value := await store.get(last, None)) != len(flow.nodes):
            raise RuntimeError(f"{storage!r} holds {value!r} under {last}, not 5")
        for _ in range(repeats["list"]):
            seconds, records = await timed(partial(engine.list_runs, storage))
            check_listed(records, runs, storage)
            result.seconds["list"].append(seconds / len(records))
        for index in range(repeats["run"]):
            run_id = f"extra-{index}"
            start = partial(engine.run, flow, storage, run_id=run_id)
            result.seconds["run"].append((await timed(start))[0])
        spacing = runs // repeats["forget"]
        for run_id in (f"run-{i * spacing:06d}" for i in range(repeats["forget"])):
            seconds, found = await timed(partial(engine.forget_run, storage, run_id))
            if not found:
                raise RuntimeError(f"{storage!r} did not hold the record of {run_id}")
            result.seconds["forget"].append(seconds)
    result.median = {metric: statistics.median(values) for metric, values in result.seconds.items()}
    return result


def check_listed(records: list[cf.RunRecord], runs: int, storage: cf.Storage) -> None:
    """Fail loudly unless ``records`` are at least the ``runs`` runs, all succeeded."""
    if len(records) < runs or any(record.state != "succeeded" for record in records):
        raise RuntimeError(f"{storage!r} lists {len(records)} records, not {runs} succeeded")


async def run_backend(
    backend: str, make: Callable[[Path, int], cf.Storage], smoke: bool
) -> list[Result]:
    results = []
    for runs in SIZES[smoke]:
        with tempfile.TemporaryDirectory(prefix="cosmoflow-bench-") as name:
            storage = make(Path(name), runs)
            results.append(await measure(storage, backend, runs, REPEATS[smoke]))
    return results


def backends(stack: ExitStack) -> tuple[dict[str, Callable[[Path, int], cf.Storage]], list[str]]:
    """The backends to measure, and notes on those skipped. A redis-server started here
    stops when ``stack`` closes."""
    made: dict[str, Callable[[Path, int], cf.Storage]] = {
        "file": lambda directory, _: cf.FileStorage(directory / "store.json"),
        "sqlite": lambda directory, _: cf.SQLiteStorage(directory / "store.db"),
    }
    if shutil.which("redis-server") is None:
        return made, ["redis: skipped, redis-server is not on PATH"]
    url = stack.enter_context(throwaway_redis())
    made["redis"] = lambda _, runs: cf.RedisStorage(url, namespace=f"records-{runs}")
    return made, []


def render(results: list[Result], notes: list[str]) -> str:
    small, large = sorted({row.runs for row in results})
    median = {(row.backend, row.runs): row.median for row in results}
    lines = [f"records: a store of N ended durable runs (5-node chain) and N user keys; "
             f"median seconds; ratio = N={large:,} / N={small:,} (1.0: flat)"]  # fmt: skip
    for metric, title in METRICS.items():
        lines += ["", f"{title:<26}{f'N={small:,}':>14}{f'N={large:,}':>14}{'ratio':>8}"]
        for backend, ratio in ratios(results).items():
            lines.append(
                f"  {backend:<24}{seconds(median[backend, small][metric]):>14}"
                f"{seconds(median[backend, large][metric]):>14}{ratio[metric]:>8.2f}"
            )
    fills = ", ".join(f"{r.backend} {r.runs:,} in {r.fill_seconds:.1f} s" for r in results)
    return "\n".join([*lines, "", f"filled: {fills}", *notes])


def seconds(value: float) -> str:
    return f"{value * 1e3:.3f} ms" if value >= 1e-3 else f"{value * 1e6:.1f} µs"


def ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    """Each backend's median at the larger size over the one at the smaller, by metric."""
    by_backend: dict[str, dict[str, float]] = {}
    for backend in dict.fromkeys(row.backend for row in results):
        small, large = sorted((r for r in results if r.backend == backend), key=lambda r: r.runs)
        by_backend[backend] = {m: large.median[m] / small.median[m] for m in METRICS}
    return by_backend


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="N = 50 and 200: seconds, for CI")
    parser.add_argument("--json", type=Path, help="where to write the results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    results: list[Result] = []
    with ExitStack() as stack:
        made, notes = backends(stack)
        for backend, make in made.items():
            results += trio.run(run_backend, backend, make, args.smoke)
    print(render(results, notes))
    output = args.json or RESULTS / ("records-smoke.json" if args.smoke else "records.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "records",
        "smoke": args.smoke,
        "sizes": list(SIZES[args.smoke]),
        "repeats": REPEATS[args.smoke],
        "python": platform.python_version(),
        "system": platform.system(),
        "skipped": notes,
        "ratios": ratios(results),
        "results": [dataclasses.asdict(row) for row in results],
    }
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
