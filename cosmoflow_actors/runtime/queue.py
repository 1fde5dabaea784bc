"""Runs across engine processes: a run queue on Redis, served by workers with leases.

A :class:`RunQueue` is a Redis stream with one consumer group (``workers``) and a hash
of what is known about each submitted run. :func:`submit` adds a run to both;
:func:`serve` (``engine.serve``) makes an engine a worker: it claims runs from the
stream and runs each one durably (its ``run_id`` on a store of the run's own), so every
step commits with the run's record.

A worker holds a lease on each run it runs: a key ``...:lease:<run_id>`` naming the
worker, set with ``SET NX PX`` (so two workers never hold it at once) and renewed every
``lease / 3`` seconds while the run is alive. A worker that dies or is cut off stops
renewing; once the lease has expired, another worker takes the run's stream entry over
(``XAUTOCLAIM`` of entries idle for at least the lease) and resumes the run from its last
committed step. A worker that lost its lease cancels the run, and one whose commit
lost to another engine (RunConflictError) drops it: neither reports an outcome. A
worker that is stopped (its ``serve`` cancelled) cancels its runs and hands each one
back: it drops the lease and makes the stream entry idle for a lease, so the next
worker that looks for expired leases takes the run over at once.

A worker that lacks a run's flow leaves the run to the others: it notes itself among
the workers that passed the run over and gives the stream entry back, idle enough for
any worker to take over at once. Once workers have passed a run over for
``flow_wait`` seconds with none taking it, the next one to pass it over fails it.

Redis keys of the queue ``NAME``: ``cosmoflow:queue:NAME:stream`` (the stream),
``cosmoflow:queue:NAME:runs`` (a hash, run id -> JSON),
``cosmoflow:queue:NAME:lease:<run_id>`` (the leases) and
``cosmoflow:queue:NAME:passed`` (a hash, run id -> JSON: since when workers lacking
its flow pass the run over, and which). Nothing of these is ever deleted but the
leases: the entries of finished runs stay in the hash and the stream (acknowledged),
every worker name stays a consumer of the group, and the runs' stores keep their data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final
from urllib.parse import urlsplit, urlunsplit

import trio

from cosmoflow_actors.errors import (
    CosmoFlowError,
    RunConflictError,
    StorageError,
    StoreValueError,
    causes,
)
from cosmoflow_actors.flow import Flow, FlowResult
from cosmoflow_actors.runtime import durability
from cosmoflow_actors.runtime.durability import RunRecord
from cosmoflow_actors.storage.base import Storage
from cosmoflow_actors.storage.redis import RedisStorage, redacted, send_command, shared_client
from cosmoflow_actors.tracing import describe_error
from cosmoflow_actors.validation import (
    checked_params,
    require_positive,
    require_run_id,
    require_seconds,
)

if TYPE_CHECKING:
    import redis

    from cosmoflow_actors.runtime.engine import Engine

LOGGER: Final = logging.getLogger("cosmoflow_actors.queue")
"""Where a worker says that its queue is out of reach, once per outage, and when it is
back (warnings; with logging not set up, Python prints them on stderr)."""

DEFAULT_LEASE: Final = 10.0
"""Seconds a worker's lease on a run lasts unless renewed (renewed every third of it)."""
DEFAULT_FLOW_WAIT: Final = 60.0
"""Seconds a run whose flow the workers that saw it lack waits for one that has it."""
RESULT_POLL_INTERVAL: Final = 0.05
"""Seconds :func:`result` waits between two reads of a run's state."""
MAX_POLL: Final = 0.5
"""The longest a worker waits for a new entry before it looks for expired leases again,
and the longest between two of its looks for expired leases while it has free slots."""
SCAN_STEPS: Final = 100
"""The most ``XAUTOCLAIM`` steps (each examines up to 10 pending entries) one look for
expired leases takes on the server before it answers; the worker goes on from there."""
GROUP: Final = "workers"
"""The stream's consumer group: every worker of every queue reads through it."""
FINISHED: Final = ("succeeded", "failed")
"""The states of a run whose outcome is recorded."""
THREADS: Final = 40
"""The most worker threads one :class:`RunQueue`'s calls to the server take at once.
They come from a limiter of the queue's own, not trio's default one, which thread
executor steps hold: a worker whose steps hold every thread still renews its leases."""
HAND_BACK_SECONDS: Final = 2.0
"""The longest a worker waits for the server while it records a run's outcome, and a
stopped worker while it hands a run back. Beyond it the worker goes on without, and
the run's lease expires by itself: another worker takes the run over and resumes it
after its last committed step (a run that ended gives the result its record holds)."""

