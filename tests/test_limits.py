"""RateLimiter: never more than `calls` grants in any window of `per_seconds`."""

from __future__ import annotations

import math

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

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


async def test_acquire_returns_the_time_of_the_grant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(1, 3.0)
    assert await limiter.acquire() == 0.0
    assert await limiter.acquire() == 3.0
    assert trio.current_time() == 3.0


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


async def test_a_waiter_scheduled_late_counts_from_when_it_really_went(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The window counts from the time a waiter is granted, not from the time its slot
    opened: here the waiter due at 1.0 only runs at 1.5 (a busy scheduler), so the one
    after it may not go before 2.5."""
    limiter = RateLimiter(1, 1.0)
    granted: list[float] = []

    async def call() -> None:
        await limiter.acquire()
        granted.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(1.5)  # the second caller's slot opened at 1.0; it runs now
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.5)  # 2.0: one second after the slot opened, 0.5 after the grant
        await trio.testing.wait_all_tasks_blocked()
        assert granted == [0.0, 1.5]
        mock_clock.jump(0.5)
    assert granted == [0.0, 1.5, 2.5]


async def test_waiters_cancelled_in_line_give_their_places_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(1, 1.0)
    await limiter.acquire()
    granted: dict[str, float] = {}

    async def call(name: str, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await limiter.acquire()
            granted[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        scopes = {name: await nursery.start(call, name) for name in "abcd"}
        await trio.testing.wait_all_tasks_blocked()
        scopes["a"].cancel()  # first in line: it was keeping time
        scopes["c"].cancel()  # in the middle
    assert granted == {"b": 1.0, "d": 2.0}


async def test_a_waiter_cancelled_as_its_slot_opens_leaves_it_to_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two slots open at 1.0 for three waiters; the middle one is cancelled at 1.0, at
    the moment it is released or just before (either order), and the third goes."""
    limiter = RateLimiter(2, 1.0)
    await limiter.acquire()
    await limiter.acquire()
    granted: dict[str, float] = {}

    async def call(name: str, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await limiter.acquire()
            granted[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        for name, deadline in [("a", 9.0), ("b", 1.0), ("c", 9.0)]:
            nursery.start_soon(call, name, deadline)
            await trio.testing.wait_all_tasks_blocked()
    assert granted == {"a": 1.0, "c": 1.0}
    assert limiter.waiting == 0


async def test_on_the_real_clock_no_window_holds_more_than_the_limit() -> None:
    """150 acquisitions of a (50, 0.2 s) limit from 150 tasks, while 20 other tasks keep
    the scheduler busy: every window of 0.2 s of grant times holds at most 50."""
    calls, per = 50, 0.2
    limiter = RateLimiter(calls, per)
    granted: list[float] = []
    done = trio.Event()

    async def call() -> None:
        before = trio.current_time()
        at = await limiter.acquire()
        assert before <= at <= trio.current_time()
        granted.append(at)
        if len(granted) == 3 * calls:
            done.set()

    async def busy() -> None:
        while not done.is_set():
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(busy)
        for _ in range(3 * calls):
            nursery.start_soon(call)
    assert granted == sorted(granted)
    assert most_in_any_window(granted, per) <= calls
    assert granted[-1] - granted[0] >= 2 * per


@settings(max_examples=200, deadline=None)
@given(
    calls=st.integers(1, 4),
    per=st.sampled_from([0.5, 1.0, 3.0]),
    callers=st.lists(
        st.tuples(st.sampled_from([0.0, 0.25, 1.0]), st.none() | st.sampled_from([0.5, 2.0])),
        min_size=1,
        max_size=15,
    ),
)
def test_any_mix_of_arrivals_and_cancellations_keeps_the_limit_and_the_order(
    calls: int, per: float, callers: list[tuple[float, float | None]]
) -> None:
    """Callers arrive after a delay each, some giving up after a while: every window
    holds at most ``calls`` grants, callers are granted in arrival order, every caller
    that does not give up is granted, and the limiter ends with nobody waiting."""
    granted: list[tuple[float, int]] = []
    limiter = RateLimiter(calls, per)

    async def call(index: int, patience: float | None) -> None:
        with trio.move_on_after(math.inf if patience is None else patience):
            granted.append((await limiter.acquire(), index))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index, (delay, patience) in enumerate(callers):
                await trio.sleep(delay)
                nursery.start_soon(call, index, patience)
                await trio.testing.wait_all_tasks_blocked()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    times = [at for at, _ in granted]
    assert not times or most_in_any_window(times, per) <= calls
    assert sorted(granted) == sorted(granted, key=lambda grant: grant[1])
    assert limiter.waiting == 0
    patient = {index for index, (_, patience) in enumerate(callers) if patience is None}
    assert patient <= {index for _, index in granted}
