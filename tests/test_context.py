"""The execution context: what a node knows about the step it runs."""

from __future__ import annotations

from typing import Any

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
