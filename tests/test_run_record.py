"""A durable run's record (runtime/run_record.py): what a record must hold, what it says
of a failed run, and a recorded run put back only into the flow it was recorded for."""

from __future__ import annotations

import copy
import functools
import operator
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import outcome
import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.runtime import run_record
from cosmoflow_actors.storage.base import PARTS_PREFIX, path_chunk_key, place_key
from tests.support import Gate, Recorder, single, ticking


@pytest.mark.parametrize("start", ["run", "resume"])
async def test_a_recorded_run_of_another_flow_is_refused_whatever_its_state(
    tmp_path: Path, start: str
) -> None:
    path = tmp_path / "s.json"
    other = single(Recorder(), "other")
    async with cf.open_engine() as engine:
        await engine.run(single(Recorder(), "loop"), cf.FileStorage(path), run_id="done")
        begin = engine.run if start == "run" else engine.resume
        with pytest.raises(cf.CosmoFlowError, match="belongs to flow 'loop', not 'other'"):
            await begin(other, cf.FileStorage(path), run_id="done")


KEY = "__cosmoflow__/runs/r1"
"""The record key of run "r1", the run each crafted record below is of."""

DROP = object()
"""An edit's value: the field is removed."""


def a_then_b(b_fails: bool) -> cf.Flow:
    """Node "a" (a Recorder), then node "b", which fails if ``b_fails``."""

    @cf.node
    def b(ctx: cf.ExecutionContext) -> None:
        if b_fails:
            raise RuntimeError("b fails")

    builder = cf.Flow.builder("ab").add_node("a", Recorder()).add_node("b", b)
    return builder.add_route("a", "b").build()


async def written_records(path: Path) -> dict[str, dict[str, Any]]:
    """Records as the engine writes them, read back from a FileStorage at ``path``:
    "failed" after step "a" (its step recorded, with where its branch goes on), and
    "succeeded"."""
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError):
            await engine.run(a_then_b(b_fails=True), cf.FileStorage(path), run_id="failed")
        await engine.run(a_then_b(b_fails=False), cf.FileStorage(path), run_id="succeeded")
    storage = cf.FileStorage(path)
    await storage.open()
    try:
        return {
            run_id: await storage.get(run_record.record_key(run_id))
            for run_id in ("failed", "succeeded")
        }
    finally:
        await storage.aclose()


def edited(record: dict[str, Any], edits: dict[tuple[Any, ...], Any]) -> Any:
    """A copy of ``record`` (made the record of run "r1") with each field at a path of
    ``edits`` set to its value (removed for DROP; the whole record for the path ())."""
    crafted: Any = copy.deepcopy({**record, "run_id": "r1"})
    for path, value in edits.items():
        if not path:
            crafted = value
            continue
        *parents, last = path
        inner = functools.reduce(operator.getitem, parents, crafted)
        if value is DROP:
            del inner[last]
        else:
            inner[last] = value
    return crafted


FORK: dict[str, Any] = {
    "parent": {"frames": [["a", 0]], "label": "", "count": 0, "fork": None},
    "depth": 1,
    "pending": 1,
    "join": None,
}
"""A fan-out as the engine saves it."""

ACTION = ("last", "action")

