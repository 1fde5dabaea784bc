"""Tests for :mod:`cosmoflow_actors.storage.codec`."""

from __future__ import annotations

import dataclasses
import datetime
import math
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosmoflow_actors.errors import StorageError, StoreValueError
from cosmoflow_actors.storage.codec import (
    CODECS,
    CodecName,
    _check_finite,
    _comes_back,
    check_codec,
    check_database_meta,
    database_meta,
    get_codec,
    utf8_key,
)


def test_the_codec_name_type_names_every_codec() -> None:
    assert get_args(CodecName) == tuple(CODECS)


@pytest.mark.parametrize("name", ["json", "pickle"])
def test_codecs_round_trip_bytes_and_json_fragments(name: str) -> None:
    codec = get_codec(name)
    value = {"a": [1, 2.5, "three", None, True]}

    assert codec.name == name
    assert codec.decode(codec.encode("k", value)) == value
    raw = codec.encode_json("k", value)
    assert codec.check_json(raw)
    assert codec.decode_json(raw) == value
    assert msgspec.json.decode(msgspec.json.encode({"k": raw})) == {"k": msgspec.json.decode(raw)}


@pytest.mark.parametrize("name", [None, "", "JSON", "marshal", 1])
def test_unknown_codec_names_are_refused(name: Any) -> None:
    with pytest.raises(ValueError, match="codec must be one of"):
        get_codec(name)


def test_json_refuses_what_it_cannot_encode_naming_key_and_type() -> None:
    with pytest.raises(StorageError, match=r"'k'.*type object") as info:
        get_codec("json").encode("k", object())

    assert isinstance(info.value.__cause__, TypeError)


@dataclasses.dataclass
class Reading:
    value: float


NAN = float("nan")


@pytest.mark.parametrize(
    ("value", "type_name", "bad"),
    [
        (NAN, "float", "nan"),
        (float("inf"), "float", "inf"),
        ({"a": [1, float("-inf")]}, "dict", "-inf"),
        ((1, NAN), "tuple", "nan"),
        ({NAN}, "set", "nan"),
        (Reading(NAN), "Reading", "nan"),
    ],
)
def test_json_refuses_the_floats_it_would_write_as_null(
    value: Any, type_name: str, bad: str
) -> None:
    with pytest.raises(StorageError) as info:
        get_codec("json").encode("k", value)

    message = str(info.value)
    assert f"key 'k': a value of type {type_name} holds the float {bad}" in message
    assert "codec='pickle'" in message


def test_json_keeps_null_and_the_strings_that_look_like_floats() -> None:
    codec = get_codec("json")
    value = {"none": None, "text": ["null", "nan", "inf"], "big": 1.7976931348623157e308}

    assert codec.decode(codec.encode("k", value)) == value


@pytest.fixture
def int_digits() -> Iterator[Callable[[int], None]]:
    """``sys.set_int_max_str_digits``, the limit in force restored after the test."""
    before = sys.get_int_max_str_digits()
    yield sys.set_int_max_str_digits
    sys.set_int_max_str_digits(before)


TOO_LONG_FOR_MSGSPEC = [-(10**4299), -(10**5000), 10**5000]
"""Ints msgspec writes (the last two once the program lifts Python's limit on their
digits) as numbers of over 4300 characters, which it does not read."""


@pytest.mark.parametrize(
    "value", TOO_LONG_FOR_MSGSPEC, ids=["-4300 digits", "-5001 digits", "5001 digits"]
)
def test_json_reads_back_every_int_it_writes(value: int, int_digits: Callable[[int], None]) -> None:
    """In a value holding null too, which the check for NaN reads back when it writes."""
    int_digits(0 if abs(value) > 10**4300 else 4300)
    codec = get_codec("json")

    for stored in (value, [None, {"n": value}]):
        assert codec.decode(codec.encode("k", stored)) == stored
        assert codec.decode_json(codec.encode_json("k", stored)) == stored


def test_json_refuses_an_int_of_more_digits_than_python_converts_naming_the_key(
    int_digits: Callable[[int], None],
) -> None:
    int_digits(4300)  # Python's default

    with pytest.raises(StoreValueError, match=r"'big'.*limit \(4300 digits\)") as info:
        get_codec("json").encode("big", [1, 10**4300])

    assert info.value.key == "big"


