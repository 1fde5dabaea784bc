"""The five routing rules, END, params, max_steps and nested flows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.storage.base import RECORD_PREFIX
from tests.support import Recorder, refused, single


class Counter(cf.Node):
    """Increments "n" and returns "again"."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> str:
        await store.update("n", lambda n: n + 1, default=0)
        return "again"


class ParamEcho(cf.Node):
    """Stores the params it received under its node id."""

    def __init__(self, action: cf.Action | str | None = None) -> None:
        self.action = action

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> Any:
        await store.set(ctx.node_id, dict(ctx.params))
        return self.action


async def test_complete_ends_the_run_with_its_result() -> None:
    flow = (
        cf.Flow.builder("f")
        .add_node("a", Recorder(cf.Action.complete(result={"answer": 42})))
        .add_node("b", Recorder())
        .add_route("a", "b", action="complete")
        .build()
    )
    result = await flow.run({})
    assert result.result == {"answer": 42}
    assert result.execution_path == ("a",)
    assert result.final_action.is_complete


async def test_a_conditional_action_is_resolved_against_the_store() -> None:
    condition = cf.ActionCondition.key_exists("user")
    flow = (
        cf.Flow.builder("auth")
        .add_node("check", Recorder(cf.Action.conditional(condition, "yes", "no")))
        .add_node("welcome", Recorder())
        .add_node("login", Recorder())
        .add_route("check", "welcome", action="yes")
        .add_route("check", "login", action="no")
        .build()
    )
    assert (await flow.run({"user": "ada"})).execution_path == ("check", "welcome")
    assert (await flow.run({})).execution_path == ("check", "login")


async def test_the_first_route_whose_condition_holds_wins() -> None:
    flow = (
        cf.Flow.builder("f")
        .add_node("a", Recorder("go"))
        .add_node("big", Recorder())
        .add_node("small", Recorder())
        .add_node("fallback", Recorder())
        .add_route("a", "big", action="go", when=cf.ActionCondition.compare("size", ">", 10))
        .add_route("a", "small", action="go", when=cf.ActionCondition.compare("size", ">", 0))
        .add_route("a", "fallback", action="go")
        .build()
    )
    assert (await flow.run({"size": 50})).execution_path == ("a", "big")
    assert (await flow.run({"size": 5})).execution_path == ("a", "small")
    assert (await flow.run({"size": -1})).execution_path == ("a", "fallback")


async def test_a_node_without_routes_ends_the_run() -> None:
    flow = cf.Flow.builder("chain").add_node("a", Recorder()).add_node("b", Recorder("finished"))
    result = await flow.add_route("a", "b").build().run({})
    assert result.final_action == cf.Action.simple("finished")
    assert result.last_node_id == "b"
    assert result.steps_executed == 2
    assert result.result is None


async def test_an_unmatched_action_fails_with_no_route_error() -> None:
    flow = (
        cf.Flow.builder("f")
        .add_node("a", Recorder("sideways"))
        .add_node("b", Recorder())
        .add_route("a", "b", action="left")
        .add_route("a", cf.END, action="right")
        .build()
    )
    with pytest.raises(cf.NoRouteError) as info:
        await flow.run({})
    assert info.value.node_id == "a"
    assert info.value.action == "sideways"
    assert info.value.available == ("left", "right")
    assert "'left', 'right'" in str(info.value)


async def test_routes_whose_conditions_all_fail_are_no_route() -> None:
    flow = (
        cf.Flow.builder("f")
        .add_node("a", Recorder())
        .add_route("a", cf.END, when=cf.ActionCondition.never())
        .build()
    )
    with pytest.raises(cf.NoRouteError):
        await flow.run({})


async def test_end_ends_the_run_with_the_action_that_led_there() -> None:
    flow = (
        cf.Flow.builder("f").add_node("a", Recorder("stop")).add_route("a", cf.END, "stop").build()
    )
    result = await flow.run({})
    assert result.final_action == cf.Action.simple("stop")
    assert result.execution_path == ("a",)


async def test_loops_run_until_a_condition_routes_out() -> None:
    flow = (
        cf.Flow.builder("loop")
        .add_node("count", Counter())
        .add_route("count", "count", "again", when=cf.ActionCondition.compare("n", "<", 5))
        .add_route("count", cf.END, "again")
        .build()
    )
    store: dict[str, Any] = {}
    result = await flow.run(store)
    assert store["n"] == 5
    assert result.execution_path == ("count",) * 5