CRAFTED = [
    ("not-an-object", "failed", {(): "garbage"}, "the record is 'garbage' (str), not an object"),
    ("field-missing", "failed", {("last",): DROP}, "the record lacks 'last'"),
    ("run-id-of-another-run", "failed", {("run_id",): "zz"}, "run_id is 'zz' (str), not 'r1'"),
    ("run-id-an-int", "failed", {("run_id",): 7}, "run_id is 7 (int), not 'r1' (its key's)"),
    ("flow-an-int", "failed", {("flow",): 7}, "flow is 7 (int), not a flow name"),
    ("state-unknown", "failed", {("state",): "weird"}, "state is 'weird' (str), not one of"),
    ("state-an-int", "failed", {("state",): 3}, "state is 3 (int), not one of running, succ"),
    ("params-a-list", "failed", {("params",): [1]}, "params is [1] (list), not an object of"),
    ("path-an-int", "failed", {("path",): 5}, "path is 5 (int), not a list of node ids"),
    ("path-of-ints", "failed", {("path",): [3]}, "path[0] is 3 (int), not a node id"),
    ("steps-missing", "failed", {("steps",): DROP}, "the record lacks 'steps'"),
    ("steps-a-str", "failed", {("steps",): "1"}, "steps is '1' (str), not an int >= 0"),
    ("steps-a-bool", "failed", {("steps",): True}, "steps is True (bool), not an int >= 0"),
    (
        "steps-fewer-than-the-path",
        "succeeded",
        {("steps",): 1},
        "steps is 1 (int), not 2 (its path's tail) plus a multiple of 1024 (its sealed",
    ),
    (
        "steps-beyond-the-path-unsealed",
        "succeeded",
        {("steps",): 3},
        "steps is 3 (int), not 2 (its path's tail) plus a multiple of 1024",
    ),
    (
        "path-a-whole-chunk",
        "succeeded",
        {("path",): ["a"] * 1024, ("steps",): 1024},
        "path is ['a', 'a', 'a', 'a', 'a', 'a', ...] (list), not a tail of fewer than 1024 node",
    ),
    ("owner-without-queue", "failed", {("owner",): {"worker": "w"}}, "owner lacks 'queue'"),
    ("error-an-int", "failed", {("error",): 5}, "error is 5 (int), not the message of the"),
    ("result-of-a-failed-run", "failed", {("result",): 1}, "result is 1 (int), not null (the run"),
    ("last-a-str", "failed", {("last",): "x"}, "last is 'x' (str), not an object"),
    ("last-count-a-str", "failed", {("last", "count"): "x"}, "last.count is 'x' (str), not an int"),
    ("frames-a-str", "failed", {("last", "frames"): "a"}, "last.frames is 'a' (str"),
    ("frames-empty", "failed", {("last", "frames"): []}, "last.frames is [] (list)"),
    (
        "frame-without-steps",
        "failed",
        {("last", "frames", 0): ["a"]},
        "last.frames[0] is ['a'] (list), not [node id, steps]",
    ),
    (
        "frame-steps-negative",
        "failed",
        {("last", "frames", 0, 1): -1},
        "last.frames[0] is ['a', -1] (list), not [node id, steps]",
    ),
    ("count-negative", "failed", {("last", "count"): -5}, "last.count is -5 (int)"),
    ("count-a-bool", "failed", {("last", "count"): True}, "last.count is True (bo"),
    (
        "last-fork-beyond-the-places",
        "failed",
        {("last", "fork"): 3},
        "last.fork is 3 (int), not null or a place's number, 0 to 0",
    ),
    ("places-a-str", "failed", {("places",): "1"}, "places is '1' (str), not an int >= 0"),
    (
        "last-place-beyond-the-places",
        "failed",
        {("last", "place"): 1},
        "last.place is 1 (int), not a place's number, 0 to 0",
    ),
    ("last-place-null", "failed", {("last", "place"): None}, "last.place is None (NoneType), not"),
    ("action-missing", "failed", {ACTION: DROP}, "last lacks 'action'"),
    ("action-an-int", "failed", {ACTION: 5}, "last.action is 5 (int), not an object"),
    ("action-name-empty", "failed", {(*ACTION, "name"): ""}, "last.action.name is '' (s"),
    (
        "action-params-a-list",
        "failed",
        {(*ACTION, "params"): [1]},
        "last.action.params is [1] (list), not an object of params",
    ),
    (
        "action-complete-a-str",
        "failed",
        {(*ACTION, "complete"): "yes"},
        "last.action.complete is 'yes' (str), not true or false",
    ),
    ("result-null", "succeeded", {("result",): None}, "result is None (NoneType), not an object"),
    (
        "result-action-an-int",
        "succeeded",
        {("result", "final_action"): 5},
        "result.final_action is 5 (int), not an object",
    ),
    (
        "result-duration-a-str",
        "succeeded",
        {("result", "duration"): "1s"},
        "result.duration is '1s' (str), not seconds",
    ),
]
"""Records the engine never writes: (id, the written record edited, the edits, what
the StorageError says is wrong)."""


