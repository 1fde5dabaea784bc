"""A long-lived engine stays bounded: after 2N rounds of a mixed workload it holds no
more of the engine's objects than after N."""

from __future__ import annotations

import contextlib
import gc
from collections import Counter
from pathlib import Path
from typing import Any

import trio
import trio.testing

import cosmoflow_actors as cf
from tests.support import Recorder, a_then_b, single


class Fails(cf.Node):
    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        raise RuntimeError("boom")


class Slow(cf.Node):
    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        await trio.sleep(1)


class Items(cf.ParallelBatchNode):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        return range(3)


class Children(cf.BatchFlow):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        return [{}, {}]


def fan(name: str) -> cf.Flow:
    builder = cf.Flow.builder(name).add_node("a", Recorder()).add_node("b", Recorder())
    builder = builder.add_node("c", Recorder()).add_join("d", Recorder())
    builder = builder.add_route("a", ["b", "c"]).add_route("b", "d").add_route("c", "d")
    return builder.build()


def nested(name: str) -> cf.Flow:
    builder = cf.Flow.builder(name).add_node("in", a_then_b(f"{name}-inner"))
    return builder.add_node("after", Recorder()).add_route("in", "after").build()


async def quietly(engine: cf.Engine, flow: cf.Flow, **options: Any) -> None:
    """Run ``flow``; its failure is part of the workload."""
    with contextlib.suppress(cf.NodeError, cf.RunRecordedError):
        await engine.run(flow, **options)


async def one_round(engine: cf.Engine, number: int, tmp_path: Path) -> None:
    """Flows built afresh (same and new names), runs that succeed, fail, time out and
    are given up, durable runs on a fresh and a reused store with ids reused, and an
    event stream opened, read and let go of unclosed."""
    flows = [
        a_then_b("chain"),
        a_then_b(f"chain-{number}"),
        fan("fan"),
        nested("nested"),
        single(Items(), "items"),
        single(Children(a_then_b("child")), "children"),
    ]
    stream = engine.events(buffer=5)
    async with trio.open_nursery() as nursery:
        for flow in flows:
            nursery.start_soon(quietly, engine, flow)
        nursery.start_soon(quietly, engine, single(Fails(), "fails"))
        with trio.move_on_after(0.5):
            await engine.run(single(Slow(), "slow"))
    async for _ in stream:
        break
    del stream
    reused = cf.SQLiteStorage(tmp_path / "reused.db")
    await quietly(engine, flows[0], store=reused, run_id="same")
    await quietly(engine, single(Fails(), "fails"), store=reused, run_id="failed")
    fresh = cf.FileStorage(tmp_path / f"fresh-{number}.json")
    await quietly(engine, flows[0], store=fresh, run_id="same")
    await engine.list_runs(reused)
    engine.statistics()


async def engine_objects() -> Counter[str]:
    """The live objects of the package's own types, by type, once the garbage is
    collected and the actors of flows gone have retired."""
    for _ in range(2):
        gc.collect()
        await trio.testing.wait_all_tasks_blocked()
    return Counter(type(o).__qualname__ for o in gc.get_objects() if _of_the_package(type(o)))


def _of_the_package(kind: type) -> bool:
    """Whether ``kind`` is a class of cosmoflow_actors (some types' ``__module__`` is a
    descriptor, not a str)."""
    module = kind.__module__
    return isinstance(module, str) and module.startswith("cosmoflow_actors")


async def test_a_long_lived_engine_holds_no_more_after_2n_rounds_than_after_n(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async with cf.open_engine() as engine:
        for number in range(4):
            await one_round(engine, number, tmp_path)
        after_n = await engine_objects()
        for number in range(4, 8):
            await one_round(engine, number, tmp_path)
        after_2n = await engine_objects()
        statistics = engine.statistics()
    grown = {
        kind: after_2n[kind] - after_n[kind] for kind in after_2n if after_2n[kind] > after_n[kind]
    }
    assert grown == {}
    assert statistics.runs_failed >= 8 and statistics.runs_cancelled >= 8
