"""One test suite for every backend: memory, file, SQLite, Redis, a custom Storage, and
those of your own that ``COSMOFLOW_TEST_STORAGE`` names (see tests/storage_suite.py).

The first half calls the backend directly, as the store actor does; the second half goes
through the engine and the whole SharedStore API. Backends differ only where their
:class:`~tests.storage_suite.Backend` flags say so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import math
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cosmoflow_actors as cf
from cosmoflow_actors.storage.base import RECORD_PREFIX
from tests.storage_suite import (
    BACKENDS,
    BUILT_IN,
    CODECS,
    ENCODING,
    EXTERNAL,
    ORDERED,
    PERSISTENT,
    WRITTEN_RAW,
    Backend,
    JsonDictStorage,
    external_backend,
    external_backends,
    file_size_limit,
    make_backend,
)
from tests.support import Recorder, in_run, single

ODD_KEYS = [
    "",
    "ünïcødé ключ 🔑 鍵",
    "a/b/c",
    "../../etc/passwd",
    "/absolute",
    "C:\\windows\\path",
    ".",
    "with\nnewline and \x00 nul",
    "k" * 10_000,
]


@dataclasses.dataclass
class Point:
    x: int
    y: float


@pytest.fixture(params=BACKENDS)
def chosen_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn, over fresh data; ``@persistent`` and ``@encoding`` narrow it
    to those that keep that promise (an external backend that does not is skipped,
    saying so), ``@codecs`` to the built-in persistent ones. A plain fixture: the
    reason of a skip raised in an async one is lost (pytest-trio reports "Skipped")."""
    name, promise = request.param if isinstance(request.param, tuple) else (request.param, "")
    chosen = make_backend(name, tmp_path, request)
    if promise and not getattr(chosen, promise):
        assert name in EXTERNAL, f"{name!r} is listed as {promise} but does not promise it"
        pytest.skip(f"{name} does not promise {promise} (see tests.storage_suite.Backend)")
    return chosen


@pytest.fixture
async def backend(chosen_backend: Backend) -> AsyncIterator[Backend]:
    """The chosen backend; the instances the test made with ``Backend.instance`` are
    closed after it."""
    yield chosen_backend
    await chosen_backend.aclose()


def for_backends(promise: str, built_in: list[str]) -> pytest.MarkDecorator:
    """Run a test on the ``built_in`` backends, which keep ``promise`` (a
    :class:`Backend` property), and on every external one that does."""
    names = [*built_in, *EXTERNAL]
    params = [pytest.param((name, promise), id=name) for name in names]
    return pytest.mark.parametrize("chosen_backend", params, indirect=True)


persistent = for_backends("persistent", PERSISTENT)
"""Only the backends whose data outlives the instance."""
encoding = for_backends("encoding", ENCODING)
"""Only the backends that store values encoded (not memory, which keeps the objects)."""
codecs = pytest.mark.parametrize("chosen_backend", CODECS, indirect=True)
"""Only the backends that take ``codec=`` (the built-in persistent ones)."""
written_raw = for_backends("write_raw", WRITTEN_RAW)
"""Only the backends that other clients may write to."""


async def committed(backend: Backend, **values: Any) -> cf.Storage:
    storage = await backend.instance()
    await storage.open()
    for key, value in values.items():
        await storage.set(key, value)
    await storage.commit()
    return storage


async def contents(storage: cf.Storage) -> dict[str, Any]:
    return {key: await storage.get(key) for key in await storage.keys()}


# --- the Storage contract, called directly ------------------------------------------------


async def test_set_get_delete_keys_contains_size(backend: Backend) -> None:
    storage = await committed(backend, z=1, a={"nested": [1, "two", None]}, m="text")

    keys = await storage.keys()
    assert keys == ["z", "a", "m"] if backend.ordered else sorted(keys) == ["a", "m", "z"]
    assert await storage.get("a") == {"nested": [1, "two", None]}
    assert await storage.contains("m") is True
    assert await storage.size() == 3
    assert await storage.delete("m") is True
    assert await storage.delete("m") is False
    assert await storage.contains("m") is False
    assert await storage.size() == 2
    await storage.commit()
    assert await contents(await backend.instance()) == {"z": 1, "a": {"nested": [1, "two", None]}}


@for_backends("ordered", ORDERED)
async def test_keys_keep_the_order_a_dict_keeps(backend: Backend) -> None:
    storage = await committed(backend, a=1, b=2, c=3)

    await storage.set("a", 10)  # set again: keeps its place
    await storage.delete("b")
    await storage.set("b", 20)  # deleted and set again: goes to the end
    staged = await storage.keys()
    await storage.commit()

    assert staged == ["a", "c", "b"]
    assert await (await backend.instance()).keys() == ["a", "c", "b"]


async def test_get_many_answers_as_one_get_per_key(backend: Backend) -> None:
    """Over committed values, staged writes and deletes, missing keys, a repeated key
    and a key that is not valid Unicode; in the order of the keys asked for."""
    storage = await committed(backend, a=1, b=2, c=3)
    await storage.set("b", 20)
    await storage.delete("c")
    await storage.set("d", 4)
    wanted = ["d", "missing", "c", "a", "\ud800", "b", "a"]

    one_by_one = {}
    for key in wanted:
        with contextlib.suppress(KeyError):
            one_by_one[key] = await storage.get(key)
    found = await storage.get_many(wanted)

    assert found == one_by_one == {"d": 4, "a": 1, "b": 20}
    assert list(found) == ["d", "a", "b"]