_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
redis.call('DEL', KEYS[1])
return 1
"""
"""Record a run's outcome, acknowledge its entry and drop its lease, if the lease is
still the caller's (KEYS: lease, runs, stream; ARGV: owner, run id, info, group, id)."""
_IDLE_UNTIL_EXPIRY = """
local function idle_until_expiry(lease, stream, group, consumer, entry_id, lease_ms)
  local left = redis.call('PTTL', lease)
  local idle = math.max(0, tonumber(lease_ms) - left)
  redis.call('XCLAIM', stream, group, consumer, 0, entry_id, 'IDLE', idle)
end
"""
"""A Lua function: make the stream entry ``entry_id`` idle for ``lease_ms`` less the
milliseconds the lease key ``lease`` has left, so that it has been idle for a lease
(and a look for expired leases takes it over) when that lease expires, not a lease
after the look that found it held."""
_CLAIM = (
    _IDLE_UNTIL_EXPIRY
    + """
if redis.call('HGET', KEYS[2], ARGV[3]) ~= ARGV[4] then return 0 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  idle_until_expiry(KEYS[1], KEYS[4], ARGV[6], ARGV[1], ARGV[7], ARGV[2])
  return 0
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
redis.call('HDEL', KEYS[3], ARGV[3])
return 1
"""
)
"""Take the lease of a run and record it running, if its entry is still what the
caller read and no one holds the lease; forget who passed it over. When another
worker holds the lease, make the stream entry due when it expires (KEYS: lease, runs,
passed, stream; ARGV: owner, lease ms, run id, entry as read, entry running, group,
entry id). 1 if taken."""
_HELD = (
    _IDLE_UNTIL_EXPIRY
    + """
idle_until_expiry(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 0
"""
)
"""Make the entry ARGV[3] of the stream KEYS[2] (group ARGV[1], now consumer
ARGV[2]'s) due when the lease KEYS[1] expires (ARGV[4]: the lease in ms)."""
_RUN_ID_OF = """
local function run_id_of(fields)
  if not fields then return nil end
  for index = 1, #fields, 2 do
    if fields[index] == 'run_id' then return fields[index + 1] end
  end
  return nil
end
"""
"""A Lua function: the ``run_id`` field of a stream entry's fields (nil when none)."""
_EXPIRED = (
    _RUN_ID_OF
    + """
local cursor = ARGV[4]
for _ = 1, tonumber(ARGV[5]) do
  local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', 1)
  cursor = reply[1]
  local entry = reply[2][1]
  local run_id = entry and run_id_of(entry[2])
  if run_id then
    return {cursor, entry[1], run_id, redis.call('HGET', KEYS[2], run_id)}
  end
  if cursor == '0-0' then break end
end
return {cursor}
"""
)
"""Go on with the scan of the pending entries of the stream KEYS[1] (group ARGV[1])
from the cursor ARGV[4] for entries idle for at least ARGV[3] ms, taking over the first
one that names a run for consumer ARGV[2]; at most ARGV[5] steps. Returns the next
cursor ("0-0" once the scan is complete), then that entry's id, its run id and what
the hash KEYS[2] holds about the run (nil when nothing) if one was taken."""
_WAITING = (
    _RUN_ID_OF
    + """
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1,
  'STREAMS', KEYS[1], '>')
local entry = reply and reply[1][2][1]
local run_id = entry and run_id_of(entry[2])
if not run_id then return {} end
return {entry[1], run_id, redis.call('HGET', KEYS[2], run_id)}
"""
)
"""Read a new entry of the stream KEYS[1] for consumer ARGV[2] of group ARGV[1], without
waiting; return its id, its run id and what the hash KEYS[2] holds about the run (nil
when nothing), or nothing when there is no new entry (or it names no run)."""
_PASS_OVER = (
    _IDLE_UNTIL_EXPIRY
    + """
if redis.call('EXISTS', KEYS[2]) == 1 then
  idle_until_expiry(KEYS[2], KEYS[3], ARGV[4], ARGV[2], ARGV[5], ARGV[6])
  return false
end
local saved = redis.call('HGET', KEYS[1], ARGV[1])
local passed = {since = tonumber(ARGV[3]), by = {}}
if saved then passed = cjson.decode(saved) end
for _, name in ipairs(passed.by) do
  if name == ARGV[2] then return saved end
end
table.insert(passed.by, ARGV[2])
local encoded = cjson.encode(passed)
redis.call('HSET', KEYS[1], ARGV[1], encoded)
return encoded
"""
)
"""Note that worker ARGV[2] passed run ARGV[1] over at ARGV[3] (Unix time) in the hash
KEYS[1]; return the run's JSON ``{"since": first time, "by": [workers]}``, or nil
when a worker holds the run's lease KEYS[2] (it is no one's to pass over: its entry
ARGV[5] of the stream KEYS[3], group ARGV[4], is made due when the lease of ARGV[6] ms
expires)."""
_FAIL_PASSED = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
return 1
"""
"""Record run ARGV[1] failed (entry ARGV[3] in the hash KEYS[1]) and acknowledge its
entry ARGV[5] of the stream KEYS[3] (group ARGV[4]), if its entry in the hash is still
ARGV[2] (what the caller read) and no worker holds its lease KEYS[2]; 1 if done."""
_RENEW = """
local held = {}
for index, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    held[index] = redis.call('PEXPIRE', key, ARGV[2])
  else
    held[index] = 0
  end
end
return held
"""
"""Extend each lease of KEYS to ARGV[2] ms if it is still held by ARGV[1]; for each,
1 if it was, else 0."""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
"""Drop the lease KEYS[1] if it is held by ARGV[1]."""
_HAND_BACK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[1], 0, ARGV[3], 'IDLE', ARGV[4])
return 1
"""
"""Drop the lease KEYS[1] if it is held by ARGV[1], and make the entry ARGV[3] of the
stream KEYS[2] (group ARGV[2]) idle for ARGV[4] ms, so that a worker looking for
expired leases takes it over at once; 1 if the lease was ARGV[1]'s."""
_LEASE = """
return {
  redis.call('GET', KEYS[1]),
  redis.call('PTTL', KEYS[1]),
  redis.call('HGET', KEYS[2], ARGV[1]),
}
"""
"""The holder of the lease KEYS[1] (nil when none), its milliseconds left (negative
when no one holds it), and what the hash KEYS[2] holds about run ARGV[1] (nil when
nothing), read at one instant: a run that ends meanwhile drops its lease as it
records its outcome, so read apart they could show a finished run as orphaned."""
_SUBMIT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'run_id', ARGV[1])
return 1
"""
"""Add run ARGV[1] (info ARGV[2]) to the hash KEYS[1] and the stream KEYS[2], unless
the hash has it already; 1 if it was added."""
_REQUEUE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'run_id', ARGV[1])
return 1
"""
"""Replace run ARGV[1]'s entry in the hash KEYS[1] by ARGV[3], forget who passed it
over (the hash KEYS[3]) and add the run to the stream KEYS[2] again, if its entry is
still ARGV[2] (what the caller read); 1 if done."""


class UnreadableEntryError(CosmoFlowError):
    """The queue's hash holds an entry for a run that is not what a queue writes (not
    JSON, or without a str flow name): no worker can run it. A worker that claims it
    acknowledges its stream entry and logs it; :func:`queue_status` shows it as
    "unreadable"; the entry itself is left as it is."""