async def test_a_runaway_loop_fails_with_max_steps_exceeded() -> None:
    flow = (
        cf.Flow.builder("runaway").add_node("count", Counter()).add_route("count", "count", "again")
    )
    with pytest.raises(cf.MaxStepsExceeded) as info:
        await flow.max_steps(7).build().run({})
    assert info.value.max_steps == 7
    assert info.value.execution_path == ("count",) * 7


async def test_params_of_an_action_reach_the_next_step_only() -> None:
    flow = (
        cf.Flow.builder("f")
        .add_node("a", ParamEcho(cf.Action.with_params("next", count=3)))
        .add_node("b", ParamEcho())
        .add_node("c", ParamEcho())
        .add_route("a", "b", "next")
        .add_route("b", "c")
        .build()
    )
    store: dict[str, Any] = {}
    await flow.run(store, params={"user": "ada"})
    assert store == {"a": {"user": "ada"}, "b": {"count": 3}, "c": {}}


async def test_start_sets_the_entry_node() -> None:
    flow = cf.Flow.builder("f").add_node("a", Recorder()).add_node("b", Recorder()).start("b")
    flow.add_route("b", "a", action="back").add_route("b", cf.END)
    assert (await flow.build().run({})).execution_path == ("b",)


def inner_flow(final: str = "inner_done") -> cf.Flow:
    return (
        cf.Flow.builder("inner")
        .add_node("i1", Recorder())
        .add_node("i2", Recorder(final))
        .add_route("i1", "i2")
        .build()
    )


async def test_a_nested_flow_runs_on_the_parent_store_and_routes_its_final_action() -> None:
    flow = (
        cf.Flow.builder("outer")
        .add_node("before", Recorder())
        .add_node("sub", inner_flow())
        .add_node("after", Recorder())
        .add_route("before", "sub")
        .add_route("sub", "after", action="inner_done")
        .build()
    )
    store: dict[str, Any] = {}
    result = await flow.run(store)
    assert result.execution_path == ("before", "i1", "i2", "after")
    assert store["seen"] == ["before", "i1", "i2", "after"]


async def test_a_nested_flow_as_the_start_node_and_the_last_node() -> None:
    flow = cf.Flow.builder("outer").add_node("sub", inner_flow("bye")).build()
    result = await flow.run({})
    assert result.execution_path == ("i1", "i2")
    assert result.final_action == cf.Action.simple("bye")
    assert result.last_node_id == "i2"


async def test_an_unrouted_final_action_of_a_nested_flow_is_no_route() -> None:
    flow = (
        cf.Flow.builder("outer")
        .add_node("sub", inner_flow("surprise"))
        .add_node("after", Recorder())
        .add_route("sub", "after", action="expected")
        .build()
    )
    with pytest.raises(cf.NoRouteError) as info:
        await flow.run({})
    assert (info.value.node_id, info.value.action) == ("sub", "surprise")


async def test_complete_inside_a_nested_flow_ends_the_whole_run() -> None:
    inner = cf.Flow.builder("inner").add_node("i", Recorder(cf.Action.complete("early"))).build()
    flow = (
        cf.Flow.builder("outer")
        .add_node("sub", inner)
        .add_node("after", Recorder())
        .add_route("sub", "after", action="complete")
        .build()
    )
    result = await flow.run({})
    assert result.result == "early"
    assert result.execution_path == ("i",)


async def test_a_nested_flow_max_steps_bounds_its_own_loop() -> None:
    inner = (
        cf.Flow.builder("inner").add_node("count", Counter()).add_route("count", "count", "again")
    )
    flow = cf.Flow.builder("outer").add_node("sub", inner.max_steps(3).build()).build()
    with pytest.raises(cf.MaxStepsExceeded) as info:
        await flow.run({})
    assert info.value.max_steps == 3