@written_raw
async def test_get_many_names_a_value_it_cannot_decode_as_get_does(backend: Backend) -> None:
    """Another client stored it: StorageError naming the store and the key, from get
    and from a get_many of it among good keys; a staged write over it hides it."""
    storage = await committed(backend, a=1, b=2)
    assert backend.write_raw is not None
    backend.write_raw("bad", b"{oops")
    named = f"^{re.escape(repr(storage))}: cannot read key 'bad'"

    with pytest.raises(cf.StorageError, match=named):
        await storage.get("bad")
    with pytest.raises(cf.StorageError, match=named):
        await storage.get_many(["a", "bad", "b"])
    await storage.delete("bad")
    assert await storage.get_many(["a", "bad", "b"]) == {"a": 1, "b": 2}
    await storage.set("bad", 3)
    assert await storage.get_many(["a", "bad", "b"]) == {"a": 1, "bad": 3, "b": 2}


async def test_missing_key(backend: Backend) -> None:
    storage = await backend.instance()

    with pytest.raises(KeyError):
        await storage.get("absent")
    assert await storage.contains("absent") is False
    assert await storage.delete("absent") is False


async def test_keys_with_prefix_gives_the_keys_starting_with_it_staged_writes_too(
    backend: Backend,
) -> None:
    storage = await committed(
        backend,
        **{
            f"{RECORD_PREFIX}a": 1,
            f"{RECORD_PREFIX}a:1/0": 2,
            f"{RECORD_PREFIX[:-1]}x": 3,
            "__cosmoflow__/parts/a/path/0": 4,
            "run/a": 5,
            "é/x": 6,
            "éa": 7,
        },
    )
    await storage.set(f"{RECORD_PREFIX}b", 8)
    await storage.delete(f"{RECORD_PREFIX}a:1/0")
    await storage.set("run/b", 9)
    expected = {
        RECORD_PREFIX: [f"{RECORD_PREFIX}a", f"{RECORD_PREFIX}b"],
        f"{RECORD_PREFIX}a": [f"{RECORD_PREFIX}a"],
        "__cosmoflow__/": [
            f"{RECORD_PREFIX}a",
            f"{RECORD_PREFIX}b",
            f"{RECORD_PREFIX[:-1]}x",
            "__cosmoflow__/parts/a/path/0",
        ],
        "run/": ["run/a", "run/b"],
        "é": ["é/x", "éa"],
        "none": [],
    }

    async def listed() -> dict[str, list[str]]:
        return {prefix: sorted(await storage.keys_with_prefix(prefix)) for prefix in expected}

    staged = await listed()
    await storage.commit()
    assert staged == await listed() == {prefix: sorted(keys) for prefix, keys in expected.items()}
    assert sorted(await storage.keys_with_prefix("")) == sorted(await storage.keys())
    await storage.clear()
    await storage.set(f"{RECORD_PREFIX}c", 10)
    assert await storage.keys_with_prefix("__cosmoflow__/") == [f"{RECORD_PREFIX}c"]


async def test_clear(backend: Backend) -> None:
    storage = await committed(backend, a=1, b=2)

    await storage.clear()
    await storage.set("c", 3)
    await storage.commit()

    assert await contents(await backend.instance()) == {"c": 3}


@persistent
async def test_a_new_instance_sees_what_was_committed(backend: Backend) -> None:
    await committed(backend, n=1, f=2.5, s="text", b=True, none=None, l=[1, [2]])

    assert await contents(await backend.instance()) == {
        "n": 1,
        "f": 2.5,
        "s": "text",
        "b": True,
        "none": None,
        "l": [1, [2]],
    }


async def test_odd_keys_round_trip_and_never_become_paths(backend: Backend, tmp_path: Path) -> None:
    await committed(backend, **{key: index for index, key in enumerate(ODD_KEYS)})
    names = {name for _, folders, files in os.walk(tmp_path) for name in [*folders, *files]}

    reopened = await backend.instance()

    assert [await reopened.get(key) for key in ODD_KEYS] == list(range(len(ODD_KEYS)))
    assert sorted(await reopened.keys()) == sorted(ODD_KEYS)
    assert not names & {"etc", "passwd", "a", "b", "c", "absolute", "windows", "path"}


async def test_a_ten_megabyte_value_round_trips(backend: Backend) -> None:
    value = {"blob": "x" * 10_000_000, "tail": [1, 2, 3]}
    await committed(backend, big=value)

    assert await (await backend.instance()).get("big") == value


@encoding
async def test_an_unencodable_value_raises_and_stores_nothing(backend: Backend) -> None:
    storage = await committed(backend, kept=1)

    with pytest.raises(cf.StorageError):
        await storage.set("new", object())
    with pytest.raises(cf.StorageError):
        await storage.set("kept", [object()])
    await storage.commit()

    assert await storage.contains("new") is False
    assert await storage.get("kept") == 1
    assert await contents(await backend.instance()) == {"kept": 1}


@encoding
async def test_get_returns_a_fresh_copy(backend: Backend) -> None:
    storage = await committed(backend, d={"l": [1]})

    (await storage.get("d"))["l"].append(2)

    assert await storage.get("d") == {"l": [1]}


async def test_a_key_that_is_not_valid_unicode_is_missing(backend: Backend) -> None:
    storage = await backend.instance()

    with pytest.raises(KeyError):
        await storage.get("\ud800")
    assert await storage.contains("\ud800") is False
    assert await storage.delete("\ud800") is False


