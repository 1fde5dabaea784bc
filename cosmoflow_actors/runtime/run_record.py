"""A durable run's record: its format, written as the run goes and read to put the run
back where it was.

A durable run (a ``run_id`` on a persistent storage) keeps one record under
``__cosmoflow__/runs/<run_id>``. It is written when the run starts, with each step's
writes in the same commit as the step finishes, and when the run ends. Records are
plain JSON, so every codec can store them; store keys under ``__cosmoflow__/`` are
hidden from ``keys()``, ``size()`` and ``clear()``.

The record counts the run's steps (``"steps"``) and holds the last of its path (the node
of each step): the tail since the last sealed chunk. When the tail reaches
:data:`PATH_CHUNK` node ids, the step's commit stores it as a sealed chunk under
``__cosmoflow__/parts/<run_id>/path/<n>`` and the record's tail starts empty, so that a
step's commit costs the same at any length of the run. The whole path is the chunks,
in order, then the tail (see :func:`chunk_keys`, :func:`whole_path`).

A step's record and the run's places (see :mod:`~cosmoflow_actors.runtime.places`) say
where every branch of the run goes on after a crash: the step's own branch routes its
action again, and a branch whose step was under way is sent to that node again. The
fan-outs in progress are saved with their parent branch and their count of branches
still out, so branches that had reached the join or ended are not waited for twice, and
each arrival at a join that brought params is saved with its order, for the join's
params.

Nothing here blocks.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn

import msgspec

from cosmoflow_actors.action import Action
from cosmoflow_actors.errors import (
    DamagedRecordError,
    MaxStepsExceeded,
    NoRouteError,
    RunConflictError,
    RunRecordedError,
    StoreValueError,
    type_and_message,
)
from cosmoflow_actors.flow import Flow, FlowResult
from cosmoflow_actors.runtime.messages import Step, StepDone
from cosmoflow_actors.runtime.places import Arrival, Placed, Places
from cosmoflow_actors.runtime.run import ActiveRun, Branch, Fork, Frame
from cosmoflow_actors.storage.base import (
    RECORD_PREFIX,
    StagedOp,
    Storage,
    batch_parent,
    path_chunk_key,
    place_key,
)
from cosmoflow_actors.storage.codec import CODECS

if TYPE_CHECKING:
    from cosmoflow_actors.runtime.node_actor import NodeActor


PATH_CHUNK: Final = 1024
"""How many node ids of a run's path a sealed chunk holds; the record's tail holds
fewer."""


def record_key(run_id: str) -> str:
    """The store key of ``run_id``'s record."""
    return RECORD_PREFIX + run_id


def checked_record(key: str, value: Any) -> dict[str, Any]:
    """``value``, read from the store under ``key``, as a run record.

    Raises DamagedRecordError naming the key and what is wrong when it is not a record the
    engine writes (see :func:`record_problem`).
    """
    problem = record_problem(key.removeprefix(RECORD_PREFIX), value)
    if problem is not None:
        raise DamagedRecordError(
            f"the store holds no valid run record under {key!r}: {problem} (the engine "
            "never writes that: the record was crafted or damaged)",
            key,
        )
    record: dict[str, Any] = value
    return record


EndedState = Literal["succeeded", "failed"]
"""The state of a durable run that has ended, as its record says."""
ENDED_STATES: Final[tuple[EndedState, ...]] = ("succeeded", "failed")
"""The states of a run that ended: those ``forget_run`` may forget it in."""


def require_ended(key: str, value: Any, states: Collection[EndedState] = ENDED_STATES) -> None:
    """Raise RunRecordedError unless ``value``, the record under ``key``, is of a run
    that has ended in one of ``states`` (by default succeeded or failed), so that it may
    be forgotten; DamagedRecordError when it is not a record the engine wrote."""
    record = checked_record(key, value)
    state = record["state"]
    run_id = record["run_id"]
    if state == "running":
        raise RunRecordedError(
            f"run {run_id!r} is recorded as running (in flight, or interrupted): finish "
            "it with engine.resume before forgetting it",
            run_id,
            record["flow"],
            state,
        )
    if state not in states:
        wanted = " or ".join(sorted(states))
        raise RunRecordedError(
            f"run {run_id!r} is recorded as {state}, not {wanted}: it is kept",
            run_id,
            record["flow"],
            state,
        )


def checked_states(states: Iterable[str]) -> frozenset[EndedState]:
    """The states ``states`` names, each that of a run that ended; ValueError naming the
    first that is not, or saying there is none."""
    if isinstance(states, str | bytes):
        raise ValueError(f"states must be a collection of states, not {states!r}")
    named = list(states)
    for state in named:
        if state not in ENDED_STATES:
            raise ValueError(f"states: {state!r} is not the state of a run that ended")
    if not named:
        raise ValueError("states is empty: name 'succeeded', 'failed' or both")
    return frozenset(state for state in ENDED_STATES if state in named)


def refuse_child(record: Mapping[str, Any], parent: str) -> NoReturn:
    """Raise RunRecordedError: ``record``, a record checked already (see
    :func:`checked_record`), is of a BatchFlow's child run of the recorded run
    ``parent``, which is forgotten with its parent only (a resume of the parent would
    run the child's steps again)."""
    run_id = record["run_id"]
    raise RunRecordedError(
        f"run {run_id!r} is a child run of the recorded run {parent!r} (a step of its "
        f"BatchFlow started it): forget {parent!r}, whose children are forgotten with it",
        run_id,
        record["flow"],
        record["state"],
    )


def require_flow(run: ActiveRun, record: Mapping[str, Any]) -> None:
    """Raise RunRecordedError unless ``record`` is of a run of ``run``'s flow (whatever
    the state it records)."""
    _require_name(run.flow, run.run_id, record)


