"""The router actor: decides where each branch of each run goes after each step.

It receives every step's outcome and forwards the branch: to the next node, into a
fan-out, to a join, to the end of a nested flow, or to the end of the run. Routing
reads nothing itself: the step's sender hands it the store values that the run's
conditions read (see :func:`condition_keys`), so a decision never waits and is
always made in the sender's task (direct dispatch). The router only decides a run's
end: the task that routed the outcome ends the run (for a durable run, writing its
record under the run's lock), so no store is waited for while routing.

A nested flow is a frame on the branch's frame stack: entering pushes one, reaching
its end pops it and routes the inner flow's final action in the parent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import trio

from cosmoflow_actors.action import Action, ActionCondition, checked_keys, holds
from cosmoflow_actors.errors import (
    ConditionError,
    CosmoFlowError,
    MaxStepsExceeded,
    NoRouteError,
)
from cosmoflow_actors.flow import END, Flow, FlowResult, Route, Target, flows_within
from cosmoflow_actors.runtime.actor import Actor
from cosmoflow_actors.runtime.durability import DurableRun
from cosmoflow_actors.runtime.messages import (
    Outcome,
    Step,
    StepDone,
    StepFailed,
)
from cosmoflow_actors.runtime.node_actor import NodeActor
from cosmoflow_actors.runtime.run import ActiveRun, Branch, Fork, Frame

NodeLookup = Callable[[Flow, str], NodeActor]

Decision = list[Step] | FlowResult | BaseException
"""What routing an outcome decides: the steps it leads to, or the run's end (its
result or its error)."""


class Router(Actor[Outcome]):
    """Forwards runs between node actors; one per engine.

    Its handler never waits, so every outcome is handled in the task that sends it, at
    once (direct dispatch, :meth:`decide`): the router has no task of its own, and its
    mailbox stays empty.
    """

    kind = "router"

    def __init__(self, node_actor: NodeLookup, mailbox_size: int) -> None:
        super().__init__("router", mailbox_size, 1)
        self._node_actor = node_actor
        self.carriers: dict[trio.lowlevel.Task, frozenset[trio.Nursery]] = {}
        """The tasks carrying steps of this engine's runs now: its node actors' workers,
        and each caller of ``engine.run`` while it carries its run; each with the
        nurseries it had open before it began (what runs in those is not its steps'
        work)."""

    def learn(self, flow: Flow) -> None:
        """Give the node actors of ``flow`` (they exist) their plain hops: each action
        of a node (not a nested flow) that has one route, unconditional, to a node of
        ``flow`` that is neither a join nor a nested flow (see :meth:`_plain_hop`); and
        what routing their steps reads: the keys of their routes' conditions, and
        whether a step may end ``flow`` (routing may then go on in the flows around
        it). Never blocks."""
        for (source, action), routes in flow.route_table().items():
            target = _plain_target(routes)
            if isinstance(flow.nodes[source], Flow) or target is None:
                continue
            if _plain_node(flow, target):
                hops = self._node_actor(flow, source).hops
                hops[action] = self._node_actor(flow, target)
        routes_from = _routes_by_source(flow)
        for node_id, node in flow.nodes.items():
            if not isinstance(node, Flow):
                out = routes_from.get(node_id, [])
                actor = self._node_actor(flow, node_id)
                actor.route_keys = _when_keys(out)
                actor.may_end_flow = not out or any(route.target is END for route in out)

    async def route(self, outcome: Outcome) -> list[Step]:
        """Route ``outcome`` and return the steps it leads to, to send each to its
        actor; when :meth:`decide` ends the run, end it here and return none. Blocks
        only while a durable run's end is recorded (the router is free meanwhile)."""
        decision = self.decide(outcome)
        if isinstance(decision, list):
            return decision
        await outcome.run.durability.end(outcome.run, decision)
        return []

    def decide(self, outcome: Outcome) -> Decision:
        """The router's handler, run in the caller's task: the steps ``outcome`` leads
        to, the run's result, or its error. Never blocks.

        A result or an error settles the run (``settled``): ending it is the caller's
        business (:meth:`route`), and the run's later outcomes lead nowhere.
        Invariant: a decision never waits, so no other outcome can be handled while it
        is made (the router's serial order) and no slot need be taken.
        """
        self.messages_processed += 1
        run = outcome.run
        if run.settled:
            return []
        decision = self._decision(run, outcome)
        if not isinstance(decision, list):
            run.settled = True
        return decision

    def _decision(self, run: ActiveRun, outcome: Outcome) -> Decision:
        """:meth:`decide`, for a run whose end is not decided yet.

        A decision that fails leaves a durable run's branches, forks and durability as
        they were: the branches of the run still in flight may commit a step before
        the failure is recorded, and their record must say where every branch is.
        """
        if isinstance(outcome, StepFailed):
            return outcome.error
        undo = _RoutingUndo(run, outcome.branch) if run.durability.durable else None
        try:
            if isinstance(outcome, StepDone):
                hop = self._plain_hop(outcome)
                if hop is not None:
                    return [hop]
            decision = _Routing(self._node_actor, run)
            decision.follow(outcome)
        except CosmoFlowError as exc:
            if undo is not None:
                undo.restore()
            return exc
        except LookupError as exc:
            if undo is not None:
                undo.restore()
            return _lookup_failed(run, outcome, exc)
        return decision.result if decision.result is not None else decision.steps

    def _plain_hop(self, outcome: StepDone) -> Step | None:
        """The next step when ``outcome`` takes a plain hop (see :meth:`learn`) in the
        branch's innermost flow; else None. Raises MaxStepsExceeded as :func:`enter`
        does.

        Invariant: for a plain hop :class:`_Routing` would find the one route, take
        it (no condition, no join, no nested flow to enter or leave) and :func:`enter`
        the node; this moves the branch there and counts the step the same way.
        """
        action = outcome.action
        if action.is_complete:
            return None
        actor = outcome.actor.hops.get(action.name)
        if actor is None:
            return None
        branch = outcome.branch
        branch.frames[-1].node_id = actor.node_id
        return counted_step(outcome.run, branch, action.params, actor)

    def entry(self, flow: Flow) -> NodeActor:
        """The node actor where runs of ``flow`` start (inside nested start flows)."""
        node = flow.nodes[flow.start_id]
        while isinstance(node, Flow):
            flow = node
            node = flow.nodes[flow.start_id]
        return self._node_actor(flow, flow.start_id)

    def first_step(self, run: ActiveRun, params: Mapping[str, Any]) -> Step:
        """The step a new run starts with. Raises MaxStepsExceeded as :func:`enter` does."""
        return enter(self._node_actor, run, run.main, run.flow.start_id, params)