@dataclass(frozen=True, slots=True)
class QueuedRun:
    """What the queue says about one submitted run (see :func:`queue_status`).

    ``state`` is "pending" (not claimed yet), "running" (a worker holds its lease),
    "orphaned" (claimed, but its lease is gone: its worker died, was cut off, or was
    stopped and handed it back; another worker takes it over), "succeeded",
    "failed" or "unreadable" (the queue's entry for it is not what a queue writes:
    ``error`` says why, ``flow_name`` is empty; no worker runs it). ``owner`` names
    the worker that holds (or last held) the run, ``lease_left`` the seconds its
    lease has left (None when no lease is held).
    ``passed_over`` names the workers that lacked its flow and left it to others
    since it was submitted or requeued, until a worker that has the flow claims it (a
    run failed for want of one keeps them).
    """

    run_id: str
    flow_name: str
    state: str
    owner: str | None
    lease_left: float | None
    attempts: int
    error: str | None
    passed_over: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QueuedResult:
    """The outcome of a run that succeeded on a worker (see :func:`result`)."""

    run_id: str
    flow_name: str
    result: Any
    final_action: str
    execution_path: tuple[str, ...]
    duration: float
    worker: str


@final
class RunQueue:
    """A run queue on a Redis server: ``RunQueue(url, name)``, or
    :meth:`from_url` of ``redis://HOST:PORT[/DB]/NAME``.

    ``lease`` is how long (seconds) a worker's claim on a run lasts without renewal:
    the time after which a dead worker's runs go to others. ``flow_wait`` is how long
    (seconds) a run whose flow the workers that saw it lack waits for a worker that
    has it, before one of them fails it (0: the first one does). Every call to the
    server runs in a worker thread (at most :data:`THREADS` at once, apart from the
    threads of trio's default limiter), on a connection of the process's pool for the
    server; connection failures raise StorageError. Requires the ``redis`` package.
    """

    def __init__(
        self,
        url: str,
        name: str,
        *,
        lease: float = DEFAULT_LEASE,
        flow_wait: float = DEFAULT_FLOW_WAIT,
    ) -> None:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"a queue name must be a non-empty str without '/', not {name!r}")
        require_seconds("lease", lease)
        if math.isinf(lease):
            raise ValueError(
                "lease must be a finite number of seconds: a dead worker's runs"
                " would never be taken over"
            )
        require_seconds("flow_wait", flow_wait, zero=True)
        self.url = url
        self.name = name
        self.lease = lease
        self.flow_wait = flow_wait
        self.stream = f"cosmoflow:queue:{name}:stream"
        self.runs = f"cosmoflow:queue:{name}:runs"
        self.passed = f"cosmoflow:queue:{name}:passed"
        self._client: redis.Redis | None = None
        self._limiter = trio.CapacityLimiter(THREADS)

    @classmethod
    def from_url(
        cls, text: str, *, lease: float = DEFAULT_LEASE, flow_wait: float = DEFAULT_FLOW_WAIT
    ) -> RunQueue:
        """The queue ``redis://HOST:PORT[/DB]/NAME`` names: NAME is the last path part."""
        parts = urlsplit(text)
        head, _, name = parts.path.rpartition("/")
        if parts.scheme not in ("redis", "rediss") or not parts.netloc or not name:
            raise ValueError(f"queue {text!r}: expected redis://HOST[:PORT][/DB]/NAME")
        return cls(urlunsplit(parts._replace(path=head)), name, lease=lease, flow_wait=flow_wait)

    def __repr__(self) -> str:
        return f"RunQueue({redacted(self.url)!r}, {self.name!r})"

    @property
    def address(self) -> str:
        """The queue's URL, ``redis://HOST:PORT[/DB]/NAME``, without a password."""
        return f"{redacted(self.url)}/{self.name}"

    def lease_key(self, run_id: str) -> str:
        """The key of ``run_id``'s lease (its value names the worker holding it)."""
        return f"cosmoflow:queue:{self.name}:lease:{run_id}"

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply (blocks in a worker thread; a
        cancelled caller abandons the thread, which ends with the command)."""
        client = self._connected()
        return await self._in_thread(send_command, client, *args)

    async def script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run the Lua ``source`` atomically on the server; return its reply."""
        return await self.call("EVAL", source, len(keys), *keys, *args)

    async def info(self, run_id: str) -> dict[str, Any] | None:
        """What the queue's hash holds about ``run_id`` (None if it was not submitted)."""
        data = await self.call("HGET", self.runs, run_id)
        return None if data is None else _decoded_info(self, run_id, data)

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if they do not exist yet."""
        from redis.exceptions import ResponseError

        try:
            await self.call("XGROUP", "CREATE", self.stream, GROUP, "0", "MKSTREAM")
        except StorageError as exc:
            if not (isinstance(exc.__cause__, ResponseError) and "BUSYGROUP" in str(exc)):
                raise

    async def aclose(self) -> None:
        """Let go of the server: its connections stay in the process's pool (see
        ``RedisStorage``). Does not block."""
        self._client = None
        await trio.lowlevel.checkpoint()

    def _connected(self) -> redis.Redis:
        """The client, on connections whose socket waits are longer than a worker's
        longest blocking read."""
        if self._client is None:
            timeout = max(10.0, 3 * self.lease)
            self._client = shared_client(self.url, timeout, "RunQueue")
        return self._client

    async def _in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await trio.to_thread.run_sync(
                function, *args, limiter=self._limiter, abandon_on_cancel=True
            )
        except RedisError as exc:
            raise StorageError(f"{self!r}: {exc}") from exc


def as_queue(queue: RunQueue | str) -> RunQueue:
    """``queue``, or the queue its URL names (see :meth:`RunQueue.from_url`)."""
    return queue if isinstance(queue, RunQueue) else RunQueue.from_url(queue)


async def submit(
    queue: RunQueue | str,
    flow_name: str,
    *,
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> str:
    """Add a run of the flow called ``flow_name`` to ``queue``; return its run id.

    Without ``run_id`` a fresh one is made. Submitting a run id the queue already has
    adds nothing (the first submission stands), and raises ValueError when it names
    another flow or other params, which would be lost. ``params`` must be JSON that
    comes back equal (ValueError naming the param otherwise: no tuple, no key that is
    not a str).
    Blocks until the server has it; raises StorageError when it cannot be reached.
    """
    queue = as_queue(queue)
    if not isinstance(flow_name, str) or not flow_name:
        raise ValueError(f"flow_name must be a non-empty str, not {flow_name!r}")
    run_id = secrets.token_hex(8) if run_id is None else run_id
    require_run_id(run_id)
    checked = checked_params(params)
    for key, value in checked.items():
        _check_param(run_id, key, value)
    info = {"flow": flow_name, "params": checked, "state": "pending"}
    encoded = json.dumps(info, allow_nan=False)
    await queue.ensure_group()
    if not await queue.script(_SUBMIT, [queue.runs, queue.stream], [run_id, encoded]):
        await _check_resubmitted(queue, run_id, json.loads(encoded))
    return run_id


def _check_param(run_id: str, key: str, value: Any) -> None:
    """Raise ValueError naming ``key`` unless ``value`` goes through JSON unchanged (a
    tuple would come back a list, a dict's int keys str)."""
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"param {key!r} of run {run_id!r} is not JSON: {exc}") from exc
    if json.loads(encoded) != value:
        raise ValueError(
            f"param {key!r} of run {run_id!r} would reach the worker changed by JSON, as "
            f"{encoded}: give lists for tuples and str keys"
        )


