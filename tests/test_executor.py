"""Executors: exec inline, in a thread, in a worker process; checks at build()."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_parallel
from trio.testing import wait_all_tasks_blocked

import cosmoflow_actors as cf
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


@pytest.mark.parametrize("checkpoints", range(6))
async def test_a_start_waiting_for_worker_processes_when_the_engine_closes_is_cancelled(
    checkpoints: int,
) -> None:
    """However far the set-up of the flow's worker processes got, a caller outside the
    engine's block learns that its run was cancelled, not that it called a closed
    engine."""
    errors: list[Exception] = []

    async def call(engine: cf.Engine) -> None:
        try:
            await engine.run(single(Square()), params={"n": 2})
        except Exception as exc:
            errors.append(exc)

    async with trio.open_nursery() as callers:
        with trio.CancelScope() as engine_scope:
            async with cf.open_engine() as engine:
                callers.start_soon(call, engine)
                for _ in range(checkpoints):
                    await trio.lowlevel.checkpoint()
                engine_scope.cancel()
    assert [type(error) for error in errors] == [cf.RunCancelledError]


async def test_start_run_nowait_would_block_until_the_worker_processes_are_set_up() -> None:
    not_yet = "worker processes are not set up yet"
    assert (await started_nowait_once_set_up(single(Square()), not_yet))[0] == 9


async def test_flows_first_run_at_once_share_one_set_of_worker_processes() -> None:
    """Two flows with process nodes, first run at the same moment: the engine sets up
    its worker processes once, and both flows' execs run there."""

    def holders(task: trio.lowlevel.Task) -> int:
        """The tasks under ``task`` (itself too) that hold a set of worker processes."""
        own = task.name.endswith("_hold_workers")
        children = [child for nursery in task.child_nurseries for child in nursery.child_tasks]
        return own + sum(holders(child) for child in children)

    flows = [single(Square(), f"squares-{index}") for index in range(2)]
    results: list[Any] = []
    async with cf.open_engine() as engine:
        async with trio.open_nursery() as nursery:
            for flow in flows:
                nursery.start_soon(_result_into, results, engine.run(flow, params={"n": 3}))
        assert holders(trio.lowlevel.current_root_task()) == 1
    assert [value for value, _ in results] == [9, 9]


async def _result_into(results: list[Any], run: Awaitable[cf.FlowResult]) -> None:
    results.append((await run).result)


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


def rebuilt_in(pid: int) -> UnpicklesOnlyIn:
    """Unpickle an UnpicklesOnlyIn; RuntimeError in any process but ``pid``."""
    if os.getpid() != pid:
        raise RuntimeError("cannot be unpickled in a worker process")
    return UnpicklesOnlyIn()


class UnpicklesOnlyIn:
    """A value that unpickles only in the process that pickled it."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return rebuilt_in, (os.getpid(),)


class CannotStartItsWorker(cf.Node):
    """A "process" node that its worker process cannot unpickle as it starts."""

    executor = "process"
    max_retries = 2
    retry_on = (RuntimeError,)

    def __init__(self) -> None:
        super().__init__()
        self.value = UnpicklesOnlyIn()

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        raise AssertionError("a worker that cannot unpickle the node runs no exec")


async def test_a_worker_start_that_fails_fails_the_attempt_with_its_own_error() -> None:
    """The error of a worker start reaches the step as it is, not in a group: retry_on
    retries it, and the run's NodeError is caused by it."""
    with pytest.raises(cf.NodeError) as info:
        await single(CannotStartItsWorker()).run()
    assert info.value.attempts == 2
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError)
    assert str(cause) == "cannot be unpickled in a worker process"


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
    with pytest.raises(
        cf.FlowValidationError, match="'sq': executor='process' cannot send"
    ) as info:
        cf.Flow.builder("f").add_node("sq", node).build()
    cause = info.value.__cause__
    assert isinstance(cause, TypeError)
    assert str(cause) == "cannot pickle '_thread.lock' object"


