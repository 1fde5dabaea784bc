"""The engine: starting runs, concurrency, cancellation, crashes, closing."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import math
import random
import threading
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cosmoflow_actors as cf
from cosmoflow_actors.flow import refusing_runs
from cosmoflow_actors.runtime.node_actor import KEEP_IDLE
from cosmoflow_actors.runtime.statistics import EngineStatistics
from cosmoflow_actors.runtime.store_actor import StoreActor
from tests.support import (
    Gate,
    Recorder,
    a_then_b,
    closed_late_around,
    count_tasks,
    engine_bug,
    engine_in,
    node_actors,
    single,
)


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
    flow = single(gate)
    async with cf.open_engine() as engine:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.run, flow)
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


async def test_leaving_the_engine_waits_for_a_start_still_waiting_for_admission() -> None:
    # A service drains by leaving the engine's block: a request that called engine.run
    # before that, and still waits for a place among max_runs, is a run of the block.
    # It runs to its end, and never meets a closed engine.
    gate = Gate()
    results: list[cf.FlowResult] = []

    async def request(engine: cf.Engine) -> None:
        results.append(await engine.run(single(Recorder())))

    async with trio.open_nursery() as nursery, cf.open_engine(max_runs=1) as engine:
        first = await engine.start_run(single(gate))
        nursery.start_soon(request, engine)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_open_later, gate)
    assert first.state.value is cf.RunState.SUCCEEDED
    assert [result.success for result in results] == [True]
    assert engine.statistics().runs_succeeded == 2


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


async def test_a_broken_backend_fails_the_run_that_met_it_alone() -> None:
    @cf.node
    async def touch_bomb(ctx: cf.ExecutionContext) -> None:
        await ctx.store.get("bomb")

    gate = Gate()
    async with cf.open_engine() as engine:
        bystander = await engine.start_run(single(gate))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(cf.NodeError) as info:
            await engine.run(single(touch_bomb), ExplodingStorage())
        gate.open.set()
        assert (await bystander.wait()).success
        assert await engine.run(single(Recorder()), {})
    error = info.value.__cause__
    assert isinstance(error, cf.StorageError)
    assert str(error).startswith("store:ExplodingStorage")
    assert str(error).endswith(": get failed: the backend raised ZeroDivisionError: storage bug")


async def test_an_actor_crash_fails_the_runs_in_flight_and_leaves_open_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug of the engine's own (injected: the store actor's handling of a backend's
    # error raises it) is what still crashes an actor.
    monkeypatch.setattr(StoreActor, "_broken", engine_bug)
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
        with trio.fail_after(1), pytest.raises(TypeError, match="store must be a Storage"):
            await engine.start_run(single(gate), 5)  # type: ignore[arg-type]
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
    closed = r"the engine is closed \(its open_engine block has ended\): use it while"
    with pytest.raises(RuntimeError, match=closed):
        await CLOSED_ENGINE_CALLS[call](engine, tmp_path)
    with pytest.raises(RuntimeError, match=closed):
        engine.start_run_nowait(single(Recorder()), {})


@pytest.mark.parametrize("call", CLOSED_ENGINE_CALLS)
async def test_a_caller_whose_scope_is_cancelled_gets_cancelled_from_a_closed_engine(
    call: str, tmp_path: Path
) -> None:
    # A task started in the nursery that holds the engine, before that nursery was
    # cancelled, may first run once the engine has closed: it must leave its cancelled
    # scope, not crash the application with the closed engine's RuntimeError.
    async with cf.open_engine() as engine:
        pass
    with trio.CancelScope() as scope:
        scope.cancel()
        await CLOSED_ENGINE_CALLS[call](engine, tmp_path)
    assert scope.cancelled_caught


class OpensAfterAll(cf.MemoryStorage):
    """Served by an actor of its own; its backend opens, shielded (as a backend opened
    in a thread cannot be stopped), once the test lets it, and then calls ``opened``,
    in the store actor's task, just before the actor wakes the runs that waited."""

    shared_actor = False

    def __init__(self, opened: Callable[[], None]) -> None:
        super().__init__()
        self.may_open = trio.Event()
        self._opened = opened

    async def open(self) -> None:
        with trio.CancelScope(shield=True):
            await self.may_open.wait()
        self._opened()


async def test_a_cancelled_caller_woken_by_its_store_after_the_close_gets_cancelled() -> None:
    """The engine closes while a caller waits for its store to open; the store opens
    after all and wakes the caller, whose own scope is cancelled before it runs again
    (its deadline passes then): it gets trio.Cancelled, not RunCancelledError."""
    caller = trio.CancelScope()

    def cancel_the_caller_at_the_next_scheduler_pass() -> None:
        caller.deadline = trio.current_time()

    store = OpensAfterAll(cancel_the_caller_at_the_next_scheduler_pass)

    async def call(engine: cf.Engine) -> None:
        with caller:
            await engine.run(single(Recorder(), "late"), store)

    async with trio.open_nursery() as nursery:
        closing = trio.CancelScope()
        engine = await nursery.start(engine_in, closing)
        nursery.start_soon(call, engine)
        await trio.testing.wait_all_tasks_blocked()
        closing.cancel()
        await engine.wait_closed()
        store.may_open.set()
    assert caller.cancelled_caught
    assert engine.statistics().runs_started == 0


