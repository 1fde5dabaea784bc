"""Runs across processes: a run queue on Redis, two worker processes, four invoices.

This script starts a redis-server of its own on a free loopback port, then two worker
processes (this file again, with ``--worker``), each an engine serving the queue
``invoices`` with ``engine.serve``. It submits four runs of the ``invoice`` flow with
``cf.submit``, waits for each result with ``cf.result`` and prints them. Each run is
durable in a Redis namespace of its own (``invoices/<run_id>``): a worker that died
in the middle would leave it to the other, which would resume it after its last
committed step once the lease (2 s here) expired.

The same with the command line: ``cosmoflow worker examples/workers.py --queue
redis://127.0.0.1:6379/invoices --store redis://127.0.0.1:6379#invoices`` in two
terminals, and ``cosmoflow submit examples/workers.py --queue ... --param
'items=[[2, 10.0]]'``.

Run it: python examples/workers.py. It needs the redis extra (pip install
'cosmoflow-actors[redis]') and redis-server on PATH: without redis-server the script
says so and exits.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import trio

import cosmoflow_actors as cf

QUEUE = "invoices"
LEASE = 2.0
ORDERS = {
    "invoice-1": [[2, 10.0], [1, 5.5]],
    "invoice-2": [[10, 1.25]],
    "invoice-3": [[1, 99.0], [3, 2.0]],
    "invoice-4": [[4, 4.0]],
}


@cf.node
async def price(ctx: cf.ExecutionContext) -> None:
    items: list[list[float]] = ctx.params["items"]
    await ctx.store.set("subtotal", sum(quantity * unit for quantity, unit in items))


@cf.node
async def tax(ctx: cf.ExecutionContext) -> None:
    subtotal = await ctx.store.get("subtotal")
    await ctx.store.set("tax", round(subtotal * 0.2, 2))


@cf.node
async def total(ctx: cf.ExecutionContext) -> cf.Action:
    return cf.Action.complete(await ctx.store.get("subtotal") + await ctx.store.get("tax"))


flow = (
    cf.Flow.builder("invoice")
    .add_node("price", price)
    .add_node("tax", tax)
    .add_node("total", total)
    .add_route("price", "tax")
    .add_route("tax", "total")
    .build()
)


async def work(name: str, url: str) -> None:
    """A worker process: serve the queue until the main process stops it."""
    queue = cf.RunQueue(url, QUEUE, lease=LEASE)
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        await nursery.start(_serve, engine, queue, name, url)
        print("ready", flush=True)


async def _serve(
    engine: cf.Engine,
    queue: cf.RunQueue,
    name: str,
    url: str,
    *,
    task_status: trio.TaskStatus[str],
) -> None:
    store = f"{url}#{QUEUE}"
    await engine.serve(queue, [flow], store, concurrency=2, name=name, task_status=task_status)


async def submit_and_wait(url: str) -> list[tuple[str, cf.QueuedResult]]:
    """Submit every order, then wait for each result (in the order submitted)."""
    queue = cf.RunQueue(url, QUEUE, lease=LEASE)
    for run_id, items in ORDERS.items():
        await cf.submit(queue, "invoice", params={"items": items}, run_id=run_id)
    with trio.fail_after(30):
        return [(run_id, await cf.result(queue, run_id)) for run_id in ORDERS]


@contextmanager
def redis_server(directory: str) -> Iterator[str]:
    """A redis-server on a free loopback port, without persistence; yields its URL once
    it accepts connections."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", directory]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        assert server.stdout is not None
        for line in server.stdout:
            if "Ready to accept connections" in line:
                break
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()


@contextmanager
def worker(name: str, url: str) -> Iterator[None]:
    """This file as a worker process named ``name``, once it serves the queue."""
    command = [sys.executable, __file__, "--worker", name, url]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        try:
            yield
        finally:
            process.terminate()


def main() -> None:
    if shutil.which("redis-server") is None:
        print("this example needs redis-server on PATH (Debian: apt install redis-server)")
        return
    with tempfile.TemporaryDirectory() as directory, ExitStack() as stack:
        url = stack.enter_context(redis_server(directory))
        for name in ("worker-1", "worker-2"):
            stack.enter_context(worker(name, url))
        results = trio.run(submit_and_wait, url)
    workers: dict[str, Any] = {}
    for run_id, done in results:
        print(f"{run_id}: total {done.result:.2f} ({' -> '.join(done.execution_path)})")
        workers[done.worker] = workers.get(done.worker, 0) + 1
    print(f"{len(results)} runs succeeded on {len(workers)} worker(s): {workers}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        trio.run(work, sys.argv[2], sys.argv[3])
    else:
        main()
