"""``cosmoflow graph`` (a flow's diagram, Mermaid or dot) and ``cosmoflow inspect`` (the
keys, values and durable runs of a persistent store, or one run in detail with
``--run``, see :mod:`~cosmoflow_actors.cli.run_view`, read without changing it)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Final

from outcome import Outcome
from rich.table import Table

from cosmoflow_actors.cli.errors import CliError
from cosmoflow_actors.cli.loading import load_flow
from cosmoflow_actors.cli.output import dump_json, plain, print_table
from cosmoflow_actors.cli.run_view import peeked_run, read_run, view_json, view_lines
from cosmoflow_actors.cli.signals import trio_run
from cosmoflow_actors.cli.stores import (
    Unreadable,
    Unshowable,
    described,
    existing_store,
    first_unreadable,
    json_form,
    listed_runs,
    opened,
    read_contents,
)
from cosmoflow_actors.diagram import to_dot, to_mermaid
from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.runtime.engine import open_engine
from cosmoflow_actors.runtime.run_record import RunRecord, checked_record, with_parents
from cosmoflow_actors.storage import FileStorage, SQLiteStorage, Storage
from cosmoflow_actors.storage import file as file_storage
from cosmoflow_actors.storage import sqlite as sqlite_storage
from cosmoflow_actors.storage.base import RECORD_PREFIX, RESERVED_PREFIX
from cosmoflow_actors.storage.codec import CodecName

PREVIEW_CHARS: Final = 60
"""``inspect`` shows at most this much of each value's repr."""


def graph_command(args: argparse.Namespace) -> int:
    """``cosmoflow graph``: print the diagram of the flow ``args.target`` names."""
    flow = load_flow(args.target)
    print(to_mermaid(flow) if args.format == "mermaid" else to_dot(flow), end="")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    """``cosmoflow inspect``: print the keys, values and durable runs of the store
    ``args.store``, a table each or JSON, or the run ``args.run`` in detail; CliError
    naming a value that cannot be read (after printing), or a run not recorded. Blocks
    while it reads the store."""
    storage = existing_store(args.store, args.codec, "inspect")
    name = described(args.store, storage)
    if args.run is not None:
        return _inspect_run(storage, name, args)
    if isinstance(storage, FileStorage | SQLiteStorage):
        contents, runs = _peek(storage, args.codec or "json")
    else:
        contents, runs = trio_run(_read_store, name, storage)
    shown = {key: _shown(value, as_json=args.json) for key, value in contents.items()}
    if args.json:
        report = {"store": name, "keys": shown, "runs": [dataclasses.asdict(r) for r in runs]}
        print(dump_json(report))
    else:
        print(f"store: {name}")
        print_table(_keys_table(contents, shown))
        print_table(_runs_table(runs))
    problem = first_unreadable(name, shown)
    if problem is not None:
        raise CliError(problem)
    return 0


def _inspect_run(storage: Storage, name: str, args: argparse.Namespace) -> int:
    """``cosmoflow inspect --run``: print the run ``args.run`` of ``storage`` (the store
    ``name``) in detail, as text or JSON. Blocks while it reads the store."""
    if isinstance(storage, FileStorage | SQLiteStorage):
        values = _peeked(storage, args.codec or "json")
        view = peeked_run(name, values, _runs(values, {}), args.run)
    else:
        view = trio_run(read_run, name, storage, args.run)
    print(dump_json(view_json(name, view)) if args.json else "\n".join(view_lines(name, view)))
    return 0


def _peek(
    storage: FileStorage | SQLiteStorage, codec: CodecName
) -> tuple[dict[str, Any], list[RunRecord]]:
    """Every key and value of a file or SQLite store and its durable runs, read without
    an engine, a lock or a write (blocks): inspecting changes no file. A value or run
    record that cannot be read is an Unreadable value (a record under its own key)."""
    values = _peeked(storage, codec)
    contents = {key: value for key, value in values.items() if not key.startswith(RESERVED_PREFIX)}
    return contents, _runs(values, contents)