@codecs
async def test_a_key_that_is_not_valid_unicode_is_never_stored(backend: Backend) -> None:
    storage = await backend.instance()

    with pytest.raises(cf.StorageError, match="key"):
        await storage.set("\ud800", 1)

    assert await storage.size() == 0


@pytest.mark.parametrize("chosen_backend", BUILT_IN, indirect=True)
async def test_non_str_key_raises_type_error(backend: Backend) -> None:
    storage = await backend.instance()

    with pytest.raises(TypeError):
        await storage.set(1, "one")  # type: ignore[arg-type]

    assert await storage.size() == 0


@pytest.mark.parametrize("chosen_backend", ["memory", "file", "sqlite", "redis"], indirect=True)
async def test_a_non_str_key_is_missing(backend: Backend) -> None:
    storage = await committed(backend, a=1)
    await storage.set("b", 2)  # staged, on the backends that stage

    for key in (1, b"a", None):
        with pytest.raises(KeyError):
            await storage.get(key)  # type: ignore[arg-type]
        assert await storage.contains(key) is False  # type: ignore[arg-type]
        assert await storage.delete(key) is False  # type: ignore[arg-type]
        assert await storage.get_many([key, "a", "b"]) == {"a": 1, "b": 2}  # type: ignore[list-item]
    assert sorted(await storage.keys()) == ["a", "b"]


async def test_update_hook(backend: Backend) -> None:
    storage = await backend.instance()

    assert await storage.update("n", lambda n: n + 1, 0) == 1
    assert await storage.update("n", lambda n: n * 10, 0) == 10
    with pytest.raises(ZeroDivisionError):
        await storage.update("n", lambda n: n / 0, 0)
    await storage.commit()

    assert await (await backend.instance()).get("n") == 10


@encoding
async def test_update_of_an_unencodable_result_stores_nothing(backend: Backend) -> None:
    storage = await committed(backend, n=1)

    with pytest.raises(cf.StorageError):
        await storage.update("n", lambda n: object(), 0)
    await storage.commit()

    assert await (await backend.instance()).get("n") == 1


@codecs
async def test_the_json_codec_stores_dataclasses_and_tuples_as_json(backend: Backend) -> None:
    storage = await backend.instance(codec="json")
    await storage.set("p", Point(1, 2.5))
    await storage.set("t", (1, 2))
    await storage.commit()

    assert await contents(await backend.instance()) == {"p": {"x": 1, "y": 2.5}, "t": [1, 2]}
    assert await in_run(
        lambda store: store.get("p", type=Point), await backend.instance()
    ) == Point(1, 2.5)


@codecs
@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), {"readings": [1.5, float("-inf")]}, (1, float("nan"))],
    ids=["nan", "inf", "nested", "tuple"],
)
async def test_the_json_codec_refuses_a_float_it_would_change(backend: Backend, value: Any) -> None:
    storage = await committed(backend, kept=1)

    with pytest.raises(cf.StorageError, match=r"key 'x': a value of type \w+ holds the float"):
        await storage.set("x", value)
    await storage.commit()

    assert await contents(await backend.instance()) == {"kept": 1}


EXACT = {
    "set": ({1, 2}, set[int]),
    "frozenset": (frozenset({"a"}), frozenset[str]),
    "tuple": ((1, "a", None), tuple[int, str, None]),
    "bytes": (b"\x00\xff", bytes),
    "bytearray": (bytearray(b"\x01"), bytearray),
    "datetime": (datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.UTC), datetime.datetime),
    "decimal": (decimal.Decimal("1.10"), decimal.Decimal),
    "uuid": (uuid.UUID(int=7), uuid.UUID),
    "negative zero": (-0.0, float),
    "big int": (2**80, int),
}
"""Values the JSON codec stores as another JSON type, each with the type that restores it."""


@codecs
async def test_the_json_codec_gives_back_exact_values_when_asked_for_their_type(
    backend: Backend,
) -> None:
    await in_run(
        lambda store: store.set_many({k: v for k, (v, _) in EXACT.items()}),
        await backend.instance(),
    )

    async def typed(store: cf.SharedStore) -> dict[str, Any]:
        return {key: await store.get(key, type=kind) for key, (_, kind) in EXACT.items()}

    restored = await in_run(typed, await backend.instance())

    assert restored == {key: value for key, (value, _) in EXACT.items()}
    assert {key: type(value) for key, value in restored.items()} == {
        key: type(value) for key, (value, _) in EXACT.items()
    }
    assert math.copysign(1, restored["negative zero"]) == -1


@codecs
async def test_the_pickle_codec_keeps_every_value_exactly(backend: Backend) -> None:
    storage = await backend.instance(codec="pickle")
    values = {key: value for key, (value, _) in EXACT.items()}
    await storage.set("values", values)
    await storage.set("nan", float("nan"))
    await storage.commit()

    reopened = await backend.instance(codec="pickle")

    assert await reopened.get("values") == values
    assert math.isnan(await reopened.get("nan"))


@codecs
async def test_the_pickle_codec_round_trips_arbitrary_objects(backend: Backend) -> None:
    storage = await backend.instance(codec="pickle")
    value = {"point": Point(3, 4.0), "tuple": (1, 2), "set": {1, 2}, "function": lambda x: x + 1}
    await storage.set("value", value)
    await storage.commit()

    stored = await (await backend.instance(codec="pickle")).get("value")

    assert stored["point"] == Point(3, 4.0)
    assert (stored["tuple"], stored["set"], stored["function"](1)) == ((1, 2), {1, 2}, 2)


