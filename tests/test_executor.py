"""Executors: exec inline, in a thread, in a worker process; checks at build()."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_parallel

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.executor import WorkerTransferError
from tests.support import single, started_nowait_once_set_up

ROOT = Path(__file__).resolve().parent.parent


class WhereAmI(cf.Node):
    """exec reports the process and thread it ran in."""

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> tuple[int, int]:
        return os.getpid(), threading.get_ident()

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


async def test_inline_runs_on_the_trio_thread() -> None:
    pid, thread = (await single(WhereAmI()).run()).result
    assert (pid, thread) == (os.getpid(), threading.get_ident())


async def test_thread_runs_in_a_worker_thread_of_this_process() -> None:
    pid, thread = (await single(WhereAmI(executor="thread")).run()).result
    assert pid == os.getpid()
    assert thread != threading.get_ident()


class ReturnsAwaitables(cf.Node):
    """Plain ``def`` phases that return store calls: the engine awaits what they return."""

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        return store.get("n")

    def exec(self, n: int, ctx: cf.ExecutionContext) -> Any:
        return ctx.store.get("step", n)

    def post(
        self, store: cf.SharedStore, prep_res: int, exec_res: int, ctx: cf.ExecutionContext
    ) -> Any:
        return store.set("sum", prep_res + exec_res)


async def test_a_plain_phase_returning_an_awaitable_has_it_awaited() -> None:
    data: dict[str, Any] = {"n": 2, "step": 3}
    result = await single(ReturnsAwaitables()).run(data)
    assert result.success
    assert data["sum"] == 5


class Square(cf.Node):
    executor = "process"

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        return int(ctx.params["n"])

    def exec(self, n: int, ctx: cf.ExecutionContext) -> tuple[int, int]:
        return n * n, os.getpid()

    def post(
        self, store: cf.SharedStore, prep_res: int, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


async def test_process_runs_exec_in_a_worker_process() -> None:
    flow = single(Square())
    async with cf.open_engine() as engine:
        results = [(await engine.run(flow, params={"n": n})).result for n in range(4)]
    assert [value for value, _ in results] == [0, 1, 4, 9]
    assert os.getpid() not in {pid for _, pid in results}


async def test_start_run_nowait_would_block_until_the_worker_processes_are_set_up() -> None:
    not_yet = "worker processes are not set up yet"
    assert (await started_nowait_once_set_up(single(Square()), not_yet))[0] == 9


class RaisesAnEngineError(cf.Node):
    """exec, in a worker process, raises an error whose constructor takes two values."""

    executor = "process"

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        raise cf.MaxStepsExceeded(3, ["a", "b"])


async def test_an_engine_error_raised_in_a_worker_process_comes_back_whole() -> None:
    with pytest.raises(cf.NodeError) as info:
        await single(RaisesAnEngineError()).run()
    cause = info.value.__cause__
    assert isinstance(cause, cf.MaxStepsExceeded)
    assert (cause.max_steps, cause.execution_path) == (3, ("a", "b"))


class StoreInWorker(cf.Node):
    executor = "process"

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        trio.run(ctx.store.get, "x")


async def test_the_store_is_not_reachable_from_a_worker_process() -> None:
    with pytest.raises(cf.NodeError) as info:
        await single(StoreInWorker()).run({"x": 1})
    assert isinstance(info.value.__cause__, cf.StorageError)
    assert "not reachable" in str(info.value.__cause__)


class SuicidalOnce(cf.Node):
    """The first attempt kills its own worker process with SIGKILL."""

    executor = "process"
    max_retries = 2

    def exec(self, marker: str, ctx: cf.ExecutionContext) -> int:
        if ctx.current_retry == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return os.getpid()

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: int, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


async def test_a_worker_killed_mid_exec_is_a_failed_attempt_and_the_engine_survives() -> None:
    async with cf.open_engine() as engine:
        retried = await engine.run(single(SuicidalOnce()))
        assert retried.result != os.getpid()
        with pytest.raises(cf.NodeError) as info:
            await engine.run(single(SuicidalOnce(max_retries=1)))
        assert isinstance(info.value.__cause__, trio_parallel.BrokenWorkerError)
        assert (await engine.run(single(Square()), params={"n": 3})).result[0] == 9


class SpinsForever(cf.Node):
    """exec, in a worker process, writes its pid to the file named by the ``pid_file``
    param (whole, by a rename), then spins forever."""

    executor = "process"

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> str:
        return str(ctx.params["pid_file"])

    def exec(self, pid_file: str, ctx: cf.ExecutionContext) -> None:
        Path(f"{pid_file}.tmp").write_text(str(os.getpid()))
        os.replace(f"{pid_file}.tmp", pid_file)
        while True:
            pass


def run_spinning_engine(pid_file: str) -> None:
    """The engine process that test_a_worker_process_ends_when_its_engine_is_killed
    kills: it runs SpinsForever, which never ends."""
    single(SpinsForever()).run_sync(params={"pid_file": pid_file})


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` (the state of another process) until it holds; fail the test,
    naming ``what``, after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {seconds}s waiting for {what}"
        time.sleep(0.005)


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (read from /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def pid_written(pid_file: Path, engine: subprocess.Popen[bytes]) -> bool:
    """Whether the worker wrote its pid; fails the test if the engine ended first."""
    assert engine.poll() is None, f"the engine process exited with {engine.returncode}"
    return pid_file.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_worker_process_ends_when_its_engine_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    code = f"import tests.test_executor as t; t.run_spinning_engine({str(pid_file)!r})"
    engine = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    worker = 0
    try:
        wait_for(lambda: pid_written(pid_file, engine), 60, "the exec to write its pid")
        worker = int(pid_file.read_text())
        assert running(worker)
        os.kill(engine.pid, signal.SIGKILL)
        engine.wait()
        wait_for(lambda: not running(worker), 10, f"orphaned worker {worker} to end")
    finally:
        engine.kill()
        engine.wait()
        if worker and running(worker):
            os.kill(worker, signal.SIGKILL)


class HoldsALock(Exception):
    """An error that cannot be pickled."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class TakesTwo(Exception):
    """An error that pickles but cannot be unpickled: Exception gets one of its two
    values."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(first)


class Untransferable(cf.Node):
    """Something that cannot cross to or from a worker process: the ``kind`` param."""

    executor = "process"

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        kind = ctx.params["kind"]
        return threading.Lock() if kind == "prep result" else kind

    def exec(self, kind: Any, ctx: cf.ExecutionContext) -> Any:
        if kind == "unpicklable error":
            raise HoldsALock("the lock is mine")
        if kind == "error that cannot be unpickled":
            raise TakesTwo("one", "two")
        return threading.Lock()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("prep result", "cannot send the prep result (_thread.lock) to a worker process: "),
        (
            "unpicklable error",
            "exec raised tests.test_executor.HoldsALock: the lock is mine, which cannot be "
            "sent back from the worker process: TypeError: cannot pickle '_thread.lock'",
        ),
        (
            "error that cannot be unpickled",
            "exec raised tests.test_executor.TakesTwo: one, which cannot be sent back from "
            "the worker process: TypeError: ",
        ),
        ("result", "exec returned a _thread.lock, which cannot be sent back from the worker"),
    ],
)
async def test_what_cannot_cross_to_or_from_a_worker_is_named(kind: str, message: str) -> None:
    with pytest.raises(cf.NodeError) as info:
        await single(Untransferable()).run(params={"kind": kind})
    cause = info.value.__cause__
    assert isinstance(cause, WorkerTransferError)
    assert message in str(cause)
    if "exec raised" in message:
        assert "in exec" in cause.__notes__[0]


def test_build_refuses_an_async_exec_on_a_thread() -> None:
    class AsyncExec(cf.Node):
        executor = "thread"

        async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
            pass

    with pytest.raises(cf.FlowValidationError, match="'bad': executor='thread' needs a plain def"):
        cf.Flow.builder("f").add_node("bad", AsyncExec()).build()


def test_build_refuses_a_node_that_cannot_be_pickled() -> None:
    node = Square()
    node.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(cf.FlowValidationError, match="'sq': executor='process' cannot send"):
        cf.Flow.builder("f").add_node("sq", node).build()


async def test_the_store_is_not_reachable_from_a_thread() -> None:
    class StoreInThread(cf.Node):
        executor = "thread"

        def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> Any:
            return trio.from_thread.run(ctx.store.get, "x")

    with pytest.raises(cf.NodeError) as info:
        await single(StoreInThread()).run({"x": 1})
    assert isinstance(info.value.__cause__, cf.StorageError)


async def test_a_function_node_runs_on_a_thread() -> None:
    @cf.node(executor="thread")
    def blocking(ctx: cf.ExecutionContext) -> cf.Action:
        return cf.Action.complete(threading.get_ident())

    assert (await single(blocking).run()).result != threading.get_ident()
