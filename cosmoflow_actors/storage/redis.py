"""The Redis backend: one hash per namespace on a redis-server, via redis-py."""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar, final
from urllib.parse import unquote_plus, urlsplit
from weakref import WeakKeyDictionary

import outcome
import trio

from cosmoflow_actors.errors import StorageError, with_article
from cosmoflow_actors.storage.base import (
    RESERVED_PREFIX,
    StagedOp,
    check_steps,
    forgotten_prefixes,
    forgotten_with,
)
from cosmoflow_actors.storage.codec import (
    CodecName,
    check_database_meta,
    check_json_key,
    database_meta,
    utf8_key,
)
from cosmoflow_actors.storage.staged import ClearOp, DatabaseStorage, DeleteOp, Op, SetOp
from cosmoflow_actors.validation import require_seconds

if TYPE_CHECKING:
    import redis
    from redis.client import Pipeline

MAX_UPDATE_ATTEMPTS: Final = 1000
"""``update`` gives up (StorageError) after this many attempts lost to other writers."""

READ_BATCH: Final = 10_000
"""Most fields one ``HMGET`` of ``get_many`` asks for: older servers refuse a command of
more than 1024 * 1024 arguments."""

SCAN_COUNT: Final = 10_000
"""How many fields of the data hash one ``HSCAN`` looks at (the server's work per
round trip), when :meth:`RedisStorage.keys_with_prefix` lists the keys under a prefix
outside :data:`~cosmoflow_actors.storage.base.RESERVED_PREFIX`."""

KEY_PREFIX: Final = "cosmoflow:"
"""What the server's keys of every namespace begin with."""
NAMESPACE_PARTS: Final = ("data", "meta", "index")
"""The server's keys of a namespace (see :func:`namespace_key`): the data hash, the
metadata hash (format, codec, index layout) and the sorted set indexing the engine's
keys."""

SMALLEST_BULK_LIMIT: Final = 1024 * 1024
"""The least ``proto-max-bulk-len`` a server takes: a value that long or longer may be
over the server's limit, which drops the connection (its reply is lost with it)."""


@dataclass(slots=True)
class _Call:
    """A RedisStorage call in flight in this task: when it must end (trio time), which
    every round trip of the call shares (see :meth:`RedisStorage._bounded`), and what
    happened to it so far, which tells a server that stopped answering from a call
    that ran out of time."""

    deadline: float
    answered: int = 0
    """Round trips of the call the server answered."""
    races: int = 0
    """Attempts of the call that found a value it read changed by another writer."""


SILENT_WAIT: Final = 0.5
"""The share of its ``timeout`` a round trip may wait unanswered before the server is
taken as silent, when the call's deadline cuts it after the server answered the call's
earlier round trips. A server that answers takes far less for one round trip, so a round
trip cut after that long shows a server that stopped answering, not a call that ran out
of time over many quick round trips (see :meth:`RedisStorage._in_thread`)."""

_Expected = dict[str, bytes | None]
"""The values an attempt of a commit read, by key (None: missing): its script writes
only if each key still holds its value (see :data:`_WRITE_SCRIPT`)."""

_call: ContextVar[_Call | None] = ContextVar("cosmoflow_redis_call", default=None)
"""The RedisStorage call running in this task, None outside one."""

_clients: OrderedDict[tuple[str, float], redis.Redis] = OrderedDict()
"""The process's clients, by server URL and timeout, each on a pool of connections of
its own, the one used last at the end (see :func:`shared_client`)."""

_clients_lock = threading.Lock()
"""Guards :data:`_clients`: threads that each run trio share it. Held only for a look-up
or an insertion, never while anything connects."""

MAX_CLIENTS: Final = 32
"""The most clients :data:`_clients` keeps: a program that makes a client for each of
many URLs or timeouts (a timeout computed per run) lets go of the one used longest ago,
whose connections close once nothing uses it, instead of keeping a socket per URL until
it exits."""

MAX_CONNECTIONS: Final = 40
"""The most connections a pool of :func:`shared_client` opens, unless its URL says
otherwise (``?max_connections=N``); as many calls run at once on it, each in a thread
of its own. 40 is the size of trio's default thread limiter: redis-server runs one
command at a time, so more calls in flight add threads and file descriptors, not
throughput."""

_slots: trio.lowlevel.RunVar[WeakKeyDictionary[redis.Redis, trio.CapacityLimiter]] = (
    trio.lowlevel.RunVar("cosmoflow_redis_slots")
)
"""The limiter of each shared client's pool in this trio run, one token per connection
(see :func:`connection_slots`); a client evicted from :data:`_clients` and no longer used
leaves it."""

T = TypeVar("T")

_REFUSAL: Final = "COSMOFLOW "
"""How :data:`_WRITE_SCRIPT`'s own errors begin (an error code of Redis's reply)."""

INDEX_LAYOUT: Final = "1"
"""What a namespace's metadata records under ``index``: its reserved keys are indexed in
the sorted set ``cosmoflow:<namespace>:index`` as this version of the backend keeps it
(see :class:`RedisStorage`). A namespace whose metadata records another, or none, is
refused at :meth:`RedisStorage.open`."""

_WRITE_SCRIPT: Final = f"""
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  local stored = redis.call('HGET', KEYS[2], ARGV[i])
  if ARGV[i + 1] == '' then
    if stored then return 0 end
  elseif not stored or redis.sha1hex(stored) ~= ARGV[i + 1] then
    return 0
  end
  i = i + 2
end
local kind = redis.call('TYPE', KEYS[3])['ok']
if kind ~= 'zset' and kind ~= 'none' then
  return redis.error_reply('COSMOFLOW ' .. KEYS[3] .. ' holds a ' .. kind .. ', not the '
    .. 'sorted set of the keys under {RESERVED_PREFIX}')
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    return redis.error_reply('COSMOFLOW ' .. KEYS[2] .. ' holds data without cosmoflow '
      .. 'metadata: ' .. KEYS[1] .. ' is gone')
  end
  redis.call('HSET', KEYS[1], 'format', ARGV[1], 'version', ARGV[2], 'codec', ARGV[3],
    'index', ARGV[4])
  redis.call('DEL', KEYS[3])
else
  local meta = redis.call('HMGET', KEYS[1], 'format', 'version', 'codec', 'index')
  if meta[1] ~= ARGV[1] or meta[2] ~= ARGV[2] or meta[3] ~= ARGV[3] or meta[4] ~= ARGV[4] then
    return redis.error_reply('COSMOFLOW ' .. KEYS[1] .. ' no longer records format '
      .. ARGV[1] .. ' version ' .. ARGV[2] .. ' codec ' .. ARGV[3] .. ' index ' .. ARGV[4]
      .. ': another client claimed the namespace after it was lost')
  end
end
local function reserved(key)
  return string.sub(key, 1, {len(RESERVED_PREFIX.encode())}) == '{RESERVED_PREFIX}'
end
while i <= #ARGV do
  if ARGV[i] == 'S' then
    redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
    if reserved(ARGV[i + 1]) then redis.call('ZADD', KEYS[3], 0, ARGV[i + 1]) end
    i = i + 3
  elseif ARGV[i] == 'D' then
    redis.call('HDEL', KEYS[2], ARGV[i + 1])
    if reserved(ARGV[i + 1]) then redis.call('ZREM', KEYS[3], ARGV[i + 1]) end
    i = i + 2
  else
    redis.call('DEL', KEYS[2], KEYS[3])
    i = i + 1
  end
end
return 1
"""
"""A commit, atomic on the server: KEYS are the meta and data hashes and the index;
ARGV the format, version, codec and index layout this instance writes, the number of
expected values, that many pairs of a field and the SHA-1 (hex) of the value it must
hold (empty: the field must be missing), then the ops (``S`` key value: set, ``D``
key: delete, ``C``: clear). When a field does not hold what is expected (another
writer changed it since it was read) it writes nothing and returns 0; else it returns 1
once written. It checks the metadata first,
claiming the namespace again when both hashes are gone (dropping an index left without
them), and writes nothing when the metadata is not this instance's or the index is no
sorted set (the error begins with :data:`_REFUSAL`). Every write of a field under
:data:`~cosmoflow_actors.storage.base.RESERVED_PREFIX` writes its member of the index
with it, and a clear empties both: the one place the index is kept. Redis runs a script
whole or, when its first write is refused (``maxmemory``), not at all."""

