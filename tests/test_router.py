"""The five routing rules, END, params, max_steps and nested flows."""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cosmoflow_actors as cf
from cosmoflow_actors.storage.base import RECORD_PREFIX, place_key
from tests.support import Gate, Recorder, node_actors, refused, single


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
    assert info.value.flow_name == "runaway"


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
    assert (info.value.returned_by, info.value.flow_name) == ("i2", "outer")
    assert str(info.value) == (
        "nested flow 'sub' of flow 'outer' ended with action 'surprise' (returned by node "
        "'i2' inside it), which no route accepts; available actions: 'expected'"
    )


async def test_a_no_route_error_names_the_node_deep_inside_nested_flows() -> None:
    middle = cf.Flow.builder("middle").add_node("deeper", inner_flow("surprise")).build()
    flow = (
        cf.Flow.builder("outer")
        .add_node("sub", middle)
        .add_node("after", Recorder())
        .add_route("sub", "after", action="surprise", when=cf.ActionCondition.never())
        .build()
    )
    with pytest.raises(cf.NoRouteError) as info:
        await flow.run({})
    assert (info.value.node_id, info.value.returned_by) == ("sub", "i2")
    assert str(info.value).startswith(
        "nested flow 'sub' of flow 'outer' ended with action 'surprise' (returned by node "
        "'i2' inside it), and the condition of every route on it failed"
    )


async def test_a_no_route_error_names_the_flow_of_a_node_id_used_twice() -> None:
    inner = (
        cf.Flow.builder("inner")
        .add_node("check", Recorder("unrouted"))
        .add_node("y", Recorder())
        .add_route("check", "y", action="ok")
        .build()
    )
    flow = (
        cf.Flow.builder("outer")
        .add_node("check", Recorder("go"))
        .add_node("sub", inner)
        .add_route("check", "sub", action="go")
        .build()
    )
    with pytest.raises(cf.NoRouteError) as info:
        await flow.run({})
    assert (info.value.node_id, info.value.flow_name) == ("check", "inner")
    assert str(info.value).startswith("node 'check' of flow 'inner' returned action 'unrouted'")


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
    assert info.value.flow_name == "inner"


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


async def test_branches_of_one_fan_out_at_two_joins_fail_the_run_naming_the_fan_out() -> None:
    flow = (
        cf.Flow.builder("two-joins")
        .add_node("a", Branch())
        .add_node("b", Branch())
        .add_node("c", Branch())
        .add_join("j1", Branch())
        .add_join("j2", Branch())
        .add_route("a", ["b", "c"])
        .add_route("b", "j1")
        .add_route("c", "j2")
        .build()
    )
    with pytest.raises(cf.CosmoFlowError) as info:
        await flow.run({})
    message = str(info.value)
    assert message.startswith(
        "flow 'two-joins': branches of the fan-out at node 'a' reached two joins, "
    )
    assert "'j1'" in message and "'j2'" in message


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
    ``release``."""

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


async def routed(
    engine: cf.Engine, flow: cf.Flow, storage: cf.Storage, run_id: str | None = None
) -> tuple[Any, ...]:
    """How a run of ``flow`` (on ``storage``, with size 50) ended, and what it stored."""
    async with engine.open_store(storage) as store:
        await store.set("size", 50)
    try:
        result = await engine.run(flow, storage, run_id=run_id)
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
    async with engine.open_store(storage) as store:
        seen = await store.get("seen", [])
    return (*ended, sorted(seen))


async def test_a_durable_run_is_routed_as_a_run_that_is_not(tmp_path: Path) -> None:
    """Each routing decision, for a durable run (whose decisions can be undone, and
    whose end is recorded by the task that routed it) and for a run in memory: the
    same ends."""
    cases = routing_cases()
    async with cf.open_engine() as engine:
        plain = {
            name: await routed(engine, flow, cf.MemoryStorage()) for name, flow in cases.items()
        }
        durable = {
            name: await routed(engine, flow, cf.FileStorage(tmp_path / f"{index}.json"), "r")
            for index, (name, flow) in enumerate(cases.items())
        }
    assert durable == plain
    assert plain["condition"][3] == ["a", "big"]
    assert plain["fan-out"][3] == ["a", "b", "c", "j"]
    assert plain["no route"][0] == "NoRouteError"
    assert plain["max steps"][0] == "MaxStepsExceeded"


async def test_routing_goes_on_while_a_durable_runs_end_is_recorded(tmp_path: Path) -> None:
    """The task that routed a durable run's last outcome writes its record; other runs
    are routed meanwhile, and the run ends once its record is written."""
    storage = HeldAtTheEnd(tmp_path / "held.json")
    async with cf.open_engine() as engine:
        held = await engine.start_run(single(Recorder(), "held"), storage, run_id="held")
        await storage.holding.wait()
        result = await engine.run(routing_cases()["fan-out"], {})
        assert result.execution_path[-1] == "j"
        assert held.current_state is cf.RunState.RUNNING
        storage.release.set()
        assert (await held.wait()).execution_path == ("only",)


class FailureHeld(cf.SQLiteStorage):
    """A real SQLiteStorage that holds the commit of a run's failure record until
    ``release``, and keeps every failure record it commits."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.holding = trio.Event()
        self.release = trio.Event()
        self.failures: list[Any] = []

    async def commit_step(
        self, ops: list[Any], record_key: str, record: Any, steps_before: int
    ) -> bool:
        if record["state"] == "failed":
            self.failures.append(record["error"])
            self.holding.set()
            await self.release.wait()
        return await super().commit_step(ops, record_key, record, steps_before)


