"""Flows: directed graphs of nodes joined by action-labelled routes.

A flow is built once with :class:`FlowBuilder`, validated by ``build()``, and is then
immutable; one flow serves any number of concurrent runs.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeGuard, Unpack, final

import trio

from cosmoflow_actors.action import Action, ActionCondition, checked_keys
from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.errors import ConditionError, FlowValidationError, with_article
from cosmoflow_actors.node import (
    BatchNode,
    Node,
    NodeConfig,
    executor_problem,
    phase_problem,
    pocketflow_problem,
    validate_config,
)
from cosmoflow_actors.validation import utf8_problem

if TYPE_CHECKING:
    from cosmoflow_actors.runtime.store_client import SharedStore
    from cosmoflow_actors.storage.base import Storage

DEFAULT_MAX_STEPS: Final = 1000
MAX_NESTING: Final = 100
"""How many flows deep a flow may nest (see :attr:`Flow.depth`); deeper, the engine's
walks through nested flows would exceed Python's recursion limit."""


class _End(enum.Enum):
    """The type of :data:`END`, its only value."""

    END = "END"

    def __repr__(self) -> str:
        return "cf.END"


END: Final = _End.END
"""Route target that ends the flow."""

_IMPORTING: ContextVar[bool] = ContextVar("cosmoflow_importing", default=False)
"""Whether the cosmoflow command is importing a file to find its flows."""


@contextlib.contextmanager
def refusing_runs() -> Iterator[None]:
    """Make running a flow (``Flow.run``, ``Flow.run_sync``) raise RuntimeError inside.

    The cosmoflow command imports a file inside to find its flows: the file's top-level
    code should only define them, and run them under ``if __name__ == "__main__":``.
    """
    token = _IMPORTING.set(True)
    try:
        yield
    finally:
        _IMPORTING.reset(token)


def check_runs_allowed(what: str) -> None:
    """Raise RuntimeError inside :func:`refusing_runs`, saying ``what`` happened
    (``"flow 'f' was run"``, ``"an engine was opened"``)."""
    if _IMPORTING.get():
        raise RuntimeError(
            f"{what} while the cosmoflow command imported its file to find the flows in "
            'it; put the code that runs flows under `if __name__ == "__main__":`'
        )


Target = str | Literal[_End.END] | tuple[str, ...]
"""A node id, ``END``, or a tuple of node ids (a fan-out)."""


@dataclass(frozen=True, slots=True)
class Route:
    """``source --action [when]--> target``; a tuple target fans out to each node."""

    source: str
    action: str
    target: Target
    when: ActionCondition | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """The node ids this route leads to (none for ``END``)."""
        if self.target is END:
            return ()
        if isinstance(self.target, tuple):
            return self.target
        return (self.target,)


@dataclass(frozen=True, slots=True)
class FlowResult:
    """The outcome of a run that succeeded."""

    run_id: str
    flow_name: str
    final_action: Action
    last_node_id: str
    steps_executed: int
    execution_path: tuple[str, ...]
    result: Any
    success: bool
    duration: float
    store: Storage

    def to_mermaid(self, flow: Flow) -> str:
        """``flow.to_mermaid()`` with the nodes this run executed highlighted."""
        from cosmoflow_actors.diagram import result_to_mermaid

        return result_to_mermaid(self, flow)


