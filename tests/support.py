"""Small real nodes and helpers shared by the engine-level tests (no mocks)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Final, TypeVar

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.node_actor import NodeActor
from cosmoflow_actors.runtime.store_actor import StoreActor


class Recorder(cf.Node):
    """Appends its id to the store's "seen" list and returns a fixed action."""

    def __init__(self, action: cf.Action | str | None = None, **config: Any) -> None:
        super().__init__(**config)
        self.action = action

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> Any:
        await store.update("seen", lambda seen: [*seen, ctx.node_id], default=[])
        return self.action


class Gate(cf.Node):
    """Blocks in exec until its event is set; counts how many runs are inside at once."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.open = trio.Event()
        self.inside = 0
        self.most_inside = 0
        self.entered = 0

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.inside += 1
        self.entered += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await self.open.wait()
        finally:
            self.inside -= 1


async def received_until(stream: trio.abc.ReceiveStream, marker: bytes, sender: str) -> bytes:
    """Read ``stream`` until ``marker`` has arrived; return all that was read. Fails the
    test, naming ``sender`` and showing what came, if the stream ends first."""
    received = b""
    while marker not in received:
        chunk = await stream.receive_some()
        assert chunk, f"{sender} ended before {marker!r} arrived: {received!r}"
        received += chunk
    return received


async def engine_in(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[cf.Engine] = trio.TASK_STATUS_IGNORED
) -> None:
    """Hold an engine in ``scope`` until the scope is cancelled (the engine then closes).
    Blocks until then."""
    with scope:
        async with cf.open_engine() as engine:
            task_status.started(engine)
            await trio.sleep_forever()


async def _engine_closing_late(
    scope: trio.CancelScope,
    close: trio.Event,
    *,
    task_status: trio.TaskStatus[cf.Engine] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold an engine in ``scope``; once the scope is cancelled, its block holds off
    the engine's own close (shielded) until ``close`` is set. Meanwhile only its actors
    have seen the cancellation, as when trio happens to run their tasks before the
    block's (it shuffles the tasks it wakes). Blocks until then."""
    with scope:
        async with cf.open_engine() as engine:
            task_status.started(engine)
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await close.wait()


async def closed_late_around(
    call: Callable[[cf.Engine], Awaitable[None]], arrived: trio.Event, gate: trio.Event
) -> cf.Engine:
    """Start ``call(engine)`` outside a scope around an engine; once a step it starts
    has ``arrived``, cancel that scope, then open the step's ``gate`` while only the
    engine's actors have seen the cancellation (the engine's block holds off its own
    close), and only then let the engine close. Return the engine, closed. Blocks
    until ``call`` has returned."""
    scope, close = trio.CancelScope(), trio.Event()
    async with trio.open_nursery() as outside:
        engine: cf.Engine = await outside.start(_engine_closing_late, scope, close)
        outside.start_soon(call, engine)
        await arrived.wait()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        close.set()
    return engine


def single(node: cf.Node, name: str = "single") -> cf.Flow:
    """A flow of one node."""
    return cf.Flow.builder(name).add_node("only", node).build()


def a_then_b(name: str) -> cf.Flow:
    """A flow of two Recorders, ``a`` then ``b``."""
    builder = cf.Flow.builder(name).add_node("a", Recorder()).add_node("b", Recorder())
    return builder.add_route("a", "b").build()


@cf.node
async def _tick(ctx: cf.ExecutionContext) -> cf.Action:
    n: int = await ctx.store.update("n", lambda n: n + 1, default=0)
    if n >= await ctx.store.get("steps"):
        return cf.Action.complete(n)
    return cf.Action.simple("again")


def ticking(max_steps: int = 10_000) -> cf.Flow:
    """A flow of one node, ``tick``, that counts its steps in "n" and goes again until
    "n" reaches the store's "steps"; it completes with "n"."""
    builder = cf.Flow.builder("ticking").add_node("tick", _tick).max_steps(max_steps)
    return builder.add_route("tick", "tick", "again").build()


