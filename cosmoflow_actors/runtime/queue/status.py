"""The read side of the run queue: :func:`queue_status` (what the queue says about
each submitted run) and :func:`leases_checked` (durable runs' records checked against
their queue's leases)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from cosmoflow_actors.runtime.queue.client import FINISHED, RunQueue, as_queue
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
    ``passed_over`` names the workers that lacked its flow and left it to others
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
    it reads them; raises StorageError when the server cannot be reached). A run whose
    entry leaves the queue while they are read is left out; one of which the queue
    holds what a queue does not write is "unreadable" (see :class:`QueuedRun`)."""
    queue = as_queue(queue)
    raw: dict[bytes, bytes] = await queue.call("HGETALL", queue.runs)
    passed: dict[bytes, bytes] = await queue.call("HGETALL", queue.passed)
    runs = []
    for key, data in sorted(raw.items()):
        try:
            run = await _queued_run(queue, key, data, passed.get(key))
        except UnreadableEntryError as exc:
            run = QueuedRun(shown(key), "", "unreadable", None, None, 0, str(exc))
        if run is not None:
            runs.append(run)
    return runs


async def _queued_run(
    queue: RunQueue, key: bytes, data: bytes, note: bytes | None
) -> QueuedRun | None:
    """The status of the run ``key``, of which the queue's hash held ``data`` and its
    hash of passed-over notes ``note`` (None: none); its lease is read unless ``data``
    says it ended (blocks while it reads it). None when the entry has left the hash by
    then. Raises UnreadableEntryError when the run id, the entry, the note or the
    lease key (its type) is not what a queue writes."""
    run_id = decoded_run_id(queue, key, "the queue's hash of runs")
    info = decoded_info(queue, run_id, data)
    passed_over = () if note is None else tuple(decoded_passed(queue, run_id, note)[1])
    lease_left = None
    if info["state"] not in FINISHED:
        now = await _run_now(queue, run_id)
        if now is None:
            return None
        info, lease_left = now
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


async def _run_now(queue: RunQueue, run_id: str) -> tuple[dict[str, Any], float | None] | None:
    """What the queue holds about the submitted run ``run_id`` and the seconds left on
    its lease (None when no one holds it), read together (see ``scripts.LEASE``); None
    when the queue no longer holds the run."""
    _, left_ms, data = await _lease_now(queue, run_id)
    if data is None:
        return None
    return decoded_info(queue, run_id, data), left_ms / 1000 if left_ms >= 0 else None


async def _lease_now(queue: RunQueue, run_id: str) -> tuple[str | None, int, bytes | None]:
    """The holder of ``run_id``'s lease (None when no one holds it), the milliseconds
    it has left (negative then) and what the queue's hash holds about the run (None
    when nothing), read at one instant (see ``scripts.LEASE``). Blocks while the
    server answers. Raises UnreadableEntryError when the lease key holds another
    Redis type than a string."""
    keys = [queue.lease_key(run_id), queue.runs]
    holder, left_ms, data, kind = await queue.script(LEASE, keys, [run_id])
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
    Blocks while it reads the leases; raises StorageError when the server cannot be
    reached.
    """
    if not isinstance(storage, RedisStorage):
        return list(runs)
    here = _server(storage.url)
    queues: dict[str, RunQueue] = {}
    checked = []
    try:
        for run in runs:
            name = _queue_name(run, here)
            if name is not None:
                if name not in queues:
                    queues[name] = RunQueue(storage.url, name)
                run = await _with_lease(queues[name], run)
            checked.append(run)
    finally:
        for queue in queues.values():
            await queue.aclose()
    return checked


def _queue_name(run: RunRecord, here: tuple[str, int, str] | None) -> str | None:
    """The name of the queue holding the lease of ``run``; None unless ``run`` is running
    for a queue on the server ``here`` (see :func:`_server`)."""
    if here is None or run.state != "running" or run.queue is None:
        return None
    parts = urlsplit(run.queue)
    head, _, name = parts.path.rpartition("/")
    return name if _server(urlunsplit(parts._replace(path=head))) == here else None


async def _with_lease(queue: RunQueue, run: RunRecord) -> RunRecord:
    """``run`` with its lease's holder and time left; without a lease, orphaned, or
    ended as the queue recorded it if it ended after its record was read (a run drops
    its lease as it records its outcome); as it is when its lease key holds another
    Redis type (no worker can take the lease: ``queue_status`` says why)."""
    try:
        holder, left_ms, data = await _lease_now(queue, run.run_id)
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
