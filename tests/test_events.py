"""engine.events(): run and step events, a bounded buffer that never blocks the engine."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from tests.support import FlakyOnce, Gate, Recorder, single


async def collect(stream: cf.EventStream, into: list[cf.Event]) -> None:
    async for event in stream:
        into.append(event)


async def test_a_run_reports_its_steps_retries_and_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flow = (
        cf.Flow.builder("ev")
        .add_node("a", FlakyOnce())
        .add_node("b", Recorder("done"))
        .add_route("a", "b")
    )
    events: list[cf.Event] = []
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        nursery.start_soon(collect, engine.events(), events)
        await engine.run(flow.build(), run_id="r1")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    kinds = [(type(e).__name__, e.time) for e in events]
    assert kinds == [
        ("RunStarted", 0.0),
        ("StepStarted", 0.0),
        ("Retry", 1.0),
        ("StepFinished", 2.5),
        ("StepStarted", 2.5),
        ("StepFinished", 2.5),
        ("RunFinished", 2.5),
    ]
    retry = events[2]
    assert isinstance(retry, cf.Retry) and (retry.attempt, retry.delay) == (1, 0.5)
    first_step = events[3]
    assert isinstance(first_step, cf.StepFinished)
    assert (first_step.node_id, first_step.duration, first_step.action) == ("a", 2.5, "default")
    end = events[-1]
    assert isinstance(end, cf.RunFinished)
    assert (end.run_id, end.steps, end.final_action, end.duration) == ("r1", 2, "done", 2.5)


async def test_failures_fallbacks_and_cancellations_are_reported() -> None:
    @cf.node
    def broken(ctx: cf.ExecutionContext) -> None:
        raise ValueError("no")

    gate = Gate()
    events: list[cf.Event] = []
    async with cf.open_engine() as engine, engine.events() as stream:
        with pytest.raises(cf.NodeError):
            await engine.run(single(broken), run_id="bad")
        run = await engine.start_run(single(gate), run_id="stopped")
        await trio.testing.wait_all_tasks_blocked()
        run.cancel()
        await trio.testing.wait_all_tasks_blocked()
        while len(events) < 8:
            events.append(await stream.__anext__())
    fallback, failed_step, failed_run = events[2], events[3], events[4]
    assert isinstance(fallback, cf.Fallback) and fallback.attempts == 1
    assert isinstance(failed_step, cf.StepFinished) and isinstance(failed_step.error, cf.NodeError)
    assert isinstance(failed_run, cf.RunFailed) and failed_run.run_id == "bad"
    assert [type(e).__name__ for e in events[5:]] == ["RunStarted", "StepStarted", "RunCancelled"]
    await trio.testing.wait_all_tasks_blocked()


async def test_a_stream_opened_during_a_step_gets_no_end_of_it_without_its_start() -> None:
    gate = Gate()
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(gate), run_id="late")
        await trio.testing.wait_all_tasks_blocked()
        assert gate.inside == 1
        async with engine.events() as stream:
            gate.open.set()
            await run.wait()
            event = await stream.__anext__()
    assert isinstance(event, cf.RunFinished) and event.run_id == "late"


async def test_a_slow_consumer_loses_events_and_is_told_how_many() -> None:
    flow = single(Recorder(), "many")
    async with cf.open_engine() as engine:
        async with engine.events(buffer=3) as stream:
            for _ in range(5):
                await engine.run(flow)
            first = [await stream.__anext__() for _ in range(4)]
        assert [type(e).__name__ for e in first] == [
            "EventsDropped",
            "RunStarted",
            "StepStarted",
            "StepFinished",
        ]
        dropped = first[0]
        assert isinstance(dropped, cf.EventsDropped) and dropped.count == 5 * 4 - 3


async def test_streams_end_when_the_engine_closes() -> None:
    events: list[cf.Event] = []
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        nursery.start_soon(collect, engine.events(), events)
        await engine.run(single(Recorder()))
    assert type(events[-1]).__name__ == "RunFinished"


def test_a_stream_needs_a_positive_buffer() -> None:
    with pytest.raises(ValueError, match="buffer must be an int >= 1"):
        cf.EventStream(0, lambda stream: None)