async def in_run(
    body: Callable[[cf.SharedStore], Awaitable[Any]],
    store: cf.Storage | dict[str, Any] | None = None,
) -> Any:
    """Run ``body(store)`` as the exec of a one-step run and return what it returned."""

    @cf.node
    async def step(ctx: cf.ExecutionContext) -> cf.Action:
        return cf.Action.complete(await body(ctx.store))

    result = await single(step, "in-run").run(store)
    return result.result


class FlakyOnce(cf.Node):
    """Takes 1 s; the first attempt fails, the retry follows 0.5 s later."""

    max_retries = 2
    retry_delay = 0.5

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        await trio.sleep(1)
        if ctx.current_retry == 0:
            raise ConnectionError("first attempt fails")


class FailsOnce(cf.Node):
    """Its first post fails; the others count in "n"."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("the first post fails")
        await store.update("n", lambda n: n + 1, default=0)


def refused(builder: cf.FlowBuilder) -> cf.FlowValidationError:
    """The error ``builder.build()`` raises (the test fails if it builds)."""
    with pytest.raises(cf.FlowValidationError) as info:
        builder.build()
    return info.value


async def started_nowait_once_set_up(flow: cf.Flow, not_yet: str) -> Any:
    """Check that ``start_run_nowait`` refuses ``flow`` (WouldBlock matching ``not_yet``)
    until ``start_run`` has set up its executor; return a nowait run's result then."""
    async with cf.open_engine() as engine:
        with pytest.raises(trio.WouldBlock, match=not_yet):
            engine.start_run_nowait(flow, params={"n": 2})
        await engine.start_run(flow, params={"n": 2})
        return (await engine.start_run_nowait(flow, params={"n": 3}).wait()).result


def node_actors(engine: cf.Engine) -> list[NodeActor]:
    """Every node actor of the flows ``engine`` holds now."""
    return list(engine._flows.actors())


def count_tasks() -> int:
    """Every task alive in this trio run."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    return walk(trio.lowlevel.current_root_task())


ROOT: Final = Path(__file__).resolve().parent.parent
SERVER_TIMEOUT: Final = 30.0
"""Seconds a worker server may take to stop once its input ends."""


class WorkerServer:
    """A worker server of the crash tests: a process that reads job lines on its
    stdin and writes progress lines on its stdout (its stderr goes to ``log``)."""

    def __init__(self, process: trio.Process, log: Path) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._buffer = bytearray()
        self.log = log

    async def close(self) -> None:
        """End the server (end of its input) and wait for it to exit cleanly."""
        with trio.fail_after(SERVER_TIMEOUT):
            await self._stdin.aclose()
            assert await self._process.wait() == 0, self.log.read_text()

    async def _send(self, line: str) -> None:
        await self._stdin.send_all(f"{line}\n".encode())

    async def _line(self) -> str:
        """The server's next line (blocks until it has written one)."""
        while b"\n" not in self._buffer:
            chunk = await self._stdout.receive_some()
            if not chunk:
                raise EOFError(f"the worker server exited: {self.log.read_text()}")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return line.decode()


S = TypeVar("S", bound=WorkerServer)


@asynccontextmanager
async def worker_server(kind: type[S], module: str, log: Path) -> AsyncIterator[S]:
    """Run ``python -m module serve`` as a ``kind`` of server until the block ends."""
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", module, "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
        )
    running = kind(process, log)
    try:
        yield running
    finally:
        await running.close()


def engine_bug(self: StoreActor, operation: str, error: Exception) -> cf.StorageError:
    """Put in place of StoreActor._broken: the actor's own handling of a backend's
    error raises it, as a bug of the engine's would (the one way left to crash a store
    actor)."""
    raise error


class Unshowable(Exception):
    """An error whose ``str`` and ``repr`` both raise."""

    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class TwoChildren(cf.BatchFlow):
    """Two child runs of its flow a step."""

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, Any]]:
        return [{}, {}]


