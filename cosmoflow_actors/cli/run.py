"""``cosmoflow run``: one run of a flow (or the resumption of a durable run) and its
outcome, for people or as JSON; with ``--runs N`` (or one run per line of
``--params-file``), the runs at most ``--concurrency C`` at once, summarized
(:mod:`.batch`), also when Ctrl-C stops them; ``--trace`` prints their events
(:mod:`.trace`). Also ``--param``, ``--params-file`` and ``--run-id``, which ``submit``
takes as well."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

import trio

from cosmoflow_actors.cli.batch import BatchStats, ProgressBar, print_summary
from cosmoflow_actors.cli.errors import CliError
from cosmoflow_actors.cli.loading import load_flow
from cosmoflow_actors.cli.output import dump_json, print_error, print_warning
from cosmoflow_actors.cli.signals import INTERRUPTED, trio_run
from cosmoflow_actors.cli.stores import (
    Unshowable,
    first_unreadable,
    json_form,
    opened,
    parse_store,
    read_contents,
    repr_form,
)
from cosmoflow_actors.cli.trace import NodeNames, Printer, watch
from cosmoflow_actors.errors import RunRecordedError, type_and_message, with_article
from cosmoflow_actors.flow import Flow, FlowResult
from cosmoflow_actors.runtime.engine import Engine, open_engine
from cosmoflow_actors.runtime.run import Run, RunState
from cosmoflow_actors.storage import Storage
from cosmoflow_actors.tracing import describe_error, one_line


@dataclass(frozen=True, slots=True)
class _RunOptions:
    flow: Flow
    storage: Storage | None
    params: dict[str, Any]
    trace: bool
    run_id: str | None = None
    resume: bool = False


def run_command(args: argparse.Namespace) -> int:
    """``cosmoflow run``: run the flow once, or ``--runs N`` times (once per line of
    ``--params-file``), and print the outcome; return the exit status (1 when runs
    failed, 130 when Ctrl-C stopped the runs). Blocks until the runs end."""
    _check_options(args)
    # Bad params are refused before the flow's file is imported (its top level runs).
    params = parse_params(args.param)
    lines = None if args.params_file is None else read_params_lines(args.params_file)
    options = _RunOptions(
        load_flow(args.target),
        parse_store(args.store, args.codec),
        params,
        args.trace,
        args.run_id,
        args.resume,
    )
    if lines is not None:
        return _run_batch(options, len(lines), map(json.loads, lines), args)
    if args.runs is not None:
        return _run_batch(options, args.runs, itertools.repeat({}, args.runs), args)
    return _run_one(options, args)


def _check_options(args: argparse.Namespace) -> None:
    """CliError for options of ``run`` that do not go together (argparse refuses
    ``--runs`` with ``--params-file``)."""
    batch = "--runs" if args.params_file is None else "--params-file"
    if args.concurrency is not None and args.runs is None and args.params_file is None:
        raise CliError("--concurrency needs --runs or --params-file")
    if args.run_id is not None and (args.runs is not None or args.params_file is not None):
        raise CliError(f"--run-id names one run; it does not go with {batch}")
    if args.resume and args.run_id is None:
        raise CliError("--resume needs --run-id")
    check_run_id(args.run_id)


def _run_one(options: _RunOptions, args: argparse.Namespace) -> int:
    """Run the flow once and print its outcome; return 0, or raise the run's error."""
    ended, store = trio_run(_run_once, options)
    if args.json:
        store = {key: json_form(value) for key, value in store.items()}
    if args.json or ended.error is None:
        print(_render(options.flow.name, ended, store, as_json=args.json))
    if ended.result is not None:
        _warn_if_unshowable(ended.result.result, as_json=args.json)
    problem = first_unreadable(args.store, store)
    if problem is not None:
        print_warning(problem)
    if ended.error is not None:
        raise ended.error
    return 0


def _warn_if_unshowable(result: Any, *, as_json: bool) -> None:
    """Say on stderr why the run's ``result`` was shown as ``<cannot be shown: ...>``,
    if it was."""
    shown = json_form(result) if as_json else repr_form(result)
    if isinstance(shown, Unshowable):
        print_warning(f"the run's result cannot be shown: {shown.why}")


