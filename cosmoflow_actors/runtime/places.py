"""A durable run's places: where each of its branches in flight and fan-outs in progress
goes on after a crash, and what arrived at a fan-out's join, each under a store key of
its own.

The run's record holds its last step (``"last"``): where the branch that committed it
goes on. Every branch in flight and every fan-out in progress has a place, a number that
names a key of its own (:func:`~cosmoflow_actors.storage.base.place_key`), and so has every
arrival at a fan-out's join that brought params (the join's params merge them), until
its fan-out is over. A step's commit writes, in the same transaction as the record, the
places of what changed since the last commit (a branch routed on, a fan-out whose
branches arrived, an arrival), and deletes those of the branches that left (they
forked, reached their join or ended) and of the fan-outs that are over, with their
arrivals'. A commit so costs what changed, not the number of branches in
flight: a step of a fan-out to a thousand branches commits what a step of one branch
does. The branch that commits a step is not written to its place (the record's
``"last"`` says where it is, and names its place); it is, at the next commit of another
branch. The record counts the place numbers in use (``"places"``): a resume reads those
keys.

Nothing here blocks.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cosmoflow_actors.runtime.run import Branch, Fork
from cosmoflow_actors.storage.base import StagedOp, place_key


@dataclass(slots=True, eq=False)
class Arrival:
    """The ``order``-th arrival at the join of ``fork`` that brought params: what its
    place holds (``params`` are ``fork.arrivals[order]``)."""

    fork: Fork
    order: int
    params: Mapping[str, Any]


Placed = Branch | Fork | Arrival
"""What has a place: a branch in flight, a fan-out in progress or an arrival at its
join."""

Routed = Branch | Arrival
"""What routing changes: a branch (entered or left), an arrival."""


def position(branch: Branch) -> dict[str, Any]:
    """Where ``branch`` is (its frames) and what its steps are numbered (its label and
    count), as JSON."""
    frames = [[frame.node_id, frame.steps] for frame in branch.frames]
    return {"frames": frames, "label": branch.label, "count": branch.count}


class Places:
    """The places of one durable run: which branches are in flight, the numbers of the
    branches, fan-outs and arrivals that have a place, and what changed since the last
    commit.

    ``entered``, ``left`` and ``arrived`` say what routing did; :meth:`staged` plans a
    commit, :meth:`committed` applies the plan once the commit is stored. A routing
    decision that fails puts the branches in flight back with :meth:`mark` and
    :meth:`undo`.
    """

    def __init__(self, run_id: str, count: int = 0) -> None:
        self.run_id = run_id
        self.count = count
        """How many place numbers are in use: every place is numbered below it."""
        self.numbers: dict[Placed, int] = {}
        self.stored: set[int] = set()
        """The numbers whose keys hold a place (a number may name the place of the
        branch of the last step, which the record holds, and have none)."""
        self.free: list[int] = []
        """The numbers below ``count`` that name no place (a heap: the lowest is reused
        first)."""
        self.in_flight: dict[Branch, None] = {}
        """The branches whose position the run's places must hold (a dict as an ordered
        set)."""
        self.changed: dict[Routed, None] = {}
        """The branches routed since the last commit (entered or left), the arrivals,
        and the branch of the last step, whose place the next commit of another branch
        writes."""
        self._journal: list[tuple[Branch, bool]] = []
        """The branches routed since :meth:`mark`, each with whether it was in flight."""
        self._arrived: list[Arrival] = []
        """The arrivals since :meth:`mark`."""
        self.arrivals: dict[Fork, list[Arrival]] = {}
        """The arrivals whose places are stored, by fan-out: deleted with its own."""

    @classmethod
    def restored(
        cls,
        run_id: str,
        count: int,
        numbers: Mapping[Placed, int],
        stored: Iterable[int],
        in_flight: Iterable[Branch],
        last: Branch,
        arrivals: Mapping[Fork, list[Arrival]],
    ) -> Places:
        """The places of a run read back from its store: ``count`` numbers in use, the
        ``numbers`` of its branches and fan-outs, those ``stored``, its branches
        ``in_flight``, and ``last``, the branch of its last step, whose place the
        record's ``"last"`` holds: it is written at the next commit of another branch,
        as after a commit (see :meth:`committed`); and the stored ``arrivals`` of its
        fan-outs."""
        places = cls(run_id, count)
        places.numbers = dict(numbers)
        places.stored = set(stored)
        taken = places.stored | set(numbers.values())
        places.free = [number for number in range(count) if number not in taken]
        places.in_flight = dict.fromkeys(in_flight)
        places.changed[last] = None
        places.arrivals = {fork: list(found) for fork, found in arrivals.items()}
        return places

    def entered(self, branch: Branch) -> None:
        """``branch`` was routed and is in flight."""
        self._route(branch, True)

    def left(self, branch: Branch) -> None:
        """``branch`` forked, reached its join or ended: its fork holds where it went."""
        self._route(branch, False)

    def arrived(self, fork: Fork) -> None:
        """The last of ``fork``'s arrivals reached its join, with params."""
        arrival = Arrival(fork, len(fork.arrivals) - 1, fork.arrivals[-1])
        self._arrived.append(arrival)
        self.changed[arrival] = None

    def _route(self, branch: Branch, in_flight: bool) -> None:
        self._journal.append((branch, branch in self.in_flight))
        self._set_in_flight(branch, in_flight)
        self.changed[branch] = None

    def _set_in_flight(self, branch: Branch, in_flight: bool) -> None:
        if in_flight:
            self.in_flight[branch] = None
        else:
            self.in_flight.pop(branch, None)

    def mark(self) -> None:
        """Start a routing decision that :meth:`undo` may take back."""
        self._journal.clear()
        self._arrived.clear()

    def undo(self) -> None:
        """Put the branches in flight back as they were at :meth:`mark`, and forget the
        arrivals since (the router takes them back from their fan-outs). The branches
        routed meanwhile stay changed: the next commit writes where they are (where they
        were, once the router has put them back)."""
        for branch, was_in_flight in reversed(self._journal):
            self._set_in_flight(branch, was_in_flight)
        for arrival in self._arrived:
            self.changed.pop(arrival, None)
        self._journal.clear()
        self._arrived.clear()

    def staged(self, branch: Branch, resume_at: Mapping[str, Any]) -> Plan:
        """Plan the commit of the step of ``branch``, which goes on from ``resume_at``
        after a crash: the record's ``"last"``, and the ops that write the places of
        the branches routed since the last commit and of their fan-outs. Takes the
        changes it plans from :attr:`changed`: :meth:`committed` or :meth:`abandoned`
        must follow."""
        changed, self.changed = self.changed, {}
        plan = Plan(self, changed)
        plan.last = {
            **resume_at,
            "fork": plan.fork_number(branch.fork),
            "place": plan.number(branch),
        }
        for other in changed:
            if other is branch:
                continue
            if isinstance(other, Arrival):
                plan.arrive(other)
            elif other in self.in_flight:
                plan.write(other, {**_saved(other), "fork": plan.fork_number(other.fork)})
            else:
                plan.remove(other)
        return plan

    def committed(self, plan: Plan, branch: Branch) -> None:
        """``plan``, made for a step of ``branch``, is stored: number as it numbered.
        ``branch``'s place is written at the next commit of another branch."""
        self.count = plan.count
        for number in plan.freed:
            heapq.heappush(self.free, number)
        for placed in plan.removed:
            self.numbers.pop(placed, None)
            if isinstance(placed, Fork):
                self.arrivals.pop(placed, None)
        for arrival in plan.arrivals:
            self.arrivals.setdefault(arrival.fork, []).append(arrival)
        self.numbers.update(plan.numbers)
        for number, value in plan.values.items():
            if value is None:
                self.stored.discard(number)
            else:
                self.stored.add(number)
        self.changed[branch] = None

    def abandoned(self, plan: Plan) -> None:
        """``plan`` was not stored: what it would have written is still to write, and
        the free numbers it took are free again."""
        self.changed = {**plan.changed, **self.changed}
        for number in plan.taken:
            heapq.heappush(self.free, number)

    def cleared(self) -> list[StagedOp]:
        """The ops that delete every stored place: the run has ended for good."""
        return [("delete", place_key(self.run_id, number), None) for number in sorted(self.stored)]


