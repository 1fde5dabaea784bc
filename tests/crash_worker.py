"""The process tests/test_crash.py kills: durable work that reports what it committed.

``python -m tests.crash_worker serve`` imports everything once, then serves jobs: for
each JSON job line on stdin it forks a child that runs the job, so a trial costs a
fork instead of an interpreter start. The server and its children share one stdout:

    pid <pid>        a child started (the child's first line)
    step <n>         "flow" or "fan" job: step n of the durable run is committed
    done             "flow" or "fan" job: the run's result is recorded (after every "step")
    failed <json>    "flow" or "fan" job: the run raised StorageError (its message, a
                     JSON string); the job then runs a flow on a memory store on the
                     same engine, and writes
    served           once that run succeeded
    begin <i>        "file" job: commit i's writes are about to be staged and committed
    commit <i>       "file" job: commit i returned, so it is durable (and, every
                     :data:`CLOSE_EVERY` commits, the close after it returned)
    done             "file" job: all its commits returned
    tick             "torture" job: a step of one of its runs is committed
    exit <status>    the server reaped the child (after a "reap" line on stdin)

On stdin the server takes, after a job line, any number of "go" lines and then one
"reap" line. "go" lets the "file" job's child start the commit it announced with
"begin" (so the test can watch the files before it writes). The server reaps a child
only on "reap", so until then its pid cannot be reused and the test may SIGKILL it at
any moment. Each line is one ``os.write`` of fewer than PIPE_BUF bytes: a killed child
never leaves half a line.

The "flow" job's run is a 50-step loop; the "fan" job's run fans out into two loops of
10 steps that meet at a join. The "torture" job starts or continues
:data:`TORTURE_RUNS` runs of :func:`torture_flow` at once on one store (see there), and
writes "done" once all of them are recorded. A job is ``{"job": "flow" | "fan" |
"file" | "torture", "backend":
"file" | "sqlite" | "redis",
"target": path or URL, "namespace": Redis namespace or null}``, with an optional
``"file_size_limit"``: the child's ``RLIMIT_FSIZE`` in bytes, so that a write past it
fails with EFBIG (Python ignores SIGXFSZ), as on a full disk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import sys
import traceback
from typing import Any, Final

import trio

import cosmoflow_actors as cf

STEPS: Final = 50
"""Steps of the durable run."""

RUN_ID: Final = "crash"

FILE_COMMITS: Final = 12
"""Commits of the "file" job."""

CLOSE_EVERY: Final = 4
"""The "file" job closes its store (compacting it) after every this many commits, and
opens it again with the next."""

BLOBS: Final = 3
"""Keys the "file" job's commits overwrite in turn."""

BLOB_BYTES: Final = 1024 * 1024
"""Size of each value the "file" job writes: the journal outgrows the snapshot (and
compacts) every few commits, and each write lasts long enough for the test to see it
and kill the child in it."""

LINES: Final = ("left", "right")
"""The branches of the "fan" job's run."""

LINE_STEPS: Final = 10
"""Steps of each branch of the "fan" job's run."""

GO_FD: Final = 3
"""A child's end of its "go" pipe."""


class CountingStep(cf.Node):
    """One step of the run: ``n += 1``, ``step:<n> = step_value(n)``, ``log += [n]``.

    In a durable run the three writes are staged and committed with the step's record.
    ``posts`` lists the ``n`` of every post that ran in this process.
    """

    def __init__(self) -> None:
        self.posts: list[int] = []

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        count: int = await store.get("n", 0)
        return count

    def exec(self, prep_res: int, ctx: cf.ExecutionContext) -> dict[str, int]:
        return step_value(prep_res + 1)

    async def post(
        self,
        store: cf.SharedStore,
        prep_res: int,
        exec_res: dict[str, int],
        ctx: cf.ExecutionContext,
    ) -> str:
        n: int = await store.update("n", _increment, default=0)
        await store.set(f"step:{n}", exec_res)
        await store.update("log", functools.partial(_append, n), default=[])
        self.posts.append(n)
        return "again"


def step_value(n: int) -> dict[str, int]:
    """What step ``n`` stores under ``step:<n>``."""
    return {"n": n, "square": n * n}


def _increment(count: int) -> int:
    return count + 1


def _append(n: int, log: list[int]) -> list[int]:
    return [*log, n]


def crash_flow(node: cf.Node | None = None) -> cf.Flow:
    """A one-node loop that runs :data:`STEPS` steps."""
    again = cf.ActionCondition.compare("n", "<", STEPS)
    return (
        cf.Flow.builder("crash")
        .add_node("step", node or CountingStep())
        .add_route("step", "step", "again", when=again)
        .add_route("step", cf.END, "again")
        .build()
    )


