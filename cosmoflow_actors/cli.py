"""The ``cosmoflow`` command (also ``python -m cosmoflow_actors``).

- ``cosmoflow run FILE.py[:NAME]`` runs a flow defined in a Python file once, or
  ``--runs N`` times with at most ``--concurrency C`` at once, on a ``--store``, and
  prints the outcome (a summary per node for several runs); ``--trace`` prints every
  event on stderr as it happens.
- ``cosmoflow graph FILE.py[:NAME]`` prints the flow's diagram (Mermaid or dot).
- ``cosmoflow inspect STORE`` lists the keys of a persistent store.
- ``--store`` takes the built-in stores, or one of the user's own:
  ``python:MODULE:FACTORY[:ARGUMENT]``, or ``SCHEME:ARGUMENT`` for a scheme a package
  declares in the entry point group ``cosmoflow_actors.storage``.
- ``cosmoflow submit FILE.py[:NAME] --queue URL`` adds runs to a run queue on Redis,
  ``cosmoflow worker FILE.py[:NAME]... --queue URL --store URL`` runs the queue's runs,
  ``cosmoflow status --queue URL`` shows them, ``cosmoflow requeue RUN_ID --queue URL``
  puts a failed one back (see docs/distributed.md).

Arguments after ``--`` go to the file: while the command loads and runs it, ``sys.argv``
is ``[FILE, *arguments]``. The file is imported under the name ``__cosmoflow__``, and a
flow it runs while it is imported (outside ``if __name__ == "__main__":``) is an error.

Errors are one line on stderr and a non-zero exit status: 2 for bad input (a file, a
flow, a store, an option), 1 for runs that failed, 130 for Ctrl-C (within
:data:`STOP_GRACE` seconds; a second one exits at once), 141 when the reader of stdout
went away (``| head``), 143 for SIGTERM on ``worker`` (which hands its runs back to the
queue either way); ``--debug`` shows the traceback. ``inspect`` changes nothing, and
``--json`` prints strict JSON. docs/cli.md has every option and example outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import importlib.metadata
import json
import math
import os
import re
import runpy
import signal
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from inspect import signature
from pathlib import Path
from types import FrameType
from typing import Any, Final, NoReturn, TypeVar, TypeVarTuple

import trio
from outcome import Outcome
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cosmoflow_actors import __version__
from cosmoflow_actors.diagram import to_dot, to_mermaid
from cosmoflow_actors.errors import RunRecordedError, StorageError, error_text, type_and_message
from cosmoflow_actors.events import (
    Event,
    EventsDropped,
    Fallback,
    Retry,
    RunCancelled,
    RunFailed,
    RunFinished,
    StepFinished,
    StepStarted,
)
from cosmoflow_actors.flow import BatchFlow, Flow, FlowResult, refusing_runs
from cosmoflow_actors.progress import Progress as EngineProgress
from cosmoflow_actors.runtime.durability import RunRecord, checked_record
from cosmoflow_actors.runtime.engine import Engine, open_engine
from cosmoflow_actors.runtime.queue import (
    DEFAULT_FLOW_WAIT,
    DEFAULT_LEASE,
    FINISHED,
    HAND_BACK_SECONDS,
    PerRunRedis,
    QueuedRun,
    RunQueue,
    RunStores,
    per_run_redis,
    queue_status,
    requeue,
    submit,
)
from cosmoflow_actors.runtime.run import Run
from cosmoflow_actors.runtime.store_client import SharedStore
from cosmoflow_actors.storage import FileStorage, RedisStorage, SQLiteStorage, Storage
from cosmoflow_actors.storage import file as file_storage
from cosmoflow_actors.storage import sqlite as sqlite_storage
from cosmoflow_actors.storage.base import RECORD_PREFIX, RESERVED_PREFIX
from cosmoflow_actors.storage.redis import shared_client
from cosmoflow_actors.tracing import describe_error, format_event
from cosmoflow_actors.validation import positive_int

EVENT_BUFFER: Final = 100_000
"""Events ``--runs`` keeps for its summary before it drops some (and says so)."""
PREVIEW_CHARS: Final = 60
"""``inspect`` shows at most this much of each value's repr."""
PYTHON_STORE: Final = "python:MODULE:FACTORY[:ARGUMENT]"
"""``--store`` for a backend of the user's own: ``FACTORY(ARGUMENT)`` returns the Storage."""
STORE_SYNTAX: Final = (
    "memory, file:PATH, sqlite:PATH, redis://HOST[:PORT][/DB][#NAMESPACE], "
    f"{PYTHON_STORE} or SCHEME:ARGUMENT (a scheme an installed package declares)"
)
WORKER_STORE_SYNTAX: Final = (
    f"redis://HOST[:PORT][/DB][#PREFIX], {PYTHON_STORE} or SCHEME:ARGUMENT"
    " (a scheme an installed package declares)"
)
STORAGE_GROUP: Final = "cosmoflow_actors.storage"
"""The entry point group in which a package declares a ``--store`` scheme of its own:
``SCHEME = "module:factory"``, where ``factory(ARGUMENT)`` returns a Storage."""
RESERVED_SCHEMES: Final = frozenset({"memory", "file", "sqlite", "redis", "rediss", "python"})
"""The schemes of the built-in stores, which no package's scheme replaces."""
SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+")
"""A scheme name, as in a URL, of two characters at least: ``C:`` is a drive letter."""
QUEUE_STATES: Final = ("pending", "running", "orphaned", "succeeded", "failed")
"""The states ``status`` counts a queue's runs by, even when none is in them (it counts
"unreadable" runs only when there are some)."""
INTERRUPTED: Final = 130
"""The exit status after Ctrl-C (SIGINT): 128 + 2, as a shell reports it."""
TERMINATED: Final = 143
"""The exit status of ``worker`` stopped by SIGTERM: 128 + 15, as a shell reports it."""
BROKEN_PIPE: Final = 141
"""The exit status when stdout is a pipe its reader closed (``| head``): 128 + 13
(SIGPIPE), as a shell reports a command that SIGPIPE killed."""
STOP_GRACE: Final = 1.0
"""Seconds a command that was interrupted (Ctrl-C) waits for its runs to stop before it
exits without them (a worker waits :data:`HAND_BACK_SECONDS` longer, to hand its runs
back; for SIGTERM too)."""
FLUSH_WAIT: Final = 0.2
"""Seconds a command that exits at once waits for stdout and stderr to be flushed."""
STORE_CHECK_TIMEOUT: Final = 5.0
"""How long ``worker`` waits for its ``--store``'s server to answer at start."""

