"""Run events: what the engine reports as runs and steps happen.

``engine.events()`` gives an :class:`EventStream`; every event is a frozen dataclass
with the run id and the trio time it happened. Emitting never waits. A stream is one of
two kinds:

- *dropping* (the default): it never slows the engine. Events go into a buffer of
  ``buffer`` events; a consumer that falls behind loses the events that do not fit and
  then receives one :class:`EventsDropped` saying how many.
- *lossless*: it never drops. Every event is kept; while the stream holds ``buffer``
  events or more the hub is :attr:`~EventHub.congested`, and the engine waits in
  :meth:`EventHub.wait_for_room` before it starts more work. The stream can exceed
  ``buffer`` by the events of the work already under way when it filled.

Listeners (:meth:`EventHub.listen`) are called inside ``emit`` itself, in the emitting
task, for consumers that must see each event as it happens (tracing). A listener that
raises is removed and its error logged, as trio does with an instrument that raises:
observing the engine never fails a run or the engine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, Generic, Protocol, TypeVar, final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from contextlib import AbstractContextManager

    from cosmoflow_actors.context import ExecutionContext

DEFAULT_BUFFER: Final = 10_000

LOGGER: Final = logging.getLogger("cosmoflow_actors.events")
"""Where a listener or tracer that raised is reported, with its traceback."""

_NO_SPAN: Final = contextlib.nullcontext()

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to run ``run_id`` at trio time ``time``."""

    run_id: str
    time: float


@dataclass(frozen=True, slots=True)
class RunStarted(Event):
    """A run of the flow ``flow_name`` was started or resumed (a BatchFlow's child
    runs too); its end follows, with no step when the run's record refuses the start
    or answers it with the recorded result."""

    flow_name: str


@dataclass(frozen=True, slots=True)
class RunFinished(Event):
    """The run succeeded; ``final_action`` is the name of its last action."""

    flow_name: str
    duration: float
    steps: int
    final_action: str


@dataclass(frozen=True, slots=True)
class RunFailed(Event):
    """The run failed ``duration`` seconds after it started; ``error`` is what its
    :meth:`Run.wait` raises (a NodeError, with the node's own exception as its
    ``__cause__``, for a step that failed)."""

    flow_name: str
    duration: float
    error: BaseException


@dataclass(frozen=True, slots=True)
class RunCancelled(Event):
    """The run was cancelled ``duration`` seconds after it started."""

    flow_name: str
    duration: float


@dataclass(frozen=True, slots=True)
class StepStarted(Event):
    """A node actor began step ``execution_id`` (unique within the run) of the node
    ``node_id`` of the flow ``flow_name`` (a nested flow's own name and id for a node
    of a nested flow); its StepFinished follows."""

    flow_name: str
    node_id: str
    execution_id: str


@dataclass(frozen=True, slots=True)
class StepFinished(Event):
    """A step ended: ``action`` is the name it returned, or None if it failed
    (``error``) or was cancelled (both None)."""

    flow_name: str
    node_id: str
    execution_id: str
    duration: float
    action: str | None
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class Retry(Event):
    """An exec attempt of step ``execution_id`` failed with ``error``; attempt
    ``attempt + 1`` follows ``delay``s on: the wait as drawn with the node's
    ``retry_jitter``, or the error's ``retry_after`` when that is longer."""

    node_id: str
    execution_id: str
    attempt: int
    error: Exception
    delay: float


@dataclass(frozen=True, slots=True)
class Fallback(Event):
    """Exec of step ``execution_id`` failed ``attempts`` times; ``exec_fallback`` runs
    with the last ``error``."""

    node_id: str
    execution_id: str
    attempts: int
    error: Exception


@dataclass(frozen=True, slots=True)
class EventsDropped(Event):
    """This stream lost ``count`` events because its consumer fell behind.

    ``run_id`` is empty: the lost events may concern any runs.
    """

    count: int


