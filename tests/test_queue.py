"""The run queue on Redis: submit, workers with leases, takeover of a dead worker's runs.

Every test uses a real redis-server (one per module) and a queue of its own; the
takeover tests start real worker processes and SIGKILL one of them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.runtime import queue as run_queue
from cosmoflow_actors.runtime.durability import RunRecord
from cosmoflow_actors.runtime.queue import (
    HAND_BACK_SECONDS,
    RunQueue,
    leases_checked,
    per_run_redis,
)
from tests.storage_suite import RedisServer, free_port
from tests.support import received_until

ROOT = Path(__file__).parent.parent

FAILURES: dict[str, int] = {}
"""Times ``Count`` still fails in step ``b`` of a run (by run id); tests set it."""


GATES: dict[str, tuple[trio.Event, trio.Event]] = {}
"""Step ``a`` of a run in here sets the first event and waits for the second (once)."""


SLOW: dict[str, float] = {}
"""Seconds each step of a run in here takes."""


class Count(cf.Node):
    """Counts its own step in the run's store: a per-run counter and a key per step."""

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        await trio.sleep(SLOW.get(ctx.run_id, 0))
        if ctx.node_id == "a" and ctx.run_id in GATES:
            entered, release = GATES.pop(ctx.run_id)
            entered.set()
            await release.wait()
        if ctx.node_id == "b" and FAILURES.get(ctx.run_id, 0) > 0:
            FAILURES[ctx.run_id] -= 1
            raise RuntimeError("b is down")

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action | None:
        await store.update("count", lambda n: n + 1, default=0)
        await store.update(f"step:{ctx.node_id}", lambda n: n + 1, default=0)
        if ctx.node_id == "c":
            return cf.Action.complete(f"done {ctx.run_id}")
        return None


FLOW = (
    cf.Flow.builder("count")
    .add_node("a", Count())
    .add_node("b", Count())
    .add_node("c", Count())
    .add_route("a", "b")
    .add_route("b", "c")
    .build()
)


def new_queue(server: RedisServer, lease: float = 1.0) -> RunQueue:
    return RunQueue(server.url, f"q-{uuid.uuid4().hex[:8]}", lease=lease)


def store_url(server: RedisServer) -> str:
    return f"{server.url}#runs-{uuid.uuid4().hex[:8]}"


OTHER = cf.Flow.builder("other").add_node("a", Count()).build()
"""A flow of another name: a worker that has only this one lacks ``count``."""


@asynccontextmanager
async def worker(
    queue: RunQueue,
    store: str,
    name: str,
    concurrency: int = 4,
    flows: tuple[cf.Flow, ...] = (FLOW,),
) -> AsyncIterator[cf.Engine]:
    """An engine serving ``queue`` with ``flows`` in this process until the block ends."""
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        serve = functools.partial(engine.serve, concurrency=concurrency, name=name)
        await nursery.start(serve, queue, flows, store)
        yield engine
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def held_in_step_a(
    queue: RunQueue, store: str, run_id: str, name: str = "w1"
) -> AsyncIterator[trio.Event]:
    """A worker ``name`` serving ``queue`` until the block ends, with ``run_id`` submitted
    and held in its step a; yields the event that lets the run go on."""
    entered, release = trio.Event(), trio.Event()
    GATES[run_id] = (entered, release)
    async with worker(queue, store, name):
        await cf.submit(queue, "count", run_id=run_id)
        await entered.wait()
        yield release


async def passed_over(queue: RunQueue, run_id: str) -> cf.QueuedRun:
    """The status of ``run_id`` once a worker has passed it over; reads the queue every
    20 ms, as ``cf.result`` does."""
    while True:
        for run in await cf.queue_status(queue):
            if run.run_id == run_id and run.passed_over:
                return run
        await trio.sleep(0.02)


async def left_running(queue: RunQueue, run_id: str) -> cf.QueuedRun:
    """The status of ``run_id`` once its worker no longer holds its lease; reads the
    queue every 20 ms, as ``cf.result`` does."""
    while True:
        [run] = [run for run in await cf.queue_status(queue) if run.run_id == run_id]
        if run.state != "running":
            return run
        await trio.sleep(0.02)


async def counts(store: str, run_id: str) -> dict[str, Any]:
    storage = per_run_redis(store)(run_id)
    await storage.open()
    try:
        keys = [key for key in await storage.keys() if not key.startswith("__cosmoflow__/")]
        return {key: await storage.get(key) for key in keys}
    finally:
        await storage.aclose()


async def test_a_submitted_run_is_run_by_a_worker_and_its_result_returned(
    redis_server: RedisServer,
) -> None:
    queue, store = new_queue(redis_server), store_url(redis_server)
    async with worker(queue, store, "w1"):
        run_id = await cf.submit(queue, "count", params={"x": 1})
        done = await cf.result(queue, run_id)
    assert done.result == f"done {run_id}"
    assert done.execution_path == ("a", "b", "c")
    assert done.worker == "w1"
    assert await counts(store, run_id) == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}
    [status] = await cf.queue_status(queue)
    assert (status.run_id, status.state, status.owner, status.attempts) == (
        run_id,
        "succeeded",
        "w1",
        1,
    )


async def test_a_queue_url_names_the_queue_by_its_last_path_part(
    redis_server: RedisServer,
) -> None:
    queue = RunQueue.from_url(f"{redis_server.url}/jobs")
    assert (queue.url, queue.name) == (redis_server.url, "jobs")
    with pytest.raises(ValueError, match="expected redis://HOST"):
        RunQueue.from_url("http://example/jobs")


def test_a_store_url_names_one_store_per_run_under_its_prefix() -> None:
    stores = per_run_redis("redis://:secret@host:7/2#jobs")
    assert (stores.url, stores.prefix) == ("redis://:secret@host:7/2", "jobs")
    assert repr(stores("r1")) == "RedisStorage('redis://:***@host:7/2', namespace='jobs/r1')"
    assert "secret" not in repr(stores)
    assert per_run_redis("rediss://host").prefix == "runs"
    with pytest.raises(ValueError, match="store 'file:x': expected redis://HOST"):
        per_run_redis("file:x")


async def test_submitting_one_run_id_twice_adds_one_run(redis_server: RedisServer) -> None:
    queue = new_queue(redis_server)
    assert await cf.submit(queue, "count", run_id="r1", params={"n": 1}) == "r1"
    assert await cf.submit(queue, "count", run_id="r1", params={"n": 1}) == "r1"
    assert await queue.call("XLEN", queue.stream) == 1
    [status] = await cf.queue_status(queue)
    assert (status.run_id, status.state, status.owner) == ("r1", "pending", None)


