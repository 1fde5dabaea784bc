"""Writes staged in memory between two commits, in order, with an overlay for reads.

The persistent backends apply nothing to their durable state until ``commit``: ``set``,
``delete`` and ``clear`` are recorded here, reads consult :meth:`StagedWrites.lookup`
before the committed state, and ``commit`` applies :attr:`StagedWrites.ops` in order and
then calls :meth:`StagedWrites.reset`. Rolling back is just :meth:`StagedWrites.reset`.
Nothing in :class:`StagedWrites` blocks or awaits. :class:`DatabaseStorage` is what the
SQLite and Redis backends share on top of it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar, final

import trio

from cosmoflow_actors.storage.base import Storage
from cosmoflow_actors.storage.codec import CodecName, check_json_key, get_codec, utf8_key

V = TypeVar("V")


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()
""":meth:`StagedWrites.lookup`'s answer when only the committed state knows the key."""


@final
class SetOp(Generic[V]):
    """Store ``value`` under ``key``."""

    __slots__ = ("key", "value")

    def __init__(self, key: str, value: V) -> None:
        self.key = key
        self.value = value


@final
class DeleteOp:
    """Remove ``key`` if it is there."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


@final
class ClearOp:
    """Remove every key."""

    __slots__ = ()


Op = SetOp[V] | DeleteOp | ClearOp


@final
@dataclass(frozen=True, slots=True)
class StagedMark(Generic[V]):
    """The staged writes at one moment (see :meth:`StagedWrites.mark`)."""

    count: int
    """How many ops were staged."""
    overlay: dict[str, V | None]
    """A copy of the latest state per key then."""
    cleared: bool


@final
class StagedWrites(Generic[V]):
    """The writes since the last commit: an ordered op list and the latest state per key."""

    __slots__ = ("_overlay", "cleared", "ops")

    def __init__(self) -> None:
        self.ops: list[Op[V]] = []
        self._overlay: dict[str, V | None] = {}
        self.cleared = False
        """Whether a ``clear`` is staged: keys not in the overlay are then absent."""

    def __bool__(self) -> bool:
        return bool(self.ops)

    def set(self, key: str, value: V) -> None:
        """Stage storing ``value`` (already encoded) under ``key``."""
        self.ops.append(SetOp(key, value))
        self._overlay[key] = value

    def delete(self, key: str) -> None:
        """Stage removing ``key``."""
        self.ops.append(DeleteOp(key))
        self._overlay[key] = None

    def clear(self) -> None:
        """Stage removing every key."""
        self.ops.append(ClearOp())
        self._overlay.clear()
        self.cleared = True

    def lookup(self, key: str) -> V | _Unknown | None:
        """Return the staged value of ``key``, ``None`` if staged as absent, else UNKNOWN."""
        if key in self._overlay:
            return self._overlay[key]
        return None if self.cleared else UNKNOWN

    def merge_keys(self, committed: Iterable[str]) -> list[str]:
        """Return the keys after the staged ops are applied to ``committed``, in order.

        A key that is set anew goes to the end, as it does in a ``dict``.
        """
        keys = dict.fromkeys(committed)
        for op in self.ops:
            if isinstance(op, SetOp):
                keys.setdefault(op.key)
            elif isinstance(op, DeleteOp):
                keys.pop(op.key, None)
            else:
                keys.clear()
        return list(keys)

    def mark(self) -> StagedMark[V]:
        """Where the staged writes stand now, for :meth:`roll_back`."""
        return StagedMark(len(self.ops), self._overlay.copy(), self.cleared)

    def roll_back(self, mark: StagedMark[V]) -> None:
        """Forget the writes staged since ``mark`` (made by :meth:`mark`, with no
        :meth:`reset` since)."""
        del self.ops[mark.count :]
        self._overlay = mark.overlay.copy()
        self.cleared = mark.cleared

    def reset(self) -> None:
        """Forget every staged write (after a commit, or to roll back)."""
        self.ops = []
        self._overlay = {}
        self.cleared = False


class DatabaseStorage(Storage):
    """The shared part of the backends that keep their data in a database
    (SQLiteStorage, RedisStorage): values encoded by a codec, writes staged here until
    ``commit``, and reads that ask the database, with the staged writes laid over.

    A subclass connects in :meth:`open`, answers :meth:`get`, :meth:`contains`,
    :meth:`keys` and :meth:`_stored_count` from the database, and writes in ``commit``.
    Its calls to the database run one at a time through ``_limiter`` in a worker thread.
    """

    persistent = True

    def __init__(self, codec: str) -> None:
        self._codec = get_codec(codec)
        self._staged: StagedWrites[bytes] = StagedWrites()
        self._limiter = trio.CapacityLimiter(1)

    @property
    def codec(self) -> CodecName:
        """The codec's name: ``"json"`` or ``"pickle"``."""
        return self._codec.name

    async def set(self, key: str, value: Any) -> None:
        """Encode ``value`` now and stage it until ``commit``; does not block.

        A non-``str`` key raises ``TypeError``; a key or value that cannot be encoded
        raises :class:`~cosmoflow_actors.StorageError` and stores nothing.
        """
        await self.open()
        check_json_key(key)
        self._staged.set(key, self._codec.encode(key, value))

    async def delete(self, key: str) -> bool:
        """Stage removing ``key``; return whether it was there."""
        if not await self.contains(key):
            return False
        self._staged.delete(key)
        return True

    async def delete_many(self, keys: list[str]) -> None:
        """Stage removing each of ``keys``, without asking the database which are there
        (the commit leaves a key that is not stored as it is); does not block."""
        await self.open()
        for key in keys:
            if utf8_key(key) is not None:  # a key that is not valid Unicode is never stored
                self._staged.delete(key)

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        """Return ``{key: value}`` for those of ``keys`` that are stored, in their order:
        the staged writes laid over one read of the other keys (blocks in a worker
        thread, once, unless every key has a staged write)."""
        staged: dict[str, bytes | None] = {}
        unread: list[str] = []
        for key in keys:
            value = self._staged.lookup(key)
            if isinstance(value, bytes) or value is None:
                staged[key] = value
            elif utf8_key(key) is not None:  # a key that is not valid Unicode is never stored
                unread.append(key)
        stored = await self._read_many(unread) if unread else {}
        found: dict[str, Any] = {}
        for key in keys:
            data = staged[key] if key in staged else stored.get(key)
            if data is not None:
                found[key] = self._codec.read(repr(self), key, data)
        return found

    @abstractmethod
    async def _read_many(self, keys: list[str]) -> dict[str, bytes]:
        """The encoded values of those of ``keys`` (valid Unicode) that the database
        holds, by key (blocks in a worker thread, once)."""

    async def size(self) -> int:
        """Return the number of keys (blocks in a worker thread)."""
        if self._staged:
            return len(await self.keys())
        return await self._stored_count()

    async def clear(self) -> None:
        """Stage removing every key; does not block."""
        await self.open()
        self._staged.clear()

    @abstractmethod
    async def _stored_count(self) -> int:
        """The number of keys in the database, with nothing staged (blocks in a thread)."""
