"""The "ray" executor: a node's exec attempts run as Ray tasks.

The node is pickled once per node actor (cloudpickle), at its first attempt, and put in
Ray's object store; each attempt sends the prep result and the context (its store
detached) to a Ray task, which runs ``node.exec`` and sends back the pickled outcome.
What cannot make the trip fails the attempt with ``WorkerTransferError``, as with the
"process" executor (both use the ``transfer`` module). The trio task waits for the result
without a thread: a done-callback on the task's future wakes it through the trio token.
Cancelling the attempt (run cancel, timeout) force-cancels the Ray task and does not
wait for it.

Retries, backoff, timeout, rate limits and the fallback stay the engine's; Ray retries a
task only when its worker process is lost: ``ray_options["max_retries"]`` times, by
default ``RAY_SYSTEM_RETRIES``.

The connection (:func:`connect`, :func:`disconnect`) is the process's: engines count
themselves as its holders. A Ray an engine starts or joins is owned by a thread of its
own (:class:`_Keeper`) that lives as long as the connection, because Ray ties the
daemons of a local Ray to the thread that called ``ray.init``: started from one of
trio's worker threads, which end after 10 s idle, the local Ray would die with it.

Ray is imported only here, and only when a flow has a "ray" node.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future
from typing import Any, Final

import trio

from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.errors import CosmoFlowError
from cosmoflow_actors.node import Node
from cosmoflow_actors.runtime.store_client import detached
from cosmoflow_actors.runtime.transfer import Answer, answer, exec_in_worker, job, pickled_node

RAY_SYSTEM_RETRIES = 3
"""Times Ray resubmits a task whose worker process died (not when exec raises), unless
the node's ``ray_options`` set ``max_retries``."""
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Environment a Ray started by the engine on this machine gets (unless already set)."""
REACH_TIMEOUT: Final = 5.0
"""Seconds :func:`connect` waits for a plain ``host:port`` Ray address (or a Ray Client
``ray://host:port``) to accept a TCP connection before it gives up on the cluster."""


class _Keeper:
    """One Ray connection made for the engines, owned by a daemon thread of its own: the
    thread calls ``ray.init``, reports how that went, then waits until it is told to stop
    and calls ``ray.shutdown``. Its methods never block unless they say so."""

    def __init__(self, address: str | None, previous: _Keeper | None) -> None:
        """Start the thread. ``previous`` is the keeper before this one, which may still be
        shutting down: the thread waits for it to end before it connects."""
        self._address = address
        self._previous = previous
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._keep, name="ray connection", daemon=True)
        self._thread.start()

    def wait_connected(self) -> None:
        """Blocks until ``ray.init`` has returned; raises what it raised."""
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Tell the thread to shut Ray down, once ``ray.init`` has returned."""
        self._stop.set()

    def alive(self) -> bool:
        """Whether the thread still runs (connecting, connected or shutting down)."""
        return self._thread.is_alive()

    def join(self) -> None:
        """Blocks until the thread has ended: Ray is shut down (or never connected)."""
        self._thread.join()

    def _keep(self) -> None:
        """The thread: blocks while the previous keeper ends, while Ray connects, while
        the connection is held, and while Ray shuts down."""
        if self._previous is not None:
            self._previous.join()
            self._previous = None
        try:
            _init(self._address)
        except BaseException as exc:
            self._error = exc
            return
        finally:
            self._ready.set()
        self._stop.wait()
        import ray

        ray.shutdown()


def _init(address: str | None) -> None:
    """``ray.init``: join Ray at ``address``, or start a local one when it is None. Blocks
    until connected (seconds to start a Ray; as long as Ray tries an address)."""
    import ray

    if address is None:
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address)


_lock = threading.Lock()
"""Guards the three values below; held only for a moment, never while blocking."""
_holders = 0
"""Engines holding the Ray connection of this process (or waiting for it)."""
_keeper: _Keeper | None = None
"""The keeper of the connection the holders share, when an engine made it (None: no
holder, or the program called ``ray.init`` itself)."""
_last_keeper: _Keeper | None = None
"""The latest keeper made, which may still be shutting down after its holders left."""


async def connect(address: str | None) -> None:
    """Hold the Ray connection of this process: join Ray at ``address`` (None:
    ``RAY_ADDRESS``, else start a local Ray) unless it is connected already. Blocks
    until connected: for a plain ``host:port`` (or a Ray Client ``ray://host:port``),
    at most :data:`REACH_TIMEOUT` seconds to find it unreachable (ConnectionError naming
    it), then as long as ``ray.init`` takes. Cancellable: a connection still being made
    is then let go of (shut down once made, unless another engine holds it)."""
    await trio.to_thread.run_sync(_import_ray, abandon_on_cancel=True)
    address = address or os.environ.get("RAY_ADDRESS")
    if address is not None and not _connected():
        await _check_reachable(address)
    keeper = _hold(address)
    try:
        if keeper is not None:
            await trio.to_thread.run_sync(keeper.wait_connected, abandon_on_cancel=True)
    except BaseException:
        _let_go()
        raise


async def disconnect() -> None:
    """Let go of the Ray connection; the last holder shuts down a Ray that an engine
    started or joined. Blocks until it is shut down; cancelled, it stops waiting and
    the keeper's thread shuts Ray down all the same."""
    keeper = _let_go()
    if keeper is not None:
        await trio.to_thread.run_sync(keeper.join, abandon_on_cancel=True)


def _import_ray() -> None:
    """Import ray (blocks for a second or two the first time: call it in a thread)."""
    import ray  # noqa: F401


def _connected() -> bool:
    """Whether this process has a Ray connection, or one is being made. Never blocks."""
    import ray

    return _keeper is not None or ray.is_initialized()


def _hold(address: str | None) -> _Keeper | None:
    """Count one more holder; return the keeper of the connection to wait for, started
    now when there is none (None: the program's own ``ray.init``). Never blocks."""
    import ray

    global _holders, _keeper, _last_keeper
    with _lock:
        _holders += 1
        last_alive = _last_keeper is not None and _last_keeper.alive()
        if _keeper is None and (last_alive or not ray.is_initialized()):
            _keeper = _last_keeper = _Keeper(address, _last_keeper)
        return _keeper


def _let_go() -> _Keeper | None:
    """Count one holder less; when it was the last, tell the keeper (if any) to shut Ray
    down and return it. Never blocks."""
    global _holders, _keeper
    with _lock:
        _holders -= 1
        if _holders > 0 or _keeper is None:
            return None
        keeper, _keeper = _keeper, None
    keeper.stop()
    return keeper


def _tcp_address(address: str) -> tuple[str, int] | None:
    """The host and port of a plain ``host:port`` address or a Ray Client one,
    ``ray://host:port``; None for any other form ("auto", "ray://host")."""
    rest = address.removeprefix("ray://")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or "/" in rest or not port.isdigit():
        return None
    if not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


async def _check_reachable(address: str) -> None:
    """Raise ConnectionError naming ``address`` unless it is not a plain ``host:port``
    (nor ``ray://host:port``) or that port accepts a TCP connection. Blocks at most
    :data:`REACH_TIMEOUT` seconds."""
    target = _tcp_address(address)
    if target is None:
        return
    try:
        with trio.fail_after(REACH_TIMEOUT):
            stream = await trio.open_tcp_stream(*target)
    except trio.TooSlowError as exc:
        why = f"no answer within {REACH_TIMEOUT}s"
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {why}") from exc
    except OSError as exc:
        why = str(_connect_error(exc))
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {why}") from exc
    await stream.aclose()


def _connect_error(error: OSError) -> OSError:
    """The error of the one connection attempt behind ``error`` when there was one (it
    says why: "Connection refused"), else ``error`` itself."""
    attempts = error.__cause__
    if isinstance(attempts, ExceptionGroup) and len(attempts.exceptions) == 1:
        first = attempts.exceptions[0]
        if isinstance(first, OSError):
            return first
    return error


class OnRay:
    """Runs one exec attempt of ``node`` as a Ray task (the ``ExecCall`` of "ray" nodes).

    Needs a Ray connection (:func:`connect`) before its first call.
    """

    def __init__(self, node: Node) -> None:
        self._node = node
        self._node_digest = b""
        self._node_ref: Any = None
        self._options: dict[str, Any] = {
            "max_retries": RAY_SYSTEM_RETRIES,
            **(node.ray_options or {}),
            "retry_exceptions": False,
        }
        self._remote: Any = None
        self._putting = trio.Lock()

    async def __call__(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """Blocks until a Ray task has run exec (the first call also puts the node in
        Ray's object store); cancelled, it force-cancels the task. Blocks the engine's
        trio thread while it pickles the prep result and unpickles exec's (see
        ``transfer``). Raises what exec raised, WorkerTransferError for what could
        not make the trip, or RayDisconnectedError naming the node when this process is
        no longer connected to Ray."""
        _require_connection(ctx.node_id)
        remote_ctx = ctx.copy(store=detached(ctx.store))
        work = job(prep_res, remote_ctx, "ray")
        if self._node_ref is None:
            await self._put_node(ctx.node_id)
        # Ray passes the worker the node's pickle from its object store, which the
        # worker unpickles once and keeps under the digest.
        ref = self._remote.remote(self._node_digest, self._node_ref, work, "ray")
        return answer(await _result(ref), "ray", ctx.store)

    async def _put_node(self, node_id: str) -> None:
        """Unless another attempt has done it meanwhile: pickle the node
        (WorkerTransferError naming ``node_id`` if it cannot be), put it in Ray's object
        store and make the remote function. Blocks while another attempt does it, and
        in a thread while talking to Ray."""
        import ray

        async with self._putting:
            if self._node_ref is not None:
                return
            pickled = pickled_node(self._node, node_id)

            def prepare() -> tuple[Any, Any]:
                remote = ray.remote(exec_in_worker).options(**self._options)
                return ray.put(pickled.data), remote

            self._node_ref, self._remote = await trio.to_thread.run_sync(prepare)
            self._node_digest = pickled.digest


class RayDisconnectedError(CosmoFlowError, ConnectionError):
    """A "ray" node's attempt found this process no longer connected to Ray: no attempt
    of the engine's can run on Ray until it is connected again (a new engine). A queue's
    worker that meets it stops, handing its runs back."""


def _require_connection(node_id: str) -> None:
    """Raise RayDisconnectedError naming ``node_id`` when this process is no longer
    connected to Ray: a Ray Client connection is lost for good once its cluster has been
    away for Ray's reconnect grace period (30 s), and any call to Ray would then start a
    Ray on this machine or join one found there. Never blocks."""
    import ray

    if not ray.is_initialized():
        raise RayDisconnectedError(
            f"node {node_id!r} cannot start its Ray task: this process is no longer "
            "connected to Ray (a Ray Client connection is lost once its cluster has been "
            "unreachable for Ray's reconnect grace period); close the engines using it "
            "and open one to connect again"
        )


async def _result(ref: Any) -> Answer:
    """Wait for the Ray task ``ref`` without blocking trio; force-cancel it (and not wait)
    if this is cancelled. Raises what the task's future raises (a lost worker past its
    retries, a task cancelled by someone else)."""
    import ray

    done = trio.Event()
    token = trio.lowlevel.current_trio_token()
    future: Future[Answer] = ref.future()

    def wake(_: Future[Answer]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        ray.cancel(ref, force=True)
        raise
    return future.result()