@codecs
async def test_a_store_opened_with_another_codec_is_refused(backend: Backend) -> None:
    await committed(backend, a=1)

    with pytest.raises(cf.StorageError, match="codec"):
        await (await backend.instance(codec="pickle")).open()
    assert await (await backend.instance(codec="json")).get("a") == 1


@codecs
async def test_the_pickle_codec_is_never_chosen_implicitly(backend: Backend) -> None:
    pickled = await backend.instance(codec="pickle")
    await pickled.set("a", 1)
    await pickled.commit()

    with pytest.raises(cf.StorageError, match="codec='pickle'"):
        await (await backend.instance()).open()
    with pytest.raises(ValueError, match="codec"):
        await backend.instance(codec="marshal")


# --- the suite itself: a backend of your own joins it ------------------------------------


BACKENDS_MODULE = """
from tests.storage_suite import Backend, JsonDictStorage


def mine(directory):
    data = {}
    return Backend("mine", lambda: JsonDictStorage(data))
"""


def test_a_backend_of_your_own_is_found_by_module_and_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"backends_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(BACKENDS_MODULE)
    monkeypatch.syspath_prepend(tmp_path)

    found = external_backends(f" {module}:mine ,")

    assert found == {"mine": f"{module}:mine"}
    assert external_backend(found["mine"])(tmp_path).name == "mine"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("tests.storage_suite", "is not of the form module:function"),
        (":mine", "is not of the form module:function"),
        ("tests.storage_suite:sqlite", "the name 'sqlite' is taken"),
        ("a:make_backend", "the name 'make_backend' is taken"),
    ],
)
def test_an_entry_of_the_wrong_form_is_refused_naming_it(entry: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        external_backends(f"tests.storage_suite:make_backend,{entry}")

    assert f"COSMOFLOW_TEST_STORAGE: {entry!r}" in str(info.value)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("tests.no_such_module:mine", "cannot import module 'tests.no_such_module'"),
        ("tests.storage_suite:absent", "module 'tests.storage_suite' has no function 'absent'"),
    ],
)
def test_an_entry_that_names_no_function_is_refused_naming_it(entry: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        external_backend(entry)

    assert f"COSMOFLOW_TEST_STORAGE: {entry!r}" in str(info.value)
    assert problem in str(info.value)


class LoadedInOpen(JsonDictStorage):
    """A backend that loads its data in ``open`` (counted), as most persistent ones do."""

    def __init__(self, data: dict[str, str]) -> None:
        super().__init__(data)
        self.opened = 0

    async def open(self) -> None:
        self.opened += 1


async def test_the_suite_opens_an_instance_before_its_first_call() -> None:
    backend = Backend("loaded", lambda: LoadedInOpen({}))

    storage = await backend.instance()

    assert isinstance(storage, LoadedInOpen)
    assert storage.opened == 1


# --- through the engine: the SharedStore API -----------------------------------------------


async def test_the_shared_store_api(backend: Backend) -> None:
    async def body(store: cf.SharedStore) -> dict[str, Any]:
        await store.set("a", 1)
        await store.set_many({"b": [2], "t": (1, 2.0)})
        seen = {
            "get": await store.get("a"),
            "default": await store.get("absent", "fallback"),
            "typed": await store.get("t", type=tuple[int, float]),
            "update": await store.update("a", lambda a: a + 1),
            "update_default": await store.update("c", lambda c: c + 1, default=0),
            "delete": await store.delete("b"),
            "delete_again": await store.delete("b"),
            "contains": await store.contains("a"),
            "keys": sorted(await store.keys()),
            "size": await store.size(),
            "many": await store.get_many(["a", "b", "c"]),
        }
        with pytest.raises(cf.StoreKeyError):
            await store.get("absent")
        with pytest.raises(cf.StoreKeyError):
            await store.update("absent", lambda value: value)
        await store.clear()
        seen["after_clear"] = await store.size()
        return seen

    seen = await in_run(body, await backend.instance())

    assert seen == {
        "get": 1,
        "default": "fallback",
        "typed": (1, 2.0),
        "update": 2,
        "update_default": 1,
        "delete": True,
        "delete_again": False,
        "contains": True,
        "keys": ["a", "c", "t"],
        "size": 3,
        "many": {"a": 2, "c": 1},
        "after_clear": 0,
    }


@encoding
async def test_set_many_is_all_or_nothing(backend: Backend) -> None:
    await committed(backend, a="old")

    async def body(store: cf.SharedStore) -> Any:
        with pytest.raises(cf.StorageError):
            await store.set_many({"a": "new", "b": object()})
        return await store.get_many(["a", "b"])

    assert await in_run(body, await backend.instance()) == {"a": "old"}
    assert await contents(await backend.instance()) == {"a": "old"}


@encoding
async def test_an_unencodable_value_fails_only_its_run(backend: Backend) -> None:

    @cf.node
    async def write(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set(ctx.params["key"], ctx.params["value"])

    flow = single(write)
    storage = await backend.instance()
    async with cf.open_engine() as engine:
        assert (await engine.run(flow, storage, params={"key": "a", "value": 1})).success
        with pytest.raises(cf.NodeError) as info:
            await engine.run(flow, storage, params={"key": "b", "value": object()})
        assert isinstance(info.value.__cause__, cf.StorageError)
        assert (await engine.run(flow, storage, params={"key": "c", "value": 3})).success

    assert await contents(await backend.instance()) == {"a": 1, "c": 3}


async def test_a_thousand_runs_of_ten_increments_count_to_ten_thousand(
    backend: Backend,
) -> None:
    @cf.node
    async def increment(ctx: cf.ExecutionContext) -> None:
        for _ in range(10):
            await ctx.store.update("counter", lambda n: n + 1, default=0)

    flow = single(increment)
    storage = await backend.instance()
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow, storage) for _ in range(1000)]
        results = [await run.wait() for run in runs]

    assert all(result.success for result in results)
    assert await in_run(lambda store: store.get("counter"), await backend.instance()) == 10_000


