"""What every benchmark shares: the case it is given and the measurement it returns."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Store = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of a benchmark: its size, its variant and the CPU work per item."""

    size: int
    variant: str = ""
    work: int = 0


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What one implementation measured: wall time and the benchmark's metric."""

    seconds: float
    value: float
    extra: Mapping[str, float] = dataclasses.field(default_factory=dict)


Implementation = Callable[[Case], Measurement]
"""Runs one case in the current (fresh) process and measures it."""


def rss_kib() -> int:
    """This process's resident set size in KiB, after a full garbage collection (Linux)."""
    gc.collect()
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status")


def verify(stores: Iterable[Store], key: str, expected: object) -> None:
    """Fail loudly if any run did not do its work: a fast wrong benchmark is worthless."""
    wrong = sum(1 for store in stores if store.get(key) != expected)
    if wrong:
        raise RuntimeError(f"{wrong} runs ended without {key}={expected!r}")
