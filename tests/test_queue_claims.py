"""How a worker claims runs: new entries, runs whose lease expired (taken over from a
dead or stopped worker), entries it cannot read, runs whose flow it lacks, and an
outage of its queue; on real redis-servers."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.queue.client import RunQueue
from cosmoflow_actors.runtime.queue.worker import per_run_redis
from tests.queue_support import (
    BAD_ENTRIES,
    DEEP,
    FAILURES,
    FLOW,
    GATES,
    OTHER,
    Count,
    Warnings,
    counts,
    interrupted_in_b,
    killed,
    monitored,
    new_queue,
    pending_entry,
    persistent_redis,
    put_entry,
    shown_id,
    store_url,
    worker,
)
from tests.storage_suite import RedisServer, free_port


async def passed_over(queue: RunQueue, run_id: str) -> cf.QueuedRun:
    """The status of ``run_id`` once a worker has passed it over; reads the queue every
    20 ms, as ``cf.result`` does."""
    while True:
        for run in await cf.queue_status(queue):
            if run.run_id == run_id and run.passed_over:
                return run
        await trio.sleep(0.02)


@contextmanager
def logged() -> Iterator[Warnings]:
    """The warnings logged to ``cosmoflow_actors.queue`` while the block runs."""
    warnings = Warnings()
    logger = logging.getLogger("cosmoflow_actors.queue")
    logger.addHandler(warnings)
    try:
        yield warnings
    finally:
        logger.removeHandler(warnings)


async def good_run_after(queue: RunQueue) -> cf.QueuedResult:
    """Serve ``queue`` with a worker w1 until a run submitted now has succeeded: what
    is on the queue before it is claimed first. Returns its result."""
    async with worker(queue, f"{queue.url}#runs-{uuid.uuid4().hex[:8]}", "w1"):
        run_id = await cf.submit(queue, "count")
        with trio.fail_after(10):
            return await cf.result(queue, run_id)


@pytest.mark.parametrize("kind", BAD_ENTRIES)
async def test_a_worker_leaves_a_run_whose_queue_entry_it_cannot_read_and_goes_on(
    redis_server: RedisServer, kind: str
) -> None:
    """A run is on the queue with an entry no queue writes, then a good run: the
    worker acknowledges the bad one and logs it once, naming the queue, the run and
    the field at fault, and runs the good one; the status shows the bad one as
    unreadable, with the same reason."""
    run_id, data, why = BAD_ENTRIES[kind]
    queue = new_queue(redis_server)
    await put_entry(queue, run_id, data)
    with logged() as warnings:
        done = await good_run_after(queue)
    statuses = {run.run_id: run for run in await cf.queue_status(queue)}
    pending = await queue.call("XPENDING", queue.stream, "workers")
    bad = statuses[shown_id(run_id)]
    assert statuses[done.run_id].state == "succeeded"
    assert (bad.state, bad.flow_name) == ("unreadable", "")
    assert why in (bad.error or ""), bad.error
    assert pending["pending"] == 0
    [warning] = warnings.messages
    assert warning.startswith("worker w1 leaves the stream entry ") and f"{queue!r}: " in warning
    assert why in warning


async def test_result_raises_for_a_run_whose_entry_is_unreadable(
    redis_server: RedisServer,
) -> None:
    queue = new_queue(redis_server)
    await put_entry(queue, "garbled", "{")
    with pytest.raises(cf.UnreadableEntryError, match=r"the entry of run 'garbled' is not JSON"):
        await cf.result(queue, "garbled")


async def test_a_worker_taking_over_an_unreadable_run_whose_lease_expired_leaves_it(
    redis_server: RedisServer,
) -> None:
    """An unreadable run was delivered to a worker that died without acknowledging it:
    the next worker takes its entry over (its lease having expired), logs it,
    acknowledges it and goes on serving."""
    run_id, data, why = BAD_ENTRIES["attempts not an int"]
    queue = new_queue(redis_server)
    await put_entry(queue, run_id, data)
    [[_, [(entry_id, _)]]] = await queue.call(
        "XREADGROUP", "GROUP", "workers", "dead", "COUNT", 1, "STREAMS", queue.stream, ">"
    )
    await queue.call("XCLAIM", queue.stream, "workers", "dead", 0, entry_id, "IDLE", 60_000)
    with logged() as warnings:
        done = await good_run_after(queue)
    pending = await queue.call("XPENDING", queue.stream, "workers")
    assert done.result == f"done {done.run_id}"
    assert pending["pending"] == 0
    assert warnings.messages == [
        f"worker w1 leaves the stream entry {entry_id.decode()}: {queue!r}: the entry of run "
        f"'evil' was not written by a queue: {why}"
    ]


@pytest.mark.parametrize("flows", [(FLOW,), (OTHER,)], ids=["has the flow", "lacks it"])
async def test_a_run_whose_lease_key_holds_a_hash_fails_alone_and_runs_once_requeued(
    redis_server: RedisServer, flows: tuple[cf.Flow, ...]
) -> None:
    """Something wrote a hash at a run's lease key: no worker could ever take the lease
    (SET NX finds it held for ever). The first worker that claims the run, or passes
    it over, fails it naming the key and the queue, logs it and acknowledges its entry,
    and runs the next one; once the key is deleted, the run requeued runs."""
    queue, store = new_queue(redis_server), store_url(redis_server)
    await cf.submit(queue, "count", run_id="blocked")
    await queue.call("HSET", queue.lease_key("blocked"), "owner", "someone")
    why = (
        f"UnreadableEntryError: {queue!r}: the lease of run 'blocked' was not written by a "
        f"queue: its key {queue.lease_key('blocked')!r} holds a hash, not a string naming "
        "a worker"
    )
    async with worker(queue, store, "w1", flows=flows):
        with logged() as warnings, pytest.raises(cf.CosmoFlowError) as failed:
            with trio.fail_after(10):
                await cf.result(queue, "blocked")
        later = await cf.submit(queue, "other" if flows == (OTHER,) else "count")
        with trio.fail_after(10):
            await cf.result(queue, later)
        await queue.call("DEL", queue.lease_key("blocked"))
        await cf.requeue(queue, "blocked")
        async with worker(queue, store, "w2"):
            with trio.fail_after(10):
                done = await cf.result(queue, "blocked")
    assert str(failed.value) == f"run 'blocked' failed on worker w1: {why}"
    assert warnings.messages == [f"worker w1 fails run 'blocked': {why}"]
    assert done.result == "done blocked"


async def test_a_worker_acknowledges_a_stream_entry_without_a_run_id(
    redis_server: RedisServer,
) -> None:
    queue = new_queue(redis_server)
    await queue.ensure_group()
    entry_id = (await queue.call("XADD", queue.stream, "*", "other", "x")).decode()
    with logged() as warnings:
        done = await good_run_after(queue)
    pending = await queue.call("XPENDING", queue.stream, "workers")
    assert pending["pending"] == 0
    assert [run.run_id for run in await cf.queue_status(queue)] == [done.run_id]
    assert warnings.messages == [
        f"worker w1 leaves the stream entry {entry_id}: {queue!r}: the stream entry "
        f"{entry_id} names no run_id"
    ]


@pytest.mark.parametrize("delivery", ["new", "taken over"])
async def test_a_worker_acknowledges_a_stream_entry_whose_run_the_hash_lacks_and_warns(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, delivery: str
) -> None:
    """The stream names a run the queue's hash does not hold (deleted by hand, say):
    the worker that reads the entry, new or taken over from a dead worker, acknowledges
    it, logs a warning naming the run and the queue, and goes on serving."""
    queue = new_queue(redis_server)
    await queue.ensure_group()
    entry_id = (await queue.call("XADD", queue.stream, "*", "run_id", "ghost")).decode()
    if delivery == "taken over":
        await queue.call(
            "XREADGROUP", "GROUP", "workers", "dead", "COUNT", 1, "STREAMS", queue.stream, ">"
        )
        await queue.call("XCLAIM", queue.stream, "workers", "dead", 0, entry_id, "IDLE", 60_000)
    with caplog.at_level(logging.WARNING, logger="cosmoflow_actors.queue"):
        done = await good_run_after(queue)
    pending = await queue.call("XPENDING", queue.stream, "workers")
    assert pending["pending"] == 0
    assert [run.run_id for run in await cf.queue_status(queue)] == [done.run_id]
    assert [(record.name, record.levelno, record.getMessage()) for record in caplog.records] == [
        (
            "cosmoflow_actors.queue",
            logging.WARNING,
            f"worker w1 leaves the stream entry {entry_id}: {queue!r} holds no run 'ghost'",
        )
    ]


@pytest.mark.parametrize(
    "note", ["garbage", '{"since": "x", "by": 5}', '{"since": 1, "by": {"a": "b"}}', DEEP]
)
async def test_a_passed_over_note_no_queue_writes_is_replaced_by_the_next_pass(
    redis_server: RedisServer, note: str
) -> None:
    """A run's passed-over note is not what a queue writes: a worker lacking the run's
    flow (flow_wait=0) notes its pass afresh and fails the run for want of a worker,
    as it would without the note; it goes on serving."""
    queue = RunQueue(redis_server.url, f"q-{uuid.uuid4().hex[:8]}", flow_wait=0)
    await put_entry(queue, "left", pending_entry(flow='"no-such-flow"'))
    await queue.call("HSET", queue.passed, "left", note)
    done = await good_run_after(queue)
    statuses = {run.run_id: run for run in await cf.queue_status(queue)}
    assert statuses[done.run_id].state == "succeeded"
    assert (statuses["left"].state, statuses["left"].passed_over) == ("failed", ("w1",))
    assert "no worker took flow 'no-such-flow'" in (statuses["left"].error or "")


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


async def test_a_run_whose_flow_a_busy_worker_serves_is_not_failed_for_flow_wait(
    redis_server: RedisServer,
) -> None:
    """Worker A serves ``count`` with one slot, busy with a run held in its step a;
    worker B serves only ``other``. With flow_wait=0, B would fail a second run of
    ``count`` at its first pass over it, but A says it serves ``count``: B gives the
    run back, again and again, and A runs it once its slot is free."""
    queue = RunQueue(redis_server.url, f"q-{uuid.uuid4().hex[:8]}", flow_wait=0)
    store = store_url(redis_server)
    entered, release = trio.Event(), trio.Event()
    GATES["busy"] = (entered, release)
    async with worker(queue, store, "A", concurrency=1):
        await cf.submit(queue, "count", run_id="busy")
        await entered.wait()
        async with worker(queue, store, "B", flows=(OTHER,)):
            await cf.submit(queue, "count", run_id="waits")
            with trio.fail_after(10):
                waiting = await passed_over(queue, "waits")
            release.set()
            with trio.fail_after(10):
                done = await cf.result(queue, "waits")
    assert (waiting.state, waiting.passed_over) == ("pending", ("B",))
    assert (done.result, done.worker) == ("done waits", "A")
    assert await counts(store, "waits") == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}


async def test_a_run_whose_flow_no_live_worker_serves_fails_once_the_last_one_stopped(
    redis_server: RedisServer,
) -> None:
    """Worker A, the only one that serves ``count``, has stopped: what it said of the
    flows it serves expires a lease (0.3 s) after it last said it, and from then on
    worker B, which lacks ``count``, fails a run of it for flow_wait=0."""
    queue = RunQueue(redis_server.url, f"q-{uuid.uuid4().hex[:8]}", lease=0.3, flow_wait=0)
    store = store_url(redis_server)
    served = f"cosmoflow:queue:{queue.name}:flow:count"
    async with worker(queue, store, "A"):
        pass
    advertised = await queue.call("PTTL", served)
    async with worker(queue, store, "B", flows=(OTHER,)):
        await cf.submit(queue, "count", run_id="orphan")
        with trio.fail_after(10), pytest.raises(cf.CosmoFlowError) as failed:
            await cf.result(queue, "orphan")
    assert 0 < advertised <= 300
    assert "no worker took flow 'count' in " in str(failed.value)
    assert str(failed.value).endswith("(passed over by B; flow_wait=0 s)")


async def test_a_worker_of_a_shorter_lease_does_not_shorten_what_another_said_it_serves(
    redis_server: RedisServer,
) -> None:
    """Two workers serve ``count``, of leases 60 s and 1 s: the flow is said to be
    served for 60 s, whichever of them said so last."""
    from cosmoflow_actors.runtime.queue.claims import Claimer

    name = f"q-{uuid.uuid4().hex[:8]}"
    long, short = RunQueue(redis_server.url, name, lease=60), RunQueue(redis_server.url, name)
    await Claimer(long, {"count": FLOW}, "long", set()).advertise()
    await Claimer(short, {"count": FLOW}, "short", set()).advertise()
    served = f"cosmoflow:queue:{name}:flow:count"
    assert await long.call("GET", served) == b"long"
    assert await long.call("PTTL", served) > 10_000


async def test_a_run_finished_while_a_worker_fails_it_for_flow_wait_stays_finished(
    redis_server: RedisServer,
) -> None:
    """Worker A lacks the run's flow, which workers have passed over for longer than
    flow_wait: right after A has noted its pass over, and before it records the
    failure, worker B takes the run over and finishes it. A's failure then records
    nothing: the run stays succeeded."""
    from cosmoflow_actors.runtime.queue.scripts import EXPIRED, PASS_OVER, READ_NEW

    name, store = f"q-{uuid.uuid4().hex[:8]}", store_url(redis_server)
    lacking = RunQueue(redis_server.url, name, lease=0.3, flow_wait=1)
    having = RunQueue(redis_server.url, name, lease=0.3)
    passed, finished, back = trio.Event(), trio.Event(), trio.Event()
    call = lacking.call

    async def held_after_the_pass_over(*args: Any) -> Any:
        if passed.is_set() and not finished.is_set():
            await finished.wait()
        if finished.is_set() and (args[0] == "XREADGROUP" or args[1] in (EXPIRED, READ_NEW)):
            back.set()
        reply = await call(*args)
        if args[:2] == ("EVAL", PASS_OVER) and reply is not None:
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


CHANGED = (
    cf.Flow.builder("count")
    .add_node("a2", Count())
    .add_node("b", Count())
    .add_node("c", Count())
    .add_route("a2", "b")
    .add_route("b", "c")
    .build()
)
"""A new version of flow ``count``: its node ``a`` renamed ``a2``."""


async def orphaned_after_a(queue: RunQueue, store: str) -> tuple[str, Any]:
    """A run of ``count`` that a worker "dead" claimed and left in step b (its record
    at node a, whose step it committed), its lease to expire in 500 ms; its id and its
    record."""
    run_id = await cf.submit(queue, "count")
    await claimed_by_dead(queue, run_id)
    await interrupted_in_b(store, run_id)
    return run_id, await recorded(store, run_id)


async def recorded(store: str, run_id: str) -> Any:
    """The record of ``run_id`` in its store ``store``."""
    storage = per_run_redis(store)(run_id)
    await storage.open()
    try:
        return await storage.get(f"__cosmoflow__/runs/{run_id}")
    finally:
        await storage.aclose()


async def test_a_worker_whose_flow_no_longer_fits_an_orphan_leaves_it_to_one_whose_flow_does(
    redis_server: RedisServer,
) -> None:
    """A worker with a version of the flow without node a passes over an orphan whose
    record is at a, giving it back untouched (its entry, attempts and record as they
    were); a worker with the version that recorded it, started later, resumes it at b."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    run_id, record = await orphaned_after_a(queue, store)
    async with worker(queue, store, "new", flows=(CHANGED,)):
        with trio.fail_after(10):
            passed = await passed_over(queue, run_id)
        assert await recorded(store, run_id) == record
        async with worker(queue, store, "old"):
            with trio.fail_after(10):  # far less than flow_wait (60 s)
                done = await cf.result(queue, run_id)
    assert (passed.state, passed.owner, passed.attempts) == ("orphaned", "dead", 1)
    assert passed.passed_over == ("new",)
    assert done.worker == "old"
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts, status.passed_over) == ("succeeded", 2, ())
    assert await counts(store, run_id) == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}


