"""Tests for :mod:`cosmoflow_actors.storage.base`: the checks the engine shares."""

from __future__ import annotations

import json
from typing import Any

import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.errors import RunConflictError, StorageError
from cosmoflow_actors.runtime.run_record import record_key
from cosmoflow_actors.storage.base import (
    RECORD_PREFIX,
    RESERVED_PREFIX,
    batch_parent,
    check_steps,
    check_user_key,
    part_prefixes,
    path_chunk_key,
    place_key,
    record_children,
    record_parts,
)
from tests.support import single


@pytest.mark.parametrize("key", ["__cosmoflow__/runs/r1", "__cosmoflow__/", RESERVED_PREFIX + "x"])
def test_a_key_under_the_reserved_prefix_is_refused_naming_it(key: str) -> None:
    with pytest.raises(StorageError) as info:
        check_user_key(key)

    message = str(info.value)
    assert repr(key) in message
    assert "'__cosmoflow__/' are reserved for the engine's run records" in message


@pytest.mark.parametrize(
    "key", ["", "runs/r1", "__cosmoflow__", "__cosmoflow_/x", "a/__cosmoflow__/"]
)
def test_any_other_key_may_be_written(key: str) -> None:
    check_user_key(key)


def test_a_key_that_is_not_a_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="must be str"):
        check_user_key(1)  # type: ignore[arg-type]


class UndecodedStorage(cf.Storage):
    """A persistent backend with a common mistake: ``get`` returns the JSON text that
    ``set`` stored, not the value it was given."""

    persistent = True

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def get(self, key: str) -> Any:
        return self.data[key]

    async def set(self, key: str, value: Any) -> None:
        self.data[key] = json.dumps(value)

    async def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    async def keys(self) -> list[str]:
        return list(self.data)


RECORD_KEY = RECORD_PREFIX + "r1"


class AuditedDeletes(UndecodedStorage):
    """A persistent backend whose ``delete`` notes every key it is called with, as an
    audit trail would."""

    def __init__(self) -> None:
        super().__init__()
        self.deleted: list[str] = []

    async def delete(self, key: str) -> bool:
        self.deleted.append(key)
        return await super().delete(key)


async def test_delete_many_and_so_a_clear_call_a_backends_own_delete_per_key() -> None:
    """A backend that does not override delete_many sees every key removed in its
    delete: a node's clear of a persistent store too, which leaves the run records."""
    storage = AuditedDeletes()
    storage.data.update({"a": "1", "b": "2", RECORD_KEY: "{}"})
    await storage.delete_many(["b", "missing"])
    assert storage.deleted == ["b", "missing"]
    storage.deleted.clear()
    async with cf.open_engine() as engine, engine.open_store(storage) as store:
        await store.set("c", 3)
        await store.clear()
    assert storage.deleted == ["a", "c"]
    assert storage.data == {RECORD_KEY: "{}"}


@pytest.mark.parametrize(
    ("stored", "kind"),
    [
        ('{"path": []}', "a str"),
        ({"state": "running"}, "a dict"),
        ({"path": ["a"]}, "a dict"),
        ({"steps": "2"}, "a dict"),
        ({"steps": True}, "a dict"),
        (3, "an int"),
    ],
)
def test_check_steps_refuses_what_is_no_run_record_naming_its_key(stored: Any, kind: str) -> None:
    with pytest.raises(StorageError) as info:
        check_steps(RECORD_KEY, stored, 0)

    message = str(info.value)
    assert f"no run record under {RECORD_KEY!r}" in message
    assert f"its get returned {kind} ({stored!r:.60})" in message


def test_check_steps_counts_the_recorded_steps() -> None:
    check_steps(RECORD_KEY, {"steps": 2, "path": ["b"]}, 2)

    with pytest.raises(RunConflictError, match="another engine committed step 2 first"):
        check_steps(RECORD_KEY, {"steps": 2, "path": ["b"]}, 1)


@cf.node
async def write(ctx: cf.ExecutionContext) -> None:
    await ctx.store.set("x", 1)


async def test_a_backend_that_loses_a_run_record_fails_that_run_not_the_engine() -> None:
    flow = single(write)
    async with cf.open_engine() as engine:
        with pytest.raises(StorageError, match=f"no run record under {RECORD_KEY!r}"):
            await engine.run(flow, UndecodedStorage(), run_id="r1")
        later = await engine.run(flow, {})

    assert later.success


def test_batch_parent_is_the_run_a_childs_id_belongs_to() -> None:
    parents = {
        "job:3/0": "job",
        "job:1.0/2/11": "job",
        "job:3/0:1/2": "job:3/0",
        "a:b:3/0": "a:b",
        "job": None,
        "job:3": None,
        "job/0": None,
        ":3/0": None,
    }
    assert {run_id: batch_parent(run_id) for run_id in parents} == parents


def test_record_children_are_the_records_of_batch_flow_children_at_any_depth() -> None:
    parent = record_key("job")
    children = [record_key(run_id) for run_id in ("job:1/0", "job:2.1/4/12", "job:3/0:1.0/2/1")]
    others = [
        record_key(run_id)
        for run_id in ("job", "job2:1/0", "jo:1/0", "job:1", "job:1/0x", "job/0", "job:1.0/0")
    ]
    assert record_children(parent, [*others, *children]) == children


def test_record_parts_are_the_path_chunks_and_places_of_a_run_and_its_children() -> None:
    run_ids = ("job", "job:1/0", "job:2.1/4/12", "job:3/0:1.0/2/1")
    parts = [
        part_key(run_id, number)
        for run_id in run_ids
        for part_key in (path_chunk_key, place_key)
        for number in (0, 11)
    ]
    others = [
        part_key(run_id, 0)
        for run_id in ("job2", "jo", "job:1", "job/0", "job:1.0/0", "job:1/0x", "job/1/")
        for part_key in (path_chunk_key, place_key)
    ]
    others += [
        record_key("job"),
        path_chunk_key("job", 0) + "/",
        place_key("job", 0) + "x",
        *part_prefixes(record_key("job")),
    ]
    assert all(key.startswith(part_prefixes(record_key("job"))) for key in parts)
    assert not any(key.startswith(part_prefixes(record_key("job"))) for key in others[:4])
    assert record_parts(record_key("job"), [*others, *parts]) == parts
