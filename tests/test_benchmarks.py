"""The benchmark suite runs end to end at smoke sizes. Timings are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import Case
from benchmarks.report import CaseResult, Row, render
from benchmarks.runner import error_line, parse
from benchmarks.suite import BENCHMARKS, TIMES, Bound, Target

ROOT = Path(__file__).resolve().parent.parent


def run_smoke_suite(json_path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--json", str(json_path)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_smoke_suite_measures_every_implementation(tmp_path: Path) -> None:
    pytest.importorskip("pocketflow")
    json_path = tmp_path / "results" / "smoke.json"
    done = run_smoke_suite(json_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(json_path.read_text(encoding="utf-8"))
    assert report["smoke"] is True
    assert list(report["benchmarks"]) == [bench.name for bench in BENCHMARKS]
    for bench in BENCHMARKS:
        assert f"== {bench.name}:" in done.stdout
        cases = report["benchmarks"][bench.name]["cases"]
        assert cases
        for case in cases:
            assert_complete(case, set(bench.implementations))


def assert_complete(case: dict[str, Any], implementations: set[str]) -> None:
    assert {row["impl"] for row in case["results"]} == implementations
    for row in case["results"]:
        assert row["error"] is None, row
        assert row["seconds"] > 0, row
        assert row["value"] > 0, row
        assert row["vs_trio"] > 0, row
        assert row["vs_pocketflow"] > 0, row
    assert isinstance(case["target"]["passed"], bool)


def test_only_accepts_known_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse(["--only", "chain,cpu"]).only == "chain,cpu"
    with pytest.raises(SystemExit):
        parse(["--only", "chain,nope"])
    assert "unknown benchmark(s): nope" in capsys.readouterr().err


def test_ratios_and_targets_are_computed_per_case() -> None:
    rows = (
        Row("cosmoflow", "cosmoflow", 2.0, 600.0),
        Row("trio", "bare trio", 1.0, 1000.0),
        Row("pocketflow", "pocketflow", 1.5, 500.0),
    )
    target = Target((Bound(1.0, True, "pocketflow"), Bound(0.5, True, "trio")))
    result = CaseResult(Case(10, "checkpoint"), rows, target)
    assert result.ratio(rows[0], "trio") == pytest.approx(0.6)
    assert result.ratio(rows[0], "pocketflow") == pytest.approx(1.2)
    text, passed = result.verdict("runs/s", "cosmoflow")
    assert text.replace(TIMES, "x") == "≥ 1x pocketflow (1.20x), ≥ 0.5x trio (0.60x)"
    assert passed is True
    strict = CaseResult(result.case, rows, Target((Bound(0.7, True, "trio"),)))
    assert strict.verdict("runs/s", "cosmoflow")[1] is False


def test_the_actor_floor_row_shows_whether_the_floor_meets_the_target() -> None:
    rows = (
        Row("cosmoflow", "cosmoflow", 4.0, 40.0),
        Row("floor", "actor floor", 2.0, 20.0),
        Row("trio", "bare trio", 1.0, 3.0),
        Row("pocketflow", "pocketflow", 1.0, 4.0),
    )
    result = CaseResult(Case(100), rows, Target((Bound(15.0, False),)))
    lines = render(BENCHMARKS[1], [result]).splitlines()
    floor_line = next(line for line in lines if line.startswith("actor floor"))
    assert floor_line.endswith("≤ 15 µs/step (20.0): MISS")
    bare_line = next(line for line in lines if line.startswith("bare trio"))
    assert "MISS" not in bare_line and "PASS" not in bare_line
    assert result.to_json("µs/step")["target"]["floor_passed"] is False


def test_a_failed_measurement_shows_as_an_error_and_misses_its_target() -> None:
    rows = (
        Row("cosmoflow", "cosmoflow", None, None, "RuntimeError: boom"),
        Row("trio", "bare trio", 1.0, 3.0),
        Row("pocketflow", "pocketflow", 1.0, 4.0),
    )
    result = CaseResult(Case(100), rows, Target((Bound(15.0, False),)))
    assert result.verdict("µs/step", "cosmoflow") == ("≤ 15 µs/step (n/a)", False)
    table = render(BENCHMARKS[1], [result])
    assert "ERROR" in table and "RuntimeError: boom" in table
    assert result.to_json("µs/step")["results"][0]["vs_trio"] is None


def test_a_crash_is_reported_by_its_last_meaningful_line() -> None:
    stderr = "  + Exception Group Traceback\n    | TypeError: bad store\n    +-----------\n"
    assert error_line(stderr, 1) == "TypeError: bad store"
    assert error_line("", 3) == "exit status 3"