def _saved(branch: Branch) -> Mapping[str, Any]:
    saved = branch.resume_at
    assert saved is not None, "a branch in flight of a durable run has a resume point"
    return saved


@dataclass(slots=True, eq=False)
class Plan:
    """The places one commit writes and deletes, and how the run's places are numbered
    once it is stored (see :meth:`Places.staged`)."""

    places: Places
    changed: dict[Routed, None]
    last: dict[str, Any] = field(default_factory=dict)
    """Where the branch of the committed step goes on, with its fork's and its own
    place's numbers: the record's ``"last"``."""
    values: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    """What each place written holds, by number; None for a place deleted."""
    numbers: dict[Placed, int] = field(default_factory=dict)
    """The numbers this plan gave."""
    removed: dict[Placed, None] = field(default_factory=dict)
    """The branches, fan-outs and arrivals whose places this plan deletes (a dict as an
    ordered set)."""
    arrivals: list[Arrival] = field(default_factory=list)
    """The arrivals whose places this plan writes."""
    count: int = 0
    """The run's count of place numbers in use once the plan is stored."""
    taken: list[int] = field(default_factory=list)
    """The numbers this plan took from the run's free numbers (given back if the plan
    is abandoned)."""
    freed: list[int] = field(default_factory=list)
    """The numbers this plan's deletes freed: given again first within the plan, free
    for the run's later plans once it is stored."""

    def __post_init__(self) -> None:
        self.count = self.places.count

    @property
    def ops(self) -> list[StagedOp]:
        """The sets and deletes of the places, in the order of their numbers."""
        run_id = self.places.run_id
        return [
            ("set", place_key(run_id, number), value)
            if value is not None
            else ("delete", place_key(run_id, number), None)
            for number, value in sorted(self.values.items())
            if value is not None or number in self.places.stored
        ]

    def number(self, placed: Placed) -> int:
        """The number of ``placed``'s place, given one if it has none."""
        number = self._known(placed)
        if number is None:
            number = self._fresh_number()
            self.numbers[placed] = number
        return number

    def _fresh_number(self) -> int:
        """A number no place holds: one this plan freed, else the run's lowest free
        one, else a new one."""
        if self.freed:
            return self.freed.pop()
        if self.places.free:
            number = heapq.heappop(self.places.free)
            self.taken.append(number)
            return number
        self.count += 1
        return self.count - 1

    def _known(self, placed: Placed) -> int | None:
        """The number ``placed`` has, given by this plan or an earlier one; None when
        it has none."""
        number = self.numbers.get(placed)
        return self.places.numbers.get(placed) if number is None else number

    def fork_number(self, fork: Fork | None) -> int | None:
        """The number of ``fork``'s place (None: no fork); a fork that has none is given
        one, and its place is written."""
        if fork is None:
            return None
        number = self._known(fork)
        if number is None:
            number = self.number(fork)
            self.values[number] = {"fork": self._fork(fork)}
        return number

    def _fork(self, fork: Fork) -> dict[str, Any]:
        parent = {**position(fork.parent), "fork": self.fork_number(fork.parent.fork)}
        return {
            "parent": parent,
            "depth": fork.depth,
            "pending": fork.pending,
            "join": fork.join_id,
        }

    def write(self, branch: Branch, saved: dict[str, Any]) -> None:
        """Write ``saved``, where ``branch`` goes on, to its place."""
        self.values[self.number(branch)] = {"branch": saved}

    def arrive(self, arrival: Arrival) -> None:
        """Write ``arrival`` to a place of its own while its fan-out is in progress (a
        fan-out over deletes its arrivals' places)."""
        fork = arrival.fork
        if fork.pending:
            saved = {"fork": self.fork_number(fork), "order": arrival.order}
            self.values[self.number(arrival)] = {
                "arrival": {**saved, "params": dict(arrival.params)}
            }
            self.arrivals.append(arrival)

    def remove(self, branch: Branch) -> None:
        """``branch`` left: delete its place, and write its fork's (its count of
        branches still out changed), or delete it and its arrivals' when the fan-out is
        over."""
        self._delete(branch)
        fork = branch.fork
        number = None if fork is None else self._known(fork)
        if fork is None or number is None:
            return
        if fork.pending:
            self.values[number] = {"fork": self._fork(fork)}
            return
        self._delete(fork)
        for arrival in self.places.arrivals.get(fork, []):
            self._delete(arrival)

    def _delete(self, placed: Placed) -> None:
        number = None if placed in self.removed else self._known(placed)
        if number is None:
            return
        self.numbers.pop(placed, None)
        self.values[number] = None
        self.removed[placed] = None
        self.freed.append(number)
