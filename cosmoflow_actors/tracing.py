"""Run events for people and for tracing systems.

:func:`format_event` turns an event from ``engine.events()`` into one readable line (the
``cosmoflow run --trace`` output). :func:`trace_events` turns the events of an engine
into OpenTelemetry spans: a run is a trace (its root span) and each step a child span.
OpenTelemetry is optional (``pip install 'cosmoflow-actors[otel]'``) and imported only
when :func:`trace_events` starts (or a :class:`LiveSpans` is made), so this module
imports without it.

:func:`trace_events` follows the engine with a :class:`LiveSpans`, which builds the spans
at the moment each event is emitted (as a listener of the engine's event hub, called
inside ``emit`` in the emitting task) and makes a step's span the current OpenTelemetry
span while the step's prep, exec and post run: see :meth:`LiveSpans.step_span`. A run's
span is a child of the span current where the run was started, if any (so a BatchFlow's
child runs are children of its step's span), and ends after its steps' spans, also
those of the steps that the run's end cancelled.

Events carry trio times; spans need wall-clock times in nanoseconds since the epoch.
:func:`trace_events` reads both clocks once when it starts, ``offset = time.time_ns() -
trio.current_time() * 1e9``, and stamps every span and span event with ``offset +
event.time * 1e9``. Durations in spans are therefore exactly the trio durations (also
under a test's ``MockClock``); wall-clock adjustments after the start are not followed.
"""

from __future__ import annotations

import contextlib
import importlib
import time
import traceback
import unicodedata
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final, Protocol, final

import trio

from cosmoflow_actors.errors import error_text, told_causes, type_and_message
from cosmoflow_actors.events import (
    LOGGER,
    Event,
    EventsDropped,
    Fallback,
    Retry,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunStarted,
    StepFinished,
    StepsInFlight,
    StepSpans,
    StepStarted,
)
from cosmoflow_actors.runtime.cancellation import cancelled_when

OTEL_MISSING: Final = (
    "tracing needs OpenTelemetry, which is not installed: pip install 'cosmoflow-actors[otel]'"
)


class EventSource(Protocol):
    """What :func:`trace_events` reads events from: an :class:`~cosmoflow_actors.Engine`."""

    def trace(self, spans: StepSpans) -> Callable[[], None]: ...

    async def wait_closed(self) -> None: ...


class SpanLike(Protocol):
    """The part of an OpenTelemetry ``Span`` that :func:`trace_events` uses."""

    def set_attribute(self, key: str, value: Any) -> None: ...

    def add_event(
        self, name: str, attributes: Any = None, timestamp: int | None = None
    ) -> None: ...

    def record_exception(
        self, exception: BaseException, attributes: Any = None, timestamp: int | None = None
    ) -> None: ...

    def set_status(self, status: Any, description: str | None = None) -> None: ...

    def end(self, end_time: int | None = None) -> None: ...


class StepLike(Protocol):
    """What :meth:`LiveSpans.step_span` needs of a step: an
    :class:`~cosmoflow_actors.ExecutionContext`."""

    @property
    def execution_id(self) -> str: ...


class TracerLike(Protocol):
    """The part of an OpenTelemetry ``Tracer`` that :func:`trace_events` uses."""

    def start_span(
        self, name: str, context: Any = None, *, attributes: Any = None, start_time: Any = None
    ) -> SpanLike: ...


def format_event(event: Event, origin: float = 0.0) -> str:
    """One line for ``event``: its time since ``origin`` (trio time), its run id, what
    happened and the details.

    The run id is never cut, since the runs of one engine share their first twelve
    characters and a run id a user gives may be any length; one shorter than 8 characters
    is padded to 8 (``-`` stands for the empty run id of ``EventsDropped``).
    """
    run = event.run_id or "-"
    what, details = _describe(event)
    return one_line(f"{event.time - origin:+9.3f}s  {run:8}  {what:14}  {details}")


def one_line(text: str) -> str:
    """``text`` with its control characters (a newline, a terminal's escape) written
    as Python escapes, so that what a run chose to name things cannot break the line or
    drive the terminal."""
    return "".join(
        repr(char)[1:-1] if unicodedata.category(char) in _LINE_BREAKING else char for char in text
    )


_LINE_BREAKING: Final = frozenset({"Cc", "Zl", "Zp"})
"""The Unicode categories :func:`one_line` escapes: control characters and the line
and paragraph separators."""


