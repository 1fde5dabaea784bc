"""The read side of the run queue: :func:`queue_status` (what the queue says about
each submitted run) and :func:`leases_checked` (durable runs' records checked against
their queue's leases)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from cosmoflow_actors.runtime.queue.client import FINISHED, RunQueue, as_queue, unquoted_name
from cosmoflow_actors.runtime.queue.entries import (
    UnreadableEntryError,
    decoded_info,
    decoded_passed,
    decoded_run_id,
    foreign_lease,
    shown,
)
from cosmoflow_actors.runtime.queue.scripts import LEASE
from cosmoflow_actors.runtime.run_record import RecordedState, RunRecord
from cosmoflow_actors.storage.base import Storage
from cosmoflow_actors.storage.redis import RedisStorage

BATCH: Final = 1000
"""The most runs whose leases one round trip to the server reads."""
QueuedState = Literal["pending", "running", "orphaned", "succeeded", "failed", "unreadable"]
"""What :class:`QueuedRun` says of a run (see there)."""


@dataclass(frozen=True, slots=True)
class QueuedRun:
    """What the queue says about one submitted run (see :func:`queue_status`).

    ``state`` is "pending" (not claimed yet), "running" (a worker holds its lease),
    "orphaned" (claimed, but its lease is gone: its worker died, was cut off, or was
    stopped and handed it back; another worker takes it over), "succeeded",
    "failed" or "unreadable" (what the queue holds for it is not what a queue
    writes: its run id, its entry, its passed-over note or its lease key (of another
    Redis type than a string, which no worker can take); ``error`` says which and
    why, ``flow_name`` is empty, and ``run_id`` shows bytes that are not UTF-8 as
    backslash escapes). ``owner`` names the worker that holds (or last held) the run,
    ``lease_left`` the seconds its lease has left (None when no lease is held).
    ``passed_over`` names the workers that lacked its flow (or a version of it that fits
    its record) and left it to others
    since it was submitted or requeued, until a worker that has the flow claims it (a
    run failed for want of one keeps them).
    """

    run_id: str
    flow_name: str
    state: QueuedState
    owner: str | None
    lease_left: float | None
    attempts: int
    error: str | None
    passed_over: tuple[str, ...] = ()


async def queue_status(queue: RunQueue | str) -> list[QueuedRun]:
    """Every run submitted to ``queue``, with its state, owner and lease (blocks while
    it reads them, the leases :data:`BATCH` runs to a round trip; raises StorageError
    when the server cannot be reached). A run whose entry leaves the queue while they
    are read is left out; one of which the queue holds what a queue does not write is
    "unreadable" (see :class:`QueuedRun`)."""
    queue = as_queue(queue)
    raw: dict[bytes, bytes] = await queue.call("HGETALL", queue.runs)
    passed: dict[bytes, bytes] = await queue.call("HGETALL", queue.passed)
    runs: list[QueuedRun | None] = []
    unfinished: list[tuple[int, str, tuple[str, ...]]] = []
    for key, data in sorted(raw.items()):
        try:
            run_id, info, passed_over = _entry(queue, key, data, passed.get(key))
        except UnreadableEntryError as exc:
            runs.append(_unreadable(shown(key), exc))
            continue
        if info["state"] in FINISHED:
            runs.append(_queued_run(run_id, info, None, passed_over))
        else:
            unfinished.append((len(runs), run_id, passed_over))
            runs.append(None)
    replies = await _lease_replies(queue, [run_id for _, run_id, _ in unfinished])
    for (index, run_id, passed_over), reply in zip(unfinished, replies, strict=True):
        runs[index] = _run_now(queue, run_id, passed_over, reply)
    return [run for run in runs if run is not None]


def _entry(
    queue: RunQueue, key: bytes, data: bytes, note: bytes | None
) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """The run id ``key``, the entry ``data`` the queue's hash held for it, and the
    workers its passed-over note ``note`` names (None: none), decoded. Raises
    UnreadableEntryError when one of them is not what a queue writes. Never blocks."""
    run_id = decoded_run_id(queue, key, "the queue's hash of runs")
    info = decoded_info(queue, run_id, data)
    passed_over = () if note is None else tuple(decoded_passed(queue, run_id, note)[1])
    return run_id, info, passed_over


def _run_now(
    queue: RunQueue, run_id: str, passed_over: tuple[str, ...], reply: list[Any]
) -> QueuedRun | None:
    """The status of the unfinished run ``run_id`` from ``reply``, what ``scripts.LEASE``
    read of it (its entry and its lease at one instant); None when the entry had left
    the queue's hash by then; "unreadable" when the entry or the lease key is not what
    a queue writes. Never blocks."""
    try:
        _, left_ms, data = _lease_now(queue, run_id, reply)
        if data is None:
            return None
        info = decoded_info(queue, run_id, data)
    except UnreadableEntryError as exc:
        return _unreadable(run_id, exc)
    return _queued_run(run_id, info, left_ms / 1000 if left_ms >= 0 else None, passed_over)


def _queued_run(
    run_id: str, info: dict[str, Any], lease_left: float | None, passed_over: tuple[str, ...]
) -> QueuedRun:
    """The status of the run ``run_id`` whose entry is ``info``: a running run without
    a lease (``lease_left`` None) is orphaned."""
    state = info["state"]
    if state == "running" and lease_left is None:
        state = "orphaned"
    return QueuedRun(
        run_id,
        info["flow"],
        state,
        info.get("owner"),
        lease_left,
        info.get("attempts", 0),
        info.get("error"),
        passed_over,
    )


def _unreadable(run_id: str, error: UnreadableEntryError) -> QueuedRun:
    """The status of the run ``run_id`` of which the queue holds what ``error`` says."""
    return QueuedRun(run_id, "", "unreadable", None, None, 0, str(error))


async def _lease_replies(queue: RunQueue, run_ids: Sequence[str]) -> list[list[Any]]:
    """What ``scripts.LEASE`` reads of each run of ``run_ids`` (its lease and its
    entry, at one instant), in order, :data:`BATCH` runs to a round trip (blocks while
    the server answers)."""
    replies: list[list[Any]] = []
    for start in range(0, len(run_ids), BATCH):
        batch = run_ids[start : start + BATCH]
        calls = [([queue.lease_key(run_id), queue.runs], [run_id]) for run_id in batch]
        replies += await queue.scripts(LEASE, calls)
    return replies


def _lease_now(
    queue: RunQueue, run_id: str, reply: list[Any]
) -> tuple[str | None, int, bytes | None]:
    """From ``reply``, what ``scripts.LEASE`` read of ``run_id``: the holder of its
    lease (None when no one holds it), the milliseconds it has left (negative then)
    and what the queue's hash holds about the run (None when nothing). Raises
    UnreadableEntryError when the lease key holds another Redis type than a string.
    Never blocks."""
    holder, left_ms, data, kind = reply
    if kind is not None:
        raise foreign_lease(queue, run_id, kind)
    return None if holder is None else shown(holder), left_ms, data


async def leases_checked(storage: Storage, runs: Iterable[RunRecord]) -> list[RunRecord]:
    """``runs``, the durable runs recorded in ``storage``, with what their queue says.

    A running run that a worker of a queue claimed can be checked when ``storage`` is
    a RedisStorage on the queue's server (the same host, port and database in the
    URLs): it gets the worker holding its lease as ``owner`` and the seconds the lease
    has left, or the state "orphaned" when no worker holds it (the worker died, was cut
    off or dropped the run; the queue gives it to another worker), or the outcome the
    queue recorded when the run ended after its record was read. Every other run, and
    one whose lease key holds another Redis type than a string, is returned as it is.
    Blocks while it reads the leases, :data:`BATCH` runs of a queue to a round trip;
    raises StorageError when the server cannot be reached.
    """
    checked = list(runs)
    if not isinstance(storage, RedisStorage):
        return checked
    here = _server(storage.url)
    by_queue: dict[str, list[int]] = {}
    for index, run in enumerate(checked):
        name = _queue_name(run, here)
        if name is not None:
            by_queue.setdefault(name, []).append(index)
    for name, indices in by_queue.items():
        queue = RunQueue(storage.url, name)
        try:
            replies = await _lease_replies(queue, [checked[index].run_id for index in indices])
        finally:
            await queue.aclose()
        for index, reply in zip(indices, replies, strict=True):
            checked[index] = _with_lease(queue, checked[index], reply)
    return checked


def _queue_name(run: RunRecord, here: tuple[str, int, str] | None) -> str | None:
    """The name of the queue holding the lease of ``run``, read from its address (see
    ``RunQueue.address``); None unless ``run`` is running for a queue on the server
    ``here`` (see :func:`_server`), and when its address names no queue (its last part
    decodes to no name a queue takes)."""
    if here is None or run.state != "running" or run.queue is None:
        return None
    parts = urlsplit(run.queue)
    head, _, quoted = parts.path.rpartition("/")
    if _server(urlunsplit(parts._replace(path=head))) != here:
        return None
    try:
        return unquoted_name(quoted)
    except ValueError:
        return None


def _with_lease(queue: RunQueue, run: RunRecord, reply: list[Any]) -> RunRecord:
    """``run`` with its lease's holder and time left, as ``reply`` (what
    ``scripts.LEASE`` read of it) says; without a lease, orphaned, or ended as the
    queue recorded it if it ended after its record was read (a run drops its lease as
    it records its outcome); as it is when its lease key holds another Redis type (no
    worker can take the lease: ``queue_status`` says why). Never blocks."""
    try:
        holder, left_ms, data = _lease_now(queue, run.run_id, reply)
    except UnreadableEntryError:
        return run
    if holder is not None:
        return dataclasses.replace(run, owner=holder, lease_left=max(0, left_ms) / 1000)
    ended = None if data is None else _ended_state(queue, run.run_id, data)
    state: RecordedState = "orphaned" if ended is None else ended
    return dataclasses.replace(run, state=state, lease_left=None)


def _ended_state(
    queue: RunQueue, run_id: str, data: bytes
) -> Literal["succeeded", "failed"] | None:
    """The outcome ``data``, the queue's entry for ``run_id``, records; None when it
    records none, or is not what a queue writes. Never blocks."""
    try:
        state = decoded_info(queue, run_id, data)["state"]
    except UnreadableEntryError:
        return None
    if state == "succeeded":
        return "succeeded"
    if state == "failed":
        return "failed"
    return None


def _server(url: str) -> tuple[str, int, str] | None:
    """The host, port and database a ``redis://`` or ``rediss://`` URL names (None for
    another URL): two URLs naming the same ones reach the same data."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return None
    try:
        port = parts.port or 6379
    except ValueError:
        return None
    return parts.hostname or "localhost", port, parts.path.strip("/") or "0"
