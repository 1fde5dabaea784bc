"""``cosmoflow run`` (cli/run.py): the outcome of one run, for people and as JSON, its
options, ``--param``, and durable runs named by ``--run-id``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cosmoflow_actors.cli import main
from tests.cli_support import EXAMPLES

pytestmark = pytest.mark.usefixtures("plain_output")


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


def test_a_malformed_param_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(EXAMPLES / "hello_world.py"), "--param", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


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
