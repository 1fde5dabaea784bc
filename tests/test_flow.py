"""FlowBuilder validation, the compiled routing table, Flow.run and Flow.run_sync."""

from __future__ import annotations

import pytest

import cosmoflow_actors as cf
from tests.support import Recorder


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
    with pytest.raises(cf.FlowValidationError) as info:
        builder.build()
    assert info.value.problems == (
        "route from unknown node 'ghost'",
        "route from 'a' to unknown node 'phantom'",
    )
    assert info.value.flow_name == "bad-routes"


def test_build_names_an_unknown_start_node() -> None:
    builder = cf.Flow.builder("f").add_node("a", Recorder()).start("nowhere")
    with pytest.raises(cf.FlowValidationError, match="start node 'nowhere'"):
        builder.build()


def test_build_rejects_a_non_node_and_a_bad_max_steps() -> None:
    builder = cf.Flow.builder("f").add_node("a", object()).max_steps(0)  # type: ignore[arg-type]
    with pytest.raises(cf.FlowValidationError) as info:
        builder.build()
    assert "node 'a' is a object, not a Node or Flow" in info.value.problems
    assert "max_steps must be >= 1, got 0" in info.value.problems


def test_build_rejects_config_changed_after_construction() -> None:
    node = Recorder()
    node.max_retries = 0
    with pytest.raises(cf.FlowValidationError, match="node 'a': max_retries"):
        cf.Flow.builder("f").add_node("a", node).build()


def test_validation_error_is_a_value_error() -> None:
    assert issubclass(cf.FlowValidationError, ValueError)


def test_the_first_node_added_is_the_default_start() -> None:
    flow = cf.Flow.builder("f").add_node("x", Recorder()).add_node("y", Recorder()).build()
    assert flow.start_id == "x"


def test_routes_are_looked_up_in_the_order_added() -> None:
    flow = (
        cf.Flow.builder("f")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b", action="go")
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
