"""RateLimiter: never more than `calls` starts in any window of `per_seconds`."""

from __future__ import annotations

import trio
import trio.testing

from cosmoflow_actors.runtime.limits import RateLimiter


def most_in_any_window(starts: list[float], per: float) -> int:
    return max(sum(1 for t in starts if s <= t < s + per) for s in starts)


async def test_concurrent_callers_never_exceed_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(5, 2.0)
    starts: list[float] = []

    async def call() -> None:
        await limiter.acquire()
        starts.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(23):
            nursery.start_soon(call)
    assert most_in_any_window(starts, 2.0) == 5
    assert starts == sorted(starts)
    assert starts[-1] - starts[0] == 8.0  # 23 calls: windows at 0, 2, 4, 6, 8


async def test_waiting_callers_are_counted(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1, 10.0)
    await limiter.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(limiter.acquire)
        nursery.start_soon(limiter.acquire)
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.waiting == 2
    assert limiter.waiting == 0


async def test_no_caller_starts_after_a_later_arrival(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(2, 1.0)
    started: dict[int, float] = {}

    async def call(index: int) -> None:
        await limiter.acquire()
        started[index] = trio.current_time()

    async with trio.open_nursery() as nursery:
        for index in range(7):
            nursery.start_soon(call, index)
            await trio.testing.wait_all_tasks_blocked()
    assert [started[index] for index in range(7)] == [0, 0, 1, 1, 2, 2, 3]
