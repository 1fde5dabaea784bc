"""``cosmoflow inspect STORE --run ID``: one durable run in detail, read from its record
and its parts (path chunks, places) alone, without its flow and without writing to the
store: the record's fields, the path the run took, and where each branch of its fan-outs
in flight stands, with the params that arrived at their joins."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cosmoflow_actors.cli.errors import CliError
from cosmoflow_actors.cli.stores import Unreadable, listed_runs, opened, unknown_run
from cosmoflow_actors.errors import DamagedRecordError, RunConflictError, StorageError
from cosmoflow_actors.runtime import run_record
from cosmoflow_actors.runtime.engine import open_engine
from cosmoflow_actors.runtime.run_record import RunRecord
from cosmoflow_actors.runtime.store_client import SharedStore
from cosmoflow_actors.storage import Storage
from cosmoflow_actors.storage.base import place_key
from cosmoflow_actors.tracing import one_line

READ_ATTEMPTS: Final = 5
"""How many times, at most, ``inspect --run`` reads a run's record and parts through an engine
while another process commits steps of the run between the two reads."""
PATH_SHOWN: Final = 20
"""How many node ids of a run's path the text shows: the last ones, after a count of
the steps before them (``--json`` holds the whole path)."""


@dataclass(frozen=True, slots=True)
class BranchView:
    """A branch in flight of a run, where its record or a place says it goes on: its
    step at the node ``at[-1]`` was under way (it is sent there again, with ``params``)
    or done (``action``, what it returned, is routed again)."""

    label: str
    """Names the branch among the run's: ``""`` for the first, ``"<count>.<i>/"`` added
    for the ``i``-th branch of a fan-out."""
    at: list[str]
    """Its node, after the nested flows it is inside, outermost first."""
    under_way: bool
    params: dict[str, Any]
    """What the step under way was sent with; ``{}`` for a step done."""
    action: dict[str, Any] | None
    """The name and params of the action the step done returned; None for one under
    way."""


@dataclass(frozen=True, slots=True)
class ForkView:
    """A fan-out in progress: where it forked, the join its branches wait at (None
    until one arrives: a fan-out may have none), how many branches are still out,
    those in flight, the params that arrived at its join so far (in order) and the
    fan-outs its branches forked."""

    forked_at: list[str]
    from_branch: str
    join: str | None
    pending: int
    branches: list[BranchView]
    arrivals: list[dict[str, Any]]
    fan_outs: list[ForkView]


@dataclass(frozen=True, slots=True)
class RunView:
    """One durable run: its row (see RunRecord), its BatchFlow children, params and
    whole path, and its branches in flight outside fan-outs and its fan-outs."""

    run: RunRecord
    children: list[RunRecord]
    params: dict[str, Any]
    path: list[str]
    branches: list[BranchView]
    fan_outs: list[ForkView]


def peeked_run(name: str, values: Mapping[str, Any], runs: list[RunRecord], run_id: str) -> RunView:
    """The run ``run_id`` of the store ``name``, whose every key and value (``values``,
    read at once, an Unreadable one for a value that cannot be read) and run rows
    (``runs``) are read already. CliError when it is not recorded, or its record or a
    part cannot be read or is none the engine writes."""
    key = run_record.record_key(run_id)
    if key not in values:
        raise unknown_run(name, run_id)
    try:
        record = run_record.checked_record(key, _readable(key, values[key]))
        wanted = run_record.part_keys(record)
        parts = {part: _readable(part, values[part]) for part in wanted if part in values}
        return run_view(runs, record, parts)
    except StorageError as exc:  # undecodable, or not what the engine writes
        raise CliError(f"{name}: cannot read run {run_id!r}: {exc}") from exc


def _readable(key: str, value: Any) -> Any:
    """``value``, read under ``key``; the StorageError it could not be read with when
    it is Unreadable."""
    if not isinstance(value, Unreadable):
        return value
    if isinstance(value.error, StorageError):
        raise value.error
    raise StorageError(f"the value of {key!r} cannot be read: {value!r}") from value.error


async def read_run(name: str, storage: Storage, run_id: str) -> RunView:
    """The run ``run_id`` of ``storage`` (the store ``name``), read through an engine
    (a Redis store, or one of the user's own) with the store's run rows, their leases
    read. CliError as :func:`peeked_run` says, when another process kept moving the
    run on between the reads of its record and of its parts (see
    :func:`_record_and_parts`), and when the rows cannot be read (a run's record is
    none the engine writes). Blocks while it reads."""
    async with open_engine() as engine, opened(engine, storage) as handle:
        runs = await listed_runs(engine, storage, name)
        try:
            record, parts = await _record_and_parts(name, handle, run_id)
            return run_view(runs, record, parts)
        except StorageError as exc:
            raise CliError(f"{name}: cannot read run {run_id!r}: {exc}") from exc


async def _record_and_parts(
    name: str, handle: SharedStore, run_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checked record of the run ``run_id`` of the store ``handle`` (``name``) and
    its parts, read again when another engine committed a step of the run (or forgot
    it) between the reads of its record and of its parts: a run in flight elsewhere
    moves on while it is inspected. The engine's RunConflictError after
    :data:`READ_ATTEMPTS` such reads; CliError when the run is not recorded. Blocks
    while it reads."""
    for _ in range(READ_ATTEMPTS - 1):
        with contextlib.suppress(RunConflictError):
            return await _read_once(name, handle, run_id)
    return await _read_once(name, handle, run_id)


async def _read_once(
    name: str, handle: SharedStore, run_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The record of the run ``run_id`` and its parts, each read once (see
    :func:`_record_and_parts`). Blocks while it reads."""
    key = run_record.record_key(run_id)
    stored = await handle.get(key, None)
    if stored is None:
        raise unknown_run(name, run_id)
    record = run_record.checked_record(key, stored)
    read = await handle.get_many(run_record.parts_request(record))
    return record, run_record.parts_read(record, read)


def run_view(runs: list[RunRecord], record: Mapping[str, Any], parts: Mapping[str, Any]) -> RunView:
    """The view of the run of ``record`` (checked), its ``parts`` read by key: its row
    is the record's, with the parent and the lease its row in ``runs`` (the store's
    rows, read before the record, which may have moved on since) gives, if it has one.
    Raises DamagedRecordError naming the key of a chunk or place that is none the
    engine writes."""
    run_id = record["run_id"]
    row = RunRecord.of(record)
    for listed in runs:
        if listed.run_id == run_id:
            row = dataclasses.replace(row, parent_id=listed.parent_id, lease_left=listed.lease_left)
    children = [run for run in runs if run.parent_id == run_id]
    path = run_record.whole_path(record, parts)
    branches, forks = _in_flight(record, parts)
    return RunView(row, children, dict(record["params"]), path, branches, forks)


def _in_flight(
    record: Mapping[str, Any], parts: Mapping[str, Any]
) -> tuple[list[BranchView], list[ForkView]]:
    """The branches in flight outside fan-outs and the outermost fan-outs in progress
    of the run of ``record``, as the engine's resume reads them (none for a run that
    succeeded, whose places are gone, or that committed no step)."""
    if record["state"] == "succeeded" or record["last"] is None:
        return [], []
    run_id = record["run_id"]
    places = run_record.checked_places(record, parts)
    tree = _Tree(run_id, places)
    for _, saved in run_record.saved_branches(record, places):
        tree.add_branch(saved)
    for branches in tree.branches.values():
        branches.sort(key=lambda branch: _label_order(branch.label))
    fan_outs = tree.forks_of(None)
    lost = sorted(set(tree.forks) - tree.shown)
    if lost:
        key = place_key(run_id, lost[0])
        raise DamagedRecordError(
            f"run {run_id!r}: the fan-out at {key!r} is inside itself (the engine never "
            "writes that: a place was crafted or damaged)",
            key,
        )
    return tree.branches.get(None, []), fan_outs


class _Tree:
    """A run's checked places arranged as its fan-outs nest: each fan-out's branches,
    arrivals and the fan-outs its branches forked, by the number of its place."""

    def __init__(self, run_id: str, places: Mapping[int, Mapping[str, Any]]) -> None:
        self.run_id = run_id
        self.places = places
        self.forks = {number: saved["fork"] for number, saved in places.items() if "fork" in saved}
        self.arrivals = run_record.arrivals_by_fork(run_id, places)
        self.branches: dict[int | None, list[BranchView]] = {}
        self.inner: dict[int | None, list[int]] = {}
        for number, fork in self.forks.items():
            outer = fork["parent"]["fork"]
            if outer is not None:
                run_record.held_fork(run_id, places, outer)
            self.inner.setdefault(outer, []).append(number)
        self.shown: set[int] = set()
        """The fan-outs :meth:`forks_of` has given, to find one that is inside itself."""

    def add_branch(self, saved: Mapping[str, Any]) -> None:
        """Add the branch in flight ``saved`` (as its place holds it) to its fan-out's;
        DamagedRecordError when the place it names holds no fan-out."""
        fork = saved["fork"]
        if fork is not None:
            run_record.held_fork(self.run_id, self.places, fork)
        self.branches.setdefault(fork, []).append(_branch(saved))

    def forks_of(self, outer: int | None) -> list[ForkView]:
        """The fan-outs forked by the branches of the fan-out ``outer`` (None: by a
        branch in no fan-out)."""
        return [self._fork(number) for number in self.inner.get(outer, [])]

    def _fork(self, number: int) -> ForkView:
        self.shown.add(number)
        saved = self.forks[number]
        parent = saved["parent"]
        arrived = [
            self.places[place]["arrival"]["params"] for place in self.arrivals.get(number, [])
        ]
        return ForkView(
            forked_at=_nodes(parent["frames"]),
            from_branch=parent["label"],
            join=saved["join"],
            pending=saved["pending"],
            branches=self.branches.get(number, []),
            arrivals=arrived,
            fan_outs=self.forks_of(number),
        )


def _branch(saved: Mapping[str, Any]) -> BranchView:
    at = _nodes(saved["frames"])
    if "params" in saved:
        return BranchView(saved["label"], at, True, dict(saved["params"]), None)
    action = saved["action"]
    shown = {"name": action["name"], "params": action["params"]}
    return BranchView(saved["label"], at, False, {}, shown)


def _label_order(label: str) -> tuple[tuple[int, ...], str]:
    """What branches are listed by: the numbers of their labels (``"1.2/3.10/"``),
    compared as numbers, then the labels."""
    return tuple(int(number) for number in re.findall(r"[0-9]+", label)), label


def _nodes(frames: list[list[Any]]) -> list[str]:
    return [node_id for node_id, _ in frames]


def view_json(name: str, view: RunView) -> dict[str, Any]:
    """What ``--json`` prints of ``view``, of the store ``name``."""
    run = {
        **dataclasses.asdict(view.run),
        "children": [child.run_id for child in view.children],
        "params": view.params,
        "path": view.path,
        "in_flight": {
            "branches": [dataclasses.asdict(branch) for branch in view.branches],
            "fan_outs": [dataclasses.asdict(fork) for fork in view.fan_outs],
        },
    }
    return {"store": name, "run": run}


def view_lines(name: str, view: RunView) -> list[str]:
    """The lines the text output prints of ``view``, of the store ``name``: the record's
    text (ids, the error) with its control characters escaped (see ``one_line``)."""
    run = view.run
    lease = "-" if run.lease_left is None else f"{run.lease_left:.1f} s"
    children = ", ".join(f"{child.run_id} ({child.state})" for child in view.children)
    fields = {
        "store": name,
        "run": run.run_id,
        "flow": run.flow_name,
        "state": run.state,
        "steps": str(run.steps),
        "owner": run.owner or "-",
        "queue": run.queue or "-",
        "lease left": lease,
        "parent": run.parent_id or "-",
        "children": children or "-",
        "error": run.error or "-",
        "params": repr(view.params),
        "path": _path_text(view.path),
    }
    lines = [f"{field + ':':<11} {one_line(value)}" for field, value in fields.items()]
    if not view.branches and not view.fan_outs:
        return [*lines, "in flight:  -"]
    lines.append("in flight:")
    lines += [f"  {_branch_text(branch)}" for branch in view.branches]
    for fork in view.fan_outs:
        lines += _fork_lines(fork, "  ")
    return lines


def _path_text(path: list[str]) -> str:
    """The last :data:`PATH_SHOWN` node ids of ``path``, after how many steps came
    before them; "-" for a run that took no step."""
    if not path:
        return "-"
    shown = " -> ".join(path[-PATH_SHOWN:])
    earlier = len(path) - PATH_SHOWN
    return shown if earlier <= 0 else f"({earlier} earlier steps) -> {shown}"


def _fork_lines(fork: ForkView, indent: str) -> list[str]:
    join = "none reached yet" if fork.join is None else repr(fork.join)
    by = f" by branch {fork.from_branch!r}" if fork.from_branch else ""
    out = f"{fork.pending} branch{'es' if fork.pending != 1 else ''} still out"
    head = f"fan-out at {_at(fork.forked_at)}{by}: join {join}, {out}"
    inner = indent + "  "
    lines = [indent + head]
    lines += [inner + _branch_text(branch) for branch in fork.branches]
    arrived = "; ".join(map(repr, fork.arrivals)) or "none with params"
    lines.append(f"{inner}arrived at the join: {arrived}")
    for nested in fork.fan_outs:
        lines += _fork_lines(nested, inner)
    return lines


def _branch_text(branch: BranchView) -> str:
    where = _at(branch.at)
    if branch.action is None:
        return (
            f"branch {_label(branch.label)}: its step at {where} was under way, with params "
            f"{branch.params!r}: runs {where} again on resume"
        )
    action = repr(branch.action["name"])
    if branch.action["params"]:
        action += f" with params {branch.action['params']!r}"
    return (
        f"branch {_label(branch.label)}: done at {where}, returned {action}: "
        "routed on from there on resume"
    )


def _at(nodes: list[str]) -> str:
    """A node after the nested flows it is inside: ``'checks' > 'flaky'``."""
    return " > ".join(map(repr, nodes))


def _label(label: str) -> str:
    return repr(label) if label else "'' (the run's first)"