async def _check_resubmitted(queue: RunQueue, run_id: str, info: dict[str, Any]) -> None:
    """Raise ValueError unless the run ``run_id`` that ``queue`` has already was submitted
    with the flow and params of ``info`` (blocks while it reads the queue);
    CosmoFlowError if the queue no longer has it (something else deleted it)."""
    first = await queue.info(run_id)
    if first is None:
        raise CosmoFlowError(f"run {run_id!r} left {queue!r} while it was submitted")
    submitted = {"flow": first["flow"], "params": first["params"]}
    if submitted != {"flow": info["flow"], "params": info["params"]}:
        raise ValueError(
            f"run {run_id!r} is on {queue!r} already, as flow {first['flow']!r} with params "
            f"{json.dumps(first['params'])} ({first['state']}); nothing is submitted: "
            "give the new run another run id"
        )


async def requeue(queue: RunQueue | str, run_id: str) -> None:
    """Put the failed run ``run_id`` back on ``queue``, pending: a worker resumes it after
    its last committed step (the step that failed runs again), as it takes over a run
    whose worker died. The workers that passed it over are forgotten, so a run that
    failed for want of a worker with its flow waits ``flow_wait`` again. Raises
    ValueError when the queue does not have the run, or has it in another state than
    "failed". Blocks while it talks to the server; raises StorageError when it cannot
    be reached."""
    queue = as_queue(queue)
    require_run_id(run_id)
    while True:
        data = await queue.call("HGET", queue.runs, run_id)
        if data is None:
            raise ValueError(f"run {run_id!r} is not on {queue!r}")
        info = _decoded_info(queue, run_id, data)
        if info["state"] != "failed":
            raise ValueError(
                f"run {run_id!r} is {info['state']} on {queue!r}: only a failed run is requeued"
            )
        pending = {key: value for key, value in info.items() if key != "error"}
        pending["state"] = "pending"
        keys = [queue.runs, queue.stream, queue.passed]
        if await queue.script(_REQUEUE, keys, [run_id, data, json.dumps(pending)]):
            return


async def result(
    queue: RunQueue | str, run_id: str, *, poll: float = RESULT_POLL_INTERVAL
) -> QueuedResult:
    """Wait for the submitted run ``run_id`` to end; return its outcome.

    Reads the run's state every ``poll`` seconds (default
    :data:`RESULT_POLL_INTERVAL`) until a worker recorded it; blocks until then (put a
    ``trio.fail_after`` around it to bound the wait). Raises CosmoFlowError when the
    run failed (naming the worker and the error) or the queue does not know the run,
    ValueError when ``run_id`` is not a non-empty str.
    """
    queue = as_queue(queue)
    require_run_id(run_id)
    while True:
        info = await queue.info(run_id)
        if info is None:
            raise CosmoFlowError(f"{queue!r} has no run {run_id!r}")
        if info["state"] == "succeeded":
            return _result_of(run_id, info)
        if info["state"] == "failed":
            raise CosmoFlowError(
                f"run {run_id!r} failed on worker {info.get('owner')}: {info.get('error')}"
            )
        await trio.sleep(poll)


async def queue_status(queue: RunQueue | str) -> list[QueuedRun]:
    """Every run submitted to ``queue``, with its state, owner and lease (blocks while
    it reads them; raises StorageError when the server cannot be reached)."""
    queue = as_queue(queue)
    raw: dict[bytes, bytes] = await queue.call("HGETALL", queue.runs)
    passed = await _passed_over(queue)
    runs = []
    for key, data in sorted(raw.items()):
        run_id = key.decode()
        try:
            run = await _queued_run(queue, run_id, data)
        except UnreadableEntryError as exc:
            run = QueuedRun(run_id, "", "unreadable", None, None, 0, str(exc))
        runs.append(dataclasses.replace(run, passed_over=passed.get(run_id, ())))
    return runs


async def _queued_run(queue: RunQueue, run_id: str, data: bytes) -> QueuedRun:
    """The status of ``run_id``, of which the queue's hash held ``data``; its lease is
    read unless ``data`` says it ended (blocks while it reads it). Raises
    UnreadableEntryError when the entry is not what a queue writes."""
    info = _decoded_info(queue, run_id, data)
    lease_left = None
    if info["state"] not in FINISHED:
        info, lease_left = await _run_now(queue, run_id)
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
    )


async def _run_now(queue: RunQueue, run_id: str) -> tuple[dict[str, Any], float | None]:
    """What the queue holds about the submitted run ``run_id`` and the seconds left on
    its lease (None when no one holds it), read together (see ``_LEASE``)."""
    _, ttl_ms, data = await queue.script(_LEASE, [queue.lease_key(run_id), queue.runs], [run_id])
    return _decoded_info(queue, run_id, data), ttl_ms / 1000 if ttl_ms >= 0 else None


async def _passed_over(queue: RunQueue) -> dict[str, tuple[str, ...]]:
    """The workers that passed each run over (lacking its flow), by run id."""
    raw: dict[bytes, bytes] = await queue.call("HGETALL", queue.passed)
    return {_text(key): tuple(json.loads(value)["by"]) for key, value in raw.items()}


