"""The cosmoflow command: running a flow file, and one-line errors for people."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cosmoflow_actors.cli import main

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