def _describe(event: Event) -> tuple[str, str]:
    match event:
        case RunStarted():
            return "run started", f"flow {event.flow_name!r}"
        case StepStarted():
            return "step started", event.node_id
        case StepFinished():
            return _step_end(event)
        case Retry():
            failed = f"{event.node_id} attempt {event.attempt} failed"
            return "retry", f"{failed}: {describe_error(event.error)}; next in {event.delay:g}s"
        case Fallback():
            attempts = f"{event.attempts} attempt" + ("" if event.attempts == 1 else "s")
            failed = f"{event.node_id} after {attempts}"
            return "fallback", f"{failed}: {describe_error(event.error)}"
        case RunFinished():
            steps = f"{event.steps} step" + ("" if event.steps == 1 else "s")
            return "run finished", f"{event.final_action} after {steps} ({_ms(event.duration)})"
        case RunFailed():
            return "run failed", f"{describe_error(event.error)} ({_ms(event.duration)})"
        case RunCancelled():
            return "run cancelled", f"({_ms(event.duration)})"
        case EventsDropped():
            return "events dropped", f"{event.count} (the consumer fell behind)"
    return type(event).__name__, repr(event)


def _step_end(event: StepFinished) -> tuple[str, str]:
    took = f"{event.node_id} ({_ms(event.duration)})"
    if event.action is not None:
        return "step finished", f"{event.node_id} -> {event.action} ({_ms(event.duration)})"
    if event.error is not None:
        return "step failed", f"{took}: {describe_error(event.error)}"
    return "step cancelled", took


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def describe_error(error: BaseException) -> str:
    """``Type: message``, followed by its cause (and the cause's) the same way, each
    cause once and none whose message the error before it already quotes (see
    :func:`~cosmoflow_actors.errors.told_causes`); see
    :func:`~cosmoflow_actors.errors.type_and_message` for an error without a message or
    whose ``__str__`` raises."""
    *chain, last = [type_and_message(each) for each in told_causes(error)]
    text = last
    for outer in reversed(chain):
        text = f"{outer} (caused by {text})"
    return text


async def trace_events(
    engine: EventSource,
    tracer: TracerLike | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Turn the engine's events into OpenTelemetry spans until the engine closes; each
    step's span is the current span in the step's own code.

    ``tracer`` defaults to ``opentelemetry.trace.get_tracer("cosmoflow_actors")``. Start
    it with ``await nursery.start(trace_events, engine)`` in a nursery *around* the
    ``open_engine`` block: it is ready (its event stream open) when ``start`` returns.
    It returns once the engine has closed and the steps it saw start have ended (the
    close cancels them; each step's span, and its run's, ends when the step does), as
    an event stream ends. Cancelled, or once its tracer raised and the engine removed
    it, it ends the spans still open at once. Raises ImportError naming the ``otel``
    extra when OpenTelemetry is not installed.
    """
    spans = LiveSpans(tracer)
    stop = engine.trace(spans)
    try:
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancelled_when, spans.wait_detached, nursery.cancel_scope)
            await engine.wait_closed()
            await spans.wait_steps_ended()
            nursery.cancel_scope.cancel()
    finally:
        stop()
        spans.end_all()


class LiveSpans:
    """The spans of :func:`trace_events`, made while the engine works, with each step's
    span current in the step's own code.

    The engine's event hub takes it with ``hub.trace(spans)``: :meth:`handle` then runs
    inside ``emit``, in the emitting task, so a step's span exists from the moment its
    StepStarted is emitted, before prep; and the node actor runs the step inside
    :meth:`step_span`. Spans are named, parented, timed and ended exactly as
    :func:`trace_events` does it, and no event is ever lost to a buffer.

    Make it inside trio (it reads the trio clock once, as :func:`trace_events` does).
    Raises ImportError naming the ``otel`` extra when OpenTelemetry is not installed.
    """

    def __init__(self, tracer: TracerLike | None = None) -> None:
        otel = _opentelemetry()
        self._otel = otel
        self._spans = _Spans(otel, tracer or otel.get_tracer("cosmoflow_actors"))
        self._detached = trio.Event()
        """Set once no more events come (see :meth:`detached`)."""
        self._steps_ended: trio.Event | None = None
        """Set, while :meth:`wait_steps_ended` waits, when it may return."""

    def handle(self, event: Event) -> None:
        """Start, annotate or end the spans ``event`` concerns. Never blocks."""
        self._spans.handle(event)
        if self._steps_ended is not None and not self._spans.steps_in_flight:
            self._wake()

    def detached(self) -> None:
        """No more events come (the hub stopped following with these spans): a wait
        for the steps to end returns. Never blocks."""
        self._detached.set()
        self._wake()

    async def wait_detached(self) -> None:
        """Block until the hub no longer follows with these spans (see
        :meth:`detached`)."""
        await self._detached.wait()

    async def wait_steps_ended(self) -> None:
        """Block until no step these spans saw start is in flight, or they no longer
        follow the engine (see :meth:`detached`). A checkpoint."""
        if self._detached.is_set() or not self._spans.steps_in_flight:
            await trio.lowlevel.checkpoint()
            return
        if self._steps_ended is None:
            self._steps_ended = trio.Event()
        await self._steps_ended.wait()

    def _wake(self) -> None:
        if self._steps_ended is not None:
            self._steps_ended.set()
            self._steps_ended = None

    def step_span(self, step: StepLike) -> contextlib.AbstractContextManager[object]:
        """A context manager that makes the span of ``step`` the current OpenTelemetry
        span (``opentelemetry.context``, a contextvar) until the block ends. Never
        blocks.

        Code run in the block's task sees it as ``trace.get_current_span()``, and so do
        the tasks it spawns and ``trio.to_thread`` threads (both copy the task's
        context); a worker process does not. Spans that code starts are children of the
        step's span. Leaving the block restores the context as it was, and neither ends
        the span nor records an error: the step's StepFinished does both. A step with no
        span (it started before these spans did) changes nothing. Call it in the task
        that emitted the step's StepStarted (see
        :class:`~cosmoflow_actors.events.StepsInFlight`).
        """
        span = self._spans.step(step.execution_id)
        if span is None:
            return contextlib.nullcontext()
        use_span: contextlib.AbstractContextManager[object] = self._otel.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        )
        return use_span

    def end_all(self) -> None:
        """End every span still open, now (the engine is closing). Call it in the
        engine's trio run."""
        self._spans.end_all()


