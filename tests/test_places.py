"""Tests for :mod:`cosmoflow_actors.runtime.places`: a durable run's commits write the
places of what changed, not of every branch in flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.places import Places
from cosmoflow_actors.runtime.run import Branch, Fork
from cosmoflow_actors.storage.base import PARTS_PREFIX, StagedOp, place_key
from tests.storage_suite import PERSISTENT, make_backend
from tests.support import FailsOnce, Gate, Recorder, ticking


class CommitsSeen(cf.SQLiteStorage):
    """A real SQLiteStorage that keeps the place keys each commit of a step writes or
    deletes, and the records it stores."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits: list[list[str]] = []
        self.places: list[list[Any]] = []
        """The places each commit of a step writes."""
        self.records: list[Any] = []
        self.stored: dict[int, trio.Event] = {}
        """An event per count of commits stored, set once there were that many."""

    async def commit_step(
        self, ops: list[StagedOp], record_key: str, record: Any, steps_before: int
    ) -> bool:
        self.commits.append([key for _, key, _ in ops if "/at/" in key])
        self.places.append([value for op, key, value in ops if "/at/" in key and op == "set"])
        self.records.append(record)
        committed = await super().commit_step(ops, record_key, record, steps_before)
        self.stored.setdefault(len(self.records), trio.Event()).set()
        return committed

    async def commits_stored(self, count: int) -> None:
        """Wait until ``count`` commits are stored."""
        await self.stored.setdefault(count, trio.Event()).wait()


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


def test_a_routing_undone_forgets_its_arrivals() -> None:
    """An arrival the router took back from its fan-out is not written; one it kept is."""
    fork = Fork(Branch([]), depth=1, pending=3)
    places = Places("r")
    fork.arrivals.append({"k": 1})
    places.arrived(fork)
    places.mark()
    fork.arrivals.append({"k": 2})
    places.arrived(fork)
    places.undo()
    assert [(arrival.order, arrival.params) for arrival in places.changed] == [(0, {"k": 1})]


class Brings(cf.Node):
    """Waits for ``go`` (when given), then goes to the join with ``params``; counts its
    runs."""

    def __init__(self, go: trio.Event | None = None, **params: Any) -> None:
        super().__init__()
        self.go = go
        self.params = params
        self.runs = 0

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if self.go is not None:
            await self.go.wait()
        self.runs += 1

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.with_params("default", **self.params)


class Joined(cf.Node):
    """Stores the params it gets under "joined"."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        await store.set("joined", dict(ctx.params))


def params_written(places: list[Any]) -> int:
    """How many params the places hold (a branch's next step's, an arrival's, a
    fan-out's)."""
    return sum(len(saved.get("params", {})) for place in places for saved in place.values())


async def test_each_arrival_at_a_join_writes_the_params_it_brought_not_all_that_arrived(
    tmp_path: Path,
) -> None:
    """Every branch of a wide fan-out brings a param of its own to the join, which gets
    them all; the places written hold each param once, but the last arrival's: it ends
    the fan-out (a crash before the join's step routes its step again)."""
    width = 48
    builder = cf.Flow.builder("brings").add_node("s", Recorder()).add_join("j", Joined())
    targets = [f"b{index}" for index in range(width)]
    for index, target in enumerate(targets):
        builder.add_node(target, Brings(**{f"p{index}": index})).add_route(target, "j")
    storage = CommitsSeen(tmp_path / "brings.db")
    async with cf.open_engine() as engine:
        await engine.run(builder.add_route("s", targets).build(), storage, run_id="r")
        async with engine.open_store(cf.SQLiteStorage(tmp_path / "brings.db")) as store:
            joined = await store.get("joined")
    assert joined == {f"p{index}": index for index in range(width)}
    written = sum(params_written(places) for places in storage.places)
    assert written == width - 1


def held(a: cf.Node, b: cf.Node, f1: cf.Node, join: cf.Node) -> cf.Flow:
    """ "s" fans out to ``a``, ``b`` and ``f1``, which goes on to "f2", whose first post
    fails; "a", "b" and "f2" meet at the join "j"."""
    return (
        cf.Flow.builder("held")
        .add_node("s", Recorder())
        .add_node("a", a)
        .add_node("b", b)
        .add_node("f1", f1)
        .add_node("f2", FailsOnce())
        .add_join("j", join)
        .add_route("s", ["a", "b", "f1"])
        .add_route("f1", "f2")
        .add_route("a", "j")
        .add_route("b", "j")
        .add_route("f2", "j")
        .build()
    )


async def test_a_resumed_join_gets_the_params_of_the_arrivals_before_the_failure_in_order(
    tmp_path: Path,
) -> None:
    """ "a", then "b" arrive at the join, each with an "x" of its own, while "f1" is held;
    "f2" then fails the run. Its places hold the fan-out and the two arrivals; the resume
    runs "f2" alone, and the join gets the params of "a" and "b" with "b"'s "x" (the
    later arrival's), as the run would have."""
    b_go, f1_go = trio.Event(), trio.Event()
    a, b, f1 = Brings(x="a", a=1), Brings(b_go, x="b", b=2), Brings(f1_go)
    flow = held(a, b, f1, Joined())
    storage = CommitsSeen(tmp_path / "held.db")
    async with cf.open_engine() as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(failed_run, engine, flow, storage)
            await storage.commits_stored(2)  # "s" and "a"
            b_go.set()
            await storage.commits_stored(3)  # "b"
            f1_go.set()
        arrivals = [
            place["arrival"] for places in storage.places for place in places if "arrival" in place
        ]
        result = await engine.resume(flow, cf.SQLiteStorage(tmp_path / "held.db"), run_id="r")
        async with engine.open_store(cf.SQLiteStorage(tmp_path / "held.db")) as store:
            joined = await store.get("joined")
    assert [(arrival["order"], arrival["params"]) for arrival in arrivals] == [
        (0, {"x": "a", "a": 1}),
        (1, {"x": "b", "b": 2}),
    ]
    assert joined == {"x": "b", "a": 1, "b": 2}
    assert (a.runs, b.runs, f1.runs) == (1, 1, 1)
    assert result.execution_path[-2:] == ("f2", "j")


async def failed_run(engine: cf.Engine, flow: cf.Flow, storage: cf.Storage) -> None:
    with pytest.raises(cf.NodeError, match="node 'f2' failed in post"):
        await engine.run(flow, storage, run_id="r")


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
    flow = held(a, b, Recorder(), Recorder())
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
    places = Places.restored("r", 3, {kept: 1}, [1], [kept], kept, {})
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