def test_an_int_of_more_digits_than_python_converts_when_read_is_refused_saying_so(
    int_digits: Callable[[int], None],
) -> None:
    """The program lowered the limit since it stored the int."""
    codec = get_codec("json")
    int_digits(4300)
    data = codec.encode("k", 10**700)
    int_digits(640)

    for read in (codec.decode, codec.decode_json):
        with pytest.raises(StorageError, match=r"number is out of range: .*limit \(640 digits\)"):
            read(msgspec.Raw(data))


LONG = b"-" + b"9" * 4300


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b"[" + LONG + b", 1e400]", "number is out of range: 1e400 is beyond a float"),
        (b"[" + LONG + b", NaN]", "value is not valid JSON: NaN is not JSON"),
        (b"[" + LONG + b", -Infinity]", "value is not valid JSON: -Infinity is not JSON"),
        (b"[" + LONG + b", oops]", "value is not valid JSON: Expecting value"),
    ],
)
def test_json_text_with_a_long_number_holding_what_json_has_not_is_refused(
    text: bytes, problem: str
) -> None:
    """What another client wrote: the json module reads NaN, the infinities and 1e400,
    which msgspec refuses."""
    codec = get_codec("json")

    for read in (codec.decode, codec.decode_json):
        with pytest.raises(StorageError, match=f"a stored {problem}"):
            read(msgspec.Raw(text))


@dataclasses.dataclass
class Labels:
    names: dict[Any, str]


@pytest.mark.parametrize(
    ("value", "type_name", "name"),
    [
        ({1: "one", "1": "uno"}, "dict", "1"),
        ({"1": "uno", 1: "one"}, "dict", "1"),
        ([{"a": {1.5: "x", "1.5": "y"}}], "list", "1.5"),
        ({datetime.date(2024, 5, 1): 1, "2024-05-01": 2}, "dict", "2024-05-01"),
        (Labels({1: "one", "1": "uno"}), "Labels", "1"),
        ((1, {"deep": [{2: "b", "2": "c"}]}), "tuple", "2"),
    ],
)
def test_json_refuses_a_dict_whose_keys_collide_as_json_strings(
    value: Any, type_name: str, name: str
) -> None:
    with pytest.raises(StoreValueError) as info:
        get_codec("json").encode("k", value)

    message = str(info.value)
    assert message.startswith(f"cannot store key 'k': a value of type {type_name} holds a dict")
    assert f"JSON writes as the string {name!r}" in message
    assert "codec='pickle'" in message
    assert info.value.key == "k"


@pytest.mark.parametrize(
    "value",
    [
        {1: "one", 2: "two"},
        {1: "one", "2": "two"},
        {datetime.date(2024, 5, 1): 1, 1.5: 2},
        [{1, "a"}],
    ],
)
def test_json_keeps_dicts_whose_keys_stay_distinct_as_json_strings(value: Any) -> None:
    codec = get_codec("json")

    assert codec.decode(codec.encode("k", value)) == msgspec.to_builtins(value, str_keys=True)


def test_pickle_keeps_nan_infinities_sets_bytes_and_tuples_exactly() -> None:
    codec = get_codec("pickle")
    value = {"set": {1, 2}, "bytes": b"\x00\xff", "tuple": (1, "a"), "inf": float("-inf")}

    stored = codec.decode_json(codec.encode_json("k", {**value, "nan": NAN}))

    assert math.isnan(stored.pop("nan"))
    assert stored == value
    assert [type(stored[key]) for key in value] == [set, bytes, tuple, float]


def test_pickle_encodes_a_local_class_after_msgspec_converted_to_it() -> None:
    @dataclasses.dataclass
    class Local:
        x: int

    codec = get_codec("pickle")
    codec.encode("k", Local(1))
    assert msgspec.convert({"x": 1}, Local) == Local(1)  # caches its info on Local

    assert codec.decode(codec.encode("k", Local(2))) == Local(2)
    assert codec.decode_json(codec.encode_json("k", [Local(3)])) == [Local(3)]


