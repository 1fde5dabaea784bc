"""The benchmark suite runs end to end at smoke sizes. Timings are never asserted."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import Case
from benchmarks.report import CaseResult, Row, render, scaled
from benchmarks.runner import best, error_line, parse, selection
from benchmarks.suite import BENCHMARKS, PATTERNS, SCALING_BASE, TIMES, Benchmark, Bound, Target
from benchmarks.sweep import bound

ROOT = Path(__file__).resolve().parent.parent


def benchmark(name: str) -> Benchmark:
    return next(bench for bench in BENCHMARKS if bench.name == name)


def run_smoke_suite(json_path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--json", str(json_path)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
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
    base = report["benchmarks"]["fanout"]["cases"][0]
    assert (base["size"], base["target"]) == (SCALING_BASE[True], None)
    for case in report["benchmarks"]["fanout"]["cases"][1:]:
        assert set(case["target"]["impls"]) == set(PATTERNS)


def assert_complete(case: dict[str, Any], implementations: set[str]) -> None:
    assert {row["impl"] for row in case["results"]} == implementations
    for row in case["results"]:
        assert row["error"] is None, row
        assert row["seconds"] > 0, row
        assert row["value"] > 0, row
        assert row["vs_trio"] > 0, row
        assert row["vs_pocketflow"] > 0, row
    assert case["target"] is None or isinstance(case["target"]["passed"], bool)


def test_only_accepts_known_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse(["--only", "chain,cpu"]).only == "chain,cpu"
    with pytest.raises(SystemExit):
        parse(["--only", "chain,nope"])
    assert "unknown benchmark(s): nope" in capsys.readouterr().err


def test_rounds_keep_each_implementations_best_measurement(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse([]).rounds == 1
    assert parse(["--rounds", "3"]).rounds == 3
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parse(["--rounds", bad])
        assert f"expected an integer >= 1, got {bad!r}" in capsys.readouterr().err
    failed = Row("x", "x", None, None, "crashed")
    rows = [failed, Row("x", "x", 1.0, 5.0), Row("x", "x", 1.0, 7.0)]
    assert best(rows, higher_is_better=True).value == 7.0
    assert best(rows, higher_is_better=False).value == 5.0
    assert best([failed, Row("x", "x", None, None, "later")], higher_is_better=True) is failed


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


def test_a_target_about_both_patterns_shows_on_both_rows() -> None:
    rows = (
        Row(PATTERNS[0], "cosmoflow, nursery", 1.0, 900.0),
        Row(PATTERNS[1], "cosmoflow, start_run", 1.0, 400.0),
        Row("trio", "bare trio", 1.0, 1000.0),
        Row("pocketflow", "pocketflow", 1.0, 800.0),
    )
    result = CaseResult(Case(10, "checkpoint"), rows, Target((Bound(0.6, True, "trio"),), PATTERNS))
    lines = render(benchmark("fanout"), [result]).splitlines()
    nursery = next(line for line in lines if line.startswith("cosmoflow, nursery"))
    assert nursery.replace(TIMES, "x").endswith("≥ 0.6x trio (0.90x): PASS")
    start_run = next(line for line in lines if line.startswith("cosmoflow, start_run"))
    assert start_run.replace(TIMES, "x").endswith("≥ 0.6x trio (0.40x): MISS")
    bare_line = next(line for line in lines if line.startswith("bare trio"))
    assert "MISS" not in bare_line and "PASS" not in bare_line
    target = result.to_json("runs/s")["target"]
    assert target["passed"] is False
    assert target["impls"][PATTERNS[0]]["passed"] is True
    assert target["impls"][PATTERNS[1]]["passed"] is False


def test_scaling_divides_each_rate_by_its_rate_at_the_base_size() -> None:
    base = SCALING_BASE[False]
    small = CaseResult(
        Case(base, "checkpoint"),
        (Row(PATTERNS[0], "n", 0.1, 10_000.0), Row("trio", "t", 0.1, 50_000.0)),
        None,
    )
    large = CaseResult(
        Case(100_000, "checkpoint"),
        (Row(PATTERNS[0], "n", 12.5, 8_000.0), Row("trio", "t", None, None, "boom")),
        None,
    )
    other_variant = CaseResult(Case(base, "1ms"), small.rows, None)
    target = Target((Bound(0.8, True),), (PATTERNS[0],))
    result = scaled(Case(100_000, "checkpoint"), [other_variant, small, large], False, target)
    assert result.values == {PATTERNS[0]: pytest.approx(0.8)}
    assert result.rows[0].extra == {"value": 8_000.0, "base_value": 10_000.0}
    assert result.rows[1].error == "boom"
    assert result.verdict("ratio", PATTERNS[0])[1] is True


def test_selecting_scaling_measures_fanout_first() -> None:
    names = [bench.name for bench in selection(["memory", "scaling"])]
    assert names == ["fanout", "scaling", "memory"]


def test_a_failed_measurement_shows_as_an_error_and_misses_its_target() -> None:
    rows = (
        Row("cosmoflow", "cosmoflow", None, None, "RuntimeError: boom"),
        Row("trio", "bare trio", 1.0, 3.0),
        Row("pocketflow", "pocketflow", 1.0, 4.0),
    )
    result = CaseResult(Case(100), rows, Target((Bound(15.0, False),)))
    assert result.verdict("µs/step", "cosmoflow") == ("≤ 15 µs/step (n/a)", False)
    table = render(benchmark("chain"), [result])
    assert "ERROR" in table and "RuntimeError: boom" in table
    assert result.to_json("µs/step")["results"][0]["vs_trio"] is None


def test_a_crash_is_reported_by_its_last_meaningful_line() -> None:
    stderr = "  + Exception Group Traceback\n    | TypeError: bad store\n    +-----------\n"
    assert error_line(stderr, 1) == "TypeError: bad store"
    assert error_line("", 3) == "exit status 3"


def test_the_max_runs_sweep_measures_each_bound() -> None:
    command = [sys.executable, "-m", "benchmarks.sweep", "--max-runs", "2,none", "--sizes", "20"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["2", "none"]
    assert all(float(row[1].replace(",", "")) > 0 for row in rows), rows


def test_the_sweep_takes_positive_counts_or_none() -> None:
    assert bound("512") == 512
    assert bound("none") is None
    with pytest.raises(argparse.ArgumentTypeError, match="'0'"):
        bound("0")
    with pytest.raises(argparse.ArgumentTypeError, match="'lots'"):
        bound("lots")


needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def printed_at_smoke_size(module: str) -> str:
    """What ``python -m MODULE --smoke`` printed on stdout (it must exit 0)."""
    command = [sys.executable, "-m", module, "--smoke"]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, check=True).stdout


@needs_redis_server
def test_the_workers_benchmark_measures_each_worker_count_and_the_takeover() -> None:
    printed = printed_at_smoke_size("benchmarks.workers")
    rows = [line.split() for line in printed.splitlines() if line[:1] == " "]
    assert [row[0] for row in rows[:3]] == ["1", "2", "3"]
    assert all(float(row[1].replace(",", "")) > 0 for row in rows[:3])
    assert "takeover: " in printed and "s from the kill" in printed


@needs_redis_server
def test_the_contention_benchmark_measures_each_kind_of_write_for_each_writer_count() -> None:
    printed = printed_at_smoke_size("benchmarks.contention")
    rows = [line.split("  ") for line in printed.splitlines() if line[:1] == " "]
    cells = [[cell.strip() for cell in row if cell.strip()] for row in rows]
    assert [(row[0], row[1]) for row in cells] == [
        (writers, kind)
        for writers in ("2", "8")
        for kind in ("step", "update", "shared update", "hset")
    ]
    assert all(float(row[2].replace(",", "")) > 0 for row in cells)
    assert [row[4] for row in cells] == ["0"] * len(cells)
