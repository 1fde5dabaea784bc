"""``cosmoflow run`` (cli/run.py): the outcome of one run, for people and as JSON, its
options, ``--param`` and ``--params-file``, durable runs named by ``--run-id``, and
what a batch of runs that Ctrl-C stopped tells."""

from __future__ import annotations

import codecs
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cosmoflow_actors.cli import main
from tests.cli_support import EXAMPLES, table_row

pytestmark = pytest.mark.usefixtures("plain_output")


def test_run_prints_the_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXAMPLES / "hello_world.py")]) == 0
    out = capsys.readouterr().out
    assert "path:         greet -> shout" in out
    assert "result:       'HELLO, WORLD!'" in out


REPORT = """
import cosmoflow_actors as cf


@cf.node
def report(ctx):
    return cf.Action.complete("\\nTotal\\n  3 items\\x1b[31m\\n")


flow = cf.Flow.builder("report").add_node("report", report).build()
"""


def test_a_result_of_several_lines_is_shown_as_its_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "report.py"
    path.write_text(REPORT)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\nresult:\n  Total\n    3 items\\x1b[31m\n")


@pytest.mark.parametrize("command", [["run"], ["submit", "--queue", "redis://127.0.0.1:1/q"]])
def test_bad_params_are_refused_before_the_flow_file_is_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    imported = tmp_path / "imported"
    path = tmp_path / "marks.py"
    path.write_text(f"import pathlib\npathlib.Path({str(imported)!r}).touch()\n")
    deep = "[" * 5000 + "]" * 5000
    assert main([command[0], str(path), *command[1:], "--param", f"n={deep}"]) == 2
    assert "--param 'n': its JSON is nested too deep" in capsys.readouterr().err
    assert not imported.exists()


ESCAPES = """
import cosmoflow_actors as cf


@cf.node
def step(ctx):
    return cf.Action.complete("done")


flow = cf.Flow.builder("esc").add_node("red\\x1b[31m\\nnode", step).build()
"""


def test_the_outcome_escapes_control_characters_in_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node id with a newline and a terminal's escape breaks no line of the outcome and
    drives no terminal: both are shown as Python escapes."""
    path = tmp_path / "esc.py"
    path.write_text(ESCAPES)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "path:         red\\x1b[31m\\nnode\n" in out


def test_the_summary_of_runs_escapes_control_characters_in_the_flow_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "esc.py"
    path.write_text(ESCAPES.replace('builder("esc")', 'builder("bad\\nname")'))
    assert main(["run", str(path), "--runs", "2"]) == 0
    assert "flow:         bad\\nname\n" in capsys.readouterr().out


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


BIG_WRITE = """
import cosmoflow_actors as cf


@cf.node
async def write(ctx):
    await ctx.store.set("big", "x" * 10_000)


flow = cf.Flow.builder("big").add_node("write", write).build()
"""


def _small_files() -> None:
    """In the child: files may not grow past 4 KiB, and writing past fails (EFBIG: the
    child's Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))


def test_a_failed_commit_is_told_once_not_again_as_its_causes(tmp_path: Path) -> None:
    """The commit's error quotes why the journal append and the compaction failed; the
    error line and the JSON do not add those errors again as its causes."""
    flow_file = tmp_path / "big.py"
    flow_file.write_text(BIG_WRITE)
    store = tmp_path / "store.json"
    argv = ["run", str(flow_file), "--store", f"file:{store}", "--run-id", "r1", "--json"]

    done = subprocess.run(
        [sys.executable, "-m", "cosmoflow_actors", *argv],
        capture_output=True,
        text=True,
        preexec_fn=_small_files,
        check=False,
    )

    too_large = "[Errno 27] File too large"
    message = (
        f"store:FileStorage('{store}'): commit failed: cannot append to {store}.journal: "
        f"{too_large}; nor compact instead: cannot write {store}: {too_large}"
    )
    assert done.returncode == 1
    assert done.stderr == f"cosmoflow: error: {message}\n"
    assert json.loads(done.stdout)["error"] == f"StorageError: {message}"


def test_json_of_a_run_that_succeeded_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXAMPLES / "hello_world.py"), "--json"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert (outcome["success"], outcome["error"]) == (True, None)


def test_a_malformed_param_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXAMPLES / "hello_world.py"), "--param", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    deep = "[" * 5000 + "]" * 5000
    assert main(["run", str(EXAMPLES / "hello_world.py"), "--param", f"n={deep}"]) == 2
    assert capsys.readouterr().err == (
        "cosmoflow: error: --param 'n': its JSON is nested too deep to read\n"
    )
    digits = "9" * 5000
    assert main(["run", str(EXAMPLES / "hello_world.py"), "--param", f"n={digits}"]) == 2
    assert capsys.readouterr().err.startswith(
        "cosmoflow: error: --param 'n': its JSON cannot be read: Exceeds the limit"
    )


