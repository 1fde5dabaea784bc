"""The execution context: what a node knows about the step it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cosmoflow_actors as cf


async def test_the_context_describes_the_step() -> None:
    contexts: list[cf.ExecutionContext] = []

    @cf.node(max_retries=4)
    def look(ctx: cf.ExecutionContext) -> str:
        contexts.append(ctx)
        return "again" if len(contexts) < 3 else "stop"

    flow = (
        cf.Flow.builder("ctx-flow")
        .add_node("look", look)
        .add_route("look", "look", "again")
        .add_route("look", cf.END, "stop")
        .build()
    )
    await flow.run(run_id="abc", params={"k": 1})
    assert {(c.run_id, c.node_id, c.flow_name, c.max_retries) for c in contexts} == {
        ("abc", "look", "ctx-flow", 4)
    }
    assert len({c.execution_id for c in contexts}) == 3
    assert [dict(c.params) for c in contexts] == [{"k": 1}, {}, {}]


class Notes(cf.Node):
    """Writes a note in its step's metadata in prep and records, in post, what the
    metadata held before the note and after."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        before = dict(ctx.metadata)
        ctx.metadata["node"] = ctx.node_id
        return before

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        await store.update("seen", lambda seen: [*seen, (prep_res, dict(ctx.metadata))], [])


async def test_metadata_lasts_one_step() -> None:
    flow = cf.Flow.builder("notes").add_node("a", Notes()).add_node("b", Notes())
    store: dict[str, Any] = {}
    await flow.add_route("a", "b").build().run(store)
    assert store["seen"] == [({}, {"node": "a"}), ({}, {"node": "b"})]


class ItemNotes(cf.ParallelBatchNode):
    """Each item's exec notes itself in the step's metadata; post returns the notes."""

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[int]:
        return [1, 2, 3]

    async def exec(self, item: int, ctx: cf.ExecutionContext) -> None:
        ctx.metadata[f"item{item}"] = ctx.current_retry

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(sorted(ctx.metadata))


async def test_the_items_of_a_parallel_batch_write_to_their_steps_metadata() -> None:
    """Even when nothing of the step made the metadata dict before the items ran."""
    result = await cf.Flow.builder("items").add_node("each", ItemNotes()).build().run({})
    assert result.result == ["item1", "item2", "item3"]


def test_a_copy_shares_the_metadata_and_keeps_the_rest_unless_changed() -> None:
    ctx = cf.ExecutionContext("r", "n", "f", 1, None, {}, 3)  # type: ignore[arg-type]
    copy = ctx.copy(current_retry=2)
    copy.metadata["x"] = 1
    assert (ctx.metadata, ctx.current_retry, copy.current_retry) == ({"x": 1}, 0, 2)
    assert copy.execution_id == ctx.execution_id


async def test_params_are_read_only_at_the_entry_after_a_hop_and_at_a_join(
    tmp_path: Path,
) -> None:
    """Whatever the step's params came from: the start, an action, merged arrivals, or
    a durable run's record when it resumes."""
    seen: dict[str, Any] = {}

    @cf.node
    def look(ctx: cf.ExecutionContext) -> cf.Action:
        seen[ctx.node_id] = ctx.params
        return cf.Action.with_params("default", **{ctx.node_id: True})

    flow = (
        cf.Flow.builder("params")
        .add_node("entry", look)
        .add_node("b", look)
        .add_node("c", look)
        .add_join("join", look)
        .add_route("entry", ["b", "c"])
        .add_route("b", "join")
        .add_route("c", "join")
        .build()
    )
    await flow.run(cf.SQLiteStorage(tmp_path / "runs.db"), run_id="r", params={"start": 1})
    assert dict(seen["entry"]) == {"start": 1}
    assert dict(seen["b"]) == {"entry": True}
    assert dict(seen["join"]) == {"b": True, "c": True}
    for params in seen.values():
        with pytest.raises(TypeError):
            params["changed"] = True


async def test_params_of_a_resumed_step_are_read_only(tmp_path: Path) -> None:
    calls: list[Any] = []

    @cf.node
    def once_failing(ctx: cf.ExecutionContext) -> None:
        calls.append(ctx.params)
        if len(calls) == 1:
            raise RuntimeError("first try")

    @cf.node
    def hop(ctx: cf.ExecutionContext) -> cf.Action:
        return cf.Action.with_params("default", k=1)

    flow = cf.Flow.builder("resumed").add_node("a", hop).add_node("b", once_failing)
    built = flow.add_route("a", "b").build()
    storage = tmp_path / "runs.db"
    with pytest.raises(cf.NodeError):
        await built.run(cf.SQLiteStorage(storage), run_id="r")
    async with cf.open_engine() as engine:
        await engine.resume(built, cf.SQLiteStorage(storage), run_id="r")
    assert [dict(params) for params in calls] == [{"k": 1}, {"k": 1}]
    with pytest.raises(TypeError):
        calls[1]["k"] = 2
