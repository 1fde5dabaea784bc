"""fanout: N concurrent runs of a 5-node chain, each run with its own dict store.

Every node reads ``hops`` in prep, awaits a checkpoint (variant ``checkpoint``) or 1 ms
of simulated latency (variant ``1ms``; ``10ms`` for ``benchmarks.sweep`` only) in exec,
and writes ``hops + 1`` in post.
Metric: runs per second, from the first run started to the last run finished.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pocketflow
import trio

import cosmoflow_actors as cf
from benchmarks.common import Case, Implementation, Measurement, Store, verify

CHAIN_LENGTH = 5
KEY = "hops"
DELAYS = {"checkpoint": 0.0, "1ms": 0.001, "10ms": 0.01}
"""Seconds each exec awaits; ``sleep(0)`` is a bare checkpoint in trio and asyncio."""


class Hop(cf.Node):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        hops: int = await store.get(KEY, 0)
        return hops

    async def exec(self, hops: int, ctx: cf.ExecutionContext) -> int:
        await trio.sleep(self.delay)
        return hops + 1

    async def post(
        self, store: cf.SharedStore, prep_res: int, hops: int, ctx: cf.ExecutionContext
    ) -> None:
        await store.set(KEY, hops)


class PocketHop(pocketflow.AsyncNode):  # type: ignore[misc]
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def prep_async(self, shared: Store) -> int:
        hops: int = shared.get(KEY, 0)
        return hops

    async def exec_async(self, hops: int) -> int:
        await asyncio.sleep(self.delay)
        return hops + 1

    async def post_async(self, shared: Store, prep_res: int, hops: int) -> None:
        shared[KEY] = hops


def cosmoflow_chain(delay: float) -> cf.Flow:
    builder = cf.Flow.builder("fanout")
    for i in range(CHAIN_LENGTH):
        builder.add_node(f"hop{i}", Hop(delay))
        if i:
            builder.add_route(f"hop{i - 1}", f"hop{i}")
    return builder.build()


def pocketflow_chain(delay: float) -> Any:
    nodes = [PocketHop(delay) for _ in range(CHAIN_LENGTH)]
    for upstream, downstream in itertools.pairwise(nodes):
        upstream >> downstream
    return pocketflow.AsyncFlow(start=nodes[0])


async def cosmoflow_nursery(case: Case, **engine_options: Any) -> float:
    """One task per run, each awaiting ``engine.run`` (which carries its run's steps).

    ``engine_options`` go to ``cf.open_engine``; without them the engine has its defaults.
    """
    flow = cosmoflow_chain(DELAYS[case.variant])
    stores: list[Store] = [{} for _ in range(case.size)]
    async with cf.open_engine(**engine_options) as engine:
        await engine.run(flow, {})  # warm-up: starts the node actors
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(engine.run, flow, store)
        seconds = time.perf_counter() - start
    verify(stores, KEY, CHAIN_LENGTH)
    return seconds


async def cosmoflow_start_run(case: Case, **engine_options: Any) -> float:
    """One task starts every run with ``engine.start_run``, then waits for each."""
    flow = cosmoflow_chain(DELAYS[case.variant])
    stores: list[Store] = [{} for _ in range(case.size)]
    async with cf.open_engine(**engine_options) as engine:
        await engine.run(flow, {})  # warm-up: starts the node actors
        start = time.perf_counter()
        runs = [await engine.start_run(flow, store) for store in stores]
        for run in runs:
            await run.wait()
        seconds = time.perf_counter() - start
    verify(stores, KEY, CHAIN_LENGTH)
    return seconds


async def trio_chain(store: Store, delay: float) -> None:
    for _ in range(CHAIN_LENGTH):
        hops = store.get(KEY, 0)
        await trio.sleep(delay)
        store[KEY] = hops + 1


async def trio_runs(case: Case) -> float:
    delay = DELAYS[case.variant]
    stores: list[Store] = [{} for _ in range(case.size)]
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(trio_chain, store, delay)
    seconds = time.perf_counter() - start
    verify(stores, KEY, CHAIN_LENGTH)
    return seconds


async def pocketflow_runs(case: Case) -> float:
    flow = pocketflow_chain(DELAYS[case.variant])
    await flow.run_async({})  # warm-up
    stores: list[Store] = [{} for _ in range(case.size)]
    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for store in stores:
            group.create_task(flow.run_async(store))
    seconds = time.perf_counter() - start
    verify(stores, KEY, CHAIN_LENGTH)
    return seconds


def throughput(case: Case, seconds: float) -> Measurement:
    return Measurement(seconds, case.size / seconds)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "cosmoflow-nursery": lambda case: throughput(case, trio.run(cosmoflow_nursery, case)),
    "cosmoflow-start_run": lambda case: throughput(case, trio.run(cosmoflow_start_run, case)),
    "trio": lambda case: throughput(case, trio.run(trio_runs, case)),
    "pocketflow": lambda case: throughput(case, asyncio.run(pocketflow_runs(case))),
}
