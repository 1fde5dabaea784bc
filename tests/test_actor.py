"""The actor kernel: the bounded FIFO mailbox and an actor's slots."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from cosmoflow_actors.runtime.actor import Actor, Mailbox
from tests.support import ki_protection_seen


class Plain(Actor[str]):
    """The kernel alone: an actor whose messages are strings."""

    kind = "test"


async def put_and_note(mailbox: Mailbox[str], message: str, done: list[str]) -> None:
    """Put ``message`` (waiting while full), then note that it is in."""
    await mailbox.put(message)
    done.append(message)


def test_messages_come_out_in_the_order_they_went_in() -> None:
    mailbox: Mailbox[str] = Mailbox(10)
    for message in "abcde":
        mailbox.put_nowait(message)
    assert len(mailbox) == 5
    assert [mailbox.take(), mailbox.take()] == ["a", "b"]
    assert mailbox.take_batch(10) == ["c", "d", "e"]
    assert not mailbox


def test_put_nowait_raises_would_block_when_full_and_appends_nothing() -> None:
    mailbox: Mailbox[str] = Mailbox(2)
    mailbox.put_nowait("a")
    mailbox.put_nowait("b")
    with pytest.raises(trio.WouldBlock, match=r"mailbox full \(2 messages\)"):
        mailbox.put_nowait("c")
    assert mailbox.take_batch(5) == ["a", "b"]


async def test_put_blocks_while_full_and_senders_get_in_in_their_order() -> None:
    mailbox: Mailbox[str] = Mailbox(1)
    mailbox.put_nowait("first")
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        for message in ["s1", "s2", "s3"]:
            nursery.start_soon(put_and_note, mailbox, message, done)
            await trio.testing.wait_all_tasks_blocked()
        assert (done, mailbox.senders_waiting, mailbox.has_room) == ([], 3, False)
        taken = []
        for _ in range(4):
            taken.append(mailbox.take())
            await trio.testing.wait_all_tasks_blocked()
    assert taken == ["first", "s1", "s2", "s3"]
    assert done == ["s1", "s2", "s3"]


async def test_a_sender_let_in_is_not_overtaken_by_a_later_put_nowait() -> None:
    """A take lets the parked sender in; a put_nowait made before that sender has run
    must not take its room (the sender came first)."""
    mailbox: Mailbox[str] = Mailbox(1)
    mailbox.put_nowait("first")
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(put_and_note, mailbox, "parked", done)
        await trio.testing.wait_all_tasks_blocked()
        assert mailbox.take() == "first"
        with pytest.raises(trio.WouldBlock):
            mailbox.put_nowait("late")
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["parked"]
        assert mailbox.take() == "parked"


async def put_cancellable(
    mailbox: Mailbox[str],
    message: str,
    done: list[str],
    *,
    task_status: trio.TaskStatus[trio.CancelScope],
) -> None:
    """Put ``message`` in a cancel scope handed back to the starter."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await put_and_note(mailbox, message, done)


async def test_a_sender_cancelled_while_waiting_appends_nothing() -> None:
    mailbox: Mailbox[str] = Mailbox(1)
    mailbox.put_nowait("first")
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        cancelled = await nursery.start(put_cancellable, mailbox, "cancelled", done)
        nursery.start_soon(put_and_note, mailbox, "kept", done)
        await trio.testing.wait_all_tasks_blocked()
        assert mailbox.senders_waiting == 2
        cancelled.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert mailbox.senders_waiting == 1
        assert mailbox.take() == "first"
        await trio.testing.wait_all_tasks_blocked()
    assert done == ["kept"]
    assert mailbox.take_batch(5) == ["kept"]


async def test_wait_blocks_until_a_message_arrives() -> None:
    mailbox: Mailbox[str] = Mailbox(4)
    woke: list[int] = []

    async def receiver() -> None:
        await mailbox.wait()
        woke.append(len(mailbox))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        mailbox.put_nowait("hello")
    assert woke == [1]