@cf.node
async def _child_ran(ctx: cf.ExecutionContext) -> None:
    await ctx.store.update("ran", lambda ran: [*ran, ctx.run_id], default=[])


@cf.node
async def _again_once(ctx: cf.ExecutionContext) -> str:
    visits: int = await ctx.store.update("visits", lambda visits: visits + 1, default=0)
    return "again" if visits == 1 else "done"


CHILD_RAN: Final = cf.Flow.builder("child").add_node("ran", _child_ran).build()
"""A BatchFlow's child: appends its run id to the store's "ran" list."""


def batch_flow_twice_in_a_loop() -> cf.Flow:
    """A BatchFlow (steps 1 and 3) whose next node loops back to it once."""
    return (
        cf.Flow.builder("loop")
        .add_node("each", TwoChildren(CHILD_RAN))
        .add_node("visit", _again_once)
        .add_route("each", "visit")
        .add_route("visit", "each", "again")
        .add_route("visit", cf.END, "done")
        .build()
    )


def batch_flows_on_two_branches() -> cf.Flow:
    """A fan-out (step 1) to two BatchFlows of one flow (step 2 of each branch)."""
    return (
        cf.Flow.builder("forked")
        .add_node("fork", Recorder())
        .add_node("left", TwoChildren(CHILD_RAN))
        .add_node("right", TwoChildren(CHILD_RAN))
        .add_join("join", Recorder())
        .add_route("fork", ("left", "right"))
        .add_route("left", "join")
        .add_route("right", "join")
        .build()
    )


CHILDREN_OF_THE_LOOP: Final = ["job:1/0", "job:1/1", "job:3/0", "job:3/1"]
"""The run ids of :func:`batch_flow_twice_in_a_loop`'s children in a run "job"."""
CHILDREN_ON_THE_BRANCHES: Final = ["job:1.0/2/0", "job:1.0/2/1", "job:1.1/2/0", "job:1.1/2/1"]
"""The run ids of :func:`batch_flows_on_two_branches`' children in a run "job"."""


@contextmanager
def ki_protection_seen(*functions: Callable[..., Any]) -> Iterator[dict[str, set[bool]]]:
    """While inside, note for each line of ``functions`` run in this thread (in calls
    made inside) whether trio's KeyboardInterrupt protection covers it: the dict maps
    each function's qualified name to the values of
    ``trio.lowlevel.currently_ki_protected()`` seen."""
    codes = {function.__code__: function.__qualname__ for function in functions}
    seen: dict[str, set[bool]] = {name: set() for name in codes.values()}

    def line(frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        if event == "line":
            seen[codes[frame.f_code]].add(trio.lowlevel.currently_ki_protected())
        return line

    def call(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        return line if frame.f_code in codes else None

    previous = sys.gettrace()
    sys.settrace(call)
    try:
        yield seen
    finally:
        sys.settrace(previous)


class Taking(cf.Node):
    """A step whose post takes a turn from ``turns`` (None: never waits), then counts
    the step in "n:<execution id>"."""

    def __init__(self, turns: trio.Semaphore | None) -> None:
        super().__init__()
        self.turns = turns

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        if self.turns is not None:
            await self.turns.acquire()
        await store.update(f"n:{ctx.execution_id}", lambda n: n + 1, default=0)


def taking_turns(turns: trio.Semaphore | None) -> cf.Flow:
    """s fans out to a chain x, x2 and to y, which meet at the join j; e follows it."""
    names = ("s", "x", "x2", "y", "j", "e")
    builder = cf.Flow.builder("turns")
    for name in names:
        add = builder.add_join if name == "j" else builder.add_node
        add(name, Taking(turns))
    builder.add_route("s", ["x", "y"]).add_route("x", "x2").add_route("x2", "j")
    return builder.add_route("y", "j").add_route("j", "e").build()


async def commits(events: cf.EventStream, count: int) -> None:
    """Wait for ``count`` more committed steps (StepFinished with an action)."""
    async for event in events:
        if isinstance(event, cf.StepFinished) and event.action is not None:
            count -= 1
            if count == 0:
                return
