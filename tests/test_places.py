"""Tests for :mod:`cosmoflow_actors.runtime.places`: a durable run's commits write the
places of what changed, not of every branch in flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.places import Places
from cosmoflow_actors.runtime.run import Branch
from cosmoflow_actors.storage.base import PARTS_PREFIX, StagedOp, place_key
from tests.storage_suite import PERSISTENT, make_backend
from tests.support import FailsOnce, Gate, Recorder, ticking


class CommitsSeen(cf.SQLiteStorage):
    """A real SQLiteStorage that keeps the place keys each commit of a step writes or
    deletes, and the records it stores."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits: list[list[str]] = []
        self.records: list[Any] = []

    async def commit_step(
        self, ops: list[StagedOp], record_key: str, record: Any, steps_before: int
    ) -> bool:
        self.commits.append([key for _, key, _ in ops if "/at/" in key])
        self.records.append(record)
        return await super().commit_step(ops, record_key, record, steps_before)


def fan_out(width: int, rounds: int = 1) -> cf.Flow:
    """``rounds`` fan-outs one after the other: "s0" fans out to ``width`` nodes that
    meet at the join "s1", which fans out again, and so on."""
    builder = cf.Flow.builder(f"fan-{width}")
    for number in range(rounds + 1):
        if number:
            builder.add_join(f"s{number}", Recorder())
        else:
            builder.add_node("s0", Recorder())
    for number in range(rounds):
        targets = [f"b{number}.{index}" for index in range(width)]
        for target in targets:
            builder.add_node(target, Recorder()).add_route(target, f"s{number + 1}")
        builder.add_route(f"s{number}", targets)
    return builder.build()


async def place_writes(tmp_path: Path, flow: cf.Flow) -> CommitsSeen:
    storage = CommitsSeen(tmp_path / f"{flow.name}.db")
    async with cf.open_engine() as engine:
        await engine.run(flow, storage, run_id="r")
    return storage


async def test_a_step_of_a_wide_fan_out_commits_what_changed_not_every_branch(
    tmp_path: Path,
) -> None:
    """Only the commit after the fork writes a place per branch; every other commit
    writes or deletes a few, whatever the fan-out's width."""
    for width in (4, 64):
        commits = (await place_writes(tmp_path, fan_out(width))).commits
        sizes = sorted(len(keys) for keys in commits)
        assert sizes[-1] == width  # the branches but the one that committed, and the fork
        assert max(sizes[:-1]) <= 2, sizes
        assert sum(sizes) <= 3 * width + 2, sizes


async def test_a_durable_run_of_one_branch_writes_no_place(tmp_path: Path) -> None:
    """The record's last step says where the run's only branch is."""
    storage = CommitsSeen(tmp_path / "loop.db")
    async with cf.open_engine() as engine:
        async with engine.open_store(storage) as store:
            await store.set("steps", 50)
        await engine.run(ticking(), storage, run_id="r")
    assert len(storage.commits) == 51  # the steps and the final record
    assert not any(storage.commits)
    assert {record["places"] for record in storage.records} == {1}


async def test_the_places_of_branches_that_left_are_given_again(tmp_path: Path) -> None:
    """Three fan-outs of 6 branches, one after the other, use the numbers of one: its
    branches and its fork (the number of the branch that forked, which left)."""
    storage = await place_writes(tmp_path, fan_out(6, rounds=3))
    assert storage.records[-1]["places"] == 6 + 1
    reopened = cf.SQLiteStorage(tmp_path / "fan-6.db")
    await reopened.open()
    try:
        assert [key for key in await reopened.keys() if "/at/" in key] == []  # all deleted
    finally:
        await reopened.aclose()


def test_a_routing_undone_puts_the_branches_in_flight_back() -> None:
    places = Places("r")
    kept, moved, new = Branch([]), Branch([]), Branch([])
    places.entered(kept)
    places.entered(moved)
    places.mark()
    places.left(moved)
    places.entered(new)
    places.left(kept)
    places.undo()
    assert set(places.in_flight) == {kept, moved}
    assert set(places.changed) == {kept, moved, new}


async def parts_in(storage: cf.Storage) -> list[str]:
    """The keys of the runs' parts (path chunks, places) in ``storage``, sorted."""
    await storage.open()
    try:
        return sorted(key for key in await storage.keys() if key.startswith(PARTS_PREFIX))
    finally:
        await storage.aclose()


@pytest.mark.parametrize("kind", PERSISTENT)
async def test_a_failed_fan_out_keeps_its_places_to_resume_and_a_forget_deletes_them(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """ "f1" commits while "a" and "b" wait: its commit writes their places and their
    fan-out's. "f2" then fails the run, whose places stay; the resume puts "a" and "b"
    back under way and ends the run, which deletes them; a forget leaves no part."""
    backend = make_backend(kind, tmp_path, request)
    a, b = Gate(), Gate()
    flow = (
        cf.Flow.builder("held")
        .add_node("s", Recorder())
        .add_node("a", a)
        .add_node("b", b)
        .add_node("f1", Recorder())
        .add_node("f2", FailsOnce())
        .add_join("j", Recorder())
        .add_route("s", ["a", "b", "f1"])
        .add_route("f1", "f2")
        .add_route("a", "j")
        .add_route("b", "j")
        .add_route("f2", "j")
        .build()
    )
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError, match="node 'f2' failed in post"):
            await engine.run(flow, backend.open(), run_id="r")
        failed = await parts_in(backend.open())
        a.open.set()
        b.open.set()
        result = await engine.resume(flow, backend.open(), run_id="r")
        done = await parts_in(backend.open())
        assert await engine.forget_run(backend.open(), "r")
    assert len(failed) == 3  # the places of "a", "b" and their fan-out
    assert all(key.startswith(place_key("r", 0)[:-1]) for key in failed)
    assert (a.entered, b.entered) == (2, 2)
    assert sorted(result.execution_path) == ["a", "b", "f1", "f2", "j", "s"]
    assert done == []
    assert await parts_in(backend.open()) == []


def test_a_plan_abandoned_gives_back_the_free_numbers_it_took() -> None:
    """The commit of "kept"'s step failed: "new", which took the free number 0, is still
    to write, and 0 is free again (the next plan gives it the same number)."""
    kept, new = Branch([]), Branch([])
    places = Places.restored("r", 3, {kept: 1}, [1], [kept], kept)
    new.resume_at = {"frames": [], "label": "0.0/", "count": 1, "params": {}}
    places.entered(new)
    resume_at = {"frames": [], "label": "", "count": 1, "node": "a", "action": {}}
    first = places.staged(kept, resume_at)
    assert (first.numbers, first.taken, places.free) == ({new: 0}, [0], [2])
    places.abandoned(first)
    assert (sorted(places.free), set(places.changed)) == ([0, 2], {kept, new})
    again = places.staged(kept, resume_at)
    places.committed(again, kept)
    assert (places.numbers, places.free, places.stored) == ({kept: 1, new: 0}, [2], {0, 1})