async def test_the_store_is_not_reachable_from_a_thread() -> None:
    class StoreInThread(cf.Node):
        executor = "thread"

        def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> Any:
            return trio.from_thread.run(ctx.store.get, "x")

    with pytest.raises(cf.NodeError) as info:
        await single(StoreInThread()).run({"x": 1})
    assert isinstance(info.value.__cause__, cf.StorageError)


class NotesInExec(cf.Node):
    """exec, on a thread, writes to the step's metadata; post returns what it finds."""

    executor = "thread"

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        ctx.metadata["exec"] = threading.current_thread() is not threading.main_thread()

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(dict(ctx.metadata))


async def test_what_exec_on_a_thread_writes_to_the_metadata_reaches_post() -> None:
    """Even when nothing of the step made the metadata dict before exec."""
    result = await single(NotesInExec()).run()
    assert result.result == {"exec": True}


async def test_a_function_node_runs_on_a_thread() -> None:
    @cf.node(executor="thread")
    def blocking(ctx: cf.ExecutionContext) -> cf.Action:
        return cf.Action.complete(threading.get_ident())

    assert (await single(blocking).run()).result != threading.get_ident()


SHORTER_THAN_A_WORKER_START = 0.05
"""Seconds: a timeout that a fast exec keeps, but that starting a worker process (a
Python interpreter importing the engine and the node's module) always overruns."""


async def test_a_timeout_does_not_count_the_start_of_the_worker_process() -> None:
    node = Square(timeout=SHORTER_THAN_A_WORKER_START)
    async with cf.open_engine() as engine:
        result = await engine.run(single(node), params={"n": 3})
    assert result.result[0] == 9


EXEC_SECONDS = 0.25
"""How long each exec below works (really: a thread or a worker process)."""

LONGER_THAN_ONE_EXEC = 0.6
"""A timeout one exec keeps by far, but that three execs one after the other overrun."""


class Works(cf.Node):
    """exec works :data:`EXEC_SECONDS`, within :data:`LONGER_THAN_ONE_EXEC`."""

    max_concurrency = 3
    timeout = LONGER_THAN_ONE_EXEC

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
        time.sleep(EXEC_SECONDS)
        return "done"

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: str, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


async def three_at_once(node: cf.Node) -> list[str]:
    """The exec results of three runs of ``node`` started at once."""
    flow = single(node)
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow) for _ in range(3)]
        return [(await run.wait()).result for run in runs]


async def test_a_timeout_does_not_count_the_wait_for_a_free_thread() -> None:
    trio.to_thread.current_default_thread_limiter().total_tokens = 1
    assert await three_at_once(Works(executor="thread")) == ["done"] * 3


async def test_a_timeout_does_not_count_the_wait_for_a_free_worker_process() -> None:
    trio_parallel.current_default_worker_limiter().total_tokens = 1
    assert await three_at_once(Works(executor="process")) == ["done"] * 3


def rebuilt_slowly(pid: int, fifo: str) -> StartsSlowly:
    """Unpickle a StartsSlowly: in any process but ``pid``, write a byte to ``fifo``,
    then take a minute."""
    if os.getpid() != pid:
        Path(fifo).write_bytes(b"!")
        time.sleep(60)
    return StartsSlowly(fifo)


class StartsSlowly:
    """A value whose unpickling in a worker process says so on ``fifo`` and then takes
    a minute."""

    def __init__(self, fifo: str) -> None:
        self.fifo = fifo

    def __reduce__(self) -> tuple[Any, tuple[int, str]]:
        return rebuilt_slowly, (os.getpid(), self.fifo)


class SlowToStart(cf.Node):
    """A "process" node whose worker process takes a minute to start."""

    executor = "process"

    def __init__(self, fifo: str) -> None:
        super().__init__()
        self.value = StartsSlowly(fifo)

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        raise AssertionError("the run was cancelled before its worker started")


HANG = 5.0
"""Seconds after which an engine that has not closed counts as hung."""