async def test_resubmitting_a_run_id_with_other_params_or_flow_is_refused(
    redis_server: RedisServer,
) -> None:
    queue = new_queue(redis_server)
    await cf.submit(queue, "count", run_id="r1", params={"n": 1})
    with pytest.raises(ValueError, match=r"run 'r1' is on .* already, .*\{\"n\": 1\} \(pending\)"):
        await cf.submit(queue, "count", run_id="r1", params={"n": 2})
    with pytest.raises(ValueError, match="as flow 'count'"):
        await cf.submit(queue, "other", run_id="r1", params={"n": 1})
    assert await queue.call("XLEN", queue.stream) == 1
    assert (await queue.info("r1") or {})["params"] == {"n": 1}


@pytest.mark.parametrize("flow_name", [["count"], "", None])
async def test_submit_refuses_a_flow_name_that_is_not_a_non_empty_str(
    redis_server: RedisServer, flow_name: Any
) -> None:
    queue = new_queue(redis_server)
    message = f"flow_name must be a non-empty str, not {flow_name!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        await cf.submit(queue, flow_name)
    assert await queue.call("EXISTS", queue.stream, queue.runs) == 0


async def test_a_worker_leaves_a_run_whose_queue_entry_it_cannot_read_and_goes_on(
    redis_server: RedisServer,
) -> None:
    """Two runs are on the queue with entries no queue writes (a flow name that is a
    list, and no JSON at all), then a good run: the worker acknowledges the bad ones
    and logs each once, naming the queue and the run, and runs the good one. The
    status shows the bad ones as unreadable; ``result`` raises for them."""
    queue, store = new_queue(redis_server), store_url(redis_server)
    await queue.ensure_group()
    bad = {"listed": '{"flow": ["count"], "params": {}, "state": "pending"}', "garbled": "{"}
    for run_id, data in bad.items():
        await queue.call("HSET", queue.runs, run_id, data)
        await queue.call("XADD", queue.stream, "*", "run_id", run_id)
    warnings = Warnings()
    logger = logging.getLogger("cosmoflow_actors.queue")
    logger.addHandler(warnings)
    try:
        async with worker(queue, store, "w1"):
            run_id = await cf.submit(queue, "count")
            with trio.fail_after(10):
                done = await cf.result(queue, run_id)
    finally:
        logger.removeHandler(warnings)
    statuses = {run.run_id: run for run in await cf.queue_status(queue)}
    pending = await queue.call("XPENDING", queue.stream, "workers")
    assert done.result == f"done {run_id}"
    assert statuses[run_id].state == "succeeded"
    assert [(statuses[name].state, statuses[name].flow_name) for name in bad] == [
        ("unreadable", ""),
        ("unreadable", ""),
    ]
    assert "was not written by a queue" in (statuses["listed"].error or "")
    assert "is not JSON" in (statuses["garbled"].error or "")
    assert pending["pending"] == 0
    assert len(warnings.messages) == 2, warnings.messages
    for name, message in zip(bad, warnings.messages, strict=True):
        assert message.startswith(f"worker w1 leaves run {name!r}: {queue!r}: the entry of run")
    with pytest.raises(cf.CosmoFlowError, match=r"the entry of run 'garbled' is not JSON"):
        await cf.result(queue, "garbled")


@pytest.mark.parametrize(
    ("params", "key"), [({"by_id": {1: "one"}}, "by_id"), ({"n": 1, "pair": (1, 2)}, "pair")]
)
async def test_submit_refuses_params_that_json_would_change(
    redis_server: RedisServer, params: dict[str, Any], key: str
) -> None:
    queue = new_queue(redis_server)
    with pytest.raises(ValueError, match=f"param '{key}' of run 'r1' would reach the worker"):
        await cf.submit(queue, "count", params=params, run_id="r1")
    assert await queue.call("EXISTS", queue.stream, queue.runs) == 0


async def test_serve_refuses_an_empty_worker_name() -> None:
    async with cf.open_engine() as engine:
        with pytest.raises(ValueError, match="a worker's name must be a non-empty str, not ''"):
            await engine.serve("redis://127.0.0.1:1/q", [FLOW], "redis://127.0.0.1:1", name="")


async def test_result_and_requeue_refuse_a_run_id_that_is_not_a_non_empty_str(
    redis_server: RedisServer,
) -> None:
    queue = new_queue(redis_server)
    for run_id in (None, ""):
        with pytest.raises(ValueError, match=f"run_id must be a non-empty str, not {run_id!r}"):
            await cf.result(queue, run_id)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=f"run_id must be a non-empty str, not {run_id!r}"):
            await cf.requeue(queue, run_id)  # type: ignore[arg-type]


async def test_a_failed_run_is_reported_by_result(redis_server: RedisServer) -> None:
    queue, store = new_queue(redis_server), store_url(redis_server)
    FAILURES["broken"] = 1
    async with worker(queue, store, "w1"):
        await cf.submit(queue, "count", run_id="broken")
        with pytest.raises(cf.CosmoFlowError, match=r"'broken' failed on worker w1: .*b is down"):
            await cf.result(queue, "broken")
    [status] = await cf.queue_status(queue)
    assert (status.state, status.owner) == ("failed", "w1")


async def test_a_requeued_failed_run_is_resumed_after_its_last_commit(
    redis_server: RedisServer,
) -> None:
    queue, store = new_queue(redis_server), store_url(redis_server)
    FAILURES["flaky"] = 1
    async with worker(queue, store, "w1"):
        await cf.submit(queue, "count", run_id="flaky")
        with pytest.raises(cf.CosmoFlowError, match="b is down"):
            await cf.result(queue, "flaky")
        await cf.requeue(queue, "flaky")
        done = await cf.result(queue, "flaky")
    assert done.execution_path == ("a", "b", "c")
    assert await counts(store, "flaky") == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts, status.error) == ("succeeded", 2, None)
    with pytest.raises(ValueError, match=r"'flaky' is succeeded on .*: only a failed run"):
        await cf.requeue(queue, "flaky")
    with pytest.raises(ValueError, match="'nobody' is not on"):
        await cf.requeue(queue, "nobody")


@cf.node
def unstorable(ctx: cf.ExecutionContext) -> cf.Action:
    return cf.Action.complete(float("nan"))