def stored_files(directory: Path) -> dict[str, bytes]:
    """The contents of the FileStorage files in ``directory`` (its data: not the lock
    file, which names the process that holds the store)."""
    return {file.name: file.read_bytes() for file in directory.iterdir() if file.suffix != ".lock"}


@pytest.mark.parametrize(
    ("written", "edits", "problem"),
    [pytest.param(*case[1:], id=case[0]) for case in CRAFTED],
)
async def test_a_crafted_run_record_is_refused_naming_its_key_and_fault_and_left_as_it_is(
    tmp_path: Path, written: str, edits: dict[tuple[Any, ...], Any], problem: str
) -> None:
    crafted = edited((await written_records(tmp_path / "written.json"))[written], edits)
    path = tmp_path / "store.json"
    storage = cf.FileStorage(path)
    await storage.open()
    await storage.set(KEY, crafted)
    await storage.commit()
    await storage.aclose()
    files = stored_files(tmp_path)
    refused = re.escape(f"no valid run record under {KEY!r}: {problem}")
    fixed = a_then_b(b_fails=False)
    async with cf.open_engine() as engine:
        starts: list[Callable[[], Awaitable[Any]]] = [
            functools.partial(engine.run, fixed, cf.FileStorage(path), run_id="r1"),
            functools.partial(engine.resume, fixed, cf.FileStorage(path), run_id="r1"),
            functools.partial(engine.list_runs, cf.FileStorage(path)),
            functools.partial(engine.forget_run, cf.FileStorage(path), "r1"),
        ]
        for start in starts:
            with pytest.raises(cf.StorageError, match=refused):
                await start()
        assert stored_files(tmp_path) == files
        done = await engine.run(fixed, cf.FileStorage(path), run_id="r2")
    assert done.execution_path == ("a", "b")


UNDER_WAY: dict[str, Any] = {
    "frames": [["b", 0]],
    "label": "",
    "count": 2,
    "params": {},
    "fork": None,
}
"""A branch whose step at "b" is under way, as the engine saves it in a place."""

ARRIVAL: dict[str, Any] = {"fork": 2, "order": 0, "params": {"k": 1}}
"""An arrival at the join of the fan-out in place 2, as the engine saves it."""

INVALID = "the store holds no valid place under KEY: "
NAMED = "a place names the fan-out at KEY, which "

CRAFTED_PLACES = [
    ("not-one-kind", {1: 5}, 1, INVALID + "the place is 5 (int), not an object of one 'br"),
    ("two-kinds", {1: {"branch": {}, "fork": {}}}, 1, INVALID + "the place is {'branch': {}"),
    ("branch-frames-a-str", {1: {"branch": {**UNDER_WAY, "frames": "a"}}}, 1, INVALID + "bra"),
    (
        "branch-params-a-str",
        {1: {"branch": {**UNDER_WAY, "params": "x"}}},
        1,
        INVALID + "branch.params is 'x' (str), not an object of params",
    ),
    (
        "branch-fork-beyond-the-places",
        {1: {"branch": {**UNDER_WAY, "fork": 3}}},
        1,
        INVALID + "branch.fork is 3 (int), not null or a place's number, 0 to 2",
    ),
    ("fork-malformed", {1: {"fork": {"x": 1}}}, 1, INVALID + "fork lacks 'parent', 'depth', "),
    (
        "fork-pending-none",
        {1: {"fork": {**FORK, "pending": 0}}},
        1,
        INVALID + "fork.pending is 0 (int), not an int >= 1",
    ),
    ("fork-missing", {1: {"branch": {**UNDER_WAY, "fork": 2}}}, 2, NAMED + "holds no fan-out"),
    (
        "last-step-at-a-fan-outs-place",
        {0: {"fork": FORK}},
        0,
        "its record's last step names the place KEY, which holds a fan-out",
    ),
    ("arrival-malformed", {1: {"arrival": {"x": 1}}}, 1, INVALID + "arrival lacks 'fork', 'o"),
    (
        "arrival-order-negative",
        {1: {"arrival": {**ARRIVAL, "order": -1}}, 2: {"fork": FORK}},
        1,
        INVALID + "arrival.order is -1 (int), not an int >= 0",
    ),
    ("arrival-fork-missing", {1: {"arrival": ARRIVAL}}, 2, NAMED + "holds no fan-out"),
    (
        "arrival-after-a-missing-one",
        {1: {"arrival": {**ARRIVAL, "order": 1}}, 2: {"fork": FORK}},
        1,
        "the place KEY holds arrival 1 at its fan-out's join, where arrival 0 is missing",
    ),
    (
        "last-step-at-an-arrivals-place",
        {0: {"arrival": ARRIVAL}, 2: {"fork": FORK}},
        0,
        "its record's last step names the place KEY, which holds an arrival at a join",
    ),
    (
        "fork-inside-itself",
        {
            1: {"fork": {**FORK, "parent": {**FORK["parent"], "fork": 1}}},
            2: {"branch": {**UNDER_WAY, "fork": 1}},
        },
        1,
        NAMED + "holds a fan-out inside itself",
    ),
]
"""Places the engine never writes, beside the record of run "r1" that fails at "b" (its
record counting 3 places): (id, the places by number, the number of the place at fault,
what the StorageError says, the key at fault's repr in place of KEY)."""