class Raises(cf.Node):
    """Raises ``RuntimeError(message)`` in exec once ``gate`` is set."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
        self.gate = trio.Event()

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        await self.gate.wait()
        raise RuntimeError(self.message)


async def test_a_durable_run_whose_end_is_decided_is_routed_nowhere_else(
    tmp_path: Path,
) -> None:
    """One branch of a durable run fails; while its failure is recorded, another branch
    fails too: its outcome leads nowhere, and the run and its record keep the first
    error alone."""
    first, second = Raises("first"), Raises("second")
    flow = (
        cf.Flow.builder("two-fail")
        .add_node("a", Recorder())
        .add_node("b", first)
        .add_node("c", second)
        .add_route("a", ["b", "c"])
        .build()
    )
    storage = FailureHeld(tmp_path / "runs.db")
    async with cf.open_engine() as engine, engine.open_store(storage):
        run = await engine.start_run(flow, storage, run_id="r")
        first.gate.set()
        await storage.holding.wait()
        second.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert run.current_state is cf.RunState.RUNNING
        storage.release.set()
        with pytest.raises(cf.NodeError) as failed:
            await run.wait()
    assert failed.value.node_id == "b"
    assert len(storage.failures) == 1
    assert "node 'b'" in str(storage.failures[0])


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
        assert len(plain_hops(engine)) == 5
        for actor in node_actors(engine):
            actor.hops.clear()
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
    """A conditional route, a route with two choices, a route to a join or into a
    nested flow, and a route out of a nested flow are not plain hops."""
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
        hops = plain_hops(engine)
    assert hops == {("mixed", "j", "on"): "c"}


def plain_hops(engine: cf.Engine) -> dict[tuple[str, str, str], str]:
    """The plain hops the router taught ``engine``'s node actors: (flow name, node,
    action) → the next node."""
    return {
        (actor.flow_name, actor.node_id, action): target.node_id
        for actor in node_actors(engine)
        for action, target in actor.hops.items()
    }


class Gated(cf.Node):
    """Says it has started, then waits for its gate before it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.started = trio.Event()
        self.gate = trio.Event()

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.started.set()
        await self.gate.wait()


class BranchesOf(cf.Node):
    """Completes with where the branches in flight of the durable run ``run_id`` go on,
    as its record and places hold them."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        record = await store.get(RECORD_PREFIX + self.run_id)
        keys = [place_key(self.run_id, number) for number in range(record["places"])]
        places = await store.get_many(keys)
        in_places = [place["branch"] for place in places.values() if "branch" in place]
        return cf.Action.complete([record["last"], *in_places])


class CommitHeldAtW(cf.SQLiteStorage):
    """A real SQLiteStorage that says when each node's step has committed, and holds
    the commit of node "w"'s step until ``release``: the run's commits wait meanwhile."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.committed: dict[str, trio.Event] = {"x": trio.Event(), "w": trio.Event()}
        self.holding = trio.Event()
        self.release = trio.Event()

    async def commit_step(
        self, ops: list[Any], record_key: str, record: Any, steps_before: int
    ) -> bool:
        node_id = record["last"]["node"]
        if node_id == "w":
            self.holding.set()
            await self.release.wait()
        done = await super().commit_step(ops, record_key, record, steps_before)
        if node_id in self.committed:
            self.committed[node_id].set()
        return done


async def test_a_durable_run_failing_while_a_branch_waits_to_commit_keeps_it_resumable(
    tmp_path: Path,
) -> None:
    """A branch's routing fails (its nested flow's fan-out exceeds max_steps) while
    another branch waits to commit a step: that commit, made after the failed routing,
    and the failure's record still hold the failing branch, so resume routes it again
    and fails the same way (a branch left out of the record made the resumed run wait
    for it forever)."""
    x, w, c = Gated(), Gated(), Gated()
    inner = (
        cf.Flow.builder("inner")
        .add_node("x", x)
        .add_node("y", Recorder())
        .add_node("z", Recorder())
        .add_route("x", ["y", "z"])
        .max_steps(1)
        .build()
    )
    flow = (
        cf.Flow.builder("held-commit")
        .add_node("a", Recorder())
        .add_node("sub", inner)
        .add_node("w", w)
        .add_node("c", c)
        .add_join("j", Recorder())
        .add_route("a", ["sub", "w", "c"])
        .add_route("w", "j")
        .add_route("c", "j")
        .build()
    )
    storage = CommitHeldAtW(tmp_path / "runs.db")
    async with cf.open_engine() as engine:
        run = await engine.start_run(flow, storage, run_id="r")
        for node in (x, w, c):
            await node.started.wait()
        w.gate.set()
        await storage.holding.wait()
        # w's commit holds the run's commits: x's waits behind it, then c's.
        x.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        c.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert not storage.committed["x"].is_set()
        storage.release.set()
        with pytest.raises(cf.MaxStepsExceeded):
            await run.wait()
        branches = (await engine.run(single(BranchesOf("r"), "record"), storage)).result
        assert "x" in [branch.get("node") for branch in branches]
        with pytest.raises(cf.MaxStepsExceeded):
            await engine.resume(flow, storage, run_id="r")


# Differential test: the engine against a reference interpreter of the documented
# routing rules (docs/concepts.md "Routing rules", docs/concurrency.md "Fan-out and join",
# docs/howto-nested-flows.md), on random flows.

ACTION_NAMES = ("default", "go", "again", "hi", "lo", "out")


