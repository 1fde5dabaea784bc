"""``cosmoflow forget`` (cli/forget.py): the records of durable runs that ended are
deleted, in order, and what the runs wrote stays."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.cli import main
from tests.storage_suite import RedisServer, unique_namespace
from tests.support import CHILDREN_OF_THE_LOOP, Gate, batch_flow_twice_in_a_loop, single

pytestmark = pytest.mark.usefixtures("plain_output")

STEPS = """
import os

import cosmoflow_actors as cf


@cf.node
async def first(ctx):
    pass


@cf.node
async def second(ctx):
    if os.environ.get("STEPS_FAIL"):
        raise RuntimeError("asked to fail")


@cf.node
async def third(ctx):
    if os.environ.get("STEPS_CRASH"):
        os._exit(3)


steps = (
    cf.Flow.builder("steps")
    .add_node("first", first)
    .add_node("second", second)
    .add_node("third", third)
    .add_route("first", "second")
    .add_route("second", "third")
    .build()
)
"""
"""A flow of three steps: the second fails with STEPS_FAIL set in the environment, and
the third ends the process at once (no step after it committed) with STEPS_CRASH."""


def recorded_runs(store: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The ids of the runs ``cosmoflow inspect`` lists in ``store``."""
    assert main(["inspect", store, "--json"]) == 0
    return [run["run_id"] for run in json.loads(capsys.readouterr().out)["runs"]]


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_forget_deletes_the_records_of_the_runs_named_and_prints_their_ids(
    kind: str, tmp_path: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"{kind}:{tmp_path / 'state'}"
    for run_id in ("a", "b", "c"):
        assert main(["run", str(counter_file), "--store", store, "--run-id", run_id]) == 0
    capsys.readouterr()
    assert main(["forget", store, "c", "a"]) == 0
    assert capsys.readouterr().out == "c\na\n"
    assert recorded_runs(store, capsys) == ["b"]
    assert main(["run", str(counter_file), "--store", store, "--run-id", "a"]) == 0
    assert "result:       4" in capsys.readouterr().out  # a ran again; its count stayed


def test_forget_names_a_run_whose_id_starts_with_a_dash_after_double_dash(
    tmp_path: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"file:{tmp_path / 'state'}"
    for run_id in ("-nightly", "kept"):
        assert main(["run", str(counter_file), "--store", store, f"--run-id={run_id}"]) == 0
    capsys.readouterr()
    assert main(["forget", store, "--", "-nightly"]) == 0
    assert capsys.readouterr().out == "-nightly\n"
    assert recorded_runs(store, capsys) == ["kept"]


def test_forget_stops_at_a_run_with_no_record_and_keeps_the_ones_before_forgotten(
    tmp_path: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"sqlite:{tmp_path / 'state.db'}"
    for run_id in ("a", "b"):
        assert main(["run", str(counter_file), "--store", store, "--run-id", run_id]) == 0
    capsys.readouterr()
    assert main(["forget", store, "a", "typo", "b"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "a\n"
    assert captured.err.strip() == f"cosmoflow: error: {store}: no run 'typo' is recorded"
    assert recorded_runs(store, capsys) == ["b"]


def test_forget_refuses_a_run_recorded_as_running_and_says_how_to_finish_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "state.db"

    async def cancelled_midway() -> None:
        async with cf.open_engine() as engine:
            storage = cf.SQLiteStorage(path)
            run = await engine.start_run(single(Gate(), "gated"), storage, run_id="r")
            await trio.testing.wait_all_tasks_blocked()
            run.cancel()

    trio.run(cancelled_midway)
    assert main(["forget", f"sqlite:{path}", "r"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cosmoflow: error: sqlite:{path}: run 'r' is recorded as running: finish it first "
        "(cosmoflow run FILE.py --store STORE --run-id ID --resume)"
    )
    assert recorded_runs(f"sqlite:{path}", capsys) == ["r"]


def test_forget_refuses_a_child_of_a_recorded_run_and_names_its_parent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"sqlite:{tmp_path / 'state.db'}"
    flow = batch_flow_twice_in_a_loop()
    trio.run(functools.partial(flow.run, cf.SQLiteStorage(tmp_path / "state.db"), run_id="job"))
    assert main(["forget", store, "job:1/0"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cosmoflow: error: {store}: run 'job:1/0' is a child run of the recorded run 'job' "
        "(a step of its BatchFlow started it): forget 'job', whose children are forgotten "
        "with it"
    )
    assert sorted(recorded_runs(store, capsys)) == ["job", *CHILDREN_OF_THE_LOOP]
    assert main(["forget", store, "job"]) == 0
    assert capsys.readouterr().out == "job\n"
    assert recorded_runs(store, capsys) == []


def test_forget_takes_the_children_named_after_their_parent_as_forgotten_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ids ``inspect`` lists, in its order (children right after their parent), are
    all forgotten: a child named after its parent went with it, and is printed."""
    store = f"sqlite:{tmp_path / 'state.db'}"
    flow = batch_flow_twice_in_a_loop()
    storage = cf.SQLiteStorage(tmp_path / "state.db")
    for run_id in ("job", "later"):
        trio.run(functools.partial(flow.run, storage, run_id=run_id))
    listed = recorded_runs(store, capsys)
    assert listed[:5] == ["job", *CHILDREN_OF_THE_LOOP]
    assert main(["forget", store, *listed]) == 0
    assert capsys.readouterr().out.splitlines() == listed
    assert recorded_runs(store, capsys) == []


def test_forget_on_redis(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"{redis_server.url}#{unique_namespace()}"
    assert main(["run", str(counter_file), "--store", store, "--run-id", "nightly"]) == 0
    capsys.readouterr()
    assert main(["forget", store, "nightly"]) == 0
    assert capsys.readouterr().out == "nightly\n"
    assert recorded_runs(store, capsys) == []


@pytest.fixture
def steps_file(tmp_path: Path) -> Path:
    path = tmp_path / "steps.py"
    path.write_text(STEPS)
    return path


def run_steps(
    steps_file: Path, store: str, run_id: str, monkeypatch: pytest.MonkeyPatch, *, fail: bool
) -> None:
    """Run STEPS as ``run_id`` on ``store`` with ``cosmoflow run``: it fails when ``fail``."""
    with monkeypatch.context() as patch:
        if fail:
            patch.setenv("STEPS_FAIL", "1")
        assert main(["run", str(steps_file), "--store", store, "--run-id", run_id]) == int(fail)


def store_of_kind(
    kind: str, tmp_path: Path, redis_server: RedisServer
) -> tuple[str, Callable[[], cf.Storage]]:
    """A ``--store`` of ``kind`` (file, sqlite or redis), and what makes its Storage."""
    if kind == "redis":
        namespace = unique_namespace()
        return f"{redis_server.url}#{namespace}", functools.partial(redis_server.storage, namespace)
    path = tmp_path / "state"
    storage = cf.FileStorage if kind == "file" else cf.SQLiteStorage
    return f"{kind}:{path}", functools.partial(storage, path)


async def cancelled_midway(storage: cf.Storage, run_id: str) -> None:
    """Start the run ``run_id`` on ``storage`` and cancel it in its first step: it is
    recorded as running."""
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(Gate(), "gated"), storage, run_id=run_id)
        await trio.testing.wait_all_tasks_blocked()
        run.cancel()


@pytest.mark.parametrize("kind", ["file", "sqlite", "redis"])
def test_forget_state_forgets_the_runs_recorded_in_it_with_their_children(
    kind: str,
    tmp_path: Path,
    redis_server: RedisServer,
    steps_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The runs go in the order inspect lists them, a BatchFlow's parent with its
    children, printed after it; a failed run stays for --state failed, and one recorded
    as running stays whatever the states; nothing to forget prints nothing."""
    store, storage = store_of_kind(kind, tmp_path, redis_server)
    flow = batch_flow_twice_in_a_loop()
    trio.run(functools.partial(flow.run, storage(), run_id="job"))
    run_steps(steps_file, store, "a", monkeypatch, fail=False)
    run_steps(steps_file, store, "b", monkeypatch, fail=True)
    trio.run(cancelled_midway, storage(), "r")
    capsys.readouterr()
    assert main(["forget", store, "--state", "succeeded"]) == 0
    captured = capsys.readouterr()
    assert (captured.out.splitlines(), captured.err) == (["a", "job", *CHILDREN_OF_THE_LOOP], "")
    assert recorded_runs(store, capsys) == ["b", "r"]
    assert main(["forget", store, "--state", "succeeded", "--state", "failed"]) == 0
    assert capsys.readouterr().out == "b\n"
    assert main(["forget", store, "--state", "failed"]) == 0
    assert capsys.readouterr() == ("", "")
    assert recorded_runs(store, capsys) == ["r"]


def test_forget_takes_either_run_ids_or_a_state(
    tmp_path: Path, steps_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"sqlite:{tmp_path / 'state.db'}"
    assert main(["run", str(steps_file), "--store", store, "--run-id", "a"]) == 0
    capsys.readouterr()
    for argv, problem in (
        ([store, "a", "--state", "succeeded"], "forget takes RUN_IDs or --state, not both"),
        ([store], "forget needs the RUN_IDs to forget, or --state succeeded|failed"),
    ):
        assert main(["forget", *argv]) == 2
        assert capsys.readouterr().err == f"cosmoflow: error: {problem}\n"
    with pytest.raises(SystemExit) as exited:
        main(["forget", store, "--state", "running"])
    assert exited.value.code == 2
    assert "argument --state: invalid choice: 'running'" in capsys.readouterr().err
    assert recorded_runs(store, capsys) == ["a"]


def test_forget_takes_options_between_the_store_and_the_run_ids(
    tmp_path: Path, steps_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"sqlite:{tmp_path / 'state.db'}"
    for run_id in ("a", "b"):
        assert main(["run", str(steps_file), "--store", store, "--run-id", run_id]) == 0
    capsys.readouterr()
    assert main(["forget", store, "--codec", "json", "a", "b", "--debug"]) == 0
    assert capsys.readouterr().out == "a\nb\n"
    assert recorded_runs(store, capsys) == []


class ChangedMeanwhile(cf.SQLiteStorage):
    """The SQLite store ``FOLDER/state.db`` where, before the first run is forgotten, a
    process resumes the run "b" (``FOLDER/steps.py``), which commits a step and dies:
    it is recorded as running; another resumes "d" to its success; and another engine
    forgets the run "c"."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        super().__init__(self.folder / "state.db")
        self.changed = False

    async def forget_record(self, record_key: str, check: Callable[[Any], None]) -> bool:
        if not self.changed:
            self.changed = True
            assert await self._resume("b", {"STEPS_CRASH": "1"}) == 3
            assert await self._resume("d", {}) == 0
            assert await cf.forget_run(cf.SQLiteStorage(self.path), "c")
        return await super().forget_record(record_key, check)

    async def _resume(self, run_id: str, environment: dict[str, str]) -> int:
        """Resume ``run_id`` in a process of its own; its exit status."""
        command = [sys.executable, "-m", "cosmoflow_actors", "run", str(self.folder / "steps.py")]
        command += ["--store", f"sqlite:{self.path}", "--run-id", run_id, "--resume"]
        resumed = await trio.run_process(
            command,
            env={**os.environ, **environment},
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        return resumed.returncode


def test_forget_state_skips_a_run_resumed_or_forgotten_since_it_was_listed(
    tmp_path: Path,
    steps_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each run skipped gets a warning (one resumed to its success included: --state
    failed keeps it); the runs after it are forgotten; exit status 0."""
    sqlite = f"sqlite:{tmp_path / 'state.db'}"
    for run_id in ("a", "b", "c", "d", "e"):
        run_steps(steps_file, sqlite, run_id, monkeypatch, fail=True)
    capsys.readouterr()
    store = f"python:{__name__}:ChangedMeanwhile:{tmp_path}"
    assert main(["forget", store, "--state", "failed"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "a\ne\n"
    assert captured.err.splitlines() == [
        f"cosmoflow: warning: {store}: run 'b', listed as failed, is kept: it is recorded "
        "as running now",
        f"cosmoflow: warning: {store}: run 'c', listed as failed, is no longer recorded",
        f"cosmoflow: warning: {store}: run 'd', listed as failed, is kept: it is recorded "
        "as succeeded now",
    ]
    assert recorded_runs(sqlite, capsys) == ["b", "d"]
