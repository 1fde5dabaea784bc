"""The engine's flows: the node actors of every flow it runs, the router between them,
and the executors their nodes need.

A flow is registered when it is first run: a node actor is started for each of its nodes
and of the nodes of the flows nested in it, in the engine's nursery, and the router
learns its routes. The worker processes of "process" nodes and the connection to Ray of
"ray" nodes are set up once, when the first flow that needs them is registered (or
set up, as a worker does for the flows it serves before it claims a run). A flow
that becomes garbage has its node actors retired; a flow's registration is kept only as
long as something else holds the flow.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

import trio
import trio_parallel

from cosmoflow_actors.errors import RunCancelledError
from cosmoflow_actors.events import EventHub
from cosmoflow_actors.flow import Flow, check_settings, flows_within
from cosmoflow_actors.node import Node
from cosmoflow_actors.runtime import ray_executor
from cosmoflow_actors.runtime.cancellation import refuse_closed
from cosmoflow_actors.runtime.node_actor import NodeActor, RunChild
from cosmoflow_actors.runtime.router import Router, condition_keys
from cosmoflow_actors.runtime.statistics import FlowLabels

RAY_SHUTDOWN_TIMEOUT: Final = 30.0
"""Seconds a closing engine waits for a Ray it started to shut down."""
WORKER_GRACE_PERIOD: Final = 2.0
"""Seconds a closing engine gives its worker processes to exit once it has told them
to. An idle worker exits in milliseconds; one still alive after this (an exec left a
non-daemon thread running in it, and the interpreter waits for that thread) is killed
with SIGKILL."""

Supervise = Callable[[NodeActor], Awaitable[None]]
"""The engine's supervisor of a node actor: ``await supervise(actor)``."""


@dataclass(frozen=True, slots=True)
class Registration:
    """What the engine keeps of a registered flow: its node actors by node id, the
    store keys its route conditions read, and the finalizer that retires the actors
    once the flow is garbage."""

    actors: dict[str, NodeActor]
    condition_keys: frozenset[str]
    retirement: weakref.finalize[[list[NodeActor]], Flow]


