"""An engine as a worker of a run queue: running claimed runs, renewing their leases,
recording outcomes, handing runs back when stopped, stores out of reach, redis-server
restarts, and real worker processes, one SIGKILLed, whose runs others take over."""

from __future__ import annotations

import functools
import os
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
from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.runtime.queue.claims import HAND_BACK_SECONDS
from cosmoflow_actors.runtime.queue.client import RunQueue
from cosmoflow_actors.runtime.queue.worker import per_run_redis
from cosmoflow_actors.storage.base import value_or
from tests.queue_support import (
    FAILURES,
    FLOW,
    GATES,
    SLOW,
    STUCK,
    Count,
    counts,
    held_in_step_a,
    killed,
    monitored,
    new_queue,
    persistent_redis,
    store_url,
    worker,
)
from tests.storage_suite import RedisServer, free_port
from tests.support import commits, received_until, taking_turns
from tests.test_ray_executor import in_a_process_without_ray_address


async def left_running(queue: RunQueue, run_id: str) -> cf.QueuedRun:
    """The status of ``run_id`` once its worker no longer holds its lease; reads the
    queue every 20 ms, as ``cf.result`` does."""
    while True:
        [run] = [run for run in await cf.queue_status(queue) if run.run_id == run_id]
        if run.state != "running":
            return run
        await trio.sleep(0.02)


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


class ShownBadly:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


UNENCODABLE_RESULTS: dict[str, Any] = {
    "tuple-key": {(1, 2): "pair"},
    "bad-repr": [ShownBadly()],
}


@cf.node
async def _unencodable(ctx: cf.ExecutionContext) -> cf.Action:
    return cf.Action.complete(UNENCODABLE_RESULTS[ctx.params["which"]])


UNENCODABLE = cf.Flow.builder("unencodable").add_node("only", _unencodable).build()
"""Completes with a result JSON cannot hold at all (its store, with pickle, can)."""


async def test_a_result_json_cannot_hold_at_all_comes_back_shown_and_the_worker_goes_on(
    redis_server: RedisServer,
) -> None:
    queue = new_queue(redis_server)
    prefix = f"runs-{uuid.uuid4().hex[:8]}"

    def stores(run_id: str) -> cf.Storage:
        return cf.RedisStorage(redis_server.url, namespace=f"{prefix}/{run_id}", codec="pickle")

    async with worker(queue, stores, "w1", concurrency=1, flows=(UNENCODABLE,)):
        for which in UNENCODABLE_RESULTS:
            await cf.submit(queue, "unencodable", params={"which": which}, run_id=which)
        tuple_key = await cf.result(queue, "tuple-key")
        bad_repr = await cf.result(queue, "bad-repr")
    assert tuple_key.result == "{(1, 2): 'pair'}"
    assert bad_repr.result == "<cannot be shown: RuntimeError: no repr>"


def test_a_store_url_names_one_store_per_run_under_its_prefix() -> None:
    stores = per_run_redis("redis://:secret@host:7/2#jobs")
    assert (stores.url, stores.prefix) == ("redis://:secret@host:7/2", "jobs")
    assert repr(stores("r1")) == "RedisStorage('redis://:***@host:7/2', namespace='jobs/r1')"
    assert "secret" not in repr(stores)
    assert per_run_redis("rediss://host").prefix == "runs"
    with pytest.raises(ValueError, match="store 'file:x': expected redis://HOST"):
        per_run_redis("file:x")
    with pytest.raises(ValueError, match="store 'redis://:\\*\\*\\*@h:1/x': the path is not a"):
        per_run_redis("redis://:secret@h:1/x#jobs")


async def test_serve_refuses_an_empty_worker_name() -> None:
    async with cf.open_engine() as engine:
        with pytest.raises(ValueError, match="a worker's name must be a non-empty str, not ''"):
            await engine.serve("redis://127.0.0.1:1/q", [FLOW], "redis://127.0.0.1:1", name="")


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


def weird(record: dict[str, Any], run_id: str) -> dict[str, Any]:
    return {f"__cosmoflow__/runs/{run_id}": {"state": "weird"}}


