"""What crosses between the engine and a worker process: the errors for what cannot,
a worker's KeyboardInterrupt, and a worker that outlives its engine."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.store_client import detached
from cosmoflow_actors.runtime.transfer import (
    NodeNotKept,
    answer,
    exec_in_worker,
    job,
    pickled_node,
    release_frames,
)
from tests.support import Gate, single
from tests.test_executor import Square

ROOT = Path(__file__).resolve().parent.parent


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
    code = f"import tests.test_transfer as t; t.run_spinning_engine({str(pid_file)!r})"
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


class UnprintableLock(HoldsALock):
    """An error that cannot be pickled, and whose ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no str")


class TakesTwo(Exception):
    """An error that pickles but cannot be unpickled: Exception gets one of its two
    values."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(first)


def restored_only_in(pid: int) -> RestoredOnlyIn:
    """A RestoredOnlyIn for process ``pid``; RuntimeError in any other process."""
    if os.getpid() != pid:
        raise RuntimeError(f"restored outside process {pid}")
    return RestoredOnlyIn(pid)


class RestoredOnlyIn:
    """Pickles anywhere, unpickles only in process ``pid`` (the worker that made it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __reduce__(self) -> tuple[Any, ...]:
        return (restored_only_in, (self.pid,))


class Untransferable(cf.Node):
    """Something that cannot cross to or from a worker process: the ``kind`` param."""

    executor = "process"

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        kind = ctx.params["kind"]
        return threading.Lock() if kind == "prep result" else kind

    def exec(self, kind: Any, ctx: cf.ExecutionContext) -> Any:
        if kind == "unpicklable error":
            raise HoldsALock("the lock is mine")
        if kind == "unpicklable, unprintable error":
            raise UnprintableLock("never shown")
        if kind == "error that cannot be unpickled":
            raise TakesTwo("one", "two")
        if kind == "result that cannot be unpickled in the engine":
            return RestoredOnlyIn(os.getpid())
        return threading.Lock()


WORKER = {"process": "the worker process", "ray": "the Ray task"}
"""How error texts name where exec runs, by executor."""

TRANSFER_CASES = [
    ("prep result", "cannot send the prep result (_thread.lock) to {worker}: "),
    (
        "unpicklable error",
        "exec raised tests.test_transfer.HoldsALock: the lock is mine, which cannot be "
        "sent back from {worker}: TypeError: cannot pickle '_thread.lock'",
    ),
    (
        "unpicklable, unprintable error",
        "exec raised tests.test_transfer.UnprintableLock: <unprintable>, which cannot be "
        "sent back from {worker}: TypeError: cannot pickle '_thread.lock'",
    ),
    (
        "error that cannot be unpickled",
        "exec raised tests.test_transfer.TakesTwo: one, which cannot be sent back from "
        "{worker}: TypeError: ",
    ),
    ("result", "exec returned a _thread.lock, which cannot be sent back from {worker}: "),
    (
        "result that cannot be unpickled in the engine",
        "exec returned a tests.test_transfer.RestoredOnlyIn, which cannot be unpickled in "
        "the engine: RuntimeError: restored outside process ",
    ),
]
"""What :class:`Untransferable` is asked not to send (its ``kind`` param), and what the
WorkerTransferError says ({worker}: where exec ran, as :data:`WORKER` names it)."""


async def check_what_cannot_cross_is_named(executor: str, kind: str, message: str) -> None:
    """Run Untransferable on ``executor``: the run fails with a WorkerTransferError
    saying ``message``."""
    with pytest.raises(cf.NodeError) as info:
        await single(Untransferable(executor=executor)).run(params={"kind": kind})
    cause = info.value.__cause__
    assert isinstance(cause, cf.WorkerTransferError)
    assert message.format(worker=WORKER[executor]) in str(cause)
    if "exec raised" in message:
        assert "in exec" in cause.__notes__[0]


@pytest.mark.parametrize(("kind", "message"), TRANSFER_CASES)
async def test_what_cannot_cross_to_or_from_a_worker_is_named(kind: str, message: str) -> None:
    await check_what_cannot_cross_is_named("process", kind, message)


def refuse() -> None:
    raise RuntimeError("not here")


class RestoredNowhere:
    """Pickles, but cannot be unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (refuse, ())


class SendsTheUnrestorable(cf.Node):
    """Its prep returns what cannot be unpickled."""

    executor = "process"

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        return RestoredNowhere()

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        return None


class Unrestorable(SendsTheUnrestorable):
    """A node that pickles, but cannot be unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (refuse, ())


@pytest.mark.parametrize(
    ("node", "what"),
    [
        (Unrestorable, "the node"),
        (SendsTheUnrestorable, "exec's input (what prep returned, and the context)"),
    ],
)
async def test_what_cannot_be_restored_in_a_worker_is_named(node: type[cf.Node], what: str) -> None:
    with pytest.raises(cf.NodeError) as info:
        await single(node(), "restore").run()
    assert info.value.node_id == "only"
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError) and str(cause) == "not here"
    assert f"raised while the worker process restored {what}" in cause.__notes__