URL_FORMS: Final = (
    "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS], rediss://... (TLS) "
    "or unix://PATH[?OPTIONS]"
)
"""The forms of a Redis URL :func:`require_url` accepts, for its errors."""

_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
"""A URL's scheme, as RFC 3986 has it."""
_GLOB_SPECIAL: Final = re.compile(r"[*?\[\]\\]")
"""The characters a Redis glob pattern (``MATCH``) reads as its own, which a backslash
before each makes stand for themselves."""

_BLIND: Final = frozenset({"set", "delete"})
"""The kinds of a durable step's ops whose writes do not depend on what is stored."""

EVICTS_ANY_KEY: Final = "allkeys-"
"""How the names of the ``maxmemory-policy`` settings begin that let a server evict keys
without a TTL (``allkeys-lru``, ``allkeys-lfu``, ``allkeys-random``): under memory
pressure it drops any key, a namespace's data or index, a queue's runs or stream, in
part or whole, and says nothing (see :func:`require_no_eviction`)."""


def namespace_key(namespace: str, part: str) -> str:
    """The server's key of ``part`` (one of :data:`NAMESPACE_PARTS`) of ``namespace``:
    ``cosmoflow:<namespace>:<part>``; ``namespace`` may be a ``SCAN`` pattern (``*``)."""
    return f"{KEY_PREFIX}{namespace}:{part}"


def namespace_of(key: str, part: str) -> str:
    """The namespace whose ``part`` is the server's key ``key`` (see
    :func:`namespace_key`)."""
    return key.removeprefix(KEY_PREFIX).removesuffix(f":{part}")


