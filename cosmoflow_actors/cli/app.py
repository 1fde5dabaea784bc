"""The ``cosmoflow`` command's entry point: :func:`main` parses the arguments, hands
them to the command's module, and turns what went wrong into one line on stderr and an
exit status (2 for bad input, 1 for runs that failed, 74 when stdout cannot be
written, 130 for Ctrl-C, 141 when the reader of stdout went away, 143 for SIGTERM on
``worker``). Arguments after
``--`` are the flow file's ``sys.argv`` while the command loads and runs it."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Final, get_args

from cosmoflow_actors import __version__
from cosmoflow_actors.cli.errors import CliError
from cosmoflow_actors.cli.forget import forget_command
from cosmoflow_actors.cli.inspect import graph_command, inspect_command
from cosmoflow_actors.cli.loading import split_target
from cosmoflow_actors.cli.output import StdoutFailed, checked_stdout, print_error
from cosmoflow_actors.cli.queue import (
    QUEUE_STATES,
    requeue_command,
    status_command,
    submit_command,
    worker_command,
)
from cosmoflow_actors.cli.run import run_command
from cosmoflow_actors.cli.signals import INTERRUPTED
from cosmoflow_actors.cli.stores import PYTHON_STORE, STORE_SYNTAX
from cosmoflow_actors.errors import error_text, told_causes
from cosmoflow_actors.runtime.queue import DEFAULT_FLOW_WAIT, DEFAULT_LEASE
from cosmoflow_actors.runtime.run_record import ENDED_STATES
from cosmoflow_actors.storage.codec import CodecName
from cosmoflow_actors.tracing import describe_error
from cosmoflow_actors.validation import positive_int

BROKEN_PIPE: Final = 141
"""The exit status when stdout is a pipe its reader closed (``| head``): 128 + 13
(SIGPIPE), as a shell reports a command that SIGPIPE killed."""

STDOUT_FAILED: Final = 74
"""The exit status when stdout cannot be written (a full disk): EX_IOERR of
sysexits.h."""

FORGET_USAGE: Final = (
    "cosmoflow forget [-h] [--debug] [--codec {json,pickle}] "
    "STORE (RUN_ID [RUN_ID ...] | --state {succeeded,failed} [--state ...])"
)
"""``forget``'s usage line: argparse would write the ids as required."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failed run, 2 bad input,
    74 stdout cannot be written, 130 interrupted, 141 stdout closed, 143 worker
    terminated). ``argv`` defaults to ``sys.argv[1:]``."""
    own, file_args = _split_file_args(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(own)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        with checked_stdout(), _file_argv(getattr(args, "target", None), file_args):
            return command(args)
    except Exception as exc:
        error = _leaf(exc)
        if isinstance(error, BrokenPipeError):
            return _stdout_closed()
        if isinstance(error, StdoutFailed):
            if args.debug:
                traceback.print_exception(error)
            print_error(str(error))
            return _stdout_closed(STDOUT_FAILED)
        return _report(args, error, status=2 if isinstance(error, CliError) else 1)
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is None:
            raise
        print("cosmoflow: interrupted", file=sys.stderr)
        return INTERRUPTED


def _stdout_closed(status: int = BROKEN_PIPE) -> int:
    """Stop writing to stdout, whose reader went away (``cosmoflow ... | head``) or
    which cannot be written: it becomes /dev/null, so that Python's flush at exit
    finds nothing to complain about; return ``status``."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return status


FILE_COMMANDS: Final = frozenset({"run", "graph", "submit"})
"""The commands that load a flow file: the arguments after their first ``--`` go to
the file (its ``sys.argv[1:]``). For the other commands ``--`` ends the options, as
usual: ``cosmoflow forget STORE -- -nightly`` names the run ``-nightly``."""


