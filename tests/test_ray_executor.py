"""The "ray" executor: exec as a Ray task on a local Ray cluster; checks at build().

The Ray tests share one local cluster per module and skip when ray is not installed.
An exec that must be watched from the test reports its pid over a loopback TCP
connection to the test and then blocks reading it, so the test knows when the Ray task
runs, can kill its worker, and sees the connection close when the worker dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.ray_executor import LOCAL_RAY_ENV
from tests.storage_suite import free_port
from tests.support import received_until, single, started_nowait_once_set_up
from tests.test_executor import LosesAStoreCall, ReturnsAStoreCall, Square, unreachable_error
from tests.test_transfer import (
    TRANSFER_CASES,
    check_a_node_changed_after_build_is_named,
    check_a_workers_keyboard_interrupt_fails_its_run_alone,
    check_an_error_from_a_worker_keeps_its_traceback,
    check_what_cannot_cross_is_named,
)

ROOT = Path(__file__).parent.parent

GUARD = 60.0
"""Seconds after which a Ray test gives up rather than hang (never reached when it works)."""


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster for the module, with one unit of a custom "gadget" resource."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in LOCAL_RAY_ENV.items():
            patch.setenv(name, value)
        ray.init(address="local", include_dashboard=False, resources={"gadget": 1})
        try:
            yield
        finally:
            ray.shutdown()


@pytest.mark.ray
async def test_exec_runs_in_a_ray_worker_and_returns_its_result(ray_cluster: None) -> None:
    flow = single(Square(executor="ray"))
    async with cf.open_engine() as engine:
        results = [(await engine.run(flow, params={"n": n})).result for n in range(3)]
    assert [value for value, _ in results] == [0, 1, 4]
    assert os.getpid() not in {pid for _, pid in results}


class Squares(cf.ParallelBatchNode):
    executor = "ray"

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[int]:
        return list(range(int(ctx.params["n"])))

    def exec(self, item: int, ctx: cf.ExecutionContext) -> int:
        return item * item

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: list[int], ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


@pytest.mark.ray
async def test_each_item_of_a_parallel_batch_is_a_ray_task(ray_cluster: None) -> None:
    result = (await single(Squares()).run(params={"n": 6})).result
    assert result == [0, 1, 4, 9, 16, 25]


@pytest.mark.ray
async def test_start_run_nowait_would_block_until_the_engine_has_connected_to_ray(
    ray_cluster: None,
) -> None:
    flow = single(Square(executor="ray"))
    assert (await started_nowait_once_set_up(flow, "not connected to Ray"))[0] == 9


class CountsItsPickles(cf.ParallelBatchNode):
    """A parallel batch of "ray" items that counts, in the engine's process, the times
    the node is pickled."""

    executor = "ray"
    pickled = 0

    def __getstate__(self) -> dict[str, Any]:
        type(self).pickled += 1
        return dict(self.__dict__)

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[int]:
        return list(range(8))

    def exec(self, item: int, ctx: cf.ExecutionContext) -> int:
        return item + 1

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: list[int], ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


@pytest.mark.ray
async def test_a_ray_node_is_pickled_once_for_attempts_that_start_together(
    ray_cluster: None,
) -> None:
    flow = single(CountsItsPickles())
    pickled_at_build = CountsItsPickles.pickled
    assert (await flow.run()).result == [1, 2, 3, 4, 5, 6, 7, 8]
    assert CountsItsPickles.pickled == pickled_at_build + 1


class Failing(cf.Node):
    executor = "ray"
    max_retries = 3

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> int:
        if ctx.current_retry < 2:
            raise ValueError(f"attempt {ctx.current_retry}")
        return ctx.current_retry

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: int, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


@pytest.mark.ray
async def test_the_engine_retries_an_exec_that_raises(ray_cluster: None) -> None:
    assert (await single(Failing()).run()).result == 2
    with pytest.raises(cf.NodeError) as info:
        await single(Failing(max_retries=2)).run()
    assert isinstance(info.value.__cause__, ValueError)
    assert str(info.value.__cause__) == "attempt 1"


class Resources(cf.Node):
    executor = "ray"
    ray_options = {"num_cpus": 0.5, "resources": {"gadget": 1}}  # noqa: RUF012

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> dict[str, float]:
        import ray

        assigned: dict[str, float] = ray.get_runtime_context().get_assigned_resources()
        return assigned

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


@pytest.mark.ray
async def test_ray_options_reach_the_ray_task(ray_cluster: None) -> None:
    assigned = (await single(Resources()).run()).result
    assert assigned == {"CPU": 0.5, "gadget": 1.0}


class Reporter(cf.Node):
    """exec connects to the test's port, sends its pid and waits for a reply; with the
    reply it writes the file named in the params and returns the pid. post counts
    itself in the store."""

    executor = "ray"

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> tuple[int, str]:
        return int(ctx.params["port"]), str(ctx.params["effect"])

    def exec(self, job: tuple[int, str], ctx: cf.ExecutionContext) -> int:
        port, effect = job
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(f"{os.getpid()}\n".encode())
            reply = conn.recv(16)
        Path(effect).write_bytes(reply)
        return os.getpid()

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: int, ctx: cf.ExecutionContext
    ) -> cf.Action:
        await store.update("posts", lambda n: n + 1, default=0)
        return cf.Action.complete(exec_res)


async def _listen() -> trio.SocketListener:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener


def _port(listener: trio.SocketListener) -> int:
    port: int = listener.socket.getsockname()[1]
    return port


async def _next_exec(listener: trio.SocketListener) -> tuple[trio.SocketStream, int]:
    """Accept the next exec's connection; return it and the pid the exec sent."""
    stream = await listener.accept()
    received = await received_until(stream, b"\n", "the exec's connection")
    return stream, int(received)


