"""``cosmoflow forget``: delete the records of durable runs that have ended from a
persistent store (see ``Engine.forget_run``)."""

from __future__ import annotations

import argparse

from cosmoflow_actors.cli.errors import CliError
from cosmoflow_actors.cli.signals import trio_run
from cosmoflow_actors.cli.stores import described, existing_store, opened
from cosmoflow_actors.errors import RunRecordedError, StorageError
from cosmoflow_actors.runtime.engine import Engine, open_engine
from cosmoflow_actors.storage import Storage
from cosmoflow_actors.storage.base import batch_parent


def forget_command(args: argparse.Namespace) -> int:
    """``cosmoflow forget``: forget the runs ``args.run_ids`` of the store
    ``args.store``, in order, printing each id once its records are deleted (a
    BatchFlow's child named after its parent, whose records went with the parent's, at
    once). The first run that cannot be forgotten (no record, still running, a
    BatchFlow's child of a recorded run, a record the engine did not write) is a
    CliError; the runs before it stay forgotten. Blocks while the store is read and
    written."""
    storage = existing_store(args.store, args.codec, "forget")
    trio_run(_forget, described(args.store, storage), storage, args.run_ids)
    return 0


async def _forget(name: str, storage: Storage, run_ids: list[str]) -> None:
    forgotten: set[str] = set()
    async with open_engine() as engine, opened(engine, storage):
        for run_id in run_ids:
            if not _forgotten_with_parent(run_id, forgotten):
                await _forget_one(engine, name, storage, run_id)
                forgotten.add(run_id)
            print(run_id, flush=True)


async def _forget_one(engine: Engine, name: str, storage: Storage, run_id: str) -> None:
    """Forget the run ``run_id`` of ``storage`` (the store ``name``); CliError when it
    cannot be."""
    try:
        found = await engine.forget_run(storage, run_id)
    except RunRecordedError as exc:
        raise CliError(_refused(name, run_id, exc)) from exc
    except (StorageError, ValueError) as exc:
        raise CliError(f"{name}: cannot forget run {run_id!r}: {exc}") from exc
    if not found:
        raise CliError(f"{name}: no run {run_id!r} is recorded")


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