def _split_file_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The command's own arguments, and, for a command of :data:`FILE_COMMANDS`, those
    after the first ``--`` (for the file)."""
    arguments = list(argv)
    if not arguments or arguments[0] not in FILE_COMMANDS or "--" not in arguments:
        return arguments, []
    split = arguments.index("--")
    return arguments[:split], arguments[split + 1 :]


@contextlib.contextmanager
def _file_argv(target: str | None, file_args: list[str]) -> Iterator[None]:
    """Inside, ``sys.argv`` is what the flow file would see as a script: ``[FILE, *args]``
    (left alone for ``inspect``, which reads no file)."""
    if target is None:
        yield
        return
    saved = sys.argv
    sys.argv = [str(split_target(target)[0]), *file_args]
    try:
        yield
    finally:
        sys.argv = saved


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmoflow",
        description="Run cosmoflow_actors flows. For run, graph and submit, arguments "
        "after -- go to the flow file (its sys.argv[1:]).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    run = commands.add_parser("run", parents=[common], help="run a flow defined in a Python file")
    run.set_defaults(command=run_command)
    _add_target(run)
    _add_store(run, default="memory")
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter for the entry node (VALUE parsed as JSON if it can be)",
    )
    _add_batch(
        run,
        runs="run N times; print a summary",
        params_file="one run per line of FILE (- for stdin), a JSON object of params; "
        "print a summary",
    )
    run.add_argument(
        "--concurrency",
        type=positive_int,
        metavar="C",
        help="with --runs or --params-file: at most C at once (1)",
    )
    run.add_argument(
        "--run-id",
        metavar="ID",
        help="name the run; on a persistent --store it is durable (see docs/durability.md)",
    )
    run.add_argument(
        "--resume", action="store_true", help="with --run-id: continue the run ID if recorded"
    )
    run.add_argument("--trace", action="store_true", help="print every event on stderr")
    run.add_argument("--json", action="store_true", help="print the outcome as JSON")
    graph = commands.add_parser("graph", parents=[common], help="print a flow's diagram")
    graph.set_defaults(command=graph_command)
    _add_target(graph)
    graph.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    inspect = commands.add_parser("inspect", parents=[common], help="show a persistent store")
    inspect.set_defaults(command=inspect_command)
    _add_store(inspect, default=None)
    inspect.add_argument("--json", action="store_true", help="print the keys and values as JSON")
    inspect.add_argument(
        "--run", metavar="ID", help="show the durable run ID: its path and where its branches stand"
    )
    forget = commands.add_parser(
        "forget",
        parents=[common],
        usage=FORGET_USAGE,
        help="delete the records of durable runs that ended",
    )
    forget.set_defaults(command=forget_command)
    _add_store(forget, default=None)
    ids = forget.add_argument(
        "run_ids", nargs="+", default=[], metavar="RUN_ID", help="a run that ended"
    )
    # Optional (given --state there is none; forget_command requires one of them), yet
    # one or more: an optional list of ids would be taken, empty, with the store, and
    # the ids after an option (`STORE --codec json ID`) would be unrecognized.
    ids.required = False
    forget.add_argument(
        "--state",
        action="append",
        choices=ENDED_STATES,
        help="instead of RUN_IDs: every run recorded in this state (repeatable)",
    )
    _add_queue_commands(commands, common)
    return parser


def _add_queue_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """``submit``, ``worker``, ``requeue`` and ``status``: runs across processes
    (docs/distributed.md)."""
    submit = commands.add_parser("submit", parents=[common], help="add runs to a queue")
    submit.set_defaults(command=submit_command)
    _add_target(submit)
    _add_queue(submit)
    submit.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="as for run"
    )
    submit.add_argument(
        "--run-id",
        metavar="ID",
        help="name the run (default: a fresh id); with --runs or --params-file, ID-1, ID-2...",
    )
    _add_batch(
        submit,
        runs="submit N runs with the same params",
        params_file="submit one run per line of FILE (- for stdin), a JSON object of params",
    )
    worker = commands.add_parser("worker", parents=[common], help="run the runs of a queue")
    worker.set_defaults(command=worker_command)
    worker.add_argument("targets", nargs="+", metavar="target", help="FILE.py or FILE.py:NAME")
    _add_queue(worker)
    worker.add_argument(
        "--store",
        required=True,
        help="redis://HOST[:PORT][/DB][#PREFIX]: run R keeps its data in namespace PREFIX/R; "
        f"{PYTHON_STORE} or SCHEME:ARGUMENT: FACTORY(ARGUMENT, run_id=R) gives run R's store",
    )
    worker.add_argument(
        "--concurrency", type=positive_int, default=1, metavar="C", help="runs at once (1)"
    )
    worker.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE,
        metavar="SECONDS",
        help=f"how long a claim lasts unrenewed ({DEFAULT_LEASE:g})",
    )
    worker.add_argument(
        "--flow-wait",
        type=float,
        default=DEFAULT_FLOW_WAIT,
        metavar="SECONDS",
        help="how long a run whose flow (or a version of it that fits its record) no "
        "worker took waits before it fails "
        f"({DEFAULT_FLOW_WAIT:g})",
    )
    worker.add_argument("--name", help="the worker's name in the queue's status")
    again = commands.add_parser("requeue", parents=[common], help="put a failed run back")
    again.set_defaults(command=requeue_command)
    again.add_argument("run_id", metavar="RUN_ID", help="the failed run")
    _add_queue(again)
    status = commands.add_parser("status", parents=[common], help="show the runs of a queue")
    status.set_defaults(command=status_command)
    _add_queue(status)
    status.add_argument("--json", action="store_true", help="print the runs as JSON")
    status.add_argument(
        "--state",
        choices=(*QUEUE_STATES, "unreadable"),
        help="list only the runs in this state (all)",
    )


def _add_batch(parser: argparse.ArgumentParser, *, runs: str, params_file: str) -> None:
    """``--runs N`` and ``--params-file FILE`` (with their help), which do not go
    together: argparse refuses both (status 2), naming them."""
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--runs", type=positive_int, metavar="N", help=runs)
    batch.add_argument("--params-file", metavar="FILE", help=params_file)


def _add_queue(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", required=True, help="redis://HOST[:PORT][/DB]/NAME")


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="FILE.py or FILE.py:NAME (NAME: the Flow's variable)")


def _add_store(parser: argparse.ArgumentParser, default: str | None) -> None:
    if default is None:
        parser.add_argument("store", help=STORE_SYNTAX)
    else:
        parser.add_argument("--store", default=default, help=f"{STORE_SYNTAX} ({default})")
    parser.add_argument(
        "--codec",
        choices=get_args(CodecName),  # argparse's check makes args.codec a CodecName
        help="a persistent store's codec (json); given, a factory gets it as codec=CODEC",
    )


def _leaf(error: Exception) -> Exception:
    """The error inside a trio ExceptionGroup of one (an engine that crashed)."""
    while isinstance(error, ExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _report(args: argparse.Namespace, error: Exception, *, status: int) -> int:
    if args.debug:
        traceback.print_exception(error)
    text = error_text(error)
    told = told_causes(error)
    if len(told) > 1 and not isinstance(error, CliError):
        text += f" (caused by {describe_error(told[1])})"
    print_error(text)
    return status