async def test_a_worker_whose_flow_does_not_fit_claims_an_orphan_once_a_poll_at_most(
    redis_server: RedisServer,
) -> None:
    """A worker with all its slots free again once it gave the run back looks for
    expired leases a poll interval later (a third of the 0.6 s lease), not at once:
    in the 1.2 s of flow_wait it claims and gives back the run about 6 times, not
    hundreds."""
    queue = RunQueue(redis_server.url, f"q-{uuid.uuid4().hex[:8]}", lease=0.6, flow_wait=1.2)
    store = store_url(redis_server)
    run_id, _ = await orphaned_after_a(queue, store)
    async with monitored(redis_server) as monitor:
        async with worker(queue, store, "new", concurrency=1, flows=(CHANGED,)):
            with pytest.raises(cf.CosmoFlowError, match="no worker took it in"):
                await cf.result(queue, run_id)
        commands = monitor.commands
    given_back = [line for line in commands if '"XCLAIM"' in line and '"IDLE"' in line]
    assert 2 <= len(given_back) <= 12


async def test_an_orphan_no_worker_whose_flow_fits_takes_fails_after_flow_wait(
    redis_server: RedisServer,
) -> None:
    """With only workers whose flow does not fit its record, an orphan fails once they
    have passed it over for flow_wait, with the RunRecordedError saying what changed
    and what to do; its record stays as it was."""
    queue = RunQueue(redis_server.url, f"q-{uuid.uuid4().hex[:8]}", lease=0.5, flow_wait=0.3)
    store = store_url(redis_server)
    run_id, record = await orphaned_after_a(queue, store)
    async with worker(queue, store, "new", flows=(CHANGED,)):
        with pytest.raises(cf.CosmoFlowError) as info:
            await cf.result(queue, run_id)
    assert str(info.value).startswith(
        f"run {run_id!r} failed on worker new: RunRecordedError: run {run_id!r} is at node "
        "'a', which flow 'count' lacks (removed or renamed since the run was recorded): "
        "resume it with flow 'count' as it was when the run started (the version that "
        "recorded it); nothing ran and its record stays running (forget_run deletes a "
        "record only once its run has ended, as that resume does); no worker took it in "
    )
    assert str(info.value).endswith(" s (passed over by new; flow_wait=0.3 s)")
    waited = float(str(info.value).split("no worker took it in ")[1].split(" s")[0])
    assert waited >= 0.3
    [status] = await cf.queue_status(queue)
    assert (status.state, status.owner, status.attempts) == ("failed", "new", 1)
    assert status.passed_over == ("new",)
    assert await recorded(store, run_id) == record