StepEvent = StepStarted | StepFinished | Retry | Fallback
"""The events of one step, which name its node."""

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class CliError(Exception):
    """A problem the person running the command can fix; printed as one line."""


class _StdoutConsole(Console):
    """rich's Console on stdout, where a reader that went away (``| head``) raises
    BrokenPipeError for :func:`main` to handle, not rich's ``SystemExit(1)``."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failed run, 2 bad input,
    130 interrupted, 141 stdout closed, 143 worker terminated). ``argv`` defaults to
    ``sys.argv[1:]``."""
    own, file_args = _split_file_args(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(own)
    if file_args and not hasattr(args, "target"):
        parser.error(f"arguments after -- go to a flow file; {own[0]} runs no file")
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        with _file_argv(getattr(args, "target", None), file_args):
            return command(args)
    except Exception as exc:
        error = _leaf(exc)
        if isinstance(error, BrokenPipeError):
            return _stdout_closed()
        return _report(args, error, status=2 if isinstance(error, CliError) else 1)
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is None:
            raise
        print("cosmoflow: interrupted", file=sys.stderr)
        return INTERRUPTED


def _stdout_closed() -> int:
    """Exit quietly when the reader of stdout went away (``cosmoflow ... | head``):
    stdout becomes /dev/null, so that Python's flush at exit finds nothing to
    complain about; return :data:`BROKEN_PIPE`."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return BROKEN_PIPE


def _trio_run(function: Callable[[*Ts], Awaitable[T]], *args: *Ts, grace: float = STOP_GRACE) -> T:
    """``trio.run(function, *args)``, where Ctrl-C ends the process ``grace`` seconds on
    at the latest, and a second Ctrl-C at once (see :func:`_interrupts_end`)."""
    deadline = _Deadline(grace, INTERRUPTED, "interrupted")
    try:
        return trio.run(_interrupts_end, deadline, function, *args)
    finally:
        deadline.disarm()


async def _interrupts_end(
    deadline: _Deadline, function: Callable[[*Ts], Awaitable[T]], *args: *Ts
) -> T:
    """``await function(*args)``. The first Ctrl-C (SIGINT) goes to trio's handler as
    always: the command cancels its runs and waits for them to stop. It also arms
    ``deadline``: a step that does not stop (a call on a thread executor, code that
    ignores the cancellation) keeps the command no longer than that. A second Ctrl-C
    prints ``cosmoflow: interrupted`` and exits at once, with status 130 (the process
    ends there: nothing is cleaned up)."""
    trio_handler = signal.getsignal(signal.SIGINT)
    if (
        threading.current_thread() is not threading.main_thread()
        or not callable(trio_handler)
        or trio_handler is signal.default_int_handler  # trio did not take SIGINT over
    ):
        return await function(*args)

    def handler(signum: int, frame: FrameType | None) -> None:
        if deadline.armed:
            _exit_now(INTERRUPTED, "cosmoflow: interrupted")
        deadline.arm()
        trio_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        return await function(*args)
    finally:
        signal.signal(signal.SIGINT, trio_handler)


class _Deadline:
    """Ends the process ``grace`` seconds after :meth:`arm`, unless :meth:`disarm` comes
    first, with ``status`` and the line ``cosmoflow: WORD (...)``. A command that stops
    (Ctrl-C, a worker's SIGTERM) cancels its runs and waits for them, but a step in a
    thread cannot be cancelled and may never end. For the runs, the exit is a crash: a
    durable run resumes after its last committed step."""

    def __init__(self, grace: float, status: int, word: str) -> None:
        self._grace = grace
        self._status = status
        self._line = (
            f"cosmoflow: {word} (stopped without waiting for a step still running"
            f" after {grace:g} s)"
        )
        self._timer: threading.Timer | None = None

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def arm(self) -> None:
        """Start counting (in a daemon thread, which the trio thread cannot block)."""
        if self._timer is None:
            self._timer = threading.Timer(self._grace, _exit_now, (self._status, self._line))
            self._timer.daemon = True
            self._timer.start()

    def disarm(self) -> None:
        """Stop counting: the command stopped in time."""
        if self._timer is not None:
            self._timer.cancel()


def _exit_now(status: int, line: str) -> NoReturn:
    """Flush what can be flushed within :data:`FLUSH_WAIT`, write ``line`` on stderr and
    end the process now, with ``status`` (called from a signal handler or a timer's
    thread: the line is a raw write)."""
    flushing = threading.Thread(target=_flush_output, daemon=True)
    flushing.start()
    flushing.join(FLUSH_WAIT)  # a pipe nobody reads, or a lock the trio thread holds
    with contextlib.suppress(OSError):
        os.write(2, line.encode() + b"\n")
    os._exit(status)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _split_file_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The command's own arguments, and those after the first ``--`` (for the file)."""
    arguments = list(argv)
    if "--" not in arguments:
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
    sys.argv = [str(_split_target(target)[0]), *file_args]
    try:
        yield
    finally:
        sys.argv = saved


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmoflow",
        description="Run cosmoflow_actors flows. Arguments after -- go to the flow file "
        "(its sys.argv[1:]).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    run = commands.add_parser("run", parents=[common], help="run a flow defined in a Python file")
    run.set_defaults(command=_run_command)
    _add_target(run)
    _add_store(run, default="memory")
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter for the entry node (VALUE parsed as JSON if it can be)",
    )
    run.add_argument("--runs", type=positive_int, metavar="N", help="run N times; print a summary")
    run.add_argument(
        "--concurrency", type=positive_int, metavar="C", help="with --runs: at most C at once (1)"
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
    graph.set_defaults(command=_graph_command)
    _add_target(graph)
    graph.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    inspect = commands.add_parser("inspect", parents=[common], help="show a persistent store")
    inspect.set_defaults(command=_inspect_command)
    _add_store(inspect, default=None)
    inspect.add_argument("--json", action="store_true", help="print the keys and values as JSON")
    _add_queue_commands(commands, common)
    return parser


def _add_queue_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """``submit``, ``worker``, ``requeue`` and ``status``: runs across processes
    (docs/distributed.md)."""
    submit = commands.add_parser("submit", parents=[common], help="add runs to a queue")
    submit.set_defaults(command=_submit_command)
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
    submit.add_argument(
        "--runs", type=positive_int, metavar="N", help="submit N runs with the same params"
    )
    submit.add_argument(
        "--params-file",
        metavar="FILE",
        help="submit one run per line of FILE (- for stdin), a JSON object of params",
    )
    worker = commands.add_parser("worker", parents=[common], help="run the runs of a queue")
    worker.set_defaults(command=_worker_command)
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
        help="how long a run whose flow no worker took waits before it fails "
        f"({DEFAULT_FLOW_WAIT:g})",
    )
    worker.add_argument("--name", help="the worker's name in the queue's status")
    again = commands.add_parser("requeue", parents=[common], help="put a failed run back")
    again.set_defaults(command=_requeue_command)
    again.add_argument("run_id", metavar="RUN_ID", help="the failed run")
    _add_queue(again)
    status = commands.add_parser("status", parents=[common], help="show the runs of a queue")
    status.set_defaults(command=_status_command)
    _add_queue(status)
    status.add_argument("--json", action="store_true", help="print the runs as JSON")
    status.add_argument(
        "--state",
        choices=(*QUEUE_STATES, "unreadable"),
        help="list only the runs in this state (all)",
    )


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
        choices=["json", "pickle"],
        help="a persistent store's codec (json); given, a factory gets it as codec=CODEC",
    )


