"""Tests for :mod:`cosmoflow_actors.validation`, and for the modules that use it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.validation import (
    checked_params,
    checked_path,
    positive_int,
    require_positive,
    require_run_id,
    require_seconds,
    utf8_problem,
)


@pytest.mark.parametrize("value", [1, 2, 10**9])
def test_an_int_of_one_or_more_passes(value: int) -> None:
    require_positive("size", value)


@pytest.mark.parametrize("value", [0, -1, 1.0, True, "3", None])
def test_anything_else_is_refused_naming_the_setting_and_the_value(value: object) -> None:
    with pytest.raises(ValueError) as info:
        require_positive("size", value)
    assert str(info.value) == f"size must be an int >= 1, got {value!r}"


@pytest.mark.parametrize(
    ("value", "zero", "bound"),
    [(0, False, "> 0"), (-1, True, ">= 0"), (float("nan"), True, ">= 0"), (True, False, "> 0")],
)
def test_seconds_out_of_bounds_are_refused(value: object, zero: bool, bound: str) -> None:
    require_seconds("timeout", 0.5)
    require_seconds("wait", 0, zero=True)
    with pytest.raises(ValueError) as info:
        require_seconds("timeout", value, zero=zero)
    assert str(info.value) == f"timeout must be {bound} seconds, got {value!r}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: cf.SQLiteStorage("x.db", timeout=-1), "timeout must be >= 0 seconds"),
        (lambda: cf.RedisStorage("redis://127.0.0.1:1/0", timeout=0), "timeout must be > 0"),
        (lambda: cf.FileStorage("x.json", wait=float("nan")), "wait must be >= 0 seconds"),
    ],
)
def test_storages_check_their_seconds_when_made(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_a_path_becomes_absolute() -> None:
    assert checked_path("path", "runs/x.json") == Path.cwd() / "runs" / "x.json"
    assert checked_path("path", Path("/tmp/x.db")) == Path("/tmp/x.db")


@pytest.mark.parametrize("value", ["", Path(""), ".", "..", "/", "runs/.."])
def test_a_path_that_cannot_be_a_files_is_refused(value: object) -> None:
    with pytest.raises(ValueError) as info:
        checked_path("path", value)
    assert str(info.value) == f"path must name a file, not {value!r}"


@pytest.mark.parametrize("value", [5, None, b"x.json"])
def test_what_is_no_path_is_refused(value: object) -> None:
    with pytest.raises(TypeError) as info:
        checked_path("path", value)
    assert str(info.value) == f"path must be a str or an os.PathLike of one, not {value!r}"


@pytest.mark.parametrize("storage", [cf.FileStorage, cf.SQLiteStorage])
@pytest.mark.parametrize(("path", "error"), [("", ValueError), (5, TypeError)])
def test_storages_check_their_path_when_made(
    storage: Callable[[object], object], path: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=f"^path .*, not {path!r}$"):
        storage(path)


@pytest.mark.parametrize("run_id", ["", 5, None, b"id"])
def test_a_run_id_is_a_non_empty_str(run_id: object) -> None:
    require_run_id("r-1")
    with pytest.raises(ValueError, match=f"run_id must be a non-empty str, not {run_id!r}"):
        require_run_id(run_id)


def test_utf8_problem_names_what_utf_8_cannot_encode() -> None:
    assert utf8_problem("id-ü-🙂") is None
    assert utf8_problem("f\udc00") == "cannot be encoded as UTF-8: surrogates not allowed"


def test_a_run_id_is_text_utf_8_can_encode() -> None:
    require_run_id("r-ü-🙂")
    with pytest.raises(ValueError) as info:
        require_run_id("r-\ud800")
    assert (
        str(info.value) == "run_id 'r-\\ud800' cannot be encoded as UTF-8: surrogates not allowed"
    )


def test_params_become_a_fresh_dict_and_none_an_empty_one() -> None:
    given = {"user": "ada"}
    params = checked_params(given)
    given["user"] = "bob"
    assert (params, checked_params(None)) == ({"user": "ada"}, {})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("user=ada", "params must be a mapping or None, got str"),
        ([("user", "ada")], "params must be a mapping or None, got list"),
        ({1: "ada"}, "params keys must be str, got 1"),
    ],
)
def test_params_that_are_not_a_mapping_of_str_keys_are_refused(
    params: object, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        checked_params(params)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mailbox_size": 0}, "mailbox_size must be an int >= 1, got 0"),
        ({"max_runs": True}, "max_runs must be an int >= 1, got True"),
    ],
)
async def test_open_engine_checks_its_sizes(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        async with cf.open_engine(**settings):  # type: ignore[arg-type]
            pass


async def test_a_worker_checks_its_concurrency() -> None:
    async with cf.open_engine() as engine:
        with pytest.raises(ValueError, match="concurrency must be an int >= 1, got 0"):
            await engine.serve("redis://127.0.0.1:1/q", [], "redis://127.0.0.1:1", concurrency=0)


def test_a_command_line_count_is_an_int_of_one_or_more() -> None:
    assert positive_int("3") == 3
    for text in ("0", "-2", "1.5", "many"):
        with pytest.raises(argparse.ArgumentTypeError) as info:
            positive_int(text)
        assert str(info.value) == f"expected an integer >= 1, got {text!r}"
