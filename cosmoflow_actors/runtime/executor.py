"""Where a node's exec runs: inline on the trio thread, in a thread, in a process, or
as a Ray task (see ``ray_executor``).

"thread" uses ``trio.to_thread.run_sync`` (not cancellable: a timeout or cancel waits
for the call to return). "process" sends the node (pickled once per actor with
cloudpickle, at its first attempt), the prep result and the context to a trio-parallel
worker process, which is killed if the step is cancelled or times out. Both need a plain
``def exec``; the context they get has no store access.

What crosses to a worker process and back, and the errors for what cannot, are the
``transfer`` module's (the "ray" executor shares them).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio_parallel

from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.node import Node
from cosmoflow_actors.runtime.ray_executor import OnRay
from cosmoflow_actors.runtime.store_client import detached
from cosmoflow_actors.runtime.transfer import answer, exec_in_worker, job, pickled_node

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

    async def __call__(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """Blocks until a worker process (one of trio-parallel's limited number) has run
        exec; cancelling kills that worker. Raises what exec raised, WorkerTransferError
        for what could not make the trip, WorkerInterruptedError for a KeyboardInterrupt
        in the worker."""
        if self._pickled is None:
            self._pickled = pickled_node(self._node, ctx.node_id)
        work = job(prep_res, ctx)
        pickled = await self._workers.run_sync(
            exec_in_worker, self._pickled, work, kill_on_cancel=True
        )
        return answer(pickled)