# Loading flows and stores


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
    modules: dict[Path, dict[str, Flow]] = {}
    flows = []
    for target in targets:
        path, name = _split_target(target)
        key = path.resolve()
        if key not in modules:
            modules[key] = _import_flows(path)
        flows.append(_pick_flow(path, name, modules[key]))
    return flows


def _import_flows(path: Path) -> dict[str, Flow]:
    """Import the file ``path`` (blocks while its top level runs); return its flows by
    variable name. CliError when it is missing, raises, exits or runs a flow."""
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    try:
        with refusing_runs():
            namespace = runpy.run_path(str(path), run_name="__cosmoflow__")
    except KeyboardInterrupt:
        raise  # Ctrl-C while the file loads: interrupted, as anywhere else
    except BaseException as exc:  # SystemExit too: a file that exits loads no flow
        where = _line_in(path, exc)
        raise CliError(f"{where}: {type_and_message(exc)}") from exc
    return {key: value for key, value in namespace.items() if isinstance(value, Flow)}


def _pick_flow(path: Path, name: str, flows: dict[str, Flow]) -> Flow:
    """The flow ``NAME`` of the file ``path``, or its one outer flow without a NAME."""
    if name:
        if name not in flows:
            raise CliError(f"{path}: no Flow named {name!r} (found: {', '.join(flows) or 'none'})")
        return flows[name]
    inner = {id(child) for flow in flows.values() for child in _children(flow)}
    outer = [key for key, flow in flows.items() if id(flow) not in inner]
    if len(outer) != 1:
        found = ", ".join(outer) if outer else "none"
        raise CliError(f"{path}: expected exactly one Flow, found {found}; name one as {path}:NAME")
    return flows[outer[0]]


def _split_target(target: str) -> tuple[Path, str]:
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
    """The flows nested in ``flow``, at any depth."""
    children = []
    for child in _nested(flow):
        children += [child, *_children(child)]
    return children


def _nested(flow: Flow) -> list[Flow]:
    """The flows nested in ``flow`` itself (as nodes, or as the flow of a BatchFlow
    node)."""
    children = []
    for member in flow.nodes.values():
        child = member.flow if isinstance(member, BatchFlow) else member
        if isinstance(child, Flow):
            children.append(child)
    return children


def _flow_paths(flow: Flow) -> dict[str, str]:
    """The path of each flow in ``flow`` by name: the names of the flows nested one in
    the other down to it, ``checks`` or ``checks/inner``, and "" for ``flow`` itself.
    Events name a step's flow by its name only, so a name found at several places
    keeps the shallowest path."""
    paths = {flow.name: ""}
    level = [(flow, "")]
    while level:
        below = []
        for parent, prefix in level:
            for child in _nested(parent):
                if child.name not in paths:
                    paths[child.name] = prefix + child.name
                    below.append((child, paths[child.name] + "/"))
        level = below
    return paths


def parse_store(text: str, codec: str | None = None) -> Storage | None:
    """The storage ``--store TEXT`` names; None for ``memory`` (a fresh dict per run).
    ``codec`` is that of ``--codec``, None when it was not given (a built-in store's is
    then ``json``). A store of the user's own is built now: blocks while its module is
    imported and its factory runs. CliError naming what is wrong."""
    kind, separator, rest = text.partition(":")
    if text == "memory":
        return None
    if kind in ("file", "sqlite") and separator and rest:
        backend = FileStorage if kind == "file" else SQLiteStorage
        return backend(rest, codec=codec or "json")
    if kind in ("redis", "rediss") and rest.startswith("//"):
        url, _, namespace = text.partition("#")
        return RedisStorage(url, namespace=namespace or "default", codec=codec or "json")
    custom = custom_store(text, STORE_SYNTAX)
    if custom is None:
        raise CliError(f"store {text!r}: expected {STORE_SYNTAX}")
    return custom.build_now({} if codec is None else {"codec": codec})