async def _closed_by_peer(stream: trio.SocketStream) -> None:
    """Return when the other end of ``stream`` is gone (its process died)."""
    with contextlib.suppress(trio.BrokenResourceError):
        assert await stream.receive_some() == b""


@pytest.mark.ray
async def test_a_killed_ray_worker_is_retried_by_ray_and_the_step_completes_once(
    ray_cluster: None, tmp_path: Path
) -> None:
    store: dict[str, Any] = {}
    effect = tmp_path / "effect"
    with trio.fail_after(GUARD):
        listener = await _listen()
        async with cf.open_engine() as engine:
            run = await engine.start_run(
                single(Reporter()), store, params={"port": _port(listener), "effect": effect}
            )
            first, first_pid = await _next_exec(listener)
            os.kill(first_pid, signal.SIGKILL)
            await _closed_by_peer(first)
            second, second_pid = await _next_exec(listener)
            await second.send_all(b"go")
            result = await run.wait()
    assert second_pid != first_pid
    assert result.result == second_pid
    assert store["posts"] == 1
    assert effect.read_bytes() == b"go"


@pytest.mark.ray
async def test_a_node_without_ray_retries_fails_when_its_ray_worker_is_lost(
    ray_cluster: None, tmp_path: Path
) -> None:
    from ray.exceptions import WorkerCrashedError

    effect = tmp_path / "effect"
    store: dict[str, Any] = {}
    with trio.fail_after(GUARD):
        listener = await _listen()
        async with cf.open_engine() as engine:
            params = {"port": _port(listener), "effect": effect}
            node = Reporter(ray_options={"max_retries": 0})
            run = await engine.start_run(single(node), store, params=params)
            stream, pid = await _next_exec(listener)
            os.kill(pid, signal.SIGKILL)
            await _closed_by_peer(stream)
            with pytest.raises(cf.NodeError) as info:
                await run.wait()
    assert isinstance(info.value.__cause__, WorkerCrashedError)
    assert store == {}
    assert not effect.exists()


@pytest.mark.ray
async def test_cancelling_the_run_force_cancels_the_ray_task(
    ray_cluster: None, tmp_path: Path
) -> None:
    effect = tmp_path / "effect"
    with trio.fail_after(GUARD):
        listener = await _listen()
        async with cf.open_engine() as engine:
            params = {"port": _port(listener), "effect": effect}
            run = await engine.start_run(single(Reporter()), params=params)
            stream, _ = await _next_exec(listener)
            run.cancel()
            await _closed_by_peer(stream)
    assert run.current_state is cf.RunState.CANCELLED
    assert not effect.exists()


