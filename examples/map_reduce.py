"""Word counts over a folder of text files: map in parallel, reduce, then report.

PocketFlow's map-reduce pattern. `map` is a `cf.ParallelBatchNode`: its `prep` returns
the files, its `exec` counts the words of one file, at most `max_concurrency` files at
once, and its `post` receives the counts in file order. `reduce` adds them up. Then
the run fans out to two summaries that run at the same time and join at `report`.

Run it: python examples/map_reduce.py [FOLDER]
It counts the .txt and .md files of FOLDER; with no FOLDER, a small built-in corpus
written to a temporary folder.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import trio

import cosmoflow_actors as cf

CORPUS = {
    "actors.txt": "An actor owns its state. An actor reads its mailbox. "
    "Actors talk only through messages, and a message is handled one at a time.",
    "trio.txt": "Trio runs tasks in a nursery. A nursery waits for its tasks. "
    "When a task fails, the nursery cancels the other tasks and the error goes up.",
    "flows.txt": "A flow is a graph of nodes. Each node returns an action, "
    "and the action picks the next node of the flow.",
    "store.txt": "Nodes share a store. The store actor owns the storage, "
    "so every read and every write of the store is a message to that actor.",
    "limits.txt": "A mailbox is bounded. When the mailbox is full the sender waits, "
    "and that wait is backpressure.",
    "empty.txt": "",
}

STOP_WORDS = frozenset(
    ["a", "an", "and", "at", "for", "in", "is", "its", "of", "so", "that", "the", "to", "when"]
)


class ListFiles(cf.Node):
    executor = "thread"  # a blocking directory read, in a worker thread

    def exec(self, prep_res: None, ctx: cf.ExecutionContext) -> list[str]:
        folder = Path(ctx.params.get("folder", "."))
        return sorted(str(p) for p in folder.iterdir() if p.suffix in {".txt", ".md"})

    async def post(
        self, store: cf.SharedStore, prep_res: None, files: list[str], ctx: cf.ExecutionContext
    ) -> str:
        await store.set("files", files)
        return "map"


class CountWords(cf.ParallelBatchNode):
    """Map: one item per file, at most four files at once."""

    max_concurrency = 4
    max_retries = 2  # per file
    timeout = 10.0  # per file attempt

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[str]:
        return list(await store.get("files"))

    async def exec(self, path: str, ctx: cf.ExecutionContext) -> Counter[str]:
        text = await trio.Path(path).read_text(encoding="utf-8")
        words = re.findall(r"[a-z']+", text.lower())
        return Counter(word for word in words if word not in STOP_WORDS)

    async def post(
        self,
        store: cf.SharedStore,
        files: list[str],
        counts: list[Counter[str]],
        ctx: cf.ExecutionContext,
    ) -> str:
        # Results arrive in file order, whatever order the files finished in.
        per_file = {Path(f).name: sum(c.values()) for f, c in zip(files, counts, strict=True)}
        await store.set_many({"counts": counts, "per_file": per_file})
        return "reduce"


@cf.node
async def reduce(ctx: cf.ExecutionContext) -> str:
    counts: list[Counter[str]] = await ctx.store.get("counts")
    await ctx.store.set("total", sum(counts, Counter()))
    return "summarize"


@cf.node
async def top_words(ctx: cf.ExecutionContext) -> cf.Action:
    total: Counter[str] = await ctx.store.get("total")
    top = sorted(total.items(), key=lambda item: (-item[1], item[0]))[:8]
    return cf.Action.with_params("done", top=top)


@cf.node
async def statistics(ctx: cf.ExecutionContext) -> cf.Action:
    total: Counter[str] = await ctx.store.get("total")
    longest = max(total, key=lambda word: (len(word), word), default="")
    stats = {"words": sum(total.values()), "distinct": len(total), "longest": longest}
    return cf.Action.with_params("done", stats=stats)


@cf.node
async def report(ctx: cf.ExecutionContext) -> cf.Action:
    # The join: its params merge what both summaries sent.
    per_file = await ctx.store.get("per_file")
    return cf.Action.complete({"per_file": per_file, **ctx.params})


flow = (
    cf.Flow.builder("map-reduce")
    .add_node("list", ListFiles())
    .add_node("map", CountWords())
    .add_node("reduce", reduce)
    .add_node("top_words", top_words)
    .add_node("statistics", statistics)
    .add_join("report", report)
    .add_route("list", "map", action="map")
    .add_route("map", "reduce", action="reduce")
    .add_route("reduce", ["top_words", "statistics"], action="summarize")
    .add_route("top_words", "report", action="done")
    .add_route("statistics", "report", action="done")
    .build()
)


def count(folder: str) -> dict[str, Any]:
    result = flow.run_sync({}, params={"folder": folder})
    summary: dict[str, Any] = result.result
    print(f"{len(summary['per_file'])} files, words counted in each:")
    width = max(map(len, summary["per_file"]), default=0)
    for name, words in summary["per_file"].items():
        print(f"  {name:<{width}} {words:>5} words")
    stats = summary["stats"]
    print(f"{stats['words']} words counted (stop words left out), {stats['distinct']} distinct")
    print(f"longest word: {stats['longest']}")
    print("top words: " + ", ".join(f"{word} {n}" for word, n in summary["top"]))
    return summary


def main() -> dict[str, Any]:
    if len(sys.argv) > 1:
        return count(sys.argv[1])
    with tempfile.TemporaryDirectory() as folder:
        for name, text in CORPUS.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        return count(folder)


if __name__ == "__main__":
    main()
