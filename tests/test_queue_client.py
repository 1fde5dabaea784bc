"""The producer side of the run queue: RunQueue, submit, requeue and result, on a real
redis-server (one per module), each test on a queue of its own."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import uuid
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.queue.client import MAX_LEASE, RunQueue
from cosmoflow_actors.runtime.queue.entries import MAX_DEPTH
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
        ("redis://h/0/jobs#x", "a '#', which no queue URL has (write one in NAME"),
        ("redis://h/jobs%FF", "NAME 'jobs%FF' is not percent-encoded UTF-8"),
        ("redis://h/a%2Fb", "a queue name must be a non-empty str without '/', not 'a/b'"),
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


@pytest.mark.parametrize("lease", [MAX_LEASE * 1.01, 1e10, 1e300])
def test_a_queue_refuses_a_lease_longer_than_a_week_when_made(lease: float) -> None:
    """Not at its first call, where a socket's timeout of three leases overflows."""
    message = f"lease must be a finite number of seconds up to 604800 (a week), got {lease!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        RunQueue("redis://127.0.0.1:1/0", "q", lease=lease)
    with pytest.raises(ValueError, match=re.escape(message)):
        RunQueue.from_url("redis://127.0.0.1:1/0/q", lease=lease)


async def test_a_queue_whose_lease_is_a_week_runs_its_runs(redis_server: RedisServer) -> None:
    queue = RunQueue(redis_server.url, f"q-{uuid.uuid4().hex[:8]}", lease=MAX_LEASE)
    async with worker(queue, store_url(redis_server), "w1"):
        await cf.submit(queue, "count", run_id="r1")
        assert (await cf.result(queue, "r1")).execution_path == ("a", "b", "c")
        [status] = await cf.queue_status(queue)
    assert status.state == "succeeded"


ODD_NAMES = ["jobs#1", "jobs?x=1", "50%", "q%41", "a b", "é", "tab\there", ":@!$&;="]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_a_queue_name_a_url_path_cannot_hold_as_it_is_round_trips_through_its_address(
    name: str,
) -> None:
    """The address percent-encodes it, and from_url decodes it: the same queue, with a
    password and a query on the server's URL too."""
    for url in ("redis://h:1", "redis://:s3cret@h:1/2?ssl_cert_reqs=none"):
        queue = RunQueue(url, name)
        assert "#" not in queue.address
        again = RunQueue.from_url(queue.address.replace("***", "s3cret"))
        assert (again.url, again.name, again.stream) == (queue.url, name, queue.stream)


def test_a_queue_address_leaves_the_characters_a_path_holds_as_they_are() -> None:
    assert RunQueue("redis://h:1", "in-v_o.ices~2:eu@x").address == "redis://h:1/in-v_o.ices~2:eu@x"
    assert RunQueue("redis://h:1", "jobs#1").address == "redis://h:1/jobs%231"
    assert RunQueue.from_url("redis://h:1/caf%C3%A9").name == "café"
    assert RunQueue.from_url("redis://h:1/café").name == "café"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "a queue name must be a non-empty str without '/', not ''"),
        ("a/b", "a queue name must be a non-empty str without '/', not 'a/b'"),
        ("q\ud800", "queue name 'q\\ud800' cannot be encoded as UTF-8"),
    ],
)
def test_a_queue_refuses_a_name_its_keys_cannot_hold(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RunQueue("redis://h:1", name)


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


@pytest.mark.parametrize(
    ("first", "second"),
    [(1, True), (0, False), (1, 1.0), ([1], [True]), ({"a": 0.0}, {"a": -0.0})],
)
async def test_resubmitting_params_equal_in_python_but_not_as_json_is_refused(
    redis_server: RedisServer, first: Any, second: Any
) -> None:
    """The worker would get the first ones: ``1`` where the second submit said ``True``."""
    queue = new_queue(redis_server)
    await cf.submit(queue, "count", run_id="r1", params={"flag": first})
    with pytest.raises(ValueError, match=r"run 'r1' is on .* already, as flow 'count' with"):
        await cf.submit(queue, "count", run_id="r1", params={"flag": second})
    stored = await queue.call("HGET", queue.runs, "r1")
    assert json.loads(stored)["params"] == {"flag": first}
    assert await queue.call("XLEN", queue.stream) == 1


async def test_resubmitting_params_whose_keys_come_in_another_order_adds_nothing(
    redis_server: RedisServer,
) -> None:
    queue = new_queue(redis_server)
    await cf.submit(queue, "count", run_id="r1", params={"a": 1, "b": {"c": 2, "d": [1.5]}})
    await cf.submit(queue, "count", run_id="r1", params={"b": {"d": [1.5], "c": 2}, "a": 1})
    assert await queue.call("XLEN", queue.stream) == 1


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


def nested(depth: int) -> Any:
    """``1`` in ``depth`` lists, one in the other, the innermost in a dict."""
    value: Any = {"x": 1} if depth else 1
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 985, 995, 100_000])
async def test_submit_refuses_a_param_nested_deeper_than_a_worker_reads(
    redis_server: RedisServer, depth: int
) -> None:
    """As deep as Python's recursion limit or deeper (where json raises RecursionError),
    or a level past MAX_DEPTH: ValueError naming the param, nothing submitted."""
    queue = new_queue(redis_server)
    deep = f"nests lists and objects more than {MAX_DEPTH} deep, past what a worker reads"
    with pytest.raises(ValueError, match=f"^param 'v' of run 'r1' {deep}$"):
        await cf.submit(queue, "count", params={"n": 1, "v": nested(depth)}, run_id="r1")
    with pytest.raises(ValueError, match=f"^param 'v' {deep}$"):
        await cf.submit(queue, "count", params={"v": nested(depth)})
    assert await queue.call("EXISTS", queue.stream, queue.runs) == 0


