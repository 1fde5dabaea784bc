"""Durable runs: a process dies in the middle of a run, and the run goes on.

A five-step pipeline runs on a FileStorage with a run_id, so each step commits its
writes together with the run's record: ``fetch`` fans out to ``clean`` and ``enrich``,
which run at once and meet at the join ``summarize``, then ``publish``. The first
attempt runs in a child process that dies abruptly (``os._exit``, no cleanup) in
``summarize``. This process then finds the run recorded after three committed steps,
resumes it, and shows that no step ran twice.

Run it: python examples/durable_resume.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

import cosmoflow_actors as cf

RUN_ID = "nightly-report"


class Stage(cf.Node):
    """Records itself in the store's log; the child process dies in ``summarize``."""

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if ctx.node_id == "summarize" and os.environ.get("CRASH_IN_SUMMARIZE"):
            os._exit(1)  # a power cut: no cleanup, nothing flushed

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        await store.update("log", lambda log: [*log, ctx.node_id], default=[])


STAGES = ["fetch", "clean", "enrich", "summarize", "publish"]

flow = (
    cf.Flow.builder("report")
    .add_node("fetch", Stage())
    .add_node("clean", Stage())
    .add_node("enrich", Stage())
    .add_join("summarize", Stage())
    .add_node("publish", Stage())
    .add_route("fetch", ["clean", "enrich"])
    .add_route("clean", "summarize")
    .add_route("enrich", "summarize")
    .add_route("summarize", "publish")
    .build()
)


async def first_attempt(path: Path) -> None:
    """Runs in the child process, which dies in the join, ``summarize``."""
    async with cf.open_engine() as engine:
        await engine.run(flow, cf.FileStorage(path), run_id=RUN_ID)


async def recover(path: Path) -> None:
    [record] = await cf.list_runs(cf.FileStorage(path))
    print(f"recorded: {record.run_id} {record.state} after {record.steps} steps")
    async with cf.open_engine() as engine:
        result = await engine.resume(flow, cf.FileStorage(path), run_id=RUN_ID)
        print(f"resumed:  {' -> '.join(result.execution_path[record.steps :])}")
        again = await engine.run(flow, cf.FileStorage(path), run_id=RUN_ID)
        print(f"again:    {again.final_action.name} (the recorded result; nothing ran)")
    storage = cf.FileStorage(path)
    await storage.open()
    log = await storage.get("log")
    in_order = sorted(log, key=STAGES.index)  # clean and enrich ran in either order
    print(f"log:      {', '.join(in_order)} (each step once: {in_order == STAGES})")


def main() -> None:
    path = Path(tempfile.mkdtemp()) / "report.json"
    child = subprocess.run(
        [sys.executable, __file__, "--child", str(path)],
        env={**os.environ, "CRASH_IN_SUMMARIZE": "1"},
        check=False,
    )
    print(f"crashed:  the first attempt died in summarize (exit status {child.returncode})")
    trio.run(recover, path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        trio.run(first_attempt, Path(sys.argv[2]))
    else:
        main()
