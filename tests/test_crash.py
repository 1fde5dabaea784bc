"""Durable runs against SIGKILL: real worker processes killed at random moments.

The worker (:mod:`tests.crash_worker`) runs in forked children of one server process
per test. A trial starts a child, reads a random number of its progress lines (each
one a fact it acknowledged: a committed step, a returned commit), kills it with
SIGKILL, and then checks in this process what the store holds, and that resuming
finishes the run exactly as an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.run_record import record_key, whole_path
from cosmoflow_actors.storage import file as file_storage
from cosmoflow_actors.storage import sqlite as sqlite_storage
from cosmoflow_actors.storage.base import RECORD_PREFIX
from tests.crash_worker import (
    BLOBS,
    CLOSE_EVERY,
    FILE_COMMITS,
    LINE_STEPS,
    LINES,
    RUN_ID,
    SHARED,
    STEPS,
    TORTURE_RUNS,
    CountingStep,
    blob,
    crash_flow,
    fan_flow,
    open_storage,
    step_value,
)
from tests.storage_suite import RedisServer, unique_namespace
from tests.support import WorkerServer, worker_server

TRIALS: Final = 20
"""Trials per backend, and the least number of trials of the FileStorage commit test."""
MAX_FILE_TRIALS: Final = 200
"""Bound on the FileStorage commit trials, which go on until every kind of crash is seen."""
TIMEOUT: Final = 60.0
"""Seconds a trial (or the server's start or stop) may take before the test fails."""
RECORD: Final = record_key(RUN_ID)
STRAY_TEMP: Final = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")


class Child:
    """A forked worker child and the lines it wrote so far."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.lines: list[str] = []
        self.status: int | None = None
        """How it ended, once reaped: 0 (it finished) or -9 (killed)."""

    def kill(self) -> None:
        """SIGKILL it. Safe until it is reaped: until then its pid stays its own."""
        os.kill(self.pid, signal.SIGKILL)

    def last(self, word: str) -> int:
        """The highest ``n`` of its lines ``"<word> <n>"`` (0 if none)."""
        numbers = [int(line.split()[1]) for line in self.lines if line.startswith(f"{word} ")]
        return max(numbers, default=0)

    @property
    def done(self) -> bool:
        return "done" in self.lines


class Server(WorkerServer):
    """The worker server (see :mod:`tests.crash_worker`): one forked child per trial."""

    async def start(self, job: dict[str, Any]) -> Child:
        """Fork a child that runs ``job``; return once it runs."""
        await self._send(json.dumps(job))
        return Child(int((await self._line()).removeprefix("pid ")))

    async def read(self, child: Child) -> str:
        """Wait for ``child``'s next line; return it (it is also in ``child.lines``)."""
        line = await self._line()
        child.lines.append(line)
        return line

    async def go(self) -> None:
        """Let the "file" job's child start the commit it announced."""
        await self._send("go")

    async def reap(self, child: Child) -> None:
        """SIGKILL ``child`` (if it has not finished), reap it and collect every line
        it wrote before it died."""
        child.kill()
        await self._send("reap")
        while not (line := await self._line()).startswith("exit "):
            child.lines.append(line)
        child.status = int(line.removeprefix("exit "))
        assert child.status in (0, -signal.SIGKILL), f"the worker failed: {self.log.read_text()}"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with worker_server(Server, "tests.crash_worker", tmp_path / "worker.log") as running:
        yield running


def job_for(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, name: str
) -> dict[str, Any]:
    """A "flow" job over fresh data called ``name`` of ``backend``."""
    job: dict[str, Any] = {"job": "flow", "backend": backend, "namespace": None}
    if backend == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        return {**job, "target": redis_server.url, "namespace": unique_namespace()}
    suffix = ".json" if backend == "file" else ".db"
    return {**job, "target": str(tmp_path / f"{name}{suffix}")}


async def read_all(storage: cf.Storage) -> dict[str, Any]:
    """Every key of ``storage`` (run records included), read straight from the backend."""
    await storage.open()
    return {key: await storage.get(key) for key in await storage.keys()}


async def read_closed(storage: cf.Storage) -> dict[str, Any]:
    """:func:`read_all`, then close ``storage``."""
    try:
        return await read_all(storage)
    finally:
        await storage.aclose()


def normalized(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the run's duration, which no two runs share."""
    record = data.get(RECORD)
    if record is None or record["result"] is None:
        return data
    result = {key: value for key, value in record["result"].items() if key != "duration"}
    return {**data, RECORD: {**record, "result": result}}


async def kill_after_lines(server: Server, job: dict[str, Any], count: int) -> Child:
    """Run ``job`` and kill it once it wrote ``count`` lines (or finished)."""
    with trio.fail_after(TIMEOUT):
        child = await server.start(job)
        while len(child.lines) < count and not child.done:
            await server.read(child)
        await server.reap(child)
    return child


def kill_point(trial: int, rng: random.Random) -> int:
    """How many lines a child of the flow job writes before the kill: none (right after
    it starts), all (after the result is recorded), or any number in between."""
    if trial == 0:
        return 0
    if trial == 1:
        return STEPS + 1
    return rng.randint(0, STEPS + 1)


def check_interrupted(data: dict[str, Any], child: Child, seed: str) -> int:
    """Check what a killed run left behind; return the number of steps it committed."""
    n: int = data.get("n", 0)
    context = f"seed {seed!r}, killed after {child.lines[-3:]}, store n={n}"
    acknowledged = child.last("step")
    assert n >= acknowledged, f"{context}: step {acknowledged} was acknowledged, then lost"
    steps = {key: value for key, value in data.items() if key.startswith("step:")}
    assert steps == {f"step:{i}": step_value(i) for i in range(1, n + 1)}, context
    assert data.get("log", []) == list(range(1, n + 1)), f"{context}: a step applied twice"
    record = data.get(RECORD)
    if record is None:
        assert data == {}, f"{context}: writes without the run's record"
    else:
        assert record["steps"] == n, f"{context}: writes and record committed apart"
    if child.done:
        assert record is not None and record["state"] == "succeeded", context
    return n


@pytest.mark.parametrize("backend", ["file", "sqlite", "redis"])
async def test_a_killed_durable_run_resumes_to_the_uninterrupted_result(
    backend: str, server: Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with cf.open_engine() as engine:
        reference_job = job_for(backend, tmp_path, request, "reference")
        await engine.run(crash_flow(), open_storage(reference_job), run_id=RUN_ID)
        reference = normalized(await read_closed(open_storage(reference_job)))
        assert reference["log"] == list(range(1, STEPS + 1))
        for trial in range(TRIALS):
            seed = f"{backend}-{trial}"
            job = job_for(backend, tmp_path, request, f"trial-{trial}")
            child = await kill_after_lines(server, job, kill_point(trial, random.Random(seed)))
            storage = open_storage(job)
            try:
                committed = check_interrupted(await read_all(storage), child, seed)
                node = CountingStep()
                result = await engine.resume(crash_flow(node), storage, run_id=RUN_ID)
            finally:
                await storage.aclose()
            assert node.posts == list(range(committed + 1, STEPS + 1)), f"seed {seed!r}"
            assert result.execution_path == ("step",) * STEPS, f"seed {seed!r}"
            final = normalized(await read_closed(open_storage(job)))
            assert final == reference, f"seed {seed!r}"


FILE_SIZE_LIMITS: Final = {"file": 4 * 1024, "sqlite": 64 * 1024}
"""A file size limit each backend's files outgrow in the middle of the "flow" job's run
(a FileStorage's journal several times before its snapshot: it compacts instead)."""


@pytest.mark.parametrize("backend", ["file", "sqlite"])
async def test_a_durable_run_past_a_file_size_limit_fails_alone_and_resumes(
    backend: str, server: Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Writes that the operating system refuses (EFBIG, as on a full disk) fail the run
    with a StorageError naming the file, not the engine; every step committed before
    stays readable, by the backend and by ``cosmoflow inspect``, and the run resumes
    from there once the limit is gone."""
    job = job_for(backend, tmp_path, request, "limited")
    job["file_size_limit"] = FILE_SIZE_LIMITS[backend]
    with trio.fail_after(TIMEOUT):
        child = await server.start(job)
        while not (line := await server.read(child)).startswith(("failed ", "done")):
            pass
        assert line.startswith("failed "), "the run finished within the limit"
        assert await server.read(child) == "served"
        await server.reap(child)
    failure = json.loads(child.lines[-2].removeprefix("failed "))
    assert job["target"] in failure

    data = await read_closed(open_storage(job))
    committed = check_interrupted(data, child, backend)
    assert 0 < committed < STEPS, f"the limit failed step {committed + 1} of {STEPS}"
    peek = file_storage.peek if backend == "file" else sqlite_storage.peek
    assert {key: entry.unwrap() for key, entry in peek(job["target"]).items()} == data

    node = CountingStep()
    storage = open_storage(job)
    try:
        async with cf.open_engine() as engine:
            await engine.resume(crash_flow(node), storage, run_id=RUN_ID)
    finally:
        await storage.aclose()
    assert node.posts == list(range(committed + 1, STEPS + 1))
    final = await read_closed(open_storage(job))
    assert final["log"] == list(range(1, STEPS + 1))
    assert final[RECORD]["state"] == "succeeded"


FAN_STEPS: Final = 1 + len(LINES) * LINE_STEPS + 1
"""Steps of the "fan" job's run: the split, each branch's loop, the join."""


def check_fan_interrupted(data: dict[str, Any], child: Child, seed: str) -> None:
    """Check what a killed fan-out run left behind: each branch's steps applied once and
    in order, with the record, and every acknowledged step there."""
    context = f"seed {seed!r}, killed after {child.lines[-3:]}"
    record = data.get(RECORD)
    if record is None:
        assert data == {}, f"{context}: writes without the run's record"
        return
    committed = Counter(whole_path(record, data))
    acknowledged = sum(1 for line in child.lines if line.startswith("step "))
    assert committed.total() >= acknowledged, f"{context}: an acknowledged step was lost"
    for line in LINES:
        n = data.get(f"{line}:n", 0)
        assert data.get(f"{line}:log", []) == list(range(1, n + 1)), f"{context}: twice"
        assert committed[line] == n, f"{context}: writes and record committed apart"
    assert committed["joined"] == data.get("joined:n", 0), context
    if child.done:
        assert record["state"] == "succeeded", context


def user_data(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key != RECORD}


@pytest.mark.parametrize("backend", ["file", "sqlite", "redis"])
async def test_a_killed_durable_fan_out_resumes_to_the_uninterrupted_result(
    backend: str, server: Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """As above for a run whose two branches commit their steps in between each other's."""
    async with cf.open_engine() as engine:
        reference_job = {**job_for(backend, tmp_path, request, "reference"), "job": "fan"}
        whole = await engine.run(fan_flow(), open_storage(reference_job), run_id=RUN_ID)
        reference = user_data(await read_closed(open_storage(reference_job)))
        assert reference["joined:n"] == 1
        for trial in range(TRIALS):
            seed = f"fan-{backend}-{trial}"
            job = {**job_for(backend, tmp_path, request, f"fan-{trial}"), "job": "fan"}
            kill_at = random.Random(seed).randint(0, FAN_STEPS + 1)
            child = await kill_after_lines(server, job, kill_at)
            storage = open_storage(job)
            try:
                check_fan_interrupted(await read_all(storage), child, seed)
                with trio.fail_after(TIMEOUT):
                    result = await engine.resume(fan_flow(), storage, run_id=RUN_ID)
            finally:
                await storage.aclose()
            path = Counter(result.execution_path)
            assert path == Counter(whole.execution_path), f"seed {seed!r}"
            final = await read_closed(open_storage(job))
            assert user_data(final) == reference, f"seed {seed!r}"
            assert final[RECORD]["state"] == "succeeded", f"seed {seed!r}"


TORTURE_TRIALS: Final = 12
"""Trials per backend of the torture test."""
TORTURE_KILLS: Final = 5
"""Children a torture trial kills in a row, each going on from what the last one left."""
TORTURE_TICKS: Final = 22 * len(TORTURE_RUNS)
"""Steps of the "torture" job's runs, their BatchFlow children's included (each run: the
seed, four spins, the squares, the join, three rewrites, the settle, the BatchFlow step
and its children's nine, the finish)."""


async def peeked(job: dict[str, Any]) -> dict[str, Any]:
    """What the job's store holds, read without changing it: a FileStorage closed
    compacts, which would tidy what a kill left for the next child to meet."""
    if job["backend"] == "file":
        return {key: entry.unwrap() for key, entry in file_storage.peek(job["target"]).items()}
    return await read_closed(open_storage(job))


def check_torture_interrupted(data: dict[str, Any], context: str) -> None:
    """Check what killed torture runs left: every committed step (the records' paths
    count them) counted once in the shared counter and in its run's log."""
    records = {key: value for key, value in data.items() if key.startswith(RECORD_PREFIX)}
    committed = sum(record["steps"] for record in records.values())
    assert data.get(SHARED, 0) == committed, f"{context}: a step applied twice or lost"
    for run_id in TORTURE_RUNS:
        runs = [r for r in records.values() if r["run_id"].partition(":")[0] == run_id]
        steps = sum(record["steps"] for record in runs)
        assert len(data.get(f"{run_id}:log", [])) == steps, f"{context}: {run_id}'s log"


def comparable(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as two runs of the torture flow leave it alike: the records without
    their durations, and paths and logs as multisets (branches and children
    interleave differently from one run to the next)."""
    alike: dict[str, Any] = {}
    for key, value in data.items():
        if key.startswith(RECORD_PREFIX):
            result = {k: v for k, v in value["result"].items() if k != "duration"}
            alike[key] = {**value, "path": sorted(value["path"]), "result": result}
        elif key.endswith(":log"):
            alike[key] = sorted(value)
        else:
            alike[key] = value
    return alike


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["file", "sqlite", "redis"])
async def test_concurrent_runs_killed_again_and_again_end_as_uninterrupted_ones(
    backend: str, server: Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Three runs of the torture flow (fan-out and join, a nested flow, a BatchNode
    with retries, a BatchFlow, conditional routes, updates the runs race for, deletes,
    large values, odd keys) share one store. A trial kills its children
    :data:`TORTURE_KILLS` times in a row at random points, a kill in a compaction left
    behind or in the first open included, then lets one finish: after each kill every
    committed step is in the store once, and in the end the store is the one an
    uninterrupted run leaves."""
    reference_job = {**job_for(backend, tmp_path, request, "reference"), "job": "torture"}
    assert (await kill_after_lines(server, reference_job, TORTURE_TICKS + 1)).done
    reference = comparable(await read_closed(open_storage(reference_job)))
    assert reference[SHARED] == TORTURE_TICKS
    for trial in range(TORTURE_TRIALS):
        seed = f"torture-{backend}-{trial}"
        rng = random.Random(seed)
        job = {**job_for(backend, tmp_path, request, f"torture-{trial}"), "job": "torture"}
        for kill in range(TORTURE_KILLS):
            child = await kill_after_lines(server, job, rng.randint(0, TORTURE_TICKS))
            context = f"seed {seed!r}, kill {kill} after {len(child.lines)} lines"
            check_torture_interrupted(await peeked(job), context)
        assert (await kill_after_lines(server, job, TORTURE_TICKS + 1)).done, f"seed {seed!r}"
        final = comparable(await read_closed(open_storage(job)))
        assert final == reference, f"seed {seed!r}"


MOMENTS: Final = ("writing", "renamed", "writing", "compacting", "begun")
"""When a "file" job child is killed, in its commit i: once it announced "begin i" (and
waits for "go"); once it writes (a journal line is open, or a temporary file exists);
once it compacts (a temporary file exists: the commit's compaction, or the close's
after an append); or once the snapshot was renamed into place (a compaction's next step
is replacing the journal). A commit that never reaches the moment is killed when it
returns."""


async def kill_during_commit(server: Server, path: Path, commit: int, moment: str) -> Child:
    """Run the "file" job on ``path``; kill it at ``moment`` of its commit ``commit``."""
    job = {"job": "file", "backend": "file", "target": str(path), "namespace": None}
    with trio.fail_after(TIMEOUT):
        child = await server.start(job)
        while (line := await server.read(child)) != f"begin {commit}":
            if line.startswith("begin "):
                await server.go()
        if moment != "begun":
            await kill_when(server, child, Watch(path, moment))
        await server.reap(child)
    return child


async def kill_when(server: Server, child: Child, watch: Watch) -> None:
    """Let ``child`` commit, and kill it as soon as ``watch`` sees its moment, unless
    the commit returns first."""
    stop = threading.Event()
    try:
        async with trio.open_nursery() as nursery:

            async def watching() -> None:
                killed = await trio.to_thread.run_sync(
                    watch.kill_at_moment, child, stop, abandon_on_cancel=True
                )
                if killed:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watching)
            await server.go()
            await server.read(child)  # "commit <i>": the commit returned first
            stop.set()
    finally:
        stop.set()


class Watch:
    """A FileStorage's files as a commit about to start leaves them, and the moment of
    that commit to kill it at: "writing" (a journal line is open, or a temporary file
    exists), "compacting" (a temporary file exists) or "renamed" (a new snapshot is in
    place)."""

    def __init__(self, path: Path, moment: str) -> None:
        self._path = path
        self._journal = path.with_name(f"{path.name}.journal")
        self._moment = moment
        self._inode = snapshot_inode(path)

    def kill_at_moment(self, child: Child, stop: threading.Event) -> bool:
        """Spin (in a thread) until the moment comes, then kill ``child`` and return
        True; return False once ``stop`` is set. The closest a test can follow a write
        without a hook in the code that writes."""
        while not stop.is_set():
            if self._reached():
                child.kill()
                return True
        return False

    def _reached(self) -> bool:
        if self._moment == "renamed":
            return snapshot_inode(self._path) != self._inode
        if self._moment == "compacting":
            return bool(stray_temps(self._path.parent))
        return journal_line_open(self._journal) or bool(stray_temps(self._path.parent))


def snapshot_inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def journal_line_open(journal: Path) -> bool:
    """Whether the journal's last line is being written (it does not end a line)."""
    try:
        fd = os.open(journal, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
    finally:
        os.close(fd)


def stray_temps(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if STRAY_TEMP.fullmatch(name))


def check_whole_files(path: Path, context: str) -> str:
    """Check that the snapshot is complete and every journal line but the last is;
    return what a crash left: "journal behind" (a compaction stopped between its two
    renames), "torn line" (the journal's last line is cut short) or ""."""
    generation = 0
    if path.exists():
        snapshot = json.loads(path.read_bytes())
        assert snapshot["format"] == "cosmoflow-store", context
        generation = snapshot["generation"]
    journal = path.with_name(f"{path.name}.journal")
    if not journal.exists():
        return ""
    header, *whole, last = journal.read_bytes().split(b"\n")
    for line in whole:
        json.loads(line)
    if json.loads(header)["generation"] == generation - 1:
        return "journal behind"
    return "torn line" if last else ""


async def check_file_after_kill(path: Path, child: Child, context: str) -> str:
    """Check the files a killed commit left and how the next open treats them; return
    what the kill left: "stray temp", "journal behind", "torn line" or "clean"."""
    context = f"{context}, killed after {child.lines[-2:]}"
    temps = stray_temps(path.parent)
    left = check_whole_files(path, context)
    storage = cf.FileStorage(path)
    stored = await read_all(storage)
    assert stray_temps(path.parent) == [], f"{context}: temporary files left after open"
    count = stored.get("i", 0)
    assert child.last("commit") <= count <= child.last("begin"), context
    expected = {f"blob:{i % BLOBS}": blob(i) for i in range(1, count + 1)}
    assert stored == ({**expected, "i": count} if count else {}), context
    await storage.set("i", count + 1)
    await storage.commit()  # compacts if the journal was torn or behind
    assert check_whole_files(path, context) == "", f"{context}: {left} after a commit"
    await storage.aclose()
    assert await read_closed(cf.FileStorage(path)) == {**stored, "i": count + 1}, context
    return "stray temp" if temps else left or "clean"


def generations(path: Path) -> tuple[int, int]:
    """The generations of the snapshot at ``path`` and of its journal."""
    snapshot = json.loads(path.read_bytes())["generation"]
    journal = path.with_name(f"{path.name}.journal").read_bytes()
    return snapshot, json.loads(journal.partition(b"\n")[0])["generation"]


async def killed_between_renames(server: Server, path: Path, commit: int) -> bool:
    """Kill a "file" job's child on ``path`` once a new snapshot is in place in its
    commit ``commit``; return whether the kill landed before the journal's replacement."""
    await kill_during_commit(server, path, commit, "renamed")
    snapshot, journal = generations(path)
    return snapshot > journal


async def test_a_file_storage_killed_twice_between_a_compactions_renames_opens(
    server: Server, tmp_path: Path
) -> None:
    """The first kill leaves the journal one generation behind; so the next child's
    first commit compacts, and the second kill stops that compaction at the same point:
    the journal is two generations behind, which the next open ignores too. (A kill
    that misses the moment is tried again on a copy of the files it started from.)"""
    first = await killed_in_a_copy(server, tmp_path, "first", None, CLOSE_EVERY)
    assert generations(first) == (2, 1)  # the close after commit 4 compacted
    second = await killed_in_a_copy(server, tmp_path, "second", first, 1)
    assert generations(second) == (3, 1)
    stored = await read_closed(cf.FileStorage(second))
    assert stored == {"blob:0": blob(3), "blob:1": blob(1), "blob:2": blob(2), "i": 1}


async def killed_in_a_copy(
    server: Server, tmp_path: Path, name: str, start: Path | None, commit: int
) -> Path:
    """The store a child killed between the renames of commit ``commit`` left, in a
    directory ``name-<attempt>`` that held a copy of the snapshot and journal at
    ``start`` (or nothing) before it."""
    for attempt in range(MAX_FILE_TRIALS):
        path = tmp_path / f"{name}-{attempt}" / "store.json"
        path.parent.mkdir()
        if start is not None:
            for source in (start, start.with_name(f"{start.name}.journal")):
                path.with_name(source.name).write_bytes(source.read_bytes())
        if await killed_between_renames(server, path, commit):
            return path
    raise AssertionError(f"no kill landed between the renames of commit {commit}")


@pytest.mark.slow
async def test_a_file_storage_killed_during_commits_opens_cleanly(
    server: Server, tmp_path: Path
) -> None:
    seen: Counter[str] = Counter()
    for trial in range(MAX_FILE_TRIALS):
        if trial >= TRIALS and seen["stray temp"] and seen["torn line"]:
            break
        seed = f"file-commit-{trial}"
        commit = random.Random(seed).randint(1, FILE_COMMITS)
        moment = MOMENTS[trial % len(MOMENTS)]
        path = tmp_path / f"trial-{trial}" / "store.json"
        path.parent.mkdir()
        child = await kill_during_commit(server, path, commit, moment)
        context = f"seed {seed!r}: {moment} commit {commit}"
        seen[await check_file_after_kill(path, child, context)] += 1
    assert seen["stray temp"] and seen["torn line"], f"after {trial + 1} trials: {seen}"
