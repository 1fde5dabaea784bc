"""Loading flows from ``FILE.py[:NAME]``: the file is imported under the name
``__cosmoflow__`` (a flow it runs meanwhile is an error), and the flow NAME, or without
NAME the file's one outer flow, is picked from the flows it defines."""

from __future__ import annotations

import runpy
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cosmoflow_actors.cli.errors import CliError
from cosmoflow_actors.cli.output import StdoutFailed
from cosmoflow_actors.errors import type_and_message, with_article
from cosmoflow_actors.flow import BatchFlow, Flow, refusing_runs


def load_flow(target: str) -> Flow:
    """Load ``FILE.py[:NAME]`` and return the flow it names; raise CliError if it cannot.

    Without NAME, the file must define exactly one Flow that no other Flow of the file
    contains (a nested flow, or a BatchFlow's flow, goes with its parent).
    """
    [flow] = load_flows([target])
    return flow


def load_flows(targets: Sequence[str]) -> list[Flow]:
    """The flows ``targets`` (``FILE.py[:NAME]`` each) name, as :func:`load_flow` finds
    them; a file that several targets name is imported once, for all of them."""
    modules: dict[Path, dict[str, Any]] = {}
    flows = []
    for target in targets:
        path, name = split_target(target)
        key = path.resolve()
        if key not in modules:
            modules[key] = _import_flows(path)
        flows.append(_pick_flow(path, name, modules[key]))
    return flows


def _import_flows(path: Path) -> dict[str, Any]:
    """Import the file ``path`` (blocks while its top level runs); return its top-level
    names. CliError when it is missing, raises, exits or runs a flow."""
    if path.is_dir():
        raise CliError(f"{path}: a folder, not a Python file")
    if not path.exists():
        raise CliError(f"{path}: no such file")
    if not path.is_file():
        raise CliError(f"{path}: not a regular file (a device, a pipe or a socket)")
    try:
        with refusing_runs():
            namespace = runpy.run_path(str(path), run_name="__cosmoflow__")
    except (KeyboardInterrupt, StdoutFailed):
        raise  # Ctrl-C, or stdout failing, while the file loads: as anywhere else
    except BaseException as exc:  # SystemExit too: a file that exits loads no flow
        where = _line_in(path, exc)
        raise CliError(f"{where}: {type_and_message(exc)}") from exc
    return namespace


def _pick_flow(path: Path, name: str, namespace: dict[str, Any]) -> Flow:
    """The flow ``NAME`` of the file ``path`` (whose top-level names are
    ``namespace``), or its one outer flow without a NAME."""
    flows = {key: value for key, value in namespace.items() if isinstance(value, Flow)}
    if name:
        found = ", ".join(flows) or "none"
        if name not in namespace:
            raise CliError(f"{path}: no Flow named {name!r} (found: {found})")
        if name not in flows:
            kind = with_article(type(namespace[name]).__name__)
            raise CliError(f"{path}: {name!r} is {kind}, not a Flow (found: {found})")
        return flows[name]
    inner = {id(child) for flow in flows.values() for child in _children(flow)}
    outer = [key for key, flow in flows.items() if id(flow) not in inner]
    if len(outer) != 1:
        found = ", ".join(outer) if outer else "none"
        raise CliError(f"{path}: expected exactly one Flow, found {found}; name one as {path}:NAME")
    return flows[outer[0]]


def split_target(target: str) -> tuple[Path, str]:
    """``FILE.py[:NAME]`` as (FILE, NAME or ""): the whole of ``target`` when it names an
    existing file (``co:lon.py``), else split at its last ``:``."""
    path_text, separator, name = target.rpartition(":")
    if Path(target).is_file() or not separator:
        return Path(target), ""
    return Path(path_text), name


def _line_in(path: Path, error: BaseException) -> str:
    """``PATH:LINE``, the line of the file ``path`` that ``error`` left last; ``PATH``
    alone when it did not pass through the file (a syntax error says where itself)."""
    where = str(path)
    for frame, line in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_filename == str(path):
            where = f"{path}:{line}"
    return where


def _children(flow: Flow) -> list[Flow]:
    """The flows nested in ``flow``, at any depth, each once (by identity) however many
    paths lead to it: a flow reused at every level of a deep nesting is walked once,
    not once per path (which would take time exponential in the depth)."""
    children: list[Flow] = []
    seen: set[int] = set()
    pending = [flow]
    while pending:
        for child in nested_flows(pending.pop()):
            if id(child) not in seen:
                seen.add(id(child))
                children.append(child)
                pending.append(child)
    return children


def nested_flows(flow: Flow) -> list[Flow]:
    """The flows nested in ``flow`` itself (as nodes, or as the flow of a BatchFlow
    node)."""
    children = []
    for member in flow.nodes.values():
        child = member.flow if isinstance(member, BatchFlow) else member
        if isinstance(child, Flow):
            children.append(child)
    return children
