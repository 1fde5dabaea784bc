"""``cosmoflow run --runs N`` (cli/batch.py): the summary per node, as text and JSON,
failed runs and fallbacks counted, and the progress bar on a terminal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cosmoflow_actors.cli import main
from tests.cli_support import table_row

pytestmark = pytest.mark.usefixtures("plain_output")


SOMETIMES = """
import itertools

import cosmoflow_actors as cf

calls = itertools.count()


@cf.node
def sometimes(ctx):
    if next(calls) % 2:
        raise ValueError("odd call")


flow = cf.Flow.builder("sometimes").add_node("sometimes", sometimes).build()
"""
"""Every second run fails (the runs of one command share the module)."""


BATCHED = """
import trio

import cosmoflow_actors as cf


@cf.node
def item(ctx):
    return None


class Items(cf.BatchFlow):
    def prep(self, store, ctx):
        return [{"n": n} for n in range(3)]


@cf.node
async def slow(ctx):
    await trio.sleep(0.02)


child = cf.Flow.builder("child").add_node("item", item).build()
flow = (
    cf.Flow.builder("batched")
    .add_node("items", Items(child))
    .add_node("slow", slow)
    .add_route("items", "slow")
    .build()
)
"""
"""Each run starts three BatchFlow child runs, then takes at least 20 ms more."""


@pytest.fixture
def batched_file(tmp_path: Path) -> Path:
    path = tmp_path / "batched.py"
    path.write_text(BATCHED)
    return path


def test_runs_print_a_summary_per_node(
    counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(counter_file), "--runs", "4", "--concurrency", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out
    assert "runs:         4 (4 succeeded, 0 failed), 2 at a time" in out
    assert "run latency:  mean " in out
    assert "steps per node" in out
    flaky = table_row(out, "checks/flaky")
    assert (flaky[1], flaky[5], flaky[6], flaky[7]) == ("4", "4", "0", "0")
    assert all(cell.endswith(" ms") for cell in flaky[2:5])
    count = table_row(out, "count")
    assert (count[1], count[5], count[6], count[7]) == ("4", "0", "0", "0")


def test_runs_as_json(counter_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(counter_file), "--runs", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {key: summary[key] for key in ("flow", "runs", "succeeded", "failed")} == {
        "flow": "counter",
        "runs": 3,
        "succeeded": 3,
        "failed": 0,
    }
    assert (summary["concurrency"], summary["first_error"]) == (1, None)
    assert summary["runs_per_second"] > 0
    assert set(summary["latency_ms"]) == {"mean_ms", "p50_ms", "p99_ms"}
    flaky = summary["nodes"]["checks/flaky"]
    assert (flaky["steps"], flaky["retries"], flaky["fallbacks"], flaky["failures"]) == (3, 3, 0, 0)
    assert (summary["interrupted"], summary["started"], summary["cancelled"]) == (False, 3, 0)
    assert flaky["p50_ms"] <= flaky["p99_ms"]


def test_runs_share_a_persistent_store(
    tmp_path: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"file:{tmp_path / 'shared.json'}"
    argv = ["run", str(counter_file), "--store", store, "--runs", "5", "--concurrency", "5"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["inspect", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"]["count"] == 5


def test_failed_runs_are_counted_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "sometimes.py"
    flow_file.write_text(SOMETIMES)
    assert main(["run", str(flow_file), "--runs", "4"]) == 1
    captured = capsys.readouterr()
    assert "runs:         4 (2 succeeded, 2 failed), 1 at a time" in captured.out
    assert table_row(captured.out, "sometimes")[6:] == ["2", "2"]  # fallbacks that re-raised
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(
        "cosmoflow: error: 2 of 4 runs failed; first: NodeError: node 'sometimes' failed in exec"
    )
    assert captured.err.endswith("(caused by ValueError: odd call)\n")
    assert main(["run", str(flow_file), "--runs", "2", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_runs_as_json_list_the_failed_runs_with_their_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "sometimes.py"
    flow_file.write_text(SOMETIMES)
    assert main(["run", str(flow_file), "--runs", "4", "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    failed_runs = summary["failed_runs"]
    assert (summary["failed"], len(failed_runs)) == (2, 2)
    assert [set(run) for run in failed_runs] == [{"run_id", "error"}] * 2
    engine = failed_runs[0]["run_id"].rpartition("-")[0]
    assert [run["run_id"] for run in failed_runs] == [f"{engine}-2", f"{engine}-4"]
    for run in failed_runs:  # one run at a time: every second one fails
        assert run["error"] == (
            "NodeError: node 'sometimes' failed in exec "
            f"(flow 'sometimes', run {run['run_id']}, 1 attempt)"
            " (caused by ValueError: odd call)"
        )
    assert summary["first_error"] == failed_runs[0]["error"]


def test_a_progress_bar_when_stderr_is_a_terminal(
    counter_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    assert main(["run", str(counter_file), "--runs", "3"]) == 0
    err = capsys.readouterr().err
    assert "3/3" in err
    assert "runs/s" in err
    assert "0 failed" in err


def test_the_run_latency_and_the_bar_count_the_runs_started_not_their_children(
    batched_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    assert main(["run", str(batched_file), "--runs", "4", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert min(summary["latency_ms"].values()) >= 20
    assert {int(done) for done in re.findall(r"(\d+)/4", captured.err)} <= {0, 1, 2, 3, 4}
    assert "4/4" in captured.err
    assert list(summary["nodes"]) == ["items", "child/item", "slow"]
    assert summary["nodes"]["child/item"]["steps"] == 12


RESCUED = """
import itertools

import cosmoflow_actors as cf

calls = itertools.count()


class Rescued(cf.Node):
    def exec(self, prep_res, ctx):
        if next(calls) % 2:
            raise ConnectionError("down")
        return "fetched"

    def exec_fallback(self, prep_res, error, ctx):
        return "cached"


name = "a_node_whose_long_name_makes_the_table_wider_than_eighty_columns"
flow = cf.Flow.builder("rescued").add_node(name, Rescued()).build()
"""
"""Every second step's exec fails and its fallback rescues it; the node's name is long."""


def test_fallbacks_are_counted_and_a_wide_table_is_not_wrapped_on_a_pipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "rescued.py"
    flow_file.write_text(RESCUED)
    node = "a_node_whose_long_name_makes_the_table_wider_than_eighty_columns"
    assert main(["run", str(flow_file), "--runs", "4"]) == 0
    out = capsys.readouterr().out
    row = table_row(out, node)
    assert (row[1], *row[5:]) == ("4", "0", "2", "0")  # steps, retries, fallbacks, failures
    assert max(len(line) for line in out.splitlines()) > 80  # one line a row, not wrapped
    assert main(["run", str(flow_file), "--runs", "4", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["nodes"][node]
    assert (stats["retries"], stats["fallbacks"], stats["failures"]) == (0, 2, 0)
