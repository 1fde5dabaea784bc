"""Tests for :mod:`cosmoflow_actors.storage.redis`, against a real redis-server."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import signal
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.runtime import run_record
from cosmoflow_actors.storage import redis as redis_backend
from cosmoflow_actors.storage.base import PARTS_PREFIX, RECORD_PREFIX, RESERVED_PREFIX
from cosmoflow_actors.storage.redis import (
    MAX_CONNECTIONS,
    READ_BATCH,
    URL_FORMS,
    RedisStorage,
    redacted,
    shared_client,
)
from tests.storage_suite import (
    RedisServer,
    foreign_key_fails_only_what_meets_it,
    free_port,
    running_redis,
    thread_calls,
    unique_namespace,
)
from tests.support import (
    CHILDREN_ON_THE_BRANCHES,
    Recorder,
    batch_flow_twice_in_a_loop,
    batch_flows_on_two_branches,
    single,
)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that reconfigure or stop it."""
    with running_redis(tmp_path) as server:
        yield server


async def test_two_clients_racing_updates_lose_nothing(redis_server: RedisServer) -> None:
    namespace = unique_namespace()
    first, second = redis_server.storage(namespace), redis_server.storage(namespace)

    async def increment(storage: RedisStorage) -> None:
        for _ in range(300):
            await storage.update("n", lambda n: n + 1, 0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(increment, first)
        nursery.start_soon(increment, second)

    assert await redis_server.storage(namespace).get("n") == 600


async def test_update_starts_again_when_another_client_writes_in_between(
    redis_server: RedisServer,
) -> None:
    storage = redis_server.storage()
    await storage.set("n", 1)
    await storage.commit()
    seen: list[int] = []

    def add_ten(n: int) -> int:
        seen.append(n)
        if len(seen) == 1:  # another client writes after the read, before the commit
            with redis_server.client() as other:
                other.hset(f"cosmoflow:{storage.namespace}:data", "n", b"100")
        return n + 10

    assert await storage.update("n", add_ten, 0) == 110
    assert seen == [1, 100]
    assert await storage.get("n") == 110


def other_client_sets(storage: RedisStorage, server: RedisServer, key: str, data: bytes) -> None:
    """Another client stores ``data`` (encoded) under ``key`` in ``storage``'s namespace."""
    with server.client() as other:
        other.hset(f"cosmoflow:{storage.namespace}:data", key, data)


async def test_an_update_does_not_start_again_when_another_client_writes_another_key(
    redis_server: RedisServer,
) -> None:
    """Its commit expects only the key it read: other keys' writes cost it nothing."""
    storage = redis_server.storage()
    seen: list[int] = []

    def add_one(n: int) -> int:
        seen.append(n)
        other_client_sets(storage, redis_server, "other", b"7")
        return n + 1

    assert await storage.update("n", add_one, 0) == 1
    assert seen == [0]
    assert {key: await storage.get(key) for key in ("n", "other")} == {"n": 1, "other": 7}


async def test_a_step_applies_its_updates_again_only_when_a_key_it_read_changed(
    redis_server: RedisServer,
) -> None:
    """While the step's update of "n" runs, another client writes "other" (the step
    commits at once), then, in a second step, "n" (the update runs again on the value
    written)."""
    storage = redis_server.storage()
    record_key = RECORD_PREFIX + "r"
    await storage.set(record_key, {"steps": 0, "path": []})
    await storage.commit()
    seen: list[int] = []

    def add_ten_while(key: str, data: bytes) -> Callable[[int], int]:
        def add_ten(n: int) -> int:
            seen.append(n)
            if len(seen) in (1, 2):
                other_client_sets(storage, redis_server, key, data)
            return n + 10

        return add_ten

    for steps, key in enumerate(["other", "n"]):
        update = ("update", "n", (add_ten_while(key, b"100"), 0))
        record = {"steps": steps + 1, "path": ["x"] * (steps + 1)}
        assert await storage.commit_step([update], record_key, record, steps)

    assert seen == [0, 10, 100]
    assert await storage.get("n") == 110


async def test_a_step_of_sets_reads_its_record_again_only_when_another_client_changed_it(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another client writes between the record's check and the script: another key
    (the step commits at once), then the record itself, counting the step as done (the
    step reads the record again and is refused: another engine committed it)."""
    storage = redis_server.storage()
    record_key = RECORD_PREFIX + "r"
    await storage.set(record_key, {"steps": 0, "path": []})
    await storage.commit()
    checks: list[int] = []
    check_steps = redis_backend.check_steps
    writes = [("other", b"1"), (record_key, json.dumps({"steps": 2, "path": ["x", "y"]}).encode())]

    def write_after_check(key: str, stored: Any, steps_before: int) -> None:
        check_steps(key, stored, steps_before)
        checks.append(steps_before)
        if len(checks) <= len(writes):
            other_client_sets(storage, redis_server, *writes[len(checks) - 1])

    monkeypatch.setattr(redis_backend, "check_steps", write_after_check)
    first, second = {"steps": 1, "path": ["x"]}, {"steps": 2, "path": ["x", "b"]}
    assert await storage.commit_step([("set", "a", 1)], record_key, first, 0)
    with pytest.raises(cf.RunConflictError, match="counts 2 steps"):
        await storage.commit_step([("set", "b", 2)], record_key, second, 1)

    assert checks == [0, 1]
    assert await storage.get("a") == 1
    assert not await storage.contains("b")


async def test_a_step_that_clears_starts_again_when_another_client_adds_a_key_meanwhile(
    redis_server: RedisServer,
) -> None:
    """A clear removes every user key, so the step watches the whole hash: a key added
    while its update runs makes it start again, and that key is cleared too."""
    storage = redis_server.storage()
    record_key = RECORD_PREFIX + "r"
    await storage.set(record_key, {"steps": 0, "path": []})
    await storage.set("old", 1)
    await storage.commit()
    seen: list[int] = []

    def add_one(n: int) -> int:
        seen.append(n)
        if len(seen) == 1:
            other_client_sets(storage, redis_server, "late", b"2")
        return n + 1

    ops = [("clear", "", None), ("update", "n", (add_one, 0))]
    assert await storage.commit_step(ops, record_key, {"steps": 1, "path": ["x"]}, 0)

    assert seen == [0, 0]
    assert sorted(await storage.keys()) == sorted([record_key, "n"])


async def test_a_forget_reads_the_record_again_when_another_client_changed_it_meanwhile(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process resumes the failed run "r" (its record now says "running") after
    the forget checked the record and before its commit: the forget reads the record
    again, finds the run running, and refuses; the record stays. (Deleted unguarded,
    the record of the running run was gone.)"""
    storage = redis_server.storage()
    checked: list[str] = []
    require_ended = run_record.require_ended

    def resumed_elsewhere_once_checked(key: str, record: Any, states: Any) -> None:
        require_ended(key, record, states)
        checked.append(record["state"])
        if len(checked) == 1:
            running = json.dumps({**record, "state": "running"})
            with redis_server.client() as other:
                other.hset(f"cosmoflow:{storage.namespace}:data", key, running)

    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError):
            await engine.run(single(cf.node(lambda ctx: 1 / 0)), storage, run_id="r")
        monkeypatch.setattr(run_record, "require_ended", resumed_elsewhere_once_checked)
        with pytest.raises(cf.RunRecordedError, match="'r' is recorded as running"):
            await engine.forget_run(storage, "r")
        runs = await engine.list_runs(storage)

    assert checked == ["failed"]
    assert [(run.run_id, run.state) for run in runs] == [("r", "running")]


UPDATER = textwrap.dedent(
    """
    import sys, trio
    from cosmoflow_actors.storage.redis import RedisStorage

    async def main(url, namespace, count):
        storage = RedisStorage(url, namespace=namespace)
        for _ in range(count):
            await storage.update("n", lambda n: n + 1, 0)
        await storage.aclose()

    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
    """
)


async def test_updates_from_two_processes_are_atomic(redis_server: RedisServer) -> None:
    namespace = unique_namespace()
    command = [sys.executable, "-c", UPDATER, redis_server.url, namespace, "300"]

    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(partial(trio.run_process, command, check=True))

    assert await redis_server.storage(namespace).get("n") == 600


async def test_update_commits_the_writes_staged_before_it(redis_server: RedisServer) -> None:
    storage = redis_server.storage()
    await storage.set("a", 1)
    await storage.delete("missing")

    await storage.update("n", lambda n: n + 1, 0)

    assert await redis_server.storage(storage.namespace).get("a") == 1
    await storage.commit()  # nothing left to send


async def test_a_failing_update_function_stores_nothing(redis_server: RedisServer) -> None:
    storage = redis_server.storage()
    await storage.set("a", 1)

    with pytest.raises(ZeroDivisionError):
        await storage.update("n", lambda n: n / 0, 0)

    other = redis_server.storage(storage.namespace)
    assert await other.keys() == []
    await storage.commit()
    assert await other.keys() == ["a"]


async def test_staged_writes_are_invisible_to_other_clients_until_commit(
    redis_server: RedisServer,
) -> None:
    storage = redis_server.storage()
    other = redis_server.storage(storage.namespace)
    await storage.set("a", 1)
    await storage.clear()
    await storage.set("b", 2)

    assert await other.size() == 0
    assert await storage.keys() == ["b"]
    await storage.commit()
    assert await other.keys() == ["b"]


async def test_namespaces_keep_data_apart(redis_server: RedisServer) -> None:
    names = [unique_namespace(), "tenant:a", "tenant:a:data", "tenant"]
    stores = [redis_server.storage(name) for name in names]
    for index, storage in enumerate(stores):
        await storage.set("key", index)
        await storage.set(f"only-{index}", True)
        await storage.commit()

    await stores[0].clear()
    await stores[0].commit()

    assert [await storage.size() for storage in stores] == [0, 2, 2, 2]
    assert [await storage.get("key") for storage in stores[1:]] == [1, 2, 3]
    with redis_server.client() as client:
        client.delete(*(f"cosmoflow:{name}:{part}" for name in names for part in ("data", "meta")))


async def test_values_are_readable_json_and_the_codec_is_recorded(
    redis_server: RedisServer,
) -> None:
    storage = redis_server.storage()
    await storage.set("a", {"b": [1, "c"]})
    await storage.commit()

    with redis_server.client() as client:
        assert client.hget(f"cosmoflow:{storage.namespace}:data", "a") == b'{"b":[1,"c"]}'
        assert client.hgetall(f"cosmoflow:{storage.namespace}:meta") == {
            b"format": b"cosmoflow-store",
            b"version": b"1",
            b"codec": b"json",
            b"index": b"1",
        }


NAMESPACE_KEYS = ("data", "meta", "index")
"""What follows ``cosmoflow:<namespace>:`` in the Redis keys of a namespace."""
OLD_META = {"format": "cosmoflow-store", "version": "1", "codec": "json"}
"""The metadata of a namespace written before the index of reserved keys."""


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda c, n: c.set(f"cosmoflow:{n}:data", "x"), "string without cosmoflow metadata"),
        (lambda c, n: c.hset(f"cosmoflow:{n}:data", "k", "v"), "without cosmoflow metadata"),
        (lambda c, n: c.set(f"cosmoflow:{n}:meta", "x"), r":meta holds a string, not a hash$"),
        (lambda c, n: c.rpush(f"cosmoflow:{n}:meta", "x"), r":meta holds a list, not a hash$"),
        (lambda c, n: c.hset(f"cosmoflow:{n}:meta", "format", "other"), "format 'other'"),
        (
            lambda c, n: c.hset(f"cosmoflow:{n}:meta", mapping=OLD_META),
            r":meta records no index, not '1': the namespace was written by another version",
        ),
        (
            lambda c, n: c.hset(f"cosmoflow:{n}:meta", mapping={**OLD_META, "index": "2"}),
            "records index layout '2', not '1'",
        ),
        (lambda c, n: c.set(f"cosmoflow:{n}:index", "x"), ":index holds a string, not the sorted"),
    ],
)
async def test_data_written_by_someone_else_is_refused_and_left_alone(
    redis_server: RedisServer, setup: Any, message: str
) -> None:
    namespace = unique_namespace()
    with redis_server.client() as client:
        setup(client, namespace)
        before = [client.dump(f"cosmoflow:{namespace}:{part}") for part in NAMESPACE_KEYS]

        with pytest.raises(cf.StorageError, match=message):
            await redis_server.storage(namespace).open()

        after = [client.dump(f"cosmoflow:{namespace}:{part}") for part in NAMESPACE_KEYS]
        assert after == before