async def test_callers_waiting_to_start_when_the_engine_closes_get_run_cancelled_error() -> None:
    # The callers are outside the engine's block, so its cancellation does not reach
    # them: the runs cancelled free their places, and each waiter must learn that its
    # run is cancelled too, not that it called a closed engine.
    gate = Gate()
    flow = single(gate)
    errors: list[BaseException] = []

    async def call(engine: cf.Engine) -> None:
        try:
            await engine.run(flow)
        except cf.RunCancelledError as exc:
            errors.append(exc)

    async with trio.open_nursery() as callers:
        with trio.CancelScope() as engine_scope:
            async with cf.open_engine(max_runs=1) as engine:
                for _ in range(3):
                    callers.start_soon(call, engine)
                await trio.testing.wait_all_tasks_blocked()
                assert gate.inside == 1
                engine_scope.cancel()
    assert [str(error) for error in errors].count(
        "the engine closed while the run waited to start"
    ) == 2
    assert len(errors) == 3


class WritesAfterItsGate(cf.Node):
    """Waits in exec, shielded, until ``gate`` opens (so its step goes on to post even
    if its run is cancelled meanwhile, as a thread's exec does); post then writes."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = trio.Event()
        self.gate = trio.Event()
        self.posts = 0

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.arrived.set()
        with trio.CancelScope(shield=True):
            await self.gate.wait()

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        self.posts += 1
        await store.set("written", True)


async def test_a_store_call_once_a_scope_around_the_engine_is_cancelled_cancels_the_run() -> None:
    """A scope around the engine is cancelled, and its store actor stops before the
    engine's block ends (closed_late_around holds it off). The run's caller is outside
    that scope; the run's step then calls the store: the run ends CANCELLED, as the
    engine's close makes it, not FAILED by the store that stopped under it."""
    node = WritesAfterItsGate()
    store = cf.MemoryStorage()
    errors: list[BaseException] = []

    async def call(engine: cf.Engine) -> None:
        try:
            await engine.run(single(node), store)
        except Exception as exc:
            errors.append(exc)

    engine = await closed_late_around(call, node.arrived, node.gate)
    assert [type(error) for error in errors] == [cf.RunCancelledError]
    stats = engine.statistics()
    assert (stats.runs_failed, stats.runs_cancelled, node.posts) == (0, 1, 1)
    assert store.data == {}


async def test_the_first_run_of_a_flow_new_to_a_busy_engine_is_carried_by_its_caller() -> None:
    carriers: list[trio.lowlevel.Task] = []

    @cf.node
    async def where(ctx: cf.ExecutionContext) -> None:
        carriers.append(trio.lowlevel.current_task())

    async with cf.open_engine() as engine:
        await engine.run(single(Recorder(), "warm"))  # the store actor is open already
        flow = single(where, "new")
        await engine.run(flow)
        await engine.run(flow)
    assert carriers == [trio.lowlevel.current_task()] * 2


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


# Randomised stress: the kernel's promises under cancellation and backpressure. Each
# scenario opens an engine with tiny mailboxes and few runs in flight, starts runs in
# every way there is while nodes fail, sleep and forget awaits, callers give up, runs
# are cancelled and the engine may be closed early; then it checks what must hold.

FATES = ("ok", "sleep", "prep", "exec", "forget", "bad", "nowhere")
"""What a stress step may do: succeed, sleep first, raise in prep or exec, leave a store
call unawaited, return a bad action, or return an action no route takes."""
FATE_WEIGHTS = (30, 20, 1, 1, 1, 1, 1)
DELAYS = (0.0, 0.5, 1.0, 3.0)


class Fault(Exception):
    """A failure a stress node injected into run ``run_id`` at ``node_id``."""

    def __init__(self, run_id: str, node_id: str) -> None:
        super().__init__(f"planned failure of run {run_id} at {node_id}")
        self.run_id = run_id
        self.node_id = node_id


class Ledger:
    """What the stress nodes did and saw: their draws, the failures they injected (by
    run), the runs whose steps started and ended at each actor (in order), and every
    breach of a promise they observed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.engine: cf.Engine | None = None
        self.breaches: list[str] = []
        self.started: dict[str, list[str]] = defaultdict(list)
        self.ended: dict[str, list[str]] = defaultdict(list)
        self.faults: dict[str, list[str]] = defaultdict(list)

    def fate(self) -> str:
        return self.rng.choices(FATES, FATE_WEIGHTS)[0]

    def delay(self) -> float:
        return self.rng.choice(DELAYS)

    def inject(self, ctx: cf.ExecutionContext, kind: str) -> None:
        self.faults[ctx.run_id].append(f"{kind}@{ctx.node_id}")

    def step_started(self, ctx: cf.ExecutionContext, limit: int | None) -> None:
        """Record the step's start; its actor must hold at most ``limit`` steps."""
        name = f"{ctx.flow_name}/{ctx.node_id}"
        self.started[name].append(ctx.run_id)
        assert self.engine is not None
        in_flight = self.engine.statistics().actor(name).in_flight
        if limit is not None and in_flight > limit:
            self.breaches.append(f"{name}: {in_flight} steps in flight, limit {limit}")

    def step_ended(self, ctx: cf.ExecutionContext) -> None:
        self.ended[f"{ctx.flow_name}/{ctx.node_id}"].append(ctx.run_id)

    def faults_of(self, run_id: str) -> list[str]:
        """The failures injected into ``run_id`` and the runs it waited for inside
        its steps (see :func:`_own`)."""
        return [
            fault
            for other, faults in self.faults.items()
            if _own(run_id, other)
            for fault in faults
        ]


