"""Loading flows from files (cli/loading.py): which flow a FILE.py[:NAME] names, and a
file that cannot be loaded as one line naming where."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cosmoflow_actors.cli import loading, main
from cosmoflow_actors.cli.loading import load_flow, nested_flows
from cosmoflow_actors.flow import Flow

pytestmark = pytest.mark.usefixtures("plain_output")


@pytest.mark.parametrize(
    ("content", "target_suffix", "message"),
    [
        (None, "", "no such file"),
        ("FOLDER", "", "a folder, not a Python file"),
        ("FIFO", "", "not a regular file (a device, a pipe or a socket)"),
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
        ("x = 1\n", ":x", "'x' is an int, not a Flow (found: none)"),
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
    if content == "FOLDER":
        flow_file.mkdir()
    elif content == "FIFO":
        os.mkfifo(flow_file)
    elif content is not None:
        flow_file.write_text(content)
    assert main(["run", f"{flow_file}{target_suffix}", "--param", "a=1"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


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


def test_a_flow_reused_at_every_level_of_a_deep_nesting_is_walked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Picking the outer flow walks each nested flow once, by identity: 30 levels, each
    using the level below twice, are 31 flows, not 2**30 paths to walk."""
    flow_file = tmp_path / "deep.py"
    flow_file.write_text(
        "import cosmoflow_actors as cf\n"
        "leaf = cf.Flow.builder('level0').add_node('n', cf.Node()).build()\n"
        "inner = leaf\n"
        "for level in range(1, 31):\n"
        "    inner = (\n"
        "        cf.Flow.builder(f'level{level}')\n"
        "        .add_node('a', inner).add_node('b', inner).add_route('a', 'b').build()\n"
        "    )\n"
        "outer = inner\n"
        "del inner\n"
    )
    walked: list[str] = []

    def counting_nested_flows(flow: Flow) -> list[Flow]:
        walked.append(flow.name)
        # Fail, rather than hang, when the walk follows paths instead of flows.
        assert len(walked) <= 1000, "nested flows walked once per path"
        return nested_flows(flow)

    monkeypatch.setattr(loading, "nested_flows", counting_nested_flows)
    picked = load_flow(str(flow_file))
    assert picked.name == "level30"
    # Each of the two top-level flows is walked once, each flow below it once per walk.
    assert sorted(walked) == sorted([f"level{n}" for n in range(31)] + ["level0"])
