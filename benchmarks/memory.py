"""memory: resident memory per run suspended inside exec.

``size`` runs, each with its own dict store, read ``value`` in prep, then wait in exec on
one shared gate. Once all of them are waiting (and the scheduler is idle), RSS is read
again: the metric is (RSS after - RSS before) / size, in KiB per run. The gate then opens
and every run writes ``value + 1`` in post and ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import TypeVar

import pocketflow
import trio
import trio.testing

import cosmoflow_actors as cf
from benchmarks.common import Case, Implementation, Measurement, Store, rss_kib, verify

KEY = "value"


class TrioGate:
    """Where runs wait in exec: ``all_in`` is set when ``expected`` of them have arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.all_in = trio.Event()
        self.opened = trio.Event()

    async def pass_through(self) -> None:
        self.arrived += 1
        if self.arrived == self.expected:
            self.all_in.set()
        await self.opened.wait()


class AsyncioGate:
    """:class:`TrioGate` for asyncio."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.all_in = asyncio.Event()
        self.opened = asyncio.Event()

    async def pass_through(self) -> None:
        self.arrived += 1
        if self.arrived == self.expected:
            self.all_in.set()
        await self.opened.wait()


class Park(cf.Node):
    def __init__(self, gate: TrioGate) -> None:
        self.gate = gate

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        value: int = await store.get(KEY, 0)
        return value

    async def exec(self, value: int, ctx: cf.ExecutionContext) -> int:
        await self.gate.pass_through()
        return value + 1

    async def post(
        self, store: cf.SharedStore, prep_res: int, value: int, ctx: cf.ExecutionContext
    ) -> None:
        await store.set(KEY, value)


class PocketPark(pocketflow.AsyncNode):  # type: ignore[misc]
    def __init__(self, gate: AsyncioGate) -> None:
        super().__init__()
        self.gate = gate

    async def prep_async(self, shared: Store) -> int:
        value: int = shared.get(KEY, 0)
        return value

    async def exec_async(self, value: int) -> int:
        await self.gate.pass_through()
        return value + 1

    async def post_async(self, shared: Store, prep_res: int, value: int) -> None:
        shared[KEY] = value


Gate = TypeVar("Gate", TrioGate, AsyncioGate)


def open_gate(gate: Gate) -> Gate:
    gate.opened.set()
    return gate


def cosmoflow_flow(gate: TrioGate) -> cf.Flow:
    return cf.Flow.builder("memory").add_node("park", Park(gate)).build()


async def cosmoflow_parked(case: Case) -> Measurement:
    """Every run is suspended at once, so the engine admits them all (``max_runs=None``):
    with a bound below ``size``, ``start_run`` would wait for a run to end, and none would
    before the gate opens."""
    async with cf.open_engine(max_runs=None) as engine:
        await engine.run(cosmoflow_flow(open_gate(TrioGate(1))), {})  # warm-up
        before = rss_kib()
        start = time.perf_counter()
        gate = TrioGate(case.size)
        flow = cosmoflow_flow(gate)
        stores: list[Store] = [{} for _ in range(case.size)]
        for store in stores:
            await engine.start_run(flow, store)
        measurement = await trio_measure(case, gate, before, start)
    verify(stores, KEY, 1)
    return measurement


async def trio_task(store: Store, gate: TrioGate) -> None:
    value = store.get(KEY, 0)
    await gate.pass_through()
    store[KEY] = value + 1


async def trio_parked(case: Case) -> Measurement:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio_task, {}, open_gate(TrioGate(1)))  # warm-up
        await trio.testing.wait_all_tasks_blocked()
        before = rss_kib()
        start = time.perf_counter()
        gate = TrioGate(case.size)
        stores: list[Store] = [{} for _ in range(case.size)]
        for store in stores:
            nursery.start_soon(trio_task, store, gate)
        measurement = await trio_measure(case, gate, before, start)
    verify(stores, KEY, 1)
    return measurement


async def trio_measure(case: Case, gate: TrioGate, before: int, start: float) -> Measurement:
    """Once every run waits at ``gate`` and nothing else can run, measure; then open it."""
    await gate.all_in.wait()
    seconds = time.perf_counter() - start
    await trio.testing.wait_all_tasks_blocked()
    measurement = per_run(case, before, rss_kib(), seconds)
    gate.opened.set()
    return measurement


async def pocketflow_parked(case: Case) -> Measurement:
    await pocketflow.AsyncFlow(start=PocketPark(open_gate(AsyncioGate(1)))).run_async({})
    before = rss_kib()
    start = time.perf_counter()
    gate = AsyncioGate(case.size)
    flow = pocketflow.AsyncFlow(start=PocketPark(gate))
    stores: list[Store] = [{} for _ in range(case.size)]
    async with asyncio.TaskGroup() as group:
        for store in stores:
            group.create_task(flow.run_async(store))
        await gate.all_in.wait()
        seconds = time.perf_counter() - start
        await asyncio.sleep(0.01)  # let the last arrivals park
        measurement = per_run(case, before, rss_kib(), seconds)
        gate.opened.set()
    verify(stores, KEY, 1)
    return measurement


def per_run(case: Case, before: int, after: int, seconds: float) -> Measurement:
    extra = {"rss_before_kib": float(before), "rss_after_kib": float(after)}
    return Measurement(seconds, (after - before) / case.size, extra)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "cosmoflow": lambda case: trio.run(cosmoflow_parked, case),
    "trio": lambda case: trio.run(trio_parked, case),
    "pocketflow": lambda case: asyncio.run(pocketflow_parked(case)),
}
