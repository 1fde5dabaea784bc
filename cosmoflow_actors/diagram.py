"""Diagrams of flows: Mermaid ``flowchart`` and Graphviz ``dot`` text.

A diagram shows every node of a flow (join nodes as hexagons), every route as an edge
labelled with its action (``default`` is left out) and its ``when`` condition (its repr:
``<ClassName>`` for a user subclass without a ``__repr__`` of its own), a fan-out
as one bold edge per target, and ``END`` as a terminal circle. A nested flow is a
subgraph titled ``node id: flow name`` (the id alone when they are equal); the ids of
its nodes get the nested flow's id as a prefix (``sub__check``) so that they stay
unique, while their labels keep the ids used in the flow. A route into a nested flow
points at the nested flow's start node; a route out of it leaves the whole subgraph.

Diagram ids are node ids with every character other than an ASCII letter, digit or
``_`` replaced by ``_``; a word Mermaid reserves gets a ``_`` suffix and a clash a
``_2``, ``_3``... suffix. docs/cli.md shows examples.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from cosmoflow_actors.flow import END, Flow, Route

if TYPE_CHECKING:
    from cosmoflow_actors.flow import FlowResult

EXECUTED_STYLE: Final = "fill:#d7f5dd,stroke:#1e7b34,stroke-width:2px"
"""The Mermaid style of the nodes a run executed (class ``executed``)."""

_RESERVED: Final = frozenset(
    {"end", "graph", "flowchart", "subgraph", "style", "class", "classDef", "linkStyle"}
    | {"click", "call", "href", "interpolate", "default"}
)
"""Words Mermaid reads as keywords rather than as node ids (case matters)."""

_MERMAID_ESCAPES: Final = {
    "#": "#35;",
    "&": "#38;",
    '"': "#quot;",
    "<": "#lt;",
    ">": "#gt;",
    "`": "#96;",
    "\n": " ",
}
_DOT_ESCAPES: Final = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "&": "&amp;"}

Kind = Literal["node", "join", "end"]


@dataclass(frozen=True, slots=True)
class _Box:
    """One node of the diagram: a flow's node, or the ``END`` of a flow."""

    id: str
    label: str
    kind: Kind
    node_id: str | None
    """The id in the flow (None for END): what an execution path lists."""


@dataclass(frozen=True, slots=True)
class _Edge:
    """A route to one target. ``source`` is a box; ``source_cluster`` is set when the
    route leaves a nested flow (``source`` is then that flow's entry box)."""

    source: str
    target: str
    label: str
    fan_out: bool
    source_cluster: str | None


@dataclass(slots=True)
class _Cluster:
    """A flow laid out: its boxes and nested clusters in order, and its edges."""

    id: str
    label: str
    items: list[_Box | _Cluster] = field(default_factory=list)
    edges: list[_Edge] = field(default_factory=list)
    entry: str = ""
    """The box where runs enter the flow: its start node, inside nested flows."""

    def boxes(self) -> Iterable[_Box]:
        """Every box of this cluster and of the clusters nested in it, in order."""
        for item in self.items:
            if isinstance(item, _Box):
                yield item
            else:
                yield from item.boxes()