@dataclass(frozen=True)
class Cond:
    """A test of one store key: ``value op number`` (a missing or non-int value fails
    it), or ``key in store`` for the op "exists"."""

    key: str
    op: str
    number: int

    def holds(self, values: Mapping[str, Any]) -> bool:
        """Whether the test holds for ``values``, in plain Python."""
        if self.op == "exists":
            return self.key in values
        value = values.get(self.key)
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        if self.op == "<":
            return value < self.number
        if self.op == ">=":
            return value >= self.number
        return value == self.number

    def condition(self) -> cf.ActionCondition:
        """The same test as the engine's ActionCondition."""
        if self.op == "exists":
            return cf.ActionCondition.key_exists(self.key)
        return cf.ActionCondition.compare(self.key, self.op, self.number)


@dataclass(frozen=True)
class Script:
    """What a generated node does. Its post counts its visits under ``c_<id>`` and
    appends its params to ``p_<id>``, then returns by ``kind``: "fixed" returns
    ``name``; "switch" tests the store itself, "conditional" returns
    ``Action.conditional`` (the engine tests it), both ``name`` if ``test`` holds else
    ``other``; "complete" completes the run if ``test`` holds, else returns ``name``;
    "fail" raises in prep if ``test`` holds then, else returns ``name``. With
    ``params``, the action carries ``{"v_<id>": visits}``. Exec awaits ``checkpoints``
    trio checkpoints, so that branches interleave."""

    node_id: str
    kind: str
    name: str
    other: str
    test: Cond | None
    params: bool
    checkpoints: int

    def names(self) -> tuple[str, ...]:
        """The action names the node may return (besides complete)."""
        if self.kind in ("switch", "conditional"):
            return tuple(dict.fromkeys((self.name, self.other)))
        return (self.name,)

    def fails(self, store: Mapping[str, Any]) -> bool:
        """Whether prep raises, given the store before the step."""
        return self.kind == "fail" and self.test is not None and self.test.holds(store)

    def action(self, store: Mapping[str, Any]) -> tuple[str, dict[str, int], Any]:
        """(name, params, result) of the action post returns, given the store after its
        writes; the name is "complete" for a completion, with the run's result."""
        visits = store[f"c_{self.node_id}"]
        params = {f"v_{self.node_id}": visits} if self.params else {}
        if self.test is None or self.kind in ("fixed", "fail"):
            return self.name, params, None
        if self.kind == "complete":
            if self.test.holds(store):
                return "complete", {}, f"done by {self.node_id} at {visits}"
            return self.name, params, None
        return (self.name if self.test.holds(store) else self.other), params, None


@dataclass
class FlowSpec:
    """A generated flow: nodes (Scripts or nested FlowSpecs), routes in the order added
    (source, action, target, condition), joins, start and max_steps."""

    name: str
    nodes: dict[str, Script | FlowSpec] = field(default_factory=dict)
    routes: list[tuple[str, str, str | tuple[str, ...] | None, Cond | None]] = field(
        default_factory=list
    )
    joins: set[str] = field(default_factory=set)
    start: str = ""
    max_steps: int = 1000
    end_names: set[str] = field(default_factory=set)
    """The action names with which a branch may end in this flow (so leave it)."""

    def sources(self) -> set[str]:
        return {source for source, _, _, _ in self.routes}

    def build(self) -> cf.Flow:
        """The engine's Flow for this spec (nested specs built first)."""
        builder = cf.Flow.builder(self.name)
        for node_id, node in self.nodes.items():
            built: cf.Node | cf.Flow = Scripted(node) if isinstance(node, Script) else node.build()
            if node_id in self.joins:
                builder.add_join(node_id, built)
            else:
                builder.add_node(node_id, built)
        for source, action, target, when in self.routes:
            to = cf.END if target is None else list(target) if isinstance(target, tuple) else target
            builder.add_route(source, to, action, when=None if when is None else when.condition())
        return builder.start(self.start).max_steps(self.max_steps).build()


class Scripted(cf.Node):
    """The engine's node for a Script."""

    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
        test = self.script.test
        if test is not None and self.script.fails(await store.get_many([test.key])):
            raise ValueError(f"{self.script.node_id} fails")

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        for _ in range(self.script.checkpoints):
            await trio.lowlevel.checkpoint()

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        script = self.script
        node_id = script.node_id
        params = dict(ctx.params)
        await store.update(f"c_{node_id}", lambda visits: visits + 1, default=0)
        await store.update(f"p_{node_id}", lambda log: [*log, params], default=[])
        keys = [f"c_{node_id}"] + ([script.test.key] if script.test is not None else [])
        values = await store.get_many(keys)
        if script.kind == "conditional":
            assert script.test is not None
            _, action_params, _ = script.action(values)
            if_true = cf.Action.with_params(script.name, **action_params)
            if_false = cf.Action.with_params(script.other, **action_params)
            return cf.Action.conditional(script.test.condition(), if_true, if_false)
        name, action_params, result = script.action(values)
        if name == "complete":
            return cf.Action.complete(result)
        return cf.Action.with_params(name, **action_params)


Exit = tuple[str, str]
"""(node id, action name): an action of a node that still needs a route."""


