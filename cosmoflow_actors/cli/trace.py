"""Following a command's events: :func:`watch` hands each event of an engine to
handlers, :class:`NodeNames` names the node of a step by its path in nested flows
(``checks/split``), and :class:`Printer` prints each event on stderr (``run --trace``)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Final

import trio

from cosmoflow_actors.cli.loading import nested_flows
from cosmoflow_actors.events import Event, Fallback, Retry, StepFinished, StepStarted
from cosmoflow_actors.flow import Flow
from cosmoflow_actors.runtime.engine import Engine
from cosmoflow_actors.tracing import format_event

EVENT_BUFFER: Final = 100_000
"""Events the stream of ``--runs`` and ``--trace`` holds before the engine waits for
the command to read them."""
StepEvent = StepStarted | StepFinished | Retry | Fallback
"""The events of one step, which name its node."""


async def watch(
    engine: Engine,
    handlers: Sequence[Callable[[Event], None]],
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Hand every event of ``engine`` to ``handlers`` until the engine closes; none is
    dropped (the engine waits for this reader rather than lose an event)."""
    async with engine.events(buffer=EVENT_BUFFER, lossless=True) as stream:
        task_status.started()
        async for event in stream:
            for handle in handlers:
                handle(event)


def _flow_paths(flow: Flow) -> dict[str, str]:
    """The path of each flow in ``flow`` by name: the names of the flows nested one in
    the other down to it, ``checks`` or ``checks/inner``, and "" for ``flow`` itself.
    Events name a step's flow by its name only, so a name found at several places
    keeps the shallowest path."""
    paths = {flow.name: ""}
    level = [(flow, "")]
    while level:
        below = []
        for parent, prefix in level:
            for child in nested_flows(parent):
                if child.name not in paths:
                    paths[child.name] = prefix + child.name
                    below.append((child, paths[child.name] + "/"))
        level = below
    return paths


class NodeNames:
    """Names the node of each step event of a command's flow by its path: the node
    ``split`` of the flow ``checks`` nested in it is ``checks/split`` (see
    :func:`_flow_paths`; a flow it does not hold is named by its name). A Retry or
    Fallback event, which names no flow, gets the name its step started with."""

    def __init__(self, flow: Flow) -> None:
        self._paths = _flow_paths(flow)
        self._steps: dict[tuple[str, str], str] = {}
        """The name of each step in progress, by (run id, execution id)."""

    def of(self, event: StepEvent) -> str:
        """The name of the node of ``event``."""
        match event:
            case StepStarted():
                name = self._path(event.flow_name, event.node_id)
                self._steps[event.run_id, event.execution_id] = name
                return name
            case StepFinished():
                self._steps.pop((event.run_id, event.execution_id), None)
                return self._path(event.flow_name, event.node_id)
        return self._steps.get((event.run_id, event.execution_id), event.node_id)

    def _path(self, flow_name: str, node_id: str) -> str:
        prefix = self._paths.get(flow_name, flow_name)
        return f"{prefix}/{node_id}" if prefix else node_id


class Printer:
    """Prints each event on stderr (``--trace``), timed from its creation, with the
    node of a step named by its path in the flow (``checks/split``)."""

    def __init__(self, flow: Flow) -> None:
        self._origin = trio.current_time()
        self._names = NodeNames(flow)

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepEvent):
            event = dataclasses.replace(event, node_id=self._names.of(event))
        print(format_event(event, self._origin), file=sys.stderr)
