"""The commands of a run queue on Redis (docs/distributed.md): ``submit`` adds runs,
``worker`` runs them until Ctrl-C or SIGTERM (and hands back those it has), ``status``
shows them and ``requeue`` puts a failed one back."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Final

import trio
from rich.table import Table

from cosmoflow_actors.cli.errors import CliError
from cosmoflow_actors.cli.loading import load_flow, load_flows
from cosmoflow_actors.cli.output import StdoutConsole, dump_json, plain, print_table
from cosmoflow_actors.cli.run import check_run_id, parse_params, read_params_file
from cosmoflow_actors.cli.signals import STOP_GRACE, TERMINATED, Deadline, trio_run
from cosmoflow_actors.cli.stores import worker_stores
from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.flow import Flow
from cosmoflow_actors.runtime.engine import open_engine
from cosmoflow_actors.runtime.queue import (
    DEFAULT_FLOW_WAIT,
    DEFAULT_LEASE,
    FINISHED,
    HAND_BACK_SECONDS,
    MAX_LEASE,
    PerRunRedis,
    QueuedRun,
    RunQueue,
    RunStores,
    queue_status,
    requeue,
    submit,
)
from cosmoflow_actors.storage import RedisStorage
from cosmoflow_actors.storage.redis import shared_client

QUEUE_STATES: Final = ("pending", "running", "orphaned", "succeeded", "failed")
"""The states ``status`` counts a queue's runs by, even when none is in them (it counts
"unreadable" runs only when there are some)."""
STORE_CHECK_TIMEOUT: Final = 5.0
"""How long ``worker`` waits for its ``--store``'s server to answer at start."""


