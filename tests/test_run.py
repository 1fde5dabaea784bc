"""The run handle: its states, its result or error, its end."""

from __future__ import annotations

import gc
import inspect
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing
from trio_util import AsyncValue

import cosmoflow_actors as cf
from tests.support import Gate, single


def test_the_handle_offers_watching_waiting_and_cancelling_and_nothing_of_the_engine() -> None:
    handle = {"run_id", "flow", "state", "current_state", "result", "error", "wait", "cancel"}
    assert {name for name in dir(cf.Run) if not name.startswith("_")} == handle


async def test_the_run_handle_reports_its_states() -> None:
    gate = Gate()
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(gate), params={"user": "ada"}, run_id="handle")
        assert run.run_id == "handle"
        seen = [run.state.value]
        await trio.testing.wait_all_tasks_blocked()
        seen.append(run.state.value)
        assert repr(run) == "<Run handle of 'single': running>"
        gate.open.set()
        result = await run.wait()
        seen.append(run.state.value)
    assert seen == [cf.RunState.PENDING, cf.RunState.RUNNING, cf.RunState.SUCCEEDED]
    assert (result.run_id, result.flow_name) == ("handle", "single")
    assert (run.result, run.error) == (result, None)


def test_the_typed_view_of_the_state_has_trio_utils_calls_and_parameters() -> None:
    """RunStateValue, what mypy sees of ``run.state``, names each public call of
    trio_util's AsyncValue with the same parameters (so code it accepts runs)."""
    calls = {name for name in dir(AsyncValue) if not name.startswith("_")}
    assert {name for name in dir(cf.RunStateValue) if not name.startswith("_")} == calls
    for name in calls - {"value"}:
        ours = inspect.signature(getattr(cf.RunStateValue, name)).parameters
        theirs = inspect.signature(getattr(AsyncValue, name)).parameters
        assert [(p.name, p.kind) for p in ours.values()] == [
            (p.name, p.kind) for p in theirs.values()
        ], name


async def test_the_state_is_watched_through_each_call_of_its_typed_view() -> None:
    gate = Gate()
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(gate))
        state: cf.RunStateValue = run.state
        changes: list[tuple[cf.RunState, cf.RunState]] = []

        async def watch() -> None:
            async with aclosing(state.transitions()) as transitions:
                async for change in transitions:
                    changes.append(change)
                    if change[0] is cf.RunState.SUCCEEDED:
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            assert await state.wait_value(cf.RunState.RUNNING) is cf.RunState.RUNNING
            running = state.eventual_values(lambda value: value is cf.RunState.RUNNING)
            async with aclosing(running) as values:
                async for now in values:
                    assert now is cf.RunState.RUNNING
                    break
            gate.open.set()
            assert await state.wait_transition() == (cf.RunState.SUCCEEDED, cf.RunState.RUNNING)
    assert state.value is cf.RunState.SUCCEEDED
    assert changes[-1] == (cf.RunState.SUCCEEDED, cf.RunState.RUNNING)


async def test_duration_is_measured_on_the_trio_clock(autojump_clock: trio.abc.Clock) -> None:
    @cf.node
    async def nap(ctx: cf.ExecutionContext) -> None:
        await trio.sleep(2.5)

    assert (await single(nap).run()).duration == 2.5


class Fails(cf.Node):
    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        raise RuntimeError("no")


async def test_a_failed_run_raises_its_error_from_wait_and_keeps_it() -> None:
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(Fails()), run_id="failing")
        with pytest.raises(cf.NodeError) as info:
            await run.wait()
    assert run.current_state is cf.RunState.FAILED
    assert (run.result, run.error) == (None, info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert repr(run) == "<Run failing of 'single': failed>"


async def test_cancelling_a_run_that_ended_changes_nothing() -> None:
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(cf.Node()))
        result = await run.wait()
        run.cancel()
    assert run.current_state is cf.RunState.SUCCEEDED
    assert await run.wait() == result


def traceback_depth(error: BaseException) -> int:
    depth = 0
    frame = error.__traceback__
    while frame is not None:
        depth += 1
        frame = frame.tb_next
    return depth


async def test_each_wait_of_a_failed_run_raises_its_error_with_the_same_traceback() -> None:
    @cf.node
    async def boom(ctx: cf.ExecutionContext) -> None:
        raise RuntimeError("boom")

    async with cf.open_engine() as engine:
        run = await engine.start_run(single(boom))
        depths = set()
        for _ in range(3):
            with pytest.raises(cf.NodeError) as info:
                await run.wait()
            depths.add(traceback_depth(info.value))
    assert len(depths) == 1


class BringsItsId(cf.Node):
    """Goes on with a param named after its node."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.with_params("default", **{ctx.node_id: 1})


async def test_a_join_that_merges_its_arrivals_params_leaves_no_reference_cycle() -> None:
    """A run's objects are freed when it ends, not left to the garbage collector (whose
    full passes walk every live object): a fan-out whose branches bring params to its
    join leaves no cycle."""
    targets = [f"b{index}" for index in range(8)]
    builder = cf.Flow.builder("brings").add_node("s", cf.node(lambda ctx: None))
    for target in targets:
        builder.add_node(target, BringsItsId()).add_route(target, "j")
    flow = builder.add_join("j", cf.node(lambda ctx: None)).add_route("s", targets)
    async with cf.open_engine() as engine:
        built = flow.build()
        await engine.run(built, {})  # the node actors are made
        gc.collect()
        gc.disable()
        try:
            await engine.run(built, {})
            gc.set_debug(gc.DEBUG_SAVEALL)
            cycles = gc.collect()
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert cycles == 0
