"""What ``Engine.statistics()`` reports: run counters and every actor's counters, under
names that tell each live flow's actors apart."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cosmoflow_actors.flow import Flow


@dataclass(frozen=True, slots=True)
class ActorStatistics:
    """One actor's counters and limits: ``kind`` is "node", "router" or "store".

    A node actor's ``name`` is ``"<flow>/<node_id>"``, or ``"<flow>#2/<node_id>"``
    (``#3``...) for the actors of a second Flow object of the same name alive on the
    engine at the same time, so that each flow's actors have names of their own.

    ``mailbox_size`` is the mailbox's bound; ``rate_limit`` is
    ``(calls, per_seconds)`` or None, and ``rate_waiting`` the exec attempts waiting
    for it.
    """

    name: str
    kind: str
    messages_processed: int
    mailbox_depth: int
    in_flight: int
    mailbox_size: int
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


class FlowLabels:
    """The labels of one engine's flows, which name their node actors
    (``"<label>/<node_id>"``), so that two live flows of one name never share actor
    names.

    A flow's label is its name, or, when another Flow object of that name holds it, the
    name followed by ``#2``, ``#3``..., numbered on from the last label of that name
    (so giving a label takes constant time, however many flows of the name live). A
    flow keeps its label while it lives; once it is garbage (its actors leave the
    statistics) its name is free for the next flow of that name.
    """

    def __init__(self) -> None:
        self._holders: weakref.WeakValueDictionary[str, Flow] = weakref.WeakValueDictionary()
        self._labels: weakref.WeakKeyDictionary[Flow, str] = weakref.WeakKeyDictionary()
        self._numbers: dict[str, int] = {}
        """The last number given to each flow name (one entry per name ever labelled)."""

    def label(self, flow: Flow) -> str:
        """The label of ``flow``, given it now if it has none. Never blocks."""
        label = self._labels.get(flow)
        if label is not None:
            return label
        label = flow.name
        while label in self._holders:
            number = self._numbers.get(flow.name, 1) + 1
            self._numbers[flow.name] = number
            label = f"{flow.name}#{number}"
        self._holders[label] = flow
        self._labels[flow] = label
        return label
