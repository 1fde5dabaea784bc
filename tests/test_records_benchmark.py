"""benchmarks/records.py runs end to end at smoke size. Timings are never asserted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
METRICS = {"list", "run", "forget"}


def smoke(output: Path, env: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """Run the smoke benchmark; its printed tables and its JSON report."""
    command = [sys.executable, "-m", "benchmarks.records", "--smoke", "--json", str(output)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(output.read_text(encoding="utf-8"))


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_smoke_run_measures_every_metric_of_every_backend_at_both_sizes(
    tmp_path: Path,
) -> None:
    printed, report = smoke(tmp_path / "records.json")

    assert (report["smoke"], report["sizes"], report["skipped"]) == (True, [50, 200], [])
    measured = {(row["backend"], row["runs"]) for row in report["results"]}
    assert measured == {(b, n) for b in ("file", "sqlite", "redis") for n in (50, 200)}
    for row in report["results"]:
        assert set(row["seconds"]) == set(row["median"]) == METRICS
        assert len(row["seconds"]["forget"]) == report["repeats"]["forget"]
        assert all(value > 0 for value in row["median"].values())
    assert set(report["ratios"]) == {"file", "sqlite", "redis"}
    assert all(set(ratio) == METRICS for ratio in report["ratios"].values())
    for title in ("list_runs, per record", "new run (5 nodes)", "forget_run"):
        assert title in printed


def test_without_redis_server_the_redis_backend_is_skipped_with_a_note(tmp_path: Path) -> None:
    """A PATH without redis-server: the file and SQLite backends are still measured."""
    env = {**os.environ, "PATH": str(tmp_path)}

    printed, report = smoke(tmp_path / "records.json", env)

    assert report["skipped"] == ["redis: skipped, redis-server is not on PATH"]
    assert {row["backend"] for row in report["results"]} == {"file", "sqlite"}
    assert set(report["ratios"]) == {"file", "sqlite"}
    assert "redis: skipped" in printed