def without_params(record: dict[str, Any], run_id: str) -> dict[str, Any]:
    del record["params"]
    return {f"__cosmoflow__/runs/{run_id}": record}


def garbage_place(record: dict[str, Any], run_id: str) -> dict[str, Any]:
    return {f"__cosmoflow__/parts/{run_id}/at/0": {"garbage": 1}}


def chunk_missing(record: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The record counts 1,024 more steps: a sealed path chunk the store lacks."""
    return {f"__cosmoflow__/runs/{run_id}": {**record, "steps": record["steps"] + 1024}}


@pytest.mark.parametrize(
    ("damage", "key", "problem"),
    [
        (weird, "runs/{}", "no valid run record under '{}': the record lacks 'run_id'"),
        (without_params, "runs/{}", "no valid run record under '{}': the record lacks 'params'"),
        (garbage_place, "parts/{}/at/0", "no valid place under '{}': the place lacks 'fork'"),
        (chunk_missing, "parts/{}/path/0", "no path chunk under '{}', which its record counts"),
    ],
    ids=["weird state", "a field missing", "a place of garbage", "a path chunk missing"],
)
async def test_a_run_whose_record_is_damaged_fails_once_naming_the_key(
    redis_server: RedisServer, damage: Any, key: str, problem: str
) -> None:
    """The run's record, a place or a path chunk is not what the engine writes: the
    data, not the store, is at fault, so the first worker to claim the run fails it
    with the DamagedRecordError naming the key (no worker takes it again), running
    nothing and leaving the key at fault as it was."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    run_id, storage = await failed_run(store, "damaged")
    key = f"__cosmoflow__/{key.format(run_id)}"
    await storage.open()
    record = await storage.get(f"__cosmoflow__/runs/{run_id}")
    for damaged, value in damage(record, run_id).items():
        await storage.set(damaged, value)
    await storage.commit()
    before = await written(storage, key)
    await storage.aclose()
    error = await failure_at_first_claim(queue, store, run_id)
    assert error.startswith(f"run {run_id!r} failed on worker w1: DamagedRecordError: ")
    assert problem.format(key) in error
    await storage.open()
    assert await written(storage, key) == before
    await storage.aclose()


async def test_a_claim_that_fails_reading_the_record_closes_the_runs_store(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The worker fails a run whose record holds a damaged place as it claims it, and
    closes the run's store before going on: its FileStorage (kept alive by the store
    factory) unlocks its files, which another instance then opens at once."""
    queue = new_queue(redis_server, lease=0.5)
    path = tmp_path / "run.json"
    run_id = "damaged-file"
    FAILURES[run_id] = 1
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError):
            await engine.run(FLOW, cf.FileStorage(path), run_id=run_id)
    storage = cf.FileStorage(path)
    await storage.open()
    await storage.set(f"__cosmoflow__/parts/{run_id}/at/0", {"garbage": 1})
    await storage.commit()
    await storage.aclose()
    given: list[cf.FileStorage] = []

    def stores(claimed: str) -> cf.Storage:
        given.append(cf.FileStorage(path))
        return given[-1]

    error = await failure_at_first_claim(queue, stores, run_id)
    assert "DamagedRecordError" in error
    assert len(given) == 1
    await storage.open()
    await storage.aclose()


async def test_a_run_whose_record_cannot_be_decoded_fails_once_naming_the_key(
    redis_server: RedisServer,
) -> None:
    """Another client wrote bytes that are not JSON over the run's record: the data, not
    the store, is at fault, so the first worker to claim the run fails it with the
    UnreadableValueError naming the key, and no worker takes it again."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    run_id, storage = await failed_run(store, "unreadable")
    key = f"__cosmoflow__/runs/{run_id}"
    with redis_server.client() as client:
        client.hset(f"cosmoflow:{storage.namespace}:data", key, b"{oops")
    error = await failure_at_first_claim(queue, store, run_id)
    assert error.startswith(f"run {run_id!r} failed on worker w1: UnreadableValueError: ")
    assert f"cannot read key {key!r}" in error


async def failed_run(store: str, name: str) -> tuple[str, cf.RedisStorage]:
    """A durable run of FLOW, failed at node "b" in its own store of ``store`` (see
    per_run_redis), and that store: the id is ``name`` and a random suffix."""
    run_id = f"{name}-{uuid.uuid4().hex[:6]}"
    storage = per_run_redis(store)(run_id)
    FAILURES[run_id] = 1
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError, match="node 'b' failed in exec"):
            await engine.run(FLOW, storage, run_id=run_id)
    return run_id, storage


