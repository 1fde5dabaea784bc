"""The engine: starting runs, concurrency, cancellation, crashes, closing."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from tests.support import Gate, Recorder, a_then_b, single


def count_tasks() -> int:
    """Every task alive in this trio run."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    return walk(trio.lowlevel.current_root_task())


class Increment(cf.Node):
    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> str:
        await store.update("count", lambda n: n + 1, default=0)
        await store.update(f"steps:{ctx.run_id}", lambda n: n + 1, default=0)
        return "again"


async def test_a_thousand_runs_of_ten_updates_lose_nothing() -> None:
    flow = (
        cf.Flow.builder("counter")
        .add_node("inc", Increment())
        .add_route("inc", "inc", "again", when=cf.ActionCondition.expression("${count} < 0"))
        .add_route("inc", "inc", "again", when=cf.ActionCondition.always())
        .max_steps(10)
        .build()
    )
    store = cf.MemoryStorage()

    async def one(engine: cf.Engine, index: int) -> None:
        with pytest.raises(cf.MaxStepsExceeded):
            await engine.run(flow, store, run_id=f"run-{index}")

    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        for index in range(1000):
            nursery.start_soon(one, engine, index)
    assert store.data["count"] == 10_000
    assert {store.data[f"steps:run-{i}"] for i in range(1000)} == {10}


async def test_a_dict_store_is_used_in_place_and_none_means_fresh_memory() -> None:
    flow = single(Recorder())
    shared: dict[str, Any] = {"before": 1}
    result = await flow.run(shared)
    assert shared == {"before": 1, "seen": ["only"]}
    assert isinstance(result.store, cf.MemoryStorage)
    assert result.store.data is shared
    fresh = await flow.run(None)
    assert isinstance(fresh.store, cf.MemoryStorage)
    assert fresh.store.data == {"seen": ["only"]}


async def test_cancelling_a_run_cancels_its_step_and_spares_the_others() -> None:
    gate = Gate()
    async with cf.open_engine() as engine:
        doomed = await engine.start_run(single(gate))
        other = await engine.start_run(single(gate))
        await trio.testing.wait_all_tasks_blocked()
        doomed.cancel()
        assert doomed.state.value is cf.RunState.CANCELLED
        with pytest.raises(cf.RunCancelledError):
            await doomed.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert gate.inside == 1
        gate.open.set()
        assert (await other.wait()).success
        stats = engine.statistics()
    assert (stats.runs_started, stats.runs_succeeded, stats.runs_cancelled) == (2, 1, 1)


async def test_a_cancelled_caller_cancels_its_run() -> None:
    gate = Gate()
    async with cf.open_engine() as engine:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.run, single(gate))
                await trio.testing.wait_all_tasks_blocked()
                assert gate.inside == 1
                scope.cancel()
        stats = engine.statistics()
        assert (stats.runs_cancelled, stats.runs_in_flight) == (1, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert gate.inside == 0
        assert engine.statistics().actor("single/only").in_flight == 0


async def test_one_failing_run_does_not_disturb_the_others() -> None:
    @cf.node
    async def maybe_fail(ctx: cf.ExecutionContext) -> None:
        if ctx.params["fail"]:
            raise ValueError("boom")

    flow = single(maybe_fail)
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow, params={"fail": i == 3}) for i in range(6)]
        for index, run in enumerate(runs):
            if index == 3:
                with pytest.raises(cf.NodeError):
                    await run.wait()
            else:
                assert (await run.wait()).success
        assert engine.statistics().runs_failed == 1


async def test_leaving_the_engine_waits_for_started_runs() -> None:
    gate = Gate()
    async with trio.open_nursery() as nursery:
        async with cf.open_engine() as engine:
            run = await engine.start_run(single(gate))
            nursery.start_soon(_open_later, gate)
        assert run.state.value is cf.RunState.SUCCEEDED