class StepSpans(Protocol):
    """Tracing that makes a span current while each step runs
    (:class:`cosmoflow_actors.tracing.LiveSpans`)."""

    def handle(self, event: Event) -> None:
        """Called with every event, inside ``emit``."""

    def step_span(self, step: ExecutionContext) -> AbstractContextManager[object]:
        """What the node actor runs the step ``step`` inside. Never blocks."""

    def detached(self) -> None:
        """Called once when the hub stops following the engine with it (the function
        :meth:`EventHub.trace` returned was called, or it raised): no more events come.
        Never blocks."""


@final
class EventHub:
    """The engine's side: hands each event to every open stream and listener.

    ``emit`` never blocks. With a lossless stream open the engine slows down instead of
    dropping: it checks :attr:`congested` before it starts more work and, when it is
    true, awaits :meth:`wait_for_room`.
    """

    __slots__ = ("_closed", "_room", "_sinks", "_streams", "step_spans")

    def __init__(self) -> None:
        self._closed = False
        self._streams: list[_StreamSink] = []
        """The sinks of the open streams, which hold them weakly: a stream its reader
        let go of without closing it is forgotten once it is garbage (see :meth:`open`)."""
        self._sinks: tuple[Callable[[Event], None], ...] = ()
        """What ``emit`` calls: each stream's sink and each listener (replaced, never
        changed in place, so that ``emit`` may remove a sink while it iterates)."""
        self._room = _Room()
        self.step_spans: StepSpans | None = None
        """While :meth:`trace` has set it: what node actors run each step inside."""

    @property
    def active(self) -> bool:
        """Whether anyone listens (emitters skip building events otherwise)."""
        return bool(self._sinks)

    @property
    def congested(self) -> bool:
        """Whether a lossless stream holds its buffer or more. Never blocks."""
        return bool(self._room.full)

    def emit(self, event: Event) -> None:
        """Offer ``event`` to every stream and call every listener. Never blocks.

        A listener that raises is removed (see :meth:`listen`); the others still get
        ``event``.
        """
        for sink in self._sinks:
            try:
                sink(event)
            except BaseException as error:
                if not listeners_own(error):
                    raise
                self._listener_failed(sink, f"on {type(event).__name__} of run {event.run_id!r}")

    def open(self, buffer: int, *, lossless: bool = False) -> EventStream:
        """A new stream that receives every event from now on; see :class:`EventStream`
        for ``buffer`` and ``lossless``. Once the hub is closed, the stream ends at once.
        Call it in trio.

        The hub holds the stream weakly: one that becomes garbage unclosed (its reader
        left ``async for`` without closing it) is forgotten in the next scheduler pass,
        with its buffer, and no longer holds the engine back.
        """
        stream = EventStream(buffer, self._remove, room=self._room if lossless else None)
        sink = _StreamSink(stream)
        forget = weakref.finalize(
            stream, _forget_soon, trio.lowlevel.current_trio_token(), self._forget, sink
        )
        forget.atexit = False  # at interpreter exit there is no hub left to tell
        sink.forget = forget
        self._streams.append(sink)
        self._sinks += (sink,)
        if self._closed:
            stream.close()
        return stream

    def listen(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for every event from now on; return the function
        that stops it.

        The listener runs inside :meth:`emit`, in the emitting task (a node actor's
        worker, the engine), at the moment the event happens. It must not block and
        should be quick: the engine waits for it. If it raises an Exception, it is
        removed and the error is logged to :data:`LOGGER` with its traceback; the
        event's other listeners and streams, the run and the engine go on.
        """
        self._sinks += (listener,)
        return functools.partial(self._unlisten, listener)

    def _unlisten(self, listener: Callable[[Event], None]) -> None:
        """Stop calling ``listener`` (once, if it was added twice); nothing if it was
        removed already."""
        sinks = list(self._sinks)
        with contextlib.suppress(ValueError):
            sinks.remove(listener)
        self._sinks = tuple(sinks)

    def trace(self, spans: StepSpans) -> Callable[[], None]:
        """Give every event to ``spans.handle`` (a listener) and make ``spans`` the
        :attr:`step_spans` node actors run their steps inside; return the function
        that undoes both. Raises RuntimeError if the hub is traced already.

        A tracer whose ``handle`` or ``step_span`` raises is removed as a listener that
        raises is (see :meth:`listen`): steps then run outside any span. Either way,
        ``spans.detached()`` is called once when it is undone.
        """
        if self.step_spans is not None:
            raise RuntimeError("the engine's steps are traced already (one tracer at a time)")
        self.listen(spans.handle)
        self.step_spans = spans
        return functools.partial(self._untrace, spans)

    def _untrace(self, spans: StepSpans) -> None:
        """Stop following with ``spans`` and tell it so; nothing if it does not follow
        any more. Its ``detached`` raising is logged: it fails nothing."""
        if self.step_spans is not spans:
            return
        self._unlisten(spans.handle)
        self.step_spans = None
        try:
            spans.detached()
        except BaseException as error:
            if not listeners_own(error):
                raise
            LOGGER.exception("%r raised when it was detached", spans)

    def step_span(self, step: ExecutionContext) -> AbstractContextManager[object]:
        """What ``step`` runs inside: its span made current by the tracer, if one
        follows the engine, else a context that does nothing. Never blocks."""
        spans = self.step_spans
        if spans is None:
            return _NO_SPAN
        try:
            span = spans.step_span(step)
        except BaseException as error:
            if not listeners_own(error):
                raise
            self._listener_failed(spans.handle, f"making the span of step {step.execution_id}")
            return _NO_SPAN
        return _GuardedSpan(self, spans.handle, span)

    def _listener_failed(self, listener: Callable[[Event], None], doing: str) -> None:
        """Remove ``listener``, which raised the exception being handled while
        ``doing``, and log it; a tracer's whole tracing goes with its ``handle``."""
        LOGGER.exception("%r raised %s; it is removed and sees no more events", listener, doing)
        spans = self.step_spans
        if spans is not None and spans.handle == listener:
            self._untrace(spans)
        else:
            self._unlisten(listener)

    async def wait_for_room(self) -> None:
        """Block until no lossless stream holds its buffer or more. A checkpoint.

        Returns at once when none does. Otherwise it returns when the last full stream
        is read below its buffer or closes; every task waiting then goes on together.
        """
        await self._room.wait()

    def close(self) -> None:
        """The engine is closing: end every stream once the steps in flight it saw
        start have finished (see :meth:`EventStream.end`), and those opened later at
        once; waiters for room go on."""
        self._closed = True
        for sink in list(self._streams):
            stream = sink.stream()
            if stream is not None:
                stream.end()

    def _remove(self, stream: EventStream) -> None:
        """``stream`` closes: stop offering it events."""
        for sink in self._streams:
            if sink.stream() is stream:
                sink.forget.detach()
                self._forget(sink)
                return

    def _forget(self, sink: _StreamSink) -> None:
        """Stop offering events to the stream of ``sink`` (closed, or garbage unclosed);
        a lossless one no longer holds the engine back. Nothing if it was forgotten
        already. Never blocks."""
        if sink in self._streams:
            self._streams.remove(sink)
            self._unlisten(sink)
            self._room.freed(sink.room_key)


@final
class _StreamSink:
    """What the hub offers a stream's events to: the stream, held weakly."""

    __slots__ = ("forget", "room_key", "stream")

    def __init__(self, stream: EventStream) -> None:
        self.stream = weakref.ref(stream)
        self.room_key = stream.room_key
        """What marks the stream full in the hub's room (see :class:`_Room`)."""
        self.forget: weakref.finalize[..., EventStream]
        """Forgets the sink once the stream is garbage (detached when it closes)."""

    def __call__(self, event: Event) -> None:
        stream = self.stream()
        if stream is not None:
            stream.offer(event)


def _forget_soon(
    token: trio.lowlevel.TrioToken,
    forget: Callable[[_StreamSink], None],
    sink: _StreamSink,
) -> None:
    """Called once the stream of ``sink`` is garbage, unclosed: have the hub ``forget``
    it in trio's next scheduler pass (wherever the garbage collector runs, in any
    thread); nothing once that trio run has ended. Never blocks."""
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(forget, sink)


def listeners_own(error: BaseException) -> bool:
    """Whether ``error``, which a listener's or a tracer's code raised, is its own
    failure (it is removed, and the run goes on): anything but a KeyboardInterrupt (the
    operator's) or trio's Cancelled (the cancellation of the task it was called in),
    alone or in a group; ``sys.exit()`` and a BaseException of its own making too."""
    if isinstance(error, BaseExceptionGroup):
        return error.subgroup((KeyboardInterrupt, trio.Cancelled)) is None
    return not isinstance(error, KeyboardInterrupt | trio.Cancelled)


@final
class _GuardedSpan:
    """A tracer's span of one step, whose entering and leaving never fail the step: a
    tracer that raises there is removed (see :meth:`EventHub.trace`) and the step goes
    on outside its span. Never suppresses the step's own exception."""

    __slots__ = ("_handle", "_hub", "_span")

    def __init__(
        self,
        hub: EventHub,
        handle: Callable[[Event], None],
        span: AbstractContextManager[object],
    ) -> None:
        self._hub = hub
        self._handle = handle
        self._span: AbstractContextManager[object] | None = span

    def __enter__(self) -> None:
        assert self._span is not None
        try:
            self._span.__enter__()
        except BaseException as error:
            if not listeners_own(error):
                raise
            self._span = None
            self._hub._listener_failed(self._handle, "entering a step's span")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._span is None:
            return
        try:
            self._span.__exit__(exc_type, exc, traceback)
        except BaseException as error:
            if error is exc:
                return  # the step's own exception, which goes on as it was
            if not listeners_own(error):
                raise
            self._hub._listener_failed(self._handle, "leaving a step's span")


@final
class _Room:
    """The lossless streams that are full (each by its ``room_key``), and the tasks
    waiting until none is."""

    __slots__ = ("_waiters", "full")

    def __init__(self) -> None:
        self.full: set[object] = set()
        self._waiters = trio.lowlevel.ParkingLot()

    def filled(self, key: object) -> None:
        self.full.add(key)

    def freed(self, key: object) -> None:
        """The stream of ``key`` is not full (any more). Never blocks."""
        if key in self.full:
            self.full.remove(key)
            if not self.full:
                self._waiters.unpark_all()

    async def wait(self) -> None:
        """Block while a stream is full (all waiters wake together). A checkpoint."""
        if self.full:
            await self._waiters.park()
        else:
            await trio.lowlevel.checkpoint()


@final
class StepsInFlight(Generic[T]):
    """What a consumer of events keeps of each step in flight, by execution id: a
    ``T`` per step, from its StepStarted to its StepFinished.

    An execution id is unique within a run, but a run's id can be in use again (a run
    resumed or started with it) while a step of the run that had it still finishes
    (cancelled, in a shielded cleanup or a slow ``finally``): two steps in flight may
    then have one execution id. A node actor emits a step's events in the task that
    runs the step (Retry and Fallback also in a task the step started, a
    ParallelBatchNode's item), so the two are told apart by that task: each event
    goes to the step that runs in the emitting task or its parent, and an event of a
    step the consumer never saw start goes to none.
    """

    __slots__ = ("_steps",)

    def __init__(self) -> None:
        self._steps: dict[str, list[tuple[trio.lowlevel.Task, T]]] = {}

    def __bool__(self) -> bool:
        """Whether a step is in flight."""
        return bool(self._steps)

    def add(self, execution_id: str, value: T) -> None:
        """Keep ``value`` for the step ``execution_id`` the current task starts."""
        task = trio.lowlevel.current_task()
        steps = self._steps.get(execution_id)
        if steps is None:
            self._steps[execution_id] = [(task, value)]
        else:
            steps.append((task, value))

    def get(self, execution_id: str) -> T | None:
        """The value of the step ``execution_id`` that emits in the current task, if
        it is in flight."""
        steps = self._steps.get(execution_id)
        if steps is None:
            return None
        index = _emitting(steps)
        return None if index is None else steps[index][1]

    def pop(self, execution_id: str) -> T | None:
        """Forget the step ``execution_id`` that emits in the current task (it ended);
        return its value, None if it was not in flight."""
        steps = self._steps.get(execution_id)
        if steps is None:
            return None
        index = _emitting(steps)
        if index is None:
            return None
        value = steps[index][1]
        if len(steps) == 1:
            del self._steps[execution_id]
        else:
            del steps[index]
        return value

    def values(self) -> Iterator[T]:
        """The values of every step in flight."""
        for steps in self._steps.values():
            for _, value in steps:
                yield value

    def clear(self) -> None:
        self._steps.clear()


def _emitting(steps: list[tuple[trio.lowlevel.Task, T]]) -> int | None:
    """The index in ``steps`` (one execution id's) of the step that runs in the current
    task, or in its parent (the current task runs an item of a ParallelBatchNode's
    step: the step's task opened the item's nursery); None if neither does: the step
    that emits is another one of that execution id, which the consumer never saw start
    (a run of an id in use again, while a step of the run that had it still ends). No
    further ancestor counts: the task that opened the engine is one of every worker's,
    and may run a step of its own."""
    task = trio.lowlevel.current_task()
    nursery = task.parent_nursery
    for candidate in (task, None if nursery is None else nursery.parent_task):
        for index, (runner, _) in enumerate(steps):
            if runner is candidate:
                return index
    return None


@final
class _RunView:
    """One run as a stream sees it: its steps in flight, its end kept back until they
    have finished, and, while an earlier run of the same id is still ending in the
    stream, the events kept back until that one has ended."""

    __slots__ = ("end", "kept", "lost", "steps")

    def __init__(self) -> None:
        self.steps = 0
        """Its steps in flight that the stream saw start."""
        self.end: Event | None = None
        self.kept: list[Event] = []
        self.lost = False
        """The stream dropped its RunStarted: it drops the run's other events too."""


@final
class EventStream:
    """An async iterator of events; also an async context manager that closes it.

    Open one with ``engine.events(buffer=..., lossless=...)`` (:meth:`Engine.events`),
    not with this class. ``async for event in stream`` blocks until the next event and
    ends when the stream or the engine closes.

    A dropping stream (the default) buffers at most ``buffer`` events and counts the
    ones that do not fit. A lossless one (``engine.events(buffer=..., lossless=True)``)
    keeps every event: while it holds ``buffer`` or more, the engine's new runs and
    steps wait for its reader.

    Each run's events reach the stream well formed: a step's StepFinished, Retry and
    Fallback only if the stream took its StepStarted; a run's other events only if it
    took its RunStarted, or the run was in flight when the stream opened (a dropping
    stream that dropped a start drops what follows it); a run's end after the
    StepFinished of every step of it the stream saw start (the run's end cancels its
    steps still in flight, and they finish afterwards). A run whose id is in use again
    while steps of the run that had it still finish comes after that run's end: its
    events are kept back until then. When the engine closes, the stream ends once the
    steps in flight it saw start have finished.
    """

    def __init__(
        self,
        buffer: int,
        on_close: Callable[[EventStream], None],
        *,
        room: _Room | None = None,
    ) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"buffer must be an int >= 1, got {buffer!r}")
        self.buffer = buffer
        # Lossless: unbounded here, bounded upstream. New runs and steps wait while the
        # stream holds ``buffer`` events (``room``), so it holds at most ``buffer`` plus
        # what the steps and runs already in flight then emit before they end (a step's
        # Retry and Fallback events and its StepFinished, a run's end).
        capacity = buffer if room is None else math.inf
        self._send, self._receive = trio.open_memory_channel[Event](capacity)
        self._on_close: Callable[[EventStream], None] | None = on_close
        self._room = room
        self.room_key = object()
        """The engine's: what marks this stream full among the lossless streams holding
        the engine back (not the stream itself, so that an unclosed stream that is
        garbage is let go of)."""
        self.lossless = room is not None
        """Whether this stream keeps every event (and slows the engine down instead)."""
        self.held = 0
        """Events a lossless stream holds for its reader while it is open, those kept
        back included (0 for a dropping one)."""
        self.dropped = 0
        """Events lost so far and not yet reported by an EventsDropped."""
        self._reported = False
        """The last event read was an EventsDropped."""
        self._steps = StepsInFlight[tuple[_RunView, bool]]()
        """The run of each step in flight this stream saw start, and whether it took
        the StepStarted (the step's other events are dropped if it did not)."""
        self._runs: dict[str, list[_RunView]] = {}
        """The runs of each id with steps in flight, an end or events kept back, oldest
        first: only the oldest one's events go to the buffer."""
        self._kept = 0
        """Events kept back in ``_runs``; a dropping stream counts them in its buffer."""
        self._ending = False
        """The engine has closed: the stream takes only its steps' ends, then closes."""

    def offer(self, event: Event) -> None:
        """The engine's: take ``event`` if it belongs to this stream's view of its run
        (see the class docstring), keeping a run's end back while steps of it are in
        flight. Never blocks."""
        match event:
            case StepStarted():
                self._step_started(event)
            case StepFinished():
                self._step_finished(event)
            case Retry() | Fallback():
                step = self._steps.get(event.execution_id)
                if step is not None:
                    self._take_of_step(step, event)
            case RunFinished() | RunFailed() | RunCancelled():
                self._run_ended(event)
            case _:
                self._run_started(event)

    def _step_started(self, event: StepStarted) -> None:
        if self._ending:
            return
        run = self._current(event.run_id)
        run.steps += 1
        self._steps.add(event.execution_id, (run, self._take(run, event)))

    def _current(self, run_id: str) -> _RunView:
        """The view of the run in flight with id ``run_id`` (made if there is none)."""
        runs = self._runs.get(run_id)
        if runs is None:
            run = _RunView()
            self._runs[run_id] = [run]
            return run
        if runs[-1].end is not None:
            runs.append(_RunView())
        return runs[-1]

    def _step_finished(self, event: StepFinished) -> None:
        """Take the end of a step this stream saw start; then the end of its run, if
        this was the run's last step in flight."""
        step = self._steps.pop(event.execution_id)
        if step is None:
            return
        self._take_of_step(step, event)
        run = step[0]
        run.steps -= 1
        if not run.steps:
            self._settle(event.run_id)
        if self._ending and not self._steps:
            self.close()

    def _run_ended(self, event: RunFinished | RunFailed | RunCancelled) -> None:
        runs = self._runs.get(event.run_id)
        if runs is None:
            self._put(event)
            return
        runs[-1].end = event
        if not runs[-1].steps:
            self._settle(event.run_id)

    def _run_started(self, event: Event) -> None:
        """Take ``event`` (a RunStarted, or an event of another kind) unless the engine
        has closed; a run id in use again while steps of the run that had it still
        finish: keep it back (see the class docstring)."""
        if self._ending:
            return
        if event.run_id in self._runs:
            run = self._current(event.run_id)
            run.lost = not self._take(run, event)
        elif not self._put(event):
            run = _RunView()
            run.lost = True
            self._runs[event.run_id] = [run]

    def _settle(self, run_id: str) -> None:
        """Give the end of each run of id ``run_id`` that has ended and has no step in
        flight, oldest first, and after each the events kept back for the next one;
        forget the id once none is left waiting."""
        runs = self._runs[run_id]
        while not runs[0].steps:
            end = runs[0].end
            if end is None:
                # In flight with no step: nothing of it is kept (runs after it come
                # only once it has ended), unless its events are dropped.
                if not runs[0].lost:
                    del self._runs[run_id]
                return
            self._take(runs[0], end)
            del runs[0]
            if not runs:
                del self._runs[run_id]
                return
            self._release(runs[0])

    def _take_of_step(self, step: tuple[_RunView, bool], event: Event) -> None:
        """Take ``event`` of a step in flight (its run, and whether its StepStarted was
        taken); drop it if the StepStarted was dropped."""
        run, started = step
        if started:
            self._take(run, event)
        else:
            self.dropped += 1

    def _take(self, run: _RunView, event: Event) -> bool:
        """Give ``event`` of ``run`` to the buffer, or keep it back if an earlier run of
        its id is still ending; return whether it was taken (not dropped)."""
        if run.lost:
            self.dropped += 1
            return False
        if run is self._runs[event.run_id][0]:
            return self._put(event)
        if not self._fits():
            self.dropped += 1
            return False
        self._count_held()
        run.kept.append(event)
        self._kept += 1
        return True

    def _release(self, run: _RunView) -> None:
        """``run`` is now the oldest of its id: give its kept events to the buffer (they
        were counted when kept)."""
        self._kept -= len(run.kept)
        for event in run.kept:
            try:
                self._send.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except trio.ClosedResourceError:
                return
        run.kept = []

    def _fits(self) -> bool:
        """Whether one more event fits: always in a lossless stream; in a dropping one
        while its buffer and the events kept back are fewer than ``buffer``."""
        if self.lossless:
            return True
        return self._send.statistics().current_buffer_used + self._kept < self.buffer

    def _put(self, event: Event) -> bool:
        """Buffer ``event``; a dropping stream whose buffer is full counts it as
        dropped. Return whether it was buffered."""
        if self._kept and not self._fits():
            self.dropped += 1
            return False
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
            return False
        except trio.ClosedResourceError:
            return False
        self._count_held()
        return True

    def _count_held(self) -> None:
        """A lossless stream holds one more event: it fills at ``buffer``."""
        if self._room is not None:
            self.held += 1
            if self.held == self.buffer:
                self._room.filled(self.room_key)

    def end(self) -> None:
        """The engine's, as it closes: stop holding it back, take no new run or step,
        and close once the steps in flight this stream saw start have finished (at once
        if there are none). Never blocks."""
        self._ending = True
        self._let_go_of_room()
        if not self._steps:
            self.close()

    def close(self) -> None:
        """Stop receiving events; iteration ends after the buffered ones (events kept
        back are not given). A lossless stream no longer holds the engine back."""
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None
        self._let_go_of_room()
        self._send.close()

    def _let_go_of_room(self) -> None:
        """A lossless stream stops counting toward the engine's congestion."""
        if self._room is not None:
            self._room.freed(self.room_key)
            self._room = None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        """The next event: an EventsDropped first if any were lost, unless the last
        one read was an EventsDropped (a reader slower than the drops still gets the
        buffered events, every other read); also as the last one when the stream
        ends. A checkpoint."""
        if self.dropped and not self._reported:
            await trio.lowlevel.checkpoint()
            return self._report_dropped()
        try:
            event = await self._receive.receive()
        except trio.EndOfChannel:
            # The events that follow a dropped start are dropped even when the buffer
            # has room: some may have been while this waited.
            if self.dropped:
                return self._report_dropped()
            raise StopAsyncIteration from None
        self._reported = False
        if self._room is not None:
            self.held -= 1
            if self.held + 1 == self.buffer:
                self._room.freed(self.room_key)
        return event

    def _report_dropped(self) -> EventsDropped:
        count, self.dropped = self.dropped, 0
        self._reported = True
        return EventsDropped("", trio.current_time(), count)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