async def failure_at_first_claim(
    queue: RunQueue, store: str | Callable[[str], cf.Storage], run_id: str
) -> str:
    """The error ``run_id``, submitted to the worker "w1", fails with; the queue must
    record it failed at its first attempt (no worker took it again)."""
    async with worker(queue, store, "w1"):
        await cf.submit(queue, "count", run_id=run_id)
        with trio.fail_after(10), pytest.raises(cf.CosmoFlowError) as info:
            await cf.result(queue, run_id)
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("failed", 1)
    return str(info.value)


async def written(storage: cf.Storage, key: str) -> dict[str, Any]:
    """What ``storage`` holds under ``key`` (None when nothing) and its keys that
    are not the engine's."""
    keys = [each for each in await storage.keys() if not each.startswith("__cosmoflow__/")]
    values = {each: await storage.get(each) for each in keys}
    return {**values, key: await value_or(storage, key, None)}


async def test_a_worker_refuses_two_flows_of_one_name() -> None:
    twin = cf.Flow.builder("count").add_node("a", Count()).build()
    async with cf.open_engine() as engine:
        with pytest.raises(ValueError, match="two flows are named 'count'"):
            await engine.serve("redis://127.0.0.1:1/q", [FLOW, twin], "redis://127.0.0.1:1")


class OnRay(cf.Node):
    executor = "ray"

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> int:
        return 1