@dataclass(frozen=True, slots=True)
class CustomStore:
    """A storage backend of the user's own that ``--store`` names: its factory (a
    function or class) and the argument to call it with (None: called without one)."""

    label: str
    """How errors name the store: ``store 'TEXT'``, and the package of a scheme."""
    reference: str
    """The factory as ``module:name``."""
    factory: Callable[..., object]
    argument: str | None

    def call_text(self, keywords: dict[str, str]) -> str:
        """The call, for people: ``module:name('ARGUMENT', codec='pickle')``."""
        arguments = [] if self.argument is None else [repr(self.argument)]
        arguments += [f"{key}={value!r}" for key, value in keywords.items()]
        return f"{self.reference}({', '.join(arguments)})"

    def check_call(self, keywords: dict[str, str]) -> None:
        """CliError unless the factory's signature takes the argument and ``keywords``
        (a factory whose signature Python cannot read is taken as it is)."""
        try:
            parameters = signature(self.factory)
        except (TypeError, ValueError):  # a builtin without a signature: the call will tell
            return
        try:
            parameters.bind(*self.arguments(), **keywords)
        except TypeError as exc:
            raise CliError(f"{self.label}: cannot call {self.call_text(keywords)}: {exc}") from exc

    def arguments(self) -> list[str]:
        return [] if self.argument is None else [self.argument]

    def build(self, keywords: dict[str, str]) -> Storage:
        """Call the factory with the argument and ``keywords``; blocks while it runs.
        Raises what the factory raises, and TypeError when it returns no Storage."""
        made = self.factory(*self.arguments(), **keywords)
        return _as_storage(self.call_text(keywords), made)

    def build_now(self, keywords: dict[str, str]) -> Storage:
        """:meth:`build`, where whatever goes wrong is a CliError naming the store."""
        self.check_call(keywords)
        call = self.call_text(keywords)
        try:
            made = self.factory(*self.arguments(), **keywords)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a factory that exits builds nothing
            raise CliError(f"{self.label}: {call} raised {type_and_message(exc)}") from exc
        try:
            return _as_storage(call, made)
        except TypeError as exc:
            raise CliError(f"{self.label}: {exc}") from exc


def _as_storage(call: str, made: object) -> Storage:
    """``made``, what ``call`` returned; TypeError saying so unless it is a Storage."""
    if not isinstance(made, Storage):
        kind = "None" if made is None else _a(type(made).__name__)
        raise TypeError(f"{call} returned {kind}, not a Storage")
    return made


def _a(noun: str) -> str:
    """``noun`` after its indefinite article: ``a dict``, ``an int``."""
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


@dataclass(frozen=True, slots=True)
class PerRunStores:
    """A worker's stores from a factory of the user's own: run R's store is
    ``FACTORY(ARGUMENT, run_id=R)``. A factory that raises, or returns no Storage,
    fails that run alone."""

    custom: CustomStore

    def __call__(self, run_id: str) -> Storage:
        return self.custom.build({"run_id": run_id})


def custom_store(text: str, expected: str) -> CustomStore | None:
    """The store of the user's own that ``text`` names: ``python:MODULE:FACTORY[:ARGUMENT]``,
    or ``SCHEME:ARGUMENT`` for a scheme an installed package declares (in the entry point
    group :data:`STORAGE_GROUP`). None when ``text`` has neither form (nor that of a
    scheme), or names a built-in scheme; CliError when it names one that cannot be
    loaded, or a scheme no package declares (saying the command ``expected`` this).
    Blocks while the factory's module is imported."""
    scheme, separator, rest = text.partition(":")
    if scheme == "python" and separator:
        return _python_store(text, rest)
    if not separator or scheme in RESERVED_SCHEMES or not SCHEME.fullmatch(scheme):
        return None
    return _declared_store(text, scheme, rest, expected)


def _python_store(text: str, reference: str) -> CustomStore:
    """The store ``python:MODULE:FACTORY[:ARGUMENT]`` names (``reference`` is what follows
    ``python:``); ARGUMENT is the rest, colons and all."""
    module, _, rest = reference.partition(":")
    name, given, argument = rest.partition(":")
    label = f"store {text!r}"
    if not (_dotted(module) and _dotted(name)):
        problem = "MODULE and FACTORY are dotted Python names"
        raise CliError(f"{label}: expected {PYTHON_STORE}, where {problem}")
    factory = _load_factory(label, module, name)
    return CustomStore(label, f"{module}:{name}", factory, argument if given else None)


def _declared_store(text: str, scheme: str, argument: str, expected: str) -> CustomStore:
    """The store ``SCHEME:ARGUMENT`` names, for a scheme an installed package declares.
    CliError when none does or several do, or its factory cannot be loaded."""
    points = importlib.metadata.entry_points(group=STORAGE_GROUP, name=scheme)
    if not points:
        raise CliError(
            f"store {text!r}: no installed package declares the scheme {scheme!r}"
            f" (entry point group {STORAGE_GROUP}); expected {expected}"
        )
    packages = sorted(point.dist.name if point.dist else point.value for point in points)
    if len(packages) > 1:
        raise CliError(
            f"store {text!r}: the scheme {scheme!r} is declared by several packages:"
            f" {', '.join(packages)}"
        )
    [point] = points
    label = f"store {text!r} (scheme {scheme!r} of {packages[0]})"
    if not (_dotted(point.module) and _dotted(point.attr or "")):
        raise CliError(f"{label}: the entry point {point.value!r} is not module:factory")
    factory = _load_factory(label, point.module, point.attr)
    return CustomStore(label, f"{point.module}:{point.attr}", factory, argument)


def _dotted(name: str) -> bool:
    """Whether ``name`` is a dotted Python name (``package.module``, ``Class.method``)."""
    return all(part.isidentifier() for part in name.split("."))


def _load_factory(label: str, module_name: str, name: str) -> Callable[..., object]:
    """The callable ``name`` (dotted) of the module ``module_name``, imported now (blocks
    while its top level runs). CliError when the module is not found or raises, lacks
    an attribute, or the object is not callable."""
    try:
        found: object = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: a module that exits gives no factory
        raise CliError(f"{label}: {_import_failure(module_name, exc)}") from exc
    parts = name.split(".")
    for depth, part in enumerate(parts):
        try:
            found = getattr(found, part)
        except AttributeError as exc:
            owner = ".".join(parts[:depth])
            where = f"{module_name}:{owner}" if owner else f"module {module_name!r}"
            raise CliError(f"{label}: {where} has no attribute {part!r}") from exc
    if not callable(found):
        kind = _a(type(found).__name__)
        raise CliError(f"{label}: {module_name}:{name} is {kind}, not a function or class")
    return found


