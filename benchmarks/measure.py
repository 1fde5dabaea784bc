"""Measure one implementation on one case in this process; print one JSON line.

    python -m benchmarks.measure fanout --impl cosmoflow --size 10000 --variant checkpoint

The runner (``python -m benchmarks``) starts one such process per measurement, so memory
and garbage-collector state never leak from one implementation into the next.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from collections.abc import Mapping, Sequence

from benchmarks.common import Case, Implementation
from benchmarks.suite import BENCHMARKS


def implementations(benchmark: str) -> Mapping[str, Implementation]:
    """The benchmark's module is imported only here: process workers that re-import this
    module (multiprocessing's spawn) stay light."""
    module = importlib.import_module(f"benchmarks.{benchmark}")
    found: Mapping[str, Implementation] = module.IMPLEMENTATIONS
    return found


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.measure", description=__doc__)
    parser.add_argument("benchmark", choices=[bench.name for bench in BENCHMARKS])
    parser.add_argument("--impl", required=True, help="implementation, e.g. cosmoflow")
    parser.add_argument("--size", type=int, required=True, help="runs, steps or items")
    parser.add_argument("--variant", default="", help="fanout: checkpoint or 1ms")
    parser.add_argument("--work", type=int, default=0, help="cpu: spin iterations per item")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    found = implementations(args.benchmark)
    if args.impl not in found:
        raise SystemExit(f"{args.benchmark} has no implementation {args.impl!r}")
    measurement = found[args.impl](Case(args.size, args.variant, args.work))
    print(json.dumps(dataclasses.asdict(measurement)))


if __name__ == "__main__":
    main()