@pytest.mark.ray
async def test_a_worker_that_cannot_reach_its_ray_cluster_raises_before_it_claims_a_run(
    redis_server: RedisServer,
) -> None:
    """Not a worker that fails, for its own setting, each run it claims."""
    pytest.importorskip("ray")
    flow = cf.Flow.builder("on_ray").add_node("r", OnRay()).build()
    queue, store = new_queue(redis_server), store_url(redis_server)
    run_id = await cf.submit(queue, "on_ray")
    address = f"127.0.0.1:{free_port()}"
    async with cf.open_engine(ray_address=address) as engine:
        with trio.fail_after(10), pytest.raises(ConnectionError) as info:
            await engine.serve(queue, [flow], store)
    assert str(info.value).startswith(f"cannot reach the Ray cluster at {address}: ")
    [status] = await cf.queue_status(queue)
    assert (status.run_id, status.state, status.attempts) == (run_id, "pending", 0)


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
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Another engine runs the run to its end while the worker is in step a: the
    worker's commit raises RunConflictError, so it records no outcome (the queue counts
    a second attempt), lets the lease go and logs why; the run's entry is taken over
    once idle for a lease, and gives the other engine's result. No step committed
    twice."""
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
    assert_dropped_once(caplog, "loser", "raced", "RunConflictError: run 'raced': another ")


def assert_dropped_once(
    caplog: pytest.LogCaptureFixture, name: str, run_id: str, error: str
) -> None:
    """Assert that worker ``name`` logged one warning, that it dropped ``run_id`` because
    its record moved on, with ``error`` in its description of the error."""
    [message] = [r.getMessage() for r in caplog.records if r.name == "cosmoflow_actors.queue"]
    dropped = f"worker {name} drops run {run_id!r}, to be taken over after a lease: "
    assert message.startswith(f"{dropped}its record has moved on ("), message
    assert error in message, message


class CommitsBetween(cf.RedisStorage):
    """A run's Redis store on which another engine commits one more step of the run
    (a turn of its ``turns`` released, the commit awaited on its ``events``) just
    before this store's first read of several keys; ``read`` is set once that read
    returned."""

    def __init__(
        self, url: str, namespace: str, turns: trio.Semaphore, events: cf.EventStream
    ) -> None:
        super().__init__(url, namespace=namespace)
        self.turns, self.events, self.read = turns, events, trio.Event()

    async def get_many(self, keys: Any) -> dict[str, Any]:
        if not self.read.is_set():
            self.turns.release()
            await commits(self.events, 1)
            found = await super().get_many(keys)
            self.read.set()
            return found
        return await super().get_many(keys)


async def test_a_claim_that_reads_places_after_another_engine_commits_drops_the_run(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Another engine runs a fan-out of the run, one commit at a time; a worker claims
    the run after its first step, and the other engine commits the second between the
    worker's read of the record and its read of the places. The worker drops the run
    (RunConflictError, logged) instead of failing it for a damaged place; the run's
    entry is taken over once idle for a lease and gives the other engine's result."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    stores = per_run_redis(store)
    turns = trio.Semaphore(1)
    async with cf.open_engine() as other, other.events(lossless=True) as events:
        run = await other.start_run(taking_turns(turns), stores("torn"), run_id="torn")
        await commits(events, 1)
        between = CommitsBetween(stores.url, f"{stores.prefix}/torn", turns, events)
        claimed = iter([between])
        flows = (taking_turns(None),)
        async with worker(queue, lambda run_id: next(claimed, stores(run_id)), "w", 1, flows):
            await cf.submit(queue, "turns", run_id="torn")
            await between.read.wait()
            dropped = await left_running(queue, "torn")
            for _ in range(4):
                turns.release()
            first = await run.wait()
            done = await cf.result(queue, "torn")
    assert (dropped.state, dropped.error) == ("orphaned", None)
    assert done.execution_path == first.execution_path
    assert set((await counts(store, "torn")).values()) == {1}
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("succeeded", 2)
    assert_dropped_once(caplog, "w", "torn", "while its record and its parts were read")


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


async def test_a_worker_whose_engine_closes_hands_its_run_back_and_raises(
    redis_server: RedisServer,
) -> None:
    """w1's serve runs outside its engine's block, which is cancelled while a run is in
    step a: w1 records no outcome for the run the close ended, hands it back and stops
    claiming, and serve raises RuntimeError. A run submitted afterwards waits, pending;
    w2 runs both, each step committed once (with a 60 s lease: the run handed back is
    taken over at once)."""
    queue, store = new_queue(redis_server, lease=60.0), store_url(redis_server)
    entered, release = trio.Event(), trio.Event()
    GATES["closing"] = (entered, release)
    closed = pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="^the engine is closed"))
    with trio.fail_after(10), closed:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as engine_block:
                async with cf.open_engine() as engine:
                    serve = functools.partial(engine.serve, name="w1")
                    await nursery.start(serve, queue, [FLOW], store)
                    await cf.submit(queue, "count", run_id="closing")
                    await entered.wait()
                    engine_block.cancel()
            await trio.sleep_forever()  # until serve raises
    [handed_back] = await cf.queue_status(queue)
    await cf.submit(queue, "count", run_id="later")
    async with worker(queue, store, "w2"):
        with trio.fail_after(5):
            done = [await cf.result(queue, run_id) for run_id in ("closing", "later")]
    assert (handed_back.state, handed_back.owner, handed_back.error) == ("orphaned", "w1", None)
    assert [(result.result, result.worker) for result in done] == [
        ("done closing", "w2"),
        ("done later", "w2"),
    ]
    attempts = {run.run_id: run.attempts for run in await cf.queue_status(queue)}
    assert attempts == {"closing": 2, "later": 1}
    for run_id in ("closing", "later"):
        assert await counts(store, run_id) == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}


async def test_a_run_whose_failure_the_queue_missed_stays_failed_when_taken_over(
    redis_server: RedisServer,
) -> None:
    """The run fails in step b and its store records it, but the queue does not answer
    the worker recording the failure (it goes on without, as after waiting out
    HAND_BACK_SECONDS): once the lease has expired the run is taken over and ends
    failed, with the error its record holds, naming the worker that ran it. Step b,
    which failed, does not run again: the queue does not retry a run by itself."""
    from cosmoflow_actors.runtime.queue.scripts import FINISH

    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    script = queue.script
    missed: list[Any] = []

    async def finish_missed_once(source: str, keys: list[str], args: list[Any]) -> Any:
        if source == FINISH and not missed:
            missed.append(args)
            raise StorageError(f"{queue!r}: no answer from the server")
        return await script(source, keys, args)

    queue.script = finish_missed_once  # type: ignore[method-assign]
    FAILURES["missed"] = 1
    async with worker(queue, store, "w1"):
        await cf.submit(queue, "count", run_id="missed")
        with trio.fail_after(10), pytest.raises(cf.CosmoFlowError) as failed:
            await cf.result(queue, "missed")
    assert str(failed.value).startswith(
        "run 'missed' failed on worker w1: NodeError: node 'b' failed in exec"
    )
    assert len(missed) == 1
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("failed", 2)
    assert await counts(store, "missed") == {"count": 1, "step:a": 1}


async def failed_on_the_queue(queue: RunQueue, store: str, run_id: str) -> None:
    """Run ``run_id`` on ``queue`` with a worker "w0" until it fails in step b (its
    record at a, failed), then requeue it."""
    FAILURES[run_id] = 1
    async with worker(queue, store, "w0"):
        await cf.submit(queue, "count", run_id=run_id)
        with trio.fail_after(10), pytest.raises(cf.CosmoFlowError, match="node 'b' failed"):
            await cf.result(queue, run_id)
    await cf.requeue(queue, run_id)


async def test_a_requeued_run_a_stopped_worker_hands_back_is_resumed_not_failed_again(
    redis_server: RedisServer,
) -> None:
    """A failed run is requeued, and w1 is stopped in step b, which failed before: the
    run's record still says it failed. w1 hands the run back marked to be resumed, so
    w2 resumes it at b instead of recording the old failure again."""
    queue, store = new_queue(redis_server, lease=60.0), store_url(redis_server)
    await failed_on_the_queue(queue, store, "again")
    entered = trio.Event()
    STUCK["again"] = entered
    async with worker(queue, store, "w1"):
        await entered.wait()
    storage = per_run_redis(store)("again")
    await storage.open()
    record = await storage.get("__cosmoflow__/runs/again")
    await storage.aclose()
    async with worker(queue, store, "w2"):
        with trio.fail_after(5):  # the lease would hold the run for 60 s
            done = await cf.result(queue, "again")
    assert (record["state"], record["owner"]["worker"]) == ("failed", "w1")
    assert (done.result, done.worker) == ("done again", "w2")
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("succeeded", 3)
    assert await counts(store, "again") == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}


_RAY_LOST_SCRIPT = """
import functools, sys, trio, ray
import cosmoflow_actors as cf
from tests.support import single
from tests.test_executor import Square

