"""Hello world: two nodes, one route, a dict as the shared store.

Run it: python examples/hello_world.py
"""

from __future__ import annotations

from typing import Any

import cosmoflow_actors as cf


class Greet(cf.Node):
    """Reads a name, builds a greeting, stores it."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> str:
        return str(await store.get("name", "world"))

    async def exec(self, name: str, ctx: cf.ExecutionContext) -> str:
        return f"Hello, {name}!"

    async def post(
        self, store: cf.SharedStore, prep_res: str, exec_res: str, ctx: cf.ExecutionContext
    ) -> str:
        await store.set("greeting", exec_res)
        return "shout"


@cf.node
async def shout(ctx: cf.ExecutionContext) -> cf.Action:
    greeting = await ctx.store.get("greeting", type=str)
    return cf.Action.complete(greeting.upper())


flow = (
    cf.Flow.builder("hello-world")
    .add_node("greet", Greet())
    .add_node("shout", shout)
    .add_route("greet", "shout", action="shout")
    .build()
)


def main() -> dict[str, Any]:
    store: dict[str, Any] = {"name": "CosmoFlow"}
    result = flow.run_sync(store)
    print(f"greeting: {store['greeting']}")
    print(f"result:   {result.result}")
    print(f"path:     {' -> '.join(result.execution_path)} ({result.steps_executed} steps)")
    return store


if __name__ == "__main__":
    main()
