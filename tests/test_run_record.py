"""A durable run's record (runtime/run_record.py): what a record must hold, what it says
of a failed run, and a recorded run put back only into the flow it was recorded for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.runtime import run_record
from tests.support import Recorder, single


@pytest.mark.parametrize("start", ["run", "resume"])
async def test_a_recorded_run_of_another_flow_is_refused_whatever_its_state(
    tmp_path: Path, start: str
) -> None:
    path = tmp_path / "s.json"
    other = single(Recorder(), "other")
    async with cf.open_engine() as engine:
        await engine.run(single(Recorder(), "loop"), cf.FileStorage(path), run_id="done")
        begin = engine.run if start == "run" else engine.resume
        with pytest.raises(cf.CosmoFlowError, match="belongs to flow 'loop', not 'other'"):
            await begin(other, cf.FileStorage(path), run_id="done")


STEPPED_WITHOUT_BRANCHES = {
    **run_record.new_record("victim", "loop", {}),
    "state": "failed",
    "path": ["count"],
    "last": {"frames": [["count", 1]], "label": "", "count": 1, "node": "count"},
}
"""A record of a step that does not say where its branches go on."""


@pytest.mark.parametrize(
    "record", ["garbage", STEPPED_WITHOUT_BRANCHES], ids=["str", "no-branches"]
)
async def test_a_malformed_run_record_is_a_storage_error_naming_its_key(
    record: Any, tmp_path: Path
) -> None:
    path = tmp_path / "store.json"
    storage = cf.FileStorage(path)
    await storage.open()
    await storage.set("__cosmoflow__/runs/victim", record)
    await storage.commit()
    await storage.aclose()
    flow = single(Recorder(), "loop")
    with pytest.raises(cf.StorageError, match="__cosmoflow__/runs/victim"):
        await cf.list_runs(cf.FileStorage(path))
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError, match="__cosmoflow__/runs/victim"):
            await engine.run(flow, cf.FileStorage(path), run_id="victim")
        with pytest.raises(cf.StorageError, match="__cosmoflow__/runs/victim"):
            await engine.resume(flow, cf.FileStorage(path), run_id="victim")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


def test_the_record_of_a_failed_run_names_an_error_that_cannot_be_printed() -> None:
    assert run_record.failed({"state": "running"}, Unprintable())["error"] == (
        "Unprintable: <unprintable>"
    )
    assert run_record.failed({}, ValueError("bad"))["error"] == "ValueError: bad"


async def test_resuming_with_a_flow_that_lost_the_recorded_node_names_it(tmp_path: Path) -> None:
    @cf.node
    def fails(ctx: cf.ExecutionContext) -> None:
        raise RuntimeError("b fails")

    recorded = cf.Flow.builder("f").add_node("a", cf.node(lambda ctx: None))
    recorded = recorded.add_node("b", fails).add_route("a", "b").build()
    changed = cf.Flow.builder("f").add_node("b", cf.node(lambda ctx: None)).build()
    storage = cf.FileStorage(tmp_path / "store.json")
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError):
            await engine.run(recorded, storage, run_id="r")
        with pytest.raises(cf.CosmoFlowError, match="names node 'a', which flow 'f' lacks"):
            await engine.resume(changed, storage, run_id="r")
