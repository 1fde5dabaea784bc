"""What crosses between the engine and a worker: a process of the "process" executor,
or a Ray task of the "ray" one.

The engine side pickles the node once (:func:`pickled_node`) and each attempt's prep
result and context (:func:`job`), and reads the outcome back (:func:`answer`); the
worker side is :func:`exec_in_worker` (and :func:`start_worker` for a new worker
process). A worker keeps the nodes it unpickled, by their digest: an attempt sends a
worker process the node's digest alone, and the node itself only to a worker that does
not keep it yet. An
exception exec raises comes back with its traceback in the worker in a note. Values that
cannot make the trip (the node included) fail the attempt with
:class:`WorkerTransferError`, which says what they were. A KeyboardInterrupt
raised in a worker is not the operator's Ctrl-C in the engine: it fails the attempt with
:class:`WorkerInterruptedError`. A worker process ends itself as soon as the engine's
process is gone (killed with SIGKILL, crashed), even in the middle of an exec: see
:func:`_watch_parent`.

Every function here blocks the thread that calls it while it pickles or unpickles. The
engine side runs in the engine's trio thread, where no other run moves meanwhile: a
large prep result or exec result (100 MB, millions of objects) stalls the whole engine
for 0.1 to 1.5 s. The worker side blocks its worker: :func:`start_worker` while it
unpickles the node, :func:`exec_in_worker` also while exec runs.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import traceback
from dataclasses import dataclass
from types import CoroutineType
from typing import Any, Final, Literal, final

import cloudpickle
import outcome

from cosmoflow_actors import pickling
from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.errors import CosmoFlowError, error_text, type_and_message, with_article
from cosmoflow_actors.node import Node
from cosmoflow_actors.runtime.store_client import LostCall, SharedStore, hand_over, lost_calls

ORPHAN_EXIT_STATUS: Final = 70
"""The exit status of a worker process that ended itself because the engine's process
was gone (EX_SOFTWARE)."""


class WorkerTransferError(CosmoFlowError, TypeError):
    """exec's input (the node, the prep result, the context) could not be sent to a
    worker process or Ray task, or what exec returned or raised could not be sent back:
    pickling it (or unpickling it, in the worker for an exception, in the engine for
    anything) failed. The message says which value it was (the node by its id and
    executor; what exec returned or raised by its type); for an exception, its type and
    message, with the worker's traceback in a note. A failure in the engine has the
    pickling error as ``__cause__``; one in the worker names it in the message."""


class WorkerInterruptedError(CosmoFlowError, RuntimeError):
    """exec raised KeyboardInterrupt (alone, or in an exception group) in a worker
    thread, process or Ray task: a failed attempt of that step alone, not the operator's
    Ctrl-C in the engine. What exec raised is ``__cause__``."""


@final
@dataclass(frozen=True, slots=True)
class PickledNode:
    """A node pickled for workers (see :func:`pickled_node`): ``data``, its pickle, and
    ``digest``, the key a worker keeps the node it unpickled under, so that an attempt
    sends the digest alone to a worker that has the node already."""

    digest: bytes
    data: bytes


def pickled_node(node: Node, node_id: str) -> PickledNode:
    """``node`` pickled for a worker; WorkerTransferError naming ``node_id`` and the
    executor when it cannot be (it could at build(), but has changed since). Blocks
    while it pickles and digests the node."""
    try:
        data: bytes = pickling.dumps(node)
    except Exception as exc:
        raise WorkerTransferError(
            f"executor={node.executor!r} cannot send node {node_id!r} to a worker: "
            f"{type_and_message(exc)}"
        ) from exc
    return PickledNode(hashlib.blake2b(data, digest_size=16).digest(), data)


class NodeNotKept(Exception):
    """Raised in a worker process sent a node's digest alone (see :func:`exec_in_worker`)
    whose node it does not keep: the engine sends the attempt again with the node."""


Answer = tuple[str, bytes, list[LostCall]]
"""What a worker sends back: what exec did ("exec returned a mod.Type", "exec raised
mod.Type"), readable even when the engine cannot unpickle the rest, exec's outcome
pickled, and the store calls exec made and never awaited."""


WorkerKind = Literal["process", "ray"]
"""The executors whose exec runs in another process: a worker process, a Ray task."""


def worker_name(executor: WorkerKind) -> str:
    """What runs exec for ``executor`` ("process" or "ray"), as error texts name it."""
    return "the Ray task" if executor == "ray" else "the worker process"


def job(prep_res: Any, ctx: ExecutionContext, executor: WorkerKind) -> bytes:
    """The prep result and the context, pickled for a worker of ``executor``. Blocks
    while it pickles them: for a large prep result, long enough to stall the engine."""
    try:
        pickled: bytes = pickling.dumps((prep_res, ctx))
    except Exception as exc:
        what = "the context" if _pickles(prep_res) else f"the prep result ({_type_name(prep_res)})"
        raise WorkerTransferError(
            f"cannot send {what} to {worker_name(executor)}: {type_and_message(exc)}"
        ) from exc
    return pickled


def answer(sent: Answer, executor: WorkerKind, store: SharedStore) -> Any:
    """What exec returned, as a worker of ``executor`` sent it back (a coroutine as a
    :class:`ReturnedCoroutine`); or raise what it raised, a KeyboardInterrupt as
    WorkerInterruptedError. The store calls exec made there and never awaited are handed
    over to ``store``, the step's handle, for the step's check (see
    ``store_client.hand_over``). Blocks while it unpickles the outcome: for a large
    result, long enough to stall the engine."""
    what, pickled, lost = sent
    hand_over(lost, store)
    result = _unpickled_answer(what, pickled)
    if isinstance(result, outcome.Error):
        interrupted = interruption(result.error, worker_name(executor))
        if interrupted is not None:
            raise interrupted from result.error
    return result.unwrap()


@final
@dataclass(frozen=True, slots=True)
class ReturnedCoroutine:
    """What an exec away from the run's task (on a thread, in a worker process, as a Ray
    task) hands back for a coroutine it returned instead of its result: the coroutine's
    qualified name. The coroutine itself is closed once the store calls exec lost are
    listed (a store call it returned is one of them): it never runs, and could not make
    the trip from a process. The node actor fails the step on it as on the coroutine an
    inline exec returns."""

    name: str

    @classmethod
    def of(cls, coroutine: CoroutineType[Any, Any, Any]) -> ReturnedCoroutine:
        """The carrier of ``coroutine``, which it closes. Never blocks."""
        coroutine.close()
        return cls(coroutine.__qualname__)


def interruption(error: BaseException, worker: str) -> WorkerInterruptedError | None:
    """The WorkerInterruptedError to raise, from ``error``, when exec raised ``error`` in
    ``worker`` ("its thread", "the Ray task") and it is, or is a group that holds,
    a KeyboardInterrupt; None for any other error. Never blocks."""
    if isinstance(error, BaseExceptionGroup):
        interrupted = error.subgroup(KeyboardInterrupt) is not None
    else:
        interrupted = isinstance(error, KeyboardInterrupt)
    if not interrupted:
        return None
    return WorkerInterruptedError(f"exec was interrupted in {worker} (KeyboardInterrupt)")


def release_frames(error: BaseException) -> None:
    """When ``error`` is a MemoryError, clear the locals of the frames its traceback
    holds (exec's, which have ended): what exec allocated is freed now, before the error
    is handed on, which itself needs memory (trio delivering a thread's outcome, a worker
    pickling it). The traceback keeps its lines. Does nothing for any other error; never
    blocks."""
    if isinstance(error, MemoryError):
        traceback.clear_frames(error.__traceback__)


def _unpickled_answer(what: str, pickled: bytes) -> outcome.Outcome[Any]:
    """exec's outcome, as a worker sent it (``what`` it was, and ``pickled``);
    WorkerTransferError naming what exec returned or raised when it cannot be unpickled
    here (its class is in a module the engine cannot import, say). Blocks while it
    unpickles."""
    try:
        result: outcome.Outcome[Any] = cloudpickle.loads(pickled)
    except Exception as exc:
        raise WorkerTransferError(
            f"{what}, which cannot be unpickled in the engine: {type_and_message(exc)}"
        ) from exc
    return result


def _pickles(value: Any) -> bool:
    try:
        pickling.dumps(value)
    except Exception:
        return False
    return True


def _type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


_nodes: dict[bytes, Node] = {}
"""Nodes already unpickled in this worker process, by their digest (see
:class:`PickledNode`)."""
_MAX_CACHED_NODES = 64


def start_worker(digest: bytes, data: bytes) -> None:
    """Runs in a new worker process before its first exec: returns once the process has
    started, watches its parent (:func:`_watch_parent`) and has unpickled the node
    ``data`` (imported its modules), which it keeps under ``digest``. Blocks while it
    unpickles."""
    _watch_parent()
    _node(digest, data, worker_name("process"))


def exec_in_worker(digest: bytes, data: bytes | None, job: bytes, executor: WorkerKind) -> Answer:
    """Runs in the worker process (a Ray task's, for ``executor`` "ray"): find the node
    (see :func:`_node`), unpickle the job, run exec, pickle the outcome. Blocks while
    exec runs."""
    _watch_parent()
    worker = worker_name(executor)
    node = _node(digest, data, worker)
    prep_res, ctx = _restored("exec's input (what prep returned, and the context)", job, worker)
    result = outcome.capture(node.exec, prep_res, ctx)
    # A store call exec returned is one of them: sent back as a call never awaited.
    lost = lost_calls(ctx.store)
    if isinstance(result, outcome.Error):
        release_frames(result.error)
    elif isinstance(result, outcome.Value) and type(result.value) is CoroutineType:
        result = outcome.Value(ReturnedCoroutine.of(result.value))
    what, pickled = _sendable(result, worker)
    return what, pickled, lost


def _node(digest: bytes, data: bytes | None, worker: str) -> Node:
    """The node of ``digest``, unpickled from ``data`` once per worker process: kept in
    :data:`_nodes`, which is emptied when it holds :data:`_MAX_CACHED_NODES`. Raises
    NodeNotKept when it is not kept and ``data`` is None."""
    node = _nodes.get(digest)
    if node is None:
        if data is None:
            raise NodeNotKept
        if len(_nodes) >= _MAX_CACHED_NODES:
            _nodes.clear()
        node = _nodes[digest] = _restored("the node", data, worker)
    return node


def _restored(what: str, pickled: bytes, worker: str) -> Any:
    """``pickled`` unpickled in ``worker``. An error doing so is raised as it is (so
    that ``retry_on`` sees its type), with a note saying that it was raised restoring
    ``what`` there; one that cannot make the trip back to the engine (it holds a lock)
    is raised as a WorkerTransferError saying what it was, with that note. Blocks while
    it unpickles."""
    note = f"{_RESTORING} {worker} restored {what}"
    try:
        return cloudpickle.loads(pickled)
    except Exception as exc:
        exc.add_note(note)
        problem = _trip_problem(exc)
        if problem is None:
            raise
        substitute = WorkerTransferError(
            f"{worker} could not restore {what}: {_type_name(exc)}: {error_text(exc)}, "
            f"an error which cannot be sent back: {type_and_message(problem)}"
        )
    substitute.add_note(note)
    # Raised out of the except block, so that it has no context: trio-parallel sends
    # an error with its whole chain, which the error that cannot make the trip is in.
    raise substitute


def _trip_problem(value: Any) -> Exception | None:
    """Why ``value`` cannot make the trip between a worker and the engine (pickled,
    then unpickled), or None when it can. Blocks while it pickles and unpickles."""
    try:
        cloudpickle.loads(pickling.dumps(value))
    except Exception as exc:
        return exc
    return None


_RESTORING: Final = "raised while"
"""How the note :func:`_restored` adds to an error begins."""


def raised_restoring(error: BaseException) -> bool:
    """Whether ``error`` was raised in a worker while it restored what the engine sent
    (it has :func:`_restored`'s note): the one error a worker raises rather than sends
    back as exec's outcome. Never blocks."""
    return any(note.startswith(_RESTORING) for note in getattr(error, "__notes__", ()))


def _sendable(result: outcome.Outcome[Any], worker: str) -> tuple[str, bytes]:
    """``result``, exec's outcome in ``worker``, as sent to the engine (see
    :func:`_sendable_error` for an exception). When a value cannot be pickled, an
    Error(WorkerTransferError) that says what it was. Blocks while it pickles."""
    if isinstance(result, outcome.Error):
        return _sendable_error(result.error, worker)
    assert isinstance(result, outcome.Value)
    what = f"exec returned {with_article(_type_name(result.value))}"
    try:
        return what, pickling.dumps(result)
    except Exception as exc:
        failed = WorkerTransferError(
            f"{what}, which cannot be sent back from {worker}: {type_and_message(exc)}"
        )
        return f"exec raised {_type_name(failed)}", pickling.dumps(outcome.Error(failed))


def _sendable_error(raised: BaseException, worker: str) -> tuple[str, bytes]:
    """Error(``raised``), raised by exec in ``worker``, as sent to the engine, with
    exec's traceback there in a note (pickling drops the traceback); it is also
    unpickled, to check that it makes the trip. When it cannot, an
    Error(WorkerTransferError) that says what it was, with that note. Blocks while it
    pickles and unpickles."""
    note = f"exec's traceback in {worker}:\n{''.join(traceback.format_exception(raised))}"
    raised.add_note(note)
    problem = _trip_problem(outcome.Error(raised))
    if problem is not None:
        substitute = WorkerTransferError(
            f"exec raised {_type_name(raised)}: {error_text(raised)}, which cannot be sent "
            f"back from {worker}: {type_and_message(problem)}"
        )
        substitute.add_note(note)
        raised = substitute
    return f"exec raised {_type_name(raised)}", pickling.dumps(outcome.Error(raised))


_watching_parent = False
"""Whether this worker process has started its :func:`_exit_with_parent` thread."""


def _watch_parent() -> None:
    """In a worker process, the first time: start a daemon thread that ends the process
    as soon as the process that spawned it (the engine's) is gone. Never blocks; after
    the first call, costs one global lookup. Does nothing outside a multiprocessing
    child.

    PR_SET_PDEATHSIG is no use here: it fires when the parent *thread* ends, and
    trio-parallel starts workers from trio's short-lived worker threads.
    """
    global _watching_parent
    if _watching_parent:
        return
    _watching_parent = True
    parent = multiprocessing.parent_process()
    if parent is not None:
        watcher = threading.Thread(
            target=_exit_with_parent, args=(parent,), name="exit with engine", daemon=True
        )
        watcher.start()


def _exit_with_parent(parent: multiprocessing.process.BaseProcess) -> None:
    """Blocks, using no CPU, until ``parent`` has exited (multiprocessing's sentinel pipe
    from it closes), then ends this process at once, abandoning the exec it runs. An exec
    that holds the GIL in C code delays that until it lets the GIL go."""
    parent.join()
    os._exit(ORPHAN_EXIT_STATUS)