class FlowMaker:
    """Draws random valid flows: chains, loops bounded by a visit counter, conditional
    routes, fan-outs with and without joins, nested flows (depth <= 2).

    Every store key a node or route reads belongs to a node that cannot run at the same
    time as the reader (its own lane, an enclosing one, or a fan-out already gathered),
    so each branch runs the same whatever the interleaving. ``lane_of`` maps each node
    to its lane: nodes of one lane never run concurrently.
    """

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.budget = draw(st.integers(3, 16))
        self.next_id = 0
        self.lanes = 0
        self.lane_of: dict[str, int] = {}

    def flow(self, name: str, keys: list[str], lane: int, nest: int) -> FlowSpec:
        spec = FlowSpec(name)
        spec.start, exits, _ = self.lane(spec, keys, lane, nest, main=True, may_end=True)
        self.finish(spec, exits)
        spec.max_steps = self.draw(st.sampled_from([1000, 1000, self.draw(st.integers(1, 12))]))
        return spec

    def lane(
        self, spec: FlowSpec, keys: list[str], lane: int, nest: int, main: bool, may_end: bool
    ) -> tuple[str, list[Exit], bool]:
        """Draw a lane of blocks; return its entry, its open exits, and whether a
        fan-out without a join ends it."""
        entry = ""
        exits: list[Exit] = []
        for _ in range(self.draw(st.integers(1, 3))):
            start, block_exits, ended = self.block(spec, keys, lane, nest, main, may_end)
            self.connect(spec, exits, start)
            entry = entry or start
            exits = block_exits
            if ended or self.budget <= 0:
                return entry, exits, ended
        return entry, exits, False

    def block(
        self, spec: FlowSpec, keys: list[str], lane: int, nest: int, main: bool, may_end: bool
    ) -> tuple[str, list[Exit], bool]:
        kinds = ["node"]
        if self.budget > 2:
            kinds += ["if", "loop", "fork"] + (["nested"] if nest < 2 else [])
        kind = self.draw(st.sampled_from(kinds))
        if kind == "if":
            return (*self.if_block(spec, keys, lane, nest, main), False)
        if kind == "loop":
            return (*self.loop(spec, keys, lane, nest, main), False)
        if kind == "fork":
            return self.fork(spec, keys, lane, nest, may_end)
        if kind == "nested":
            return (*self.nested(spec, keys, lane, nest, join=False), False)
        node_id = self.node(spec, keys, lane, join=main and self.draw(st.booleans()))
        return node_id, self.exits(spec, node_id), False

    def node(self, spec: FlowSpec, keys: list[str], lane: int, join: bool = False) -> str:
        """Add a scripted node to ``spec``. A join outside any fan-out of ``spec`` (its
        main lane) runs as an ordinary node."""
        node_id = f"n{self.next_id}"
        self.next_id += 1
        self.budget -= 1
        kind = self.draw(
            st.sampled_from(["fixed"] * 3 + ["switch", "conditional", "complete", "fail"])
        )
        names = self.draw(st.lists(st.sampled_from(ACTION_NAMES), min_size=2, max_size=2))
        test = None if kind == "fixed" else self.cond(keys, node_id)
        script = Script(
            node_id,
            kind,
            names[0],
            names[1],
            test,
            self.draw(st.booleans()),
            self.draw(st.integers(0, 3)),
        )
        spec.nodes[node_id] = script
        if join:
            spec.joins.add(node_id)
        keys.append(f"c_{node_id}")
        self.lane_of[node_id] = lane
        return node_id

    def cond(self, keys: list[str], node_id: str) -> Cond:
        """A test of a key in ``keys`` or of the visits of ``node_id``."""
        key = self.draw(st.sampled_from([*keys, f"c_{node_id}"]))
        op = self.draw(st.sampled_from(["<", ">=", "==", "exists"]))
        return Cond(key, op, self.draw(st.integers(0, 3)))

    def exits(self, spec: FlowSpec, node_id: str) -> list[Exit]:
        node = spec.nodes[node_id]
        assert isinstance(node, Script)
        return [(node_id, name) for name in node.names()]

    def if_block(
        self, spec: FlowSpec, keys: list[str], lane: int, nest: int, main: bool
    ) -> tuple[str, list[Exit]]:
        """A node (or nested flow) whose first action goes through a sub-lane when a
        condition holds, and (unless it fails the run with NoRouteError) straight on
        otherwise."""
        test_id, exits = self.source(spec, keys, lane, nest)
        when = self.cond(keys, test_id)
        start, then_exits, ended = self.lane(spec, keys, lane, nest, main, may_end=True)
        name = exits[0][1]
        spec.routes.append((test_id, name, start, when))
        fallback = ended or not then_exits or self.draw(st.integers(0, 5)) > 0
        return test_id, then_exits + (exits if fallback else exits[1:])

    def loop(
        self, spec: FlowSpec, keys: list[str], lane: int, nest: int, main: bool
    ) -> tuple[str, list[Exit]]:
        """A body lane and a tail node that goes back to the body while its own visit
        counter is below a bound."""
        start, body_exits, _ = self.lane(spec, keys, lane, nest, main, may_end=False)
        tail = self.node(spec, keys, lane)
        spec.nodes[tail] = Script(tail, "fixed", "again", "again", None, False, 0)
        self.connect(spec, body_exits, tail)
        bound = Cond(f"c_{tail}", "<", self.draw(st.integers(1, 3)))
        spec.routes.append((tail, "again", start, bound))
        return start, [(tail, "again")]

    def source(
        self, spec: FlowSpec, keys: list[str], lane: int, nest: int
    ) -> tuple[str, list[Exit]]:
        """A node, or a nested flow, whose actions a block routes."""
        if nest < 2 and self.budget > 2 and self.draw(st.integers(0, 3)) == 0:
            return self.nested(spec, keys, lane, nest, join=False)
        node_id = self.node(spec, keys, lane)
        return node_id, self.exits(spec, node_id)

    def fork(
        self, spec: FlowSpec, keys: list[str], lane: int, nest: int, may_end: bool
    ) -> tuple[str, list[Exit], bool]:
        """A node (or nested flow) fanning out to 2-3 branch lanes, gathered at a join
        (which may also be a target itself), or (only where the lane may end) ending the
        lane. A branch may arrive at a second join instead (CosmoFlowError if another
        arrives at the first)."""
        source, source_exits = self.source(spec, keys, lane, nest)
        join = not may_end or self.draw(st.booleans())
        targets: list[str] = []
        added: list[str] = []
        arrivals: list[Exit] = []
        stray: list[Exit] = []
        for _ in range(self.draw(st.integers(2, 3))):
            self.lanes += 1
            branch_keys = list(keys)
            start, exits, _ = self.lane(
                spec, branch_keys, self.lanes, nest, main=False, may_end=True
            )
            targets.append(start)
            added += branch_keys[len(keys) :]
            arrives = self.draw(st.integers(0, 9))
            if join and arrives > 1:
                arrivals += exits
            elif join and arrives == 1:
                stray += exits
            else:
                self.finish(spec, exits)
        keys += added
        if not join:
            self.connect(spec, source_exits, tuple(targets))
            return source, [], True
        if stray:
            other_join = self.node(spec, keys, lane, join=True)
            self.connect(spec, stray, other_join)
        if self.draw(st.booleans()) and nest < 2 and self.budget > 2:
            join_id, exits = self.nested(spec, keys, lane, nest, join=True)
        else:
            join_id = self.node(spec, keys, lane, join=True)
            spec.joins.add(join_id)
            exits = self.exits(spec, join_id)
        if not arrivals or self.draw(st.integers(0, 3)) == 0:
            targets.append(join_id)
        self.connect(spec, arrivals, join_id)
        self.connect(spec, source_exits, tuple(targets))
        return source, exits, False

    def nested(
        self, spec: FlowSpec, keys: list[str], lane: int, nest: int, join: bool
    ) -> tuple[str, list[Exit]]:
        """A nested flow node; its flow's end names are routed on (one of several may be
        left unrouted, for NoRouteError)."""
        node_id = f"n{self.next_id}"
        self.next_id += 1
        inner = self.flow(f"sub_{node_id}", keys, lane, nest + 1)
        spec.nodes[node_id] = inner
        if join:
            spec.joins.add(node_id)
        names = sorted(inner.end_names)
        if len(names) > 1 and self.draw(st.integers(0, 5)) == 0:
            names.pop(self.draw(st.integers(0, len(names) - 1)))
        return node_id, [(node_id, name) for name in names]

    def connect(self, spec: FlowSpec, exits: list[Exit], target: str | tuple[str, ...]) -> None:
        for source, name in exits:
            spec.routes.append((source, name, target, None))

    def finish(self, spec: FlowSpec, exits: list[Exit]) -> None:
        """End the lane's open exits: a route to END, or (for a node with no route
        yet) no route at all, for all of the node's exits alike (a node routed on one
        exit only would fail the run with NoRouteError on the others, and they would
        not end the flow, as ``end_names`` says)."""
        routed = spec.sources()
        sources = dict.fromkeys(source for source, _ in exits if source not in routed)
        routeless = {source for source in sources if self.draw(st.booleans())}
        for source, name in exits:
            if source not in routeless:
                spec.routes.append((source, name, None, None))
            spec.end_names.add(name)


