"""SharedStore: the whole API, as nodes use it, through the store actor."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypedDict

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.store_client import (
    FORGET_AT,
    SharedStore,
    StagedStore,
    Unreachable,
    all_awaited,
    detached,
    hand_over,
    lost_calls,
    unawaited,
)
from cosmoflow_actors.storage.base import RECORD_PREFIX
from tests.support import in_run, single
from tests.test_store_actor import FailingCommits


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_the_public_handle_has_the_store_calls_and_nothing_of_the_engine() -> None:
    public = {name for name in dir(cf.SharedStore) if not name.startswith("_")}
    calls = {"get", "set", "update", "delete", "contains", "keys", "size", "clear"}
    assert public == calls | {"get_many", "set_many", "name"}


async def test_get_set_delete_contains_keys_size_clear() -> None:
    async def body(store: cf.SharedStore) -> list[Any]:
        await store.set("a", 1)
        await store.set("b", [1, 2])
        seen = [
            await store.get("a"),
            await store.contains("b"),
            await store.keys(),
            await store.size(),
        ]
        seen += [await store.delete("a"), await store.delete("a"), await store.get("a", "fallback")]
        await store.clear()
        return [*seen, await store.size()]

    assert await in_run(body) == [1, True, ["a", "b"], 2, True, False, "fallback", 0]


async def test_get_many_omits_missing_keys_and_set_many_writes_all() -> None:
    async def body(store: cf.SharedStore) -> dict[str, Any]:
        await store.set_many({"a": 1, "b": 2})
        return await store.get_many(["a", "b", "missing"])

    assert await in_run(body) == {"a": 1, "b": 2}


async def store_error(body: Any, store: Any = None) -> BaseException:
    """The exception ``body`` raised inside a run (the NodeError's cause)."""
    with pytest.raises(cf.NodeError) as info:
        await in_run(body, store)
    assert info.value.__cause__ is not None
    return info.value.__cause__


async def test_a_missing_key_without_default_is_store_key_error() -> None:
    error = await store_error(lambda store: store.get("nope"))
    assert isinstance(error, cf.StoreKeyError)
    assert isinstance(error, KeyError)
    assert str(error) == "key 'nope' is not in the store"


async def test_a_value_of_the_wrong_type_is_store_type_error() -> None:
    error = await store_error(lambda store: store.get("n", type=int), {"n": "three"})
    assert isinstance(error, cf.StoreTypeError)
    assert isinstance(error, TypeError)
    assert "'n' holds a str, not an int" in str(error)


@pytest.mark.parametrize("store", [{"p": [1, "a"]}, {"p": (1, "a")}], ids=["list", "tuple"])
async def test_a_type_error_names_the_type_asked_for_and_what_does_not_fit(
    store: dict[str, Any],
) -> None:
    error = await store_error(lambda s: s.get("p", type=tuple[int, int]), store)
    held = type(store["p"]).__name__
    assert str(error) == (
        f"key 'p' holds a {held}, not a tuple[int, int]: Expected `int`, got `str` - at `$[1]`"
    )


def a_handle() -> SharedStore:
    """A handle whose calls would refuse (the tests using it check what the call
    itself raises)."""
    return SharedStore(Unreachable("s"), cf.MemoryStorage(), "s")


@pytest.mark.parametrize("keys", ["abc", b"abc"], ids=["str", "bytes"])
def test_get_many_of_a_str_or_bytes_raises_at_the_call(keys: Any) -> None:
    """Not one key per character (and {} back): the call says to pass a list."""
    with pytest.raises(TypeError) as info:
        a_handle().get_many(keys)
    kind = type(keys).__name__
    assert str(info.value) == (
        f"get_many(keys) takes a list of keys, not a {kind} ({keys!r}): pass [{keys!r}]"
    )


@pytest.mark.parametrize("wrong", ["int", 3, None.__class__.__mro__], ids=["str", "int", "tuple"])
def test_a_type_the_codec_cannot_convert_to_raises_at_the_call_from_msgspec(wrong: Any) -> None:
    """Not a StoreTypeError blaming the stored value after the trip to the store."""
    with pytest.raises(TypeError) as info:
        a_handle().get("x", type=wrong)
    assert not isinstance(info.value, cf.StoreTypeError)
    assert str(info.value).startswith(f"type={wrong!r} is not a type the store can convert")
    assert isinstance(info.value.__cause__, TypeError)
    assert "is not supported" in str(info.value.__cause__)


WRITES: dict[str, Callable[[cf.SharedStore, Any, Any], Awaitable[Any]]] = {
    "set": lambda store, key, value: store.set(key, value),
    "set_many": lambda store, key, value: store.set_many({key: value}),
    "update": lambda store, key, value: store.update(key, lambda _: value, None),
}
"""The calls that store a value, as ``write(store, key, value)``."""
CHANGES = WRITES | {"delete": lambda store, key, _: store.delete(key)}
"""The calls that change the store."""
BY_KEY = CHANGES | {"get_many": lambda store, key, _: store.get_many([key])}


@pytest.mark.parametrize("call", BY_KEY.values(), ids=list(BY_KEY))
def test_a_key_that_is_not_str_raises_type_error_at_the_call(call: Any) -> None:
    with pytest.raises(TypeError, match="storage keys must be str, not int: 3"):
        call(a_handle(), 3, "v")


@pytest.mark.parametrize("write", WRITES.values(), ids=list(WRITES))
async def test_a_value_the_codec_refuses_is_store_value_error_and_stores_nothing(
    write: Any, tmp_path: Path
) -> None:
    storage = cf.FileStorage(tmp_path / "store.json")
    error = await store_error(lambda store: write(store, "bad", object()), storage)
    assert isinstance(error, cf.StoreValueError)
    assert "'bad'" in str(error)
    assert await in_run(lambda store: store.keys(), cf.FileStorage(storage.path)) == []


@pytest.mark.parametrize("change", CHANGES.values(), ids=list(CHANGES))
async def test_a_change_whose_commit_fails_raises_storage_error(
    change: Any, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    storage = FailingCommits(tmp_path / "data" / "store.json")
    await in_run(lambda store: store.set("k", 1), storage)
    storage.broken = True
    error = await store_error(lambda store: change(store, "k", 2), storage)
    assert type(error) is cf.StorageError
    assert str(error).startswith(f"store:{storage!r}: commit failed: cannot append to")


async def test_a_type_checked_before_is_still_converted_to() -> None:
    async def body(store: cf.SharedStore) -> list[Any]:
        return [await store.get("p", type=tuple[int, int]) for _ in range(2)]

    assert await in_run(body, {"p": [1, 2]}) == [(1, 2), (1, 2)]


async def test_typing_forms_that_are_not_classes_are_converted_to() -> None:
    async def body(store: cf.SharedStore) -> list[Any]:
        return [
            await store.get("n", type=int | None),
            await store.get("none", type=int | None),
            await store.get("mode", type=Literal["x", "y"]),
        ]

    assert await in_run(body, {"n": 3, "none": None, "mode": "y"}) == [3, None, "y"]
    error = await store_error(lambda s: s.get("mode", type=Literal["x", "y"]), {"mode": "z"})
    assert type(error) is cf.StoreTypeError


async def test_a_default_is_returned_without_a_type_check() -> None:
    assert await in_run(lambda store: store.get("missing", None, type=int)) is None


@pytest.mark.parametrize("stored", [None, "auto"])
async def test_a_stored_value_that_is_the_default_object_is_still_type_checked(
    stored: Any,
) -> None:
    """The default is for a missing key only: a stored None (or an interned str) that
    is the very object given as the default is checked as any stored value."""
    error = await store_error(lambda s: s.get("k", stored, type=int), {"k": stored})
    assert type(error) is cf.StoreTypeError


async def test_a_stored_bool_is_no_int_nor_float() -> None:
    """As msgspec's conversion (and so every persistent store) has it."""
    for kind in (int, float):
        error = await store_error(lambda s, kind=kind: s.get("b", type=kind), {"b": True})
        assert "holds a bool" in str(error)


class Spot(TypedDict):
    x: int


async def test_a_typed_dict_or_any_is_converted_to() -> None:
    async def body(store: cf.SharedStore) -> list[Any]:
        return [await store.get("p", type=Spot), await store.get("p", type=Any)]

    assert await in_run(body, {"p": {"x": 1}}) == [{"x": 1}, {"x": 1}]
    error = await store_error(lambda s: s.get("p", type=Spot), {"p": {"x": "one"}})
    assert type(error) is cf.StoreTypeError


async def test_a_non_str_key_is_refused_before_it_reaches_the_actor() -> None:
    error = await store_error(lambda store: store.set(3, "x"))
    assert isinstance(error, TypeError)
    assert "str" in str(error)


async def test_update_is_a_read_modify_write_returning_the_new_value() -> None:
    async def body(store: cf.SharedStore) -> list[Any]:
        first = await store.update("n", lambda n: n + 1, default=10)
        second = await store.update("n", lambda n: n * 2)
        return [first, second, await store.get("n")]

    assert await in_run(body) == [11, 22, 22]


async def test_update_of_a_missing_key_without_default_is_store_key_error() -> None:
    assert isinstance(await store_error(lambda store: store.update("n", abs)), cf.StoreKeyError)


async def test_update_whose_function_raises_stores_nothing() -> None:
    def explode(value: int) -> int:
        raise ArithmeticError("no")

    store = {"n": 1}
    assert isinstance(await store_error(lambda s: s.update("n", explode), store), ArithmeticError)
    assert store == {"n": 1}


async def kept_async(value: Any) -> Any:
    """An update function that is an async def: what an update may not be given."""
    return value


@pytest.mark.parametrize("run_id", [None, "durable"])
async def test_an_update_whose_function_is_async_stores_nothing(
    tmp_path: Path, run_id: str | None
) -> None:
    """Applied by the store actor, or staged by a durable step: a TypeError either way."""
    storage = cf.FileStorage(tmp_path / "store.json")

    @cf.node
    async def updates(ctx: cf.ExecutionContext) -> cf.Action:
        return cf.Action.complete(await ctx.store.update("n", kept_async, 1))

    with pytest.raises(cf.NodeError) as info:
        await single(updates).run(storage, run_id=run_id)
    assert str(info.value.__cause__) == (
        "the update function of key 'n' returned an awaitable (coroutine): it must be a "
        "plain def returning the new value"
    )
    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        assert await store.keys() == []


async def test_dataclasses_round_trip_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "points.json"
    await in_run(lambda store: store.set("p", Point(1, 2)), cf.FileStorage(path))
    assert await in_run(lambda store: store.get("p", type=Point), cf.FileStorage(path)) == Point(
        1, 2
    )


async def test_a_value_the_file_cannot_encode_stores_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await in_run(lambda store: store.set("kept", 1), cf.FileStorage(path))
    before = path.read_bytes()
    error = await store_error(lambda store: store.set("bad", object()), cf.FileStorage(path))
    assert isinstance(error, cf.StorageError)
    assert "'bad'" in str(error) and "object" in str(error)
    assert path.read_bytes() == before


async def test_set_many_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    storage = cf.FileStorage(path)
    await in_run(lambda store: store.set("a", "old"), storage)
    error = await store_error(lambda store: store.set_many({"a": "new", "b": object()}), storage)
    assert isinstance(error, cf.StorageError)
    assert await in_run(lambda store: store.get_many(["a", "b"]), storage) == {"a": "old"}


async def test_get_many_refuses_keys_that_are_not_str() -> None:
    error = await store_error(lambda store: store.get_many([["x"]]))
    assert isinstance(error, TypeError)
    assert "str" in str(error)


class LosesACall(cf.Node):
    """In a run with ``params["lose"]``, calls ``store.<op>("k", ...)`` in ``phase`` and
    never awaits it; the other runs wait in exec for ``release`` and count themselves in
    "good"."""

    def __init__(self, phase: str, op: str) -> None:
        super().__init__()
        self.phase = phase
        self.op = op
        self.release = trio.Event()
        self.waiting = 0

    def lose(self, store: cf.SharedStore, phase: str, ctx: cf.ExecutionContext) -> None:
        if phase != self.phase or not ctx.params["lose"]:
            return
        if self.op == "get":
            _ = store.get("k")
        elif self.op == "set":
            _ = store.set("k", "lost")
        else:
            _ = store.update("k", lambda value: "lost")

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
        self.lose(store, "prep", ctx)

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.lose(ctx.store, "exec", ctx)
        if not ctx.params["lose"]:
            self.waiting += 1
            await self.release.wait()

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        self.lose(store, "post", ctx)
        if not ctx.params["lose"]:
            await store.update("good", lambda n: n + 1, default=0)


@pytest.mark.parametrize("op", ["get", "set", "update"])
@pytest.mark.parametrize("phase", ["prep", "exec", "post"])
async def test_a_store_call_never_awaited_fails_its_run_alone(phase: str, op: str) -> None:
    node = LosesACall(phase, op)
    flow = cf.Flow.builder("lossy").add_node("careless", node).build()
    data: dict[str, Any] = {"k": "before"}
    async with cf.open_engine() as engine:
        others = [await engine.start_run(flow, data, params={"lose": False}) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert node.waiting == 3
        with pytest.raises(cf.NodeError) as info:
            await engine.run(flow, data, params={"lose": True}, run_id="lost")
        assert data == {"k": "before"}
        node.release.set()
        for run in others:
            assert (await run.wait()).success
        assert (await engine.run(flow, data, params={"lose": False})).success
        assert engine.statistics().runs_failed == 1
    error = info.value
    assert (error.node_id, error.phase, error.run_id) == ("careless", phase, "lost")
    assert "node 'careless' failed in " + phase in str(error)
    cause = error.__cause__
    assert isinstance(cause, RuntimeError)
    assert f"store.{op}('k') in {phase} of node 'careless' was never awaited" in str(cause)
    assert data == {"k": "before", "good": 4}


class ManyCalls(cf.Node):
    """prep loses one call, then awaits a thousand; notes how many calls its store
    handle remembers then."""

    remembered = 0

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
        _ = store.set("lost", 1)
        for _ in range(1000):
            await store.get("k", None)
        self.remembered = len(store._made or [])


async def test_a_phase_making_many_calls_keeps_few_and_still_finds_the_lost_one() -> None:
    node = ManyCalls()
    with pytest.raises(cf.NodeError) as info:
        await single(node).run({})
    assert node.remembered < 2 * FORGET_AT
    assert "store.set('lost') in prep of node 'only' was never awaited" in str(info.value.__cause__)


async def test_a_durable_step_that_never_awaits_a_write_commits_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    await in_run(lambda store: store.set("k", "before"), cf.FileStorage(path))
    flow = cf.Flow.builder("lossy").add_node("careless", LosesACall("post", "set")).build()
    with pytest.raises(cf.NodeError) as info:
        await flow.run(cf.FileStorage(path), params={"lose": True}, run_id="durable")
    assert "never awaited" in str(info.value.__cause__)
    assert await in_run(lambda store: store.get("k"), cf.FileStorage(path)) == "before"
    records = await cf.list_runs(cf.FileStorage(path))
    assert [(r.run_id, r.state) for r in records] == [("durable", "failed")]


def storage_for(kind: str, tmp_path: Path) -> tuple[cf.Storage, str | None]:
    """A memory storage, or a file storage with a run id (so the run is durable)."""
    if kind == "memory":
        return cf.MemoryStorage(), None
    return cf.FileStorage(tmp_path / "store.json"), "durable"


async def stored(storage: cf.Storage) -> dict[str, Any]:
    """What ``storage`` holds, read through a fresh instance for a file."""
    if isinstance(storage, cf.FileStorage):
        storage = cf.FileStorage(storage.path)
    keys = ["k0", "k1", "k2", "n", "seen", "gathered"]
    found: dict[str, Any] = await in_run(lambda store: store.get_many(keys), storage)
    return found


class WritesFromANursery(cf.Node):
    """post starts one ``store.set`` task per key in a nursery it opens."""

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        async with trio.open_nursery() as nursery:
            for index in range(3):
                nursery.start_soon(store.set, f"k{index}", index)


@pytest.mark.parametrize("kind", ["memory", "durable"])
async def test_store_calls_started_as_tasks_of_a_nursery_in_post_are_stored(
    kind: str, tmp_path: Path
) -> None:
    storage, run_id = storage_for(kind, tmp_path)
    flow = cf.Flow.builder("tasks").add_node("writer", WritesFromANursery()).build()
    assert (await flow.run(storage, run_id=run_id)).success
    assert await stored(storage) == {"k0": 0, "k1": 1, "k2": 2}


def increment(value: int) -> int:
    return value + 1


class CarefulInEveryWay(cf.Node):
    """Awaits every store call it makes: at once, as tasks of a nursery, and later in
    the same phase."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.set, "gathered", True)
            nursery.start_soon(store.update, "n", increment, 0)

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> Any:
        return await ctx.store.get("n")

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        pending = [store.update("n", increment), store.update("n", increment)]
        later = store.set("seen", exec_res)
        results = [await call for call in pending]
        await later
        return cf.Action.complete([exec_res, *results])


@pytest.mark.parametrize("kind", ["memory", "durable"])
async def test_store_calls_awaited_later_or_in_a_nursery_do_not_fail_the_run(
    kind: str, tmp_path: Path
) -> None:
    storage, run_id = storage_for(kind, tmp_path)
    flow = cf.Flow.builder("careful").add_node("careful", CarefulInEveryWay()).build()
    result = await flow.run(storage, run_id=run_id)
    assert result.result == [1, 2, 3]
    assert await stored(storage) == {"gathered": True, "n": 3, "seen": 1}


async def every_call(store: cf.SharedStore) -> list[Any]:
    """Every SharedStore call, on a store holding ``{"old": 0}``; the answers."""
    seen: list[Any] = [await store.get("old"), await store.contains("old")]
    await store.set("a", 1)
    await store.set_many({"b": [1, 2], "c": "x"})
    seen += [await store.get("a"), await store.get("a", type=int), await store.keys()]
    seen += [await store.update("a", lambda n: n + 1), await store.update("n", len, "ab")]
    seen += [await store.get_many(["a", "old", "missing"]), await store.size()]
    seen += [await store.delete("a"), await store.delete("a"), await store.contains("a")]
    seen += [await store.get("a", "fallback"), await store.size()]
    await store.clear()
    seen += [await store.keys(), await store.get("old", None)]
    await store.set("after", True)
    return seen


async def test_a_durable_steps_staged_handle_answers_as_a_plain_handle(tmp_path: Path) -> None:
    """A durable step's handle stages its writes and reads them back: every call
    answers what it answers on memory storage, and the commit stores the same."""
    memory: dict[str, Any] = {"old": 0}
    plain = await in_run(every_call, memory)
    path = tmp_path / "store.json"
    await in_run(lambda store: store.set("old", 0), cf.FileStorage(path))

    @cf.node
    async def step(ctx: cf.ExecutionContext) -> cf.Action:
        return cf.Action.complete(await every_call(ctx.store))

    flow = cf.Flow.builder("staged").add_node("step", step).build()
    result = await flow.run(cf.FileStorage(path), run_id="durable")
    assert result.result == plain
    stored = await in_run(lambda store: store.get_many(["old", "a", "after"]), cf.FileStorage(path))
    assert stored == memory == {"after": True}


async def test_a_durable_steps_clear_leaves_the_engines_records_readable(tmp_path: Path) -> None:
    """A clear staged in a durable step removes no key under RESERVED_PREFIX, in what
    the step reads as in what its commit stores."""
    record = f"{RECORD_PREFIX}first"

    @cf.node
    async def step(ctx: cf.ExecutionContext) -> cf.Action:
        await ctx.store.set("mine", 1)
        await ctx.store.clear()
        seen = [await ctx.store.get(record, None) is not None, await ctx.store.contains(record)]
        seen += [sorted(await ctx.store.get_many([record, "mine"]))]
        return cf.Action.complete([*seen, await ctx.store.get("mine", None)])

    storage = cf.FileStorage(tmp_path / "store.json")
    flow = cf.Flow.builder("clears").add_node("step", step).build()
    await flow.run(storage, run_id="first")
    result = await flow.run(storage, run_id="second")
    assert result.result == [True, True, [record], None]
    assert await in_run(lambda store: store.contains(record), storage)


async def test_a_durable_steps_keys_are_in_the_order_a_plain_step_sees(tmp_path: Path) -> None:
    """A key that a durable step deletes (or clears) and sets again goes to the end, as
    in a step that is not durable and in the store once the step is committed."""

    async def reorder(store: cf.SharedStore) -> list[list[str]]:
        await store.delete("a")
        await store.set("a", 3)
        seen = [await store.keys()]
        await store.clear()
        await store.delete("c")
        await store.set("d", 4)
        await store.set("c", 5)
        return [*seen, await store.keys()]

    async def seeded(name: str) -> cf.FileStorage:
        storage = cf.FileStorage(tmp_path / name)
        await in_run(lambda store: store.set_many({"a": 1, "b": 2}), storage)
        return storage

    plain = await in_run(reorder, await seeded("plain.json"))

    @cf.node
    async def step(ctx: cf.ExecutionContext) -> cf.Action:
        return cf.Action.complete(await reorder(ctx.store))

    durable = await seeded("durable.json")
    result = await cf.Flow.builder("order").add_node("step", step).build().run(durable, run_id="r")
    assert result.result == plain == [["b", "a"], ["d", "c"]]
    assert await in_run(lambda store: store.keys(), durable) == ["d", "c"]


async def test_a_durable_step_stores_a_value_as_it_was_set(tmp_path: Path) -> None:
    """A durable step stages a value encoded, as the backend holds it: changing the
    object after the set changes neither what the step reads nor what is committed,
    each read is a fresh copy, and a tuple reads back as a list; as in a plain step."""

    async def mutate(store: cf.SharedStore) -> list[Any]:
        value = [1]
        await store.set("k", value)
        value.append(2)
        first = await store.get("k")
        first.append(3)
        await store.set_many({"t": (1, "a")})
        return [await store.get("k"), await store.get_many(["t"])]

    plain = await in_run(mutate, cf.SQLiteStorage(tmp_path / "plain.db"))

    @cf.node
    async def step(ctx: cf.ExecutionContext) -> cf.Action:
        return cf.Action.complete(await mutate(ctx.store))

    durable = cf.SQLiteStorage(tmp_path / "durable.db")
    result = await cf.Flow.builder("as set").add_node("step", step).build().run(durable, run_id="r")
    assert result.result == plain == [[1], {"t": [1, "a"]}]
    assert await in_run(lambda store: store.get("k"), durable) == [1]


def test_calls_lost_through_a_detached_handle_fail_the_step_they_are_handed_to() -> None:
    """What exec on a thread, a process or Ray leaves unawaited reaches the step's check,
    told apart from the calls the step lost itself."""
    step = StagedStore(SharedStore(Unreachable("s"), cf.MemoryStorage(), "s"))
    away = detached(step)
    made = away.set("k", 1)
    _ = away.get("g")
    lost = lost_calls(away)
    assert lost == [("SET", "k"), ("GET", "g")]
    assert inspect.getcoroutinestate(made) == "CORO_CLOSED"
    assert lost_calls(away) == []
    assert all_awaited(step)
    _ = step.delete("here")
    hand_over(lost, step)
    assert not all_awaited(step)
    assert unawaited(step) == (["delete('here')"], ["set('k')", "get('g')"])
