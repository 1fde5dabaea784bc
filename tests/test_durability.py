"""Durable runs: each step commits its writes with the run's record; resume goes on."""

from __future__ import annotations

import contextlib
import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.runtime import run_record
from cosmoflow_actors.storage.base import PARTS_PREFIX, path_chunk_key
from tests.storage_suite import BACKENDS, JsonDictStorage, make_backend
from tests.support import (
    CHILDREN_OF_THE_LOOP,
    CHILDREN_ON_THE_BRANCHES,
    Gate,
    Recorder,
    batch_flow_twice_in_a_loop,
    batch_flows_on_two_branches,
    closed_late_around,
    commits,
    single,
    taking_turns,
)


class Counted(cf.Node):
    """Increments "n", records which posts ran, fails once at ``fail_at`` if asked."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.posts: list[int] = []

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> str:
        n = await store.update("n", lambda n: n + 1, default=0)
        await store.set(f"seen:{n}", ctx.node_id)
        assert await store.get(f"seen:{n}") == ctx.node_id  # a step reads its own writes
        if n == self.fail_at:
            self.fail_at = None
            raise RuntimeError(f"crash at step {n}")
        self.posts.append(n)
        return "again"


def loop_flow(node: cf.Node, steps: int = 5) -> cf.Flow:
    return (
        cf.Flow.builder("loop")
        .add_node("count", node)
        .add_route("count", "count", "again", when=cf.ActionCondition.compare("n", "<", steps))
        .add_route("count", cf.END, "again")
        .build()
    )


async def read_all(path: Path) -> dict[str, Any]:
    storage = cf.FileStorage(path)
    await storage.open()
    return {key: await storage.get(key) for key in await storage.keys()}


async def test_a_durable_run_records_its_result_and_is_not_run_twice(tmp_path: Path) -> None:
    node = Counted()
    path = tmp_path / "store.json"
    async with cf.open_engine() as engine:
        first = await engine.run(loop_flow(node), cf.FileStorage(path), run_id="r1")
        again = await engine.run(loop_flow(node), cf.FileStorage(path), run_id="r1")
        runs = await engine.list_runs(cf.FileStorage(path))
    assert node.posts == [1, 2, 3, 4, 5]
    assert again.execution_path == first.execution_path == ("count",) * 5
    assert again.final_action == first.final_action
    assert runs == [cf.RunRecord("r1", "loop", "succeeded", "count", 5)]
    stored = await read_all(path)
    assert stored["n"] == 5
    assert stored["__cosmoflow__/runs/r1"]["state"] == "succeeded"


async def test_a_failed_step_commits_nothing_and_resume_goes_on_from_it(tmp_path: Path) -> None:
    node = Counted(fail_at=3)
    path = tmp_path / "store.json"
    flow = loop_flow(node)
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError):
            await engine.run(flow, cf.FileStorage(path), run_id="r2")
        assert (await read_all(path))["n"] == 2
        failure = "NodeError: node 'count' failed in post (flow 'loop', run r2, 1 attempt)"
        assert await engine.list_runs(cf.FileStorage(path)) == [
            cf.RunRecord("r2", "loop", "failed", "count", 2, error=failure)
        ]
        with pytest.raises(cf.CosmoFlowError, match=r"continue it with engine\.resume"):
            await engine.run(flow, cf.FileStorage(path), run_id="r2")
        result = await engine.resume(flow, cf.FileStorage(path), run_id="r2")
    assert node.posts == [1, 2, 3, 4, 5]
    assert result.execution_path == ("count",) * 5
    assert (await read_all(path))["n"] == 5


class Unstorable(cf.Node):
    """Writes "n" = 1, then ends its step with what ``outcome`` gives: a write, an
    action's params or a result that JSON cannot hold."""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action | None:
        await store.set("n", 1)
        if self.outcome == "write":
            await store.set("x", float("nan"))
        elif self.outcome == "params":
            return cf.Action.with_params("default", handle=object())
        elif self.outcome == "result":
            return cf.Action.complete(object())
        return None


@pytest.mark.parametrize(
    ("outcome", "named"),
    [
        ("write", "cannot store key 'x': a value of type float holds the float nan"),
        ("params", "the run's record holds the params and result of the action 'default'"),
        ("result", "the run's record holds the params and result of the action 'complete'"),
    ],
)
async def test_a_step_whose_data_cannot_be_stored_fails_naming_the_node_and_stores_nothing(
    tmp_path: Path, outcome: str, named: str
) -> None:
    flow = cf.Flow.builder("unstorable").add_node("w", Unstorable(outcome)).build()
    path = tmp_path / "store.db"
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError) as info:
            await engine.run(flow, cf.SQLiteStorage(path), run_id="u")
        runs = await engine.list_runs(cf.SQLiteStorage(path))
        assert await engine.run(flow, {}) is not None  # the engine goes on
    assert (info.value.node_id, info.value.phase, info.value.flow_name) == (
        "w",
        "commit",
        "unstorable",
    )
    cause = info.value.__cause__
    assert isinstance(cause, cf.StoreValueError) and named in str(cause)
    failure = "NodeError: node 'w' failed in commit (flow 'unstorable', run u, 1 attempt)"
    assert runs == [cf.RunRecord("u", "unstorable", "failed", None, 0, error=failure)]
    storage = cf.SQLiteStorage(path)
    assert await storage.keys() == ["__cosmoflow__/runs/u"]
    await storage.aclose()


async def test_a_cancelled_run_resumes_after_its_last_committed_step(tmp_path: Path) -> None:
    paused = trio.Event()
    release = trio.Event()

    class Pausing(Counted):
        async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
            if len(self.posts) == 2:
                paused.set()  # step 2 has committed: the run moved on
                await release.wait()

    node = Pausing()
    path = tmp_path / "store.json"
    async with cf.open_engine() as engine:
        run = await engine.start_run(loop_flow(node), cf.FileStorage(path), run_id="r3")
        await paused.wait()
        run.cancel()
        assert [r.state for r in await engine.list_runs(cf.FileStorage(path))] == ["running"]
        release.set()
        result = await engine.resume(loop_flow(node), cf.FileStorage(path), run_id="r3")
    assert node.posts == [1, 2, 3, 4, 5]
    assert result.steps_executed == 5


async def test_resuming_an_unknown_run_starts_it(tmp_path: Path) -> None:
    node = Counted()
    async with cf.open_engine() as engine:
        result = await engine.resume(
            loop_flow(node, 2), cf.FileStorage(tmp_path / "s.json"), run_id="new"
        )
    assert result.execution_path == ("count", "count")


async def test_concurrent_durable_updates_lose_nothing(tmp_path: Path) -> None:
    flow = (
        cf.Flow.builder("inc")
        .add_node("inc", cf.node(_increment))
        .add_route("inc", "inc", "again")
        .max_steps(10)
        .build()
    )
    storage = cf.SQLiteStorage(tmp_path / "store.db")

    async def one(engine: cf.Engine, index: int) -> None:
        with pytest.raises(cf.MaxStepsExceeded):
            await engine.run(flow, storage, run_id=f"run-{index}")

    async with cf.open_engine() as engine:
        async with trio.open_nursery() as nursery:
            for index in range(300):
                nursery.start_soon(one, engine, index)
        result = await engine.run(_reader(), storage)
    assert result.result == 3000


async def _increment(ctx: cf.ExecutionContext) -> str:
    await ctx.store.update("count", lambda n: n + 1, default=0)
    return "again"


def _reader() -> cf.Flow:
    @cf.node
    async def read(ctx: cf.ExecutionContext) -> cf.Action:
        return cf.Action.complete(await ctx.store.get("count"))

    return cf.Flow.builder("read").add_node("read", read).build()


async def test_records_are_hidden_from_keys_size_and_clear(tmp_path: Path) -> None:
    path = tmp_path / "store.json"

    @cf.node
    async def tidy(ctx: cf.ExecutionContext) -> cf.Action:
        await ctx.store.set("user", 1)
        return cf.Action.complete([await ctx.store.keys(), await ctx.store.size()])

    @cf.node
    async def wipe(ctx: cf.ExecutionContext) -> None:
        await ctx.store.clear()

    async with cf.open_engine() as engine:
        result = await engine.run(
            cf.Flow.builder("t").add_node("t", tidy).build(), cf.FileStorage(path), run_id="a"
        )
        assert result.result == [["user"], 1]
        await engine.run(cf.Flow.builder("w").add_node("w", wipe).build(), cf.FileStorage(path))
        assert [r.run_id for r in await engine.list_runs(cf.FileStorage(path))] == ["a"]