Case = tuple[FlowSpec, dict[str, int], dict[str, int], dict[str, int]]
"""A flow, the lane of each of its nodes, a store of visit counters, the run's params."""


@st.composite
def flows_and_stores(draw: st.DrawFn) -> Case:
    """A random flow, the lane of each of its nodes, a store of visit counters and the
    run's params."""
    maker = FlowMaker(draw)
    spec = maker.flow("top", [], 0, 0)
    counters = draw(
        st.dictionaries(st.sampled_from(sorted(maker.lane_of)), st.integers(0, 2), max_size=3)
    )
    params = draw(st.dictionaries(st.sampled_from(["x", "y"]), st.integers(0, 3), max_size=2))
    store = {f"c_{node}": visits for node, visits in counters.items()}
    return spec, maker.lane_of, store, params


Ending = tuple[Any, ...]
"""How a run ended: ("ok", action name, params, result, last node) or ("error", type
name, the error's identifying attributes)."""


class Loud(Exception):
    """Reference: the run ends here (complete or an error), with the endings possible
    (several when branches in flight could each have ended it first)."""

    def __init__(self, *endings: Ending) -> None:
        self.endings = endings


@dataclass
class RefFrame:
    flow: FlowSpec
    node_id: str
    steps: int = 0


@dataclass(frozen=True)
class Arrive:
    join_id: str
    params: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class End:
    node_id: str
    action: tuple[str, tuple[tuple[str, Any], ...]]


@dataclass(frozen=True)
class Expected:
    """One outcome the docs allow. ``exact``: the run's steps all ran (nothing was cut
    short by another branch ending the run), so the path multiset, its order within
    each lane and the store are determined. Otherwise only the ending is, and the path
    lies between ``least`` (the steps before the first fan-out in flight) and ``path``
    (every step the branches would take)."""

    endings: frozenset[Ending]
    exact: bool
    path: tuple[str, ...]
    least: tuple[str, ...]
    store: tuple[tuple[str, Any], ...]


class Chooser:
    """Picks which branch of a fan-out ends last, enumerating every sequence of picks
    over successive reference runs (depth first)."""

    def __init__(self) -> None:
        self.picks: list[tuple[int, int]] = []
        self.position = 0

    def choose(self, options: int) -> int:
        if self.position == len(self.picks):
            self.picks.append((0, options))
        pick = self.picks[self.position][0]
        self.position += 1
        return pick

    def next_sequence(self) -> bool:
        """Move to the next sequence of picks; False when every one has been made."""
        del self.picks[self.position :]
        self.position = 0
        while self.picks:
            pick, options = self.picks.pop()
            if pick + 1 < options:
                self.picks.append((pick + 1, options))
                return True
        return False


