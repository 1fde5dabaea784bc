"""The seed guide's first flow: start -> process, run as actors inside a trio program.

Ten runs go through the same two node actors at once; each run has its own store.
Run it: python examples/start_process.py
"""

from __future__ import annotations

from typing import Any

import trio

import cosmoflow_actors as cf


class StartNode(cf.Node):
    """Splits the run's text into words."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> str:
        return await store.get("text", type=str)

    def exec(self, text: str, ctx: cf.ExecutionContext) -> list[str]:
        return text.split()

    async def post(
        self, store: cf.SharedStore, prep_res: str, words: list[str], ctx: cf.ExecutionContext
    ) -> None:
        await store.set("words", words)


class ProcessNode(cf.Node):
    """Counts the words; at most four runs are processed at once."""

    max_concurrency = 4

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[str]:
        return await store.get("words", type=list[str])

    async def exec(self, words: list[str], ctx: cf.ExecutionContext) -> int:
        await trio.sleep(0.01)  # stands in for real work
        return len(words)

    async def post(
        self, store: cf.SharedStore, prep_res: Any, count: int, ctx: cf.ExecutionContext
    ) -> cf.Action:
        await store.set("count", count)
        return cf.Action.complete(count)


flow = (
    cf.Flow.builder("my-workflow")
    .add_node("start", StartNode())
    .add_node("process", ProcessNode())
    .add_route("start", "process")
    .build()
)


async def main() -> list[int]:
    texts = [" ".join(["word"] * n) for n in range(1, 11)]
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow, {"text": text}) for text in texts]
        counts = [(await run.wait()).result for run in runs]
        stats = engine.statistics()
    print(f"word counts: {counts}")
    print(f"runs: {stats.runs_succeeded} succeeded, {stats.runs_failed} failed")
    for actor in stats.actors:
        if actor.kind != "store":
            print(f"  {actor.kind:6} {actor.name:22} {actor.messages_processed} messages")
    return counts


if __name__ == "__main__":
    trio.run(main)
