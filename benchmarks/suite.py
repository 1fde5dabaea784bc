"""The suite: which benchmarks exist, their sizes, implementations and targets."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping

from benchmarks.common import Case
from benchmarks.work import calibrate

TRIO = "trio"
POCKETFLOW = "pocketflow"
ENGINE = "cosmoflow"
NURSERY = "cosmoflow-nursery"
START_RUN = "cosmoflow-start_run"
PATTERNS = (NURSERY, START_RUN)
"""fanout's two ways of starting runs: a task per ``engine.run``, or ``engine.start_run``."""

TIMES = "\N{MULTIPLICATION SIGN}"

_HAS_RAY = importlib.util.find_spec("ray") is not None
"""cpu measures the ray executor too when the ray extra is installed."""

SIDE_BY_SIDE = {ENGINE: "cosmoflow", TRIO: "bare trio", POCKETFLOW: "pocketflow"}
WITH_PATTERNS = {
    NURSERY: "cosmoflow, nursery",
    START_RUN: "cosmoflow, start_run",
    TRIO: "bare trio",
    POCKETFLOW: "pocketflow",
}

FANOUT_SIZES = {True: [300], False: [10_000, 100_000]}
"""Runs of fanout's cases that have targets, by ``smoke``."""
SCALING_BASE = {True: 100, False: 1_000}
"""Runs of the extra fanout case (checkpoint) that scaling compares the largest with."""


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
    """What each of ``impls`` must reach in a case: every bound must hold."""

    bounds: tuple[Bound, ...]
    impls: tuple[str, ...] = (ENGINE,)


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
    scaling_of: str | None = None
    """Set: nothing is measured for this benchmark. Its metric is, for each of its cases,
    the named benchmark's metric at the case's size divided by its metric at
    ``SCALING_BASE`` runs, in the same variant."""


def fanout_cases(smoke: bool) -> list[Case]:
    base = Case(SCALING_BASE[smoke], "checkpoint")
    sizes = FANOUT_SIZES[smoke]
    return [base, *(Case(size, variant) for variant in ("checkpoint", "1ms") for size in sizes)]


def fanout_target(case: Case) -> Target | None:
    if case.variant == "1ms":
        return Target((Bound(1.0, True, TRIO),), PATTERNS)
    if case.size in SCALING_BASE.values():
        return None  # measured for scaling only
    return Target((Bound(1.0, True, POCKETFLOW), Bound(0.6, True, TRIO)), PATTERNS)


def scaling_cases(smoke: bool) -> list[Case]:
    return [Case(FANOUT_SIZES[smoke][-1], "checkpoint")]


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
        WITH_PATTERNS,
        fanout_cases,
        fanout_target,
    ),
    Benchmark(
        "scaling",
        "fanout's runs/s (checkpoint) at the largest size / at 1,000 runs (smoke: 100)",
        "ratio",
        True,
        WITH_PATTERNS,
        scaling_cases,
        lambda case: Target((Bound(0.8, True),), PATTERNS),
        scaling_of="fanout",
    ),
    Benchmark(
        "chain",
        "one run looping one node",
        "µs/step",
        False,
        SIDE_BY_SIDE,
        lambda smoke: [Case(2_000 if smoke else 100_000)],
        lambda case: Target((Bound(1.25, False, POCKETFLOW),)),
    ),
    Benchmark(
        "memory",
        "RSS per run suspended in exec",
        "KiB/run",
        False,
        SIDE_BY_SIDE,
        lambda smoke: [Case(2_000 if smoke else 100_000)],
        lambda case: Target((Bound(1.75, False, TRIO),)),
    ),
    Benchmark(
        "cpu",
        "3-stage pipeline, pure-Python CPU work in the middle stage (~20 ms per item)",
        "items/s",
        True,
        {
            ENGINE: "cosmoflow, process",
            **({"cosmoflow-ray": "cosmoflow, ray"} if _HAS_RAY else {}),
            "cosmoflow-inline": "cosmoflow, inline",
            TRIO: "bare trio + trio-parallel",
            POCKETFLOW: "pocketflow (inline)",
        },
        cpu_cases,
        lambda case: Target((Bound(1.7, True, "cosmoflow-inline"),)),
    ),
)
