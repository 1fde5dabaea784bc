"""Durable runs: each step commits its writes with the run's record; resume goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from tests.storage_suite import JsonDictStorage, make_backend


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
        assert await engine.list_runs(cf.FileStorage(path)) == [
            cf.RunRecord("r2", "loop", "failed", "count", 2)
        ]
        with pytest.raises(cf.CosmoFlowError, match=r"continue it with engine\.resume"):
            await engine.run(flow, cf.FileStorage(path), run_id="r2")
        result = await engine.resume(flow, cf.FileStorage(path), run_id="r2")
    assert node.posts == [1, 2, 3, 4, 5]
    assert result.execution_path == ("count",) * 5
    assert (await read_all(path))["n"] == 5


async def test_a_cancelled_run_resumes_after_its_last_committed_step(tmp_path: Path) -> None:
    release = trio.Event()

    class Pausing(Counted):
        async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
            if len(self.posts) == 2:
                await release.wait()

    node = Pausing()
    path = tmp_path / "store.json"
    async with cf.open_engine() as engine:
        run = await engine.start_run(loop_flow(node), cf.FileStorage(path), run_id="r3")
        await trio.testing.wait_all_tasks_blocked()
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


async def test_durable_runs_refuse_fan_out(tmp_path: Path) -> None:
    flow = (
        cf.Flow.builder("fan")
        .add_node("a", cf.Node())
        .add_node("b", cf.Node())
        .add_node("c", cf.Node())
        .add_route("a", ["b", "c"])
        .build()
    )
    async with cf.open_engine() as engine:
        with pytest.raises(cf.CosmoFlowError, match="fans out from 'a'"):
            await engine.run(flow, cf.FileStorage(tmp_path / "s.json"), run_id="f")
        assert (await engine.run(flow, {}, run_id="f")).success


async def test_list_runs_on_a_temporary_engine(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await loop_flow(Counted(), 1).run(cf.SQLiteStorage(path), run_id="only")
    assert await cf.list_runs(cf.SQLiteStorage(path)) == [
        cf.RunRecord("only", "loop", "succeeded", "count", 1)
    ]


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
    assert records == {"p": "succeeded", "p/0": "succeeded", "p/1": "succeeded", "p/2": "succeeded"}


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


@pytest.mark.parametrize("kind", ["sqlite", "redis", "custom"])
async def test_two_engines_running_one_run_commit_each_step_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Engine a runs run "r"; engine b resumes it meanwhile (another process would do the
    same, over a storage instance of its own). Both reach the step's commit: a's lands,
    b's fails with RunConflictError, applies nothing, and leaves a's record alone."""
    if kind == "custom":
        text: dict[str, str] = {}
        storages = [PersistentDictStorage(text), PersistentDictStorage(text)]
    else:
        backend = make_backend(kind, tmp_path, request)
        storages = [backend.open(), backend.open()]
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

    assert stored == {"n": 1, "by": "a"}
    assert [(r.run_id, r.state, r.steps) for r in records] == [("r", "succeeded", 1)]


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
