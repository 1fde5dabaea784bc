"""FlowBuilder validation, the compiled routing table, Flow.run and Flow.run_sync."""

from __future__ import annotations

import asyncio
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pocketflow
import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.flow import MAX_NESTING, flows_within, refusing_runs
from tests.support import (
    CHILDREN_OF_THE_LOOP,
    CHILDREN_ON_THE_BRANCHES,
    Recorder,
    a_then_b,
    batch_flow_twice_in_a_loop,
    batch_flows_on_two_branches,
    refused,
)


def test_build_rejects_a_flow_without_nodes() -> None:
    with pytest.raises(cf.FlowValidationError, match="no nodes"):
        cf.Flow.builder("empty").build()


def test_build_names_a_duplicate_id() -> None:
    builder = cf.Flow.builder("dup").add_node("a", Recorder()).add_node("a", Recorder())
    with pytest.raises(cf.FlowValidationError, match="duplicate node id 'a'"):
        builder.build()


def test_build_names_routes_from_and_to_unknown_nodes() -> None:
    builder = (
        cf.Flow.builder("bad-routes")
        .add_node("a", Recorder())
        .add_route("ghost", "a")
        .add_route("a", "phantom")
    )
    error = refused(builder)
    assert error.problems == (
        "route from unknown node 'ghost'",
        "route from 'a' to unknown node 'phantom'",
    )
    assert error.flow_name == "bad-routes"


def test_build_says_to_route_to_cf_end_instead_of_the_string_end() -> None:
    builder = cf.Flow.builder("f").add_node("a", Recorder()).add_route("a", "END", "done")

    assert refused(builder).problems == (
        "route from 'a' to unknown node 'END' (to end the run there, route to cf.END)",
    )


class KeysAsList(cf.ActionCondition):
    def evaluate(self, values: Any) -> bool:
        return True

    @property
    def keys(self) -> Any:
        return ["label"]


def test_build_says_what_a_route_condition_must_be() -> None:
    builder = (
        cf.Flow.builder("f")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b", "x", when=lambda store: True)  # type: ignore[arg-type]
        .add_route("a", "b", "y", when=KeysAsList())
    )

    assert refused(builder).problems == (
        "route 'a' -> 'b': when is a function, not an ActionCondition (write "
        "cf.ActionCondition.expression(...), or subclass cf.ActionCondition for a test in "
        "Python)",
        "route 'a' -> 'b': the keys of condition KeysAsList must be a frozenset of str (the "
        "store keys evaluate reads), got ['label']",
    )


def test_build_names_an_unknown_start_node() -> None:
    builder = cf.Flow.builder("f").add_node("a", Recorder()).start("nowhere")
    with pytest.raises(cf.FlowValidationError, match="start node 'nowhere'"):
        builder.build()


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (
            lambda b: b.add_join(["j"], Recorder()),
            "a node id must be a non-empty str, got ['j']",
        ),
        (
            lambda b: b.add_route(["a"], cf.END),
            "a route's source must be a node id (a str), got ['a']",
        ),
        (
            lambda b: b.add_route("a", [["b"]]),
            "the target must be a node id, cf.END or a non-empty list of node ids, got [['b']]",
        ),
        (lambda b: b.start(["a"]), "start node ['a'] is not a node of the flow"),
    ],
    ids=["join", "source", "fan-out", "start"],
)
def test_ids_that_are_no_str_are_problems_build_names(
    build: Callable[[cf.FlowBuilder], cf.FlowBuilder], problem: str
) -> None:
    builder = build(cf.Flow.builder("f").add_node("a", Recorder()))
    with pytest.raises(cf.FlowValidationError) as info:
        builder.build()
    assert problem in str(info.value)


def test_build_rejects_a_non_node_and_a_bad_max_steps() -> None:
    builder = cf.Flow.builder("f").add_node("a", object()).max_steps(0)  # type: ignore[arg-type]
    error = refused(builder)
    assert "node 'a' is an object, not a Node or Flow" in error.problems
    assert "max_steps must be >= 1, got 0" in error.problems