class LineStep(cf.Node):
    """One step of a branch of the "fan" run, named by its node id ``line``:
    ``<line>:n += 1`` and ``<line>:log += [n]``; the join counts itself in "joined"."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> str:
        line = ctx.node_id
        n: int = await store.update(f"{line}:n", _increment, default=0)
        await store.update(f"{line}:log", functools.partial(_append, n), default=[])
        return "again"


def fan_flow() -> cf.Flow:
    """ "split" fans out to one loop of :data:`LINE_STEPS` steps per :data:`LINES`; the
    loops meet at the join "joined"."""
    builder = (
        cf.Flow.builder("fan")
        .add_node("split", cf.Node())
        .add_route("split", list(LINES))
        .add_join("joined", LineStep())
    )
    for line in LINES:
        again = cf.ActionCondition.compare(f"{line}:n", "<", LINE_STEPS)
        builder.add_node(line, LineStep())
        builder.add_route(line, line, "again", when=again)
        builder.add_route(line, "joined", "again")
    return builder.build()


FLOWS: Final = {"flow": crash_flow, "fan": fan_flow}

TORTURE_RUNS: Final = ("t0", "t1", "t2")
"""The run ids of the "torture" job, run at once on one store."""

BIG_BYTES: Final = 256 * 1024
"""Size of the large values the torture flow writes, four times per run."""

ODD_KEYS: Final = (
    'quote " backslash \\ newline \n tab \t braces {} 💥',
    "\u2028line\u2029separators",
    " ",
    "a:b/../c",
    "nul\x00byte",
    "%s%d{0}",
    "__cosmoflow__/runs/not-a-record",
)
"""Key suffixes the torture flow writes: characters that JSON, SQL or Redis escape,
and a key that only looks like a run record (a record's key is the whole key)."""

SHARED: Final = "shared:steps"
"""The key every step of every torture run increments: an update that the runs race
for, which must count each committed step once."""


def big(run_id: str, generation: int) -> str:
    """The large value run ``run_id`` writes under ``<run_id>:big`` the ``generation``-th
    time."""
    prefix = f"{run_id}:{generation}:"
    return prefix + "z" * (BIG_BYTES - len(prefix))


async def count_step(store: cf.SharedStore, run_id: str, entry: str) -> None:
    """What every torture step writes: ``shared:steps += 1``, ``<run_id>:log += [entry]``."""
    await store.update(SHARED, _increment, default=0)
    await store.update(f"{run_id}:log", functools.partial(_append, entry), default=[])


class Seed(cf.Node):
    """Writes a large value, the odd keys, two keys that later steps delete, and the
    "mode" that the join's conditional action reads."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        run = ctx.run_id
        await count_step(store, run, "seed")
        await store.set(f"{run}:big", big(run, 1))
        for index, key in enumerate(ODD_KEYS):
            await store.set(f"{run}:{key}", {"index": index, "key": key})
        await store.set_many({f"{run}:doomed": 1, f"{run}:doomed too": [1, 2]})
        await store.set(f"{run}:mode", "hi")


class Spin(cf.Node):
    """A loop of four steps, which counts itself in ``<run_id>:spins``."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> str:
        spins: int = await store.update(f"{ctx.run_id}:spins", _increment, default=0)
        await count_step(store, ctx.run_id, f"spin {spins}")
        return "again" if spins < 4 else "done"


class Squares(cf.BatchNode):
    """A BatchNode over six items whose even items fail their first two attempts."""

    max_retries = 3

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[int]:
        return list(range(6))

    def exec(self, item: int, ctx: cf.ExecutionContext) -> int:
        if item % 2 == 0 and ctx.current_retry < 2:
            raise ConnectionError(f"item {item}: attempt {ctx.current_retry + 1} fails")
        return item * item

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: list[int], ctx: cf.ExecutionContext
    ) -> None:
        await count_step(store, ctx.run_id, "squares")
        await store.set(f"{ctx.run_id}:squares", exec_res)
        await store.delete(f"{ctx.run_id}:doomed")