@pytest.mark.parametrize(
    ("places", "at_fault", "problem"),
    [pytest.param(*case[1:], id=case[0]) for case in CRAFTED_PLACES],
)
async def test_a_crafted_place_is_refused_at_resume_naming_its_key_and_fault_and_left_as_it_is(
    tmp_path: Path, places: dict[int, Any], at_fault: int, problem: str
) -> None:
    record = edited((await written_records(tmp_path / "written.json"))["failed"], {})
    path = tmp_path / "store.json"
    storage = cf.FileStorage(path)
    await storage.open()
    await storage.set(KEY, {**record, "places": 3})
    for number, place in places.items():
        await storage.set(place_key("r1", number), place)
    await storage.commit()
    await storage.aclose()
    files = stored_files(tmp_path)
    refused = re.escape(f"run 'r1': {problem.replace('KEY', repr(place_key('r1', at_fault)))}")
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError, match=refused):
            await engine.resume(a_then_b(b_fails=False), cf.FileStorage(path), run_id="r1")
    assert stored_files(tmp_path) == files


async def test_a_run_failed_for_an_action_no_route_takes_fails_again_at_resume(
    tmp_path: Path,
) -> None:
    """Its record holds a step whose action no route takes: with the flow that recorded
    it, a resume routes it again and fails as the run did (only a running record's step
    is checked against the flow's routes before anything runs)."""
    flow = (
        cf.Flow.builder("unrouted")
        .add_node("a", Recorder("oops"))
        .add_node("b", Recorder())
        .add_route("a", "b")
        .build()
    )
    async with cf.open_engine() as engine:
        for start in (engine.run, engine.resume):
            with pytest.raises(cf.NoRouteError, match="'oops'"):
                await start(flow, cf.FileStorage(tmp_path / "store.json"), run_id="r1")
        runs = await engine.list_runs(cf.FileStorage(tmp_path / "store.json"))
    assert [(run.state, run.steps) for run in runs] == [("failed", 1)]


async def test_a_run_failed_otherwise_is_refused_a_flow_with_no_route_for_its_step(
    tmp_path: Path,
) -> None:
    """Its record holds step "a", done with the action "default", which the new version
    routes on "other" alone: the resume is refused before anything runs, its record
    left failed with its own error."""
    path = tmp_path / "store.json"
    changed = (
        cf.Flow.builder("ab")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b", "other")
        .build()
    )
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError, match="node 'b' failed"):
            await engine.run(a_then_b(b_fails=True), cf.FileStorage(path), run_id="r1")
        recorded = await stored_run(engine, cf.FileStorage(path))
        with pytest.raises(cf.RunRecordedError, match="returned action 'default', which no"):
            await engine.resume(changed, cf.FileStorage(path), run_id="r1")
        assert await stored_run(engine, cf.FileStorage(path)) == recorded
    assert recorded[0]["state"] == "failed"


