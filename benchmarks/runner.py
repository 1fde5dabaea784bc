"""Run the suite: one fresh process per measurement, then tables and a JSON report."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import Case
from benchmarks.report import CaseResult, Row, render, scaled
from benchmarks.suite import BENCHMARKS, Benchmark
from cosmoflow_actors.validation import positive_int

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = PACKAGE_DIR / "results" / "latest.json"
TIMEOUT = {True: 30.0, False: 3600.0}
"""Seconds one measurement may take, by ``smoke``."""


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [bench.name for bench in BENCHMARKS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="cosmoflow_actors vs bare trio vs PocketFlow, side by side.",
    )
    parser.add_argument(
        "--only", default=",".join(names), help=f"comma-separated subset of {','.join(names)}"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, done in seconds")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="measure each implementation this many times, in turn; keep the best",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(names)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return args


def child_env() -> dict[str, str]:
    """The environment of a measurement: ``benchmarks`` importable from any directory."""
    env = dict(os.environ)
    paths = [p for p in (env.get("PYTHONPATH"), str(PACKAGE_DIR.parent)) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def measure(bench: Benchmark, case: Case, impl: str, smoke: bool) -> dict[str, Any]:
    """Run ``python -m benchmarks.measure`` for one implementation; its JSON, or an error."""
    command = [sys.executable, "-m", "benchmarks.measure", bench.name, "--impl", impl]
    command += ["--size", str(case.size), "--variant", case.variant, "--work", str(case.work)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=child_env(), timeout=TIMEOUT[smoke]
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT[smoke]:g} s"}
    if done.returncode != 0:
        return {"error": error_line(done.stderr, done.returncode)}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def error_line(stderr: str, returncode: int) -> str:
    """The last meaningful line of a traceback, exception groups' "| ..." lines included."""
    for line in reversed(stderr.splitlines()):
        text = line.strip().lstrip("|").strip()
        if set(text) - set("+-"):
            return text
    return f"exit status {returncode}"


def run_case(bench: Benchmark, case: Case, smoke: bool, rounds: int = 1) -> CaseResult:
    """Measure every implementation ``rounds`` times, taking turns (so a slow minute of
    the machine hits them all alike); each keeps its best measurement."""
    measured: dict[str, list[Row]] = {impl: [] for impl in bench.implementations}
    for _ in range(rounds):
        for impl, label in bench.implementations.items():
            result = measure(bench, case, impl, smoke)
            seconds, value, error = result.get("seconds"), result.get("value"), result.get("error")
            row = Row(impl, label, seconds, value, error, result.get("extra", {}))
            measured[impl].append(row)
            print(
                f"  {bench.name} {case.variant} {case.size:,} {label}: {row.summary(bench.unit)}",
                file=sys.stderr,
                flush=True,
            )
    rows = tuple(best(found, bench.higher_is_better) for found in measured.values())
    return CaseResult(case, rows, bench.target(case))


def best(rows: Sequence[Row], higher_is_better: bool) -> Row:
    """The best of one implementation's measurements; its first error if none worked."""
    worked = [row for row in rows if row.value is not None]
    if not worked:
        return rows[0]
    if higher_is_better:
        return max(worked, key=lambda row: row.value or 0.0)
    return min(worked, key=lambda row: row.value or 0.0)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("cosmoflow-actors", "trio", "pocketflow", "trio-parallel"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "versions": versions(),
    }


def run_benchmark(
    bench: Benchmark, smoke: bool, done: dict[str, list[CaseResult]], rounds: int = 1
) -> dict[str, Any]:
    """Run every case of ``bench`` (or scale the results in ``done`` it is computed from),
    print its table, keep its results in ``done`` and return its JSON section."""
    cases = bench.cases(smoke)
    if bench.scaling_of is None:
        results = [run_case(bench, case, smoke, rounds) for case in cases]
    else:
        source = done[bench.scaling_of]
        results = [scaled(case, source, smoke, bench.target(case)) for case in cases]
    done[bench.name] = results
    print(render(bench, results), flush=True)
    return {
        "title": bench.title,
        "unit": bench.unit,
        "higher_is_better": bench.higher_is_better,
        "cases": [result.to_json(bench.unit) for result in results],
    }


def selection(names: Sequence[str]) -> list[Benchmark]:
    """The benchmarks named, with those they are computed from, in the suite's order."""
    wanted = set(names)
    wanted |= {
        bench.scaling_of for bench in BENCHMARKS if bench.name in wanted and bench.scaling_of
    }
    return [bench for bench in BENCHMARKS if bench.name in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; 1 if any measurement failed (a missed target is not)."""
    args = parse(argv)
    selected = selection(args.only.split(","))
    info = machine()
    print(
        f"Python {info['python']}, {info['cpus']} CPUs, load average"
        f" {info['load_average_at_start']:.2f} at start (other work skews the numbers),"
        f" best of {args.rounds} round(s)\n"
    )
    done: dict[str, list[CaseResult]] = {}
    report = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "rounds": args.rounds,
        "machine": info,
        "benchmarks": {
            bench.name: run_benchmark(bench, args.smoke, done, args.rounds) for bench in selected
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {args.json}")
    failed = [
        row
        for section in report["benchmarks"].values()
        for case in section["cases"]
        for row in case["results"]
        if row["error"]
    ]
    return 1 if failed else 0