def test_build_names_a_bad_flow_name_node_id_and_action() -> None:
    builder = (
        cf.Flow.builder("")
        .add_node("a", Recorder())
        .add_node("", Recorder())
        .add_node(3, Recorder())  # type: ignore[arg-type]
        .add_node("x/y", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b", action="")
    )
    error = refused(builder)
    assert error.problems == (
        "a node id must be a non-empty str, got ''",
        "a node id must be a non-empty str, got 3",
        "node id 'x/y' contains '/', which separates a flow's name from its node ids "
        "(in statistics() and traces)",
        "route from 'a': an action must be a non-empty str, got ''",
        "the flow's name must be a non-empty str, got ''",
    )


def test_build_names_a_node_id_and_a_flow_name_utf_8_cannot_encode() -> None:
    """A durable run keeps them as UTF-8: a lone surrogate failed it part-way."""
    builder = (
        cf.Flow.builder("f\udc00")
        .add_node("a", Recorder("go"))
        .add_node("b\ud800", Recorder())
        .add_route("a", "b\ud800", "go")
    )
    error = refused(builder)
    assert error.problems == (
        "node id 'b\\ud800' cannot be encoded as UTF-8: surrogates not allowed",
        "the flow's name 'f\\udc00' cannot be encoded as UTF-8: surrogates not allowed",
    )


def test_build_names_a_route_action_utf_8_cannot_encode() -> None:
    builder = (
        cf.Flow.builder("f")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b", "go\udfff")
    )
    assert refused(builder).problems == (
        "route from 'a': action 'go\\udfff' cannot be encoded as UTF-8: surrogates not allowed",
    )


@pytest.mark.parametrize("refused_node", ["x/y", "not a node"])
def test_a_refused_node_is_named_once_not_also_as_missing_or_unreachable(
    refused_node: str,
) -> None:
    builder = cf.Flow.builder("f")
    if refused_node == "x/y":
        builder.add_node("x/y", Recorder())
    else:
        builder.add_node("a", Recorder()).add_node("b", 3)  # type: ignore[arg-type]
    assert len(refused(builder).problems) == 1


class ExecWithoutContext(cf.Node):
    def exec(self, prep_res: Any) -> None:  # type: ignore[override]
        return None


class PostWithoutResult(cf.Node):
    async def post(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:  # type: ignore[override]
        return None


class TakesMore(cf.Node):
    def exec(self, *args: Any) -> None:
        return None

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext, extra: int = 1) -> None:
        return None


def test_build_names_a_phase_method_the_engine_cannot_call() -> None:
    builder = (
        cf.Flow.builder("f")
        .add_node("a", ExecWithoutContext())
        .add_node("b", PostWithoutResult())
        .add_node("c", TakesMore())
        .add_route("a", "b")
        .add_route("b", "c")
    )
    error = refused(builder)
    assert error.problems == (
        "node 'a': exec(prep_res) cannot be called as exec(prep_res, ctx)",
        "node 'b': post(store, ctx) cannot be called as post(store, prep_res, exec_res, ctx)",
    )


class NoPost(cf.Node):
    post = None  # type: ignore[assignment]


class NamedExec(cf.Node):
    exec = "run"  # type: ignore[assignment]


class ShadowedPrep(cf.Node):
    def __init__(self) -> None:
        super().__init__()
        self.prep = 42  # type: ignore[assignment,method-assign]


def test_build_names_a_phase_that_cannot_be_called() -> None:
    builder = (
        cf.Flow.builder("f")
        .add_node("a", NoPost())
        .add_node("b", NamedExec())
        .add_node("c", ShadowedPrep())
        .add_route("a", "b")
        .add_route("b", "c")
    )
    assert refused(builder).problems == (
        "node 'a': post is None, which cannot be called: it must be a method, "
        "post(self, store, prep_res, exec_res, ctx)",
        "node 'b': exec is 'run', which cannot be called: it must be a method, "
        "exec(self, prep_res, ctx)",
        "node 'c': prep is 42, which cannot be called: it must be a method, prep(self, store, ctx)",
    )


class AsyncGeneratorExec(cf.Node):
    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> Any:
        yield prep_res


class GeneratorPost(cf.Node):
    def post(self, store: Any, prep_res: Any, exec_res: Any, ctx: Any) -> Any:
        yield "default"


class GeneratorPrep(cf.Node):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        yield 1


class GeneratorItems(cf.BatchNode):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        yield from (1, 2)

    def exec(self, item: int, ctx: cf.ExecutionContext) -> int:
        return item * 10

    async def post(self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: Any) -> Any:
        return cf.Action.complete(exec_res)


def test_build_names_a_phase_method_that_yields_instead_of_returning() -> None:
    builder = (
        cf.Flow.builder("f")
        .add_node("a", AsyncGeneratorExec())
        .add_node("b", GeneratorPost())
        .add_node("c", GeneratorPrep())
        .add_route("a", "b")
        .add_route("b", "c")
    )
    error = refused(builder)
    assert error.problems == (
        "node 'a': exec is an async generator function (it yields); it must return its result",
        "node 'b': post is a generator function (it yields); it must return its result",
        "node 'c': prep is a generator function (it yields); it must return its result",
    )


class PocketFlowNames(cf.Node):
    """A node ported from PocketFlow's AsyncNode with its method names kept."""

    async def prep_async(self, shared: dict[str, Any]) -> Any:
        return shared["text"]

    async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> Any:
        shared["out"] = prep_res


class ExecAsyncHelper(cf.Node):
    """A node whose exec_async is its own helper, called by its exec."""

    async def exec_async(self, prep_res: Any) -> str:
        return "helped"

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
        return await self.exec_async(prep_res)

    def post(self, store: Any, prep_res: Any, exec_res: Any, ctx: Any) -> cf.Action:
        return cf.Action.complete(exec_res)


def test_build_names_pocketflow_async_methods_the_engine_never_calls() -> None:
    error = refused(cf.Flow.builder("f").add_node("a", PocketFlowNames()))
    assert error.problems == (
        "node 'a': prep_async is never called (it is PocketFlow's name); "
        "name it prep, as async def prep(self, store, ctx)",
    )


class PocketFlowBatch(cf.BatchFlow):
    """A BatchFlow ported from PocketFlow's AsyncBatchFlow with prep_async kept: the
    BatchFlow's own prep (no parameter sets) would run no child."""

    async def prep_async(self, shared: dict[str, Any]) -> Any:
        return [{"n": n} for n in shared["numbers"]]


def test_build_names_pocketflow_prep_async_on_a_batch_flow() -> None:
    inner = cf.Flow.builder("inner").add_node("a", Recorder()).build()
    error = refused(cf.Flow.builder("f").add_node("each", PocketFlowBatch(inner)))
    assert error.problems == (
        "node 'each': prep_async is never called (it is PocketFlow's name); "
        "name it prep, as async def prep(self, store, ctx)",
    )


class NoSubFlow(cf.BatchFlow):
    """Its __init__ skips BatchFlow's, so it has no sub-flow."""

    def __init__(self, flow: cf.Flow) -> None:
        self.kept = flow


def test_build_names_a_batch_flow_whose_init_skipped_batch_flows() -> None:
    inner = cf.Flow.builder("inner").add_node("a", Recorder()).build()
    error = refused(cf.Flow.builder("f").add_node("each", NoSubFlow(inner)))
    assert error.problems == (
        "node 'each': it has no sub-flow: its __init__ must call super().__init__(flow)",
    )


def test_an_async_named_helper_beside_its_phase_is_accepted() -> None:
    flow = cf.Flow.builder("f").add_node("a", ExecAsyncHelper()).build()
    assert flow.run_sync().result == "helped"


def test_a_batch_node_prep_may_yield_its_items() -> None:
    flow = cf.Flow.builder("f").add_node("items", GeneratorItems()).build()
    assert flow.run_sync().result == [10, 20]


def test_build_rejects_config_changed_after_construction() -> None:
    node = Recorder()
    node.max_retries = 0
    with pytest.raises(cf.FlowValidationError, match="node 'a': max_retries"):
        cf.Flow.builder("f").add_node("a", node).build()


def test_build_names_a_route_whose_target_is_not_a_node_id_end_or_list() -> None:
    builder = cf.Flow.builder("f").add_node("a", Recorder())
    builder.add_route("a", None, action="go")  # type: ignore[arg-type]
    builder.add_route("a", 5)  # type: ignore[arg-type]
    error = refused(builder)
    assert error.problems == (
        "route from 'a' on action 'go': the target must be a node id, cf.END or a "
        "non-empty list of node ids, got None",
        "route from 'a' on action 'default': the target must be a node id, cf.END or a "
        "non-empty list of node ids, got 5",
    )


def test_build_names_a_route_that_an_unconditional_route_before_it_shadows() -> None:
    builder = (
        cf.Flow.builder("f")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_node("c", Recorder())
        .add_route("a", "b", action="go")
        .add_route("a", "c", action="go", when=cf.ActionCondition.always())
        .add_route("a", ["b", "c"], action="go")
        .add_route("a", cf.END)
    )
    error = refused(builder)
    assert error.problems == (
        "route from 'a' on action 'go' to 'c' can never be taken: the route to 'b' "
        "added before it has no when= (only an action's last route may lack one)",
        "route from 'a' on action 'go' to ('b', 'c') can never be taken: the route to 'b' "
        "added before it has no when= (only an action's last route may lack one)",
    )


def test_conditional_routes_may_precede_one_unconditional_fallback() -> None:
    flow = (
        cf.Flow.builder("f")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b", when=cf.ActionCondition.key_exists("x"))
        .add_route("a", "a", when=cf.ActionCondition.key_exists("y"))
        .add_route("a", cf.END)
        .add_route("b", cf.END, action="other")
        .build()
    )
    assert [route.target for route in flow.routes_for("a", "default")] == ["b", "a", cf.END]


def test_a_built_flows_nodes_are_read_only_and_it_still_pickles() -> None:
    flow = cf.Flow.builder("f").add_node("a", Recorder()).build()
    with pytest.raises(TypeError):
        flow.nodes["a"] = flow  # type: ignore[index]
    copy = pickle.loads(pickle.dumps(flow))
    assert list(copy.nodes) == ["a"] and copy.start_id == "a"


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("nodes", {"a": Recorder()}),
        ("start_id", "zzz"),
        ("max_steps", "x"),
        ("routes", ()),
        ("name", 123),
        ("joins", frozenset({"b"})),
        ("depth", 0),
        ("_table", {}),
        ("anything_new", 1),
    ],
)
def test_a_built_flow_is_immutable(attribute: str, value: Any) -> None:
    """Changed after build(), a flow failed mid-run (KeyError, TypeError, RecursionError)."""
    flow = a_then_b("f")
    message = f"cannot change {attribute!r} of flow 'f': a flow is immutable once built"
    with pytest.raises(AttributeError, match=message):
        setattr(flow, attribute, value)
    with pytest.raises(AttributeError, match=message):
        delattr(flow, attribute)
    with pytest.raises(TypeError):
        flow.route_table()[("b", "default")] = ()  # type: ignore[index]
    assert flow.run_sync().execution_path == ("a", "b")


