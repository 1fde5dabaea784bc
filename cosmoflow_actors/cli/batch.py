"""What ``cosmoflow run --runs N`` measures and shows: :class:`BatchStats` (the runs'
outcomes and latencies and, per node, its steps, retries, fallbacks and failures), the
live :class:`ProgressBar` on a terminal, and the summary :func:`print_summary` prints
(text and a table, or JSON), also of a batch Ctrl-C interrupted."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cosmoflow_actors.cli.output import dump_json, plain, print_table
from cosmoflow_actors.cli.trace import NodeNames
from cosmoflow_actors.events import (
    Event,
    Fallback,
    Retry,
    StepFinished,
    StepStarted,
)
from cosmoflow_actors.tracing import describe_error, one_line


@dataclass(slots=True)
class NodeStats:
    """What ``--runs`` measured of one node: its step durations, retries and fallbacks
    (one per Retry and Fallback event: per exec, so per item of a batch node) and
    failures."""

    durations: list[float] = field(default_factory=list)
    retries: int = 0
    fallbacks: int = 0
    failures: int = 0

    def summary(self) -> dict[str, Any]:
        """Steps, mean/p50/p99 latency in ms, retries, fallbacks and failures."""
        return {
            "steps": len(self.durations),
            **_latency(self.durations),
            "retries": self.retries,
            "fallbacks": self.fallbacks,
            "failures": self.failures,
        }


@dataclass(frozen=True, slots=True)
class FailedRun:
    """A run of ``--runs`` that failed: its id and its error, as one line."""

    run_id: str
    error: str


@dataclass(slots=True)
class BatchStats:
    """What ``--runs`` measured: run outcomes (from the runs) and, per node, the steps
    (from the engine's events). A node of a nested flow is named by its path,
    ``flow/node`` (see :class:`NodeNames`). A batch Ctrl-C ``interrupted`` started
    ``started`` of its ``runs``; those it cancelled in flight are ``cancelled``, neither
    succeeded nor failed."""

    flow_name: str
    runs: int
    concurrency: int
    names: NodeNames
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    interrupted: bool = False
    first_error: BaseException | None = None
    failed_runs: list[FailedRun] = field(default_factory=list)
    duration: float = 0.0
    run_durations: list[float] = field(default_factory=list)
    nodes: dict[str, NodeStats] = field(default_factory=dict)

    def record(self, event: Event) -> None:
        """Count ``event`` in the per-node statistics (the steps of every run, the
        BatchFlow children of the runs too)."""
        match event:
            case StepStarted():
                self.nodes.setdefault(self.names.of(event), NodeStats())
            case StepFinished():
                stats = self.nodes.setdefault(self.names.of(event), NodeStats())
                stats.durations.append(event.duration)
                stats.failures += event.error is not None
            case Retry():
                self.nodes.setdefault(self.names.of(event), NodeStats()).retries += 1
            case Fallback():
                self.nodes.setdefault(self.names.of(event), NodeStats()).fallbacks += 1

    def finished(self, run_id: str, duration: float, error: BaseException | None) -> None:
        """Count the run ``run_id`` (one of the ``runs``) that ended after ``duration``
        seconds, with its error if it failed."""
        self.run_durations.append(duration)
        if error is None:
            self.succeeded += 1
            return
        self.failed += 1
        self.failed_runs.append(FailedRun(run_id, describe_error(error)))
        if self.first_error is None:
            self.first_error = error

    @property
    def ended(self) -> int:
        """The runs that succeeded or failed."""
        return self.succeeded + self.failed

    def summary(self) -> dict[str, Any]:
        """Everything measured, as JSON-ready values."""
        return {
            "flow": self.flow_name,
            "runs": self.runs,
            "interrupted": self.interrupted,
            "started": self.started,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "concurrency": self.concurrency,
            "duration": round(self.duration, 6),
            "runs_per_second": round(self.ended / self.duration, 1) if self.duration else None,
            "latency_ms": _latency(self.run_durations),
            "nodes": {row: stats.summary() for row, stats in self.nodes.items()},
            "first_error": None if self.first_error is None else describe_error(self.first_error),
            "failed_runs": [dataclasses.asdict(run) for run in self.failed_runs],
        }


def _latency(durations: list[float]) -> dict[str, float | None]:
    """Mean, median and 99th percentile (nearest rank) of ``durations``, in ms."""
    if not durations:
        return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
    ordered = sorted(durations)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000, 3)

    mean = round(sum(ordered) / len(ordered) * 1000, 3)
    return {"mean_ms": mean, "p50_ms": rank(0.5), "p99_ms": rank(0.99)}


class ProgressBar:
    """A live rich progress bar on stderr: runs done, runs/s, failures. Shown only when
    stderr is an interactive terminal (a log gets the summary alone)."""

    def __init__(self, total: int) -> None:
        console = Console(stderr=True)
        self._bar = Progress(
            TextColumn("runs"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} runs/s"),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_interactive,
        )
        self._task = self._bar.add_task("runs", total=total, rate="0.0", failed=0)
        self._started = trio.current_time()

    def __enter__(self) -> ProgressBar:
        self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.stop()

    def show(self, batch: BatchStats) -> None:
        """Show the runs of ``batch`` that have ended. Never blocks."""
        done = batch.ended
        elapsed = trio.current_time() - self._started
        rate = f"{done / elapsed:.1f}" if elapsed > 0 else "-"
        self._bar.update(self._task, completed=done, rate=rate, failed=batch.failed)


def print_summary(batch: BatchStats, *, as_json: bool) -> None:
    """Print on stdout what ``batch`` measured: text and a table per node, or (``as_json``)
    :meth:`BatchStats.summary` as JSON."""
    summary = batch.summary()
    if as_json:
        print(dump_json(summary))
        return
    latency = summary["latency_ms"]
    rate = summary["runs_per_second"]
    lines = [
        f"flow:         {batch.flow_name}",
        f"runs:         {_runs(batch)}, {batch.concurrency} at a time",
        f"duration:     {_seconds(batch.duration)} ({rate} runs/s)",
        f"run latency:  mean {_ms(latency['mean_ms'])}, p50 {_ms(latency['p50_ms'])}, "
        f"p99 {_ms(latency['p99_ms'])}",
    ]
    print("\n".join(one_line(line) for line in lines))
    print_table(_node_table(summary["nodes"]))


def _runs(batch: BatchStats) -> str:
    """How the runs of ``batch`` ended: ``4 (3 succeeded, 1 failed)``, or for a batch
    Ctrl-C interrupted ``interrupted after 7 of 10 (3 succeeded, 1 failed, 3
    cancelled)``, 7 being the runs started."""
    outcomes = f"{batch.succeeded} succeeded, {batch.failed} failed"
    if not batch.interrupted:
        return f"{batch.runs} ({outcomes})"
    started = f"interrupted after {batch.started} of {batch.runs}"
    return f"{started} ({outcomes}, {batch.cancelled} cancelled)"


def _node_table(nodes: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="steps per node", title_justify="left")
    table.add_column("node")
    for name in ("steps", "mean", "p50", "p99", "retries", "fallbacks", "failures"):
        table.add_column(name, justify="right")
    for row, stats in nodes.items():
        latencies = [_ms(stats[key]) for key in ("mean_ms", "p50_ms", "p99_ms")]
        counts = [str(stats[key]) for key in ("retries", "fallbacks", "failures")]
        table.add_row(*plain(row, str(stats["steps"]), *latencies, *counts))
    return table


def _ms(value: float | None) -> str:
    """A latency given in ms, for people: ``0.42 ms``, ``3.10 s``, or ``-`` for none."""
    if value is None:
        return "-"
    return f"{value:.2f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
