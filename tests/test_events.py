"""engine.events(): run and step events; dropping streams that never slow the engine,
lossless ones that slow it down instead, and listeners called as events happen."""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.events import EventHub
from tests.support import FlakyOnce, Gate, Recorder, Unshowable, a_then_b, single


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
        while len(events) < 9:
            events.append(await stream.__anext__())
    fallback, failed_step, failed_run = events[2], events[3], events[4]
    assert isinstance(fallback, cf.Fallback) and fallback.attempts == 1
    assert isinstance(failed_step, cf.StepFinished) and isinstance(failed_step.error, cf.NodeError)
    assert isinstance(failed_run, cf.RunFailed) and failed_run.run_id == "bad"
    kinds = [type(e).__name__ for e in events[5:]]
    assert kinds == ["RunStarted", "StepStarted", "StepFinished", "RunCancelled"]
    cancelled_step = events[7]
    assert isinstance(cancelled_step, cf.StepFinished)
    assert (cancelled_step.action, cancelled_step.error) == (None, None)
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


async def test_a_stream_opened_after_the_engine_closed_ends_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with cf.open_engine() as engine:
        await engine.run(single(Recorder()))
    events: list[cf.Event] = []
    with trio.fail_after(1):
        await collect(engine.events(lossless=True), events)
    assert events == []


def test_a_stream_needs_a_positive_buffer() -> None:
    with pytest.raises(ValueError, match="buffer must be an int >= 1"):
        cf.EventStream(0, lambda stream: None)


def emitted(count: int, start: int = 0) -> list[cf.Event]:
    return [cf.RunStarted(f"r{index}", 0.0, "flow") for index in range(start, start + count)]


async def read(stream: cf.EventStream, count: int) -> list[cf.Event]:
    return [await stream.__anext__() for _ in range(count)]


async def test_a_lossless_stream_keeps_every_event_past_its_buffer() -> None:
    hub = EventHub()
    stream = hub.open(3, lossless=True)
    for event in emitted(10):
        hub.emit(event)
    assert (stream.lossless, stream.held) == (True, 10)
    assert await read(stream, 10) == emitted(10)
    assert stream.held == 0


async def test_the_hub_is_congested_while_a_lossless_stream_holds_its_buffer() -> None:
    hub = EventHub()
    dropping = hub.open(1)
    lossless = hub.open(3, lossless=True)
    for event in emitted(2):
        hub.emit(event)
    assert not hub.congested  # the dropping stream is full and drops: it never congests
    hub.emit(emitted(1, 2)[0])
    assert hub.congested
    await read(lossless, 1)
    assert not hub.congested
    assert dropping.dropped == 2


async def test_wait_for_room_blocks_every_emitter_until_the_reader_catches_up() -> None:
    hub = EventHub()
    stream = hub.open(2, lossless=True)
    for event in emitted(3):
        hub.emit(event)
    went_on: list[int] = []

    async def emitter(index: int) -> None:
        await hub.wait_for_room()
        went_on.append(index)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(emitter, 1)
        nursery.start_soon(emitter, 2)
        await trio.testing.wait_all_tasks_blocked()
        await read(stream, 1)  # 2 left: still full
        await trio.testing.wait_all_tasks_blocked()
        assert went_on == []
        await read(stream, 1)
    assert sorted(went_on) == [1, 2]


async def test_wait_for_room_returns_at_once_without_a_full_lossless_stream() -> None:
    hub = EventHub()
    hub.open(5, lossless=True)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await hub.wait_for_room()  # a checkpoint, even when it need not wait
    await hub.wait_for_room()


async def test_closing_a_full_lossless_stream_lets_the_emitters_go_on() -> None:
    hub = EventHub()
    first = hub.open(1, lossless=True)
    second = hub.open(1, lossless=True)
    hub.emit(emitted(1)[0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.wait_for_room)
        await trio.testing.wait_all_tasks_blocked()
        first.close()  # the other one is still full
        await trio.testing.wait_all_tasks_blocked()
        assert hub.congested
        hub.close()
    assert not hub.congested
    assert await read(second, 1) == emitted(1)  # the buffered events stay readable


async def test_an_emitter_that_waits_for_room_loses_nothing_to_a_slow_reader() -> None:
    """5,000 "runs" of 6 events each, emitted as the engine does (never blocking in
    emit, waiting for room before each run) to a reader that only counts and yields
    after each event: it gets all 30,000, and the stream never holds more than its
    buffer plus one run's events."""
    hub = EventHub()
    stream = hub.open(100, lossless=True)
    most_held = 0

    async def engine() -> None:
        nonlocal most_held
        for run in range(5_000):
            if hub.congested:
                await hub.wait_for_room()
            for event in emitted(6, 6 * run):
                hub.emit(event)
            most_held = max(most_held, stream.held)
        hub.close()

    count = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine)
        async for _ in stream:
            count += 1
            await trio.lowlevel.checkpoint()
    assert count == 30_000
    assert 100 <= most_held < 100 + 6


