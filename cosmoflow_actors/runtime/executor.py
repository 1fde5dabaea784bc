"""Where a node's exec runs: inline on the trio thread, in a thread, in a process, or
as a Ray task (see ``ray_executor``).

"thread" uses ``trio.to_thread.run_sync`` (not cancellable: a timeout or cancel waits
for the call to return). "process" sends the node (pickled once per actor with
cloudpickle), the prep result and the context to a trio-parallel worker process, which
is killed if the step is cancelled or times out. Both need a plain ``def exec``; the
context they get has no store access.

A worker process ends itself as soon as the engine's process is gone (killed with
SIGKILL, crashed), even in the middle of an exec: see :func:`_watch_parent`. Values that
cannot cross between the engine and a worker fail the attempt with
:class:`WorkerTransferError`, which says what they were.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import multiprocessing
import os
import threading
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Final

import cloudpickle
import outcome
import trio
import trio_parallel

from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.node import Node
from cosmoflow_actors.runtime.ray_executor import OnRay
from cosmoflow_actors.runtime.store_client import detached

ExecCall = Callable[[Any, ExecutionContext], Awaitable[Any]]
"""Runs one exec attempt: ``await call(prep_res_or_item, ctx)``."""

ORPHAN_EXIT_STATUS: Final = 70
"""The exit status of a worker process that ended itself because the engine's process
was gone (EX_SOFTWARE)."""


class WorkerTransferError(TypeError):
    """exec's input could not be sent to a worker process, or what exec returned or
    raised could not be sent back: pickling (or, for an exception, unpickling) failed.
    The message says which value it was; for an exception, its type and message, with
    the worker's traceback in a note."""


def exec_call(node: Node, workers: trio_parallel.WorkerContext | None) -> ExecCall:
    """The function that runs ``node.exec`` on the node's executor: for an inline
    ``async def exec``, the node's own method."""
    if node.executor == "thread":
        return _InThread(node)
    if node.executor == "process":
        assert workers is not None
        return _InProcess(node, workers)
    if node.executor == "ray":
        return OnRay(node)
    return as_coroutine_function(node.exec)


def as_coroutine_function(method: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """A node method as a coroutine function: the method itself when it is an ``async
    def``; else one that calls it on the trio thread (see :func:`call`)."""
    if inspect.iscoroutinefunction(method):
        return method
    return functools.partial(call, method)


async def call(method: Callable[..., Any], *args: Any) -> Any:
    """Call a node method that may be plain or async (or return an awaitable); return
    its result."""
    result = method(*args)
    if hasattr(result, "__await__"):
        return await result
    return result


class _InThread:
    def __init__(self, node: Node) -> None:
        self._exec = node.exec

    async def __call__(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        thread_ctx = dataclasses.replace(ctx, store=detached(ctx.store))
        return await trio.to_thread.run_sync(self._exec, prep_res, thread_ctx)


class _InProcess:
    def __init__(self, node: Node, workers: trio_parallel.WorkerContext) -> None:
        self._node = cloudpickle.dumps(node)
        self._workers = workers

    async def __call__(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """Blocks until a worker process (one of trio-parallel's limited number) has run
        exec; cancelling kills that worker."""
        job = _job(prep_res, ctx)
        answer = await self._workers.run_sync(_exec_in_worker, self._node, job, kill_on_cancel=True)
        return _unpickled_answer(answer).unwrap()


def _job(prep_res: Any, ctx: ExecutionContext) -> bytes:
    """The prep result and the context, pickled for a worker. Never blocks."""
    try:
        job: bytes = cloudpickle.dumps((prep_res, ctx))
    except Exception as exc:
        what = "the context" if _pickles(prep_res) else f"the prep result ({_type_name(prep_res)})"
        raise WorkerTransferError(
            f"cannot send {what} to a worker process: {type(exc).__name__}: {exc}"
        ) from exc
    return job


def _unpickled_answer(answer: bytes) -> outcome.Outcome[Any]:
    """exec's outcome, as a worker pickled it. Never blocks."""
    try:
        result: outcome.Outcome[Any] = cloudpickle.loads(answer)
    except Exception as exc:
        raise WorkerTransferError(
            f"exec's result could not be unpickled in the engine: {type(exc).__name__}: {exc}"
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


def _exec_in_worker(node_bytes: bytes, job: bytes) -> bytes:
    """Runs in the worker process: unpickle, run exec, pickle the outcome. Blocks while
    exec runs."""
    _watch_parent()
    node = _nodes.get(node_bytes)
    if node is None:
        if len(_nodes) >= _MAX_CACHED_NODES:
            _nodes.clear()
        node = _nodes[node_bytes] = cloudpickle.loads(node_bytes)
    prep_res, ctx = cloudpickle.loads(job)
    return _sendable(outcome.capture(node.exec, prep_res, ctx))


def _sendable(result: outcome.Outcome[Any]) -> bytes:
    """``result`` pickled for the engine; an exception is also unpickled, to check that
    it makes the trip. When it cannot, an Error(WorkerTransferError) that says what it
    was. Never blocks."""
    try:
        answer: bytes = cloudpickle.dumps(result)
        if isinstance(result, outcome.Error):
            cloudpickle.loads(answer)
        return answer
    except Exception as exc:
        failed: bytes = cloudpickle.dumps(outcome.Error(_not_sent(result, exc)))
        return failed


def _not_sent(result: outcome.Outcome[Any], error: Exception) -> WorkerTransferError:
    """The error that stands for ``result``, which pickling failed with ``error``."""
    why = f"{type(error).__name__}: {error}"
    if isinstance(result, outcome.Error):
        return _exception_not_sent(result.error, why)
    assert isinstance(result, outcome.Value)
    return WorkerTransferError(
        f"exec returned a {_type_name(result.value)}, which cannot be sent back from "
        f"the worker process: {why}"
    )


def _exception_not_sent(raised: BaseException, why: str) -> WorkerTransferError:
    """The error that stands for ``raised``, with its traceback in a note."""
    substitute = WorkerTransferError(
        f"exec raised {_type_name(raised)}: {raised}, which cannot be sent back from "
        f"the worker process: {why}"
    )
    worker_traceback = "".join(traceback.format_exception(raised))
    substitute.add_note(f"exec's traceback in the worker process:\n{worker_traceback}")
    return substitute


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
