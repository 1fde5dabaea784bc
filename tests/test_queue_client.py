"""The producer side of the run queue: RunQueue, submit, requeue and result, on a real
redis-server (one per module), each test on a queue of its own."""

from __future__ import annotations

import math
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.queue.client import RunQueue
from cosmoflow_actors.storage.redis import redacted
from tests.queue_support import FAILURES, FLOW, OTHER, counts, new_queue, store_url, worker
from tests.storage_suite import RedisServer, running_redis


async def test_a_queue_url_names_the_queue_by_its_last_path_part(
    redis_server: RedisServer,
) -> None:
    queue = RunQueue.from_url(f"{redis_server.url}/jobs")
    assert (queue.url, queue.name) == (redis_server.url, "jobs")
    with pytest.raises(ValueError, match="expected redis://HOST"):
        RunQueue.from_url("http://example/jobs")


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://h:1/2/q", "redis://h:1/2/q"),
        ("redis://:s3cret@h:1/q", "redis://:***@h:1/q"),
        ("redis://h:1/2/q?password=s3cret&ssl=1", "redis://h:1/2/q?password=***&ssl=1"),
        ("redis://h/q?client_name=a/b", "redis://h/q?client_name=a/b"),
    ],
)
def test_a_queue_address_is_its_url_with_the_password_masked(url: str, address: str) -> None:
    """The name goes in the path, before the query, which keeps any '/' of its own."""
    assert RunQueue.from_url(url).address == address


def test_a_queue_url_refused_shows_no_password() -> None:
    """A queue URL without its NAME is the likely slip: the error names the URL, and
    shows its password as ***."""
    for url in ("redis://:s3cret@h:6391", "redis://:s3/cret@h:6391/"):
        with pytest.raises(ValueError) as refused:
            RunQueue.from_url(url)
        assert "s3" not in str(refused.value)
        assert str(refused.value).startswith("queue 'redis://:***@h:6391")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://h:6379/jobs/extra", "the path before NAME is not a database number"),
        ("redis://h:6379/0/jobs/extra", "the path before NAME is not a database number"),
        ("redis://h:abc/jobs", "the server's URL 'redis://h:abc': the host or port"),
        ("redis://h/0/jobs#x", "the server's URL 'redis://h/0#x': a '#'"),
        ("redis//:s3cret@h/jobs", "expected"),
    ],
)
def test_a_queue_url_whose_path_or_port_is_wrong_is_refused(url: str, problem: str) -> None:
    """Not the queue of the last path part on database 0."""
    with pytest.raises(ValueError) as refused:
        RunQueue.from_url(url)
    message = str(refused.value)
    assert message.startswith(f"queue {redacted(url)!r}: {problem}")
    assert message.endswith("expected redis://HOST[:PORT][/DB]/NAME")
    assert "s3" not in message


def test_a_queue_refuses_a_server_url_that_is_no_redis_url() -> None:
    with pytest.raises(ValueError, match="RunQueue url 'redis://h/jobs': the path is not a"):
        RunQueue("redis://h/jobs", "q")


def test_a_queue_refuses_a_negative_flow_wait_and_an_endless_lease() -> None:
    with pytest.raises(ValueError, match="flow_wait must be >= 0 seconds, got -1"):
        RunQueue("redis://127.0.0.1:1/0", "q", flow_wait=-1)
    with pytest.raises(ValueError, match="lease must be a finite number of seconds"):
        RunQueue("redis://127.0.0.1:1/0", "q", lease=math.inf)


async def test_scripts_run_one_script_for_each_call_and_reply_in_order(
    redis_server: RedisServer,
) -> None:
    """The replies come in the order of the calls; a call the server refuses raises
    StorageError naming the queue and the server's error."""
    queue = new_queue(redis_server)
    source = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    calls = [([f"{queue.runs}:n{index}"], [index * 10]) for index in range(3)]
    assert await queue.scripts(source, calls) == [0, 10, 20]
    assert await queue.scripts(source, calls[1:]) == [20, 40]
    await queue.call("HSET", f"{queue.runs}:h", "a", "b")
    with pytest.raises(cf.StorageError, match=r"RunQueue\(.*WRONGTYPE") as refused:
        await queue.scripts(source, [*calls, ([f"{queue.runs}:h"], [1])])
    assert refused.value.__cause__ is not None


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


