"""What ``Engine.statistics()`` reports: run counters and every actor's counters, under
names that tell each live flow's actors apart."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from cosmoflow_actors.flow import Flow

FORGET_ABOVE: Final = 64
"""Fewest names numbered (see :class:`FlowLabels`) between two times the names no live
flow has are forgotten."""


ActorKind = Literal["node", "router", "store"]


@dataclass(frozen=True, slots=True)
class ActorStatistics:
    """One actor's counters and limits: ``kind`` is "node", "router" or "store".

    A node actor's ``name`` is ``"<flow>/<node_id>"``, or ``"<flow>#2/<node_id>"``
    (``#3``...) for the actors of a second Flow object of the same name alive on the
    engine at the same time, so that each flow's actors have names of their own.

    ``mailbox_size`` is the mailbox's bound; ``rate_limit`` is
    ``(calls, per_seconds)`` or None, and ``rate_waiting`` the exec attempts waiting
    for it. ``max_exec_concurrency`` is the node's bound on exec attempts in flight, or
    None; ``exec_in_flight`` the attempts holding one of its slots, ``exec_waiting``
    those waiting for one (both 0 without the bound).
    """

    name: str
    kind: ActorKind
    messages_processed: int
    mailbox_depth: int
    in_flight: int
    mailbox_size: int
    max_concurrency: int | None
    rate_limit: tuple[int, float] | None
    rate_waiting: int
    senders_waiting: int = 0
    max_exec_concurrency: int | None = None
    exec_in_flight: int = 0
    exec_waiting: int = 0


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

    The last numbers of names that no live flow has are forgotten (their numbering
    starts again at ``#2``) once as many names have been numbered since the last time
    as there were flows or numbers alive then (at least :data:`FORGET_ABOVE`): an
    engine that labels flows of ever new names keeps about as many numbers as it has
    flows alive, and forgetting costs a constant time per label on average.
    """

    def __init__(self) -> None:
        self._holders: weakref.WeakValueDictionary[str, Flow] = weakref.WeakValueDictionary()
        self._labels: weakref.WeakKeyDictionary[Flow, str] = weakref.WeakKeyDictionary()
        self._numbers: dict[str, int] = {}
        """The last number given to each flow name numbered, until :meth:`_forget_gone`
        drops those of names no live flow has."""
        self._forget_above = FORGET_ABOVE
        """How many names may be numbered before :meth:`_forget_gone` runs again."""

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
        if len(self._numbers) > self._forget_above:
            self._forget_gone()
        return label

    def drop(self, flow: Flow) -> None:
        """Take back the label of ``flow`` (its registration failed): the label is free
        for the next flow of that name. Never blocks."""
        label = self._labels.pop(flow, None)
        if label is not None and self._holders.get(label) is flow:
            del self._holders[label]

    def _forget_gone(self) -> None:
        """Drop the numbers of the names no live flow has; run again once as many names
        have been numbered as there are flows or numbers left (the work done here).
        Never blocks."""
        alive = {flow.name for flow in self._labels}
        self._numbers = {name: n for name, n in self._numbers.items() if name in alive}
        kept = len(self._numbers)
        self._forget_above = kept + max(FORGET_ABOVE, len(self._labels), kept)
