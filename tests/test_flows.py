"""The engine's flows: registration starts a flow's node actors once, a flow that is
garbage has them retired, and the worker processes close with the engine."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import weakref
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.flows import WORKER_GRACE_PERIOD
from tests.support import Recorder, a_then_b, count_tasks, node_actors, single
from tests.test_executor import WhereAmI


class CancelAtSpawn(trio.abc.Instrument):
    """Cancels ``scope`` as soon as a task whose name ends with ``name`` is spawned."""

    def __init__(self, scope: trio.CancelScope, name: str) -> None:
        self.scope = scope
        self.name = name

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.name):
            self.scope.cancel()


async def test_a_caller_cancelled_as_its_flows_node_actors_start_leaves_the_flow_runnable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The first run of a flow starts the flow's node actors; its caller is cancelled
    as the first actor's task is spawned. Every node actor of the flow must still
    serve: a later run of the flow succeeds."""
    flow = a_then_b("registers")
    async with cf.open_engine() as engine:
        with trio.CancelScope() as scope:
            spawn = CancelAtSpawn(scope, "_supervise")
            trio.lowlevel.add_instrument(spawn)
            try:
                await engine.run(flow)
            finally:
                trio.lowlevel.remove_instrument(spawn)
        assert scope.cancelled_caught
        with trio.fail_after(60):
            result = await engine.run(flow)
    assert result.execution_path == ("a", "b")


def per_request(name: str) -> cf.Flow:
    """A flow built anew for each use, as a request handler might."""
    return a_then_b(name)


async def test_a_flow_that_is_garbage_has_its_node_actors_retired() -> None:
    async with cf.open_engine() as engine:
        kept = single(Recorder())
        await engine.run(kept, {})  # the memory store actor starts
        tasks_before = count_tasks()
        flow = per_request("short-lived")
        await (await engine.start_run(flow, {})).wait()
        actors = [weakref.ref(a) for a in node_actors(engine) if a.flow_name == "short-lived"]
        assert {s.name for s in engine.statistics().actors} >= {"short-lived/a", "short-lived/b"}
        del flow
        gc.collect()
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        assert [actor() for actor in actors] == [None, None]
        assert count_tasks() == tasks_before
        names = {s.name for s in engine.statistics().actors}
        assert not names & {"short-lived/a", "short-lived/b"}
        assert (await engine.run(per_request("short-lived"), {})).execution_path == ("a", "b")


async def test_a_flow_run_alone_after_running_nested_has_its_own_registration() -> None:
    """A flow first met nested in another, then run on its own (its route conditions'
    keys are its own)."""
    inner = (
        cf.Flow.builder("inner")
        .add_node("x", Recorder())
        .add_node("y", Recorder())
        .add_route("x", "y", when=cf.ActionCondition.key_exists("go"))
        .add_route("x", cf.END)
        .build()
    )
    outer = cf.Flow.builder("outer").add_node("nested", inner).build()
    async with cf.open_engine() as engine:
        assert (await engine.run(outer, {"go": 1})).execution_path == ("x", "y")
        assert (await engine.run(inner, {"go": 1})).execution_path == ("x", "y")
        assert (await engine.run(inner, {})).execution_path == ("x",)