async def test_an_orphan_a_worker_whose_flow_does_not_fit_refused_fails_whatever_is_served(
    redis_server: RedisServer,
) -> None:
    """Worker "new" serves a version of ``count`` that does not fit an orphan's record,
    and worker "lacks" serves only ``other``; both pass the orphan over. "new" says that
    it serves ``count``, but once it has refused the run that no longer holds the wait
    back: the run fails after flow_wait (1 s), its record left as it was."""
    queue = RunQueue(redis_server.url, f"q-{uuid.uuid4().hex[:8]}", lease=0.5, flow_wait=1)
    store = store_url(redis_server)
    run_id, record = await orphaned_after_a(queue, store)
    new = worker(queue, store, "new", flows=(CHANGED,))
    async with new, worker(queue, store, "lacks", flows=(OTHER,)):
        with trio.fail_after(10), pytest.raises(cf.CosmoFlowError, match="no worker took"):
            await cf.result(queue, run_id)
    [status] = await cf.queue_status(queue)
    assert status.state == "failed"
    assert "new" in status.passed_over
    assert await recorded(store, run_id) == record


async def test_an_expired_lease_is_taken_over_and_the_run_resumed_after_its_last_commit(
    redis_server: RedisServer,
) -> None:
    """A worker "dead" claimed the run and committed step a before it died in b; once
    its lease expires, a live worker takes the run over and resumes it at b."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    run_id = await cf.submit(queue, "count")
    await claimed_by_dead(queue, run_id)
    [status] = await cf.queue_status(queue)
    assert (status.state, status.owner) == ("running", "dead")
    assert status.lease_left is not None and 0 < status.lease_left <= 0.5
    await interrupted_in_b(store, run_id)
    async with worker(queue, store, "alive"):
        done = await cf.result(queue, run_id)
    assert done.worker == "alive"
    assert await counts(store, run_id) == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}
    [status] = await cf.queue_status(queue)
    assert (status.state, status.attempts) == ("succeeded", 2)


async def test_a_run_that_failed_on_a_dead_worker_is_taken_over_failed_not_run_again(
    redis_server: RedisServer,
) -> None:
    """A worker "dead" claimed the run, which failed in step b, was recorded failed in
    its store, and died before the queue recorded the failure. Once its lease expires,
    a live worker takes the run over and records the failure the record holds, running
    nothing (the queue does not retry a run by itself); requeued, the run resumes at
    b."""
    queue, store = new_queue(redis_server, lease=0.5), store_url(redis_server)
    run_id = await cf.submit(queue, "count")
    await claimed_by_dead(queue, run_id)
    FAILURES[run_id] = 1
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError, match="node 'b' failed in exec"):
            await engine.run(FLOW, per_run_redis(store)(run_id), run_id=run_id)
    async with worker(queue, store, "alive"):
        with trio.fail_after(10), pytest.raises(cf.CosmoFlowError) as failed:
            await cf.result(queue, run_id)
        [status] = await cf.queue_status(queue)
        stored = await counts(store, run_id)
        await cf.requeue(queue, run_id)
        with trio.fail_after(10):
            done = await cf.result(queue, run_id)
    assert str(failed.value).startswith(
        f"run {run_id!r} failed on worker alive: NodeError: node 'b' failed in exec"
    )
    assert (status.state, status.attempts) == ("failed", 2)
    assert stored == {"count": 1, "step:a": 1}
    assert done.worker == "alive"
    assert await counts(store, run_id) == {"count": 3, "step:a": 1, "step:b": 1, "step:c": 1}


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


@pytest.mark.parametrize("delivery", ["read new", "taken over"])
async def test_a_run_delivered_to_a_worker_stopped_in_the_round_trip_is_given_back_at_once(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, delivery: str
) -> None:
    """w1 is stopped while the reply to the round trip that delivered it a run is on its
    way (the run read new, or taken over from a dead worker whose lease expired): w1
    waits for the reply and gives the run's entry back, so w2 takes the run at once,
    not after the 60 s lease. The reply is held in w1's thread, once the server has
    answered, until w1 has been stopped."""
    from cosmoflow_actors.runtime.queue import client
    from cosmoflow_actors.runtime.queue.scripts import EXPIRED, READ_NEW

    queue, store = new_queue(redis_server, lease=60.0), store_url(redis_server)
    await cf.submit(queue, "count", run_id="late")
    if delivery == "taken over":
        reply = await queue.call(
            "XREADGROUP", "GROUP", "workers", "dead", "COUNT", 1, "STREAMS", queue.stream, ">"
        )
        [[_, [(entry_id, _)]]] = reply
        await queue.call("XCLAIM", queue.stream, "workers", "dead", 0, entry_id, "IDLE", 60_000)
    source = READ_NEW if delivery == "read new" else EXPIRED
    answered, release = trio.Event(), threading.Event()
    send = client.send_command

    def held_once_answered(connection: Any, *args: Any) -> Any:
        reply = send(connection, *args)
        if args[:2] == ("EVAL", source) and b"late" in reply and not release.is_set():
            trio.from_thread.run_sync(answered.set)
            release.wait()
        return reply

    monkeypatch.setattr(client, "send_command", held_once_answered)
    stop = trio.CancelScope()

    async def serve_w1() -> None:
        with stop:
            async with worker(queue, store, "w1"):
                await trio.sleep_forever()

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_w1)
                await answered.wait()
                stop.cancel()
                release.set()
    finally:
        release.set()
    async with worker(queue, store, "w2"):
        with trio.fail_after(5):  # the entry, left with w1, would wait out the lease
            done = await cf.result(queue, "late")
    assert (done.result, done.worker) == ("done late", "w2")


async def test_a_worker_logs_once_that_its_queue_is_out_of_reach_and_when_it_is_back(
    tmp_path: Path,
) -> None:
    """The outage's warning names the queue once, in the error that says why, which
    ends it (redis-py's ends in a full stop, which nothing follows)."""
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
                await warnings.wait_for("worker w1 cannot use ")
            server = await persistent_redis(tmp_path, port)
            with trio.fail_after(30):
                await warnings.wait_for("worker w1 uses RunQueue(")
    finally:
        logger.removeHandler(warnings)
        await killed(server)
    assert len(warnings.messages) == 2, warnings.messages
    outage, back = warnings.messages
    retrying = f"worker w1 cannot use its queue (trying again every 0.1 s): {queue!r}: "
    assert outage.startswith(retrying), outage
    assert outage.count("RunQueue(") == 1, outage
    assert back == f"worker w1 uses {queue!r} again"
