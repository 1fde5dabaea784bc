"""The router actor: decides where each branch of each run goes after each step.

It receives every step's outcome, resolves conditional actions and route conditions
against the run's store (one ``get_many`` message to the store actor), and forwards the
branch to the next node's mailbox, forks it, gathers it at a join, ends it, or fails the
run. A nested flow is a frame on the branch's frame stack: entering pushes one, reaching
its end pops it and routes the inner flow's final action in the parent.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import trio

from cosmoflow_actors.action import Action
from cosmoflow_actors.errors import (
    CosmoFlowError,
    MaxStepsExceeded,
    NoRouteError,
    RunConflictError,
    StorageError,
)
from cosmoflow_actors.flow import END, Flow, Route, Target
from cosmoflow_actors.runtime import durability
from cosmoflow_actors.runtime.messages import RouterMessage, Step, StepDone, StepFailed
from cosmoflow_actors.runtime.node_actor import NodeActor
from cosmoflow_actors.runtime.run import Branch, Fork, Frame, Run

NodeLookup = Callable[[Flow, str], NodeActor]


class Router:
    """Forwards runs between node actors."""

    kind = "router"
    name = "router"
    mailbox_size = math.inf
    max_concurrency = 1
    rate = None

    def __init__(self, node_actor: NodeLookup) -> None:
        self._node_actor = node_actor
        # Unbounded on purpose: node actors report with send_nowait so that a node is
        # never blocked by the router while the router waits for room in that node's
        # mailbox (that cycle would deadlock). Its depth is bounded by the steps in
        # flight: a branch has at most one outcome outstanding.
        send, receive = trio.open_memory_channel[RouterMessage](math.inf)
        self.inbox = send
        self._receive = receive
        self._deliveries: trio.Nursery | None = None
        self.serving = False
        self.messages_processed = 0
        self.in_flight = 0
        """Steps held back in delivery tasks, waiting for room in a full mailbox."""

    @property
    def mailbox_depth(self) -> int:
        """Outcomes waiting to be routed."""
        return self.inbox.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Route outcomes until cancelled.

        Yields to the scheduler only when its inbox is empty or it waits for the store,
        so it routes every outcome that is waiting in one go. A step for a full mailbox
        waits in a task of its own (see :meth:`_forward`), never in the router.
        """
        async with trio.open_nursery() as deliveries:
            self._deliveries = deliveries
            self.serving = True
            task_status.started()
            receive = self._receive
            while True:
                try:
                    message = receive.receive_nowait()
                except trio.WouldBlock:
                    message = await receive.receive()
                run = message.run
                if run.finished:
                    pass
                elif isinstance(message, StepFailed):
                    await self._fail(run, message.error)
                else:
                    try:
                        if isinstance(message, StepDone):
                            await self._advance(
                                run, message.branch, message.node_id, message.action
                            )
                        else:
                            await self._end_frame(
                                run, message.branch, message.node_id, message.action
                            )
                    except CosmoFlowError as exc:
                        await self._fail(run, exc)
                self.messages_processed += 1

    async def _succeed(self, run: Run, action: Action, node_id: str, value: Any) -> None:
        """End the run; a durable one records its result first (then ``wait`` sees it)."""
        result = run.result_of(action, node_id, value)
        durable = run.durable
        if durable is None:
            run.succeed(result)
            return
        # Under the lock, after a step commit of another branch still in flight: the
        # record is built on the last one committed, never over it.
        async with durable.lock:
            record = durability.succeeded(durable.record, result)
            await run.store.put_record(durability.record_key(run.run_id), record)
            run.succeed(result)

    async def _fail(self, run: Run, error: BaseException) -> None:
        """Fail the run; a durable one records the failure (best effort) first, unless
        another engine has taken the run over (RunConflictError): the record is its."""
        durable = run.durable
        if durable is None or run.finished or isinstance(error, RunConflictError):
            run.fail(error)
            return
        async with durable.lock:  # as in _succeed
            record = durability.failed(durable.record, error)
            with contextlib.suppress(StorageError):
                await run.store.put_record(durability.record_key(run.run_id), record)
            run.fail(error)

    async def _advance(self, run: Run, branch: Branch, node_id: str, action: Action) -> None:
        """Move ``branch`` on from the step at ``node_id`` that returned ``action``."""
        if action.is_conditional:
            action = action.resolve(await _values(run, action.condition_keys()))
        if action.is_complete:
            await self._succeed(run, action, node_id, action.result)
            return
        frame = branch.frames[-1]
        routes = _routes(frame, action)
        keys = _condition_keys(routes)
        values = await run.store.get_many(keys) if keys else _NO_VALUES
        target = _target(frame, action, routes, values)
        if target is END:
            await self._end_frame(run, branch, node_id, action)
        elif isinstance(target, tuple):
            self._fork(run, branch, target, action.params)
        elif self._joins_here(branch, frame.flow, target):
            assert branch.fork is not None
            durability.left(run, branch)
            self._arrive(run, branch.fork, target, action.params)
        else:
            self.enter(run, branch, target, action.params)

    async def _end_frame(self, run: Run, branch: Branch, node_id: str, action: Action) -> None:
        """The branch reached the end of its innermost flow."""
        fork = branch.fork
        if fork is not None and len(branch.frames) == fork.depth:
            durability.left(run, branch)
            await self._settle(run, fork, node_id, action)
        elif len(branch.frames) > 1:
            branch.frames.pop()
            await self._advance(run, branch, node_id, action)
        else:
            await self._succeed(run, action, node_id, None)

    def _fork(
        self, run: Run, branch: Branch, targets: tuple[str, ...], params: Mapping[str, Any]
    ) -> None:
        fork = Fork(parent=branch, depth=len(branch.frames), pending=len(targets))
        durability.left(run, branch)
        children = [branch.child(fork, index) for index in range(len(targets))]
        # Counted so that a second fork before the branch's next step labels its
        # branches apart from this one's.
        branch.count += 1
        flow = branch.frames[-1].flow
        for target, child in zip(targets, children, strict=True):
            if target in flow.joins:
                self._arrive(run, fork, target, params)
            else:
                self.enter(run, child, target, params)

    def _joins_here(self, branch: Branch, flow: Flow, target: str) -> bool:
        fork = branch.fork
        return fork is not None and target in flow.joins and len(branch.frames) == fork.depth

    def _arrive(self, run: Run, fork: Fork, join_id: str, params: Mapping[str, Any]) -> None:
        """A branch of ``fork`` reached the join node: it waits there for the others."""
        if fork.join_id not in (None, join_id):
            raise CosmoFlowError(
                f"branches of one fan-out reached two joins, {fork.join_id!r} and {join_id!r}"
            )
        fork.join_id = join_id
        fork.params.update(params)
        fork.pending -= 1
        if not fork.pending:
            self.enter(run, fork.parent, join_id, fork.params)

    async def _settle(self, run: Run, fork: Fork, node_id: str, action: Action) -> None:
        """A branch of ``fork`` ended without reaching a join; when all branches are
        done, the parent goes on at the join, or ends as this branch did."""
        fork.pending -= 1
        if fork.pending:
            return
        if fork.join_id is not None:
            self.enter(run, fork.parent, fork.join_id, fork.params)
            return
        durability.ended(run, fork.parent, node_id, action)
        await self._end_frame(run, fork.parent, node_id, action)

    def enter(self, run: Run, branch: Branch, node_id: str, params: Mapping[str, Any]) -> None:
        """Send ``branch`` to ``node_id`` of its current flow, descending into nested flows.

        Never blocks the router: a step for a full mailbox waits in a task of its own.
        Raises MaxStepsExceeded when the step would exceed a flow's ``max_steps``.
        """
        actor = self.prepare(run, branch, node_id)
        durability.entered(run, branch, params)
        step = Step(run, branch, params)
        try:
            actor.mailbox.send_nowait(step)
        except trio.WouldBlock:
            assert self._deliveries is not None
            self._deliveries.start_soon(self._forward, actor.mailbox, step)

    async def _forward(self, mailbox: trio.MemorySendChannel[Step], step: Step) -> None:
        """Wait for room in a full mailbox. One such task per step held back by a slow
        node: their number is bounded by the runs in flight (see ``max_runs``).
        """
        self.in_flight += 1
        try:
            await mailbox.send(step)
        finally:
            self.in_flight -= 1

    def entry(self, flow: Flow) -> NodeActor:
        """The node actor where runs of ``flow`` start (inside nested start flows)."""
        node = flow.nodes[flow.start_id]
        while isinstance(node, Flow):
            flow = node
            node = flow.nodes[flow.start_id]
        return self._node_actor(flow, flow.start_id)

    def prepare(self, run: Run, branch: Branch, node_id: str) -> NodeActor:
        """Move ``branch`` to ``node_id`` and count the step; return the actor to send to.

        Raises MaxStepsExceeded when the step would exceed a flow's ``max_steps``.
        """
        frame = branch.frames[-1]
        frame.node_id = node_id
        node = frame.flow.nodes[node_id]
        while isinstance(node, Flow):
            frame = Frame(node, node.start_id)
            branch.frames.append(frame)
            node = node.nodes[node.start_id]
        run.steps += 1
        branch.count += 1
        if run.steps > run.flow.max_steps:
            raise MaxStepsExceeded(run.flow.max_steps, run.path)
        for inner in branch.frames[1:]:
            inner.steps += 1
            if inner.steps > inner.flow.max_steps:
                raise MaxStepsExceeded(inner.flow.max_steps, run.path)
        return self._node_actor(frame.flow, frame.node_id)


