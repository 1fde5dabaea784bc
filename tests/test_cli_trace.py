"""``cosmoflow run --trace`` (cli/trace.py): every event on stderr, a nested node named by
its path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cosmoflow_actors.cli import main

pytestmark = pytest.mark.usefixtures("plain_output")


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