def test_a_flow_is_made_only_by_its_builder() -> None:
    """Called directly, the constructor skipped build()'s checks: the run failed."""
    with pytest.raises(TypeError, match=r"only by its builder.*cf\.Flow\.builder\(name\)"):
        cf.Flow("f", {}, (), "a", 1000)


def test_a_nested_flow_survives_pickling_whole() -> None:
    inner = a_then_b("inner")
    flow = cf.Flow.builder("outer").add_node("in", inner).build()
    copy = pickle.loads(pickle.dumps(flow))
    assert copy.depth == 2 and copy.exit_actions() is None
    assert list(copy.route_table()) == []
    with pytest.raises(AttributeError, match="immutable"):
        copy.name = "other"
    assert copy.run_sync().execution_path == ("a", "b")


def test_validation_error_is_a_value_error() -> None:
    assert issubclass(cf.FlowValidationError, ValueError)


def test_the_first_node_added_is_the_default_start() -> None:
    builder = cf.Flow.builder("f").add_node("x", Recorder()).add_node("y", Recorder())
    assert builder.add_route("x", "y").build().start_id == "x"


async def plain_function(ctx: cf.ExecutionContext) -> None:
    """Not a node: it lacks the @cf.node decorator."""


def test_a_plain_function_is_refused_with_a_hint_and_nothing_else() -> None:
    """The function is the only fault: the flow is not also said to have no nodes, nor its
    routes to come from an unknown node."""
    builder = cf.Flow.builder("f").add_node("a", plain_function)  # type: ignore[arg-type]
    builder.add_node("b", Recorder()).add_route("a", "b")
    error = refused(builder)
    assert error.problems == (
        "node 'a' is a function, not a Node or Flow "
        "(decorate a function with @cf.node to make it a node)",
    )


