"""The actor kernel: a bounded FIFO mailbox, and the slots that bound an actor's work.

An actor is its own state, a :class:`Mailbox`, a handler and a concurrency limit (1 for
the router and the store actors, ``max_concurrency`` for a node actor). The kernel keeps
three promises for every actor:

- each message is handled by the actor's handler, at most ``limit`` at once, each under
  one of the actor's slots;
- messages are handled in mailbox order: a message goes straight to the handler only
  when a slot is free and nothing waits in the mailbox, and a freed slot takes the
  mailbox's head before anything new;
- a mailbox is bounded: a sender finding it full waits (first come, first served).

Within those promises a message may be handled in the sender's own task (direct
dispatch and hand-off, see docs/architecture.md); trio runs one task at a time, so the
serial order holds. Which task handles a message is the concrete actor's business; this
module counts and orders.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import ClassVar, Generic, TypeVar

import trio

from cosmoflow_actors.runtime.statistics import ActorKind, ActorStatistics

M = TypeVar("M")


class Mailbox(Generic[M]):
    """A bounded FIFO queue of messages with at most one receiver task.

    Senders that find it full wait in arrival order with their messages; each message
    taken out moves the longest waiter's message in at once, so a message let in is
    never overtaken by one sent later. Once closed it drops every message. Never blocks
    except in :meth:`put` (while full) and :meth:`wait` (while empty).

    The methods that park or wake a task are protected from KeyboardInterrupt (as
    trio's own primitives are): a Ctrl-C landing between noting a task and parking it,
    or between taking a waiter and waking it, would leave that task asleep for good or
    woken twice. The interrupt arrives at the next checkpoint instead.
    """

    __slots__ = ("_closed", "_receiver", "_senders", "capacity", "items")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: deque[M] = deque()
        """The messages waiting, oldest first (read it; change it only through the
        methods)."""
        self._senders: OrderedDict[trio.lowlevel.Task, M] = OrderedDict()
        """The senders waiting for room, longest first, with their messages."""
        self._receiver: trio.lowlevel.Task | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def has_room(self) -> bool:
        """Whether a message may be put now without overtaking a waiting sender."""
        return len(self.items) < self.capacity and not self._senders

    @property
    def senders_waiting(self) -> int:
        """Senders waiting until there is room."""
        return len(self._senders)

    def put_nowait(self, message: M) -> None:
        """Append ``message``; raise trio.WouldBlock when full. Never blocks."""
        if not self.has_room:
            raise trio.WouldBlock(f"mailbox full ({self.capacity} messages)")
        self._append(message)

    @trio.lowlevel.enable_ki_protection
    async def put(self, message: M) -> None:
        """Append ``message``, waiting first while the mailbox is full (the message is
        in when this returns, unless the mailbox was closed: then it is dropped).

        A checkpoint only when it waits. Cancelled while waiting, nothing is appended.
        """
        if self.has_room:
            self._append(message)
            return
        task = trio.lowlevel.current_task()
        self._senders[task] = message

        def abort(_: object) -> trio.lowlevel.Abort:
            del self._senders[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _append(self, message: M) -> None:
        if self._closed:
            return
        self.items.append(message)
        self.wake()

    @trio.lowlevel.enable_ki_protection
    def close(self) -> list[M]:
        """Drop the messages waiting and take no more: every waiting sender returns,
        its message dropped, and so is what any later sender puts. Return the messages
        dropped, those in the mailbox then the waiting senders', oldest first (for an
        actor that must answer them). Never blocks."""
        self._closed = True
        dropped = list(self.items)
        self.items.clear()
        while self._senders:
            task, message = self._senders.popitem(last=False)
            dropped.append(message)
            trio.lowlevel.reschedule(task)
        return dropped

    @trio.lowlevel.enable_ki_protection
    def take(self) -> M:
        """Remove and return the oldest message (the mailbox must not be empty); the
        longest waiting sender's message takes its place. Never blocks."""
        message = self.items.popleft()
        if self._senders:
            task, waiting = self._senders.popitem(last=False)
            self._append(waiting)
            trio.lowlevel.reschedule(task)
        return message

    def take_batch(self, most: int) -> list[M]:
        """Remove and return up to ``most`` of the oldest messages. Never blocks."""
        return [self.take() for _ in range(min(most, len(self.items)))]

    @trio.lowlevel.enable_ki_protection
    def wake(self) -> None:
        """Wake the receiver if it waits: a message came, or another change it must
        see (the actor is told to stop). Never blocks."""
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            trio.lowlevel.reschedule(receiver)

    @trio.lowlevel.enable_ki_protection
    async def wait(self) -> None:
        """Block the one receiver task until a message is in the mailbox. A checkpoint."""
        if self.items:
            await trio.lowlevel.checkpoint()
            return
        self._receiver = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort_wait)

    def _abort_wait(self, _: object) -> trio.lowlevel.Abort:
        self._receiver = None
        return trio.lowlevel.Abort.SUCCEEDED


class Actor(Generic[M]):
    """What every actor shares: a name, a mailbox, slots and counters.

    ``busy`` counts the slots taken (messages being handled); ``messages_processed``
    the messages whose handling ended. Subclasses decide which task handles a message
    and call :meth:`enter` / :meth:`leave` around the handling.
    """

    kind: ClassVar[ActorKind]

    def __init__(self, name: str, mailbox_size: int, max_concurrency: int | None) -> None:
        self.name = name
        self.mailbox: Mailbox[M] = Mailbox(mailbox_size)
        self.max_concurrency = max_concurrency
        self.limit: float = math.inf if max_concurrency is None else max_concurrency
        self.busy = 0
        self.messages_processed = 0
        self.serving = False
        """True once the actor is ready; a crash after that fails the engine's runs."""

    @property
    def idle(self) -> bool:
        """Whether a message sent now may be handled at once: the actor is serving, a
        slot is free and no message waits before it."""
        return self.serving and self.busy < self.limit and not self.mailbox.items

    def enter(self) -> None:
        """Take a slot for a message about to be handled. Never blocks."""
        self.busy += 1

    def try_enter(self) -> bool:
        """Take a slot if the actor is :attr:`idle`; return whether it did (the message
        may then be handled at once). Never blocks."""
        if not self.idle:
            return False
        self.busy += 1
        return True

    def leave(self) -> M | None:
        """Free the slot of a message whose handling ended; if messages wait, take the
        slot again for the oldest and return it (its handling is the caller's to
        arrange). Never blocks."""
        self.busy -= 1
        self.messages_processed += 1
        if self.mailbox.items and self.busy < self.limit:
            self.busy += 1
            return self.mailbox.take()
        return None

    def statistics(self) -> ActorStatistics:
        """This actor's counters now. Never blocks."""
        return ActorStatistics(
            name=self.name,
            kind=self.kind,
            messages_processed=self.messages_processed,
            mailbox_depth=len(self.mailbox),
            in_flight=self.busy,
            mailbox_size=self.mailbox.capacity,
            max_concurrency=self.max_concurrency,
            rate_limit=None,
            rate_waiting=0,
            senders_waiting=self.mailbox.senders_waiting,
        )
