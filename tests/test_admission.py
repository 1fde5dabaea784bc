"""Admission: a bound on slots taken, FIFO waiters, and nothing held by a waiter."""

from __future__ import annotations

import gc

import pytest
import trio
import trio.testing

from cosmoflow_actors.runtime.admission import Admission


async def take(admission: Admission, taken: list[object], name: object) -> None:
    """Take a slot of ``admission``, then note ``name`` in ``taken``."""
    await admission.acquire()
    taken.append(name)


async def test_takers_beyond_the_limit_get_freed_slots_in_arrival_order() -> None:
    admission = Admission(2)
    order: list[object] = []

    async with trio.open_nursery() as nursery:
        for index in range(6):
            nursery.start_soon(take, admission, order, index)
            await trio.testing.wait_all_tasks_blocked()
        assert (order, admission.waiting) == ([0, 1], 4)
        for released in range(4):
            admission.release()
            await trio.testing.wait_all_tasks_blocked()
            assert order == [0, 1, *range(2, 3 + released)]
    assert admission.waiting == 0


async def test_a_freed_slot_goes_to_a_waiter_before_a_newcomer() -> None:
    admission = Admission(1)
    await admission.acquire()
    got: list[object] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, admission, got, "waiter")
        await trio.testing.wait_all_tasks_blocked()
        admission.release()
        with pytest.raises(trio.WouldBlock):
            admission.acquire_nowait()
        nursery.start_soon(take, admission, got, "newcomer")
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["waiter"]
        admission.release()
    assert got == ["waiter", "newcomer"]


def test_a_refusal_names_the_limit_and_what_to_do() -> None:
    # A service that sheds load on WouldBlock logs this message: it says which bound
    # was reached and how to get past it.
    admission = Admission(3)
    for _ in range(3):
        admission.acquire_nowait()
    with pytest.raises(trio.WouldBlock, match=r"max_runs=3 runs are in flight: start_run waits"):
        admission.acquire_nowait()


async def test_acquire_is_a_checkpoint_even_with_a_free_slot() -> None:
    admission = Admission(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await admission.acquire()
    assert scope.cancelled_caught
    admission.acquire_nowait()  # the cancelled acquire took no slot
    with pytest.raises(trio.WouldBlock):
        admission.acquire_nowait()


async def test_a_waiter_cancelled_takes_no_slot_and_passes_its_turn_on() -> None:
    admission = Admission(1)
    await admission.acquire()
    got: list[object] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, admission, got, "first")
        async with trio.open_nursery() as inner:
            inner.start_soon(take, admission, got, "gives up")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(take, admission, got, "second")
            await trio.testing.wait_all_tasks_blocked()
            inner.cancel_scope.cancel()
        assert admission.waiting == 2
        admission.release()
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["first"]
        admission.release()
    assert (got, admission.waiting) == (["first", "second"], 0)


async def test_a_waiter_holds_no_exception() -> None:
    # A trio.Semaphore's waiter keeps the WouldBlock it caught (and its traceback's
    # frames) for as long as it waits: with many callers waiting, that is many objects
    # for the garbage collector to walk.
    admission = Admission(1)
    await admission.acquire()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(admission.acquire)
        await trio.testing.wait_all_tasks_blocked()
        held = [o for o in gc.get_objects() if isinstance(o, trio.WouldBlock)]
        assert (admission.waiting, held) == (3, [])
        nursery.cancel_scope.cancel()
