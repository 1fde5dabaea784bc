"""The cosmoflow command: running a flow file, and one-line errors for people."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.cli import main
from tests.storage_suite import RedisServer, unique_namespace

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_run_prints_the_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXAMPLES / "hello_world.py")]) == 0
    out = capsys.readouterr().out
    assert "path:         greet -> shout" in out
    assert "result:       'HELLO, WORLD!'" in out


def test_run_json_with_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flow_file = tmp_path / "echo.py"
    flow_file.write_text(
        "import cosmoflow_actors as cf\n"
        "@cf.node\n"
        "def echo(ctx):\n"
        "    return cf.Action.complete(dict(ctx.params))\n"
        "echo_flow = cf.Flow.builder('echo').add_node('echo', echo).build()\n"
    )
    assert (
        main(["run", f"{flow_file}:echo_flow", "--param", "n=3", "--param", "who=ada", "--json"])
        == 0
    )
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["result"] == {"n": 3, "who": "ada"}
    assert outcome["path"] == ["echo"]


@pytest.mark.parametrize(
    ("content", "target_suffix", "message"),
    [
        (None, "", "no such file"),
        ("x = 1\n", "", "expected exactly one Flow, found none"),
        (
            "import cosmoflow_actors as cf\n"
            "a = cf.Flow.builder('a').add_node('n', cf.Node()).build()\n"
            "b = a\n",
            "",
            "found a, b",
        ),
        (
            "import cosmoflow_actors as cf\na = cf.Flow.builder('a').build()\n",
            "",
            "FlowValidationError",
        ),
        ("x = 1\n", ":missing", "no Flow named 'missing'"),
        ("raise SystemError('boom')\n", "", "SystemError: boom"),
    ],
)
def test_bad_input_is_one_line_on_stderr(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    target_suffix: str,
    message: str,
) -> None:
    flow_file = tmp_path / "flows.py"
    if content is not None:
        flow_file.write_text(content)
    assert main(["run", f"{flow_file}{target_suffix}", "--param", "a=1"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_a_failing_node_exits_1_naming_the_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "fails.py"
    flow_file.write_text(
        "import cosmoflow_actors as cf\n"
        "@cf.node\n"
        "def boom(ctx):\n"
        "    raise ValueError('bad data')\n"
        "flow = cf.Flow.builder('f').add_node('boom', boom).build()\n"
    )
    assert main(["run", str(flow_file)]) == 1
    err = capsys.readouterr().err
    assert "node 'boom' failed in exec" in err
    assert "ValueError: bad data" in err
    assert main(["run", str(flow_file), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_json_shows_a_failed_run_with_its_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "fails.py"
    flow_file.write_text(
        "import cosmoflow_actors as cf\n"
        "@cf.node\n"
        "async def boom(ctx):\n"
        "    await ctx.store.set('before', 1)\n"
        "    raise ValueError('bad data')\n"
        "flow = cf.Flow.builder('f').add_node('boom', boom).build()\n"
    )
    assert main(["run", str(flow_file), "--json"]) == 1
    captured = capsys.readouterr()
    outcome = json.loads(captured.out)
    run_id = outcome["run_id"]
    assert outcome == {
        "flow": "f",
        "run_id": run_id,
        "success": False,
        "error": f"NodeError: node 'boom' failed in exec (flow 'f', run {run_id}, 1 attempt) "
        "(caused by ValueError: bad data)",
        "final_action": None,
        "result": None,
        "path": None,
        "steps": None,
        "duration": None,
        "store": {"before": 1},
    }
    assert captured.err.startswith("cosmoflow: error: node 'boom' failed in exec")
    assert main(["run", str(flow_file), "--json", "--runs", "3"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["succeeded"], summary["failed"]) == (0, 3)
    assert summary["first_error"].endswith("(caused by ValueError: bad data)")


def test_json_of_a_run_that_succeeded_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXAMPLES / "hello_world.py"), "--json"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert (outcome["success"], outcome["error"]) == (True, None)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"cosmoflow {cf.__version__}\n"


ARGV = """
import sys

import cosmoflow_actors as cf

AT_IMPORT = list(sys.argv)


@cf.node
def report(ctx):
    return cf.Action.complete({"at_import": AT_IMPORT, "at_run": list(sys.argv)})


flow = cf.Flow.builder("argv").add_node("report", report).build()
"""
"""A flow file that reads sys.argv when it is imported and when it runs."""


def test_arguments_after_dashes_are_the_files_argv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "argv.py"
    flow_file.write_text(ARGV)
    saved = list(sys.argv)
    args = ["run", f"{flow_file}:flow", "--json", "--", "--name", "ada", "--"]
    assert main(args) == 0
    expected = [str(flow_file), "--name", "ada", "--"]
    assert json.loads(capsys.readouterr().out)["result"] == {
        "at_import": expected,
        "at_run": expected,
    }
    assert sys.argv == saved
    assert main(["run", str(flow_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["at_run"] == [str(flow_file)]


def test_inspect_takes_no_arguments_for_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "file:x.json", "--", "extra"])
    assert exit_info.value.code == 2
    assert "inspect runs no file" in capsys.readouterr().err


RUNS_AT_IMPORT = {
    "run_sync": "flow.run_sync()\n",
    "await flow.run": "trio.run(flow.run)\n",
}


@pytest.mark.parametrize("command", ["run", "graph"])
@pytest.mark.parametrize("call", sorted(RUNS_AT_IMPORT))
def test_a_file_that_runs_a_flow_when_imported_is_refused_at_that_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, call: str
) -> None:
    """The command imports the file to find its flows; running one then is an error at
    the line that runs it, and the flow's nodes never run."""
    marker = tmp_path / "ran"
    flow_file = tmp_path / "eager.py"
    flow_file.write_text(
        "import pathlib\n"
        "import trio\n"
        "import cosmoflow_actors as cf\n"
        "@cf.node\n"
        "def touch(ctx):\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        "flow = cf.Flow.builder('eager').add_node('touch', touch).build()\n" + RUNS_AT_IMPORT[call]
    )
    assert main([command, str(flow_file)]) == 2
    assert capsys.readouterr().err == (
        f"cosmoflow: error: {flow_file}:8: RuntimeError: flow 'eager' was run while the "
        "cosmoflow command imported its file to find the flows in it; put the code that "
        'runs flows under `if __name__ == "__main__":`\n'
    )
    assert not marker.exists()