def _own(run_id: str, other: str) -> bool:
    """Whether ``other`` is ``run_id`` or a run one of its steps waited for (named
    ``run_id/...``, or ``run_id:...`` for a BatchFlow's child)."""
    return other == run_id or other.startswith((f"{run_id}/", f"{run_id}:"))


class Probe(cf.Node):
    """A stress step: does what the ledger draws, and counts the execs inside at once
    (never more than max_concurrency)."""

    def __init__(self, ledger: Ledger, *, final: bool = False, **config: Any) -> None:
        super().__init__(**config)
        self.ledger = ledger
        self.final = final
        """Whether the node has no routes (an unknown action then ends its flow)."""
        self.inside = 0

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> str:
        self.ledger.step_started(ctx, self.max_concurrency)
        fate = self.ledger.fate()
        if fate == "prep":
            self.ledger.inject(ctx, fate)
            raise Fault(ctx.run_id, ctx.node_id)
        return fate

    async def exec(self, fate: str, ctx: cf.ExecutionContext) -> None:
        self.inside += 1
        try:
            limit = self.max_concurrency
            if limit is not None and self.inside > limit:
                self.ledger.breaches.append(f"{ctx.node_id}: {self.inside} execs, limit {limit}")
            if fate == "sleep":
                await trio.sleep(self.ledger.delay())
            if fate == "exec":
                self.ledger.inject(ctx, fate)
                raise Fault(ctx.run_id, ctx.node_id)
        finally:
            self.inside -= 1

    async def post(
        self, store: cf.SharedStore, fate: str, exec_res: Any, ctx: cf.ExecutionContext
    ) -> Any:
        await store.update("steps", lambda n: n + 1, default=0)
        self.ledger.step_ended(ctx)
        if fate == "forget":
            self.ledger.inject(ctx, fate)
            store.set("lost", ctx.run_id)  # never awaited: fails the step
        elif fate == "bad":
            self.ledger.inject(ctx, fate)
            return 42
        elif fate == "nowhere" and not self.final:
            self.ledger.inject(ctx, fate)
            return "nowhere"
        return None


class Items(cf.BatchNode):
    """A stress batch node: a few items, each maybe sleeping or failing, one after the
    other (:class:`ParallelItems`: at once, never more than max_concurrency)."""

    def __init__(self, ledger: Ledger, **config: Any) -> None:
        super().__init__(**config)
        self.ledger = ledger
        self.inside: collections.Counter[str] = collections.Counter()

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[str]:
        self.ledger.step_started(ctx, self.max_concurrency)
        return [self.ledger.fate() for _ in range(self.ledger.rng.randint(0, 3))]

    async def exec(self, fate: str, ctx: cf.ExecutionContext) -> None:
        self.inside[ctx.run_id] += 1
        try:
            limit = self.max_concurrency if isinstance(self, cf.ParallelBatchNode) else 1
            if limit is not None and self.inside[ctx.run_id] > limit:
                self.ledger.breaches.append(f"{ctx.run_id}: items above {limit}")
            await trio.sleep(self.ledger.delay() if fate == "sleep" else 0)
            if fate == "exec":
                self.ledger.inject(ctx, fate)
                raise Fault(ctx.run_id, ctx.node_id)
        finally:
            self.inside[ctx.run_id] -= 1

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        self.ledger.step_ended(ctx)


class ParallelItems(Items, cf.ParallelBatchNode):
    """:class:`Items`, run at once."""


class Children(cf.BatchFlow):
    """A stress BatchFlow: zero to three child runs of its sub-flow."""

    def __init__(self, flow: cf.Flow, ledger: Ledger, **config: Any) -> None:
        super().__init__(flow, **config)
        self.ledger = ledger

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        self.ledger.step_started(ctx, self.max_concurrency)
        return [{"child": index} for index in range(self.ledger.rng.randint(0, 3))]

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        self.ledger.step_ended(ctx)


class Nester(cf.Node):
    """A stress step that starts a run of ``inner`` on the engine: waits for it
    (``<run>/n``, its failure fails this step), or leaves it running (``<run>~n``)."""

    def __init__(self, ledger: Ledger, inner: cf.Flow, **config: Any) -> None:
        super().__init__(**config)
        self.ledger = ledger
        self.inner = inner

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
        self.ledger.step_started(ctx, self.max_concurrency)

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        engine = self.ledger.engine
        assert engine is not None
        how = self.ledger.rng.choice(["run", "start", "nowait"])
        if how == "run":
            await engine.run(self.inner, run_id=f"{ctx.run_id}/n")
        elif how == "start":
            await engine.start_run(self.inner, run_id=f"{ctx.run_id}~n")
        else:
            with contextlib.suppress(trio.WouldBlock):
                engine.start_run_nowait(self.inner, run_id=f"{ctx.run_id}~n")

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        self.ledger.step_ended(ctx)


FEEDS = {
    "chain/b": "chain/a",
    "chain/c": "chain/b",
    "fan/b": "fan/a",
    "batch/children": "batch/items",
    "batch/nest": "batch/children",
}
"""Each stress node reached from one node alone, and sent its step as soon as that
node's step has ended: the node that sends it its steps. (fan/c is not: a fan-out
sends its first branch first, which may wait for room.)"""


