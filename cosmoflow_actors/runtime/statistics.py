"""What ``Engine.statistics()`` reports: run counters and every actor's counters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ActorStatistics:
    """One actor's counters and limits: ``kind`` is "node", "router" or "store".

    A node actor's ``name`` is ``"<flow>/<node_id>"``, or ``"<flow>#2/<node_id>"``
    (``#3``...) for the actors of a second Flow object of the same name alive on the
    engine at the same time, so that each flow's actors have names of their own.

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
    senders_waiting: int = 0


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
        """The statistics of the actor called ``name`` (``"flow/node"``, ``"flow#2/node"``,
        ``"router"``...); raises KeyError for a name no live actor has."""
        for stats in self.actors:
            if stats.name == name:
                return stats
        raise KeyError(name)