async def test_a_metadata_key_that_is_no_hash_is_refused_naming_it(
    redis_server: RedisServer,
) -> None:
    namespace = unique_namespace()
    storage = redis_server.storage(namespace)
    with redis_server.client() as client:
        client.set(f"cosmoflow:{namespace}:meta", "x")

        with pytest.raises(cf.StorageError) as info:
            await storage.open()

        assert client.get(f"cosmoflow:{namespace}:meta") == b"x"
    assert str(info.value) == f"{storage!r}: cosmoflow:{namespace}:meta holds a string, not a hash"


async def test_an_unreachable_server_is_a_storage_error_at_open() -> None:
    storage = RedisStorage(f"redis://127.0.0.1:{free_port()}/0", timeout=5)

    with pytest.raises(cf.StorageError, match=r"127\.0\.0\.1"):
        await storage.open()
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError):
            await engine.start_run(single(cf.node(lambda ctx: None)), storage)
        assert (await engine.run(single(cf.node(lambda ctx: None)), {})).success


async def test_a_bad_namespace_or_pool_option_is_refused() -> None:
    with pytest.raises(cf.StorageError, match=r"not a Redis URL: .*max_connections"):
        await RedisStorage("redis://127.0.0.1:1/0?max_connections=-1").open()
    with pytest.raises(ValueError, match="namespace"):
        RedisStorage("redis://127.0.0.1/0", namespace="")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("not a url", "not a redis://, rediss:// or unix:// URL"),
        ("http://:s3cret@h", "not a redis://, rediss:// or unix:// URL"),
        ("redis:h:6379", "not a redis://, rediss:// or unix:// URL"),
        ("redis//:s3cret@h:1", "not a redis://, rediss:// or unix:// URL"),
        ("redis://h:abc", "the host or port cannot be read"),
        ("redis://h:70000/0", "the host or port cannot be read"),
        ("redis://h:/0", "a ':' without a port"),
        ("redis://h:6379/seven", "the path is not a database number"),
        ("redis://h:6379/1/2", "the path is not a database number"),
        ("redis://:s3/cret@h:6379/0", "the host or port cannot be read"),
        ("redis://:s3#cret@h/0", "a '#'"),
        ("redis://h/0#billing", "a '#'"),
        ("redis://h/0?db=one", "an option redis-py cannot read: Invalid value for "),
        ("unix://redis.sock", "no socket path"),
    ],
)
def test_a_url_that_is_no_redis_url_is_refused_when_the_storage_is_made(
    url: str, problem: str
) -> None:
    """Rather than at open, or never: a database that is not a number would be 0."""
    with pytest.raises(ValueError) as refused:
        RedisStorage(url)
    message = str(refused.value)
    assert message.startswith(f"RedisStorage url {redacted(url)!r}: {problem}")
    assert message.endswith("expected " + URL_FORMS)
    assert "s3" not in message


def test_an_option_redis_py_refuses_is_chained_from_its_error() -> None:
    with pytest.raises(ValueError) as refused:
        RedisStorage("redis://h/0?socket_timeout=soon")
    # redis-py's own words (its quotes around the name differ between versions)
    assert re.search("Invalid value for .socket_timeout.", str(refused.value.__cause__))
    with pytest.raises(TypeError, match="RedisStorage url must be a str, not bytes"):
        RedisStorage(b"redis://h")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "redis://h",
        "redis://h/",
        "REDIS://h:6379/2",
        "rediss://u:p%40w@h:6380/15",
        "redis://[::1]:6379/0",
        "redis:///3",
        "redis://h/0?db=4&max_connections=8",
        "unix:///run/redis.sock?db=1",
    ],
)
def test_every_form_of_redis_url_is_taken(url: str) -> None:
    assert RedisStorage(url).url == url