async def test_records_the_engine_writes_pass_as_they_are(tmp_path: Path) -> None:
    """The records the table above edits: each fault it refuses is the edit's."""
    records = await written_records(tmp_path / "written.json")
    for written, record in records.items():
        assert run_record.record_problem(written, record) is None
        crafted = edited(record, {})
        assert run_record.checked_record(KEY, crafted) == crafted
    owner = {"worker": "w", "queue": "redis://127.0.0.1:6379/0/q"}
    running = {**records["failed"], "state": "running", "owner": owner}
    assert run_record.record_problem("failed", running) is None


async def test_a_worker_names_itself_in_a_sound_record_and_leaves_a_crafted_one_alone(
    tmp_path: Path,
) -> None:
    failed = (await written_records(tmp_path / "written.json"))["failed"]
    owner = {"worker": "w", "queue": "q"}
    claimed = run_record.owned(failed, "failed", "ab", {}, owner)
    assert claimed == {**failed, "owner": owner}
    crafted = {**failed, "state": "weird"}
    assert run_record.owned(crafted, "failed", "ab", {}, owner) is crafted


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


def test_the_record_of_a_failed_run_names_an_error_that_cannot_be_printed() -> None:
    assert run_record.failed({"state": "running"}, Unprintable())["error"] == (
        "Unprintable: <unprintable>"
    )
    assert run_record.failed({}, ValueError("bad"))["error"] == "ValueError: bad"


async def test_resuming_with_a_flow_that_lost_the_recorded_node_names_it(tmp_path: Path) -> None:
    @cf.node
    def fails(ctx: cf.ExecutionContext) -> None:
        raise RuntimeError("b fails")

    recorded = cf.Flow.builder("f").add_node("a", cf.node(lambda ctx: None))
    recorded = recorded.add_node("b", fails).add_route("a", "b").build()
    changed = cf.Flow.builder("f").add_node("b", cf.node(lambda ctx: None)).build()
    storage = cf.FileStorage(tmp_path / "store.json")
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError):
            await engine.run(recorded, storage, run_id="r")
        with pytest.raises(cf.CosmoFlowError, match="is at node 'a', which flow 'f' lacks"):
            await engine.resume(changed, storage, run_id="r")


def test_run_order_compares_the_numbers_of_a_childs_id_as_numbers() -> None:
    """A fan-out branch's child (``2.1/4``) and an id padded with a zero sort the same way
    every time: the padded one first, its twin's id breaking the tie."""
    ordered = ["job", "job:02/0", "job:2/0", "job:2.1/4/0", "job:9/0", "job:10/0", "job0"]
    assert sorted(reversed(ordered), key=run_record.run_order) == ordered


def test_run_order_takes_numbers_past_ints_digit_limit() -> None:
    """A child's number of more digits than ``int()`` converts (4,300) still sorts as a
    number, so one odd id does not break the listing of a whole store."""
    long = "1" + "0" * 5000
    ordered = ["x", "x:9/0", f"x:0{long}/0", f"x:{long}/0", f"x:{long}1/0"]
    assert sorted(reversed(ordered), key=run_record.run_order) == ordered


@pytest.mark.parametrize(
    ("recorded", "params"),
    [
        ({"tags": ["c", "a", "b"]}, {"tags": {"a", "b", "c"}}),
        ({"tags": ["c", "a", "b"]}, {"tags": frozenset({"a", "b", "c"})}),
        ({"deep": [{"tags": [2, 1]}]}, {"deep": ({"tags": {1, 2}},)}),
        ({"tags": {"b", "a"}}, {"tags": {"a", "b"}}),
    ],
)
def test_a_set_in_recorded_params_matches_in_any_order(
    recorded: dict[str, Any], params: dict[str, Any]
) -> None:
    """A set of str is iterated in another order in each process, and JSON records it as
    an array in the order of the process that wrote it: a resume in another process
    must still find the params the same."""
    assert run_record._same_params(recorded, params)