def _opentelemetry() -> ModuleType:
    """The ``opentelemetry.trace`` module, or ImportError naming the extra."""
    try:
        return importlib.import_module("opentelemetry.trace")
    except ImportError as exc:
        raise ImportError(OTEL_MISSING) from exc


@final
class _RunSpan:
    """A run's span, and its steps in flight: a run that ended while some were (its end
    cancelled them) ends with the last of them."""

    __slots__ = ("ended", "span", "steps")

    def __init__(self, span: SpanLike) -> None:
        self.span = span
        self.steps = 0
        self.ended = False


class _Spans:
    """The spans of the runs and steps in progress, built from events."""

    def __init__(self, otel: ModuleType, tracer: TracerLike) -> None:
        self._otel = otel
        self._tracer = tracer
        self._offset = time.time_ns() - round(trio.current_time() * 1e9)
        self._runs: dict[str, _RunSpan] = {}
        """The runs in flight by id."""
        self._steps = StepsInFlight[tuple[SpanLike, _RunSpan]]()
        """The open span of each step and its run's (see StepsInFlight for two steps
        of one execution id)."""

    @property
    def steps_in_flight(self) -> bool:
        """Whether a step span is open."""
        return bool(self._steps)

    def handle(self, event: Event) -> None:
        """Start, annotate or end the spans ``event`` concerns."""
        match event:
            case RunStarted():
                self._start_run(event)
            case StepStarted():
                self._start_step(event)
            case StepFinished():
                self._end_step(event)
            case Retry() | Fallback():
                self._step_event(event)
            case RunFinished() | RunFailed() | RunCancelled():
                self._end_run(event)

    def step(self, execution_id: str) -> SpanLike | None:
        """The open span of step ``execution_id`` running in the current task, if it
        has one."""
        step = self._steps.get(execution_id)
        return None if step is None else step[0]

    def end_all(self) -> None:
        """End every span still open (the stream ended), now, in trio time as every
        other span end: the steps', then the runs'. A span whose ``end`` raises is
        logged to the events' LOGGER, and the spans after it are left open: the tracer
        is broken, and the application goes on."""
        try:
            self._end_open_spans(self._ns(trio.current_time()))
        except Exception:
            LOGGER.exception("%r raised ending its open spans; the others are left open", self)
        finally:
            self._steps.clear()
            self._runs.clear()

    def _end_open_spans(self, now: int) -> None:
        ended_runs: dict[_RunSpan, None] = {}
        for span, run in self._steps.values():
            span.end(now)
            if run.ended:
                ended_runs[run] = None
        for run in [*ended_runs, *self._runs.values()]:
            run.span.end(now)

    def _ns(self, trio_time: float) -> int:
        return self._offset + round(trio_time * 1e9)

    def _start_run(self, event: RunStarted) -> None:
        """Start the run's span, a child of the span current in the task that emits
        ``event`` (the one that starts the run), if any."""
        attributes = {"cosmoflow.run_id": event.run_id, "cosmoflow.flow": event.flow_name}
        span = self._tracer.start_span(
            event.flow_name, attributes=attributes, start_time=self._ns(event.time)
        )
        self._runs[event.run_id] = _RunSpan(span)

    def _start_step(self, event: StepStarted) -> None:
        run = self._runs.get(event.run_id)
        if run is None:
            return
        attributes = {
            "cosmoflow.run_id": event.run_id,
            "cosmoflow.flow": event.flow_name,
            "cosmoflow.node_id": event.node_id,
            "cosmoflow.execution_id": event.execution_id,
        }
        span = self._tracer.start_span(
            f"{event.flow_name}/{event.node_id}",
            self._otel.set_span_in_context(run.span),
            attributes=attributes,
            start_time=self._ns(event.time),
        )
        run.steps += 1
        self._steps.add(event.execution_id, (span, run))

    def _end_step(self, event: StepFinished) -> None:
        """End the step's span; and its run's, if the run has ended and this was the
        last of its steps in flight."""
        step = self._steps.pop(event.execution_id)
        if step is None:
            return
        span, run = step
        try:
            if event.action is not None:
                span.set_attribute("cosmoflow.action", event.action)
            elif event.error is not None:
                self._fail(span, event.error, event.time)
            else:
                span.set_attribute("cosmoflow.cancelled", True)
        finally:
            span.end(self._ns(event.time))
            run.steps -= 1
            if run.ended and not run.steps:
                run.span.end(self._ns(event.time))

    def _step_event(self, event: Retry | Fallback) -> None:
        step = self._steps.get(event.execution_id)
        if step is None:
            return
        attributes: dict[str, str | int | float] = {
            "exception.type": _qualified_name(type(event.error)),
            "exception.message": error_text(event.error),
        }
        if isinstance(event, Retry):
            attributes |= {"cosmoflow.attempt": event.attempt, "cosmoflow.delay": event.delay}
            step[0].add_event("retry", attributes, self._ns(event.time))
        else:
            attributes["cosmoflow.attempts"] = event.attempts
            step[0].add_event("fallback", attributes, self._ns(event.time))

    def _end_run(self, event: RunFinished | RunFailed | RunCancelled) -> None:
        run = self._runs.pop(event.run_id, None)
        if run is None:
            return
        span = run.span
        if isinstance(event, RunFinished):
            span.set_attribute("cosmoflow.steps", event.steps)
            span.set_attribute("cosmoflow.final_action", event.final_action)
        elif isinstance(event, RunFailed):
            self._fail(span, event.error, event.time)
        else:
            span.set_attribute("cosmoflow.cancelled", True)
        if run.steps:
            run.ended = True
        else:
            span.end(self._ns(event.time))

    def _fail(self, span: SpanLike, error: BaseException, at: float) -> None:
        _record_exception(span, error, self._ns(at))
        span.set_status(self._otel.Status(self._otel.StatusCode.ERROR, describe_error(error)))


def _record_exception(span: SpanLike, error: BaseException, at: int) -> None:
    """Record ``error`` on ``span`` as OpenTelemetry's ``record_exception`` does; for an
    error whose ``__str__`` raises (which ``record_exception`` calls), the same event
    with ``<unprintable>`` as its message: the user's exception must not end the
    tracing of the engine."""
    try:
        span.record_exception(error, timestamp=at)
    except Exception:
        attributes = {
            "exception.type": _qualified_name(type(error)),
            "exception.message": error_text(error),
            "exception.stacktrace": "".join(traceback.format_exception(error)),
        }
        span.add_event("exception", attributes, at)


def _qualified_name(kind: type) -> str:
    """An exception type's name as OpenTelemetry's ``exception.type`` has it."""
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
