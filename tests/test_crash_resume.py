"""Durable runs killed with SIGKILL after each committed step, then resumed: a differential
test against the same run left uninterrupted.

The flows (:mod:`tests.crash_resume_worker`) cover the shapes a run's record holds:
loops bounded by the store, a fan-out with a join, a fan-out whose branches end without
one, nested flows (with a loop, and with fan-outs inside), routes and a conditional
action that read the store, and a BatchFlow's durable child runs (in a fan-out too).
For each flow and backend, a forked worker runs the flow durably and stops it after
``k`` committed steps, for every ``k`` from none to all of them. In "between" mode the
next step stops before it writes; in "mid" mode it stops after its ``post`` staged its
writes; in "end" mode every step is committed and the run's end is not recorded yet.
The test waits for the worker to report the k-th commit and the stop, kills it with
SIGKILL, and checks that the store holds exactly the k committed steps. (Runs are also
killed twice: resumed in a second worker, and stopped and killed again there.) Then it
resumes the run in this process and checks it against the uninterrupted run:

- the store: every key equal (each counter counts each step once, each log lists each
  step once), the logs compared as multisets for a fan-out, whose branches may
  interleave differently;
- the FlowResult: run id, flow, result and step count equal, and an end (last node,
  final action) the flow can have; for a run without fan-out the execution path, last
  node and final action equal too, for a fan-out the path as a multiset
  (docs/durability.md: the same steps, possibly interleaved differently), and the
  path starts with the path the record held when the process was killed;
- ``list_runs``: every run (a BatchFlow's children too) succeeded, with the same steps;
- the steps: no committed step's ``prep``, ``exec`` or ``post`` ran again, every other
  step of the uninterrupted run ran once, and the step stopped in "mid" mode ran again
  in full.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.run_record import PATH_CHUNK, record_key, whole_path
from cosmoflow_actors.storage.base import RECORD_PREFIX, RESERVED_PREFIX
from tests.crash_resume_worker import BATCH_NODE, FLOWS, LONG, RUN_ID, Hooks, open_storage
from tests.storage_suite import RedisServer, unique_namespace
from tests.support import WorkerServer, worker_server

TIMEOUT: Final = 30.0
"""Seconds a trial (or the server's start or stop) may take before the test fails."""


@dataclass
class Child:
    """A forked worker child and the lines it wrote."""

    pid: int
    lines: list[str]

    def ids(self, word: str) -> list[str]:
        """The execution ids of its lines ``"<word> <execution id> ..."``."""
        return [line.split()[1] for line in self.lines if line.split()[0] == word]

    @property
    def committed(self) -> list[str]:
        return self.ids("step")

    @property
    def done(self) -> bool:
        return "done" in self.lines

    def stopped(self, mode: str) -> bool:
        """Whether the gate stopped a step of its run where ``mode`` says (in "mid" mode,
        the one that stops after staging its writes; else any)."""
        places = [line.split()[2] for line in self.lines if line.startswith("halted ")]
        return "staged" in places if mode == "mid" else bool(places)


class Server(WorkerServer):
    """The worker server (see :mod:`tests.crash_resume_worker`)."""

    async def stop_after(self, job: dict[str, Any]) -> Child:
        """Run ``job``; once it reported its ``k`` commits and its stop (or its end),
        SIGKILL it, reap it and return what it reported."""
        with trio.fail_after(TIMEOUT):
            await self._send(json.dumps(job))
            child = Child(int((await self._line()).removeprefix("pid ")), [])
            while not child.done and not (
                len(child.committed) >= job["k"] and child.stopped(job["mode"])
            ):
                child.lines.append(await self._line())
                assert child.lines[-1] != "crashed", f"the worker failed: {self.log.read_text()}"
            os.kill(child.pid, signal.SIGKILL)
            await self._send("reap")
            while not (line := await self._line()).startswith("exit "):
                child.lines.append(line)
        status = int(line.removeprefix("exit "))
        assert status in (0, -signal.SIGKILL), f"the worker failed: {self.log.read_text()}"
        return child


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    log = tmp_path / "worker.log"
    async with worker_server(Server, "tests.crash_resume_worker", log) as running:
        yield running


class Place:
    """Where a flow's trials keep their stores: a fresh file, database or Redis
    namespace per name."""

    def __init__(self, backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.redis_url = ""
        if backend == "redis":
            redis_server: RedisServer = request.getfixturevalue("redis_server")
            self.redis_url = redis_server.url

    def job(self, flow: str, name: str) -> dict[str, Any]:
        job: dict[str, Any] = {"flow": flow, "backend": self.backend, "namespace": None}
        if self.backend == "redis":
            return {**job, "target": self.redis_url, "namespace": unique_namespace()}
        suffix = ".json" if self.backend == "file" else ".db"
        return {**job, "target": str(self.tmp_path / f"{name}{suffix}")}


async def read_all(job: dict[str, Any]) -> dict[str, Any]:
    """Every key of the job's store, run records included, read from the backend."""
    storage = open_storage(job)
    await storage.open()
    try:
        return {key: await storage.get(key) for key in await storage.keys()}
    finally:
        await storage.aclose()


def user_data(data: dict[str, Any], ordered: bool) -> dict[str, Any]:
    """``data`` without the run records and their path chunks; each log sorted unless the
    flow is ``ordered``."""
    kept = {key: value for key, value in data.items() if not key.startswith(RESERVED_PREFIX)}
    if ordered:
        return kept
    return {key: sorted(value) if key.startswith("log:") else value for key, value in kept.items()}


def logged(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(execution id, node id) of every entry of every run's log in ``data``."""
    entries = [entry for key, log in data.items() if key.startswith("log:") for entry in log]
    return [(entry.split()[0], entry.split()[1]) for entry in entries]


@dataclass
class Reference:
    """The flow run to its end without interruption."""

    result: cf.FlowResult
    data: dict[str, Any]
    runs: list[cf.RunRecord]
    steps: list[str]
    """The execution ids of its steps, in the order their posts ran."""


async def run_reference(engine: cf.Engine, flow: str, job: dict[str, Any]) -> Reference:
    """Run ``flow`` durably to its end. (The engine closes each storage it was given
    when the run ends; the records are read on an engine of their own, which has
    closed its storage when ``cf.list_runs`` returns.)"""
    hooks = Hooks()
    result = await engine.run(FLOWS[flow].build(hooks), open_storage(job), run_id=RUN_ID)
    runs = await cf.list_runs(open_storage(job))
    data = await read_all(job)
    assert sorted(hooks.posts) == sorted(step for step, _ in logged(data))
    assert len(set(hooks.posts)) == len(hooks.posts)
    return Reference(result, data, runs, hooks.posts)


def check_interrupted(data: dict[str, Any], committed: list[str], context: str) -> None:
    """The store a kill left holds each step reported ``committed``, once, with its
    record, and nothing of any other step."""
    entries = logged(data)
    steps = [step for step, _ in entries]
    assert sorted(steps) == sorted(committed), f"{context}: store and commits differ"
    outputs = {key.removeprefix("out:") for key in data if key.startswith("out:")}
    assert outputs == set(steps), context
    counted = Counter(node for _, node in entries)
    counters = {
        key.removeprefix("count:"): n
        for key, n in data.items()
        if key.startswith("count:") and key.count(":") == 1
    }
    assert counters == dict(counted), context
    preps = {key.removeprefix("prep:"): n for key, n in data.items() if key.startswith("prep:")}
    assert preps == counters, f"{context}: writes of prep and post committed apart"
    for key, record in data.items():
        if key.startswith(RECORD_PREFIX):
            run_id = key.removeprefix(RECORD_PREFIX)
            steps = len(data.get(f"log:{run_id}", []))
            assert record["steps"] == len(whole_path(record, data)) == steps, context


def recorded_path(data: dict[str, Any]) -> list[str]:
    """The whole path the record of run :data:`RUN_ID` in ``data`` holds, its sealed
    chunks read from ``data`` (none before the run's first commit)."""
    record = data.get(record_key(RUN_ID))
    return [] if record is None else whole_path(record, data)


def check_result(result: cf.FlowResult, whole: cf.FlowResult, flow: str, context: str) -> None:
    """What a resumed run's result shares with the uninterrupted run's."""
    kind = FLOWS[flow]
    assert result.success, context
    assert (result.run_id, result.flow_name) == (whole.run_id, whole.flow_name), context
    assert (result.last_node_id, result.final_action.name) in kind.ends, context
    assert result.result == whole.result, context
    assert result.steps_executed == whole.steps_executed, context
    if kind.ordered:
        assert result.execution_path == whole.execution_path, context
        assert result.final_action == whole.final_action, context
        assert result.last_node_id == whole.last_node_id, context
    else:
        assert Counter(result.execution_path) == Counter(whole.execution_path), context


def summary(runs: list[cf.RunRecord], ordered: bool) -> list[tuple[Any, ...]]:
    """The runs' ids, flows, states and steps (and last nodes, when ``ordered``)."""
    return [
        (run.run_id, run.flow_name, run.state, run.steps, run.last_node_id if ordered else None)
        for run in sorted(runs, key=lambda run: run.run_id)
    ]


def check_steps(
    hooks: Hooks, committed: list[str], last: Child, reference: Reference, context: str
) -> None:
    """No committed step ran again here; every other step ran once; a step the last
    killed process stopped after staging its writes ran again in full (prep, exec unless
    a BatchFlow's, and post)."""
    again = set(committed) & {*hooks.preps, *hooks.execs, *hooks.posts}
    assert not again, f"{context}: committed steps ran again: {sorted(again)}"
    assert sorted(hooks.posts) == sorted(set(reference.steps) - set(committed)), context
    for line in last.lines:
        _, step, place, node = line.split() if line.startswith("halted ") else ("", "", "", "")
        if place == "staged":
            assert step in hooks.preps and step in hooks.posts, f"{context}: {step} not rerun"
            has_exec = node != BATCH_NODE  # a BatchFlow's exec runs its children
            assert step in hooks.execs or not has_exec, f"{context}: {step} did not exec again"


async def trial(
    engine: cf.Engine,
    server: Server,
    place: Place,
    flow: str,
    reference: Reference,
    stops: list[tuple[int, str]],
) -> None:
    """Run the flow in a worker stopped after ``k`` commits in ``mode``, the first of
    ``stops``; kill it and check the store. Each further stop resumes the run in a new
    worker, stopped and killed in the same way. Then resume the run here and check the
    outcome against ``reference``."""
    context = f"{flow} on {place.backend}, killed after commits (k, mode) {stops}"
    ordered = FLOWS[flow].ordered
    name = "-".join(f"{k}{mode}" for k, mode in stops)
    job = place.job(flow, f"{flow}-{name}")
    committed: list[str] = []
    for index, (k, mode) in enumerate(stops):
        child = await server.stop_after({**job, "k": k, "mode": mode, "resume": index > 0})
        assert len(child.committed) == k, f"{context}: it reported {child.committed}"
        committed += child.committed
        left = await read_all(job)
        check_interrupted(left, committed, context)
    before = recorded_path(left)

    hooks = Hooks()
    with trio.fail_after(TIMEOUT):
        result = await engine.resume(FLOWS[flow].build(hooks), open_storage(job), run_id=RUN_ID)
    runs = await cf.list_runs(open_storage(job))
    check_result(result, reference.result, flow, context)
    assert result.execution_path[: len(before)] == tuple(before), f"{context}: path changed"
    assert summary(runs, ordered) == summary(reference.runs, ordered), context
    check_steps(hooks, committed, child, reference, context)
    final = user_data(await read_all(job), ordered)
    assert final == user_data(reference.data, ordered), context


BACKENDS: Final = ["file", "sqlite", "redis"]
SLOW_FLOWS: Final = {"batch", "batch_fan", "tangled"}
"""The flows whose trials take more than a few seconds per backend."""
SHORT_FLOWS: Final = [flow for flow in FLOWS if flow != "long"]
"""The flows killed after every commit (the long one is killed at a few of them)."""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "flow",
    [
        pytest.param(flow, marks=pytest.mark.slow) if flow in SLOW_FLOWS else flow
        for flow in SHORT_FLOWS
    ],
)
async def test_a_run_killed_after_each_commit_resumes_to_the_uninterrupted_run(
    flow: str, backend: str, server: Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Every kill point of one process; then runs killed twice (the second time while
    resumed in a worker), after each number of commits k and half the rest."""
    place = Place(backend, tmp_path, request)
    async with cf.open_engine() as engine:
        reference = await run_reference(engine, flow, place.job(flow, "reference"))
        total = len(reference.steps)
        for k in range(total + 1):
            await trial(engine, server, place, flow, reference, [(k, "between")])
        for k in range(total):
            await trial(engine, server, place, flow, reference, [(k, "mid")])
        await trial(engine, server, place, flow, reference, [(total, "end")])
        for k in range(total):
            rest = total - k
            await trial(engine, server, place, flow, reference, [(k, "mid"), (rest // 2, "mid")])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_long_run_killed_around_its_path_chunks_resumes_to_the_uninterrupted_run(
    backend: str, server: Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A run of more than two sealed chunks of path, killed just before and after a
    chunk is sealed (in the commit of the step that fills it), and killed twice, the
    second time on a chunk's last step: resumed, its path is whole and no step ran
    twice."""
    place = Place(backend, tmp_path, request)
    stops = [
        [(PATH_CHUNK - 1, "between")],
        [(PATH_CHUNK, "mid")],
        [(2 * PATH_CHUNK, "between")],
        [(PATH_CHUNK - 24, "mid"), (PATH_CHUNK + 23, "mid")],
        [(LONG, "end")],
    ]
    async with cf.open_engine() as engine:
        reference = await run_reference(engine, "long", place.job("long", "reference"))
        assert reference.result.execution_path == ("l",) * LONG
        for stop in stops:
            await trial(engine, server, place, "long", reference, stop)
