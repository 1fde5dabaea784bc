"""The read side of the run queue: queue_status, and durable runs' records checked
against their queue's leases (leases_checked), on a real redis-server."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.queue import status
from cosmoflow_actors.runtime.queue.client import RunQueue
from cosmoflow_actors.runtime.queue.status import leases_checked
from cosmoflow_actors.runtime.queue.worker import per_run_redis
from cosmoflow_actors.runtime.run_record import RunRecord
from tests.queue_support import (
    BAD_ENTRIES,
    DEEP,
    held_in_step_a,
    new_queue,
    pending_entry,
    put_entry,
    shown_id,
    store_url,
)
from tests.storage_suite import RedisServer


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


async def test_a_run_removed_while_the_status_is_read_is_left_out(
    redis_server: RedisServer,
) -> None:
    """A run's entry leaves the queue's hash (something else deleted it) after the
    status has listed the runs and before it reads their leases: the status leaves
    that run out and shows the others."""
    queue = new_queue(redis_server)
    for run_id in ("kept", "removed"):
        await cf.submit(queue, "count", run_id=run_id)
    read = queue.call

    async def removed_after_the_listing(*args: Any) -> Any:
        reply = await read(*args)
        if args[:2] == ("HGETALL", queue.runs):
            await read("HDEL", queue.runs, "removed")
        return reply

    queue.call = removed_after_the_listing  # type: ignore[method-assign]
    statuses = await cf.queue_status(queue)
    assert [(run.run_id, run.state) for run in statuses] == [("kept", "pending")]
    assert await queue.info("removed") is None


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


async def test_the_lease_of_a_run_of_a_queue_whose_url_has_a_query_is_read(
    redis_server: RedisServer,
) -> None:
    """A queue's address keeps its server URL's query (which may hold a '/') after the
    queue's name: the record of a run on it is checked against that queue's lease."""
    storage = per_run_redis(store_url(redis_server))("query")
    name = f"q-{uuid.uuid4().hex[:8]}"
    queue = RunQueue(f"{redis_server.url}?client_name=a/b&socket_timeout=5", name)
    await queue.call("SET", queue.lease_key("r1"), "w2", "PX", 5000)
    record = RunRecord("r1", "count", "running", "a", 1, "w1", queue.address)
    [checked] = await leases_checked(storage, [record])
    assert queue.address.endswith(f"/{name}?client_name=a/b&socket_timeout=5")
    assert (checked.state, checked.owner) == ("running", "w2")


@pytest.mark.parametrize("name", ["jobs#1", "jobs?x=1", "q%41", "a b é"])
async def test_a_running_run_of_a_queue_whose_name_its_url_escapes_is_listed_running(
    redis_server: RedisServer, name: str
) -> None:
    """The record's queue address percent-encodes the name, and the listing decodes it:
    it reads the lease of that queue, not of the queue named before a '#' or a '?'."""
    queue = RunQueue(redis_server.url, f"{name}-{uuid.uuid4().hex[:8]}", lease=10.0)
    store = store_url(redis_server)
    storage = per_run_redis(store)("odd")
    async with held_in_step_a(queue, store, "odd") as release:
        [listed] = await cf.list_runs(storage)
        release.set()
        await cf.result(queue, "odd")
    assert (listed.state, listed.owner, listed.queue) == ("running", "w1", queue.address)
    assert listed.lease_left is not None and 0 < listed.lease_left <= 10.0


@pytest.mark.parametrize("last", ["a%2Fb", "q%FF", ""])
async def test_a_record_whose_queue_address_names_no_queue_is_listed_as_it_is(
    redis_server: RedisServer, last: str
) -> None:
    """Its last part decodes to a name with '/', to no UTF-8, or to nothing: no queue's."""
    storage = per_run_redis(store_url(redis_server))("lost")
    record = RunRecord("r1", "count", "running", "a", 1, "w1", f"{redis_server.url}/{last}")
    assert await leases_checked(storage, [record]) == [record]


