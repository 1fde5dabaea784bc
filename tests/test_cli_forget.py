"""``cosmoflow forget`` (cli/forget.py): the records of durable runs that ended are
deleted, in order, and what the runs wrote stays."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.cli import main
from tests.storage_suite import RedisServer, unique_namespace
from tests.support import CHILDREN_OF_THE_LOOP, Gate, batch_flow_twice_in_a_loop, single

pytestmark = pytest.mark.usefixtures("plain_output")


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
