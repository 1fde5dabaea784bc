"""Tests for :mod:`cosmoflow_actors.pickling`."""

from __future__ import annotations

import dataclasses
import enum
import pickle
import subprocess
import sys
import threading
from typing import Any, NamedTuple

import cloudpickle
import msgspec
import pytest

from cosmoflow_actors import pickling


def _local_classes() -> tuple[type[Any], type[enum.Enum], type[Any]]:
    """A dataclass, an Enum and a NamedTuple defined in a function: cloudpickle pickles
    them by value, their class dicts included."""

    @dataclasses.dataclass
    class Point:
        x: int

    class Color(enum.Enum):
        RED = "red"

    class Pair(NamedTuple):
        a: int
        b: str

    return Point, Color, Pair


def _cases() -> list[tuple[Any, Any, type[Any]]]:
    """(value, its msgspec builtins form, its class) for each local class, each class
    fresh (no msgspec cache yet)."""
    point, color, pair = _local_classes()
    return [(point(1), {"x": 1}, point), (color.RED, "red", color), (pair(1, "b"), [1, "b"], pair)]


@pytest.mark.parametrize("index", range(3), ids=["dataclass", "enum", "namedtuple"])
def test_a_class_pickled_by_value_after_a_typed_msgspec_convert_round_trips(index: int) -> None:
    value, builtins, kind = _cases()[index]
    assert msgspec.convert(builtins, kind) == value
    assert "__msgspec_cache__" in vars(kind)
    with pytest.raises(TypeError, match="cannot pickle 'msgspec"):
        cloudpickle.dumps(value)

    back, back_kind = pickle.loads(pickling.dumps((value, kind)))

    # Unpickled where it was pickled, the class is the original, its cache kept.
    assert back_kind is kind
    assert back == value
    assert "__msgspec_cache__" in vars(kind)
    assert msgspec.convert(builtins, kind) == value
    assert msgspec.json.decode(msgspec.json.encode(value), type=kind) == value


def test_a_class_without_its_cache_round_trips_in_another_process() -> None:
    value, builtins, kind = _cases()[0]
    msgspec.convert(builtins, kind)
    script = (
        "import pickle, sys, msgspec\n"
        "value, kind = pickle.loads(sys.stdin.buffer.read())\n"
        "assert '__msgspec_cache__' not in vars(kind)\n"
        "assert msgspec.convert({'x': 1}, kind) == value\n"
        "print(repr(value))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=pickling.dumps((value, kind)),
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "Point(x=1)"


def test_everything_else_pickles_as_cloudpickle_pickles_it() -> None:
    value: Any = {"a": [1, (2, 3)], "f": len, "lambda": lambda: 7, "pickled_by_name": Exception}
    assert pickling.dumps(value) == cloudpickle.dumps(value)
    assert pickling.dumps(value, protocol=2) == cloudpickle.dumps(value, protocol=2)
    point, _, _ = _local_classes()  # by value, no msgspec cache
    back = pickle.loads(pickling.dumps(point(3)))
    assert back.x == 3
    assert type(back).__qualname__.endswith("Point")


def test_what_cannot_be_pickled_raises_as_with_cloudpickle() -> None:
    with pytest.raises(TypeError, match="cannot pickle"):
        pickling.dumps(threading.Lock())
