"""The producer side of the run queue: :class:`RunQueue` (the queue's keys on its
server, and the calls to it), :func:`submit`, :func:`requeue` and :func:`result`."""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import trio

from cosmoflow_actors.errors import CosmoFlowError, StorageError
from cosmoflow_actors.runtime.queue.entries import MAX_DEPTH, decoded_info, deeper_than
from cosmoflow_actors.runtime.queue.scripts import REQUEUE, SUBMIT
from cosmoflow_actors.storage.redis import (
    connection_slots,
    redacted,
    require_no_eviction,
    require_url,
    send_command,
    shared_client,
)
from cosmoflow_actors.validation import (
    checked_params,
    require_run_id,
    require_seconds,
    utf8_problem,
)

if TYPE_CHECKING:
    import redis

DEFAULT_LEASE: Final = 10.0
"""Seconds a worker's lease on a run lasts unless renewed (renewed every third of it)."""
MAX_LEASE: Final = 7 * 24 * 3600.0
"""The longest lease a queue takes, in seconds (a week): a dead worker's runs wait a
lease to be taken over, and a call waits up to three leases for the server's answer."""
DEFAULT_FLOW_WAIT: Final = 60.0
"""Seconds a run whose flow the workers that saw it lack waits for one that has it."""
QUEUE_URL: Final = "redis://HOST[:PORT][/DB]/NAME"
"""The form of a queue's URL (see :meth:`RunQueue.from_url`)."""
NAME_SAFE: Final = "!$&'()*+,;=:@"
"""The characters of a queue's name that its address leaves as they are, besides
letters, digits and ``_.-~``: those a URL's path holds as they are (RFC 3986)."""
RESULT_POLL_INTERVAL: Final = 0.05
"""Seconds :func:`result` waits between two reads of a run's state."""
GROUP: Final = "workers"
"""The stream's consumer group: every worker of every queue reads through it."""
FINISHED: Final = ("succeeded", "failed")
"""The states of a run whose outcome is recorded."""
THREADS: Final = 40
"""The most worker threads one :class:`RunQueue`'s calls to the server take at once.
They come from a limiter of the queue's own, not trio's default one, which thread
executor steps hold: a worker whose steps hold every thread still renews its leases."""


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
    :meth:`from_url` of ``redis://HOST:PORT[/DB]/NAME``. ``url`` is checked as
    ``RedisStorage``'s is (ValueError naming it and what is wrong). ``name`` is a
    non-empty str without '/' that UTF-8 encodes (ValueError otherwise); the queue's
    :attr:`address` percent-encodes what a URL's path cannot hold as it is.

    ``lease`` is how long (seconds) a worker's claim on a run lasts without renewal:
    the time after which a dead worker's runs go to others, above 0 and at most
    :data:`MAX_LEASE` (a week; ValueError naming it otherwise). ``flow_wait`` is how long
    (seconds) a run whose flow the workers that saw it lack (or have in a version that
    does not fit its record) waits for a worker that has it, before one of them fails
    it (0: the first one does). Every call to the
    server runs in a worker thread (at most :data:`THREADS` at once, apart from the
    threads of trio's default limiter), on a connection of the process's pool for the
    server, and is not retried: a server that refuses the connection or closes it
    raises StorageError at once. A call waits for a server that does not answer at
    most ``max(10, 3 * lease)`` seconds (the connections' socket timeout, connecting
    included), then raises StorageError. The first call of a queue (and the first
    after :meth:`aclose`) raises StorageError, nothing written, when the server's
    ``maxmemory-policy`` may evict its keys (``allkeys-*``, see
    ``storage.redis.require_no_eviction``): its runs, stream and consumer group have no
    TTL. Requires the ``redis`` package.
    """

    def __init__(
        self,
        url: str,
        name: str,
        *,
        lease: float = DEFAULT_LEASE,
        flow_wait: float = DEFAULT_FLOW_WAIT,
    ) -> None:
        require_name(name)
        require_url(url, "RunQueue url")
        require_seconds("lease", lease)
        if lease > MAX_LEASE:
            raise ValueError(
                f"lease must be a finite number of seconds up to {MAX_LEASE:g} (a week), "
                f"got {lease!r}: a dead worker's runs would wait that long to be taken over"
            )
        require_seconds("flow_wait", flow_wait, zero=True)
        self.url = url
        self.name = name
        self.lease = lease
        self.flow_wait = flow_wait
        self.lease_ms = max(1, round(lease * 1000))
        """The lease in milliseconds, as the server takes it."""
        self.third_of_lease = lease / 3
        """Seconds between two renewals of a worker's leases, and between two attempts
        of a worker to reach its queue while it is out of reach."""
        self.stream = f"cosmoflow:queue:{name}:stream"
        self.runs = f"cosmoflow:queue:{name}:runs"
        self.passed = f"cosmoflow:queue:{name}:passed"
        self._client: redis.Redis | None = None
        self._limiter = trio.CapacityLimiter(THREADS)
        self._policy_checked = False
        """Whether the server's eviction policy was checked (see :meth:`_in_thread`)."""

    @classmethod
    def from_url(
        cls, text: str, *, lease: float = DEFAULT_LEASE, flow_wait: float = DEFAULT_FLOW_WAIT
    ) -> RunQueue:
        """The queue ``redis://HOST:PORT[/DB]/NAME`` names: NAME is the last path part,
        percent-decoded (``jobs%231`` names the queue ``jobs#1``, as :attr:`address`
        writes it). ValueError naming ``text`` (its password masked as ``***``) and what
        is wrong with it."""
        shown = f"queue {redacted(text)!r}"
        url, quoted = _split_queue_url(text, shown)
        try:
            name = unquoted_name(quoted)
        except ValueError as exc:
            raise ValueError(f"{shown}: {exc}; expected {QUEUE_URL}") from exc
        return cls(url, name, lease=lease, flow_wait=flow_wait)

    def __repr__(self) -> str:
        return f"RunQueue({redacted(self.url)!r}, {self.name!r})"

    @property
    def address(self) -> str:
        """The queue's URL, ``redis://HOST[:PORT][/DB]/NAME[?QUERY]``, with its password
        masked as ``***``, not removed: ``redis://:***@host:6379/2/q``, and
        ``redis://host/2/q?password=***&ssl=1`` for the server ``redis://host/2?...``.
        NAME is percent-encoded but for letters, digits and ``_.-~!$&'()*+,;=:@``
        (``jobs#1``: ``jobs%231``), so that :meth:`from_url` reads the name back."""
        server, question, query = redacted(self.url).partition("?")
        return f"{server}/{quote(self.name, safe=NAME_SAFE)}{question}{query}"

    def lease_key(self, run_id: str) -> str:
        """The key of ``run_id``'s lease (its value names the worker holding it)."""
        return f"cosmoflow:queue:{self.name}:lease:{run_id}"

    def flow_key(self, flow_name: str) -> str:
        """The key that says, while it exists, that a live worker serves ``flow_name``
        (its value names one; see ``claims.Claimer.advertise``)."""
        return f"cosmoflow:queue:{self.name}:flow:{flow_name}"

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply (blocks in a worker thread; a
        cancelled caller abandons the thread, which ends with the command)."""
        client = self._connected()
        return await self._in_thread(send_command, client, *args)

    async def script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run the Lua ``source`` atomically on the server; return its reply."""
        return await self.call("EVAL", source, len(keys), *keys, *args)

    async def scripts(self, source: str, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run the Lua ``source`` once for each ``(keys, args)`` of ``calls``, each run
        atomically, and return their replies in order. They go to the server together,
        in one round trip (a pipeline, not a transaction: other clients' commands may
        run between two of them); blocks in a worker thread until every reply is in."""
        replies: list[Any] = await self._in_thread(_pipelined, self._connected(), source, calls)
        return replies

    async def info(self, run_id: str) -> dict[str, Any] | None:
        """What the queue's hash holds about ``run_id`` (None if it was not submitted)."""
        data = await self.call("HGET", self.runs, run_id)
        return None if data is None else decoded_info(self, run_id, data)

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if they do not exist yet. Blocks on
        the server; raises StorageError naming the redis extra when the redis package is
        missing."""
        try:
            await self.call("XGROUP", "CREATE", self.stream, GROUP, "0", "MKSTREAM")
        except StorageError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            # The server answered, so the redis package is there to import.
            from redis.exceptions import ResponseError

            if not isinstance(exc.__cause__, ResponseError):
                raise

    async def aclose(self) -> None:
        """Let go of the server: its connections stay in the process's pool (see
        ``RedisStorage``); the next call checks the server's eviction policy again.
        Does not block."""
        self._client = None
        self._policy_checked = False
        await trio.lowlevel.checkpoint()

    def _connected(self) -> redis.Redis:
        """The client, on connections whose socket waits are longer than a worker's
        longest blocking read."""
        if self._client is None:
            timeout = max(10.0, 3 * self.lease)
            self._client = shared_client(self.url, timeout, "RunQueue")
        return self._client

    async def _in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in a worker thread, on a connection of the pool; redis-py
        errors become StorageError. The first call checks the server's eviction policy
        before it (one more round trip): StorageError, ``function`` not called, when
        the server may evict the queue's keys (see ``require_no_eviction``)."""
        from redis.exceptions import RedisError

        client = self._connected()
        kept = "its runs, stream and consumer group"
        try:
            async with connection_slots(client):
                if not self._policy_checked:
                    await self._thread(require_no_eviction, client, repr(self), kept)
                    self._policy_checked = True
                return await self._thread(function, *args)
        except RedisError as exc:
            raise StorageError(f"{self!r}: {exc}") from exc

    async def _thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in a worker thread of the queue's limiter; a cancelled
        caller abandons the thread, which ends with the call."""
        return await trio.to_thread.run_sync(
            function, *args, limiter=self._limiter, abandon_on_cancel=True
        )


def require_name(name: object) -> None:
    """Raise ValueError unless ``name`` is a non-empty str without '/' that UTF-8 can
    encode (the queue's keys hold it). Any other character goes: the queue's address
    percent-encodes it (see :attr:`RunQueue.address`)."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"a queue name must be a non-empty str without '/', not {name!r}")
    problem = utf8_problem(name)
    if problem is not None:
        raise ValueError(f"queue name {name!r} {problem}")


def _split_queue_url(text: str, shown: str) -> tuple[str, str]:
    """The server's URL and the NAME (percent-encoded, as written) of the queue URL
    ``text``; ValueError starting with ``shown`` and saying what is wrong with it."""
    if "#" in text:
        raise ValueError(
            f"{shown}: a '#', which no queue URL has (write one in NAME or a password as "
            f"%23); expected {QUEUE_URL}"
        )
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"{shown}: expected {QUEUE_URL}") from exc
    head, _, name = parts.path.rpartition("/")
    if parts.scheme not in ("redis", "rediss") or not parts.netloc or not name:
        raise ValueError(f"{shown}: expected {QUEUE_URL}")
    if not re.fullmatch(r"(/[0-9]+)?", head):
        raise ValueError(
            f"{shown}: the path before NAME is not a database number; expected {QUEUE_URL}"
        )
    url = urlunsplit(parts._replace(path=head))
    require_url(url, f"{shown}: the server's URL", QUEUE_URL)
    return url, name


def unquoted_name(quoted: str) -> str:
    """The queue name ``quoted``, the last part of the path of a queue's URL,
    percent-decoded (see :attr:`RunQueue.address`). ValueError saying why when its
    escapes do not decode as UTF-8, or it decodes to no queue name (see
    :func:`require_name`)."""
    try:
        name = unquote(quoted, errors="strict")
    except UnicodeDecodeError as exc:
        raise ValueError(f"NAME {quoted!r} is not percent-encoded UTF-8") from exc
    require_name(name)
    return name


def _pipelined(
    client: redis.Redis, source: str, calls: Sequence[tuple[list[str], list[Any]]]
) -> list[Any]:
    """The replies of ``source`` run for each ``(keys, args)`` of ``calls``, sent in one
    pipeline (blocks until they are in; raises the first error a call got)."""
    pipeline = client.pipeline(transaction=False)
    for keys, args in calls:
        send_command(pipeline, "EVAL", source, len(keys), *keys, *args)
    replies: list[Any] = pipeline.execute()
    return replies


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
    another flow or other params, which would be lost. ``params`` must be a mapping
    with str keys (TypeError otherwise, as for :meth:`Engine.start_run`) whose values
    are JSON that comes back equal (ValueError naming the param otherwise: no tuple, no
    dict with a key that is not a str).
    Blocks until the server has it; raises StorageError when it cannot be reached.
    """
    queue = as_queue(queue)
    if not isinstance(flow_name, str) or not flow_name:
        raise ValueError(f"flow_name must be a non-empty str, not {flow_name!r}")
    if run_id is not None:
        require_run_id(run_id)
    checked = checked_params(params)
    for key, value in checked.items():
        _check_param(run_id, key, value)
    run_id = secrets.token_hex(8) if run_id is None else run_id
    info = {"flow": flow_name, "params": checked, "state": "pending"}
    encoded = json.dumps(info, allow_nan=False)
    await queue.ensure_group()
    if not await queue.script(SUBMIT, [queue.runs, queue.stream], [run_id, encoded]):
        await _check_resubmitted(queue, run_id, flow_name, checked)
    return run_id


def _check_param(run_id: str | None, key: str, value: Any) -> None:
    """Raise ValueError naming ``key`` (and ``run_id``, if the caller gave one) unless
    it and ``value`` go through JSON, as UTF-8, unchanged (a tuple would come back a
    list, a dict's int keys str; a lone surrogate cannot be encoded), ``value`` nesting
    lists and objects at most :data:`entries.MAX_DEPTH` deep, as a worker reads them."""
    param = f"param {key!r}" if run_id is None else f"param {key!r} of run {run_id!r}"
    too_deep = (
        f"{param} nests lists and objects more than {MAX_DEPTH} deep, past what a worker reads"
    )
    try:
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False)
        key.encode()
        encoded.encode()
        decoded = json.loads(encoded)
    except RecursionError as exc:  # nested far deeper than MAX_DEPTH
        raise ValueError(too_deep) from exc
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"{param} is not JSON: {exc}") from exc
    if deeper_than(MAX_DEPTH, decoded, encoded):
        raise ValueError(too_deep)
    if decoded != value:
        raise ValueError(
            f"{param} would reach the worker changed by JSON, as {encoded}: give lists "
            "for tuples and str keys"
        )


async def _check_resubmitted(
    queue: RunQueue, run_id: str, flow_name: str, params: dict[str, Any]
) -> None:
    """Raise ValueError unless the run ``run_id`` that ``queue`` has already was submitted
    with ``flow_name`` and ``params`` (blocks while it reads the queue); CosmoFlowError
    if the queue no longer has it (something else deleted it). The params are compared
    as JSON, as the queue holds them: ``1``, ``1.0`` and ``true`` differ, the order of
    an object's keys does not."""
    first = await queue.info(run_id)
    if first is None:
        raise CosmoFlowError(f"run {run_id!r} left {queue!r} while it was submitted")
    if first["flow"] != flow_name or _as_json(first["params"]) != _as_json(params):
        raise ValueError(
            f"run {run_id!r} is on {queue!r} already, as flow {first['flow']!r} with params "
            f"{json.dumps(first['params'])} ({first['state']}); nothing is submitted: "
            "give the new run another run id"
        )


def _as_json(params: Mapping[str, Any]) -> str:
    """``params`` as JSON text, an object's keys sorted: two params of one text reach a
    worker equal, where Python's ``==`` holds ``1``, ``1.0`` and ``True`` equal."""
    return json.dumps(params, sort_keys=True)


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
        info = decoded_info(queue, run_id, data)
        if info["state"] != "failed":
            raise ValueError(
                f"run {run_id!r} is {info['state']} on {queue!r}: only a failed run is requeued"
            )
        pending = {key: value for key, value in info.items() if key != "error"}
        pending["state"] = "pending"
        keys = [queue.runs, queue.stream, queue.passed]
        if await queue.script(REQUEUE, keys, [run_id, data, json.dumps(pending)]):
            return


async def result(
    queue: RunQueue | str, run_id: str, *, poll: float = RESULT_POLL_INTERVAL
) -> QueuedResult:
    """Wait for the submitted run ``run_id`` to end; return its outcome.

    Reads the run's state every ``poll`` seconds (default
    :data:`RESULT_POLL_INTERVAL`) until a worker recorded it; blocks until then (put a
    ``trio.fail_after`` around it to bound the wait). Raises CosmoFlowError when the
    run failed (naming the worker and the error) or the queue does not know the run,
    ValueError when ``run_id`` is not a non-empty str or ``poll`` not a finite number of
    seconds above 0 (before reading anything).
    """
    queue = as_queue(queue)
    require_run_id(run_id)
    require_seconds("poll", poll)
    if math.isinf(poll):
        raise ValueError("poll must be a finite number of seconds: the run would be read once")
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


def as_str(value: bytes | str) -> str:
    """``value``, part of a reply of the server, as a str (decoded when bytes)."""
    return value.decode() if isinstance(value, bytes) else value