@pytest.mark.ray
async def test_a_timeout_force_cancels_the_ray_task(ray_cluster: None, tmp_path: Path) -> None:
    effect = tmp_path / "effect"
    with trio.fail_after(GUARD):
        listener = await _listen()
        async with cf.open_engine() as engine:
            params = {"port": _port(listener), "effect": effect}
            run = await engine.start_run(single(Reporter(timeout=5.0)), params=params)
            stream, _ = await _next_exec(listener)
            with pytest.raises(cf.NodeError) as info:
                await run.wait()
            await _closed_by_peer(stream)
    assert isinstance(info.value.__cause__, trio.TooSlowError)
    assert not effect.exists()


@pytest.mark.ray
def test_build_refuses_a_ray_node_that_cannot_be_pickled(ray_cluster: None) -> None:
    node = Square(executor="ray")
    node.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(cf.FlowValidationError, match="'sq': executor='ray' cannot send") as info:
        cf.Flow.builder("f").add_node("sq", node).build()
    assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.ray
@pytest.mark.parametrize(("kind", "message"), TRANSFER_CASES)
async def test_what_cannot_cross_to_or_from_a_ray_task_is_named(
    ray_cluster: None, kind: str, message: str
) -> None:
    await check_what_cannot_cross_is_named("ray", kind, message)


@pytest.mark.ray
async def test_a_ray_node_that_cannot_be_pickled_after_build_fails_its_run(
    ray_cluster: None,
) -> None:
    await check_a_node_changed_after_build_is_named("ray")


@pytest.mark.ray
async def test_a_keyboard_interrupt_in_a_ray_task_fails_its_run_alone(ray_cluster: None) -> None:
    await check_a_workers_keyboard_interrupt_fails_its_run_alone("ray")


@pytest.mark.ray
async def test_an_error_from_a_ray_task_keeps_its_traceback(ray_cluster: None) -> None:
    await check_an_error_from_a_worker_keeps_its_traceback("ray")


_OWN_RAY_SCRIPT = """
import os, trio, ray
import cosmoflow_actors as cf
from tests.support import single
from tests.test_executor import LosesAStoreCall, ReturnsAStoreCall, Square, unreachable_error

async def main():
    async with cf.open_engine() as engine:
        value, pid = (await engine.run(single(Square(executor="ray")), params={"n": 7})).result
        print(value, pid != os.getpid(), ray.is_initialized())
    print(ray.is_initialized())

trio.run(main)
"""


@pytest.mark.ray
def test_an_engine_starts_a_local_ray_on_first_use_and_shuts_it_down(ray_cluster: None) -> None:
    done = in_a_process_without_ray_address(_OWN_RAY_SCRIPT)
    assert (done.returncode, done.stdout.split()) == (0, ["49", "True", "True", "False"])


def in_a_process_without_ray_address(
    script: str, *args: str, timeout: float = GUARD
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (with ``args``) in a new Python process without RAY_ADDRESS, so
    that an engine there starts a Ray of its own or joins the address it is given."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=timeout,
        check=False,
    )


def test_build_names_the_ray_extra_when_ray_is_missing() -> None:
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "import cosmoflow_actors as cf\n"
        "from tests.test_executor import Square\n"
        "try:\n"
        "    cf.Flow.builder('f').add_node('remote', Square(executor='ray')).build()\n"
        "except cf.FlowValidationError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert "'remote'" in done.stdout
    assert "pip install 'cosmoflow-actors[ray]'" in done.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([1], "ray_options must be a dict"),
        ({"num_cpu": 1}, "ray_options may set .*, not num_cpu"),
        ({"num_cpus": -1}, r"ray_options\['num_cpus'\] must be a finite number >= 0"),
        ({"num_gpus": "1"}, r"ray_options\['num_gpus'\] must be a finite number"),
        (
            {"resources": {"gadget": None}},
            r"ray_options\['resources'\]\['gadget'\] must be a finite number",
        ),
        ({"runtime_env": "env"}, r"ray_options\['runtime_env'\] must be a dict"),
        ({"max_retries": -1}, r"ray_options\['max_retries'\] must be an int >= 0, got -1"),
        ({"max_retries": 1.0}, r"ray_options\['max_retries'\] must be an int >= 0"),
        ({"max_retries": True}, r"ray_options\['max_retries'\] must be an int >= 0"),
    ],
)
def test_invalid_ray_options_fail_at_construction(options: object, message: str) -> None:
    with pytest.raises(ValueError, match=rf"Square: {message}"):
        Square(executor="ray", ray_options=options)