def test_a_flow_dropped_after_its_engine_closed_is_no_trouble(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine stops watching its flows when it closes: one that becomes garbage
    afterwards, outside any trio run, raises nothing."""
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    async def main() -> cf.Flow:
        flow = per_request("outlives")
        async with cf.open_engine() as engine:
            await engine.run(flow, {})
        return flow

    flow = trio.run(main)
    del flow
    gc.collect()
    assert unraisable == []


async def test_a_flow_nested_in_two_flows_has_one_set_of_node_actors() -> None:
    """Registered with the first flow that nests it, it is not registered again with
    the second: both reach the same actors, and its own runs use them too."""
    inner = a_then_b("shared")
    first = cf.Flow.builder("first").add_node("inner", inner).build()
    second = cf.Flow.builder("second").add_node("inner", inner).build()
    async with cf.open_engine() as engine:
        for flow in (first, second, inner):
            assert (await engine.run(flow, {})).execution_path == ("a", "b")
        names = [actor.name for actor in node_actors(engine)]
        assert sorted(names) == ["shared/a", "shared/b"]
        assert engine.statistics().actor("shared/a").messages_processed == 3


async def test_closing_the_engine_after_an_idle_worker_process_was_killed_raises_nothing() -> None:
    async with cf.open_engine() as engine:
        result = await engine.run(single(WhereAmI(executor="process")))
        worker, _ = result.result
        os.kill(worker, signal.SIGKILL)  # as the OOM killer or an operator might
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)  # the engine reaped it


class LeavesAThread(cf.Node):
    """exec, in a worker process, starts a non-daemon thread that never ends (a
    library's background flusher, say), and returns the worker's pid."""

    executor = "process"

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> int:
        threading.Thread(target=threading.Event().wait, name="left behind").start()
        return os.getpid()

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


async def test_a_worker_process_that_cannot_exit_is_killed_after_the_grace_period() -> None:
    """The worker's interpreter waits for the thread at its exit: the engine's close
    kills it once WORKER_GRACE_PERIOD has passed, and raises nothing."""
    async with cf.open_engine() as engine:
        worker = (await engine.run(single(LeavesAThread()))).result
        closing = trio.current_time()
    took = trio.current_time() - closing
    assert WORKER_GRACE_PERIOD <= took < WORKER_GRACE_PERIOD + 5
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)


class BreaksLater(cf.ActionCondition):
    """A route condition whose keys raise once ``broken`` is set (after build())."""

    broken = False

    def evaluate(self, values: Any) -> bool:
        return True

    @property
    def keys(self) -> frozenset[str]:
        if self.broken:
            raise RuntimeError("keys gone")
        return frozenset({"k"})


async def test_a_registration_that_fails_registers_none_of_the_flows_it_reached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The nested flow met first is not left registered with actors that never
    started: its own runs go on."""
    condition = BreaksLater()
    inner = single(Recorder(), "inner")
    outer = (
        cf.Flow.builder("outer")
        .add_node("nested", inner)
        .add_node("b", Recorder())
        .add_route("nested", "b", when=condition)
        .add_route("nested", cf.END)
        .build()
    )
    condition.broken = True
    async with cf.open_engine() as engine:
        with pytest.raises(cf.ConditionError, match="keys gone"):
            await engine.start_run(outer, {})
        assert node_actors(engine) == []
        with trio.fail_after(60):
            assert (await engine.run(inner, {})).execution_path == ("only",)
        again = single(Recorder(), "outer")
        await engine.run(again, {})
        assert engine.statistics().actor("outer/only").messages_processed == 1


class Flaky(cf.Node):
    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        raise ConnectionError("down")


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("max_retries", "3", "max_retries must be an int >= 1, got '3'"),
        ("retry_delay", -5, "retry_delay must be a finite number >= 0, got -5"),
        ("backoff", None, "backoff must be a finite number >= 0, got None"),
        ("retry_on", ConnectionError, "retry_on must be a tuple of exception types, got "),
        ("wait", 0.5, "wait = 0.5 is never read"),
    ],
)
async def test_config_set_on_a_node_after_build_is_checked_when_the_flow_is_registered(
    setting: str, value: Any, problem: str
) -> None:
    """With build()'s error, for a node of a nested flow too, and nothing registered
    (it failed mid-run with a bare TypeError, or was ignored)."""
    node = Flaky()
    inner = single(node, "inner")
    outer = cf.Flow.builder("outer").add_node("nested", inner).build()
    setattr(node, setting, value)
    async with cf.open_engine() as engine:
        with pytest.raises(cf.FlowValidationError) as info:
            await engine.run(outer, {})
        assert node_actors(engine) == []
    assert info.value.flow_name == "inner"
    assert info.value.problems[0].startswith(f"node 'only': {problem}")


class EachN(cf.BatchFlow):
    """Runs its sub-flow once for each of n = 1 and 2."""

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        return [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize(
    ("setting", "value"), [("timeout", 0.05), ("executor", "process"), ("rate_limit", (1, 1.0))]
)
async def test_batch_flow_config_set_after_build_is_refused_when_the_flow_is_registered(
    setting: str, value: Any
) -> None:
    """Before any step runs, with build()'s error (it was silently ignored)."""
    child = Recorder()
    batch = EachN(single(child, "child"))
    outer = cf.Flow.builder("outer").add_node("each", batch).build()
    setattr(batch, setting, value)
    async with cf.open_engine() as engine:
        with pytest.raises(cf.FlowValidationError) as info:
            await engine.run(outer, {})
        assert node_actors(engine) == []
    assert info.value.flow_name == "outer"
    assert info.value.problems == (
        f"node 'each': a BatchFlow runs child runs; it does not support {setting} "
        "(set them on the sub-flow's nodes)",
    )