def _queue(
    text: str, lease: float = DEFAULT_LEASE, flow_wait: float = DEFAULT_FLOW_WAIT
) -> RunQueue:
    try:
        return RunQueue.from_url(text, lease=lease, flow_wait=flow_wait)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _queue_error(queue: RunQueue, error: StorageError) -> CliError:
    """The line for a queue whose server could not be reached, or whose server
    answered with an error (a key of another type, a read-only replica...). Without the
    redis package, the error's own line, which names the extra to install."""
    if isinstance(error.__cause__, ImportError):
        return CliError(str(error))
    from redis import exceptions as redis_errors

    if isinstance(error.__cause__, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return CliError(f"cannot reach the queue: {error}")
    return CliError(f"queue {queue.address}: {error}")


def submit_command(args: argparse.Namespace) -> int:
    """``cosmoflow submit``: add the runs of the flow ``args.target`` to the queue and
    print their run ids. Blocks on the queue's server."""
    check_run_id(args.run_id)
    submissions = _submissions(args)  # bad params are refused before the file is imported
    flow = load_flow(args.target)
    queue = _queue(args.queue)
    trio_run(_submit_all, queue, flow.name, submissions)
    return 0


@dataclass(frozen=True, slots=True)
class _Submission:
    """One run ``submit`` adds: its run id (None for a fresh one) and its params."""

    run_id: str | None
    params: dict[str, Any]


def _submissions(args: argparse.Namespace) -> list[_Submission]:
    """The runs ``submit`` adds: one, ``--runs N`` alike, or one per line of
    ``--params-file`` (its params over those of ``--param``). With several, ``--run-id
    ID`` names them ``ID-1``, ``ID-2``... Reads the params file (blocks)."""
    params = parse_params(args.param)
    if args.params_file is not None:
        each = read_params_file(args.params_file)
    elif args.runs is not None:
        each = [{} for _ in range(args.runs)]
    else:
        return [_Submission(args.run_id, params)]
    submissions = []
    for number, extra in enumerate(each, start=1):
        run_id = None if args.run_id is None else f"{args.run_id}-{number}"
        submissions.append(_Submission(run_id, {**params, **extra}))
    return submissions


async def _submit_all(queue: RunQueue, flow_name: str, submissions: list[_Submission]) -> None:
    """Submit each run in order and print its run id as the queue has it (blocks on
    the server). If one fails, the error says how many went in before it."""
    done = 0
    try:
        for submission in submissions:
            params, run_id = submission.params, submission.run_id
            print(await submit(queue, flow_name, params=params, run_id=run_id), flush=True)
            done += 1
    except StorageError as exc:
        raise _stopped(_queue_error(queue, exc), done, len(submissions)) from exc
    except ValueError as exc:  # a param the queue cannot hold, or a run id it has
        raise _stopped(CliError(str(exc)), done, len(submissions)) from exc
    finally:
        await queue.aclose()


def _stopped(error: CliError, done: int, total: int) -> CliError:
    """``error``, saying for a batch how many of its runs were submitted before it."""
    if total == 1:
        return error
    if done == 0:
        return CliError(f"{error} (none of the {total} runs submitted)")
    return CliError(f"{error} ({done} of {total} runs submitted; their ids are on stdout)")


def requeue_command(args: argparse.Namespace) -> int:
    """``cosmoflow requeue``: put the failed run ``args.run_id`` back on the queue and
    print its id. Blocks on the queue's server."""
    queue = _queue(args.queue)
    trio_run(_requeue, queue, args.run_id)
    print(args.run_id)
    return 0


async def _requeue(queue: RunQueue, run_id: str) -> None:
    try:
        await requeue(queue, run_id)
    except StorageError as exc:
        raise _queue_error(queue, exc) from exc
    except ValueError as exc:  # not on the queue, or not failed
        raise CliError(str(exc)) from exc
    finally:
        await queue.aclose()


def worker_command(args: argparse.Namespace) -> int:
    """``cosmoflow worker``: run the queue's runs of the flows ``args.targets`` until
    SIGTERM, then return :data:`~cosmoflow_actors.cli.signals.TERMINATED` (Ctrl-C raises
    KeyboardInterrupt). Blocks while it serves."""
    if not 0 < args.lease <= MAX_LEASE:
        raise CliError(
            f"--lease must be > 0 seconds and at most {MAX_LEASE:g} (a week), got {args.lease:g}"
        )
    if not args.flow_wait >= 0:
        raise CliError(f"--flow-wait must be >= 0 seconds, got {args.flow_wait:g}")
    if args.name == "":
        raise CliError("--name must not be empty (leave it out for a generated name)")
    flows = _distinct_flows(args.targets)
    queue = _queue(args.queue, args.lease, args.flow_wait)
    stores = worker_stores(args.store)
    grace = HAND_BACK_SECONDS + STOP_GRACE
    terminating = Deadline(grace, TERMINATED, "terminated")
    try:
        trio_run(_serve, queue, flows, stores, args, terminating, grace=grace)
    finally:
        terminating.disarm()
    print("cosmoflow: terminated", file=sys.stderr)
    return TERMINATED


def _distinct_flows(targets: list[str]) -> list[Flow]:
    """The flows ``targets`` name; CliError when two share a name (a queued run names
    its flow by name, so a worker serves one flow per name)."""
    by_name: dict[str, str] = {}
    flows = load_flows(targets)
    for target, flow in zip(targets, flows, strict=True):
        if flow.name in by_name:
            raise CliError(
                f"{by_name[flow.name]} and {target} both give a flow named {flow.name!r};"
                " a worker serves one flow per name"
            )
        by_name[flow.name] = target
    return flows


async def _serve(
    queue: RunQueue,
    flows: list[Flow],
    stores: RunStores,
    args: argparse.Namespace,
    terminating: Deadline,
) -> None:
    """Serve ``queue`` until SIGTERM (then return) or Ctrl-C (KeyboardInterrupt); say
    on stdout once the worker reads it. Stopped either way, the worker cancels its runs
    and hands them back to the queue: blocks a couple of seconds at most for that (a
    SIGTERM arms ``terminating``, in case a run does not stop)."""
    if isinstance(stores, PerRunRedis):
        await _check_store_reachable(stores)
    with trio.open_signal_receiver(signal.SIGTERM) as terminations:
        async with open_engine() as engine, trio.open_nursery() as nursery:
            options = {"concurrency": args.concurrency, "name": args.name}
            try:
                name = await nursery.start(
                    lambda task_status: engine.serve(
                        queue, flows, stores, **options, task_status=task_status
                    )
                )
            except StorageError as exc:
                raise _queue_error(queue, exc) from exc
            except ConnectionError as exc:
                raise _ray_error(exc) from exc
            names = ", ".join(flow.name for flow in flows)
            print(f"worker {name} serving {queue.name} (flows: {names})", flush=True)
            async for _ in terminations:
                terminating.arm()
                nursery.cancel_scope.cancel()
                break


def _ray_error(error: ConnectionError) -> CliError:
    """The line for a worker that cannot reach the Ray cluster of its flows' "ray"
    nodes, saying where the address came from: RAY_ADDRESS, the only way a worker
    learns it."""
    if "RAY_ADDRESS" in os.environ:
        return CliError(f"{error} (from RAY_ADDRESS)")
    return CliError(str(error))


async def _check_store_reachable(stores: PerRunRedis) -> None:
    """Raise CliError unless the Redis server of ``worker --store`` answers a PING
    (within :data:`STORE_CHECK_TIMEOUT`): a worker that cannot reach its store would
    claim runs only to hand them back. Without the redis package, the error names the
    extra to install. Writes nothing."""
    name = repr(RedisStorage(stores.url, namespace=stores.prefix))
    try:
        await trio.to_thread.run_sync(_ping, stores.url, abandon_on_cancel=True)
    except StorageError as exc:
        if isinstance(exc.__cause__, ImportError):
            raise CliError(str(exc)) from exc
        raise CliError(f"cannot reach the store {name}: {exc}") from exc


def _ping(url: str) -> None:
    """PING the Redis server at ``url`` (blocks); StorageError when it does not answer."""
    client = shared_client(url, STORE_CHECK_TIMEOUT, "worker --store")
    from redis.exceptions import RedisError

    try:
        client.ping()
    except RedisError as exc:
        raise StorageError(str(exc)) from exc


def status_command(args: argparse.Namespace) -> int:
    """``cosmoflow status``: print the queue's runs, counted by state and listed (those
    in ``args.state`` only, when given), a table or JSON. Blocks on the queue's server."""
    queue = _queue(args.queue)
    runs = trio_run(_read_status, queue)
    listed = [run for run in runs if args.state in (None, run.state)]
    if args.json:
        print(dump_json([dataclasses.asdict(run) for run in listed]))
        return 0
    counts = dict.fromkeys(QUEUE_STATES, 0)
    for run in runs:
        counts[run.state] = counts.get(run.state, 0) + 1
    print(f"queue: {queue!r}")
    print(", ".join(f"{count} {state}" for state, count in counts.items()))
    waiting = [run for run in runs if run.passed_over and run.state not in FINISHED]
    if waiting:
        names = ", ".join(sorted({name for run in waiting for name in run.passed_over}))
        print(f"{len(waiting)} wait for a worker with their flow (passed over by {names})")
    print_table(_queue_table(listed))
    console = StdoutConsole(highlight=False)
    for run in listed:
        if run.error is not None:
            console.print(f"{run.run_id} {run.state}: {run.error}", markup=False, soft_wrap=True)
    return 0


async def _read_status(queue: RunQueue) -> list[QueuedRun]:
    try:
        return await queue_status(queue)
    except StorageError as exc:
        raise _queue_error(queue, exc) from exc
    finally:
        await queue.aclose()


def _queue_table(runs: list[QueuedRun]) -> Table:
    table = Table(title=f"runs ({len(runs)})", title_justify="left")
    for column in ("run id", "flow", "state", "owner", "lease left", "attempts"):
        table.add_column(column)
    for run in runs:
        lease = "-" if run.lease_left is None else f"{run.lease_left:.1f} s"
        cells = (run.flow_name, run.state, run.owner or "-", lease, str(run.attempts))
        table.add_row(*plain(run.run_id, *cells))
    return table
