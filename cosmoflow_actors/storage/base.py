"""The storage backend contract.

A backend is owned by exactly one store actor at a time: the actor calls these methods
one at a time, in mailbox order, so a backend needs no locking of its own. Node code
never calls a backend directly; it goes through :class:`cosmoflow_actors.SharedStore`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Final

from cosmoflow_actors.errors import RunConflictError, StorageError
from cosmoflow_actors.storage.codec import check_key

RESERVED_PREFIX: Final = "__cosmoflow__/"
"""Keys under this prefix belong to the engine (durable run records)."""

RECORD_PREFIX: Final = RESERVED_PREFIX + "runs/"
"""A durable run's record is stored under this prefix followed by its run id."""

StagedOp = tuple[str, str, Any]
"""A write staged by a durable step: ("set", key, value), ("delete", key, None),
("update", key, (function, default)) or ("clear", "", None)."""


class Storage(ABC):
    """Abstract storage backend: a mapping from ``str`` keys to values.

    Required: :meth:`get`, :meth:`set`, :meth:`delete`, :meth:`keys`. The rest have
    defaults built on those. Every method may block only by awaiting (run blocking I/O
    with ``trio.to_thread``); each is a checkpoint only if the backend awaits.
    """

    persistent: ClassVar[bool] = False
    """True for a backend whose commits survive the process (file, SQLite, Redis): runs
    given a ``run_id`` on it are durable (see docs/durability.md)."""

    shared_actor: ClassVar[bool] = False
    """True for a volatile backend that needs no :meth:`open`, never awaits and never
    fails a commit: one engine-wide store actor then serves every instance (memory).
    False: each instance gets a store actor of its own."""

    async def open(self) -> None:  # noqa: B027 (an optional hook; no-op by default)
        """Prepare the backend (for example load a file); called before first use.

        The store actor calls it before it reports ready; it must be idempotent.
        Raises :class:`~cosmoflow_actors.StorageError` when the data cannot be read.
        """

    @abstractmethod
    async def get(self, key: str) -> Any:
        """Return the value of ``key``; raise ``KeyError`` when it is missing."""

    @abstractmethod
    async def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``.

        A value the backend cannot encode raises :class:`~cosmoflow_actors.StorageError`
        and stores nothing. The write is durable once :meth:`commit` returns.
        """

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""

    @abstractmethod
    async def keys(self) -> list[str]:
        """Return every key, in insertion order where the backend keeps one."""

    async def contains(self, key: str) -> bool:
        """Return whether ``key`` is stored."""
        try:
            await self.get(key)
        except KeyError:
            return False
        return True

    async def size(self) -> int:
        """Return the number of keys."""
        return len(await self.keys())

    async def clear(self) -> None:
        """Remove every key."""
        for key in await self.keys():
            await self.delete(key)

    async def update(self, key: str, function: Callable[[Any], Any], default: Any) -> Any:
        """Store ``function(value)`` under ``key`` in one atomic step and return it.

        ``value`` is the stored value, or ``default`` when ``key`` is missing. When
        ``function`` raises, the error propagates and nothing is stored; a result the
        backend cannot encode raises :class:`~cosmoflow_actors.StorageError` and nothing is
        stored. The default reads with :meth:`get` and writes with :meth:`set`: atomic
        because the store actor runs one call at a time, so enough for any backend that
        only one store actor writes. A backend that other processes write to at the same
        time overrides it with an atomic read-modify-write of its own (``RedisStorage``,
        ``SQLiteStorage``);
        such an override may call ``function`` more than once, and may commit the writes
        staged before it together with its own.
        """
        try:
            current = await self.get(key)
        except KeyError:
            current = default
        new = function(current)
        await self.set(key, new)
        return new

    async def commit_step(
        self, ops: list[StagedOp], record_key: str, record: Any, steps_before: int
    ) -> bool:
        """Optionally apply a durable step's writes and its run record as one transaction
        of the backend's own, atomic against other processes writing the same data.

        ``ops`` are ``("set", key, value)``, ``("delete", key, None)``, ``("clear", "",
        None)`` (every key outside :data:`RESERVED_PREFIX`) and ``("update", key,
        (function, default))`` (store ``function(value or default)``; ``function`` may
        raise, and then nothing is stored). The record stored under ``record_key`` must
        still count ``steps_before`` completed steps: check it inside the transaction
        with :func:`check_steps`, which raises RunConflictError when another engine
        committed a step first, and then store nothing.

        Return False (the default) to let the store actor check the record and apply the
        ops with :meth:`get`, :meth:`set` and :meth:`delete` in its batch, which is
        atomic within one engine.
        """
        return False

    async def commit(self) -> None:  # noqa: B027 (an optional hook; no-op by default)
        """Make every write since the last commit durable, all or nothing.

        The store actor calls it once per batch of writes it drained from its mailbox,
        before it answers any of them. On failure it raises
        :class:`~cosmoflow_actors.StorageError` and the backend returns to its last
        committed state. The default (a volatile backend) does nothing.
        """

    async def aclose(self) -> None:  # noqa: B027 (an optional hook; no-op by default)
        """Release resources (files, connections). The default does nothing."""


def check_user_key(key: str) -> None:
    """Check a key node code writes: ``TypeError`` unless it is a ``str`` (as
    :func:`~cosmoflow_actors.storage.codec.check_key`), StorageError when it is under
    :data:`RESERVED_PREFIX`, where the engine keeps its run records. Does not block."""
    check_key(key)
    if key.startswith(RESERVED_PREFIX):
        raise StorageError(
            f"cannot write key {key!r}: keys starting with {RESERVED_PREFIX!r} are reserved "
            "for the engine's run records; choose a key without that prefix"
        )


def check_steps(record_key: str, stored: Any, steps_before: int) -> None:
    """Raise RunConflictError unless ``stored``, the run record read from the store under
    ``record_key`` (None when missing), counts ``steps_before`` completed steps."""
    run_id = record_key.removeprefix(RECORD_PREFIX)
    if stored is None:
        raise RunConflictError(
            f"run {run_id!r}: the store no longer holds its record; step {steps_before + 1} "
            "is not applied"
        )
    steps = len(stored["path"])
    if steps != steps_before:
        raise RunConflictError(
            f"run {run_id!r}: another engine committed step {steps_before + 1} first "
            f"(the store's record counts {steps} steps); this step is not applied"
        )


async def value_or(storage: Storage, key: str, missing: Any) -> Any:
    """The value of ``key`` in ``storage``, or ``missing`` when it is not stored."""
    try:
        return await storage.get(key)
    except KeyError:
        return missing


async def apply_step_op(storage: Storage, kind: str, key: str, argument: Any) -> None:
    """Apply one staged op of a durable step (see :data:`StagedOp`) with ``storage``'s
    own ``get``, ``set`` and ``delete``: an update calls its function on the value the
    ops before it left, or on its default (which may be the store client's MISSING) when
    there is none; a clear deletes the user's keys and leaves the run records."""
    if kind == "clear":
        for stored in await storage.keys():
            if not stored.startswith(RESERVED_PREFIX):
                await storage.delete(stored)
    elif kind == "delete":
        await storage.delete(key)
    elif kind == "set":
        await storage.set(key, argument)
    else:
        function, default = argument
        await storage.set(key, function(await value_or(storage, key, default)))