@persistent
async def test_runs_see_what_earlier_runs_committed(backend: Backend) -> None:
    await in_run(lambda store: store.set_many({"x": 1, "y": "two"}), await backend.instance())

    assert await in_run(lambda store: store.get_many(["x", "y"]), await backend.instance()) == {
        "x": 1,
        "y": "two",
    }


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_a_full_disk_fails_the_writing_run_only(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    backend = make_backend(kind, tmp_path, request)
    await committed(backend, kept="before")

    @cf.node
    async def write(ctx: cf.ExecutionContext) -> None:
        if ctx.params.get("fill"):
            with file_size_limit():
                await ctx.store.set("big", "x" * 200_000)
        else:
            await ctx.store.set("small", 1)

    flow = single(write)
    storage = await backend.instance()
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError) as info:
            await engine.run(flow, storage, params={"fill": True})
        assert isinstance(info.value.__cause__, cf.StorageError)
        assert (await engine.run(flow, storage)).success

    assert await contents(await backend.instance()) == {"kept": "before", "small": 1}
    await backend.aclose()


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "plain"])
@pytest.mark.parametrize("chosen_backend", ["sqlite", "redis"], indirect=True)
async def test_updates_on_two_instances_are_not_lost(backend: Backend, durable: bool) -> None:
    """Two instances over one store stand for two processes. An update reads and writes
    in a transaction of the backend's own (SQLite's BEGIN IMMEDIATE, Redis's
    WATCH/MULTI/EXEC), and so does a durable step's commit (Storage.commit_step), so
    updates from both all land."""
    storages = [await backend.instance(), await backend.instance()]

    @cf.node
    async def bump(ctx: cf.ExecutionContext) -> None:
        await ctx.store.update("count", lambda n: n + 1, default=0)
        name = ctx.params.get("id", ctx.run_id)
        await ctx.store.update("log", lambda log: [*log, name], default=[])

    flow = cf.Flow.builder("bump").add_node("bump", bump).build()
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        for index in range(50):
            for name, storage in zip("ab", storages, strict=True):
                run_id = f"{name}{index}"
                options = {"run_id": run_id} if durable else {"params": {"id": run_id}}
                nursery.start_soon(partial(engine.run, flow, storage, **options))
    reader = await backend.instance()
    assert await reader.get("count") == 100
    assert sorted(await reader.get("log")) == sorted(f"{n}{i}" for n in "ab" for i in range(50))
    for storage in [reader, *storages]:
        await storage.aclose()


# --- durable steps: a step's writes and its record, in one commit -------------------------


async def user_contents(storage: cf.Storage) -> dict[str, Any]:
    """The contents without the engine's run records."""
    stored = await contents(storage)
    return {key: value for key, value in stored.items() if not key.startswith("__cosmoflow__/")}


@persistent
async def test_a_durable_step_applies_its_writes_in_order(backend: Backend) -> None:
    """clear, delete, set and update of one durable step land together, in order, and
    leave the run records alone."""
    storage = await committed(backend, keep="old", gone=1, n=1)

    @cf.node
    async def rewrite(ctx: cf.ExecutionContext) -> None:
        await ctx.store.delete("gone")
        await ctx.store.clear()
        await ctx.store.set("keep", "new")
        await ctx.store.update("n", lambda n: n + 1, default=10)
        await ctx.store.set("after", [1, 2])

    flow = cf.Flow.builder("rewrite").add_node("rewrite", rewrite).build()
    async with cf.open_engine() as engine:
        await engine.run(flow, storage, run_id="r")
        records = await engine.list_runs(storage)

    assert await user_contents(await backend.instance()) == {
        "keep": "new",
        "n": 11,
        "after": [1, 2],
    }
    assert [(r.run_id, r.state, r.steps) for r in records] == [("r", "succeeded", 1)]


@persistent
async def test_a_durable_step_that_cannot_be_encoded_stores_nothing(backend: Backend) -> None:
    """The step's commit fails as a whole: none of its writes land, its record stays at
    no step, and the run fails with NodeError naming the node and the key."""
    storage = await committed(backend, n=1)

    @cf.node
    async def half(ctx: cf.ExecutionContext) -> None:
        await ctx.store.update("n", lambda n: n + 1, default=0)
        await ctx.store.set("a", 1)
        await ctx.store.set("bad", object())

    flow = cf.Flow.builder("half").add_node("half", half).build()
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError, match="node 'half' failed in commit") as info:
            await engine.run(flow, storage, run_id="r")
        records = await engine.list_runs(storage)

    assert isinstance(info.value.__cause__, cf.StoreValueError)
    assert info.value.__cause__.key == "bad"
    assert await user_contents(await backend.instance()) == {"n": 1}
    assert [(r.state, r.steps) for r in records] == [("failed", 0)]


