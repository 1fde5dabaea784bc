"""cpu: a 3-stage pipeline (load → crunch → save) over ``size`` items, one run per item.

The middle stage burns ``work`` iterations of pure-Python CPU (about 20 ms) in a plain
``def exec``. cosmoflow runs it with ``executor = "process"`` and, for comparison, with
``executor = "inline"`` and ``executor = "ray"`` (a Ray started on this machine; needs
the ray extra); bare trio hands it to ``trio_parallel.run_sync``; PocketFlow runs
it inline on the event loop. Before timing, ``WARMUP`` items go through the pipeline, so
worker processes are already started. Metric: items per second.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pocketflow
import trio
import trio_parallel

import cosmoflow_actors as cf
from benchmarks.common import Case, Implementation, Measurement, Store
from benchmarks.work import spin

WARMUP = 2


class Load(cf.Node):
    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        item: int = await store.get("item")
        return item

    async def post(
        self, store: cf.SharedStore, item: int, exec_res: None, ctx: cf.ExecutionContext
    ) -> None:
        await store.set("loaded", item)


class Crunch(cf.Node):
    executor = "process"

    def __init__(self, work: int) -> None:
        self.work = work

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        item: int = await store.get("loaded")
        return item

    def exec(self, item: int, ctx: cf.ExecutionContext) -> int:
        return spin(self.work, item)

    async def post(
        self, store: cf.SharedStore, item: int, crunched: int, ctx: cf.ExecutionContext
    ) -> None:
        await store.set("crunched", crunched)


class InlineCrunch(Crunch):
    executor = "inline"


class RayCrunch(Crunch):
    executor = "ray"


class Save(cf.Node):
    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        crunched: int = await store.get("crunched")
        return crunched

    async def post(
        self, store: cf.SharedStore, crunched: int, exec_res: None, ctx: cf.ExecutionContext
    ) -> None:
        await store.set("result", crunched)


class PocketLoad(pocketflow.AsyncNode):  # type: ignore[misc]
    async def prep_async(self, shared: Store) -> int:
        item: int = shared["item"]
        return item

    async def post_async(self, shared: Store, item: int, exec_res: None) -> None:
        shared["loaded"] = item


class PocketCrunch(pocketflow.AsyncNode):  # type: ignore[misc]
    def __init__(self, work: int) -> None:
        super().__init__()
        self.work = work

    async def prep_async(self, shared: Store) -> int:
        item: int = shared["loaded"]
        return item

    async def exec_async(self, item: int) -> int:
        return spin(self.work, item)

    async def post_async(self, shared: Store, item: int, crunched: int) -> None:
        shared["crunched"] = crunched


class PocketSave(pocketflow.AsyncNode):  # type: ignore[misc]
    async def prep_async(self, shared: Store) -> int:
        crunched: int = shared["crunched"]
        return crunched

    async def post_async(self, shared: Store, crunched: int, exec_res: None) -> None:
        shared["result"] = crunched


def items(count: int) -> list[Store]:
    return [{"item": i} for i in range(count)]


def check(stores: list[Store], work: int) -> None:
    """Every item has a result, and the first one is right."""
    missing = sum(1 for store in stores if "result" not in store)
    if missing or stores[0]["result"] != spin(work, stores[0]["item"]):
        raise RuntimeError(f"wrong pipeline results ({missing} missing)")


async def cosmoflow_pipeline(case: Case, crunch: Crunch) -> float:
    flow = (
        cf.Flow.builder("cpu")
        .add_node("load", Load())
        .add_node("crunch", crunch)
        .add_node("save", Save())
        .add_route("load", "crunch")
        .add_route("crunch", "save")
        .build()
    )
    async with cf.open_engine() as engine:
        await cosmoflow_items(engine, flow, items(WARMUP))
        stores = items(case.size)
        start = time.perf_counter()
        await cosmoflow_items(engine, flow, stores)
        seconds = time.perf_counter() - start
    check(stores, case.work)
    return seconds


async def cosmoflow_items(engine: cf.Engine, flow: cf.Flow, stores: list[Store]) -> None:
    runs = [await engine.start_run(flow, store) for store in stores]
    for run in runs:
        await run.wait()


async def trio_item(store: Store, work: int) -> None:
    store["loaded"] = store["item"]
    store["crunched"] = await trio_parallel.run_sync(spin, work, store["loaded"])
    store["result"] = store["crunched"]


async def trio_items(stores: list[Store], work: int) -> None:
    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(trio_item, store, work)


async def trio_pipeline(case: Case) -> float:
    await trio_items(items(WARMUP), case.work)
    stores = items(case.size)
    start = time.perf_counter()
    await trio_items(stores, case.work)
    seconds = time.perf_counter() - start
    check(stores, case.work)
    return seconds


async def pocketflow_items(flow: Any, stores: list[Store]) -> None:
    async with asyncio.TaskGroup() as group:
        for store in stores:
            group.create_task(flow.run_async(store))


async def pocketflow_pipeline(case: Case) -> float:
    load = PocketLoad()
    load >> PocketCrunch(case.work) >> PocketSave()
    flow = pocketflow.AsyncFlow(start=load)
    await pocketflow_items(flow, items(WARMUP))
    stores = items(case.size)
    start = time.perf_counter()
    await pocketflow_items(flow, stores)
    seconds = time.perf_counter() - start
    check(stores, case.work)
    return seconds


def throughput(case: Case, seconds: float) -> Measurement:
    return Measurement(seconds, case.size / seconds)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "cosmoflow": lambda case: throughput(
        case, trio.run(cosmoflow_pipeline, case, Crunch(case.work))
    ),
    "cosmoflow-inline": lambda case: throughput(
        case, trio.run(cosmoflow_pipeline, case, InlineCrunch(case.work))
    ),
    "cosmoflow-ray": lambda case: throughput(
        case, trio.run(cosmoflow_pipeline, case, RayCrunch(case.work))
    ),
    "trio": lambda case: throughput(case, trio.run(trio_pipeline, case)),
    "pocketflow": lambda case: throughput(case, asyncio.run(pocketflow_pipeline(case))),
}