def _import_failure(module_name: str, error: BaseException) -> str:
    """Why importing ``module_name`` failed: the module (or its package) is not found, or
    its code raised ``error`` (a module it imports not found included)."""
    missing = error.name if isinstance(error, ModuleNotFoundError) else None
    if missing is not None and (module_name + ".").startswith(missing + "."):
        return f"no module named {missing!r}"
    return f"importing {module_name} raised {type_and_message(error)}"


def _describe_store(text: str, storage: Storage) -> str:
    """How to name the store to people: as given, but a Redis URL without its password."""
    return repr(storage) if isinstance(storage, RedisStorage) else text


@contextlib.asynccontextmanager
async def _opened(engine: Engine, store: Storage | dict[str, Any]) -> AsyncIterator[SharedStore]:
    """``engine.open_store(store)``: the store is opened now, so that one that cannot be
    is bad input (CliError), not a failed run, and stays open for the command's runs."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            handle = await stack.enter_async_context(engine.open_store(store))
        except StorageError as exc:
            raise CliError(f"cannot open the store: {exc}") from exc
        yield handle


async def _contents(store: SharedStore) -> dict[str, Any]:
    """Every key and value of ``store``; a value that cannot be read is Unreadable."""
    keys = await store.keys()
    try:
        return await store.get_many(keys)
    except Exception:  # a value cannot be read: read them one by one to find which
        return {key: await _read_one(store, key) for key in keys}


async def _read_one(store: SharedStore, key: str) -> Any:
    try:
        return await store.get(key)
    except Exception as exc:
        return Unreadable(exc)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """In what the command shows of a store: a value that could not be read."""

    error: BaseException

    def __repr__(self) -> str:
        return f"<unreadable: {type_and_message(self.error)}>"


def _unreadable(store: str, contents: dict[str, Any]) -> str | None:
    """The line that names the first value of ``contents`` that could not be read (and
    says how many more there are), or None when every value was read."""
    bad = [(key, value) for key, value in contents.items() if isinstance(value, Unreadable)]
    if not bad:
        return None
    key, value = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"{store}: the value of {key!r} cannot be read{more}: {type_and_message(value.error)}"


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


# cosmoflow run


@dataclass(frozen=True, slots=True)
class _RunOptions:
    flow: Flow
    storage: Storage | None
    params: dict[str, Any]
    trace: bool
    run_id: str | None = None
    resume: bool = False


def _run_command(args: argparse.Namespace) -> int:
    if args.concurrency is not None and args.runs is None:
        raise CliError("--concurrency needs --runs")
    if args.run_id is not None and args.runs is not None:
        raise CliError("--run-id names one run; it does not go with --runs")
    if args.resume and args.run_id is None:
        raise CliError("--resume needs --run-id")
    _check_run_id(args.run_id)
    options = _RunOptions(
        load_flow(args.target),
        parse_store(args.store, args.codec),
        _parse_params(args.param),
        args.trace,
        args.run_id,
        args.resume,
    )
    if args.runs is None:
        ended, store = _trio_run(_run_once, options)
        if args.json or ended.error is None:
            print(_render(options.flow.name, ended, store, as_json=args.json))
        problem = _unreadable(args.store, store)
        if problem is not None:
            print(f"cosmoflow: warning: {problem}", file=sys.stderr)
        if ended.error is not None:
            raise ended.error
        return 0
    concurrency = min(args.concurrency or 1, args.runs)
    batch = _trio_run(_run_many, options, args.runs, concurrency)
    _print_summary(batch, as_json=args.json)
    if batch.failed:
        assert batch.first_error is not None
        if args.debug:
            traceback.print_exception(batch.first_error)
        error = describe_error(batch.first_error)
        message = f"{batch.failed} of {batch.runs} runs failed; first: {error}"
        print(f"cosmoflow: error: {message}", file=sys.stderr)
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
        _opened(engine, store) as handle,
    ):
        if options.trace:
            await nursery.start(_watch, engine, [_Printer(options.flow)])
        outcome = await _run_or_resume(engine, options, store)
        contents = await _contents(handle)
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


async def _watch(
    engine: Engine,
    handlers: Sequence[Callable[[Event], None]],
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Hand every event of ``engine`` to ``handlers`` until the engine closes; none is
    dropped (the engine waits for this reader rather than lose an event)."""
    async with engine.events(buffer=EVENT_BUFFER, lossless=True) as stream:
        task_status.started()
        async for event in stream:
            for handle in handlers:
                handle(event)


class _NodeNames:
    """Names the node of each step event of a command's flow by its path: the node
    ``split`` of the flow ``checks`` nested in it is ``checks/split`` (see
    :func:`_flow_paths`; a flow it does not hold is named by its name). A Retry or
    Fallback event, which names no flow, gets the name its step started with."""

    def __init__(self, flow: Flow) -> None:
        self._paths = _flow_paths(flow)
        self._steps: dict[tuple[str, str], str] = {}
        """The name of each step in progress, by (run id, execution id)."""

    def of(self, event: StepEvent) -> str:
        """The name of the node of ``event``."""
        match event:
            case StepStarted():
                name = self._path(event.flow_name, event.node_id)
                self._steps[event.run_id, event.execution_id] = name
                return name
            case StepFinished():
                self._steps.pop((event.run_id, event.execution_id), None)
                return self._path(event.flow_name, event.node_id)
        return self._steps.get((event.run_id, event.execution_id), event.node_id)

    def _path(self, flow_name: str, node_id: str) -> str:
        prefix = self._paths.get(flow_name, flow_name)
        return f"{prefix}/{node_id}" if prefix else node_id


class _Printer:
    """Prints each event on stderr (``--trace``), timed from its creation, with the
    node of a step named by its path in the flow (``checks/split``)."""

    def __init__(self, flow: Flow) -> None:
        self._origin = trio.current_time()
        self._names = _NodeNames(flow)

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepEvent):
            event = dataclasses.replace(event, node_id=self._names.of(event))
        print(format_event(event, self._origin), file=sys.stderr)


def _render(flow_name: str, outcome: _Outcome, store: dict[str, Any], *, as_json: bool) -> str:
    """The outcome of one run, for people or (``as_json``) as JSON, failed or not."""
    if as_json:
        return _dump_json(_outcome_json(flow_name, outcome, store))
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