async def test_a_listener_sees_each_event_in_the_emitting_task_until_removed() -> None:
    hub = EventHub()
    seen: list[tuple[cf.Event, trio.lowlevel.Task]] = []
    stop = hub.listen(lambda event: seen.append((event, trio.lowlevel.current_task())))
    assert hub.active
    [first, second] = emitted(2)
    hub.emit(first)
    stop()
    assert not hub.active
    hub.emit(second)
    assert seen == [(first, trio.lowlevel.current_task())]


class Traced:
    """The least a tracer of steps needs: it records events and gives a no-op scope;
    it counts how often it was detached."""

    def __init__(self) -> None:
        self.events: list[cf.Event] = []
        self.detachments = 0

    def handle(self, event: cf.Event) -> None:
        self.events.append(event)

    def step_span(self, step: cf.ExecutionContext) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def detached(self) -> None:
        self.detachments += 1


def test_a_hub_is_traced_by_one_tracer_at_a_time_until_it_stops() -> None:
    hub = EventHub()
    first, second = Traced(), Traced()
    stop = hub.trace(first)
    assert (hub.step_spans, hub.active) == (first, True)
    with pytest.raises(RuntimeError, match="traced already"):
        hub.trace(second)
    [event, later] = emitted(2)
    hub.emit(event)
    stop()
    assert (hub.step_spans, hub.active, first.detachments) == (None, False, 1)
    hub.emit(later)
    hub.trace(second)
    stop()
    assert (first.events, hub.step_spans, first.detachments) == ([event], second, 1)


def test_a_listener_that_raises_is_removed_and_logged_and_the_others_see_the_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = EventHub()
    before: list[cf.Event] = []
    after: list[cf.Event] = []

    def broken(event: cf.Event) -> None:
        raise ValueError("listener bug")

    hub.listen(before.append)
    hub.listen(broken)
    hub.listen(after.append)
    [first, second] = emitted(2)
    hub.emit(first)
    hub.emit(second)
    assert (before, after) == ([first, second], [first, second])
    [record] = caplog.records
    assert record.name == "cosmoflow_actors.events"
    assert "removed" in record.getMessage() and repr(broken) in record.getMessage()
    assert record.exc_info is not None and str(record.exc_info[1]) == "listener bug"


def test_a_listener_raising_on_an_event_that_cannot_be_shown_is_removed_and_emit_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = EventHub()
    after: list[cf.Event] = []

    def broken(event: cf.Event) -> None:
        raise ValueError("listener bug")

    hub.listen(broken)
    hub.listen(after.append)
    event = cf.StepFinished("r1", 1.0, "f", "n", "r1:1", 0.5, None, Unshowable())
    hub.emit(event)
    assert after == [event]
    [record] = caplog.records
    assert "on StepFinished of run 'r1'" in record.getMessage()


class BrokenHandle(Traced):
    def handle(self, event: cf.Event) -> None:
        super().handle(event)
        raise RuntimeError("exporter down")


class BrokenSpan(Traced):
    def step_span(self, step: cf.ExecutionContext) -> contextlib.nullcontext[None]:
        raise RuntimeError("no span")


async def traced_runs(tracer: Traced) -> list[dict[str, object]]:
    """Three runs of a two-node flow, one after the other, with ``tracer`` following the
    engine from the start; their stores. A new tracer can follow the engine after."""
    flow = a_then_b("traced")
    stores: list[dict[str, object]] = [{} for _ in range(3)]
    async with cf.open_engine() as engine:
        stop = engine.trace(tracer)
        for store in stores:
            await engine.run(flow, store)
        stop()
        engine.trace(Traced())()
    return stores


