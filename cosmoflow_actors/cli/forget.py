"""``cosmoflow forget``: delete the records of durable runs that have ended from a
persistent store (see ``Engine.forget_run``), the runs named or those recorded in the
states ``--state`` names."""

from __future__ import annotations

import argparse
from collections.abc import Collection

from cosmoflow_actors.cli.errors import CliError
from cosmoflow_actors.cli.output import print_warning
from cosmoflow_actors.cli.signals import trio_run
from cosmoflow_actors.cli.stores import (
    described,
    existing_store,
    listed_runs,
    opened,
    unknown_run,
)
from cosmoflow_actors.errors import RunRecordedError, StorageError
from cosmoflow_actors.runtime.engine import Engine, open_engine
from cosmoflow_actors.runtime.run_record import ENDED_STATES, EndedState, RunRecord
from cosmoflow_actors.storage import Storage
from cosmoflow_actors.storage.base import batch_parent


def forget_command(args: argparse.Namespace) -> int:
    """``cosmoflow forget``: forget the runs ``args.run_ids`` of the store
    ``args.store``, in order, or, with ``args.state``, every run recorded in one of those
    states; print each id once its records are deleted (a BatchFlow's child,
    whose records went with its parent's, right after it). Blocks while the store is
    read and written.

    RUN_IDs and ``--state`` together, or neither, is a CliError. A run named that cannot
    be forgotten (no record, still running, a BatchFlow's child of a recorded run, a
    record the engine did not write) is a CliError; the runs before it stay forgotten.
    A run listed in a state ``--state`` names that is recorded otherwise by its turn
    (another process resumed or forgot it) is skipped with a warning on stderr."""
    store, run_ids = args.store, args.run_ids
    if run_ids and args.state:
        raise CliError("forget takes RUN_IDs or --state, not both")
    if not run_ids and not args.state:
        raise CliError("forget needs the RUN_IDs to forget, or --state succeeded|failed")
    storage = existing_store(store, args.codec, "forget")
    name = described(store, storage)
    if args.state:
        trio_run(_forget_in_states, name, storage, frozenset(args.state))
    else:
        trio_run(_forget, name, storage, run_ids)
    return 0


async def _forget(name: str, storage: Storage, run_ids: list[str]) -> None:
    forgotten: set[str] = set()
    async with open_engine() as engine, opened(engine, storage):
        for run_id in run_ids:
            if not _forgotten_with_parent(run_id, forgotten):
                await _forget_one(engine, name, storage, run_id)
                forgotten.add(run_id)
            print(run_id, flush=True)


async def _forget_in_states(name: str, storage: Storage, states: Collection[EndedState]) -> None:
    """Forget the runs of ``storage`` (the store ``name``) that ``list_runs`` gives in one
    of ``states`` and that are no BatchFlow's child of a recorded run, in its order;
    print each id forgotten, then those of its children listed (gone with it)."""
    forgotten: set[str] = set()
    async with open_engine() as engine, opened(engine, storage):
        for run in await listed_runs(engine, storage, name):
            gone = _forgotten_with_parent(run.run_id, forgotten)
            if not gone and run.parent_id is None and run.state in states:
                gone = await _forget_listed(engine, name, storage, run, states)
            if gone:
                forgotten.add(run.run_id)
                print(run.run_id, flush=True)


async def _forget_one(engine: Engine, name: str, storage: Storage, run_id: str) -> None:
    """Forget the run ``run_id`` of ``storage`` (the store ``name``); CliError when it
    cannot be."""
    try:
        found = await _forget_recorded(engine, name, storage, run_id)
    except RunRecordedError as exc:
        raise CliError(_refused(name, run_id, exc)) from exc
    if not found:
        raise unknown_run(name, run_id)


async def _forget_listed(
    engine: Engine, name: str, storage: Storage, run: RunRecord, states: Collection[EndedState]
) -> bool:
    """Forget ``run``, as ``list_runs`` gave it from ``storage`` (the store ``name``), if
    it is still recorded in one of ``states``; return whether it was. A run recorded
    otherwise now (resumed since) or no more (forgotten since) is kept, or left gone,
    with a warning on stderr."""
    listed = f"{name}: run {run.run_id!r}, listed as {run.state}"
    try:
        found = await _forget_recorded(engine, name, storage, run.run_id, states)
    except RunRecordedError as exc:
        print_warning(f"{listed}, is kept: it is recorded as {exc.state} now")
        return False
    if not found:
        print_warning(f"{listed}, is no longer recorded")
    return found


async def _forget_recorded(
    engine: Engine,
    name: str,
    storage: Storage,
    run_id: str,
    states: Collection[EndedState] = ENDED_STATES,
) -> bool:
    """``engine.forget_run(storage, run_id, states=states)``; a store that fails it is a
    CliError naming ``name`` and the run."""
    try:
        return await engine.forget_run(storage, run_id, states=states)
    except (StorageError, ValueError) as exc:
        raise CliError(f"{name}: cannot forget run {run_id!r}: {exc}") from exc


def _forgotten_with_parent(run_id: str, forgotten: set[str]) -> bool:
    """Whether ``run_id`` is of a BatchFlow child (``job:2/0``, ``job:2/0:1/1``) of a run
    in ``forgotten``, whose children's records went with its own: ``inspect`` lists the
    children after their parent, so a list of the ids it shows names them after it."""
    parent = batch_parent(run_id)
    while parent is not None:
        if parent in forgotten:
            return True
        parent = batch_parent(parent)
    return False


def _refused(name: str, run_id: str, error: RunRecordedError) -> str:
    """What ``forget`` says of the run ``run_id`` of the store ``name`` that
    ``forget_run`` refused with ``error``: how to finish a run recorded as running, or
    the engine's reason for any other."""
    if error.state != "running":
        return f"{name}: {error}"
    return (
        f"{name}: run {run_id!r} is recorded as running: finish it first "
        f"(cosmoflow run FILE.py --store STORE --run-id ID --resume)"
    )
