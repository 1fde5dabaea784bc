"""The suite: which benchmarks exist, their sizes, implementations and targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from benchmarks.common import Case
from benchmarks.work import calibrate

TRIO = "trio"
POCKETFLOW = "pocketflow"
ENGINE = "cosmoflow"
FLOOR = "floor"

TIMES = "\N{MULTIPLICATION SIGN}"

WITH_FLOOR = {
    ENGINE: "cosmoflow",
    FLOOR: "actor floor",
    TRIO: "bare trio",
    POCKETFLOW: "pocketflow",
}
"""The engine, its baselines and the actor floor (``benchmarks/skeleton.py``): what any
engine that keeps DESIGN.md's actors pays at least."""


@dataclasses.dataclass(frozen=True)
class Bound:
    """``metric >= limit`` (or ``<=``), either absolute or as a ratio to ``baseline``."""

    limit: float
    at_least: bool
    baseline: str | None = None

    def describe(self, unit: str) -> str:
        sign = "≥" if self.at_least else "≤"
        if self.baseline is None:
            return f"{sign} {self.limit:g} {unit}"
        return f"{sign} {self.limit:g}{TIMES} {self.baseline}"

    def measure(self, values: Mapping[str, float], impl: str) -> float | None:
        """The quantity bounded: the metric itself, or its ratio to the baseline's."""
        if impl not in values:
            return None
        if self.baseline is None:
            return values[impl]
        base = values.get(self.baseline)
        return values[impl] / base if base else None

    def holds(self, measured: float) -> bool:
        return measured >= self.limit if self.at_least else measured <= self.limit


@dataclasses.dataclass(frozen=True)
class Target:
    """What ``impl`` must reach in a case: every bound must hold."""

    bounds: tuple[Bound, ...]
    impl: str = ENGINE


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    unit: str
    higher_is_better: bool
    implementations: Mapping[str, str]
    """Implementation name (``measure --impl``) → label in the table."""
    cases: Callable[[bool], list[Case]]
    """The cases to run, given ``smoke``."""
    target: Callable[[Case], Target | None]


def fanout_cases(smoke: bool) -> list[Case]:
    sizes = [300] if smoke else [10_000, 100_000]
    return [Case(size, variant) for variant in ("checkpoint", "1ms") for size in sizes]


def fanout_target(case: Case) -> Target:
    if case.variant == "1ms":
        return Target((Bound(0.7, True, TRIO),))
    return Target((Bound(1.0, True, POCKETFLOW), Bound(0.5, True, TRIO)))


def cpu_cases(smoke: bool) -> list[Case]:
    if smoke:
        return [Case(6, work=calibrate(milliseconds=2))]
    return [Case(200, work=calibrate(milliseconds=20))]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "fanout",
        "N concurrent runs of a 5-node chain, each with its own dict store",
        "runs/s",
        True,
        WITH_FLOOR,
        fanout_cases,
        fanout_target,
    ),
    Benchmark(
        "chain",
        "one run looping one node",
        "µs/step",
        False,
        WITH_FLOOR,
        lambda smoke: [Case(2_000 if smoke else 100_000)],
        lambda case: Target((Bound(15.0, False),)),
    ),
    Benchmark(
        "memory",
        "RSS per run suspended in exec",
        "KiB/run",
        False,
        WITH_FLOOR,
        lambda smoke: [Case(2_000 if smoke else 100_000)],
        lambda case: Target((Bound(1.5, False, TRIO),)),
    ),
    Benchmark(
        "cpu",
        "3-stage pipeline, pure-Python CPU work in the middle stage (~20 ms per item)",
        "items/s",
        True,
        {
            ENGINE: "cosmoflow, process",
            "cosmoflow-inline": "cosmoflow, inline",
            TRIO: "bare trio + trio-parallel",
            POCKETFLOW: "pocketflow (inline)",
        },
        cpu_cases,
        lambda case: Target((Bound(1.7, True, "cosmoflow-inline"),)),
    ),
)