async def test_a_run_cancelled_while_its_worker_process_starts_lets_the_engine_close(
    tmp_path: Path,
) -> None:
    """The starting worker is killed: the step ends with the run, not after the start."""
    fifo = tmp_path / "starting"
    os.mkfifo(fifo)
    with trio.fail_after(HANG):
        async with cf.open_engine() as engine:
            run = await engine.start_run(single(SlowToStart(str(fifo))))
            async with await trio.open_file(fifo, "rb") as starting:
                assert await starting.read(1) == b"!"
            run.cancel()
            with pytest.raises(cf.RunCancelledError):
                await run.wait()


class Sleeps(cf.Node):
    """exec sleeps in its worker process for the ``seconds`` param."""

    executor = "process"
    max_concurrency = 2

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> float:
        return float(ctx.params["seconds"])

    def exec(self, seconds: float, ctx: cf.ExecutionContext) -> None:
        time.sleep(seconds)


def steps_in_flight(engine: cf.Engine, actor: str) -> int:
    """The steps that node actor ``actor`` holds a slot for."""
    (stats,) = [stats for stats in engine.statistics().actors if stats.name == actor]
    return stats.in_flight


async def test_a_cancelled_run_waiting_for_a_busy_worker_gives_its_slot_back_at_once() -> None:
    trio_parallel.current_default_worker_limiter().total_tokens = 1
    flow = single(Sleeps())
    async with cf.open_engine() as engine:
        busy = await engine.start_run(flow, params={"seconds": 60})
        await wait_all_tasks_blocked()
        waiting = await engine.start_run(flow, params={"seconds": 0})
        await wait_all_tasks_blocked()
        assert steps_in_flight(engine, "single/only") == 2
        waiting.cancel()
        await wait_all_tasks_blocked()
        assert steps_in_flight(engine, "single/only") == 1
        busy.cancel()


class InterruptsItself(cf.Node):
    """A thread exec that raises KeyboardInterrupt, as a Ctrl-C of its own would: alone,
    or with the ``grouped`` param in an exception group, as exec's own trio.run or
    TaskGroup raises it."""

    executor = "thread"

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if ctx.params.get("grouped"):
            raise BaseExceptionGroup("exec's own run", [KeyboardInterrupt()])
        raise KeyboardInterrupt


@pytest.mark.parametrize("grouped", [False, True])
async def test_a_keyboard_interrupt_in_a_thread_exec_fails_its_run_alone(grouped: bool) -> None:
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError) as info:
            await engine.run(single(InterruptsItself()), params={"grouped": grouped})
        after = await engine.run(single(WhereAmI(executor="thread")))
    cause = info.value.__cause__
    assert isinstance(cause, cf.WorkerInterruptedError)
    assert str(cause) == "exec was interrupted in its thread (KeyboardInterrupt)"
    raised = cause.__cause__
    if grouped:
        assert isinstance(raised, BaseExceptionGroup)
        assert raised.subgroup(KeyboardInterrupt) is not None
    else:
        assert isinstance(raised, KeyboardInterrupt)
    assert after.success


class HeldInThread(cf.Node):
    """A thread exec that waits for ``release`` (and then raises, in the run "cancelled",
    if ``raises``); post stores what exec or the fallback returned."""

    executor = "thread"
    max_concurrency = 1

    def __init__(self, raises: bool = False) -> None:
        super().__init__()
        self.inside = threading.Event()
        self.release = threading.Event()
        self.raises = raises
        self.fallbacks = 0

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
        self.inside.set()
        self.release.wait(timeout=30)
        if self.raises and ctx.run_id == "cancelled":
            raise ValueError("exec failed in its thread")
        return ctx.run_id

    def exec_fallback(self, prep_res: Any, error: Exception, ctx: cf.ExecutionContext) -> str:
        self.fallbacks += 1
        return "fallback"

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: str, ctx: cf.ExecutionContext
    ) -> None:
        await store.set("post", exec_res)


