"""fanout's runs/s against the engine's ``max_runs``: which bound serves fanout best.

    python -m benchmarks.sweep --max-runs 256,512,1000,2000,5000,none --sizes 10000,100000

Each measurement (the checkpoint variant unless ``--variant 1ms``, the nursery pattern
unless ``--pattern start_run``) runs in a fresh process, one at a time, like the suite's.
``none`` opens the engine with no bound. Prints one row per ``max_runs`` and one column
per size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence

import trio

from benchmarks.common import Case
from benchmarks.fanout import DELAYS, cosmoflow_nursery, cosmoflow_start_run
from benchmarks.runner import child_env, error_line

PATTERNS = {"nursery": cosmoflow_nursery, "start_run": cosmoflow_start_run}


def bound(text: str) -> int | None:
    """A ``--max-runs`` item: a positive count, or ``none`` for no bound."""
    if text == "none":
        return None
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a count or none: {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"max_runs must be positive or none, not {text!r}")
    return value


def bounds(text: str) -> list[str]:
    """``--max-runs``: comma-separated items, each checked by :func:`bound`."""
    items = text.split(",")
    for item in items:
        bound(item)
    return items


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__)
    parser.add_argument("--max-runs", type=bounds, default="256,512,1000,2000,5000,none")
    parser.add_argument("--sizes", default="10000,100000", help="runs per measurement")
    parser.add_argument("--pattern", choices=sorted(PATTERNS), default="nursery")
    parser.add_argument("--variant", choices=sorted(DELAYS), default="checkpoint")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "MAX_RUNS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure_here(args: argparse.Namespace, size: int, max_runs: int | None) -> float:
    """runs/s of one fanout measurement in this process."""
    case = Case(size, args.variant)
    seconds = trio.run(lambda: PATTERNS[args.pattern](case, max_runs=max_runs))
    return size / seconds


def measure(args: argparse.Namespace, size: int, max_runs: str) -> str:
    """One measurement in a fresh process: its runs/s, or the error it ended with."""
    command = [sys.executable, "-m", "benchmarks.sweep", "--pattern", args.pattern]
    command += ["--variant", args.variant, "--one", str(size), max_runs]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env())
    if done.returncode != 0:
        return f"ERROR {error_line(done.stderr, done.returncode)}"
    runs_per_s: float = json.loads(done.stdout)
    return f"{runs_per_s:,.0f}"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.one:
        size, max_runs = args.one
        print(json.dumps(measure_here(args, int(size), bound(max_runs))))
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"fanout, {args.variant}, {args.pattern} pattern: runs/s by max_runs")
    print("max_runs  " + "  ".join(f"{size:>12,}" for size in sizes), flush=True)
    for item in args.max_runs:
        cells = [measure(args, size, item) for size in sizes]
        print(f"{item:>8}  " + "  ".join(f"{cell:>12}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