def _lookup_failed(run: ActiveRun, outcome: StepDone, error: LookupError) -> CosmoFlowError:
    """The error of ``run``, whose routing of ``outcome`` looked up a node, a frame or a
    fork that is not there (a KeyError or an IndexError): a bug of the engine's, or a
    run whose state does not fit its flow, which fails that run alone, with ``error``
    as the cause, rather than the engine."""
    failure = CosmoFlowError(
        f"run {run.run_id!r}: routing the outcome of node {outcome.node_id!r} failed "
        f"with {type(error).__name__}: {error} (a bug of the engine's, or a run whose "
        "state does not fit its flow); this run fails, the engine's other runs go on"
    )
    failure.__cause__ = error
    return failure


class _RoutingUndo:
    """What a routing decision of a durable run may change, saved to be put back if
    the decision fails: the run's step count, its branches in flight, and the branch
    routed with its fork, that fork's parent, its fork and so on up (their frames,
    step counts, resume points, and the forks' counts, joins and arrivals)."""

    def __init__(self, run: ActiveRun, branch: Branch) -> None:
        self.run = run
        self.steps = run.steps
        durability = run.durability
        assert isinstance(durability, DurableRun)
        self.places = durability.places
        self.places.mark()
        self.saved: list[tuple[Branch, list[Frame], list[tuple[str, int]], int, Any]] = []
        self.forks: list[tuple[Fork, int, str | None, int]] = []
        current: Branch | None = branch
        while current is not None:
            frames = list(current.frames)
            positions = [(frame.node_id, frame.steps) for frame in frames]
            self.saved.append((current, frames, positions, current.count, current.resume_at))
            fork = current.fork
            if fork is not None:
                self.forks.append((fork, fork.pending, fork.join_id, len(fork.arrivals)))
            current = None if fork is None else fork.parent

    def restore(self) -> None:
        """Put back everything saved. Never blocks."""
        self.run.steps = self.steps
        self.places.undo()
        for branch, frames, positions, count, resume_at in self.saved:
            branch.frames[:] = frames
            for frame, (node_id, steps) in zip(frames, positions, strict=True):
                frame.node_id = node_id
                frame.steps = steps
            branch.count = count
            branch.resume_at = resume_at
        for fork, pending, join_id, arrivals in self.forks:
            fork.pending = pending
            fork.join_id = join_id
            del fork.arrivals[arrivals:]


