"""What a caller cancelled from outside gets: one trio.Cancelled out of a group of
them, and Cancelled before the refusal of an engine that closed."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from cosmoflow_actors.runtime.cancellation import (
    CANCELLED_ALONE,
    cancelled_when,
    only_cancelled,
    refuse_closed,
)


def test_only_cancelled_looks_into_nested_groups() -> None:
    cancelled = trio.Cancelled._create()
    assert only_cancelled(cancelled)
    assert only_cancelled(BaseExceptionGroup("g", [BaseExceptionGroup("inner", [cancelled])]))
    assert not only_cancelled(BaseExceptionGroup("g", [cancelled, ValueError("trouble")]))
    assert not only_cancelled(KeyboardInterrupt())


def test_a_group_of_nothing_but_cancelled_leaves_as_its_first() -> None:
    first = trio.Cancelled._create()
    group = BaseExceptionGroup(
        "g", [BaseExceptionGroup("inner", [first]), trio.Cancelled._create()]
    )
    with pytest.raises(trio.Cancelled) as cancelled, CANCELLED_ALONE:
        raise group
    assert cancelled.value is first
    assert cancelled.value.__context__ is None  # not the group that held it


def test_any_other_error_leaves_the_block_unchanged() -> None:
    mixed = BaseExceptionGroup("g", [trio.Cancelled._create(), ValueError("trouble")])
    with pytest.raises(BaseExceptionGroup) as unchanged, CANCELLED_ALONE:
        raise mixed
    assert unchanged.value is mixed
    with pytest.raises(ValueError, match="alone"), CANCELLED_ALONE:
        raise ValueError("alone")


async def test_a_refusal_reaches_a_caller_whose_scope_is_not_cancelled() -> None:
    refusal = RuntimeError("closed")
    with pytest.raises(RuntimeError) as raised:
        await refuse_closed(refusal)
    assert raised.value is refusal


async def test_a_caller_whose_scope_is_cancelled_gets_cancelled_not_the_refusal() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        await refuse_closed(RuntimeError("closed"))
    assert scope.cancelled_caught


async def test_cancelled_when_ends_its_nurserys_work_once_the_wait_returns() -> None:
    event = trio.Event()
    reached = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled_when, event.wait, nursery.cancel_scope)
        await trio.testing.wait_all_tasks_blocked()
        assert not nursery.cancel_scope.cancel_called
        event.set()
        await trio.sleep_forever()
        reached = True
    assert nursery.cancel_scope.cancelled_caught and not reached