@persistent
async def test_a_forget_takes_the_children_of_a_run_whose_id_holds_pattern_characters(
    backend: Backend,
) -> None:
    """The run id holds what a glob, a regex and a key range read as their own: the
    forget takes the records of its BatchFlow children at any depth, and no other run's
    (one whose id the glob, unescaped, would match; keys on either side of the range)."""
    parent = "a[b]*?\\.c"
    children = [f"{parent}:1/0", f"{parent}:2.1/4/0:1/2"]
    others = ["ab.c:1/0", f"{parent}x:1/0", f"{parent}:1", f"{parent};1/0", "a[b]*?\\:1/0"]
    flow = cf.Flow.builder("one").add_node("a", Recorder()).build()
    storage = await backend.instance()
    async with cf.open_engine() as engine:
        await engine.run(flow, storage, run_id="seed")
        await storage.open()
        record = await storage.get(f"{RECORD_PREFIX}seed")
        for run_id in [parent, *children, *others]:
            await storage.set(f"{RECORD_PREFIX}{run_id}", {**record, "run_id": run_id})
        await storage.commit()
        await storage.aclose()
        assert await engine.forget_run(storage, parent)
        left = {run.run_id for run in await engine.list_runs(storage)}
    assert left == {"seed", *others}


@persistent
@pytest.mark.parametrize("last", ["\U0010ffff", "\ud7ff"])
async def test_a_forget_of_a_run_whose_id_ends_in_the_last_character_of_a_range(
    backend: Backend, last: str
) -> None:
    """No character follows U+10FFFF, and U+D800 after U+D7FF is a surrogate: a key
    range ending after the run id's last character would not be one. The forget takes
    the run, and no other."""
    flow = cf.Flow.builder("one").add_node("a", Recorder()).build()
    storage = await backend.instance()
    async with cf.open_engine() as engine:
        for run_id in (f"x{last}", "x"):
            await engine.run(flow, storage, run_id=run_id)
        assert await engine.forget_run(storage, f"x{last}")
        assert [run.run_id for run in await engine.list_runs(storage)] == ["x"]


# --- differential: every backend against a dict, with random operation sequences -------


class Opaque:
    """An object no codec of a persistent backend can encode (memory keeps it)."""

    def __repr__(self) -> str:
        return "Opaque()"


UNSTORABLE: dict[str, Any] = {
    "object": Opaque(),
    "nan": float("nan"),
    "infinity": {"readings": [1.5, float("-inf")]},
    "surrogate": ["text", "\ud800"],
}
"""Values a persistent backend refuses with StoreValueError. The custom backend (JSON text)
refuses all but the lone surrogate, which ``json.dumps`` escapes; memory refuses none."""

SURROGATE_KEY = "key \udc80"
"""A key that is not valid Unicode: persistent backends refuse to write it and never hold it."""

DIFF_KEYS = ["", " ", "a", "A", "a/b", "../../etc/passwd", "ünï 🔑", "line\nnul\x00", "__cosmo"]
DIFF_KEYS += [SURROGATE_KEY]

NO_DEFAULT = Opaque()
"""An update or get drawn without a default."""
RECORD = Opaque()
"""The model's value for a durable run's record (which no drawn call reads)."""


class Refused(Exception):
    """What the update function ``Change("raise")`` raises."""


@dataclasses.dataclass(frozen=True)
class Change:
    """A pure update function: wrap the value in a list, replace it, raise Refused, or
    return an object that a persistent backend cannot encode."""

    kind: str
    value: Any = None

    def __call__(self, old: Any) -> Any:
        if self.kind == "wrap":
            return [old]
        if self.kind == "replace":
            return self.value
        if self.kind == "raise":
            raise Refused(old)
        return UNSTORABLE["object"]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**100), max_value=2**100)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=4,
)
values = st.integers(0, 9).flatmap(
    lambda n: st.sampled_from(list(UNSTORABLE.values())) if n == 0 else json_values
)
"""JSON values; one in ten is one of :data:`UNSTORABLE`."""
changes = st.builds(Change, st.sampled_from(["wrap", "replace", "raise", "unstorable"]), values)


def updates(
    keys: st.SearchStrategy[str], defaults: st.SearchStrategy[Any]
) -> st.SearchStrategy[tuple[Any, ...]]:
    """``("update", key, change, default)``. A key a backend refuses is updated with a
    default and a function that returns: otherwise a backend may fail either way, as
    it checks the key or reads and calls the function first (both name the fault)."""
    return st.tuples(st.just("update"), keys, changes, defaults).filter(
        lambda op: op[1] != SURROGATE_KEY or (op[2].kind != "raise" and op[3] is not NO_DEFAULT)
    )


def segments(keys: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, list[Any]]]:
    """A stretch of work on one fresh instance over the data, with ``keys``:
    calls to the Storage itself, as the store actor makes them (then closed without a
    commit), or one step of a run, durable or not, making calls on ``ctx.store`` (the
    last one is ``keys()``, which sees what the step's writes did to their order)."""
    common = st.one_of(
        st.tuples(st.just("get"), keys),
        st.tuples(st.just("set"), keys, values),
        st.tuples(st.just("delete"), keys),
        st.tuples(st.just("contains"), keys),
        st.tuples(st.sampled_from(["keys", "size", "clear"])),
    )
    direct = common | updates(keys, values) | st.tuples(st.just("commit"))
    in_step = common | st.one_of(
        updates(keys, st.just(NO_DEFAULT) | values),
        st.tuples(st.just("get"), keys, values),
        st.tuples(st.just("get_many"), st.lists(keys, max_size=4)),
        st.tuples(st.just("set_many"), st.dictionaries(keys, values, max_size=3)),
    )
    return st.one_of(
        st.tuples(st.just("direct"), st.lists(direct, max_size=8)),
        st.tuples(
            st.sampled_from(["plain", "durable"]),
            st.lists(in_step, max_size=8).map(lambda ops: [*ops, ("keys",)]),
        ),
    )