class SlowReads(cf.MemoryStorage):
    """Memory storage whose reads of "slow" wait for ``release`` (holds the router)."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = trio.Event()
        self.release = trio.Event()

    async def get(self, key: str) -> Any:
        if key == "slow":
            self.reading.set()
            await self.release.wait()
        return await super().get(key)


async def test_a_run_cancelled_while_the_router_reads_conditions_stays_cancelled() -> None:
    flow = (
        cf.Flow.builder("f")
        .add_node("a", Recorder())
        .add_route("a", cf.END, when=cf.ActionCondition.key_exists("slow"))
        .add_route("a", cf.END)
        .build()
    )
    storage = SlowReads()
    async with cf.open_engine() as engine:
        run = await engine.start_run(flow, storage)
        await storage.reading.wait()
        run.cancel()
        storage.release.set()
        assert (await engine.run(flow, {})).success
        stats = engine.statistics()
    assert run.state.value is cf.RunState.CANCELLED
    assert (stats.runs_cancelled, stats.runs_succeeded, stats.runs_in_flight) == (1, 1, 0)


class Branch(cf.Node):
    """Records its id, waits ``ctx.params``-independent gate, returns its action."""

    def __init__(
        self, action: cf.Action | str | None = None, gate: trio.Event | None = None
    ) -> None:
        self.action = action
        self.gate = gate
        self.inside = 0

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if self.gate is not None:
            self.inside += 1
            try:
                await self.gate.wait()
            finally:
                self.inside -= 1

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> Any:
        await store.update("seen", lambda seen: [*seen, ctx.node_id], default=[])
        await store.set(f"params:{ctx.node_id}", dict(ctx.params))
        return self.action


def diamond(b: cf.Node, c: cf.Node) -> cf.Flow:
    return (
        cf.Flow.builder("diamond")
        .add_node("a", Branch())
        .add_node("b", b)
        .add_node("c", c)
        .add_join("join", Branch())
        .add_node("after", Branch())
        .add_route("a", ["b", "c"])
        .add_route("b", "join")
        .add_route("c", "join")
        .add_route("join", "after")
        .build()
    )


async def test_fan_out_branches_run_concurrently_and_join_once() -> None:
    gate = trio.Event()
    b, c = (
        Branch(cf.Action.with_params("default", b=1), gate),
        Branch(cf.Action.with_params("default", c=2), gate),
    )
    store = cf.MemoryStorage()
    async with cf.open_engine() as engine:
        run = await engine.start_run(diamond(b, c), store)
        await trio.testing.wait_all_tasks_blocked()
        assert (b.inside, c.inside) == (1, 1)
        gate.set()
        result = await run.wait()
    seen = store.data["seen"]
    assert seen[0] == "a" and sorted(seen[1:3]) == ["b", "c"] and seen[3:] == ["join", "after"]
    assert store.data["params:join"] == {"b": 1, "c": 2}
    assert sorted(result.execution_path[1:3]) == ["b", "c"]
    assert result.execution_path[3:] == ("join", "after")
    assert result.last_node_id == "after"


async def test_a_failing_branch_of_a_thousand_cancels_the_others() -> None:
    gate = trio.Event()
    waiting = Branch(gate=gate)

    @cf.node
    async def fail_on_cue(ctx: cf.ExecutionContext) -> None:
        await trio.testing.wait_all_tasks_blocked()
        raise ValueError("branch 0 failed")

    builder = cf.Flow.builder("wide").add_node("start", Branch()).add_node("bad", fail_on_cue)
    targets = ["bad"]
    for index in range(999):
        builder.add_node(f"b{index}", waiting)
        targets.append(f"b{index}")
    flow = builder.add_route("start", targets).max_steps(2000).build()
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError) as info:
            await engine.run(flow, {})
        assert info.value.node_id == "bad"
        await trio.testing.wait_all_tasks_blocked()
        assert waiting.inside == 0
        assert sum(a.in_flight for a in engine.statistics().actors if a.kind == "node") == 0


async def test_a_branch_that_ends_elsewhere_does_not_hold_the_join() -> None:
    flow = (
        cf.Flow.builder("detour")
        .add_node("a", Branch())
        .add_node("b", Branch("to_join"))
        .add_node("c", Branch("leave"))
        .add_join("join", Branch())
        .add_route("a", ["b", "c"])
        .add_route("b", "join", "to_join")
        .add_route("c", cf.END, "leave")
        .build()
    )
    store: dict[str, Any] = {}
    result = await flow.run(store)
    assert store["seen"][-1] == "join"
    assert result.last_node_id == "join"


async def test_branches_that_all_end_end_the_run() -> None:
    flow = (
        cf.Flow.builder("split")
        .add_node("a", Branch())
        .add_node("b", Branch("x"))
        .add_node("c", Branch("y"))
        .add_route("a", ["b", "c"])
        .build()
    )
    result = await flow.run({})
    assert sorted(result.execution_path[1:]) == ["b", "c"]
    assert result.final_action.name in {"x", "y"}


async def test_a_fan_out_inside_a_nested_flow_joins_there() -> None:
    inner = diamond(Branch(), Branch())
    flow = (
        cf.Flow.builder("outer")
        .add_node("sub", inner)
        .add_node("tail", Branch())
        .add_route("sub", "tail")
    )
    store: dict[str, Any] = {}
    await flow.build().run(store)
    assert store["seen"][-3:] == ["join", "after", "tail"]


async def test_a_node_without_a_fan_out_runs_a_join_as_usual() -> None:
    flow = (
        cf.Flow.builder("f")
        .add_node("a", Branch())
        .add_join("j", Branch())
        .add_route("a", "j")
        .build()
    )
    assert (await flow.run({})).execution_path == ("a", "j")


def test_fan_out_routes_are_validated_at_build() -> None:
    builder = (
        cf.Flow.builder("bad-fan")
        .add_node("a", Branch())
        .add_node("b", Branch())
        .add_route("a", ["b", "ghost"])
        .add_route("a", ["b", "b"], action="twice")
        .add_route("a", [], action="none")
    )
    error = refused(builder)
    assert error.problems == (
        "route from 'a' to unknown node 'ghost'",
        "route from 'a' fans out to a node twice",
        "route from 'a' fans out to no node",
    )


async def test_a_fan_out_straight_into_its_join_arrives_at_once() -> None:
    flow = (
        cf.Flow.builder("direct")
        .add_node("a", Branch(cf.Action.with_params("default", via="a")))
        .add_node("b", Branch(cf.Action.with_params("default", via_b=True)))
        .add_join("join", Branch())
        .add_route("a", ["b", "join"])
        .add_route("b", "join")
        .build()
    )
    store: dict[str, Any] = {}
    result = await flow.run(store)
    assert result.execution_path == ("a", "b", "join")
    assert store["params:join"] == {"via": "a", "via_b": True}


class Numbered(cf.Node):
    """Notes each step's execution id in the store's "ids"."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        await store.update("ids", lambda ids: [*ids, ctx.execution_id], default=[])