async def test_the_leases_are_read_a_batch_of_runs_to_a_round_trip(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five unfinished runs and one finished, leases read two runs to a round trip: each
    run gets its own lease, in the second batch as in the first, and a finished run's
    lease is not read."""
    monkeypatch.setattr(status, "BATCH", 2)
    queue = new_queue(redis_server)
    for index in range(6):
        await cf.submit(queue, "count", run_id=f"r{index}")
    await put_entry(queue, "r1", pending_entry(state='"running"', owner='"gone"'))
    await put_entry(queue, "r3", pending_entry(state='"running"', owner='"w2"'))
    await queue.call("SET", queue.lease_key("r3"), "w2", "PX", 5000)
    result = '{"value": 1, "final_action": "done", "path": ["a"], "duration": 0.5}'
    await put_entry(queue, "r5", pending_entry(state='"succeeded"', owner='"w1"', result=result))
    sizes: list[int] = []
    run_scripts = queue.scripts

    async def counted(source: str, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        sizes.append(len(calls))
        return await run_scripts(source, calls)

    queue.scripts = counted  # type: ignore[method-assign]
    statuses = await cf.queue_status(queue)
    assert [(run.run_id, run.state, run.owner) for run in statuses] == [
        ("r0", "pending", None),
        ("r1", "orphaned", "gone"),
        ("r2", "pending", None),
        ("r3", "running", "w2"),
        ("r4", "pending", None),
        ("r5", "succeeded", "w1"),
    ]
    assert sizes == [2, 2, 1]


async def test_the_leases_of_records_are_read_a_batch_of_runs_to_a_round_trip(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status, "BATCH", 2)
    storage = per_run_redis(store_url(redis_server))("batches")
    queue = new_queue(redis_server)
    await queue.call("SET", queue.lease_key("r3"), "w2", "PX", 5000)
    runs = [RunRecord(f"r{i}", "count", "running", "a", 1, "w1", queue.address) for i in range(5)]
    sizes: list[int] = []
    run_scripts = RunQueue.scripts

    async def counted(
        self: RunQueue, source: str, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        sizes.append(len(calls))
        return await run_scripts(self, source, calls)

    monkeypatch.setattr(RunQueue, "scripts", counted)
    checked = await leases_checked(storage, runs)
    assert sizes == [2, 2, 1]
    assert [(run.state, run.owner) for run in checked] == [("orphaned", "w1")] * 3 + [
        ("running", "w2"),
        ("orphaned", "w1"),
    ]


@pytest.mark.parametrize("kind", BAD_ENTRIES)
async def test_a_run_whose_entry_no_queue_writes_is_shown_unreadable_with_why(
    redis_server: RedisServer, kind: str
) -> None:
    run_id, data, why = BAD_ENTRIES[kind]
    queue = new_queue(redis_server)
    await put_entry(queue, run_id, data)
    good = await cf.submit(queue, "count")
    statuses = {run.run_id: run for run in await cf.queue_status(queue)}
    bad = statuses[shown_id(run_id)]
    assert statuses[good].state == "pending"
    assert (bad.state, bad.flow_name, bad.owner, bad.attempts) == ("unreadable", "", None, 0)
    assert (bad.error or "").startswith(f"{queue!r}: ")
    assert why in (bad.error or ""), bad.error


@pytest.mark.parametrize(
    ("note", "why"),
    [
        ("garbage", "is not JSON: Expecting value"),
        ('{"since": 5, "by": 5}', "its 'by' is 5, not a list of str"),
        ('{"since": "x", "by": []}', "its 'since' is 'x', not a finite number"),
        ('{"since": NaN, "by": []}', "its 'since' is nan, not a finite number"),
        (DEEP, "is JSON nested too deep"),
    ],
)
async def test_a_run_whose_passed_over_note_no_queue_writes_is_shown_unreadable(
    redis_server: RedisServer, note: str, why: str
) -> None:
    queue = new_queue(redis_server)
    await put_entry(queue, "left", pending_entry())
    await queue.call("HSET", queue.passed, "left", note)
    [status] = await cf.queue_status(queue)
    assert status.state == "unreadable"
    assert (status.error or "").startswith(f"{queue!r}: the passed-over note of run 'left' ")
    assert why in (status.error or ""), status.error


async def test_a_run_whose_lease_key_holds_a_hash_is_shown_unreadable_naming_the_key(
    redis_server: RedisServer,
) -> None:
    """Something wrote a hash at a run's lease key, where GET fails with WRONGTYPE: the
    status shows that run unreadable, naming the key and the queue, and the others as
    they are; a record of the run is listed as it is, its lease unread."""
    queue = new_queue(redis_server)
    await cf.submit(queue, "count", run_id="blocked")
    good = await cf.submit(queue, "count")
    await queue.call("HSET", queue.lease_key("blocked"), "owner", "someone")
    statuses = {run.run_id: run for run in await cf.queue_status(queue)}
    record = RunRecord("blocked", "count", "running", "a", 1, "w1", queue.address)
    listed = await leases_checked(per_run_redis(store_url(redis_server))("blocked"), [record])
    assert statuses[good].state == "pending"
    assert (statuses["blocked"].state, statuses["blocked"].error) == (
        "unreadable",
        f"{queue!r}: the lease of run 'blocked' was not written by a queue: its key "
        f"{queue.lease_key('blocked')!r} holds a hash, not a string naming a worker",
    )
    assert listed == [record]