def test_pickle_refuses_what_it_cannot_pickle_naming_key_and_type() -> None:
    with pytest.raises(StorageError, match=r"'k'.*type lock"):
        get_codec("pickle").encode("k", threading.Lock())


@pytest.mark.parametrize(("name", "data"), [("json", b"{not json"), ("pickle", b"not a pickle")])
def test_undecodable_bytes_are_a_storage_error(name: str, data: bytes) -> None:
    with pytest.raises(StorageError):
        get_codec(name).decode(data)


def _at_depth(frames: int, function: Callable[[], Any]) -> Any:
    """``function()`` called ``frames`` Python frames deeper than the caller."""
    if frames == 0:
        return function()
    return _at_depth(frames - 1, function)


def test_json_nested_deeper_than_the_stack_left_for_reading_is_a_storage_error() -> None:
    """Encoded from a shallow stack, read from a deep one: StorageError, not a bare
    RecursionError."""
    codec = get_codec("json")
    data = b"[" * 700 + b"]" * 700
    assert _at_depth(0, lambda: codec.decode(data)) is not None

    with pytest.raises(StorageError, match="nests too deep to decode here") as info:
        _at_depth(sys.getrecursionlimit() - 600, lambda: codec.decode(data))
    assert isinstance(info.value.__cause__, RecursionError)


def test_pickle_fragments_must_be_base64_strings() -> None:
    codec = get_codec("pickle")

    assert not codec.check_json(msgspec.Raw(b"1"))
    assert not codec.check_json(msgspec.Raw(b'"not base64!"'))


def test_check_codec_names_both_codecs_and_the_way_out() -> None:
    with pytest.raises(StorageError, match=r"codec 'pickle'.*codec 'json'.*codec='pickle'"):
        check_codec("store.json", "pickle", get_codec("json"))


def test_a_database_meta_naming_no_codec_says_so_not_to_open_it_with_codec_none() -> None:
    json_codec = get_codec("json")
    check_database_meta("db", database_meta(json_codec), json_codec)
    meta = {key: value for key, value in database_meta(json_codec).items() if key != "codec"}
    with pytest.raises(StorageError, match=r"^db names no codec beside its data") as info:
        check_database_meta("db", meta, json_codec)
    assert "None" not in str(info.value)


def test_utf8_key() -> None:
    assert utf8_key("ключ") == "ключ".encode()
    assert utf8_key("\ud800") is None


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=3) | st.integers(-9, 9), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_like)
def test_the_quick_check_for_nan_agrees_with_the_walk(value: Any) -> None:
    """Where the walk finds a float JSON cannot hold, the decode-and-compare check
    says the value does not come back (so the walk runs and refuses it)."""
    data = msgspec.json.encode(value)
    try:
        _check_finite("k", value)
    except StorageError:
        assert not _comes_back(value, data)


def _keys_collide(value: Any) -> bool:
    """Whether ``value`` (of :data:`json_like`) holds a dict two of whose keys are one
    string once written as JSON."""
    if isinstance(value, dict):
        names = [str(key) for key in value]
        if len(set(names)) < len(names):
            return True
        return any(_keys_collide(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_keys_collide(item) for item in value)
    return False


colliding_like = st.recursive(
    st.none() | st.integers(-9, 9) | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(st.sampled_from(["0", "1", "-1", "a"]) | st.integers(-1, 1), children)
    ),
    max_leaves=12,
)
"""Values like :data:`json_like`, finite, whose dicts often hold an int key and its
string."""


@settings(max_examples=300, deadline=None)
@given(colliding_like)
def test_json_refuses_exactly_the_values_whose_dict_keys_collide(value: Any) -> None:
    """A value without colliding keys comes back as JSON holds it; one with them is
    refused."""
    codec = get_codec("json")
    if _keys_collide(value):
        with pytest.raises(StoreValueError, match="JSON writes as the string"):
            codec.encode("k", value)
    else:
        assert msgspec.json.decode(codec.encode("k", value)) == _as_json(value)


def _as_json(value: Any) -> Any:
    """``value`` (of :data:`json_like`) as JSON holds it: str keys, lists for tuples."""
    if isinstance(value, dict):
        return {str(key): _as_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(item) for item in value]
    return value