async def leases_checked(storage: Storage, runs: Iterable[RunRecord]) -> list[RunRecord]:
    """``runs``, the durable runs recorded in ``storage``, with what their queue says.

    A running run that a worker of a queue claimed can be checked when ``storage`` is
    a RedisStorage on the queue's server (the same host, port and database in the
    URLs): it gets the worker holding its lease as ``owner`` and the seconds the lease
    has left, or the state "orphaned" when no worker holds it (the worker died, was cut
    off or dropped the run; the queue gives it to another worker), or the outcome the
    queue recorded when the run ended after its record was read. Every other run is
    returned as it is. Blocks while it reads the leases; raises StorageError when the
    server cannot be reached.
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
    server, _, name = run.queue.rpartition("/")
    return name if _server(server) == here else None


async def _with_lease(queue: RunQueue, run: RunRecord) -> RunRecord:
    """``run`` with its lease's holder and time left; without a lease, orphaned, or
    ended as the queue recorded it if it ended after its record was read (a run drops
    its lease as it records its outcome)."""
    keys = [queue.lease_key(run.run_id), queue.runs]
    holder, left_ms, data = await queue.script(_LEASE, keys, [run.run_id])
    if holder is not None:
        return dataclasses.replace(run, owner=_text(holder), lease_left=max(0, left_ms) / 1000)
    ended = None if data is None else _ended_state(queue, run.run_id, data)
    state = ended if ended in FINISHED else "orphaned"
    return dataclasses.replace(run, state=state, lease_left=None)


def _ended_state(queue: RunQueue, run_id: str, data: bytes) -> str | None:
    """The state ``data``, the queue's entry for ``run_id``, records (None when the
    entry is not what a queue writes). Never blocks."""
    try:
        return str(_decoded_info(queue, run_id, data)["state"])
    except UnreadableEntryError:
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


RunStores = Callable[[str], Storage]
"""A function giving the store of the run whose id it is given."""


@dataclass(frozen=True, slots=True)
class PerRunRedis:
    """The stores of a Redis server, one per run: run R's is the namespace
    ``PREFIX/R``, so runs neither share keys nor make each other's commits start over.
    Made by :func:`per_run_redis`; calling it makes run R's store (connecting to
    nothing)."""

    url: str = dataclasses.field(repr=False)
    """The server's URL (a password included, so left out of the repr)."""
    prefix: str

    def __call__(self, run_id: str) -> RedisStorage:
        return RedisStorage(self.url, namespace=f"{self.prefix}/{run_id}")


def per_run_redis(text: str) -> PerRunRedis:
    """The stores ``redis://HOST:PORT[/DB][#PREFIX]`` names, PREFIX ``runs`` by default.
    ValueError naming ``text`` when it is not a redis:// or rediss:// URL."""
    url, _, prefix = text.partition("#")
    if urlsplit(url).scheme not in ("redis", "rediss"):
        raise ValueError(f"store {text!r}: expected redis://HOST[:PORT][/DB][#PREFIX]")
    return PerRunRedis(url, prefix or "runs")