def _routes(frame: Frame, action: Action) -> tuple[Route, ...] | None:
    """The routes out of the frame's node for ``action``; None when it has no routes
    at all (the frame's flow ends there)."""
    flow = frame.flow
    if not flow.has_routes(frame.node_id):
        return None
    return flow.routes_for(frame.node_id, action.name)


def _target(
    frame: Frame, action: Action, routes: tuple[Route, ...] | None, values: Mapping[str, Any]
) -> Target:
    """The target of the first of ``routes`` that accepts ``action``, given the store
    ``values`` their conditions read; END for a node without routes."""
    if routes is None:
        return END
    for route in routes:
        if route.when is None or route.when.evaluate(values):
            return route.target
    flow = frame.flow
    raise NoRouteError(frame.node_id, action.name, flow.actions_from(frame.node_id))


def _condition_keys(routes: tuple[Route, ...] | None) -> frozenset[str]:
    keys: frozenset[str] = frozenset()
    for route in routes or ():
        if route.when is not None:
            keys |= route.when.keys
    return keys


_NO_VALUES: Mapping[str, Any] = MappingProxyType({})


async def _values(run: Run, keys: frozenset[str]) -> Mapping[str, Any]:
    """The store values a condition reads: one message to the store actor, or none."""
    if not keys:
        return _NO_VALUES
    return await run.store.get_many(keys)
