"""benchmarks/storage.py runs end to end at smoke size. Timings are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_smoke_run_measures_every_backend_in_both_scenarios(tmp_path: Path) -> None:
    output = tmp_path / "storage.json"
    command = [sys.executable, "benchmarks/storage.py", "--smoke", "--json", str(output)]

    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(output.read_text(encoding="utf-8"))
    assert (report["smoke"], report["sets"], report["rounds"]) == (True, 200, 1)
    measured = {(row["scenario"], row["backend"]) for row in report["results"]}
    assert measured == {
        (scenario, backend)
        for scenario in ("concurrent", "sequential")
        for backend in ("rewrite", "file", "sqlite", "memory")
    }
    assert all(row["seconds"] > 0 and row["speedup"] > 0 for row in report["results"])
    assert all(row["rounds"] == [row["seconds"]] for row in report["results"])
    assert "vs rewrite" in done.stdout
    assert "fsync floor" in done.stdout