def test_a_node_class_is_refused_with_the_instance_to_add() -> None:
    """A class is callable, but decorating it with @cf.node is not the fix: making an
    instance is."""
    builder = cf.Flow.builder("f").add_node("a", Recorder)  # type: ignore[arg-type]
    builder.add_node("b", cf.BatchFlow).add_node("c", int)  # type: ignore[arg-type]
    builder.add_route("a", "b").add_route("b", "c")

    assert refused(builder).problems == (
        "node 'a' is the class Recorder, not an instance of it",
        "node 'b' is the class BatchFlow, not an instance of it",
        "node 'c' is the class int, not a Node or Flow",
    )


class PocketFlowNode(pocketflow.AsyncNode):  # type: ignore[misc]
    """A node of PocketFlow, not ported."""


def test_a_builder_or_end_added_as_a_node_is_named_for_what_it_is() -> None:
    unbuilt = cf.Flow.builder("inner").add_node("x", Recorder())
    builder = cf.Flow.builder("f").add_node("a", unbuilt)  # type: ignore[arg-type]
    builder.add_node("b", cf.END).add_route("a", "b")  # type: ignore[arg-type]

    assert refused(builder).problems == (
        "node 'a' is a FlowBuilder, not a Flow: call .build() on it and add the flow it returns",
        "node 'b' is cf.END, the route target that ends a flow, not a node: route to it "
        "with add_route(source, cf.END, action)",
    )


def test_a_pocketflow_node_is_refused_with_where_to_port_it() -> None:
    builder = cf.Flow.builder("f").add_node("a", PocketFlowNode())  # type: ignore[arg-type]

    assert refused(builder).problems == (
        "node 'a' is a PocketFlowNode, not a Node or Flow (it is a PocketFlow node: "
        "subclass cf.Node, with prep(store, ctx), exec(prep_res, ctx) and "
        "post(store, prep_res, exec_res, ctx))",
    )