@pytest.mark.parametrize(
    ("recorded", "params"),
    [
        ({"order": [2, 1]}, {"order": [1, 2]}),
        ({"tags": ["a", "a"]}, {"tags": {"a"}}),
        ({"tags": [1]}, {"tags": {1.0}}),
        ({"tags": [True]}, {"tags": {1}}),
        ({"tags": {"a": 1}}, {"tags": {"a"}}),
        ({"x": 1}, {"x": 1, "y": 2}),
    ],
)
def test_params_that_differ_in_json_do_not_match(
    recorded: dict[str, Any], params: dict[str, Any]
) -> None:
    """A list keeps its order, a set its items, and 1, 1.0 and True differ."""
    assert not run_record._same_params(recorded, params)


def fan(c: cf.Node | cf.Flow, *, join: bool = True, max_steps: int | None = None) -> cf.Flow:
    """Flow "fan": node "a" fans out to "b", "e" and ``c`` (node "c"), which all go on
    to the join "j" (with ``join``; else each ends its branch)."""
    builder = cf.Flow.builder("fan").add_node("a", Recorder())
    builder.add_node("b", Recorder()).add_node("e", Recorder()).add_node("c", c)
    builder.add_route("a", ["b", "e", "c"])
    if join:
        builder.add_join("j", Recorder())
        for node_id in ("b", "e", "c"):
            builder.add_route(node_id, "j")
    if max_steps is not None:
        builder.max_steps(max_steps)
    return builder.build()


def durable_storage(kind: str, tmp_path: Path) -> cf.Storage:
    """A FileStorage or an SQLiteStorage in ``tmp_path`` (the same files each call)."""
    if kind == "file":
        return cf.FileStorage(tmp_path / "store.json")
    return cf.SQLiteStorage(tmp_path / "store.db")


async def interrupted_fan(engine: cf.Engine, storage: cf.Storage, gate: Gate) -> None:
    """Record run "r1" of :func:`fan` as cancelled with "b" and "e" committed (one of
    them waiting at "j" in its fan-out's record) and "c", ``gate``, under way."""
    async with engine.events() as events:
        run = await engine.start_run(fan(gate), storage, run_id="r1")
        committed: set[str] = set()
        async for event in events:
            if isinstance(event, cf.StepFinished) and event.action is not None:
                committed.add(event.node_id)
                if committed == {"a", "b", "e"}:
                    break
    run.cancel()
    with pytest.raises(cf.RunCancelledError):
        await run.wait()


async def stored_run(engine: cf.Engine, storage: cf.Storage) -> tuple[Any, list[Any]]:
    """Run "r1"'s record and places as ``storage`` holds them."""
    async with engine.open_store(storage) as store:
        record = await store.get(KEY)
        keys = [place_key("r1", number) for number in range(record["places"])]
        return record, list((await store.get_many(keys)).values())


def fan_routed_on(action: str) -> cf.Flow:
    """Flow "fan" whose "b" and "e" go on to the join "j" on ``action`` alone."""
    builder = cf.Flow.builder("fan").add_node("a", Recorder())
    builder.add_node("b", Recorder()).add_node("e", Recorder()).add_node("c", Recorder())
    builder.add_route("a", ["b", "e", "c"]).add_join("j", Recorder())
    builder.add_route("b", "j", action).add_route("e", "j", action).add_route("c", "j")
    return builder.build()


ADVICE = "resume it with flow 'fan' as it was when the run started (the version that recorded it)"

CHANGED_FANS: list[tuple[str, Callable[[], cf.Flow], type[Exception], str]] = [
    (
        "join removed",
        lambda: fan(Recorder(), join=False),
        cf.RunRecordedError,
        "run 'r1' has branches of the fan-out at node 'a' waiting at join 'j', which flow "
        f"'fan' no longer has as a join (removed, renamed or made a plain node since the run "
        f"was recorded): {ADVICE}; nothing ran and its record stays running",
    ),
    (
        "action of a step done no longer routed",
        lambda: fan_routed_on("other"),
        cf.RunRecordedError,
        "that returned action 'default', which no route from ",
    ),
    (
        "node under way nested",
        lambda: fan(single(Recorder(), "inner")),
        cf.RunRecordedError,
        f"run 'r1' has a step at node 'c' of flow 'fan', which is now a nested flow: {ADVICE}",
    ),
    (
        "max_steps lowered below the step under way",
        lambda: fan(Recorder(), max_steps=3),
        cf.MaxStepsExceeded,
        "run exceeded max_steps=3 of flow 'fan'",
    ),
]
"""Flows "fan" changed so that :func:`interrupted_fan`'s record no longer fits: (id,
the changed flow, the error its resume raises, the start of its message)."""