# cosmoflow run --runs N


@dataclass(slots=True)
class NodeStats:
    """What ``--runs`` measured of one node: its step durations, retries and failures."""

    durations: list[float] = field(default_factory=list)
    retries: int = 0
    failures: int = 0

    def summary(self) -> dict[str, Any]:
        """Steps, mean/p50/p99 latency in ms, retries and failures."""
        return {
            "steps": len(self.durations),
            **_latency(self.durations),
            "retries": self.retries,
            "failures": self.failures,
        }


@dataclass(frozen=True, slots=True)
class FailedRun:
    """A run of ``--runs`` that failed: its id and its error, as one line."""

    run_id: str
    error: str


@dataclass(slots=True)
class BatchStats:
    """What ``--runs`` measured: run outcomes (from the runs) and, per node, the steps
    (from the engine's events). A node of a nested flow is named by its path,
    ``flow/node`` (see :class:`_NodeNames`)."""

    flow_name: str
    runs: int
    concurrency: int
    names: _NodeNames
    succeeded: int = 0
    failed: int = 0
    first_error: BaseException | None = None
    failed_runs: list[FailedRun] = field(default_factory=list)
    duration: float = 0.0
    run_durations: list[float] = field(default_factory=list)
    nodes: dict[str, NodeStats] = field(default_factory=dict)
    events_dropped: int = 0

    def record(self, event: Event) -> None:
        """Count ``event`` in the per-node statistics."""
        match event:
            case StepStarted():
                self.names.of(event)  # noted, for the step's retries
            case StepFinished():
                stats = self.nodes.setdefault(self.names.of(event), NodeStats())
                stats.durations.append(event.duration)
                stats.failures += event.error is not None
            case Retry():
                self.nodes.setdefault(self.names.of(event), NodeStats()).retries += 1
            case RunFinished() | RunFailed() | RunCancelled():
                self.run_durations.append(event.duration)
            case EventsDropped():
                self.events_dropped += event.count

    def finished(self, run_id: str, error: BaseException | None) -> None:
        """Count the run ``run_id`` that ended, with its error if it failed."""
        if error is None:
            self.succeeded += 1
            return
        self.failed += 1
        self.failed_runs.append(FailedRun(run_id, describe_error(error)))
        if self.first_error is None:
            self.first_error = error

    def summary(self) -> dict[str, Any]:
        """Everything measured, as JSON-ready values."""
        return {
            "flow": self.flow_name,
            "runs": self.runs,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "concurrency": self.concurrency,
            "duration": round(self.duration, 6),
            "runs_per_second": round(self.runs / self.duration, 1) if self.duration else None,
            "latency_ms": _latency(self.run_durations),
            "nodes": {row: stats.summary() for row, stats in self.nodes.items()},
            "events_dropped": self.events_dropped,
            "first_error": None if self.first_error is None else describe_error(self.first_error),
            "failed_runs": [dataclasses.asdict(run) for run in self.failed_runs],
        }


def _latency(durations: list[float]) -> dict[str, float | None]:
    """Mean, median and 99th percentile (nearest rank) of ``durations``, in ms."""
    if not durations:
        return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
    ordered = sorted(durations)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000, 3)

    mean = round(sum(ordered) / len(ordered) * 1000, 3)
    return {"mean_ms": mean, "p50_ms": rank(0.5), "p99_ms": rank(0.99)}


async def _run_many(options: _RunOptions, runs: int, concurrency: int) -> BatchStats:
    """Run the flow ``runs`` times, at most ``concurrency`` at once; measure them."""
    batch = BatchStats(options.flow.name, runs, concurrency, _NodeNames(options.flow))
    started = trio.current_time()
    async with (
        trio.open_nursery() as nursery,
        open_engine(max_runs=concurrency) as engine,
        _opened(engine, _store(options)),
    ):
        handlers = [batch.record, *([_Printer(options.flow)] if options.trace else [])]
        await nursery.start(_watch, engine, handlers)
        following = trio.CancelScope()
        with _ProgressBar(runs) as bar:
            nursery.start_soon(bar.follow, engine.progress(), following)
            await _start_and_wait(engine, options, batch)
            following.cancel()
    batch.duration = trio.current_time() - started
    if options.storage is not None:
        await options.storage.aclose()
    return batch


async def _start_and_wait(engine: Engine, options: _RunOptions, batch: BatchStats) -> None:
    """Start ``batch.runs`` runs (``start_run`` waits while ``max_runs`` are in flight)
    and wait for them all."""
    async with trio.open_nursery() as waiters:
        for _ in range(batch.runs):
            run = await engine.start_run(options.flow, _store(options), params=options.params)
            waiters.start_soon(_await_run, run, batch)


async def _await_run(run: Run, batch: BatchStats) -> None:
    error: Exception | None = None
    try:
        await run.wait()
    except Exception as exc:  # the run's failure, counted
        error = exc
    batch.finished(run.run_id, error)


class _ProgressBar:
    """A live rich progress bar on stderr: runs done, runs/s, failures. Shown only when
    stderr is an interactive terminal (a log gets the summary alone)."""

    def __init__(self, total: int) -> None:
        console = Console(stderr=True)
        self._bar = Progress(
            TextColumn("runs"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} runs/s"),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_interactive,
        )
        self._task = self._bar.add_task("runs", total=total, rate="0.0", failed=0)
        self._started = trio.current_time()

    def __enter__(self) -> _ProgressBar:
        self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.stop()

    async def follow(self, progress: EngineProgress, scope: trio.CancelScope) -> None:
        """Show the engine's run counts each time they change, until ``scope`` is
        cancelled."""
        with scope:
            seen = progress.snapshot()
            while True:
                seen = await progress.wait_changed(seen)
                elapsed = trio.current_time() - self._started
                rate = f"{seen.finished / elapsed:.1f}" if elapsed > 0 else "-"
                self._bar.update(self._task, completed=seen.finished, rate=rate, failed=seen.failed)