class _Routing:
    """The walk that makes one routing decision: the steps it sends and, if the run
    ends, its result."""

    def __init__(self, node_actor: NodeLookup, run: ActiveRun) -> None:
        self._node_actor = node_actor
        self.run = run
        self.steps: list[Step] = []
        self.result: FlowResult | None = None

    def follow(self, outcome: StepDone) -> None:
        """Move the outcome's branch on from its step."""
        self.advance(outcome.branch, outcome.node_id, outcome.action, outcome.values)

    def advance(
        self, branch: Branch, node_id: str, action: Action, values: Mapping[str, Any]
    ) -> None:
        """Move ``branch`` on from the step at ``node_id`` that returned ``action``."""
        run = self.run
        if action.is_complete:
            self.result = run.result_of(action, node_id, action.result)
            return
        frame = branch.frames[-1]
        target = _target(frame, node_id, action, values)
        if target is END:
            self.end_frame(branch, node_id, action, values)
        elif isinstance(target, tuple):
            self._fork(branch, target, action.params)
        elif _joins_here(branch, frame.flow, target):
            assert branch.fork is not None
            run.durability.left(branch)
            self._arrive(branch.fork, target, action.params)
        else:
            self._enter(branch, target, action.params)

    def end_frame(
        self, branch: Branch, node_id: str, action: Action, values: Mapping[str, Any]
    ) -> None:
        """The branch reached the end of its innermost flow."""
        fork = branch.fork
        if fork is not None and len(branch.frames) == fork.depth:
            self.run.durability.left(branch)
            self._settle(fork, node_id, action, values)
        elif len(branch.frames) > 1:
            branch.frames.pop()
            self.advance(branch, node_id, action, values)
        else:
            self.result = self.run.result_of(action, node_id, None)

    def _enter(self, branch: Branch, node_id: str, params: Mapping[str, Any]) -> None:
        self.steps.append(enter(self._node_actor, self.run, branch, node_id, params))

    def _fork(self, branch: Branch, targets: tuple[str, ...], params: Mapping[str, Any]) -> None:
        fork = Fork(parent=branch, depth=len(branch.frames), pending=len(targets))
        self.run.durability.left(branch)
        children = [branch.child(fork, index) for index in range(len(targets))]
        # Counted so that a second fork before the branch's next step labels its
        # branches apart from this one's.
        branch.count += 1
        flow = branch.frames[-1].flow
        for target, child in zip(targets, children, strict=True):
            if target in flow.joins:
                self._arrive(fork, target, params)
            else:
                self._enter(child, target, params)

    def _arrive(self, fork: Fork, join_id: str, params: Mapping[str, Any]) -> None:
        """A branch of ``fork`` reached the join node: it waits there for the others."""
        if fork.join_id not in (None, join_id):
            origin = fork.parent.frames[-1]
            raise CosmoFlowError(
                f"flow {origin.flow.name!r}: branches of the fan-out at node "
                f"{origin.node_id!r} reached two joins, {fork.join_id!r} and {join_id!r}; "
                "give each fan-out one join"
            )
        fork.join_id = join_id
        if params:
            fork.arrivals.append(params)
            self.run.durability.arrived(fork)
        fork.pending -= 1
        if not fork.pending:
            self._enter(fork.parent, join_id, MappingProxyType(fork.params()))

    def _settle(self, fork: Fork, node_id: str, action: Action, values: Mapping[str, Any]) -> None:
        """A branch of ``fork`` ended without reaching a join; when all branches are
        done, the parent goes on at the join, or ends as this branch did."""
        fork.pending -= 1
        if fork.pending:
            return
        if fork.join_id is not None:
            self._enter(fork.parent, fork.join_id, MappingProxyType(fork.params()))
            return
        self.end_frame(fork.parent, node_id, action, values)


def enter(
    node_actor: NodeLookup, run: ActiveRun, branch: Branch, node_id: str, params: Mapping[str, Any]
) -> Step:
    """Move ``branch`` to ``node_id`` of its current flow (descending into nested flows)
    and count the step; return the step to send.

    Raises MaxStepsExceeded when the step would exceed a flow's ``max_steps``.
    """
    frame = branch.frames[-1]
    frame.node_id = node_id
    node = frame.flow.nodes[node_id]
    while isinstance(node, Flow):
        frame = Frame(node, node.start_id)
        branch.frames.append(frame)
        node = node.nodes[node.start_id]
    return counted_step(run, branch, params, node_actor(frame.flow, frame.node_id))


