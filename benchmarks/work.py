"""The pure-Python CPU work of the cpu benchmark, importable without any dependency
(process workers import it)."""

from __future__ import annotations

import time


def spin(iterations: int, seed: int) -> int:
    """Burn CPU in pure Python (a linear congruential generator); deterministic."""
    x = seed
    for _ in range(iterations):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return x


def calibrate(milliseconds: float, probe: int = 200_000) -> int:
    """Iterations of :func:`spin` that take about ``milliseconds`` on this machine."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        spin(probe, 1)
        best = min(best, time.perf_counter() - start)
    return max(1, round(probe * milliseconds / 1000 / best))