@final
class RedisStorage(DatabaseStorage):
    """Storage on a Redis server: the keys of one namespace are the fields of one hash.

    ``url`` is a redis-py URL (``redis://host:port/db``, ``rediss://`` for TLS,
    ``unix://path``), checked now: ValueError naming it and what is wrong otherwise (see
    :func:`require_url`). ``namespace`` keeps flows and tenants apart: the data lives in the
    hash ``cosmoflow:<namespace>:data`` and the format and codec in the hash
    ``cosmoflow:<namespace>:meta``; two namespaces never share a key. A namespace whose
    keys hold something else, or that was written with another codec, is refused at
    :meth:`open`, and so is a server whose ``maxmemory-policy`` may evict them (see
    :func:`require_no_eviction`): the check of the namespace, once per connection,
    reads the policy first.

    The engine's keys (under :data:`~cosmoflow_actors.storage.base.RESERVED_PREFIX`:
    run records and their parts) are indexed in the sorted set
    ``cosmoflow:<namespace>:index``, every member with score 0, written in the same Lua
    script as the data hash (see :data:`_WRITE_SCRIPT`), so that a listing of the keys
    under a prefix of RESERVED_PREFIX (a forget, :meth:`keys_with_prefix`) is one
    ``ZRANGEBYLEX`` costing the keys listed, not the size of the store. The metadata
    records the index's layout (:data:`INDEX_LAYOUT`): a namespace whose metadata
    records none, written before the index was kept, is refused at :meth:`open`.

    Writes are staged in memory, encoded at once (an unencodable value fails :meth:`set`
    and stores nothing), and sent by :meth:`commit` as one ``MULTI``/``EXEC``
    transaction: other clients see all of them or none. A commit is as durable as the
    server's persistence settings make it. Reads ask the server each time, with the
    staged writes laid over the answer. :meth:`update` is atomic across processes: it
    reads the key, calls the function and commits in a script that writes only if the
    key still holds what was read, and starts again when another client changed the key
    in between (so the function may run more than once); the writes staged before it
    are committed with it. A durable step's commit expects its record and the keys it
    updates the same way (see :meth:`commit_step`), so writers of other keys, in any
    process, never make a commit start again.

    ``codec`` is ``"json"`` (the default) or ``"pickle"`` (trusted data only). Keys
    come back from :meth:`keys` in the server's order, not insertion order.

    Instances with the same ``url`` and ``timeout`` share one pool of connections in a
    process, whatever their namespace: a call takes a connection for its round trips
    and gives it back, so many namespaces (a worker's runs each have one) need no more
    connections than calls in flight. A pool opens at most :data:`MAX_CONNECTIONS`
    (or the URL's ``?max_connections=N``) and keeps them open until the process ends;
    a call beyond that waits in trio (cancellably, within its ``timeout``) for one.

    ``timeout`` (seconds, > 0) bounds every call, connecting included: a call that has not finished
    within ``timeout`` seconds, all its round trips and its waits for a connection and
    for an earlier call of the same instance together, raises
    :class:`~cosmoflow_actors.StorageError`. The
    instance then leaves the connection of that call behind and takes another on the
    next call. A write in flight when the time ran out may still be applied, if the
    server reads it later. For ``timeout`` seconds after a call got no answer, the
    instance sends no call: each raises StorageError at once. So the calls queued
    behind one (a store actor serves its runs' calls one at a time) cost a silent
    server one timeout in all, not one each.

    Every call to the server runs in a worker thread (``trio.to_thread``, one at a time
    per instance). Nothing shields the wait for it: cancellation ends it at once, as the
    timeout does, leaving a thread still waiting for the server behind with its
    connection (see :meth:`_in_thread`); a caller that must not be cut shields the call
    and bounds it itself (the store actor does, for commits). A commit is one
    transaction the server applies whole or not at all; one cut may still land.
    Connection failures raise :class:`~cosmoflow_actors.StorageError`. Requires the
    ``redis`` package.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "default",
        codec: CodecName = "json",
        timeout: float = 10.0,
    ) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty str, not {namespace!r}")
        require_url(url, "RedisStorage url")
        require_seconds("timeout", timeout)
        super().__init__(codec)
        self._url = url
        self._namespace = namespace
        self._data, self._meta, self._index = (
            namespace_key(namespace, part) for part in NAMESPACE_PARTS
        )
        self._timeout = timeout
        self._client: redis.Redis | None = None
        self._abandoned: list[tuple[Pipeline, trio.CapacityLimiter]] = []
        """Pipelines of calls that timed out, each with the limiter its abandoned thread
        holds until it ends: :meth:`aclose` resets them, giving their connections back
        to the pool."""
        self._silent_at: float | None = None
        """When a call last got no answer within ``timeout`` (trio time), if one did:
        the calls of the next ``timeout`` seconds are not sent (see :meth:`_in_thread`)."""

    def __repr__(self) -> str:
        return f"RedisStorage({redacted(self._url)!r}, namespace={self._namespace!r})"

    @property
    def url(self) -> str:
        """The URL of the server (as given, password included)."""
        return self._url

    @property
    def timeout(self) -> float:
        """Seconds a call waits for the server (connecting included)."""
        return self._timeout

    @property
    def namespace(self) -> str:
        """The namespace: the data is in the hash ``cosmoflow:<namespace>:data``."""
        return self._namespace

    async def open(self) -> None:
        """Connect and check the namespace, claiming it if it is empty; once only.

        Blocks in a worker thread. Raises :class:`~cosmoflow_actors.StorageError` when the
        server cannot be reached, may evict the namespace's keys (an ``allkeys-*``
        ``maxmemory-policy``, see :func:`require_no_eviction`) or the namespace holds
        data this backend did not write (a key of another type, data without metadata,
        another codec); nothing is changed then.
        """
        await self._connected()

    async def get(self, key: str) -> Any:
        """Return a fresh decoded copy of the value; raise ``KeyError`` when it is missing.

        Blocks in a worker thread unless the key has a staged write.
        """
        data = await self._lookup(key)
        if data is None:
            raise KeyError(key)
        return self._codec.read(repr(self), key, data)

    async def contains(self, key: str) -> bool:
        """Return whether ``key`` is stored (blocks in a worker thread, as :meth:`get`)."""
        return await self._lookup(key) is not None

    async def keys(self) -> list[str]:
        """Return every key (blocks in a worker thread)."""
        fields: list[bytes] = await self._command("HKEYS", self._data)
        return self._staged.merge_keys(self._field_key(field) for field in fields)

    async def keys_with_prefix(self, prefix: str) -> list[str]:
        """Return every key that starts with ``prefix``, each once, with the staged writes
        laid over, in no set order (blocks in a worker thread).

        Under :data:`~cosmoflow_actors.storage.base.RESERVED_PREFIX` the keys are read
        from the namespace's index, at the cost of the keys listed (one round trip,
        whatever the store holds besides); any other prefix costs a scan of the whole
        hash (``HSCAN ... MATCH``, one round trip per :data:`SCAN_COUNT` fields).
        """
        async with self._bounded():
            client = await self._connected()
            keys = await self._keys_from(client, prefix)
        return [key for key in keys if key.startswith(prefix)]

    def _field_key(self, field: bytes) -> str:
        """The key a field of the data hash holds; StorageError naming it (its raw
        bytes) when it is not UTF-8, which only another client writes. Does not block."""
        try:
            return field.decode()
        except UnicodeDecodeError as exc:
            raise StorageError(
                f"{self!r}: {self._data} holds the field {field!r}, which is not valid UTF-8 "
                "and so no key of this store (another client wrote it)"
            ) from exc

    async def _read_many(self, keys: list[str]) -> dict[str, bytes]:
        """One ``HMGET`` per :data:`READ_BATCH` keys, in one round trip (blocks in a
        worker thread, once)."""
        async with self._bounded():
            client = await self._connected()
            values = await self._in_thread(self._fetch_fields, client, keys)
        return {key: value for key, value in zip(keys, values, strict=True) if value is not None}

    def _fetch_fields(self, client: redis.Redis, keys: list[str]) -> list[bytes | None]:
        """The values of the fields ``keys`` (None for a missing one), in their order:
        one ``HMGET`` per :data:`READ_BATCH` keys, sent together; several go in one
        ``MULTI``/``EXEC``, so they read the hash as one ``HMGET`` would, at one moment.
        Blocks: for a worker thread."""
        with client.pipeline(transaction=len(keys) > READ_BATCH) as pipe:
            for start in range(0, len(keys), READ_BATCH):
                fields = (key.encode() for key in keys[start : start + READ_BATCH])
                send_command(pipe, "HMGET", self._data, *fields)
            replies: list[list[bytes | None]] = pipe.execute()
        return [value for reply in replies for value in reply]

    async def _stored_count(self) -> int:
        count: int = await self._command("HLEN", self._data)
        return count

    async def update(self, key: str, function: Callable[[Any], Any], default: Any) -> Any:
        """Store ``function(value)`` under ``key`` atomically across processes; return it.

        ``value`` is the stored value, or ``default`` when ``key`` is missing. Reads the
        key, calls ``function`` and sends the writes staged before and the new value in
        one script that writes them only if the key still holds what was read; when
        another client changed the key in between, it reads and calls ``function``
        again (at most :data:`MAX_UPDATE_ATTEMPTS` times, then StorageError). Writes to
        other keys never make it start again. An error ``function`` raises, or a result
        that cannot be encoded, stores nothing. Blocks in a worker thread for each
        round trip (two an attempt); ``function`` runs in the calling task.
        """
        check_json_key(key)
        async with self._bounded() as call:
            client = await self._connected()
            for _ in range(MAX_UPDATE_ATTEMPTS):
                expected: _Expected = {}
                current = await self._current(client, expected, key)
                new = function(self._decoded_or(key, current, default))
                ops = [*self._staged.ops, SetOp(key, self._codec.encode(key, new))]
                if await self._in_thread(self._send, client, expected, ops):
                    self._staged.reset()
                    return new
                call.races += 1
        raise self._lost_races(f"update of {key!r}")

    async def commit_step(
        self, ops: list[StagedOp], record_key: str, record: Any, steps_before: int
    ) -> bool:
        """Commit a durable step atomically across processes; always returns True.

        Reads the run's record and checks that it still counts ``steps_before`` steps
        (else RunConflictError, nothing stored), applies the step's updates to the
        values stored now, and sends the writes staged before, the step's writes and its
        run record in one script that writes them only if the record and every value
        read still hold what was read; when another client changed one in between, it
        starts over (at most :data:`MAX_UPDATE_ATTEMPTS` times, then StorageError). A
        step that clears the store watches the whole hash instead (``WATCH``, then
        ``MULTI``/``EXEC``), since a key another client adds meanwhile is one it
        never read. An error of an update function stores nothing. Blocks in a worker
        thread per round trip; a step of sets and deletes only (no update to
        re-apply) takes one trip to its thread per attempt, read, check and script
        together.
        """
        async with self._bounded() as call:
            client = await self._connected()
            step = (ops, record_key, record, steps_before)
            if all(kind in _BLIND for kind, _, _ in ops):
                return await self._commit_blind_step(client, call, *step)
            return await self._commit_read_step(client, call, *step)

    async def _commit_read_step(
        self,
        client: redis.Redis,
        call: _Call,
        ops: list[StagedOp],
        record_key: str,
        record: Any,
        steps_before: int,
    ) -> bool:
        """:meth:`commit_step` of a step that reads what is stored (an update or a
        clear); blocks in a worker thread per round trip."""
        watched = any(kind == "clear" for kind, _, _ in ops)
        for _ in range(MAX_UPDATE_ATTEMPTS):
            async with self._pipeline(client) as pipe:
                reader = await self._watching(pipe) if watched else client
                expected: _Expected = {}
                stored = await self._current(reader, expected, record_key)
                check_steps(record_key, self._decoded_or(record_key, stored, None), steps_before)
                writes = await self._step_writes(reader, expected, ops)
                writes.append(SetOp(record_key, self._codec.encode(record_key, record)))
                staged_and_step = [*self._staged.ops, *writes]
                if await self._in_thread(self._exec, pipe, expected, staged_and_step):
                    self._staged.reset()
                    return True
            call.races += 1
        raise self._lost_races("a step's commit")

    async def forget_record(self, record_key: str, check: Callable[[Any], None]) -> bool:
        """Delete the run record under ``record_key`` and its BatchFlow children's, and
        the parts (path chunks, places) of them all, once ``check(record)`` has
        passed, atomically across processes; return whether there was a record.

        Watches the hash, reads the record, checks it, reads the keys that may be its
        children's records and the parts of them all (one ``ZRANGEBYLEX`` of the
        namespace's index per prefix: their cost is the keys listed, not the store's
        size), and sends the writes staged before and the deletes in one
        ``MULTI``/``EXEC``; when another client changed the hash in between, it starts
        over (at most :data:`MAX_UPDATE_ATTEMPTS` times, then StorageError): the record
        deleted is the one checked. A check that raises deletes nothing. Blocks in a worker thread
        for each round trip; ``check`` runs in the calling task.
        """
        async with self._bounded() as call:
            client = await self._connected()
            for _ in range(MAX_UPDATE_ATTEMPTS):
                async with self._pipeline(client) as pipe:
                    watching = await self._watching(pipe)
                    stored = await self._current(watching, {}, record_key)
                    if stored is None:
                        return False
                    check(self._codec.read(repr(self), record_key, stored))
                    listed = [
                        key
                        for prefix in forgotten_prefixes(record_key)
                        for key in await self._keys_from(watching, prefix)
                    ]
                    deletes = [DeleteOp(key) for key in forgotten_with(record_key, listed)]
                    if await self._in_thread(self._exec, pipe, {}, [*self._staged.ops, *deletes]):
                        self._staged.reset()
                        return True
                call.races += 1
        raise self._lost_races(f"forget of {record_key!r}")

    async def _commit_blind_step(
        self,
        client: redis.Redis,
        call: _Call,
        ops: list[StagedOp],
        record_key: str,
        record: Any,
        steps_before: int,
    ) -> bool:
        """:meth:`commit_step` of a step whose ops are sets and deletes only (blocks in
        a worker thread, one trip per attempt).

        Invariant: such a step's writes do not depend on what is stored (no update to
        apply, no keys to clear), so they are encoded before the record is read, and
        one function in the thread does what the round trips of the general commit do:
        read the record, check its steps, send the script expecting the record read.
        The outcome is the general commit's (a step refused both for a value its codec
        cannot encode and for a record that counts other steps is refused for the
        value).
        """
        seen: dict[str, bytes | None] = {}
        written = (self._blind_write(seen, kind, key, value) for kind, key, value in ops)
        writes = [write for write in written if write is not None]
        writes.append(SetOp(record_key, self._codec.encode(record_key, record)))
        staged_record = self._staged.lookup(record_key)
        for _ in range(MAX_UPDATE_ATTEMPTS):
            committed = await self._in_thread(
                self._checked_commit,
                client,
                record_key,
                staged_record,
                steps_before,
                [*self._staged.ops, *writes],
            )
            if committed:
                self._staged.reset()
                return True
            call.races += 1
        raise self._lost_races("a step's commit")

    def _checked_commit(
        self,
        client: redis.Redis,
        record_key: str,
        staged_record: object,
        steps_before: int,
        writes: list[Op[bytes]],
    ) -> bool:
        """Check that the run's record counts ``steps_before`` steps and send
        ``writes`` in one script expecting the record read; False if another client
        changed it meanwhile. ``staged_record`` is the record as staged (bytes, or None
        for a staged delete), else it is read. Blocks: for a worker thread."""
        expected: _Expected = {}
        stored = staged_record
        if not isinstance(stored, bytes) and stored is not None:
            stored = self._read_expected(client, expected, record_key)
        check_steps(record_key, self._decoded_or(record_key, stored, None), steps_before)
        return self._send(client, expected, writes)

    async def _step_writes(
        self, reader: redis.Redis | Pipeline, expected: _Expected, ops: list[StagedOp]
    ) -> list[Op[bytes]]:
        """The writes of a durable step's ``ops``, its updates applied to what is stored
        now, read through ``reader`` (the client, or the watching pipe of a step that
        clears) and noted in ``expected``."""
        seen: dict[str, bytes | None] = {}
        writes: list[Op[bytes]] = []
        for kind, key, argument in ops:
            if kind == "clear":
                for name in await self._user_keys(reader, seen):
                    seen[name] = None
                    writes.append(DeleteOp(name))
                continue
            value = argument
            if kind == "update":
                check_json_key(key)
                kind, value = "set", await self._updated(reader, expected, seen, key, argument)
            write = self._blind_write(seen, kind, key, value)
            if write is not None:
                writes.append(write)
        return writes

    def _blind_write(
        self, seen: dict[str, bytes | None], kind: str, key: str, value: Any
    ) -> Op[bytes] | None:
        """The write of a step's "set" or "delete" of ``key`` (None for the delete of a
        key that is not valid Unicode: it is never stored), noted in ``seen``."""
        if kind == "delete":
            seen[key] = None
            return DeleteOp(key) if utf8_key(key) is not None else None
        check_json_key(key)
        data = self._codec.encode(key, value)
        seen[key] = data
        return SetOp(key, data)

    def _decoded_or(self, key: str, data: bytes | None, missing: Any) -> Any:
        """The value ``data`` read under ``key`` holds, or ``missing`` when there was none."""
        return missing if data is None else self._codec.read(repr(self), key, data)

    def _lost_races(self, what: str) -> StorageError:
        """The error of ``what`` (an update, a step's commit) when other writers changed
        the hash between its read and its write every time it tried."""
        return StorageError(f"{self!r}: {what} lost to other writers {MAX_UPDATE_ATTEMPTS} times")

    async def _updated(
        self,
        reader: redis.Redis | Pipeline,
        expected: _Expected,
        seen: dict[str, bytes | None],
        key: str,
        update: Any,
    ) -> Any:
        """``function(value or default)``, the value as the step has left it so far
        (read through ``reader`` and noted in ``expected`` when the step has not
        written it)."""
        function, default = update
        current = seen[key] if key in seen else await self._current(reader, expected, key)
        return function(self._decoded_or(key, current, default))

    async def _user_keys(
        self, reader: redis.Redis | Pipeline, seen: dict[str, bytes | None]
    ) -> list[str]:
        """Every key a ``clear`` removes: stored or set by the step, outside the engine's."""
        fields = await self._in_thread(send_command, reader, "HKEYS", self._data)
        stored = self._staged.merge_keys(self._field_key(field) for field in fields)
        names = dict.fromkeys([*stored, *(k for k, v in seen.items() if v is not None)])
        return [name for name in names if not name.startswith(RESERVED_PREFIX)]

    async def _keys_from(self, connection: redis.Redis | Pipeline, prefix: str) -> list[str]:
        """The keys starting with ``prefix``, read through ``connection`` (a watching
        pipe, for a forget), with the staged writes laid over (and any key a staged
        write sets): from the index (``ZRANGEBYLEX``) when ``prefix`` is under
        :data:`~cosmoflow_actors.storage.base.RESERVED_PREFIX`, else by ``HSCAN`` with
        ``MATCH``; none stored for a prefix that is not valid Unicode, which no stored
        key starts with. Blocks in a worker thread."""
        start = utf8_key(prefix)
        fields: list[bytes] = []
        if start is not None and prefix.startswith(RESERVED_PREFIX):
            fields = await self._in_thread(self._indexed_from, connection, start)
        elif start is not None:
            pattern = _GLOB_SPECIAL.sub(r"\\\g<0>", prefix) + "*"
            fields = await self._in_thread(_fields_matching, connection, self._data, pattern)
        return self._staged.merge_keys(self._field_key(field) for field in fields)

    def _indexed_from(self, connection: redis.Redis | Pipeline, start: bytes) -> list[bytes]:
        """The members of the index that start with ``start`` (a key prefix in UTF-8),
        in one ``ZRANGEBYLEX`` from ``start`` up to (not including) ``start`` with its
        last byte one greater (UTF-8 has no byte 0xFF), so that every member between
        the two starts with ``start``. Blocks: for a worker thread."""
        end = start[:-1] + bytes([start[-1] + 1])
        members: list[bytes] = send_command(
            connection, "ZRANGEBYLEX", self._index, b"[" + start, b"(" + end
        )
        return members

    async def commit(self) -> None:
        """Send the staged writes as one ``MULTI``/``EXEC`` transaction; all or nothing.

        Blocks in a worker thread. On failure the staged writes are dropped and
        :class:`~cosmoflow_actors.StorageError` has the redis-py error as ``__cause__``.
        """
        if not self._staged:
            return
        ops = self._staged.ops
        self._staged.reset()
        async with self._bounded():
            await self._in_thread(self._send, await self._connected(), {}, ops)

    async def aclose(self) -> None:
        """Drop staged writes and let go of the server: its connections stay in the
        process's pool for other instances. The next call checks the namespace again.

        Blocks only when calls timed out: until the threads they left behind have ended,
        at most ``timeout`` seconds (shielded), to give their connections back to the
        pool; one whose thread is still stuck then keeps its connection out of it.
        """
        self._staged.reset()
        self._client = None
        abandoned, self._abandoned = self._abandoned, []
        with trio.move_on_after(self._timeout, shield=True):
            for pipe, limiter in abandoned:
                await _reset_after(pipe, limiter)
        await trio.lowlevel.checkpoint()

    async def _connected(self) -> redis.Redis:
        """Return the client, checking the namespace the first time (which connects,
        unless the pool holds a connection to the server already)."""
        if self._client is None:
            client = shared_client(self._url, self._timeout, "RedisStorage")
            await self._in_thread(self._claim, client)
            self._client = client
        return self._client

    async def _command(self, *args: Any) -> Any:
        """Send one command and return the reply, connecting first if need be (blocks
        in a worker thread, within one timeout)."""
        async with self._bounded():
            return await self._in_thread(send_command, await self._connected(), *args)

    async def _lookup(self, key: str) -> bytes | None:
        """Return the encoded value of ``key`` (staged or on the server), None if missing."""
        staged = self._staged.lookup(key)
        if isinstance(staged, bytes) or staged is None:
            return staged
        field = utf8_key(key)
        if field is None:
            return None
        value: bytes | None = await self._command("HGET", self._data, field)
        return value

    async def _watching(self, pipe: Pipeline) -> Pipeline:
        """``pipe``, once it watches the hash: its reads are sent at once, and its
        ``MULTI``/``EXEC`` fails when another client changed the hash meanwhile."""
        await self._in_thread(send_command, pipe, "WATCH", self._data)
        return pipe

    async def _current(
        self, reader: redis.Redis | Pipeline, expected: _Expected, key: str
    ) -> bytes | None:
        """The encoded value of ``key``: staged, else read through ``reader`` and noted
        in ``expected`` (the commit writes only if the key still holds it)."""
        staged = self._staged.lookup(key)
        if isinstance(staged, bytes) or staged is None:
            return staged
        return await self._in_thread(self._read_expected, reader, expected, key)

    def _read_expected(
        self, reader: redis.Redis | Pipeline, expected: _Expected, key: str
    ) -> bytes | None:
        """The encoded value of ``key`` on the server, read through ``reader`` and noted
        in ``expected``. Blocks: for a worker thread."""
        value: bytes | None = send_command(reader, "HGET", self._data, key.encode())
        expected[key] = value
        return value

    def _send(self, client: redis.Redis, expected: _Expected, ops: list[Op[bytes]]) -> bool:
        """:meth:`_exec` on a pipeline of its own, reset at the end (blocks)."""
        with client.pipeline(transaction=True) as pipe:
            return self._exec(pipe, expected, ops)

    def _exec(self, pipe: Pipeline, expected: _Expected, ops: list[Op[bytes]]) -> bool:
        """Send ``ops`` as one :data:`_WRITE_SCRIPT` after MULTI and EXEC it; False,
        with nothing written, if a key of ``expected`` no longer holds the value read
        or a watched key changed (blocks). The script keeps the index in step with the
        data hash.

        The script writes nothing unless the namespace's metadata is this instance's,
        and claims the namespace again when the server lost both hashes (a restart
        without persistence, a ``FLUSHDB``): data is never written without its
        metadata. A namespace another client claimed meanwhile, or whose data lost its
        metadata, raises StorageError. A connection that fails meanwhile (redis-py then
        raises WatchError too, when the pipeline watches) raises StorageError naming
        the keys written."""
        from redis.exceptions import ConnectionError, ResponseError, TimeoutError, WatchError

        pipe.multi()
        keys = (self._meta, self._data, self._index)
        arguments = self._script_arguments(expected, ops)
        send_command(pipe, "EVAL", _WRITE_SCRIPT, len(keys), *keys, *arguments)
        try:
            replies: list[int] = pipe.execute()
        except ResponseError as exc:
            problem = str(exc).partition("caused error: ")[2] or str(exc)
            refused = problem.removeprefix(_REFUSAL)
            if refused != problem:
                raise StorageError(f"{self!r}: {refused}; nothing was written") from exc
            raise StorageError(f"{self!r}: the server refused the commit: {problem}") from exc
        except WatchError as exc:
            lost = _connection_failure(exc)
            if lost is None:
                return False  # another client changed the hash: a lost race
            raise self._cut_off(ops, lost) from lost
        except (ConnectionError, TimeoutError) as exc:
            raise self._cut_off(ops, exc) from exc
        return replies == [1]

    def _script_arguments(self, expected: _Expected, ops: list[Op[bytes]]) -> list[str | bytes]:
        """The ARGV of :data:`_WRITE_SCRIPT` writing ``ops`` if the keys of ``expected``
        hold their values (each as the SHA-1 of its value, so that a large value is
        not sent back). Does not block."""
        meta = self._written_meta()
        arguments: list[str | bytes] = [meta["format"], meta["version"], meta["codec"]]
        arguments += (meta["index"], str(len(expected)))
        for key, value in expected.items():
            arguments += (key.encode(), "" if value is None else hashlib.sha1(value).hexdigest())
        for op in ops:
            if isinstance(op, SetOp):
                arguments += (b"S", op.key.encode(), op.value)
            elif isinstance(op, DeleteOp):
                arguments += (b"D", op.key.encode())
            else:
                arguments.append(b"C")
        return arguments

    def _cut_off(self, ops: list[Op[bytes]], error: BaseException) -> StorageError:
        """A new StorageError for a commit of ``ops`` whose connection failed with
        ``error``: it names the keys written and the largest value. Does not block."""
        keys = [op.key for op in ops if not isinstance(op, ClearOp)]
        sizes = [len(op.value) for op in ops if isinstance(op, SetOp)]
        written = f"key {keys[0]!r}" if len(keys) == 1 else f"{len(keys)} keys"
        if len(keys) > 1:
            written += f" ({', '.join(map(repr, keys[:3]))}{', ...' if len(keys) > 3 else ''})"
        if sizes:
            written += f", the largest value {max(sizes):,} bytes"
        hint = ""
        if sizes and max(sizes) >= SMALLEST_BULK_LIMIT:
            hint = (
                "; a server drops the connection of a command holding a value over its "
                "proto-max-bulk-len (512 MB by default)"
            )
        return StorageError(
            f"{self!r}: the connection failed while committing {written}: {error}{hint}"
        )

    def _claim(self, client: redis.Redis) -> None:
        """Check the server's eviction policy (see :func:`require_no_eviction`) and the
        namespace; write its metadata if it is empty (blocks)."""
        from redis.exceptions import WatchError

        require_no_eviction(client, repr(self), "its namespace's data, metadata and index")
        for _ in range(MAX_UPDATE_ATTEMPTS):
            with client.pipeline(transaction=True) as pipe:
                try:
                    self._claim_once(pipe)
                except WatchError as exc:
                    if _connection_failure(exc) is not None:
                        raise  # no race: the connection failed (see _in_thread)
                    continue  # another client claimed it meanwhile: check what it wrote
                return
        raise StorageError(f"{self!r}: cannot claim the namespace: it keeps changing")

    def _claim_once(self, pipe: Pipeline) -> None:
        send_command(pipe, "WATCH", self._meta, self._data, self._index)
        meta = self._read_meta(pipe)
        kind = send_command(pipe, "TYPE", self._data).decode()
        index_kind = send_command(pipe, "TYPE", self._index).decode()
        if index_kind not in ("zset", "none"):
            raise StorageError(
                f"{self!r}: {self._index} holds {with_article(index_kind)}, not the sorted "
                f"set of the keys under {RESERVED_PREFIX!r}"
            )
        if meta:
            self._check_meta(meta, kind)
            return
        if kind != "none":
            raise StorageError(
                f"{self!r}: {self._data} holds {with_article(kind)} without cosmoflow metadata"
            )
        pipe.multi()
        fields = self._written_meta()
        send_command(pipe, "HSET", self._meta, *(item for pair in fields.items() for item in pair))
        send_command(pipe, "DEL", self._index)  # an index left without its data
        pipe.execute()

    def _read_meta(self, pipe: Pipeline) -> dict[str, str]:
        """The namespace's metadata hash, decoded; empty when there is none (blocks).

        StorageError naming the key when it holds another type than a hash.
        """
        meta_kind = send_command(pipe, "TYPE", self._meta).decode()
        if meta_kind not in ("hash", "none"):
            raise StorageError(
                f"{self!r}: {self._meta} holds {with_article(meta_kind)}, not a hash"
            )
        return _decoded(send_command(pipe, "HGETALL", self._meta))

    def _check_meta(self, meta: dict[str, str], kind: str) -> None:
        check_database_meta(f"{self!r}: {self._meta}", meta, self._codec)
        if kind not in ("hash", "none"):
            raise StorageError(f"{self!r}: {self._data} holds {with_article(kind)}, not a hash")
        layout = meta.get("index")
        if layout != INDEX_LAYOUT:
            recorded = "no index" if layout is None else f"index layout {layout!r}"
            raise StorageError(
                f"{self!r}: {self._meta} records {recorded}, not {INDEX_LAYOUT!r}: the "
                f"namespace was written by another version of cosmoflow_actors, which kept no "
                f"index of its keys under {RESERVED_PREFIX!r} in {self._index}; open it with "
                "that version, or delete its keys (cosmoflow:<namespace>:meta, :data and "
                ":index) to start it afresh"
            )

    def _written_meta(self) -> dict[str, str]:
        """What this instance records in the metadata hash: the database metadata of its
        codec and its :data:`INDEX_LAYOUT`. Does not block."""
        return {**database_meta(self._codec), "index": INDEX_LAYOUT}

    @asynccontextmanager
    async def _pipeline(self, client: redis.Redis) -> AsyncIterator[Pipeline]:
        """A transactional pipeline, reset at exit in the worker thread so that its
        connection goes back to the pool unwatched. A pipeline that holds no connection
        (it never watched, or its ``EXEC`` reset it) has nothing to give back and is
        left as it is. When the call was cut (its deadline, or the caller's cancellation)
        while a thread used the pipeline, that abandoned thread may still use the
        connection: the pipeline is kept for :meth:`aclose` to reset once that thread has
        ended. A reset that cannot be sent (the caller was cancelled first, or the
        server is taken as silent) drops the connection instead (see :func:`_dropped`)."""
        pipe = client.pipeline(transaction=True)
        limiter = self._limiter
        try:
            yield pipe
        finally:
            if self._limiter is not limiter:
                self._abandoned.append((pipe, limiter))
            elif pipe.connection is not None:
                try:
                    await self._in_thread(pipe.reset)
                except BaseException:
                    if self._limiter is not limiter:  # its thread was abandoned mid-reset
                        self._abandoned.append((pipe, limiter))
                    else:  # no thread uses it: the reset never began, or it ended
                        _dropped(pipe)
                    raise

    @asynccontextmanager
    async def _bounded(self) -> AsyncIterator[_Call]:
        """Make the round trips inside one call (yielded), which share one deadline,
        ``timeout`` from now, and one connection of the pool, unless a call around them
        did so already.

        Blocks (cancellably) until the pool has a connection free (see
        :func:`connection_slots`); StorageError when none is free by the deadline.
        """
        outer = _call.get()
        if outer is not None:
            yield outer
            return
        deadline = trio.current_time() + self._timeout
        client = self._client or shared_client(self._url, self._timeout, "RedisStorage")
        slots = connection_slots(client)
        borrower = object()
        with trio.move_on_at(deadline) as waiting:
            await slots.acquire_on_behalf_of(borrower)
        if waiting.cancelled_caught:
            raise self._timed_out(
                f"none of the {slots.total_tokens:g} connections of the process's pool for "
                f"the server was free within timeout={self._timeout:g} s; this call was not sent"
            )
        call = _Call(deadline)
        token = _call.set(call)
        try:
            yield call
        finally:
            _call.reset(token)
            slots.release_on_behalf_of(borrower)

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` in this instance's worker thread, on a connection of
        the pool (see :meth:`_bounded`), waiting for it until the call's deadline; redis-py
        errors become StorageError.

        Nothing shields the wait: the call's deadline cuts it, and so does the caller's
        cancellation (its own scope or an outer deadline), at once. A thread cut before
        it began ``function`` never begins it. One cut while ``function`` runs (stuck on
        a server that does not answer, or just not done yet) is abandoned with its
        client (see :meth:`_abandon`); cut by the deadline, the call raises
        StorageError, and so does a thread whose socket timed out; cut by the caller,
        the Cancelled (or whatever the caller was cut with) goes on up. A thread that
        answered before the cut needs no abandoning: the deadline returns its answer
        (the trio thread, blocked by someone else's code, may wake after the deadline),
        the caller's cancellation drops it.

        When a cut left the server silent, for ``timeout`` seconds after that a call is
        not sent: it raises StorageError at once (so a silent server costs the calls
        queued behind one a single timeout, not one each). The server is taken as
        silent when the thread's socket timed out, when the round trip cut went
        unanswered for :data:`SILENT_WAIT` of the timeout or more, or when the server
        answered none of the call's round trips by its deadline. A call the deadline
        cut in a quick round trip after the server answered others (its attempts lost
        to other writers, say) ran out of time: the next calls are sent. A caller's
        cancellation is no sign of a silent server: it counts only by those same
        rules, so a call cancelled early in its round trip leaves the next calls sent.
        """
        self._refuse_while_silent()
        answers: list[outcome.Outcome[T]] = []
        gate = threading.Lock()
        began = cut = False

        def answer() -> None:
            nonlocal began
            with gate:
                if cut:
                    return  # the call was cut before its thread began
                began = True
            answers.append(outcome.capture(function, *args))

        async with self._bounded() as call:
            sent = trio.current_time()
            try:
                with trio.CancelScope(deadline=call.deadline):
                    await trio.to_thread.run_sync(
                        answer, limiter=self._limiter, abandon_on_cancel=True
                    )
            except BaseException:  # the caller's cancellation, or an outer deadline
                with gate:
                    cut, ran = True, began
                if ran and not self._answered(answers):
                    self._left_unanswered(call, sent, answers)
                raise
            with gate:
                cut = True
        if self._answered(answers):
            call.answered += 1
            return self._unwrapped(answers[0])
        dropped = "the connection is dropped (if the call carried a write, it may still be applied)"
        if self._left_unanswered(call, sent, answers):
            raise self._no_answer("", dropped)
        raise self._timed_out(f"{self._out_of_time(call)}; {dropped}")

    @staticmethod
    def _answered(answers: list[outcome.Outcome[T]]) -> bool:
        """Whether a thread's ``answers`` hold the server's answer (a value or its error),
        not a socket that timed out. Does not block."""
        return bool(answers) and not _socket_timed_out(answers[0])

    def _left_unanswered(
        self, call: _Call, sent: float, answers: list[outcome.Outcome[Any]]
    ) -> bool:
        """Abandon the thread of ``call``'s round trip sent at ``sent`` (trio time), cut
        before the server answered it, and return whether that leaves the server
        silent (see :meth:`_in_thread`), noting when if so. Does not block."""
        self._abandon()
        now = trio.current_time()
        silent = (
            bool(answers)  # its socket timed out
            or now - sent >= self._timeout * SILENT_WAIT
            or (call.answered == 0 and now >= call.deadline)
        )
        if silent:
            self._silent_at = now
        return silent

    def _out_of_time(self, call: _Call) -> str:
        """What ended ``call``, which its deadline cut after the server had answered
        some of its round trips. Does not block."""
        problem = (
            f"the call ran out of its timeout={self._timeout:g} s: the server answered "
            f"{call.answered} of its round trips, not the last one in the time left"
        )
        if call.races:
            problem += (
                f" ({call.races} of its attempts found a value they read changed by another "
                "writer and started again)"
            )
        return problem

    def _unwrapped(self, answer: outcome.Outcome[T]) -> T:
        """The value of a thread's ``answer``; its redis-py error as StorageError. Does
        not block."""
        from redis.exceptions import RedisError

        try:
            return answer.unwrap()
        except RedisError as exc:
            lost = _connection_failure(exc)
            if lost is not None:
                raise StorageError(f"{self!r}: the connection failed: {lost}") from lost
            raise StorageError(f"{self!r}: {exc}") from exc

    def _refuse_while_silent(self) -> None:
        """Raise StorageError (see :meth:`_no_answer`) when a call got no answer less
        than ``timeout`` seconds ago. Does not block."""
        if self._silent_at is None:
            return
        ago = trio.current_time() - self._silent_at
        if ago >= self._timeout:
            self._silent_at = None
            return
        raise self._no_answer(
            f" to a call {ago:.1f} s ago",
            f"this call was not sent (one is sent again {self._timeout:g} s after that call)",
        )

    def _no_answer(self, which: str, outcome: str) -> StorageError:
        """A new StorageError: the server gave no answer within ``timeout`` (to the
        call ``which`` names, if another), then ``outcome``. Caused by redis-py's
        TimeoutError, as a call cut by the timeout is: what tells a run queue that the
        store is out of reach, not at fault. Never blocks."""
        problem = f"no answer from the server within timeout={self._timeout:g} s{which}"
        return self._timed_out(f"{problem}; {outcome}")

    def _timed_out(self, problem: str) -> StorageError:
        """A new StorageError naming this instance and ``problem``, caused by redis-py's
        TimeoutError (see :meth:`_no_answer`). Never blocks."""
        from redis.exceptions import TimeoutError

        error = StorageError(f"{self!r}: {problem}")
        error.__cause__ = TimeoutError(problem)
        return error

    def _abandon(self) -> None:
        """Leave the abandoned worker thread its limiter and start a new one, so the
        next call need not wait for that thread; the next call takes another connection
        from the pool and checks the namespace again. Does not block.

        Nothing interrupts the thread: it goes on with its round trips, each a blocking
        socket operation that redis-py bounds by the socket's timeout, which is
        ``timeout`` (waiting for a pool connection and connecting too). On a server
        that does not answer at all, the operation under way when the call was cut
        (begun at most ``timeout`` before the cut) raises redis-py's TimeoutError at
        most ``timeout`` seconds after it began; redis-py then closes that connection
        and the error ends the thread. So the thread, its socket and its file
        descriptor linger at most ``timeout`` seconds after the cut, after the engine
        or the trio run has ended too (trio's worker threads do not hold the process
        open). A server that still answers, slowly, keeps the thread as long as its
        remaining round trips take (each at most ``timeout``); a URL that asks redis-py
        to retry (``retry_on_timeout``) adds its retries.

        The socket is not shut down to end the thread sooner: the connection a client
        call uses is taken from the pool and given back inside redis-py, out of reach,
        and a pipeline's is reachable but its socket only through redis-py's private
        attributes, or ``Connection.disconnect()``, which is not safe against the thread
        reading from it; and the thread gives the connection back to the shared pool
        itself, so a shutdown from the trio thread could hit the connection after
        another call took it.
        """
        self._client = None
        self._limiter = trio.CapacityLimiter(1)


async def _reset_after(pipe: Pipeline, limiter: trio.CapacityLimiter) -> None:
    """Reset ``pipe`` once the abandoned thread using it has ended (that thread holds
    ``limiter`` until then), so that its connection goes back to the pool unwatched.
    Blocks in a worker thread; an error (the server is still away) drops the
    connection instead."""
    with contextlib.suppress(Exception):  # a clean-up: the call it follows has failed
        await trio.to_thread.run_sync(pipe.reset, limiter=limiter, abandon_on_cancel=True)


def _dropped(pipe: Pipeline) -> None:
    """Give ``pipe``'s connection back to the pool closed, which ends its ``WATCH``: for a
    pipeline no thread uses, when its reset (an ``UNWATCH`` round trip) cannot be sent.
    Never blocks: closing a socket sends nothing, and the next user of the connection
    connects again."""
    connection = pipe.connection
    if connection is None:
        return
    connection.disconnect()  # type: ignore[no-untyped-call]
    pipe.watching = False  # so that reset sends no UNWATCH (which would connect again)
    pipe.reset()


def _socket_timed_out(answer: outcome.Outcome[Any]) -> bool:
    """Whether a thread's ``answer`` is the socket timeout of a server that did not
    answer: redis-py's TimeoutError, also behind a WatchError or a commit's
    StorageError. The socket's timeout is the call's, so it may end the thread just
    before the call's deadline ends the wait. Does not block."""
    from redis.exceptions import TimeoutError

    if not isinstance(answer, outcome.Error):
        return False
    error = answer.error
    if isinstance(error, StorageError) and error.__cause__ is not None:
        error = error.__cause__
    return isinstance(_connection_failure(error) or error, TimeoutError)


def _connection_failure(error: BaseException) -> BaseException | None:
    """The ConnectionError or TimeoutError behind ``error``, a WatchError redis-py
    raises when the connection of a watching pipeline fails (its ``__context__``); None
    for a WatchError of a watched key that changed, or any other error."""
    from redis.exceptions import ConnectionError, TimeoutError, WatchError

    lost = error.__context__
    if isinstance(error, WatchError) and isinstance(lost, ConnectionError | TimeoutError):
        return lost
    return None


def _fields_matching(connection: redis.Redis | Pipeline, name: str, pattern: str) -> list[bytes]:
    """The fields of the hash ``name`` that match the glob ``pattern``, each once
    (``HSCAN``; blocks for each round trip, :data:`SCAN_COUNT` fields scanned a trip)."""
    fields: dict[bytes, None] = {}
    cursor = 0
    while True:
        cursor, found = send_command(
            connection, "HSCAN", name, cursor, "MATCH", pattern, "COUNT", SCAN_COUNT
        )
        fields.update(dict.fromkeys(found))
        if int(cursor) == 0:
            return list(fields)


def require_no_eviction(client: redis.Redis, user: str, kept: str) -> None:
    """Raise StorageError naming ``user``, the server's ``maxmemory-policy`` and what to
    do when that policy may evict keys without a TTL (see :data:`EVICTS_ANY_KEY`): the
    server would drop ``kept`` (what the user keeps in keys without a TTL, in words)
    when it reaches its ``maxmemory``, silently. The policy is read from ``INFO
    memory``, which needs no CONFIG rights (managed servers often disable CONFIG). A
    server whose INFO does not say (an old one, INFO renamed, disabled or not permitted
    to the user) is accepted. Blocks: for a worker thread."""
    from redis.exceptions import ResponseError

    try:
        info = send_command(client, "INFO", "memory")
    except ResponseError:
        return  # INFO unknown or not permitted: the server does not say
    policy = info.get("maxmemory_policy") if isinstance(info, dict) else None
    if isinstance(policy, str) and policy.startswith(EVICTS_ANY_KEY):
        raise StorageError(
            f"{user}: the server's maxmemory-policy is {policy}, which lets it evict any key "
            f"once it reaches its maxmemory, {kept} included, and say nothing; set "
            "maxmemory-policy noeviction on the server (writes over the limit are then "
            "refused, and reported), or a volatile-* policy (which evicts only keys with a "
            "TTL); nothing was written"
        )


def send_command(connection: redis.Redis | Pipeline, *args: Any) -> Any:
    """Send one command, or queue it in a pipeline after MULTI (blocks)."""
    return connection.execute_command(*args)  # type: ignore[no-untyped-call]


def shared_client(url: str, timeout: float, user: str) -> redis.Redis:
    """The process's one client for ``url`` and ``timeout`` (the socket timeout,
    connecting included), on its pool of connections: the users of one server share
    them (a redis-py client is safe to share between threads), the trio runs of several
    threads too. Connects on first use; does not block.

    The pool opens at most :data:`MAX_CONNECTIONS` connections, or the URL's
    ``max_connections``, and keeps them open until the process ends, or until
    :data:`MAX_CLIENTS` other clients were used since this one was (it is then let go,
    its connections closed once nothing uses it, and the next call for its key makes a
    new one).
    Callers take a
    token of :func:`connection_slots` for each call, so that calls wait for a
    connection in trio; a thread that still finds none (one is held by a thread a
    call abandoned) waits for one in the pool, at most ``timeout`` seconds.

    Raises StorageError naming ``user`` when the redis package is missing, and one
    naming the URL (its password masked as ``***``) when it is not a Redis URL.
    """
    try:
        import redis
    except ImportError as exc:
        raise StorageError(
            f"{user} needs the redis package: pip install 'cosmoflow-actors[redis]'"
        ) from exc
    key = (url, timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is not None:
            _clients.move_to_end(key)
            return client
    try:
        pool = redis.BlockingConnectionPool.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout,
        )
    except ValueError as exc:
        raise StorageError(f"not a Redis URL: {redacted(url)!r} ({exc})") from exc
    with _clients_lock:
        # Threads that each run trio (``flow.run_sync`` in request threads) may make a
        # client for the same key at once: all of them use the one stored first, and
        # the others' pools, which connect only on first use, are dropped unused.
        client = _clients.setdefault(key, redis.Redis(connection_pool=pool))
        # The client used longest ago is let go: a store still using it goes on with
        # it, and its connections close once nothing uses it (the collector frees it).
        while len(_clients) > MAX_CLIENTS:
            _clients.popitem(last=False)
    return client


def require_url(url: object, what: str, forms: str = URL_FORMS) -> None:
    """Raise TypeError unless ``url`` is a str, and ValueError naming ``what``, the URL
    (its password masked as ``***``), what is wrong and ``forms`` unless it is a Redis
    URL of :data:`URL_FORMS`: one whose database is not a number, or whose port is not
    one, would otherwise connect to database 0, or fail only when first used. The query's
    options are read as redis-py reads them when the redis package is installed (when it
    is not, connecting says so). Does not block."""
    if not isinstance(url, str):
        raise TypeError(f"{what} must be a str, not {type(url).__name__}")
    try:
        problem = _url_problem(url)
    except ValueError as exc:  # names the option; its cause is redis-py's error
        raise ValueError(f"{what} {redacted(url)!r}: {exc}; expected {forms}") from exc.__cause__
    if problem is not None:
        raise ValueError(f"{what} {redacted(url)!r}: {problem}; expected {forms}")


def _url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a Redis URL, None when nothing is; ValueError
    naming the option, chained from redis-py's error, when redis-py cannot read an
    option of the query. Does not block."""
    scheme, _, rest = url.partition(":")
    if scheme.lower() not in ("redis", "rediss", "unix") or not rest.startswith("//"):
        return "not a redis://, rediss:// or unix:// URL"
    if "#" in url:
        return "a '#', which no Redis URL has (write one in a password as %23)"
    try:
        parts = urlsplit(url)
        port = None if parts.scheme == "unix" else parts.port
    except ValueError:  # not chained: urllib's error shows the port, maybe part of a password
        return "the host or port cannot be read (a port is a number up to 65535)"
    if parts.scheme == "unix" and not parts.path:
        return "no socket path"
    if port is None and parts.netloc.endswith(":"):
        return "a ':' without a port"
    if parts.scheme != "unix" and not re.fullmatch(r"/?|/[0-9]+", parts.path):
        return "the path is not a database number"
    if parts.query:
        _read_options(url)
    return None


def _read_options(url: str) -> None:
    """Read ``url``'s query options as redis-py does: ValueError naming the option whose
    value it cannot convert, chained from redis-py's. Nothing without the redis
    package. Does not block."""
    try:
        from redis.connection import parse_url
    except ImportError:
        return
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ValueError(f"an option redis-py cannot read: {str(exc).rstrip('.')}") from exc


def connection_slots(client: redis.Redis) -> trio.CapacityLimiter:
    """The limiter of ``client``'s pool in this trio run: one token per connection the
    pool may open. A call holds one while it uses a connection, so that calls beyond
    the pool's size wait (cancellably) in trio rather than fail. Does not block."""
    try:
        slots = _slots.get()
    except LookupError:
        slots = WeakKeyDictionary()
        _slots.set(slots)
    limiter = slots.get(client)
    if limiter is None:
        limiter = trio.CapacityLimiter(client.connection_pool.max_connections)
        slots[client] = limiter
    return limiter


def redacted(url: str) -> str:
    """``url`` with every password replaced by ``***``, for messages and actor names.

    redis-py takes a password from the userinfo (``redis://user:secret@host``) and from
    any query parameter, whose name it passes on as a connection option
    (``?password=secret``, ``?ssl_password=secret``): the value of every parameter
    whose name holds "password" is replaced, whatever its case. The userinfo is taken
    to be all between the scheme and the last ``@``, so that a password with an ``@``,
    ``/``, ``?`` or ``#`` not percent-encoded (which a URL parser reads as the end of
    the userinfo or of the host), or a URL mistyped, shows no part of it. Does not
    block.
    """
    head, at, tail = url.rpartition("@")
    if at:
        head = _redacted_userinfo(head)
    base, question, rest = tail.partition("?")
    if question:
        query, hash_mark, fragment = rest.partition("#")
        query = "&".join(_redacted_parameter(part) for part in query.split("&"))
        tail = f"{base}?{query}{hash_mark}{fragment}"
    return f"{head}{at}{tail}"


def _redacted_userinfo(head: str) -> str:
    """``head``, a URL up to the ``@`` that ends its userinfo, with the userinfo as
    ``user:***`` (``user`` when it holds no password), or ``***`` when its user name
    holds a character a URL's user name cannot (it is then not a user name, and may be
    part of a password). When ``head`` has no valid scheme, or no ``/`` after it, it is
    no URL's head, and all of it but the scheme is ``***``. Does not block."""
    scheme, colon, rest = head.partition(":")
    if not colon or not _SCHEME.fullmatch(scheme):
        return "***"
    start = len(rest) - len(rest.lstrip("/"))
    if not start:
        return f"{scheme}:***"
    user, has_password, _ = rest[start:].partition(":")
    if any(mark in user for mark in "/?#"):
        return f"{scheme}:{rest[:start]}***"
    return f"{scheme}:{rest[:start]}{user}{':***' if has_password else ''}"


def _redacted_parameter(parameter: str) -> str:
    """One ``name=value`` of a URL's query, its value ``***`` if ``name`` says password."""
    name, equals, _ = parameter.partition("=")
    if equals and "password" in unquote_plus(name).lower():
        return f"{name}=***"
    return parameter


def _decoded(mapping: dict[bytes, bytes]) -> dict[str, str]:
    """Decode a hash's fields and values, replacing what is not UTF-8."""
    return {
        key.decode(errors="replace"): value.decode(errors="replace")
        for key, value in mapping.items()
    }
