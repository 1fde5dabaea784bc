"""The store actor: the one task that touches a storage backend.

Every SharedStore call is a :class:`StoreRequest` in this actor's mailbox. The actor
takes whatever is waiting in the mailbox as one batch, applies it in order, commits the
batch's writes once, and only then answers. So access is serialized (``update`` is an
atomic read-modify-write), concurrent writers lose nothing, and a file backend writes
once per batch instead of once per ``set``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import outcome
import trio

from cosmoflow_actors.errors import StorageError, StoreKeyError
from cosmoflow_actors.runtime.gil import SHORT_SWITCH_INTERVAL
from cosmoflow_actors.runtime.messages import StoreOp, StoreRequest
from cosmoflow_actors.storage.base import RECORD_PREFIX, RESERVED_PREFIX, Storage, check_steps
from cosmoflow_actors.store import MISSING, SharedStore

MAX_BATCH: Final = 1024
"""Most requests applied under one commit; bounds the latency of the first in a batch."""

Handler = Callable[[StoreRequest], Awaitable[Any]]


class StoreActor:
    """Owns a backend (or, for a ``shared_actor`` backend, every instance of it); serves
    :class:`StoreRequest` messages from a bounded mailbox.
    """

    kind = "store"
    max_concurrency = 1
    rate = None

    def __init__(self, name: str, mailbox_size: int, storage: Storage | None = None) -> None:
        self.name = name
        self.mailbox_size = mailbox_size
        self._storage = storage
        self.path: object = getattr(storage, "path", None)
        """The file its backend is on (``storage.path``), if it has one."""
        send, receive = trio.open_memory_channel[StoreRequest](mailbox_size)
        self._send = send
        self._receive = receive
        self.users = 0
        self.serving = False
        self.retiring = False
        self.opened = trio.Event()
        self.messages_processed = 0
        self.in_flight = 0
        self.exited = trio.Event()
        self._handlers: dict[StoreOp, Handler] = {
            StoreOp.GET: self._get,
            StoreOp.CONTAINS: self._contains,
            StoreOp.KEYS: self._keys,
            StoreOp.SIZE: self._size,
            StoreOp.GET_MANY: self._get_many,
            StoreOp.SET: self._set,
            StoreOp.SET_MANY: self._set_many,
            StoreOp.UPDATE: self._update,
            StoreOp.DELETE: self._delete,
            StoreOp.CLEAR: self._clear,
            StoreOp.COMMIT_STEP: self._commit_step,
            StoreOp.RECORDS: self._records,
        }

    def handle(self, storage: Storage) -> SharedStore:
        """A SharedStore whose calls this actor serves against ``storage``."""
        return SharedStore(self._send, storage, self.name)

    @property
    def mailbox_depth(self) -> int:
        """Requests waiting in the mailbox."""
        return self._send.statistics().current_buffer_used

    def retire(self) -> None:
        """Close the mailbox: the actor answers what is queued, then exits. Never blocks."""
        self.retiring = True
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open its backend, report ready, then serve until :meth:`retire` is called.

        Raises the backend's StorageError from ``nursery.start`` if it cannot open.
        """
        try:
            try:
                if self._storage is not None:
                    with SHORT_SWITCH_INTERVAL:
                        await self._storage.open()
                self.serving = True
            finally:
                self.opened.set()
            task_status.started()
            async with self._receive:
                await self._serve()
        finally:
            self.exited.set()

    async def _serve(self) -> None:
        receive = self._receive
        while True:
            try:
                batch = [await receive.receive()]
            except trio.EndOfChannel:
                return
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if self._storage is None:
                # A shared actor's backends never await (see Storage.shared_actor): no
                # worker thread to let in, and the switch interval's lock cost the chain
                # 3 µs a step.
                await self._apply(batch)
            else:
                with SHORT_SWITCH_INTERVAL:
                    await self._apply(batch)

    async def _apply(self, batch: list[StoreRequest]) -> None:
        """Answer every request of ``batch`` after committing its writes.

        What a requester should see (a StorageError, a missing key, an error of an
        update function) is its answer; anything else crashes the actor, as a broken
        backend must. Each request is applied in this frame: no coroutine of its own.
        """
        self.in_flight = len(batch)
        handlers = self._handlers
        answers: list[outcome.Outcome[Any]] = []
        for request in batch:
            try:
                answers.append(outcome.Value(await handlers[request.op](request)))
            except _Refused as refused:
                answers.append(outcome.Error(refused.error))
            except (StorageError, StoreKeyError) as exc:
                answers.append(outcome.Error(exc))
        # Every backend a write went to commits, a refused one's too: an SQLite update
        # may have opened the transaction before its function raised.
        for storage in {request.storage for request in batch if request.op.writes}:
            if type(storage).commit is not Storage.commit:  # the default does nothing
                await self._commit(storage, batch, answers)
        for request, answer in zip(batch, answers, strict=True):
            request.reply.send(answer)
        self.messages_processed += len(batch)
        self.in_flight = 0

    async def _commit(
        self, storage: Storage, batch: list[StoreRequest], answers: list[outcome.Outcome[Any]]
    ) -> None:
        """Commit ``storage``; if that fails, every write to it in the batch fails."""
        try:
            await storage.commit()
        except StorageError as exc:
            for i, request in enumerate(batch):
                if (
                    request.storage is storage
                    and request.op.writes
                    and isinstance(answers[i], outcome.Value)
                ):
                    error = StorageError(f"{self.name}: commit failed: {exc}")
                    error.__cause__ = exc
                    answers[i] = outcome.Error(error)

    # The simplest handlers are plain functions returning the backend's awaitable: one
    # coroutine less per request.

    def _get(self, request: StoreRequest) -> Awaitable[Any]:
        return _read(request.storage, request.key, request.argument)

    def _contains(self, request: StoreRequest) -> Awaitable[bool]:
        return request.storage.contains(request.key)

    async def _keys(self, request: StoreRequest) -> Any:
        return await _user_keys(request.storage)

    async def _size(self, request: StoreRequest) -> Any:
        if not request.storage.persistent:
            return await request.storage.size()
        return len(await _user_keys(request.storage))

    async def _get_many(self, request: StoreRequest) -> Any:
        found: dict[str, Any] = {}
        for key in request.argument:
            try:
                found[key] = await request.storage.get(key)
            except KeyError:
                continue
        return found

    def _set(self, request: StoreRequest) -> Awaitable[None]:
        return request.storage.set(request.key, request.argument)

    async def _set_many(self, request: StoreRequest) -> Any:
        """Set every key; if the backend refuses one value, put back what was there."""
        storage = request.storage
        undo = _Undo(storage)
        try:
            for key, value in request.argument.items():
                await undo.remember(key)
                await storage.set(key, value)
        except StorageError:
            await undo.restore()
            raise

    async def _update(self, request: StoreRequest) -> Any:
        """The backend's atomic read-modify-write, with the caller's function guarded so
        that its errors (and a missing key without default) reach the caller."""
        function, default = request.argument
        return await request.storage.update(request.key, _guard(request.key, function), default)

    def _delete(self, request: StoreRequest) -> Awaitable[bool]:
        return request.storage.delete(request.key)

    async def _clear(self, request: StoreRequest) -> Any:
        await _clear_user_keys(request.storage)

    async def _commit_step(self, request: StoreRequest) -> Any:
        """A durable step's staged writes and its run record, all or nothing."""
        storage = request.storage
        staged, record, steps_before = request.argument
        ops = [_guarded(op) for op in staged]
        if await storage.commit_step(ops, request.key, record, steps_before):
            return
        check_steps(request.key, await _read(storage, request.key, None), steps_before)
        undo = _Undo(storage)
        try:
            for op, key, argument in ops:
                await _apply_staged(storage, undo, op, key, argument)
            await undo.remember(request.key)
            await storage.set(request.key, record)
        except (StorageError, _Refused):
            await undo.restore()
            raise

    async def _records(self, request: StoreRequest) -> Any:
        storage = request.storage
        keys = [key for key in await storage.keys() if key.startswith(RECORD_PREFIX)]
        return [await storage.get(key) for key in keys]


