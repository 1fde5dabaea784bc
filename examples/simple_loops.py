"""A counter that loops until a condition on the store says stop.

The route back to `increment` carries a `when=` condition the router checks against
the store; once it is false the next route for the same action wins and the run ends.
`max_steps` is the safety net that stops a loop whose exit condition never holds.

Run it: python examples/simple_loops.py
or:     cosmoflow run examples/simple_loops.py:flow --param limit=3
"""

from __future__ import annotations

from typing import Any

import cosmoflow_actors as cf


@cf.node
async def start(ctx: cf.ExecutionContext) -> cf.Action:
    """Set the counter and the limit up, and pass the step on to the loop."""
    await ctx.store.set_many({"count": 0, "limit": ctx.params.get("limit", 5), "seen": []})
    return cf.Action.with_params("count", step=ctx.params.get("step", 1))


class Increment(cf.Node):
    """Adds `step` (a param, default 1) to `count` and passes the step on to the next loop.

    Params reach the next step only, so the action carries them forward.
    """

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        return int(await store.get("count", 0))

    def exec(self, count: int, ctx: cf.ExecutionContext) -> int:
        return count + int(ctx.params.get("step", 1))

    async def post(
        self, store: cf.SharedStore, prep_res: int, count: int, ctx: cf.ExecutionContext
    ) -> cf.Action:
        await store.set("count", count)
        await store.update("seen", lambda seen: [*seen, count], default=[])
        return cf.Action.with_params("counted", step=ctx.params.get("step", 1))


@cf.node
async def report(ctx: cf.ExecutionContext) -> cf.Action:
    count = await ctx.store.get("count", type=int)
    return cf.Action.complete(f"stopped at {count}")


# Routes for one action are tried in the order added: loop while count < limit, else report.
flow = (
    cf.Flow.builder("simple-loops")
    .add_node("start", start)
    .add_node("increment", Increment())
    .add_node("report", report)
    .add_route("start", "increment", action="count")
    .add_route(
        "increment",
        "increment",
        action="counted",
        when=cf.ActionCondition.expression("${count} < ${limit}"),
    )
    .add_route("increment", "report", action="counted")
    .max_steps(50)
    .build()
)

# The same loop with no exit condition: max_steps ends it with an error.
runaway = (
    cf.Flow.builder("runaway")
    .add_node("increment", Increment())
    .add_route("increment", "increment", action="counted")
    .max_steps(7)
    .build()
)


def main() -> list[Any]:
    results = []
    for limit, step in [(5, 1), (10, 3)]:
        store: dict[str, Any] = {}
        result = flow.run_sync(store, params={"limit": limit, "step": step})
        results.append(result.result)
        print(f"limit={limit:<3} step={step}: counted {store['seen']} -> {result.result}")
        loops = result.execution_path.count("increment")
        print(
            f"  {result.steps_executed} steps: start -> increment x{loops} -> {result.last_node_id}"
        )
    try:
        runaway.run_sync({})
    except cf.MaxStepsExceeded as exc:
        print(
            f"runaway loop stopped by max_steps={exc.max_steps}: {' -> '.join(exc.execution_path)}"
        )
    return results


if __name__ == "__main__":
    main()