def require_fit(
    flow: Flow, run_id: str, record: Mapping[str, Any], stored: Mapping[str, Any]
) -> None:
    """Raise RunRecordedError, as :func:`require_flow` and :func:`restore` would, unless
    ``flow`` can resume ``record`` (checked already, see :func:`checked_record`), the
    record of ``run_id``, with its places ``stored`` (by key, see :func:`place_keys`):
    of ``flow``'s name, its branches at nodes and its fan-outs waiting at joins
    ``flow`` has. A lowered ``max_steps`` is not checked. Raises DamagedRecordError as
    :func:`restore` does for a place that is no place the engine writes."""
    _require_name(flow, run_id, record)
    _Restoring(flow, run_id, record, stored).branches_in_flight()


def _require_name(flow: Flow, run_id: str, record: Mapping[str, Any]) -> None:
    if record["flow"] != flow.name:
        problem = f"belongs to flow {record['flow']!r}, not {flow.name!r}"
        raise _unfit(run_id, record, problem)


def _unfit(run_id: str, record: Mapping[str, Any], problem: str) -> RunRecordedError:
    """The refusal of a start or resume of the run ``run_id`` whose ``record`` does not
    fit the flow given (``problem`` says how, after "run ID"), saying what to do."""
    state = record["state"]
    advice = (
        f"resume it with flow {record['flow']!r} as it was when the run started (the "
        f"version that recorded it); nothing ran and its record stays {state}"
    )
    if state == "running":
        advice += " (forget_run deletes a record only once its run has ended, as that resume does)"
    return RunRecordedError(f"run {run_id!r} {problem}: {advice}", run_id, record["flow"], state)


_PARAMS: Final = reprlib.Repr()
"""Shows a parameter set briefly when it is long."""
_PARAMS.maxlevel, _PARAMS.maxstring, _PARAMS.maxother = 3, 60, 60


