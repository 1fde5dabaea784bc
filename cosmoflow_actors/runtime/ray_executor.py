"""The "ray" executor: a node's exec attempts run as Ray tasks.

The node is pickled once per node actor (cloudpickle) and put in Ray's object store;
each attempt sends the prep result and the context (its store detached) to a Ray task,
which runs ``node.exec`` and sends back the pickled outcome. The trio task waits for
the result without a thread: a done-callback on the task's future wakes it through the
trio token. Cancelling the attempt (run cancel, timeout) force-cancels the Ray task and
does not wait for it.

Retries, backoff, timeout, rate limits and the fallback stay the engine's; Ray retries a
task only when its worker process is lost: ``ray_options["max_retries"]`` times, by
default ``RAY_SYSTEM_RETRIES``.

Ray is imported only here, and only when a flow has a "ray" node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from concurrent.futures import Future
from typing import Any

import cloudpickle
import outcome
import trio

from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.node import Node
from cosmoflow_actors.runtime.store_client import detached

RAY_SYSTEM_RETRIES = 3
"""Times Ray resubmits a task whose worker process died (not when exec raises), unless
the node's ``ray_options`` set ``max_retries``."""
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Environment a Ray started by the engine on this machine gets (unless already set)."""

_lock = threading.Lock()
_holders = 0
"""Engines holding the Ray connection of this process."""
_started_here = False
"""Whether the Ray connection was started by an engine (so the last one shuts it down)."""


def connect(address: str | None) -> None:
    """Join Ray at ``address`` (None: ``RAY_ADDRESS``, else start a local Ray) unless this
    process is connected already; count one more holder. Blocks: call it in a thread."""
    import ray

    global _holders, _started_here
    with _lock:
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            if address is None:
                for name, value in LOCAL_RAY_ENV.items():
                    os.environ.setdefault(name, value)
                ray.init(address="local", include_dashboard=False)
            else:
                ray.init(address=address)
            _started_here = True
        _holders += 1


def disconnect() -> None:
    """Count one holder less; the last one shuts down a Ray an engine started. Blocks:
    call it in a thread."""
    import ray

    global _holders, _started_here
    with _lock:
        _holders -= 1
        if _holders == 0 and _started_here:
            _started_here = False
            ray.shutdown()


class OnRay:
    """Runs one exec attempt of ``node`` as a Ray task (the ``ExecCall`` of "ray" nodes).

    Needs a Ray connection (:func:`connect`) before its first call.
    """

    def __init__(self, node: Node) -> None:
        self._node = cloudpickle.dumps(node)
        self._node_ref: Any = None
        self._options: dict[str, Any] = {
            "max_retries": RAY_SYSTEM_RETRIES,
            **(node.ray_options or {}),
            "retry_exceptions": False,
        }
        self._remote: Any = None

    async def __call__(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        remote_ctx = dataclasses.replace(ctx, store=detached(ctx.store))
        job = cloudpickle.dumps((prep_res, remote_ctx))
        if self._node_ref is None:
            await self._put_node()
        ref = self._remote.remote(self._node_ref, job)
        answer = await _result(ref)
        result: outcome.Outcome[Any] = cloudpickle.loads(answer)
        return result.unwrap()

    async def _put_node(self) -> None:
        """Put the pickled node in Ray's object store and make the remote function, in a
        thread (both talk to Ray)."""
        import ray

        from cosmoflow_actors.runtime.executor import _exec_in_worker

        def prepare() -> tuple[Any, Any]:
            remote = ray.remote(_exec_in_worker).options(**self._options)
            return ray.put(self._node), remote

        node_ref, remote = await trio.to_thread.run_sync(prepare)
        if self._node_ref is None:
            self._node_ref, self._remote = node_ref, remote


async def _result(ref: Any) -> bytes:
    """Wait for the Ray task ``ref`` without blocking trio; force-cancel it (and not wait)
    if this is cancelled. Raises what the task's future raises (a lost worker past its
    retries, a task cancelled by someone else)."""
    import ray

    done = trio.Event()
    token = trio.lowlevel.current_trio_token()
    future: Future[bytes] = ref.future()

    def wake(_: Future[bytes]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        ray.cancel(ref, force=True)
        raise
    return future.result()
