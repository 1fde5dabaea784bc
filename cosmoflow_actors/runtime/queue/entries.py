"""How what the queue's keys hold is read back: the run id of a stream entry, a run's
entry in the queue's hash, a run's note of the workers that passed it over, and its
lease key's type (a queue writes a string there). Each
is checked as it is decoded (UTF-8, JSON, its nesting, each field's type), and one
that is not what a queue writes raises :class:`UnreadableEntryError` naming the queue,
the run (as far as its id can be read) and the field at fault: the run is left alone,
and every other run goes on."""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from cosmoflow_actors.errors import CosmoFlowError, with_article
from cosmoflow_actors.node import is_finite_number

if TYPE_CHECKING:
    from cosmoflow_actors.runtime.queue.client import RunQueue

STATES: Final = ("pending", "running", "succeeded", "failed")
"""The states a queue writes in a run's entry."""
MAX_DEPTH: Final = 100
"""How deep the value of one of a run's params may nest lists and objects (``[[1]]``:
2). ``submit`` refuses a deeper one, and a worker reads an entry with one as not
written by a queue: a limit far below Python's recursion limit, so that whatever
``submit`` accepts decodes wherever a worker reads it."""


class UnreadableEntryError(CosmoFlowError):
    """What the queue holds for a run is not what a queue writes: its run id is not
    UTF-8, its entry in the queue's hash is not UTF-8 JSON (or nested too deep), a
    field of it has the wrong type (a flow name that is not a str, attempts that are
    not an int, params that are not an object of finite JSON, or nest deeper than
    :data:`MAX_DEPTH`...), its passed-over
    note is not one, or its lease key holds another Redis type than a string (a
    hash...). No worker can run it. A worker that claims it acknowledges its
    stream entry and logs it; :func:`queue_status` shows it as "unreadable"; the
    entry itself is left as it is."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text_or_none(value: object) -> bool:
    return value is None or isinstance(value, str)


def _is_params(value: object) -> bool:
    """Whether ``value`` is a JSON object whose values are finite JSON nested at most
    :data:`MAX_DEPTH` deep, as ``submit`` writes params (it refuses NaN, the
    infinities and deeper values)."""
    if not isinstance(value, dict):
        return False
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (ValueError, RecursionError):
        return False
    return not deeper_than(MAX_DEPTH + 1, value, encoded)


def deeper_than(limit: int, value: Any, encoded: str) -> bool:
    """Whether ``value``, decoded JSON whose text is ``encoded``, nests lists and
    objects more than ``limit`` deep (``1``: 0, ``[1]``: 1, ``{"a": [1]}``: 2). Walks
    ``value`` one level at a time, without recursion, and only when ``encoded`` holds
    more than ``limit`` opening brackets (then up to ``limit`` levels of it)."""
    if encoded.count("[") + encoded.count("{") <= limit:
        return False
    level = [value]
    for _ in range(limit):
        level = [child for each in level for child in _children(each)]
        if not level:
            return False
    return any(isinstance(each, list | dict) for each in level)


def _children(value: Any) -> Iterable[Any]:
    """The values ``value`` holds: a list's items, a dict's values, none for a scalar."""
    if isinstance(value, dict):
        return value.values()
    return value if isinstance(value, list) else ()


def _is_result(value: object) -> bool:
    """Whether ``value`` is the result a worker records for a run that succeeded."""
    return (
        isinstance(value, dict)
        and "value" in value
        and isinstance(value.get("final_action"), str)
        and isinstance(value.get("path"), list)
        and all(isinstance(step, str) for step in value["path"])
        and is_finite_number(value.get("duration"))
    )


Check = tuple[Callable[[Any], bool], str]
"""A test of a field's value, and what the value should be (for the error)."""

_RUN_FIELDS: Final[dict[str, Check]] = {
    "state": (lambda value: value in STATES, f"one of {', '.join(STATES)}"),
    "flow": (lambda value: isinstance(value, str) and bool(value), "a non-empty str"),
    "params": (
        _is_params,
        f"an object of finite JSON values, each nested at most {MAX_DEPTH} deep",
    ),
    "attempts": (lambda value: _is_int(value) and value >= 0, "an int >= 0"),
    "owner": (_is_text_or_none, "a str"),
    "error": (_is_text_or_none, "a str"),
}
"""The fields of a run's entry, checked when there (state and flow must be)."""
_REQUIRED: Final = ("state", "flow")
_RESULT: Final[Check] = (_is_result, "{value, final_action, path, duration}")
"""The result field of the entry of a run that succeeded (it must be there)."""