def stress_flows(ledger: Ledger) -> list[cf.Flow]:
    """The flows a stress scenario runs: a chain, a fan-out to a join, and a batch node
    followed by a BatchFlow and a step that starts runs; each node's max_concurrency
    drawn from 1 to 3 or None."""
    rng = ledger.rng

    def limit() -> int | None:
        return rng.choice([1, 1, 2, 3, None])

    def probe(*, final: bool = False) -> Probe:
        return Probe(ledger, final=final, max_concurrency=limit())

    chain = cf.Flow.builder("chain").add_node("a", probe()).add_node("b", probe())
    chain = chain.add_node("c", probe(final=True)).add_route("a", "b").add_route("b", "c")
    fan = cf.Flow.builder("fan").add_node("a", probe()).add_node("b", probe())
    fan = fan.add_node("c", probe()).add_join("d", probe(final=True))
    fan = fan.add_route("a", ["b", "c"]).add_route("b", "d").add_route("c", "d")
    leaf = single(probe(final=True), "leaf")
    built_chain = chain.build()
    items = rng.choice([Items, ParallelItems])(ledger, max_concurrency=limit())
    batch = cf.Flow.builder("batch").add_node("items", items)
    batch = batch.add_node("children", Children(leaf, ledger, max_concurrency=limit()))
    batch = batch.add_node("nest", Nester(ledger, built_chain, max_concurrency=limit()))
    batch = batch.add_route("items", "children").add_route("children", "nest")
    return [built_chain, fan.build(), batch.build()]


@dataclass
class Caller:
    """One run the scenario started (or tried to), and what became of it."""

    run_id: str
    how: str
    handle: cf.Run | None = None
    result: cf.FlowResult | None = None
    error: BaseException | None = None
    refused: bool = False
    """start_run_nowait raised WouldBlock."""
    gave_up: float | None = None
    """When the caller of engine.run was cancelled (its own deadline), if it was."""
    cancelled: bool = False
    """run.cancel() found the run in flight."""


class LimitWatch(trio.abc.Instrument):
    """Checks, after every task step, that no actor holds more steps than its limit or
    more messages than its mailbox, and that admission gives no slot it lacks."""

    def __init__(self, engine: cf.Engine) -> None:
        self.engine = engine
        self.breaches: list[str] = []
        self.busiest: dict[str, int] = defaultdict(int)
        self.fullest: dict[str, int] = defaultdict(int)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        for actor in self.engine.statistics().actors:
            limit = actor.max_concurrency
            if actor.in_flight < 0 or (limit is not None and actor.in_flight > limit):
                self.breaches.append(f"{actor.name}: {actor.in_flight} in flight")
            size = actor.mailbox_size
            if size is not None and actor.mailbox_depth > size:
                self.breaches.append(f"{actor.name}: {actor.mailbox_depth} queued")
            self.busiest[actor.name] = max(self.busiest[actor.name], actor.in_flight)
            self.fullest[actor.name] = max(self.fullest[actor.name], actor.mailbox_depth)
        admission = self.engine._admission
        if admission is not None:
            free, waiting = admission._free, admission.waiting
            if free < 0 or (waiting and free):
                self.breaches.append(f"admission: {free} free, {waiting} waiting")


async def record_events(
    engine: cf.Engine, events: list[cf.Event], *, task_status: trio.TaskStatus[None]
) -> None:
    """Keep every event of ``engine`` until it closes."""
    async with engine.events(buffer=1_000_000) as stream:
        task_status.started()
        async for event in stream:
            events.append(event)


async def call_run(engine: cf.Engine, flow: cf.Flow, caller: Caller, patience: float) -> None:
    """engine.run, given up after ``patience`` seconds."""
    with trio.move_on_after(patience) as scope:
        try:
            caller.result = await engine.run(flow, run_id=caller.run_id)
        except Exception as exc:
            caller.error = exc
    if scope.cancelled_caught:
        caller.gave_up = trio.current_time()


async def call_start(
    engine: cf.Engine, flow: cf.Flow, caller: Caller, ledger: Ledger, patience: float
) -> None:
    """start_run (given up after ``patience`` seconds); then maybe wait, maybe cancel."""
    with trio.move_on_after(patience):
        caller.handle = await engine.start_run(flow, run_id=caller.run_id)
    await then_wait_or_cancel(caller, ledger)


async def then_wait_or_cancel(caller: Caller, ledger: Ledger) -> None:
    """Leave the run be, wait for it, or cancel it after a while."""
    handle = caller.handle
    if handle is None:
        return
    choice = ledger.rng.choice(["leave", "wait", "cancel"])
    if choice == "wait":
        with contextlib.suppress(Exception):
            await handle.wait()
    elif choice == "cancel":
        await trio.sleep(ledger.delay())
        in_flight = not handle.current_state.finished
        handle.cancel()
        caller.cancelled = in_flight
        if in_flight and handle.current_state is not cf.RunState.CANCELLED:
            ledger.breaches.append(f"{caller.run_id}: {handle.current_state} after cancel()")


