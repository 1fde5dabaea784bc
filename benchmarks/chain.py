"""chain: one run looping one node ``size`` times.

The node reads ``count`` in prep, awaits a checkpoint in exec and writes ``count + 1`` in
post, which routes back to the node until the count reaches ``size``.
Metric: microseconds per step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pocketflow
import trio

import cosmoflow_actors as cf
from benchmarks.common import Case, Implementation, Measurement, Store, verify

KEY = "count"


class Tick(cf.Node):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        count: int = await store.get(KEY, 0)
        return count

    async def exec(self, count: int, ctx: cf.ExecutionContext) -> int:
        await trio.lowlevel.checkpoint()
        return count + 1

    async def post(
        self, store: cf.SharedStore, prep_res: int, count: int, ctx: cf.ExecutionContext
    ) -> cf.Action | str:
        await store.set(KEY, count)
        return cf.Action.complete() if count >= self.steps else "again"


class PocketTick(pocketflow.AsyncNode):  # type: ignore[misc]
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    async def prep_async(self, shared: Store) -> int:
        count: int = shared.get(KEY, 0)
        return count

    async def exec_async(self, count: int) -> int:
        await asyncio.sleep(0)
        return count + 1

    async def post_async(self, shared: Store, prep_res: int, count: int) -> str:
        shared[KEY] = count
        return "done" if count >= self.steps else "again"


async def cosmoflow_loop(steps: int, store: Store) -> float:
    flow = (
        cf.Flow.builder("chain")
        .add_node("tick", Tick(steps))
        .add_route("tick", "tick", action="again")
        .max_steps(steps)
        .build()
    )
    async with cf.open_engine() as engine:
        start = time.perf_counter()
        await engine.run(flow, store)
        return time.perf_counter() - start


async def trio_loop(steps: int, store: Store) -> float:
    start = time.perf_counter()
    count = 0
    while count < steps:
        count = store.get(KEY, 0)
        await trio.lowlevel.checkpoint()
        count += 1
        store[KEY] = count
    return time.perf_counter() - start


async def pocketflow_loop(steps: int, store: Store) -> float:
    tick = PocketTick(steps)
    tick - "again" >> tick
    tick - "done" >> pocketflow.AsyncNode()  # an explicit end: no "flow ends" warning
    flow = pocketflow.AsyncFlow(start=tick)
    start = time.perf_counter()
    await flow.run_async(store)
    return time.perf_counter() - start


def per_step(case: Case, run: Callable[[Store], float]) -> Measurement:
    """Run the loop once on a fresh store; check it counted to ``size``."""
    store: Store = {}
    seconds = run(store)
    verify([store], KEY, case.size)
    return Measurement(seconds, seconds / case.size * 1e6)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "cosmoflow": lambda case: per_step(case, lambda s: trio.run(cosmoflow_loop, case.size, s)),
    "trio": lambda case: per_step(case, lambda s: trio.run(trio_loop, case.size, s)),
    "pocketflow": lambda case: per_step(case, lambda s: asyncio.run(pocketflow_loop(case.size, s))),
}