class FlowRegistry:
    """Registers flows, starting their node actors in the engine's nursery, and retires
    the actors of a flow that is garbage.

    :meth:`close` stops it watching the flows registered (the engine, closed, registers
    none after that).
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        mailbox_size: int,
        supervise: Supervise,
        run_child: RunChild,
        events: EventHub,
        ray_address: str | None,
    ) -> None:
        self._nursery = nursery
        self._mailbox_size = mailbox_size
        self._supervise = supervise
        self._run_child = run_child
        self._events = events
        self._ray_address = ray_address
        self.router = Router(self.actor, mailbox_size)
        """The router between the node actors of the flows registered."""
        self._labels = FlowLabels()
        self._flows: weakref.WeakKeyDictionary[Flow, Registration] = weakref.WeakKeyDictionary()
        """The flows registered (and the flows nested in them), as long as something
        else holds them."""
        self._token = trio.lowlevel.current_trio_token()
        self._context = contextvars.copy_context()
        """The context variables where the engine was opened, which its node actors'
        workers start with."""
        self._workers: trio_parallel.WorkerContext | None = None
        self._workers_starting = trio.Lock()
        self._ray_connected = False
        self._ray_connecting = trio.Lock()
        self._closed = False

    def actor(self, flow: Flow, node_id: str) -> NodeActor:
        """The node actor of ``node_id`` in ``flow`` (registered). Never blocks."""
        return self._flows[flow].actors[node_id]

    def actors(self) -> Iterable[NodeActor]:
        """The node actors of every flow registered now. Never blocks."""
        return [
            actor
            for registration in list(self._flows.values())
            for actor in registration.actors.values()
        ]

    async def register(self, flow: Flow) -> Registration:
        """Start a node actor for every node of ``flow`` and of the flows nested in it
        (see :meth:`register_nowait`), after setting up the worker processes or Ray the
        flow needs, if not done yet; return the flow's registration once its entry
        node's actor has begun (so that the first run finds it idle, as the next ones
        do). Blocks only for a flow new to the engine; RunCancelledError if the
        registry closed meanwhile.

        The actors start in the engine's nursery, all at once, whatever becomes of the
        caller: one started by ``nursery.start`` for a caller cancelled meanwhile would
        stay in the caller's cancelled scope and stop at once.
        """
        known = self._flows.get(flow)
        if known is not None:
            return known
        await self.set_up(flow)
        if self._closed:
            await refuse_closed(self._closed_meanwhile_error())
        registration = self.register_nowait(flow)
        await self.router.entry(flow).began.wait()
        return registration

    async def set_up(self, flow: Flow) -> None:
        """Set up the worker processes or the Ray connection that ``flow`` (or a flow
        nested in it) needs, unless done already. Blocks while they start (seconds), or
        until an unreachable Ray ``host:port`` or ``ray://host:port`` is given up on
        (ConnectionError naming it); RunCancelledError if the registry closed meanwhile."""
        if self._needs_workers(flow):
            await self._start_workers()
        if self._needs_ray(flow):
            await self._connect_ray()

    def register_nowait(self, flow: Flow) -> Registration:
        """Start a node actor for every node of ``flow`` and of the flows nested in it
        (``start_soon`` in the engine's nursery), without waiting, and return the
        flow's registration: a node actor needs no set-up, and steps sent before it
        runs wait in its mailbox. Raises trio.WouldBlock when the flow needs worker
        processes or Ray that are not set up yet (a flow registered before had them
        set up then). All or nothing: when registering one of the flows raises (a route
        condition's keys that break after ``build()``), none of them is registered.
        Never blocks."""
        known = self._flows.get(flow)
        if known is not None:
            return known
        if self._needs_workers(flow):
            raise trio.WouldBlock("the flow's worker processes are not set up yet")
        if self._needs_ray(flow):
            raise trio.WouldBlock("the engine is not connected to Ray yet")
        made: dict[Flow, Registration] = {}
        try:
            self._record(flow, made)
            for registered in made:
                self.router.learn(registered)
        except BaseException:
            self._unrecord(made)
            raise
        for registration in made.values():
            for actor in registration.actors.values():
                self._nursery.start_soon(self._supervise, actor)
        return made[flow]

    def close(self) -> None:
        """Register no more flows, and stop watching the registered ones: one that
        becomes garbage later, even outside the trio run, needs nothing of the engine.
        Never blocks."""
        self._closed = True
        for registration in list(self._flows.values()):
            registration.retirement.detach()

    async def disconnect_ray(self) -> None:
        """Let go of the Ray connection, if any, once no node actor runs. Blocks while a
        Ray the engine started or joined shuts down (shielded, for at most
        ``RAY_SHUTDOWN_TIMEOUT`` seconds; the keeper's thread finishes it after that)."""
        if self._ray_connected:
            self._ray_connected = False
            with trio.move_on_after(RAY_SHUTDOWN_TIMEOUT, shield=True):
                await ray_executor.disconnect()

    def _record(self, flow: Flow, made: dict[Flow, Registration]) -> None:
        """Make the node actors of ``flow`` and of the flows nested in it that are not
        registered yet (a flow nested in two flows is registered with the first), and
        record each flow's registration, also in ``made``. Never blocks."""
        if flow in self._flows:
            return
        check_settings(flow)
        keys = condition_keys(flow)
        actors: dict[str, NodeActor] = {}
        for node_id, node in flow.nodes.items():
            if isinstance(node, Flow):
                self._record(node, made)
            else:
                actors[node_id] = self._new_actor(flow, node_id, node)
        retirement = weakref.finalize(flow, self._retire_soon, list(actors.values()))
        retirement.atexit = False  # at interpreter exit there is no engine left to tell
        made[flow] = self._flows[flow] = Registration(actors, keys, retirement)

    def _unrecord(self, made: dict[Flow, Registration]) -> None:
        """Forget the registrations ``made`` (their actors never started) and the
        labels of their flows. Never blocks."""
        for flow, registration in made.items():
            registration.retirement.detach()
            del self._flows[flow]
            self._labels.drop(flow)

    def _new_actor(self, flow: Flow, node_id: str, node: Node) -> NodeActor:
        return NodeActor(
            f"{self._labels.label(flow)}/{node_id}",
            flow,
            node_id,
            node,
            self.router,
            self._mailbox_size,
            self._workers,
            self._run_child,
            self._events,
            self._context,
        )

    def _retire_soon(self, actors: list[NodeActor]) -> None:
        """Called once the flow of ``actors`` is garbage (no run of it can be in
        flight: each holds its flow): retire them in the engine's next scheduler pass.
        Safe wherever the garbage collector runs, in any thread. Never blocks."""
        self._token.run_sync_soon(_retire, actors)

    def _needs_workers(self, flow: Flow) -> bool:
        """Whether ``flow`` has "process" nodes and the worker processes are not set
        up yet."""
        return self._workers is None and uses_executor(flow)

    def _needs_ray(self, flow: Flow) -> bool:
        """Whether ``flow`` has "ray" nodes and the engine is not connected to Ray yet."""
        return not self._ray_connected and uses_executor(flow, "ray")

    @staticmethod
    def _closed_meanwhile_error() -> RunCancelledError:
        """The refusal of a registration that waited for the flow's executors while the
        registry closed (the engine with it); trio.Cancelled instead to a caller whose
        scope is cancelled (see :func:`~.cancellation.refuse_closed`)."""
        return RunCancelledError("the engine closed while the run's flow was set up")

    async def _start_workers(self) -> None:
        """Set up the worker processes of "process" nodes, once (blocks while they
        start); RunCancelledError if the registry has closed meanwhile."""
        async with self._workers_starting:
            if self._closed:
                await refuse_closed(self._closed_meanwhile_error())
            if self._workers is None:
                self._workers = await self._nursery.start(self._hold_workers)

    async def _hold_workers(
        self, *, task_status: trio.TaskStatus[trio_parallel.WorkerContext]
    ) -> None:
        """Keep the worker processes of "process" nodes open as long as the engine.
        When the engine closes, blocks (shielded, in a thread) while the workers exit:
        at most :data:`WORKER_GRACE_PERIOD` seconds, then the ones left are killed.

        How a worker ended is not an error of the engine's: the runs' outcomes say what
        went wrong. trio-parallel raises BrokenWorkerError at the close for a worker
        that exited nonzero (one killed while idle, say) or had to be killed; it is
        dropped here.
        """
        with contextlib.suppress(trio_parallel.BrokenWorkerError):
            async with trio_parallel.open_worker_context(
                grace_period=WORKER_GRACE_PERIOD
            ) as workers:
                task_status.started(workers)
                await trio.sleep_forever()

    async def _connect_ray(self) -> None:
        """Connect to Ray for "ray" nodes, once; :meth:`disconnect_ray` lets go of it
        when the engine has closed. Blocks while Ray starts or is joined (seconds), or
        until an unreachable ``host:port`` or ``ray://host:port`` is given up on
        (ConnectionError naming it); cancellable. RunCancelledError if the registry has
        closed meanwhile."""
        async with self._ray_connecting:
            if self._closed:
                await refuse_closed(self._closed_meanwhile_error())
            if not self._ray_connected:
                await ray_executor.connect(self._ray_address)
                self._ray_connected = True


def _retire(actors: list[NodeActor]) -> None:
    """Retire ``actors`` (see :meth:`NodeActor.retire`). Never blocks."""
    for actor in actors:
        actor.retire()


def uses_executor(flow: Flow, executor: str = "process") -> bool:
    """Whether ``flow`` or a flow nested in it has a node with ``executor`` (by default
    "process", which needs the engine's worker processes)."""
    return any(
        isinstance(node, Node) and node.executor == executor
        for each in flows_within(flow)
        for node in each.nodes.values()
    )