@pytest.mark.parametrize(
    ("params", "key"), [({"by_id": {1: "one"}}, "by_id"), ({"n": 1, "pair": (1, 2)}, "pair")]
)
async def test_submit_refuses_params_that_json_would_change(
    redis_server: RedisServer, params: dict[str, Any], key: str
) -> None:
    queue = new_queue(redis_server)
    with pytest.raises(ValueError, match=f"param '{key}' of run 'r1' would reach the worker"):
        await cf.submit(queue, "count", params=params, run_id="r1")
    with pytest.raises(ValueError, match=f"^param '{key}' would reach the worker"):
        await cf.submit(queue, "count", params=params)
    assert await queue.call("EXISTS", queue.stream, queue.runs) == 0


@pytest.mark.parametrize(("params", "key"), [({"n": "\ud800"}, "n"), ({"\udc80": 1}, "\udc80")])
async def test_submit_refuses_params_utf_8_cannot_encode(
    redis_server: RedisServer, params: dict[str, Any], key: str
) -> None:
    queue = new_queue(redis_server)
    with pytest.raises(ValueError) as info:
        await cf.submit(queue, "count", params=params, run_id="r1")
    assert str(info.value).startswith(f"param {key!r} of run 'r1' is not JSON: 'utf-8' codec")
    assert await queue.call("EXISTS", queue.stream, queue.runs) == 0


async def test_result_and_requeue_refuse_a_run_id_that_is_not_a_non_empty_str(
    redis_server: RedisServer,
) -> None:
    queue = new_queue(redis_server)
    for run_id in (None, ""):
        with pytest.raises(ValueError, match=f"run_id must be a non-empty str, not {run_id!r}"):
            await cf.result(queue, run_id)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=f"run_id must be a non-empty str, not {run_id!r}"):
            await cf.requeue(queue, run_id)  # type: ignore[arg-type]


BAD_POLLS: list[tuple[Any, str]] = [
    (-1, "poll must be > 0 seconds, got -1"),
    (0, "poll must be > 0 seconds, got 0"),
    (math.nan, "poll must be > 0 seconds, got nan"),
    ("x", "poll must be > 0 seconds, got 'x'"),
    (math.inf, "poll must be a finite number of seconds"),
]


async def test_result_refuses_a_poll_that_is_no_number_of_seconds(
    redis_server: RedisServer,
) -> None:
    """Before it reads the run: a finished run refuses it too, and an unknown one."""
    queue, store = new_queue(redis_server), store_url(redis_server)
    async with worker(queue, store, "w1"):
        await cf.submit(queue, "count", run_id="r1")
        assert (await cf.result(queue, "r1")).execution_path == ("a", "b", "c")
    for poll, message in BAD_POLLS:
        for run_id in ("r1", "nobody"):
            with pytest.raises(ValueError, match=re.escape(message)):
                await cf.result(queue, run_id, poll=poll)


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


async def test_a_queue_on_a_server_that_may_evict_any_key_is_refused(tmp_path: Path) -> None:
    """Submitting, reading and serving all refuse it, before anything is written."""
    with running_redis(tmp_path) as server, server.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
        queue = new_queue(server)
        with pytest.raises(cf.StorageError) as refused:
            await cf.submit(queue, "count", run_id="r1")
        with pytest.raises(cf.StorageError, match="maxmemory-policy is allkeys-lru"):
            await cf.queue_status(queue)
        async with cf.open_engine() as engine:
            with pytest.raises(cf.StorageError, match="maxmemory-policy is allkeys-lru"):
                await engine.serve(queue, (FLOW,), store_url(server))
        assert client.dbsize() == 0
    message = str(refused.value)
    assert message.startswith(f"{queue!r}: the server's maxmemory-policy is allkeys-lru, ")
    assert "its runs, stream and consumer group included" in message
    assert "set maxmemory-policy noeviction" in message


async def test_a_queue_on_a_server_that_evicts_only_keys_with_a_ttl_is_served(
    tmp_path: Path,
) -> None:
    with running_redis(tmp_path) as server, server.client() as client:
        client.config_set("maxmemory-policy", "volatile-lru")
        queue = new_queue(server)
        async with worker(queue, store_url(server), "w1"):
            await cf.submit(queue, "count", run_id="r1")
            done = await cf.result(queue, "r1")
    assert done.execution_path == ("a", "b", "c")


@pytest.mark.usefixtures("without_redis")
async def test_without_the_redis_package_the_error_names_the_extra() -> None:
    missing = r"RunQueue needs the redis package: pip install 'cosmoflow-actors\[redis\]'"
    with pytest.raises(cf.StorageError, match=missing):
        await RunQueue("redis://127.0.0.1:1", "q").ensure_group()
    with pytest.raises(cf.StorageError, match=missing):
        await cf.submit("redis://127.0.0.1:1/q", "flow")