async def test_list_runs_on_a_temporary_engine(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await loop_flow(Counted(), 1).run(cf.SQLiteStorage(path), run_id="only")
    assert await cf.list_runs(cf.SQLiteStorage(path)) == [
        cf.RunRecord("only", "loop", "succeeded", "count", 1)
    ]


async def test_forget_run_deletes_an_ended_runs_record_and_keeps_what_it_wrote(
    tmp_path: Path,
) -> None:
    storage = cf.SQLiteStorage(tmp_path / "store.db")
    node = Counted(fail_at=2)
    async with cf.open_engine() as engine:
        await engine.run(loop_flow(node, 1), storage, run_id="ok")
        with pytest.raises(cf.NodeError):
            await engine.run(loop_flow(node, 3), storage, run_id="failed")
        assert await engine.forget_run(storage, "ok")
        assert await engine.forget_run(storage, "failed")
        assert not await engine.forget_run(storage, "ok")
        assert await engine.list_runs(storage) == []
        again = await engine.run(loop_flow(node, 3), storage, run_id="ok")
    assert again.steps_executed == 2  # run anew: "n" was 1 (kept) when it started
    assert node.posts == [1, 2, 3]


async def test_forget_run_keeps_a_run_recorded_in_a_state_not_named(tmp_path: Path) -> None:
    storage = cf.SQLiteStorage(tmp_path / "store.db")
    node = Counted(fail_at=2)
    async with cf.open_engine() as engine:
        await engine.run(loop_flow(node, 1), storage, run_id="ok")
        with pytest.raises(cf.RunRecordedError, match="'ok' is recorded as succeeded, not failed"):
            await engine.forget_run(storage, "ok", states=["failed"])
        assert [run.run_id for run in await engine.list_runs(storage)] == ["ok"]
        read_once = (state for state in ("succeeded",))
        assert await engine.forget_run(storage, "ok", states=read_once)  # type: ignore[arg-type]
        for states, problem in (
            ([], "states is empty"),
            (["running"], "states: 'running' is not the state of a run that ended"),
            ("failed", "a collection of states, not 'failed'"),
            (["failed", ["succeeded"]], r"states: \['succeeded'\] is not the state"),
        ):
            with pytest.raises(ValueError, match=problem):
                await engine.forget_run(storage, "ok", states=states)  # type: ignore[arg-type]


async def test_forget_run_refuses_a_run_recorded_as_running_or_in_flight(tmp_path: Path) -> None:
    gate = Gate()
    path = tmp_path / "store.json"
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(gate, "gated"), cf.FileStorage(path), run_id="r")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(cf.RunRecordedError, match="'r' is in flight on this engine"):
            await engine.forget_run(cf.FileStorage(path), "r")
        run.cancel()
        with pytest.raises(cf.RunRecordedError, match=r"finish it with engine\.resume") as info:
            await engine.forget_run(cf.FileStorage(path), "r")
        gate.open.set()
        assert [r.state for r in await engine.list_runs(cf.FileStorage(path))] == ["running"]
    assert (info.value.run_id, info.value.flow, info.value.state) == ("r", "gated", "running")


@pytest.mark.parametrize("checkpoints", range(4))
async def test_forget_run_never_takes_the_record_of_a_run_resuming_on_this_engine(
    checkpoints: int, tmp_path: Path
) -> None:
    """A resume and a forget started together, the store not open yet: whichever the
    store actor serves first, the resumed run never loses its record mid-run."""
    storage = cf.SQLiteStorage(tmp_path / "store.db")
    node = Counted(fail_at=2)
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError):
            await engine.run(loop_flow(node, 3), storage, run_id="r")
        forgotten: list[bool | str] = []

        async def forget() -> None:
            for _ in range(checkpoints):
                await trio.lowlevel.checkpoint()
            try:
                forgotten.append(await engine.forget_run(storage, "r"))
            except cf.RunRecordedError as exc:
                forgotten.append(exc.state)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(engine.resume, run_id="r"), loop_flow(node, 3), storage
            )
            nursery.start_soon(forget)
        runs = await engine.list_runs(storage)
    assert forgotten == ["running"]
    assert runs == [cf.RunRecord("r", "loop", "succeeded", "count", 3)]


@pytest.mark.parametrize("kind", ["file", "sqlite", "redis"])
async def test_forget_run_forgets_the_records_of_a_batch_flows_children(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Deleted by the store actor (file) or in a transaction of the backend's own."""
    storage = make_backend(kind, tmp_path, request).open()
    flow, ran = batch_parent()
    async with cf.open_engine() as engine:
        await engine.run(flow, storage, run_id="p")
        await engine.run(flow, storage, run_id="p2")
        recorded = sorted(run.run_id for run in await engine.list_runs(storage))
        assert await engine.forget_run(storage, "p")
        kept = sorted(run.run_id for run in await engine.list_runs(storage))
        await engine.run(flow, storage, run_id="p")
    assert recorded == ["p", "p2", "p2:1/0", "p2:1/1", "p2:1/2", "p:1/0", "p:1/1", "p:1/2"]
    assert kept == ["p2", "p2:1/0", "p2:1/1", "p2:1/2"]
    assert ran == ["a", "b", "c"] * 3  # the children ran again with the new run


@pytest.mark.parametrize("kind", ["file", "sqlite", "redis"])
async def test_every_step_of_a_durable_batch_flow_runs_and_records_children_of_its_own(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same BatchFlow reached again, and two at once on a fan-out's branches: each
    step's children run and are recorded, and forgetting the run forgets them all."""
    storage = make_backend(kind, tmp_path, request).open()
    ran: list[list[str]] = []
    recorded: list[list[str]] = []
    async with cf.open_engine() as engine:
        for flow in (batch_flow_twice_in_a_loop(), batch_flows_on_two_branches()):
            await engine.run(flow, storage, run_id="job")
            async with engine.open_store(storage) as store:
                ran.append(sorted(await store.get("ran")))
                await store.delete("ran")
            recorded.append(sorted(run.run_id for run in await engine.list_runs(storage)))
            assert await engine.forget_run(storage, "job")
            assert await engine.list_runs(storage) == []
    assert ran == [CHILDREN_OF_THE_LOOP, CHILDREN_ON_THE_BRANCHES]
    assert recorded == [["job", *children] for children in ran]


LISTED: Final = ["a", "job", "job:2/0", "job:2/0:1/0", "job:2/1", "job:10/0", "job-2", "job1"]
"""Run ids in the order list_runs gives them: a child right after its parent."""


@pytest.mark.parametrize("kind", BACKENDS)
async def test_list_runs_sorts_by_run_id_a_child_right_after_its_parent(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Whatever order the backend keeps (random on Redis, insertion order elsewhere):
    records written in another order, whose plain str order would put "job-2" and
    "job:10/0" before "job:2/0"."""
    storage = make_backend(kind, tmp_path, request).open()
    for run_id in reversed(LISTED):
        await storage.set(run_record.record_key(run_id), run_record.new_record(run_id, "f", {}))
    async with cf.open_engine() as engine:
        runs = await engine.list_runs(storage)
    parents = {"job:2/0": "job", "job:2/0:1/0": "job:2/0", "job:2/1": "job", "job:10/0": "job"}
    assert [(run.run_id, run.parent_id) for run in runs] == [
        (run_id, parents.get(run_id)) for run_id in LISTED
    ]


async def test_forget_run_on_a_temporary_engine(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await loop_flow(Counted(), 1).run(cf.SQLiteStorage(path), run_id="only")
    assert await cf.forget_run(cf.SQLiteStorage(path), "only")
    assert await cf.list_runs(cf.SQLiteStorage(path)) == []


class EachName(cf.BatchFlow):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, Any]]:
        return [{"name": name} for name in ("a", "b", "c")]


def batch_parent(fail_on: str | None = None) -> tuple[cf.Flow, list[str]]:
    ran: list[str] = []

    @cf.node
    async def child(ctx: cf.ExecutionContext) -> None:
        name = ctx.params["name"]
        if name == fail_on and name not in ran:
            ran.append(name)
            raise RuntimeError(f"child {name} fails once")
        ran.append(name)
        await ctx.store.set(f"done:{name}", True)

    inner = cf.Flow.builder("child").add_node("child", child).build()
    return cf.Flow.builder("parent").add_node(
        "each", EachName(inner, max_concurrency=1)
    ).build(), ran


async def test_children_of_a_plain_run_leave_no_records(tmp_path: Path) -> None:
    flow, ran = batch_parent()
    storage = cf.FileStorage(tmp_path / "store.json")
    await flow.run(storage)
    assert sorted(ran) == ["a", "b", "c"]
    assert await cf.list_runs(storage) == []


async def test_children_of_a_durable_run_are_durable_and_not_run_again(tmp_path: Path) -> None:
    flow, ran = batch_parent(fail_on="b")
    storage = cf.FileStorage(tmp_path / "store.json")
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError):
            await engine.run(flow, storage, run_id="p")
        result = await engine.resume(flow, storage, run_id="p")
        records = {r.run_id: r.state for r in await engine.list_runs(storage)}
    assert sorted(ran) == ["a", "b", "b", "c"]
    assert result.success
    children = {f"p:1/{index}": "succeeded" for index in range(3)}
    assert records == {"p": "succeeded", **children}


async def test_a_child_of_a_recorded_run_is_forgotten_only_with_its_parent(tmp_path: Path) -> None:
    """Forgetting a finished child of a run that resumes would run its steps again: it is
    refused, and list_runs names each child's parent, so a clean-up can skip them."""
    flow, ran = batch_parent(fail_on="b")
    storage = cf.FileStorage(tmp_path / "store.json")
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError):
            await engine.run(flow, storage, run_id="p")
        before = await engine.list_runs(storage)
        with pytest.raises(cf.RunRecordedError, match="child run of the recorded run 'p'"):
            await engine.forget_run(storage, "p:1/0")
        parents = {run.run_id: run.parent_id for run in await engine.list_runs(storage)}
        await engine.resume(flow, storage, run_id="p")
    assert [run.run_id for run in before if run.state == "succeeded"] == ["p:1/0"]
    assert parents == {"p": None, "p:1/0": "p", "p:1/1": "p"}  # c never started
    assert sorted(ran) == ["a", "b", "b", "c"]  # the succeeded child did not run again


class Items(cf.BatchFlow):
    """One child per item of ``items`` (a test changes them between a run and its
    resume), its params holding a tuple, which the record holds as a list; post stores
    the children's results."""

    def __init__(self, flow: cf.Flow, items: list[int]) -> None:
        super().__init__(flow, max_concurrency=1)
        self.items = items

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, Any]]:
        return [{"item": item, "pair": (item, -item)} for item in self.items]

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: list[cf.FlowResult], ctx: Any
    ) -> None:
        await store.set("results", [result.result for result in exec_res])