def counted_step(
    run: ActiveRun, branch: Branch, params: Mapping[str, Any], actor: NodeActor
) -> Step:
    """Count the step of ``branch``, which is at ``actor``'s node, and return it.

    Raises MaxStepsExceeded when the step would exceed a flow's ``max_steps``.
    """
    run.steps += 1
    branch.count += 1
    if run.steps > run.flow.max_steps:
        raise MaxStepsExceeded(run.flow.max_steps, run.path, run.flow.name)
    for inner in branch.frames[1:]:
        inner.steps += 1
        if inner.steps > inner.flow.max_steps:
            raise MaxStepsExceeded(inner.flow.max_steps, run.path, inner.flow.name)
    run.durability.entered(branch, params)
    return Step(run, branch, params, actor)


def condition_keys(flow: Flow) -> frozenset[str]:
    """Every store key a route condition of ``flow`` or of a flow nested in it reads:
    what a step's sender reads for the router (one request, and none for a flow
    without conditions)."""
    keys: frozenset[str] = frozenset()
    for each in flows_within(flow):
        keys |= _when_keys(each.routes)
    return keys


def _routes_by_source(flow: Flow) -> dict[str, list[Route]]:
    """The routes of ``flow`` by their source node, each node's in the order added."""
    routes_from: dict[str, list[Route]] = {}
    for route in flow.routes:
        routes_from.setdefault(route.source, []).append(route)
    return routes_from


def _when_keys(routes: Iterable[Route]) -> frozenset[str]:
    """The store keys the conditions of ``routes`` read.

    Raises:
        ConditionError: the keys of a condition raised or are not a frozenset of str
            (build() checked them once; a user's ``keys`` may change).
    """
    keys: frozenset[str] = frozenset()
    for route in routes:
        if route.when is not None:
            keys |= checked_keys(route.when)
    return keys


def _plain_target(routes: tuple[Route, ...]) -> str | None:
    """The one node ``routes`` lead to when they are one unconditional route to one
    node; else None."""
    if len(routes) != 1 or routes[0].when is not None:
        return None
    target = routes[0].target
    return target if isinstance(target, str) else None


def _plain_node(flow: Flow, node_id: str) -> bool:
    """Whether ``node_id`` is a node of ``flow`` that is neither a join nor a flow."""
    return node_id not in flow.joins and not isinstance(flow.nodes[node_id], Flow)


def _joins_here(branch: Branch, flow: Flow, target: str) -> bool:
    fork = branch.fork
    return fork is not None and target in flow.joins and len(branch.frames) == fork.depth


def _routes(frame: Frame, action: Action) -> tuple[Route, ...] | None:
    """The routes out of the frame's node for ``action``; None when it has no routes
    at all (the frame's flow ends there)."""
    flow = frame.flow
    if not flow.has_routes(frame.node_id):
        return None
    return flow.routes_for(frame.node_id, action.name)


def _target(frame: Frame, node_id: str, action: Action, values: Mapping[str, Any]) -> Target:
    """The target of the first route out of the frame's node that accepts ``action``,
    which node ``node_id`` returned (the frame's node, or a node inside it when it is a
    nested flow), given the store ``values`` the conditions read; END for a node
    without routes.

    Raises:
        NoRouteError: no route accepts ``action``; it names the nested flow and
            ``node_id`` when the action came out of a nested flow.
    """
    routes = _routes(frame, action)
    if routes is None:
        return END
    flow = frame.flow
    for route in routes:
        if route.when is None or _holds(flow, route, route.when, values):
            return route.target
    nested = isinstance(flow.nodes[frame.node_id], Flow)
    available = flow.actions_from(frame.node_id)
    returned_by = node_id if nested else None
    raise NoRouteError(frame.node_id, action.name, available, returned_by, flow.name)


def _holds(flow: Flow, route: Route, condition: ActionCondition, values: Mapping[str, Any]) -> bool:
    """Whether ``route`` of ``flow``'s ``condition`` holds for the store ``values``; a
    ConditionError (whatever the condition raised, see :func:`holds`) is raised again
    naming the route and its flow, from the same cause."""
    try:
        return holds(condition, values)
    except ConditionError as exc:
        where = f"route {route.source!r} on action {route.action!r} of flow {flow.name!r}"
        raise ConditionError(f"{where}: {exc}") from exc.__cause__
