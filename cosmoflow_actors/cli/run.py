"""``cosmoflow run``: one run of a flow (or the resumption of a durable run) and its
outcome, for people or as JSON; with ``--runs N``, N runs at most ``--concurrency C``
at once, summarized (:mod:`.batch`); ``--trace`` prints their events (:mod:`.trace`).
Also ``--param`` and ``--run-id``, which ``submit`` takes as well."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from cosmoflow_actors.cli.batch import BatchStats, ProgressBar, print_summary
from cosmoflow_actors.cli.errors import CliError
from cosmoflow_actors.cli.loading import load_flow
from cosmoflow_actors.cli.output import dump_json, print_error
from cosmoflow_actors.cli.signals import trio_run
from cosmoflow_actors.cli.stores import first_unreadable, opened, parse_store, read_contents
from cosmoflow_actors.cli.trace import NodeNames, Printer, watch
from cosmoflow_actors.errors import RunRecordedError
from cosmoflow_actors.flow import Flow, FlowResult
from cosmoflow_actors.runtime.engine import Engine, open_engine
from cosmoflow_actors.runtime.run import Run
from cosmoflow_actors.storage import Storage
from cosmoflow_actors.tracing import describe_error


@dataclass(frozen=True, slots=True)
class _RunOptions:
    flow: Flow
    storage: Storage | None
    params: dict[str, Any]
    trace: bool
    run_id: str | None = None
    resume: bool = False


def run_command(args: argparse.Namespace) -> int:
    """``cosmoflow run``: run the flow once, or ``--runs N`` times, and print the
    outcome; return the exit status (1 when runs failed). Blocks until the runs end."""
    if args.concurrency is not None and args.runs is None:
        raise CliError("--concurrency needs --runs")
    if args.run_id is not None and args.runs is not None:
        raise CliError("--run-id names one run; it does not go with --runs")
    if args.resume and args.run_id is None:
        raise CliError("--resume needs --run-id")
    check_run_id(args.run_id)
    options = _RunOptions(
        load_flow(args.target),
        parse_store(args.store, args.codec),
        parse_params(args.param),
        args.trace,
        args.run_id,
        args.resume,
    )
    if args.runs is None:
        ended, store = trio_run(_run_once, options)
        if args.json or ended.error is None:
            print(_render(options.flow.name, ended, store, as_json=args.json))
        problem = first_unreadable(args.store, store)
        if problem is not None:
            print(f"cosmoflow: warning: {problem}", file=sys.stderr)
        if ended.error is not None:
            raise ended.error
        return 0
    concurrency = min(args.concurrency or 1, args.runs)
    batch = trio_run(_run_many, options, args.runs, concurrency)
    print_summary(batch, as_json=args.json)
    if batch.failed:
        assert batch.first_error is not None
        if args.debug:
            traceback.print_exception(batch.first_error)
        error = describe_error(batch.first_error)
        message = f"{batch.failed} of {batch.runs} runs failed; first: {error}"
        print_error(message)
        return 1
    return 0


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How one run ended: its result, or the error it failed with."""

    run_id: str | None
    result: FlowResult | None = None
    error: Exception | None = None


async def _run_once(options: _RunOptions) -> tuple[_Outcome, dict[str, Any]]:
    """Run the flow once; return how it ended and what its store holds afterwards."""
    store = _store(options)
    async with (
        trio.open_nursery() as nursery,
        open_engine() as engine,
        opened(engine, store) as handle,
    ):
        if options.trace:
            await nursery.start(watch, engine, [Printer(options.flow)])
        outcome = await _run_or_resume(engine, options, store)
        contents = await read_contents(handle)
    if isinstance(store, Storage):
        await store.aclose()
    return outcome, contents