async def test_a_run_whose_data_its_store_cannot_encode_fails_once(
    redis_server: RedisServer,
) -> None:
    """Its data, not its store, is at fault: the run fails on its first attempt, and
    no worker takes it again."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    flow = cf.Flow.builder("unstorable").add_node("nan", unstorable).build()
    async with worker(queue, store, "w1", flows=(flow,)):
        await cf.submit(queue, "unstorable", run_id="nan")
        with trio.fail_after(10), pytest.raises(cf.CosmoFlowError, match=r"'nan' failed in commit"):
            await cf.result(queue, "nan")
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("failed", 1)


async def test_a_worker_without_the_runs_flow_leaves_it_to_a_worker_that_has_it(
    redis_server: RedisServer,
) -> None:
    """A worker that has only another flow passes the run over and leaves it pending;
    a worker that has the flow, started later, takes it over at once and runs it."""
    queue, store = new_queue(redis_server), store_url(redis_server)
    async with worker(queue, store, "lacks", flows=(OTHER,)):
        await cf.submit(queue, "count", run_id="left")
        with trio.fail_after(10):
            passed = await passed_over(queue, "left")
        async with worker(queue, store, "has"):
            with trio.fail_after(10):  # far less than a lease of waiting for the entry
                done = await cf.result(queue, "left")
    assert (passed.state, passed.owner, passed.passed_over) == ("pending", None, ("lacks",))
    assert done.worker == "has"
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts, status.passed_over) == ("succeeded", 1, ())
    assert await counts(store, "left") == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}


@pytest.mark.parametrize("flow_wait", [0.0, 0.3])
async def test_a_run_whose_flow_no_worker_takes_fails_after_flow_wait(
    redis_server: RedisServer, flow_wait: float
) -> None:
    queue = RunQueue(redis_server.url, f"q-{uuid.uuid4().hex[:8]}", flow_wait=flow_wait)
    async with worker(queue, store_url(redis_server), "w1"):
        run_id = await cf.submit(queue, "no-such-flow")
        started = trio.current_time()
        with pytest.raises(cf.CosmoFlowError) as info:
            await cf.result(queue, run_id)
        waited = trio.current_time() - started
    assert str(info.value).startswith(
        f"run {run_id!r} failed on worker w1: CosmoFlowError: no worker took flow "
        "'no-such-flow' in "
    )
    assert f"(passed over by w1; flow_wait={flow_wait:g} s)" in str(info.value)
    assert waited >= flow_wait
    [status] = await cf.queue_status(queue)
    assert (status.state, status.owner, status.passed_over) == ("failed", "w1", ("w1",))


async def test_a_requeued_run_whose_flow_no_worker_took_waits_flow_wait_again(
    redis_server: RedisServer,
) -> None:
    """A run whose flow the only worker lacks fails after flow_wait; requeued, it
    waits flow_wait again before it fails again, and the status names the worker
    that passed it over once."""
    queue = RunQueue(redis_server.url, f"q-{uuid.uuid4().hex[:8]}", lease=0.3, flow_wait=0.2)
    waits = []
    async with worker(queue, store_url(redis_server), "lacks", flows=(OTHER,)):
        run_id = await cf.submit(queue, "count")
        for attempt in range(2):
            started = trio.current_time()
            with trio.fail_after(10), pytest.raises(cf.CosmoFlowError, match="no worker took"):
                await cf.result(queue, run_id)
            waits.append(trio.current_time() - started)
            if attempt == 0:
                await cf.requeue(queue, run_id)
    assert min(waits) >= 0.2, waits
    [status] = await cf.queue_status(queue)
    assert (status.state, status.passed_over) == ("failed", ("lacks",))


async def test_a_run_finished_while_a_worker_fails_it_for_flow_wait_stays_finished(
    redis_server: RedisServer,
) -> None:
    """Worker A lacks the run's flow, which workers have passed over for longer than
    flow_wait: right after A has noted its pass over, and before it records the
    failure, worker B takes the run over and finishes it. A's failure then records
    nothing: the run stays succeeded."""
    from cosmoflow_actors.runtime.queue import _EXPIRED, _PASS_OVER, _WAITING

    name, store = f"q-{uuid.uuid4().hex[:8]}", store_url(redis_server)
    lacking = RunQueue(redis_server.url, name, lease=0.3, flow_wait=1)
    having = RunQueue(redis_server.url, name, lease=0.3)
    passed, finished, back = trio.Event(), trio.Event(), trio.Event()
    call = lacking.call

    async def held_after_the_pass_over(*args: Any) -> Any:
        if passed.is_set() and not finished.is_set():
            await finished.wait()
        if finished.is_set() and (args[0] == "XREADGROUP" or args[1] in (_EXPIRED, _WAITING)):
            back.set()
        reply = await call(*args)
        if args[:2] == ("EVAL", _PASS_OVER) and reply is not None:
            passed.set()
        return reply

    lacking.call = held_after_the_pass_over  # type: ignore[method-assign]
    async with worker(lacking, store, "A", flows=(OTHER,)):
        run_id = await cf.submit(having, "count", run_id="raced")
        await lacking.call("HSET", lacking.passed, run_id, '{"since": 0, "by": ["X"]}')
        with trio.fail_after(10):
            await passed.wait()
            async with worker(having, store, "B"):
                done = await cf.result(having, run_id)
            finished.set()
            await back.wait()
    [status] = await cf.queue_status(having)
    assert done.worker == "B"
    assert (status.state, status.owner, status.error) == ("succeeded", "B", None)


async def test_a_worker_refuses_two_flows_of_one_name() -> None:
    twin = cf.Flow.builder("count").add_node("a", Count()).build()
    async with cf.open_engine() as engine:
        with pytest.raises(ValueError, match="two flows are named 'count'"):
            await engine.serve("redis://127.0.0.1:1/q", [FLOW, twin], "redis://127.0.0.1:1")


def test_a_queue_refuses_a_negative_flow_wait_and_an_endless_lease() -> None:
    with pytest.raises(ValueError, match="flow_wait must be >= 0 seconds, got -1"):
        RunQueue("redis://127.0.0.1:1/0", "q", flow_wait=-1)
    with pytest.raises(ValueError, match="lease must be a finite number of seconds"):
        RunQueue("redis://127.0.0.1:1/0", "q", lease=math.inf)


async def claimed_by_dead(queue: cf.RunQueue, run_id: str) -> Any:
    """Claim the stream entry of ``run_id`` as a worker "dead" does, with a lease of
    500 ms left; return the entry's id."""
    reply = await queue.call("XREADGROUP", "GROUP", "workers", "dead", "STREAMS", queue.stream, ">")
    [[entry_id, _]] = reply[0][1]
    await queue.call("SET", queue.lease_key(run_id), "dead", "PX", 500)
    await queue.call(
        "HSET",
        queue.runs,
        run_id,
        '{"flow": "count", "state": "running", "owner": "dead", "params": {}, "attempts": 1}',
    )
    return entry_id