async def test_a_tracer_whose_handle_raises_is_removed_and_every_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracer = BrokenHandle()
    stores = await traced_runs(tracer)
    assert [store["seen"] for store in stores] == [["a", "b"]] * 3
    assert [type(event).__name__ for event in tracer.events] == ["RunStarted"]
    assert tracer.detachments == 1
    [record] = caplog.records
    assert record.exc_info is not None and str(record.exc_info[1]) == "exporter down"


async def test_a_tracer_whose_step_span_raises_is_removed_and_every_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracer = BrokenSpan()
    stores = await traced_runs(tracer)
    assert [store["seen"] for store in stores] == [["a", "b"]] * 3
    assert [type(event).__name__ for event in tracer.events] == ["RunStarted", "StepStarted"]
    [record] = caplog.records
    assert "making the span of step" in record.getMessage()
    assert record.exc_info is not None and str(record.exc_info[1]) == "no span"


class BrokenEntry(Traced):
    @contextlib.contextmanager
    def step_span(self, step: cf.ExecutionContext) -> Iterator[None]:
        raise RuntimeError("cannot enter")
        yield


async def test_a_tracer_whose_span_cannot_be_entered_is_removed_and_every_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stores = await traced_runs(BrokenEntry())
    assert [store["seen"] for store in stores] == [["a", "b"]] * 3
    [record] = caplog.records
    assert "entering a step's span" in record.getMessage()


class OwnBaseException(BaseException):
    """A BaseException that is no Exception, of a tracer's own making."""


class BrokenExit(Traced):
    @contextlib.contextmanager
    def step_span(self, step: cf.ExecutionContext) -> Iterator[None]:
        yield
        raise OwnBaseException("cannot leave")


async def test_a_tracer_raising_a_base_exception_of_its_own_is_removed_and_every_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stores = await traced_runs(BrokenExit())
    assert [store["seen"] for store in stores] == [["a", "b"]] * 3
    [record] = caplog.records
    assert "leaving a step's span" in record.getMessage()