async def test_a_caller_cancelled_during_a_thread_exec_gets_cancelled_and_post_never_runs() -> None:
    node = HeldInThread()
    store: dict[str, Any] = {}
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def caller() -> None:
            with scope:
                await engine.run(single(node), store)

        nursery.start_soon(caller)
        await trio.to_thread.run_sync(node.inside.wait)
        scope.cancel()
        node.release.set()
    assert scope.cancelled_caught
    assert store == {}
    assert engine.statistics().runs_cancelled == 1


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
async def test_a_run_cancelled_during_a_thread_exec_runs_no_fallback_nor_post(raises: bool) -> None:
    node = HeldInThread(raises)
    flow = single(node)
    store: dict[str, Any] = {}
    async with cf.open_engine() as engine:
        run = await engine.start_run(flow, store, run_id="cancelled")
        await trio.to_thread.run_sync(node.inside.wait)
        run.cancel()
        node.release.set()
        # The node's one slot is free once the cancelled step has ended.
        after: dict[str, Any] = {}
        await engine.run(flow, after, run_id="after")
    assert after == {"post": "after"}
    assert store == {}
    assert node.fallbacks == 0
    with pytest.raises(cf.RunCancelledError):
        await run.wait()


OUT_OF_MEMORY = """
import gc, resource, sys
import trio
import cosmoflow_actors as cf

class Hog(cf.Node):
    def exec(self, prep_res, ctx):
        chunks = []
        while True:
            chunks.append(bytearray(1000))

class Refill(cf.Node):
    def exec(self, prep_res, ctx):
        refill = [bytearray(1000) for _ in range(200_000)]
        return len(refill) * 1000 // 2**20

    def post(self, store, prep_res, exec_res, ctx):
        return cf.Action.complete(exec_res)

def vm_size():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024

async def main():
    flow = cf.Flow.builder("hogs").add_node("hog", Hog(executor=sys.argv[1])).build()
    refill = cf.Flow.builder("refill").add_node("refill", Refill(executor=sys.argv[1])).build()
    async with cf.open_engine() as engine:
        limit = vm_size() + 512 * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        try:
            await engine.run(flow)
        except cf.NodeError as error:
            print(error.node_id, error.phase, type(error.__cause__).__name__, flush=True)
        refilled = await engine.run(refill)
        print("refilled", refilled.result, "MiB", flush=True)

gc.disable()
trio.run(main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["inline", "thread", "process"])
def test_an_exec_that_runs_out_of_memory_fails_its_run_and_the_engine_closes(
    executor: str,
) -> None:
    """exec fills the process (a worker process, for "process") up to its RLIMIT_AS with
    small objects. Its locals are freed with its MemoryError, so that the error can be
    handed back: the run fails, the next exec there can use the memory again at once
    (the cyclic GC off) and the engine closes."""
    done = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY, executor],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    refilled = "hog exec MemoryError\nrefilled 190 MiB\n"
    assert (done.returncode, done.stdout) == (0, refilled), done.stderr


START_WITHOUT_DESCRIPTORS = """
import os
import resource

import trio

import cosmoflow_actors as cf


class Square(cf.Node):
    executor = "process"
    max_retries = 1

    def exec(self, prep_res, ctx):
        return 4


async def main():
    flow = cf.Flow.builder("squares").add_node("square", Square()).build()
    async with cf.open_engine() as engine:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        try:
            await engine.run(flow)
        except cf.NodeError as error:
            cause = error.__cause__
            print(type(cause).__name__, cause, type(cause.__cause__).__name__, flush=True)
        for descriptor in held:
            os.close(descriptor)


trio.run(main)
"""


def test_a_worker_process_that_cannot_start_for_want_of_descriptors_says_so() -> None:
    done = subprocess.run(
        [sys.executable, "-c", START_WITHOUT_DESCRIPTORS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        "OSError [Errno 24] cannot start a worker process for node 'square': Too many open files"
    )
    assert done.stdout.endswith(" OSError\n")


def missing_file() -> None:
    raise FileNotFoundError(2, "no such file", "input.csv")


class RestoredWithoutItsFile:
    """Pickles; unpickled, raises FileNotFoundError."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (missing_file, ())