async def test_an_expired_lease_is_taken_over_and_the_run_resumed_after_its_last_commit(
    redis_server: RedisServer,
) -> None:
    """A worker "dead" claimed the run and committed step a before it failed in b;
    once its lease expires, a live worker takes the run over and resumes it at b."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    run_id = await cf.submit(queue, "count")
    await claimed_by_dead(queue, run_id)
    [status] = await cf.queue_status(queue)
    assert (status.state, status.owner) == ("running", "dead")
    assert status.lease_left is not None and 0 < status.lease_left <= 0.5
    FAILURES[run_id] = 1
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError, match="node 'b' failed in exec"):
            await engine.run(FLOW, per_run_redis(store)(run_id), run_id=run_id)
    async with worker(queue, store, "alive"):
        done = await cf.result(queue, run_id)
    assert done.worker == "alive"
    assert await counts(store, run_id) == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("succeeded", 2)


async def test_a_dead_workers_runs_are_taken_over_one_after_another_at_once(
    redis_server: RedisServer,
) -> None:
    """Six runs a "dead" worker read have been idle for longer than their lease: a
    worker takes each one over right after the one before, not a poll interval
    (0.5 s) later, and resumes them."""
    queue, store = new_queue(redis_server, lease=10.0), store_url(redis_server)
    run_ids = [await cf.submit(queue, "count") for _ in range(6)]
    reply = await queue.call(
        "XREADGROUP", "GROUP", "workers", "dead", "COUNT", 6, "STREAMS", queue.stream, ">"
    )
    entry_ids = [entry_id for entry_id, _ in reply[0][1]]
    await queue.call("XCLAIM", queue.stream, "workers", "dead", 0, *entry_ids, "IDLE", 20_000)
    async with worker(queue, store, "alive", concurrency=6):
        with trio.fail_after(1.5):  # a poll interval per run would take 2.5 s at least
            done = [await cf.result(queue, run_id) for run_id in run_ids]
    assert {result.worker for result in done} == {"alive"}
    assert [await counts(store, run_id) for run_id in run_ids] == [
        {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}
    ] * 6


async def test_a_run_whose_lease_was_held_at_a_look_is_taken_over_when_it_expires(
    redis_server: RedisServer,
) -> None:
    """A "dead" worker's run has been idle for a lease (2 s), but its lease has 0.5 s
    left when a live worker first looks for expired leases: the live worker takes the
    run over once that lease has expired (a poll interval, 0.5 s, later at most), not
    a lease after its look."""
    queue, store = new_queue(redis_server, lease=2.0), store_url(redis_server)
    run_id = await cf.submit(queue, "count")
    entry_id = await claimed_by_dead(queue, run_id)
    await queue.call("XCLAIM", queue.stream, "workers", "dead", 0, entry_id, "IDLE", 2000)
    started = trio.current_time()
    async with worker(queue, store, "alive"):
        with trio.fail_after(5):
            done = await cf.result(queue, run_id)
    took = trio.current_time() - started
    assert done.worker == "alive"
    assert 0.5 <= took < 1.5, took


class Monitor:
    """The commands a server was sent (MONITOR), as it prints them, those that Lua
    scripts ran left out."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self._grown = trio.Event()

    def add(self, lines: list[str]) -> None:
        self.commands.extend(lines)
        self._grown.set()
        self._grown = trio.Event()

    async def until(self, enough: Callable[[list[str]], bool]) -> list[str]:
        """The commands so far, once ``enough`` of them says so."""
        while not enough(self.commands):
            await self._grown.wait()
        return list(self.commands)


@asynccontextmanager
async def monitored(server: RedisServer) -> AsyncIterator[Monitor]:
    """A Monitor of what ``server`` is sent while the block runs."""
    monitor = Monitor()
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b"MONITOR\r\n")
    pending = await received_until(stream, b"+OK\r\n", "MONITOR")

    async def read() -> None:
        nonlocal pending
        while True:
            *lines, pending = pending.split(b"\r\n")
            monitor.add([line.decode() for line in lines if b" lua] " not in line])
            chunk = await stream.receive_some()
            assert chunk, "MONITOR ended"
            pending += chunk

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(read)
        yield monitor
        nursery.cancel_scope.cancel()


async def test_a_worker_reads_each_waiting_run_in_one_round_trip(
    redis_server: RedisServer,
) -> None:
    """Twenty runs wait when a worker with four slots starts. For each one it sends the
    queue one command to read it (with what the queue holds about it), one to claim
    it and one to record its outcome; it looks for expired leases once a poll interval
    (0.5 s) at most, not before each claim."""
    queue, store = new_queue(redis_server, lease=10.0), store_url(redis_server)
    for _ in range(20):
        await cf.submit(queue, "count")
    key = f"cosmoflow:queue:{queue.name}:"

    def recorded(commands: list[str]) -> bool:
        return sum(key in line and "'XACK'" in line for line in commands) >= 20

    async with monitored(redis_server) as monitor:
        started = trio.current_time()
        async with worker(queue, store, "w1"):
            with trio.fail_after(10):
                commands = [line for line in await monitor.until(recorded) if key in line]
            polls = 1 + int((trio.current_time() - started) / 0.5)
    looks = [line for line in commands if "XAUTOCLAIM" in line]
    reads = [line for line in commands if "XREADGROUP" in line or '"HGET"' in line]
    claims = [line for line in commands if "'NX', 'PX'" in line]
    assert len(claims) == 20
    assert len(looks) <= polls
    # After the last claim, the worker reads once more and waits for a new entry.
    assert len(reads) <= 20 + 2 * polls