UNSHOWABLE = """
import cosmoflow_actors as cf


class BadRepr:
    def __repr__(self):
        raise RuntimeError("repr boom")


@cf.node
async def keep(ctx):
    cycle = []
    cycle.append(cycle)
    await ctx.store.set("cycle", cycle)
    await ctx.store.set("digits", 10**5000)
    return cf.Action.complete(BadRepr())


flow = cf.Flow.builder("odd").add_node("keep", keep).build()
"""
"""A run that succeeds with a result whose repr raises, having stored a list that holds
itself and an int of more digits than Python converts to text."""


def test_run_json_shows_what_it_cannot_form_as_such_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "odd.py"
    path.write_text(UNSHOWABLE)
    assert main(["run", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    outcome = json.loads(captured.out)
    assert outcome["success"]
    assert outcome["result"] == "<cannot be shown: RuntimeError: repr boom>"
    assert outcome["store"]["cycle"].startswith("<cannot be shown: RecursionError")
    assert outcome["store"]["digits"].startswith("<cannot be shown: ValueError: Exceeds")
    result, store = captured.err.splitlines()
    assert result == "cosmoflow: warning: the run's result cannot be shown: RuntimeError: repr boom"
    assert store.startswith(
        "cosmoflow: warning: memory: the value of 'cycle' cannot be shown (and 1 more): "
        "RecursionError: maximum recursion depth exceeded"
    )


def test_run_shows_a_result_whose_repr_raises_as_such_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "odd.py"
    path.write_text(UNSHOWABLE)
    assert main(["run", str(path)]) == 0
    captured = capsys.readouterr()
    assert "result:       <cannot be shown: RuntimeError: repr boom>" in captured.out
    assert captured.err == (
        "cosmoflow: warning: the run's result cannot be shown: RuntimeError: repr boom\n"
    )


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "2"], "--concurrency needs --runs or --params-file"),
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
        "cosmoflow: error: run 'r1' belongs to flow 'failing', not 'other': resume it with "
        "flow 'failing' as it was when the run started (the version that recorded it); "
        "nothing ran and its record stays failed\n"
    )


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


ECHO = """
import cosmoflow_actors as cf


@cf.node
async def echo(ctx):
    if ctx.params.get("fail"):
        raise ValueError(f"asked to fail for {ctx.params['who']}")
    await ctx.store.update("seen", lambda seen: [*seen, dict(ctx.params)], default=[])


flow = cf.Flow.builder("echo").add_node("echo", echo).build()
"""
"""Each run adds its params to the list ``seen``; a run with ``fail`` fails."""


@pytest.fixture
def echo_file(tmp_path: Path) -> Path:
    """The flow file of ``ECHO``."""
    flow_file = tmp_path / "echo.py"
    flow_file.write_text(ECHO)
    return flow_file


