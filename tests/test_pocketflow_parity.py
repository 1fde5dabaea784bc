"""The same flows on PocketFlow (its AsyncFlow and AsyncNode) and here, written as
docs/from-pocketflow.md says, compared on the final store, the nodes visited (with the
params each saw) and the final action."""

from __future__ import annotations

import asyncio
import functools
import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pocketflow as pf
import pytest
import trio

import cosmoflow_actors as cf

Visit = tuple[str, dict[str, Any]]
Work = Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[dict[str, Any], str | None]]
"""A step's logic: (the store values it read, its params) -> (what it writes, its action)."""


def fake_llm(prompt: str) -> str:
    """A deterministic stand-in for a model call."""
    return f"llm({prompt})#{sum(map(ord, prompt)) % 97}"


@dataclass
class Outcome:
    """What one run left: the store, the nodes visited in order, the final action."""

    store: dict[str, Any]
    visits: list[Visit]
    action: str | None
    warnings: list[str] = field(default_factory=list)


def run_pocketflow(
    make: Callable[[list[Visit]], pf.AsyncFlow],
    shared: dict[str, Any],
    params: dict[str, Any] | None = None,
) -> Outcome:
    """Run the flow ``make`` builds with PocketFlow's ``run_async`` and ``set_params``,
    keeping the warnings it gives."""
    visits: list[Visit] = []
    flow = make(visits)
    if params is not None:
        flow.set_params(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action = asyncio.run(flow.run_async(shared))
    return Outcome(shared, visits, action, [str(w.message) for w in caught])


def run_cosmoflow(
    make: Callable[[list[Visit]], cf.Flow],
    shared: dict[str, Any],
    params: Mapping[str, Any] | None = None,
) -> Outcome:
    """Run the flow ``make`` builds with ``run_sync``; the final action is
    ``final_action.name``."""
    visits: list[Visit] = []
    result = make(visits).run_sync(shared, params=params)
    return Outcome(shared, visits, result.final_action.name)


class PocketStep(pf.AsyncNode):  # type: ignore[misc]
    """A PocketFlow node: prep reads ``reads`` from shared, exec does ``work``, post
    writes its result and returns its action."""

    def __init__(self, name: str, reads: tuple[str, ...], work: Work, visits: list[Visit]):
        super().__init__()
        self.name, self.reads, self.work, self.visits = name, reads, work, visits

    async def prep_async(self, shared: dict[str, Any]) -> dict[str, Any]:
        self.visits.append((self.name, dict(self.params)))
        return {key: shared[key] for key in self.reads if key in shared}

    async def exec_async(self, values: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        return self.work(values, self.params)

    async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> Any:
        writes, action = exec_res
        shared.update(writes)
        return action


class CosmoStep(cf.Node):
    """The same node here: prep reads with ``get_many``, post writes with ``set_many``."""

    def __init__(self, reads: tuple[str, ...], work: Work, visits: list[Visit]):
        super().__init__()
        self.reads, self.work, self.visits = reads, work, visits

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> dict[str, Any]:
        self.visits.append((ctx.node_id, dict(ctx.params)))
        return await store.get_many(self.reads)

    async def exec(self, values: dict[str, Any], ctx: cf.ExecutionContext) -> Any:
        return self.work(values, ctx.params)

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> str | None:
        writes, action = exec_res
        await store.set_many(writes)
        return action


# 1. An agent loop: decide -> search | answer, search -> decide.

AGENT_STEPS = 4
"""The agent's own bound on its decisions, kept in the store."""


def decide(values: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    steps = values.get("steps", 0)
    enough = len(values.get("context", [])) >= values["needed"] or steps >= AGENT_STEPS
    return {"steps": steps + 1}, "answer" if enough else "search"


def search(values: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    context = values.get("context", [])
    found = fake_llm(f"search {values['question']} #{len(context)}")
    return {"context": [*context, found]}, "decide"


def answer(values: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    return {"answer": fake_llm(f"{values['question']} from {values['context']}")}, "done"


AGENT = {
    "decide": (("context", "steps", "needed"), decide),
    "search": (("question", "context"), search),
    "answer": (("question", "context"), answer),
}


def pocket_agent(visits: list[Visit]) -> pf.AsyncFlow:
    nodes = {name: PocketStep(name, *spec, visits) for name, spec in AGENT.items()}
    nodes["decide"] - "search" >> nodes["search"]
    nodes["decide"] - "answer" >> nodes["answer"]
    nodes["search"] - "decide" >> nodes["decide"]
    return pf.AsyncFlow(start=nodes["decide"])


def cosmo_agent(visits: list[Visit], max_steps: int = 1000) -> cf.Flow:
    builder = cf.Flow.builder("agent").max_steps(max_steps)
    for name, spec in AGENT.items():
        builder.add_node(name, CosmoStep(*spec, visits))
    return (
        builder.add_route("decide", "search", action="search")
        .add_route("decide", "answer", action="answer")
        .add_route("search", "decide", action="decide")
        .build()
    )


@pytest.mark.parametrize(("question", "needed"), [("what is an actor?", 2), ("x", 9)])
def test_an_agent_loop_visits_and_writes_as_in_pocketflow(question: str, needed: int) -> None:
    shared = {"question": question, "needed": needed}
    pocket = run_pocketflow(pocket_agent, dict(shared))
    cosmo = run_cosmoflow(cosmo_agent, dict(shared))

    assert cosmo == pocket
    assert cosmo.action == "done"
    assert len(cosmo.store["context"]) == min(needed, AGENT_STEPS)


def test_an_agent_loop_longer_than_max_steps_fails_where_pocketflow_runs_on() -> None:
    visits: list[Visit] = []
    with pytest.raises(cf.MaxStepsExceeded) as caught:
        cosmo_agent(visits, max_steps=3).run_sync({"question": "q", "needed": 9})

    assert caught.value.execution_path == ("decide", "search", "decide")
    assert [name for name, _ in visits] == ["decide", "search", "decide"]


# 2. Map-reduce: a batch node summarises each document, a node reduces the summaries.

DOCUMENTS = {"b": "beta gamma", "a": "alpha", "bad": "", "c": "gamma delta"}


class Barrier:
    """Counts the items inside exec at once. When ``together``, each item waits (at most
    a second) until every item is inside, so that running them one at a time shows in
    ``most_inside`` instead of hanging."""

    def __init__(self, items: int, *, together: bool) -> None:
        self.items, self.together = items, together
        self.inside = self.most_inside = 0

    def enter(self) -> bool:
        """Count one more item inside; whether the items waiting may go on now."""
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        return self.inside == self.items

    def leave(self) -> None:
        self.inside -= 1

    async def asyncio_pass(self, everyone_in: asyncio.Event) -> None:
        """Enter, wait (on asyncio) as the barrier says, leave."""
        if self.enter():
            everyone_in.set()
        if self.together:
            await asyncio.wait_for(everyone_in.wait(), 1.0)
        else:
            await asyncio.sleep(0)  # lets any other item in, were they run at once
        self.leave()

    async def trio_pass(self, everyone_in: trio.Event) -> None:
        """Enter, wait (on trio) as the barrier says, leave."""
        if self.enter():
            everyone_in.set()
        if self.together:
            with trio.move_on_after(1.0):
                await everyone_in.wait()
        else:
            await trio.lowlevel.checkpoint()  # lets any other item in, were they run at once
        self.leave()


def summarise(item: tuple[str, str], attempt: int) -> str:
    """The map step: fails on an empty document, and on each item's first attempt."""
    name, text = item
    if not text:
        raise ValueError(f"{name} is empty")
    if attempt == 0:
        raise ConnectionError("the model is busy")
    return fake_llm(f"summarise {text}")


def pocket_map_reduce(kind: type[pf.AsyncNode], barrier: Barrier, visits: list[Visit]) -> Any:
    everyone_in = asyncio.Event()

    class Map(kind):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(max_retries=2)
            self.attempts: dict[str, int] = {}  # PocketFlow's AsyncNode has no cur_retry

        async def prep_async(self, shared: dict[str, Any]) -> list[tuple[str, str]]:
            visits.append(("map", dict(self.params)))
            return list(shared["documents"].items())

        async def exec_async(self, item: tuple[str, str]) -> str:
            attempt = self.attempts.get(item[0], 0)
            self.attempts[item[0]] = attempt + 1
            if attempt == 0:
                await barrier.asyncio_pass(everyone_in)
            return summarise(item, attempt)

        async def exec_fallback_async(self, item: tuple[str, str], exc: Exception) -> str:
            return f"no summary: {exc}"

        async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> str:
            shared["summaries"] = dict(zip(shared["documents"], exec_res, strict=True))
            return "reduce"

    mapper = Map()
    reduce = PocketStep("reduce", ("summaries",), reduce_summaries, visits)
    mapper - "reduce" >> reduce
    return pf.AsyncFlow(start=mapper)


def reduce_summaries(
    values: Mapping[str, Any], params: Mapping[str, Any]
) -> tuple[dict[str, Any], None]:
    summaries = values["summaries"]
    return {"final": fake_llm(" | ".join(summaries[key] for key in sorted(summaries)))}, None


def cosmo_map_reduce(kind: type[cf.BatchNode], barrier: Barrier, visits: list[Visit]) -> cf.Flow:
    everyone_in = trio.Event()

    class Map(kind):  # type: ignore[misc, valid-type]
        max_retries = 2

        async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
            visits.append((ctx.node_id, dict(ctx.params)))
            return list((await store.get("documents")).items())

        async def exec(self, item: tuple[str, str], ctx: cf.ExecutionContext) -> str:
            if ctx.current_retry == 0:
                await barrier.trio_pass(everyone_in)
            return summarise(item, ctx.current_retry)

        async def exec_fallback(self, item: Any, error: Exception, ctx: Any) -> str:
            return f"no summary: {error}"

        async def post(self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: Any) -> str:
            documents = await store.get("documents")
            await store.set("summaries", dict(zip(documents, exec_res, strict=True)))
            return "reduce"

    return (
        cf.Flow.builder("map-reduce")
        .add_node("map", Map())
        .add_node("reduce", CosmoStep(("summaries",), reduce_summaries, visits))
        .add_route("map", "reduce", action="reduce")
        .build()
    )


@pytest.mark.parametrize(
    ("pocket_kind", "cosmo_kind", "parallel"),
    [
        (pf.AsyncBatchNode, cf.BatchNode, False),
        (pf.AsyncParallelBatchNode, cf.ParallelBatchNode, True),
    ],
    ids=["batch", "parallel-batch"],
)
def test_map_reduce_retries_and_falls_back_per_item_as_in_pocketflow(
    pocket_kind: type[pf.AsyncNode], cosmo_kind: type[cf.BatchNode], parallel: bool
) -> None:
    pocket_barrier = Barrier(len(DOCUMENTS), together=parallel)
    cosmo_barrier = Barrier(len(DOCUMENTS), together=parallel)
    pocket_flow = functools.partial(pocket_map_reduce, pocket_kind, pocket_barrier)
    pocket = run_pocketflow(pocket_flow, {"documents": dict(DOCUMENTS)})
    cosmo_flow = functools.partial(cosmo_map_reduce, cosmo_kind, cosmo_barrier)
    cosmo = run_cosmoflow(cosmo_flow, {"documents": dict(DOCUMENTS)})

    assert cosmo.store == pocket.store
    assert cosmo.visits == pocket.visits == [("map", {}), ("reduce", {})]
    assert pocket.action is None  # post returned None: the action "default" here
    assert cosmo.action == "default"
    assert cosmo.store["summaries"]["bad"] == "no summary: bad is empty"
    assert cosmo.store["summaries"]["a"] == fake_llm("summarise alpha")
    expected_inside = len(DOCUMENTS) if parallel else 1
    assert cosmo_barrier.most_inside == pocket_barrier.most_inside == expected_inside


# 3. A BatchFlow: a sub-flow load -> translate once per file, then a report.


def load(values: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], None]:
    loaded = {**values.get("loaded", {}), params["file"]: values["files"][params["file"]]}
    return {"loaded": loaded}, None


def translate(values: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], None]:
    text = values["loaded"][params["file"]]
    done = {**values.get("out", {}), params["file"]: fake_llm(f"{text} to {params['lang']}")}
    return {"out": done}, None


def report(values: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], None]:
    return {"report": sorted(values["out"])}, None


FILES = {"x.md": "hello", "y.md": "world", "z.md": "again"}


def pocket_batch(visits: list[Visit]) -> pf.AsyncFlow:
    class Files(pf.AsyncBatchFlow):  # type: ignore[misc]
        async def prep_async(self, shared: dict[str, Any]) -> list[dict[str, str]]:
            visits.append(("files", dict(self.params)))
            return [{"file": name} for name in sorted(shared["files"])]

        async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> str:
            shared["batches"] = len(prep_res)
            return "report"

    loader = PocketStep("load", ("files", "loaded"), load, visits)
    loader >> PocketStep("translate", ("loaded", "out"), translate, visits)
    files = Files(start=loader)
    files - "report" >> PocketStep("report", ("out",), report, visits)
    return pf.AsyncFlow(start=files)


class Forward(CosmoStep):
    """A CosmoStep whose action carries its params on to the next node (PocketFlow
    gives every node of a flow the flow's params; here they reach the next node only)."""

    async def post(self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: Any) -> Any:
        action = await super().post(store, prep_res, exec_res, ctx)
        return cf.Action.with_params(action or "default", **ctx.params)


class Files(cf.BatchFlow):
    def __init__(self, flow: cf.Flow, visits: list[Visit], **config: Any) -> None:
        super().__init__(flow, **config)
        self.visits = visits

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        self.visits.append((ctx.node_id, dict(ctx.params)))
        # PocketFlow merges the BatchFlow's own params into each set; here prep does.
        return [{**ctx.params, "file": name} for name in sorted(await store.get("files"))]

    async def post(self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: Any) -> str:
        assert [result.execution_path for result in exec_res] == [("load", "translate")] * 3
        await store.set("batches", len(prep_res))
        return "report"


def cosmo_batch(visits: list[Visit]) -> cf.Flow:
    per_file = (
        cf.Flow.builder("per-file")
        .add_node("load", Forward(("files", "loaded"), load, visits))
        .add_node("translate", CosmoStep(("loaded", "out"), translate, visits))
        .add_route("load", "translate")
        .build()
    )
    return (
        cf.Flow.builder("translate-files")
        .add_node("files", Files(per_file, visits, max_concurrency=1))
        .add_node("report", CosmoStep(("out",), report, visits))
        .add_route("files", "report", action="report")
        .build()
    )


def test_a_batch_flow_with_max_concurrency_1_runs_its_children_as_pocketflow_does() -> None:
    pocket = run_pocketflow(pocket_batch, {"files": dict(FILES)}, params={"lang": "fr"})
    cosmo = run_cosmoflow(cosmo_batch, {"files": dict(FILES)}, params={"lang": "fr"})

    assert cosmo.store == pocket.store
    assert cosmo.store["out"]["y.md"] == fake_llm("world to fr")
    # Children run one after the other, in order, with the merged params; the report
    # gets the flow's params in PocketFlow only.
    assert cosmo.visits[:-1] == pocket.visits[:-1]
    assert pocket.visits[-1] == ("report", {"lang": "fr"})
    assert cosmo.visits[-1] == ("report", {})


def pocket_parallel_batch(barrier: Barrier, visits: list[Visit]) -> pf.AsyncFlow:
    everyone_in = asyncio.Event()

    class Translate(pf.AsyncNode):  # type: ignore[misc]
        async def exec_async(self, prep_res: Any) -> None:
            await barrier.asyncio_pass(everyone_in)

        async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> None:
            shared[f"out:{self.params['file']}"] = fake_llm(self.params["file"])

    class Files(pf.AsyncParallelBatchFlow):  # type: ignore[misc]
        async def prep_async(self, shared: dict[str, Any]) -> list[dict[str, str]]:
            return [{"file": name} for name in shared["files"]]

    return pf.AsyncFlow(start=Files(start=Translate()))


def cosmo_parallel_batch(barrier: Barrier, visits: list[Visit]) -> cf.Flow:
    everyone_in = trio.Event()

    class Translate(cf.Node):
        async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
            await barrier.trio_pass(everyone_in)

        async def post(self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: Any) -> None:
            await store.set(f"out:{ctx.params['file']}", fake_llm(ctx.params["file"]))

    class Files(cf.BatchFlow):
        async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
            return [{"file": name} for name in await store.get("files")]

    per_file = cf.Flow.builder("per-file").add_node("translate", Translate()).build()
    return cf.Flow.builder("files").add_node("files", Files(per_file)).build()


def test_a_batch_flow_runs_its_children_at_once_as_an_async_parallel_batch_flow() -> None:
    pocket_barrier = Barrier(len(FILES), together=True)
    pocket_flow = functools.partial(pocket_parallel_batch, pocket_barrier)
    pocket = run_pocketflow(pocket_flow, {"files": dict(FILES)})
    cosmo_barrier = Barrier(len(FILES), together=True)
    cosmo_flow = functools.partial(cosmo_parallel_batch, cosmo_barrier)
    cosmo = run_cosmoflow(cosmo_flow, {"files": dict(FILES)})

    assert cosmo.store == pocket.store
    assert cosmo.store["out:z.md"] == fake_llm("z.md")
    assert cosmo_barrier.most_inside == pocket_barrier.most_inside == len(FILES)


# 4. A nested flow used as a node: its final action is routed in the parent.


def check(name: str, test: Callable[[str], str]) -> Work:
    def work(values: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        return {"checked": [*values.get("checked", []), name]}, test(values["email"])

    return work


CHECKS = {
    "format": check("format", lambda email: "ok" if "@" in email else "invalid"),
    "domain": check("domain", lambda email: "invalid" if email.endswith(".invalid") else "valid"),
    "welcome": check("welcome", lambda email: "welcomed"),
    "reject": check("reject", lambda email: "rejected"),
}
READS = ("email", "checked")


def pocket_signup(visits: list[Visit]) -> pf.AsyncFlow:
    steps = {name: PocketStep(name, READS, work, visits) for name, work in CHECKS.items()}
    steps["format"] - "ok" >> steps["domain"]  # "invalid" has no successor: warn, end
    validate = pf.AsyncFlow(start=steps["format"])
    validate - "valid" >> steps["welcome"]
    validate - "invalid" >> steps["reject"]
    return pf.AsyncFlow(start=validate)


def cosmo_signup(visits: list[Visit]) -> cf.Flow:
    validate = (
        cf.Flow.builder("validate")
        .add_node("format", CosmoStep(READS, CHECKS["format"], visits))
        .add_node("domain", CosmoStep(READS, CHECKS["domain"], visits))
        .add_route("format", "domain", action="ok")
        .add_route("format", cf.END, action="invalid")  # leaves the flow, as PocketFlow's
        .build()
    )
    return (
        cf.Flow.builder("signup")
        .add_node("validate", validate)
        .add_node("welcome", CosmoStep(READS, CHECKS["welcome"], visits))
        .add_node("reject", CosmoStep(READS, CHECKS["reject"], visits))
        .add_route("validate", "welcome", action="valid")
        .add_route("validate", "reject", action="invalid")
        .build()
    )


@pytest.mark.parametrize("email", ["ada@example.org", "nobody", "eve@example.invalid"])
def test_a_nested_flows_final_action_routes_in_the_parent_as_in_pocketflow(email: str) -> None:
    pocket = run_pocketflow(pocket_signup, {"email": email})
    cosmo = run_cosmoflow(cosmo_signup, {"email": email})

    assert (cosmo.store, cosmo.visits, cosmo.action) == (pocket.store, pocket.visits, pocket.action)
    assert cosmo.action in ("welcomed", "rejected")


# 5. Retries, a fallback, and the wait between attempts.


class PocketCall(pf.AsyncNode):  # type: ignore[misc]
    """Fails its first ``failures`` attempts; notes each attempt's time."""

    def __init__(self, failures: int, times: list[float], **config: Any) -> None:
        super().__init__(**config)
        self.failures, self.times = failures, times

    async def exec_async(self, prep_res: Any) -> str:
        self.times.append(asyncio.get_running_loop().time())
        if len(self.times) <= self.failures:
            raise ConnectionError(f"busy #{len(self.times)}")
        return f"ok after {len(self.times)}"

    async def exec_fallback_async(self, prep_res: Any, exc: Exception) -> str:
        return f"fallback after {len(self.times)}: {exc}"

    async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> None:
        shared["result"] = exec_res


class CosmoCall(cf.Node):
    def __init__(self, failures: int, times: list[float], **config: Any) -> None:
        super().__init__(**config)
        self.failures, self.times = failures, times

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
        assert ctx.current_retry == len(self.times)
        self.times.append(trio.current_time())
        if len(self.times) <= self.failures:
            raise ConnectionError(f"busy #{len(self.times)}")
        return f"ok after {len(self.times)}"

    def exec_fallback(self, prep_res: Any, error: Exception, ctx: cf.ExecutionContext) -> str:
        return f"fallback after {len(self.times)}: {error}"

    async def post(self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: Any) -> None:
        await store.set("result", exec_res)


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


@pytest.mark.parametrize(("failures", "max_retries"), [(2, 3), (5, 3), (1, 1), (0, 2)])
async def test_retries_wait_and_fall_back_as_in_pocketflow(
    failures: int, max_retries: int, autojump_clock: trio.abc.Clock
) -> None:
    wait = 0.01
    pocket_times: list[float] = []
    pocket_node = PocketCall(failures, pocket_times, max_retries=max_retries, wait=wait)
    pocket_store: dict[str, Any] = {}
    pocket = asyncio.run(pf.AsyncFlow(start=pocket_node).run_async(pocket_store))
    cosmo_times: list[float] = []
    cosmo_node = CosmoCall(failures, cosmo_times, max_retries=max_retries, retry_delay=wait)
    store: dict[str, Any] = {}
    result = await cf.Flow.builder("call").add_node("call", cosmo_node).build().run(store)
    ended = trio.current_time()

    assert store == pocket_store
    assert (result.final_action.name, pocket) == ("default", None)
    assert len(cosmo_times) == len(pocket_times) == min(failures + 1, max_retries)
    assert all(gap >= wait for gap in gaps(pocket_times))
    assert gaps(cosmo_times) == pytest.approx([wait] * (len(cosmo_times) - 1))
    assert ended == pytest.approx(cosmo_times[-1])  # no wait before the fallback


async def test_backoff_multiplies_the_wait_pocketflow_keeps_fixed(
    autojump_clock: trio.abc.Clock,
) -> None:
    times: list[float] = []
    node = CosmoCall(9, times, max_retries=4, retry_delay=1.0, backoff=2.0)
    store: dict[str, Any] = {}
    await cf.Flow.builder("call").add_node("call", node).build().run(store)

    assert gaps(times) == pytest.approx([1.0, 2.0, 4.0])
    assert store == {"result": "fallback after 4: busy #4"}


# 6. Params, the default action, and an action with no successor.


def note(name: str, action: str | None) -> Work:
    def work(values: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        return {"seen": [*values.get("seen", []), f"{name}:{params.get('user')}"]}, action

    return work


def pocket_chain(last: str | None, visits: list[Visit]) -> pf.AsyncFlow:
    a = PocketStep("a", ("seen",), note("a", None), visits)
    b = PocketStep("b", ("seen",), note("b", "next"), visits)
    c = PocketStep("c", ("seen",), note("c", last), visits)
    a >> b  # the default action
    b - "next" >> c
    c - "again" >> a
    return pf.AsyncFlow(start=a)


def cosmo_chain(last: str | None, visits: list[Visit], *, forward: bool) -> cf.FlowBuilder:
    step = Forward if forward else CosmoStep
    return (
        cf.Flow.builder("chain")
        .add_node("a", step(("seen",), note("a", None), visits))
        .add_node("b", step(("seen",), note("b", "next"), visits))
        .add_node("c", step(("seen",), note("c", last), visits))
        .add_route("a", "b")
        .add_route("b", "c", action="next")
        .add_route("c", "a", action="again")
    )


def ends_on(last: str, *, forward: bool) -> Callable[[list[Visit]], cf.Flow]:
    """Builds the chain with a route from ``c`` to END for ``last``."""

    def make(visits: list[Visit]) -> cf.Flow:
        return cosmo_chain(last, visits, forward=forward).add_route("c", cf.END, last).build()

    return make


def test_params_reach_the_first_node_only_unless_actions_carry_them() -> None:
    make_pocket = functools.partial(pocket_chain, "stop")
    pocket = run_pocketflow(make_pocket, {}, params={"user": "ada"})
    cosmo = run_cosmoflow(ends_on("stop", forward=True), {}, params={"user": "ada"})
    bare = run_cosmoflow(ends_on("stop", forward=False), {}, params={"user": "ada"})

    assert cosmo == Outcome(pocket.store, pocket.visits, pocket.action)
    assert pocket.visits == [(name, {"user": "ada"}) for name in "abc"]
    assert bare.visits == [("a", {"user": "ada"}), ("b", {}), ("c", {})]
    assert bare.store == {"seen": ["a:ada", "b:None", "c:None"]}


@pytest.mark.parametrize("last", ["stop", None])
def test_an_action_with_no_successor_fails_the_run_where_pocketflow_warns_and_ends(
    last: str | None,
) -> None:
    pocket = run_pocketflow(functools.partial(pocket_chain, last), {}, params={"user": "ada"})
    visits: list[Visit] = []
    store: dict[str, Any] = {}
    with pytest.raises(cf.NoRouteError) as caught:
        cosmo_chain(last, visits, forward=True).build().run_sync(store, params={"user": "ada"})

    assert pocket.action == last
    assert pocket.warnings == [f"Flow ends: '{last}' not found in ['again']"]
    error = caught.value
    assert (error.node_id, error.action, error.available) == ("c", last or "default", ("again",))
    # The steps before the unrouted action ran, and wrote, as in PocketFlow.
    assert (store, visits) == (pocket.store, pocket.visits)