async def test_every_step_of_branches_has_its_own_execution_id() -> None:
    """Branches number their steps from their fork: the first branch of a fork at step
    2 runs "r:2.0/3". A nested fan-out that ends without a join, followed at once by a
    second fan-out, labels the second fork's branches apart from the first's."""
    inner = (
        cf.Flow.builder("inner")
        .add_node("x", Numbered())
        .add_node("y", Numbered())
        .add_node("z", Numbered())
        .add_route("x", ["y", "z"])
        .build()
    )
    flow = (
        cf.Flow.builder("outer")
        .add_node("s", Numbered())
        .add_node("inner", inner)
        .add_node("p", Numbered())
        .add_node("q", Numbered())
        .add_join("j", Numbered())
        .add_route("s", "inner")
        .add_route("inner", ["p", "q"])
        .add_route("p", "j")
        .add_route("q", "j")
        .build()
    )
    store: dict[str, Any] = {}
    await flow.run(store, run_id="r")
    assert sorted(store["ids"]) == ["r:1", "r:2", "r:2.0/3", "r:2.1/3", "r:3.0/4", "r:3.1/4", "r:5"]


class HeldAtTheEnd(cf.FileStorage):
    """A real FileStorage whose commit of run "held"'s final record waits for
    ``release``: the router's task, which writes that record, stays busy meanwhile."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.holding = trio.Event()
        self.release = trio.Event()

    async def commit(self) -> None:
        key = RECORD_PREFIX + "held"
        if await self.contains(key) and (await self.get(key))["state"] == "succeeded":
            self.holding.set()
            await self.release.wait()
        await super().commit()


@asynccontextmanager
async def router_held(engine: cf.Engine, path: Path) -> AsyncIterator[None]:
    """Keep the router's own task busy (ending a durable run) for the block: outcomes
    sent meanwhile wait in its mailbox."""
    storage = HeldAtTheEnd(path)
    held = await engine.start_run(single(Recorder(), "held"), storage, run_id="held")
    await storage.holding.wait()
    assert engine.statistics().actor("router").in_flight == 1
    try:
        yield
    finally:
        storage.release.set()
        await held.wait()


def routing_cases() -> dict[str, cf.Flow]:
    """Flows whose first outcome needs each kind of routing decision."""
    nested = cf.Flow.builder("inner").add_node("x", Recorder("out")).build()
    return {
        "next": cf.Flow.builder("next")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b")
        .build(),
        "condition": cf.Flow.builder("condition")
        .add_node("a", Recorder("go"))
        .add_node("big", Recorder())
        .add_node("small", Recorder())
        .add_route("a", "big", "go", when=cf.ActionCondition.compare("size", ">", 10))
        .add_route("a", "small", "go")
        .build(),
        "fan-out": cf.Flow.builder("fan-out")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_node("c", Recorder())
        .add_join("j", Recorder())
        .add_route("a", ["b", "c"])
        .add_route("b", "j")
        .add_route("c", "j")
        .build(),
        "nested": cf.Flow.builder("nested")
        .add_node("a", Recorder())
        .add_node("inner", nested)
        .add_node("z", Recorder())
        .add_route("a", "inner")
        .add_route("inner", "z", "out")
        .build(),
        "complete": cf.Flow.builder("complete")
        .add_node("a", Recorder(cf.Action.complete({"answer": 42})))
        .add_node("b", Recorder())
        .add_route("a", "b")
        .build(),
        "end": cf.Flow.builder("end")
        .add_node("a", Recorder("stop"))
        .add_route("a", cf.END, "stop")
        .build(),
        "no route": cf.Flow.builder("no-route")
        .add_node("a", Recorder("sideways"))
        .add_node("b", Recorder())
        .add_route("a", "b", "left")
        .build(),
        "max steps": cf.Flow.builder("max-steps")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b")
        .max_steps(1)
        .build(),
    }


async def routed(engine: cf.Engine, flow: cf.Flow) -> tuple[Any, ...]:
    """How a run of ``flow`` (on a store with size 50) ended, and what it stored."""
    data: dict[str, Any] = {"size": 50}
    try:
        result = await engine.run(flow, data)
    except cf.CosmoFlowError as exc:
        ended: tuple[Any, ...] = (type(exc).__name__, str(exc))
    else:
        ended = (
            result.final_action,
            result.result,
            result.last_node_id,
            sorted(result.execution_path),
            result.steps_executed,
        )
    return (*ended, sorted(data.get("seen", [])))


async def test_routing_in_the_senders_task_decides_as_the_routers_own_task(
    tmp_path: Path,
) -> None:
    """Each routing decision, made by route_now in the sender's task (the router
    idle) and by the router's task (its mailbox, while it is busy): the same ends."""
    cases = routing_cases()
    queued: dict[str, tuple[Any, ...]] = {}

    async def route_queued(engine: cf.Engine, name: str) -> None:
        queued[name] = await routed(engine, cases[name])

    async with cf.open_engine() as engine:
        async with trio.open_nursery() as nursery, router_held(engine, tmp_path / "held.json"):
            for name in cases:
                nursery.start_soon(route_queued, engine, name)
            await trio.testing.wait_all_tasks_blocked()
            assert engine.statistics().actor("router").mailbox_depth == len(cases)
        direct = {name: await routed(engine, flow) for name, flow in cases.items()}
        assert engine.statistics().actor("router").mailbox_depth == 0
    assert queued == direct
    assert direct["condition"][3] == ["a", "big"]
    assert direct["fan-out"][3] == ["a", "b", "c", "j"]
    assert direct["no route"][0] == "NoRouteError"
    assert direct["max steps"][0] == "MaxStepsExceeded"


