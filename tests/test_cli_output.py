"""What the cosmoflow command prints (cli/output.py): strict JSON, and a stdout that
cannot be written."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from rich.console import Console
from rich.table import Table

import cosmoflow_actors as cf
from cosmoflow_actors.cli import main
from cosmoflow_actors.cli.output import plain
from tests.cli_support import EXAMPLES

pytestmark = pytest.mark.usefixtures("plain_output")


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
    assert outcome["result"] == {"(1, 2)": "pair", "3": "three", "'nan'": "nan", "'inf'": "-inf"}
    assert main(["run", f"{EXAMPLES / 'hello_world.py'}", "--param", "k=NaN", "--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=no_constant)

    async def fill() -> None:
        storage = cf.FileStorage(tmp_path / "p.json", codec="pickle")
        await storage.set("odd", {(1, 2): float("nan"), "all": {"x": 1}})
        await storage.set("numbers", {1: "int", "1": "str", None: "none", "None": "str"})
        await storage.commit()
        await storage.aclose()

    trio.run(fill)
    assert main(["inspect", f"file:{tmp_path / 'p.json'}", "--codec", "pickle", "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=no_constant)
    assert report["keys"] == {
        "odd": {"(1, 2)": "nan", "'all'": {"x": 1}},
        "numbers": {"1": "int", "'1'": "str", "None": "none", "'None'": "str"},
    }


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("extra", [[], ["--runs", "3"]])
def test_output_to_a_full_disk_is_one_line_and_status_74(extra: list[str]) -> None:
    """Not status 1, which says a run failed: the run succeeded, its output is lost."""
    command = [sys.executable, "-m", "cosmoflow_actors", "run", str(EXAMPLES / "hello_world.py")]
    with open("/dev/full", "w") as full:
        process = subprocess.run(
            [*command, *extra], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60
        )
    assert (process.returncode, process.stderr) == (
        74,
        "cosmoflow: error: cannot write to stdout: [Errno 28] No space left on device\n",
    )


NOISY_STORE = """
import cosmoflow_actors as cf

print("making the store", flush=True)


def make():
    return cf.MemoryStorage()
"""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_store_module_writing_to_a_full_disk_is_status_74(tmp_path: Path) -> None:
    """Not status 2: the store's module is fine, stdout is not."""
    (tmp_path / "noisy_store.py").write_text(NOISY_STORE)
    command = [sys.executable, "-m", "cosmoflow_actors", "run", str(EXAMPLES / "hello_world.py")]
    command += ["--store", "python:noisy_store:make"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with open("/dev/full", "w") as full:
        process = subprocess.run(
            command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, env=env
        )
    assert (process.returncode, process.stderr) == (
        74,
        "cosmoflow: error: cannot write to stdout: [Errno 28] No space left on device\n",
    )


SHOUTS = """
import cosmoflow_actors as cf


@cf.node
def shouts(ctx):
    raise ValueError("line one\\nline two \\x1b[31mRED")


flow = cf.Flow.builder("shouts").add_node("shouts", shouts).build()
"""


@pytest.mark.parametrize("runs", [[], ["--runs", "2"]], ids=["one run", "--runs"])
def test_the_error_line_escapes_what_a_run_put_in_its_message(
    runs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A newline or a terminal's escape in an error's message cannot break the line nor
    drive the terminal."""
    path = tmp_path / "shouts.py"
    path.write_text(SHOUTS)
    assert main(["run", str(path), *runs]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("cosmoflow: error: ")
    assert "ValueError: line one\\nline two \\x1b[31mRED" in line


def test_plain_cells_show_markup_and_emoji_codes_as_they_are() -> None:
    """The tables of inspect, status and batch show a user's text (ids, keys, values,
    node names) as it is: rich's markup in it is neither applied nor an error."""
    text = "[bold]x :thumbs_up: [/]"
    table = Table()
    table.add_column("cell")
    table.add_row(*plain(text))
    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(table)
    assert text in console.export_text()


def test_plain_cells_escape_control_characters() -> None:
    """A newline or a terminal's escape in a cell (Ray colours its errors) is shown as a
    Python escape: it cannot break a row nor drive the terminal."""
    table = Table()
    table.add_column("cell")
    table.add_row(*plain("\x1b[36mray::exec()\x1b[39m\nTraceback"))
    console = Console(width=200, file=io.StringIO())
    console.print(table)
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b" not in shown
    assert "\\x1b[36mray::exec()\\x1b[39m\\nTraceback" in shown