def test_build_names_the_nodes_no_route_reaches() -> None:
    builder = (
        cf.Flow.builder("f")
        .add_node("start", Recorder())
        .add_node("next", Recorder())
        .add_node("orphan", Recorder())
        .add_node("after_orphan", Recorder())
        .add_node("loop", Recorder())
        .add_route("start", "next")
        .add_route("orphan", "after_orphan")
        .add_route("loop", "loop")
    )
    error = refused(builder)
    assert error.problems == tuple(
        f"node {node_id!r} is unreachable: no route leads to it from the start node 'start'"
        for node_id in ("orphan", "after_orphan", "loop")
    )


def test_reachability_starts_at_the_start_node() -> None:
    builder = cf.Flow.builder("f").add_node("a", Recorder()).add_node("b", Recorder())
    builder.add_route("a", "b").start("b")
    with pytest.raises(cf.FlowValidationError, match="node 'a' is unreachable"):
        builder.build()


def test_fan_out_branches_joins_and_nested_flows_are_reachable() -> None:
    inner = (
        cf.Flow.builder("inner")
        .add_node("i1", Recorder())
        .add_node("i2", Recorder())
        .add_route("i1", "i2")
        .build()
    )
    flow = (
        cf.Flow.builder("outer")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_node("nested", inner)
        .add_join("join", Recorder())
        .add_node("after", Recorder())
        .add_route("a", ["b", "nested"])
        .add_route("b", "join")
        .add_route("nested", "join", action="default")
        .add_route("join", "after", when=cf.ActionCondition.never())
        .add_route("join", cf.END)
        .build()
    )
    assert set(flow.nodes) == {"a", "b", "nested", "join", "after"}


def _ending(name: str, *exits: str, routeless: cf.Node | cf.Flow | None = None) -> cf.Flow:
    """A flow whose node ``a`` ends it on each of ``exits`` (routes to END), and, with
    ``routeless``, goes on "on" to that node, which has no routes."""
    builder = cf.Flow.builder(name).add_node("a", Recorder())
    for action in exits:
        builder.add_route("a", cf.END, action)
    if routeless is not None:
        builder.add_node("last", routeless).add_route("a", "last", "on")
    return builder.build()


def test_exit_actions_are_those_of_the_routes_to_end_unless_a_node_has_no_routes() -> None:
    assert _ending("f", "out", "fail").exit_actions() == ("out", "fail")
    assert _ending("f", "out", routeless=Recorder()).exit_actions() is None
    nested = _ending("f", "out", routeless=_ending("inner", "deep"))
    assert nested.exit_actions() == ("out", "deep")
    assert _ending("f", routeless=_ending("inner", routeless=Recorder())).exit_actions() is None
    looping = cf.Flow.builder("f").add_node("a", Recorder()).add_route("a", "a").build()
    assert looping.exit_actions() == ()


def test_a_flow_reused_on_both_branches_of_every_level_builds_walking_each_flow_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each level fans out to the level below twice, both without routes: 2**40 paths
    to the leaf, 41 flows. build() found a level's exits by walking every path."""
    calls = 0
    exit_actions = cf.Flow.exit_actions

    def counted(flow: cf.Flow) -> tuple[str, ...] | None:
        nonlocal calls
        calls += 1
        assert calls < 10_000, "exit_actions walks every path through the nested flows"
        return exit_actions(flow)

    monkeypatch.setattr(cf.Flow, "exit_actions", counted)
    flow = _ending("level0", "done")
    levels = [flow]
    for level in range(1, 41):
        builder = cf.Flow.builder(f"level{level}").add_node("a", Recorder("go"))
        builder.add_node("b", flow).add_node("c", flow).add_route("a", ["b", "c"], "go")
        flow = builder.build()
        levels.append(flow)
    assert flow.depth == 41 and flows_within(flow) == levels[::-1]
    assert flow.exit_actions() == ("done",)
    error = refused(_parent(flow, "other"))
    assert error.problems == (
        "node 's' is flow 'level40', which ends only with action 'done' (its routes to "
        "cf.END), but no route from 's' takes it",
    )


def _parent(inner: cf.Flow, *actions: str) -> cf.FlowBuilder:
    """A flow whose start node is ``inner``, routed on each of ``actions`` to ``b``."""
    builder = cf.Flow.builder("outer").add_node("s", inner)
    for action in actions:
        builder.add_route("s", "b", action)
    return builder.add_node("b", Recorder()) if actions else builder


def test_build_refuses_a_nested_flow_none_of_whose_exits_the_parent_routes() -> None:
    error = refused(_parent(_ending("inner", "out"), "other"))
    assert error.problems == (
        "node 's' is flow 'inner', which ends only with action 'out' (its routes to cf.END), "
        "but no route from 's' takes it",
    )
    error = refused(_parent(_ending("inner", "out", "fail"), "other", "more"))
    assert error.problems == (
        "node 's' is flow 'inner', which ends only with action 'out' or 'fail' (its routes "
        "to cf.END), but no route from 's' takes any of them",
    )