async def serving(engine, queue, flow, store, name, nursery):
    serve = functools.partial(engine.serve, queue, [flow], store, name=name)
    await nursery.start(serve)

async def main(url):
    queue, store = cf.RunQueue(url, "ray-lost", lease=30.0), url + "#ray-lost"
    async with cf.open_engine() as engine:
        try:
            async with trio.open_nursery() as nursery:
                await serving(engine, queue, single(Square(executor="ray")), store, "w1", nursery)
                ray.shutdown()  # as a Ray Client connection is once its cluster has gone
                await cf.submit(queue, "single", run_id="r", params={"n": 3})
        except BaseExceptionGroup as group:
            leaf = group
            while isinstance(leaf, BaseExceptionGroup):
                [leaf] = leaf.exceptions
            print(type(leaf).__name__, type(leaf.__cause__).__name__)
        [status] = await cf.queue_status(queue)
        print(status.state, status.attempts)
        async with trio.open_nursery() as nursery:
            await serving(engine, queue, single(Square(executor="inline")), store, "w2", nursery)
            done = await cf.result(queue, "r")
            print(done.result[0], done.worker)
            nursery.cancel_scope.cancel()

trio.run(main, sys.argv[1])
"""


@pytest.mark.ray
def test_a_worker_that_lost_its_ray_connection_stops_and_hands_its_run_back(
    redis_server: RedisServer,
) -> None:
    """Its serve raises the step's error, caused by the lost connection, instead of
    failing the run (and each run it would claim after it): the run, handed back, is
    taken over at once (within the 30 s lease) by the next worker, which finishes it."""
    pytest.importorskip("ray")
    done = in_a_process_without_ray_address(_RAY_LOST_SCRIPT, redis_server.url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "NodeError RayDisconnectedError",
        "orphaned 1",
        "9 w2",
    ]


def unreachable_at_first_claim(store: str) -> tuple[list[str], Callable[[str], cf.Storage]]:
    """The ids of the runs claimed, in order, and the stores of runs under ``store``,
    but for the first claim, which gets one on a port nothing listens on."""
    stores = per_run_redis(store)
    unreachable = per_run_redis(f"redis://127.0.0.1:{free_port()}/0")
    claims: list[str] = []

    def store_of(run_id: str) -> cf.Storage:
        claims.append(run_id)
        return unreachable(run_id) if len(claims) == 1 else stores(run_id)

    return claims, store_of


async def test_a_run_whose_store_is_out_of_reach_is_taken_over_not_failed(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The first claim gets a store on a port nothing listens on: the run is dropped
    (no outcome recorded, the worker logs why) and runs again once its entry has been
    idle for a lease."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    claims, store_of = unreachable_at_first_claim(store)

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


async def test_a_requeued_run_dropped_for_its_store_is_resumed_not_failed_again(
    redis_server: RedisServer,
) -> None:
    """A failed run is requeued, and the first claim after that gets a store on a port
    nothing listens on: the worker drops the run marked to be resumed, so the claim
    that takes it over after a lease resumes it at b instead of recording the old
    failure again."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    await failed_on_the_queue(queue, store, "dropped")
    claims, store_of = unreachable_at_first_claim(store)

    async with worker(queue, store_of, "w1"):
        with trio.fail_after(10):
            done = await cf.result(queue, "dropped")
    assert claims == ["dropped", "dropped"]
    assert (done.result, done.worker) == ("done dropped", "w1")
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("succeeded", 3)
    assert await counts(store, "dropped") == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}


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


