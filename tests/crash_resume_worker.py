"""The flows tests/test_crash_resume.py runs, and the process it kills in the middle of them.

Every node of these flows counts its steps in the store (``prep:<node id>`` in ``prep``,
``count:<node id>`` in ``post``), appends ``"<execution id> <node id>"`` to its run's
log (``log:<run id>``) and writes what its ``exec`` returned under
``out:<execution id>``, in ``post``. A step applied twice therefore shows in a counter
and as a duplicate in a log. ``exec`` depends only on the step's context, so every run
of a flow computes the same values.

The nodes call a :class:`Hooks` at fixed points of each step. In the test process the
hooks only note which steps ran (by execution id). In the killed process a
:class:`Gate` also stops the run at a known place: it lets ``k`` steps reach ``post``
and commit, and then stops the next one: in "between" mode at the start of its
``prep``, before it writes anything (or, if its ``prep`` ran before the k-th step's
``post``, at the start of its ``post``); in "mid" mode once its ``post`` has staged its
writes. Every later step stops at the start of its ``post``. A stopped step waits for
an event nobody sets, so after the k-th commit the process commits nothing more,
whatever the kill's timing. In "end" mode, with ``k`` all the steps, the storage
(:class:`HeldAtEnd`) stops the run instead, once its last step is committed and before
its end is recorded.

``python -m tests.crash_resume_worker serve`` imports everything once, then forks one
child per JSON job line on stdin (``{"flow", "backend", "target", "namespace", "k",
"mode", "resume"}``). The child runs the flow durably with run id :data:`RUN_ID` (with
``engine.resume`` when "resume" is true, else ``engine.run``) and writes, one whole
line per ``os.write``:

    pid <pid>                      first, once it runs
    step <execution id>            a step's commit returned (its StepFinished event)
    halted <execution id> <place> <node id>
                                   the gate stopped a step, at <place>: "prep",
                                   "post", "staged" (after post's writes) or "end"
                                   (before the run's end is recorded; no node id)
    done                           the run ended and its result is recorded
    crashed                        the job raised (its traceback is on stderr)

After a job line the server waits for a "reap" line, then reaps the child (which the
test has killed, or which has finished) and writes ``exit <status>``. Until then the
child's pid cannot be reused, so the test may SIGKILL it at any moment.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.run_record import PATH_CHUNK, record_key

RUN_ID: Final = "r"


class Hooks:
    """What a node does at fixed points of its steps: here, note the execution id of
    every step whose ``prep``, ``exec`` or ``post`` ran in this process."""

    def __init__(self) -> None:
        self.preps: list[str] = []
        self.execs: list[str] = []
        self.posts: list[str] = []

    async def prep(self, ctx: cf.ExecutionContext) -> None:
        """At the start of a step's ``prep``; may block."""
        self.preps.append(ctx.execution_id)

    def exec(self, ctx: cf.ExecutionContext) -> None:
        """At the start of a step's ``exec``."""
        self.execs.append(ctx.execution_id)

    async def post(self, ctx: cf.ExecutionContext) -> None:
        """At the start of a step's ``post``, before it writes; may block."""
        self.posts.append(ctx.execution_id)

    async def staged(self, ctx: cf.ExecutionContext) -> None:
        """Once a step's ``post`` has staged its writes; may block."""


class Gate(Hooks):
    """Hooks that let ``k`` steps through ``post`` and stop every step after them (see
    the module's docstring); they report each stop."""

    def __init__(self, k: int, mode: str) -> None:
        super().__init__()
        self.k = k
        self.mode = mode
        self.passed = 0
        self.staging: str | None = None
        """In "mid" mode, the step that stops once its writes are staged."""

    async def prep(self, ctx: cf.ExecutionContext) -> None:
        await super().prep(ctx)
        if self.mode == "between" and self.passed >= self.k:
            await self._halt("prep", ctx)

    async def post(self, ctx: cf.ExecutionContext) -> None:
        await super().post(ctx)
        if self.passed < self.k:
            self.passed += 1
        elif self.mode == "mid" and self.staging is None:
            self.staging = ctx.execution_id
        else:
            await self._halt("post", ctx)

    async def staged(self, ctx: cf.ExecutionContext) -> None:
        if ctx.execution_id == self.staging:
            await self._halt("staged", ctx)

    async def _halt(self, place: str, ctx: cf.ExecutionContext) -> None:
        """Report the step stopped at ``place``, then block until the process is killed."""
        emit(f"halted {ctx.execution_id} {place} {ctx.node_id}")
        await trio.Event().wait()


