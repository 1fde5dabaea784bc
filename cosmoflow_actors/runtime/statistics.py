"""What ``Engine.statistics()`` reports: run counters and every actor's counters."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import trio

from cosmoflow_actors.runtime.limits import RateLimiter


class Actor(Protocol):
    """What the engine reads of every actor (node, router, store)."""

    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def serving(self) -> bool: ...
    @property
    def messages_processed(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def mailbox_size(self) -> float: ...
    @property
    def max_concurrency(self) -> int | None: ...
    @property
    def rate(self) -> RateLimiter | None: ...
    @property
    def mailbox_depth(self) -> int: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


@dataclass(frozen=True, slots=True)
class ActorStatistics:
    """One actor's counters and limits: ``kind`` is "node", "router" or "store".

    ``mailbox_size`` is None for the router's unbounded inbox; ``rate_limit`` is
    ``(calls, per_seconds)`` or None, and ``rate_waiting`` the exec attempts waiting
    for it.
    """

    name: str
    kind: str
    messages_processed: int
    mailbox_depth: int
    in_flight: int
    mailbox_size: int | None
    max_concurrency: int | None
    rate_limit: tuple[int, float] | None
    rate_waiting: int

    @classmethod
    def of(cls, actor: Actor) -> ActorStatistics:
        """Read an actor's counters now."""
        rate = actor.rate
        return cls(
            name=actor.name,
            kind=actor.kind,
            messages_processed=actor.messages_processed,
            mailbox_depth=actor.mailbox_depth,
            in_flight=actor.in_flight,
            mailbox_size=None if math.isinf(actor.mailbox_size) else int(actor.mailbox_size),
            max_concurrency=actor.max_concurrency,
            rate_limit=None if rate is None else (rate.calls, rate.per_seconds),
            rate_waiting=0 if rate is None else rate.waiting,
        )


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """Run counters and every live actor's statistics, taken at one moment."""

    runs_started: int
    runs_succeeded: int
    runs_failed: int
    runs_cancelled: int
    runs_in_flight: int
    actors: tuple[ActorStatistics, ...]

    def actor(self, name: str) -> ActorStatistics:
        """The statistics of the actor called ``name`` (``"flow/node"``, ``"router"``...)."""
        for stats in self.actors:
            if stats.name == name:
                return stats
        raise KeyError(name)
