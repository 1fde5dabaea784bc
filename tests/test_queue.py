"""The run queue on Redis: submit, workers with leases, takeover of a dead worker's runs.

Every test uses a real redis-server (one per module) and a queue of its own; the
takeover tests start real worker processes and SIGKILL one of them.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.queue import RunQueue, per_run_redis
from tests.storage_suite import RedisServer, free_port

ROOT = Path(__file__).parent.parent

FAILURES: dict[str, int] = {}
"""Times ``Count`` still fails in step ``b`` of a run (by run id); tests set it."""


class Count(cf.Node):
    """Counts its own step in the run's store: a per-run counter and a key per step."""

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
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


@asynccontextmanager
async def worker(queue: RunQueue, store: str, name: str) -> AsyncIterator[cf.Engine]:
    """An engine serving ``queue`` in this process until the block ends."""
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        serve = functools.partial(engine.serve, concurrency=4, name=name)
        await nursery.start(serve, queue, [FLOW], store)
        yield engine
        nursery.cancel_scope.cancel()


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


async def test_submitting_one_run_id_twice_adds_one_run(redis_server: RedisServer) -> None:
    queue = new_queue(redis_server)
    assert await cf.submit(queue, "count", run_id="r1", params={"n": 1}) == "r1"
    assert await cf.submit(queue, "count", run_id="r1", params={"n": 2}) == "r1"
    assert await queue.call("XLEN", queue.stream) == 1
    [status] = await cf.queue_status(queue)
    assert (status.run_id, status.state, status.owner) == ("r1", "pending", None)


async def test_a_failed_run_is_reported_by_result(redis_server: RedisServer) -> None:
    queue, store = new_queue(redis_server), store_url(redis_server)
    async with worker(queue, store, "w1"):
        run_id = await cf.submit(queue, "no-such-flow")
        with pytest.raises(cf.CosmoFlowError, match="worker w1 has no flow 'no-such-flow'"):
            await cf.result(queue, run_id)
    [status] = await cf.queue_status(queue)
    assert status.state == "failed"


async def test_an_expired_lease_is_taken_over_and_the_run_resumed_after_its_last_commit(
    redis_server: RedisServer,
) -> None:
    """A worker "dead" claimed the run and committed step a before it failed in b;
    once its lease expires, a live worker takes the run over and resumes it at b."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    run_id = await cf.submit(queue, "count")
    await queue.call("XREADGROUP", "GROUP", "workers", "dead", "STREAMS", queue.stream, ">")
    await queue.call("SET", queue.lease_key(run_id), "dead", "PX", 500)
    await queue.call(
        "HSET",
        queue.runs,
        run_id,
        '{"flow": "count", "state": "running", "owner": "dead", "params": {}, "attempts": 1}',
    )
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


async def test_a_worker_cut_off_from_redis_cancels_its_run_when_its_lease_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The renewals fail (nothing listens on the port): the run is cancelled once the
    lease the worker last got would have expired, not before."""
    from cosmoflow_actors.runtime.queue import _Worker

    lease = 3.0
    queue = RunQueue(f"redis://127.0.0.1:{free_port()}/0", "cut-off", lease=lease)
    async with cf.open_engine() as engine:
        cut_off = _Worker(engine, queue, {"count": FLOW}, per_run_redis("redis://x"), "w")
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()
            nursery.start_soon(cut_off._renew, "r1", scope)
            with scope:
                await trio.sleep_forever()
    elapsed = trio.current_time() - started
    assert lease <= elapsed <= lease + lease / 3