class Reference:
    """The routing rules as the docs state them, run sequentially in plain Python: one
    branch after another (branches touch disjoint keys, so the store is as after any
    interleaving)."""

    def __init__(
        self,
        top: FlowSpec,
        store: Mapping[str, Any],
        params: Mapping[str, Any],
        chooser: Chooser,
    ) -> None:
        self.top = top
        self.params = params
        self.store = dict(store)
        self.chooser = chooser
        self.path: list[str] = []
        self.steps = 0
        self.forks = 0
        self.over = False
        self.cut = False
        self.least: list[str] = []

    def run(self) -> Expected:
        try:
            frames = [RefFrame(self.top, self.top.start)]
            end = self.branch(frames, self.top.start, self.params, None)
        except Loud as loud:
            return self.expected(frozenset(loud.endings))
        assert isinstance(end, End)
        name, params = end.action
        return self.expected(frozenset({("ok", name, params, None, end.node_id)}))

    def expected(self, endings: frozenset[Ending]) -> Expected:
        exact = not (self.cut or self.over)
        least = tuple(self.path) if exact else tuple(self.least)
        store = tuple(sorted(self.store.items()))
        return Expected(endings, exact, tuple(self.path), least, store)

    def enter(self, frames: list[RefFrame], node_id: str) -> str:
        """Move to ``node_id`` (into nested flows, down to a node) and count the step."""
        frames[-1].node_id = node_id
        node = frames[-1].flow.nodes[node_id]
        while isinstance(node, FlowSpec):
            frames.append(RefFrame(node, node.start))
            node_id = node.start
            node = node.nodes[node_id]
        self.steps += 1
        if self.steps > self.top.max_steps:
            if not self.forks:
                raise Loud(("error", "MaxStepsExceeded", (self.top.max_steps,)))
            self.over = True
        for frame in frames[1:]:
            frame.steps += 1
            if frame.steps > frame.flow.max_steps:
                raise Loud(("error", "MaxStepsExceeded", (frame.flow.max_steps,)))
        return node_id

    def step(self, script: Script, params: Mapping[str, Any]) -> tuple[str, dict[str, int], Any]:
        """Run a node: prep's test, post's writes, its action."""
        node_id = script.node_id
        self.path.append(node_id)
        if script.fails(self.store):
            raise Loud(("error", "NodeError", (node_id, "prep")))
        self.store[f"c_{node_id}"] = self.store.get(f"c_{node_id}", 0) + 1
        self.store[f"p_{node_id}"] = [*self.store.get(f"p_{node_id}", []), dict(params)]
        return script.action(self.store)

    def target(self, frame: RefFrame, name: str) -> str | tuple[str, ...] | None:
        """Rules 2-4: the first matching route's target; None (END) without routes."""
        routes = [r for r in frame.flow.routes if r[0] == frame.node_id]
        if not routes:
            return None
        for _, action, target, when in routes:
            if action == name and (when is None or when.holds(self.store)):
                return target
        raise Loud(("error", "NoRouteError", (frame.node_id, name)))

    def branch(
        self,
        frames: list[RefFrame],
        node_id: str,
        params: Mapping[str, Any],
        fork_depth: int | None,
    ) -> Arrive | End:
        """Run a branch from entering ``node_id`` until it ends at the fan-out's depth
        (or the run's end), or arrives at a join of its fan-out."""
        state: tuple[str, str, Any] = ("enter", node_id, params)
        while True:
            what, node_id, detail = state
            if what == "enter":
                node_id = self.enter(frames, node_id)
                script = frames[-1].flow.nodes[node_id]
                assert isinstance(script, Script)
                name, action_params, result = self.step(script, detail)
                if name == "complete":
                    raise Loud(("ok", "complete", (), result, node_id))
                state = ("route", node_id, (name, tuple(sorted(action_params.items()))))
            elif what == "route":
                state, arrival = self.route(frames, node_id, detail, fork_depth)
                if arrival is not None:
                    return arrival
            else:
                if len(frames) == fork_depth or len(frames) == 1:
                    return End(node_id, detail)
                frames.pop()
                state = ("route", node_id, detail)

    def route(
        self,
        frames: list[RefFrame],
        node_id: str,
        action: tuple[str, tuple[tuple[str, Any], ...]],
        fork_depth: int | None,
    ) -> tuple[tuple[str, str, Any], Arrive | None]:
        """Where the branch goes after ``node_id`` returned ``action``."""
        frame = frames[-1]
        target = self.target(frame, action[0])
        if target is None:
            return ("end", node_id, action), None
        if isinstance(target, tuple):
            gathered = self.fork(frames, target, dict(action[1]))
            if isinstance(gathered, Arrive):
                return ("enter", gathered.join_id, dict(gathered.params)), None
            return ("end", gathered.node_id, gathered.action), None
        if target in frame.flow.joins and len(frames) == fork_depth:
            return ("arrived", node_id, None), Arrive(target, action[1])
        return ("enter", target, dict(action[1])), None

    def fork(
        self, frames: list[RefFrame], targets: tuple[str, ...], params: dict[str, Any]
    ) -> Arrive | End:
        """Rules 6-7: run each branch; gather at the join, or end as the last branch
        did (any of them: the reference tries each)."""
        if not self.forks:
            self.least = list(self.path)
        self.forks += 1
        flow = frames[-1].flow
        outcomes: list[Arrive | End] = []
        endings: list[Ending] = []
        for target in targets:
            if target in flow.joins:
                outcomes.append(Arrive(target, tuple(sorted(params.items()))))
                continue
            child = [RefFrame(f.flow, f.node_id, f.steps) for f in frames]
            try:
                outcomes.append(self.branch(child, target, params, len(frames)))
            except Loud as loud:
                self.cut = True
                endings += loud.endings
        self.forks -= 1
        arrivals = [o for o in outcomes if isinstance(o, Arrive)]
        joins = tuple(sorted({arrival.join_id for arrival in arrivals}))
        if len(joins) > 1:
            self.cut = True
            endings.append(("error", "CosmoFlowError", joins))
        if self.over and (endings or not self.forks):
            endings.append(("error", "MaxStepsExceeded", (self.top.max_steps,)))
        if endings:
            raise Loud(*endings)
        if arrivals:
            merged = dict(item for arrival in arrivals for item in arrival.params)
            return Arrive(arrivals[0].join_id, tuple(sorted(merged.items())))
        ends = list(dict.fromkeys(o for o in outcomes if isinstance(o, End)))
        return ends[self.chooser.choose(len(ends))]