async def serve(
    engine: Engine,
    queue: RunQueue | str,
    flows: Mapping[str, Flow] | Iterable[Flow],
    store: str | RunStores,
    *,
    concurrency: int = 1,
    name: str | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the runs of ``queue`` on ``engine``, at most ``concurrency`` at once, until
    cancelled (see :meth:`Engine.serve`). Reports the worker's name to ``task_status``
    once it reads the queue."""
    require_positive("concurrency", concurrency)
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"a worker's name must be a non-empty str, not {name!r}")
    worker = _Worker(
        engine,
        as_queue(queue),
        _flows_by_name(flows),
        per_run_redis(store) if isinstance(store, str) else store,
        name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}",
    )
    await worker.queue.ensure_group()
    slots = trio.Semaphore(concurrency)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.renew_leases)
        task_status.started(worker.name)
        while True:
            await slots.acquire()
            try:
                claim = await worker.next_claim()
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(worker.run_claimed, claim, slots)


@dataclass(frozen=True, slots=True)
class _Claim:
    """A run a worker holds the lease of: its stream entry, flow and parameters, and
    when (trio time) the lease expires unless renewed."""

    entry_id: str
    run_id: str
    flow: Flow
    params: dict[str, Any]
    info: dict[str, Any]
    expires: float


@dataclass(slots=True)
class _Lease:
    """A lease its worker holds on a run it runs: the run's scope, cancelled once the
    lease is lost, and when (trio time) the lease expires unless renewed."""

    scope: trio.CancelScope
    expires: float


class _Worker:
    """One engine serving a queue: claims runs, runs them, renews their leases."""

    def __init__(
        self,
        engine: Engine,
        queue: RunQueue,
        flows: dict[str, Flow],
        stores: RunStores,
        name: str,
    ) -> None:
        self.engine = engine
        self.queue = queue
        self.flows = flows
        self.stores = stores
        self.name = name
        self.lease_ms = max(1, round(queue.lease * 1000))
        self._poll = min(MAX_POLL, queue.lease / 3)
        """Seconds: the longest wait for a new entry, and the shortest between two looks
        for expired leases that found none."""
        self._cursor = "0-0"
        """Where the look for expired leases goes on ("0-0": from the start)."""
        self._next_look = -math.inf
        """When (trio time) the next look for expired leases is due."""
        self._leases: dict[str, _Lease] = {}
        """The leases of the runs this worker runs now, by run id."""
        self._out_of_reach = False
        """Whether the worker's last attempt to claim a run found the queue out of
        reach (or refusing), so that an outage is logged once, and its end."""

    async def next_claim(self) -> _Claim:
        """Claim a run: one whose lease expired, when it is time to look for one (see
        :meth:`_claim_one`), else a new one. Blocks until there is one to claim."""
        while True:
            try:
                claim = await self._claim_one()
            except StorageError as exc:
                # The server is out of reach, or restarted without the stream: wait a
                # third of a lease, make the group again if need be, and go on.
                self._lost(exc)
                await trio.sleep(self.queue.lease / 3)
                with contextlib.suppress(StorageError):
                    await self.queue.ensure_group()
                continue
            self._found()
            if claim is not None:
                return claim

    def _lost(self, error: StorageError) -> None:
        """Log to :data:`LOGGER`, once an outage starts, that the queue cannot be used.
        Never blocks."""
        if not self._out_of_reach:
            self._out_of_reach = True
            retry = self.queue.lease / 3
            LOGGER.warning(
                "worker %s cannot use %r: %s; trying again every %.3g s",
                self.name,
                self.queue,
                error,
                retry,
            )

    def _found(self) -> None:
        """Log to :data:`LOGGER` that an outage of the queue has ended. Never blocks."""
        if self._out_of_reach:
            self._out_of_reach = False
            LOGGER.warning("worker %s uses %r again", self.name, self.queue)

    async def _claim_one(self) -> _Claim | None:
        """Claim a run whose lease expired, if it is time to look for one (see
        :meth:`_expired_claim`), else a new run, waiting a poll interval at most for
        one. None when there is none."""
        if trio.current_time() >= self._next_look:
            claim = await self._expired_claim()
            if claim is not None:
                return claim
        entry = await self._waiting()
        if entry is None:
            entry = await self._new()
        if entry is None:
            return None
        return await self._claim(*entry)

    async def _expired_claim(self) -> _Claim | None:
        """Go on looking through the pending entries for one idle for at least a
        lease, until this worker claims its run (the next look goes on from there, at
        once) or has looked through them all (the next look starts again a poll
        interval later, so that a run whose lease expired waits at most that long,
        whether the worker is busy or idle). None when it claimed none."""
        queue = self.queue
        while True:
            reply = await queue.script(
                _EXPIRED,
                [queue.stream, queue.runs],
                [GROUP, self.name, self.lease_ms, self._cursor, SCAN_STEPS],
            )
            self._cursor = _text(reply[0])
            if len(reply) > 1:
                claim = await self._claim(_text(reply[1]), _text(reply[2]), reply[3])
                if claim is not None:
                    return claim
            if self._cursor == "0-0":
                self._next_look = trio.current_time() + self._poll
                return None

    async def _waiting(self) -> tuple[str, str, bytes | None] | None:
        """A new entry, without waiting for one: its id, its run id and what the
        queue's hash holds about the run (None when nothing); None when there is none.
        One round trip, where :meth:`_new` takes two."""
        queue = self.queue
        reply = await queue.script(_WAITING, [queue.stream, queue.runs], [GROUP, self.name])
        return (_text(reply[0]), _text(reply[1]), reply[2]) if reply else None

    async def _new(self) -> tuple[str, str, bytes | None] | None:
        """A new entry, as :meth:`_waiting` gives it, waiting a poll interval at most
        for one.

        The wait goes on in the server whatever becomes of this task, and may end with
        an entry delivered to this worker: so a worker stopped meanwhile waits for it
        too (shielded, a poll interval and HAND_BACK_SECONDS at most), and gives back
        the entry it got (:meth:`_give_back`) before the cancellation goes on. A
        server that has not answered by then raises StorageError (an outage, for a
        worker that is not stopped).
        """
        queue = self.queue
        reply = None
        limit = self._poll + HAND_BACK_SECONDS
        with trio.move_on_after(limit, shield=True) as read:
            reply = await queue.call(
                "XREADGROUP",
                "GROUP",
                GROUP,
                self.name,
                "COUNT",
                1,
                "BLOCK",
                max(1, round(self._poll * 1000)),
                "STREAMS",
                queue.stream,
                ">",
            )
        if read.cancelled_caught:
            await trio.lowlevel.checkpoint_if_cancelled()
            raise StorageError(f"{queue!r}: no answer from the server within {limit:g} s")
        entries = _entries(reply[0][1]) if reply else []
        if not entries:
            return None
        entry_id, run_id = entries[0]
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            data = await queue.call("HGET", queue.runs, run_id)
        except trio.Cancelled:
            await self._give_back(entry_id)
            raise
        return entry_id, run_id, data

    async def _give_back(self, entry_id: str) -> None:
        """Make the entry ``entry_id``, delivered to this stopped worker and not
        claimed, idle for a lease, so that the next worker to look for expired leases
        takes its run at once. Shielded; blocks HAND_BACK_SECONDS at most (beyond, the
        entry is taken over once it has been idle for a lease)."""
        queue = self.queue
        with trio.move_on_after(HAND_BACK_SECONDS, shield=True):
            with contextlib.suppress(StorageError):
                await queue.call(
                    "XCLAIM", queue.stream, GROUP, self.name, 0, entry_id, "IDLE", self.lease_ms
                )

    async def _claim(self, entry_id: str, run_id: str, data: bytes | None) -> _Claim | None:
        """Take the lease of ``run_id``, of which the queue's hash held ``data`` (None:
        nothing), and record it running (see ``_CLAIM``); None when another worker
        holds it or this worker runs it still (its stream entry is made due when the
        lease expires), the run has ended or its entry in the hash is not what a queue
        writes (its stream entry is acknowledged then; the latter is logged), or this
        worker lacks its flow (it passes the run over)."""
        queue = self.queue
        try:
            info = None if data is None else _decoded_info(queue, run_id, data)
        except UnreadableEntryError as exc:
            LOGGER.warning("worker %s leaves run %r: %s", self.name, run_id, exc)
            info = None
        if data is None or info is None or info["state"] in FINISHED:
            await queue.call("XACK", queue.stream, GROUP, entry_id)
            return None
        lease_key = queue.lease_key(run_id)
        if run_id in self._leases:
            keys = [lease_key, queue.stream]
            await queue.script(_HELD, keys, [GROUP, self.name, entry_id, self.lease_ms])
            return None
        flow = self.flows.get(info["flow"])
        if flow is None:
            await self._pass_over(entry_id, run_id, data, info)
            return None
        running = {**info, "state": "running", "owner": self.name}
        running["attempts"] = info.get("attempts", 0) + 1
        encoded = json.dumps(running)
        expires = trio.current_time() + queue.lease
        taken = await queue.script(
            _CLAIM,
            [lease_key, queue.runs, queue.passed, queue.stream],
            [self.name, self.lease_ms, run_id, data, encoded, GROUP, entry_id],
        )
        if not taken:
            return None
        return _Claim(entry_id, run_id, flow, info.get("params", {}), running, expires)

    async def _pass_over(
        self, entry_id: str, run_id: str, data: bytes, info: dict[str, Any]
    ) -> None:
        """Leave ``run_id``, whose flow this worker lacks, to the other workers: note
        this worker among those that passed it over and give its entry back, idle for
        a lease, so that the next worker to look for expired leases takes it over.
        Fail the run instead once workers have passed it over for ``flow_wait``
        seconds, unless it changed since ``data`` (what the queue's hash held about it,
        decoded as ``info``) was read. Leave it alone while a worker holds its lease
        (its entry is due again when the lease expires)."""
        queue = self.queue
        lease_key = queue.lease_key(run_id)
        now = time.time()
        reply = await queue.script(
            _PASS_OVER,
            [queue.passed, lease_key, queue.stream],
            [run_id, self.name, now, GROUP, entry_id, self.lease_ms],
        )
        if reply is None:
            return
        passed = json.loads(reply)
        # cjson keeps 14 digits of ``since``: this pass's own may read a little later
        # than ``now``, and flow_wait=0 must fail the run at its first pass.
        waited = max(0.0, now - passed["since"])
        if waited < queue.flow_wait:
            idle = ["IDLE", self.lease_ms]
            await queue.call("XCLAIM", queue.stream, GROUP, self.name, 0, entry_id, *idle)
            return
        error = (
            f"CosmoFlowError: no worker took flow {info['flow']!r} in {waited:.1f} s "
            f"(passed over by {', '.join(passed['by'])}; flow_wait={queue.flow_wait:g} s)"
        )
        failed = {**info, "state": "failed", "owner": self.name, "error": error}
        await queue.script(
            _FAIL_PASSED,
            [queue.runs, lease_key, queue.stream],
            [run_id, data, json.dumps(failed), GROUP, entry_id],
        )

    async def run_claimed(self, claim: _Claim, slots: trio.Semaphore) -> None:
        """Run (or resume) the claimed run while :meth:`renew_leases` renews its lease;
        record its outcome unless the lease was lost or another engine committed first.
        Blocks until the run ends. A worker stopped meanwhile (this task cancelled)
        cancels the run and hands it back to the queue (see :meth:`_hand_back`: at most
        HAND_BACK_SECONDS more) before the cancellation goes on. Frees a slot."""
        lease = _Lease(trio.CancelScope(), claim.expires)
        self._leases[claim.run_id] = lease
        try:
            outcome = await self._outcome(claim, lease.scope)
            # The outcome is known: record it, even if the worker is stopped now, for
            # HAND_BACK_SECONDS at most.
            with trio.move_on_after(HAND_BACK_SECONDS, shield=True):
                await self._settle(claim, outcome)
        except BaseException:
            await self._hand_back(claim)
            raise
        finally:
            del self._leases[claim.run_id]
            slots.release()

    async def _settle(self, claim: _Claim, outcome: dict[str, Any] | None) -> None:
        """Record ``outcome`` and acknowledge the entry, or only drop the lease for a
        dropped run (None). Blocks while the server answers (run_claimed bounds it by
        HAND_BACK_SECONDS). If it is out of reach, the lease expires instead and another
        worker takes the run over: its record says how far it got."""
        with contextlib.suppress(StorageError):
            if outcome is None:
                await self.queue.script(_RELEASE, [self.queue.lease_key(claim.run_id)], [self.name])
            else:
                await self._finish(claim.entry_id, claim.run_id, {**claim.info, **outcome})

    async def _hand_back(self, claim: _Claim) -> None:
        """Give the run of a stopped worker back to the queue: drop its lease and make
        its entry idle for a lease (see ``_HAND_BACK``), so that the next worker to look
        for expired leases takes it over at once and resumes it after its last
        committed step. Shielded from cancellation; blocks at most HAND_BACK_SECONDS.
        A server out of reach or too slow leaves the lease to expire by itself."""
        queue = self.queue
        keys = [queue.lease_key(claim.run_id), queue.stream]
        args = [self.name, GROUP, claim.entry_id, self.lease_ms]
        with trio.move_on_after(HAND_BACK_SECONDS, shield=True):
            with contextlib.suppress(StorageError):
                await queue.script(_HAND_BACK, keys, args)

    async def _outcome(self, claim: _Claim, scope: trio.CancelScope) -> dict[str, Any] | None:
        """The run's outcome as the queue records it; None when it was dropped: its
        lease was lost, another engine committed a step of it first, or its store was
        out of reach (see :func:`_out_of_reach`: when the worker opened it, or when a
        step called it or committed; logged): the run is taken over once its entry has
        been idle for a lease. A node's own error (another StorageError included) fails the
        run, and so does data its store cannot encode (StoreValueError)."""
        with scope:
            try:
                storage = self.stores(claim.run_id)
                await self._own_record(storage, claim)
                done = await self.engine.resume(
                    claim.flow, storage, run_id=claim.run_id, params=claim.params
                )
            except Exception as exc:
                if _conflict(exc):
                    return None
                if _out_of_reach(exc):
                    self._dropped(claim.run_id, exc)
                    return None
                return {"state": "failed", "error": describe_error(exc)}
            return {"state": "succeeded", "error": None, "result": _result_info(done)}
        return None

    def _dropped(self, run_id: str, error: Exception) -> None:
        """Log to :data:`LOGGER` that the run ``run_id`` is dropped because its store is
        out of reach (``error`` says why), to be taken over after a lease. Never
        blocks."""
        LOGGER.warning(
            "worker %s drops run %r, to be taken over after a lease: its store is out of "
            "reach (%s)",
            self.name,
            run_id,
            describe_error(error),
        )

    async def _own_record(self, storage: Storage, claim: _Claim) -> None:
        """Name this worker and its queue in the run's record (written first if the run
        has none yet), so that the store tells who runs it. Blocks while ``storage``
        opens and commits; raises StorageError when it cannot."""
        owner = {"worker": self.name, "queue": self.queue.address}

        def named(stored: Any) -> Any:
            return durability.owned(stored, claim.run_id, claim.flow.name, claim.params, owner)

        await storage.open()
        await storage.update(durability.record_key(claim.run_id), named, None)
        await storage.commit()

    async def renew_leases(self) -> None:
        """Every third of a lease, renew the leases of all the runs this worker runs in
        one round trip (see :meth:`_renew`). Blocks until cancelled."""
        while True:
            await trio.sleep(self.queue.lease / 3)
            if self._leases:
                await self._renew(dict(self._leases))

    async def _renew(self, leases: dict[str, _Lease]) -> None:
        """Renew ``leases`` (by run id) in one round trip; cancel the run of each one
        that is lost, or expired before the round trip was sent. When the server is out
        of reach or does not answer before the first of them expires, none is renewed,
        and the runs of those that have expired by then are cancelled. Blocks while the
        server answers, until the first of them expires at most."""
        queue = self.queue
        sent = trio.current_time()
        live = _unexpired(leases, sent)
        if not live:
            return
        first = min(lease.expires for lease in live.values())
        keys = [queue.lease_key(run_id) for run_id in live]
        try:
            with trio.fail_after(first - sent):
                held = await queue.script(_RENEW, keys, [self.name, self.lease_ms])
        except (StorageError, trio.TooSlowError):
            _unexpired(live, trio.current_time())
            return
        for lease, renewed in zip(live.values(), held, strict=True):
            if renewed:
                # The server renewed it after ``sent``: it expires no sooner than this.
                lease.expires = sent + queue.lease
            else:
                lease.scope.cancel()

    async def _finish(self, entry_id: str, run_id: str, info: dict[str, Any]) -> None:
        """Record ``info``, acknowledge the entry and drop the lease, if it is ours."""
        queue = self.queue
        await queue.script(
            _FINISH,
            [queue.lease_key(run_id), queue.runs, queue.stream],
            [self.name, run_id, json.dumps(info, default=repr), GROUP, entry_id],
        )


def _unexpired(leases: dict[str, _Lease], now: float) -> dict[str, _Lease]:
    """The leases of ``leases`` that have not expired at ``now``; cancel the runs of the
    others. Never blocks."""
    live = {}
    for run_id, lease in leases.items():
        if lease.expires > now:
            live[run_id] = lease
        else:
            lease.scope.cancel()
    return live


def _out_of_reach(error: BaseException) -> bool:
    """Whether ``error`` says the run's store could not be reached: a StorageError the
    worker's own calls to the store raised that is not about the data
    (StoreValueError), or a StorageError caused by a failed connection anywhere in the
    chain of causes (a step's store call, wrapped in NodeError)."""
    if isinstance(error, StorageError) and not isinstance(error, StoreValueError):
        return True
    return any(
        isinstance(each, StorageError) and _connection_failed(each.__cause__)
        for each in causes(error)
    )


def _connection_failed(error: BaseException | None) -> bool:
    """Whether ``error`` is redis-py's: the server could not be reached or did not
    answer in time (it was loading its data, restarting or away)."""
    from redis.exceptions import ConnectionError, TimeoutError

    return isinstance(error, ConnectionError | TimeoutError)


def _conflict(error: BaseException) -> bool:
    """Whether ``error`` is, or was caused by, a RunConflictError."""
    return any(isinstance(each, RunConflictError) for each in causes(error))


def _result_info(done: FlowResult) -> dict[str, Any]:
    return {
        "value": done.result,
        "final_action": done.final_action.name,
        "path": list(done.execution_path),
        "duration": done.duration,
    }


def _result_of(run_id: str, info: Mapping[str, Any]) -> QueuedResult:
    saved = info["result"]
    return QueuedResult(
        run_id=run_id,
        flow_name=info["flow"],
        result=saved["value"],
        final_action=saved["final_action"],
        execution_path=tuple(saved["path"]),
        duration=saved["duration"],
        worker=info["owner"],
    )


def _flows_by_name(flows: Mapping[str, Flow] | Iterable[Flow]) -> dict[str, Flow]:
    """``flows`` as a mapping name -> Flow (a list is keyed by each flow's name; two
    flows of one name in it are a ValueError: a run names its flow by name)."""
    named = dict(flows) if isinstance(flows, Mapping) else _keyed_by_name(flows)
    for key, flow in named.items():
        if not isinstance(flow, Flow):
            raise TypeError(f"flow {key!r}: expected a built Flow, got {type(flow).__name__}")
    if not named:
        raise ValueError("a worker needs at least one flow")
    return named


def _keyed_by_name(flows: Iterable[Flow]) -> dict[str, Flow]:
    """``flows`` keyed by name; ValueError when two of them share one."""
    named: dict[str, Flow] = {}
    for flow in flows:
        if not isinstance(flow, Flow):
            raise TypeError(f"expected a built Flow, got {type(flow).__name__}")
        if flow.name in named and named[flow.name] is not flow:
            raise ValueError(f"two flows are named {flow.name!r}: a run names its flow by name")
        named[flow.name] = flow
    return named


def _decoded_info(queue: RunQueue, run_id: str, data: bytes) -> dict[str, Any]:
    """``data``, what ``queue``'s hash holds about ``run_id``, decoded. Raises
    UnreadableEntryError naming the queue and the run when it is not JSON, or not an
    object with a state and a str flow name (as a queue writes it)."""
    try:
        info = json.loads(data)
    except ValueError as exc:
        raise UnreadableEntryError(f"{queue!r}: the entry of run {run_id!r} is not JSON") from exc
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("state"), str)
        or not isinstance(info.get("flow"), str)
    ):
        raise UnreadableEntryError(
            f"{queue!r}: the entry of run {run_id!r} was not written by a queue: {info!r}"
        )
    return info


def _entries(raw: Iterable[Any]) -> list[tuple[str, str]]:
    """(entry id, run id) of stream entries as redis-py returns them (a deleted entry
    comes back without fields and is skipped)."""
    entries = []
    for entry in raw:
        if not entry or not entry[1]:
            continue
        entry_id, fields = entry
        run_id = fields.get(b"run_id") if isinstance(fields, dict) else None
        if run_id is not None:
            entries.append((_text(entry_id), _text(run_id)))
    return entries


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