@pytest.mark.parametrize("kind", ["file", "sqlite"])
@pytest.mark.parametrize(
    ("changed", "error", "message"), [pytest.param(*case[1:], id=case[0]) for case in CHANGED_FANS]
)
async def test_a_resume_with_a_flow_the_record_no_longer_fits_is_refused_before_anything_runs(
    tmp_path: Path,
    kind: str,
    changed: Callable[[], cf.Flow],
    error: type[Exception],
    message: str,
) -> None:
    """The run alone is refused, its record left as it was: the engine's other runs go
    on, and a resume with the flow that recorded it finishes the run."""
    gate = Gate()
    other_gate = Gate()
    async with cf.open_engine() as engine:
        await interrupted_fan(engine, durable_storage(kind, tmp_path), gate)
        recorded = await stored_run(engine, durable_storage(kind, tmp_path))
        under_way = [place["branch"] for place in recorded[1] if "branch" in place]
        assert {"frames": [["c", 0]], "params": {}}.items() <= under_way[-1].items()
        assert [place["fork"]["join"] for place in recorded[1] if "fork" in place] == ["j"]
        other = await engine.start_run(single(other_gate, "other"))
        with pytest.raises(error, match=re.escape(message)):
            await engine.resume(changed(), durable_storage(kind, tmp_path), run_id="r1")
        assert gate.entered == 1
        assert await stored_run(engine, durable_storage(kind, tmp_path)) == recorded
        other_gate.open.set()
        assert (await other.wait()).execution_path == ("only",)
        gate.open.set()
        result = await engine.resume(fan(gate), durable_storage(kind, tmp_path), run_id="r1")
    assert gate.entered == 2
    assert sorted(result.execution_path[1:4]) == ["b", "c", "e"]
    assert result.execution_path[::4] == ("a", "j")


CHUNK = 4
"""The path chunk of the tests below, patched in for PATH_CHUNK: short runs seal chunks."""


async def stored_values(path: Path) -> dict[str, Any]:
    """Every key of the FileStorage at ``path`` (the engine's too) and its value."""
    storage = cf.FileStorage(path)
    await storage.open()
    try:
        return {key: await storage.get(key) for key in await storage.keys()}
    finally:
        await storage.aclose()


async def run_ticks(
    path: Path, run_id: str, steps: int, max_steps: int = 10_000
) -> outcome.Outcome[cf.FlowResult]:
    """The outcome of a durable run of ``ticking`` that wants ``steps`` steps."""
    async with cf.open_engine() as engine:
        async with engine.open_store(cf.FileStorage(path)) as store:
            await store.set("steps", steps)
        flow = ticking(max_steps)
        return await outcome.acapture(engine.run, flow, cf.FileStorage(path), run_id=run_id)