@cf.node
async def _echo(ctx: cf.ExecutionContext) -> cf.Action:
    return cf.Action.complete(ctx.params["v"])


ECHO = cf.Flow.builder("echo").add_node("echo", _echo).build()
"""Completes with its param ``v``."""


async def test_a_param_nested_as_deep_as_submit_takes_reaches_the_worker(
    redis_server: RedisServer,
) -> None:
    queue = new_queue(redis_server)
    value = nested(MAX_DEPTH)
    async with worker(queue, store_url(redis_server), "w1", flows=(ECHO,)):
        await cf.submit(queue, "echo", params={"v": value}, run_id="r1")
        assert (await cf.result(queue, "r1")).result == value


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


class Tier(enum.IntEnum):
    GOLD = 1


@dataclasses.dataclass
class Point:
    x: int


ODD_RESULT = {
    "decimal": Decimal("1.5"),
    "set": {1, 2},
    "date": date(2024, 1, 2),
    "point": Point(1),
    "bytes": b"x",
    "tuple": (1, 2),
    "tier": Tier.GOLD,
    "by_id": {1: "one", None: "none"},
    "inf": math.inf,
    "in_list": [Decimal("2")],
}


@cf.node
async def _odd(ctx: cf.ExecutionContext) -> cf.Action:
    return cf.Action.complete(ODD_RESULT)


ODD = cf.Flow.builder("odd").add_node("odd", _odd).build()
"""Completes with ODD_RESULT, which JSON cannot hold as it is."""


async def test_a_result_json_cannot_hold_comes_back_as_docs_say(
    redis_server: RedisServer,
) -> None:
    """As docs/distributed.md says: cf.result gives the repr of what JSON has no type
    for, and the JSON of the rest; the run's store keeps the value (here with pickle)."""
    queue = new_queue(redis_server)
    prefix = f"runs-{uuid.uuid4().hex[:8]}"

    def stores(run_id: str) -> cf.Storage:
        return cf.RedisStorage(redis_server.url, namespace=f"{prefix}/{run_id}", codec="pickle")

    async with worker(queue, stores, "w1", flows=(ODD,)):
        await cf.submit(queue, "odd", run_id="r1")
        done = await cf.result(queue, "r1")
    assert done.result == {
        "decimal": "Decimal('1.5')",
        "set": "{1, 2}",
        "date": "datetime.date(2024, 1, 2)",
        "point": "Point(x=1)",
        "bytes": "b'x'",
        "tuple": [1, 2],
        "tier": 1,
        "by_id": {"1": "one", "null": "none"},
        "inf": math.inf,
        "in_list": ["Decimal('2')"],
    }
    async with cf.open_engine() as engine:
        recorded = await engine.resume(ODD, stores("r1"), run_id="r1")
    assert recorded.result == ODD_RESULT


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