programs = st.lists(
    segments(st.sampled_from(["a", "b", SURROGATE_KEY]) | st.sampled_from(DIFF_KEYS)),
    min_size=1,
    max_size=3,
)
"""Up to three segments. Half the keys are "a", "b" or one that is not valid Unicode,
so that calls often meet a key again; the others are the odd keys."""


def refusal(backend: Backend, key: str) -> tuple[Any, ...]:
    """The answer to a write ``backend`` refuses: StoreValueError naming the key, or a
    plain StorageError from a backend that does not name it (the custom one)."""
    return ("refused", key if backend.names_key else None)


def answer_to(error: Exception) -> tuple[Any, ...]:
    """The answer an expected error stands for; any other error fails the test."""
    if isinstance(error, KeyError):
        return ("missing",)
    if isinstance(error, Refused):
        return ("function raised",)
    if isinstance(error, cf.StoreValueError):
        return ("refused", error.key)
    if isinstance(error, cf.StorageError) and not isinstance(error, cf.RunConflictError):
        return ("refused", None)
    raise error


async def answer_of(call: Callable[[], Awaitable[Any]]) -> tuple[Any, ...]:
    try:
        return ("value", await call())
    except Exception as exc:
        return answer_to(exc)


@dataclasses.dataclass
class Model:
    """What a dict says each call answers, and what the store holds."""

    backend: Backend
    ordered: bool
    staged: bool
    """Writes wait for a commit (:attr:`Backend.staged`); else they land at once."""
    update_commits: bool
    """An update commits the writes staged before it with its own (Redis)."""
    committed: dict[str, Any] = dataclasses.field(default_factory=dict)
    current: dict[str, Any] = dataclasses.field(default_factory=dict)
    user: bool = True

    def apply(
        self, op: tuple[Any, ...], *, check: bool = True, user: bool = True
    ) -> tuple[Any, ...]:
        """Apply ``op`` to :attr:`current` and return its answer; ``check=False`` stores
        what the backend would refuse (a durable step refuses it only at its commit).
        ``user``: as a SharedStore answers, which hides the run records (the Storage
        itself shows them)."""
        kind, *args = op
        self.user = user
        answer = getattr(self, f"_{kind}")(*args, check=check)
        if kind == "keys" and not self.ordered:
            return ("value", sorted(answer[1]))
        return answer

    def refuses(self, key: str, value: Any, check: bool) -> bool:
        return check and self.backend.refuses(key, value)

    def _get(self, key: str, default: Any = NO_DEFAULT, *, check: bool) -> tuple[Any, ...]:
        if key in self.current:
            return ("value", self.current[key])
        return ("missing",) if default is NO_DEFAULT else ("value", default)

    def _set(self, key: str, value: Any, *, check: bool) -> tuple[Any, ...]:
        if self.refuses(key, value, check):
            return refusal(self.backend, key)
        self.current[key] = value
        return ("value", None)

    def _update(self, key: str, change: Change, default: Any, *, check: bool) -> tuple[Any, ...]:
        if key not in self.current and default is NO_DEFAULT:
            return ("missing",)
        try:
            new = change(self.current.get(key, default))
        except Refused:
            return ("function raised",)
        answer = self._set(key, new, check=check)
        if answer != ("value", None):
            return answer
        if self.update_commits and not self.user:  # the Storage's own update
            self.committed = self.current.copy()
        return ("value", new)

    def _delete(self, key: str, *, check: bool) -> tuple[Any, ...]:
        return ("value", self.current.pop(key, NO_DEFAULT) is not NO_DEFAULT)

    def _contains(self, key: str, *, check: bool) -> tuple[Any, ...]:
        return ("value", key in self.current)

    def _keys(self, *, check: bool) -> tuple[Any, ...]:
        return ("value", [key for key in self.current if self.shown(key)])

    def _size(self, *, check: bool) -> tuple[Any, ...]:
        return ("value", len(self._keys(check=check)[1]))

    def _clear(self, *, check: bool) -> tuple[Any, ...]:
        self.current = {key: value for key, value in self.current.items() if not self.shown(key)}
        return ("value", None)

    def shown(self, key: str) -> bool:
        """Whether the caller sees ``key``: a SharedStore hides the run records."""
        return not (self.user and key.startswith(RECORD_PREFIX))

    def recorded(self, run_id: str) -> None:
        """A durable run has written its record."""
        self.current.setdefault(RECORD_PREFIX + run_id, RECORD)
        self.committed.setdefault(RECORD_PREFIX + run_id, RECORD)

    def user_items(self) -> list[tuple[str, Any]]:
        """What the store holds, without the run records."""
        return [(key, value) for key, value in self.committed.items() if value is not RECORD]

    def _get_many(self, wanted: list[str], *, check: bool) -> tuple[Any, ...]:
        return ("value", {key: self.current[key] for key in wanted if key in self.current})

    def _set_many(self, items: dict[str, Any], *, check: bool) -> tuple[Any, ...]:
        for key, value in items.items():
            if self.refuses(key, value, check):
                return refusal(self.backend, key)
        self.current.update(items)
        return ("value", None)

    def _commit(self, *, check: bool) -> tuple[Any, ...]:
        self.committed = self.current.copy()
        return ("value", None)

    def closed(self) -> None:
        """A close drops what was not committed."""
        if self.staged:
            self.current = self.committed.copy()
        else:
            self.committed = self.current.copy()


