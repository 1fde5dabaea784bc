"""The store actor: batching, one commit per batch, answers after the commit."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.runtime import run_record, store_actor
from cosmoflow_actors.runtime.gil import SWITCH_INTERVAL
from cosmoflow_actors.runtime.messages import Reply, StoreOp, StoreRequest
from cosmoflow_actors.runtime.store_actor import StoreActor
from cosmoflow_actors.runtime.store_client import MISSING
from cosmoflow_actors.storage import journal as journal_format
from cosmoflow_actors.storage.codec import get_codec
from tests.storage_suite import JsonDictStorage, RedisServer, thread_calls
from tests.support import Recorder, engine_bug, single


async def on_disk(path: Path) -> dict[str, Any]:
    """The committed state in the files, read as an instance loads it but without its
    lock (so beside the engine's instance, which holds it)."""
    codec = get_codec("json")
    loaded = journal_format.load(path, codec)
    return {key: codec.decode_json(raw) for key, raw in loaded.entries.items()}


class CountingFileStorage(cf.FileStorage):
    """A real FileStorage that counts its commits."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits = 0

    async def commit(self) -> None:
        self.commits += 1
        await super().commit()


async def test_concurrent_writers_are_coalesced_into_few_commits(tmp_path: Path) -> None:
    @cf.node
    async def write(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set(f"key-{ctx.params['i']}", ctx.params["i"])

    flow = single(write)
    storage = CountingFileStorage(tmp_path / "store.json")
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(lambda i=i: engine.run(flow, storage, params={"i": i}))
    assert await on_disk(tmp_path / "store.json") == {f"key-{i}": i for i in range(200)}
    assert storage.commits < 20


async def test_set_returns_once_the_write_is_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "store.json"

    @cf.node
    async def write_then_read_file(ctx: cf.ExecutionContext) -> cf.Action:
        await ctx.store.set("answer", 42)
        return cf.Action.complete(await on_disk(path))

    result = await single(write_then_read_file).run(cf.FileStorage(path))
    assert result.result == {"answer": 42}


class FailingCommits(cf.FileStorage):
    """A real FileStorage whose directory disappears: commits fail with OSError."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.broken = False

    async def commit(self) -> None:
        if self.broken:
            self.path.parent.rename(self.path.parent.with_name("moved"))
            try:
                await super().commit()
            finally:
                self.path.parent.with_name("moved").rename(self.path.parent)
        else:
            await super().commit()


async def test_a_failed_commit_fails_the_writer_keeps_old_data_and_the_engine(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    storage = FailingCommits(directory / "store.json")

    @cf.node
    async def write(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set("value", ctx.params["value"])

    async with cf.open_engine() as engine:
        await engine.run(single(write), storage, params={"value": "first"})
        storage.broken = True
        try:
            await engine.run(single(write), storage, params={"value": "second"})
        except cf.NodeError as exc:
            error: Any = exc.__cause__
        storage.broken = False
        assert isinstance(error, cf.StorageError)
        assert await on_disk(storage.path) == {"value": "first"}
        await engine.run(single(write), storage, params={"value": "third"})
    assert await on_disk(storage.path) == {"value": "third"}


class IntervalRecordingStorage(JsonDictStorage):
    """A custom storage that notes the GIL switch interval each time it is opened or set."""

    def __init__(self) -> None:
        super().__init__({})
        self.intervals: list[float] = []

    async def open(self) -> None:
        self.intervals.append(sys.getswitchinterval())
        await super().open()

    async def set(self, key: str, value: Any) -> None:
        self.intervals.append(sys.getswitchinterval())
        await super().set(key, value)


@cf.node
async def set_answer(ctx: cf.ExecutionContext) -> None:
    await ctx.store.set("answer", 42)


class SharedIntervalRecordingStorage(IntervalRecordingStorage):
    """The same, served like memory storage by the engine-wide actor (it never awaits)."""

    shared_actor = True


@pytest.fixture
def default_switch_interval() -> Iterator[None]:
    saved = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(saved)


@pytest.mark.usefixtures("default_switch_interval")
async def test_a_backend_instance_is_served_with_a_short_switch_interval_restored_after() -> None:
    storage = IntervalRecordingStorage()
    async with cf.open_engine() as engine:
        await engine.run(single(set_answer), storage)
        assert sys.getswitchinterval() == pytest.approx(0.005)
    assert storage.intervals == [pytest.approx(SWITCH_INTERVAL)] * 2


@pytest.mark.usefixtures("default_switch_interval")
async def test_the_shared_actor_leaves_the_switch_interval_alone() -> None:
    storage = SharedIntervalRecordingStorage()
    await single(set_answer).run(storage)
    assert storage.intervals == [pytest.approx(0.005)]


def explode(value: Any) -> Any:
    raise ArithmeticError(f"cannot update {value!r}")


async def kept_async(value: Any) -> Any:
    """An update function that is an async def: what an update may not be given."""
    return value


class Guarded(dict[str, Any]):
    """A user's dict subclass with code of its own: its get refuses one key."""

    def get(self, key: str, default: Any = None) -> Any:
        if key == "guarded":
            raise PermissionError("the key 'guarded' is write-only")
        return super().get(key, default)


MEMORY_OPS: list[tuple[StoreOp, str, Any]] = [
    (StoreOp.SET, "a", 1),
    (StoreOp.GET, "a", MISSING),
    (StoreOp.GET, "missing", MISSING),
    (StoreOp.GET, "missing", "fallback"),
    (StoreOp.UPDATE, "a", (lambda n: n + 1, MISSING)),
    (StoreOp.UPDATE, "missing", (lambda n: n + 1, MISSING)),
    (StoreOp.UPDATE, "fresh", (lambda n: [*n, "x"], [])),
    (StoreOp.UPDATE, "a", (explode, MISSING)),
    EXITS := (StoreOp.UPDATE, "a", (sys.exit, MISSING)),
    RETURNS_A_COROUTINE := (StoreOp.UPDATE, "a", (kept_async, MISSING)),
    GUARDED := (StoreOp.GET, "guarded", "fallback"),
    GUARDED_MANY := (StoreOp.GET_MANY, "", ["a", "guarded"]),
    (StoreOp.CONTAINS, "a", None),
    (StoreOp.CONTAINS, "missing", None),
    (StoreOp.SET_MANY, "", {"b": 2, "c": 3}),
    (StoreOp.GET_MANY, "", ["a", "c", "missing"]),
    (StoreOp.KEYS, "", None),
    (StoreOp.SIZE, "", None),
    (StoreOp.DELETE, "b", None),
    (StoreOp.DELETE, "b", None),
    (StoreOp.KEYS, "", None),
    (StoreOp.CLEAR, "", None),
    (StoreOp.SIZE, "", None),
]
"""A sequence of memory store requests, errors included."""


def answer_of(call: Callable[[], Any]) -> tuple[str, Any]:
    """What a request answered: its value, or its error's type and text."""
    try:
        return ("value", call())
    except BaseException as exc:
        return (type(exc).__name__, str(exc))


async def through_the_mailbox(actor: StoreActor, request: StoreRequest) -> Any:
    """Queue ``request`` as a busy actor would, and wait for the actor's own task."""
    await actor.mailbox.put(request)
    return await request.reply.wait()


@pytest.mark.parametrize("data", [dict, Guarded])
async def test_direct_dispatch_answers_as_the_actors_own_task_does(
    data: Callable[[], dict[str, Any]],
) -> None:
    """The same memory requests, handled in the caller's task (handle_now) and queued
    for the actor's task: the same answers, errors and store contents after each, on a
    dict and on a dict subclass whose code raises (a StorageError naming the store).
    An update function's error, a SystemExit too, is its requester's; one that returns
    a coroutine stores nothing."""
    direct_actor = StoreActor("store", 16, closing=no_engine)
    queued_actor = StoreActor("store", 16, closing=no_engine)
    direct, queued = cf.MemoryStorage(data()), cf.MemoryStorage(data())
    answers: list[tuple[str, Any]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(direct_actor.run)
        await nursery.start(queued_actor.run)
        for op, key, argument in MEMORY_OPS:
            assert direct_actor.idle
            now = answer_of(partial(direct_actor.handle_now, op, direct, key, argument))
            request = StoreRequest(op, queued, key, argument, Reply())
            try:
                later: tuple[str, Any] = ("value", await through_the_mailbox(queued_actor, request))
            except BaseException as exc:
                later = (type(exc).__name__, str(exc))
            assert (op, key, now, direct.data) == (op, key, later, queued.data)
            answers.append(now)
        counts = [actor.statistics() for actor in (direct_actor, queued_actor)]
        direct_actor.retire()
        queued_actor.retire()
    assert [(c.messages_processed, c.in_flight, c.mailbox_depth) for c in counts] == [
        (len(MEMORY_OPS), 0, 0)
    ] * 2
    assert direct.data == {}
    exits, coroutine, guarded, guarded_many = (
        answers[MEMORY_OPS.index(op)] for op in (EXITS, RETURNS_A_COROUTINE, GUARDED, GUARDED_MANY)
    )
    assert exits == ("SystemExit", "2")
    assert coroutine == (
        "TypeError",
        "the update function of key 'a' returned an awaitable (coroutine): it must be a "
        "plain def returning the new value",
    )
    if data is dict:
        assert (guarded, guarded_many) == (("value", "fallback"), ("value", {"a": 2}))
    else:
        failed = "the backend raised PermissionError: the key 'guarded' is write-only"
        assert guarded == ("StorageError", f"store: get failed: {failed}")
        assert guarded_many == ("StorageError", f"store: get_many failed: {failed}")


async def test_when_its_last_run_ends_a_file_storage_is_compacted_into_its_json_file(
    tmp_path: Path,
) -> None:
    @cf.node
    async def write(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set("last", ctx.params["n"])

    path = tmp_path / "store.json"
    async with cf.open_engine() as engine:
        for n in range(3):
            await engine.run(single(write), cf.FileStorage(path), params={"n": n})
            assert json.loads(path.read_bytes())["data"] == {"last": n}


class Stalling(JsonDictStorage):
    """A custom backend whose ``open`` or ``get`` (``stalls``) waits until ``release``
    is set, then raises ``error`` (a bug of the backend: not a StorageError), if any."""

    def __init__(self, stalls: str, error: Exception | None) -> None:
        super().__init__({})
        self.stalls = stalls
        self.error = error
        self.release = trio.Event()

    async def _stall(self, method: str) -> None:
        if self.stalls != method:
            return
        await self.release.wait()
        if self.error is not None:
            raise self.error

    async def open(self) -> None:
        await self._stall("open")

    async def get(self, key: str) -> Any:
        await self._stall("get")
        return await super().get(key)


async def ask(actor: StoreActor, storage: cf.Storage, key: str, answers: dict[str, Any]) -> None:
    """Request ``key`` from ``actor``; note the answer, or the error raised."""
    try:
        answers[key] = await actor.request(StoreOp.GET, storage, key, None)
    except Exception as exc:
        answers[key] = exc


async def queue_requests(
    actor: StoreActor, storage: cf.Storage, nursery: trio.Nursery, answers: dict[str, Any]
) -> None:
    """Six requests from tasks of ``nursery``: with a mailbox of one, the first in the
    actor's hands (if it serves), one queued, the others waiting for room."""
    for i in range(6):
        nursery.start_soon(ask, actor, storage, f"k{i}", answers)
        await trio.testing.wait_all_tasks_blocked()
    stats = actor.statistics()
    waiting = (stats.in_flight, stats.mailbox_depth, stats.senders_waiting)
    assert waiting == ((1, 1, 4) if actor.serving else (0, 1, 5))


def no_engine() -> None:
    """The ``closing`` of an actor with no engine around it: nothing to close."""


def errors_of(answers: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {key: (type(error).__name__, str(error)) for key, error in answers.items()}


async def test_a_crashed_actor_answers_every_request_held_back_by_a_full_mailbox(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine bug crashes the actor with a request in hand, one queued and four
    senders waiting for room: all six are answered with ActorCrashedError, caused by
    the bug, and a later request is refused."""
    monkeypatch.setattr(StoreActor, "_broken", engine_bug)
    storage = Stalling("get", ZeroDivisionError("storage bug"))
    actor = StoreActor("store:stalling", 1, storage, closing=no_engine)
    answers: dict[str, Any] = {}
    async with trio.open_nursery() as requesters:
        with pytest.RaisesGroup(ZeroDivisionError):
            async with trio.open_nursery() as nursery:
                await nursery.start(actor.run)
                await queue_requests(actor, storage, requesters, answers)
                storage.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert errors_of(answers) == {
            f"k{i}": (
                "ActorCrashedError",
                "actor 'store:stalling' crashed; the engine is shutting down",
            )
            for i in range(6)
        }
        assert all(error.__cause__ is storage.error for error in answers.values())
    with pytest.raises(cf.StorageError, match="store:stalling is closed"):
        await actor.request(StoreOp.GET, storage, "later", None)


async def test_a_backend_bug_fails_the_request_in_hand_alone() -> None:
    """A backend's get raises an error that is no StorageError with a request in hand,
    one queued and four senders waiting for room: that request alone fails, with a
    StorageError naming the backend and the operation, caused by the bug; the actor
    serves the other five and goes on serving."""
    storage = Stalling("get", ZeroDivisionError("storage bug"))
    storage.data.update({f"k{i}": json.dumps(i) for i in range(6)})
    actor = StoreActor("store:stalling", 1, storage, closing=no_engine)
    answers: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        async with trio.open_nursery() as requesters:
            await queue_requests(actor, storage, requesters, answers)
            storage.stalls = ""  # only the get in hand fails
            storage.release.set()
        failed = answers.pop("k0")
        assert errors_of({"k0": failed}) == {
            "k0": (
                "StorageError",
                "store:stalling: get failed: the backend raised ZeroDivisionError: storage bug",
            )
        }
        assert failed.__cause__ is storage.error
        assert answers == {f"k{i}": i for i in range(1, 6)}
        assert await actor.request(StoreOp.GET, storage, "k0", None) == 0
        actor.retire()


async def test_an_actor_stopped_by_its_engine_answers_every_request_held_back() -> None:
    """The engine closes (its nursery is cancelled) while the actor waits for its
    backend with one request in hand, one queued and four senders waiting for room:
    the actor has the engine close (which cancels the runs in flight) before it
    answers any of them, then all six are told the actor stopped."""
    storage = Stalling("get", ZeroDivisionError("never raised"))
    held_when_closing: list[tuple[int, int, int]] = []

    def closing() -> None:
        stats = actor.statistics()
        held_when_closing.append((stats.in_flight, stats.mailbox_depth, stats.senders_waiting))

    actor = StoreActor("store:stalling", 1, storage, closing=closing)
    answers: dict[str, Any] = {}
    async with trio.open_nursery() as requesters:
        async with trio.open_nursery() as engine:
            await engine.start(actor.run)
            await queue_requests(actor, storage, requesters, answers)
            engine.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert errors_of(answers) == {
            f"k{i}": ("StorageError", "store:stalling stopped before answering: its engine closed")
            for i in range(6)
        }
    assert held_when_closing == [(1, 1, 4)]


class OpensWithANursery(JsonDictStorage):
    """A backend whose open() waits in a nursery of its own, two tasks long: cancelled,
    it raises a group of their trio.Cancelled."""

    async def open(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            await trio.sleep_forever()


async def test_an_actor_stopped_by_its_engine_while_its_backend_opens_closes_the_engine() -> None:
    """The group of trio.Cancelled that the backend's open() raises stops the actor as a
    bare trio.Cancelled does: the engine closes first."""
    closed: list[str] = []
    actor = StoreActor(
        "store:opening", 1, OpensWithANursery({}), closing=partial(closed.append, "closed")
    )
    async with trio.open_nursery() as engine:
        engine.start_soon(actor.run)
        await trio.testing.wait_all_tasks_blocked()
        engine.cancel_scope.cancel()
    assert closed == ["closed"]


async def test_an_actor_whose_backend_cannot_open_answers_every_request_sent_meanwhile() -> None:
    storage = Stalling("open", OSError("disk gone"))
    actor = StoreActor("store:stalling", 1, storage, closing=no_engine)
    answers: dict[str, Any] = {}
    async with trio.open_nursery() as requesters:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(actor.run)
            await trio.testing.wait_all_tasks_blocked()
            await queue_requests(actor, storage, requesters, answers)
            storage.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert errors_of(answers) == {
            f"k{i}": ("StorageError", "store:stalling could not be opened: OSError: disk gone")
            for i in range(6)
        }


class LockedOut(cf.StorageError):
    """A StorageError of a backend's own, with an attribute."""

    def __init__(self, holder: int) -> None:
        self.holder = holder
        super().__init__(f"locked by {holder}")


class OpensNever(JsonDictStorage):
    """Its open raises LockedOut, caused by an OSError."""

    async def open(self) -> None:
        raise LockedOut(4242) from OSError(11, "Resource temporarily unavailable")


async def test_each_run_on_a_backend_that_cannot_open_gets_its_error_from_the_real_cause(
    tmp_path: Path,
) -> None:
    """One StorageError per run, not one wrapping another of the same text: of the
    backend's own type and attributes, with the OSError (a real file here) as cause."""
    a_directory = cf.FileStorage(tmp_path)
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError) as file_failed:
            await engine.run(single(Recorder()), a_directory)
        locked = OpensNever({})
        errors: list[BaseException] = []

        async def run_on_locked() -> None:
            with pytest.raises(LockedOut) as each:
                await engine.run(single(Recorder()), locked)
            errors.append(each.value)

        async with trio.open_nursery() as both:  # both wait for the one open
            both.start_soon(run_on_locked)
            both.start_soon(run_on_locked)
    assert type(file_failed.value) is cf.StorageError
    assert isinstance(file_failed.value.__cause__, IsADirectoryError)
    first, second = errors
    assert first is not second
    for error in errors:
        assert isinstance(error, LockedOut)
        assert (str(error), error.holder) == ("locked by 4242", 4242)
        assert isinstance(error.__cause__, OSError)
        assert not isinstance(error.__cause__, cf.StorageError)


async def test_a_retired_actor_serves_every_request_held_back_before_it_exits() -> None:
    """Retired (its last run ended), the actor serves what it holds and exits; its
    engine is not closing, and the actor does not close it."""
    storage = Stalling("get", None)
    storage.data.update({f"k{i}": str(i) for i in range(6)})
    closed: list[str] = []
    actor = StoreActor("store:stalling", 1, storage, closing=partial(closed.append, "closed"))
    answers: dict[str, Any] = {}
    async with trio.open_nursery() as requesters:
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            await queue_requests(actor, storage, requesters, answers)
            actor.retire()
            storage.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert answers == {f"k{i}": i for i in range(6)}
    assert closed == []


async def test_a_request_to_a_stopped_actor_is_refused_or_cancelled_in_a_cancelled_scope() -> None:
    """A request to an actor its engine stopped, from a cancelled scope (a step of a run
    the engine's close cancelled) is cancelled: its run ends cancelled, not failed. A
    request from outside it is refused."""
    actor = StoreActor("store:memory", 1, closing=no_engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        nursery.cancel_scope.cancel()
    storage = cf.MemoryStorage()
    with pytest.raises(cf.StorageError, match="store:memory is closed"):
        await actor.request(StoreOp.GET, storage, "k", MISSING)
    with trio.CancelScope() as scope:
        scope.cancel()
        await actor.request(StoreOp.GET, storage, "k", MISSING)
    assert scope.cancelled_caught


class FailsToClose(cf.FileStorage):
    """A real FileStorage whose closing fails after it closed (its compaction lost)."""

    async def aclose(self) -> None:
        await super().aclose()
        raise cf.StorageError(f"{self.path}: compaction lost")


async def test_stores_that_fail_to_close_leave_nothing_in_the_warning_registry(
    tmp_path: Path,
) -> None:
    """Each backend that cannot close is a warning naming it; a long-lived engine
    whose stores fail to close keeps no more after 2N of them than after N (the
    warning registry of the module kept each message for good)."""
    flow = single(Recorder())
    registry = vars(store_actor).setdefault("__warningregistry__", {})

    async def run_on_new_stores(engine: cf.Engine, first: int, count: int) -> int:
        for number in range(first, first + count):
            await engine.run(flow, FailsToClose(tmp_path / f"{number}.json"))
        return len(registry)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        async with cf.open_engine() as engine:
            after_n = await run_on_new_stores(engine, 0, 10)
            after_2n = await run_on_new_stores(engine, 10, 10)
    assert [str(warning.message).endswith("compaction lost") for warning in caught] == [True] * 20
    assert after_2n <= after_n


class Buggy(JsonDictStorage):
    """A custom backend with bugs: ``set`` of a key in ``bad_keys`` raises ValueError
    after writing it, and ``commit`` raises RuntimeError while ``commit_fails``."""

    def __init__(self) -> None:
        super().__init__({})
        self.bad_keys: set[str] = set()
        self.commit_fails = False

    async def set(self, key: str, value: Any) -> None:
        await super().set(key, value)
        if key in self.bad_keys:
            raise ValueError(f"bug writing {key}")

    async def commit(self) -> None:
        if self.commit_fails:
            raise RuntimeError("bug committing")


async def test_a_backend_bug_in_a_write_or_commit_fails_those_writes_alone() -> None:
    """A set_many whose second write raises (no StorageError) stores nothing, a commit
    that raises fails the writes of its batch, and each error is a StorageError naming
    the backend and the operation, the bug its cause; a run on another store and later
    writes go on."""
    storage = Buggy()
    write_many = single(cf.node(lambda ctx: ctx.store.set_many(ctx.params["items"])))
    write = single(cf.node(lambda ctx: ctx.store.set("c", 3)))

    async def failure(engine: cf.Engine, flow: cf.Flow, **params: Any) -> BaseException:
        with pytest.raises(cf.NodeError) as info:
            await engine.run(flow, storage, params=params)
        assert isinstance(info.value.__cause__, cf.StorageError)
        return info.value.__cause__

    async with cf.open_engine() as engine:
        other = await engine.start_run(single(Recorder()), {})
        await engine.run(write_many, storage, params={"items": {"a": 0}})
        storage.bad_keys.add("b")
        bug = await failure(engine, write_many, items={"a": 1, "b": 2})
        assert str(bug).endswith("set_many failed: the backend raised ValueError: bug writing b")
        assert isinstance(bug.__cause__, ValueError)
        assert storage.data == {"a": "0"}
        storage.commit_fails = True
        bug = await failure(engine, write)
        assert str(bug).endswith("commit failed: the backend raised RuntimeError: bug committing")
        assert isinstance(bug.__cause__, RuntimeError)
        storage.commit_fails = False
        await engine.run(write_many, storage, params={"items": {"a": 4}})
        assert (await other.wait()).success
    assert storage.data == {"a": "4", "c": "3"}


class DeleteFails(JsonDictStorage):
    """A custom backend whose ``delete`` of ``bad_key`` raises after deleting it."""

    def __init__(self, bad_key: str) -> None:
        super().__init__({})
        self.bad_key = bad_key

    async def delete(self, key: str) -> bool:
        deleted = await super().delete(key)
        if key == self.bad_key:
            raise ValueError(f"bug deleting {key}")
        return deleted


def succeeded_record(run_id: str) -> dict[str, Any]:
    """The record of a run ``run_id`` of flow "f" that succeeded at its start node."""
    action = run_record.encode_action(cf.Action.complete())
    result = {"final_action": action, "last_node_id": "a", "value": None, "duration": 0.0}
    return {**run_record.new_record(run_id, "f", {}), "state": "succeeded", "result": result}


async def test_a_forget_whose_backend_fails_a_delete_keeps_every_record() -> None:
    records = {
        f"__cosmoflow__/runs/{run_id}": json.dumps(succeeded_record(run_id))
        for run_id in ("p", "p:1/0", "p:1/1")
    }
    storage = DeleteFails("__cosmoflow__/runs/p:1/1")
    storage.data.update(records)
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError, match="forget failed"):
            await engine.forget_run(storage, "p")
    assert storage.data == records


class KeysCounted(cf.FileStorage):
    """A real FileStorage that counts the calls to ``keys``, which list every key."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.listings = 0

    async def keys(self) -> list[str]:
        self.listings += 1
        return await super().keys()


async def test_forget_and_list_runs_list_the_engines_keys_by_prefix_only(tmp_path: Path) -> None:
    @cf.node
    async def write(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set(f"user-{ctx.run_id}", 1)

    storage = KeysCounted(tmp_path / "store.json")
    async with cf.open_engine() as engine, engine.open_store(storage):
        for run_id in ("a", "b"):
            await engine.run(single(write), storage, run_id=run_id)
        storage.listings = 0
        assert [run.run_id for run in await engine.list_runs(storage)] == ["a", "b"]
        assert await engine.forget_run(storage, "a")
        assert [run.run_id for run in await engine.list_runs(storage)] == ["b"]
        assert storage.listings == 0
    assert sorted(await on_disk(tmp_path / "store.json")) == [
        "__cosmoflow__/runs/b",
        "user-a",
        "user-b",
    ]


class Staging(JsonDictStorage):
    """A custom backend as the contract asks: writes are staged until ``commit``, which
    stores them all, or, while ``commit_fails``, none (it raises and drops them). A get
    of "gate" waits for ``gate``, holding the actor while requests queue."""

    def __init__(self) -> None:
        super().__init__({})
        self.staged: dict[str, str] = {}
        self.commit_fails = False
        self.gate = trio.Event()

    async def get(self, key: str) -> Any:
        if key == "gate":
            await self.gate.wait()
        if key in self.staged:
            return json.loads(self.staged[key])
        return await super().get(key)

    async def set(self, key: str, value: Any) -> None:
        self.staged[key] = json.dumps(value)

    async def commit(self) -> None:
        staged, self.staged = self.staged, {}
        if self.commit_fails:
            raise cf.StorageError("disk full")
        self.data.update(staged)


async def test_a_read_after_a_write_whose_commit_fails_fails_too() -> None:
    """A read, a write and a read queue in one batch whose commit fails: the first read
    has the value stored, the write and the read after it (which saw the write) fail;
    the store keeps what it had."""
    storage = Staging()
    answers: dict[str, Any] = {}

    async def answer(name: str, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            answers[name] = await call()
        except cf.StorageError as exc:
            answers[name] = str(exc)

    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        await store.set("k", "old")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.get, "gate", None)
            await trio.testing.wait_all_tasks_blocked()
            for name, call in [
                ("before", partial(store.get, "k")),
                ("write", partial(store.set, "k", "new")),
                ("after", partial(store.get, "k")),
            ]:
                nursery.start_soon(answer, name, call)
                await trio.testing.wait_all_tasks_blocked()
            storage.commit_fails = True
            storage.gate.set()
        assert answers["before"] == "old"
        assert answers["write"] == answers["after"]
        assert answers["after"].endswith("commit failed: disk full")
        storage.commit_fails = False
        assert await store.get("k") == "old"
    assert storage.data == {"k": '"old"'}


class AnswersBadly(JsonDictStorage):
    """A custom backend whose get_many answers with ``answer``."""

    def __init__(self, answer: Any) -> None:
        super().__init__({})
        self.answer = answer

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        answer: dict[str, Any] = self.answer
        return answer


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ([], "get_many returned a list, not a dict"),
        ({"other": 1}, "get_many returned keys it was not asked for: ['other']"),
    ],
    ids=["list", "extra-key"],
)
async def test_a_get_many_answer_that_breaks_the_contract_fails_the_run_naming_the_backend(
    answer: Any, problem: str
) -> None:
    """Route conditions are read with get_many: a wrong answer must fail the run, not
    route it."""
    flow = (
        cf.Flow.builder("routed")
        .add_node("a", Recorder())
        .add_node("b", Recorder())
        .add_route("a", "b", when=cf.ActionCondition.key_exists("go"))
        .add_route("a", cf.END)
        .build()
    )
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError) as info:
            await engine.run(flow, AnswersBadly(answer))
        assert str(info.value).endswith(problem)
        assert (await engine.run(flow, {"go": 1})).execution_path == ("a", "b")


class SlowAsyncCommit(JsonDictStorage):
    """An async backend whose commit writes its staged keys one by one, with a
    checkpoint before each: cut half-way, it would leave some of them."""

    def __init__(self) -> None:
        super().__init__({})
        self.staged: dict[str, str] = {}
        self.committing = trio.Event()

    async def set(self, key: str, value: Any) -> None:
        self.staged[key] = json.dumps(value)

    async def commit(self) -> None:
        staged, self.staged = self.staged, {}
        self.committing.set()
        for key, value in staged.items():
            await trio.sleep(1)
            self.data[key] = value


async def cancelled_while_committing(storage: SlowAsyncCommit, writes: dict[str, Any]) -> float:
    """Cancel an engine while ``storage`` commits ``writes``; return when that was."""
    with trio.CancelScope() as scope:
        async with (
            cf.open_engine() as engine,
            engine.open_store(storage) as store,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(store.set_many, writes)
            await storage.committing.wait()
            cancelled_at = trio.current_time()
            scope.cancel()
    return cancelled_at


async def test_in_flight_counts_the_requests_of_the_batch_being_applied(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While a batch commits, every request not answered yet is queued or in flight."""
    storage = SlowAsyncCommit()
    async with (
        cf.open_engine() as engine,
        engine.open_store(storage) as store,
        trio.open_nursery() as nursery,
    ):
        for index in range(5):
            nursery.start_soon(store.set, f"k{index}", index)
        await storage.committing.wait()
        [stats] = [actor for actor in engine.statistics().actors if actor.kind == "store"]
        assert stats.in_flight + stats.mailbox_depth == 5
        assert stats.in_flight > 1 and stats.messages_processed == 0


async def test_an_engine_cancelled_during_an_async_commit_lets_it_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = SlowAsyncCommit()
    await cancelled_while_committing(storage, {"a": 1, "b": 2, "c": 3})
    assert storage.data == {"a": "1", "b": "2", "c": "3"}


async def test_a_closing_engine_cuts_an_async_commit_after_close_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Unbounded while the engine is open (a commit of many keys goes on), the commit is
    cut CLOSE_SECONDS after the engine begins to close."""
    many = {f"k{i}": i for i in range(int(store_actor.CLOSE_SECONDS) + 10)}
    storage = SlowAsyncCommit()
    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        await store.set_many(many)
    assert len(storage.data) == len(many)
    storage = SlowAsyncCommit()
    cancelled_at = await cancelled_while_committing(storage, many)
    assert trio.current_time() - cancelled_at == pytest.approx(store_actor.CLOSE_SECONDS)
    assert len(storage.data) < len(many)


class SlowAsyncCommitAndClose(SlowAsyncCommit):
    """A SlowAsyncCommit whose close never ends unless cancelled."""

    async def aclose(self) -> None:
        await trio.sleep_forever()


async def test_a_closing_engine_gives_commit_and_close_one_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A backend hanging in its commit and then in its close holds a cancelled engine
    CLOSE_SECONDS in all, not that long for each."""
    many = {f"k{i}": i for i in range(int(store_actor.CLOSE_SECONDS) + 10)}
    storage = SlowAsyncCommitAndClose()
    cancelled_at = await cancelled_while_committing(storage, many)
    assert trio.current_time() - cancelled_at == pytest.approx(store_actor.CLOSE_SECONDS)


async def test_a_retired_backend_closes_within_close_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The engine still open, a store whose backend's close hangs is given up on
    CLOSE_SECONDS after its close began (the end of its last user's block)."""
    storage = SlowAsyncCommitAndClose()
    async with cf.open_engine() as engine:
        async with engine.open_store(storage) as store:
            await store.set("a", 1)
            await trio.sleep(100)
            began = trio.current_time()
        assert trio.current_time() - began == pytest.approx(store_actor.CLOSE_SECONDS)
    assert storage.data == {"a": "1"}


RECORD = "__cosmoflow__/runs/kept"
"""A run record's key: a clear of a persistent store leaves it."""


def database(
    kind: str, path: Path, redis_server: RedisServer
) -> cf.SQLiteStorage | cf.RedisStorage:
    """A new store holding nothing: an SQLite one at ``path``, or a Redis one."""
    return cf.SQLiteStorage(path) if kind == "sqlite" else redis_server.storage()


async def many_key_calls(
    storage: cf.SQLiteStorage | cf.RedisStorage, count: int, monkeypatch: pytest.MonkeyPatch
) -> list[list[str]]:
    """The worker-thread calls of ``storage`` (see thread_calls) that a set_many of
    ``count`` new keys, a set_many over the same keys and a clear make, each through
    the engine; checks that the clear left the run record alone."""
    await storage.set(RECORD, {"path": []})
    await storage.commit()
    items = {f"k{i}": i for i in range(count)}
    made: list[list[str]] = []
    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        await store.get("opened", None)
        calls = thread_calls(storage, monkeypatch)
        for call in (
            partial(store.set_many, items),
            partial(store.set_many, dict.fromkeys(items, "again")),
            store.clear,
        ):
            await call()
            made.append(calls.copy())
            calls.clear()
        assert await store.keys() == []
        assert await storage.keys() == [RECORD]
    return made


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_set_many_and_clear_make_as_many_backend_calls_for_any_number_of_keys(
    kind: str, tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A set_many reads what it replaces with one get_many, and a clear lists the keys
    once and stages their deletes without asking whether each is there: a thousand keys
    cost the worker-thread calls two do (every other request to the store waits for
    them)."""
    few = await many_key_calls(database(kind, tmp_path / "few.db", redis_server), 2, monkeypatch)
    many = await many_key_calls(
        database(kind, tmp_path / "many.db", redis_server), 1000, monkeypatch
    )
    assert many == few
    assert [len(calls) for calls in many] == [2, 2, 2]  # one read, the commit


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_set_many_refused_part_way_puts_back_what_was_there(
    kind: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A stored value comes back (None included), a key that was not stored is not
    stored (not set to None), and nothing of the set_many reaches the database."""
    storage = database(kind, tmp_path / "store.db", redis_server)
    before: dict[str, Any] = {"kept": "old", "none": None, RECORD: {"path": []}}
    for key, value in before.items():
        await storage.set(key, value)
    await storage.commit()
    refused = {"kept": "new", "none": 1, "fresh": 2, "bad": object(), "later": 3}
    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        with pytest.raises(cf.StoreValueError, match="'bad'"):
            await store.set_many(refused)
        assert await store.get_many(list(refused)) == {"kept": "old", "none": None}
        assert not await store.contains("fresh")
    await storage.open()
    assert {key: await storage.get(key) for key in await storage.keys()} == before
    await storage.aclose()


async def test_a_set_many_whose_get_many_breaks_the_contract_stores_nothing() -> None:
    """The values a set_many replaces are read with get_many, checked as a route
    condition's are: a wrong answer fails it naming the backend, before any write."""
    storage = AnswersBadly(["a"])
    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        with pytest.raises(cf.StorageError, match=r"get_many returned a list, not a dict$"):
            await store.set_many({"a": 1})
    assert storage.data == {}