def _run_batch(
    options: _RunOptions, runs: int, each: Iterable[dict[str, Any]], args: argparse.Namespace
) -> int:
    """Run the flow ``runs`` times, once per item of ``each`` (params that go over those
    of ``--param``), at most ``--concurrency`` at once, and print the summary, also when
    Ctrl-C stopped them (see :class:`_Stop`); return the exit status."""
    concurrency = min(args.concurrency or 1, runs)
    batch = BatchStats(options.flow.name, runs, concurrency, NodeNames(options.flow))
    stop = _Stop()
    trio_run(_run_many, options, each, batch, stop, on_interrupt=stop)
    print_summary(batch, as_json=args.json)
    if batch.failed:
        _report_failures(batch, debug=args.debug)
    if batch.interrupted:
        print("cosmoflow: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 1 if batch.failed else 0


def _report_failures(batch: BatchStats, *, debug: bool) -> None:
    """Print on stderr how many runs of ``batch`` failed and the first error (its
    traceback too, with ``debug``)."""
    assert batch.first_error is not None
    if debug:
        traceback.print_exception(batch.first_error)
    error = describe_error(batch.first_error)
    if batch.interrupted:
        counted = f"{batch.failed} of the {batch.started} runs started failed"
    else:
        counted = f"{batch.failed} of {batch.runs} runs failed"
    print_error(f"{counted}; first: {error}")


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
    lines += _result_lines(result.result)
    return "\n".join(one_line(line) for line in lines)


def _result_lines(result: Any) -> list[str]:
    """The lines that show a run's result: none for None; a str of several lines as
    those lines, indented under ``result:`` (a rendered table, a report); anything else
    as its repr on one line."""
    if result is None:
        return []
    if isinstance(result, str) and "\n" in result.strip("\n"):
        return ["result:", *(f"  {line}" for line in result.strip("\n").split("\n"))]
    return [f"result:       {repr_form(result)}"]


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
        "result": None if result is None else json_form(result.result),
        "path": None if result is None else list(result.execution_path),
        "steps": None if result is None else result.steps_executed,
        "duration": None if result is None else round(result.duration, 6),
        "store": store,
    }


class _Stop:
    """What Ctrl-C does to ``--runs`` (called on the trio thread, see
    :func:`~cosmoflow_actors.cli.signals.trio_run`): no run starts after it, and the runs
    in flight are cancelled, each ending as a cancelled run with its events, so that the
    command ends with a summary of what it knows. Never blocks."""

    def __init__(self) -> None:
        self.requested = False
        self.starting = trio.CancelScope()
        """Where the runs are started; cancelled by the interrupt."""
        self.in_flight: set[Run] = set()

    def __call__(self) -> None:
        self.requested = True
        self.starting.cancel()
        for run in list(self.in_flight):
            run.cancel()


async def _run_many(
    options: _RunOptions, each: Iterable[dict[str, Any]], batch: BatchStats, stop: _Stop
) -> None:
    """Run the flow once per item of ``each`` (see :func:`_start_and_wait`), at most
    ``batch.concurrency`` at once, or until ``stop``; measure the runs in ``batch``.
    Blocks until they end and the command has read all their events."""
    started = trio.current_time()
    async with (
        trio.open_nursery() as nursery,
        open_engine(max_runs=batch.concurrency) as engine,
        opened(engine, _store(options)),
    ):
        handlers = [batch.record, *([Printer(options.flow)] if options.trace else [])]
        await nursery.start(watch, engine, handlers)
        with ProgressBar(batch.runs) as bar:
            await _start_and_wait(engine, options, each, _Counting(batch, bar, stop))
    batch.duration = trio.current_time() - started
    batch.interrupted = stop.requested
    if options.storage is not None:
        await options.storage.aclose()


@dataclass(frozen=True, slots=True)
class _Counting:
    """Where a run of ``--runs`` is counted as it ends: in ``batch``, on ``bar``; and
    ``stop``, which cancels it if Ctrl-C comes while it is in flight."""

    batch: BatchStats
    bar: ProgressBar
    stop: _Stop