def refuse_with_a_lock() -> None:
    raise HoldsALock("restoring failed")


class RestoredNowhereWithALock:
    """Pickles, but unpickling raises an error that cannot be pickled back."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (refuse_with_a_lock, ())


class SendsTheUnrestorableWithALock(SendsTheUnrestorable):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        return RestoredNowhereWithALock()


async def test_a_restore_error_that_cannot_be_sent_back_is_named() -> None:
    """The worker's error cannot make the trip back: a WorkerTransferError names it and
    what it was restoring, where trio-parallel's pickling error said neither."""
    with pytest.raises(cf.NodeError) as info:
        await single(SendsTheUnrestorableWithALock(), "restore").run()
    cause = info.value.__cause__
    assert isinstance(cause, cf.WorkerTransferError)
    assert str(cause) == (
        "the worker process could not restore exec's input (what prep returned, and the "
        "context): tests.test_transfer.HoldsALock: restoring failed, an error which cannot "
        "be sent back: TypeError: cannot pickle '_thread.lock' object"
    )
    what = "exec's input (what prep returned, and the context)"
    assert cause.__notes__ == [f"raised while the worker process restored {what}"]


async def test_a_local_class_read_with_a_typed_get_crosses_to_a_worker_and_back() -> None:
    """msgspec's cache on a class pickled by value (its typed gets and converts leave
    it there, in the engine and in the worker) is left out of the node, the prep
    result and exec's result."""

    @dataclasses.dataclass
    class Local:
        x: int

    class Doubles(cf.Node):
        executor = "process"

        async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Local:
            point: Local = await store.get("point", type=Local)
            return point

        def exec(self, point: Local, ctx: cf.ExecutionContext) -> Local:
            return msgspec.convert({"x": point.x * 2}, type(point))

        def post(
            self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
        ) -> cf.Action:
            return cf.Action.complete(exec_res)

    assert msgspec.convert({"x": 0}, Local) == Local(0)  # before build() pickles the node
    result = await single(Doubles()).run({"point": {"x": 2}})
    assert result.result == Local(4)
    assert type(result.result) is Local


async def check_a_node_changed_after_build_is_named(executor: str) -> None:
    """A node on ``executor`` that cannot be pickled any more after build(): its run
    fails with a WorkerTransferError naming the node and the executor, and the engine
    goes on."""
    node = Square(executor=executor)
    flow = cf.Flow.builder("f").add_node("sq", node).build()
    node.lock = threading.Lock()  # type: ignore[attr-defined]
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError) as info:
            await engine.run(flow, params={"n": 2})
        again = await engine.run(single(Square(executor=executor)), params={"n": 3})
    assert info.value.node_id == "sq"
    cause = info.value.__cause__
    assert isinstance(cause, cf.WorkerTransferError)
    assert str(cause).startswith(
        f"executor={executor!r} cannot send node 'sq' to a worker: TypeError: cannot pickle"
    )
    assert again.result[0] == 9


async def test_a_process_node_that_cannot_be_pickled_after_build_fails_its_run() -> None:
    await check_a_node_changed_after_build_is_named("process")


class Interrupted(cf.Node):
    """exec raises KeyboardInterrupt where it runs, as a Ctrl-C of its own would."""

    executor = "process"

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        raise KeyboardInterrupt