def expected_outcomes(
    spec: FlowSpec, store: Mapping[str, Any], params: Mapping[str, Any]
) -> list[Expected]:
    """Every outcome the reference allows (one per sequence of last branches)."""
    chooser = Chooser()
    outcomes = [Reference(spec, store, params, chooser).run()]
    while chooser.next_sequence():
        outcomes.append(Reference(spec, store, params, chooser).run())
        assume(len(outcomes) <= 64)
    return outcomes


@dataclass(frozen=True)
class Seen:
    """What a run of the engine gave: its ending, path and store."""

    ending: Ending
    path: tuple[str, ...]
    steps: int
    store: tuple[tuple[str, Any], ...]

    def unordered(self) -> Seen:
        """The same with its path sorted: branches may interleave differently."""
        return Seen(self.ending, tuple(sorted(self.path)), self.steps, self.store)


def ending_of(result: cf.FlowResult) -> Ending:
    action = result.final_action
    params = tuple(sorted(action.params.items()))
    return ("ok", action.name, params, result.result, result.last_node_id)


def error_ending(error: cf.CosmoFlowError) -> Ending:
    if isinstance(error, cf.NodeError):
        return ("error", "NodeError", (error.node_id, error.phase))
    if isinstance(error, cf.NoRouteError):
        return ("error", "NoRouteError", (error.node_id, error.action))
    if isinstance(error, cf.MaxStepsExceeded):
        return ("error", "MaxStepsExceeded", (error.max_steps,))
    # The joins a fan-out's branches reached, after the flow and node it names first.
    joins = str(error).partition("reached two joins")[2]
    return ("error", type(error).__name__, tuple(sorted(re.findall("'([^']*)'", joins))))


async def user_data(engine: cf.Engine, storage: cf.Storage) -> tuple[tuple[str, Any], ...]:
    """Every user key of ``storage`` and its value, read by a run on ``engine``."""

    @cf.node
    async def dump(ctx: cf.ExecutionContext) -> cf.Action:
        keys = await ctx.store.keys()
        return cf.Action.complete(sorted((await ctx.store.get_many(keys)).items()))

    result = await engine.run(single(dump, "dump"), storage)
    return tuple(tuple(item) for item in result.result)


async def observe(
    engine: cf.Engine,
    flow: cf.Flow,
    storage: cf.Storage,
    params: Mapping[str, Any],
    run_id: str | None,
    resume: bool = False,
) -> tuple[Seen, cf.FlowResult | None]:
    """Run ``flow`` on ``storage`` (resume the durable run ``run_id``); what it gave,
    and its result if it succeeded."""
    try:
        if resume:
            assert run_id is not None
            result = await engine.resume(flow, storage, run_id=run_id)
        else:
            result = await engine.run(flow, storage, params=params, run_id=run_id)
    except cf.CosmoFlowError as error:
        return Seen(error_ending(error), (), 0, await user_data(engine, storage)), None
    path = result.execution_path
    seen = Seen(ending_of(result), path, result.steps_executed, await user_data(engine, storage))
    return seen, result


def lanes(path: Sequence[str], lane_of: Mapping[str, int]) -> dict[int, list[str]]:
    """``path`` split by lane, each in path order."""
    split: dict[int, list[str]] = {}
    for node_id in path:
        split.setdefault(lane_of[node_id], []).append(node_id)
    return split


def allowed(seen: Seen, expected: Expected, lane_of: Mapping[str, int]) -> bool:
    """Whether ``seen`` is the outcome ``expected`` describes (see Expected)."""
    if seen.ending not in expected.endings:
        return False
    succeeded = seen.ending[0] == "ok"
    if succeeded and seen.steps != len(seen.path):
        return False
    if not expected.exact:
        used = collections.Counter(seen.path)
        return not succeeded or collections.Counter(expected.least) <= used <= collections.Counter(
            expected.path
        )
    if seen.store != expected.store:
        return False
    if not succeeded:
        return True
    same_steps = collections.Counter(seen.path) == collections.Counter(expected.path)
    return same_steps and lanes(seen.path, lane_of) == lanes(expected.path, lane_of)


def described(spec: FlowSpec, depth: int = 0) -> str:
    """``spec`` as text, for a failing example's report."""
    pad = "  " * depth
    lines = [f"{pad}flow {spec.name} start={spec.start} max_steps={spec.max_steps}"]
    for node_id, node in spec.nodes.items():
        join = " (join)" if node_id in spec.joins else ""
        if isinstance(node, FlowSpec):
            lines += [f"{pad}  {node_id}{join}:", described(node, depth + 2)]
        else:
            lines.append(f"{pad}  {node_id}{join}: {node}")
    lines += [f"{pad}  route {route}" for route in spec.routes]
    return "\n".join(lines)


_durable_runs = itertools.count()