def first_refused_write(
    backend: Backend, op: tuple[Any, ...], answer: tuple[Any, ...]
) -> str | None:
    """The key of the first write of ``op`` that ``backend`` cannot store, if any: a
    durable step stages it and its commit refuses it."""
    kind = op[0]
    if kind == "set":
        written = [(op[1], op[2])]
    elif kind == "set_many":
        written = list(op[1].items())
    elif kind == "update" and answer[0] == "value":
        written = [(op[1], answer[1])]
    else:
        return None
    return next((key for key, value in written if backend.refuses(key, value)), None)


def seen_as(model: Model, op: tuple[Any, ...], answer: tuple[Any, ...]) -> tuple[Any, ...]:
    """``answer`` as the model gives it: keys sorted where the backend keeps no order."""
    if op[0] == "keys" and answer[0] == "value" and not model.ordered:
        return ("value", sorted(answer[1]))
    return answer


def shared_store_call(store: cf.SharedStore, op: tuple[Any, ...]) -> Awaitable[Any]:
    """The SharedStore call ``op`` stands for (an argument NO_DEFAULT is left out)."""
    kind, *args = op
    return getattr(store, kind)(*[arg for arg in args if arg is not NO_DEFAULT])


async def direct_calls(backend: Backend, ops: list[tuple[Any, ...]], model: Model) -> None:
    """Make ``ops`` on a new instance as the store actor does, then close it uncommitted."""
    storage = backend.open()
    await storage.open()
    try:
        for op in ops:
            expected = model.apply(op, user=False)
            answer = await answer_of(partial(getattr(storage, op[0]), *op[1:]))
            assert (op, seen_as(model, op, answer)) == (op, expected)
    finally:
        await storage.aclose()
    model.closed()


async def one_step(
    backend: Backend, ops: list[tuple[Any, ...]], run_id: str | None
) -> tuple[list[tuple[Any, ...]], cf.NodeError | None]:
    """Make ``ops`` on ``ctx.store`` in the one step of a run on a new instance; return
    their answers and the run's error."""
    answers: list[tuple[Any, ...]] = []

    @cf.node
    async def step(ctx: cf.ExecutionContext) -> None:
        for op in ops:
            answers.append(await answer_of(partial(shared_store_call, ctx.store, op)))

    async with cf.open_engine() as engine:
        try:
            await engine.run(single(step, "differential"), backend.open(), run_id=run_id)
        except cf.NodeError as exc:
            return answers, exc
    return answers, None


async def step_calls(backend: Backend, ops: list[tuple[Any, ...]], model: Model) -> None:
    """Make ``ops`` in a step of a run that is not durable: each call is committed."""
    answers, error = await one_step(backend, ops, None)
    assert error is None
    for op, answer in zip(ops, answers, strict=True):
        assert (op, seen_as(model, op, answer)) == (op, model.apply(op))
    model.committed = model.current.copy()


async def durable_step_calls(backend: Backend, ops: list[tuple[Any, ...]], model: Model) -> None:
    """Make ``ops`` in a durable step: they answer as in a step that is not durable,
    except that a value the backend cannot store is refused at the step's commit, which
    then stores nothing and fails the run with StoreValueError naming its key."""
    run_id = f"run-{uuid.uuid4().hex}"
    answers, error = await one_step(backend, ops, run_id)
    model.recorded(run_id)
    refused: list[str] = []
    for op, answer in zip(ops, answers, strict=True):
        expected = model.apply(op, check=False)
        assert (op, seen_as(model, op, answer)) == (op, expected)
        key = first_refused_write(model.backend, op, expected)
        if key is not None:
            refused.append(key)
    if refused:
        assert error is not None and isinstance(error.__cause__, cf.StoreValueError), error
        assert error.__cause__.key == refused[0]
        model.current = model.committed.copy()
    else:
        assert error is None, repr(error.__cause__) if error else None
        model.committed = model.current.copy()


async def stored_items(backend: Backend) -> list[tuple[str, Any]]:
    """What a new instance holds, without the engine's run records."""
    storage = backend.open()
    await storage.open()
    try:
        found = [(key, await storage.get(key)) for key in await storage.keys()]
    finally:
        await storage.aclose()
    return [(key, value) for key, value in found if not key.startswith(RECORD_PREFIX)]


async def check_program(backend: Backend, program: list[tuple[str, list[Any]]]) -> None:
    persistent = backend.persistent
    model = Model(backend, backend.ordered, backend.staged, update_commits=backend.update_commits)
    for mode, ops in program:
        if mode == "direct":
            await direct_calls(backend, ops, model)
        elif mode == "durable" and persistent:
            await durable_step_calls(backend, ops, model)
        else:
            await step_calls(backend, ops, model)
    stored = await stored_items(backend)
    if backend.ordered:
        assert stored == model.user_items()
    else:
        assert dict(stored) == dict(model.user_items())


@pytest.mark.parametrize("name", BACKENDS)
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=programs)
def test_random_calls_answer_as_a_dict_does(
    name: str, program: list[tuple[str, list[Any]]], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Random calls (the Storage's own, closed without a commit now and then, and a
    step's on ctx.store, durable or not), each on a new instance over the same data,
    answer as a dict does, and leave what the dict holds; a value a backend cannot
    encode is refused with StoreValueError naming its key, and changes nothing."""
    directory = tmp_path / uuid.uuid4().hex
    directory.mkdir()
    trio.run(check_program, make_backend(name, directory, request), program)