def _increment(count: int) -> int:
    return count + 1


def _append(entry: str, log: list[str]) -> list[str]:
    return [*log, entry]


async def record_prep(hooks: Hooks, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
    """The write every step makes in ``prep``, after the hook: it counts the step in
    ``prep:<node id>``, staged with the step's other writes."""
    await hooks.prep(ctx)
    await store.update(f"prep:{ctx.node_id}", _increment, default=0)


async def record_step(
    hooks: Hooks,
    store: cf.SharedStore,
    output: Any,
    ctx: cf.ExecutionContext,
    writes: Mapping[str, Any] | None = None,
) -> int:
    """The writes every step makes in ``post`` (and ``writes``), between the hooks;
    return how many steps its run has made at this node, this one included."""
    await hooks.post(ctx)
    await store.update(f"count:{ctx.node_id}", _increment, default=0)
    made: int = await store.update(f"count:{ctx.run_id}:{ctx.node_id}", _increment, default=0)
    entry = f"{ctx.execution_id} {ctx.node_id}"
    await store.update(f"log:{ctx.run_id}", functools.partial(_append, entry), default=[])
    await store.set(f"out:{ctx.execution_id}", output)
    for key, value in (writes or {}).items():
        await store.set(key, value)
    await hooks.staged(ctx)
    return made


COMPLETE: Final = "<complete>"
"""The ``action`` of a :class:`Step` that ends the run with a result read from the store."""


class Step(cf.Node):
    """A step as the module's docstring describes. It returns ``action``, or, with
    ``loop``, "again" until its run has made ``loop`` steps here and "done" then; with
    ``decides``, it writes ``decides`` under "mode" and returns a conditional action
    that the commit resolves against that write ("high" if it is "hi", else "low");
    with ``action=COMPLETE``, ``Action.complete`` with "count:b" and its execution id."""

    def __init__(
        self,
        hooks: Hooks,
        *,
        action: str | cf.Action | None = None,
        loop: int | None = None,
        decides: str | None = None,
    ) -> None:
        super().__init__()
        self.hooks = hooks
        self.action = action
        self.loop = loop
        self.decides = decides

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
        await record_prep(self.hooks, store, ctx)

    def exec(self, prep_res: None, ctx: cf.ExecutionContext) -> dict[str, Any]:
        self.hooks.exec(ctx)
        return {"node": ctx.node_id, "step": ctx.step_number, "params": dict(ctx.params)}

    async def post(
        self,
        store: cf.SharedStore,
        prep_res: None,
        exec_res: dict[str, Any],
        ctx: cf.ExecutionContext,
    ) -> str | cf.Action | None:
        writes = {} if self.decides is None else {"mode": self.decides}
        made = await record_step(self.hooks, store, exec_res, ctx, writes)
        if self.decides is not None:
            high = cf.ActionCondition.key_equals("mode", "hi")
            return cf.Action.conditional(high, "high", "low")
        if self.loop is not None:
            return "again" if made < self.loop else "done"
        if self.action == COMPLETE:
            return cf.Action.complete({"b": await store.get("count:b"), "by": ctx.execution_id})
        return self.action


BATCH_NODE: Final = "each"
"""The node id of the batch flow's BatchFlow."""

NAMES: Final = ("a", "b", "c")
"""The children of the batch flow, one per name."""


class Each(cf.BatchFlow):
    """One child run per name of :data:`NAMES`; its ``post`` writes what the children's
    results say (their paths sorted: a child that fans out may interleave them
    differently each run) as its output, with the writes of every step."""

    def __init__(self, flow: cf.Flow, hooks: Hooks) -> None:
        super().__init__(flow, max_concurrency=2)
        self.hooks = hooks

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, str]]:
        await record_prep(self.hooks, store, ctx)
        return [{"name": name} for name in NAMES]

    async def post(
        self,
        store: cf.SharedStore,
        prep_res: list[dict[str, str]],
        exec_res: list[cf.FlowResult],
        ctx: cf.ExecutionContext,
    ) -> None:
        children = [
            [child.run_id, child.steps_executed, sorted(child.execution_path), child.last_node_id]
            for child in exec_res
        ]
        await record_step(self.hooks, store, children, ctx)