async def test_a_worker_renews_the_leases_of_all_its_runs_in_one_round_trip(
    redis_server: RedisServer,
) -> None:
    """Three runs are held in step a for two renewals (a third of their 0.6 s lease
    apart): each renewal, once they all run, names the three leases in one command,
    and the runs keep their worker and finish, each step committed once."""
    queue, store = new_queue(redis_server, lease=0.6), store_url(redis_server)
    run_ids = [f"held-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    gates = {run_id: (trio.Event(), trio.Event()) for run_id in run_ids}
    GATES.update(gates)
    leases = [queue.lease_key(run_id) for run_id in run_ids]

    def renewals(commands: list[str]) -> list[str]:
        return [line for line in commands if "PEXPIRE" in line and leases[0] in line]

    async with monitored(redis_server) as monitor, worker(queue, store, "w1"):
        for run_id in run_ids:
            await cf.submit(queue, "count", run_id=run_id)
        for entered, _ in gates.values():
            await entered.wait()
        before = len(renewals(monitor.commands))
        with trio.fail_after(10):
            commands = await monitor.until(lambda commands: len(renewals(commands)) >= before + 2)
        for _, release in gates.values():
            release.set()
        done = [await cf.result(queue, run_id) for run_id in run_ids]
    # The first renewal after they all ran may have been sent before the last began.
    renewal = renewals(commands)[before + 1]
    assert [lease in renewal for lease in leases] == [True, True, True]
    assert sum("PEXPIRE" in line for line in commands) == len(renewals(commands))
    assert {(result.worker, result.result) for result in done} == {
        ("w1", f"done {run_id}") for run_id in run_ids
    }
    for run_id in run_ids:
        assert await counts(store, run_id) == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}


@asynccontextmanager
async def default_threads_taken() -> AsyncIterator[None]:
    """Every token of trio's default thread limiter is held while the block runs, as
    thread executor steps hold them (entering waits for the tokens in use)."""
    limiter = trio.to_thread.current_default_thread_limiter()
    holders = [object() for _ in range(int(limiter.total_tokens))]
    try:
        for holder in holders:
            await limiter.acquire_on_behalf_of(holder)
        yield
    finally:
        for holder in holders:
            if holder in limiter.statistics().borrowers:
                limiter.release_on_behalf_of(holder)


async def test_a_worker_renews_its_leases_while_thread_steps_hold_every_default_thread(
    redis_server: RedisServer,
) -> None:
    """The run is held in step a while trio's default thread limiter has no token left:
    the worker still renews the run's lease (three renewals, a third of the 0.3 s lease
    apart; the monitor may not have shown the one sent before), so the run keeps its
    worker and its first claim."""
    queue, store = new_queue(redis_server, lease=0.3), store_url(redis_server)
    lease = queue.lease_key("threads")

    def renewals(commands: list[str]) -> int:
        return sum("PEXPIRE" in line and lease in line for line in commands)

    async with (
        monitored(redis_server) as monitor,
        held_in_step_a(queue, store, "threads") as release,
    ):
        async with default_threads_taken():
            before = renewals(monitor.commands)
            with trio.fail_after(5):
                await monitor.until(lambda commands: renewals(commands) >= before + 3)
        release.set()
        done = await cf.result(queue, "threads")
    [status] = await cf.queue_status(queue)
    assert (done.worker, status.attempts) == ("w1", 1)
    assert await counts(store, "threads") == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}


async def test_a_worker_whose_commit_lost_to_another_engine_drops_the_run(
    redis_server: RedisServer,
) -> None:
    """Another engine runs the run to its end while the worker is in step a: the
    worker's commit raises RunConflictError, so it records no outcome (the queue counts
    a second attempt) and lets the lease go; the run's entry is taken over once idle for
    a lease, and gives the other engine's result. No step committed twice."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    async with held_in_step_a(queue, store, "raced", "loser") as release:
        async with cf.open_engine() as other:
            first = await other.resume(FLOW, per_run_redis(store)("raced"), run_id="raced")
        release.set()
        done = await cf.result(queue, "raced")
    assert done.result == first.result == "done raced"
    assert await counts(store, "raced") == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("succeeded", 2)


async def test_a_stopped_worker_hands_its_run_back_to_the_next_worker_at_once(
    redis_server: RedisServer,
) -> None:
    """Worker w1 is stopped (its serve cancelled) while the run is in step a: it drops
    the run's lease and gives its entry back, so w2, started afterwards, takes the run
    over at once, not after the 60 s lease, and resumes it. Each step commits once."""
    queue, store = new_queue(redis_server, lease=60.0), store_url(redis_server)
    async with held_in_step_a(queue, store, "stopped"):
        pass  # leaving the block stops w1 with the run in step a
    [handed_back] = await cf.queue_status(queue)
    started = trio.current_time()
    async with worker(queue, store, "w2"):
        with trio.fail_after(5):  # the lease would hold the run for 60 s
            done = await cf.result(queue, "stopped")
    print(f"\ntaken over and finished {trio.current_time() - started:.2f} s after w1 stopped")
    assert (handed_back.state, handed_back.owner, handed_back.lease_left) == (
        "orphaned",
        "w1",
        None,
    )
    assert (done.result, done.worker) == ("done stopped", "w2")
    assert await counts(store, "stopped") == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("succeeded", 2)


async def blocked_clients(queue: RunQueue) -> int:
    """How many clients of the queue's server wait in a blocking command now."""
    clients: dict[str, Any] = await queue.call("INFO", "clients")
    return int(clients["blocked_clients"])


async def test_a_run_a_stopped_workers_last_read_got_is_given_back_at_once(
    redis_server: RedisServer,
) -> None:
    """w1 waits for new runs (its read blocked in the server) when it is stopped; a run
    submitted then is delivered to that read: w1 gives its entry back, so w2 takes the
    run at once, not after the 60 s lease."""
    queue, store = new_queue(redis_server, lease=60.0), store_url(redis_server)
    stop = trio.CancelScope()

    async def serve_w1() -> None:
        with stop:
            async with worker(queue, store, "w1"):
                await trio.sleep_forever()

    before = await blocked_clients(queue)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_w1)
        with trio.fail_after(5):
            while await blocked_clients(queue) <= before:
                pass
        stop.cancel()
        await cf.submit(queue, "count", run_id="late")
    async with worker(queue, store, "w2"):
        with trio.fail_after(5):  # the entry, left with w1, would wait out the lease
            done = await cf.result(queue, "late")
    assert (done.result, done.worker) == ("done late", "w2")


