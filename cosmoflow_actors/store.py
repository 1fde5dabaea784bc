"""SharedStore: the handle nodes use to reach a run's storage.

Every method sends one message to the store actor that owns the backend and waits for
its answer, so every call is a checkpoint and may block while the actor's mailbox is
full (backpressure) or while it commits. (``get`` and ``set``, the hottest, are plain
methods that send the message and return the awaitable to wait on; ``await`` them as
the others.)
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, TypeVar, final, overload

import msgspec
import trio

from cosmoflow_actors.errors import StorageError, StoreKeyError, StoreTypeError
from cosmoflow_actors.runtime.messages import Reply, StoreOp, StoreRequest
from cosmoflow_actors.storage.base import StagedOp, Storage
from cosmoflow_actors.storage.codec import check_key

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final[Any] = _Missing()
"""Marks an absent default."""


@final
class SharedStore:
    """A run's view of its storage; all access goes through the store actor.

    Values are returned as the backend holds them: the same objects for memory storage,
    fresh decoded copies for persistent storage.
    """

    __slots__ = ("_mailbox", "_step", "_storage", "name")

    def __init__(
        self,
        mailbox: trio.MemorySendChannel[StoreRequest] | None,
        storage: Storage | None,
        name: str,
    ) -> None:
        self._mailbox = mailbox
        self._storage = storage
        self._step: _StepWrites | None = None
        self.name = name

    def begin_step(self) -> None:
        """Stage writes from now on (a durable run's step): they are seen by this
        handle's reads and reach the store only with :meth:`commit_step`."""
        self._step = _StepWrites()

    def end_step(self) -> list[StagedOp]:
        """Stop staging; return the staged operations, in order."""
        step, self._step = self._step, None
        return [] if step is None else step.ops

    async def commit_step(
        self, ops: list[StagedOp], record_key: str, record: Any, steps_before: int
    ) -> None:
        """Apply ``ops`` and store ``record`` in one commit, all or nothing, if the stored
        record still counts ``steps_before`` steps; else raise RunConflictError."""
        await self._request(StoreOp.COMMIT_STEP, record_key, (ops, record, steps_before))

    async def put_record(self, record_key: str, record: Any) -> None:
        """Store a run record (outside any step's staging)."""
        await self._request(StoreOp.SET, record_key, record)

    async def records(self) -> list[Any]:
        """Every run record in the store."""
        found: list[Any] = await self._request(StoreOp.RECORDS)
        return found

    def detached(self) -> SharedStore:
        """A handle that refuses every call (for exec in a thread or a process)."""
        return SharedStore(None, None, self.name)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (for a worker process) it becomes a detached handle."""
        return (SharedStore, (None, None, self.name))

    def _request(self, op: StoreOp, key: str = "", argument: Any = None) -> Awaitable[Any]:
        """Send one request to the store actor now; return what to await for its answer.

        Not a coroutine: while the mailbox has room, the caller awaits trio's own parking
        directly (fewer objects per store call, which matters at 100,000 runs).
        """
        check_key(key)
        if self._mailbox is None or self._storage is None:
            raise StorageError(f"{self.name} is not reachable here: use the store in prep and post")
        reply: Reply[Any] = Reply()
        request = StoreRequest(op, self._storage, key, argument, reply)
        try:
            self._mailbox.send_nowait(request)
        except trio.WouldBlock:
            return self._send_then_wait(request)
        except trio.ClosedResourceError as exc:
            raise self._closed() from exc
        return reply.wait()

    async def _send_then_wait(self, request: StoreRequest) -> Any:
        """Wait for room in the full mailbox, send, then wait for the answer."""
        assert self._mailbox is not None
        try:
            await self._mailbox.send(request)
        except trio.ClosedResourceError as exc:
            raise self._closed() from exc
        return await request.reply.wait()

    def _closed(self) -> StorageError:
        return StorageError(f"{self.name} is closed: its store actor has stopped")

    @overload
    def get(self, key: str, default: Any = ..., *, type: None = None) -> Awaitable[Any]: ...

    @overload
    def get(self, key: str, default: Any = ..., *, type: builtins.type[T]) -> Awaitable[T]: ...

    def get(self, key: str, default: Any = MISSING, *, type: Any = None) -> Awaitable[Any]:
        """Await it for the value of ``key``, or ``default`` when it is missing.

        Raises StoreKeyError when it is missing and there is no default. With ``type=T``
        the value is returned as a ``T`` (a dataclass is rebuilt from its JSON form) or
        StoreTypeError is raised.
        """
        if self._step is None and type is None:
            return self._request(StoreOp.GET, key, default)
        return self._get(key, default, type)

    async def _get(self, key: str, default: Any, type: Any) -> Any:
        """``get`` through a durable step's writes, or with a ``type``."""
        staged = _UNKNOWN if self._step is None else self._step.lookup(key)
        if staged is _UNKNOWN:
            value = await self._request(StoreOp.GET, key, default)
        elif staged is _ABSENT:
            if default is MISSING:
                raise StoreKeyError(key)
            value = default
        else:
            value = staged
        if type is None or (value is default and default is not MISSING):
            return value
        return as_type(key, value, type)

    def set(self, key: str, value: Any) -> Awaitable[None]:
        """Await it to store ``value`` under ``key``; it returns once the write is
        committed (in a durable run's step: once it is staged, to be committed with the
        step)."""
        if self._step is not None:
            check_key(key)
            self._step.stage(("set", key, value), key, value)
            return _staged()
        return self._request(StoreOp.SET, key, value)

    async def update(self, key: str, function: Callable[[Any], Any], default: Any = MISSING) -> Any:
        """Atomically replace the value of ``key`` with ``function(value)``; return it.

        ``function`` is a plain (sync) function, run inside the store actor: no other
        access to this store happens in between. A missing key uses ``default``, or
        raises StoreKeyError when there is none. An error ``function`` raises is raised
        here and nothing is stored. In a durable run's step the update is staged: the
        value returned is ``function`` of what the step sees, and at the step's commit
        ``function`` is applied again, in the store actor, to the value stored then, so
        concurrent updates are never lost (``function`` must be pure).
        """
        if self._step is None:
            return await self._request(StoreOp.UPDATE, key, (function, default))
        new = function(await self.get(key, default))
        self._step.stage(("update", key, (function, default)), key, new)
        return new

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""
        if self._step is not None:
            existed = await self.contains(key)
            self._step.stage(("delete", key, None), key, _ABSENT)
            return existed
        result: bool = await self._request(StoreOp.DELETE, key)
        return result

    async def contains(self, key: str) -> bool:
        """Return whether ``key`` is stored."""
        staged = _UNKNOWN if self._step is None else self._step.lookup(key)
        if staged is not _UNKNOWN:
            return staged is not _ABSENT
        result: bool = await self._request(StoreOp.CONTAINS, key)
        return result

    async def keys(self) -> list[str]:
        """Return every key."""
        step = self._step
        if step is None:
            result: list[str] = await self._request(StoreOp.KEYS)
            return result
        stored: list[str] = [] if step.cleared else await self._request(StoreOp.KEYS)
        return step.keys(stored)

    async def size(self) -> int:
        """Return the number of keys."""
        if self._step is not None:
            return len(await self.keys())
        result: int = await self._request(StoreOp.SIZE)
        return result

    async def clear(self) -> None:
        """Remove every key."""
        if self._step is not None:
            self._step.clear()
            return
        await self._request(StoreOp.CLEAR)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return ``{key: value}`` for those of ``keys`` that are stored (one message)."""
        wanted = list(keys)
        for key in wanted:
            check_key(key)
        step = self._step
        if step is None:
            result: dict[str, Any] = await self._request(StoreOp.GET_MANY, argument=wanted)
            return result
        unknown = [key for key in wanted if step.lookup(key) is _UNKNOWN]
        stored = await self._request(StoreOp.GET_MANY, argument=unknown) if unknown else {}
        return step.pick(wanted, stored)

    async def set_many(self, mapping: Mapping[str, Any]) -> None:
        """Store every item in one message, all or nothing."""
        for key in mapping:
            check_key(key)
        if self._step is not None:
            for key, value in mapping.items():
                self._step.stage(("set", key, value), key, value)
            return
        await self._request(StoreOp.SET_MANY, argument=dict(mapping))

    def __repr__(self) -> str:
        return f"<SharedStore {self.name}>"


async def _staged() -> None:
    """What a staged ``set`` returns to await: nothing to wait for."""


_ABSENT: Final[Any] = object()
_UNKNOWN: Final[Any] = object()


class _StepWrites:
    """The writes of one durable step: its view (key → value or absent) and its ops."""

    __slots__ = ("cleared", "ops", "values")

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.ops: list[StagedOp] = []
        self.cleared = False

    def lookup(self, key: str) -> Any:
        """The staged value, _ABSENT if the step removed it, else _UNKNOWN."""
        if key in self.values:
            return self.values[key]
        return _ABSENT if self.cleared else _UNKNOWN

    def stage(self, op: StagedOp, key: str, value: Any) -> None:
        self.ops.append(op)
        self.values[key] = value

    def clear(self) -> None:
        self.ops.append(("clear", "", None))
        self.values.clear()
        self.cleared = True

    def keys(self, stored: list[str]) -> list[str]:
        """The keys the step sees, given the keys in the store."""
        seen = [key for key in stored if self.values.get(key) is not _ABSENT]
        known = set(stored)
        added = [k for k, v in self.values.items() if v is not _ABSENT and k not in known]
        return seen + added

    def pick(self, wanted: list[str], stored: dict[str, Any]) -> dict[str, Any]:
        """``get_many``'s answer: staged values first, then what the store had."""
        found: dict[str, Any] = {}
        for key in wanted:
            value = self.lookup(key)
            if value is _UNKNOWN and key in stored:
                found[key] = stored[key]
            elif value is not _UNKNOWN and value is not _ABSENT:
                found[key] = value
        return found


def as_type(key: str, value: Any, expected: Any) -> Any:
    """Return ``value`` as an ``expected``; raise StoreTypeError naming ``key`` if it is not."""
    if isinstance(expected, type) and isinstance(value, expected):
        return value
    try:
        return msgspec.convert(value, expected)
    except (msgspec.ValidationError, TypeError) as exc:
        raise StoreTypeError(key, _type_name(expected), _type_name(type(value))) from exc


def _type_name(value: Any) -> str:
    return getattr(value, "__qualname__", None) or repr(value)