def decoded_run_id(queue: RunQueue, raw: bytes | str | None, where: str) -> str:
    """``raw``, a run id as ``where`` in ``queue`` holds it (None when it holds none),
    as a str. Raises UnreadableEntryError naming ``where`` when there is none, or it is
    not non-empty UTF-8."""
    if raw is None:
        raise UnreadableEntryError(f"{queue!r}: {where} names no run_id")
    try:
        run_id = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        why = f"{queue!r}: the run id {raw!r} of {where} is not UTF-8"
        raise UnreadableEntryError(why) from exc
    if not run_id:
        raise UnreadableEntryError(f"{queue!r}: {where} has an empty run_id")
    return run_id


def shown(raw: bytes | str) -> str:
    """``raw``, part of a reply of the server, as a str to show: bytes that are not
    UTF-8 come out as backslash escapes."""
    return raw.decode(errors="backslashreplace") if isinstance(raw, bytes) else raw


def decoded_info(queue: RunQueue, run_id: str, data: bytes | str) -> dict[str, Any]:
    """``data``, what ``queue``'s hash holds about ``run_id``, decoded. Raises
    UnreadableEntryError naming the queue, the run and the field at fault when it is
    not what a queue writes (see :data:`_RUN_FIELDS`)."""
    what = f"the entry of run {run_id!r}"
    info = _decoded_json(queue, what, data)
    if not isinstance(info, dict):
        raise _not_written(queue, what, "it", info, "a JSON object")
    for field in _REQUIRED:
        if field not in info:
            raise UnreadableEntryError(
                f"{queue!r}: {what} was not written by a queue: it has no {field!r}"
            )
    for field, (valid, expected) in _RUN_FIELDS.items():
        if field in info and not valid(info[field]):
            raise _not_written(queue, what, f"its {field!r}", info[field], expected)
    if info["state"] == "succeeded" and not _RESULT[0](info.get("result")):
        raise _not_written(queue, what, "its 'result'", info.get("result"), _RESULT[1])
    return info


def decoded_passed(queue: RunQueue, run_id: str, data: bytes | str) -> tuple[float, list[str]]:
    """``data``, ``queue``'s note of the workers that passed ``run_id`` over, decoded:
    since when (Unix time) and which. Raises UnreadableEntryError naming the queue, the
    run and the field at fault when it is not what a queue writes."""
    what = f"the passed-over note of run {run_id!r}"
    note = _decoded_json(queue, what, data)
    if not isinstance(note, dict):
        raise _not_written(queue, what, "it", note, "a JSON object")
    since, by = note.get("since"), note.get("by")
    if not is_finite_number(since):
        raise _not_written(queue, what, "its 'since'", since, "a finite number")
    if not isinstance(by, list) or not all(isinstance(name, str) for name in by):
        raise _not_written(queue, what, "its 'by'", by, "a list of str")
    return since, by


def foreign_lease(queue: RunQueue, run_id: str, kind: bytes | str) -> UnreadableEntryError:
    """The error for the lease key of ``run_id`` in ``queue``, which holds the Redis type
    ``kind`` where a queue writes a string naming a worker."""
    return UnreadableEntryError(
        f"{queue!r}: the lease of run {run_id!r} was not written by a queue: its key "
        f"{queue.lease_key(run_id)!r} holds {with_article(shown(kind))}, not a string naming "
        "a worker"
    )


def _decoded_json(queue: RunQueue, what: str, data: bytes | str) -> Any:
    """``data`` (``what`` ``queue`` holds) decoded from UTF-8 JSON, an object with a key
    twice refused. Raises UnreadableEntryError saying which of these it is not."""
    try:
        text = data.decode() if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise UnreadableEntryError(f"{queue!r}: {what} is not UTF-8: {exc}") from exc
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError as exc:
        raise UnreadableEntryError(f"{queue!r}: {what} is JSON nested too deep") from exc
    except ValueError as exc:
        raise UnreadableEntryError(f"{queue!r}: {what} is not JSON: {exc}") from exc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The object of ``pairs``; ValueError naming a key given twice (a queue never
    writes one, and which of its values counts would be a guess)."""
    decoded: dict[str, Any] = {}
    for key, value in pairs:
        if key in decoded:
            raise ValueError(f"the key {key!r} is there twice")
        decoded[key] = value
    return decoded


def _not_written(
    queue: RunQueue, what: str, part: str, value: object, expected: str
) -> UnreadableEntryError:
    """The error for ``part`` of ``what`` ``queue`` holds, ``value``, which is not the
    ``expected`` a queue writes (the value quoted shortened, as ``reprlib`` does)."""
    return UnreadableEntryError(
        f"{queue!r}: {what} was not written by a queue: {part} is {reprlib.repr(value)}, "
        f"not {expected}"
    )
