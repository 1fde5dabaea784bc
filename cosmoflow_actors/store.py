"""SharedStore: the handle nodes use to reach a run's storage.

Every method sends one message to the store actor that owns the backend and waits for
its answer, so every call is a checkpoint and may block while the actor's mailbox is
full (backpressure) or while it commits.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeVar, final, overload

import msgspec
import trio

from cosmoflow_actors.errors import StorageError, StoreTypeError
from cosmoflow_actors.runtime.messages import Reply, StoreOp, StoreRequest, deliver
from cosmoflow_actors.storage.base import Storage
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

    __slots__ = ("_mailbox", "_storage", "name")

    def __init__(
        self,
        mailbox: trio.MemorySendChannel[StoreRequest] | None,
        storage: Storage | None,
        name: str,
    ) -> None:
        self._mailbox = mailbox
        self._storage = storage
        self.name = name

    def detached(self) -> SharedStore:
        """A handle that refuses every call (for exec in a thread or a process)."""
        return SharedStore(None, None, self.name)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (for a worker process) it becomes a detached handle."""
        return (SharedStore, (None, None, self.name))

    async def _request(self, op: StoreOp, key: str = "", argument: Any = None) -> Any:
        check_key(key)
        if self._mailbox is None or self._storage is None:
            raise StorageError(f"{self.name} is not reachable here: use the store in prep and post")
        reply: Reply[Any] = Reply()
        try:
            await deliver(self._mailbox, StoreRequest(op, self._storage, key, argument, reply))
        except trio.ClosedResourceError as exc:
            raise StorageError(f"{self.name} is closed: its store actor has stopped") from exc
        return await reply.wait()

    @overload
    async def get(self, key: str, default: Any = ..., *, type: None = None) -> Any: ...

    @overload
    async def get(self, key: str, default: Any = ..., *, type: builtins.type[T]) -> T: ...

    async def get(self, key: str, default: Any = MISSING, *, type: Any = None) -> Any:
        """Return the value of ``key``, or ``default`` when it is missing.

        Raises StoreKeyError when it is missing and there is no default. With ``type=T``
        the value is returned as a ``T`` (a dataclass is rebuilt from its JSON form) or
        StoreTypeError is raised.
        """
        value = await self._request(StoreOp.GET, key, default)
        if type is None or (value is default and default is not MISSING):
            return value
        return as_type(key, value, type)

    async def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``; returns once the write is committed."""
        await self._request(StoreOp.SET, key, value)

    async def update(self, key: str, function: Callable[[Any], Any], default: Any = MISSING) -> Any:
        """Atomically replace the value of ``key`` with ``function(value)``; return it.

        ``function`` is a plain (sync) function, run inside the store actor: no other
        access to this store happens in between. A missing key uses ``default``, or
        raises StoreKeyError when there is none. An error ``function`` raises is raised
        here and nothing is stored.
        """
        return await self._request(StoreOp.UPDATE, key, (function, default))

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""
        result: bool = await self._request(StoreOp.DELETE, key)
        return result

    async def contains(self, key: str) -> bool:
        """Return whether ``key`` is stored."""
        result: bool = await self._request(StoreOp.CONTAINS, key)
        return result

    async def keys(self) -> list[str]:
        """Return every key."""
        result: list[str] = await self._request(StoreOp.KEYS)
        return result

    async def size(self) -> int:
        """Return the number of keys."""
        result: int = await self._request(StoreOp.SIZE)
        return result

    async def clear(self) -> None:
        """Remove every key."""
        await self._request(StoreOp.CLEAR)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return ``{key: value}`` for those of ``keys`` that are stored (one message)."""
        wanted = list(keys)
        for key in wanted:
            check_key(key)
        result: dict[str, Any] = await self._request(StoreOp.GET_MANY, argument=wanted)
        return result

    async def set_many(self, mapping: Mapping[str, Any]) -> None:
        """Store every item in one message, all or nothing."""
        for key in mapping:
            check_key(key)
        await self._request(StoreOp.SET_MANY, argument=dict(mapping))

    def __repr__(self) -> str:
        return f"<SharedStore {self.name}>"


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
