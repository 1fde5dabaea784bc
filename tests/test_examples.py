"""Every example runs as `python examples/<name>.py` and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"

EXPECTED = {
    "hello_world.py": [
        "greeting: Hello, CosmoFlow!",
        "result:   HELLO, COSMOFLOW!",
        "greet -> shout",
    ],
    "start_process.py": [
        "word counts: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]",
        "runs: 10 succeeded, 0 failed",
    ],
    "authentication.py": [
        "token=valid-token    -> check -> dashboard => dashboard",
        "token=expired-token  -> check -> login",
        "=> login page (attempt 1)",
    ],
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for line in EXPECTED[name]:
        assert line in done.stdout
