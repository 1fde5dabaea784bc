"""Events as readable lines, and as OpenTelemetry spans (the SDK's in-memory exporter)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.events import EventHub, StepSpans
from cosmoflow_actors.tracing import LiveSpans, describe_error, format_event, trace_events
from tests.support import FlakyOnce, Gate, Recorder, single

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
    assert format_event(cf.RunStarted("0123456789abcdef", 12.25, "ev"), origin=10.0) == (
        "   +2.250s  01234567  run started     flow 'ev'"
    )
    assert format_event(cf.EventsDropped("", 12.0, 7), origin=10.0)[12:22] == "-         "


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