def chain(hooks: Hooks) -> cf.Flow:
    """a (its action carries params to b), then b three times (a loop bounded by the
    store counter ``count:b``), then c, which completes the run with a result."""
    more = cf.ActionCondition.compare("count:b", "<", 3)
    return (
        cf.Flow.builder("chain")
        .add_node("a", Step(hooks, action=cf.Action.with_params("default", seed=7)))
        .add_node("b", Step(hooks, action="again"))
        .add_node("c", Step(hooks, action=COMPLETE))
        .add_route("a", "b")
        .add_route("b", "b", "again", when=more)
        .add_route("b", "c", "again")
        .build()
    )


def joined(hooks: Hooks) -> cf.Flow:
    """s fans out to a three-step loop l and a chain r, r2; they meet at the join j,
    and e follows it."""
    return (
        cf.Flow.builder("joined")
        .add_node("s", Step(hooks))
        .add_node("l", Step(hooks, loop=3))
        .add_node("r", Step(hooks))
        .add_node("r2", Step(hooks))
        .add_join("j", Step(hooks))
        .add_node("e", Step(hooks))
        .add_route("s", ["l", "r"])
        .add_route("l", "l", "again")
        .add_route("l", "j", "done")
        .add_route("r", "r2")
        .add_route("r2", "j")
        .add_route("j", "e")
        .build()
    )


def unjoined(hooks: Hooks) -> cf.Flow:
    """s fans out to a chain x, x2 and a two-step loop y; the branches end with no
    join (x2 has no routes, y routes to END), and the run ends when both have."""
    return (
        cf.Flow.builder("unjoined")
        .add_node("s", Step(hooks))
        .add_node("x", Step(hooks))
        .add_node("x2", Step(hooks))
        .add_node("y", Step(hooks, loop=2))
        .add_route("s", ["x", "y"])
        .add_route("x", "x2")
        .add_route("y", "y", "again")
        .add_route("y", cf.END, "done")
        .build()
    )


def nested(hooks: Hooks) -> cf.Flow:
    """a, then the nested flow "inner" (p three times, then q), then z."""
    more = cf.ActionCondition.compare("count:p", "<", 3)
    inner = (
        cf.Flow.builder("inner")
        .add_node("p", Step(hooks, action="again"))
        .add_node("q", Step(hooks))
        .add_route("p", "p", "again", when=more)
        .add_route("p", "q", "again")
        .build()
    )
    return (
        cf.Flow.builder("nested")
        .add_node("a", Step(hooks))
        .add_node("inner", inner)
        .add_node("z", Step(hooks))
        .add_route("a", "inner")
        .add_route("inner", "z")
        .build()
    )


def nested_fan(hooks: Hooks) -> cf.Flow:
    """a, then the nested flow "inner" (x fans out to a two-step loop y and to z, which
    end with no join), then w."""
    inner = (
        cf.Flow.builder("inner")
        .add_node("x", Step(hooks))
        .add_node("y", Step(hooks, loop=2))
        .add_node("z", Step(hooks))
        .add_route("x", ["y", "z"])
        .add_route("y", "y", "again")
        .add_route("y", cf.END, "done")
        .build()
    )
    return (
        cf.Flow.builder("nested_fan")
        .add_node("a", Step(hooks))
        .add_node("inner", inner)
        .add_node("w", Step(hooks))
        .add_route("a", "inner")
        .add_route("inner", "w", "done")
        .add_route("inner", "w")
        .build()
    )


def tangled(hooks: Hooks) -> cf.Flow:
    """s fans out three ways: to a nested flow with a fan-out and a join of its own
    (x to y and z, joined at jj, then w), to a two-step loop b, and to c, which ends
    with no join; the nested flow and b meet at the join J, and e follows it."""
    inner = (
        cf.Flow.builder("inner")
        .add_node("x", Step(hooks))
        .add_node("y", Step(hooks))
        .add_node("z", Step(hooks))
        .add_join("jj", Step(hooks))
        .add_node("w", Step(hooks))
        .add_route("x", ["y", "z"])
        .add_route("y", "jj")
        .add_route("z", "jj")
        .add_route("jj", "w")
        .build()
    )
    return (
        cf.Flow.builder("tangled")
        .add_node("s", Step(hooks))
        .add_node("n", inner)
        .add_node("b", Step(hooks, loop=2))
        .add_node("c", Step(hooks))
        .add_join("J", Step(hooks))
        .add_node("e", Step(hooks))
        .add_route("s", ["n", "b", "c"])
        .add_route("n", "J")
        .add_route("b", "b", "again")
        .add_route("b", "J", "done")
        .add_route("J", "e")
        .build()
    )


