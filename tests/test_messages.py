"""The messages actors exchange, and Reply: the one-shot answer slot a requester parks
on."""

from __future__ import annotations

import msgspec
import outcome
import pytest
import trio
import trio.testing

from cosmoflow_actors.runtime.messages import (
    Reply,
    Step,
    StepDone,
    StepFailed,
    StoreOp,
    StoreRequest,
)
from tests.support import ki_protection_seen


async def test_an_answer_sent_before_waiting_is_kept() -> None:
    reply: Reply[int] = Reply()
    reply.send(outcome.Value(7))
    assert await reply.wait() == 7


async def test_an_answer_wakes_the_waiting_task() -> None:
    reply: Reply[str] = Reply()
    got: list[str] = []

    async def waiter() -> None:
        got.append(await reply.wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        reply.send(outcome.Value("hello"))
    assert got == ["hello"]


async def test_an_error_answer_is_raised() -> None:
    reply: Reply[int] = Reply()
    reply.send(outcome.Error(LookupError("missing")))
    with pytest.raises(LookupError, match="missing"):
        await reply.wait()


async def test_a_cancelled_waiter_abandons_the_slot() -> None:
    reply: Reply[int] = Reply()
    async with trio.open_nursery() as nursery:
        waiting = trio.CancelScope()

        async def waiter() -> None:
            with waiting:
                await reply.wait()

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        waiting.cancel()
    assert waiting.cancelled_caught
    reply.send(outcome.Value(1))
    assert await reply.wait() == 1


@pytest.mark.parametrize("kind", [StoreRequest, Step, StepDone, StepFailed])
def test_a_message_is_immutable_and_holds_only_its_fields(kind: type[msgspec.Struct]) -> None:
    fields = kind.__struct_fields__
    message = kind(*range(len(fields)))
    with pytest.raises(AttributeError):
        setattr(message, fields[0], "changed")
    with pytest.raises(AttributeError):
        message.extra = "added"  # type: ignore[attr-defined]
    assert [getattr(message, name) for name in fields] == list(range(len(fields)))


def test_write_operations_are_marked() -> None:
    assert {op for op in StoreOp if op.writes} == {
        StoreOp.SET,
        StoreOp.SET_MANY,
        StoreOp.UPDATE,
        StoreOp.DELETE,
        StoreOp.CLEAR,
        StoreOp.COMMIT_STEP,
        StoreOp.FORGET,
    }


async def test_a_reply_is_waited_for_and_sent_protected_from_keyboard_interrupt() -> None:
    reply: Reply[int] = Reply()
    answers: list[int] = []
    with ki_protection_seen(Reply.wait, Reply.send) as seen:
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                answers.append(await reply.wait())

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            reply.send(outcome.Value(7))
    assert answers == [7]
    assert seen == {"Reply.wait": {True}, "Reply.send": {True}}