async def test_every_task_waiting_for_the_engine_to_be_idle_wakes(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = Gate()
    woken: list[int] = []

    async def wait_idle(engine: cf.Engine, index: int) -> None:
        await engine._wait_idle()
        woken.append(index)

    async with cf.open_engine() as engine:
        run = await engine.start_run(single(gate))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_idle, engine, 1)
                nursery.start_soon(wait_idle, engine, 2)
                await trio.testing.wait_all_tasks_blocked()
                assert woken == []
                gate.open.set()
        assert sorted(woken) == [1, 2]
        assert (await run.wait()).success


async def _open_later(gate: Gate) -> None:
    await trio.testing.wait_all_tasks_blocked()
    gate.open.set()


async def test_cancelling_the_engine_scope_stops_a_thousand_runs_promptly(
    autojump_clock: trio.abc.Clock,
) -> None:
    @cf.node
    async def forever(ctx: cf.ExecutionContext) -> None:
        await trio.sleep_forever()

    flow = single(forever, "forever")
    tasks_before = count_tasks()
    runs: list[cf.Run] = []
    with trio.CancelScope() as scope:
        async with cf.open_engine(max_runs=None) as engine:
            for _ in range(1000):
                runs.append(await engine.start_run(flow))
            await trio.testing.wait_all_tasks_blocked()
            assert engine.statistics().actor("forever/only").in_flight == 1000
            started = trio.current_time()
            scope.cancel()
    assert trio.current_time() == started
    assert count_tasks() == tasks_before
    assert {run.state.value for run in runs} == {cf.RunState.CANCELLED}


class ExplodingStorage(cf.Storage):
    """A backend with a bug: reading any key raises something that is not a KeyError."""

    async def get(self, key: str) -> Any:
        raise ZeroDivisionError("storage bug")

    async def set(self, key: str, value: Any) -> None:
        pass

    async def delete(self, key: str) -> bool:
        return False

    async def keys(self) -> list[str]:
        return []


async def test_an_actor_crash_fails_the_runs_in_flight_and_leaves_open_engine() -> None:
    gate = Gate()

    @cf.node
    async def touch_bomb(ctx: cf.ExecutionContext) -> None:
        await ctx.store.get("bomb")

    errors: list[BaseException] = []

    async def wait_for(run: cf.Run) -> None:
        try:
            await run.wait()
        except cf.ActorCrashedError as exc:
            errors.append(exc)

    with pytest.RaisesGroup(ZeroDivisionError, cf.ActorCrashedError, flatten_subgroups=True):
        async with trio.open_nursery() as outside, cf.open_engine() as engine:
            bystander = await engine.start_run(single(gate))
            outside.start_soon(wait_for, bystander)
            await trio.testing.wait_all_tasks_blocked()
            await engine.run(single(touch_bomb), ExplodingStorage())
    assert bystander.state.value is cf.RunState.FAILED
    assert len(errors) == 1
    assert isinstance(errors[0].__cause__, ZeroDivisionError)
    assert "store:ExplodingStorage" in str(errors[0])


async def test_bad_arguments_to_start_run() -> None:
    builder = cf.Flow.builder("unbuilt").add_node("a", Recorder())
    async with cf.open_engine() as engine:
        with pytest.raises(TypeError, match="built Flow"):
            await engine.start_run(builder)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="store must be"):
            await engine.start_run(builder.build(), 42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="params must be a mapping or None, got str"):
            await engine.start_run(builder.build(), params="user=ada")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="run_id must be a non-empty str, not ''"):
            engine.start_run_nowait(builder.build(), run_id="")
        with pytest.raises(ValueError, match="run_id must be a non-empty str, not None"):
            await engine.resume(builder.build(), {}, run_id=None)  # type: ignore[arg-type]
        gate = Gate()
        await engine.start_run(single(gate), run_id="same")
        with pytest.raises(ValueError, match="'same' is already in flight"):
            await engine.start_run(single(gate), run_id="same")
        gate.open.set()
        assert engine.statistics().runs_started == 1