class SendsWhatNeedsAFile(cf.Node):
    executor = "process"

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        return RestoredWithoutItsFile()


async def test_an_os_error_restoring_exec_input_in_a_worker_is_not_blamed_on_its_start() -> None:
    with pytest.raises(cf.NodeError) as info:
        await single(SendsWhatNeedsAFile(), "restore").run()
    cause = info.value.__cause__
    assert isinstance(cause, FileNotFoundError)
    assert str(cause) == "[Errno 2] no such file: 'input.csv'"


class LosesAStoreCall(cf.Node):
    """exec, a plain def, calls the store without awaiting the call."""

    max_retries = 3

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
        ctx.store.set("answer", 42)
        return "done"


class ReturnsAStoreCall(cf.Node):
    """exec, a plain def, returns a store call."""

    max_retries = 3

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> Any:
        return ctx.store.get("answer")


async def unreachable_error(node: cf.Node, data: dict[str, Any]) -> cf.StorageError:
    """The cause of the NodeError in exec, after one attempt, of a run of ``node`` alone
    on ``data``; checks that no coroutine was left to warn that it was never awaited."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(cf.NodeError) as info:
            await single(node).run(data)
        gc.collect()
    assert [str(warning.message) for warning in caught] == []
    assert (info.value.node_id, info.value.phase, info.value.attempts) == ("only", "exec", 1)
    assert isinstance(info.value.__cause__, cf.StorageError)
    return info.value.__cause__


@pytest.mark.parametrize("executor", ["thread", "process"])
@pytest.mark.parametrize(
    ("node", "call"), [(LosesAStoreCall, "set('answer')"), (ReturnsAStoreCall, "get('answer')")]
)
async def test_a_store_call_on_a_worker_fails_the_step_saying_the_store_is_unreachable(
    executor: str, node: type[cf.Node], call: str
) -> None:
    """Dropped or returned: the step fails once exec has ended, naming the call, the node
    and that the store is out of reach there (not "await it", which a plain def on a
    worker cannot do); nothing is stored, and nothing is retried."""
    data: dict[str, Any] = {"answer": 1}
    error = await unreachable_error(node(executor=executor), data)
    assert str(error) == (
        f"store.{call} in exec of node 'only' was not done: the store is not reachable "
        f"from exec with executor={executor!r} (a thread, a process or Ray has no store "
        "access); use the store in prep and post"
    )
    assert data == {"answer": 1}


class LosesAStoreCallAndRaises(cf.Node):
    """exec, a plain def, calls the store without awaiting the call, then raises."""

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        ctx.store.set("answer", 42)
        raise ValueError("exec failed")


async def test_a_store_call_lost_by_an_exec_on_a_thread_that_raises_leaves_no_warning() -> None:
    """The step fails with exec's error; the call is closed, not left to warn once the
    error is dropped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(cf.NodeError) as info:
            await single(LosesAStoreCallAndRaises(executor="thread")).run()
        cause = repr(info.value.__cause__)
        del info
        gc.collect()
    assert [str(warning.message) for warning in caught] == []
    assert cause == "ValueError('exec failed')"


async def fetch(url: str) -> str:
    return url


class ReturnsACoroutine(cf.Node):
    """exec, a plain def, returns a coroutine it did not await."""

    max_retries = 3

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> Any:
        return fetch("u")


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_a_coroutine_returned_by_exec_on_a_worker_fails_the_step(executor: str) -> None:
    """Not trio's complaint about its own function, not retried: the node's error."""
    with pytest.raises(cf.NodeError) as info:
        await single(ReturnsACoroutine(executor=executor)).run()
    assert (info.value.node_id, info.value.phase, info.value.attempts) == ("only", "exec", 1)
    cause = info.value.__cause__
    assert isinstance(cause, TypeError)
    assert str(cause).startswith("exec of node 'only' returned a coroutine (fetch)")