def test_params_file_makes_one_run_per_line(
    echo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params_file = tmp_path / "runs.jsonl"
    params_file.write_text('{"n": 1}\n\n{"n": 2, "who": "ada"}\n{"n": 3, "fail": true}\n')
    store = f"sqlite:{tmp_path / 'runs.db'}"
    argv = ["run", str(echo_file), "--store", store, "--param", "who=bob"]
    assert main([*argv, "--params-file", str(params_file), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["runs"], summary["succeeded"], summary["failed"]) == (3, 2, 1)
    assert summary["first_error"].endswith("(caused by ValueError: asked to fail for bob)")
    assert main(["inspect", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"]["seen"] == [  # one at a time, in order
        {"who": "bob", "n": 1},
        {"who": "ada", "n": 2},
    ]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"n": 1}\n{"n": 2,\n', "runs.jsonl:2: not JSON: Expecting property name"),
        ('{"n": 1}\n\n[1, 2]\n', "runs.jsonl:3: expected a JSON object of params, got a list"),
        ("7\n", "runs.jsonl:1: expected a JSON object of params, got an int"),
        ('{"n": ' + "[" * 5000 + "]" * 5000 + "}\n", "runs.jsonl:1: its JSON is nested too deep"),
        ("\n\n", "--params-file {path}: no runs (expected a JSON object of params a line)"),
    ],
)
def test_a_bad_params_file_is_refused_naming_the_line(
    echo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: str, message: str
) -> None:
    params_file = tmp_path / "runs.jsonl"
    params_file.write_text(lines)
    assert main(["run", str(echo_file), "--params-file", str(params_file)]) == 2
    err = capsys.readouterr().err
    assert message.format(path=params_file) in err
    assert err.count("\n") == 1


def test_params_file_refuses_run_id(
    counter_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params_file = tmp_path / "runs.jsonl"
    params_file.write_text('{"n": 1}\n')
    argv = ["run", str(counter_file), "--params-file", str(params_file), "--run-id", "r1"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "cosmoflow: error: --run-id names one run; it does not go with --params-file\n"
    )


def test_a_params_file_may_start_with_a_bom(
    echo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params_file = tmp_path / "runs.jsonl"
    params_file.write_bytes(codecs.BOM_UTF8 + b'{"n": 1}\r\n{"n": 2}\r\n')
    store = f"sqlite:{tmp_path / 'runs.db'}"
    assert main(["run", str(echo_file), "--store", store, "--params-file", str(params_file)]) == 0
    capsys.readouterr()
    assert main(["inspect", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"]["seen"] == [{"n": 1}, {"n": 2}]


def test_params_from_stdin_may_start_with_a_bom(echo_file: Path) -> None:
    argv = ["run", str(echo_file), "--params-file", "-", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "cosmoflow_actors", *argv],
        input=codecs.BOM_UTF8 + b'{"n": 1}\n\n{"n": 2}\n',
        capture_output=True,
        check=True,
    )
    summary = json.loads(done.stdout)
    assert (summary["runs"], summary["succeeded"]) == (2, 2)


SOME_HANG = """
import itertools

import trio

import cosmoflow_actors as cf

calls = itertools.count()


@cf.node
async def quick(ctx):
    return None


@cf.node
async def wait(ctx):
    call = next(calls)
    if call == 1:
        raise ValueError("the second call fails")
    if call >= 3:
        if call == 4:
            print("waiting", flush=True)
        await trio.sleep_forever()


flow = (
    cf.Flow.builder("some_hang")
    .add_node("quick", quick)
    .add_node("wait", wait)
    .add_route("quick", "wait")
    .build()
)
"""
"""Of runs two at a time: the first two calls of ``wait`` end (one fails), the third
ends, the fourth and fifth wait forever; the fifth prints ``waiting`` on stdout."""


def _interrupted(flow_file: Path, *options: str) -> tuple[str, str, int]:
    """Run ``cosmoflow run FLOW_FILE --runs 10 --concurrency 2 OPTIONS`` in a process,
    SIGINT it once two runs wait; its stdout after ``waiting``, its stderr and status."""
    argv = ["run", str(flow_file), "--runs", "10", "--concurrency", "2", *options]
    command = [sys.executable, "-m", "cosmoflow_actors", *argv]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "waiting\n"  # runs 4 and 5 wait, 6 waits to start
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    return out, err, process.returncode


def test_ctrl_c_on_runs_prints_what_is_known_and_exits_130(tmp_path: Path) -> None:
    flow_file = tmp_path / "some_hang.py"
    flow_file.write_text(SOME_HANG)
    out, err, status = _interrupted(flow_file)
    assert status == 130
    assert "runs:         interrupted after 5 of 10 (2 succeeded, 1 failed, 2 cancelled)" in out
    wait = table_row(out, "wait")
    assert (wait[1], wait[5], wait[6], wait[7]) == ("5", "0", "1", "1")  # 2 steps cancelled
    first, last = err.splitlines()
    assert first.startswith("cosmoflow: error: 1 of the 5 runs started failed; first: NodeError")
    assert last == "cosmoflow: interrupted"


def test_ctrl_c_on_runs_with_json_and_trace(tmp_path: Path) -> None:
    flow_file = tmp_path / "some_hang.py"
    flow_file.write_text(SOME_HANG)
    out, err, status = _interrupted(flow_file, "--json", "--trace")
    assert status == 130
    summary = json.loads(out)
    counts = ("interrupted", "runs", "started", "succeeded", "failed", "cancelled")
    assert {key: summary[key] for key in counts} == {
        "interrupted": True,
        "runs": 10,
        "started": 5,
        "succeeded": 2,
        "failed": 1,
        "cancelled": 2,
    }
    assert len(summary["failed_runs"]) == 1
    assert (summary["nodes"]["wait"]["steps"], summary["nodes"]["wait"]["failures"]) == (5, 1)
    lines = err.splitlines()
    cancelled = {line.split()[1] for line in lines if "  run cancelled " in line}
    assert len(cancelled) == 2  # the trace goes on to the end of the runs cancelled
    for run_id in cancelled:
        assert sum(f"{run_id}  step cancelled  wait" in line for line in lines) == 1
    assert lines[-1] == "cosmoflow: interrupted"
