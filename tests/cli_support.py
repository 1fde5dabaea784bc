"""Helpers shared by the tests of the cosmoflow command (tests/test_cli_*.py)."""

from __future__ import annotations

from pathlib import Path

import trio

import cosmoflow_actors as cf

EXAMPLES = Path(__file__).parent.parent / "examples"


COUNTER = """
import cosmoflow_actors as cf


class Flaky(cf.Node):
    max_retries = 2

    def exec(self, prep_res, ctx):
        if ctx.current_retry == 0:
            raise ConnectionError("first attempt fails")

    async def post(self, store, prep_res, exec_res, ctx):
        await store.set("who", ctx.params.get("who", "nobody"))


@cf.node
async def count(ctx):
    total = await ctx.store.update("count", lambda n: n + 1, default=0)
    return cf.Action.complete(total)


checks = cf.Flow.builder("checks").add_node("flaky", Flaky()).build()
counter = (
    cf.Flow.builder("counter")
    .add_node("checks", checks)
    .add_node("count", count)
    .add_route("checks", "count")
    .build()
)
"""
"""Two flows, one nested in the other: the command picks the outer one by itself."""


def table_row(out: str, name: str) -> list[str]:
    """The cells of the table row whose first cell is ``name``."""
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{out}")


async def result_within(queue: str, run_id: str, seconds: float) -> cf.QueuedResult:
    with trio.fail_after(seconds):
        return await cf.result(queue, run_id)


async def fill_sqlite_store(path: Path) -> None:
    storage = cf.SQLiteStorage(path)
    await storage.set("a", 1)
    await storage.set("b", [1, 2])
    await storage.commit()
    await storage.aclose()