async def test_a_run_cancelled_while_its_outcome_waits_for_the_router_goes_no_further(
    tmp_path: Path,
) -> None:
    first = Recorder(max_concurrency=1)
    second = Recorder()
    flow = cf.Flow.builder("waits").add_node("a", first).add_node("b", second)
    flow_built = flow.add_route("a", "b").build()
    data: dict[str, Any] = {}
    async with cf.open_engine() as engine:
        async with router_held(engine, tmp_path / "held.json"):
            doomed = await engine.start_run(flow_built, data, run_id="doomed")
            kept = await engine.start_run(flow_built, data, run_id="kept")
            await trio.testing.wait_all_tasks_blocked()
            stats = engine.statistics()
            # Each step freed a's one slot as its outcome went to the router: kept's
            # outcome waits behind doomed's.
            assert (stats.actor("waits/a").in_flight, stats.actor("router").mailbox_depth) == (
                0,
                2,
            )
            doomed.cancel()
            await trio.testing.wait_all_tasks_blocked()
        assert (await kept.wait()).execution_path == ("a", "b")
        await trio.testing.wait_all_tasks_blocked()
        busy = [(a.name, a.in_flight, a.mailbox_depth) for a in engine.statistics().actors]
        assert [entry for entry in busy if entry[1] or entry[2]] == []
    assert doomed.current_state is cf.RunState.CANCELLED
    assert data == {"seen": ["a", "a", "b"]}