@pytest.mark.parametrize(
    ("inner", "actions"),
    [
        (_ending("inner", "out", "fail"), ["fail"]),  # one exit routed: the other may fail
        (_ending("inner", "out", routeless=Recorder()), ["other"]),  # exits unknown
        (_ending("inner", "out"), []),  # no routes: the parent ends with the nested flow
        (cf.Flow.builder("inner").add_node("a", Recorder()).add_route("a", "a").build(), ["x"]),
    ],
    ids=["one_routed", "routeless_node", "parent_ends", "never_ends"],
)
def test_build_accepts_a_nested_flow_whose_exits_it_may_route(
    inner: cf.Flow, actions: list[str]
) -> None:
    assert _parent(inner, *actions).build().nodes["s"] is inner


def test_routes_are_looked_up_in_the_order_added() -> None:
    flow = (
        cf.Flow.builder("f")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b", action="go", when=cf.ActionCondition.key_exists("b"))
        .add_route("a", cf.END, action="go")
        .add_route("a", "a", action="again")
        .build()
    )
    assert [r.target for r in flow.routes_for("a", "go")] == ["b", cf.END]
    assert flow.actions_from("a") == ["go", "again"]
    assert flow.has_routes("a") and not flow.has_routes("b")
    assert repr(cf.END) == "cf.END"


async def test_flow_run_uses_a_temporary_engine() -> None:
    store: dict[str, object] = {}
    result = await cf.Flow.builder("f").add_node("a", Recorder("done")).build().run(store)
    assert result.final_action == cf.Action.simple("done")
    assert store == {"seen": ["a"]}


def test_run_sync_runs_from_plain_code() -> None:
    flow = cf.Flow.builder("sync").add_node("a", Recorder()).add_node("b", Recorder())
    result = flow.add_route("a", "b").build().run_sync({})
    assert result.execution_path == ("a", "b")
    assert result.success


@cf.node
def interrupt(ctx: cf.ExecutionContext) -> None:
    raise KeyboardInterrupt


@cf.node
async def ctrl_c(ctx: cf.ExecutionContext) -> None:
    signal.raise_signal(signal.SIGINT)
    await trio.sleep_forever()


@pytest.mark.parametrize("node", [interrupt, ctrl_c], ids=["raised", "signal"])
def test_run_sync_raises_an_interrupt_as_itself(node: cf.Node) -> None:
    """As out of ``trio.run``: ``except KeyboardInterrupt`` catches it."""
    flow = cf.Flow.builder("interrupted").add_node("a", node).build()
    with pytest.raises(BaseException) as info:
        flow.run_sync()
    assert type(info.value) is KeyboardInterrupt


def test_run_sync_keeps_a_group_that_holds_more_than_an_interrupt() -> None:
    class Both(cf.Node):
        async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.interrupt)
                raise ValueError("bad")

        async def interrupt(self) -> None:
            raise KeyboardInterrupt

    flow = cf.Flow.builder("both").add_node("a", Both()).build()
    with pytest.raises(BaseExceptionGroup) as info:
        flow.run_sync()
    assert info.group_contains(KeyboardInterrupt)
    assert info.group_contains(ValueError)


CTRL_C_SCRIPT = """
import trio
import cosmoflow_actors as cf


@cf.node
async def wait(ctx):
    print("waiting", flush=True)
    await trio.sleep_forever()


try:
    cf.Flow.builder("waits").add_node("wait", wait).build().run_sync()
except KeyboardInterrupt:
    print("KeyboardInterrupt caught")
"""


def test_ctrl_c_during_run_sync_is_a_keyboard_interrupt() -> None:
    """A real SIGINT, as Ctrl-C sends, while a run is in a node."""
    with subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT], stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "waiting\n"  # the run is in its node
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    assert (process.returncode, out) == (0, "KeyboardInterrupt caught\n")


async def test_run_sync_inside_trio_says_what_to_use_instead() -> None:
    flow = cf.Flow.builder("f").add_node("a", Recorder()).build()
    with pytest.raises(RuntimeError) as info:
        flow.run_sync()
    assert str(info.value) == (
        "flow 'f': run_sync() cannot be called inside a trio run; use `await flow.run(...)`, "
        "or an engine: `async with cf.open_engine() as engine: await engine.run(flow, ...)`"
    )
    assert (await flow.run()).execution_path == ("a",)


def test_run_awaited_by_asyncio_says_flows_run_on_trio() -> None:
    store: dict[str, Any] = {}
    flow = cf.Flow.builder("f").add_node("a", Recorder()).build()
    with pytest.raises(RuntimeError) as info:
        asyncio.run(flow.run(store))
    assert str(info.value) == (
        "flow 'f': run() was awaited outside a trio run; flows run on trio, not asyncio: "
        "call `flow.run_sync(...)` from synchronous code, or `await flow.run(...)` inside "
        "`trio.run`"
    )
    assert store == {}