async def _user_keys(storage: Storage) -> list[str]:
    """The keys a user sees: a persistent store's run records are hidden."""
    keys = await storage.keys()
    if not storage.persistent:
        return keys
    return [key for key in keys if not key.startswith(RESERVED_PREFIX)]


async def _clear_user_keys(storage: Storage) -> None:
    if not storage.persistent:
        await storage.clear()
        return
    for key in await _user_keys(storage):
        await storage.delete(key)


async def _apply_staged(storage: Storage, undo: _Undo, op: str, key: str, argument: Any) -> None:
    """Apply one staged write of a durable step, remembering what it replaces."""
    if op == "clear":
        for stored in await _user_keys(storage):
            await undo.remember(stored)
        await _clear_user_keys(storage)
        return
    await undo.remember(key)
    if op == "set":
        await storage.set(key, argument)
    elif op == "delete":
        await storage.delete(key)
    else:
        function, default = argument
        await storage.set(key, function(await _read(storage, key, default)))


def _guarded(op: tuple[str, str, Any]) -> tuple[str, str, Any]:
    """A staged op whose update function hands its errors (and a missing key without a
    default) to the requester instead of crashing the actor."""
    kind, key, argument = op
    if kind != "update":
        return op
    function, default = argument
    return (kind, key, (_guard(key, function), default))


def _guard(key: str, function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``function`` for a backend to call: its errors, and a missing key without a
    default (the value MISSING), leave the backend as _Refused, for the requester."""

    def apply(value: Any) -> Any:
        if value is MISSING:
            raise _Refused(StoreKeyError(key))
        try:
            return function(value)
        except Exception as exc:
            raise _Refused(exc) from None

    return apply


class _Undo:
    """What a multi-write request replaced, to put back if a later write is refused."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._previous: dict[str, Any] = {}

    async def remember(self, key: str) -> None:
        if key not in self._previous:
            self._previous[key] = await _read(self._storage, key, MISSING_VALUE)

    async def restore(self) -> None:
        for key, old in self._previous.items():
            if old is MISSING_VALUE:
                await self._storage.delete(key)
            else:
                await self._storage.set(key, old)


class _Refused(Exception):
    """Carries an error meant for the requester out of a backend call."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


MISSING_VALUE: Final[Any] = object()
"""Marks a key that was absent before a set_many."""


async def _read(storage: Storage, key: str, default: Any) -> Any:
    """The value of ``key``, else ``default``; StoreKeyError when there is no default."""
    try:
        return await storage.get(key)
    except KeyError:
        if default is MISSING:
            raise StoreKeyError(key) from None
        return default