async def test_a_refused_commit_fails_the_writing_run_only(private_redis: RedisServer) -> None:
    storage = private_redis.storage()

    @cf.node
    async def write(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set(ctx.params["key"], ctx.params["value"])

    flow = single(write)
    with private_redis.client() as client:
        async with cf.open_engine() as engine:
            await engine.run(flow, storage, params={"key": "kept", "value": 1})
            client.config_set("maxmemory", 1)  # every write is now refused (OOM)
            with pytest.raises(cf.NodeError) as info:
                await engine.run(flow, storage, params={"key": "lost", "value": 2})
            assert isinstance(info.value.__cause__, cf.StorageError)
            assert "maxmemory" in str(info.value.__cause__)
            client.config_set("maxmemory", 0)
            await engine.run(flow, storage, params={"key": "later", "value": 3})

    assert sorted(await private_redis.storage(storage.namespace).keys()) == ["kept", "later"]


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
async def test_a_server_that_may_evict_any_key_is_refused_and_nothing_written(
    private_redis: RedisServer, policy: str
) -> None:
    storage = private_redis.storage()
    with private_redis.client() as client:
        client.config_set("maxmemory-policy", policy)
        with pytest.raises(cf.StorageError) as refused:
            await storage.open()
        with pytest.raises(cf.StorageError, match=f"maxmemory-policy is {policy}"):
            await storage.set("k", 1)  # checked again: the first check connected nothing
        assert client.dbsize() == 0
    message = str(refused.value)
    assert message.startswith(f"{storage!r}: the server's maxmemory-policy is {policy}, ")
    assert "its namespace's data, metadata and index included" in message
    assert "set maxmemory-policy noeviction" in message
    assert "or a volatile-* policy" in message


async def test_a_server_that_evicts_only_keys_with_a_ttl_is_accepted(
    private_redis: RedisServer,
) -> None:
    storage = private_redis.storage()
    with private_redis.client() as client:
        client.config_set("maxmemory-policy", "volatile-lru")
        await storage.set("k", 1)
        await storage.commit()
        assert client.ttl(f"cosmoflow:{storage.namespace}:data") == -1  # never evicted
    assert await private_redis.storage(storage.namespace).get("k") == 1


async def test_a_server_whose_info_does_not_say_its_policy_is_accepted(
    private_redis: RedisServer,
) -> None:
    """A user that may not run INFO cannot read the policy: the storage works as if
    the server said noeviction."""
    with private_redis.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.acl_setuser("no-info", enabled=True, passwords=["+pw"], keys=["*"])
        client.execute_command("ACL", "SETUSER", "no-info", "+@all", "-info")
    url = f"redis://no-info:pw@127.0.0.1:{private_redis.port}/0"
    storage = RedisStorage(url, namespace=unique_namespace())
    with pytest.raises(redis.exceptions.NoPermissionError), redis.Redis.from_url(url) as limited:
        limited.info("memory")
    await storage.set("k", 1)
    await storage.commit()
    assert await RedisStorage(url, namespace=storage.namespace).get("k") == 1


async def test_the_policy_is_checked_again_when_the_instance_connects_again(
    private_redis: RedisServer,
) -> None:
    storage = private_redis.storage()
    await storage.open()
    with private_redis.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
    await storage.set("k", 1)
    await storage.commit()  # checked once per connection: not now
    await storage.aclose()
    with pytest.raises(cf.StorageError, match="maxmemory-policy is allkeys-lru"):
        await storage.get("k")


async def test_a_server_that_went_away_fails_commits(private_redis: RedisServer) -> None:
    storage = private_redis.storage(timeout=5)
    await storage.set("a", 1)
    await storage.commit()
    private_redis.process.terminate()
    private_redis.process.wait()

    await storage.set("b", 2)
    with pytest.raises(cf.StorageError):
        await storage.commit()
    with pytest.raises(cf.StorageError):
        await storage.get("a")


async def test_aclose_drops_staged_writes_and_reconnects_on_use(redis_server: RedisServer) -> None:
    storage = redis_server.storage()
    await storage.set("a", 1)
    await storage.commit()
    await storage.set("b", 2)

    await storage.aclose()

    assert await storage.keys() == ["a"]
    await storage.aclose()


def connections_received(server: RedisServer) -> int:
    """How many connections the server has accepted so far, this call's own included."""
    with server.client() as client:
        return int(client.info("stats")["total_connections_received"])


async def test_instances_on_one_server_share_its_connections(redis_server: RedisServer) -> None:
    """Twenty namespaces used one after the other take turns on one connection of the
    process's pool (a pool of their own: no other test uses their timeout)."""
    before = connections_received(redis_server)
    for n in range(20):
        storage = redis_server.storage(timeout=7.25)
        await storage.set("n", n)
        await storage.commit()
        assert await storage.get("n") == n
        await storage.aclose()
    assert connections_received(redis_server) - before == 2  # the pool's one, and this count


async def test_calls_beyond_the_pool_size_wait_for_a_connection(redis_server: RedisServer) -> None:
    """Thirty runs' updates at once, each on a namespace of its own, on a pool of four
    connections (the URL says so; no other test uses it): all succeed, and the server
    accepts no more than the pool's four connections (which the pool keeps open)."""
    url = f"{redis_server.url}?max_connections=4"
    storages = [RedisStorage(url, namespace=unique_namespace()) for _ in range(30)]
    before = connections_received(redis_server)
    async with trio.open_nursery() as nursery:
        for storage in storages:
            nursery.start_soon(storage.update, "n", lambda n: n + 1, 0)
    assert connections_received(redis_server) - before <= 4 + 1  # and this count
    assert [await storage.get("n") for storage in storages] == [1] * 30


def connected_clients(server: RedisServer) -> int:
    """How many clients the server has connected now, this call's own included."""
    with server.client() as client:
        return int(client.info("clients")["connected_clients"])


async def test_clients_of_many_timeouts_keep_at_most_max_clients_connected(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store for each of ten timeouts (a timeout computed per run), one after the
    other: past MAX_CLIENTS (3 here), the client used longest ago is let go, and its
    connection closes once the collector frees it: the process holds three more
    connections at most, not ten."""
    monkeypatch.setattr(redis_backend, "MAX_CLIENTS", 3)
    before = connected_clients(redis_server)
    for index in range(10):
        storage = redis_server.storage(timeout=70 + index / 8)  # pools no other test uses
        await storage.set("n", index)
        await storage.commit()
        await storage.aclose()
    gc.collect()
    assert connected_clients(redis_server) - before <= 3
    assert len(redis_backend._clients) <= 3


def test_a_pool_opens_at_most_max_connections_unless_its_url_says_otherwise(
    redis_server: RedisServer,
) -> None:
    default = shared_client(redis_server.url, 3.5, "test").connection_pool
    assert default.max_connections == MAX_CONNECTIONS
    url = f"{redis_server.url}?max_connections=7"
    assert shared_client(url, 3.5, "test").connection_pool.max_connections == 7


def test_threads_asking_at_once_for_a_new_pool_share_one(redis_server: RedisServer) -> None:
    """Sixteen threads (as many trio runs of ``flow.run_sync``) asking at once for the
    client of a URL and timeout not used before all get the same one, and so share
    one pool of at most ``max_connections``. With a switch interval of 1 µs, most of
    the twenty rounds made more than one pool before they shared."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for round_ in range(20):
            timeout = 60.0 + round_ / 8  # a pool of its own: no other test uses it
            clients = clients_asked_at_once(redis_server.url, timeout, 16)
            assert len({id(client) for client in clients}) == 1, f"round {round_}"
    finally:
        sys.setswitchinterval(saved)


def clients_asked_at_once(url: str, timeout: float, workers: int) -> list[redis.Redis]:
    """What ``workers`` threads get from ``shared_client``, released together (blocks
    until all have it)."""
    start = threading.Barrier(workers)
    clients: list[redis.Redis] = []

    def ask() -> None:
        start.wait()
        clients.append(shared_client(url, timeout, "test"))

    threads = [threading.Thread(target=ask) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients


async def test_a_call_answered_while_the_trio_thread_was_blocked_past_its_deadline_succeeds(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers, then the trio thread wakes only after the call's deadline
    (as when someone's code blocked it): the call returns the answer, and the next call
    is sent (no server fell silent)."""
    storage = redis_server.storage(timeout=5)
    await storage.set("x", 1)
    await storage.commit()
    answer = redis_backend.send_command

    def answered_then_late(connection: Any, *args: Any) -> Any:
        reply = answer(connection, *args)
        mock_clock.jump(60)  # trio sees the answer 60 s after the deadline
        return reply

    monkeypatch.setattr(redis_backend, "send_command", answered_then_late)
    assert await storage.get("x") == 1
    monkeypatch.undo()
    assert await storage.get("x") == 1


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@127.0.0.1:1/0", "redis://user:***@127.0.0.1:1/0"),
        ("redis://127.0.0.1:1/0?password=s3cret", "redis://127.0.0.1:1/0?password=***"),
        (
            "rediss://user@127.0.0.1:1/0?db=0&password=s3cret&ssl_password=s3cret",
            "rediss://user@127.0.0.1:1/0?db=0&password=***&ssl_password=***",
        ),
        (
            "unix://:s3cret@/run/redis.sock?password=s3cret",
            "unix://:***@/run/redis.sock?password=***",
        ),
    ],
)
async def test_a_password_in_the_url_never_shows(url: str, shown: str) -> None:
    storage = RedisStorage(url, namespace="n", timeout=1)

    assert repr(storage) == f"RedisStorage({shown!r}, namespace='n')"
    with pytest.raises(cf.StorageError) as info:
        await storage.open()
    assert "s3cret" not in str(info.value)
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError) as failed:
            await engine.list_runs(storage)
    assert "s3cret" not in str(failed.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://alice:pw@h/0", "redis://alice:***@h/0"),
        ("rediss://u:p%40w@h:6380/2", "rediss://u:***@h:6380/2"),
        # Not percent-encoded: a parser takes "/", "?" or "#" for the end of the host.
        ("redis://:pa/ss@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://:pa?ss@h/0", "redis://:***@h/0"),
        ("redis://:pa#ss@h/0", "redis://:***@h/0"),
        ("redis://alice:p@ss:w/rd@h/0", "redis://alice:***@h/0"),
        # Mistyped: one slash, no slash, no colon after the scheme, a missing name.
        ("redis:/:pw@h", "redis:/:***@h"),
        ("redis:pw@h", "redis:***@h"),
        ("redis//:pw@h:1", "***@h:1"),
        ("re dis://pw@h", "***@h"),
        ("redis://h/0?password=p@w", "redis://***@w"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redacted_shows_no_part_of_a_password_however_the_url_is_written(
    url: str, shown: str
) -> None:
    assert redacted(url) == shown


def test_redacted_hides_the_value_of_every_query_parameter_naming_a_password() -> None:
    assert redacted("redis://h/0?db=1&PassWord=a&x%5Fpassword=b&password&p=c") == (
        "redis://h/0?db=1&PassWord=***&x%5Fpassword=***&password&p=c"
    )


# --- a server that stops answering ---------------------------------------------------------

TIMEOUT = 1.0
"""The ``timeout`` of the storages these tests freeze the server under."""
BOUND = TIMEOUT * 1.5 + 0.25
"""How long a call may take to fail, in real seconds: the timeout with room to spare
for a busy machine, yet short of two timeouts."""


def freeze(server: RedisServer) -> None:
    """Stop the server's process (SIGSTOP): its port still accepts connections, but
    nothing answers."""
    os.kill(server.process.pid, signal.SIGSTOP)


@contextmanager
def resumed_at_exit(server: RedisServer) -> Iterator[None]:
    """Let the server's process go on (SIGCONT) at exit, whether it was stopped or not."""
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def time_to_fail(call: Callable[[], Awaitable[Any]]) -> tuple[type[BaseException], float]:
    """The error ``call()`` raises (or ``type(None)``) and how many seconds it took."""
    start = trio.current_time()
    try:
        await call()
    except Exception as exc:
        return type(exc), trio.current_time() - start
    return type(None), trio.current_time() - start


async def connected(server: RedisServer, namespace: str, **values: Any) -> RedisStorage:
    """A storage over ``namespace`` that has connected and committed ``values``."""
    storage = server.storage(namespace, timeout=TIMEOUT)
    for key, value in values.items():
        await storage.set(key, value)
    await storage.commit()
    return storage


async def test_every_call_fails_within_the_timeout_when_the_server_stops_answering(
    private_redis: RedisServer,
) -> None:
    namespace = unique_namespace()
    await connected(private_redis, namespace, n=1)
    record_key = RECORD_PREFIX + "r"

    async def staged_then_commit(storage: RedisStorage) -> None:
        await storage.set("m", 2)
        await storage.commit()

    calls: dict[str, Callable[[RedisStorage], Awaitable[Any]]] = {
        "get": lambda storage: storage.get("n"),
        "contains": lambda storage: storage.contains("n"),
        "keys": lambda storage: storage.keys(),
        "size": lambda storage: storage.size(),
        "delete": lambda storage: storage.delete("n"),
        "commit": staged_then_commit,
        "update": lambda storage: storage.update("n", lambda n: n + 1, 0),
        "commit_step": lambda storage: storage.commit_step(
            [("set", "a", 1)], record_key, {"steps": 1, "path": ["x"]}, 0
        ),
    }
    storages = {name: await connected(private_redis, namespace) for name in calls}
    shared = await connected(private_redis, namespace)
    fresh = private_redis.storage(namespace, timeout=TIMEOUT)
    outcomes: dict[str, tuple[type[BaseException], float]] = {}

    async def record(name: str, call: Callable[[], Awaitable[Any]]) -> None:
        outcomes[name] = await time_to_fail(call)

    with resumed_at_exit(private_redis):
        freeze(private_redis)
        async with trio.open_nursery() as nursery:
            for name, call in calls.items():
                nursery.start_soon(record, name, partial(call, storages[name]))
            nursery.start_soon(record, "open (connecting)", fresh.open)
            nursery.start_soon(record, "get, first of two", partial(shared.get, "n"))
            nursery.start_soon(record, "get, second of two", partial(shared.get, "n"))

    assert {name: error for name, (error, _) in outcomes.items()} == dict.fromkeys(
        [*calls, "open (connecting)", "get, first of two", "get, second of two"], cf.StorageError
    )
    slow = {name: seconds for name, (_, seconds) in outcomes.items() if seconds >= BOUND}
    assert slow == {}, f"timeout={TIMEOUT}: these calls took too long"
    await trio.sleep(TIMEOUT)  # an instance sends no call for TIMEOUT s after a silent one
    assert await shared.get("n") in (1, 2)  # it connects afresh once the server answers
    for storage in [*storages.values(), shared, fresh]:
        await storage.aclose()


async def test_calls_queued_in_a_store_actor_fail_within_one_timeout_of_a_silent_server(
    private_redis: RedisServer,
) -> None:
    """Eight runs' reads queue in the actor of one storage, which sends them one after
    another: the first waits out the timeout, the others are not sent, and all have
    failed within one timeout; once the server answers again, so does the storage."""
    storage = await connected(private_redis, unique_namespace(), n=1)
    outcomes: dict[int, tuple[type[BaseException], float]] = {}
    async with cf.open_engine() as engine, engine.open_store(storage) as store:

        async def read(index: int) -> None:
            outcomes[index] = await time_to_fail(partial(store.get, "n"))

        with resumed_at_exit(private_redis):
            freeze(private_redis)
            async with trio.open_nursery() as nursery:
                for index in range(8):
                    nursery.start_soon(read, index)
        assert {error for error, _ in outcomes.values()} == {cf.StorageError}
        assert max(seconds for _, seconds in outcomes.values()) < BOUND
        with pytest.raises(cf.StorageError, match="this call was not sent"):
            await store.get("n")
        await trio.sleep(TIMEOUT)  # an instance sends no call for TIMEOUT s after a silent one
        assert await store.get("n") == 1


async def test_a_call_whose_socket_times_out_first_is_a_silent_server_too(
    private_redis: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """The socket's timeout is the call's, so the thread may end with redis-py's
    TimeoutError before the deadline ends the wait (here always: the trio clock stands
    still): the call fails as one the server did not answer, and the next is not sent."""
    storage = await connected(private_redis, unique_namespace(), n=1)
    with resumed_at_exit(private_redis):
        freeze(private_redis)
        with pytest.raises(cf.StorageError, match=r"no answer .* the connection is dropped"):
            await storage.get("n")
        with pytest.raises(cf.StorageError, match="this call was not sent"):
            await storage.get("n")


@pytest.mark.parametrize("call", ["update", "commit_step"])
async def test_a_call_the_server_stops_answering_halfway_fails_within_the_timeout(
    private_redis: RedisServer, call: str
) -> None:
    """The server stops between the read and the transaction of an update: the commit
    and the clean-up after it share the call's one timeout. The commit's round trip
    waited most of it, so the server is taken as silent although it answered the read:
    the next call is not sent."""
    storage = await connected(private_redis, unique_namespace(), n=1)
    await storage.set(RECORD_PREFIX + "r", {"steps": 0, "path": []})
    await storage.commit()

    def freeze_then_add_one(n: int) -> int:
        freeze(private_redis)
        return n + 1

    async def run_call() -> None:
        if call == "update":
            await storage.update("n", freeze_then_add_one, 0)
        else:
            update = ("update", "n", (freeze_then_add_one, 0))
            await storage.commit_step([update], RECORD_PREFIX + "r", {"steps": 1, "path": ["x"]}, 0)

    with resumed_at_exit(private_redis):
        error, seconds = await time_to_fail(run_call)

    assert error is cf.StorageError
    assert seconds < BOUND, f"timeout={TIMEOUT}, took {seconds:.2f} s"
    with pytest.raises(cf.StorageError, match=r"no answer .* this call was not sent"):
        await storage.get("n")
    await trio.sleep(TIMEOUT)  # an instance sends no call for TIMEOUT s after a silent one
    assert await storage.get("n") in (1, 2)
    await storage.aclose()


async def test_a_call_that_runs_out_of_time_after_the_server_answered_leaves_the_next_sent(
    redis_server: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """An update loses two races to another writer of its key, then its function takes
    the rest of the call's timeout: the error says the call ran out of time after the
    server had answered, with the races lost, and the server is not taken as silent:
    the next call is sent."""
    storage = redis_server.storage(timeout=TIMEOUT)
    await storage.open()
    seen: list[int] = []

    def add_one(n: int) -> int:
        seen.append(n)
        if len(seen) < 3:
            other_client_sets(storage, redis_server, "n", str(10 * len(seen)).encode())
        else:
            mock_clock.jump(TIMEOUT)
        return n + 1

    with pytest.raises(cf.StorageError) as info:
        await storage.update("n", add_one, 0)

    assert seen == [0, 10, 20]
    assert str(info.value).endswith(
        "the call ran out of its timeout=1 s: the server answered 5 of its round trips, not "
        "the last one in the time left (2 of its attempts found a value they read changed by "
        "another writer and started again); the connection is dropped (if the call carried "
        "a write, it may still be applied)"
    )
    assert isinstance(info.value.__cause__, redis.exceptions.TimeoutError)
    await storage.set("m", 1)
    await storage.commit()
    assert await storage.get("m") == 1
    await storage.aclose()


OWN_POOL_TIMEOUT = 1.125
"""The timeout of the storage whose pool the test below counts: no other test uses it,
so the pool is that storage's alone."""


def connections_in_use(storage: RedisStorage) -> int:
    """How many connections of the storage's pool are taken out now (redis-py keeps no
    public count)."""
    pool = shared_client(storage.url, storage.timeout, "test").connection_pool
    idle = [connection for connection in pool.pool.queue if connection is not None]  # type: ignore[attr-defined]
    return len(pool._connections) - len(idle)  # type: ignore[attr-defined]


async def test_closing_after_a_timed_out_call_gives_its_watched_connection_back(
    private_redis: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    """A step's commit that clears the store (so watches the hash) times out reading
    under WATCH; its thread, left behind, gets the answer once the server goes on and
    keeps the watched connection. aclose waits for that thread and gives the connection
    back to the pool."""
    storage = private_redis.storage(unique_namespace(), timeout=OWN_POOL_TIMEOUT)
    record_key = RECORD_PREFIX + "r"
    await storage.set(record_key, {"steps": 0, "path": []})
    await storage.commit()
    frozen = trio.Event()

    def freeze_then_add_one(n: int) -> int:
        freeze(private_redis)
        frozen.set()
        return n + 1

    updates = [
        ("clear", "", None),
        ("update", "a", (freeze_then_add_one, 0)),
        ("update", "b", (lambda n: n, 0)),
    ]
    errors: list[type[BaseException]] = []

    async def commit() -> None:
        error, _ = await time_to_fail(
            partial(storage.commit_step, updates, record_key, {"steps": 1, "path": ["x"]}, 0)
        )
        errors.append(error)

    with resumed_at_exit(private_redis):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            await frozen.wait()
            await trio.testing.wait_all_tasks_blocked()  # reading "b" from the stopped server
            mock_clock.jump(OWN_POOL_TIMEOUT)
    assert errors == [cf.StorageError]
    assert connections_in_use(storage) == 1

    await storage.aclose()

    assert connections_in_use(storage) == 0


LONG_TIMEOUT = 30.0
"""The ``timeout`` of the storages whose callers the tests below cancel: far longer than
those tests may take (``trio.fail_after``), so that a wait for it would fail them."""


@pytest.mark.parametrize("call", ["get", "commit", "update", "forget"])
async def test_an_outer_deadline_lets_a_call_to_a_stopped_server_go_at_once(
    private_redis: RedisServer, call: str
) -> None:
    """Nothing shields a call's wait for its thread: an outer deadline cuts it at once,
    well before the storage's timeout, whatever the call (a forget reads under WATCH).
    The cut is no sign of a silent server: once it answers again, the next call is sent."""
    storage = private_redis.storage(unique_namespace(), timeout=LONG_TIMEOUT)
    record_key = RECORD_PREFIX + "r"
    await storage.set("n", 1)
    await storage.set(record_key, {"steps": 1, "path": ["x"]})
    await storage.commit()

    async def staged_then_commit() -> None:
        await storage.set("m", 2)
        await storage.commit()

    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "get": partial(storage.get, "n"),
        "commit": staged_then_commit,
        "update": partial(storage.update, "n", lambda n: n + 1, 0),
        "forget": partial(storage.forget_record, record_key, lambda record: None),
    }
    with trio.fail_after(LONG_TIMEOUT / 3), resumed_at_exit(private_redis):
        freeze(private_redis)
        with trio.move_on_after(TIMEOUT / 4) as cut:
            await calls[call]()
    assert cut.cancelled_caught
    with trio.fail_after(LONG_TIMEOUT / 3):
        assert await storage.get("n") == 1
        await storage.aclose()


async def test_a_caller_cancelled_mid_call_on_a_healthy_server_leaves_the_storage_usable(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A get is cancelled while its thread waits for the answer: the caller is let go
    at once (the thread, left behind, ends once released), and the storage's next
    calls are sent and answered."""
    storage = redis_server.storage(timeout=LONG_TIMEOUT)
    await storage.set("n", 1)
    await storage.commit()
    sending, release = trio.Event(), threading.Event()
    send = redis_backend.send_command

    def held(connection: Any, *args: Any) -> Any:
        trio.from_thread.run_sync(sending.set)
        release.wait(LONG_TIMEOUT)
        return send(connection, *args)

    async def cancelled_get(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await storage.get("n")
        assert scope.cancelled_caught

    monkeypatch.setattr(redis_backend, "send_command", held)
    with trio.fail_after(LONG_TIMEOUT / 3):
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(cancelled_get)
            await sending.wait()
            scope.cancel()
        monkeypatch.undo()
        release.set()
        assert await storage.get("n") == 1
        await storage.set("n", 2)
        await storage.commit()
        assert await storage.update("n", lambda n: n + 1, 0) == 3
        await storage.aclose()


async def test_aclose_gives_back_the_watched_connection_of_a_call_whose_caller_was_cancelled(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forget lists its run's keys under WATCH when the server stops, and its caller
    is cancelled: it is let go at once, and the thread left behind keeps the watched
    connection until the server answers it; aclose waits for that thread and gives the
    connection back to the pool (this test's own: its server is)."""
    storage = private_redis.storage(unique_namespace(), timeout=LONG_TIMEOUT)
    record_key = RECORD_PREFIX + "r"
    await storage.set(record_key, {"steps": 1, "path": ["x"]})
    await storage.commit()
    listing = trio.Event()
    send = redis_backend.send_command

    def frozen_then_sent(connection: Any, *args: Any) -> Any:
        if args[0] == "ZRANGEBYLEX":
            freeze(private_redis)
            trio.from_thread.run_sync(listing.set)
        return send(connection, *args)

    async def cancelled_forget(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await storage.forget_record(record_key, lambda record: None)
        assert scope.cancelled_caught

    monkeypatch.setattr(redis_backend, "send_command", frozen_then_sent)
    with trio.fail_after(LONG_TIMEOUT / 3):
        with resumed_at_exit(private_redis):
            async with trio.open_nursery() as nursery:
                scope = await nursery.start(cancelled_forget)
                await listing.wait()
                scope.cancel()
            assert connections_in_use(storage) == 1
        await storage.aclose()
    assert connections_in_use(storage) == 0
    monkeypatch.undo()
    assert await storage.get(record_key) == {"steps": 1, "path": ["x"]}


async def test_a_caller_cancelled_between_watched_round_trips_gives_the_connection_back_at_once(
    private_redis: RedisServer,
) -> None:
    """A forget's check cancels its caller after the WATCH: the next round trip is never
    sent, and the watched connection goes back to the pool (this test's own) closed at
    once, with no UNWATCH to wait for; the storage goes on."""
    storage = private_redis.storage(unique_namespace(), timeout=LONG_TIMEOUT)
    record_key = RECORD_PREFIX + "r"
    await storage.set(record_key, {"steps": 1, "path": ["x"]})
    await storage.commit()
    with trio.fail_after(LONG_TIMEOUT / 3):
        with trio.CancelScope() as scope:
            await storage.forget_record(record_key, lambda record: scope.cancel())
        assert scope.cancelled_caught
        assert connections_in_use(storage) == 0
        assert await storage.get(record_key) == {"steps": 1, "path": ["x"]}
        await storage.aclose()


async def test_every_commit_gives_its_connections_back_to_the_pool(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether its pipeline watched or not, and whether it committed or was refused
    after the watch, no commit keeps a connection out of the pool (``timeout=1.1875``:
    no other test has that pool). The storage gives them back itself: redis-py's
    finalizer, which would otherwise reset a dropped pipeline (sending ``UNWATCH`` from
    the trio thread, blocking it), is turned off."""
    monkeypatch.setattr(redis.client.Pipeline, "__del__", lambda pipe: None)
    storage = redis_server.storage(timeout=1.1875)
    record_key = RECORD_PREFIX + "r"
    await storage.set(record_key, {"steps": 0, "path": []})
    await storage.commit()
    update = ("update", "n", (lambda n: n + 1, 0))
    steps: list[tuple[list[tuple[str, str, Any]], int]] = [
        ([("set", "a", 1)], 0),
        ([update], 1),
        ([("clear", "", None), update], 2),
        ([("clear", "", None)], 0),
        ([update], 0),
    ]
    in_use = []
    for ops, steps_before in steps:
        record = {"steps": steps_before + 1, "path": ["x"] * (steps_before + 1)}
        with contextlib.suppress(cf.RunConflictError):
            await storage.commit_step(ops, record_key, record, steps_before)
        in_use.append(connections_in_use(storage))

    def keep(record: Any) -> None:
        raise ValueError("kept")

    with pytest.raises(ValueError, match="kept"):
        await storage.forget_record(record_key, keep)
    in_use.append(connections_in_use(storage))

    assert in_use == [0] * (len(steps) + 1)
    assert await storage.get(record_key) == {"steps": 3, "path": ["x"] * 3}
    await storage.aclose()


async def test_a_durable_step_with_a_key_that_is_not_valid_unicode_fails_alone(
    redis_server: RedisServer,
) -> None:
    """Such a key is never stored: a step's delete of it deletes nothing, and a set or
    update of it is StoreValueError naming it, with nothing of the step stored. Neither
    may raise anything else: the store actor would take it for a broken backend."""
    storage = redis_server.storage()
    key, bad = RECORD_PREFIX + "r", "bad \udc80"
    await storage.set(key, {"steps": 0, "path": []})
    await storage.set("kept", 1)
    await storage.commit()
    assert await storage.commit_step([("delete", bad, None)], key, {"steps": 1, "path": ["a"]}, 0)
    for op in [("set", bad, 1), ("update", bad, (lambda value: value, 0))]:
        with pytest.raises(cf.StoreValueError) as info:
            await storage.commit_step(
                [("set", "x", 2), op], key, {"steps": 2, "path": ["a", "b"]}, 1
            )
        assert info.value.key == bad
    await storage.aclose()

    fresh = redis_server.storage(storage.namespace)
    assert {k: await fresh.get(k) for k in await fresh.keys()} == {
        key: {"steps": 1, "path": ["a"]},
        "kept": 1,
    }
    await fresh.aclose()


def as_updates(ops: list[tuple[str, str, Any]]) -> list[tuple[str, str, Any]]:
    """``ops`` with each set written as an update to the same value (which a step's
    commit applies through its general path: watch, read, write)."""
    return [
        ("update", key, (partial(lambda value, _: value, argument), None))
        if kind == "set"
        else (kind, key, argument)
        for kind, key, argument in ops
    ]


async def committed_step(
    server: RedisServer, ops: list[tuple[str, str, Any]], steps_before: int
) -> tuple[dict[str, Any], str | None]:
    """What a namespace holds after a step of ``ops`` was committed on it (after a
    write staged before), and the error that refused the step, if any."""
    storage = server.storage()
    record_key = RECORD_PREFIX + "r"
    await storage.set(record_key, {"steps": 1, "path": ["a"]})
    await storage.set("old", 1)
    await storage.commit()
    await storage.set("staged before", 2)
    error = None
    try:
        await storage.commit_step(ops, record_key, {"steps": 2, "path": ["a", "b"]}, steps_before)
    except cf.CosmoFlowError as exc:
        error = f"{type(exc).__name__}: {exc}"
    stored = {key: await storage.get(key) for key in await storage.keys()}
    await storage.aclose()
    return stored, error


@pytest.mark.parametrize("steps_before", [1, 0])
async def test_a_step_of_sets_and_deletes_commits_as_a_step_with_updates_does(
    redis_server: RedisServer, steps_before: int
) -> None:
    """Its commit takes one trip to the thread; the same writes made as updates take the
    general path. Both store the same, or refuse the same (a record counting other
    steps)."""
    ops = [("set", "new", [1, "x"]), ("delete", "old", None), ("set", "old", {"y": 2})]
    blind = await committed_step(redis_server, ops, steps_before)
    general = await committed_step(redis_server, as_updates(ops), steps_before)
    assert blind == general
    assert (blind[1] is None) == (steps_before == 1)


async def test_a_call_the_server_does_not_answer_fails_from_a_connection_failure(
    private_redis: RedisServer,
) -> None:
    """The StorageError of a call cut by the timeout is caused by redis-py's
    TimeoutError, as one cut by a lost connection is by its ConnectionError: what tells
    a run queue that the store is out of reach, not at fault."""
    from redis.exceptions import ConnectionError, TimeoutError

    storage = await connected(private_redis, unique_namespace(), n=1)
    with resumed_at_exit(private_redis):
        freeze(private_redis)
        with pytest.raises(cf.StorageError, match="no answer") as failed:
            await storage.get("n")
    assert isinstance(failed.value.__cause__, TimeoutError | ConnectionError)
    await storage.aclose()


async def test_get_many_is_one_round_trip_of_one_hmget_per_read_batch(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many keys it reads, over staged writes: one worker-thread call sending
    one pipeline; the HMGETs of several batches (here two and a bit) in one MULTI/EXEC,
    a single one without."""
    stored_keys = [f"k{i}" for i in range(READ_BATCH * 2 + 100)]
    storage = await connected(private_redis, unique_namespace(), **dict.fromkeys(stored_keys, 1))
    await storage.set("k5", "staged")
    await storage.delete("k7")
    calls = thread_calls(storage, monkeypatch)

    with private_redis.client() as client:
        client.config_resetstat()
        found = await storage.get_many(["missing", *reversed(stored_keys), "k3"])
        many = reads_sent(client)
        client.config_resetstat()
        few = await storage.get_many(["k2", "missing", "k1"])
        one = reads_sent(client)

    assert calls == ["_fetch_fields", "_fetch_fields"]
    assert many == {"cmdstat_multi": 1, "cmdstat_hmget": 3, "cmdstat_exec": 1}
    assert list(found) == [key for key in reversed(stored_keys) if key != "k7"]
    assert found["k5"] == "staged"
    assert found["k3"] == found["k0"] == 1
    assert one == {"cmdstat_hmget": 1}
    assert few == {"k2": 1, "k1": 1}
    await storage.aclose()


def reads_sent(client: redis.Redis) -> dict[str, int]:
    """How many times the server ran each of the commands a read may send, since its
    statistics were last reset (``INFO commandstats``)."""
    stats = client.info("commandstats")
    reads = ("cmdstat_multi", "cmdstat_hmget", "cmdstat_hget", "cmdstat_exec")
    return {name: stats[name]["calls"] for name in reads if name in stats}


async def test_a_value_that_cannot_be_decoded_is_an_error_naming_the_store_and_key(
    redis_server: RedisServer,
) -> None:
    storage = redis_server.storage()
    await storage.open()
    with redis_server.client() as client:
        client.hset(f"cosmoflow:{storage.namespace}:data", "x", b"{oops")
    where = re.escape(repr(storage))

    for read in (storage.get("x"), storage.get_many(["x"]), storage.update("x", str, None)):
        with pytest.raises(cf.UnreadableValueError, match=f"^{where}: cannot read key 'x': .*JSON"):
            await read
    await storage.aclose()


async def test_a_field_another_client_wrote_that_is_not_utf8_fails_the_calls_that_meet_it(
    redis_server: RedisServer,
) -> None:
    """keys() (and so a user's keys) gets a StorageError naming the store and the field's
    bytes; list_runs, which lists the records from the index, never meets it; a run on
    another store and reads of other keys go on."""
    storage = redis_server.storage()
    await storage.set("a", 1)
    await storage.commit()
    with redis_server.client() as client:
        client.hset(f"cosmoflow:{storage.namespace}:data", b"\xff", b"1")
    named = f"^{re.escape(repr(storage))}: .* holds the field b'\\\\xff', which is not valid UTF-8"

    with pytest.raises(cf.StorageError, match=named):
        await storage.keys()
    await foreign_key_fails_only_what_meets_it(storage, named, records_by_prefix=True)
    await storage.aclose()


@pytest.mark.parametrize("call", ["commit", "update", "commit_step sets", "commit_step update"])
async def test_a_connection_the_server_drops_during_a_commit_is_no_lost_race(
    private_redis: RedisServer, call: str
) -> None:
    """The server drops the connection of a command holding a value over its
    proto-max-bulk-len: a commit, watched or not, fails at once naming the key and
    saying the connection failed (redis-py's ConnectionError is the cause), and is not
    tried again as a transaction another client won."""
    from redis.exceptions import ConnectionError

    storage = private_redis.storage()
    record_key = RECORD_PREFIX + "r"
    await storage.set(record_key, {"steps": 0, "path": []})
    await storage.commit()
    with private_redis.client() as client:
        client.config_set("proto-max-bulk-len", "1mb")
    big = "x" * (2 * 1024 * 1024)
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "commit": partial(storage.set, "big", big),
        "update": partial(storage.update, "big", lambda _: big, None),
        "commit_step sets": partial(
            storage.commit_step, [("set", "big", big)], record_key, {"steps": 1, "path": ["a"]}, 0
        ),
        "commit_step update": partial(
            storage.commit_step,
            [("update", "big", (lambda _: big, None))],
            record_key,
            {"steps": 1, "path": ["a"]},
            0,
        ),
    }

    with pytest.raises(cf.StorageError) as failed:
        await calls[call]()
        await storage.commit()

    message = str(failed.value)
    assert "the connection failed while committing" in message
    assert "'big'" in message and "proto-max-bulk-len" in message
    assert isinstance(failed.value.__cause__, ConnectionError)
    await storage.set("small", 1)
    await storage.commit()
    assert await storage.keys() == [record_key, "small"]
    await storage.aclose()


async def test_an_open_instance_claims_its_namespace_again_once_the_server_lost_it(
    redis_server: RedisServer,
) -> None:
    """The server lost the namespace (restarted without persistence, flushed) while an
    instance held it open: its next commit writes the metadata with the data, so a new
    instance opens the namespace and reads what was written."""
    storage = redis_server.storage()
    await storage.set("a", 1)
    await storage.commit()
    meta, data = f"cosmoflow:{storage.namespace}:meta", f"cosmoflow:{storage.namespace}:data"
    with redis_server.client() as client:
        client.delete(meta, data)

        await storage.set("b", 2)
        await storage.commit()
        client.delete(meta, data)
        assert await storage.update("n", lambda n: n + 1, 0) == 1

        assert client.hgetall(meta) == {
            b"format": b"cosmoflow-store",
            b"version": b"1",
            b"codec": b"json",
            b"index": b"1",
        }
    fresh = redis_server.storage(storage.namespace)
    assert {key: await fresh.get(key) for key in await fresh.keys()} == {"n": 1}
    await fresh.aclose()
    await storage.aclose()


@pytest.mark.parametrize(
    ("meanwhile", "message"),
    [
        ("claimed with another codec", "no longer records format .* codec json"),
        ("metadata deleted", "holds data without cosmoflow metadata"),
        ("index replaced", ":index holds a string, not the sorted set of the keys under"),
    ],
)
async def test_a_namespace_whose_metadata_changed_under_an_open_instance_refuses_its_writes(
    redis_server: RedisServer, meanwhile: str, message: str
) -> None:
    storage = redis_server.storage()
    await storage.set("a", 1)
    await storage.commit()
    meta, data = f"cosmoflow:{storage.namespace}:meta", f"cosmoflow:{storage.namespace}:data"
    other = redis_server.storage(storage.namespace, codec="pickle")
    with redis_server.client() as client:
        if meanwhile == "metadata deleted":
            client.delete(meta)
        elif meanwhile == "index replaced":
            client.set(f"cosmoflow:{storage.namespace}:index", "x")
        else:
            client.delete(meta, data)
            await other.open()
        before = client.dump(meta), client.dump(data)

        for write in (storage.update("n", lambda n: n + 1, 0), storage.set("b", 2)):
            with pytest.raises(cf.StorageError, match=message):
                await write
                await storage.commit()

        assert (client.dump(meta), client.dump(data)) == before
    await storage.aclose()
    await other.aclose()


def assert_index_is_the_reserved_fields(server: RedisServer, namespace: str) -> set[str]:
    """Assert that the namespace's index holds every field of its data hash under
    RESERVED_PREFIX, and nothing else, each with score 0; return those keys."""
    with server.client() as client:
        fields = client.hkeys(f"cosmoflow:{namespace}:data")
        members = client.zrange(f"cosmoflow:{namespace}:index", 0, -1, withscores=True)
    reserved = {field.decode() for field in fields if field.startswith(RESERVED_PREFIX.encode())}
    assert {member.decode() for member, _ in members} == reserved
    assert {score for _, score in members} <= {0}
    return reserved


@cf.node
async def _fails(ctx: cf.ExecutionContext) -> None:
    raise RuntimeError("the branch fails")


def fan_out_to(name: str, right: cf.Node, join: cf.Node) -> cf.Flow:
    """A fan-out from "fork" to a Recorder and ``right``, joined by ``join``."""
    return (
        cf.Flow.builder(name)
        .add_node("fork", Recorder())
        .add_node("left", Recorder())
        .add_node("right", right)
        .add_join("join", join)
        .add_route("fork", ("left", "right"))
        .add_route("left", "join")
        .add_route("right", "join")
        .build()
    )


async def test_the_index_holds_the_reserved_keys_through_runs_forgets_and_clears(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durable runs with fan-outs (places written and deleted), BatchFlow children, path
    chunks, a failure, forgets, user writes, a reserved key deleted and a clear: after
    each, the index is exactly the data hash's fields under RESERVED_PREFIX."""
    monkeypatch.setattr(run_record, "PATH_CHUNK", 2)
    storage = redis_server.storage()
    namespace = storage.namespace
    seen_in_flight: list[set[str]] = []

    @cf.node
    async def look(ctx: cf.ExecutionContext) -> None:
        seen_in_flight.append(assert_index_is_the_reserved_fields(redis_server, namespace))

    async with cf.open_engine() as engine:
        await engine.run(batch_flows_on_two_branches(), storage, run_id="job")
        await engine.run(batch_flow_twice_in_a_loop(), storage, run_id="loop")
        await engine.run(fan_out_to("looking", Recorder(), look), storage, run_id="looking")
        with pytest.raises(cf.NodeError):
            await engine.run(fan_out_to("broken", _fails, Recorder()), storage, run_id="broken")
        reserved = assert_index_is_the_reserved_fields(redis_server, namespace)
        assert f"{PARTS_PREFIX}job/path/0" in reserved
        assert f"{RECORD_PREFIX}loop:3/1" in reserved
        assert any(key.startswith(f"{PARTS_PREFIX}looking/at/") for key in seen_in_flight[0])

        assert await engine.forget_run(storage, "job")
        assert await engine.forget_run(storage, "broken")
        left = assert_index_is_the_reserved_fields(redis_server, namespace)
        assert not [key for key in left if "job" in key or "broken" in key]

    await storage.set("user", 1)
    await storage.delete(f"{RECORD_PREFIX}loop:1/0")
    await storage.update(f"{RECORD_PREFIX}extra", lambda _: {"any": 1}, None)
    await storage.commit()
    assert assert_index_is_the_reserved_fields(redis_server, namespace) == {
        *(left - {f"{RECORD_PREFIX}loop:1/0"}),
        f"{RECORD_PREFIX}extra",
    }

    await storage.clear()
    await storage.commit()
    assert assert_index_is_the_reserved_fields(redis_server, namespace) == set()
    await storage.aclose()


async def test_a_forget_lists_the_keys_of_its_run_from_the_index_without_scanning_the_hash(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forget takes the run's record, its children's and the parts of them all, and
    no other run's; to list them it reads the index (one ZRANGEBYLEX per prefix), not
    the data hash with its user keys (no HSCAN, HKEYS or HGETALL)."""
    monkeypatch.setattr(run_record, "PATH_CHUNK", 2)
    storage = private_redis.storage()
    async with cf.open_engine() as engine:
        for run_id in ("job", "job2", "jo"):
            await engine.run(batch_flows_on_two_branches(), storage, run_id=run_id)
        before = await storage.keys_with_prefix(RESERVED_PREFIX)
        with private_redis.client() as client:
            client.config_resetstat()
            assert await engine.forget_run(storage, "job")
            stats = client.info("commandstats")

    assert "cmdstat_hscan" not in stats
    assert "cmdstat_hkeys" not in stats
    assert "cmdstat_hgetall" not in stats
    assert stats["cmdstat_zrangebylex"]["calls"] == 3
    gone = {key for key in before if re.search(r"/job(/|:|$)", key)}
    assert len(gone) == 7  # the record, four children's, two path chunks
    assert set(await storage.keys_with_prefix(RESERVED_PREFIX)) == set(before) - gone
    await storage.aclose()


async def test_keys_with_prefix_reads_reserved_keys_from_the_index_and_others_by_a_scan(
    private_redis: RedisServer,
) -> None:
    """Staged writes are laid over what is stored; only keys starting with the prefix
    come back (a glob character in the prefix stands for itself); a reserved prefix
    reads the index alone."""
    storage = await connected(
        private_redis,
        unique_namespace(),
        **{f"{RECORD_PREFIX}a": 1, f"{RECORD_PREFIX}b": 2, f"{PARTS_PREFIX}a/path/0": 3},
        **{"u*1": 4, "u*2": 5, "ux": 6, "v": 7},
    )
    await storage.set(f"{RECORD_PREFIX}c", 8)
    await storage.delete(f"{RECORD_PREFIX}a")
    await storage.set("u*3", 9)

    with private_redis.client() as client:
        client.config_resetstat()
        reserved = await storage.keys_with_prefix(RECORD_PREFIX)
        reads = set(client.info("commandstats"))
        user = await storage.keys_with_prefix("u*")

    assert sorted(reserved) == [f"{RECORD_PREFIX}b", f"{RECORD_PREFIX}c"]
    assert reads == {"cmdstat_zrangebylex", "cmdstat_config|resetstat"}
    assert sorted(user) == ["u*1", "u*2", "u*3"]
    assert await storage.keys_with_prefix("\ud800") == []
    await storage.aclose()


async def test_an_index_left_without_its_namespace_is_dropped_when_the_namespace_is_claimed(
    redis_server: RedisServer,
) -> None:
    """Someone deleted the metadata and data hashes but not the index: whoever claims
    the namespace next (an open, or the commit of an instance open before) drops it, so
    no stale key is listed."""
    storage = redis_server.storage()
    index = f"cosmoflow:{storage.namespace}:index"
    with redis_server.client() as client:
        client.zadd(index, {f"{RECORD_PREFIX}ghost": 0})
        await storage.open()
        assert client.exists(index) == 0

        await storage.set(f"{RECORD_PREFIX}r", 1)
        await storage.commit()
        meta, data = f"cosmoflow:{storage.namespace}:meta", f"cosmoflow:{storage.namespace}:data"
        client.delete(meta, data)
        await storage.set("user", 1)
        await storage.commit()
        assert client.exists(index) == 0
    assert await storage.keys_with_prefix(RESERVED_PREFIX) == []
    await storage.aclose()


async def test_list_runs_lists_the_records_from_the_index_without_reading_user_keys(
    private_redis: RedisServer,
) -> None:
    storage = private_redis.storage()
    async with cf.open_engine() as engine:
        await engine.run(batch_flows_on_two_branches(), storage, run_id="job")
        with private_redis.client() as client:
            client.config_resetstat()
            runs = await engine.list_runs(storage)
            stats = client.info("commandstats")

    assert [run.run_id for run in runs] == ["job", *CHILDREN_ON_THE_BRANCHES]
    assert not {"cmdstat_hkeys", "cmdstat_hscan"} & set(stats)  # HGETALL reads the metadata
    assert stats["cmdstat_zrangebylex"]["calls"] == 1
    await storage.aclose()
