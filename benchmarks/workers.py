"""workers: runs/s of worker processes sharing one Redis run queue, and lease takeover.

Starts a redis-server of its own on a free loopback port, then 1, 2 and 3 worker
processes (``cosmoflow worker``) on a 5-node flow whose exec awaits a checkpoint. For
each count it submits N runs with ``cf.submit``, waits for each one's result with
``cf.result`` (one read of one run per poll, so that waiting takes little of the
machine) and reports runs/s from the first submit to the last success, and the CPU
time the worker processes spent meanwhile per run (user and system, read from
``/proc``; "n/a" where there is none): on a shared machine the CPU time says more than
the rate about what a change saves. Then, with two workers and a short lease, runs
whose first step takes 0.2 s (params reach the first step only), it SIGKILLs one
worker while it holds runs and reports how long after the kill the other worker had
taken every one of them over.

Run it: ``python -m benchmarks.workers`` (``--smoke`` for tiny sizes). Needs
redis-server on PATH; without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import trio

import cosmoflow_actors as cf
from benchmarks.redis_server import no_redis_server, throwaway_redis

FLOW_FILE = """
import trio
import cosmoflow_actors as cf


@cf.node
async def hop(ctx):
    hops = await ctx.store.get("hops", 0)
    await trio.sleep(ctx.params.get("delay", 0))
    await ctx.store.set("hops", hops + 1)


builder = cf.Flow.builder("chain")
for index in range(5):
    builder.add_node(f"n{index}", hop)
    if index:
        builder.add_route(f"n{index - 1}", f"n{index}")
chain = builder.build()
"""
"""The flow the workers serve: five nodes, each reading, checkpointing and writing."""

SIZES = {True: 20, False: 600}
"""Runs submitted per worker count, by ``--smoke``."""

POLL = 0.02
"""Seconds between two reads of a run's state (or the queue's status) while waiting."""

LEASE = 1.0
"""Seconds: the takeover measurement's lease (the throughput runs use the default)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args(argv)
    if no_redis_server():
        return 0
    runs = SIZES[args.smoke]
    with ExitStack() as stack:
        url = stack.enter_context(throwaway_redis())
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        flow_file = folder / "chain.py"
        flow_file.write_text(FLOW_FILE)
        print(f"workers: {runs} runs of a 5-node chain per row, one redis-server on loopback")
        print("workers  runs/s  worker CPU ms/run")
        for count in (1, 2, 3):
            rate, cpu = trio.run(_throughput, url, flow_file, count, runs, f"q{count}")
            per_run = "n/a" if cpu is None else f"{cpu / runs * 1000:.2f}"
            print(f"{count:7d}  {rate:6,.0f}  {per_run:>17}")
        takeover = trio.run(_takeover, url, flow_file)
        print(f"takeover: {takeover:.2f} s from the kill until the other worker held every run")
        print(f"          the killed worker held (lease {LEASE:g} s)")
    return 0


async def _throughput(
    url: str, flow_file: Path, count: int, runs: int, queue: str
) -> tuple[float, float | None]:
    """Runs/s of ``count`` workers on ``runs`` submitted runs, and the CPU seconds the
    workers spent on them (None where ``/proc`` cannot tell)."""
    with _workers(url, flow_file, count, queue, lease=None) as processes:
        run_queue = cf.RunQueue(url, queue)
        await cf.submit(run_queue, "chain", run_id="warm-up")
        await cf.result(run_queue, "warm-up")
        cpu_before = _cpu_seconds(processes)
        start = time.perf_counter()
        ids = [await cf.submit(run_queue, "chain") for _ in range(runs)]
        for run_id in ids:
            await cf.result(run_queue, run_id, poll=POLL)
        rate = runs / (time.perf_counter() - start)
        cpu_after = _cpu_seconds(processes)
    if cpu_before is None or cpu_after is None:
        return rate, None
    return rate, cpu_after - cpu_before


def _cpu_seconds(processes: list[subprocess.Popen[bytes]]) -> float | None:
    """The CPU seconds (user and system) ``processes`` have used so far, read from
    ``/proc``; None where it does not exist."""
    ticks = 0
    for process in processes:
        try:
            stat = Path(f"/proc/{process.pid}/stat").read_text()
        except OSError:
            return None
        # The fields after the command name (which may hold spaces) end with ")".
        fields = stat.rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime and stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def _takeover(url: str, flow_file: Path) -> float:
    """Seconds from SIGKILLing one of two workers until the other holds every run the
    killed one held."""
    run_queue = cf.RunQueue(url, "takeover", lease=LEASE)
    with _workers(url, flow_file, 2, "takeover", lease=LEASE) as processes:
        victim = _worker_name("takeover", 0)
        ids = [await cf.submit(run_queue, "chain", params={"delay": 0.2}) for _ in range(4)]
        held = await _runs_held_by(run_queue, victim)
        processes[0].send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        await _taken_over(run_queue, held, victim)
        taken_over = time.perf_counter() - killed
        for run_id in ids:
            await cf.result(run_queue, run_id, poll=POLL)
        return taken_over


async def _taken_over(run_queue: cf.RunQueue, held: list[str], victim: str) -> None:
    """Return once no run of ``held`` is still owned by the worker ``victim``."""
    wanted = set(held)
    while True:
        status = await cf.queue_status(run_queue)
        if not any(run.run_id in wanted and run.owner == victim for run in status):
            return
        await trio.sleep(POLL)


async def _runs_held_by(run_queue: cf.RunQueue, name: str) -> list[str]:
    """The runs the worker ``name`` holds (is running), once it holds some."""
    while True:
        status = await cf.queue_status(run_queue)
        held = [run.run_id for run in status if run.owner == name and run.state == "running"]
        if held:
            return held
        await trio.sleep(POLL)


@contextmanager
def _workers(
    url: str, flow_file: Path, count: int, queue: str, *, lease: float | None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` worker processes serving ``queue``, ready when entered; killed after."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(count):
            command = [
                sys.executable, "-m", "cosmoflow_actors", "worker", str(flow_file),
                "--queue", f"{url}/{queue}", "--store", f"{url}#{queue}", "--concurrency", "64",
                "--name", _worker_name(queue, index),
            ]  # fmt: skip
            if lease is not None:
                command += ["--lease", str(lease)]
            processes.append(subprocess.Popen(command, stdout=subprocess.PIPE))
        for process in processes:
            assert process.stdout is not None
            process.stdout.readline()  # the worker's "ready" line
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _worker_name(queue: str, index: int) -> str:
    return f"bench-{queue}-{index}"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