class ItemStep(cf.Node):
    """A child's step: notes its item in ``ran``; step "second" of item 1 waits, the
    first time, until ``release`` opens (``paused`` is set then), and ends with the
    item as the child's result."""

    def __init__(self, name: str, ran: list[str], paused: trio.Event) -> None:
        self.name = name
        self.ran = ran
        self.paused = paused
        self.release = trio.Event()

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        item = ctx.params["item"]
        if self.name == "second" and item == 1 and not self.paused.is_set():
            self.paused.set()
            await self.release.wait()
        self.ran.append(f"{self.name}:{item}")

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        if self.name == "second":
            return cf.Action.complete(ctx.params["item"])
        return cf.Action.with_params("next", **ctx.params)


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_a_resumed_batch_flow_whose_items_changed_fails_naming_the_child(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Cancelled in child 1 (child 0 succeeded): a resume whose prep returns other items,
    the same reordered, or another item 1 fails the step naming the first child whose
    record holds other params, running nothing; one with the items as before runs what
    was left, each child with its own item."""
    storage = make_backend(kind, tmp_path, request).open()
    ran: list[str] = []
    paused = trio.Event()
    second = ItemStep("second", ran, paused)
    builder = cf.Flow.builder("child").add_node("first", ItemStep("first", ran, paused))
    child = builder.add_node("second", second).add_route("first", "second", "next").build()
    batch = Items(child, [0, 1, 2])
    flow = cf.Flow.builder("parent").add_node("each", batch).build()
    errors: list[tuple[str, str]] = []
    async with cf.open_engine() as engine:
        run = await engine.start_run(flow, storage, run_id="job")
        await paused.wait()
        run.cancel()
        second.release.set()
        before = [(r.run_id, r.state, r.steps) for r in await engine.list_runs(storage)]
        ran_before = list(ran)
        for items in ([10, 11, 12], [2, 1, 0], [0, 5, 2]):
            batch.items = items
            with pytest.raises(cf.NodeError) as failed:
                await engine.resume(flow, storage, run_id="job")
            assert failed.value.phase == "exec"
            assert isinstance(failed.value.__cause__, cf.RunRecordedError)
            errors.append((failed.value.__cause__.run_id, str(failed.value.__cause__)))
        ran_mismatched = list(ran)
        after_mismatch = [(r.run_id, r.state, r.steps) for r in await engine.list_runs(storage)]
        batch.items = [0, 1, 2]
        await engine.resume(flow, storage, run_id="job")
        async with engine.open_store(storage) as store:
            results = await store.get("results")
    children = [("job:1/0", "succeeded", 2), ("job:1/1", "running", 1)]
    assert before == [("job", "running", 0), *children]
    assert after_mismatch == [("job", "failed", 0), *children]
    assert ran_before == ran_mismatched == ["first:0", "second:0", "first:1"]
    assert [run_id for run_id, _ in errors] == ["job:1/0", "job:1/0", "job:1/1"]
    assert errors[2][1] == (
        "BatchFlow child run 'job:1/1' (item 1) is recorded with the params {'item': 1, "
        "'pair': [1, -1]}, but prep returned {'item': 5, 'pair': (5, -5)} for it: on "
        "resume, prep must return the same parameter sets in the same order (the child "
        "was not run)"
    )
    assert results == [0, 1, 2]
    assert ran == [*ran_before, "second:1", "first:2", "second:2"]


class Token:
    """A param JSON cannot hold, without an ``__eq__``: two tokens of one name are
    equal only as pickles."""

    def __init__(self, name: str) -> None:
        self.name = name


class Tokens(cf.BatchFlow):
    """One child per name of ``names``, its param a Token."""

    def __init__(self, flow: cf.Flow, names: list[str]) -> None:
        super().__init__(flow, max_concurrency=1)
        self.names = names

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, Any]]:
        return [{"token": Token(name)} for name in self.names]


async def test_a_pickle_stores_batch_children_are_matched_by_their_pickled_params(
    tmp_path: Path,
) -> None:
    """On the pickle codec, a child's params JSON cannot hold match a new equal set as
    pickles: a resume with the same names runs on, one with another name fails."""
    ran: list[str] = []

    @cf.node
    async def child(ctx: cf.ExecutionContext) -> None:
        name = ctx.params["token"].name
        ran.append(name)
        if name == "b" and ran.count("b") == 1:
            raise RuntimeError("child b fails once")

    batch = Tokens(cf.Flow.builder("child").add_node("child", child).build(), ["a", "b"])
    flow = cf.Flow.builder("parent").add_node("each", batch).build()
    storage = cf.SQLiteStorage(tmp_path / "store.db", codec="pickle")
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError):
            await engine.run(flow, storage, run_id="p")
        batch.names = ["a", "c"]
        with pytest.raises(cf.NodeError) as failed:
            await engine.resume(flow, storage, run_id="p")
        batch.names = ["a", "b"]
        result = await engine.resume(flow, storage, run_id="p")
    assert isinstance(failed.value.__cause__, cf.RunRecordedError)
    assert failed.value.__cause__.run_id == "p:1/1"
    assert result.success
    assert ran == ["a", "b", "b"]


# --- two engines running one durable run -------------------------------------------------


class PersistentDictStorage(JsonDictStorage):
    """The custom backend, declared persistent: its durable steps take the store actor's
    own commit path (no ``commit_step`` of its own)."""

    persistent = True


class Held(cf.Node):
    """Waits in exec until ``gate`` opens; post counts itself in "n" and signs "by"."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.arrived = trio.Event()
        self.gate = trio.Event()

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.arrived.set()
        await self.gate.wait()

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        await store.update("n", lambda n: n + 1, default=0)
        await store.set("by", self.label)


def held_flow(node: Held) -> cf.Flow:
    return cf.Flow.builder("held").add_node("step", node).build()


def two_instances(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> list[cf.Storage]:
    """Two storage instances over the same data of backend ``kind``, as two engines
    (or processes) would each have."""
    if kind == "custom":
        text: dict[str, str] = {}
        return [PersistentDictStorage(text), PersistentDictStorage(text)]
    backend = make_backend(kind, tmp_path, request)
    return [backend.open(), backend.open()]


async def chunk_keys_in(storage: cf.Storage) -> list[str]:
    """The keys of the path chunks in ``storage``, sorted."""
    await storage.open()
    try:
        keys = await storage.keys()
        return sorted(key for key in keys if key.startswith(PARTS_PREFIX) and "/path/" in key)
    finally:
        await storage.aclose()


@pytest.mark.parametrize("kind", ["file", "sqlite", "redis", "custom"])
async def test_a_long_run_commits_its_path_in_chunks_resumes_whole_and_forgets_them(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chunks of 3 node ids, a run that fails at its 8th step has committed two
    chunks with the steps that filled them (through the backend's commit_step, or the
    store actor's for the custom one); resumed, it goes on with its path whole and no
    step run twice. A forget takes its chunks and its BatchFlow children's, and no
    other run's."""
    monkeypatch.setattr(run_record, "PATH_CHUNK", 3)
    storage = two_instances(kind, tmp_path, request)[0]
    node = Counted(fail_at=8)
    flow = loop_flow(node, steps=11)
    others = [path_chunk_key(run_id, 0) for run_id in ("job2", "jo", "job/0")]
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError, match="failed in post"):
            await engine.run(flow, storage, run_id="job")
        failed = await chunk_keys_in(storage)
        resumed = await engine.resume(flow, storage, run_id="job")
        again = await engine.run(flow, storage, run_id="job")
        await storage.open()
        for key in [path_chunk_key("job:1/0", 0), *others]:
            await storage.set(key, ["count"] * 3)
        await storage.commit()
        await storage.aclose()
        assert await engine.forget_run(storage, "job")
    assert failed == [path_chunk_key("job", 0), path_chunk_key("job", 1)]
    assert node.posts == list(range(1, 12))
    assert resumed.execution_path == again.execution_path == ("count",) * 11
    assert await chunk_keys_in(storage) == sorted(others)


class Overtaken:
    """Two branches' nodes, a and b: the first to start waits until a node of the
    other branch has started after it (its step committed), so the branches commit in
    the other order than they started."""

    def __init__(self) -> None:
        self.first: str | None = None
        self.overtaken = trio.Event()

    async def step(self, ctx: cf.ExecutionContext) -> None:
        if self.first is None:
            self.first = ctx.node_id
            await self.overtaken.wait()

    def follow(self, ctx: cf.ExecutionContext) -> None:
        self.overtaken.set()


async def test_a_fan_outs_recorded_path_is_the_order_its_steps_started_whatever_the_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chunks of 2 node ids, the steps sealed in the order they committed (s, then
    the branch that started second) are written again in the order they started with
    the run's end: the recorded result is the one the run returned."""
    monkeypatch.setattr(run_record, "PATH_CHUNK", 2)
    overtaken = Overtaken()
    flow = (
        cf.Flow.builder("overtaken")
        .add_node("s", cf.node(lambda ctx: None))
        .add_node("a", cf.node(overtaken.step))
        .add_node("b", cf.node(overtaken.step))
        .add_node("a2", cf.node(overtaken.follow))
        .add_node("b2", cf.node(overtaken.follow))
        .add_route("s", ["a", "b"])
        .add_route("a", "a2")
        .add_route("b", "b2")
        .build()
    )
    path = tmp_path / "store.json"
    async with cf.open_engine() as engine:
        done = await engine.run(flow, cf.FileStorage(path), run_id="f")
        again = await engine.run(flow, cf.FileStorage(path), run_id="f")
    assert done.execution_path[:2] == ("s", overtaken.first)
    assert again.execution_path == done.execution_path
    assert again.steps_executed == done.steps_executed == 5


@pytest.mark.parametrize("kind", ["sqlite", "redis", "custom"])
async def test_two_engines_running_one_run_commit_each_step_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Engine a runs run "r"; engine b resumes it meanwhile (another process would do the
    same, over a storage instance of its own). Both reach the step's commit: a's lands,
    b's fails with RunConflictError, applies nothing, and leaves a's record alone."""
    storages = two_instances(kind, tmp_path, request)
    a, b = Held("a"), Held("b")

    async def resume_in_b(engine: cf.Engine) -> None:
        with pytest.raises(cf.RunConflictError, match="another engine committed step 1"):
            await engine.resume(held_flow(b), storages[1], run_id="r")

    async with cf.open_engine() as engine_a, cf.open_engine() as engine_b:
        run = await engine_a.start_run(held_flow(a), storages[0], run_id="r")
        await a.arrived.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resume_in_b, engine_b)
            await b.arrived.wait()
            a.gate.set()
            assert (await run.wait()).execution_path == ("step",)
            b.gate.set()
        records = await engine_a.list_runs(storages[0])
        stored = {key: await storages[0].get(key) for key in ("n", "by")}
    await storages[0].aclose()  # the direct reads opened it again after the engine closed it

    assert stored == {"n": 1, "by": "a"}
    assert [(r.run_id, r.state, r.steps) for r in records] == [("r", "succeeded", 1)]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_resume_that_reads_its_places_after_another_engine_commits_conflicts(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine a runs a fan-out one commit at a time; engine b resumes the run after its
    first step, and a commits the second between b's read of the record and b's read
    of the places: b's resume raises RunConflictError and runs nothing, as for a commit
    that comes second (not DamagedRecordError, for places the record it read does not
    name), and a's run ends with each step committed once."""
    storages = two_instances(kind, tmp_path, request)
    turns = trio.Semaphore(1)
    async with cf.open_engine() as engine_a, cf.open_engine() as engine_b:
        async with engine_a.events(lossless=True) as events:
            run = await engine_a.start_run(taking_turns(turns), storages[0], run_id="r")
            await commits(events, 1)
            get_many = storages[1].get_many

            async def after_a_commit(keys: list[str]) -> dict[str, Any]:
                turns.release()
                await commits(events, 1)
                return await get_many(keys)

            monkeypatch.setattr(storages[1], "get_many", after_a_commit)
            with pytest.raises(cf.RunConflictError, match="while its record and its parts"):
                await engine_b.resume(taking_turns(None), storages[1], run_id="r")
            for _ in range(4):
                turns.release()
            done = await run.wait()
        stored = await engine_a.list_runs(storages[0])
        async with engine_a.open_store(storages[0]) as store:
            counts = [await store.get(key) for key in await store.keys()]
    assert sorted(done.execution_path) == ["e", "j", "s", "x", "x2", "y"]
    assert [(r.run_id, r.state, r.steps) for r in stored] == [("r", "succeeded", 6)]
    assert counts == [1] * 6


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_run_whose_succeeded_record_is_forgotten_while_it_is_read_starts_anew(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chunks of 3 node ids, engine a runs a loop of 5 steps to its end; engine b
    runs it again, and a forgets it between b's read of the record and b's read of its
    path chunks: b's run starts anew, as after the forget (not DamagedRecordError for a
    chunk gone), and finds the count the first run left (a forget keeps the data)."""
    monkeypatch.setattr(run_record, "PATH_CHUNK", 3)
    storages = two_instances(kind, tmp_path, request)
    node = Counted()
    async with cf.open_engine() as engine_a, cf.open_engine() as engine_b:
        first = await engine_a.run(loop_flow(node), storages[0], run_id="r")
        get_many = storages[1].get_many

        async def after_a_forget(keys: list[str]) -> dict[str, Any]:
            monkeypatch.setattr(storages[1], "get_many", get_many)
            assert await engine_a.forget_run(storages[0], "r")
            return await get_many(keys)

        monkeypatch.setattr(storages[1], "get_many", after_a_forget)
        again = await engine_b.run(loop_flow(node), storages[1], run_id="r")
        [record] = await engine_b.list_runs(storages[1])
    assert first.execution_path == ("count",) * 5
    assert again.execution_path == ("count",)
    assert node.posts == [1, 2, 3, 4, 5, 6]
    assert (record.run_id, record.state, record.steps) == ("r", "succeeded", 1)


class HeldThenFails(Held):
    """A Held whose exec fails once its gate opens."""

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        await super().exec(prep_res, ctx)
        raise RuntimeError(f"{self.label} fails")


def two_step_flow(first: Held, second: Held) -> cf.Flow:
    return (
        cf.Flow.builder("held")
        .add_node("first", first)
        .add_node("second", second)
        .add_route("first", "second")
        .build()
    )


class HeldShielded(Held):
    """A Held whose wait for its gate is shielded: its step goes on to post and its
    commit even if its run is cancelled meanwhile (as a thread's exec does)."""

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        with trio.CancelScope(shield=True):
            await super().exec(prep_res, ctx)


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_a_commit_once_a_scope_around_the_engine_is_cancelled_leaves_the_run_resumable(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A scope around the engine is cancelled, and the store actor stops before the
    engine's block ends (closed_late_around holds it off). The caller of the durable
    run is outside that scope; the run's second step then commits: the run ends
    CANCELLED, its record running after step 1, and a new engine's resume completes it
    (second's step runs again; nothing of the first attempt was committed)."""
    backend = make_backend(kind, tmp_path, request)
    first, second = Held("first"), HeldShielded("second")
    first.gate.set()
    flow = two_step_flow(first, second)
    errors: list[BaseException] = []

    async def call(engine: cf.Engine) -> None:
        try:
            await engine.run(flow, backend.open(), run_id="r")
        except Exception as exc:
            errors.append(exc)

    engine = await closed_late_around(call, second.arrived, second.gate)
    assert [type(error) for error in errors] == [cf.RunCancelledError]
    assert (engine.statistics().runs_failed, engine.statistics().runs_cancelled) == (0, 1)
    storage = backend.open()
    [record] = await cf.list_runs(storage)
    assert (record.state, record.steps) == ("running", 1)
    async with cf.open_engine() as again:
        resumed = await again.resume(flow, storage, run_id="r")
        stored = await again.list_runs(storage)
        async with again.open_store(storage) as handle:
            written = (await handle.get("n"), await handle.get("by"))
    assert resumed.execution_path == ("first", "second")
    assert [(r.state, r.steps) for r in stored] == [("succeeded", 2)]
    assert written == (2, "second")


@pytest.mark.parametrize("kind", ["sqlite", "redis", "custom"])
async def test_a_failure_in_another_engine_leaves_the_record_of_a_later_commit_alone(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Engine b resumes run "r" while engine a runs it; a commits step 1, then b's step 1
    fails. b's record of the failure would count no step, and put step 1 back in the
    run's future: it is not written, so a commits step 2 and each step is applied once."""
    storages = two_instances(kind, tmp_path, request)
    first, second, failing = Held("a"), Held("a"), HeldThenFails("b")

    async def resume_in_b(engine: cf.Engine) -> None:
        with pytest.raises(cf.NodeError, match="node 'first' failed in exec"):
            await engine.resume(two_step_flow(failing, Held("b")), storages[1], run_id="r")

    async with cf.open_engine() as engine_a, cf.open_engine() as engine_b:
        run = await engine_a.start_run(two_step_flow(first, second), storages[0], run_id="r")
        await first.arrived.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resume_in_b, engine_b)
            await failing.arrived.wait()
            first.gate.set()
            await second.arrived.wait()  # step 1 is committed
            failing.gate.set()
        second.gate.set()
        result = await run.wait()
        records = await engine_a.list_runs(storages[0])
        n = await storages[0].get("n")
    await storages[0].aclose()  # the direct read opened it again after the engine closed it

    assert result.execution_path == ("first", "second")
    assert [(r.run_id, r.state, r.steps) for r in records] == [("r", "succeeded", 2)]
    assert n == 2


async def test_a_step_whose_record_was_removed_meanwhile_is_not_applied() -> None:
    """Another process removed the run's record while a step ran: its commit is
    refused, so the step cannot recreate a run the store no longer knows."""
    text: dict[str, str] = {}
    node = Held("a")
    async with cf.open_engine() as engine:
        storage = PersistentDictStorage(text)
        run = await engine.start_run(held_flow(node), storage, run_id="jobs/7")
        await node.arrived.wait()
        del text["__cosmoflow__/runs/jobs/7"]
        node.gate.set()
        with pytest.raises(
            cf.RunConflictError, match="run 'jobs/7': the store no longer holds its record"
        ):
            await run.wait()

    assert text == {}


# --- fan-out in durable runs -------------------------------------------------------------


class Tally(cf.Node):
    """Counts its posts in the store ("posts:<node>") and logs its steps, with the
    params it was sent with and their execution ids, in the store's "log"."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        await store.update(f"posts:{ctx.node_id}", lambda n: n + 1, default=0)
        entry = [ctx.node_id, sorted(ctx.params.items()), ctx.execution_id]
        await store.update("log", lambda log: sorted([*log, entry]), default=[])


class Sent(Tally):
    """A Tally that sends the run on with ``params``."""

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params = params

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        await super().post(store, prep_res, exec_res, ctx)
        return cf.Action.with_params("default", **self.params)


def fan_and_join(c2: cf.Node | None = None) -> cf.Flow:
    """a fans out to b and c; b goes straight to the join j, c through c2."""
    return (
        cf.Flow.builder("fan")
        .add_node("a", Tally())
        .add_node("b", Sent(from_b=1))
        .add_node("c", Tally())
        .add_node("c2", c2 or Sent(from_c=2))
        .add_join("j", Tally())
        .add_route("a", ["b", "c"])
        .add_route("b", "j")
        .add_route("c", "c2")
        .add_route("c2", "j")
        .build()
    )


def nested_fans() -> cf.Flow:
    """s fans out to a nested flow and to a chain; the nested flow fans out with no join
    and ends when its branches end; both lines meet at the join j."""
    inner = (
        cf.Flow.builder("inner")
        .add_node("x", Tally())
        .add_node("y", Tally())
        .add_node("z", Tally())
        .add_node("y2", Tally())
        .add_route("x", ["y", "z"])
        .add_route("y", "y2")
        .build()
    )
    return (
        cf.Flow.builder("outer")
        .add_node("s", Tally())
        .add_node("inner", inner)
        .add_node("slow", Tally())
        .add_node("slow2", Tally())
        .add_join("j", Tally())
        .add_route("s", ["inner", "slow"])
        .add_route("inner", "j", when=cf.ActionCondition.compare("posts:x", "==", 1))
        .add_route("slow", "slow2")
        .add_route("slow2", "j")
        .build()
    )


LOST_BRANCH_TIMEOUT = 60
"""Virtual seconds (autojump clock) after which a resumed run counts as stuck."""


class Snapshots(PersistentDictStorage):
    """A persistent custom store that keeps a copy of everything it holds each time a
    run record is written: the store as a crash right after that commit would leave it."""

    def __init__(self, data: dict[str, str] | None = None) -> None:
        super().__init__(dict(data or {}))
        self.taken: list[dict[str, str]] = []

    async def set(self, key: str, value: Any) -> None:
        await super().set(key, value)
        if key.startswith("__cosmoflow__/runs/"):
            self.taken.append(dict(self.data))


def places_in(data: dict[str, str]) -> list[str]:
    """The keys of the places of the runs in ``data``."""
    return [key for key in data if key.startswith(PARTS_PREFIX) and "/at/" in key]


def user_data(data: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in data.items() if not key.startswith("__cosmoflow__")}


@pytest.mark.parametrize("flow", [fan_and_join, nested_fans])
async def test_a_fan_out_resumed_from_any_commit_ends_as_an_uninterrupted_run(
    flow: Callable[[], cf.Flow], autojump_clock: trio.abc.Clock
) -> None:
    """Every record a durable fan-out commits is a crash point: resumed from each, the
    run ends with the store an uninterrupted run leaves (every step applied once, with
    the execution id it had there). On the autojump clock, a resumed run that waits for
    a branch it lost fails at once."""
    whole = Snapshots()
    async with cf.open_engine() as engine:
        expected = await engine.run(flow(), whole, run_id="f")
    assert json.loads(whole.data["posts:j"]) == 1
    assert any(len(places_in(taken)) > 1 for taken in whole.taken)  # branches in flight
    for taken in whole.taken[:-1]:
        resumed = Snapshots(taken)
        with trio.fail_after(LOST_BRANCH_TIMEOUT):
            async with cf.open_engine() as engine:
                result = await engine.resume(flow(), resumed, run_id="f")
        assert user_data(resumed.data) == user_data(whole.data)
        assert sorted(result.execution_path) == sorted(expected.execution_path)


class HeldAt(Tally):
    """A Tally whose exec at "w" waits for ``w_may_go``, and at "d" for ``d_may_go`` while
    ``w_may_go`` is not set (so that "d" commits after "a", "b" and "c")."""

    def __init__(self, w_may_go: trio.Event, d_may_go: trio.Event, **config: Any) -> None:
        super().__init__(**config)
        self.w_may_go = w_may_go
        self.d_may_go = d_may_go

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if ctx.node_id == "w":
            await self.w_may_go.wait()
        if ctx.node_id == "d" and not self.w_may_go.is_set():
            await self.d_may_go.wait()


def held_at_w(w_may_go: trio.Event, d_may_go: trio.Event) -> cf.Flow:
    """ "s" fans out to "a", "b", "c" and "d"; "a", "b" and "c" go on to "w" (one step at
    a time, a mailbox of one), "d" to the join "j", where "w" goes too."""
    node = functools.partial(HeldAt, w_may_go, d_may_go)
    builder = cf.Flow.builder("held-at-w")
    for node_id in ("s", "a", "b", "c", "d"):
        builder.add_node(node_id, node())
    builder.add_node("w", node(max_concurrency=1, mailbox_size=1)).add_join("j", node())
    builder.add_route("s", ["a", "b", "c", "d"]).add_route("d", "j").add_route("w", "j")
    for node_id in ("a", "b", "c"):
        builder.add_route(node_id, "w")
    return builder.build()


async def test_a_resumed_run_writes_the_place_of_its_last_steps_branch_when_another_commits(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The record's last step ("d", done) names its branch's place, which only the
    record holds. Resumed, the run sends "a", "b" and "c" to "w" first (its mailbox of
    one holds the restore back), and "w"'s step commits before "d" is routed: that commit
    writes "d"'s place, so a crash there and a second resume do not run "d" again."""
    w_may_go, d_may_go = trio.Event(), trio.Event()
    first = Snapshots()
    async with cf.open_engine() as engine:
        run = await engine.start_run(held_at_w(w_may_go, d_may_go), first, run_id="r")
        await trio.testing.wait_all_tasks_blocked()
        d_may_go.set()
        await trio.testing.wait_all_tasks_blocked()
        run.cancel()
    crashed = first.taken[-1]
    assert json.loads(crashed["__cosmoflow__/runs/r"])["last"]["node"] == "d"
    w_may_go.set()
    second = Snapshots(crashed)
    async with cf.open_engine() as engine:
        await engine.resume(held_at_w(w_may_go, d_may_go), second, run_id="r")
    assert json.loads(second.taken[0]["__cosmoflow__/runs/r"])["last"]["node"] == "w"
    third = Snapshots(second.taken[0])
    async with cf.open_engine() as engine:
        await engine.resume(held_at_w(w_may_go, d_may_go), third, run_id="r")
    assert {key: json.loads(third.data[key]) for key in ("posts:d", "posts:w", "posts:j")} == {
        "posts:d": 1,
        "posts:w": 3,
        "posts:j": 1,
    }


class FailsOnce(Sent):
    """A Sent whose first attempt waits in exec for ``go``, then fails in post."""

    def __init__(self, go: trio.Event, **params: Any) -> None:
        super().__init__(**params)
        self.go = go
        self.failed = False

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if not self.failed:
            await self.go.wait()

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        if not self.failed:
            self.failed = True
            raise RuntimeError("c2 fails once")
        return await super().post(store, prep_res, exec_res, ctx)


class HeldRecord(Snapshots):
    """Holds the write of the record of b's step until ``release``, telling ``holding``."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = trio.Event()
        self.release = trio.Event()

    async def set(self, key: str, value: Any) -> None:
        last = value.get("last") if key.startswith("__cosmoflow__/runs/") else None
        if last is not None and last["node"] == "b" and value["state"] == "running":
            self.holding.set()
            await self.release.wait()
        await super().set(key, value)


async def test_a_branch_failing_while_another_commits_is_recorded_after_that_commit() -> None:
    """c2 fails while b's step is committing. The failure is recorded on top of b's
    commit, not over it with the record from before: resumed, b's step does not run
    again, and the run ends with the store an uninterrupted run leaves."""
    reference = Snapshots()
    async with cf.open_engine() as engine:
        await engine.run(fan_and_join(), reference, run_id="f")

    storage = HeldRecord()
    flow = fan_and_join(c2=FailsOnce(storage.holding, from_c=2))
    async with cf.open_engine() as engine:
        run = await engine.start_run(flow, storage, run_id="f")
        await trio.testing.wait_all_tasks_blocked()  # c2 failed; b's record is held
        storage.release.set()
        with pytest.raises(cf.NodeError, match="c2"):
            await run.wait()
        assert [record.state for record in await engine.list_runs(storage)] == ["failed"]
        await engine.resume(flow, storage, run_id="f")
    assert user_data(storage.data) == user_data(reference.data)


def last_node(taken: dict[str, str]) -> str | None:
    """The node of the last step committed in the record of run "r" in ``taken``."""
    last = json.loads(taken["__cosmoflow__/runs/r"])["last"]
    return None if last is None else str(last["node"])


class FailsWhenTold(Tally):
    """A Tally whose exec fails when the store's "fail" is true."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> bool:
        told: bool = await store.get("fail", False)
        return told

    async def exec(self, prep_res: bool, ctx: cf.ExecutionContext) -> None:
        if prep_res:
            raise RuntimeError("told to fail")


async def test_a_resumed_run_that_fails_while_a_branch_waits_for_room_ends_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A run resumed at its fan-out: the first branch fails while the second waits for
    room in a full node's mailbox. The resume returns the failure at once, without
    waiting for that node's mailbox to drain."""
    held = Held("x")
    held.mailbox_size = 1
    held.max_concurrency = 1
    flow = (
        cf.Flow.builder("fan")
        .add_node("a", Tally())
        .add_node("f", FailsWhenTold())
        .add_node("x", held)
        .add_route("a", ["f", "x"])
        .build()
    )
    whole = Snapshots()
    held.gate.set()
    async with cf.open_engine() as engine:
        await engine.run(flow, whole, run_id="r")
    held.gate = trio.Event()
    forking = next(taken for taken in whole.taken if last_node(taken) == "a")
    crashed = Snapshots({**forking, "fail": json.dumps(True)})
    async with cf.open_engine() as engine:
        others = [await engine.start_run(flow, {}) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()  # x busy with one, its mailbox full
        with trio.fail_after(LOST_BRANCH_TIMEOUT), pytest.raises(cf.NodeError, match="'f'"):
            await engine.resume(flow, crashed, run_id="r")
        held.gate.set()
        for run in others:
            await run.wait()


# --- a crash fuzz of durable fan-outs ----------------------------------------------------
# Random flows of fan-outs run durably on a store that keeps a copy at each commit; the
# run resumed from every copy (and from copies of those resumes) must end as the
# uninterrupted run did.

UNBOUNDED: Final = 10**6
"""The max_steps of the drawn flows: no run of them comes near it."""


class Logs(cf.Node):
    """Counts its visits ("c:<node>"), logs each step under its execution id
    ("ran:<execution id>": its node and params, a list that a step applied twice
    lengthens), waits ``delay`` seconds in exec so that branches interleave, and sends
    the run on with "default", carrying its visits as params when ``with_params``.
    When ``fails``, its next post raises (once, whichever engine runs it)."""

    def __init__(self, delay: float, with_params: bool) -> None:
        super().__init__()
        self.delay = delay
        self.with_params = with_params
        self.fails = False

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        await trio.sleep(self.delay)

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        if self.fails:
            self.fails = False
            raise RuntimeError(f"{ctx.node_id} fails once")
        visits = await store.update(f"c:{ctx.node_id}", lambda n: n + 1, default=0)
        entry = [ctx.node_id, sorted(ctx.params.items())]
        await store.update(f"ran:{ctx.execution_id}", lambda ran: [*ran, entry], default=[])
        params = {f"v_{ctx.node_id}": visits} if self.with_params else {}
        return cf.Action.with_params("default", **params)


@dataclass
class Drawn:
    """A drawn flow, its nodes by id, the most branches, fan-outs and arrivals at
    joins it can have in flight at once (``peak``), and the nodes that run inside a
    fan-out."""

    flow: cf.Flow
    nodes: dict[str, Logs]
    peak: int
    forked: list[str]


Lane = tuple[str, list[str], int, bool]
"""A drawn lane or block: its entry node, the nodes whose "default" still needs a route,
the most branches, fan-outs and arrivals at joins it has in flight at once, and whether
a fan-out without a join ends it."""


class FanOutMaker:
    """Draws random valid flows of durable fan-outs: nested fan-outs, fan-outs in nested
    flows, with and without joins (a nested flow may be the join), loops around them
    (a tail node goes back while its visits are below a bound), branches of different
    lengths, and, with ``width``, one wide fan-out at the top.

    Every node returns "default"; a node that ends a lane carries no params, so a
    fan-out without a join ends the same whichever branch ends last: every run of a
    drawn flow ends with the same store and the same steps.
    """

    def __init__(self, rng: random.Random, width: int = 0) -> None:
        self.rng = rng
        self.width = width
        self.budget = rng.randint(6, 18)
        self.nodes: dict[str, Logs] = {}
        self.forked: list[str] = []
        self.routed: set[str] = set()
        self.next_id = 0

    def draw(self) -> Drawn:
        builder = cf.Flow.builder("top")
        entry, exits, peak, _ = self.lane(builder, 0, False, may_end=True)
        self.finish(builder, exits)
        flow = builder.start(entry).max_steps(UNBOUNDED).build()
        return Drawn(flow, self.nodes, peak, self.forked)

    def new_id(self) -> str:
        self.next_id += 1
        return f"n{self.next_id - 1}"

    def node(self, builder: cf.FlowBuilder, forked: bool, join: bool = False) -> str:
        node_id = self.new_id()
        self.budget -= 1
        node = Logs(self.rng.choice([0, 0, 1, 2, 5]), self.rng.random() < 0.5)
        self.nodes[node_id] = node
        if forked:
            self.forked.append(node_id)
        if join:
            builder.add_join(node_id, node)
        else:
            builder.add_node(node_id, node)
        return node_id

    def connect(self, builder: cf.FlowBuilder, exits: list[str], target: cf.Target) -> None:
        for source in exits:
            builder.add_route(source, target)
            self.routed.add(source)

    def finish(self, builder: cf.FlowBuilder, exits: list[str]) -> None:
        """End the lane's open exits, without params: a route to END, or no route."""
        for source in exits:
            if source in self.nodes:
                self.nodes[source].with_params = False
            if source in self.routed or self.rng.random() < 0.5:
                self.connect(builder, [source], cf.END)

    def lane(self, builder: cf.FlowBuilder, nest: int, forked: bool, may_end: bool) -> Lane:
        entry, exits, peak = "", list[str](), 1
        for _ in range(self.rng.randint(1, 3)):
            start, block_exits, block_peak, ended = self.block(builder, nest, forked, may_end)
            self.connect(builder, exits, start)
            entry, exits, peak = entry or start, block_exits, max(peak, block_peak)
            if ended or self.budget <= 0:
                return entry, exits, peak, ended
        return entry, exits, peak, False

    def block(self, builder: cf.FlowBuilder, nest: int, forked: bool, may_end: bool) -> Lane:
        kinds = ["node"]
        if self.budget > 2:
            kinds += ["fork", "fork", "loop"] + (["nested"] if nest < 2 else [])
        kind = "fork" if self.width else self.rng.choice(kinds)
        if kind == "fork":
            return self.fork(builder, nest, forked, may_end)
        if kind == "loop":
            return self.loop(builder, nest, forked)
        if kind == "nested":
            return self.nested(builder, nest, forked, join=False)
        node_id = self.node(builder, forked)
        return node_id, [node_id], 1, False

    def fork(self, builder: cf.FlowBuilder, nest: int, forked: bool, may_end: bool) -> Lane:
        """A node fanning out to lanes (a branch may end before the join), gathered at
        a join (a node or a nested flow, which may be a target itself), or ending the
        lane when it may end. In flight at once: the fan-out, its branches' (a branch's
        arrival at the join takes its place) and the fan-out's own arrival at the join
        when the join is a target."""
        source = self.node(builder, forked)
        join = not may_end or self.rng.random() < 0.6
        width, self.width = self.width or self.rng.randint(2, 4), 0
        targets: list[str] = []
        arrivals: list[str] = []
        peak = 1
        for _ in range(width):
            start, exits, branch_peak, ended = self.lane(builder, nest, True, may_end=True)
            targets.append(start)
            peak += branch_peak
            if join and not ended and self.rng.random() < 0.85:
                arrivals += exits
            else:
                self.finish(builder, exits)
        if not join:
            self.connect(builder, [source], tuple(targets))
            return source, [], peak, True
        if self.rng.random() < 0.3 and nest < 2 and self.budget > 2:
            join_id, exits, join_peak, _ = self.nested(builder, nest, forked, join=True)
            peak = max(peak, join_peak)
        else:
            join_id = self.node(builder, forked, join=True)
            exits = [join_id]
        if not arrivals or self.rng.random() < 0.2:
            targets.append(join_id)
            peak += 1  # the fan-out's own arrival at its join, which has a place
        self.connect(builder, arrivals, join_id)
        self.connect(builder, [source], tuple(targets))
        return source, exits, peak, False

    def loop(self, builder: cf.FlowBuilder, nest: int, forked: bool) -> Lane:
        start, body_exits, peak, _ = self.lane(builder, nest, forked, may_end=False)
        tail = self.node(builder, forked)
        self.connect(builder, body_exits, tail)
        bound = cf.ActionCondition.compare(f"c:{tail}", "<", self.rng.randint(1, 3))
        builder.add_route(tail, start, when=bound)
        self.routed.add(tail)
        return start, [tail], peak, False

    def nested(self, builder: cf.FlowBuilder, nest: int, forked: bool, join: bool) -> Lane:
        node_id = self.new_id()
        inner = cf.Flow.builder(f"sub_{node_id}")
        entry, exits, peak, _ = self.lane(inner, nest + 1, forked, may_end=True)
        self.finish(inner, exits)
        flow = inner.start(entry).max_steps(UNBOUNDED).build()
        if join:
            builder.add_join(node_id, flow)
        else:
            builder.add_node(node_id, flow)
        return node_id, [node_id], peak, False


class SlowSnapshots(Snapshots):
    """Snapshots whose sets and deletes wait 0 or ``pause`` seconds (drawn by ``rng``),
    so that branches route while a commit is under way."""

    def __init__(self, data: dict[str, str] | None = None, pause: float = 0, seed: int = 0) -> None:
        super().__init__(data)
        self.pause = pause
        self.rng = random.Random(seed)

    async def set(self, key: str, value: Any) -> None:
        await trio.sleep(self.rng.choice([0, self.pause]))
        await super().set(key, value)

    async def delete(self, key: str) -> bool:
        await trio.sleep(self.rng.choice([0, self.pause]))
        return await super().delete(key)


@dataclass
class Uninterrupted:
    """A drawn flow run durably as run "r" from start to end, without a crash: the store
    it left, each commit's copy, and its result."""

    drawn: Drawn
    store: SlowSnapshots
    result: cf.FlowResult

    @property
    def timeout(self) -> float:
        """Virtual seconds after which a resumed run counts as stuck."""
        return LOST_BRANCH_TIMEOUT + 2 * self.result.duration

    async def resumed(self, taken: dict[str, str]) -> SlowSnapshots:
        """The store once run "r" is resumed on a fresh engine from the copy ``taken``,
        checked to end as the uninterrupted run did."""
        storage = SlowSnapshots(taken, self.store.pause, len(taken))
        with trio.fail_after(self.timeout):
            async with cf.open_engine() as engine:
                result = await engine.resume(self.drawn.flow, storage, run_id="r")
        self.check(storage, result)
        return storage

    def check(self, storage: SlowSnapshots, result: cf.FlowResult) -> None:
        """``storage`` and ``result``, of a resumed run, are as the uninterrupted run's:
        every step applied once (with the execution id it had there), the same steps,
        no place left, and never more places than branches, fan-outs and arrivals at
        joins in flight."""
        assert user_data(storage.data) == user_data(self.store.data)
        assert sorted(result.execution_path) == sorted(self.result.execution_path)
        assert places_in(storage.data) == []
        assert max(places_counted(storage)) <= self.drawn.peak


def places_counted(storage: Snapshots) -> list[int]:
    """The count of place numbers in each record of run "r" that ``storage`` stored."""
    return [json.loads(taken[run_record.record_key("r")])["places"] for taken in storage.taken]


async def uninterrupted(seed: int, width: int, pause: float) -> Uninterrupted:
    """The first flow with a fan-out drawn from ``seed`` (with one ``width`` wide, if not
    0), run."""
    rng = random.Random(seed)
    drawn = FanOutMaker(rng, width).draw()
    while not drawn.forked:
        drawn = FanOutMaker(rng, width).draw()
    whole = SlowSnapshots(pause=pause, seed=seed)
    async with cf.open_engine() as engine:
        result = await engine.run(drawn.flow, whole, run_id="r")
    assert places_in(whole.data) == []
    assert max(places_counted(whole)) <= drawn.peak
    return Uninterrupted(drawn, whole, result)


async def resume_from_every_commit(seed: int, width: int, pause: float, again: int) -> None:
    """Resume the run of the flow drawn from ``seed`` from every commit, then from
    ``again`` commits of each resume (a crash during the resume)."""
    run = await uninterrupted(seed, width, pause)
    assert len(run.store.taken) > 2
    rng = random.Random(seed)
    for taken in run.store.taken[:-1]:
        resumed = await run.resumed(taken)
        inner = resumed.taken[:-1]
        for number in rng.sample(range(len(inner)), min(again, len(inner))):
            await run.resumed(inner[number])


async def fail_in_a_fan_out(seed: int, width: int, pause: float) -> None:
    """A node inside a fan-out of the flow drawn from ``seed`` fails once: the run fails
    with its error, recorded as failed; resumed, it ends as an uninterrupted run did.
    So does the run resumed from a few commits with that node failing once in the
    resume, and resumed again when it did."""
    run = await uninterrupted(seed, width, pause)
    rng = random.Random(seed)
    failing = rng.choice(run.drawn.forked)
    node = run.drawn.nodes[failing]
    node.fails = True
    storage = SlowSnapshots(pause=pause, seed=seed)
    with trio.fail_after(run.timeout):
        async with cf.open_engine() as engine:
            with pytest.raises(cf.NodeError) as info:
                await engine.run(run.drawn.flow, storage, run_id="r")
            assert info.value.node_id == failing
            assert [record.state for record in await engine.list_runs(storage)] == ["failed"]
            run.check(storage, await engine.resume(run.drawn.flow, storage, run_id="r"))
    for number in rng.sample(range(len(run.store.taken) - 1), 3):  # at least 4 commits
        node.fails = True
        storage = SlowSnapshots(run.store.taken[number], pause, number)
        with trio.fail_after(run.timeout):
            async with cf.open_engine() as engine:
                try:
                    await engine.resume(run.drawn.flow, storage, run_id="r")
                except cf.NodeError as exc:
                    assert exc.node_id == failing
                node.fails = False
                run.check(storage, await engine.resume(run.drawn.flow, storage, run_id="r"))


WIDE: Final = 37
"""The width of the wide fan-out of the fuzz's first seed."""

QUICK_SEEDS: Final = (0, 1, 3, 4, 8, 13, 17, 18)
"""The seeds of the fuzz in the normal suite: flows of 36 to 95 commits (the others of
the first 20 draw up to 347, whose resumes take a minute)."""


@pytest.mark.parametrize("seed", QUICK_SEEDS)
async def test_random_fan_outs_resumed_from_every_commit_end_as_uninterrupted_runs(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """Every commit of a durable run of a drawn flow of fan-outs is a crash point: the
    run resumed from each (and again from a commit of that resume) ends with the store
    and the steps of the uninterrupted run, each step applied once, no place left
    behind, and never more places counted than branches, fan-outs and arrivals at
    joins in flight."""
    await resume_from_every_commit(seed, WIDE if seed == 0 else 0, seed % 2 / 2, again=1)


@pytest.mark.parametrize("seed", QUICK_SEEDS)
async def test_random_fan_outs_whose_branch_fails_resume_to_the_uninterrupted_end(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    """A node in a fan-out of a drawn flow fails while the other branches commit (on a
    store whose writes take time): the run is recorded as failed, and resume goes on
    after its last committed step to the uninterrupted run's end (see
    :func:`fail_in_a_fan_out`)."""
    await fail_in_a_fan_out(seed, WIDE if seed == 0 else 0, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20, 44))
async def test_more_random_fan_outs_resumed_from_every_commit_on_a_slow_store(
    seed: int, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the fuzz above, on a store whose writes take time (branches route while a
    commit is under way), with path chunks of 5 node ids (sealed in the order the
    branches commit), wide fan-outs of 10 to 40 branches every fifth seed, and three
    resumes from each resume's commits."""
    monkeypatch.setattr(run_record, "PATH_CHUNK", 5)
    width = random.Random(seed).randint(10, 40) if seed % 5 == 0 else 0
    await resume_from_every_commit(seed, width, 0.5, again=3)
    await fail_in_a_fan_out(seed, width, 0.5)


async def test_a_durable_step_whose_update_finds_its_key_deleted_at_commit_stores_nothing() -> None:
    """On a custom backend (the store actor's own commit of a durable step): the step
    stages a set and an update of "k", which another run deletes before the step
    commits. The commit is refused with StoreKeyError and stores nothing of the step."""
    storage = PersistentDictStorage({"k": "1"})
    staged, deleted = trio.Event(), trio.Event()

    @cf.node
    async def bump(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set("a", 1)
        await ctx.store.update("k", lambda n: n + 1)
        staged.set()
        await deleted.wait()

    @cf.node
    async def remove(ctx: cf.ExecutionContext) -> None:
        await ctx.store.delete("k")

    async with cf.open_engine() as engine:
        run = await engine.start_run(single(bump), storage, run_id="r")
        await staged.wait()
        await engine.run(single(remove), storage)
        deleted.set()
        with pytest.raises(cf.StoreKeyError, match="'k'"):
            await run.wait()
    assert user_data(storage.data) == {}


async def test_nodes_cannot_write_the_engines_run_records(tmp_path: Path) -> None:
    @cf.node
    async def vandal(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set("__cosmoflow__/runs/victim", "garbage")

    storage = cf.FileStorage(tmp_path / "store.json")
    with pytest.raises(cf.NodeError) as info:
        await cf.Flow.builder("f").add_node("vandal", vandal).build().run(storage)
    assert isinstance(info.value.__cause__, cf.StorageError)
    assert "__cosmoflow__/runs/victim" in str(info.value.__cause__)
    assert await cf.list_runs(cf.FileStorage(tmp_path / "store.json")) == []


@pytest.mark.parametrize("outcome", ["committed", "failed"])
async def test_a_durable_steps_store_used_after_the_step_refuses_and_changes_nothing(
    tmp_path: Path, outcome: str
) -> None:
    # A write staged after the commit would be committed with no step: it must not be
    # accepted and then lost.
    kept: list[cf.SharedStore] = []

    @cf.node
    async def keeps(ctx: cf.ExecutionContext) -> None:
        kept.append(ctx.store)
        await ctx.store.set("inside", 1)
        if outcome == "failed":
            raise ValueError("fails")

    storage = cf.FileStorage(tmp_path / "store.json")
    flow = cf.Flow.builder("f").add_node("keeps", keeps).build()
    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        with contextlib.suppress(cf.NodeError):
            await engine.run(flow, storage, run_id="r1")
        for call in (kept[0].set("after", 2), kept[0].get("inside")):
            with pytest.raises(
                cf.StorageError, match="durable step at node 'keeps' of run 'r1' is closed"
            ):
                await call
        assert not await store.contains("after")
        assert await store.get("inside", None) == (1 if outcome == "committed" else None)


@pytest.mark.parametrize("fails", [False, True], ids=["commits", "fails"])
async def test_a_durable_step_whose_code_replaces_ctx_store_commits_through_its_own_handle(
    tmp_path: Path, fails: bool
) -> None:
    class Swaps(cf.Node):
        async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
            await store.set("before", 1)
            ctx.store = {}  # type: ignore[assignment]
            if fails:
                raise ValueError("fails after replacing ctx.store")

    storage = cf.FileStorage(tmp_path / "store.json")
    flow = cf.Flow.builder("swap").add_node("a", Swaps()).build()
    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        if fails:
            with pytest.raises(cf.NodeError):
                await engine.run(flow, storage, run_id="r1")
        else:
            await engine.run(flow, storage, run_id="r1")
        assert await store.get("before", None) == (None if fails else 1)
        assert (await engine.run(single(Recorder(), "after"), {})).success


class RefusesTheEnd(cf.SQLiteStorage):
    """SQLite that refuses to store a run record saying the run succeeded, as a full
    disk or a lost connection would."""

    async def commit_step(
        self, ops: list[Any], record_key: str, record: Any, steps_before: int
    ) -> bool:
        if record["state"] == "succeeded":
            raise cf.StorageError(f"{self!r}: disk full")
        return await super().commit_step(ops, record_key, record, steps_before)


class Finished(cf.Node):
    """Completes its run with "done"."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete("done")


async def test_a_run_whose_end_cannot_be_recorded_fails_alone_and_resumes(
    tmp_path: Path,
) -> None:
    """The refusal fails that run (the engine and a run in flight go on), and its record
    still says running, so that resume ends it."""
    path = tmp_path / "store.db"
    gate = Gate()
    async with cf.open_engine() as engine:
        other = await engine.start_run(single(gate), {})
        with pytest.raises(cf.StorageError, match="disk full"):
            await engine.run(single(Finished()), RefusesTheEnd(path), run_id="r")
        gate.open.set()
        assert (await other.wait()).success
        resumed = await engine.resume(single(Finished()), cf.SQLiteStorage(path), run_id="r")
    assert resumed.result == "done"


async def test_a_durable_run_cancelled_as_start_run_nowait_returns_is_not_recorded() -> None:
    """Its record would be written by a task of the engine's after the cancel."""
    text: dict[str, str] = {}
    storage = PersistentDictStorage(text)
    async with cf.open_engine() as engine, engine.open_store(storage):
        run = engine.start_run_nowait(single(Finished()), storage, run_id="r")
        run.cancel()
        with pytest.raises(cf.RunCancelledError):
            await run.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert await engine.list_runs(storage) == []


class CommitsHeld(cf.SQLiteStorage):
    """A real SQLiteStorage that holds each commit whose record's state or last node
    is in ``held`` until its ``release``; ``holding`` says a commit waits there."""

    def __init__(self, path: Path, held: list[str]) -> None:
        super().__init__(path)
        self.holding = {name: trio.Event() for name in held}
        self.release = {name: trio.Event() for name in held}

    async def commit_step(
        self, ops: list[Any], record_key: str, record: Any, steps_before: int
    ) -> bool:
        last = (record["last"] or {}).get("node")
        name = last if record["state"] == "running" else record["state"]
        if name in self.holding:
            self.holding[name].set()
            await self.release[name].wait()
        return await super().commit_step(ops, record_key, record, steps_before)


class WaitsFor(cf.Node):
    """exec waits for ``event``; records the runs whose exec began."""

    def __init__(self, event: trio.Event, **config: Any) -> None:
        super().__init__(**config)
        self.event = event
        self.ran: list[str] = []

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.ran.append(ctx.run_id)
        await self.event.wait()


def completes_beside(other: cf.Node) -> cf.Flow:
    """s fans out to "a", which completes the run, and to ``other``."""
    return (
        cf.Flow.builder("beside")
        .add_node("s", cf.Node())
        .add_node("a", Finished())
        .add_node("other", other)
        .add_route("s", ["a", "other"])
        .build()
    )


async def test_a_run_cancelled_while_its_end_waits_for_the_lock_stays_running_in_its_record(
    tmp_path: Path,
) -> None:
    """Branch a completes the run while branch other's commit holds the run's lock; the
    run is cancelled before the end is written: its record still says running, and
    resume ends it."""
    path = tmp_path / "store.db"
    storage = CommitsHeld(path, ["a", "other"])
    flow = completes_beside(WaitsFor(storage.holding["a"]))
    async with cf.open_engine() as engine, engine.open_store(storage):
        run = await engine.start_run(flow, storage, run_id="r")
        await storage.holding["a"].wait()
        await trio.testing.wait_all_tasks_blocked()  # other's commit waits for the lock
        storage.release["a"].set()
        await storage.holding["other"].wait()
        await trio.testing.wait_all_tasks_blocked()  # a's end waits behind other's commit
        run.cancel()
        storage.release["other"].set()
        with pytest.raises(cf.RunCancelledError):
            await run.wait()
        await trio.testing.wait_all_tasks_blocked()
        [record] = await engine.list_runs(storage)
        assert record.state == "running"
        resumed = await engine.resume(flow, cf.SQLiteStorage(path), run_id="r")
    assert resumed.result == "done"


class CompletesUnlessHeld(cf.Node):
    """Completes its run with "done"; first, in a run named in ``held``, waits for that
    event."""

    def __init__(self, held: dict[str, trio.Event]) -> None:
        super().__init__()
        self.held = held

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if ctx.run_id in self.held:
            await self.held[ctx.run_id].wait()

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete("done")


async def test_no_step_of_a_durable_run_starts_once_its_end_is_decided(tmp_path: Path) -> None:
    """Run r's step at node "other" waits in its mailbox (run busy holds the node's one
    slot) when r's branch a completes r; the slot frees while r's end is written: r's
    step never starts."""
    free = trio.Event()
    other = WaitsFor(free, max_concurrency=1)
    flow = (
        cf.Flow.builder("beside")
        .add_node("s", cf.Node())
        .add_node("a", CompletesUnlessHeld({"busy": trio.Event()}))
        .add_node("other", other)
        .add_route("s", ["a", "other"])
        .build()
    )
    storage = CommitsHeld(tmp_path / "store.db", ["succeeded"])
    async with cf.open_engine() as engine, engine.open_store(storage):
        busy = await engine.start_run(flow, {}, run_id="busy")
        await trio.testing.wait_all_tasks_blocked()
        run = await engine.start_run(flow, storage, run_id="r")
        await storage.holding["succeeded"].wait()
        assert engine.statistics().actor("beside/other").mailbox_depth == 1
        free.set()
        await trio.testing.wait_all_tasks_blocked()
        storage.release["succeeded"].set()
        assert (await run.wait()).result == "done"
        busy.cancel()
    assert other.ran == ["busy"]


async def test_a_durable_runs_end_is_not_written_over_a_record_another_engine_advanced(
    tmp_path: Path,
) -> None:
    """While the end of run r is held, another engine commits a step of r (its record
    counts more steps): the end is refused with RunConflictError and that record
    stays."""
    path = tmp_path / "store.db"
    storage = CommitsHeld(path, ["succeeded"])
    async with cf.open_engine() as engine, engine.open_store(storage):
        run = await engine.start_run(single(Finished()), storage, run_id="r")
        await storage.holding["succeeded"].wait()
        key = run_record.record_key("r")
        other = cf.SQLiteStorage(path)
        await other.open()
        advanced = {**await other.get(key), "steps": 2, "path": ["only", "only"]}
        await other.set(key, advanced)
        await other.commit()
        await other.aclose()
        storage.release["succeeded"].set()
        with pytest.raises(cf.RunConflictError):
            await run.wait()
        [record] = await engine.list_runs(storage)
    assert (record.state, record.steps) == ("running", 2)