class _Ids:
    """Hands out diagram ids that are unique, safe to write bare and not keywords."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def new(self, prefix: str, name: str) -> str:
        base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"
        if prefix:
            base = f"{prefix}__{base}"
        if base in _RESERVED:
            base += "_"
        candidate, suffix = base, 2
        while candidate in self._used:
            candidate, suffix = f"{base}_{suffix}", suffix + 1
        self._used.add(candidate)
        return candidate


def to_mermaid(flow: Flow, *, executed: Iterable[str] = ()) -> str:
    """Mermaid ``flowchart TD`` text for ``flow``, titled with its name.

    ``executed`` are node ids (an execution path) whose nodes get the ``executed`` class,
    drawn with :data:`EXECUTED_STYLE`. An id matches the node of that id in the flow and
    in every nested flow.
    """
    top = _layout(flow, "", flow.name, _Ids())
    lines = ["---", f"title: {json.dumps(flow.name)}", "---", "flowchart TD"]
    lines += _mermaid_body(top, "    ")
    ran = set(executed)
    highlighted = [box.id for box in top.boxes() if box.node_id in ran]
    if highlighted:
        lines.append(f"    classDef executed {EXECUTED_STYLE}")
        lines.append(f"    class {','.join(highlighted)} executed")
    return "\n".join(lines) + "\n"


def result_to_mermaid(result: FlowResult, flow: Flow) -> str:
    """:func:`to_mermaid` of ``flow`` with the nodes ``result``'s run executed highlighted.

    Raises ValueError when ``result`` is the result of another flow (by name).
    """
    if result.flow_name != flow.name:
        raise ValueError(f"the result is of flow {result.flow_name!r}, not of {flow.name!r}")
    return to_mermaid(flow, executed=result.execution_path)


def to_dot(flow: Flow) -> str:
    """Graphviz ``digraph`` text for ``flow``; nested flows are ``cluster_`` subgraphs."""
    top = _layout(flow, "", flow.name, _Ids())
    lines = [f"digraph {_dot_quote(flow.name)} {{", "    compound=true;", "    node [shape=box];"]
    lines += _dot_body(top, "    ")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _layout(flow: Flow, prefix: str, label: str, ids: _Ids) -> _Cluster:
    """Give every node of ``flow`` (and of its nested flows) a box and collect the edges."""
    cluster = _Cluster(prefix, label)
    where: dict[object, _Box | _Cluster] = {}
    for node_id, node in flow.nodes.items():
        if isinstance(node, Flow):
            title = node_id if node.name == node_id else f"{node_id}: {node.name}"
            where[node_id] = _layout(node, ids.new(prefix, node_id), title, ids)
        else:
            kind: Kind = "join" if node_id in flow.joins else "node"
            label = f"{node_id} (join)" if kind == "join" else node_id
            where[node_id] = _Box(ids.new(prefix, node_id), label, kind, node_id)
        cluster.items.append(where[node_id])
    cluster.entry = _entry(where[flow.start_id])
    if any(route.target is END for route in flow.routes):
        end = _Box(ids.new(prefix, "END"), "END", "end", None)
        cluster.items.append(end)
        where[END] = end
    cluster.edges = [edge for route in flow.routes for edge in _edges(route, where)]
    return cluster


def _entry(item: _Box | _Cluster) -> str:
    return item.id if isinstance(item, _Box) else item.entry


def _edges(route: Route, where: dict[object, _Box | _Cluster]) -> list[_Edge]:
    """One edge per target of ``route``; ``where`` maps node ids and END to their items."""
    source = where[route.source]
    source_cluster = source.id if isinstance(source, _Cluster) else None
    targets: tuple[object, ...] = (END,) if route.target is END else route.targets
    parts = [] if route.action == "default" else [route.action]
    if route.when is not None:
        parts.append(f"when {route.when!r}")
    return [
        _Edge(_entry(source), _entry(where[t]), " ".join(parts), len(targets) > 1, source_cluster)
        for t in targets
    ]


def _mermaid_body(cluster: _Cluster, indent: str) -> list[str]:
    lines = []
    for item in cluster.items:
        if isinstance(item, _Box):
            lines.append(f"{indent}{_mermaid_box(item)}")
        else:
            lines.append(f'{indent}subgraph {item.id} ["{_mermaid_text(item.label)}"]')
            lines += _mermaid_body(item, indent + "    ")
            lines.append(f"{indent}end")
    for edge in cluster.edges:
        arrow = "==>" if edge.fan_out else "-->"
        if edge.label:
            arrow += f'|"{_mermaid_text(edge.label)}"|'
        lines.append(f"{indent}{edge.source_cluster or edge.source} {arrow} {edge.target}")
    return lines


def _mermaid_box(box: _Box) -> str:
    text = f'"{_mermaid_text(box.label)}"'
    if box.kind == "join":
        return f"{box.id}{{{{{text}}}}}"
    if box.kind == "end":
        return f"{box.id}(({text}))"
    return f"{box.id}[{text}]"


def _mermaid_text(text: str) -> str:
    """``text`` for a quoted Mermaid label: quotes, ``<``, ``>``, ``&`` and ``#`` as
    entities."""
    return "".join(_MERMAID_ESCAPES.get(char, char) for char in text)


def _dot_body(cluster: _Cluster, indent: str) -> list[str]:
    lines = []
    for item in cluster.items:
        if isinstance(item, _Box):
            lines.append(f"{indent}{_dot_box(item)}")
        else:
            lines.append(f"{indent}subgraph {_dot_quote('cluster_' + item.id)} {{")
            lines.append(f"{indent}    label={_dot_quote(item.label)};")
            lines += _dot_body(item, indent + "    ")
            lines.append(f"{indent}}}")
    lines += [f"{indent}{_dot_edge(edge)}" for edge in cluster.edges]
    return lines


def _dot_box(box: _Box) -> str:
    attributes = [f"label={_dot_quote(box.label)}"]
    if box.kind == "join":
        attributes.append("shape=hexagon")
    elif box.kind == "end":
        attributes.append("shape=doublecircle")
    return f"{_dot_quote(box.id)} [{', '.join(attributes)}];"


def _dot_edge(edge: _Edge) -> str:
    attributes = []
    if edge.label:
        attributes.append(f"label={_dot_quote(edge.label)}")
    if edge.fan_out:
        attributes.append("style=bold")
    if edge.source_cluster is not None:
        attributes.append(f"ltail={_dot_quote('cluster_' + edge.source_cluster)}")
    suffix = f" [{', '.join(attributes)}]" if attributes else ""
    return f"{_dot_quote(edge.source)} -> {_dot_quote(edge.target)}{suffix};"


def _dot_quote(text: str) -> str:
    return '"' + "".join(_DOT_ESCAPES.get(char, char) for char in text) + '"'
