"""What the cosmoflow command prints (cli/output.py): strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.cli import main
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