async def test_a_worker_cut_off_from_redis_cancels_its_run_when_its_lease_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The renewals fail (nothing listens on the port): the run is cancelled once the
    lease the worker last got would have expired, not before."""
    from cosmoflow_actors.runtime.queue.worker import _Lease, _Worker

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


async def test_a_worker_cut_off_from_redis_logs_each_run_it_gives_up_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two runs whose leases expire a lease apart while the renewals fail: each is
    given up as its lease expires and logged once, with the renewals' error, the first
    though its lease stays with the worker (its task has not ended) for the renewals
    until the second expires. (On the real clock: an autojump clock would time the
    renewals out while their threads connect.)"""
    from cosmoflow_actors.runtime.queue.worker import _Lease, _Worker

    lease = 0.6
    queue = RunQueue(f"redis://127.0.0.1:{free_port()}/0", "cut-off", lease=lease)
    async with cf.open_engine() as engine:
        cut_off = _Worker(engine, queue, {"count": FLOW}, per_run_redis("redis://x"), "w")
        started = trio.current_time()
        scopes = [trio.CancelScope(), trio.CancelScope()]
        cut_off._leases["r1"] = _Lease(scopes[0], started + lease)
        cut_off._leases["r2"] = _Lease(scopes[1], started + 2 * lease)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_off.renew_leases)
            for scope in scopes:
                with scope:
                    await trio.sleep_forever()
            nursery.cancel_scope.cancel()
    logged = [r.getMessage() for r in caplog.records if r.name == "cosmoflow_actors.queue"]
    assert [message.split(":")[0] for message in logged] == [
        "worker w gives up run 'r1', to be taken over",
        "worker w gives up run 'r2', to be taken over",
    ]
    for message in logged:
        assert f"its lease expired unrenewed (the last renewal failed: {queue!r}: " in message