def test_no_flow_runs_inside_refusing_runs() -> None:
    """The cosmoflow command imports flow files inside ``refusing_runs``."""
    store: dict[str, Any] = {}
    flow = cf.Flow.builder("f").add_node("a", Recorder()).build()
    with refusing_runs():
        with pytest.raises(RuntimeError, match="flow 'f' was run while the cosmoflow command"):
            flow.run_sync(store)
        with pytest.raises(RuntimeError, match='under `if __name__ == "__main__":`'):
            trio.run(flow.run, store)
    assert store == {}
    assert flow.run_sync(store).execution_path == ("a",)


class PerFile(cf.BatchFlow):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, Any]]:
        return [{"name": name} for name in ("a.txt", "b.txt", "c.txt")]

    async def post(
        self,
        store: cf.SharedStore,
        prep_res: Any,
        results: list[cf.FlowResult],
        ctx: cf.ExecutionContext,
    ) -> cf.Action:
        return cf.Action.complete([r.result for r in results])


def file_flow(inside: list[int] | None = None) -> cf.Flow:
    @cf.node
    async def measure(ctx: cf.ExecutionContext) -> cf.Action:
        if inside is not None:
            inside.append(1)
            await trio.sleep(1)
            inside.pop()
        name = ctx.params["name"]
        if name == "bad":
            raise ValueError("unreadable file")
        await ctx.store.set(f"size:{name}", len(name))
        return cf.Action.complete(len(name))

    return cf.Flow.builder("per-file").add_node("measure", measure).build()


async def test_a_batch_flow_runs_its_flow_once_per_parameter_set() -> None:
    store: dict[str, Any] = {}
    result = (
        await cf.Flow.builder("batch").add_node("each", PerFile(file_flow())).build().run(store)
    )
    assert result.result == [5, 5, 5]
    assert store == {"size:a.txt": 5, "size:b.txt": 5, "size:c.txt": 5}


async def test_every_step_of_a_batch_flow_runs_children_of_its_own() -> None:
    """A child's run id is its BatchFlow step's execution id and its index: the same
    node reached again, or two BatchFlows at once on a fan-out's branches, each run
    their children."""
    looped: dict[str, Any] = {}
    await batch_flow_twice_in_a_loop().run(looped, run_id="job")
    forked: dict[str, Any] = {}
    await batch_flows_on_two_branches().run(forked, run_id="job")
    assert sorted(looped["ran"]) == CHILDREN_OF_THE_LOOP
    assert sorted(forked["ran"]) == CHILDREN_ON_THE_BRANCHES


def test_a_batch_flows_sub_flow_cannot_be_replaced_after_it_is_made() -> None:
    # Replaced by its own flow, a BatchFlow would start child runs without end.
    batch = PerFile(file_flow())
    flow = cf.Flow.builder("batch").add_node("each", batch).build()
    with pytest.raises(AttributeError):
        batch.flow = flow  # type: ignore[misc]
    assert batch.flow.name == "per-file"


@pytest.mark.parametrize("limit", [1, 3, None])
async def test_a_batch_flow_starts_its_children_in_parameter_order(limit: int | None) -> None:
    started: list[int] = []

    @cf.node
    async def record(ctx: cf.ExecutionContext) -> cf.Action:
        started.append(ctx.params["i"])
        await trio.lowlevel.checkpoint()
        return cf.Action.complete(ctx.params["i"] * 10)

    class InOrder(cf.BatchFlow):
        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, Any]]:
            return [{"i": i} for i in range(20)]

        def post(
            self, store: cf.SharedStore, prep_res: Any, results: Any, ctx: cf.ExecutionContext
        ) -> cf.Action:
            return cf.Action.complete([r.result for r in results])

    child = cf.Flow.builder("child").add_node("record", record).build()
    flow = cf.Flow.builder("batch").add_node("each", InOrder(child, max_concurrency=limit))
    result = await flow.build().run({})
    assert result.result == [i * 10 for i in range(20)]
    if limit == 1:
        assert started == list(range(20))
    else:
        assert sorted(started) == list(range(20))


async def test_a_batch_flow_bounds_its_children(autojump_clock: trio.testing.MockClock) -> None:
    inside: list[int] = []
    most = 0

    class Many(cf.BatchFlow):
        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, Any]]:
            return [{"name": f"f{i}"} for i in range(10)]

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, len(inside))
            await trio.sleep(0.5)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        flow = cf.Flow.builder("bounded").add_node(
            "each", Many(file_flow(inside), max_concurrency=4)
        )
        await flow.build().run({})
        nursery.cancel_scope.cancel()
    assert most == 4
    assert trio.current_time() - start == 3