class StepLog(cf.Node):
    """Records (node, step number, params) and returns ``action``."""

    def __init__(self, action: cf.Action | str | None = None) -> None:
        self.action = action

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> Any:
        entry = [ctx.node_id, ctx.execution_id, dict(ctx.params)]
        await store.update("log", lambda log: [*log, entry], default=[])
        return self.action


def plain_hop_flows() -> dict[str, cf.Flow]:
    """Flows whose steps take plain hops, with params, loops and a step cap."""
    return {
        "chain": cf.Flow.builder("hop-chain")
        .add_node("a", StepLog(cf.Action.with_params("next", n=1)))
        .add_node("b", StepLog("next"))
        .add_node("c", StepLog())
        .add_route("a", "b", "next")
        .add_route("b", "c", "next")
        .build(),
        "capped loop": cf.Flow.builder("hop-loop")
        .add_node("a", StepLog("again"))
        .add_route("a", "a", "again")
        .max_steps(5)
        .build(),
        "nested": cf.Flow.builder("hop-nested")
        .add_node("a", StepLog())
        .add_node(
            "inner",
            cf.Flow.builder("hop-inner")
            .add_node("x", StepLog(cf.Action.with_params("next", m=2)))
            .add_node("y", StepLog("out"))
            .add_route("x", "y", "next")
            .build(),
        )
        .add_node("z", StepLog())
        .add_route("a", "inner")
        .add_route("inner", "z", "out")
        .build(),
        "nested capped loop": cf.Flow.builder("hop-nested-loop")
        .add_node(
            "inner",
            cf.Flow.builder("hop-inner-loop")
            .add_node("x", StepLog("again"))
            .add_route("x", "x", "again")
            .max_steps(3)
            .build(),
        )
        .max_steps(50)
        .build(),
    }


async def test_a_plain_hop_routes_as_the_full_decision() -> None:
    """The same runs with the router's plain hops and with every outcome given the full
    decision (its table emptied): the same results, steps, execution ids and params."""

    async def outcome(engine: cf.Engine, flow: cf.Flow) -> tuple[Any, ...]:
        data: dict[str, Any] = {}
        try:
            result = await engine.run(flow, data, run_id=flow.name)
        except cf.CosmoFlowError as exc:
            return (type(exc).__name__, str(exc), data["log"])
        return (result.final_action, result.execution_path, result.steps_executed, data["log"])

    async with cf.open_engine() as engine:
        flows = plain_hop_flows()
        with_hops = {name: await outcome(engine, flow) for name, flow in flows.items()}
        assert len(engine._router._hops) == 6
        engine._router._hops.clear()
        full = {name: await outcome(engine, flow) for name, flow in flows.items()}
    assert with_hops == full
    assert [(node, step, params) for node, step, params in full["chain"][3]] == [
        ("a", "hop-chain:1", {}),
        ("b", "hop-chain:2", {"n": 1}),
        ("c", "hop-chain:3", {}),
    ]
    assert full["capped loop"][0] == "MaxStepsExceeded"
    assert full["nested"][1] == ("a", "x", "y", "z")
    assert full["nested"][3][2][2] == {"m": 2}
    assert full["nested capped loop"][0] == "MaxStepsExceeded"
    assert len(full["nested capped loop"][2]) == 3


async def test_the_router_learns_only_plain_hops() -> None:
    """A conditional route, a route with two choices, a join and a nested flow are not
    plain hops."""
    inner = cf.Flow.builder("inner").add_node("x", Recorder()).build()
    flow = (
        cf.Flow.builder("mixed")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_node("c", Recorder())
        .add_join("j", Recorder())
        .add_node("inner", inner)
        .add_route("a", ["b", "c"], "split")
        .add_route("b", "j")
        .add_route("c", "j")
        .add_route("a", "b", "maybe", when=cf.ActionCondition.key_exists("k"))
        .add_route("a", "c", "maybe")
        .add_route("a", "inner", "deep")
        .add_route("inner", "b", "default")
        .add_route("j", "c", "on")
        .build()
    )
    async with cf.open_engine() as engine:
        await engine.start_run(flow, {})
        learnt = engine._router._hops.items()
        hops = {(node, action): actor.node_id for (f, node, action), actor in learnt if f is flow}
    assert hops == {("inner", "default"): "b", ("j", "on"): "c"}