def test_leave_hands_back_the_head_and_keeps_the_slot() -> None:
    actor = Plain("plain", mailbox_size=8, max_concurrency=1)
    actor.serving = True
    assert actor.idle
    actor.enter()
    assert not actor.idle
    actor.mailbox.put_nowait("next")
    actor.mailbox.put_nowait("after")
    assert actor.leave() == "next"
    assert (actor.busy, actor.messages_processed, len(actor.mailbox)) == (1, 1, 1)
    assert actor.leave() == "after"
    assert actor.leave() is None
    assert (actor.busy, actor.messages_processed) == (0, 3)
    assert actor.idle


def test_a_freed_slot_of_several_takes_the_oldest_message() -> None:
    actor = Plain("plain", mailbox_size=8, max_concurrency=2)
    actor.serving = True
    actor.enter()
    actor.enter()
    actor.mailbox.put_nowait("queued")
    assert actor.leave() == "queued"
    assert (actor.busy, len(actor.mailbox)) == (2, 0)
    assert actor.leave() is None
    assert (actor.busy, actor.messages_processed) == (1, 2)


def test_an_actor_that_is_not_serving_or_has_mail_is_not_idle() -> None:
    actor = Plain("plain", mailbox_size=8, max_concurrency=None)
    assert not actor.idle
    actor.serving = True
    assert actor.idle
    actor.mailbox.put_nowait("waiting")
    assert not actor.idle
    stats = actor.statistics()
    assert (stats.name, stats.kind, stats.mailbox_depth, stats.mailbox_size) == (
        "plain",
        "test",
        1,
        8,
    )
    assert stats.max_concurrency is None


def test_try_enter_takes_a_slot_only_when_the_actor_is_idle() -> None:
    actor = Plain("plain", mailbox_size=8, max_concurrency=2)
    assert not actor.try_enter()  # not serving yet
    actor.serving = True
    assert actor.try_enter()
    assert actor.try_enter()
    assert not actor.try_enter()  # both slots taken
    assert actor.busy == 2
    assert actor.leave() is None
    actor.mailbox.put_nowait("waiting")
    assert not actor.try_enter()  # a free slot, but a message waits before
    assert actor.busy == 1


async def test_a_take_moves_the_longest_waiters_message_in_at_once() -> None:
    """The waiting sender's message is in the mailbox before that sender runs again:
    the mailbox is not empty for a moment in which a later message could go first."""
    mailbox: Mailbox[str] = Mailbox(1)
    mailbox.put_nowait("first")
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(put_and_note, mailbox, "waiting", done)
        await trio.testing.wait_all_tasks_blocked()
        assert mailbox.take() == "first"
        assert (list(mailbox.items), mailbox.senders_waiting, done) == (["waiting"], 0, [])
    assert done == ["waiting"]


async def test_a_closed_mailbox_drops_what_waits_and_what_comes_and_frees_its_senders() -> None:
    """close() hands back every message it dropped, the waiting senders' too, oldest
    first: an actor that must answer its requests answers them all."""
    mailbox: Mailbox[str] = Mailbox(1)
    mailbox.put_nowait("queued")
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        for message in ["s1", "s2"]:
            nursery.start_soon(put_and_note, mailbox, message, done)
            await trio.testing.wait_all_tasks_blocked()
        assert mailbox.close() == ["queued", "s1", "s2"]
    assert (sorted(done), len(mailbox), mailbox.senders_waiting) == (["s1", "s2"], 0, 0)
    mailbox.put_nowait("late")
    await mailbox.put("later")
    assert not mailbox


async def test_a_mailbox_parks_and_wakes_tasks_protected_from_keyboard_interrupt() -> None:
    """A Ctrl-C landing between taking a waiter and waking it (or noting a task and
    parking it) would leave that task asleep for good: every line that does so runs
    protected, and the interrupt waits for the next checkpoint."""
    mailbox: Mailbox[int] = Mailbox(1)
    methods = (Mailbox.put, Mailbox.take, Mailbox.wait, Mailbox.wake, Mailbox.close)
    with ki_protection_seen(*methods) as seen:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.wait)
            await trio.testing.wait_all_tasks_blocked()
            await mailbox.put(1)
            nursery.start_soon(mailbox.put, 2)
            await trio.testing.wait_all_tasks_blocked()
            assert mailbox.take() == 1
            nursery.start_soon(mailbox.put, 3)
            await trio.testing.wait_all_tasks_blocked()
            assert mailbox.close() == [2, 3]
    assert seen == {method.__qualname__: {True} for method in methods}