class Meet(cf.Node):
    """The join: writes what both branches left, deletes a key, and returns an action
    conditional on "mode" ("high" while it is "hi")."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[Any]:
        run = ctx.run_id
        return [await store.get(f"{run}:spins"), await store.get(f"{run}:squares")]

    async def post(
        self, store: cf.SharedStore, prep_res: list[Any], exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        run = ctx.run_id
        await count_step(store, run, "meet")
        await store.set(f"{run}:met", prep_res)
        await store.delete(f"{run}:doomed too")
        high = cf.ActionCondition.key_equals(f"{run}:mode", "hi")
        return cf.Action.conditional(high, "high", "low")


class Rewrite(cf.Node):
    """A loop of three steps in a nested flow, each replacing the large value."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> str:
        run = ctx.run_id
        rewrites: int = await store.update(f"{run}:rewrites", _increment, default=0)
        await count_step(store, run, f"rewrite {rewrites}")
        await store.set(f"{run}:big", big(run, rewrites + 1))
        return "again" if rewrites < 3 else "done"


class Settle(cf.Node):
    """Ends the nested flow: sets "mode" to "lo"."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        await count_step(store, ctx.run_id, "settle")
        await store.set(f"{ctx.run_id}:mode", "lo")


class Child(cf.Node):
    """A step of a BatchFlow's child run ``<parent>:<step>/<index>``: counts itself
    under its parent's keys (c1 loops twice)."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> str:
        parent, _, child = ctx.run_id.partition(":")
        index = child.rpartition("/")[2]
        key = f"{parent}:child {index}:{ctx.node_id}"
        made: int = await store.update(key, _increment, default=0)
        await count_step(store, parent, f"child {index} {ctx.node_id}")
        return "again" if ctx.node_id == "c1" and made < 2 else "done"


class Children(cf.BatchFlow):
    """Three child runs, two at a time; writes their run ids and step counts."""

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, str]]:
        return [{"name": name} for name in ("a", "b", "c")]

    async def post(
        self,
        store: cf.SharedStore,
        prep_res: Any,
        exec_res: list[cf.FlowResult],
        ctx: cf.ExecutionContext,
    ) -> None:
        await count_step(store, ctx.run_id, "children")
        results = [[child.run_id, child.steps_executed] for child in exec_res]
        await store.set(f"{ctx.run_id}:children", results)


class Finish(cf.Node):
    """Lists the run's keys and completes the run with "mode"."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        run = ctx.run_id
        await count_step(store, run, "finish")
        keys = sorted(key for key in await store.keys() if key.startswith(f"{run}:"))
        await store.set(f"{run}:keys", keys)
        return cf.Action.complete(await store.get(f"{run}:mode"))


def torture_flow() -> cf.Flow:
    """seed, then a fan-out to the Spin loop (its route reads the shared counter) and
    the Squares BatchNode, joined at "meet"; its conditional action leads to the nested
    flow of Rewrite and Settle, then the Children BatchFlow, then "finish". A run that
    took a wrong route ends at "wrong"."""
    rewrite = (
        cf.Flow.builder("rewrite")
        .add_node("rewrite", Rewrite())
        .add_node("settle", Settle())
        .add_route("rewrite", "rewrite", "again")
        .add_route("rewrite", "settle", "done")
        .build()
    )
    child = (
        cf.Flow.builder("child")
        .add_node("c1", Child())
        .add_node("c2", Child())
        .add_route("c1", "c1", "again")
        .add_route("c1", "c2", "done")
        .build()
    )
    counted = cf.ActionCondition.compare(SHARED, ">", 0)
    return (
        cf.Flow.builder("torture")
        .add_node("seed", Seed())
        .add_node("spin", Spin())
        .add_node("squares", Squares())
        .add_join("meet", Meet())
        .add_node("rewrite", rewrite)
        .add_node("children", Children(child, max_concurrency=2))
        .add_node("finish", Finish())
        .add_node("wrong", cf.Node())
        .add_route("seed", ["spin", "squares"])
        .add_route("spin", "spin", "again", when=counted)
        .add_route("spin", "wrong", "again")
        .add_route("spin", "meet", "done")
        .add_route("squares", "meet")
        .add_route("meet", "rewrite", "high")
        .add_route("meet", "wrong", "low")
        .add_route("rewrite", "children")
        .add_route("children", "finish")
        .build()
    )


def blob(i: int) -> str:
    """The value commit ``i`` of the "file" job writes under ``blob:<i % BLOBS>``."""
    prefix = f"{i}:"
    return prefix + "x" * (BLOB_BYTES - len(prefix))


def open_storage(job: dict[str, Any]) -> cf.Storage:
    """The storage a job names (a new instance over its data)."""
    backend, target = job["backend"], job["target"]
    if backend == "file":
        return cf.FileStorage(target)
    if backend == "sqlite":
        return cf.SQLiteStorage(target)
    if backend == "redis":
        return cf.RedisStorage(target, namespace=job["namespace"])
    raise ValueError(f"unknown backend {backend!r}")


def emit(line: str) -> None:
    """Write one whole line to stdout at once (never buffered, never torn)."""
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


async def run_flow(job: dict[str, Any]) -> None:
    """Start or continue the durable run; report each committed step, then "done", or
    "failed" and, once a run on a memory store succeeded after it, "served"."""
    storage = open_storage(job)
    failure: cf.StorageError | None = None
    async with cf.open_engine() as engine, engine.events() as events:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_report_steps, events)
            try:
                await engine.resume(FLOWS[job["job"]](), storage, run_id=RUN_ID)
            except cf.StorageError as exc:
                failure = exc
            finally:
                events.close()  # the reporter reports what is buffered, then ends
        if failure is None:
            emit("done")
            return
        emit(f"failed {json.dumps(str(failure))}")
        if (await engine.run(crash_flow(), cf.MemoryStorage())).success:
            emit("served")


async def _report_steps(events: cf.EventStream) -> None:
    """StepFinished with an action comes after the step's commit returned."""
    async for event in events:
        if isinstance(event, cf.StepFinished) and event.action is not None:
            emit(f"step {event.execution_id.rpartition(':')[2]}")


