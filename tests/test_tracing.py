"""Events as readable lines, and as OpenTelemetry spans (the SDK's in-memory exporter)."""

from __future__ import annotations

import contextlib
import itertools
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cosmoflow_actors as cf
from cosmoflow_actors import tracing
from cosmoflow_actors.events import EventHub, StepSpans
from cosmoflow_actors.tracing import LiveSpans, describe_error, format_event, trace_events
from tests.support import FlakyOnce, Gate, Recorder, Unshowable, single

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode, Tracer


@cf.node
def broken(ctx: cf.ExecutionContext) -> None:
    raise ValueError("no")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Tracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("tests")


def by_name(spans: Iterator[ReadableSpan] | tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


async def test_a_run_is_a_trace_and_each_step_a_child_span(
    autojump_clock: trio.testing.MockClock, tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    flow = (
        cf.Flow.builder("ev")
        .add_node("a", FlakyOnce())
        .add_node("b", Recorder("done"))
        .add_route("a", "b")
        .build()
    )
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        await nursery.start(trace_events, engine, tracer)
        await engine.run(flow, run_id="r1")
    spans = by_name(exporter.get_finished_spans())
    assert sorted(spans) == ["ev", "ev/a", "ev/b"]
    run, a, b = spans["ev"], spans["ev/a"], spans["ev/b"]
    assert run.parent is None
    assert {a.parent.span_id, b.parent.span_id} == {run.context.span_id}  # type: ignore[union-attr]
    assert {a.context.trace_id, b.context.trace_id} == {run.context.trace_id}
    assert dict(run.attributes or {}) == {
        "cosmoflow.run_id": "r1",
        "cosmoflow.flow": "ev",
        "cosmoflow.steps": 2,
        "cosmoflow.final_action": "done",
    }
    assert dict(a.attributes or {}) == {
        "cosmoflow.run_id": "r1",
        "cosmoflow.flow": "ev",
        "cosmoflow.node_id": "a",
        "cosmoflow.execution_id": "r1:1",
        "cosmoflow.action": "default",
    }
    assert_times(run, start=0.0, end=2.5)
    assert_times(a, start=0.0, end=2.5, origin=run)
    assert_times(b, start=2.5, end=2.5, origin=run)
    [retry] = a.events
    assert retry.name == "retry"
    assert retry.timestamp - run.start_time == 1_000_000_000  # type: ignore[operator]
    assert dict(retry.attributes or {}) == {
        "exception.type": "ConnectionError",
        "exception.message": "first attempt fails",
        "cosmoflow.attempt": 1,
        "cosmoflow.delay": 0.5,
    }
    assert all(span.status.status_code is StatusCode.UNSET for span in spans.values())


def assert_times(
    span: ReadableSpan, *, start: float, end: float, origin: ReadableSpan | None = None
) -> None:
    """The span's start and end, in seconds after ``origin``'s start, are exact."""
    zero = (origin or span).start_time
    assert span.start_time is not None and span.end_time is not None and zero is not None
    assert (span.start_time - zero, span.end_time - zero) == (
        round(start * 1e9),
        round(end * 1e9),
    )


async def test_failures_set_error_status_and_record_the_exception(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        await nursery.start(trace_events, engine, tracer)
        with pytest.raises(cf.NodeError):
            await engine.run(single(broken, "fails"), run_id="bad")
    spans = by_name(exporter.get_finished_spans())
    step, run = spans["fails/only"], spans["fails"]
    for span in (step, run):
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description is not None
        assert "failed in exec" in span.status.description
        assert "(caused by ValueError: no)" in span.status.description
    assert [event.name for event in step.events] == ["fallback", "exception"]
    assert dict(step.events[0].attributes or {})["cosmoflow.attempts"] == 1
    exception_type = "cosmoflow_actors.errors.NodeError"
    assert dict(run.events[0].attributes or {})["exception.type"] == exception_type


@cf.node
async def unprintable(ctx: cf.ExecutionContext) -> None:
    raise Unshowable()


async def test_an_error_that_cannot_be_shown_fails_its_run_alone_and_tracing_goes_on(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    gate = Gate()
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        await nursery.start(trace_events, engine, tracer)
        waiting = await engine.start_run(single(gate, "waits"), run_id="waits")
        await trio.testing.wait_all_tasks_blocked()
        bad = await engine.start_run(single(unprintable, "bad"), run_id="bad")
        with pytest.raises(cf.NodeError) as failed:
            await bad.wait()
        assert isinstance(failed.value.__cause__, Unshowable)
        gate.open.set()
        await waiting.wait()
        await engine.run(single(Recorder("done"), "after"), run_id="after")
    spans = by_name(exporter.get_finished_spans())
    assert {"bad/only", "waits/only", "after/only"} <= set(spans)
    fallback = spans["bad/only"].events[0]
    assert dict(fallback.attributes or {})["exception.message"] == "<unprintable>"


def test_an_exception_that_cannot_be_shown_is_recorded_with_its_type_and_trace(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    try:
        raise Unshowable()
    except Unshowable as exc:
        error = exc
    with tracer.start_as_current_span("s") as span:
        tracing._record_exception(span, error, 5)
    [event] = single_span(exporter).events
    attributes = dict(event.attributes or {})
    assert (event.name, event.timestamp) == ("exception", 5)
    assert attributes["exception.message"] == "<unprintable>"
    assert attributes["exception.type"] == "tests.support.Unshowable"
    assert "raise Unshowable()" in str(attributes["exception.stacktrace"])


def single_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    [span] = exporter.get_finished_spans()
    return span


async def test_a_cancelled_run_and_its_step_are_marked(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    gate = Gate()
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        await nursery.start(trace_events, engine, tracer)
        run = await engine.start_run(single(gate, "waits"), run_id="stopped")
        await trio.testing.wait_all_tasks_blocked()
        run.cancel()
        await trio.testing.wait_all_tasks_blocked()
    spans = by_name(exporter.get_finished_spans())
    assert spans["waits"].attributes == {
        "cosmoflow.run_id": "stopped",
        "cosmoflow.flow": "waits",
        "cosmoflow.cancelled": True,
    }
    assert (spans["waits/only"].attributes or {})["cosmoflow.cancelled"] is True


async def test_spans_open_when_tracing_stops_end_then_in_trio_time(
    autojump_clock: trio.testing.MockClock, tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    """Tracing stopped 5 s into a step: the step's and the run's spans end 5 s after
    they started, however far the wall clock is from trio's."""
    gate = Gate()
    tracing = trio.CancelScope()

    async def traced(engine: cf.Engine) -> None:
        with tracing:
            await trace_events(engine, tracer)

    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        nursery.start_soon(traced, engine)
        await trio.sleep(100)
        run = await engine.start_run(single(gate, "waits"))
        await trio.sleep(5)
        tracing.cancel()
        await trio.testing.wait_all_tasks_blocked()
        gate.open.set()
        await run.wait()
    durations = {
        span.name: (span.end_time or 0) - (span.start_time or 0)
        for span in exporter.get_finished_spans()
    }
    assert durations == {"waits/only": 5_000_000_000, "waits": 5_000_000_000}


async def test_concurrent_runs_are_separate_traces(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    flow = single(Recorder(), "many")
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        await nursery.start(trace_events, engine, tracer)
        runs = [await engine.start_run(flow) for _ in range(3)]
        for run in runs:
            await run.wait()
    spans = exporter.get_finished_spans()
    assert len(spans) == 6
    traces = {span.context.trace_id for span in spans}
    assert len(traces) == 3
    for trace_id in traces:
        names = sorted(span.name for span in spans if span.context.trace_id == trace_id)
        assert names == ["many", "many/only"]


class FedEngine:
    """An event source the test emits into by hand: exact events, closed on demand."""

    def __init__(self) -> None:
        self.hub = EventHub()
        self.closed = trio.Event()

    def trace(self, spans: StepSpans) -> Callable[[], None]:
        return self.hub.trace(spans)

    async def wait_closed(self) -> None:
        await self.closed.wait()


async def fed(tracer: Tracer, *events: cf.Event) -> None:
    """Have trace_events make spans of ``events``, emitted in order; then the engine
    closes."""
    source = FedEngine()
    async with trio.open_nursery() as nursery:
        await nursery.start(trace_events, source, tracer)
        for event in events:
            source.hub.emit(event)
        source.closed.set()


async def test_spans_still_open_when_the_engine_closes_are_ended(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    await fed(
        tracer,
        cf.RunStarted("r1", 0.0, "flow"),
        cf.StepStarted("r1", 0.1, "flow", "a", "r1:1"),
        cf.Retry("r1", 0.2, "a", "r1:1", 1, ConnectionError("down"), 0.0),
        cf.StepFinished("r1", 0.3, "flow", "a", "r1:1", 0.2, "x", None),
    )
    [step, run] = exporter.get_finished_spans()
    assert (step.name, [event.name for event in step.events]) == ("flow/a", ["retry"])
    assert step.attributes is not None and step.attributes["cosmoflow.action"] == "x"
    assert run.name == "flow"


async def test_a_retry_goes_to_its_own_steps_span_when_two_steps_of_a_node_overlap(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    """Two fan-out branches run the same node at once: each retry names its step."""
    error = ConnectionError("down")
    first, second = "r1:1.0/2", "r1:1.1/2"
    await fed(
        tracer,
        cf.RunStarted("r1", 0.0, "flow"),
        cf.StepStarted("r1", 0.1, "flow", "a", first),
        cf.StepStarted("r1", 0.1, "flow", "a", second),
        cf.Retry("r1", 0.2, "a", first, 1, error, 0.0),
        cf.Fallback("r1", 0.3, "a", first, 2, error),
        cf.StepFinished("r1", 0.4, "flow", "a", second, 0.3, "x", None),
        cf.StepFinished("r1", 0.4, "flow", "a", first, 0.3, "x", None),
    )
    steps = [span for span in exporter.get_finished_spans() if span.name == "flow/a"]
    events = {
        span.attributes["cosmoflow.execution_id"]: [event.name for event in span.events]
        for span in steps
        if span.attributes is not None
    }
    assert events == {first: ["retry", "fallback"], second: []}


async def test_without_opentelemetry_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    async with cf.open_engine() as engine:
        with pytest.raises(ImportError, match=r"pip install 'cosmoflow-actors\[otel\]'"):
            await trace_events(engine)


def test_every_event_has_a_readable_line() -> None:
    error = ValueError("bad data")
    events: list[tuple[cf.Event, str]] = [
        (cf.RunStarted("r1", 10.0, "ev"), "run started     flow 'ev'"),
        (cf.StepStarted("r1", 10.0, "ev", "a", "r1:1"), "step started    a"),
        (
            cf.StepFinished("r1", 10.5, "ev", "a", "r1:1", 0.5, "next", None),
            "step finished   a -> next (500.0 ms)",
        ),
        (
            cf.StepFinished("r1", 10.5, "ev", "a", "r1:1", 0.5, None, error),
            "step failed     a (500.0 ms): ValueError: bad data",
        ),
        (
            cf.StepFinished("r1", 10.5, "ev", "a", "r1:1", 0.5, None, None),
            "step cancelled  a (500.0 ms)",
        ),
        (
            cf.Retry("r1", 10.0, "a", "r1:1", 1, error, 0.25),
            "retry           a attempt 1 failed: ValueError: bad data; next in 0.25s",
        ),
        (
            cf.Fallback("r1", 10.0, "a", "r1:1", 3, error),
            "fallback        a after 3 attempts: ValueError: bad data",
        ),
        (
            cf.RunFinished("r1", 12.0, "ev", 2.0, 4, "done"),
            "run finished    done after 4 steps (2000.0 ms)",
        ),
        (cf.RunFailed("r1", 12.0, "ev", 2.0, error), "run failed      ValueError: bad data"),
        (cf.RunCancelled("r1", 12.0, "ev", 2.0), "run cancelled   (2000.0 ms)"),
        (cf.EventsDropped("", 12.0, 7), "events dropped  7 (the consumer fell behind)"),
    ]
    for event, line in events:
        formatted = format_event(event, origin=10.0)
        assert formatted[22:].startswith(line), formatted
    assert format_event(cf.RunStarted("0123456", 12.25, "ev"), origin=10.0) == (
        "   +2.250s  0123456   run started     flow 'ev'"
    )
    assert format_event(cf.EventsDropped("", 12.0, 7), origin=10.0)[12:22] == "-         "


def test_a_line_shows_a_long_run_id_whole() -> None:
    run_id = "nightly-2026-12-04-customers-eu-west-000123"
    assert format_event(cf.RunStarted(run_id, 12.25, "ev"), origin=10.0) == (
        f"   +2.250s  {run_id}  run started     flow 'ev'"
    )


def test_a_line_stays_one_line_whatever_a_run_named_things() -> None:
    error = ValueError("two\nlines\u2028")
    event = cf.Fallback("r\n1", 10.0, "a\x1b[31m", "r1:1", 1, error)
    assert format_event(event, origin=10.0) == (
        "   +0.000s  r\\n1       fallback        a\\x1b[31m after 1 attempt: "
        "ValueError: two\\nlines\\u2028"
    )


async def test_lines_of_two_runs_of_one_engine_name_each_run() -> None:
    flow = cf.Flow.builder("ev").add_node("a", cf.Node()).build()
    async with cf.open_engine() as engine:
        results = [await engine.run(flow) for _ in range(2)]
    lines = [format_event(cf.RunStarted(result.run_id, 0.0, "ev")) for result in results]
    assert [line.split()[1] for line in lines] == [result.run_id for result in results]


def test_errors_are_described_with_their_causes() -> None:
    try:
        try:
            raise KeyError("k")
        except KeyError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError as exc:
        assert describe_error(exc) == "RuntimeError: outer (caused by KeyError: 'k')"
    try:
        raise RuntimeError("stopped") from KeyboardInterrupt()
    except RuntimeError as exc:
        assert describe_error(exc) == "RuntimeError: stopped (caused by KeyboardInterrupt)"


def test_a_chain_of_causes_that_loops_is_described_once_round() -> None:
    first, second = ValueError("a"), KeyError("b")
    first.__cause__, second.__cause__ = second, first
    assert describe_error(first) == "ValueError: a (caused by KeyError: 'b')"


def test_a_cause_the_message_before_it_quotes_is_described_once() -> None:
    disk = FileNotFoundError(2, "No such file or directory")
    storage = cf.StorageError(f"cannot write x.json: {disk}")
    storage.__cause__ = disk
    step = RuntimeError("step failed")
    step.__cause__ = storage

    assert describe_error(step) == (
        "RuntimeError: step failed (caused by StorageError: cannot write x.json: "
        "[Errno 2] No such file or directory)"
    )


@cf.node
async def loops(ctx: cf.ExecutionContext) -> None:
    first, second = ValueError("a"), KeyError("b")
    first.__cause__, second.__cause__ = second, first
    raise first


async def test_a_step_whose_error_causes_loop_ends_its_span_and_tracing_goes_on(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        await nursery.start(trace_events, engine, tracer)
        with pytest.raises(cf.NodeError):
            await engine.run(single(loops, "loops"), run_id="l")
        await engine.run(single(Recorder("done"), "after"), run_id="a")
    spans = by_name(exporter.get_finished_spans())
    assert sorted(spans) == ["after", "after/only", "loops", "loops/only"]
    assert spans["loops/only"].status.description == (
        "NodeError: node 'only' failed in exec (flow 'loops', run l, 1 attempt) "
        "(caused by ValueError: a (caused by KeyError: 'b'))"
    )


@dataclass(frozen=True, slots=True)
class StepRef:
    """What LiveSpans.step_span reads of a step's ExecutionContext."""

    execution_id: str


def live_step(tracer: Tracer) -> tuple[LiveSpans, EventHub]:
    """LiveSpans tracing a hub, with run r1 and its step r1:1 of node a started."""
    spans = LiveSpans(tracer)
    hub = EventHub()
    hub.trace(spans)
    assert hub.step_spans is spans
    hub.emit(cf.RunStarted("r1", 0.0, "flow"))
    hub.emit(cf.StepStarted("r1", 0.0, "flow", "a", "r1:1"))
    return spans, hub


async def test_step_span_makes_the_step_span_current_in_the_steps_code(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    spans, hub = live_step(tracer)
    seen: dict[str, str] = {}

    def name_of_current() -> str:
        span = otel_trace.get_current_span()
        return span.name if isinstance(span, ReadableSpan) else "none"

    async def child_task() -> None:
        seen["child task"] = name_of_current()

    with spans.step_span(StepRef("r1:1")):
        seen["step"] = name_of_current()
        with tracer.start_as_current_span("call"):
            pass
        seen["thread"] = await trio.to_thread.run_sync(name_of_current)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child_task)
    seen["after"] = name_of_current()
    hub.emit(cf.StepFinished("r1", 1.0, "flow", "a", "r1:1", 1.0, "default", None))
    hub.emit(cf.RunFinished("r1", 1.0, "flow", 1.0, 1, "default"))

    assert seen == {"step": "flow/a", "thread": "flow/a", "child task": "flow/a", "after": "none"}
    finished = by_name(exporter.get_finished_spans())
    assert sorted(finished) == ["call", "flow", "flow/a"]
    call, step, run = finished["call"], finished["flow/a"], finished["flow"]
    assert call.parent is not None and call.parent.span_id == step.context.span_id
    assert step.parent is not None and step.parent.span_id == run.context.span_id
    assert (step.attributes or {})["cosmoflow.action"] == "default"


async def test_concurrent_steps_each_see_their_own_span(tracer: Tracer) -> None:
    spans, hub = live_step(tracer)
    hub.emit(cf.StepStarted("r1", 0.0, "flow", "b", "r1:2.1/2"))
    seen: dict[str, str] = {}
    both_inside = trio.Event()
    inside = 0

    async def step(execution_id: str) -> None:
        nonlocal inside
        with spans.step_span(StepRef(execution_id)):
            inside += 1
            if inside == 2:
                both_inside.set()
            await both_inside.wait()
            span = otel_trace.get_current_span()
            assert isinstance(span, ReadableSpan)
            seen[execution_id] = span.name

    async with trio.open_nursery() as nursery:
        nursery.start_soon(step, "r1:1")
        nursery.start_soon(step, "r1:2.1/2")
    assert seen == {"r1:1": "flow/a", "r1:2.1/2": "flow/b"}


async def test_step_span_leaves_errors_and_the_end_to_the_step_events(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    spans, _ = live_step(tracer)
    with pytest.raises(ValueError, match="no"), spans.step_span(StepRef("r1:1")):
        raise ValueError("no")
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN
    assert exporter.get_finished_spans() == ()  # still open: StepFinished ends it
    with trio.CancelScope() as scope, spans.step_span(StepRef("r1:1")):
        scope.cancel()
        await trio.lowlevel.checkpoint()
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN
    spans.end_all()
    [step, run] = exporter.get_finished_spans()
    assert (step.name, step.status.status_code, step.events) == ("flow/a", StatusCode.UNSET, ())
    assert run.name == "flow"


async def test_a_step_without_a_span_changes_nothing(tracer: Tracer) -> None:
    spans, _ = live_step(tracer)
    with spans.step_span(StepRef("r1:7")):
        assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN


async def test_a_span_opened_in_exec_is_a_child_of_the_step_span(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    class CallsAnInstrumentedClient(cf.Node):
        async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
            with tracer.start_as_current_span("http GET"):
                await trio.lowlevel.checkpoint()

    flow = cf.Flow.builder("traced").add_node("call", CallsAnInstrumentedClient()).build()
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        await nursery.start(trace_events, engine, tracer)
        await engine.run(flow, run_id="r1")
    spans = by_name(exporter.get_finished_spans())
    step, client = spans["traced/call"], spans["http GET"]
    assert client.parent is not None and client.parent.span_id == step.context.span_id
    assert client.context.trace_id == step.context.trace_id
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN


async def test_a_run_span_holds_the_step_spans_its_end_cancelled(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    await fed(
        tracer,
        cf.RunStarted("r1", 0.0, "flow"),
        cf.StepStarted("r1", 0.1, "flow", "a", "r1:1"),
        cf.RunCancelled("r1", 0.2, "flow", 0.2),
        cf.StepFinished("r1", 0.3, "flow", "a", "r1:1", 0.2, None, None),
    )
    spans = by_name(exporter.get_finished_spans())
    run, step = spans["flow"], spans["flow/a"]
    assert_times(run, start=0.0, end=0.3)
    assert_times(step, start=0.1, end=0.3, origin=run)
    assert (run.attributes or {})["cosmoflow.cancelled"] is True


async def test_a_batch_flows_child_runs_are_children_of_its_step_span(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    class Twice(cf.BatchFlow):
        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
            return [{}, {}]

    flow = single(Twice(single(Recorder(), "child")), "parent")
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        await nursery.start(trace_events, engine, tracer)
        await engine.run(flow, run_id="p")
    spans = exporter.get_finished_spans()
    [batch_step] = [span for span in spans if span.name == "parent/only"]
    children = [span for span in spans if span.name == "child"]
    assert sorted((span.attributes or {})["cosmoflow.run_id"] for span in children) == [
        "p:1/0",
        "p:1/1",
    ]
    for child in children:
        assert child.parent is not None
        assert child.parent.span_id == batch_step.context.span_id
        assert child.context.trace_id == batch_step.context.trace_id


class CleansUpSlowly(cf.Node):
    """Its first step waits until cancelled, then cleans up for 5 s, shielded; every
    later step takes 10 s."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.steps += 1
        if self.steps > 1:
            await trio.sleep(10)
            return
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(5)


def runs_and_steps(spans: tuple[ReadableSpan, ...]) -> list[tuple[ReadableSpan, ReadableSpan]]:
    """Each step span with its parent run span, in the order the steps ended."""
    by_id = {span.context.span_id: span for span in spans}
    steps = [span for span in spans if "/" in span.name]
    return [(by_id[step.parent.span_id], step) for step in steps if step.parent is not None]


async def test_a_run_id_used_again_while_a_cancelled_step_unwinds_keeps_each_span_to_its_step(
    autojump_clock: trio.testing.MockClock, tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    """The new run's first step has the execution id of the cancelled one still cleaning
    up: each step's span ends when that step ends, as it ended, inside its own run's
    span."""
    flow = single(CleansUpSlowly(), "unwinds")
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        await nursery.start(trace_events, engine, tracer)
        old = await engine.start_run(flow, run_id="r")
        await trio.testing.wait_all_tasks_blocked()
        old.cancel()
        await engine.run(flow, run_id="r")
    [(old_run, old_step), (new_run, new_step)] = runs_and_steps(exporter.get_finished_spans())
    assert (old_step.attributes or {})["cosmoflow.cancelled"] is True
    assert (old_run.attributes or {})["cosmoflow.cancelled"] is True
    assert (new_step.attributes or {})["cosmoflow.action"] == "default"
    assert (new_run.attributes or {})["cosmoflow.final_action"] == "default"
    assert_times(old_run, start=0.0, end=5.0)
    assert_times(old_step, start=0.0, end=5.0, origin=old_run)
    assert_times(new_run, start=0.0, end=10.0, origin=old_run)
    assert_times(new_step, start=0.0, end=10.0, origin=old_run)


async def test_a_step_still_unwinding_when_the_engine_closes_ends_its_span_when_it_ends(
    autojump_clock: trio.testing.MockClock, tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    """The engine closes as its block is cancelled, cancelling the run."""
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as block:
            async with cf.open_engine() as engine:
                await nursery.start(trace_events, engine, tracer)
                await engine.start_run(single(CleansUpSlowly(), "unwinds"), run_id="r")
                await trio.testing.wait_all_tasks_blocked()
                block.cancel()
    assert trio.current_time() == 5.0
    [(run, step)] = runs_and_steps(exporter.get_finished_spans())
    assert (step.attributes or {})["cosmoflow.cancelled"] is True
    assert_times(run, start=0.0, end=5.0)
    assert_times(step, start=0.0, end=5.0, origin=run)


class FailsOn:
    """A tracer that raises when asked for a span named ``name``."""

    def __init__(self, tracer: Tracer, name: str) -> None:
        self.tracer = tracer
        self.name = name

    def start_span(
        self, name: str, context: Any = None, *, attributes: Any = None, start_time: Any = None
    ) -> Any:
        if name == self.name:
            raise RuntimeError("exporter down")
        return self.tracer.start_span(name, context, attributes=attributes, start_time=start_time)


async def test_after_the_close_trace_events_stops_waiting_for_steps_when_its_tracer_fails(
    autojump_clock: trio.testing.MockClock,
    tracer: Tracer,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = FedEngine()
    returned = False

    async def traced() -> None:
        nonlocal returned
        await trace_events(source, FailsOn(tracer, "flow/boom"))
        returned = True

    with trio.fail_after(60):  # virtual time: it fails at once if trace_events hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traced)
            await trio.testing.wait_all_tasks_blocked()
            source.hub.emit(cf.RunStarted("r1", 0.0, "flow"))
            source.hub.emit(cf.StepStarted("r1", 0.0, "flow", "a", "r1:1.0/2"))
            source.closed.set()
            await trio.testing.wait_all_tasks_blocked()
            assert not returned  # step r1:1.0/2 is still in flight
            source.hub.emit(cf.StepStarted("r1", 0.0, "flow", "boom", "r1:1.1/2"))
    assert returned
    assert sorted(span.name for span in exporter.get_finished_spans()) == ["flow", "flow/a"]
    assert "exporter down" in caplog.text


async def test_trace_events_ends_its_spans_and_returns_once_its_tracer_fails(
    autojump_clock: trio.testing.MockClock,
    tracer: Tracer,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The engine still open, the tracer that raised is removed: trace_events ends the
    spans still open then, and returns, instead of waiting for the engine's close."""
    source = FedEngine()
    returned_at: float | None = None

    async def traced() -> None:
        nonlocal returned_at
        await trace_events(source, FailsOn(tracer, "flow/boom"))
        returned_at = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(traced)
        await trio.testing.wait_all_tasks_blocked()
        source.hub.emit(cf.RunStarted("r1", 0.0, "flow"))
        source.hub.emit(cf.StepStarted("r1", 0.0, "flow", "a", "r1:1.0/2"))
        await trio.sleep(2)
        source.hub.emit(cf.StepStarted("r1", 2.0, "flow", "boom", "r1:1.1/2"))
        await trio.testing.wait_all_tasks_blocked()
        assert returned_at == 2.0
        await trio.sleep(10)
        source.closed.set()
    spans = by_name(exporter.get_finished_spans())
    assert sorted(spans) == ["flow", "flow/a"]
    assert_times(spans["flow/a"], start=0.0, end=2.0)
    assert "exporter down" in caplog.text


class EndRaises:
    """A tracer whose spans raise when they end (an exporter that is down)."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def start_span(self, name: str, context: Any = None, **options: Any) -> Any:
        return Unending(self.tracer.start_span(name, context, **options))


class Unending:
    def __init__(self, span: Any) -> None:
        self.span = span

    def __getattr__(self, name: str) -> Any:
        return getattr(self.span, name)

    def end(self, end_time: int | None = None) -> None:
        raise RuntimeError("exporter down")


async def test_spans_whose_end_raises_when_tracing_stops_are_logged_not_raised(
    caplog: pytest.LogCaptureFixture, tracer: Tracer
) -> None:
    source = FedEngine()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trace_events, source, EndRaises(tracer))
        await trio.testing.wait_all_tasks_blocked()
        source.hub.emit(cf.RunStarted("r1", 0.0, "flow"))
        source.hub.emit(cf.StepStarted("r1", 0.0, "flow", "a", "r1:1"))
        nursery.cancel_scope.cancel()
    assert "raised ending its open spans" in caplog.text
    assert "exporter down" in caplog.text


# Under load: many runs of every kind, subscribers of every kind, and the spans.

RUN_ENDS = (cf.RunFinished, cf.RunFailed, cf.RunCancelled)
STEP_PARTS = (cf.StepFinished, cf.Retry, cf.Fallback)
BEHAVIOURS = ("ok", "ok", "ok", "flaky", "fails", "bad", "slow")


class Planned(cf.Node):
    """exec takes 0.1 s, 0.5 s when "slow"; ``plan`` says what each step does, by run
    id and node id: "flaky" fails its first attempt, "fails" every attempt, "bad"
    returns 42 from post."""

    max_retries = 2
    retry_delay = 0.25

    def __init__(self, plan: dict[tuple[str, str], str]) -> None:
        super().__init__()
        self.plan = plan

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        how = self.plan[plan_key(ctx.run_id), ctx.node_id]
        await trio.sleep(0.5 if how == "slow" else 0.1)
        if how == "fails" or (how == "flaky" and ctx.current_retry == 0):
            raise ConnectionError(f"{how} {ctx.execution_id}")

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> Any:
        return 42 if self.plan[plan_key(ctx.run_id), ctx.node_id] == "bad" else None


class TwoChildren(cf.BatchFlow):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        return [{}, {}]


def chain(name: str, *nodes: tuple[str, cf.Node]) -> cf.Flow:
    """A flow through ``nodes`` (id and node) in order."""
    builder = cf.Flow.builder(name)
    for node_id, node in nodes:
        builder.add_node(node_id, node)
    for (first, _), (second, _) in itertools.pairwise(nodes):
        builder.add_route(first, second)
    return builder.build()


def load_flows(plan: dict[tuple[str, str], str]) -> dict[str, tuple[cf.Flow, tuple[str, ...]]]:
    """A plain, a nested and a batch flow, each with the node ids its steps go through."""

    def planned(*ids: str) -> list[tuple[str, cf.Node]]:
        return [(node_id, Planned(plan)) for node_id in ids]

    inner = chain("inner", *planned("x", "y"))
    children = chain("child", *planned("x", "y"))
    a, c = planned("a", "c")
    return {
        "plain": (chain("plain", *planned("a", "b", "c")), ("a", "b", "c")),
        "nested": (chain("nested", a, ("in", inner), c), ("a", "x", "y", "c")),
        "batch": (chain("batch", a, ("kids", TwoChildren(children)), c), ("a", "kids", "c")),
    }


@dataclass
class Subscriber:
    """A reader of an event stream, reading ``pause`` seconds apart; it leaves after
    ``stop_after`` events, if set."""

    lossless: bool
    buffer: int
    pause: float = 0.0
    stop_after: int | None = None
    events: list[cf.Event] = field(default_factory=list)
    ended: bool = False
    """Whether the stream ended by itself (the engine closed)."""


async def subscribe(
    engine: cf.Engine, subscriber: Subscriber, *, task_status: trio.TaskStatus[None]
) -> None:
    async with engine.events(buffer=subscriber.buffer, lossless=subscriber.lossless) as stream:
        task_status.started()
        async for event in stream:
            subscriber.events.append(event)
            await trio.sleep(subscriber.pause)
            if len(subscriber.events) == subscriber.stop_after:
                return
    subscriber.ended = True


async def subscribe_for_a_while(
    engine: cf.Engine, subscriber: Subscriber, after: float, length: float
) -> None:
    """Open a stream ``after`` seconds on, while runs are in flight; read it for
    ``length`` seconds."""
    await trio.sleep(after)
    with trio.move_on_after(length):
        await subscribe(engine, subscriber, task_status=trio.TASK_STATUS_IGNORED)


@dataclass
class Load:
    """What a load scenario did, for the checks."""

    subscribers: list[Subscriber]
    visitor: Subscriber
    paths: dict[str, tuple[str, ...]]
    ended: dict[str, tuple[type[cf.Event], BaseException | None]]
    """How each run whose caller saw its end ended, and its error."""
    statistics: cf.EngineStatistics
    spans: tuple[ReadableSpan, ...]


async def load(seed: int, runs: int, max_runs: int | None) -> Load:
    """Start ``runs`` drawn runs in drawn ways under drawn subscribers; blocks until the
    engine has closed (maybe early, cancelling the runs in flight)."""
    rng = random.Random(seed)
    plan: dict[tuple[str, str], str] = {}
    flows = load_flows(plan)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    subscribers = [
        Subscriber(True, rng.randint(1, 4), rng.choice([0.0, 0.05, 0.3])),
        Subscriber(False, rng.randint(1, 6), rng.choice([0.05, 0.3])),
        Subscriber(rng.random() < 0.5, 3, stop_after=rng.randint(1, 20)),
    ]
    visitor = Subscriber(rng.random() < 0.5, rng.randint(1, 5))
    paths: dict[str, tuple[str, ...]] = {}
    ended: dict[str, tuple[type[cf.Event], BaseException | None]] = {}
    async with trio.open_nursery() as outer:
        with trio.CancelScope() as engine_scope:
            async with cf.open_engine(max_runs=max_runs) as engine:
                await outer.start(trace_events, engine, provider.get_tracer("load"))
                for subscriber in subscribers:
                    await outer.start(subscribe, engine, subscriber)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        subscribe_for_a_while, engine, visitor, rng.random(), 2 * rng.random()
                    )
                    if rng.random() < 0.3:
                        engine_scope.deadline = trio.current_time() + 3 * rng.random()
                    for index in range(runs):
                        name = rng.choice(list(flows))
                        flow, paths[f"r{index}"] = flows[name]
                        plan_run(plan, rng, f"r{index}")
                        how = rng.choice(["wait", "cancel", "run", "give up"])
                        nursery.start_soon(start, engine, flow, f"r{index}", how, rng, ended)
                        await trio.sleep(rng.choice([0, 0, 0.1]))
    spans = exporter.get_finished_spans()
    return Load(subscribers, visitor, paths, ended, engine.statistics(), spans)


def plan_key(run_id: str) -> str:
    """The name the plan gives run ``run_id``: the id of a run the test started, or
    ``<run id>/<index>`` for a child of its BatchFlow (``<run id>:<step>/<index>``)."""
    parent, _, child = run_id.partition(":")
    return f"{parent}/{child.rpartition('/')[2]}" if child else parent


def plan_run(plan: dict[tuple[str, str], str], rng: random.Random, run_id: str) -> None:
    """Draw what each step of run ``run_id`` and of its child runs does."""
    for node_id in ("a", "b", "c", "x", "y"):
        for one in (run_id, f"{run_id}/0", f"{run_id}/1"):
            plan[one, node_id] = rng.choice(BEHAVIOURS)


async def start(
    engine: cf.Engine,
    flow: cf.Flow,
    run_id: str,
    how: str,
    rng: random.Random,
    ended: dict[str, tuple[type[cf.Event], BaseException | None]],
) -> None:
    """Start a run and wait for it, cancel it after a while, or give up on it."""
    patience = rng.random()
    if how in ("run", "give up"):
        with trio.move_on_after(patience if how == "give up" else 100):
            try:
                await engine.run(flow, run_id=run_id)
            except cf.RunCancelledError:
                ended[run_id] = (cf.RunCancelled, None)
            except Exception as exc:
                ended[run_id] = (cf.RunFailed, exc)
            else:
                ended[run_id] = (cf.RunFinished, None)
        return
    run = await engine.start_run(flow, run_id=run_id)
    if how == "cancel":
        await trio.sleep(patience)
        run.cancel()
    with contextlib.suppress(Exception):
        await run.wait()
    ends = {"succeeded": cf.RunFinished, "failed": cf.RunFailed, "cancelled": cf.RunCancelled}
    error = None if isinstance(run.error, cf.RunCancelledError) else run.error
    ended[run_id] = (ends[run.current_state.value], error)


def check_load(scenario: Load) -> None:
    reference = scenario.subscribers[0]
    assert reference.ended
    events = reference.events
    for run_id, of_run in events_by_run(events).items():
        check_run(run_id, of_run, scenario)
    check_statistics(events, scenario.statistics)
    for subscriber in scenario.subscribers[1:]:
        check_subscriber(subscriber, events)
    check_visitor(scenario.visitor, events)
    check_spans(events, scenario.spans)


def events_by_run(events: list[cf.Event]) -> dict[str, list[cf.Event]]:
    by_run: dict[str, list[cf.Event]] = {}
    for event in events:
        by_run.setdefault(event.run_id, []).append(event)
    return by_run


def check_run(run_id: str, events: list[cf.Event], scenario: Load) -> None:
    """Started first, ended last and once as its caller saw it end, every step
    started ended, steps in the flow's order."""
    assert isinstance(events[0], cf.RunStarted), events
    end = events[-1]
    assert isinstance(end, RUN_ENDS) and sum(isinstance(e, RUN_ENDS) for e in events) == 1
    check_steps_paired(Subscriber(True, 1, events=events), complete=True)
    kind, error = scenario.ended.get(run_id, (type(end), None))
    assert type(end) is kind, (run_id, end, kind)
    if isinstance(end, cf.RunFailed) and error is not None:
        assert end.error is error
    parent, _, child = run_id.partition(":")
    path = ("x", "y") if child else scenario.paths[parent]
    started = tuple(e.node_id for e in events if isinstance(e, cf.StepStarted))
    assert started == path[: len(started)], (run_id, started)
    if isinstance(end, cf.RunFinished):
        assert started == path and end.steps == len(path)


def check_steps_paired(subscriber: Subscriber, *, complete: bool = False) -> None:
    """A stream gives a step's end, retries and fallback only after its start, also
    after it dropped events; and, ``complete`` and lossless, the end of every step
    started."""
    running: set[str] = set()
    for event in subscriber.events:
        if isinstance(event, cf.StepStarted):
            running.add(event.execution_id)
        elif isinstance(event, STEP_PARTS):
            assert event.execution_id in running, event
            if isinstance(event, cf.StepFinished):
                running.remove(event.execution_id)
    assert not (complete and subscriber.lossless) or running == set()


def check_statistics(events: list[cf.Event], statistics: cf.EngineStatistics) -> None:
    counts = [sum(isinstance(e, kind) for e in events) for kind in (cf.RunStarted, *RUN_ENDS)]
    assert counts == [
        statistics.runs_started,
        statistics.runs_succeeded,
        statistics.runs_failed,
        statistics.runs_cancelled,
    ]


def check_subscriber(subscriber: Subscriber, reference: list[cf.Event]) -> None:
    """What a subscriber read is a part of what the reference read, in order; a
    lossless one lost nothing, a dropping one counted what it lost; each step's
    events follow its start."""
    read = [e for e in subscriber.events if not isinstance(e, cf.EventsDropped)]
    dropped = sum(e.count for e in subscriber.events if isinstance(e, cf.EventsDropped))
    remaining = iter(reference)
    assert all(any(event is other for other in remaining) for event in read)
    if subscriber.lossless:
        assert dropped == 0
    if subscriber.ended:
        assert len(read) + dropped == len(reference)
    if subscriber.lossless and subscriber.stop_after is not None:
        assert read == reference[: len(read)]
    check_steps_paired(subscriber)


def check_visitor(visitor: Subscriber, reference: list[cf.Event]) -> None:
    """A stream opened and closed while runs were in flight: each run's events in it
    are a part of that run's in the reference, in order (the run's end comes at once
    when the stream saw none of its steps in flight start), and each step's events
    follow its start."""
    read = events_by_run([e for e in visitor.events if not isinstance(e, cf.EventsDropped)])
    everything = events_by_run(reference)
    for run_id, events in read.items():
        remaining = iter(everything[run_id])
        assert all(any(event is other for other in remaining) for event in events)
    check_steps_paired(visitor)


def check_spans(events: list[cf.Event], spans: tuple[ReadableSpan, ...]) -> None:
    """A span for every run and step, ended; a step's span inside its run's; a batch's
    child runs inside its step's span; errors on the spans of what failed."""
    runs = {attribute(s, "cosmoflow.run_id"): s for s in spans if "/" not in s.name}
    steps = {attribute(s, "cosmoflow.execution_id"): s for s in spans if "/" in s.name}
    assert sorted(runs) == sorted(e.run_id for e in events if isinstance(e, cf.RunStarted))
    assert len(steps) == sum(isinstance(e, cf.StepStarted) for e in events)
    for event in events:
        if isinstance(event, cf.StepFinished):
            check_step_span(steps[event.execution_id], runs[event.run_id], event.error)
        elif isinstance(event, RUN_ENDS):
            check_run_span(event, runs[event.run_id], steps)


def attribute(span: ReadableSpan, name: str) -> Any:
    return (span.attributes or {})[name]


def check_step_span(step: ReadableSpan, run: ReadableSpan, error: BaseException | None) -> None:
    assert step.parent is not None and step.parent.span_id == run.context.span_id
    assert run.start_time is not None and run.end_time is not None
    assert step.start_time is not None and step.end_time is not None
    assert run.start_time <= step.start_time <= step.end_time <= run.end_time
    assert (step.status.status_code is StatusCode.ERROR) == (error is not None)


def check_run_span(event: cf.Event, run: ReadableSpan, steps: dict[str, ReadableSpan]) -> None:
    parent, _, child = event.run_id.partition(":")
    if child:
        batch = [s for s in steps.values() if s.name == "batch/kids"]
        [step] = [s for s in batch if attribute(s, "cosmoflow.run_id") == parent]
        assert run.parent is not None and run.parent.span_id == step.context.span_id
    else:
        assert run.parent is None
    failed = isinstance(event, cf.RunFailed)
    assert (run.status.status_code is StatusCode.ERROR) == failed
    assert ("exception" in [e.name for e in run.events]) == failed
    if isinstance(event, cf.RunCancelled):
        assert attribute(run, "cosmoflow.cancelled") is True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    runs=st.integers(1, 12),
    max_runs=st.none() | st.integers(1, 3),
)
def test_under_load_every_subscriber_and_span_keeps_its_promises(
    seed: int, runs: int, max_runs: int | None
) -> None:
    """Plain, nested and batch runs that succeed, retry, fail, return a bad action,
    are cancelled or given up, under max_runs, an engine that may close early, and
    subscribers lossless, dropping, leaving early or coming and going: every run's
    events are well formed and end as the run did, every subscriber gets its share of
    them, the spans nest and end, and the statistics count the same runs."""
    scenario = trio.run(
        load, seed, runs, max_runs, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    check_load(scenario)