def start_one(
    engine: cf.Engine, nursery: trio.Nursery, flow: cf.Flow, ledger: Ledger, run_id: str
) -> Caller:
    """Start a run of ``flow`` in one of the ways there are, drawn."""
    rng = ledger.rng
    caller = Caller(run_id, rng.choice(["run", "start", "nowait"]))
    patience = rng.choice([math.inf, math.inf, 0.0, 0.5, 2.0])
    if caller.how == "run":
        nursery.start_soon(call_run, engine, flow, caller, patience)
    elif caller.how == "start":
        nursery.start_soon(call_start, engine, flow, caller, ledger, patience)
    else:
        try:
            caller.handle = engine.start_run_nowait(flow, run_id=run_id)
        except trio.WouldBlock:
            caller.refused = True
        nursery.start_soon(then_wait_or_cancel, caller, ledger)
    return caller


@dataclass
class Scenario:
    """What a stress scenario did, for the checks."""

    ledger: Ledger
    engine: cf.Engine
    watch: LimitWatch
    callers: list[Caller]
    events: list[cf.Event] | None
    closed_early: bool
    max_runs: int | None


async def stress(seed: int, mailbox_size: int, max_runs: int | None, runs: int) -> Scenario:
    """Run one drawn scenario to its end (the engine closed); blocks until then."""
    ledger = Ledger(random.Random(seed))
    rng = ledger.rng
    flows = stress_flows(ledger)
    callers: list[Caller] = []
    events: list[cf.Event] | None = [] if rng.random() < 0.5 else None
    close_at = rng.choice([None, None, None, 0.0, 1.0, 4.0])
    with trio.fail_after(100_000):  # a deadlock: the clock jumps here
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as engine_scope:
                async with cf.open_engine(mailbox_size=mailbox_size, max_runs=max_runs) as engine:
                    ledger.engine = engine
                    watch = LimitWatch(engine)
                    trio.lowlevel.add_instrument(watch)
                    if events is not None:
                        await outer.start(record_events, engine, events)
                    async with trio.open_nursery() as nursery:
                        if close_at is not None:
                            nursery.start_soon(_cancel_after, engine_scope, close_at)
                        for index in range(runs):
                            flow = rng.choice(flows)
                            callers.append(start_one(engine, nursery, flow, ledger, f"r{index}"))
                            await trio.sleep(rng.choice([0, 0, 0.25, 1]))
                    await _check_quiet(engine)
    trio.lowlevel.remove_instrument(watch)
    return Scenario(ledger, engine, watch, callers, events, close_at is not None, max_runs)


async def _cancel_after(scope: trio.CancelScope, delay: float) -> None:
    await trio.sleep(delay)
    scope.cancel()


async def _check_quiet(engine: cf.Engine) -> None:
    """Once every run has ended and the engine has nothing left to do: no step in
    flight or queued, and at most KEEP_IDLE workers parked per node actor."""
    await engine._wait_idle()
    await trio.testing.wait_all_tasks_blocked()
    for actor in node_actors(engine):
        assert (actor.busy, len(actor.mailbox)) == (0, 0), actor.name
        assert actor._nursery is not None
        assert len(actor._nursery.child_tasks) <= KEEP_IDLE, actor.name


def check_scenario(scenario: Scenario) -> None:
    """Everything that must hold once a stress scenario's engine has closed."""
    ledger, engine = scenario.ledger, scenario.engine
    assert ledger.breaches == [] and scenario.watch.breaches == []
    stats = engine.statistics()
    assert stats.runs_in_flight == 0
    ended = stats.runs_succeeded + stats.runs_failed + stats.runs_cancelled
    assert stats.runs_started == ended
    for actor in stats.actors:
        assert (actor.in_flight, actor.mailbox_depth, actor.senders_waiting) == (0, 0, 0), actor
    assert engine._router.carriers == {}
    admission = engine._admission
    if admission is not None:
        assert (admission._free, admission.waiting) == (scenario.max_runs, 0)
    _check_fifo(ledger, {actor.name: actor.max_concurrency for actor in stats.actors})
    ends = _run_ends(scenario.events, stats) if scenario.events is not None else None
    for caller in scenario.callers:
        _check_caller(caller, scenario, ends)


def _check_fifo(ledger: Ledger, limits: dict[str, int | None]) -> None:
    """At a node of one slot reached from one node alone, steps start in the order
    their previous steps ended (sent in that order, they are handled in that order)."""
    for name, sender in FEEDS.items():
        if limits.get(name) == 1:
            assert _subsequence(ledger.started[name], ledger.ended[sender]), name


def _subsequence(items: list[str], of: list[str]) -> bool:
    remaining = iter(of)
    return all(item in remaining for item in items)


def _run_ends(events: list[cf.Event], stats: EngineStatistics) -> dict[str, cf.Event]:
    """Each run's end event; every run started ends once, none is dropped."""
    assert not any(isinstance(event, cf.EventsDropped) for event in events)
    started = [e.run_id for e in events if isinstance(e, cf.RunStarted)]
    ends = [e for e in events if isinstance(e, cf.RunFinished | cf.RunFailed | cf.RunCancelled)]
    assert sorted(started) == sorted(e.run_id for e in ends)
    assert len(set(started)) == len(started) == stats.runs_started
    return {e.run_id: e for e in ends}


def _check_caller(caller: Caller, scenario: Scenario, ends: dict[str, cf.Event] | None) -> None:
    """The run ``caller`` started ended as what happened to it says it must."""
    if ends is not None:
        _check_end_event(caller, ends.get(caller.run_id))
    handle = caller.handle
    if handle is not None:
        state = handle.current_state
        assert state.finished, caller
        if caller.cancelled:
            assert state is cf.RunState.CANCELLED, caller
        _check_ending(caller, scenario, handle.result, handle.error)
    elif caller.result is not None or caller.error is not None:
        _check_ending(caller, scenario, caller.result, caller.error)