def test_build_refuses_ray_options_changed_after_construction() -> None:
    node = Square(executor="ray", ray_options={"max_retries": 1})
    node.ray_options = {"max_retries": "3"}
    with pytest.raises(
        cf.FlowValidationError, match=r"node 'sq': ray_options\['max_retries'\] must be an int"
    ):
        cf.Flow.builder("f").add_node("sq", node).build()


_LOST_SCRIPT = """
import trio, ray
import cosmoflow_actors as cf
from tests.support import single
from tests.test_executor import Square

async def main():
    flow = single(Square(executor="ray"))
    async with cf.open_engine() as engine:
        print((await engine.run(flow, params={"n": 2})).result[0])
        ray.shutdown()  # as a Ray Client connection is once its cluster has gone
        try:
            await engine.run(flow, params={"n": 3})
        except cf.NodeError as error:
            print(f"{type(error.__cause__).__name__}: {error.__cause__}")
        print(ray.is_initialized())

trio.run(main)
"""


@pytest.mark.ray
def test_a_lost_ray_connection_fails_the_step_and_starts_no_ray() -> None:
    """Without the check, Ray's first call would start a Ray on this machine (or join
    one found there) and run the step on it."""
    pytest.importorskip("ray")
    done = in_a_process_without_ray_address(_LOST_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    first, error, initialized = done.stdout.splitlines()
    assert first == "4"
    assert error.startswith(
        "RayDisconnectedError: node 'only' cannot start its Ray task: this process is no longer "
        "connected to Ray"
    )
    assert initialized == "False"


_JOINING_SCRIPT = """
import os, sys, trio, ray
import cosmoflow_actors as cf
from tests.support import single
from tests.test_executor import LosesAStoreCall, ReturnsAStoreCall, Square, unreachable_error

async def main():
    async with cf.open_engine(ray_address=sys.argv[1]) as engine:
        value, pid = (await engine.run(single(Square(executor="ray")), params={"n": 7})).result
        print(value, pid != os.getpid(), ray.get_runtime_context().gcs_address)
    print(ray.is_initialized())

trio.run(main)
"""


@asynccontextmanager
async def ray_head(port: int, env: dict[str, str]) -> AsyncIterator[trio.Process]:
    """``ray start --head --block`` on ``port`` (one CPU, no dashboard), once it has
    started; stopped with SIGTERM at exit, which stops the processes it started."""
    ports = ["--port", str(port), "--dashboard-agent-listen-port", str(free_port())]
    ports += ["--metrics-export-port", str(free_port())]
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", *ports]
    command += ["--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
    command += ["--include-dashboard", "false", "--disable-usage-stats"]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    assert process.stdout is not None
    try:
        await received_until(process.stdout, b"Ray runtime started", "ray start")
        yield process
    finally:
        process.terminate()
        with trio.move_on_after(GUARD, shield=True):
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.stdout.aclose()


@pytest.mark.ray
async def test_an_engine_runs_ray_nodes_on_a_cluster_started_apart() -> None:
    """A Ray head started by ``ray start`` in a process of its own: an engine given its
    address runs the exec there, then disconnects and leaves the cluster running."""
    pytest.importorskip("ray")
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env.update(LOCAL_RAY_ENV, PYTHONPATH=str(ROOT))
    address = f"127.0.0.1:{free_port()}"
    with trio.fail_after(GUARD):
        async with ray_head(int(address.rpartition(":")[2]), env) as head:
            done = await trio.run_process(
                [sys.executable, "-c", _JOINING_SCRIPT, address], capture_stdout=True, env=env
            )
            assert head.returncode is None
    assert done.stdout.decode().split() == ["49", "True", address, "False"]


TRIO_IDLE_THREAD_SECONDS = 10.0
"""How long trio keeps an idle worker thread before it exits (trio's thread cache
``IDLE_TIMEOUT``, not configurable)."""

_IDLE_SCRIPT = f"""
import trio, ray
import cosmoflow_actors as cf
from tests.support import single
from tests.test_executor import LosesAStoreCall, ReturnsAStoreCall, Square, unreachable_error

async def main():
    flow = single(Square(executor="ray"))
    async with cf.open_engine() as engine:
        print((await engine.run(flow, params={{"n": 2}})).result[0], flush=True)
        await trio.sleep({TRIO_IDLE_THREAD_SECONDS + 2})
        with trio.fail_after(30):
            print((await engine.run(flow, params={{"n": 3}})).result[0], flush=True)
    print(ray.is_initialized())

trio.run(main)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_ray_started_by_an_engine_outlives_trios_idle_worker_threads() -> None:
    """Ray ties the daemons of a local Ray to the thread that started it: the engine's
    Ray must not die when trio lets the worker thread that connected go (after 10 s
    idle). A real wait of 12 s, for trio to end its idle threads."""
    pytest.importorskip("ray")
    done = in_a_process_without_ray_address(_IDLE_SCRIPT, timeout=2 * GUARD)
    assert done.stdout.split() == ["4", "9", "False"], done.stderr[-3000:]


_CONNECT_SCRIPT = """
import socket, sys, time, trio
import cosmoflow_actors as cf
from cosmoflow_actors.runtime import ray_executor
from tests.support import single
from tests.test_executor import LosesAStoreCall, ReturnsAStoreCall, Square, unreachable_error

async def main(address, deadline):
    start = time.monotonic()
    try:
        with trio.fail_after(deadline):
            async with cf.open_engine(ray_address=address) as engine:
                await engine.run(single(Square(executor="ray")), params={"n": 2})
    except* (ConnectionError, trio.TooSlowError) as group:
        error = group.exceptions[0]
        print(f"{type(error).__name__}: {error}")
    print(f"{time.monotonic() - start:.1f}")
    print(ray_executor._holders, ray_executor._keeper)

listener = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never answers
address = sys.argv[1] or "127.0.0.1:%d" % listener.getsockname()[1]
trio.run(main, address, float(sys.argv[2]))
"""


def connect_in_a_process(address: str, deadline: float) -> list[str]:
    """Run an engine in a new process whose ray flow connects to ``address`` ("": a port
    that accepts TCP connections and never answers) within ``deadline`` seconds; return
    the lines it printed: the error, the seconds it took, the holders and keeper left."""
    pytest.importorskip("ray")
    done = in_a_process_without_ray_address(_CONNECT_SCRIPT, address, str(deadline))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.mark.ray
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_unreachable_ray_address_fails_the_run_at_once_naming_it(scheme: str) -> None:
    """A GCS address or a Ray Client one (``ray://``), whose ray.init would try for 30 s
    and say neither where nor why."""
    address = f"{scheme}127.0.0.1:{free_port()}"
    error, seconds, left = connect_in_a_process(address, GUARD)
    assert error.startswith(f"ConnectionError: cannot reach the Ray cluster at {address}: ")
    assert error.endswith("Connection refused")
    assert float(seconds) < 5.0
    assert left == "0 None"


@pytest.mark.ray
def test_connecting_to_ray_gives_way_to_a_deadline_and_holds_nothing() -> None:
    """The port takes the TCP connection, so ray.init tries for a minute: the deadline
    abandons it, and the engine's hold on the connection is let go."""
    error, seconds, left = connect_in_a_process("", 2.0)
    assert error == "TooSlowError: "
    assert float(seconds) < 5.0
    assert left == "0 None"


@pytest.mark.ray
@pytest.mark.parametrize(
    ("node", "call"), [(LosesAStoreCall, "set('answer')"), (ReturnsAStoreCall, "get('answer')")]
)
async def test_a_store_call_in_a_ray_task_fails_the_step_saying_the_store_is_unreachable(
    ray_cluster: None, node: type[cf.Node], call: str
) -> None:
    """As on a worker process: the error names the call, and no coroutine is left over."""
    data: dict[str, Any] = {"answer": 1}
    error = await unreachable_error(node(executor="ray"), data)
    assert str(error).startswith(
        f"store.{call} in exec of node 'only' was not done: the store is not reachable "
        "from exec with executor='ray'"
    )
    assert data == {"answer": 1}