async def _run_or_resume(
    engine: Engine, options: _RunOptions, store: Storage | dict[str, Any]
) -> _Outcome:
    """Run the flow (or resume the run ``--run-id``) to its end; blocks until it ends."""
    run_id = options.run_id
    try:
        if options.resume:
            assert run_id is not None
            result = await engine.resume(options.flow, store, run_id=run_id, params=options.params)
        else:
            run = await engine.start_run(options.flow, store, params=options.params, run_id=run_id)
            run_id = run.run_id
            result = await run.wait()
    except RunRecordedError as exc:
        raise CliError(_recorded(exc, options.flow)) from exc
    except Exception as exc:  # the run's own error, part of its outcome
        return _Outcome(run_id, error=exc)
    return _Outcome(result.run_id, result)


def _recorded(error: RunRecordedError, flow: Flow) -> str:
    """What to tell the person whose ``--run-id`` names a run of ``flow`` the store has
    recorded that the command cannot take, or a run of another flow."""
    if error.flow == flow.name:
        return f"run {error.run_id!r} is recorded as {error.state}: continue it with --resume"
    return str(error)


def _store(options: _RunOptions) -> Storage | dict[str, Any]:
    """The store of one run: the storage named, or a fresh dict for ``memory``."""
    return {} if options.storage is None else options.storage


def _render(flow_name: str, outcome: _Outcome, store: dict[str, Any], *, as_json: bool) -> str:
    """The outcome of one run, for people or (``as_json``) as JSON, failed or not."""
    if as_json:
        return dump_json(_outcome_json(flow_name, outcome, store))
    result = outcome.result
    assert result is not None
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


def _outcome_json(flow_name: str, outcome: _Outcome, store: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``--json``: those of a failed run that only a result has are null."""
    result = outcome.result
    error = None if outcome.error is None else describe_error(outcome.error)
    return {
        "flow": flow_name,
        "run_id": outcome.run_id,
        "success": result is not None,
        "error": error,
        "final_action": None if result is None else result.final_action.name,
        "result": None if result is None else result.result,
        "path": None if result is None else list(result.execution_path),
        "steps": None if result is None else result.steps_executed,
        "duration": None if result is None else round(result.duration, 6),
        "store": store,
    }


async def _run_many(options: _RunOptions, runs: int, concurrency: int) -> BatchStats:
    """Run the flow ``runs`` times, at most ``concurrency`` at once; measure them."""
    batch = BatchStats(options.flow.name, runs, concurrency, NodeNames(options.flow))
    started = trio.current_time()
    async with (
        trio.open_nursery() as nursery,
        open_engine(max_runs=concurrency) as engine,
        opened(engine, _store(options)),
    ):
        handlers = [batch.record, *([Printer(options.flow)] if options.trace else [])]
        await nursery.start(watch, engine, handlers)
        with ProgressBar(runs) as bar:
            await _start_and_wait(engine, options, batch, bar)
    batch.duration = trio.current_time() - started
    if options.storage is not None:
        await options.storage.aclose()
    return batch


async def _start_and_wait(
    engine: Engine, options: _RunOptions, batch: BatchStats, bar: ProgressBar
) -> None:
    """Start ``batch.runs`` runs (``start_run`` waits while ``max_runs`` are in flight)
    and wait for them all, counting each in ``batch`` and showing it on ``bar`` as it
    ends."""
    async with trio.open_nursery() as waiters:
        for _ in range(batch.runs):
            run = await engine.start_run(options.flow, _store(options), params=options.params)
            waiters.start_soon(_await_run, run, trio.current_time(), batch, bar)


async def _await_run(run: Run, started: float, batch: BatchStats, bar: ProgressBar) -> None:
    """Wait for ``run``, started at ``started``; count it."""
    error: Exception | None = None
    try:
        await run.wait()
    except Exception as exc:  # the run's failure, counted
        error = exc
    batch.finished(run.run_id, trio.current_time() - started, error)
    bar.show(batch)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """The params ``--param KEY=VALUE`` (given once for each item) names: VALUE parsed
    as JSON if it can be, else the text itself; CliError naming an item without KEY=."""
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


def check_run_id(run_id: str | None) -> None:
    """CliError when ``--run-id`` was given empty."""
    if run_id is not None and not run_id:
        raise CliError("--run-id must not be empty")