async def test_a_worker_gives_up_a_run_whose_lease_the_queue_no_longer_holds_for_it(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The server has no lease for the run (it expired there): the renewal gives the run
    up and logs it."""
    from cosmoflow_actors.runtime.queue.worker import _Lease, _Worker

    queue = new_queue(redis_server)
    async with cf.open_engine() as engine:
        lost = _Worker(engine, queue, {"count": FLOW}, per_run_redis("redis://x"), "w")
        scope = trio.CancelScope()
        lost._leases["r1"] = _Lease(scope, trio.current_time() + queue.lease)
        await lost._renew(dict(lost._leases))
    assert scope.cancel_called
    [message] = [r.getMessage() for r in caplog.records if r.name == "cosmoflow_actors.queue"]
    assert message == (
        f"worker w gives up run 'r1', to be taken over: {queue!r} no longer holds its lease for it"
    )


async def test_a_renewal_gives_up_no_run_that_ended_while_it_was_sent(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A run ends and its outcome is recorded, which drops its lease on the server; a
    renewal made before the run has left the worker's leases finds the lease gone but
    neither cancels nor logs the run as given up."""
    from cosmoflow_actors.runtime.queue.claims import Claim
    from cosmoflow_actors.runtime.queue.worker import Outcome, _Worker

    class RenewsAfterSettling(_Worker):
        async def _settle(self, claim: Claim, outcome: Outcome) -> None:
            await super()._settle(claim, outcome)
            self.renewed_leases = dict(self._leases)
            await self._renew(self.renewed_leases)

    queue = new_queue(redis_server)
    async with cf.open_engine() as engine:
        stores = per_run_redis(store_url(redis_server))
        worker = RenewsAfterSettling(engine, queue, {"count": FLOW}, stores, "w")
        await queue.ensure_group()
        await cf.submit(queue, "count", run_id="r1")
        await worker.run_claimed(await worker.claimer.next_claim(), trio.Semaphore(0))
    [lease] = worker.renewed_leases.values()
    assert not lease.scope.cancel_called
    assert not [r for r in caplog.records if r.name == "cosmoflow_actors.queue"]
    assert (await cf.result(queue, "r1")).result == "done r1"


async def test_a_lease_that_expires_while_its_run_records_its_outcome_gives_nothing_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The run has ended and its outcome is being recorded when its lease expires: it
    is neither renewed nor given up (nor logged as such), and the other run's expired
    lease is."""
    from cosmoflow_actors.runtime.queue.worker import _Lease, _Worker

    queue = RunQueue(f"redis://127.0.0.1:{free_port()}/0", "settling")
    async with cf.open_engine() as engine:
        worker = _Worker(engine, queue, {"count": FLOW}, per_run_redis("redis://x"), "w")
        now = trio.current_time()
        settling = _Lease(trio.CancelScope(), now - 1, settling=True)
        running = _Lease(trio.CancelScope(), now - 1)
        live = worker._unexpired({"r1": settling, "r2": running}, now)
    assert live == {}
    assert (settling.scope.cancel_called, running.scope.cancel_called) == (False, True)
    logged = [r.getMessage() for r in caplog.records if r.name == "cosmoflow_actors.queue"]
    assert [message.split(":")[0] for message in logged] == [
        "worker w gives up run 'r2', to be taken over"
    ]


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
    from cosmoflow_actors.runtime.queue.worker import _conflict, _out_of_reach

    first, second = ValueError("a"), KeyError("b")
    first.__cause__, second.__cause__ = second, first
    error = cf.NodeError("n", "exec", "r1", 1)
    error.__cause__ = first
    assert not _conflict(error)
    assert not _out_of_reach(error)
