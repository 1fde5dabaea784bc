"""Where a node's exec runs: inline on the trio thread, in a thread, in a process, or
as a Ray task (see ``ray_executor``).

"thread" uses ``trio.to_thread.run_sync`` (not cancellable: a timeout or cancel waits
for the call to return). "process" sends the node (pickled once per actor with
cloudpickle, at its first attempt), the prep result and the context to a trio-parallel
worker process, which is killed if the step is cancelled or times out (the processes
exec started in it are not). A timeout starts once the attempt has its thread or
worker process (see :func:`timed_call`). Both need a plain ``def exec``; the context
they get has no store access.

What crosses to a worker process and back, and the errors for what cannot, are the
``transfer`` module's (the "ray" executor shares them).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Awaitable, Callable
from types import CoroutineType
from typing import Any, TypeVar

import trio
import trio_parallel

from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.node import Node
from cosmoflow_actors.runtime.ray_executor import OnRay
from cosmoflow_actors.runtime.store_client import detached, hand_over, lost_calls
from cosmoflow_actors.runtime.transfer import (
    Answer,
    NodeNotKept,
    PickledNode,
    ReturnedCoroutine,
    answer,
    exec_in_worker,
    interruption,
    job,
    pickled_node,
    raised_restoring,
    release_frames,
    start_worker,
)

T = TypeVar("T")

ExecCall = Callable[[Any, ExecutionContext], Awaitable[Any]]
"""Runs one exec attempt: ``await call(prep_res_or_item, ctx)``."""

TimedCall = Callable[[Any, ExecutionContext, float], Awaitable[Any]]
"""Runs one exec attempt that must end within a time limit in seconds: ``await
timed(prep_res_or_item, ctx, time_limit)``; past it, trio.TooSlowError."""


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


def timed_call(call: ExecCall) -> TimedCall:
    """``call`` within a timeout. On a thread or a worker process the timeout starts once
    the attempt has its thread or worker (waiting for a free one, and starting a worker
    process for this node, are not counted; a worker started for another node unpickles
    this node, importing its modules, within the timed call); elsewhere it covers the
    whole call."""
    if isinstance(call, _InThread | _InProcess):
        return call.attempt
    return functools.partial(_timed, call)


async def _timed(call: ExecCall, prep_res: Any, ctx: ExecutionContext, time_limit: float) -> Any:
    return await within(time_limit, ctx.node_id, call(prep_res, ctx))


async def within(time_limit: float | None, node_id: str, attempt: Awaitable[T]) -> T:
    """Await ``attempt`` (an exec attempt of ``node_id``), cancelling it after
    ``time_limit`` seconds (None: no limit). Blocks until it ends.

    Raises trio.TooSlowError when the deadline passed: it was cancelled then (also
    when it caught the cancellation and returned a result anyway), or ended after it (a
    sync or thread exec cannot be cancelled): a late result is dropped.
    """
    if time_limit is None:
        return await attempt
    deadline = trio.current_time() + time_limit
    with trio.move_on_at(deadline) as scope:
        result = await attempt
    if scope.cancel_called or trio.current_time() > deadline:
        raise trio.TooSlowError(f"exec of {node_id!r} overran its {time_limit}s timeout")
    return result


def as_coroutine_function(method: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """A node method as a coroutine function: the method itself when it is an ``async
    def``; else one that calls it on the trio thread (see :func:`call`)."""
    if inspect.iscoroutinefunction(method):
        return method
    return functools.partial(call, method)


async def call(method: Callable[..., Any], *args: Any) -> Any:
    """Call a node method that may be plain or async (or return an awaitable); return
    its result. A MemoryError leaves the method's locals behind (see
    ``release_frames``)."""
    try:
        result = method(*args)
        if hasattr(result, "__await__"):
            return await result
        return result
    except MemoryError as exc:
        release_frames(exc)
        raise


class _InThread:
    def __init__(self, node: Node) -> None:
        self._exec = node.exec
        # For the calls made holding a token of trio's default thread limiter already.
        self._held = trio.CapacityLimiter(math.inf)

    async def __call__(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """Blocks until a thread (one of trio's default limiter's) has run exec."""
        return await self.attempt(prep_res, ctx, None)

    async def attempt(self, prep_res: Any, ctx: ExecutionContext, time_limit: float | None) -> Any:
        """Blocks until a thread is free, then until it has run exec; ``time_limit``
        starts once it is free (see :func:`within`).

        A thread cannot be interrupted: when the step is cancelled meanwhile (its run
        ended, its caller was cancelled), what the thread ends with (a result, an error,
        an overrun timeout) is dropped once it comes and trio.Cancelled raised, so
        nothing of the step (a retry, the fallback, post) runs after exec.
        """
        thread_store = detached(ctx.store)
        thread_ctx = ctx.copy(store=thread_store)
        try:
            async with trio.to_thread.current_default_thread_limiter():
                running = trio.to_thread.run_sync(
                    _exec_in_thread, self._exec, prep_res, thread_ctx, limiter=self._held
                )
                [result] = await within(time_limit, ctx.node_id, running)
        finally:
            hand_over(lost_calls(thread_store), ctx.store)
            await trio.lowlevel.checkpoint_if_cancelled()
        if type(result) is CoroutineType:
            # Closed only now: a store call exec returned is among the calls it lost.
            return ReturnedCoroutine.of(result)
        return result


def _exec_in_thread(exec_: Callable[[Any, ExecutionContext], Any], *args: Any) -> tuple[Any]:
    """Call ``exec_`` in a worker thread (blocks it); return its result in a 1-tuple, so
    that a coroutine exec returned reaches the trio thread unclosed (trio refuses and
    closes one a thread's function returns, as its own misuse; a store call among it
    must still be listed as lost). A KeyboardInterrupt there, alone or
    in a group (exec ran its own trio.run), is exec's own (signals reach only the main
    thread): WorkerInterruptedError, a failed attempt. A MemoryError leaves exec's locals
    behind in the thread (see ``release_frames``): trio could not hand it over while
    they hold the memory."""
    try:
        result = exec_(*args)
    except BaseException as exc:
        release_frames(exc)
        interrupted = interruption(exc, "its thread")
        if interrupted is None:
            raise
        raise interrupted from exc
    return (result,)


class _InProcess:
    def __init__(self, node: Node, workers: trio_parallel.WorkerContext) -> None:
        self._node = node
        self._pickled: PickledNode | None = None
        self._workers = workers
        self._limiter = trio_parallel.current_default_worker_limiter()
        # trio-parallel's limiter for this node's calls: the token taken from _limiter
        # is held around the whole attempt, the start of its worker included.
        self._held = trio.CapacityLimiter(math.inf)

    async def __call__(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """Blocks until a worker process (one of trio-parallel's limited number) has run
        exec; cancelling kills that worker. Raises what exec
        raised, WorkerTransferError for what could not make the trip,
        WorkerInterruptedError for a KeyboardInterrupt in the worker."""
        return await self.attempt(prep_res, ctx, None)

    async def attempt(self, prep_res: Any, ctx: ExecutionContext, time_limit: float | None) -> Any:
        """As a call; ``time_limit`` starts once the attempt has an idle worker, started
        for this node if none was (see :func:`within`). Blocks the engine's trio
        thread while it pickles the prep result and unpickles exec's (see
        ``transfer``)."""
        if self._pickled is None:
            self._pickled = pickled_node(self._node, ctx.node_id)
        node = self._pickled
        work = job(prep_res, ctx, "process")
        async with self._limiter:
            if self._workers.statistics().idle_workers == 0:
                await self._in_worker(ctx.node_id, start_worker, node.digest, node.data)
            sent = await within(time_limit, ctx.node_id, self._exec(ctx.node_id, node, work))
        return answer(sent, "process", ctx.store)

    async def _exec(self, node_id: str, node: PickledNode, work: bytes) -> Answer:
        """exec in an idle worker process, sent ``node`` by its digest alone (a worker
        keeps the nodes it unpickled), and sent again with the node's pickle when that
        worker does not keep it (NodeNotKept): a large node crosses once per worker, not
        once per attempt. Blocks until exec has run."""
        try:
            return await self._in_worker(
                node_id, exec_in_worker, node.digest, None, work, "process"
            )
        except NodeNotKept:
            return await self._in_worker(
                node_id, exec_in_worker, node.digest, node.data, work, "process"
            )

    async def _in_worker(self, node_id: str, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in an idle worker process, or in one started for it
        (:func:`start_worker` starts one that unpickles the node, importing its modules,
        and waits, idle, for an exec). Blocks until it has returned; cancelled, it kills
        the worker. Raises what the worker raised (it could not unpickle what it was
        sent, or died); an OSError starting a worker process (too many open files, too
        many processes) is raised again as one that says so, naming ``node_id``."""
        try:
            result: T = await self._workers.run_sync(
                function, *args, kill_on_cancel=True, limiter=self._held
            )
        except OSError as exc:
            if raised_restoring(exc):
                raise
            raise _start_failed(node_id, exc) from exc
        return result


def _start_failed(node_id: str, error: OSError) -> OSError:
    """An OSError of ``error``'s errno (so of its class) and file name saying that
    starting a worker process for ``node_id`` failed with ``error``."""
    what = f"cannot start a worker process for node {node_id!r}"
    if error.errno is None:
        return OSError(f"{what}: {error}")
    return OSError(error.errno, f"{what}: {error.strerror}", error.filename)