def routed(hooks: Hooks) -> cf.Flow:
    """d writes mode "hi" and returns a conditional action (to h); h goes to m; m's
    route reads "mode" again (to f, not lo)."""
    high = cf.ActionCondition.key_equals("mode", "hi")
    return (
        cf.Flow.builder("routed")
        .add_node("d", Step(hooks, decides="hi"))
        .add_node("h", Step(hooks))
        .add_node("m", Step(hooks, action="next"))
        .add_node("f", Step(hooks))
        .add_node("lo", Step(hooks))
        .add_route("d", "h", "high")
        .add_route("d", "lo", "low")
        .add_route("h", "m")
        .add_route("m", "f", "next", when=high)
        .add_route("m", "lo", "next")
        .build()
    )


def batch_fan(hooks: Hooks) -> cf.Flow:
    """s fans out to the BatchFlow "each" (a child run per name, each child fanning out
    from c1 to p and q, joined at cj) and to a two-step loop l; they meet at the join J."""
    child = (
        cf.Flow.builder("child")
        .add_node("c1", Step(hooks))
        .add_node("p", Step(hooks))
        .add_node("q", Step(hooks))
        .add_join("cj", Step(hooks))
        .add_route("c1", ["p", "q"])
        .add_route("p", "cj")
        .add_route("q", "cj")
        .build()
    )
    return (
        cf.Flow.builder("batch_fan")
        .add_node("s", Step(hooks))
        .add_node(BATCH_NODE, Each(child, hooks))
        .add_node("l", Step(hooks, loop=2))
        .add_join("J", Step(hooks))
        .add_route("s", [BATCH_NODE, "l"])
        .add_route(BATCH_NODE, "J")
        .add_route("l", "l", "again")
        .add_route("l", "J", "done")
        .build()
    )


def batch(hooks: Hooks) -> cf.Flow:
    """start, then the BatchFlow "each" (a child run per name: c1 twice, then c2, two
    children at a time), then finish."""
    child = (
        cf.Flow.builder("child")
        .add_node("c1", Step(hooks, loop=2))
        .add_node("c2", Step(hooks))
        .add_route("c1", "c1", "again")
        .add_route("c1", "c2", "done")
        .build()
    )
    return (
        cf.Flow.builder("batch")
        .add_node("start", Step(hooks))
        .add_node(BATCH_NODE, Each(child, hooks))
        .add_node("finish", Step(hooks))
        .add_route("start", BATCH_NODE)
        .add_route(BATCH_NODE, "finish")
        .build()
    )


LONG: Final = 2 * PATH_CHUNK + 52
"""The steps of the long flow: more than two sealed chunks of its path."""


def long(hooks: Hooks) -> cf.Flow:
    """l, :data:`LONG` times: its run's record seals two chunks of its path."""
    loop = Step(hooks, loop=LONG)
    builder = cf.Flow.builder("long").add_node("l", loop).max_steps(LONG)
    return builder.add_route("l", "l", "again").add_route("l", cf.END, "done").build()


@dataclass(frozen=True, slots=True)
class Kind:
    """A flow of this module: how to build it; whether its steps run in one order (no
    fan-out), so that a resumed run's path, logs and end equal an uninterrupted run's,
    not only as multisets; and the ends (last node, final action) a run may have. A
    fan-out without a join ends the way its last branch to end did, whichever it is."""

    build: Callable[[Hooks], cf.Flow]
    ordered: bool
    ends: frozenset[tuple[str, str]]