@final
class Flow:
    """A validated, immutable flow. Make one with :meth:`Flow.builder`.

    A flow can itself be a node of another flow (a nested flow): it runs on the parent
    run's store, and the name of its final action is routed in the parent.

    Only ``build()`` makes a flow: calling ``Flow(...)`` raises TypeError. Setting or
    deleting an attribute of a flow raises AttributeError: what build() validated is
    what every run of it runs.
    """

    __slots__ = (
        "__weakref__",
        "_exits",
        "_sources",
        "_table",
        "depth",
        "joins",
        "max_steps",
        "name",
        "nodes",
        "routes",
        "start_id",
    )

    name: str
    nodes: Mapping[str, Node | Flow]
    """The nodes by id, read-only."""
    routes: tuple[Route, ...]
    start_id: str
    max_steps: int
    joins: frozenset[str]
    depth: int
    """How many flows deep this flow nests: 1 when no node of it is a flow."""
    _table: Mapping[tuple[str, str], tuple[Route, ...]]
    _sources: frozenset[str]
    _exits: tuple[str, ...] | None

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "a Flow cannot be made directly, only by its builder, which validates it: "
            "cf.Flow.builder(name).add_node(...).add_route(...).build()"
        )

    @classmethod
    def _built(
        cls,
        name: str,
        nodes: Mapping[str, Node | Flow],
        routes: tuple[Route, ...],
        start_id: str,
        max_steps: int,
        joins: frozenset[str] = frozenset(),
    ) -> Flow:
        """The flow of parts that ``build()`` validated (or that a pickled flow had)."""
        flow = object.__new__(cls)
        table: dict[tuple[str, str], list[Route]] = {}
        for route in routes:
            table.setdefault((route.source, route.action), []).append(route)
        read_only_nodes = MappingProxyType(dict(nodes))
        parts: dict[str, object] = {
            "name": name,
            "nodes": read_only_nodes,
            "routes": routes,
            "start_id": start_id,
            "max_steps": max_steps,
            "joins": joins,
            "depth": 1
            + max((node.depth for node in nodes.values() if isinstance(node, Flow)), default=0),
            "_table": MappingProxyType({key: tuple(found) for key, found in table.items()}),
            "_sources": frozenset(route.source for route in routes),
        }
        for attribute, value in parts.items():
            object.__setattr__(flow, attribute, value)
        # Once, here: a nested flow's exits are its own, computed when it was made, so
        # a flow reused at every level of a deep nesting costs no more than once.
        object.__setattr__(flow, "_exits", flow._find_exit_actions())
        return flow

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(self._immutable(name))

    def __delattr__(self, name: str) -> None:
        raise AttributeError(self._immutable(name))

    def _immutable(self, attribute: str) -> str:
        return (
            f"cannot change {attribute!r} of flow {self.name!r}: a flow is immutable once "
            "built; build another with cf.Flow.builder(...)"
        )

    def __reduce__(self) -> tuple[Callable[..., Flow], tuple[Any, ...]]:
        """Pickle the flow from its parts (a read-only mapping cannot be pickled)."""
        parts = (self.name, dict(self.nodes), self.routes, self.start_id, self.max_steps)
        return (Flow._built, (*parts, self.joins))

    @staticmethod
    def builder(name: str) -> FlowBuilder:
        """Start building a flow called ``name``."""
        return FlowBuilder(name)

    def routes_for(self, node_id: str, action: str) -> tuple[Route, ...]:
        """The routes out of ``node_id`` for ``action``, in the order added."""
        return self._table.get((node_id, action), ())

    def route_table(self) -> Mapping[tuple[str, str], tuple[Route, ...]]:
        """Every route, by (source node, action), in the order added (read-only)."""
        return self._table

    def has_routes(self, node_id: str) -> bool:
        """Whether any route leaves ``node_id``."""
        return node_id in self._sources

    def actions_from(self, node_id: str) -> list[str]:
        """The distinct actions routed out of ``node_id``, in the order added."""
        return list(dict.fromkeys(r.action for r in self.routes if r.source == node_id))

    def exit_actions(self) -> tuple[str, ...] | None:
        """The names of the actions a run of this flow can end it with (what a parent
        routes after it as a nested flow): those of its routes to ``END`` and the exits
        of its nested flows without routes, in order; None when a node without routes
        may end it (with any action)."""
        return self._exits

    def _find_exit_actions(self) -> tuple[str, ...] | None:
        """:meth:`exit_actions`, found from the routes and the nested flows' own."""
        actions = [route.action for route in self.routes if route.target is END]
        for node_id, node in self.nodes.items():
            if node_id in self._sources:  # has routes
                continue
            inner = node.exit_actions() if isinstance(node, Flow) else None
            if inner is None:
                return None
            actions += inner
        return tuple(dict.fromkeys(actions))

    async def run(
        self,
        store: Storage | dict[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> FlowResult:
        """Run once on a temporary engine, inside a trio run; returns when the run ends.

        Raises the run's error (``NodeError``, ``NoRouteError``...) when it fails.

        Raises:
            RuntimeError: awaited outside a trio run (by asyncio, say), where the
                engine cannot run: use ``run_sync`` from synchronous code.
        """
        from cosmoflow_actors.runtime.engine import on_temporary_engine

        if not trio.lowlevel.in_trio_run():
            raise RuntimeError(
                f"flow {self.name!r}: run() was awaited outside a trio run; flows run on "
                "trio, not asyncio: call `flow.run_sync(...)` from synchronous code, or "
                "`await flow.run(...)` inside `trio.run`"
            )
        check_runs_allowed(f"flow {self.name!r} was run")
        return await on_temporary_engine(
            lambda engine: engine.run(self, store, params=params, run_id=run_id)
        )

    def run_sync(
        self,
        store: Storage | dict[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> FlowResult:
        """Run once from synchronous code (``trio.run``); blocks until the run ends.

        Raises the run's error as :meth:`run` does. Ctrl-C raises ``KeyboardInterrupt``
        itself, as it does out of ``trio.run`` (not inside an exception group), in the
        main thread: Python raises it there only, so a call in another thread is not
        interrupted. Threads may call it at once, each with a store of its own: each
        call is a trio run with an engine of its own.

        Raises:
            RuntimeError: called inside a trio run, where ``trio.run`` cannot be called:
                use ``await flow.run(...)`` or an engine there.
        """
        if trio.lowlevel.in_trio_run():
            raise RuntimeError(
                f"flow {self.name!r}: run_sync() cannot be called inside a trio run; "
                "use `await flow.run(...)`, or an engine: "
                "`async with cf.open_engine() as engine: await engine.run(flow, ...)`"
            )
        check_runs_allowed(f"flow {self.name!r} was run")
        try:
            return trio.run(lambda: self.run(store, params=params, run_id=run_id))
        except BaseExceptionGroup as group:
            interrupt = self._only_interrupt(group)
            if interrupt is None:
                raise
            # The group only carries the interrupt out of the engine's nurseries; the
            # interrupt's traceback still shows where it struck.
            raise interrupt from None

    @staticmethod
    def _only_interrupt(group: BaseExceptionGroup[BaseException]) -> KeyboardInterrupt | None:
        """The KeyboardInterrupt that ``group`` (or the groups in it) holds, if that is all
        it holds; None otherwise."""
        if group.split(KeyboardInterrupt)[1] is not None:
            return None
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        assert isinstance(leaf, KeyboardInterrupt)
        return leaf

    def to_mermaid(self) -> str:
        """This flow as a Mermaid flowchart (see :mod:`cosmoflow_actors.diagram`)."""
        from cosmoflow_actors.diagram import to_mermaid

        return to_mermaid(self)

    def __repr__(self) -> str:
        return f"<Flow {self.name!r}: {len(self.nodes)} nodes, {len(self.routes)} routes>"


class FlowBuilder:
    """Collects nodes and routes; :meth:`build` validates them into a :class:`Flow`."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._nodes: dict[str, Node | Flow] = {}
        # Every id added, in order, including those of nodes that were rejected.
        self._ids: dict[str, None] = {}
        self._routes: list[Route] = []
        self._start: str | None = None
        self._max_steps = DEFAULT_MAX_STEPS
        self._joins: set[str] = set()
        self._problems: list[str] = []

    def add_node(self, node_id: str, node: Node | Flow) -> FlowBuilder:
        """Add ``node`` (a Node or a nested Flow) under ``node_id``, a non-empty str
        without '/'."""
        if not isinstance(node_id, str) or not node_id:
            self._problems.append(f"a node id must be a non-empty str, got {node_id!r}")
            return self
        if node_id in self._ids:
            self._problems.append(f"duplicate node id {node_id!r}")
            return self
        self._ids[node_id] = None
        if "/" in node_id:
            self._problems.append(
                f"node id {node_id!r} contains '/', which separates a flow's name from its "
                "node ids (in statistics() and traces)"
            )
        elif (unencodable := utf8_problem(node_id)) is not None:
            self._problems.append(f"node id {node_id!r} {unencodable}")
        elif isinstance(node, Node | Flow):
            self._nodes[node_id] = node
        else:
            self._problems.append(self._not_a_node(node_id, node))
        return self

    @staticmethod
    def _not_a_node(node_id: str, value: object) -> str:
        """The problem with adding ``value``, neither a Node nor a Flow, as a node."""
        if isinstance(value, type) and issubclass(value, Node | Flow):
            return f"node {node_id!r} is the class {value.__qualname__}, not an instance of it"
        if isinstance(value, type):
            return f"node {node_id!r} is the class {value.__qualname__}, not a Node or Flow"
        if isinstance(value, FlowBuilder):
            return (
                f"node {node_id!r} is a FlowBuilder, not a Flow: call .build() on it and "
                "add the flow it returns"
            )
        if value is END:
            return (
                f"node {node_id!r} is cf.END, the route target that ends a flow, not a node: "
                "route to it with add_route(source, cf.END, action)"
            )
        problem = f"node {node_id!r} is {with_article(type(value).__name__)}, not a Node or Flow"
        if _from_pocketflow(type(value)):
            problem += (
                " (it is a PocketFlow node: subclass cf.Node, with prep(store, ctx), "
                "exec(prep_res, ctx) and post(store, prep_res, exec_res, ctx))"
            )
        elif callable(value):
            problem += " (decorate a function with @cf.node to make it a node)"
        return problem

    def add_join(self, node_id: str, node: Node | Flow) -> FlowBuilder:
        """Add a join node: the branches of a fan-out that reach it run it once, together.

        The run goes on from the join when every branch of the fan-out has arrived
        there or ended; a node that no fan-out reaches runs as an ordinary node.
        """
        if isinstance(node_id, str):  # add_node reports any other id
            self._joins.add(node_id)
        return self.add_node(node_id, node)

    def add_route(
        self,
        from_id: str,
        to_id: str | Literal[_End.END] | Sequence[str],
        action: str = "default",
        *,
        when: ActionCondition | None = None,
    ) -> FlowBuilder:
        """Route ``action`` out of ``from_id`` to ``to_id``: a node id, ``END``, or a list
        of node ids to fan out to (the branches run concurrently on the run's store).

        With ``when``, the route is taken only if the condition holds on the run's store.
        """
        if when is not None and not isinstance(when, ActionCondition):
            kind = with_article(type(when).__name__)
            self._problems.append(
                f"route {from_id!r} -> {to_id!r}: when is {kind}, not an "
                "ActionCondition (write cf.ActionCondition.expression(...), or subclass "
                "cf.ActionCondition for a test in Python)"
            )
        elif when is not None:
            try:
                checked_keys(when)
            except ConditionError as exc:
                self._problems.append(f"route {from_id!r} -> {to_id!r}: {exc}")
        if not isinstance(from_id, str):
            self._problems.append(f"a route's source must be a node id (a str), got {from_id!r}")
        elif isinstance(to_id, str | _End):
            self._routes.append(Route(from_id, action, to_id, when))
        elif _is_fan_out(to_id):
            self._routes.append(Route(from_id, action, tuple(to_id), when))
        else:
            self._problems.append(
                f"route from {from_id!r} on action {action!r}: the target must be a node id, "
                f"cf.END or a non-empty list of node ids, got {to_id!r}"
            )
        return self

    def start(self, node_id: str) -> FlowBuilder:
        """Make ``node_id`` the entry node (default: the first node added)."""
        self._start = node_id
        return self

    def max_steps(self, steps: int) -> FlowBuilder:
        """Bound the steps one run may take (default 1000)."""
        self._max_steps = steps
        return self

    def build(self) -> Flow:
        """Validate and return the flow; raise FlowValidationError naming every fault
        (its ``__cause__`` is the pickling error of the first node that cannot be sent
        to its worker, if any).

        Besides malformed input, a node that no route reaches from the start node is a
        fault (the branches of a fan-out and a join reached by routes count as reached),
        and so is a route added after one without ``when`` for the same source and action
        (it could never be taken).
        A node rejected by ``add_node`` still counts as a node here, so that it is
        reported once, for what it is.
        """
        problems = [*self._problems, *self._route_problems(), *self._shadowed_routes()]
        config_problems, cause = self._config_problems()
        problems += config_problems + self._nesting_problems() + self._exit_problems()
        if not isinstance(self._name, str) or not self._name:
            problems.append(f"the flow's name must be a non-empty str, got {self._name!r}")
        elif (unencodable := utf8_problem(self._name)) is not None:
            problems.append(f"the flow's name {self._name!r} {unencodable}")
        start = self._start if self._start is not None else next(iter(self._ids), None)
        if not self._ids:
            problems.append("the flow has no nodes")
        elif not isinstance(start, str) or start not in self._ids:
            problems.append(f"start node {start!r} is not a node of the flow")
        else:
            problems += self._reach_problems(start)
        if isinstance(self._max_steps, bool) or not isinstance(self._max_steps, int):
            problems.append(f"max_steps must be an int, got {self._max_steps!r}")
        elif self._max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self._max_steps}")
        if problems or start is None:
            raise FlowValidationError(self._name, problems) from cause
        joins = frozenset(self._joins)
        return Flow._built(
            self._name, self._nodes, tuple(self._routes), start, self._max_steps, joins
        )

    def _nesting_problems(self) -> list[str]:
        """The nested flows that would nest this flow more than MAX_NESTING deep."""
        return [
            f"node {node_id!r} is a flow {node.depth} deep, which makes this flow "
            f"{node.depth + 1} deep: a flow nests at most {MAX_NESTING} deep"
            for node_id, node in self._nodes.items()
            if isinstance(node, Flow) and node.depth >= MAX_NESTING
        ]

    def _exit_problems(self) -> list[str]:
        """Name each nested flow whose exits are known (see :meth:`Flow.exit_actions`)
        when it has routes here and none of them takes any of its exits: every run
        through it would fail with NoRouteError."""
        problems = []
        for node_id, node in self._nodes.items():
            if not isinstance(node, Flow):
                continue
            routes = [route for route in self._routes if route.source == node_id]
            routed = {route.action for route in routes if isinstance(route.action, str)}
            exits = node.exit_actions()
            if routed and exits and routed.isdisjoint(exits):
                problems.append(
                    f"node {node_id!r} is flow {node.name!r}, which ends only with action "
                    f"{_names(exits)} (its routes to cf.END), but no route from {node_id!r} "
                    f"takes {'it' if len(exits) == 1 else 'any of them'}"
                )
        return problems

    def _route_problems(self) -> list[str]:
        problems = []
        for route in self._routes:
            if route.source not in self._ids:
                problems.append(f"route from unknown node {route.source!r}")
            if not isinstance(route.action, str) or not route.action:
                problems.append(
                    f"route from {route.source!r}: an action must be a non-empty str, "
                    f"got {route.action!r}"
                )
            elif (unencodable := utf8_problem(route.action)) is not None:
                problems.append(
                    f"route from {route.source!r}: action {route.action!r} {unencodable}"
                )
            if isinstance(route.target, tuple) and len(set(route.target)) != len(route.target):
                problems.append(f"route from {route.source!r} fans out to a node twice")
            if isinstance(route.target, tuple) and not route.target:
                problems.append(f"route from {route.source!r} fans out to no node")
            for target in route.targets:
                if target not in self._ids:
                    problems.append(self._unknown_target(route.source, target))
        return problems

    @staticmethod
    def _unknown_target(source: str, target: object) -> str:
        """The problem with a route from ``source`` to ``target``, not a node id."""
        problem = f"route from {source!r} to unknown node {target!r}"
        if isinstance(target, str) and target.upper() == "END":
            problem += " (to end the run there, route to cf.END)"
        return problem

    def _shadowed_routes(self) -> list[str]:
        """Name each route that can never be taken: one added after a route without a
        condition for the same source and action (a route with one falls through)."""
        problems = []
        unconditional: dict[tuple[str, str], Route] = {}
        for route in self._routes:
            if not isinstance(route.source, str) or not isinstance(route.action, str):
                continue  # reported by _route_problems
            key = (route.source, route.action)
            first = unconditional.get(key)
            if first is not None:
                problems.append(
                    f"route from {route.source!r} on action {route.action!r} to "
                    f"{route.target!r} can never be taken: the route to {first.target!r} "
                    "added before it has no when= (only an action's last route may lack one)"
                )
            elif route.when is None:
                unconditional[key] = route
        return problems

    def _reach_problems(self, start: str) -> list[str]:
        """Name each node that no chain of routes leads to from ``start`` (a node
        refused when added has its problem named already)."""
        successors: dict[str, list[str]] = {}
        for route in self._routes:
            successors.setdefault(route.source, []).extend(route.targets)
        reached = {start}
        pending = [start]
        while pending:
            for node_id in successors.get(pending.pop(), ()):
                if node_id not in reached:
                    reached.add(node_id)
                    pending.append(node_id)
        return [
            f"node {node_id!r} is unreachable: no route leads to it from the start node {start!r}"
            for node_id in self._nodes
            if node_id not in reached
        ]

    def _config_problems(self) -> tuple[list[str], Exception | None]:
        """The faults of the nodes' settings and methods, and the first error behind one
        (a node that cannot be pickled for its worker), which build() chains."""
        problems = []
        cause: Exception | None = None
        for node_id, node in self._nodes.items():
            if isinstance(node, Node):
                settings = _settings_problem(node_id, node)
                if settings is not None:
                    problems.append(settings)
                    continue
                problem = phase_problem(node, batch=isinstance(node, BatchNode | BatchFlow))
                if problem is not None:
                    problems.append(f"node {node_id!r}: {problem}")
                executor = executor_problem(node)
                if executor is not None:
                    problems.append(f"node {node_id!r}: {executor[0]}")
                    cause = cause or executor[1]
        return problems, cause


def flows_within(flow: Flow) -> list[Flow]:
    """``flow`` and every flow nested in it, directly or not, each once however many
    times it is nested (a flow reused at every level is visited once, not once per
    path to it). Never blocks."""
    found = [flow]
    seen = {flow}
    for outer in found:  # the list grows as it is walked: each flow's nested ones last
        for node in outer.nodes.values():
            if isinstance(node, Flow) and node not in seen:
                seen.add(node)
                found.append(node)
    return found


def check_settings(flow: Flow) -> None:
    """Raise FlowValidationError, as ``build()`` does, when the config of a node of
    ``flow`` (not of the flows nested in it) is invalid now: the engine checks it again
    when it registers the flow, for config set on a node after ``build()``."""
    problems = [
        problem
        for node_id, node in flow.nodes.items()
        if isinstance(node, Node) and (problem := _settings_problem(node_id, node)) is not None
    ]
    if problems:
        raise FlowValidationError(flow.name, problems)


def _settings_problem(node_id: str, node: Node) -> str | None:
    """What is wrong with the config of ``node``, or a PocketFlow name it set on itself
    (see :func:`~cosmoflow_actors.node.pocketflow_problem`), or None."""
    try:
        validate_config(node, f"node {node_id!r}")
    except ValueError as exc:
        return str(exc)
    problem = pocketflow_problem(getattr(node, "__dict__", {}))
    if problem is None and isinstance(node, BatchFlow):
        problem = _batch_flow_problem(node)
    return None if problem is None else f"node {node_id!r}: {problem}"


def _names(actions: Sequence[str]) -> str:
    """``'a'``, or ``'a', 'b' or 'c'``: action names for a message."""
    quoted = [repr(action) for action in actions]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" or {quoted[-1]}"


def _from_pocketflow(cls: type) -> bool:
    """Whether ``cls`` is, or subclasses, a class of the pocketflow package."""
    return any(base.__module__.partition(".")[0] == "pocketflow" for base in cls.__mro__)


_NOT_FOR_BATCH_FLOW = (
    ("max_retries", 1),
    ("timeout", None),
    ("max_exec_concurrency", None),
    ("rate_limit", None),
    ("executor", "inline"),
    ("ray_options", None),
)
"""Node config a BatchFlow would have to ignore, with the only value it accepts."""


def _batch_flow_problem(node: BatchFlow) -> str | None:
    """Which config or method that a BatchFlow would ignore ``node`` has, or None:
    checked when it is made, by ``build()`` and when the engine registers its flow
    (for config set on it after that). One whose ``__init__`` skipped BatchFlow's has
    no sub-flow."""
    if not isinstance(vars(node).get("_flow"), Flow):
        return "it has no sub-flow: its __init__ must call super().__init__(flow)"
    unsupported = [name for name, default in _NOT_FOR_BATCH_FLOW if getattr(node, name) != default]
    unsupported += [
        name
        for name in ("exec", "exec_fallback")
        if getattr(type(node), name) is not getattr(Node, name)
    ]
    if not unsupported:
        return None
    return (
        f"a BatchFlow runs child runs; it does not support {', '.join(unsupported)} "
        "(set them on the sub-flow's nodes)"
    )


def _is_fan_out(target: object) -> TypeGuard[Sequence[str]]:
    """Whether ``target`` is a list (or other sequence) of node ids, each a str."""
    if not isinstance(target, Sequence) or isinstance(target, str | bytes | bytearray):
        return False
    return all(isinstance(node_id, str) for node_id in target)


class BatchFlow(Node):
    """Runs a sub-flow once per parameter set that :meth:`prep` returns.

    Each parameter set starts a child run of ``flow`` on the parent run's store, with
    the set as the entry node's ``ctx.params`` and the step's execution id and the
    set's index as its run id (``job:3/0``); at most ``max_concurrency`` children run
    at once (None = all). The first child that fails cancels the others and fails this
    step with a NodeError whose cause is the child's error. ``post`` receives the
    children's FlowResults in parameter order. Children are not retried.
    """

    def __init__(self, flow: Flow, **config: Unpack[NodeConfig]) -> None:
        if not isinstance(flow, Flow):
            raise TypeError(f"BatchFlow needs a built Flow, got {type(flow).__name__}")
        super().__init__(**config)
        self._flow = flow
        problem = _batch_flow_problem(self)
        if problem is not None:
            raise ValueError(f"{type(self).__qualname__}: {problem}")

    @property
    def flow(self) -> Flow:
        """The sub-flow each parameter set runs (fixed: a flow that ran a BatchFlow
        which runs that flow again would never end)."""
        return self._flow

    def prep(self, store: SharedStore, ctx: ExecutionContext, /) -> Any:
        """Return the parameter sets (dicts), one child run each. Default: none."""
        return []