def _check_end_event(caller: Caller, end: cf.Event | None) -> None:
    """A refused start started no run; a run whose caller gave up was cancelled, unless
    it ended at that very moment (in another task, before the caller's cancellation
    was handled)."""
    if caller.refused:
        assert end is None, (caller, end)
    if caller.gave_up is not None and end is not None:
        assert isinstance(end, cf.RunCancelled) or end.time == caller.gave_up, (caller, end)


def _check_ending(
    caller: Caller,
    scenario: Scenario,
    result: cf.FlowResult | None,
    error: BaseException | None,
) -> None:
    faults = scenario.ledger.faults_of(caller.run_id)
    if result is not None:
        assert result.run_id == caller.run_id
        assert faults == [], (caller, faults)
    elif isinstance(error, cf.RunCancelledError):
        assert caller.cancelled or scenario.closed_early, caller
    else:
        assert error is not None
        _check_provenance(caller.run_id, error, faults)


def _check_provenance(run_id: str, error: BaseException, faults: list[str]) -> None:
    """``error`` failed ``run_id``: it must come from a failure injected into that run
    (or into a run it waited for), never from another run."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, cf.NodeError | Fault):
            assert _own(run_id, cause.run_id), (run_id, error)
        bottom = cause
        cause = cause.__cause__
    kinds = {fault.split("@")[0] for fault in faults}
    expected = {
        Fault: {"prep", "exec"},
        RuntimeError: {"forget"},
        TypeError: {"bad"},
        cf.NoRouteError: {"nowhere"},
    }.get(type(bottom))
    assert expected is not None and kinds & expected, (run_id, error, faults)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    mailbox_size=st.integers(1, 3),
    max_runs=st.none() | st.integers(1, 5),
    runs=st.integers(5, 40),
)
def test_random_runs_cancellations_and_failures_keep_every_promise(
    seed: int, mailbox_size: int, max_runs: int | None, runs: int
) -> None:
    """Under random starts, failures, cancellations, give-ups and early closes: every
    actor stays within its limits at every moment, a one-slot node takes steps in the
    order they were sent, each run ends once, as what happened to it says, with an
    error of its own, and the closed engine holds nothing."""
    scenario = trio.run(
        stress,
        seed,
        mailbox_size,
        max_runs,
        runs,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
    check_scenario(scenario)


class Paced(cf.Node):
    """exec sleeps ``seconds``."""

    def __init__(self, seconds: float, **config: Any) -> None:
        super().__init__(**config)
        self.seconds = seconds

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        await trio.sleep(self.seconds)


async def test_no_actor_ever_holds_more_than_its_limits_while_runs_are_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Checked after every task step while 300 runs crowd three nodes of one to three
    slots and one-step mailboxes: no actor ever holds more steps than its slots or more
    messages than its mailbox, and admission never leaves a slot free while a caller
    waits. The load reaches every limit (so the checks saw them reached)."""
    nodes = {"a": Paced(1, max_concurrency=3), "b": Paced(2, max_concurrency=1)}
    nodes["c"] = Paced(5, max_concurrency=2)
    builder = cf.Flow.builder("crowded")
    for node_id, node in nodes.items():
        builder.add_node(node_id, node)
    flow = builder.add_route("a", "b").add_route("b", "c").build()
    async with cf.open_engine(mailbox_size=1, max_runs=5) as engine:
        watch = LimitWatch(engine)
        trio.lowlevel.add_instrument(watch)
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(engine.run, flow)
            runs = [await engine.start_run(flow) for _ in range(100)]
            for _ in range(100):
                with contextlib.suppress(trio.WouldBlock):
                    runs.append(engine.start_run_nowait(flow))
                await trio.sleep(0.5)
        trio.lowlevel.remove_instrument(watch)
    assert watch.breaches == []
    assert [watch.busiest[f"crowded/{n}"] for n in "abc"] == [3, 1, 2]
    assert [watch.fullest[f"crowded/{n}"] for n in "abc"] == [1, 1, 1]
    assert engine.statistics().runs_succeeded == 200 + len(runs) - 100


async def test_a_durable_run_whose_caller_is_cancelled_before_its_first_step_is_cancelled(
    tmp_path: Path,
) -> None:
    """The caller of engine.run is cancelled while the run's record is read: the run
    ends CANCELLED, as any run whose caller is cancelled, not FAILED."""
    flow = single(Recorder(), "durable")
    async with cf.open_engine() as engine, engine.events() as events:
        storage = cf.FileStorage(tmp_path / "store.json")
        await engine.run(flow, storage, run_id="opens-the-store")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(engine.run, flow, storage, run_id="doomed"))
            async for event in events:
                if isinstance(event, cf.RunStarted) and event.run_id == "doomed":
                    nursery.cancel_scope.cancel()
                    break
        stats = engine.statistics()
    assert (stats.runs_succeeded, stats.runs_failed, stats.runs_cancelled) == (1, 0, 1)


class Held:
    """A value a test watches through a weak reference."""


