"""Where a node's exec runs: inline on the trio thread, in a thread, in a process, or
as a Ray task (see ``ray_executor``).

"thread" uses ``trio.to_thread.run_sync`` (not cancellable: a timeout or cancel waits
for the call to return). "process" sends the node (pickled once per actor with
cloudpickle, at its first attempt), the prep result and the context to a trio-parallel
worker process, which is killed if the step is cancelled or times out; a worker still
starting (when none was idle) is not, so that it serves the next attempt. Both need a
plain ``def exec``; the context they get has no store access.

What crosses to a worker process and back, and the errors for what cannot, are the
``transfer`` module's (the "ray" executor shares them).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio
import trio_parallel

from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.node import Node
from cosmoflow_actors.runtime.ray_executor import OnRay
from cosmoflow_actors.runtime.store_client import detached
from cosmoflow_actors.runtime.transfer import (
    answer,
    exec_in_worker,
    job,
    pickled_node,
    start_worker,
)

WORKER_START_TIMEOUT: Final = 10.0
"""Seconds a worker process may go on starting once the exec attempt that needed it is
cancelled; past them the start is abandoned (the worker killed)."""

ExecCall = Callable[[Any, ExecutionContext], Awaitable[Any]]
"""Runs one exec attempt: ``await call(prep_res_or_item, ctx)``."""


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
        self._node = node
        self._pickled: bytes | None = None
        self._workers = workers
        self._limiter = trio_parallel.current_default_worker_limiter()
        # trio-parallel's limiter for this node's calls: the token taken from _limiter
        # is held around the whole attempt, the start of its worker included.
        self._held = trio.CapacityLimiter(math.inf)

    async def __call__(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """Blocks until a worker process (one of trio-parallel's limited number) has run
        exec; cancelling kills that worker (not one still starting). Raises what exec
        raised, WorkerTransferError for what could not make the trip,
        WorkerInterruptedError for a KeyboardInterrupt in the worker."""
        if self._pickled is None:
            self._pickled = pickled_node(self._node, ctx.node_id)
        work = job(prep_res, ctx)
        async with self._limiter:
            if self._workers.statistics().idle_workers == 0:
                await self._start_worker(self._pickled)
            pickled = await self._workers.run_sync(
                exec_in_worker, self._pickled, work, kill_on_cancel=True, limiter=self._held
            )
        return answer(pickled)

    async def _start_worker(self, node: bytes) -> None:
        """Blocks until a new worker process has started, unpickled ``node`` (imported
        its modules) and waits, idle, for an exec.

        Killed at a timeout shorter than a start, every attempt would start a worker
        again and none would run exec. So the start goes on when the attempt is
        cancelled (its timeout, a cancelled run, the engine closing), for at most
        :data:`WORKER_START_TIMEOUT` seconds more (then the worker is killed), and the
        worker serves the next attempt. A cancelled attempt ends once the start is over.

        Raises what the start raised (the worker could not unpickle the node, or died)
        as it is, not in an ExceptionGroup: ``retry_on`` and the step's error see it.
        """
        starting = trio.CancelScope(shield=True)
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_bound_when_cancelled, starting)
            with starting:
                try:
                    await self._workers.run_sync(
                        start_worker, node, kill_on_cancel=True, limiter=self._held
                    )
                except Exception as exc:
                    # Raised inside the nursery, it would leave wrapped in a group.
                    failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure


async def _bound_when_cancelled(starting: trio.CancelScope) -> None:
    """Blocks until cancelled, then gives the shielded ``starting`` scope a deadline of
    :data:`WORKER_START_TIMEOUT` seconds from now."""
    try:
        await trio.sleep_forever()
    finally:
        starting.deadline = trio.current_time() + WORKER_START_TIMEOUT
