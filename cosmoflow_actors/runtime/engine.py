"""The engine: one trio nursery holding the router, the node actors and the store actors.

``open_engine()`` is the only way to get an engine. Actors start with ``nursery.start``
and are ready before first use. A crashing actor fails every run in flight with
ActorCrashedError and its exception leaves ``open_engine``; leaving the block normally
waits for the runs started in it.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol, final

import trio
from trio_util import AsyncValue

from cosmoflow_actors.errors import ActorCrashedError, StorageError
from cosmoflow_actors.flow import Flow, FlowResult
from cosmoflow_actors.node import Node
from cosmoflow_actors.runtime.node_actor import NodeActor
from cosmoflow_actors.runtime.router import Router
from cosmoflow_actors.runtime.run import Run, RunState
from cosmoflow_actors.runtime.store_actor import StoreActor
from cosmoflow_actors.storage.base import Storage
from cosmoflow_actors.storage.memory import MemoryStorage

DEFAULT_MAILBOX_SIZE: Final = 256
"""Steps (or store requests) an actor's mailbox holds before senders wait."""


class _Actor(Protocol):
    kind: str
    name: str
    serving: bool
    messages_processed: int
    in_flight: int

    @property
    def mailbox_depth(self) -> int: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


@dataclass(frozen=True, slots=True)
class ActorStatistics:
    """One actor's counters: ``kind`` is "node", "router" or "store"."""

    name: str
    kind: str
    messages_processed: int
    mailbox_depth: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """Run counters and every live actor's statistics, taken at one moment."""

    runs_started: int
    runs_succeeded: int
    runs_failed: int
    runs_cancelled: int
    runs_in_flight: int
    actors: tuple[ActorStatistics, ...]

    def actor(self, name: str) -> ActorStatistics:
        """The statistics of the actor called ``name`` (``"flow/node"``, ``"router"``...)."""
        for stats in self.actors:
            if stats.name == name:
                return stats
        raise KeyError(name)


