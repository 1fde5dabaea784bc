"""The ``cosmoflow`` command (also ``python -m cosmoflow_actors``).

``cosmoflow run FILE.py[:NAME] [--param KEY=VALUE ...] [--json] [--debug]`` loads the
Python file, picks the Flow named NAME (or the only Flow defined in it), runs it once
on a fresh dict store with the params, and prints the outcome. Errors are one line on
stderr and a non-zero exit status; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cosmoflow_actors.flow import Flow, FlowResult


class CliError(Exception):
    """A problem the person running the command can fix; printed as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failed run, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        flow = load_flow(args.target)
        params = _parse_params(args.param)
    except CliError as exc:
        return _report(args, exc, status=2)
    try:
        store: dict[str, Any] = {}
        result = flow.run_sync(store, params=params)
    except Exception as exc:
        return _report(args, exc, status=1)
    print(_render(result, store, as_json=args.json))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosmoflow", description="Run cosmoflow_actors flows.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a flow defined in a Python file")
    run.add_argument("target", help="FILE.py or FILE.py:NAME (NAME: the Flow's variable)")
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter for the entry node (VALUE parsed as JSON if it can be)",
    )
    run.add_argument("--json", action="store_true", help="print the outcome as JSON")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def load_flow(target: str) -> Flow:
    """Load ``FILE.py[:NAME]`` and return the flow it names; raise CliError if it cannot."""
    path_text, _, name = target.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    try:
        namespace = runpy.run_path(str(path), run_name="__cosmoflow__")
    except Exception as exc:
        raise CliError(f"{path}: {type(exc).__name__}: {exc}") from exc
    flows = {key: value for key, value in namespace.items() if isinstance(value, Flow)}
    if name:
        if name not in flows:
            raise CliError(f"{path}: no Flow named {name!r} (found: {', '.join(flows) or 'none'})")
        return flows[name]
    if len(flows) != 1:
        found = ", ".join(flows) if flows else "none"
        raise CliError(f"{path}: expected exactly one Flow, found {found}; name one as {path}:NAME")
    return next(iter(flows.values()))


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise CliError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(text)
        except json.JSONDecodeError:
            params[key] = text
    return params


def _render(result: FlowResult, store: dict[str, Any], *, as_json: bool) -> str:
    outcome = {
        "flow": result.flow_name,
        "run_id": result.run_id,
        "final_action": result.final_action.name,
        "result": result.result,
        "path": list(result.execution_path),
        "steps": result.steps_executed,
        "duration": round(result.duration, 6),
        "store": store,
    }
    if as_json:
        return json.dumps(outcome, default=repr, indent=2)
    lines = [
        f"flow:         {result.flow_name}",
        f"final action: {result.final_action.name}",
        f"path:         {' -> '.join(result.execution_path)}",
        f"steps:        {result.steps_executed}",
        f"duration:     {result.duration * 1000:.1f} ms",
    ]
    if result.result is not None:
        lines.append(f"result:       {result.result!r}")
    return "\n".join(lines)


def _report(args: argparse.Namespace, error: Exception, *, status: int) -> int:
    if args.debug:
        traceback.print_exception(error)
    cause = (
        f" (caused by {type(error.__cause__).__name__}: {error.__cause__})"
        if error.__cause__
        else ""
    )
    print(f"cosmoflow: error: {error}{cause}", file=sys.stderr)
    return status
