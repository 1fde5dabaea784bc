"""Run events: what the engine reports as runs and steps happen.

``engine.events()`` gives an :class:`EventStream`; every event is a frozen dataclass
with the run id and the trio time it happened. A stream never slows the engine: events
go into a bounded buffer without waiting, and a consumer that falls behind loses the
events that do not fit and then receives one :class:`EventsDropped` saying how many.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_BUFFER: Final = 10_000


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to run ``run_id`` at trio time ``time``."""

    run_id: str
    time: float


@dataclass(frozen=True, slots=True)
class RunStarted(Event):
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
    flow_name: str
    duration: float
    error: BaseException


@dataclass(frozen=True, slots=True)
class RunCancelled(Event):
    flow_name: str
    duration: float


@dataclass(frozen=True, slots=True)
class StepStarted(Event):
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
    """An exec attempt failed with ``error``; attempt ``attempt + 1`` follows ``delay``s on."""

    node_id: str
    attempt: int
    error: BaseException
    delay: float


@dataclass(frozen=True, slots=True)
class Fallback(Event):
    """Exec failed ``attempts`` times; ``exec_fallback`` runs with the last ``error``."""

    node_id: str
    attempts: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class EventsDropped(Event):
    """This stream lost ``count`` events because its consumer fell behind.

    ``run_id`` is empty: the lost events may concern any runs.
    """

    count: int


@final
class EventHub:
    """The engine's side: hands each event to every open stream, never waiting."""

    __slots__ = ("_streams",)

    def __init__(self) -> None:
        self._streams: list[EventStream] = []

    @property
    def active(self) -> bool:
        """Whether anyone listens (emitters skip building events otherwise)."""
        return bool(self._streams)

    def emit(self, event: Event) -> None:
        """Offer ``event`` to every stream. Never blocks."""
        for stream in self._streams:
            stream.offer(event)

    def open(self, buffer: int) -> EventStream:
        """A new stream that receives every event from now on."""
        stream = EventStream(buffer, self._streams.remove)
        self._streams.append(stream)
        return stream

    def close(self) -> None:
        """End every stream (the engine is closing)."""
        for stream in list(self._streams):
            stream.close()


@final
class EventStream:
    """An async iterator of events; also an async context manager that closes it.

    ``async for event in stream`` blocks until the next event and ends when the stream
    or the engine closes.
    """

    def __init__(self, buffer: int, on_close: Callable[[EventStream], None]) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"buffer must be an int >= 1, got {buffer!r}")
        self._send, self._receive = trio.open_memory_channel[Event](buffer)
        self._on_close: Callable[[EventStream], None] | None = on_close
        self.dropped = 0
        """Events lost so far and not yet reported by an EventsDropped."""

    def offer(self, event: Event) -> None:
        """Buffer ``event``, or count it as dropped when the buffer is full."""
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
        except trio.ClosedResourceError:
            pass

    def close(self) -> None:
        """Stop receiving events; iteration ends after the buffered ones."""
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None
        self._send.close()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        """The next event (an EventsDropped first, if any were lost). A checkpoint."""
        if self.dropped:
            count, self.dropped = self.dropped, 0
            await trio.lowlevel.checkpoint()
            return EventsDropped("", trio.current_time(), count)
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