@final
class Engine:
    """Runs flows. Get one from :func:`open_engine`; all methods run in its trio context."""

    def __init__(self, nursery: trio.Nursery, mailbox_size: int) -> None:
        self._nursery = nursery
        self._mailbox_size = mailbox_size
        self._router = Router(self._node_actor)
        self._node_actors: dict[tuple[Flow, str], NodeActor] = {}
        self._registered: set[Flow] = set()
        self._stores: dict[int, StoreActor] = {}
        self._runs: dict[str, Run] = {}
        self._in_flight = AsyncValue(0)
        self._closed = False
        self._counts = dict.fromkeys(RunState, 0)
        self._started = 0

    async def run(
        self,
        flow: Flow,
        store: Storage | dict[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> FlowResult:
        """Run ``flow`` to its end and return its result; raise its error if it fails.

        Blocks until the run ends. Cancelling the caller cancels the run.
        """
        run = await self.start_run(flow, store, params=params, run_id=run_id)
        try:
            return await run.wait()
        finally:
            run.cancel()

    async def start_run(
        self,
        flow: Flow,
        store: Storage | dict[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Start a run of ``flow`` and return its handle once the entry node has it.

        ``store`` is a Storage, a dict used in place as memory storage, or None for a
        fresh MemoryStorage. Blocks while the entry node's mailbox is full. Raises
        StorageError when the storage cannot be opened.
        """
        if not isinstance(flow, Flow):
            raise TypeError(f"expected a built Flow, got {type(flow).__name__}")
        if self._closed:
            raise RuntimeError("the engine is closed")
        run_id = uuid.uuid4().hex if run_id is None else run_id
        if run_id in self._runs:
            raise ValueError(f"run {run_id!r} is already in flight")
        await self._register(flow)
        actor = await self._acquire_store(store)
        on_finish = functools.partial(self._finished, actor)
        run = Run(run_id, flow, actor.storage, actor.handle, on_finish)
        self._runs[run_id] = run
        self._started += 1
        self._in_flight.value += 1
        try:
            await self._router.enter(run, flow, flow.start_id, dict(params or {}))
        except BaseException:
            run.cancel()
            raise
        return run

    def statistics(self) -> EngineStatistics:
        """A snapshot of the run counters and of every live actor. Never blocks."""
        actors: list[_Actor] = [self._router, *self._node_actors.values(), *self._stores.values()]
        return EngineStatistics(
            runs_started=self._started,
            runs_succeeded=self._counts[RunState.SUCCEEDED],
            runs_failed=self._counts[RunState.FAILED],
            runs_cancelled=self._counts[RunState.CANCELLED],
            runs_in_flight=len(self._runs),
            actors=tuple(
                ActorStatistics(a.name, a.kind, a.messages_processed, a.mailbox_depth, a.in_flight)
                for a in actors
            ),
        )

    def _node_actor(self, flow: Flow, node_id: str) -> NodeActor:
        return self._node_actors[flow, node_id]

    async def _register(self, flow: Flow) -> None:
        """Start a node actor for every node of ``flow`` and of the flows nested in it."""
        if flow in self._registered:
            return
        for node_id, node in flow.nodes.items():
            if isinstance(node, Flow):
                await self._register(node)
            elif (flow, node_id) not in self._node_actors:
                await self._start_node_actor(flow, node_id, node)
        self._registered.add(flow)

    async def _start_node_actor(self, flow: Flow, node_id: str, node: Node) -> None:
        actor = NodeActor(flow, node_id, node, self._router.inbox, self._mailbox_size)
        # Registered before it is ready: a concurrent run's steps wait in its mailbox.
        self._node_actors[flow, node_id] = actor
        await self._nursery.start(self._supervise, actor)

    async def _acquire_store(self, store: Storage | dict[str, Any] | None) -> StoreActor:
        """The store actor for ``store``, started if needed; shared by every run on it.

        Blocks while the actor opens its backend; raises StorageError if it cannot.
        """
        if store is None:
            store = MemoryStorage()
        key = id(store)
        actor = self._stores.get(key)
        while actor is not None and actor.retiring:
            await actor.exited.wait()
            actor = self._stores.get(key)
        if actor is None:
            actor = StoreActor(_as_storage(store), self._mailbox_size)
            self._stores[key] = actor
            await self._nursery.start(self._supervise_store, actor, key)
        else:
            await actor.opened.wait()
            if not actor.serving:
                raise StorageError(f"{actor.name} could not be opened")
        actor.users += 1
        return actor

    async def _supervise_store(
        self,
        actor: StoreActor,
        key: int,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await self._supervise(actor, task_status=task_status)
        finally:
            if self._stores.get(key) is actor:
                del self._stores[key]

    async def _supervise(
        self, actor: _Actor, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run an actor; if it crashes after it started, fail every run in flight."""
        try:
            await actor.run(task_status=task_status)
        except Exception as exc:
            if actor.serving:
                self._crash(actor.name, exc)
            raise

    def _crash(self, name: str, exc: Exception) -> None:
        for run in list(self._runs.values()):
            error = ActorCrashedError(name)
            error.__cause__ = exc
            run.fail(error)

    def _finished(self, store: StoreActor, run: Run) -> None:
        """Called once when ``run`` ends, whatever ended it."""
        del self._runs[run.run_id]
        self._counts[run.state.value] += 1
        self._in_flight.value -= 1
        store.users -= 1
        if store.users == 0:
            store.retire()

    async def _wait_idle(self) -> None:
        await self._in_flight.wait_value(0)

    def _close(self) -> None:
        """Refuse new runs, cancel the ones still in flight, and stop every actor."""
        self._closed = True
        for run in list(self._runs.values()):
            run.cancel()
        self._nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_engine(*, mailbox_size: int = DEFAULT_MAILBOX_SIZE) -> AsyncIterator[Engine]:
    """Open an engine inside the current trio task; close it when the block ends.

    Leaving the block normally waits for every run started in it. An error in the block,
    a crashing actor or a cancelled enclosing scope cancels the runs in flight and stops
    every actor before this returns; errors leave as trio nursery errors do.
    """
    if isinstance(mailbox_size, bool) or not isinstance(mailbox_size, int) or mailbox_size < 1:
        raise ValueError(f"mailbox_size must be an int >= 1, got {mailbox_size!r}")
    async with trio.open_nursery() as nursery:
        engine = Engine(nursery, mailbox_size)
        await nursery.start(engine._supervise, engine._router)
        try:
            yield engine
            await engine._wait_idle()
        finally:
            engine._close()


def _as_storage(store: Storage | dict[str, Any]) -> Storage:
    if isinstance(store, dict):
        return MemoryStorage(store)
    if isinstance(store, Storage):
        return store
    raise TypeError(f"store must be a Storage, a dict or None, got {type(store).__name__}")