async def test_a_run_that_ended_is_not_kept_alive_by_the_engine() -> None:
    """Its store is freed once the caller lets go, although the workers that carried
    its steps stay parked for later runs."""
    flow = a_then_b("released")
    async with cf.open_engine() as engine:
        watched = []
        for start in ("start_run", "run"):
            value = Held()
            watched.append(weakref.ref(value))
            if start == "start_run":
                await (await engine.start_run(flow, {"value": value})).wait()
            else:
                await engine.run(flow, {"value": value})
            del value
        gc.collect()
        assert [ref() for ref in watched] == [None, None]
        assert engine.statistics().actor("released/a").messages_processed == 2


async def test_list_runs_lets_go_of_a_storage_no_run_uses(tmp_path: Path) -> None:
    """As a run does when it ends: once list_runs returns, the store's backend is
    closed, so another FileStorage on the file opens, and closing the one it read
    changes nothing and leaves the engine running."""
    path = tmp_path / "store.json"
    storage = cf.FileStorage(path)
    flow = single(Recorder(), "listed")
    async with cf.open_engine() as engine:
        await engine.run(flow, storage, run_id="r")
        assert [run.state for run in await engine.list_runs(storage)] == ["succeeded"]
        again = cf.FileStorage(path)
        await again.open()
        assert await again.get("seen") == ["only"]
        await again.aclose()
        await storage.aclose()
        assert (await engine.resume(flow, storage, run_id="r")).execution_path == ("only",)


def test_an_engine_entered_under_asyncio_says_it_runs_on_trio() -> None:
    async def enter() -> None:
        async with cf.open_engine():
            pass

    with pytest.raises(RuntimeError, match=r"open_engine\(\) was entered outside a trio run"):
        asyncio.run(enter())


class CloseCount(cf.FileStorage):
    """A real FileStorage that counts its closes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.closes = 0

    async def aclose(self) -> None:
        self.closes += 1
        await super().aclose()


async def test_open_store_keeps_a_backend_open_across_runs_and_reads_what_they_wrote(
    tmp_path: Path,
) -> None:
    @cf.node
    async def count(ctx: cf.ExecutionContext) -> None:
        await ctx.store.update("n", lambda n: n + 1, default=0)

    flow = single(count)
    apart = CloseCount(tmp_path / "apart.json")
    held = CloseCount(tmp_path / "held.json")
    async with cf.open_engine() as engine:
        for _ in range(3):
            await engine.run(flow, apart)
        async with engine.open_store(held) as store:
            for _ in range(3):
                await engine.run(flow, held)
            assert held.closes == 0
            assert await store.get("n") == 3
            await store.set("by", "hand")
        assert held.closes == 1
    assert apart.closes == 3
    reopened = cf.FileStorage(tmp_path / "held.json")
    await reopened.open()
    assert (await reopened.get("n"), await reopened.get("by")) == (3, "hand")
    await reopened.aclose()


async def test_open_store_on_a_backend_that_cannot_open_raises_its_storage_error(
    tmp_path: Path,
) -> None:
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError, match="Is a directory"):
            async with engine.open_store(cf.FileStorage(tmp_path)):
                pass


NEW_RUN = "__cosmoflow__/runs/x"
"""The record key of run "x"."""


class Counts(cf.Node):
    """Counts its steps in the store, and logs each: three, then done."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> str:
        n = await store.update("n", lambda n: n + 1, default=0)
        await store.update("log", lambda log: [*log, ctx.execution_id], default=[])
        return "again" if n < 3 else "done"


def counting() -> cf.Flow:
    builder = cf.Flow.builder("count").add_node("c", Counts())
    return builder.add_route("c", "c", "again").add_route("c", cf.END, "done").build()


class FirstToStart(cf.SQLiteStorage):
    """Creates its run's record only once ``other_read`` is set (the other engine has
    read no record), and sets ``committed`` after its first step's commit."""

    def __init__(self, path: Path, other_read: trio.Event, committed: trio.Event) -> None:
        super().__init__(path)
        self.other_read = other_read
        self.committed = committed

    async def update(self, key: str, function: Callable[[Any], Any], default: Any) -> Any:
        if key == NEW_RUN:
            await self.other_read.wait()
        return await super().update(key, function, default)

    async def commit_step(self, ops: Any, record_key: str, record: Any, steps_before: int) -> bool:
        done = await super().commit_step(ops, record_key, record, steps_before)
        self.committed.set()
        return done


class SecondToStart(cf.SQLiteStorage):
    """Sets ``read`` once it has read its run's record (none), and creates the record
    only once ``other_committed`` is set."""

    def __init__(self, path: Path, read: trio.Event, other_committed: trio.Event) -> None:
        super().__init__(path)
        self.read = read
        self.other_committed = other_committed

    async def get(self, key: str) -> Any:
        try:
            return await super().get(key)
        finally:
            if key == NEW_RUN:
                self.read.set()

    async def update(self, key: str, function: Callable[[Any], Any], default: Any) -> Any:
        if key == NEW_RUN:
            await self.other_committed.wait()
        return await super().update(key, function, default)