async def test_a_failing_child_fails_the_batch_flow_step() -> None:
    class WithBad(cf.BatchFlow):
        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, Any]]:
            return [{"name": "ok.txt"}, {"name": "bad"}]

    flow = cf.Flow.builder("b").add_node("each", WithBad(file_flow())).build()
    with pytest.raises(cf.NodeError) as info:
        await flow.run({})
    assert info.value.node_id == "each"
    child = info.value.__cause__
    assert isinstance(child, cf.NodeError) and child.node_id == "measure"
    assert isinstance(child.__cause__, ValueError)


def test_a_batch_flow_needs_a_built_flow() -> None:
    with pytest.raises(TypeError, match="built Flow"):
        PerFile(cf.Flow.builder("unbuilt"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "config",
    [
        {"max_retries": 2},
        {"timeout": 1.0},
        {"max_exec_concurrency": 2},
        {"rate_limit": (1, 1.0)},
        {"executor": "thread"},
    ],
)
def test_a_batch_flow_refuses_config_it_cannot_honour(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"does not support {next(iter(config))}"):
        PerFile(file_flow(), **config)


def test_a_batch_flow_refuses_a_fallback() -> None:
    class WithFallback(PerFile):
        def exec_fallback(self, prep_res: Any, error: Exception, ctx: cf.ExecutionContext) -> None:
            return None

    with pytest.raises(ValueError, match="exec_fallback"):
        WithFallback(file_flow())


def test_a_batch_flow_refuses_an_exec_it_would_never_call() -> None:
    class WithExec(PerFile):
        def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
            return None

    with pytest.raises(ValueError, match="it does not support exec "):
        WithExec(file_flow())


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("timeout", 0.05),
        ("max_retries", 3),
        ("executor", "thread"),
        ("rate_limit", (1, 10.0)),
        ("max_exec_concurrency", 1),
    ],
)
def test_build_refuses_batch_flow_config_set_after_it_is_made(setting: str, value: Any) -> None:
    """Set after the BatchFlow was made, it passed build() and was silently ignored."""
    batch = PerFile(file_flow())
    setattr(batch, setting, value)
    assert refused(cf.Flow.builder("f").add_node("each", batch)).problems == (
        f"node 'each': a BatchFlow runs child runs; it does not support {setting} "
        "(set them on the sub-flow's nodes)",
    )


class Waits(cf.Node):
    """A node ported from PocketFlow that sets ``wait`` on itself."""

    def __init__(self) -> None:
        super().__init__()
        self.wait = 0.5


def test_build_names_a_pocketflow_setting_a_node_set_on_itself() -> None:
    with pytest.raises(cf.FlowValidationError) as info:
        cf.Flow.builder("f").add_node("a", Waits()).build()
    assert info.value.problems == (
        "node 'a': wait = 0.5 is never read (PocketFlow's name for retry_delay: set retry_delay)",
    )


def nested(depth: int) -> cf.Flow:
    """A flow ``depth`` deep: each level's one node is the flow of the level below."""
    flow = cf.Flow.builder("level1").add_node("leaf", Recorder()).build()
    for level in range(2, depth + 1):
        flow = cf.Flow.builder(f"level{level}").add_node("inner", flow).build()
    return flow


async def test_a_flow_nested_as_deep_as_allowed_runs_durably(tmp_path: Any) -> None:
    flow = nested(MAX_NESTING)
    assert flow.depth == MAX_NESTING
    assert "leaf" in flow.to_mermaid()
    storage = cf.SQLiteStorage(str(tmp_path / "store.db"))
    async with cf.open_engine() as engine:
        await engine.run(flow, storage, run_id="deep")
        runs = await engine.list_runs(storage)
    assert runs == [cf.RunRecord("deep", f"level{MAX_NESTING}", "succeeded", "leaf", 1)]


async def test_a_flow_nested_twice_at_every_level_is_walked_once_per_flow() -> None:
    """Each level's two nodes are the flow of the level below: 2**40 paths to the leaf,
    41 flows. The engine reads the route conditions of each flow once."""
    flow = cf.Flow.builder("level0").add_node("leaf", Recorder()).build()
    levels = [flow]
    for level in range(1, 41):
        builder = cf.Flow.builder(f"level{level}").add_node("a", flow).add_node("b", flow)
        flow = builder.add_route("a", "b", when=cf.ActionCondition.key_exists(f"k{level}")).build()
        levels.append(flow)
    assert flows_within(flow) == levels[::-1]
    async with cf.open_engine() as engine:
        run = await engine.start_run(flow)
        run.cancel()
    assert run.current_state is cf.RunState.CANCELLED


def test_build_refuses_a_flow_nested_deeper_than_allowed() -> None:
    builder = cf.Flow.builder("top").add_node("inner", nested(MAX_NESTING))
    error = refused(builder)
    assert error.problems == (
        f"node 'inner' is a flow {MAX_NESTING} deep, which makes this flow "
        f"{MAX_NESTING + 1} deep: a flow nests at most {MAX_NESTING} deep",
    )