def test_a_listener_raising_sys_exit_is_removed_but_a_keyboard_interrupt_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = EventHub()
    [event] = emitted(1)

    def exits(event: cf.Event) -> None:
        raise SystemExit(3)

    def interrupted(event: cf.Event) -> None:
        raise KeyboardInterrupt

    hub.listen(exits)
    hub.emit(event)
    [record] = caplog.records
    assert repr(exits) in record.getMessage()
    hub.listen(interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.emit(event)


async def test_a_stream_opened_during_a_step_gets_no_end_of_it_while_another_stream_is_open() -> (
    None
):
    gate = Gate()
    async with cf.open_engine() as engine, engine.events() as first:
        run = await engine.start_run(single(gate), run_id="late")
        await trio.testing.wait_all_tasks_blocked()
        async with engine.events() as second:
            gate.open.set()
            await run.wait()
            event = await second.__anext__()
        kinds = [type(e).__name__ for e in await read(first, 4)]
    assert isinstance(event, cf.RunFinished) and event.run_id == "late"
    assert kinds == ["RunStarted", "StepStarted", "StepFinished", "RunFinished"]


async def test_a_stream_gets_no_retry_or_fallback_of_a_step_it_did_not_see_start() -> None:
    hub = EventHub()
    stream = hub.open(10)
    error = ConnectionError("down")
    hub.emit(cf.Retry("r", 0.0, "a", "r:1", 1, error, 0.0))
    hub.emit(cf.Fallback("r", 0.0, "a", "r:1", 2, error))
    hub.emit(cf.StepFinished("r", 0.0, "flow", "a", "r:1", 0.0, None, error))
    hub.emit(cf.RunFailed("r", 0.0, "flow", 0.0, error))
    hub.close()
    assert [type(event).__name__ for event in await drained(stream)] == ["RunFailed"]


async def drained(stream: cf.EventStream) -> list[cf.Event]:
    """Every event of ``stream``, read until it ends."""
    events: list[cf.Event] = []
    await collect(stream, events)
    return events


async def test_a_run_ends_in_the_stream_after_the_steps_its_end_cancelled() -> None:
    hub = EventHub()
    stream = hub.open(10)
    hub.emit(cf.RunStarted("r", 0.0, "flow"))
    hub.emit(cf.StepStarted("r", 0.0, "flow", "a", "r:1.0/2"))
    hub.emit(cf.StepStarted("r", 0.0, "flow", "b", "r:1.1/2"))
    hub.emit(cf.RunCancelled("r", 1.0, "flow", 1.0))
    hub.emit(cf.StepFinished("r", 1.5, "flow", "b", "r:1.1/2", 1.5, None, None))
    hub.emit(cf.StepFinished("r", 2.0, "flow", "a", "r:1.0/2", 2.0, None, None))
    stream.close()
    events = await drained(stream)
    assert [type(event).__name__ for event in events] == [
        "RunStarted",
        "StepStarted",
        "StepStarted",
        "StepFinished",
        "StepFinished",
        "RunCancelled",
    ]
    assert events[-1].time == 1.0


async def test_when_the_engine_closes_a_stream_ends_once_its_steps_in_flight_have_finished() -> (
    None
):
    hub = EventHub()
    lossless = hub.open(1, lossless=True)
    hub.emit(cf.RunStarted("r", 0.0, "flow"))
    hub.emit(cf.StepStarted("r", 0.0, "flow", "a", "r:1"))
    hub.emit(cf.RunCancelled("r", 1.0, "flow", 1.0))
    assert hub.congested
    hub.close()
    assert not hub.congested
    hub.emit(cf.RunStarted("s", 1.0, "flow"))
    hub.emit(cf.StepFinished("r", 1.0, "flow", "a", "r:1", 1.0, None, None))
    hub.emit(cf.RunStarted("t", 1.0, "flow"))
    assert not hub.active
    kinds = [type(event).__name__ for event in await drained(lossless)]
    assert kinds == ["RunStarted", "StepStarted", "StepFinished", "RunCancelled"]


class UnwindsSlowly(cf.Node):
    """Its first step waits until cancelled, then cleans up, shielded, until ``cleaned``
    is set; its second sets ``again`` and waits for ``later``."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.cleaned = trio.Event()
        self.again = trio.Event()
        self.later = trio.Event()

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.steps += 1
        if self.steps > 1:
            self.again.set()
            await self.later.wait()
            return
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.cleaned.wait()


def pairs(events: list[cf.Event]) -> list[tuple[str, str | None]]:
    """Each event's kind, with a step end's action ("cancelled" when it has none)."""
    return [
        (type(event).__name__, (event.action or "cancelled"))
        if isinstance(event, cf.StepFinished)
        else (type(event).__name__, None)
        for event in events
    ]


async def test_a_run_resumed_while_its_cancelled_step_unwinds_keeps_each_step_end_with_its_start(
    tmp_path: Path,
) -> None:
    """The resumed run's first step has the execution id of the cancelled one still
    cleaning up: the stream gives the old run whole (its step's end, then its end),
    then the resumed run, each step ending as it did."""
    node = UnwindsSlowly()
    flow = single(node, "unwinds")
    storage = cf.SQLiteStorage(tmp_path / "runs.db")
    async with cf.open_engine() as engine, engine.events(lossless=True) as stream:
        old = await engine.start_run(flow, storage, run_id="r")
        await trio.testing.wait_all_tasks_blocked()
        old.cancel()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(engine.resume, flow, storage, run_id="r"))
            await node.again.wait()
            node.cleaned.set()
            await trio.testing.wait_all_tasks_blocked()
            node.later.set()
        stream.close()
        events = await drained(stream)
    assert pairs(events) == [
        ("RunStarted", None),
        ("StepStarted", None),
        ("StepFinished", "cancelled"),
        ("RunCancelled", None),
        ("RunStarted", None),
        ("StepStarted", None),
        ("StepFinished", "default"),
        ("RunFinished", None),
    ]


async def test_a_stream_that_missed_a_steps_start_gives_none_of_its_end_to_a_later_step(
    tmp_path: Path,
) -> None:
    """The stream opens while the first run's step runs (another stream saw it start,
    so the step emits its end), so it never sees it start; the run is resumed by the
    task that opened the engine, which carries the new step itself while the old one
    still cleans up: the old step's end is not the new one's, which ends as it did."""
    node = UnwindsSlowly()
    flow = single(node, "unwinds")
    storage = cf.SQLiteStorage(tmp_path / "runs.db")

    async def unwind_then_finish() -> None:
        await node.again.wait()
        node.cleaned.set()
        await trio.testing.wait_all_tasks_blocked()
        node.later.set()

    async with (
        cf.open_engine() as engine,
        trio.open_nursery() as nursery,
        engine.events(lossless=True),
    ):
        old = await engine.start_run(flow, storage, run_id="r")
        await trio.testing.wait_all_tasks_blocked()
        async with engine.events(lossless=True) as stream:
            old.cancel()
            nursery.start_soon(unwind_then_finish)
            await engine.resume(flow, storage, run_id="r")
            stream.close()
            events = await drained(stream)
    assert pairs(events) == [
        ("RunCancelled", None),
        ("RunStarted", None),
        ("StepStarted", None),
        ("StepFinished", "default"),
        ("RunFinished", None),
    ]


async def test_runs_of_one_id_come_whole_in_turn_while_their_cancelled_steps_finish() -> None:
    """Three runs of id r, each started while the steps of the ones before still
    finish, each step in a task of its own, as node actors run them, with a retry
    emitted in a task the step started (a ParallelBatchNode's item): every step's retry
    and end pair with its own start (node a1, a2 or a3), whatever order they finish in."""
    hub = EventHub()
    stream = hub.open(10, lossless=True)
    finish = {node: trio.Event() for node in ("a1", "a2", "a3")}

    async def item(node: str) -> None:
        hub.emit(cf.Retry("r", 1.0, node, "r:1", 1, ConnectionError("down"), 0.0))

    async def step(node: str, action: str | None) -> None:
        hub.emit(cf.StepStarted("r", 0.0, "flow", node, "r:1"))
        await finish[node].wait()
        async with trio.open_nursery() as items:
            items.start_soon(item, node)
        hub.emit(cf.StepFinished("r", 1.0, "flow", node, "r:1", 1.0, action, None))

    async with trio.open_nursery() as nursery:
        for node in ("a1", "a2", "a3"):
            hub.emit(cf.RunStarted("r", 0.0, "flow"))
            nursery.start_soon(step, node, "done" if node == "a3" else None)
            await trio.testing.wait_all_tasks_blocked()
            if node != "a3":
                hub.emit(cf.RunCancelled("r", 0.0, "flow", 0.0))
        for node in ("a2", "a1", "a3"):
            finish[node].set()
            await trio.testing.wait_all_tasks_blocked()
        hub.emit(cf.RunFinished("r", 1.0, "flow", 1.0, 1, "done"))
    assert stream.held == 15  # those kept back counted once
    stream.close()
    events = await drained(stream)
    step_kinds = cf.StepStarted | cf.Retry | cf.StepFinished
    steps = [
        (type(event).__name__, event.node_id, getattr(event, "action", None))
        for event in events
        if isinstance(event, step_kinds)
    ]
    assert steps == [
        ("StepStarted", "a1", None),
        ("Retry", "a1", None),
        ("StepFinished", "a1", None),
        ("StepStarted", "a2", None),
        ("Retry", "a2", None),
        ("StepFinished", "a2", None),
        ("StepStarted", "a3", None),
        ("Retry", "a3", None),
        ("StepFinished", "a3", "done"),
    ]
    assert [type(event).__name__ for event in events if not isinstance(event, step_kinds)] == [
        "RunStarted",
        "RunCancelled",
        "RunStarted",
        "RunCancelled",
        "RunStarted",
        "RunFinished",
    ]


async def test_a_dropping_stream_drops_what_follows_a_start_it_dropped() -> None:
    """Run r's step b and run s start while the buffer is full: their later events are
    dropped too, though the reader has made room meanwhile."""
    hub = EventHub()
    stream = hub.open(2)
    hub.emit(cf.RunStarted("r", 0.0, "flow"))
    hub.emit(cf.StepStarted("r", 0.0, "flow", "a", "r:1.0/2"))
    hub.emit(cf.StepStarted("r", 0.0, "flow", "b", "r:1.1/2"))
    hub.emit(cf.RunStarted("s", 0.0, "flow"))
    [dropped, started] = await read(stream, 2)
    assert isinstance(dropped, cf.EventsDropped) and dropped.count == 2
    assert started == cf.RunStarted("r", 0.0, "flow")
    hub.emit(cf.StepStarted("s", 0.0, "flow", "c", "s:1"))
    hub.emit(cf.StepFinished("s", 1.0, "flow", "c", "s:1", 1.0, None, None))
    hub.emit(cf.RunCancelled("s", 1.0, "flow", 1.0))
    hub.emit(cf.StepFinished("r", 1.0, "flow", "b", "r:1.1/2", 1.0, "x", None))
    hub.emit(cf.StepFinished("r", 1.0, "flow", "a", "r:1.0/2", 1.0, "x", None))
    hub.close()
    events = await drained(stream)
    assert [(type(event).__name__, getattr(event, "node_id", None)) for event in events] == [
        ("EventsDropped", None),
        ("StepStarted", "a"),
        ("StepFinished", "a"),
    ]
    assert isinstance(events[0], cf.EventsDropped) and events[0].count == 4


async def test_a_stream_that_ends_reports_the_events_it_dropped_last() -> None:
    """Run s's end is dropped with its start while the reader waits on an empty
    buffer: the stream ends with an EventsDropped."""
    hub = EventHub()
    stream = hub.open(1)
    hub.emit(cf.RunStarted("r", 0.0, "flow"))
    hub.emit(cf.RunStarted("s", 0.0, "flow"))
    assert [type(event).__name__ for event in await read(stream, 2)] == [
        "EventsDropped",
        "RunStarted",
    ]
    last: list[cf.Event] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, stream, last)
        await trio.testing.wait_all_tasks_blocked()
        hub.emit(cf.RunCancelled("s", 1.0, "flow", 1.0))
        hub.close()
    [dropped] = last
    assert isinstance(dropped, cf.EventsDropped) and dropped.count == 1


async def test_a_reader_slower_than_the_drops_still_gets_the_buffered_events() -> None:
    """Events are dropped between every two reads: the reads alternate between an
    EventsDropped and the oldest buffered event."""
    hub = EventHub()
    stream = hub.open(2)
    [a, b, c, d, e, f] = emitted(6)
    for event in (a, b, c):  # c is dropped
        hub.emit(event)
    reads = [await stream.__anext__()]
    hub.emit(d)  # dropped: a and b fill the buffer
    reads.append(await stream.__anext__())
    hub.emit(e)
    hub.emit(f)  # dropped: b and e fill the buffer
    reads += [await stream.__anext__(), await stream.__anext__()]
    assert [getattr(event, "count", event) for event in reads] == [1, a, 2, b]


async def test_a_stream_let_go_of_unclosed_holds_no_events_of_later_runs() -> None:
    """A reader that leaves ``async for`` without closing its stream (no ``async
    with``): once the stream is garbage the engine forgets it, so after 2N more runs
    it holds no more of their events than after N (it held up to ``buffer`` events of
    each run, errors and tracebacks included)."""
    flow = single(Recorder())

    async def run_and_count(engine: cf.Engine, count: int) -> int:
        for _ in range(count):
            await engine.run(flow)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        await trio.testing.wait_all_tasks_blocked()
        return sum(isinstance(o, cf.Event) for o in gc.get_objects())

    async with cf.open_engine() as engine:
        stream = engine.events()
        await engine.run(flow)
        async for _ in stream:
            break
        del stream
        after_n = await run_and_count(engine, 50)
        after_2n = await run_and_count(engine, 50)
    assert after_2n <= after_n


async def test_a_full_lossless_stream_let_go_of_unclosed_no_longer_holds_the_engine_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A run's step waits for room in a full lossless stream; once its reader lets go
    of the stream without closing it, the step goes on and the run ends."""
    flow = single(Recorder())
    async with cf.open_engine() as engine:
        stream = engine.events(buffer=1, lossless=True)
        run = await engine.start_run(flow)  # its RunStarted fills the stream
        await trio.testing.wait_all_tasks_blocked()
        assert run.current_state is cf.RunState.PENDING  # its step waits for room
        del stream
        with trio.fail_after(60):
            await run.wait()


async def test_a_step_that_waited_for_room_does_not_start_once_its_run_has_ended() -> None:
    """A step waits for room in a full lossless stream; reading one event makes room
    and wakes it, and its run is cancelled before it goes on: the step does not start,
    and the stream ends the run with its RunCancelled, no StepStarted after it."""
    flow = single(Recorder())
    async with cf.open_engine() as engine:
        stream = engine.events(buffer=1, lossless=True)
        run = await engine.start_run(flow)  # its RunStarted fills the stream
        await trio.testing.wait_all_tasks_blocked()  # its step waits for room
        first = await stream.__anext__()
        run.cancel()  # before the step, woken, goes on
        with pytest.raises(cf.RunCancelledError):
            await run.wait()
    kinds = [type(event).__name__ for event in [first, *await drained(stream)]]
    assert kinds == ["RunStarted", "RunCancelled"]