async def test_of_two_engines_starting_one_new_run_id_the_second_is_refused(
    tmp_path: Path,
) -> None:
    """Both read no record; the first creates it and commits a step; the second, which
    would have put a new record over it and run that step again, is refused."""
    path = tmp_path / "store.db"
    read, committed = trio.Event(), trio.Event()
    first = FirstToStart(path, read, committed)
    second = SecondToStart(path, read, committed)
    outcomes: dict[str, Any] = {}

    async def start(name: str, engine: cf.Engine, storage: cf.Storage) -> None:
        try:
            outcomes[name] = (await engine.resume(counting(), storage, run_id="x")).success
        except cf.RunConflictError as exc:
            outcomes[name] = str(exc)

    async with cf.open_engine() as one, cf.open_engine() as two, trio.open_nursery() as nursery:
        nursery.start_soon(start, "first", one, first)
        nursery.start_soon(start, "second", two, second)
    assert outcomes == {
        "first": True,
        "second": "run 'x': another engine started it first (its record appeared in the "
        "store meanwhile); continue it with engine.resume",
    }
    stored = cf.SQLiteStorage(path)
    assert await stored.get("log") == ["x:1", "x:2", "x:3"]
    await stored.aclose()


async def test_runs_started_by_tasks_of_a_carrying_callers_older_nursery_are_admitted(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The caller of engine.run carries its run; tasks it started before, in a nursery
    of its own, are not its step's work: their runs wait for admission."""
    gate = Gate(max_concurrency=None)
    flow = single(gate)

    async def later(engine: cf.Engine) -> None:
        await trio.sleep(1)  # while the main task carries its own run
        await engine.run(flow)

    async def open_later(engine: cf.Engine) -> None:
        await trio.sleep(2)
        gate.open.set()

    async with cf.open_engine(max_runs=2) as engine, trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(later, engine)
        nursery.start_soon(open_later, engine)
        await engine.run(flow)
    assert gate.most_inside == 2
    assert gate.entered == 11


EngineCalls = Callable[[cf.Engine, cf.Run], list[Callable[[], Any]]]
"""The calls to make from another thread, given the engine and a run it has started."""


def refused_in_another_thread(calls: EngineCalls) -> list[str]:
    """Open an engine in a thread's trio run and start a run there; make each of
    ``calls`` from this thread, each of which must raise RuntimeError; return how each
    message begins. The engine must have gone on serving its own trio run: the run
    succeeds, and so does a new one."""
    opened, stop = threading.Event(), threading.Event()
    home: dict[str, Any] = {}
    flow = single(Recorder())

    async def serve() -> None:
        async with cf.open_engine() as engine:
            home["engine"] = engine
            home["run"] = await engine.start_run(flow)
            await trio.to_thread.run_sync(opened.set)
            await trio.to_thread.run_sync(stop.wait)
            home["results"] = [await home["run"].wait(), await engine.run(flow)]

    thread = threading.Thread(target=trio.run, args=(serve,))
    thread.start()
    opened.wait()
    refusals = []
    try:
        for call in calls(home["engine"], home["run"]):
            with pytest.raises(RuntimeError) as info:
                call()
            refusals.append(str(info.value).split(":")[0])
    finally:
        stop.set()
        thread.join()
    assert [result.success for result in home["results"]] == [True, True]
    return refusals


def test_an_engine_called_from_another_trio_run_or_a_plain_thread_says_how_to_call_it() -> None:
    """The engine lives in a thread's trio run: a call from another trio run, or from a
    thread outside any, is refused naming the way to make it, and the engine, which
    the refused calls did not touch, goes on serving its own trio run."""
    flow = single(Recorder())

    def calls(engine: cf.Engine, run: cf.Run) -> list[Callable[[], Any]]:
        return [
            lambda: trio.run(engine.run, flow),
            lambda: trio.run(engine.list_runs, {}),
            lambda: engine.start_run_nowait(flow),
            lambda: engine.events(),
        ]

    assert refused_in_another_thread(calls) == [
        "the engine was called in another trio run (another thread's trio.run)",
        "the engine was called in another trio run (another thread's trio.run)",
        "the engine was called outside any trio run",
        "the engine was called outside any trio run",
    ]


def test_waits_from_another_trio_run_are_refused_and_leave_the_engine_serving() -> None:
    """A run's wait, a wait on its state, on the engine's progress or on its close, from
    another thread's trio run: each is refused naming what was called (trio could not
    wake such a waiter: the engine's task setting the event would crash), and the run
    and the engine end as if nobody had called."""

    def waits(engine: cf.Engine, run: cf.Run) -> list[Callable[[], Any]]:
        snapshot = engine.progress().snapshot()
        return [
            lambda: trio.run(run.wait),
            lambda: trio.run(run.state.wait_value, cf.RunState.SUCCEEDED),
            lambda: trio.run(engine.progress().wait_changed, snapshot),
            lambda: trio.run(engine.wait_closed),
        ]

    assert refused_in_another_thread(waits) == [
        "the run's wait was called in another trio run (another thread's trio.run)",
        "a wait on the run's state was called in another trio run (another thread's trio.run)",
        "the engine's progress was called in another trio run (another thread's trio.run)",
        "the engine was called in another trio run (another thread's trio.run)",
    ]


def test_an_engine_opened_while_the_command_imports_a_file_is_refused_saying_so() -> None:
    """A flow file whose top level opens an engine: the error says what happened, as
    it does for a flow run there."""

    async def opens() -> None:
        async with cf.open_engine():
            pass

    with refusing_runs(), pytest.raises(RuntimeError) as info:
        trio.run(opens)
    assert str(info.value).startswith(
        "an engine was opened while the cosmoflow command imported its file"
    )
