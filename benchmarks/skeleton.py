"""The actor floor: the least a design with DESIGN.md's actors can cost on trio.

A skeleton of the engine's hot path, with nothing else. Each node is a node actor with a
pool of idle workers: a step goes straight to an idle worker, which parks on itself. One
router actor and one store actor drain mailboxes (deques) in batches and park with trio's
lowlevel API when they are empty. A store request parks the asking worker until the store
actor answers it. Each worker owns a cancel scope, as the engine's do, so that one run's
step could be cancelled alone.

So each step still crosses what DESIGN.md requires: a message to its node actor, prep's
read and post's write each answered by the store actor, and the router forwarding the run.
None of the engine's features are here: no contexts, retries, timeouts, statistics, run
states, durable records, bounded mailboxes or error handling. What the skeleton costs is
the floor that any engine keeping those actors pays, so a target below it cannot be met
by tuning the engine. It is cancelled only as a whole, when the benchmark ends.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import outcome
import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, reschedule

from benchmarks.common import Store

Exec = Callable[[int], Awaitable[int]]
"""A node's exec: given what prep read, returns what post writes."""


def _cancelled(_: RaiseCancelT) -> Abort:
    return Abort.SUCCEEDED


class Run:
    """One run: its dict store and the steps it has taken."""

    __slots__ = ("steps", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.steps = 0


class Mailbox:
    """A deque that one actor drains whole, parked while it is empty."""

    __slots__ = ("messages", "parked")

    def __init__(self) -> None:
        self.messages: collections.deque[Any] = collections.deque()
        self.parked: Task | None = None

    def send(self, message: Any) -> None:
        self.messages.append(message)
        if self.parked is not None:
            reschedule(self.parked)
            self.parked = None

    async def drain(self) -> collections.deque[Any]:
        """Every message waiting; blocks while there is none."""
        if not self.messages:
            self.parked = current_task()
            await trio.lowlevel.wait_task_rescheduled(_cancelled)
        messages = self.messages
        self.messages = collections.deque()
        return messages


class StoreActor:
    """Answers ``(store, key, value, task)``: a get when ``value`` is ``None``, else a set."""

    def __init__(self) -> None:
        self.mailbox = Mailbox()

    async def serve(self) -> None:
        while True:
            for store, key, value, task in await self.mailbox.drain():
                if value is None:
                    reschedule(task, outcome.Value(store.get(key, 0)))
                else:
                    store[key] = value
                    reschedule(task)

    async def ask(self, store: Store, key: str, value: int | None = None) -> Any:
        """Send a request and wait for its answer (blocks)."""
        self.mailbox.send((store, key, value, current_task()))
        return await trio.lowlevel.wait_task_rescheduled(_cancelled)


class Router:
    """Forwards each finished step's run to the next node, or ends the run once it has
    taken ``length`` steps."""

    def __init__(self, length: int) -> None:
        self.mailbox = Mailbox()
        self.length = length
        self.ended = 0
        self.waiting = 0
        self.all_ended = trio.Event()

    async def serve(self) -> None:
        while True:
            for node, run in await self.mailbox.drain():
                run.steps += 1
                if run.steps < self.length:
                    node.next.take(run)
                else:
                    self.end()

    def end(self) -> None:
        self.ended += 1
        if self.ended == self.waiting:
            self.all_ended.set()

    async def wait(self, runs: int) -> None:
        """Block until ``runs`` runs have ended (counted from the skeleton's start)."""
        self.waiting = runs
        if self.ended < runs:
            await self.all_ended.wait()


class NodeActor:
    """Runs steps on a pool of workers; a step goes to an idle worker or a new one."""

    def __init__(
        self, nursery: trio.Nursery, store: StoreActor, router: Router, exec_: Exec, key: str
    ) -> None:
        self.nursery = nursery
        self.store = store
        self.router = router
        self.exec = exec_
        self.key = key
        self.idle: list[Task] = []
        self.next = self

    def take(self, run: Run) -> None:
        if self.idle:
            reschedule(self.idle.pop(), outcome.Value(run))
        else:
            self.nursery.start_soon(self.work, run)

    async def work(self, run: Run) -> None:
        with trio.CancelScope():
            while True:
                await self.step(run)
                self.router.mailbox.send((self, run))
                self.idle.append(current_task())
                run = await trio.lowlevel.wait_task_rescheduled(_cancelled)

    async def step(self, run: Run) -> None:
        value = await self.store.ask(run.store, self.key)
        value = await self.exec(value)
        await self.store.ask(run.store, self.key, value)


class Skeleton:
    """What a benchmark drives: start runs at the entry node, wait for them to end."""

    def __init__(self, entry: NodeActor, router: Router) -> None:
        self.entry = entry
        self.router = router

    def start(self, store: Store) -> None:
        self.entry.take(Run(store))

    async def wait(self, runs: int) -> None:
        """Block until ``runs`` runs have ended."""
        await self.router.wait(runs)


@asynccontextmanager
async def open_skeleton(nodes: int, length: int, exec_: Exec, key: str) -> AsyncIterator[Skeleton]:
    """A ring of ``nodes`` node actors (the last routes to the first), its router and its
    store actor; each run ends after ``length`` steps. Cancels every actor on exit."""
    store, router = StoreActor(), Router(length)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.serve)
        nursery.start_soon(router.serve)
        actors = [NodeActor(nursery, store, router, exec_, key) for _ in range(nodes)]
        for actor, successor in zip(actors, actors[1:] + actors[:1], strict=True):
            actor.next = successor
        yield Skeleton(actors[0], router)
        nursery.cancel_scope.cancel()