@pytest.mark.slow
@settings(
    max_examples=500,
    deadline=None,  # no test depends on the machine's speed
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(flows_and_stores())
async def test_runs_route_as_the_documented_rules_say(tmp_path: Path, case: Case) -> None:
    """Random flows (chains, bounded loops, conditional routes and actions, fan-outs
    with and without joins, nested flows, completions, failures, max_steps) run on a
    memory store and durably on SQLite give an outcome the reference interpreter allows:

    - the ending always matches: success or the error's type (with its node, action or
      max_steps), final action with its params, result and last node. Where a fan-out
      ends without a join, the last branch to end is any of them.
    - when every step ran to the end (no branch cut short by another ending the run):
      the same store, the same multiset of steps with ``steps_executed`` its size, and
      the same order within each lane (the steps no two branches can run at once);
      branches of a fan-out interleave freely.
    - when a branch ended the run while others were in flight: the path holds every step
      before the first fan-out and no step the branches would not take.

    A durable run that succeeded is resumed: it returns its recorded result and runs
    nothing again.
    """
    spec, lane_of, initial, params = case
    outcomes = expected_outcomes(spec, initial, params)
    flow = spec.build()
    store = dict(initial)
    async with cf.open_engine() as engine:
        memory, _ = await observe(engine, flow, cf.MemoryStorage(store), params, None)
        storage = cf.SQLiteStorage(tmp_path / f"durable-{next(_durable_runs)}.db")
        await engine.run(single(Seeds(initial), "seed"), storage)
        durable, result = await observe(engine, flow, storage, params, "durable")
        again, resumed = await observe(engine, flow, storage, params, "durable", resume=True)
    if result is not None:
        assert resumed is not None
        assert again == durable
        assert resumed.execution_path == result.execution_path
    elif len(outcomes) == 1 and outcomes[0].exact:
        assert again == durable
    report = f"{described(spec)}\nstore {initial} params {params}\noutcomes {outcomes}"
    assert any(allowed(memory, outcome, lane_of) for outcome in outcomes), (
        f"{report}\nmemory run {memory}"
    )
    assert any(allowed(durable, outcome, lane_of) for outcome in outcomes), (
        f"{report}\ndurable run {durable}"
    )
    if len(outcomes) == 1 and outcomes[0].exact:
        assert durable.unordered() == memory.unordered()


class Seeds(cf.Node):
    """Sets the given keys."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        super().__init__()
        self.data = data

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        await store.set_many(self.data)


class CountsReads(cf.MemoryStorage):
    """Memory storage (served by the store actor's task, not directly) that counts the
    keys each get_many asks for."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.asked: list[list[str]] = []

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        self.asked.append(sorted(keys))
        return await super().get_many(keys)


async def test_a_step_reads_the_condition_keys_its_routing_may_evaluate_only() -> None:
    """In the run's own flow each step reads the keys of its node's routes only: ``a``
    and ``c`` (one plain route) none; ``b`` and ``d`` their own condition's, though a
    route of each ends the flow."""
    flow = (
        cf.Flow.builder("reads")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_node("c", Recorder())
        .add_node("d", Recorder())
        .add_route("a", "b")
        .add_route("b", "c", when=cf.ActionCondition.key_exists("go"))
        .add_route("b", cf.END)
        .add_route("c", "d")
        .add_route("d", "c", when=cf.ActionCondition.key_exists("elsewhere"))
        .add_route("d", cf.END)
        .build()
    )
    storage = CountsReads({"go": True})
    result = await flow.run(storage)
    assert result.execution_path == ("a", "b", "c", "d")
    assert storage.asked == [["go"], ["elsewhere"]]


async def test_a_step_that_may_end_a_nested_flow_reads_the_keys_of_the_runs_flows() -> None:
    """``inner``'s ``b`` may end it, and routing then goes on in ``outer``, whose
    condition reads ``next``: ``b`` reads every key of the run's flows; ``a`` (a plain
    route inside) reads none, and ``after`` (in the run's own flow) none."""
    inner = (
        cf.Flow.builder("inner")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b")
        .add_route("b", "a", when=cf.ActionCondition.key_exists("again"))
        .add_route("b", cf.END)
        .build()
    )
    outer = (
        cf.Flow.builder("outer")
        .add_node("inner", inner)
        .add_node("after", Recorder())
        .add_route("inner", "after", when=cf.ActionCondition.key_exists("next"))
        .build()
    )
    storage = CountsReads({"next": True})
    result = await outer.run(storage)
    assert result.execution_path == ("a", "b", "after")
    assert storage.asked == [["again", "next"]]


class LookupFailing(cf.Flow):
    """A flow whose route lookup raises KeyError: a bug in routing's reads of a flow."""

    def has_routes(self, node_id: str) -> bool:
        raise KeyError(node_id)


async def test_a_lookup_that_fails_while_routing_fails_that_run_alone_from_that_error() -> None:
    built = single(Recorder(), "buggy")
    parts = (built.name, built.nodes, built.routes, built.start_id, built.max_steps)
    buggy = LookupFailing._built(*parts)  # a Flow() call is refused: build() makes flows
    gate = Gate()
    async with cf.open_engine() as engine:
        other = await engine.start_run(single(gate, "other"))
        with pytest.raises(cf.CosmoFlowError) as info:
            await engine.run(buggy, {})
        gate.open.set()
        assert (await other.wait()).execution_path == ("only",)
    assert re.fullmatch(
        r"run '[^']+': routing the outcome of node 'only' failed with KeyError: 'only' \(a "
        r"bug of the engine's, or a run whose state does not fit its flow\); this run "
        r"fails, the engine's other runs go on",
        str(info.value),
    )
    assert isinstance(info.value.__cause__, KeyError)
