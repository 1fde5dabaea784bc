"""The run queue's Lua scripts on a real redis-server: a worker's lease is its own, so
renewing, recording an outcome, handing a run back and giving a claim back touch only
the leases the caller holds."""

from __future__ import annotations

from cosmoflow_actors.runtime.queue.client import GROUP
from cosmoflow_actors.runtime.queue.scripts import (
    ADVERTISE,
    CLAIM,
    FINISH,
    HAND_BACK,
    RENEW,
    UNCLAIM,
)
from tests.queue_support import new_queue
from tests.storage_suite import RedisServer


async def test_renew_extends_only_the_leases_the_caller_holds(redis_server: RedisServer) -> None:
    queue = new_queue(redis_server)
    mine, theirs, gone = (queue.lease_key(run_id) for run_id in ("mine", "theirs", "gone"))
    await queue.call("SET", mine, "w1", "PX", 1000)
    await queue.call("SET", theirs, "w2", "PX", 1000)

    held = await queue.script(RENEW, [mine, theirs, gone], ["w1", 60_000])

    assert held == [1, 0, 0]
    assert await queue.call("PTTL", mine) > 1000
    assert 0 < await queue.call("PTTL", theirs) <= 1000
    assert await queue.call("EXISTS", gone) == 0


async def test_finish_and_hand_back_leave_a_lease_another_worker_holds(
    redis_server: RedisServer,
) -> None:
    """A worker whose lease another worker has taken records no outcome and hands
    nothing back: the hash, the lease and the pending entry stay as they are."""
    queue = new_queue(redis_server)
    await queue.ensure_group()
    entry_id = await queue.call("XADD", queue.stream, "*", "run_id", "r1")
    await queue.call("XREADGROUP", "GROUP", GROUP, "w2", "STREAMS", queue.stream, ">")
    await queue.call("HSET", queue.runs, "r1", '{"state": "running"}')
    await queue.call("SET", queue.lease_key("r1"), "w2", "PX", 60_000)

    finished = await queue.script(
        FINISH,
        [queue.lease_key("r1"), queue.runs, queue.stream],
        ["w1", "r1", '{"state": "succeeded"}', GROUP, entry_id],
    )
    handed_back = await queue.script(
        HAND_BACK, [queue.lease_key("r1"), queue.stream], ["w1", GROUP, entry_id, 60_000]
    )

    assert (finished, handed_back) == (0, 0)
    assert await queue.call("HGET", queue.runs, "r1") == b'{"state": "running"}'
    assert await queue.call("GET", queue.lease_key("r1")) == b"w2"
    pending = await queue.call("XPENDING", queue.stream, GROUP)
    assert (pending["pending"], pending["consumers"]) == (1, [{"name": b"w2", "pending": 1}])


async def test_unclaim_puts_back_the_entry_and_note_a_claim_forgot_if_the_lease_is_ours(
    redis_server: RedisServer,
) -> None:
    """CLAIM returns the passed-over note it forgets; UNCLAIM by another worker leaves
    everything as it is, and by the claimer drops its lease and puts back the run's
    entry as read and that note."""
    queue = new_queue(redis_server)
    keys = [queue.lease_key("r1"), queue.runs, queue.passed, queue.stream]
    read, running, note = b'{"state": "pending"}', b'{"state": "running"}', b'{"by": ["x"]}'
    await queue.call("HSET", queue.runs, "r1", read)
    await queue.call("HSET", queue.passed, "r1", note)

    taken = await queue.script(CLAIM, keys, ["w1", 60_000, "r1", read, running, GROUP, "0-1"])
    assert (taken, await queue.call("HEXISTS", queue.passed, "r1")) == (note, 0)
    back_args = ["r1", running, read, note]
    assert await queue.script(UNCLAIM, keys[:3], ["w2", *back_args]) == 0
    assert await queue.call("HGET", queue.runs, "r1") == running
    assert await queue.call("GET", queue.lease_key("r1")) == b"w1"

    assert await queue.script(UNCLAIM, keys[:3], ["w1", *back_args]) == 1
    assert await queue.call("HGET", queue.runs, "r1") == read
    assert await queue.call("HGET", queue.passed, "r1") == note
    assert await queue.call("EXISTS", queue.lease_key("r1")) == 0


async def test_advertise_never_shortens_what_another_worker_said(
    redis_server: RedisServer,
) -> None:
    """A flow's key lives as long as the longest lease of the workers serving it: a
    worker of a shorter lease renews no key that lives longer already."""
    queue = new_queue(redis_server)
    short, long_lived, new = (queue.flow_key(name) for name in ("short", "long", "new"))
    await queue.call("SET", short, "w2", "PX", 1000)
    await queue.call("SET", long_lived, "w2", "PX", 600_000)

    await queue.script(ADVERTISE, [short, long_lived, new], [60_000, "w1"])

    assert 1000 < await queue.call("PTTL", short) <= 60_000
    assert await queue.call("PTTL", long_lived) > 60_000
    assert await queue.call("GET", long_lived) == b"w2"
    assert 0 < await queue.call("PTTL", new) <= 60_000
    assert await queue.call("GET", new) == b"w1"
