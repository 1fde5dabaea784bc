"""What crosses between the engine and a worker: a process of the "process" executor,
or a Ray task of the "ray" one.

The engine side pickles the node (:func:`pickled_node`) and each attempt's prep result
and context (:func:`job`), and reads the outcome back (:func:`answer`); the worker side
is :func:`exec_in_worker` (and :func:`start_worker` for a new worker process). An
exception exec raises comes back with its traceback in the worker in a note. Values that
cannot make the trip (the node included) fail the attempt with
:class:`WorkerTransferError`, which says what they were. A KeyboardInterrupt
raised in a worker is not the operator's Ctrl-C in the engine: it fails the attempt with
:class:`WorkerInterruptedError`. A worker process ends itself as soon as the engine's
process is gone (killed with SIGKILL, crashed), even in the middle of an exec: see
:func:`_watch_parent`.

Nothing here blocks but the worker side: :func:`start_worker` (while it unpickles the
node) and :func:`exec_in_worker` (while exec runs).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import traceback
from typing import Any, Final

import cloudpickle
import outcome

from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.errors import CosmoFlowError, error_text, type_and_message
from cosmoflow_actors.node import Node

ORPHAN_EXIT_STATUS: Final = 70
"""The exit status of a worker process that ended itself because the engine's process
was gone (EX_SOFTWARE)."""


class WorkerTransferError(CosmoFlowError, TypeError):
    """exec's input (the node, the prep result, the context) could not be sent to a
    worker process, or what exec returned or raised could not be sent back: pickling
    (or, for an exception, unpickling) failed. The message says which value it was (the
    node by its id and executor); for an exception, its type and message, with the
    worker's traceback in a note."""


class WorkerInterruptedError(CosmoFlowError, RuntimeError):
    """exec raised KeyboardInterrupt (alone, or in an exception group) in a worker
    thread, process or Ray task: a failed attempt of that step alone, not the operator's
    Ctrl-C in the engine. What exec raised is ``__cause__``."""


def pickled_node(node: Node, node_id: str) -> bytes:
    """``node`` pickled for a worker; WorkerTransferError naming ``node_id`` and the
    executor when it cannot be (it could at build(), but has changed since). Never
    blocks."""
    try:
        pickled: bytes = cloudpickle.dumps(node)
    except Exception as exc:
        raise WorkerTransferError(
            f"executor={node.executor!r} cannot send node {node_id!r} to a worker: "
            f"{type_and_message(exc)}"
        ) from exc
    return pickled


def job(prep_res: Any, ctx: ExecutionContext) -> bytes:
    """The prep result and the context, pickled for a worker. Never blocks."""
    try:
        pickled: bytes = cloudpickle.dumps((prep_res, ctx))
    except Exception as exc:
        what = "the context" if _pickles(prep_res) else f"the prep result ({_type_name(prep_res)})"
        raise WorkerTransferError(
            f"cannot send {what} to a worker process: {type_and_message(exc)}"
        ) from exc
    return pickled


def answer(pickled: bytes) -> Any:
    """What exec returned, as a worker pickled its outcome; or raise what it raised, a
    KeyboardInterrupt as WorkerInterruptedError. Never blocks."""
    result = _unpickled_answer(pickled)
    if isinstance(result, outcome.Error):
        interrupted = interruption(result.error, "the worker process")
        if interrupted is not None:
            raise interrupted from result.error
    return result.unwrap()


def interruption(error: BaseException, worker: str) -> WorkerInterruptedError | None:
    """The WorkerInterruptedError to raise, from ``error``, when exec raised ``error`` in
    ``worker`` ("its thread", "the worker process") and it is, or is a group that holds,
    a KeyboardInterrupt; None for any other error. Never blocks."""
    if isinstance(error, BaseExceptionGroup):
        interrupted = error.subgroup(KeyboardInterrupt) is not None
    else:
        interrupted = isinstance(error, KeyboardInterrupt)
    if not interrupted:
        return None
    return WorkerInterruptedError(f"exec was interrupted in {worker} (KeyboardInterrupt)")