async def test_a_run_whose_store_is_out_of_reach_is_taken_over_not_failed(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The first claim gets a store on a port nothing listens on: the run is dropped
    (no outcome recorded, the worker logs why) and runs again once its entry has been
    idle for a lease."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    stores = per_run_redis(store)
    unreachable = per_run_redis(f"redis://127.0.0.1:{free_port()}/0")
    claims: list[str] = []

    def store_of(run_id: str) -> cf.Storage:
        claims.append(run_id)
        return unreachable(run_id) if len(claims) == 1 else stores(run_id)

    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        await nursery.start(functools.partial(engine.serve, queue, [FLOW], store_of))
        run_id = await cf.submit(queue, "count")
        done = await cf.result(queue, run_id)
        nursery.cancel_scope.cancel()
    assert claims == [run_id, run_id]
    assert done.result == f"done {run_id}"
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("succeeded", 2)
    [dropped] = [r for r in caplog.records if r.name == "cosmoflow_actors.queue"]
    assert f"drops run {run_id!r}, to be taken over after a lease" in dropped.getMessage()
    assert "StorageError" in dropped.getMessage()


async def test_a_run_whose_store_goes_away_during_a_step_is_taken_over_not_failed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The run's store (redis-server with AOF) is SIGKILLed while the run is in step
    a, so that a's post cannot reach it: the worker drops the run (no outcome). Once
    the store is back on the same data, the run is taken over and resumed at a, each
    step committed once."""
    port = free_port()
    queue, store = new_queue(redis_server, lease=0.5), f"redis://127.0.0.1:{port}/0#runs"
    servers = [await persistent_redis(tmp_path, port)]
    try:
        async with held_in_step_a(queue, store, "cut") as release:
            await killed(servers[0])
            release.set()
            with trio.fail_after(10):
                dropped = await left_running(queue, "cut")
            servers.append(await persistent_redis(tmp_path, port))
            with trio.fail_after(10):
                done = await cf.result(queue, "cut")
        stored = await counts(store, "cut")
    finally:
        for server in servers:
            await killed(server)
    assert (dropped.state, dropped.error) == ("orphaned", None)
    assert done.result == "done cut"
    assert stored == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("succeeded", 2)


async def test_a_run_longer_than_its_lease_keeps_its_worker(redis_server: RedisServer) -> None:
    """Each step takes longer than the lease: the worker's renewals keep the run its
    own, so the other worker never takes it over. (With one slot each, a worker busy
    with the run does not look for expired leases itself.)"""
    queue, store = new_queue(redis_server, lease=0.3), store_url(redis_server)
    SLOW["long"] = 0.4
    async with worker(queue, store, "w1", 1), worker(queue, store, "w2", 1):
        await cf.submit(queue, "count", run_id="long")
        with trio.fail_after(20):  # without renewals the workers take it from each other
            done = await cf.result(queue, "long")
    [status] = await cf.queue_status(queue)
    assert (status.state, status.owner, status.attempts) == ("succeeded", done.worker, 1)
    assert await counts(store, "long") == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}


async def test_a_lease_without_its_worker_is_shown_as_orphaned(
    redis_server: RedisServer,
) -> None:
    queue = new_queue(redis_server)
    run_id = await cf.submit(queue, "count")
    await queue.call(
        "HSET",
        queue.runs,
        run_id,
        '{"flow": "count", "state": "running", "owner": "gone", "params": {}}',
    )
    [status] = await cf.queue_status(queue)
    assert (status.state, status.owner, status.lease_left) == ("orphaned", "gone", None)


async def test_a_run_that_ends_while_the_status_is_read_is_not_shown_orphaned(
    redis_server: RedisServer,
) -> None:
    """The run ends (recording its outcome and dropping its lease) just after the status
    has listed the runs and before it reads their leases: it is shown as it ended, not
    as a running run whose lease is gone."""
    queue, store = new_queue(redis_server, lease=10.0), store_url(redis_server)
    async with held_in_step_a(queue, store, "ending") as release:
        listed = trio.Event()
        read = queue.call

        async def run_ends_after_the_listing(*args: Any) -> Any:
            reply = await read(*args)
            if args[:2] == ("HGETALL", queue.runs) and not listed.is_set():
                listed.set()
                release.set()
                await cf.result(queue, "ending")
            return reply

        queue.call = run_ends_after_the_listing  # type: ignore[method-assign]
        [status] = await cf.queue_status(queue)
    assert listed.is_set()
    assert (status.state, status.owner, status.lease_left) == ("succeeded", "w1", None)


async def test_the_run_record_names_the_worker_that_runs_it_and_its_lease(
    redis_server: RedisServer,
) -> None:
    queue, store = new_queue(redis_server, lease=10.0), store_url(redis_server)
    storage = per_run_redis(store)("owned")
    async with held_in_step_a(queue, store, "owned") as release:
        [listed] = await cf.list_runs(storage)
        release.set()
        await cf.result(queue, "owned")
    assert (listed.state, listed.owner, listed.queue) == ("running", "w1", queue.address)
    assert listed.lease_left is not None and 0 < listed.lease_left <= 10.0
    [done] = await cf.list_runs(storage)
    assert (done.state, done.owner, done.steps, done.lease_left) == ("succeeded", "w1", 3, None)


async def test_a_run_that_ended_after_its_record_was_read_is_not_listed_orphaned(
    redis_server: RedisServer,
) -> None:
    """A record read while the run was running, checked against the queue once the run
    has ended (and dropped its lease): the run is listed as it ended."""
    queue, store = new_queue(redis_server, lease=10.0), store_url(redis_server)
    storage = per_run_redis(store)("ended")
    async with held_in_step_a(queue, store, "ended") as release:
        [listed] = await cf.list_runs(storage)
        release.set()
        await cf.result(queue, "ended")
    [checked] = await leases_checked(storage, [listed])
    assert listed.state == "running"
    assert (checked.state, checked.owner, checked.lease_left) == ("succeeded", "w1", None)


async def test_a_run_whose_lease_is_gone_is_listed_as_orphaned_where_the_store_can_tell(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The lease of a run in flight disappears (as when its worker is cut off): a store
    on the queue's server shows the run orphaned; a lease taken by another worker names
    that worker. A store elsewhere cannot tell, and lists the run as its record says."""
    queue, store = new_queue(redis_server, lease=10.0), store_url(redis_server)
    storage = per_run_redis(store)("dropped")
    async with held_in_step_a(queue, store, "dropped") as release:
        [listed] = await cf.list_runs(storage)
        await queue.call("DEL", queue.lease_key("dropped"))
        [orphaned] = await leases_checked(storage, [listed])
        [listed_orphaned] = await cf.list_runs(storage)
        await queue.call("SET", queue.lease_key("dropped"), "w2", "PX", 5000)
        [taken] = await leases_checked(storage, [listed])
        await queue.call("DEL", queue.lease_key("dropped"))
        elsewhere = [
            cf.FileStorage(tmp_path / "other.json"),
            per_run_redis(f"redis://localhost:{redis_server.port}/0#{uuid.uuid4().hex}")("x"),
            per_run_redis(f"{redis_server.url[:-1]}1#{uuid.uuid4().hex}")("x"),
        ]
        unknown = [await leases_checked(other, [listed]) for other in elsewhere]
        release.set()
    assert (orphaned.state, orphaned.owner, orphaned.lease_left) == ("orphaned", "w1", None)
    assert listed_orphaned == orphaned
    assert (taken.state, taken.owner) == ("running", "w2")
    assert taken.lease_left is not None and 0 < taken.lease_left <= 5.0
    assert unknown == [[listed]] * 3


async def test_the_leases_of_runs_of_several_queues_are_read_each_from_its_queue(
    redis_server: RedisServer,
) -> None:
    """Records of runs of two queues on the store's server, and one finished run: each
    running run gets the holder of its own queue's lease, in the order given."""
    storage = per_run_redis(store_url(redis_server))("listing")
    first, second = new_queue(redis_server), new_queue(redis_server)
    runs = [
        RunRecord("r1", "count", "running", "a", 1, "w1", first.address),
        RunRecord("r2", "count", "running", "a", 1, "w1", second.address),
        RunRecord("r3", "count", "running", "a", 1, "w1", first.address),
        RunRecord("r4", "count", "succeeded", "c", 3, "w1", first.address),
    ]
    await first.call("SET", first.lease_key("r1"), "w1", "PX", 5000)
    await second.call("SET", second.lease_key("r2"), "w2", "PX", 5000)
    await first.call("SET", second.lease_key("r3"), "w3", "PX", 5000)

    checked = await leases_checked(storage, iter(runs))

    assert [(run.run_id, run.state, run.owner) for run in checked] == [
        ("r1", "running", "w1"),
        ("r2", "running", "w2"),
        ("r3", "orphaned", "w1"),
        ("r4", "succeeded", "w1"),
    ]
    assert checked[3] == runs[3]


async def test_a_worker_cut_off_from_redis_cancels_its_run_when_its_lease_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The renewals fail (nothing listens on the port): the run is cancelled once the
    lease the worker last got would have expired, not before."""
    from cosmoflow_actors.runtime.queue import _Lease, _Worker

    lease = 3.0
    queue = RunQueue(f"redis://127.0.0.1:{free_port()}/0", "cut-off", lease=lease)
    async with cf.open_engine() as engine:
        cut_off = _Worker(engine, queue, {"count": FLOW}, per_run_redis("redis://x"), "w")
        started = trio.current_time()
        scope = trio.CancelScope()
        cut_off._leases["r1"] = _Lease(scope, started + lease)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_off.renew_leases)
            with scope:
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - started
    assert lease <= elapsed <= lease + lease / 3


async def persistent_redis(directory: Path, port: int) -> trio.Process:
    """A redis-server on ``port`` that keeps its data in ``directory`` (an append-only
    file, synced at every write), once it accepts connections."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory)]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    await received_until(process.stdout, b"Ready to accept connections", "redis-server")
    return process


async def killed(process: trio.Process) -> None:
    """SIGKILL ``process`` (unless it has exited) and wait for it."""
    if process.returncode is None:
        process.kill()
    await process.wait()
    assert process.stdout is not None
    await process.stdout.aclose()


async def test_runs_go_on_after_redis_restarts_and_every_step_is_committed_once(
    tmp_path: Path,
) -> None:
    """redis-server is SIGKILLed while a worker runs four runs, each held in step a (its
    four slots taken), and started again on the same port and data: every run
    succeeds, and each of its steps is committed once."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    queue, store = RunQueue(url, "restart", lease=1.0), f"{url}#runs"
    run_ids = [f"restart-{n:02}" for n in range(12)]
    gates = {run_id: (trio.Event(), trio.Event()) for run_id in run_ids[:4]}
    GATES.update(gates)
    servers = [await persistent_redis(tmp_path, port)]
    try:
        async with worker(queue, store, "w1", concurrency=len(gates)):
            for run_id in run_ids:
                await cf.submit(queue, "count", run_id=run_id)
            for entered, _ in gates.values():
                await entered.wait()
            await killed(servers[0])
            servers.append(await persistent_redis(tmp_path, port))
            for _, release in gates.values():
                release.set()
            results = [await cf.result(queue, run_id) for run_id in run_ids]
        stored = [await counts(store, run_id) for run_id in run_ids]
        statuses = await cf.queue_status(queue)
    finally:
        for server in servers:
            await killed(server)
    assert [done.result for done in results] == [f"done {run_id}" for run_id in run_ids]
    assert stored == [{"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}] * len(run_ids)
    assert {run.state for run in statuses} == {"succeeded"}


class Warnings(logging.Handler):
    """The messages logged to ``cosmoflow_actors.queue``; :meth:`wait_for` blocks until
    one contains a text."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self._logged = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._logged.set()
        self._logged = trio.Event()

    async def wait_for(self, text: str) -> None:
        while not any(text in message for message in self.messages):
            await self._logged.wait()


async def test_a_worker_logs_once_that_its_queue_is_out_of_reach_and_when_it_is_back(
    tmp_path: Path,
) -> None:
    port = free_port()
    queue = RunQueue(f"redis://127.0.0.1:{port}/0", "outage", lease=0.3)
    warnings = Warnings()
    logger = logging.getLogger("cosmoflow_actors.queue")
    logger.addHandler(warnings)
    server = await persistent_redis(tmp_path, port)
    try:
        async with worker(queue, f"redis://127.0.0.1:{port}/0#runs", "w1"):
            await killed(server)
            with trio.fail_after(30):
                await warnings.wait_for("worker w1 cannot use RunQueue(")
            server = await persistent_redis(tmp_path, port)
            with trio.fail_after(30):
                await warnings.wait_for("worker w1 uses RunQueue(")
    finally:
        logger.removeHandler(warnings)
        await killed(server)
    assert len(warnings.messages) == 2, warnings.messages
    assert "trying again every 0.1 s" in warnings.messages[0]


async def test_a_stopped_worker_gives_up_handing_back_a_run_when_redis_does_not_answer(
    tmp_path: Path,
) -> None:
    """redis-server is SIGSTOPped (it accepts connections, answers nothing) while a
    worker holds a run in step a: stopping the worker waits HAND_BACK_SECONDS for the
    hand-back, not the connections' timeout (180 s with a 60 s lease)."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    queue, store = RunQueue(url, "frozen", lease=60.0), f"{url}#runs"
    entered, release = trio.Event(), trio.Event()
    GATES["frozen"] = (entered, release)
    server = await persistent_redis(tmp_path, port)
    try:
        async with cf.open_engine() as engine:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(engine.serve, queue, [FLOW], store))
                await cf.submit(queue, "count", run_id="frozen")
                await entered.wait()
                server.send_signal(signal.SIGSTOP)
                stopping = trio.current_time()
                nursery.cancel_scope.cancel()
            stopped = trio.current_time() - stopping
            server.send_signal(signal.SIGCONT)  # lets the engine close its stores
    finally:
        await killed(server)
    assert HAND_BACK_SECONDS <= stopped < HAND_BACK_SECONDS + 1


WORKER_FLOW = '''
import os

import redis
import trio

import cosmoflow_actors as cf

executions = redis.Redis.from_url(os.environ["EXECUTIONS"])


class Count(cf.Node):
    """Counts each execution in Redis, then its commit in the run's store."""

    async def exec(self, prep_res, ctx):
        await trio.to_thread.run_sync(executions.incr, f"{ctx.run_id}:{ctx.node_id}")
        await trio.sleep(0.02)

    async def post(self, store, prep_res, exec_res, ctx):
        await store.update("count", lambda n: n + 1, default=0)
        await store.update(f"step:{ctx.node_id}", lambda n: n + 1, default=0)
        return cf.Action.complete(ctx.run_id) if ctx.node_id == "c" else None


flow = (
    cf.Flow.builder("count")
    .add_node("a", Count())
    .add_node("b", Count())
    .add_node("c", Count())
    .add_route("a", "b")
    .add_route("b", "c")
    .build()
)
'''


async def owner_of_a_running_run(queue: RunQueue) -> str:
    for run in await cf.queue_status(queue):
        if run.state == "running" and run.owner is not None:
            return run.owner
    raise AssertionError("no run is running")


KILL_AFTER = 30
LEASE = 1.0


@asynccontextmanager
async def worker_process(
    flow_file: Path, queue: RunQueue, store: str, name: str, env: dict[str, str]
) -> AsyncIterator[trio.Process]:
    """``cosmoflow worker`` in a process of its own, once it reads the queue; killed at
    exit if it still runs."""
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", str(flow_file)]
    command += ["--queue", f"{queue.url}/{queue.name}", "--store", store]
    command += ["--concurrency", "4", "--lease", str(queue.lease), "--name", name]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, env=env)
    assert process.stdout is not None
    try:
        output = await received_until(process.stdout, b"\n", f"worker {name}")
        assert output.startswith(f"worker {name} serving {queue.name}".encode())
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.stdout.aclose()


@pytest.mark.parametrize("runs", [120, pytest.param(300, marks=pytest.mark.slow)])
async def test_three_worker_processes_one_killed_every_step_committed_once(
    redis_server: RedisServer, tmp_path: Path, runs: int
) -> None:
    """``runs`` runs on 3 worker processes; one is SIGKILLed after 30 results, with runs
    in flight. Every run succeeds, each step of each run is committed exactly once, and
    the dead worker's runs finish on the others within the lease and a few seconds."""
    flow_file = tmp_path / "count.py"
    flow_file.write_text(WORKER_FLOW)
    queue, store = new_queue(redis_server, lease=LEASE), store_url(redis_server)
    env = {**os.environ, "EXECUTIONS": redis_server.url}
    results: dict[str, cf.QueuedResult] = {}
    done_at: dict[str, float] = {}

    async def wait_for(run_id: str) -> None:
        results[run_id] = await cf.result(queue, run_id)
        done_at[run_id] = trio.current_time()

    async with (
        worker_process(flow_file, queue, store, "w0", env) as w0,
        worker_process(flow_file, queue, store, "w1", env) as w1,
        worker_process(flow_file, queue, store, "w2", env) as w2,
    ):
        processes = {"w0": w0, "w1": w1, "w2": w2}
        run_ids = [f"{queue.name}-{n:03}" for n in range(runs)]
        for run_id in run_ids:
            await cf.submit(queue, "count", run_id=run_id)
        for run_id in run_ids[:KILL_AFTER]:
            await wait_for(run_id)
        victim = await owner_of_a_running_run(queue)
        # Stopped first, the victim finishes nothing more: the runs the queue says it
        # runs now are the ones it leaves behind.
        processes[victim].send_signal(signal.SIGSTOP)
        killed_at = trio.current_time()
        statuses = await cf.queue_status(queue)
        orphans = {run.run_id for run in statuses if run.owner == victim and run.state == "running"}
        processes[victim].send_signal(signal.SIGKILL)
        async with trio.open_nursery() as nursery:
            for run_id in orphans:
                nursery.start_soon(wait_for, run_id)
        for run_id in run_ids:
            if run_id not in results:
                await wait_for(run_id)
    assert sorted(results) == run_ids
    assert orphans
    for run_id in run_ids:
        assert results[run_id].result == run_id
        assert await counts(store, run_id) == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}
    statuses = {run.run_id: run for run in await cf.queue_status(queue)}
    assert all(run.state == "succeeded" for run in statuses.values())
    for run_id in orphans:
        assert statuses[run_id].owner != victim
        assert statuses[run_id].attempts == 2
    takeover = max(done_at[run_id] for run_id in orphans) - killed_at
    assert takeover <= LEASE + 5
    executions = [
        int(await queue.call("GET", f"{run_id}:{node}")) for run_id in run_ids for node in "abc"
    ]
    assert min(executions) == 1  # at least once; more only for steps the kill cut short
    retried = sum(run.attempts > 1 for run in statuses.values())
    print(
        f"\n{len(orphans)} runs taken over from {victim} in {takeover:.2f} s; "
        f"{retried} runs claimed more than once; "
        f"{sum(executions) - 3 * runs} step executions repeated"
    )


def test_an_error_whose_causes_loop_is_no_conflict_nor_an_outage() -> None:
    """A node may raise such an error: the worker must still decide, and fail the run."""
    first, second = ValueError("a"), KeyError("b")
    first.__cause__, second.__cause__ = second, first
    error = cf.NodeError("n", "exec", "r1", 1)
    error.__cause__ = first
    assert not run_queue._conflict(error)
    assert not run_queue._out_of_reach(error)