def _peeked(storage: FileStorage | SQLiteStorage, codec: CodecName) -> dict[str, Any]:
    """Every key of a file or SQLite store, the engine's too, with its value, or an
    Unreadable value for one that cannot be read, read as :func:`_peek` says
    (blocks)."""
    peek = file_storage.peek if isinstance(storage, FileStorage) else sqlite_storage.peek
    try:
        entries = peek(storage.path, codec=codec)
    except StorageError as exc:
        raise CliError(f"cannot open the store: {exc}") from exc
    return {key: _value(entry) for key, entry in entries.items()}


def _runs(values: dict[str, Any], contents: dict[str, Any]) -> list[RunRecord]:
    """The durable runs whose records ``values`` hold, a record that cannot be read put
    in ``contents`` as an Unreadable value under its key."""
    runs = []
    for key, value in values.items():
        if key.startswith(RECORD_PREFIX):
            try:
                if isinstance(value, Unreadable):
                    raise value.error
                runs.append(RunRecord.of(checked_record(key, value)))
            except Exception as exc:  # undecodable, or not a record the engine wrote
                contents[key] = Unreadable(exc)
    return with_parents(runs)


def _value(entry: Outcome[Any]) -> Any:
    """The value ``entry`` holds, or Unreadable with the error it holds."""
    try:
        return entry.unwrap()
    except Exception as exc:
        return Unreadable(exc)


async def _read_store(name: str, storage: Storage) -> tuple[dict[str, Any], list[RunRecord]]:
    """Every key and value of ``storage`` (a Redis store, or one of the user's own; the
    store ``name``) and its durable runs, read through an engine (the runs of a queue's
    workers with their leases). CliError naming the store when its runs cannot be
    listed (a record the engine did not write)."""
    async with open_engine() as engine, opened(engine, storage) as handle:
        contents = await read_contents(handle)
        runs = await listed_runs(engine, storage, name)
    return contents, runs


def _runs_table(runs: list[RunRecord]) -> Table:
    """The table of ``runs``: "-" stands for a field that is None (the parent of a run that
    is no BatchFlow's child, the owner of a run no worker claimed, a lease not read, the
    error of a run that did not fail).
    A cell too wide for its column is folded onto more lines, never cut, so that an id
    is always there whole."""
    table = Table(title=f"runs ({len(runs)})", title_justify="left")
    columns = ("run id", "parent", "flow", "state", "last node", "steps", "owner", "lease left")
    for column in (*columns, "error"):
        table.add_column(column, overflow="fold")
    for run in runs:
        lease = "-" if run.lease_left is None else f"{run.lease_left:.1f} s"
        cells = (run.state, run.last_node_id or "-", str(run.steps), run.owner or "-", lease)
        ids = (run.run_id, run.parent_id or "-", run.flow_name)
        table.add_row(*plain(*ids, *cells, run.error or "-"))
    return table


def _keys_table(contents: dict[str, Any], shown: dict[str, Any]) -> Table:
    """The table of the keys of ``contents``, each value as :func:`_shown` shows it
    (``shown``)."""
    table = Table(title=f"keys ({len(contents)})", title_justify="left")
    table.add_column("key", overflow="fold")
    table.add_column("type")
    table.add_column("value", overflow="fold")
    for key, value in contents.items():
        kind = "unreadable" if isinstance(value, Unreadable) else type(value).__name__
        text = shown[key]
        table.add_row(*plain(key, kind, text if isinstance(text, str) else _preview(text)))
    return table


def _shown(value: Any, as_json: bool) -> Any:
    """What ``inspect`` shows of ``value``: its JSON form (``as_json``, see
    :func:`~cosmoflow_actors.cli.output.jsonable`) or its ``repr`` cut to
    :data:`PREVIEW_CHARS`. An Unreadable value is kept as it is; a value whose form
    cannot be made (its ``repr`` or its conversion to JSON text raises: an int of more
    digits than Python converts, a ``__repr__`` that raises) is Unshowable."""
    if as_json:
        return json_form(value)
    if isinstance(value, Unreadable):
        return value
    try:
        return _preview(value)
    except Exception as exc:
        return Unshowable(exc)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"
