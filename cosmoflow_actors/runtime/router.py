"""The router actor: decides where each run goes after each step.

It receives every step's outcome, resolves conditional actions and route conditions
against the run's store (one ``get_many`` message to the store actor), and forwards the
run to the next node's mailbox, ends it, or fails it. A nested flow is a frame on the
run's frame stack: entering pushes one, reaching its end pops it and routes the inner
flow's final action in the parent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import trio

from cosmoflow_actors.action import Action
from cosmoflow_actors.errors import CosmoFlowError, MaxStepsExceeded, NoRouteError
from cosmoflow_actors.flow import END, Flow, Route, Target
from cosmoflow_actors.runtime.messages import RouterMessage, Step, StepDone, deliver, take
from cosmoflow_actors.runtime.node_actor import NodeActor
from cosmoflow_actors.runtime.run import Frame, Run

NodeLookup = Callable[[Flow, str], NodeActor]


class Router:
    """Forwards runs between node actors."""

    kind = "router"
    name = "router"

    def __init__(self, node_actor: NodeLookup) -> None:
        self._node_actor = node_actor
        # Unbounded on purpose: node actors report with send_nowait so that a node is
        # never blocked by the router while the router waits for room in that node's
        # mailbox (that cycle would deadlock). Its depth is bounded by the runs in
        # flight: a run has at most one outcome outstanding.
        send, receive = trio.open_memory_channel[RouterMessage](math.inf)
        self.inbox = send
        self._receive = receive
        self.serving = False
        self.messages_processed = 0
        self.in_flight = 0

    @property
    def mailbox_depth(self) -> int:
        """Outcomes waiting to be routed."""
        return self.inbox.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Route outcomes until cancelled. Blocks on a full node mailbox (backpressure).

        Yields to the scheduler only when its inbox is empty or it must wait, so it
        routes every outcome that is waiting in one go.
        """
        self.serving = True
        task_status.started()
        while True:
            message = await take(self._receive)
            self.in_flight = 1
            if not message.run.finished:
                await self._handle(message)
            self.in_flight = 0
            self.messages_processed += 1

    async def _handle(self, message: RouterMessage) -> None:
        run = message.run
        if not isinstance(message, StepDone):
            run.fail(message.error)
            return
        try:
            await self._advance(run, message.node_id, message.action)
        except CosmoFlowError as exc:
            run.fail(exc)

    async def _advance(self, run: Run, node_id: str, action: Action) -> None:
        if action.is_conditional:
            action = action.resolve(await _values(run, action.condition_keys()))
        while not action.is_complete:
            frame = run.frames[-1]
            target = await self._target(run, frame, action)
            if target is not END:
                await self.enter(run, frame.flow, target, action.params)
                return
            if len(run.frames) == 1:
                run.succeed(action, node_id, None)
                return
            run.frames.pop()
        run.succeed(action, node_id, action.result)

    async def _target(self, run: Run, frame: Frame, action: Action) -> Target:
        """The target of the first route out of the frame's node that accepts ``action``."""
        flow = frame.flow
        if not flow.has_routes(frame.node_id):
            return END
        routes = flow.routes_for(frame.node_id, action.name)
        values = await _values(run, _condition_keys(routes))
        for route in routes:
            if route.when is None or route.when.evaluate(values):
                return route.target
        raise NoRouteError(frame.node_id, action.name, flow.actions_from(frame.node_id))

    async def enter(self, run: Run, flow: Flow, node_id: str, params: Mapping[str, Any]) -> None:
        """Send ``run`` to ``node_id`` of ``flow``, descending into nested flows.

        Blocks while the node's mailbox is full. Raises MaxStepsExceeded when the step
        would exceed a flow's ``max_steps``.
        """
        if not run.frames:
            run.frames.append(Frame(flow, node_id))
        frame = run.frames[-1]
        frame.node_id = node_id
        node = flow.nodes[node_id]
        while isinstance(node, Flow):
            frame = Frame(node, node.start_id)
            run.frames.append(frame)
            node = node.nodes[node.start_id]
        for outer in run.frames:
            outer.steps += 1
            if outer.steps > outer.flow.max_steps:
                raise MaxStepsExceeded(outer.flow.max_steps, run.path)
        await deliver(self._node_actor(frame.flow, frame.node_id).mailbox, Step(run, params))


def _condition_keys(routes: tuple[Route, ...]) -> frozenset[str]:
    keys: frozenset[str] = frozenset()
    for route in routes:
        if route.when is not None:
            keys |= route.when.keys
    return keys


async def _values(run: Run, keys: frozenset[str]) -> dict[str, Any]:
    """The store values a condition reads: one message to the store actor, or none."""
    if not keys:
        return {}
    return await run.store.get_many(keys)