@pytest.mark.parametrize("steps", [8, 11])
async def test_a_long_run_seals_its_path_in_chunks_and_reads_it_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: int
) -> None:
    monkeypatch.setattr(run_record, "PATH_CHUNK", CHUNK)
    path = tmp_path / "store.json"
    done = (await run_ticks(path, "long", steps)).unwrap()
    async with cf.open_engine() as engine:
        again = await engine.run(ticking(), cf.FileStorage(path), run_id="long")
        runs = await engine.list_runs(cf.FileStorage(path))

    assert done.execution_path == again.execution_path == ("tick",) * steps
    assert (again.steps_executed, again.result) == (steps, steps)
    assert [(run.run_id, run.state, run.steps) for run in runs] == [("long", "succeeded", steps)]
    stored = await stored_values(path)
    chunks = {key: value for key, value in stored.items() if key.startswith(PARTS_PREFIX)}
    sealed = range(steps // CHUNK)
    assert chunks == {path_chunk_key("long", number): ["tick"] * CHUNK for number in sealed}
    record = stored[run_record.record_key("long")]
    assert (record["steps"], record["path"]) == (steps, ["tick"] * (steps % CHUNK))


async def edit_store(path: Path, key: str, value: Any) -> None:
    """Set ``key`` of the FileStorage at ``path`` to ``value`` (delete it for DROP)."""
    storage = cf.FileStorage(path)
    await storage.open()
    if value is DROP:
        await storage.delete(key)
    else:
        await storage.set(key, value)
    await storage.commit()
    await storage.aclose()


@pytest.mark.parametrize(
    ("max_steps", "chunk", "problem"),
    [
        (100, DROP, "the store holds no path chunk under {key!r}, which its record counts"),
        (9, DROP, "the store holds no path chunk under {key!r}, which its record counts"),
        (100, ["tick"], "no valid path chunk under {key!r}: it holds ['tick'] (list), not a"),
        (100, "tick", "no valid path chunk under {key!r}: it holds 'tick' (str), not a list"),
        (100, [1, 2, 3, 4], "no valid path chunk under {key!r}: it holds [1, 2, 3, 4] (list)"),
    ],
)
async def test_a_missing_or_damaged_path_chunk_is_a_storage_error_naming_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_steps: int, chunk: Any, problem: str
) -> None:
    """Of a succeeded run (its recorded result is read), and of a failed one (resumed:
    max_steps ended it after chunks were sealed)."""
    monkeypatch.setattr(run_record, "PATH_CHUNK", CHUNK)
    path = tmp_path / "store.json"
    ran = await run_ticks(path, "long", 10, max_steps)
    assert isinstance(ran, outcome.Value) == (max_steps == 100)
    key = path_chunk_key("long", 1)
    await edit_store(path, key, chunk)
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError, match=re.escape(problem.format(key=key))):
            await engine.resume(ticking(), cf.FileStorage(path), run_id="long")


@pytest.mark.parametrize(
    ("reordered", "written"),
    [(set(), [1]), ({0}, [0, 1])],
)
def test_a_succeeded_record_writes_the_chunks_its_path_fills_past_the_committed_ones(
    monkeypatch: pytest.MonkeyPatch, reordered: set[int], written: list[int]
) -> None:
    """Steps that started and never committed (the run ended meanwhile) are in the
    result's path, so in the final record: it seals the chunks they fill, and writes
    again those sealed in another order."""
    monkeypatch.setattr(run_record, "PATH_CHUNK", 2)
    record = {**run_record.new_record("r", "f", {}), "steps": 3, "path": ["c"]}
    path = ("a", "b", "c", "d", "e")
    result = cf.FlowResult(
        run_id="r",
        flow_name="f",
        final_action=cf.Action.complete(1),
        last_node_id="e",
        steps_executed=5,
        execution_path=path,
        result=1,
        success=True,
        duration=0.5,
        store={},
    )
    ended, ops = run_record.succeeded(record, result, reordered)
    assert (ended["state"], ended["steps"], ended["path"]) == ("succeeded", 5, ["e"])
    chunks = {0: ["a", "b"], 1: ["c", "d"]}
    assert ops == [("set", path_chunk_key("r", n), chunks[n]) for n in written]
    assert run_record.record_problem("r", ended) is None


def test_parts_read_with_the_record_they_belong_to_are_given_without_it() -> None:
    record = {**run_record.new_record("r", "f", {}), "steps": 2, "places": 1}
    named = {**record, "owner": "w2"}  # another worker named itself: no step committed
    read = {run_record.record_key("r"): named, place_key("r", 0): {"place": 0}}
    assert run_record.parts_read(record, read) == {place_key("r", 0): {"place": 0}}


@pytest.mark.parametrize(
    ("again", "what"),
    [
        ({"steps": 3}, "committed a step of it"),  # in between
        ({"state": "succeeded"}, "committed a step of it"),  # ended the run
        (None, "forgot it"),
    ],
)
def test_parts_read_with_a_record_that_moved_on_are_a_conflict(
    again: dict[str, Any] | None, what: str
) -> None:
    record = {**run_record.new_record("r", "f", {}), "steps": 2}
    stored = None if again is None else {**record, **again}
    with pytest.raises(cf.RunConflictError, match=f"run 'r': another engine {what} while"):
        run_record.parts_read(record, {run_record.record_key("r"): stored})