async def check_a_workers_keyboard_interrupt_fails_its_run_alone(executor: str) -> None:
    """Interrupted on ``executor``: its run fails with WorkerInterruptedError (from the
    KeyboardInterrupt); a run started before it, and one after, complete."""
    async with cf.open_engine() as engine:
        gate = Gate()
        other = await engine.start_run(single(gate, "gated"))
        with pytest.raises(cf.NodeError) as info:
            await engine.run(single(Interrupted(executor=executor)))
        gate.open.set()
        assert (await other.wait()).success
        again = await engine.run(single(Square(executor=executor)), params={"n": 3})
    cause = info.value.__cause__
    assert isinstance(cause, cf.WorkerInterruptedError)
    assert str(cause) == f"exec was interrupted in {WORKER[executor]} (KeyboardInterrupt)"
    assert isinstance(cause.__cause__, KeyboardInterrupt)
    assert again.result[0] == 9


async def test_a_keyboard_interrupt_in_a_worker_process_fails_its_run_alone() -> None:
    await check_a_workers_keyboard_interrupt_fails_its_run_alone("process")


def missing_key(key: str) -> Any:
    """Raise KeyError for ``key`` (a frame of exec's traceback in the worker)."""
    return {}[key]


class RaisesKeyError(cf.Node):
    """exec raises a KeyError from a function it calls."""

    executor = "process"

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> Any:
        return missing_key("gone")


async def check_an_error_from_a_worker_keeps_its_traceback(executor: str) -> None:
    """RaisesKeyError on ``executor``: the KeyError comes back with a note holding its
    traceback in the worker, down to the function that raised it."""
    with pytest.raises(cf.NodeError) as info:
        await single(RaisesKeyError(executor=executor)).run()
    cause = info.value.__cause__
    assert isinstance(cause, KeyError)
    (note,) = cause.__notes__
    assert note.startswith(f"exec's traceback in {WORKER[executor]}:\n")
    assert ", in exec\n" in note
    assert ", in missing_key\n" in note
    assert note.endswith("KeyError: 'gone'\n")


async def test_an_error_from_a_worker_process_keeps_its_traceback() -> None:
    await check_an_error_from_a_worker_keeps_its_traceback("process")


class Held:
    """A value a frame's local holds, seen through a weak reference."""


def raise_holding(error: BaseException, held: Held) -> None:
    raise error


@pytest.mark.parametrize(("error", "freed"), [(MemoryError(), True), (ValueError("no"), False)])
def test_release_frames_frees_the_locals_of_a_memory_errors_frames_alone(
    error: BaseException, freed: bool
) -> None:
    held = Held()
    alive = weakref.ref(held)
    try:
        raise_holding(error, held)
    except BaseException as exc:
        del held
        release_frames(exc)
        assert (alive() is None) == freed
        assert "raise_holding" in "".join(traceback.format_exception(exc))


async def test_a_worker_sent_a_nodes_digest_alone_asks_for_the_node_until_it_keeps_it() -> None:
    """An attempt sends a worker process the node's digest alone: a worker that does not
    keep the node says so (NodeNotKept) and is sent it, which it keeps for the next
    attempts, so that a large node crosses once per worker, not with every attempt."""
    node = pickled_node(Square(), "square")
    async with cf.open_engine() as engine, engine.open_store({}) as store:
        ctx = cf.ExecutionContext("r", "square", "f", 1, detached(store), {}, 1)
        work = job(7, ctx, "process")
        with pytest.raises(NodeNotKept):
            exec_in_worker(node.digest, None, work, "process")
        first = exec_in_worker(node.digest, node.data, work, "process")
        kept = exec_in_worker(node.digest, None, work, "process")
        assert answer(first, "process", store) == answer(kept, "process", store)
        assert answer(kept, "process", store) == (49, os.getpid())


async def test_a_flow_of_process_nodes_runs_each_node_on_workers_started_for_another() -> None:
    """The worker started for the first node is sent the second one's digest, finds it
    does not keep that node, and is sent the node itself."""

    class Plus(cf.Node):
        executor = "process"

        def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> int:
            return int(ctx.params.get("n", 0)) + 1

        def post(
            self, store: cf.SharedStore, prep_res: Any, exec_res: int, ctx: cf.ExecutionContext
        ) -> cf.Action:
            return cf.Action.with_params("next", n=exec_res)

    builder = cf.Flow.builder("plus")
    for name in ("a", "b", "c"):
        builder.add_node(name, Plus())
    flow = builder.add_route("a", "b", action="next").add_route("b", "c", action="next").build()
    async with cf.open_engine() as engine:
        results = [await engine.run(flow, params={"n": n}) for n in range(3)]
    assert [result.final_action.params["n"] for result in results] == [3, 4, 5]
