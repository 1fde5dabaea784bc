"""The cosmoflow command's entry point (cli/app.py): exit statuses, one-line errors,
``--version``, arguments after ``--``, ``python -m``, Ctrl-C and a closed stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.cli import main
from tests.cli_support import EXAMPLES

pytestmark = pytest.mark.usefixtures("plain_output")


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


def test_for_a_command_that_loads_no_file_double_dash_ends_the_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "file:x.json", "--", "extra"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: extra" in capsys.readouterr().err


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


def test_runs_must_be_positive(counter_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(counter_file), "--runs", "0"])
    assert exit_info.value.code == 2
    assert "expected an integer >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "submit"])
@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (["--runs", "2", "--params-file", "runs.jsonl"], "--params-file: not allowed with"),
        (["--params-file", "runs.jsonl", "--runs", "2"], "--runs: not allowed with"),
    ],
)
def test_runs_and_params_file_do_not_go_together(
    counter_file: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    batch: list[str],
    message: str,
) -> None:
    queue = ["--queue", "redis://127.0.0.1:1/q"] if command == "submit" else []
    with pytest.raises(SystemExit) as exit_info:
        main([command, str(counter_file), *queue, *batch])
    assert exit_info.value.code == 2
    other = batch[0]
    assert f"argument {message} argument {other}\n" in capsys.readouterr().err


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