def test_a_file_that_runs_its_flow_under_a_main_guard_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "guarded.py"
    flow_file.write_text(
        "import cosmoflow_actors as cf\n"
        "flow = cf.Flow.builder('guarded').add_node('a', cf.Node()).build()\n"
        "if __name__ == '__main__':\n"
        "    flow.run_sync()\n"
    )
    assert main(["run", str(flow_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == ["a"]


def test_an_error_at_import_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "broken.py"
    flow_file.write_text(
        "import cosmoflow_actors as cf\n"
        "def build():\n"
        "    return cf.Flow.builder('b').add_node('a', cf.Node()).add_route('a', 'z').build()\n"
        "flow = build()\n"
    )
    assert main(["graph", str(flow_file)]) == 2
    assert capsys.readouterr().err == (
        f"cosmoflow: error: {flow_file}:3: FlowValidationError: flow 'b' is invalid: "
        "route from 'a' to unknown node 'z'\n"
    )


def test_a_malformed_param_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXAMPLES / "hello_world.py"), "--param", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_python_dash_m_runs_the_command() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cosmoflow_actors",
            "run",
            str(EXAMPLES / "authentication.py"),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout)["path"] == ["check", "login"]


# --store, --runs, --trace, graph and inspect

COUNTER = """
import cosmoflow_actors as cf


class Flaky(cf.Node):
    max_retries = 2

    def exec(self, prep_res, ctx):
        if ctx.current_retry == 0:
            raise ConnectionError("first attempt fails")

    async def post(self, store, prep_res, exec_res, ctx):
        await store.set("who", ctx.params.get("who", "nobody"))


@cf.node
async def count(ctx):
    total = await ctx.store.update("count", lambda n: n + 1, default=0)
    return cf.Action.complete(total)


checks = cf.Flow.builder("checks").add_node("flaky", Flaky()).build()
counter = (
    cf.Flow.builder("counter")
    .add_node("checks", checks)
    .add_node("count", count)
    .add_route("checks", "count")
    .build()
)
"""
"""Two flows, one nested in the other: the command picks the outer one by itself."""

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


@pytest.fixture(autouse=True)
def plain_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let rich see what the test sees (a pipe), whatever the environment says."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def counter_file(tmp_path: Path) -> Path:
    path = tmp_path / "counter.py"
    path.write_text(COUNTER)
    return path


def table_row(out: str, name: str) -> list[str]:
    """The cells of the table row whose first cell is ``name``."""
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{out}")


def test_graph_prints_the_diagram(counter_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", str(counter_file)]) == 0
    assert capsys.readouterr().out.splitlines()[3:] == [
        "flowchart TD",
        '    subgraph checks ["checks"]',
        '        checks__flaky["flaky"]',
        "    end",
        '    count["count"]',
        "    checks --> count",
    ]
    assert main(["graph", f"{counter_file}:checks", "--format", "dot"]) == 0
    assert capsys.readouterr().out == (
        'digraph "checks" {\n'
        "    compound=true;\n"
        "    node [shape=box];\n"
        '    "flaky" [label="flaky"];\n'
        "}\n"
    )


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_run_on_a_persistent_store_then_inspect_it(
    kind: str, tmp_path: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"{kind}:{tmp_path / 'state'}"
    for _ in range(2):
        assert main(["run", str(counter_file), "--store", store, "--param", "who=ada"]) == 0
    assert "result:       2" in capsys.readouterr().out
    assert main(["inspect", store]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"store: {store}\nkeys (2)")
    assert table_row(out, "count") == ["count", "int", "2"]
    assert table_row(out, "who") == ["who", "str", "'ada'"]
    assert main(["inspect", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "store": store,
        "keys": {"count": 2, "who": "ada"},
        "runs": [],
    }


def test_run_json_shows_a_persistent_store(
    tmp_path: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"sqlite:{tmp_path / 'state.db'}"
    assert main(["run", str(counter_file), "--store", store, "--json"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert (outcome["path"], outcome["store"]) == (
        ["flaky", "count"],
        {"count": 1, "who": "nobody"},
    )


def test_run_and_inspect_on_redis(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"{redis_server.url}#{unique_namespace()}"
    assert main(["run", str(counter_file), "--store", store, "--runs", "3"]) == 0
    capsys.readouterr()
    assert main(["inspect", store]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"store: RedisStorage('{redis_server.url}', namespace=")
    assert table_row(out, "count") == ["count", "int", "3"]


def test_inspect_shows_long_values_shortened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fill() -> None:
        storage = cf.FileStorage(tmp_path / "s.json")
        await storage.set("items", list(range(100)))
        await storage.commit()
        await storage.aclose()

    trio.run(fill)
    before = (tmp_path / "s.json").read_bytes()
    assert main(["inspect", f"file:{tmp_path / 's.json'}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == {"items": list(range(100))}
    assert main(["inspect", f"file:{tmp_path / 's.json'}"]) == 0
    [_, kind, value] = table_row(capsys.readouterr().out, "items")
    assert (kind, value) == ("list", repr(list(range(100)))[:59] + "…")
    assert (tmp_path / "s.json").read_bytes() == before


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
    assert (flaky[1], flaky[5], flaky[6]) == ("4", "4", "0")
    assert all(cell.endswith(" ms") for cell in flaky[2:5])
    count = table_row(out, "count")
    assert (count[1], count[5], count[6]) == ("4", "0", "0")


def test_runs_as_json(counter_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(counter_file), "--runs", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {key: summary[key] for key in ("flow", "runs", "succeeded", "failed")} == {
        "flow": "counter",
        "runs": 3,
        "succeeded": 3,
        "failed": 0,
    }
    assert (summary["concurrency"], summary["events_dropped"], summary["first_error"]) == (
        1,
        0,
        None,
    )
    assert summary["runs_per_second"] > 0
    assert set(summary["latency_ms"]) == {"mean_ms", "p50_ms", "p99_ms"}
    flaky = summary["nodes"]["checks/flaky"]
    assert (flaky["steps"], flaky["retries"], flaky["failures"]) == (3, 3, 0)
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
    assert table_row(captured.out, "sometimes")[6] == "2"
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


def test_trace_prints_every_event_on_stderr(
    counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(counter_file), "--trace"]) == 0
    captured = capsys.readouterr()
    assert "result:       1" in captured.out
    what = [re.split(r"\s{2,}", line.strip())[2] for line in captured.err.splitlines()]
    assert what == [
        "run started",
        "step started",
        "retry",
        "step finished",
        "step started",
        "step finished",
        "run finished",
    ]
    assert "checks/flaky attempt 1 failed: ConnectionError: first attempt fails" in captured.err


TWINS = """
import cosmoflow_actors as cf


class Check(cf.Node):
    max_retries = 2

    def exec(self, prep_res, ctx):
        if ctx.current_retry == 0:
            raise ConnectionError("first attempt fails")


left = cf.Flow.builder("left").add_node("check", Check()).build()
right = cf.Flow.builder("right").add_node("check", Check()).build()
inner = cf.Flow.builder("inner").add_node("check", Check()).build()
deep = cf.Flow.builder("deep").add_node("inner", inner).build()
twins = (
    cf.Flow.builder("twins")
    .add_node("left", left)
    .add_node("right", right)
    .add_node("deep", deep)
    .add_node("check", Check())
    .add_route("left", "right")
    .add_route("right", "deep")
    .add_route("deep", "check")
    .build()
)
"""
"""Nested flows with a node of the same name (``check``), one of them two levels down."""


def test_trace_and_runs_name_a_nested_node_by_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "twins.py"
    flow_file.write_text(TWINS)
    paths = ["left/check", "right/check", "deep/inner/check", "check"]
    assert main(["run", str(flow_file), "--trace"]) == 0
    lines = [re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().err.splitlines()]
    started = [details for _, _, what, details in lines if what == "step started"]
    assert started == paths
    retries = [details.split(" attempt")[0] for _, _, what, details in lines if what == "retry"]
    assert retries == paths
    finished = [details.split(" ->")[0] for _, _, what, details in lines if what == "step finished"]
    assert finished == paths
    assert main(["run", str(flow_file), "--runs", "2", "--json"]) == 0
    nodes = json.loads(capsys.readouterr().out)["nodes"]
    assert {row: stats["retries"] for row, stats in nodes.items()} == dict.fromkeys(paths, 2)


def test_trace_with_runs(counter_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(counter_file), "--runs", "2", "--trace"]) == 0
    assert capsys.readouterr().err.count("run finished") == 2


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "2"], "--concurrency needs --runs"),
        (["--store", "nowhere"], "store 'nowhere': expected memory, file:PATH, sqlite:PATH"),
        (["--store", "file:"], "store 'file:': expected"),
    ],
)
def test_bad_run_options_are_refused(
    counter_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["run", str(counter_file), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_a_store_that_cannot_be_opened_is_bad_input(
    tmp_path: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for argv in (
        ["run", str(counter_file), "--store", f"file:{broken}"],
        ["inspect", f"file:{broken}"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cosmoflow: error: cannot open the store: {broken}")
        assert err.count("\n") == 1
    assert broken.read_text() == "{not json"


def test_runs_must_be_positive(counter_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(counter_file), "--runs", "0"])
    assert exit_info.value.code == 2
    assert "expected an integer >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("memory", "memory: a memory store lives only as long as its run"),
        ("file:missing.json", "file:missing.json: no such file"),
        ("sqlite:missing.db", "sqlite:missing.db: no such file"),
    ],
)
def test_inspect_needs_an_existing_persistent_store(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    store: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", store]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_is_one_line_and_status_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "interrupted.py"
    flow_file.write_text(
        "import cosmoflow_actors as cf\n"
        "@cf.node\n"
        "def stop(ctx):\n"
        "    raise KeyboardInterrupt\n"
        "flow = cf.Flow.builder('f').add_node('stop', stop).build()\n"
    )
    assert main(["run", str(flow_file)]) == 130
    assert capsys.readouterr().err == "cosmoflow: interrupted\n"


def test_ctrl_c_exits_with_status_130(tmp_path: Path) -> None:
    """A real SIGINT, as Ctrl-C sends, while a run is in a node."""
    flow_file = tmp_path / "waits.py"
    flow_file.write_text(
        "import trio\n"
        "import cosmoflow_actors as cf\n"
        "@cf.node\n"
        "async def wait(ctx):\n"
        "    print('waiting', flush=True)\n"
        "    await trio.sleep_forever()\n"
        "flow = cf.Flow.builder('waits').add_node('wait', wait).build()\n"
    )
    command = [sys.executable, "-m", "cosmoflow_actors", "run", str(flow_file)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "waiting\n"  # the run is in its node
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert (out, err) == ("", "cosmoflow: interrupted\n")


def test_inspect_lists_the_durable_runs_of_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "runs.json"
    flow = cf.Flow.builder("chain").add_node("a", cf.Node()).add_node("b", cf.Node())
    flow.add_route("a", "b").build().run_sync(cf.FileStorage(path), run_id="nightly")
    assert main(["inspect", f"file:{path}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == [
        {
            "run_id": "nightly",
            "flow_name": "chain",
            "state": "succeeded",
            "last_node_id": "b",
            "steps": 2,
            "owner": None,
            "queue": None,
            "lease_left": None,
        }
    ]
    assert main(["inspect", f"file:{path}"]) == 0
    out = capsys.readouterr().out
    assert "runs (1)" in out
    assert "nightly" in out and "succeeded" in out


def test_run_id_makes_a_durable_run_that_resume_does_not_repeat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "counted.py"
    flow_file.write_text(
        "import cosmoflow_actors as cf\n"
        "@cf.node\n"
        "async def bump(ctx):\n"
        "    return cf.Action.complete(await ctx.store.update('n', lambda n: n + 1, default=0))\n"
        "flow = cf.Flow.builder('counted').add_node('bump', bump).build()\n"
    )
    store = f"sqlite:{tmp_path / 'runs.db'}"
    for argv in (
        ["run", str(flow_file), "--store", store, "--run-id", "r1", "--json"],
        ["run", str(flow_file), "--store", store, "--run-id", "r1", "--resume", "--json"],
    ):
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["result"] == 1
    assert main(["run", str(flow_file), "--runs", "2", "--run-id", "r1"]) == 2
    assert "--run-id names one run" in capsys.readouterr().err
    assert main(["run", str(flow_file), "--resume"]) == 2
    assert "--resume needs --run-id" in capsys.readouterr().err


def test_a_run_id_recorded_as_failed_or_for_another_flow_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failing = tmp_path / "failing.py"
    failing.write_text(
        "import cosmoflow_actors as cf\n"
        "@cf.node\n"
        "async def fail(ctx):\n"
        "    raise RuntimeError('no')\n"
        "flow = cf.Flow.builder('failing').add_node('fail', fail).build()\n"
    )
    other = tmp_path / "other.py"
    other.write_text(
        "import cosmoflow_actors as cf\n"
        "flow = cf.Flow.builder('other').add_node('n', cf.Node()).build()\n"
    )
    store = f"sqlite:{tmp_path / 'runs.db'}"
    assert main(["run", str(failing), "--store", store, "--run-id", "r1"]) == 1
    capsys.readouterr()
    assert main(["run", str(failing), "--store", store, "--run-id", "r1"]) == 2
    assert capsys.readouterr().err == (
        "cosmoflow: error: run 'r1' is recorded as failed: continue it with --resume\n"
    )
    assert main(["run", str(other), "--store", store, "--run-id", "r1", "--resume"]) == 2
    assert capsys.readouterr().err == (
        "cosmoflow: error: run 'r1' belongs to flow 'failing', not 'other'\n"
    )


def test_submit_prints_the_run_id_and_status_shows_the_run_pending(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = f"{redis_server.url}/{unique_namespace()}"
    argv = ["submit", str(counter_file), "--queue", queue, "--param", "n=1", "--run-id", "job-1"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "job-1\n"
    assert main(["status", "--queue", queue]) == 0
    out = capsys.readouterr().out
    assert "0 pending" not in out and "1 pending, 0 running, 0 orphaned" in out
    assert table_row(out, "job-1") == ["job-1", "counter", "pending", "-", "-", "0"]
    assert main(["status", "--queue", queue, "--json"]) == 0
    [run] = json.loads(capsys.readouterr().out)
    assert (run["run_id"], run["state"], run["owner"]) == ("job-1", "pending", None)
    assert main(["status", "--queue", queue, "--state", "failed"]) == 0
    out = capsys.readouterr().out
    assert "1 pending, 0 running" in out and "runs (0)" in out
    assert main(["status", "--queue", queue, "--state", "pending", "--json"]) == 0
    assert [run["run_id"] for run in json.loads(capsys.readouterr().out)] == ["job-1"]


IMPORTS_COUNTED = """
from pathlib import Path

import cosmoflow_actors as cf

with Path(__file__).with_name("imports.log").open("a") as log:
    log.write("imported\\n")


@cf.node
async def greet(ctx):
    return cf.Action.complete(ctx.params)


hello = cf.Flow.builder("hello").add_node("greet", greet).build()
bye = cf.Flow.builder("bye").add_node("greet", greet).build()
"""
"""Two flows in a file that notes each time it is imported, in imports.log beside it."""


def test_submit_adds_many_runs_and_imports_the_file_once(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flows = tmp_path / "flows.py"
    flows.write_text(IMPORTS_COUNTED)
    queue = f"{redis_server.url}/{unique_namespace()}"
    target = f"{flows}:hello"
    assert main(["submit", target, "--queue", queue, "--runs", "3", "--param", "n=1"]) == 0
    fresh = capsys.readouterr().out.split()
    assert len(set(fresh)) == 3
    params_file = tmp_path / "params.jsonl"
    params_file.write_text('{"n": 2}\n\n{"n": 3, "who": "ada"}\n')
    argv = ["submit", target, "--queue", queue, "--param", "who=bob", "--run-id", "b"]
    assert main([*argv, "--params-file", str(params_file)]) == 0
    assert capsys.readouterr().out == "b-1\nb-2\n"
    assert (tmp_path / "imports.log").read_text() == "imported\n" * 2  # once a command

    async def params_of(run_ids: list[str]) -> list[object]:
        runs = cf.RunQueue.from_url(queue)
        return [(await runs.info(run_id) or {}).get("params") for run_id in run_ids]

    assert trio.run(params_of, [*fresh, "b-1", "b-2"]) == [
        *[{"n": 1}] * 3,
        {"who": "bob", "n": 2},
        {"who": "ada", "n": 3},
    ]
    params_file.write_text('{"n": 4}\n{"n": NaN}\n')
    assert main([*argv, "--params-file", str(params_file)]) == 2
    assert capsys.readouterr().err == (
        f"cosmoflow: error: {params_file}:2: not JSON: NaN is not JSON\n"
    )
    assert trio.run(params_of, ["b-3"]) == [None]  # a bad line: nothing submitted


def test_a_worker_imports_a_file_once_for_all_its_flows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flows = tmp_path / "flows.py"
    flows.write_text(IMPORTS_COUNTED)
    argv = ["worker", f"{flows}:hello", f"{flows}:bye", "--queue", "redis://h/q"]
    assert main([*argv, "--store", "file:x"]) == 2  # refused once the flows are loaded
    assert "store 'file:x'" in capsys.readouterr().err
    assert (tmp_path / "imports.log").read_text() == "imported\n"


def test_requeue_refuses_a_run_that_is_not_failed_or_not_on_the_queue(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = f"{redis_server.url}/{unique_namespace()}"
    assert main(["submit", str(counter_file), "--queue", queue, "--run-id", "job-1"]) == 0
    capsys.readouterr()
    assert main(["requeue", "job-1", "--queue", queue]) == 2
    assert "run 'job-1' is pending on" in capsys.readouterr().err
    assert main(["requeue", "nobody", "--queue", queue]) == 2
    assert "run 'nobody' is not on" in capsys.readouterr().err


def test_status_prints_the_error_of_each_failed_run(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = f"{redis_server.url}/{unique_namespace()}"
    store = f"{redis_server.url}#{unique_namespace()}"

    @cf.node
    async def broken(ctx: cf.ExecutionContext) -> None:
        raise RuntimeError("disk full")

    flow = cf.Flow.builder("broken").add_node("broken", broken).build()

    async def fail_one() -> None:
        async with cf.open_engine() as engine, trio.open_nursery() as nursery:
            await nursery.start(partial(engine.serve, name="w1"), queue, [flow], store)
            await cf.submit(queue, "broken", run_id="job-1")
            with pytest.raises(cf.CosmoFlowError, match="disk full"):
                await cf.result(queue, "job-1")
            nursery.cancel_scope.cancel()

    trio.run(fail_one)
    assert main(["status", "--queue", queue, "--state", "failed"]) == 0
    out = capsys.readouterr().out
    assert table_row(out, "job-1")[2] == "failed"
    error = "NodeError: node 'broken' failed in exec (flow 'broken', run job-1, 1 attempt)"
    assert f"\njob-1 failed: {error} (caused by RuntimeError: disk full)\n" in out  # one line


def test_a_worker_process_runs_the_submitted_runs(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = f"{redis_server.url}/{unique_namespace()}"
    store = f"{redis_server.url}#{unique_namespace()}"
    hello = str(EXAMPLES / "hello_world.py")
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", hello, "--queue", queue]
    command += ["--store", store, "--name", "w1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as worker:
        assert worker.stdout is not None
        assert worker.stdout.readline().startswith("worker w1 serving ")
        assert main(["submit", hello, "--queue", queue]) == 0
        run_id = capsys.readouterr().out.strip()
        done = trio.run(cf.result, queue, run_id)
        worker.terminate()
    assert (done.result, done.worker) == ("HELLO, WORLD!", "w1")
    assert main(["status", "--queue", queue]) == 0
    assert table_row(capsys.readouterr().out, run_id)[2:4] == ["succeeded", "w1"]
    assert main(["inspect", f"{store}/{run_id}", "--json"]) == 0
    [record] = json.loads(capsys.readouterr().out)["runs"]
    assert (record["run_id"], record["state"], record["owner"]) == (run_id, "succeeded", "w1")
    assert record["queue"] == queue


BLOCKS = """
import os

import trio

import cosmoflow_actors as cf


@cf.node
async def step(ctx):
    if os.environ.get("BLOCK"):
        print("in step", flush=True)
        await trio.sleep_forever()
    return cf.Action.complete("done")


flow = cf.Flow.builder("blocks").add_node("step", step).build()
"""
"""A flow whose step never ends in a worker started with BLOCK set in its environment."""


async def result_within(queue: str, run_id: str, seconds: float) -> cf.QueuedResult:
    with trio.fail_after(seconds):
        return await cf.result(queue, run_id)


def test_sigterm_stops_a_worker_which_hands_its_run_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A real SIGTERM while the worker's run is in its node: the worker exits with status
    143 and one line, having dropped its lease and given the run back to the queue, so
    that a worker started afterwards takes the run over at once, not after the lease."""
    flow_file = tmp_path / "blocks.py"
    flow_file.write_text(BLOCKS)
    queue = f"{redis_server.url}/{unique_namespace()}"
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", str(flow_file), "--queue"]
    command += [queue, "--store", f"{redis_server.url}#{unique_namespace()}", "--lease", "60"]
    blocking = {**os.environ, "BLOCK": "1"}
    with subprocess.Popen(
        [*command, "--name", "w1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=blocking,
    ) as w1:
        assert w1.stdout is not None
        assert w1.stdout.readline().startswith("worker w1 serving ")
        run_id = trio.run(cf.submit, queue, "blocks")
        assert w1.stdout.readline() == "in step\n"
        w1.send_signal(signal.SIGTERM)
        out, err = w1.communicate(timeout=60)
    assert w1.returncode == 143
    assert (out, err) == ("", "cosmoflow: terminated\n")
    [run] = trio.run(cf.queue_status, queue)
    assert (run.state, run.owner, run.lease_left) == ("orphaned", "w1", None)
    with subprocess.Popen([*command, "--name", "w2"], stdout=subprocess.PIPE, text=True) as w2:
        try:
            assert w2.stdout is not None
            assert w2.stdout.readline().startswith("worker w2 serving ")
            done = trio.run(result_within, queue, run_id, 10)  # far less than the lease
        finally:
            w2.terminate()
    assert (done.result, done.worker) == ("done", "w2")


async def passed_over(queue: str) -> None:
    """Return once a worker has passed a run of ``queue`` over (read every 20 ms);
    raise TooSlowError after 10 s."""
    with trio.fail_after(10):
        while True:
            if any(run.passed_over for run in await cf.queue_status(queue)):
                return
            await trio.sleep(0.02)


def test_status_names_the_workers_that_passed_a_run_over(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker serving only another flow leaves the run pending, and says so."""
    queue = f"{redis_server.url}/{unique_namespace()}"
    hello = str(EXAMPLES / "hello_world.py")
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", hello, "--queue", queue]
    command += ["--store", f"{redis_server.url}#{unique_namespace()}", "--name", "w1"]
    assert main(["submit", str(counter_file), "--queue", queue, "--run-id", "job-1"]) == 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as worker:
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().startswith("worker w1 serving ")
            trio.run(passed_over, queue)
        finally:
            worker.terminate()
    capsys.readouterr()
    assert main(["status", "--queue", queue]) == 0
    out = capsys.readouterr().out
    assert "1 pending, 0 running" in out
    assert "1 wait for a worker with their flow (passed over by w1)" in out
    assert main(["status", "--queue", queue, "--json"]) == 0
    [run] = json.loads(capsys.readouterr().out)
    assert (run["state"], run["passed_over"]) == ("pending", ["w1"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["submit", "FILE", "--queue", "redis://127.0.0.1:1"], "expected redis://HOST"),
        (["status", "--queue", "http://host/q"], "expected redis://HOST"),
        (["worker", "FILE", "--queue", "redis://h/q", "--store", "file:x"], "store 'file:x'"),
        (
            ["worker", "FILE", "--queue", "redis://h/q", "--store", "redis://h", "--lease", "0"],
            "--lease must be > 0",
        ),
        (
            ["worker", "FILE", "--queue", "redis://h/q", "--store", "redis://h", "--flow-wait=-1"],
            "--flow-wait must be >= 0",
        ),
        (
            ["worker", "FILE", "--queue", "redis://h/q", "--store", "redis://h", "--lease", "inf"],
            "--lease must be > 0 seconds and finite, got inf",
        ),
        (
            ["submit", "FILE", "--queue", "redis://127.0.0.1:1/q", "--param", "x=NaN"],
            "param 'x' of run",
        ),
        (
            ["worker", "FILE", "FILE", "--queue", "redis://h/q", "--store", "redis://h"],
            "both give a flow named 'counter'; a worker serves one flow per name",
        ),
    ],
)
def test_queue_commands_refuse_a_bad_queue_or_store(
    counter_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [str(counter_file) if arg == "FILE" else arg for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_a_queue_whose_keys_no_queue_wrote_is_named_not_called_unreachable(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique_namespace()
    queue = f"{redis_server.url}/{name}"
    trio.run(cf.RunQueue(redis_server.url, name).call, "SET", f"cosmoflow:queue:{name}:runs", "x")
    for argv in (["status", "--queue", queue], ["submit", str(counter_file), "--queue", queue]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cosmoflow: error: queue {queue}: ")
        assert "WRONGTYPE" in err and err.count("\n") == 1


# inspect changes nothing; what the command prints is what happened


def snapshot_of(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``directory`` with its content and mtime."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in directory.iterdir()}


async def fill_file_store(path: Path) -> None:
    """A file store with commits in its journal (not closed: not compacted)."""
    storage = cf.FileStorage(path)
    await storage.set("a", 1)
    await storage.commit()
    await storage.set("b", [1, 2])
    await storage.commit()


async def fill_sqlite_store(path: Path) -> None:
    storage = cf.SQLiteStorage(path)
    await storage.set("a", 1)
    await storage.set("b", [1, 2])
    await storage.commit()
    await storage.aclose()


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_inspect_changes_no_file_of_the_store(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "store"
    trio.run(fill_file_store if kind == "file" else fill_sqlite_store, path)
    if kind == "file":  # and a torn last line, as a crash during an append leaves
        with (tmp_path / "store.journal").open("ab") as journal:
            journal.write(b'[["set","c",')
    before = snapshot_of(tmp_path)
    assert main(["inspect", f"{kind}:{path}"]) == 0
    assert table_row(capsys.readouterr().out, "b") == ["b", "list", "[1, 2]"]
    assert main(["inspect", f"{kind}:{path}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == {"a": 1, "b": [1, 2]}
    assert snapshot_of(tmp_path) == before


def test_inspect_shows_an_empty_sqlite_file_as_an_empty_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    before = snapshot_of(tmp_path)
    assert main(["inspect", f"sqlite:{path}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == {}
    assert snapshot_of(tmp_path) == before


def test_a_worker_refuses_a_store_it_cannot_reach(
    redis_server: RedisServer, counter_file: Path
) -> None:
    """Not a worker that claims runs only to drop them: a process, in case it serves."""
    queue = f"{redis_server.url}/{unique_namespace()}"
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", str(counter_file)]
    command += ["--queue", queue, "--store", "redis://127.0.0.1:1#x"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert (process.returncode, process.stdout) == (2, "")
    assert process.stderr.startswith("cosmoflow: error: cannot reach the store RedisStorage(")
    assert process.stderr.count("\n") == 1


def no_constant(name: str) -> object:
    raise AssertionError(f"not JSON: {name}")


ODD_VALUES = """
import cosmoflow_actors as cf


@cf.node
async def odd(ctx):
    odd = {(1, 2): "pair", 3: "three", "nan": float("nan"), "inf": float("-inf")}
    return cf.Action.complete(odd)


flow = cf.Flow.builder("odd").add_node("odd", odd).build()
"""


def test_json_output_is_strict_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flow_file = tmp_path / "odd.py"
    flow_file.write_text(ODD_VALUES)
    assert main(["run", str(flow_file), "--json"]) == 0
    outcome = json.loads(capsys.readouterr().out, parse_constant=no_constant)
    assert outcome["result"] == {"(1, 2)": "pair", "3": "three", "nan": "nan", "inf": "-inf"}
    assert main(["run", f"{EXAMPLES / 'hello_world.py'}", "--param", "k=NaN", "--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=no_constant)

    async def fill() -> None:
        storage = cf.FileStorage(tmp_path / "p.json", codec="pickle")
        await storage.set("odd", {(1, 2): float("nan")})
        await storage.commit()
        await storage.aclose()

    trio.run(fill)
    assert main(["inspect", f"file:{tmp_path / 'p.json'}", "--codec", "pickle", "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=no_constant)
    assert report["keys"] == {"odd": {"(1, 2)": "nan"}}


def test_a_value_that_cannot_be_read_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.db"
    trio.run(fill_sqlite_store, path)
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("UPDATE cosmoflow_store SET value = 'text' WHERE key = 'b'")
    store = f"sqlite:{path}"
    assert main(["run", str(EXAMPLES / "hello_world.py"), "--store", store, "--json"]) == 0
    captured = capsys.readouterr()
    unreadable = "<unreadable: StorageError: a stored value is a str, not bytes>"
    assert json.loads(captured.out)["store"] == {
        "a": 1,
        "b": unreadable,
        "greeting": "Hello, world!",
    }
    message = f"{store}: the value of 'b' cannot be read: StorageError: a stored value is a str"
    assert captured.err.startswith(f"cosmoflow: warning: {message}")
    assert main(["inspect", store]) == 2
    captured = capsys.readouterr()
    assert table_row(captured.out, "b")[1] == "unreadable"
    assert captured.err.startswith(f"cosmoflow: error: {message}")
    assert captured.err.count("\n") == 1


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("import sys\nsys.exit(3)\n", "flows.py:2: SystemExit: 3\n"),
        ("import sys\n\nsys.exit()\n", "flows.py:3: SystemExit\n"),
        ("raise BaseException('x')\n", "flows.py:1: BaseException: x\n"),
        (
            "class E(Exception):\n    def __str__(self):\n        raise RuntimeError\nraise E()\n",
            "flows.py:4: E: <unprintable>\n",
        ),
    ],
)
def test_a_file_that_exits_or_raises_anything_at_import_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    flow_file = tmp_path / "flows.py"
    flow_file.write_text(content)
    assert main(["run", str(flow_file)]) == 2
    assert capsys.readouterr().err == f"cosmoflow: error: {flow_file.parent}/{message}"


def test_a_file_name_with_a_colon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flow_file = tmp_path / "co:lon.py"
    flow_file.write_text(
        "import cosmoflow_actors as cf\na = cf.Flow.builder('a').add_node('x', cf.Node()).build()\n"
    )
    assert main(["run", str(flow_file)]) == 0
    assert main(["graph", f"{flow_file}:a"]) == 0
    assert main(["run", f"{flow_file}:b"]) == 2
    assert "co:lon.py: no Flow named 'b'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--runs", "3"]])
def test_output_to_a_closed_pipe_ends_quietly(extra: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone, as `| head` leaves it
    command = [sys.executable, "-m", "cosmoflow_actors", "run", str(EXAMPLES / "hello_world.py")]
    try:
        process = subprocess.run(
            [*command, *extra], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write_end)
    assert (process.returncode, process.stderr) == (141, "")


@pytest.mark.parametrize("command", ["run", "submit"])
def test_an_empty_run_id_is_refused(
    command: str, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = ["--queue", "redis://127.0.0.1:1/q"] if command == "submit" else []
    assert main([command, str(counter_file), *queue, "--run-id", ""]) == 2
    assert capsys.readouterr().err == "cosmoflow: error: --run-id must not be empty\n"


def test_concurrency_is_at_most_the_runs(
    counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(counter_file), "--runs", "2", "--concurrency", "100000"]) == 0
    assert "runs:         2 (2 succeeded, 0 failed), 2 at a time" in capsys.readouterr().out


STUCK = """
import time

import trio

import cosmoflow_actors as cf


@cf.node
async def stuck(ctx):
    try:
        print("waiting", flush=True)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            print("stopping", flush=True)
            await trio.to_thread.run_sync(time.sleep, 60)


flow = cf.Flow.builder("stuck").add_node("stuck", stuck).build()
"""
"""A run that, once cancelled, waits a minute for a thread, as a thread executor can."""


def test_a_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    flow_file = tmp_path / "stuck.py"
    flow_file.write_text(STUCK)
    command = [sys.executable, "-m", "cosmoflow_actors", "run", str(flow_file)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "waiting\n"
        process.send_signal(signal.SIGINT)
        assert process.stdout.readline() == "stopping\n"  # the first one is under way
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert (out, err) == ("", "cosmoflow: interrupted\n")


IN_A_THREAD = """
import os
import time

import cosmoflow_actors as cf


@cf.node
async def first(ctx):
    await ctx.store.update("first", lambda n: n + 1, default=0)


class Block(cf.Node):
    executor = "thread"

    def exec(self, prep_res, ctx):
        if os.environ.get("BLOCK"):
            print("blocking", flush=True)
            time.sleep(60)
        return "done"

    async def post(self, store, prep_res, exec_res, ctx):
        await store.set("block", exec_res)


flow = (
    cf.Flow.builder("threads")
    .add_node("first", first)
    .add_node("block", Block())
    .add_route("first", "block")
    .build()
)
"""
"""A durable flow whose second step blocks a thread for a minute when BLOCK is set."""


def test_ctrl_c_does_not_wait_for_a_thread_and_the_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "threads.py"
    flow_file.write_text(IN_A_THREAD)
    store = f"sqlite:{tmp_path / 'runs.db'}"
    argv = ["run", str(flow_file), "--store", store, "--run-id", "r1"]
    command = [sys.executable, "-m", "cosmoflow_actors", *argv]
    env = {**os.environ, "BLOCK": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "blocking\n"  # "first" has committed
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 130
    assert (out, err) == (
        "",
        "cosmoflow: interrupted (stopped without waiting for a step still running after 1 s)\n",
    )
    assert main([*argv, "--resume", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["store"] == {"first": 1, "block": "done"}  # "first" ran once


# --store of the user's own: python:MODULE:FACTORY[:ARGUMENT], and schemes of packages

USER_BACKEND = """
import json
from pathlib import Path

import trio

import cosmoflow_actors as cf


class JsonDocStorage(cf.Storage):
    \"\"\"The whole store as one JSON document, written by each commit, with the codec
    the store was built with.\"\"\"

    def __init__(self, path, codec="json"):
        self.document = Path(path)
        self.requested_codec = codec
        self.data = {}

    async def open(self):
        if self.document.exists():
            text = await trio.to_thread.run_sync(self.document.read_text)
            self.data = json.loads(text)["data"]

    async def get(self, key):
        return self.data[key]

    async def set(self, key, value):
        self.data[key] = value

    async def delete(self, key):
        return self.data.pop(key, None) is not None

    async def keys(self):
        return list(self.data)

    async def commit(self):
        text = json.dumps({"codec": self.requested_codec, "data": self.data})
        await trio.to_thread.run_sync(self.document.write_text, text)


def per_run(folder, run_id):
    if run_id.startswith("forbidden"):
        raise PermissionError(f"run {run_id} may not use {folder}")
    return JsonDocStorage(Path(folder) / f"{run_id}.json")


def not_storage(argument):
    return {argument: 1}


def broken(argument):
    raise ValueError(f"no bucket {argument}")


NOT_CALLABLE = 42
"""


@pytest.fixture
def user_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The module ``user_backend`` (a Storage of its own and factories) in a folder on
    sys.path, with ``raising_backend`` (raises when imported) and ``needy_backend``
    (imports a module that is not installed); yields the folder."""
    folder = tmp_path / "backends"
    folder.mkdir()
    (folder / "user_backend.py").write_text(USER_BACKEND)
    (folder / "raising_backend.py").write_text("raise RuntimeError('no credentials')\n")
    (folder / "needy_backend.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in ("user_backend", "raising_backend", "needy_backend"):
        sys.modules.pop(name, None)


def declare_schemes(folder: Path, package: str, schemes: dict[str, str]) -> None:
    """Install (in ``folder``, on sys.path) a package's metadata that declares
    ``schemes`` in the group cosmoflow_actors.storage, as its packaging would."""
    info = folder / f"{package}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    lines = [f"{scheme} = {target}" for scheme, target in schemes.items()]
    (info / "entry_points.txt").write_text("[cosmoflow_actors.storage]\n" + "\n".join(lines))


def test_a_python_store_runs_a_flow_in_a_process(
    user_backend: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The factory gets ARGUMENT (colons and all) and --codec; inspect reads the store."""
    document = user_backend / "state:1.json"
    store = f"python:user_backend:JsonDocStorage:{document}"
    command = [sys.executable, "-m", "cosmoflow_actors", "run", str(counter_file)]
    command += ["--store", store, "--codec", "pickle", "--param", "who=ada", "--json"]
    paths = [str(user_backend), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["store"] == {"who": "ada", "count": 1}
    assert json.loads(document.read_text()) == {
        "codec": "pickle",
        "data": {"who": "ada", "count": 1},
    }
    assert main(["inspect", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == {"who": "ada", "count": 1}


def test_a_scheme_a_package_declares_names_its_store(
    user_backend: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    declare_schemes(user_backend, "jsondoc", {"jsondoc": "user_backend:JsonDocStorage"})
    document = user_backend / "doc.json"
    for _ in range(2):
        assert main(["run", str(counter_file), "--store", f"jsondoc:{document}"]) == 0
    assert "result:       2" in capsys.readouterr().out
    assert json.loads(document.read_text())["data"] == {"who": "nobody", "count": 2}


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("python:no_such_module:make", "no module named 'no_such_module'"),
        (
            "python:needy_backend:make",
            "importing needy_backend raised ModuleNotFoundError: No module named"
            " 'no_such_dependency'",
        ),
        (
            "python:raising_backend:make",
            "importing raising_backend raised RuntimeError: no credentials",
        ),
        ("python:user_backend:absent", "module 'user_backend' has no attribute 'absent'"),
        ("python:user_backend:broken.inner", "user_backend:broken has no attribute 'inner'"),
        ("python:user_backend:NOT_CALLABLE", "user_backend:NOT_CALLABLE is an int, not a"),
        (
            "python:user_backend:not_storage:x",
            "user_backend:not_storage('x') returned a dict, not a Storage",
        ),
        ("python:user_backend:broken:x", "user_backend:broken('x') raised ValueError: no bucket x"),
        (
            "python:user_backend:JsonDocStorage",
            "cannot call user_backend:JsonDocStorage(): missing a required argument: 'path'",
        ),
        ("python:user_backend", "expected python:MODULE:FACTORY[:ARGUMENT], where MODULE"),
        ("python://host/x", "expected python:MODULE:FACTORY[:ARGUMENT], where MODULE"),
        ("C:\\stores\\x.db", "store 'C:\\\\stores\\\\x.db': expected memory, file:PATH"),
        ("https://host/x", "no installed package declares the scheme 'https'"),
    ],
)
def test_a_store_of_ones_own_that_cannot_be_built_is_bad_input(
    user_backend: Path,
    counter_file: Path,
    capsys: pytest.CaptureFixture[str],
    store: str,
    message: str,
) -> None:
    assert main(["run", str(counter_file), "--store", store]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cosmoflow: error: store {store!r}")
    assert message in err
    assert err.count("\n") == 1


def test_a_factory_that_takes_no_codec_is_refused_with_codec(
    user_backend: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = "python:user_backend:not_storage:x"
    assert main(["run", str(counter_file), "--store", store, "--codec", "json"]) == 2
    err = capsys.readouterr().err
    assert "cannot call user_backend:not_storage('x', codec='json'): got an unexpected" in err


def test_a_scheme_several_packages_declare_or_whose_factory_is_missing_is_bad_input(
    user_backend: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    declare_schemes(user_backend, "first", {"twice": "user_backend:JsonDocStorage"})
    declare_schemes(user_backend, "second", {"twice": "user_backend:per_run"})
    declare_schemes(user_backend, "third", {"gone": "user_backend:absent"})
    assert main(["run", str(counter_file), "--store", "twice:x"]) == 2
    err = capsys.readouterr().err
    assert "the scheme 'twice' is declared by several packages: first, second" in err
    assert main(["inspect", "gone:x"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "cosmoflow: error: store 'gone:x' (scheme 'gone' of third):"
        " module 'user_backend' has no attribute 'absent'\n"
    )


def test_a_worker_needs_a_factory_that_takes_the_run_id(
    user_backend: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["worker", str(counter_file), "--queue", "redis://127.0.0.1:1/q", "--store"]
    assert main([*command, f"python:user_backend:JsonDocStorage:{user_backend}"]) == 2
    err = capsys.readouterr().err
    assert "cannot call user_backend:JsonDocStorage('" in err
    assert "got an unexpected keyword argument 'run_id'" in err


def test_a_worker_gives_each_run_the_store_its_factory_makes(
    redis_server: RedisServer, user_backend: Path, counter_file: Path
) -> None:
    """Run R's store is FACTORY(ARGUMENT, run_id=R); a factory that raises fails that
    run alone, and the worker goes on."""
    queue = f"{redis_server.url}/{unique_namespace()}"
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", str(counter_file)]
    command += ["--queue", queue, "--store", f"python:user_backend:per_run:{user_backend}"]
    paths = [str(user_backend), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    with subprocess.Popen(
        [*command, "--name", "w1"], stdout=subprocess.PIPE, text=True, env=env
    ) as worker:
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().startswith("worker w1 serving ")
            trio.run(partial(cf.submit, queue, "counter", run_id="forbidden-1"))
            with pytest.raises(cf.CosmoFlowError, match="PermissionError: run forbidden-1 may"):
                trio.run(result_within, queue, "forbidden-1", 30)
            trio.run(partial(cf.submit, queue, "counter", run_id="r2"))
            done = trio.run(result_within, queue, "r2", 30)
        finally:
            worker.terminate()
    assert (done.result, done.worker) == (1, "w1")
    assert json.loads((user_backend / "r2.json").read_text())["data"]["count"] == 1
