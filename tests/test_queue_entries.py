"""How what a run queue holds reads back (runtime/queue/entries.py): what a queue
writes decodes as it was written, and everything else raises UnreadableEntryError
naming the queue, the run and the field at fault. Pure decoding: no server."""

from __future__ import annotations

import json

import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.queue.entries import (
    MAX_DEPTH,
    decoded_info,
    decoded_passed,
    decoded_run_id,
    deeper_than,
    shown,
)
from tests.queue_support import BAD_ENTRIES, DEEP, pending_entry

QUEUE = cf.RunQueue("redis://127.0.0.1:1/0", "q")


@pytest.mark.parametrize(
    "info",
    [
        {"flow": "f", "params": {"a": [1, {"b": None}]}, "state": "pending"},
        {"flow": "f", "params": {}, "state": "running", "owner": "w1", "attempts": 2},
        {
            "flow": "f",
            "params": {},
            "state": "succeeded",
            "owner": "w1",
            "attempts": 1,
            "error": None,
            "result": {"value": float("nan"), "final_action": "done", "path": ["a"], "duration": 1},
        },
        {"flow": "f", "params": {}, "state": "failed", "owner": "w1", "error": "E: x"},
    ],
)
def test_what_a_queue_writes_reads_back_as_written(info: dict[str, object]) -> None:
    """Every state a queue writes; a succeeded run's result value may be NaN (a worker
    records what the flow returned), only params must be finite."""
    decoded = decoded_info(QUEUE, "r", json.dumps(info).encode())
    assert json.dumps(decoded) == json.dumps(info)


@pytest.mark.parametrize("kind", [kind for kind in BAD_ENTRIES if kind != "run id not UTF-8"])
def test_an_entry_no_queue_writes_is_unreadable_naming_the_field(kind: str) -> None:
    run_id, data, why = BAD_ENTRIES[kind]
    with pytest.raises(cf.UnreadableEntryError) as info:
        decoded_info(QUEUE, str(run_id), data)
    assert str(info.value).startswith(f"{QUEUE!r}: the entry of run 'evil' ")
    assert why in str(info.value)


def test_a_key_twice_in_the_params_is_unreadable_too() -> None:
    data = pending_entry(params='{"a": 1, "a": 2}')
    with pytest.raises(cf.UnreadableEntryError, match="the key 'a' is there twice"):
        decoded_info(QUEUE, "r", data)


def test_params_nested_deeper_than_submit_takes_are_unreadable() -> None:
    """A param of MAX_DEPTH lists and objects reads back (submit takes it); one level
    more is an entry no queue writes, however far below Python's recursion limit."""
    value: object = {"x": 1}
    for _ in range(MAX_DEPTH - 1):
        value = [value]
    read = decoded_info(QUEUE, "r", pending_entry(params=json.dumps({"v": value})))
    assert read["params"] == {"v": value}
    for deeper in ([value], {"y": value}):
        with pytest.raises(cf.UnreadableEntryError) as info:
            decoded_info(QUEUE, "r", pending_entry(params=json.dumps({"v": deeper})))
        expected = f"not an object of finite JSON values, each nested at most {MAX_DEPTH} deep"
        assert str(info.value).endswith(expected)


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ("[{", 0), ([], 1), ({"a": [1]}, 2), ([[], [[{}]], 1], 4), ({"a": 1, "b": [2]}, 2)],
)
def test_deeper_than_counts_the_lists_and_objects_one_in_the_other(
    value: object, depth: int
) -> None:
    encoded = json.dumps(value)
    assert not deeper_than(depth, value, encoded)
    assert deeper_than(depth - 1, value, encoded) == (depth > 0)


def test_a_long_value_at_fault_is_quoted_shortened() -> None:
    data = pending_entry(params=json.dumps(list(range(100_000))))
    with pytest.raises(cf.UnreadableEntryError) as info:
        decoded_info(QUEUE, "r", data)
    assert "its 'params' is [0, 1, 2, 3, 4, 5, ...], not an object" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (None, "the stream entry 1-0 names no run_id"),
        (b"", "the stream entry 1-0 has an empty run_id"),
        (b"\xff", "the run id b'\\xff' of the stream entry 1-0 is not UTF-8"),
    ],
)
def test_a_run_id_that_is_not_non_empty_utf8_is_unreadable(raw: bytes | None, why: str) -> None:
    with pytest.raises(cf.UnreadableEntryError) as info:
        decoded_run_id(QUEUE, raw, "the stream entry 1-0")
    assert str(info.value) == f"{QUEUE!r}: {why}"


def test_a_run_id_reads_back_and_shows_escaped_when_not_utf8() -> None:
    assert decoded_run_id(QUEUE, "é".encode(), "the stream entry 1-0") == "é"
    assert shown(b"w\xff") == "w\\xff"


def test_a_passed_over_note_reads_back_and_a_bad_one_is_unreadable() -> None:
    assert decoded_passed(QUEUE, "r", b'{"since": 1.5, "by": ["w1", "w2"]}') == (1.5, ["w1", "w2"])
    huge = '{"since": ' + "9" * 400 + ', "by": []}'  # an int no float holds
    for note in ('{"since": 1, "by": ["w1", 2]}', '{"since": true, "by": []}', "[]", DEEP, huge):
        with pytest.raises(cf.UnreadableEntryError, match="the passed-over note of run 'r' "):
            decoded_passed(QUEUE, "r", note)