def _unpickled_answer(pickled: bytes) -> outcome.Outcome[Any]:
    """exec's outcome, as a worker pickled it. Never blocks."""
    try:
        result: outcome.Outcome[Any] = cloudpickle.loads(pickled)
    except Exception as exc:
        raise WorkerTransferError(
            f"exec's result could not be unpickled in the engine: {type_and_message(exc)}"
        ) from exc
    return result


def _pickles(value: Any) -> bool:
    try:
        cloudpickle.dumps(value)
    except Exception:
        return False
    return True


def _type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


_nodes: dict[bytes, Node] = {}
"""Nodes already unpickled in this worker process, by their pickled form."""
_MAX_CACHED_NODES = 64


def start_worker(node_bytes: bytes) -> None:
    """Runs in a new worker process before its first exec: returns once the process has
    started, watches its parent (:func:`_watch_parent`) and has unpickled the node
    (imported its modules). Blocks while it unpickles."""
    _watch_parent()
    _node(node_bytes)


def exec_in_worker(node_bytes: bytes, job: bytes) -> bytes:
    """Runs in the worker process: unpickle, run exec, pickle the outcome. Blocks while
    exec runs."""
    _watch_parent()
    node = _node(node_bytes)
    prep_res, ctx = _restored("exec's input (what prep returned, and the context)", job)
    return _sendable(outcome.capture(node.exec, prep_res, ctx))


def _node(node_bytes: bytes) -> Node:
    """The node pickled as ``node_bytes``, unpickled once per worker process: kept in
    :data:`_nodes`, which is emptied when it holds :data:`_MAX_CACHED_NODES`."""
    node = _nodes.get(node_bytes)
    if node is None:
        if len(_nodes) >= _MAX_CACHED_NODES:
            _nodes.clear()
        node = _nodes[node_bytes] = _restored("the node", node_bytes)
    return node


def _restored(what: str, pickled: bytes) -> Any:
    """``pickled`` unpickled in the worker process. An error doing so is raised as it
    is (so that ``retry_on`` sees its type), with a note saying that it was raised
    restoring ``what`` there. Blocks while it unpickles."""
    try:
        return cloudpickle.loads(pickled)
    except Exception as exc:
        exc.add_note(f"raised while the worker process restored {what}")
        raise


def _sendable(result: outcome.Outcome[Any]) -> bytes:
    """``result`` pickled for the engine (see :func:`_sendable_error` for an exception).
    When a value cannot be, an Error(WorkerTransferError) that says what it was. Never
    blocks."""
    if isinstance(result, outcome.Error):
        return _sendable_error(result.error)
    assert isinstance(result, outcome.Value)
    try:
        pickled: bytes = cloudpickle.dumps(result)
    except Exception as exc:
        failed = WorkerTransferError(
            f"exec returned a {_type_name(result.value)}, which cannot be sent back from "
            f"the worker process: {type_and_message(exc)}"
        )
        pickled = cloudpickle.dumps(outcome.Error(failed))
    return pickled


def _sendable_error(raised: BaseException) -> bytes:
    """Error(``raised``) pickled for the engine, with exec's traceback in the worker in a
    note (pickling drops the traceback); it is also unpickled, to check that it makes
    the trip. When it cannot, an Error(WorkerTransferError) that says what it was, with
    that note. Never blocks."""
    note = f"exec's traceback in the worker process:\n{''.join(traceback.format_exception(raised))}"
    raised.add_note(note)
    try:
        pickled: bytes = cloudpickle.dumps(outcome.Error(raised))
        cloudpickle.loads(pickled)
    except Exception as exc:
        substitute = WorkerTransferError(
            f"exec raised {_type_name(raised)}: {error_text(raised)}, which cannot be sent "
            f"back from the worker process: {type_and_message(exc)}"
        )
        substitute.add_note(note)
        pickled = cloudpickle.dumps(outcome.Error(substitute))
    return pickled


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