async def run_file_commits(job: dict[str, Any]) -> None:
    """Commit big values to a FileStorage, reporting before and after each commit;
    every :data:`CLOSE_EVERY` commits, close it too (a compaction) before the report.

    Before each commit it waits for a "go" from the test (a byte on :data:`GO_FD`); it
    blocks the trio thread meanwhile, which nothing else needs here. It runs at a low
    priority so that on a busy machine the test watching its files is the one that
    gets the CPU, and sees its writes as they happen.
    """
    os.nice(10)
    storage = cf.FileStorage(job["target"])
    await storage.open()
    for i in range(1, FILE_COMMITS + 1):
        emit(f"begin {i}")
        if os.read(GO_FD, 1) != b"g":
            raise RuntimeError("the server closed the go pipe")
        await storage.set(f"blob:{i % BLOBS}", blob(i))
        await storage.set("i", i)
        await storage.commit()
        if i % CLOSE_EVERY == 0:
            await storage.aclose()
        emit(f"commit {i}")
    emit("done")


async def run_torture(job: dict[str, Any]) -> None:
    """Start or continue every run of :data:`TORTURE_RUNS` at once; write "tick" for
    each committed step, then "done"."""
    storage = open_storage(job)
    flow = torture_flow()
    async with (
        cf.open_engine() as engine,
        engine.events() as events,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_report_ticks, events)
        try:
            async with trio.open_nursery() as runs:
                for run_id in TORTURE_RUNS:
                    resume = functools.partial(engine.resume, run_id=run_id)
                    runs.start_soon(resume, flow, storage)
        finally:
            events.close()  # the reporter reports what is buffered, then ends
    emit("done")


async def _report_ticks(events: cf.EventStream) -> None:
    """StepFinished with an action comes after the step's commit returned."""
    async for event in events:
        if isinstance(event, cf.StepFinished) and event.action is not None:
            emit("tick")


JOBS: Final = {
    "flow": run_flow,
    "fan": run_flow,
    "file": run_file_commits,
    "torture": run_torture,
}


def _child(job: dict[str, Any], go: int) -> None:
    """Run ``job`` in a forked child; never returns."""
    status = 1
    try:
        os.dup2(go, GO_FD)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        emit(f"pid {os.getpid()}")
        if "file_size_limit" in job:
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_size_limit"], hard))
        trio.run(JOBS[job["job"]], job)
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(status)


def serve() -> None:
    """Fork a child per job line; reap it once a "reap" line arrives."""
    with contextlib.suppress(ImportError):
        import redis  # noqa: F401 (imported once here, not in every child)
    for line in sys.stdin:
        job = json.loads(line)
        go_read, go_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(go_write)
            _child(job, go_read)
        os.close(go_read)
        _pass_go(go_write)
        os.close(go_write)
        _, status = os.waitpid(pid, 0)
        emit(f"exit {os.waitstatus_to_exitcode(status)}")


def _pass_go(go: int) -> None:
    """Hand each "go" line to the child, until "reap"."""
    for line in sys.stdin:
        if line.strip() == "reap":
            return
        if line.strip() != "go":
            raise SystemExit(f"expected 'go' or 'reap', got {line!r}")
        with contextlib.suppress(BrokenPipeError):  # the child is gone
            os.write(go, b"g")
    raise SystemExit("expected 'reap' after a job")


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        raise SystemExit("usage: python -m tests.crash_worker serve")
    serve()
