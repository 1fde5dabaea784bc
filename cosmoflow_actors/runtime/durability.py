"""Durable runs: the record a run keeps in its store, and rebuilding a run from it.

A durable run (a ``run_id`` on a persistent storage) keeps one record under
``__cosmoflow__/runs/<run_id>``. It is written when the run starts, with each step's
writes in the same commit as the step finishes, and when the run ends. Records are
plain JSON, so every codec can store them; store keys under ``__cosmoflow__/`` are
hidden from ``keys()``, ``size()`` and ``clear()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cosmoflow_actors.action import Action
from cosmoflow_actors.errors import CosmoFlowError
from cosmoflow_actors.flow import Flow, FlowResult
from cosmoflow_actors.runtime.run import Branch, Frame, Run
from cosmoflow_actors.storage.base import RECORD_PREFIX, Storage


def record_key(run_id: str) -> str:
    """The store key of ``run_id``'s record."""
    return RECORD_PREFIX + run_id


@dataclass(frozen=True, slots=True)
class RunRecord:
    """What a store says about one durable run (see :func:`list_runs`).

    ``state`` is "running" (in flight, or interrupted by a crash or a cancel),
    "succeeded" or "failed"; ``last_node_id`` is the node of the last committed step.
    """

    run_id: str
    flow_name: str
    state: str
    last_node_id: str | None
    steps: int

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> RunRecord:
        last = record.get("last")
        return cls(
            run_id=record["run_id"],
            flow_name=record["flow"],
            state=record["state"],
            last_node_id=None if last is None else last["node"],
            steps=len(record["path"]),
        )


def started(run: Run, params: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a run that has not completed a step yet."""
    return {
        "run_id": run.run_id,
        "flow": run.flow.name,
        "state": "running",
        "params": dict(params),
        "path": [],
        "last": None,
        "result": None,
        "error": None,
    }


def step_done(
    record: Mapping[str, Any], run: Run, branch: Branch, node_id: str, action: Action
) -> dict[str, Any]:
    """``record`` after the step at ``node_id`` returned the (resolved) ``action``."""
    return {
        **record,
        "path": list(run.path),
        "last": {
            "node": node_id,
            "frames": [[frame.node_id, frame.steps] for frame in branch.frames],
            "action": _encode_action(action),
        },
    }


def succeeded(record: Mapping[str, Any], result: FlowResult) -> dict[str, Any]:
    """``record`` of a run that ended with ``result``."""
    return {
        **record,
        "state": "succeeded",
        "path": list(result.execution_path),
        "result": {
            "final_action": _encode_action(result.final_action),
            "last_node_id": result.last_node_id,
            "value": result.result,
            "duration": result.duration,
        },
    }


def failed(record: Mapping[str, Any], error: BaseException) -> dict[str, Any]:
    """``record`` of a run that failed with ``error``."""
    return {**record, "state": "failed", "error": f"{type(error).__name__}: {error}"}


def recorded_result(record: Mapping[str, Any], storage: Storage) -> FlowResult:
    """The FlowResult of a run whose record says it succeeded."""
    result = record["result"]
    path = tuple(record["path"])
    return FlowResult(
        run_id=record["run_id"],
        flow_name=record["flow"],
        final_action=_decode_action(result["final_action"]),
        last_node_id=result["last_node_id"],
        steps_executed=len(path),
        execution_path=path,
        result=result["value"],
        success=True,
        duration=result["duration"],
        store=storage,
    )


def restore(run: Run, record: Mapping[str, Any]) -> tuple[Branch, str, Action] | None:
    """Put ``run`` back where its record says; return (branch, node id, action) of the
    last committed step, or None when no step had completed.

    Raises CosmoFlowError when the record does not fit the flow (it was changed).
    """
    if record["flow"] != run.flow.name:
        raise CosmoFlowError(
            f"run {run.run_id!r} belongs to flow {record['flow']!r}, not {run.flow.name!r}"
        )
    run.path.extend(record["path"])
    run.steps = len(run.path)
    last = record["last"]
    if last is None:
        return None
    run.main = Branch(_frames(run.flow, last["frames"], run.run_id))
    return run.main, last["node"], _decode_action(last["action"])


def _frames(flow: Flow, saved: list[list[Any]], run_id: str) -> list[Frame]:
    frames: list[Frame] = []
    current: Flow | None = flow
    for node_id, steps in saved:
        if current is None or node_id not in current.nodes:
            raise CosmoFlowError(f"run {run_id!r}: its record names a node the flow lacks")
        frames.append(Frame(current, node_id, steps))
        inner = current.nodes[node_id]
        current = inner if isinstance(inner, Flow) else None
    return frames


def _encode_action(action: Action) -> dict[str, Any]:
    return {
        "name": action.name,
        "params": dict(action.params),
        "complete": action.is_complete,
        "result": action.result,
    }


def _decode_action(data: Mapping[str, Any]) -> Action:
    if data["complete"]:
        return Action.complete(data["result"])
    return Action.with_params(data["name"], **data["params"])
