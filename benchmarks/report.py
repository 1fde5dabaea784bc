"""Results of a case, their ratios and targets, and the tables printed for them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.common import Case
from benchmarks.suite import POCKETFLOW, SCALING_BASE, TIMES, TRIO, Benchmark, Target

BASELINES = {TRIO: "vs trio", POCKETFLOW: "vs PocketFlow"}
HEADER = ["implementation", "variant", "size", "time"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One implementation's measurement in one case (or why there is none)."""

    impl: str
    label: str
    seconds: float | None
    value: float | None
    error: str | None = None
    extra: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def summary(self, unit: str) -> str:
        if self.value is None or self.seconds is None:
            return f"ERROR {self.error}"
        return f"{number(self.value)} {unit} ({self.seconds:.2f} s)"


@dataclasses.dataclass(frozen=True)
class CaseResult:
    case: Case
    rows: tuple[Row, ...]
    target: Target | None

    @property
    def values(self) -> dict[str, float]:
        return {row.impl: row.value for row in self.rows if row.value is not None}

    def ratio(self, row: Row, baseline: str) -> float | None:
        """``row``'s metric divided by ``baseline``'s in the same case."""
        base = self.values.get(baseline)
        return row.value / base if row.value is not None and base else None

    def verdict(self, unit: str, impl: str) -> tuple[str, bool | None]:
        """The target in words with what ``impl`` measured, and whether ``impl`` met it
        (None: n/a)."""
        if self.target is None:
            return "", None
        parts, passed = [], True
        for bound in self.target.bounds:
            measured = bound.measure(self.values, impl)
            shown = "n/a" if measured is None else number(measured)
            suffix = "" if bound.baseline is None or measured is None else TIMES
            parts.append(f"{bound.describe(unit)} ({shown}{suffix})")
            passed = passed and measured is not None and bound.holds(measured)
        return ", ".join(parts), passed

    def to_json(self, unit: str) -> dict[str, Any]:
        rows = [
            {**dataclasses.asdict(row), **{f"vs_{b}": self.ratio(row, b) for b in BASELINES}}
            for row in self.rows
        ]
        return {**dataclasses.asdict(self.case), "results": rows, "target": self.target_json(unit)}

    def target_json(self, unit: str) -> dict[str, Any] | None:
        """The target's verdict for each implementation it is about; ``passed``: all met."""
        if self.target is None:
            return None
        verdicts = {impl: self.verdict(unit, impl) for impl in self.target.impls}
        return {
            "bounds": ", ".join(bound.describe(unit) for bound in self.target.bounds),
            "passed": all(passed for _, passed in verdicts.values()),
            "impls": {
                impl: {"text": text, "passed": passed} for impl, (text, passed) in verdicts.items()
            },
        }


def scaled(
    case: Case, source: Sequence[CaseResult], smoke: bool, target: Target | None
) -> CaseResult:
    """Each implementation's metric at ``case.size`` divided by its metric at
    ``SCALING_BASE`` runs, both taken from ``source`` (the same variant)."""
    by_size = {result.case.size: result for result in source if result.case.variant == case.variant}
    base, top = by_size[SCALING_BASE[smoke]], by_size[case.size]
    rows = tuple(scaled_row(row, base.values.get(row.impl)) for row in top.rows)
    return CaseResult(case, rows, target)


def scaled_row(row: Row, base: float | None) -> Row:
    if row.value is None or not base:
        error = row.error or "no measurement at the base size"
        return dataclasses.replace(row, value=None, error=error)
    extra = {"value": row.value, "base_value": base}
    return dataclasses.replace(row, value=row.value / base, extra=extra)


def number(value: float) -> str:
    """Three significant digits or so, with thousands separators."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def ratio_cell(ratio: float | None) -> str:
    return "" if ratio is None else f"{number(ratio)}{TIMES}"


def row_cells(result: CaseResult, row: Row, unit: str) -> list[str]:
    cells = [row.label, result.case.variant or "-", f"{result.case.size:,}"]
    if row.value is None or row.seconds is None:
        return [*cells, "ERROR", row.error or "", "", "", ""]
    cells += [f"{row.seconds:.2f} s", number(row.value)]
    cells += [ratio_cell(result.ratio(row, baseline)) for baseline in BASELINES]
    target = result.target
    if target is None or row.impl not in target.impls:
        return [*cells, ""]
    text, passed = result.verdict(unit, row.impl)
    return [*cells, f"{text}: {'PASS' if passed else 'MISS'}"]


def table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def render(bench: Benchmark, results: Sequence[CaseResult]) -> str:
    """The benchmark's table: one row per implementation and case."""
    better = "higher" if bench.higher_is_better else "lower"
    title = (
        f"== {bench.name}: {bench.title}\n"
        f"   {bench.unit}, {better} is better; ratio = this row's {bench.unit}"
        " / the baseline's"
    )
    header = [*HEADER, bench.unit, *BASELINES.values(), "target"]
    rows = [row_cells(result, row, bench.unit) for result in results for row in result.rows]
    return f"{title}\n{table(header, rows, numeric={2, 3, 4, 5, 6})}\n"