async def _start_and_wait(
    engine: Engine, options: _RunOptions, each: Iterable[dict[str, Any]], counting: _Counting
) -> None:
    """Start a run per item of ``each``, its params over those of ``--param``, taking
    the item as the run starts (``start_run`` waits while ``max_runs`` are in flight),
    until they are all started or Ctrl-C stops the starting, and wait for those
    started, counting each as it ends."""
    async with trio.open_nursery() as waiters:
        with counting.stop.starting:
            for extra in each:
                params = {**options.params, **extra}
                run = await engine.start_run(options.flow, _store(options), params=params)
                counting.stop.in_flight.add(run)
                counting.batch.started += 1
                waiters.start_soon(_await_run, run, trio.current_time(), counting)


async def _await_run(run: Run, started: float, counting: _Counting) -> None:
    """Wait for ``run``, started at ``started``; count it, as cancelled if Ctrl-C
    cancelled it."""
    error: Exception | None = None
    try:
        await run.wait()
    except Exception as exc:  # the run's failure, counted
        error = exc
    counting.stop.in_flight.discard(run)
    batch = counting.batch
    if counting.stop.requested and run.current_state is RunState.CANCELLED:
        batch.cancelled += 1
    else:
        batch.finished(run.run_id, trio.current_time() - started, error)
    counting.bar.show(batch)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """The params ``--param KEY=VALUE`` (given once for each item) names: VALUE parsed
    as JSON if it can be, else the text itself; CliError naming an item without KEY=,
    or whose JSON Python cannot read (nested too deep, an int of too many digits)."""
    params: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise CliError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(text)
        except json.JSONDecodeError:
            params[key] = text
        except RecursionError as exc:
            raise CliError(f"--param {key!r}: its JSON is nested too deep to read") from exc
        except ValueError as exc:  # an int past Python's digit limit
            raise CliError(f"--param {key!r}: its JSON cannot be read: {exc}") from exc
    return params


def check_run_id(run_id: str | None) -> None:
    """CliError when ``--run-id`` was given empty."""
    if run_id is not None and not run_id:
        raise CliError("--run-id must not be empty")


def read_params_file(name: str) -> list[dict[str, Any]]:
    """The params of each run in the file ``name`` (``-``: stdin), those of the lines
    :func:`read_params_lines` gives (for ``submit``). Blocks while it reads."""
    return [json.loads(line) for line in read_params_lines(name)]


def read_params_lines(name: str) -> list[str]:
    """The lines of the file ``name`` (``-``: stdin) that give a run's params, each
    checked to be a JSON object (``json.loads`` of the line gives the params), blank
    lines skipped and a UTF-8 BOM allowed; CliError naming the first line that is not
    one, or when there are none. Reads a line at a time and keeps only the lines, which
    take less memory than their params. Blocks while it reads."""
    label = "<stdin>" if name == "-" else name
    try:
        with _open_params(name) as lines:
            runs = [
                line
                for number, line in enumerate(lines, start=1)
                if _gives_a_run(label, number, line)
            ]
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"--params-file {label}: {type_and_message(exc)}") from exc
    if not runs:
        raise CliError(f"--params-file {label}: no runs (expected a JSON object of params a line)")
    return runs


def _open_params(name: str) -> TextIO:
    """The params file ``name`` opened as UTF-8 text that skips a BOM (``-``: stdin,
    which closing it leaves open)."""
    if name == "-":
        return open(sys.stdin.fileno(), encoding="utf-8-sig", closefd=False)
    return open(name, encoding="utf-8-sig")


def _gives_a_run(label: str, number: int, line: str) -> bool:
    """Whether ``line`` gives a run: not when it is blank; CliError naming
    ``label:number`` when it is not a JSON object of params."""
    if not line.strip():
        return False
    try:
        params = json.loads(line, parse_constant=_no_constant)
    except ValueError as exc:
        raise CliError(f"{label}:{number}: not JSON: {exc}") from exc
    except RecursionError as exc:
        raise CliError(f"{label}:{number}: its JSON is nested too deep to read") from exc
    if not isinstance(params, dict):
        kind = with_article(type(params).__name__)
        raise CliError(f"{label}:{number}: expected a JSON object of params, got {kind}")
    return True


def _no_constant(name: str) -> NoReturn:
    """Refuse ``NaN`` and the infinities, which Python's JSON reader accepts and neither
    a run queue nor ``--json`` output can hold."""
    raise ValueError(f"{name} is not JSON")