def _print_summary(batch: BatchStats, *, as_json: bool) -> None:
    summary = batch.summary()
    if as_json:
        print(_dump_json(summary))
        return
    latency = summary["latency_ms"]
    rate = summary["runs_per_second"]
    lines = [
        f"flow:         {batch.flow_name}",
        f"runs:         {batch.runs} ({batch.succeeded} succeeded, {batch.failed} failed), "
        f"{batch.concurrency} at a time",
        f"duration:     {_seconds(batch.duration)} ({rate} runs/s)",
        f"run latency:  mean {_ms(latency['mean_ms'])}, p50 {_ms(latency['p50_ms'])}, "
        f"p99 {_ms(latency['p99_ms'])}",
    ]
    if batch.events_dropped:
        lines.append(f"warning:      {batch.events_dropped} events dropped; the table is partial")
    print("\n".join(lines))
    _StdoutConsole(highlight=False).print(_node_table(summary["nodes"]))


def _node_table(nodes: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="steps per node", title_justify="left")
    table.add_column("node")
    for name in ("steps", "mean", "p50", "p99", "retries", "failures"):
        table.add_column(name, justify="right")
    for row, stats in nodes.items():
        latencies = [_ms(stats[key]) for key in ("mean_ms", "p50_ms", "p99_ms")]
        counts = [str(stats[key]) for key in ("retries", "failures")]
        table.add_row(row, str(stats["steps"]), *latencies, *counts)
    return table


def _ms(value: float | None) -> str:
    """A latency given in ms, for people: ``0.42 ms``, ``3.10 s``, or ``-`` for none."""
    if value is None:
        return "-"
    return f"{value:.2f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


# cosmoflow graph


def _graph_command(args: argparse.Namespace) -> int:
    flow = load_flow(args.target)
    print(to_mermaid(flow) if args.format == "mermaid" else to_dot(flow), end="")
    return 0


# cosmoflow inspect


def _inspect_command(args: argparse.Namespace) -> int:
    storage = parse_store(args.store, args.codec)
    if storage is None:
        raise CliError("memory: a memory store lives only as long as its run; nothing to inspect")
    if isinstance(storage, FileStorage | SQLiteStorage):
        if not storage.path.exists():
            raise CliError(f"{args.store}: no such file")
        contents, runs = _peek(storage, args.codec or "json")
    else:
        contents, runs = _trio_run(_read_store, storage)
    name = _describe_store(args.store, storage)
    if args.json:
        report = {"store": name, "keys": contents, "runs": [dataclasses.asdict(r) for r in runs]}
        print(_dump_json(report))
    else:
        print(f"store: {name}")
        console = _StdoutConsole(highlight=False)
        console.print(_keys_table(contents))
        console.print(_runs_table(runs))
    problem = _unreadable(name, contents)
    if problem is not None:
        raise CliError(problem)
    return 0


def _peek(
    storage: FileStorage | SQLiteStorage, codec: str
) -> tuple[dict[str, Any], list[RunRecord]]:
    """Every key and value of a file or SQLite store and its durable runs, read without
    an engine, a lock or a write (blocks): inspecting changes no file. A value or run
    record that cannot be read is an Unreadable value (a record under its own key)."""
    peek = file_storage.peek if isinstance(storage, FileStorage) else sqlite_storage.peek
    try:
        entries = peek(storage.path, codec=codec)
    except StorageError as exc:
        raise CliError(f"cannot open the store: {exc}") from exc
    contents = {
        key: _value(entry) for key, entry in entries.items() if not key.startswith(RESERVED_PREFIX)
    }
    runs = []
    for key, entry in entries.items():
        if key.startswith(RECORD_PREFIX):
            try:
                runs.append(RunRecord.of(checked_record(key, entry.unwrap())))
            except Exception as exc:  # undecodable, or not a record the engine wrote
                contents[key] = Unreadable(exc)
    return contents, runs


def _value(entry: Outcome[Any]) -> Any:
    """The value ``entry`` holds, or Unreadable with the error it holds."""
    try:
        return entry.unwrap()
    except Exception as exc:
        return Unreadable(exc)


async def _read_store(storage: Storage) -> tuple[dict[str, Any], list[RunRecord]]:
    """Every key and value of ``storage`` (a Redis store, or one of the user's own) and
    its durable runs, read through an engine (the runs of a queue's workers with their
    leases)."""
    async with open_engine() as engine, _opened(engine, storage) as handle:
        contents = await _contents(handle)
        runs = await engine.list_runs(storage)
    return contents, runs


def _runs_table(runs: list[RunRecord]) -> Table:
    table = Table(title=f"runs ({len(runs)})", title_justify="left")
    for column in ("run id", "flow", "state", "last node", "steps", "owner", "lease left"):
        table.add_column(column)
    for run in runs:
        lease = "-" if run.lease_left is None else f"{run.lease_left:.1f} s"
        cells = (run.state, run.last_node_id or "-", str(run.steps), run.owner or "-", lease)
        table.add_row(run.run_id, run.flow_name, *cells)
    return table


def _keys_table(contents: dict[str, Any]) -> Table:
    table = Table(title=f"keys ({len(contents)})", title_justify="left")
    table.add_column("key", overflow="fold")
    table.add_column("type")
    table.add_column("value", overflow="fold")
    for key, value in contents.items():
        kind = "unreadable" if isinstance(value, Unreadable) else type(value).__name__
        table.add_row(key, kind, _preview(value))
    return table


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


# cosmoflow submit, worker and status