def require_params(run: ActiveRun, record: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """Raise RunRecordedError unless ``record``, of the BatchFlow child ``run``, was
    written for ``params``, the parameter set its BatchFlow's prep returned for it now
    (children are matched to their records by index: see :func:`_same_params`)."""
    recorded = record["params"]
    if _same_params(recorded, params):
        return
    run_id = run.run_id
    index = run_id.rpartition("/")[2]
    raise RunRecordedError(
        f"BatchFlow child run {run_id!r} (item {index}) is recorded with the params "
        f"{_PARAMS.repr(recorded)}, but prep returned {_PARAMS.repr(dict(params))} for "
        "it: on resume, prep must return the same parameter sets in the same order "
        "(the child was not run)",
        run_id,
        record["flow"],
        record["state"],
    )


def _same_params(recorded: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    """Whether ``params`` are the ``recorded`` ones as the record holds them: their
    JSON forms are the same (see :func:`_same_json`), or, for params JSON cannot hold
    (which only the pickle codec stores), their pickles are."""
    try:
        return _same_json(recorded, params)
    except TypeError:
        pickle = CODECS["pickle"]
        try:
            return pickle.encode("params", recorded) == pickle.encode("params", params)
        except StoreValueError:
            return False


def _same_json(recorded: Any, value: Any) -> bool:
    """Whether ``recorded``, a value as a record holds it, is ``value`` as JSON holds it:
    a tuple as a list, bytes as base64, a mapping's keys in any order, a set's items in
    any order (a set of str is iterated in another order in each process); 1, 1.0 and
    True differ. A set inside another kind of object (a dataclass) is compared in its
    order. Raises TypeError when JSON cannot hold ``value``."""
    if isinstance(value, set | frozenset):
        return _is_array(recorded) and _json_texts(recorded) == _json_texts(value)
    if isinstance(value, list | tuple):
        return (
            _is_array(recorded)
            and len(recorded) == len(value)
            and all(map(_same_json, recorded, value))
        )
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return (
            isinstance(recorded, Mapping)
            and recorded.keys() == value.keys()
            and all(_same_json(recorded[key], value[key]) for key in value)
        )
    return _json_text(recorded) == _json_text(value)


def _is_array(value: Any) -> bool:
    """Whether ``value`` is what JSON holds as an array."""
    return isinstance(value, list | tuple | set | frozenset)


def _json_texts(items: Iterable[Any]) -> list[str]:
    """The JSON texts of ``items``, sorted."""
    return sorted(map(_json_text, items))


def _json_text(value: Any) -> str:
    """``value`` as JSON, the keys of its mappings sorted; TypeError when JSON cannot
    hold it."""
    return json.dumps(msgspec.to_builtins(value, str_keys=True), sort_keys=True)


RecordedState = Literal["running", "succeeded", "failed", "orphaned"]
"""What :class:`RunRecord` says of a run (see there)."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """What a store says about one durable run (see :func:`list_runs`).

    ``state`` is "running" (in flight, or interrupted by a crash or a cancel),
    "succeeded" or "failed"; ``last_node_id`` is the node of the last committed step;
    ``error`` is what a failed run failed with, its type and message as its record holds
    them (``"NodeError: node 'b' failed in exec (...)"``), None for any other run.

    A run that a worker of a run queue claimed names it: ``owner`` is the worker's
    name and ``queue`` the queue's URL (``redis://HOST[:PORT][/DB]/NAME[?QUERY]``, its
    password masked as ``***``: ``redis://:***@host:6379/2/q``); both are None for a
    run started otherwise. Where the queue's leases can be read (see
    ``queue.leases_checked``), ``lease_left`` is the seconds left on the owner's lease,
    and a running run whose lease is gone is "orphaned": no worker runs it now, and
    the queue gives it to another worker.

    A child run of a BatchFlow names its parent: ``parent_id`` is the id of the run
    whose step started it (``job`` for ``job:3/0``), when that run is recorded in the
    same store; None for any other run. A child's record is forgotten with its parent's.
    """

    run_id: str
    flow_name: str
    state: RecordedState
    last_node_id: str | None
    steps: int
    owner: str | None = None
    queue: str | None = None
    lease_left: float | None = None
    parent_id: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> RunRecord:
        """The summary of a record (see :func:`checked_record`)."""
        last = record.get("last")
        owner = record.get("owner") or {}
        return cls(
            run_id=record["run_id"],
            flow_name=record["flow"],
            state=record["state"],
            last_node_id=None if last is None else last["node"],
            steps=record["steps"],
            owner=owner.get("worker"),
            queue=owner.get("queue"),
            error=record["error"],
        )


def with_parents(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """``runs``, the runs recorded in one store, sorted by run id (see :func:`run_order`),
    each BatchFlow child among them naming its parent (see :attr:`RunRecord.parent_id`)."""
    runs = sorted(runs, key=lambda run: run_order(run.run_id))
    recorded = {run.run_id for run in runs}
    return [_with_parent(run, recorded) for run in runs]


def run_order(run_id: str) -> tuple[tuple[str | tuple[tuple[int, str], ...], ...], str]:
    """What runs are sorted by: their id, where the numbers that a BatchFlow child's id
    adds to its parent's compare as numbers, so that children come right after their
    parent (``job``, ``job:2/0``, ``job:2/0:1/0``, ``job:2/1``, ``job:10/0``, then
    ``job-2``); ``run_id`` itself breaks a tie (``job:02/0``, ``job:2/0``)."""
    return _id_path(run_id), run_id


def _id_path(run_id: str) -> tuple[str | tuple[tuple[int, str], ...], ...]:
    """``run_id`` as its root run's id, then the numbers of each child's step and index."""
    parent = batch_parent(run_id)
    if parent is None:
        return (run_id,)
    numbers = tuple(map(_as_number, re.split(r"[./]", run_id[len(parent) + 1 :])))
    return (*_id_path(parent), numbers)


def _as_number(digits: str) -> tuple[int, str]:
    """A string of digits as what sorts it as its number, however long (``int()``
    refuses more than 4,300 digits): its length without leading zeros, then those."""
    significant = digits.lstrip("0")
    return len(significant), significant


def _with_parent(run: RunRecord, recorded: set[str]) -> RunRecord:
    parent = batch_parent(run.run_id)
    return run if parent not in recorded else replace(run, parent_id=parent)


def new_record(run_id: str, flow_name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The record of the run ``run_id`` of ``flow_name`` before its first step."""
    return {
        "run_id": run_id,
        "flow": flow_name,
        "state": "running",
        "params": dict(params),
        "steps": 0,
        "path": [],
        "last": None,
        "places": 0,
        "result": None,
        "error": None,
    }


def owned(
    stored: Any, run_id: str, flow_name: str, params: Mapping[str, Any], owner: Mapping[str, Any]
) -> Any:
    """The record of ``run_id`` once the worker ``owner`` (``{"worker": NAME, "queue":
    URL}``) has claimed it: ``stored`` (the record as stored, None when there is none
    yet) naming ``owner``, or a new record naming it.

    A succeeded record, or a value that is no record, is returned as it is: the engine
    returns the one's result and refuses the other.
    """
    if stored is None:
        return {**new_record(run_id, flow_name, params), "owner": dict(owner)}
    if record_problem(run_id, stored) is not None or stored["state"] == "succeeded":
        return stored
    return {**stored, "owner": dict(owner)}


def step_done(
    record: Mapping[str, Any], node_id: str, last: Mapping[str, Any], places: int
) -> tuple[dict[str, Any], list[StagedOp]]:
    """``record`` once a step at ``node_id`` is done, its branch going on from ``last``
    (with its fork's and its own place's numbers, see :meth:`Places.staged`) and
    ``places`` place numbers in use; and the ops to commit with the record: none, or
    the set of the path chunk the step sealed.

    The record counts the step and adds its node to the path's tail (which starts
    empty again once it is sealed, see :data:`PATH_CHUNK`).
    """
    steps = record["steps"] + 1
    path = [*record["path"], node_id]
    sealed: list[StagedOp] = []
    if len(path) == PATH_CHUNK:
        sealed.append(("set", path_chunk_key(record["run_id"], _sealed(record)), path))
        path = []
    record = {**record, "steps": steps, "path": path, "last": dict(last), "places": places}
    return record, sealed


def chunk_keys(record: Mapping[str, Any]) -> list[str]:
    """The keys of the sealed chunks of the path of the run of ``record`` (checked, see
    :func:`checked_record`), in order."""
    return [path_chunk_key(record["run_id"], number) for number in range(_sealed(record))]


def _sealed(record: Mapping[str, Any]) -> int:
    """How many sealed chunks the path of the run of ``record`` has in the store: the
    steps that are not in its tail (see :func:`step_done`)."""
    sealed: int = (record["steps"] - len(record["path"])) // PATH_CHUNK
    return sealed


def _chunk(path: Sequence[str], number: int) -> Sequence[str]:
    """The node ids of ``path`` that its chunk ``number`` holds (all of them, once it is
    sealed)."""
    return path[number * PATH_CHUNK : (number + 1) * PATH_CHUNK]


def whole_path(record: Mapping[str, Any], chunks: Mapping[str, Any]) -> list[str]:
    """The whole path of the run of ``record`` (checked): its sealed chunks, read from
    the store into ``chunks`` by key (see :func:`chunk_keys`), then its tail.

    Raises DamagedRecordError naming the key of a chunk that is missing or is no chunk the
    engine writes (a list of :data:`PATH_CHUNK` node ids).
    """
    path: list[str] = []
    for key in chunk_keys(record):
        path.extend(_checked_chunk(record, key, chunks))
    path.extend(record["path"])
    return path


def _checked_chunk(record: Mapping[str, Any], key: str, chunks: Mapping[str, Any]) -> list[str]:
    """The sealed chunk under ``key`` in ``chunks``, of the run of ``record``; raises
    DamagedRecordError as :func:`whole_path` says."""
    if key not in chunks:
        raise DamagedRecordError(
            f"run {record['run_id']!r}: the store holds no path chunk under {key!r}, "
            f"which its record counts (its {record['steps']} steps): the chunk was "
            "deleted or the record crafted",
            key,
        )
    chunk = chunks[key]
    is_chunk = (
        isinstance(chunk, list)
        and len(chunk) == PATH_CHUNK
        and all(isinstance(node_id, str) for node_id in chunk)
    )
    if not is_chunk:
        raise DamagedRecordError(
            f"run {record['run_id']!r}: the store holds no valid path chunk under "
            f"{key!r}: it holds {_shown(chunk)}, not a list of {PATH_CHUNK} node ids "
            "(the engine never writes that: the chunk was crafted or damaged)",
            key,
        )
    node_ids: list[str] = chunk
    return node_ids


def reordered(record: Mapping[str, Any], sealed: list[StagedOp], started: list[str]) -> int | None:
    """The number of the path chunk that ``sealed`` (the ops :func:`step_done` returned
    with ``record``) sets, when its node ids are not in the order the run's steps
    ``started`` (its path: a fan-out's branches may commit in another order than they
    start); else None."""
    if not sealed:
        return None
    [(_, _, chunk)] = sealed
    number = _sealed(record) - 1
    return None if _chunk(started, number) == chunk else number


def succeeded(
    record: Mapping[str, Any], result: FlowResult, reordered_chunks: Collection[int]
) -> tuple[dict[str, Any], list[StagedOp]]:
    """``record`` of a run that ended with ``result``, and the ops to commit with it.

    Its path is the result's ``execution_path`` (the order the steps started, as a run
    returns it), as a tail and chunks: the chunks the run sealed in another order
    (``reordered_chunks``, see :func:`reordered`) and those the record has not sealed
    yet (the path may hold steps that started and never committed) are written from
    it, the others are left as they are.
    """
    path = result.execution_path
    stored = _sealed(record)
    sealed = len(path) // PATH_CHUNK
    ops: list[StagedOp] = [
        ("set", path_chunk_key(record["run_id"], number), list(_chunk(path, number)))
        for number in range(sealed)
        if number >= stored or number in reordered_chunks
    ]
    ended = {
        **record,
        "state": "succeeded",
        "steps": len(path),
        "path": list(path[sealed * PATH_CHUNK :]),
        "result": {
            "final_action": encode_action(result.final_action),
            "last_node_id": result.last_node_id,
            "value": result.result,
            "duration": result.duration,
        },
    }
    return ended, ops


def failed(record: Mapping[str, Any], error: BaseException) -> dict[str, Any]:
    """``record`` of a run that failed with ``error``."""
    return {**record, "state": "failed", "error": type_and_message(error)}


def recorded_result(record: Mapping[str, Any], path: Iterable[str], storage: Storage) -> FlowResult:
    """The FlowResult of a run whose record says it succeeded, its whole ``path`` read
    with it (see :func:`whole_path`)."""
    result = record["result"]
    path = tuple(path)
    return FlowResult(
        run_id=record["run_id"],
        flow_name=record["flow"],
        final_action=_decode_action(result["final_action"]),
        last_node_id=result["last_node_id"],
        steps_executed=len(path),
        execution_path=path,
        result=result["value"],
        success=True,
        duration=result["duration"],
        store=storage,
    )


def place_keys(record: Mapping[str, Any]) -> list[str]:
    """The keys of the places the run of ``record`` (checked, see :func:`checked_record`)
    may have stored, in order (see :mod:`~cosmoflow_actors.runtime.places`)."""
    return [place_key(record["run_id"], number) for number in range(record["places"])]


def part_keys(record: Mapping[str, Any]) -> list[str]:
    """The keys of the parts (path chunks, places) the run of ``record`` (checked) may
    have stored."""
    return [*chunk_keys(record), *place_keys(record)]


def parts_request(record: Mapping[str, Any]) -> list[str]:
    """The keys to read in one request for :func:`parts_read`: the run's parts (see
    :func:`part_keys`), then its record's key."""
    return [*part_keys(record), record_key(record["run_id"])]


def parts_read(record: Mapping[str, Any], read: dict[str, Any]) -> dict[str, Any]:
    """The parts (path chunks, places) of the run of ``record`` in ``read``, a store's
    answer to one request for the keys of its parts and then the record's key (last, so
    that a backend reading them one by one reads the record after the parts), once the
    record read with them counts the steps of ``record`` in its state: every commit
    counts one step more, and an end changes the state. Otherwise another engine
    committed a step of the run (or ended it, or forgot it) between the two reads, and
    the parts may be of a later step than ``record``, or gone: RunConflictError, as for
    a commit that comes second."""
    again = read.pop(record_key(record["run_id"]), None)
    if again is None:
        what = "forgot it"
    elif not isinstance(again, Mapping) or any(
        again.get(field) != record[field] for field in ("steps", "state")
    ):
        what = "committed a step of it"
    else:
        return read
    raise RunConflictError(
        f"run {record['run_id']!r}: another engine {what} while its record and its parts "
        "were read; nothing of it is run here"
    )


def restore(
    run: ActiveRun, record: Mapping[str, Any], path: Iterable[str], stored: Mapping[str, Any]
) -> tuple[list[Branch], Places]:
    """Put ``run`` back where its record says, its whole ``path`` and its places (by key,
    see :func:`place_keys`) read with it; return its branches in flight, each with its
    ``resume_at`` (none when no step had completed), and its places. Changes nothing
    outside ``run``, which the caller sends on only if this returns.

    Raises DamagedRecordError naming the key of a place that is no place the engine
    writes, or that names a fan-out the store does not hold (or a fan-out inside
    itself), or an arrival at a fan-out's join when an arrival before it is missing, or
    the place of the record's last step when it holds a fan-out or an arrival;
    RunRecordedError when the record does not fit the flow (it was changed since the
    run was recorded): a recorded node it lacks, or one that is now a nested flow or no
    longer one, a done step's action that no route from its node takes now (unless the
    run failed with NoRouteError), or a fan-out's join that is not a join of its flow
    now; and MaxStepsExceeded when a step that was under way exceeds a flow's
    ``max_steps`` (it was lowered), as :func:`~.router.counted_step` would have.
    """
    run.path.extend(path)
    run.steps = record["steps"]
    restoring = _Restoring(run.flow, run.run_id, record, stored)
    branches = restoring.branches_in_flight()
    for branch in branches:
        if branch.resume_at is not None and "params" in branch.resume_at:
            _count_under_way(run, branch)
    return branches, restoring.places(branches)


_NUMBERS: Final = ("fork", "place")
"""The place numbers a branch's saved position holds, which are not where it goes on."""


class _Restoring:
    """The places of a run's record read back (checked), and the branches and fan-outs
    made of them in its flow, with their numbers."""

    def __init__(
        self, flow: Flow, run_id: str, record: Mapping[str, Any], stored: Mapping[str, Any]
    ) -> None:
        self.flow = flow
        self.run_id = run_id
        self.record = record
        self.saved = checked_places(record, stored)
        """The places found, by number."""
        self.numbers: dict[Placed, int] = {}
        self.last: Branch | None = None
        """The branch of the record's last step, once made."""
        self._forks: dict[int, Fork] = {}
        self._making: set[int] = set()
        self._arrival_numbers = arrivals_by_fork(run_id, self.saved)
        self.arrivals: dict[Fork, list[Arrival]] = {}
        """The arrivals at the joins of the fan-outs made, in order."""

    def branches_in_flight(self) -> list[Branch]:
        """The record's branches in flight, put back in the flow in the order of their
        places' numbers, each with its ``resume_at`` (none when no step had completed).
        Raises RunRecordedError when the record does not fit the flow, DamagedRecordError for
        a place the engine never writes (see :func:`restore`)."""
        if self.record["last"] is None:
            return []
        last_number = self.record["last"]["place"]
        routes_checked = not _failed_unrouted(self.record)
        branches = []
        for number, saved in saved_branches(self.record, self.saved):
            branch = self.branch(saved)
            self.numbers[branch] = number
            branch.resume_at = {key: value for key, value in saved.items() if key not in _NUMBERS}
            self._check_at_node(branch)
            if "action" in saved and routes_checked:
                self._check_routed(branch, saved["action"])
            if number == last_number:
                self.last = branch
            branches.append(branch)
        return branches

    def places(self, branches: list[Branch]) -> Places:
        """The run's places, its ``branches`` in flight made (see
        :meth:`branches_in_flight`)."""
        if self.last is None:
            return Places(self.run_id)
        count, last, arrivals = self.record["places"], self.last, self.arrivals
        return Places.restored(
            self.run_id, count, self.numbers, self.saved, branches, last, arrivals
        )

    def branch(self, saved: Mapping[str, Any]) -> Branch:
        """The branch saved as ``saved``, in the fan-out its place number names."""
        frames = self._frames(saved["frames"])
        return Branch(frames, self.fork(saved["fork"]), saved["label"], saved["count"])

    def fork(self, number: int | None) -> Fork | None:
        """The fan-out in the place ``number`` (None: no fan-out), made once."""
        if number is None:
            return None
        fork = self._forks.get(number)
        if fork is not None:
            return fork
        saved = self._fork_saved(number)
        self._making.add(number)
        parent = self.branch(saved["parent"])
        self._check_join(parent, saved)
        fork = Fork(parent, saved["depth"], saved["pending"], saved["join"])
        self._forks[number] = fork
        self.numbers[fork] = number
        for order, arrival_number in enumerate(self._arrival_numbers.get(number, [])):
            params = self.saved[arrival_number]["arrival"]["params"]
            fork.arrivals.append(params)
            arrival = Arrival(fork, order, params)
            self.arrivals.setdefault(fork, []).append(arrival)
            self.numbers[arrival] = arrival_number
        return fork

    def _fork_saved(self, number: int) -> dict[str, Any]:
        """What the place ``number`` holds: a fan-out that is not being made (the
        parent of a fan-out's parent is never that fan-out)."""
        if number in self._making:
            raise _no_fork(self.run_id, number, "holds a fan-out inside itself")
        return held_fork(self.run_id, self.saved, number)

    def _frames(self, saved: list[list[Any]]) -> list[Frame]:
        """The frames ``saved`` in the record, in the flow: each frame but the last at
        a nested flow, which the next frame is in."""
        frames: list[Frame] = []
        current: Flow | None = self.flow
        parent = ""
        for node_id, steps in saved:
            if current is None:
                problem = (
                    f"is at node {node_id!r} inside node {parent!r}, which is no longer a flow"
                )
                raise self._unfit(problem)
            if node_id not in current.nodes:
                problem = (
                    f"is at node {node_id!r}, which flow {current.name!r} lacks (removed or "
                    "renamed since the run was recorded)"
                )
                raise self._unfit(problem)
            frames.append(Frame(current, node_id, steps))
            parent = node_id
            inner = current.nodes[node_id]
            current = inner if isinstance(inner, Flow) else None
        return frames

    def _check_at_node(self, branch: Branch) -> None:
        """Raise RunRecordedError unless ``branch``, whose step is under way or done, is
        at a node that runs steps (not a nested flow)."""
        frame = branch.frames[-1]
        if isinstance(frame.flow.nodes[frame.node_id], Flow):
            problem = (
                f"has a step at node {frame.node_id!r} of flow {frame.flow.name!r}, which "
                "is now a nested flow"
            )
            raise self._unfit(problem)

    def _check_routed(self, branch: Branch, action: Mapping[str, Any]) -> None:
        """Raise RunRecordedError unless ``action``, which the done step of ``branch``
        returned, completes the run, or a route out of its node takes it, or no route
        leaves the node (its flow ends there). Not asked of the record of a run that
        failed with NoRouteError (see :func:`_failed_unrouted`)."""
        frame = branch.frames[-1]
        flow, node_id, name = frame.flow, frame.node_id, action["name"]
        if action["complete"] or not flow.has_routes(node_id) or flow.routes_for(node_id, name):
            return
        problem = (
            f"has a step done at node {node_id!r} of flow {flow.name!r} that returned "
            f"action {name!r}, which no route from {node_id!r} takes now (its routes take "
            f"{', '.join(map(repr, flow.actions_from(node_id)))})"
        )
        raise self._unfit(problem)

    def _check_join(self, parent: Branch, saved: Mapping[str, Any]) -> None:
        """Raise RunRecordedError unless the fan-out ``saved``, from ``parent``, has no
        join yet or one that is a join of the flow it is in."""
        join_id = saved["join"]
        origin = parent.frames[-1]  # where the fan-out began, in the flow of its join
        if join_id is not None and join_id not in origin.flow.joins:
            problem = (
                f"has branches of the fan-out at node {origin.node_id!r} waiting at join "
                f"{join_id!r}, which flow {origin.flow.name!r} no longer has as a join "
                "(removed, renamed or made a plain node since the run was recorded)"
            )
            raise self._unfit(problem)

    def _unfit(self, problem: str) -> RunRecordedError:
        """The refusal of the resume: the record does not fit the flow (see
        :func:`_unfit`)."""
        return _unfit(self.run_id, self.record, problem)


def checked_places(
    record: Mapping[str, Any], stored: Mapping[str, Any]
) -> dict[int, dict[str, Any]]:
    """The places of the run of ``record`` (checked, see :func:`checked_record`) found in
    ``stored`` (by key, see :func:`place_keys`), by number, each checked: a branch, a
    fan-out or an arrival, as :class:`~cosmoflow_actors.runtime.places.Plan` writes
    them. Raises DamagedRecordError naming the key of a place that is no place the
    engine writes. Reads no flow: :func:`restore` and ``cosmoflow inspect --run`` read
    a run's places with it."""
    run_id, count = record["run_id"], record["places"]
    return {
        number: _checked_place(run_id, key, stored[key], count)
        for number, key in enumerate(place_keys(record))
        if key in stored
    }


def saved_branches(
    record: Mapping[str, Any], places: Mapping[int, Mapping[str, Any]]
) -> list[tuple[int, dict[str, Any]]]:
    """The branches in flight of the run of ``record`` (checked, with a step) as saved,
    each with the number of its place, in that order: the record's last step's branch,
    and those in ``places`` (see :func:`checked_places`; the last step's own place, if
    it is stored, says where it was before that step). Raises DamagedRecordError when
    the last step's place holds a fan-out or an arrival."""
    run_id, last = record["run_id"], record["last"]
    held = places.get(last["place"], {})
    if "branch" not in held and held:
        key = place_key(run_id, last["place"])
        raise DamagedRecordError(
            f"run {run_id!r}: its record's last step names the place {key!r}, "
            f"which holds {_PLACE_KINDS[next(iter(held))]} (the engine never writes "
            "that: the record or the place was crafted or damaged)",
            key,
        )
    found = {number: saved["branch"] for number, saved in places.items() if "branch" in saved}
    found[last["place"]] = last
    return sorted(found.items())


def arrivals_by_fork(run_id: str, places: Mapping[int, Mapping[str, Any]]) -> dict[int, list[int]]:
    """The numbers of the places of the arrivals at each fan-out's join among ``places``
    (see :func:`checked_places`), by the number of the fan-out's place, in the
    arrivals' order. Raises DamagedRecordError for an arrival whose fan-out's place
    holds none, or when the orders of a fan-out's arrivals are not 0, 1, 2..."""
    arrivals: dict[int, list[tuple[int, int]]] = {}
    for number, saved in places.items():
        if "arrival" in saved:
            arrival = saved["arrival"]
            held_fork(run_id, places, arrival["fork"])
            arrivals.setdefault(arrival["fork"], []).append((arrival["order"], number))
    return {fork: _in_order(run_id, sorted(found)) for fork, found in arrivals.items()}


def _in_order(run_id: str, arrivals: list[tuple[int, int]]) -> list[int]:
    """The place numbers of ``arrivals`` (order, number), sorted, whose orders must be
    0, 1, 2... (else DamagedRecordError)."""
    for expected, (order, number) in enumerate(arrivals):
        if order != expected:
            key = place_key(run_id, number)
            raise DamagedRecordError(
                f"run {run_id!r}: the place {key!r} holds arrival {order} at its "
                f"fan-out's join, where arrival {expected} is missing (the engine "
                "never writes that: a place was deleted, crafted or damaged)",
                key,
            )
    return [number for _, number in arrivals]


def held_fork(run_id: str, places: Mapping[int, Mapping[str, Any]], number: int) -> dict[str, Any]:
    """The fan-out the place ``number`` of the run ``run_id`` holds, among ``places``
    (see :func:`checked_places`); DamagedRecordError naming its key when it holds
    none."""
    saved = places.get(number, {}).get("fork")
    if saved is None:
        raise _no_fork(run_id, number, "holds no fan-out")
    fork: dict[str, Any] = saved
    return fork


def _no_fork(run_id: str, number: int, held: str) -> DamagedRecordError:
    """The error for a place that names the fan-out in the place ``number``, which
    ``held`` says is none it can be."""
    key = place_key(run_id, number)
    return DamagedRecordError(
        f"run {run_id!r}: a place names the fan-out at {key!r}, which {held} (the engine "
        "never writes that: a place was deleted, crafted or damaged)",
        key,
    )


def _failed_unrouted(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is of a run that failed with NoRouteError: it may hold the
    step whose action no route took, and its resume routes it again and fails the same
    way (the record's error is ``Type: message``, see ``errors.type_and_message``)."""
    if record["state"] != "failed":
        return False
    error: str = record["error"]
    return error.startswith(f"{NoRouteError.__name__}:")


def _count_under_way(run: ActiveRun, branch: Branch) -> None:
    """Count the step of ``branch`` that was under way as it was counted when it was
    sent (its frames hold it already). Raises MaxStepsExceeded as
    :func:`~.router.counted_step` does, for a ``max_steps`` lowered since."""
    run.steps += 1
    if run.steps > run.flow.max_steps:
        raise MaxStepsExceeded(run.flow.max_steps, run.path, run.flow.name)
    for inner in branch.frames[1:]:
        if inner.steps > inner.flow.max_steps:
            raise MaxStepsExceeded(inner.flow.max_steps, run.path, inner.flow.name)


def resumed(
    run: ActiveRun, branch: Branch, actor: NodeActor, values: Mapping[str, Any]
) -> Step | StepDone:
    """What sends a restored ``branch`` on: a Step for ``actor``, the node its frames
    point at (its step was under way), or a StepDone for the router to route with the
    store ``values`` the run's conditions read."""
    saved = branch.resume_at
    assert saved is not None
    if "params" in saved:
        return Step(run, branch, MappingProxyType(saved["params"]), actor)
    return StepDone(run, branch, actor, _decode_action(saved["action"]), values)


def encode_action(action: Action) -> dict[str, Any]:
    """``action`` as JSON."""
    return {
        "name": action.name,
        "params": dict(action.params),
        "complete": action.is_complete,
        "result": action.result,
    }


def _decode_action(data: Mapping[str, Any]) -> Action:
    if data["complete"]:
        return Action.complete(data["result"])
    return Action.with_params(data["name"], **data["params"])


# What a record must be: its shape, as new_record, step_done, succeeded and failed
# write it, checked once where a record is read (a start, a resume, a forget, a list).

_STATES: Final = ("running", "succeeded", "failed")
_RECORD_FIELDS: Final = (
    "run_id",
    "flow",
    "state",
    "params",
    "steps",
    "path",
    "last",
    "places",
    "result",
    "error",
)
_POSITION_FIELDS: Final = ("frames", "label", "count")
_ACTION_FIELDS: Final = ("name", "params", "complete", "result")
_RESULT_FIELDS: Final = ("final_action", "last_node_id", "value", "duration")
_FORK_FIELDS: Final = ("parent", "depth", "pending", "join")
_ARRIVAL_FIELDS: Final = ("fork", "order", "params")
_PLACE_KINDS: Final = {"fork": "a fan-out", "arrival": "an arrival at a join"}

_SHOWN: Final = reprlib.Repr()
"""Shows a value found in a record briefly, however long or deep it is."""
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 2, 40, 40


class _Malformed(Exception):
    """What is wrong with a run record, and where in it: raised by the checks below,
    caught by :func:`record_problem` alone."""


def record_problem(run_id: str, value: Any) -> str | None:
    """What is wrong with ``value`` as the record of the run ``run_id`` (a value the
    engine did not write: crafted, or damaged), or None when it is a record of that
    run as the engine writes them. Does not block; takes time in the length of the
    path's tail it holds (fewer than :data:`PATH_CHUNK` node ids). Its sealed chunks and
    its places are checked where they are read (see :func:`whole_path`,
    :func:`restore`)."""
    try:
        _check_record(run_id, value)
    except _Malformed as exc:
        return str(exc)
    return None


def _check_record(run_id: str, value: Any) -> None:
    record = _fields(value, "the record", _RECORD_FIELDS)
    _expect(record["run_id"] == run_id, "run_id", record["run_id"], f"{run_id!r} (its key's)")
    _expect(isinstance(record["flow"], str), "flow", record["flow"], "a flow name")
    state = record["state"]
    _expect(state in _STATES, "state", state, f"one of {', '.join(_STATES)}")
    _check_params(record["params"], "params")
    _check_path(record["steps"], record["path"])
    places = record["places"]
    _expect(_is_count(places), "places", places, "an int >= 0")
    if "owner" in record:
        _check_owner(record["owner"])
    _check_ending(record)
    if record["last"] is not None:
        _check_steps(record)


def _check_ending(record: dict[str, Any]) -> None:
    """A failed run's error is a message (another run's is null, or the message of a
    failure before it was resumed); a succeeded run's result is as :func:`succeeded`
    writes it, and another run has none."""
    error, result = record["error"], record["result"]
    if record["state"] == "failed":
        _expect(isinstance(error, str), "error", error, "the message of the failure")
    else:
        _expect(error is None or isinstance(error, str), "error", error, "null or a message")
    if record["state"] == "succeeded":
        _check_result(result)
    else:
        _expect(result is None, "result", result, f"null (the run is {record['state']})")


def _check_result(value: Any) -> None:
    """A succeeded run's result, as :func:`succeeded` writes it."""
    result = _fields(value, "result", _RESULT_FIELDS)
    _check_action(result["final_action"], "result.final_action")
    last_node = result["last_node_id"]
    _expect(isinstance(last_node, str), "result.last_node_id", last_node, "a node id")
    duration = result["duration"]
    is_seconds = isinstance(duration, int | float) and not isinstance(duration, bool)
    _expect(is_seconds, "result.duration", duration, "seconds")


def _check_steps(record: dict[str, Any]) -> None:
    """The last step of a record with a step, and the place numbers it names (see
    :func:`step_done`)."""
    places = record["places"]
    last = _position(record["last"], "last", _NUMBERS)
    _check_step_done(last, "last")
    _check_place_number(last["fork"], "last.fork", places, null=True)
    _check_place_number(last["place"], "last.place", places, null=False)


def _checked_place(run_id: str, key: str, value: Any, count: int) -> dict[str, Any]:
    """``value``, read from the store under ``key``, as a place of the run ``run_id``
    whose record counts ``count`` place numbers: a branch or a fan-out (see
    :class:`~cosmoflow_actors.runtime.places.Plan`). Raises DamagedRecordError naming the key
    and what is wrong."""
    try:
        _check_place(value, count)
    except _Malformed as exc:
        raise DamagedRecordError(
            f"run {run_id!r}: the store holds no valid place under {key!r}: {exc} (the "
            "engine never writes that: the place was crafted or damaged)",
            key,
        ) from None
    place: dict[str, Any] = value
    return place


def _check_place(value: Any, count: int) -> None:
    is_place = isinstance(value, dict) and len(value) == 1
    _expect(is_place, "the place", value, "an object of one 'branch', 'fork' or 'arrival'")
    if "branch" in value:
        _check_branch(value["branch"], "branch", count)
    elif "arrival" in value:
        _check_arrival(value["arrival"], "arrival", count)
    else:
        _check_fork(_fields(value, "the place", ("fork",))["fork"], "fork", count)


def _check_fork(value: Any, where: str, count: int) -> None:
    """A fan-out in progress, from a parent branch that may be in a fan-out."""
    fork = _fields(value, where, _FORK_FIELDS)
    parent = _position(fork["parent"], f"{where}.parent", ("fork",))
    _check_place_number(parent["fork"], f"{where}.parent.fork", count, null=True)
    _expect(_is_count(fork["depth"], least=1), f"{where}.depth", fork["depth"], "an int >= 1")
    pending = fork["pending"]
    _expect(_is_count(pending, least=1), f"{where}.pending", pending, "an int >= 1")
    join = fork["join"]
    _expect(join is None or isinstance(join, str), f"{where}.join", join, "null or a node id")


def _check_arrival(value: Any, where: str, count: int) -> None:
    """An arrival at the join of the fan-out it names, with its order and params."""
    arrival = _fields(value, where, _ARRIVAL_FIELDS)
    _check_place_number(arrival["fork"], f"{where}.fork", count, null=False)
    order = arrival["order"]
    _expect(_is_count(order), f"{where}.order", order, "an int >= 0")
    _check_params(arrival["params"], f"{where}.params")


def _check_branch(value: Any, where: str, count: int) -> None:
    """A branch in flight and where it goes on: its step, under way, is sent again
    (``params``), or its step, done, is routed again (``node`` and ``action``)."""
    branch = _position(value, where, ("fork",))
    _check_place_number(branch["fork"], f"{where}.fork", count, null=True)
    if "params" in branch:
        _check_params(branch["params"], f"{where}.params")
    else:
        _check_step_done(branch, where)


def _position(value: Any, where: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``value`` as a branch's saved position (see
    :func:`~cosmoflow_actors.runtime.places.position`), with the fields ``extra`` too."""
    saved = _fields(value, where, (*_POSITION_FIELDS, *extra))
    frames = saved["frames"]
    _expect(
        isinstance(frames, list) and frames != [], f"{where}.frames", frames, "a list of frames"
    )
    for number, frame in enumerate(frames):
        is_frame = isinstance(frame, list) and len(frame) == 2
        wanted = "[node id, steps]"
        _expect(is_frame and isinstance(frame[0], str), f"{where}.frames[{number}]", frame, wanted)
        _expect(_is_count(frame[1]), f"{where}.frames[{number}]", frame, wanted)
    _expect(isinstance(saved["label"], str), f"{where}.label", saved["label"], "a str")
    _expect(_is_count(saved["count"]), f"{where}.count", saved["count"], "an int >= 0")
    return saved


def _check_place_number(number: Any, where: str, count: int, *, null: bool) -> None:
    """``number`` names one of the ``count`` places of the run, or no place (None) when
    ``null`` allows it."""
    in_range = (number is None and null) or (_is_count(number) and number < count)
    wanted = f"a place's number, 0 to {count - 1}" if count else "a place's number (none is used)"
    _expect(in_range, where, number, f"null or {wanted}" if null else wanted)


def _check_step_done(saved: dict[str, Any], where: str) -> None:
    """``saved`` names the node of a step and the action it returned."""
    saved = _fields(saved, where, ("node", "action"))
    _expect(isinstance(saved["node"], str), f"{where}.node", saved["node"], "a node id")
    _check_action(saved["action"], f"{where}.action")


def _check_action(value: Any, where: str) -> None:
    """An action as :func:`encode_action` writes it."""
    action = _fields(value, where, _ACTION_FIELDS)
    name, complete = action["name"], action["complete"]
    _expect(isinstance(name, str) and name != "", f"{where}.name", name, "an action name")
    _expect(isinstance(complete, bool), f"{where}.complete", complete, "true or false")
    _check_params(action["params"], f"{where}.params")


def _check_path(steps: Any, path: Any) -> None:
    """The count of steps and the path's tail since its last sealed chunk (see
    :func:`step_done`): the steps are the sealed chunks' node ids and the tail's."""
    _expect(_is_count(steps), "steps", steps, "an int >= 0")
    _expect(isinstance(path, list), "path", path, "a list of node ids")
    for number, node_id in enumerate(path):
        _expect(isinstance(node_id, str), f"path[{number}]", node_id, "a node id")
    tail = len(path)
    _expect(tail < PATH_CHUNK, "path", path, f"a tail of fewer than {PATH_CHUNK} node ids")
    whole = steps >= tail and (steps - tail) % PATH_CHUNK == 0
    wanted = f"{tail} (its path's tail) plus a multiple of {PATH_CHUNK} (its sealed chunks)"
    _expect(whole, "steps", steps, wanted)


def _check_owner(value: Any) -> None:
    """The worker of a run queue that claimed the run (see :func:`owned`)."""
    owner = _fields(value, "owner", ("worker", "queue"))
    for field in ("worker", "queue"):
        _expect(isinstance(owner[field], str), f"owner.{field}", owner[field], "a str")


def _check_params(value: Any, where: str) -> None:
    is_params = isinstance(value, dict) and all(isinstance(key, str) for key in value)
    _expect(is_params, where, value, "an object of params")


def _fields(value: Any, where: str, required: Iterable[str]) -> dict[str, Any]:
    """``value`` as an object holding the fields ``required``."""
    if not isinstance(value, dict):
        raise _Malformed(f"{where} is {_shown(value)}, not an object")
    missing = [repr(field) for field in required if field not in value]
    if missing:
        raise _Malformed(f"{where} lacks {', '.join(missing)}")
    return value


def _is_count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _expect(holds: bool, where: str, value: Any, wanted: str) -> None:
    if not holds:
        raise _Malformed(f"{where} is {_shown(value)}, not {wanted}")


def _shown(value: Any) -> str:
    """``value`` in brief, with its type."""
    return f"{_SHOWN.repr(value)} ({type(value).__name__})"