async def test_bad_arguments_fail_before_waiting_for_admission(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = Gate()
    async with cf.open_engine(max_runs=1) as engine:
        await engine.start_run(single(gate))
        with trio.fail_after(1), pytest.raises(ValueError, match="run_id"):
            await engine.start_run(single(gate), run_id=7)  # type: ignore[arg-type]
        with trio.fail_after(1), pytest.raises(TypeError, match="params"):
            await engine.run(single(gate), params=[("k", 1)])  # type: ignore[arg-type]
        gate.open.set()


CLOSED_ENGINE_CALLS: dict[str, Callable[[cf.Engine, Path], Awaitable[object]]] = {
    "run": lambda engine, _: engine.run(single(Recorder()), {}),
    "start_run": lambda engine, _: engine.start_run(single(Recorder()), {}),
    "resume": lambda engine, _: engine.resume(single(Recorder()), {}, run_id="r"),
    "list_runs": lambda engine, path: engine.list_runs(cf.FileStorage(path / "s.json")),
    "serve": lambda engine, _: engine.serve("redis://127.0.0.1:1/q", [single(Recorder())], "m"),
}


@pytest.mark.parametrize("call", CLOSED_ENGINE_CALLS)
async def test_a_closed_engine_refuses_new_work_saying_so(call: str, tmp_path: Path) -> None:
    async with cf.open_engine() as engine:
        pass
    with pytest.raises(RuntimeError, match="the engine is closed"):
        await CLOSED_ENGINE_CALLS[call](engine, tmp_path)
    with pytest.raises(RuntimeError, match="the engine is closed"):
        engine.start_run_nowait(single(Recorder()), {})


async def test_open_engine_rejects_a_bad_mailbox_size() -> None:
    with pytest.raises(ValueError, match="mailbox_size"):
        async with cf.open_engine(mailbox_size=0):
            pass


async def test_a_full_entry_mailbox_makes_start_run_wait() -> None:
    gate = Gate(max_concurrency=1)
    flow = single(gate, "narrow")
    async with cf.open_engine(mailbox_size=2) as engine:
        runs = [await engine.start_run(flow) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1) as waited:
            runs.append(await engine.start_run(flow))
        assert waited.cancelled_caught
        gate.open.set()
        for run in runs[:3]:
            await run.wait()


async def test_start_run_nowait_starts_without_waiting_or_raises_would_block(tmp_path: Any) -> None:
    gate = Gate(max_concurrency=1)
    flow = single(gate, "nowait")
    async with cf.open_engine(mailbox_size=2) as engine:
        runs = [engine.start_run_nowait(flow, {}) for _ in range(2)]
        with pytest.raises(trio.WouldBlock, match="mailbox of 'nowait/only' is full"):
            engine.start_run_nowait(flow, {})
        await trio.testing.wait_all_tasks_blocked()
        runs.append(engine.start_run_nowait(flow, {}))
        with pytest.raises(trio.WouldBlock):
            engine.start_run_nowait(flow, {})
        with pytest.raises(trio.WouldBlock, match="no store actor open yet"):
            engine.start_run_nowait(single(Recorder()), cf.FileStorage(tmp_path / "s.json"))
        gate.open.set()
        for run in runs:
            assert (await run.wait()).success
        assert engine.statistics().runs_started == 3


class Sleeper(cf.Node):
    def __init__(self, seconds: float, **config: Any) -> None:
        super().__init__(**config)
        self.seconds = seconds

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        await trio.sleep(self.seconds)


async def test_a_full_mailbox_never_stalls_other_flows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow = (
        cf.Flow.builder("slow")
        .add_node("a", Sleeper(0))
        .add_node("b", Sleeper(10, max_concurrency=1, mailbox_size=1))
        .add_route("a", "b")
        .build()
    )
    fast = (
        cf.Flow.builder("fast")
        .add_node("x", Sleeper(1))
        .add_node("y", Sleeper(1))
        .add_route("x", "y")
        .build()
    )
    async with cf.open_engine() as engine:
        for _ in range(5):
            await engine.start_run(slow)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await engine.run(fast)
        assert trio.current_time() - start == 2
        stats = engine.statistics()
        assert stats.actor("slow/b").mailbox_depth == 1
        assert stats.actor("slow/b").senders_waiting == 3


async def test_max_runs_bounds_the_runs_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    flow = single(Sleeper(5), "bounded")
    started: list[float] = []
    async with cf.open_engine(max_runs=2) as engine:
        for index in range(5):
            await engine.start_run(flow)
            started.append(trio.current_time())
            assert engine.statistics().runs_in_flight <= 2
            if index == 1:
                with pytest.raises(trio.WouldBlock):
                    engine.start_run_nowait(flow)
    assert started == [0, 0, 5, 5, 10]


class Arrivals(cf.Node):
    """Records each run's ``index`` param as its step starts, then waits for ``open``."""

    def __init__(self) -> None:
        super().__init__()
        self.open = trio.Event()
        self.order: list[int] = []

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.order.append(ctx.params["index"])
        await self.open.wait()


async def test_callers_waiting_for_max_runs_start_in_order_and_hold_no_exception() -> None:
    arrivals = Arrivals()
    flow = single(arrivals, "bounded")
    async with cf.open_engine(max_runs=1) as engine, trio.open_nursery() as nursery:
        for index in range(4):
            nursery.start_soon(partial(engine.run, flow, params={"index": index}))
            await trio.testing.wait_all_tasks_blocked()
        held = [o for o in gc.get_objects() if isinstance(o, trio.WouldBlock)]
        assert (engine.statistics().runs_in_flight, held) == (1, [])
        arrivals.open.set()
    assert arrivals.order == [0, 1, 2, 3]


class Nesting(cf.Node):
    """Starts ``inner`` on the engine from its exec, in each of the ways a node can."""

    def __init__(self, engine: cf.Engine, inner: cf.Flow) -> None:
        super().__init__()
        self.engine = engine
        self.inner = inner

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> int:
        engine, inner = self.engine, self.inner
        results = [await engine.run(inner)]
        results.append(await (await engine.start_run(inner)).wait())
        results.append(await engine.start_run_nowait(inner).wait())
        async with trio.open_nursery() as nursery:  # a task the step starts
            nursery.start_soon(engine.run, inner)
        return len(results)


async def test_runs_started_inside_steps_need_no_admission(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every outer run holds a place among the max_runs in flight while its step waits
    for the runs it started: admitting those would wait forever."""
    inner = single(Sleeper(1), "inner")
    async with cf.open_engine(max_runs=2) as engine:
        outer = single(Nesting(engine, inner), "outer")
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(engine.run, outer)
        stats = engine.statistics()
        later = [await engine.start_run(outer) for _ in range(2)]
        with pytest.raises(trio.WouldBlock):
            engine.start_run_nowait(outer)
        for run in later:
            await run.wait()
    assert (stats.runs_succeeded, stats.runs_in_flight) == (4 * 5, 0)


async def test_a_caller_cancelled_as_it_is_handed_a_slot_starts_no_run() -> None:
    """A waiting caller gets the slot of a run that ends, and is cancelled before it
    runs again: its run must not start."""
    ran: list[str] = []
    gate = trio.Event()

    @cf.node
    async def record(ctx: cf.ExecutionContext) -> None:
        ran.append(ctx.params["who"])
        if ctx.params["who"] == "a":
            await gate.wait()

    flow = single(record, "handed")
    waiting = trio.CancelScope()

    async with cf.open_engine(max_runs=1) as engine, trio.open_nursery() as nursery:

        async def first() -> None:
            await engine.run(flow, params={"who": "a"})
            waiting.cancel()  # the slot is the waiter's now; it has not run since

        async def second() -> None:
            with waiting:
                await engine.run(flow, params={"who": "b"})

        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert ran == ["a"]
    assert (engine.statistics().runs_in_flight, engine.statistics().runs_succeeded) == (0, 1)


async def test_open_engine_rejects_a_bad_max_runs() -> None:
    with pytest.raises(ValueError, match="max_runs must be an int >= 1, got 0"):
        async with cf.open_engine(max_runs=0):
            pass


async def test_generated_run_ids_differ_within_and_across_engines() -> None:
    flow = cf.Flow.builder("ids").add_node("only", cf.node(lambda ctx: None)).build()
    ids: list[str] = []
    for _ in range(2):
        async with cf.open_engine() as engine:
            ids += [(await engine.start_run(flow)).run_id for _ in range(500)]
    assert len(set(ids)) == 1000


async def test_start_run_nowait_with_a_run_id_on_an_open_file_is_durable(tmp_path: Path) -> None:
    storage = cf.FileStorage(tmp_path / "store.json")
    gate = Gate()
    flow = (
        cf.Flow.builder("durable")
        .add_node("a", Recorder())
        .add_node("b", Recorder(cf.Action.complete("done")))
        .add_route("a", "b")
        .build()
    )
    async with cf.open_engine() as engine:
        with pytest.raises(trio.WouldBlock, match="no store actor open yet"):
            engine.start_run_nowait(flow, storage, run_id="r1")
        holder = await engine.start_run(single(gate), storage)  # keeps the store actor open
        run = engine.start_run_nowait(flow, storage, run_id="r1")
        assert (await run.wait()).result == "done"
        assert await engine.list_runs(storage) == [
            cf.RunRecord("r1", "durable", "succeeded", "b", 2)
        ]
        again = engine.start_run_nowait(flow, storage, run_id="r1")
        assert (await again.wait()).result == "done"  # the recorded result: nothing runs
        gate.open.set()
        await holder.wait()
    assert await cf.list_runs(cf.FileStorage(storage.path)) == [
        cf.RunRecord("r1", "durable", "succeeded", "b", 2)
    ]
    fresh = cf.FileStorage(storage.path)
    await fresh.open()
    assert await fresh.get("seen") == ["a", "b"]


class Waits(cf.Node):
    """exec waits for the shared ``opened`` event; counts the steps waiting."""

    def __init__(self, opened: trio.Event) -> None:
        super().__init__()
        self.opened = opened
        self.waiting = 0

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.waiting += 1
        await self.opened.wait()


@pytest.mark.slow
async def test_a_hundred_thousand_runs_in_flight_at_once_all_succeed() -> None:
    runs = 100_000
    opened = trio.Event()
    first = Waits(opened)
    flow = (
        cf.Flow.builder("crowd")
        .add_node("first", first)
        .add_node("second", Recorder())
        .add_route("first", "second")
        .build()
    )
    results: list[cf.FlowResult] = []

    async def one(engine: cf.Engine) -> None:
        results.append(await engine.run(flow))

    async with cf.open_engine(mailbox_size=1, max_runs=None) as engine:
        async with trio.open_nursery() as nursery:
            for _ in range(runs):
                nursery.start_soon(one, engine)
            await trio.testing.wait_all_tasks_blocked()
            assert (first.waiting, engine.statistics().runs_in_flight) == (runs, runs)
            opened.set()
        stats = engine.statistics()
    assert len(results) == runs
    assert {result.execution_path for result in results} == {("first", "second")}
    assert (stats.runs_succeeded, stats.runs_in_flight) == (runs, 0)


async def test_a_lossless_event_stream_gets_every_event_of_many_runs() -> None:
    flow = a_then_b("many")
    counts: dict[str, int] = {}
    async with cf.open_engine() as engine:
        stream = engine.events(buffer=16, lossless=True)

        async def count() -> None:
            async with stream:
                async for event in stream:
                    name = type(event).__name__
                    counts[name] = counts.get(name, 0) + 1

        async with trio.open_nursery() as readers:
            readers.start_soon(count)
            async with trio.open_nursery() as runs:
                for _ in range(2000):
                    runs.start_soon(engine.run, flow)
            await trio.testing.wait_all_tasks_blocked()
            readers.cancel_scope.cancel()
    assert counts == {
        "RunStarted": 2000,
        "StepStarted": 4000,
        "StepFinished": 4000,
        "RunFinished": 2000,
    }
    assert engine.progress().snapshot().succeeded == 2000


async def test_progress_counts_runs_as_they_start_and_end() -> None:
    gate = Gate()
    async with cf.open_engine() as engine:
        progress = engine.progress()
        before = progress.snapshot()
        run = await engine.start_run(single(gate))
        started = await progress.wait_changed(before)
        assert (started.started, started.in_flight) == (1, 1)
        gate.open.set()
        await run.wait()
        ended = progress.snapshot()
    assert (ended.started, ended.succeeded, ended.in_flight) == (1, 1, 0)