def _queue(
    text: str, lease: float = DEFAULT_LEASE, flow_wait: float = DEFAULT_FLOW_WAIT
) -> RunQueue:
    try:
        return RunQueue.from_url(text, lease=lease, flow_wait=flow_wait)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _queue_error(queue: RunQueue, error: StorageError) -> CliError:
    """The line for a queue whose server could not be reached, or whose server
    answered with an error (a key of another type, a read-only replica...)."""
    from redis import exceptions as redis_errors

    if isinstance(error.__cause__, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return CliError(f"cannot reach the queue: {error}")
    return CliError(f"queue {queue.address}: {error}")


def _check_run_id(run_id: str | None) -> None:
    if run_id is not None and not run_id:
        raise CliError("--run-id must not be empty")


def _submit_command(args: argparse.Namespace) -> int:
    _check_run_id(args.run_id)
    flow = load_flow(args.target)
    queue = _queue(args.queue)
    _trio_run(_submit_all, queue, flow.name, _submissions(args))
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
    params = _parse_params(args.param)
    if args.runs is not None and args.params_file is not None:
        raise CliError("--runs and --params-file do not go together: give one")
    if args.params_file is not None:
        each = _read_params_file(args.params_file)
    elif args.runs is not None:
        each = [{} for _ in range(args.runs)]
    else:
        return [_Submission(args.run_id, params)]
    submissions = []
    for number, extra in enumerate(each, start=1):
        run_id = None if args.run_id is None else f"{args.run_id}-{number}"
        submissions.append(_Submission(run_id, {**params, **extra}))
    return submissions


def _read_params_file(name: str) -> list[dict[str, Any]]:
    """The params of each run in the file ``name`` (``-``: stdin), one JSON object per
    line, blank lines skipped; CliError naming the line of one that is not. Blocks
    while it reads."""
    label = "<stdin>" if name == "-" else name
    try:
        if name == "-":
            lines = sys.stdin.read().splitlines()
        else:
            lines = Path(name).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"--params-file {label}: {type_and_message(exc)}") from exc
    runs = [
        _params_line(label, number, line)
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not runs:
        raise CliError(f"--params-file {label}: no runs (expected a JSON object of params a line)")
    return runs


def _params_line(label: str, number: int, line: str) -> dict[str, Any]:
    """The params one line of a params file gives; CliError naming ``label:number``."""
    try:
        params = json.loads(line, parse_constant=_no_constant)
    except ValueError as exc:
        raise CliError(f"{label}:{number}: not JSON: {exc}") from exc
    if not isinstance(params, dict):
        kind = type(params).__name__
        raise CliError(f"{label}:{number}: expected a JSON object of params, got a {kind}")
    return params


def _no_constant(name: str) -> NoReturn:
    """Refuse ``NaN`` and the infinities, which Python's JSON reader accepts and a run
    queue cannot hold."""
    raise ValueError(f"{name} is not JSON")


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


def _requeue_command(args: argparse.Namespace) -> int:
    queue = _queue(args.queue)
    _trio_run(_requeue, queue, args.run_id)
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


def _worker_command(args: argparse.Namespace) -> int:
    if not 0 < args.lease < math.inf:
        raise CliError(f"--lease must be > 0 seconds and finite, got {args.lease:g}")
    if not args.flow_wait >= 0:
        raise CliError(f"--flow-wait must be >= 0 seconds, got {args.flow_wait:g}")
    flows = _distinct_flows(args.targets)
    queue = _queue(args.queue, args.lease, args.flow_wait)
    stores = _worker_stores(args.store)
    grace = HAND_BACK_SECONDS + STOP_GRACE
    terminating = _Deadline(grace, TERMINATED, "terminated")
    try:
        _trio_run(_serve, queue, flows, stores, args, terminating, grace=grace)
    finally:
        terminating.disarm()
    print("cosmoflow: terminated", file=sys.stderr)
    return TERMINATED


def _worker_stores(text: str) -> RunStores:
    """The stores ``worker --store TEXT`` gives runs: namespaces of a Redis server, or a
    factory of the user's own called once per run (checked now to take ``run_id``;
    blocks while its module is imported). CliError when ``text`` names neither."""
    custom = custom_store(text, WORKER_STORE_SYNTAX)
    if custom is not None:
        custom.check_call({"run_id": "RUN_ID"})
        return PerRunStores(custom)
    try:
        return per_run_redis(text)
    except ValueError as exc:
        raise CliError(f"store {text!r}: expected {WORKER_STORE_SYNTAX}") from exc


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
    terminating: _Deadline,
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
            names = ", ".join(flow.name for flow in flows)
            print(f"worker {name} serving {queue.name} (flows: {names})", flush=True)
            async for _ in terminations:
                terminating.arm()
                nursery.cancel_scope.cancel()
                break


async def _check_store_reachable(stores: PerRunRedis) -> None:
    """Raise CliError unless the Redis server of ``worker --store`` answers a PING
    (within :data:`STORE_CHECK_TIMEOUT`): a worker that cannot reach its store would
    claim runs only to hand them back. Writes nothing."""
    name = repr(RedisStorage(stores.url, namespace=stores.prefix))
    try:
        await trio.to_thread.run_sync(_ping, stores.url, abandon_on_cancel=True)
    except StorageError as exc:
        raise CliError(f"cannot reach the store {name}: {exc}") from exc


def _ping(url: str) -> None:
    """PING the Redis server at ``url`` (blocks); StorageError when it does not answer."""
    client = shared_client(url, STORE_CHECK_TIMEOUT, "worker --store")
    from redis.exceptions import RedisError

    try:
        client.ping()
    except RedisError as exc:
        raise StorageError(str(exc)) from exc


def _status_command(args: argparse.Namespace) -> int:
    queue = _queue(args.queue)
    runs = _trio_run(_read_status, queue)
    listed = [run for run in runs if args.state in (None, run.state)]
    if args.json:
        print(_dump_json([dataclasses.asdict(run) for run in listed]))
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
    console = _StdoutConsole(highlight=False)
    console.print(_queue_table(listed))
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
        table.add_row(run.run_id, *cells)
    return table


# JSON output


def _dump_json(value: Any) -> str:
    """``value`` as strict JSON, indented by 2 (see :func:`_jsonable`)."""
    return json.dumps(_jsonable(value), indent=2, allow_nan=False)


def _jsonable(value: Any) -> Any:
    """``value`` with what JSON cannot hold replaced by its ``repr``: NaN and the
    infinities, keys that are not str, and values of other types (a tuple is a list)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, dict):
        return {_json_key(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return repr(value)


def _json_key(key: object) -> str:
    return key if isinstance(key, str) else repr(key)


# Errors


def _leaf(error: Exception) -> Exception:
    """The error inside a trio ExceptionGroup of one (an engine that crashed)."""
    while isinstance(error, ExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _report(args: argparse.Namespace, error: Exception, *, status: int) -> int:
    if args.debug:
        traceback.print_exception(error)
    text = error_text(error)
    if error.__cause__ is not None and not isinstance(error, CliError):
        text += f" (caused by {describe_error(error.__cause__)})"
    print(f"cosmoflow: error: {text}", file=sys.stderr)
    return status