FLOWS: Final = {
    "chain": Kind(chain, ordered=True, ends=frozenset({("c", "complete")})),
    "joined": Kind(joined, ordered=False, ends=frozenset({("e", "default")})),
    "unjoined": Kind(unjoined, ordered=False, ends=frozenset({("x2", "default"), ("y", "done")})),
    "nested": Kind(nested, ordered=True, ends=frozenset({("z", "default")})),
    "nested_fan": Kind(nested_fan, ordered=False, ends=frozenset({("w", "default")})),
    "routed": Kind(routed, ordered=True, ends=frozenset({("f", "default")})),
    "batch": Kind(batch, ordered=True, ends=frozenset({("finish", "default")})),
    "tangled": Kind(tangled, ordered=False, ends=frozenset({("e", "default")})),
    "batch_fan": Kind(batch_fan, ordered=False, ends=frozenset({("J", "default")})),
    "long": Kind(long, ordered=True, ends=frozenset({("l", "done")})),
}


class HeldAtEnd:
    """A storage that stops before it stores the record of run :data:`RUN_ID` as
    succeeded: the run's last step is committed, its end is not. Mixed in before a real
    backend, so that everything else takes that backend's own code. (The backends are
    final for applications; this test subclasses them to stop one at a known point.)"""

    async def set(self, key: str, value: Any) -> None:
        if key == record_key(RUN_ID) and value["state"] == "succeeded":
            emit(f"halted {RUN_ID} end -")
            await trio.Event().wait()
        await super().set(key, value)  # type: ignore[misc]


class HeldFileStorage(HeldAtEnd, cf.FileStorage):  # type: ignore[misc]
    pass


class HeldSQLiteStorage(HeldAtEnd, cf.SQLiteStorage):  # type: ignore[misc]
    pass


class HeldRedisStorage(HeldAtEnd, cf.RedisStorage):  # type: ignore[misc]
    pass


PLAIN: Final[dict[str, type[cf.Storage]]] = {
    "file": cf.FileStorage,
    "sqlite": cf.SQLiteStorage,
    "redis": cf.RedisStorage,
}
HELD: Final[dict[str, type[cf.Storage]]] = {
    "file": HeldFileStorage,
    "sqlite": HeldSQLiteStorage,
    "redis": HeldRedisStorage,
}


def open_storage(job: dict[str, Any], classes: dict[str, type[cf.Storage]] = PLAIN) -> cf.Storage:
    """A new instance of the storage a job names ("file", "sqlite" or "redis"), of the
    class ``classes`` gives for that backend."""
    storage_class = classes[job["backend"]]
    if job["backend"] == "redis":
        return storage_class(job["target"], namespace=job["namespace"])  # type: ignore[call-arg]
    return storage_class(job["target"])  # type: ignore[call-arg]


def emit(line: str) -> None:
    """Write one whole line to stdout at once (never buffered, never torn)."""
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


async def run_job(job: dict[str, Any]) -> None:
    """Run the job's flow durably under its gate, reporting each committed step."""
    flow = FLOWS[job["flow"]].build(Gate(job["k"], job["mode"]))
    storage = open_storage(job, HELD if job["mode"] == "end" else PLAIN)
    async with (
        cf.open_engine() as engine,
        engine.events(lossless=True) as events,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_report_steps, events)
        try:
            if job["resume"]:
                await engine.resume(flow, storage, run_id=RUN_ID)
            else:
                await engine.run(flow, storage, run_id=RUN_ID)
        finally:
            events.close()  # the reporter reports what is buffered, then ends
    emit("done")


async def _report_steps(events: cf.EventStream) -> None:
    """A StepFinished with an action comes after the step's commit returned."""
    async for event in events:
        if isinstance(event, cf.StepFinished) and event.action is not None:
            emit(f"step {event.execution_id}")


def _child(job: dict[str, Any]) -> None:
    """Run ``job`` in a forked child; never returns."""
    status = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        emit(f"pid {os.getpid()}")
        trio.run(run_job, job)
        status = 0
    except BaseException:
        traceback.print_exc()
        emit("crashed")
    finally:
        sys.stderr.flush()
        os._exit(status)


def serve() -> None:
    """Fork a child per job line; reap it once a "reap" line follows."""
    import redis  # noqa: F401 (imported once here, not in every child)

    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(job)
        if sys.stdin.readline().strip() != "reap":
            raise SystemExit("expected 'reap' after a job")
        _, status = os.waitpid(pid, 0)
        emit(f"exit {os.waitstatus_to_exitcode(status)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        raise SystemExit("usage: python -m tests.crash_resume_worker serve")
    serve()
