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
from cosmoflow_actors.runtime.messages import StoreOp, StoreRequest
from cosmoflow_actors.storage.base import Storage
from cosmoflow_actors.store import MISSING, SharedStore

MAX_BATCH: Final = 1024
"""Most requests applied under one commit; bounds the latency of the first in a batch."""

Handler = Callable[[StoreRequest], Awaitable[outcome.Outcome[Any]]]


class StoreActor:
    """Owns one backend; serves :class:`StoreRequest` messages from a bounded mailbox."""

    kind = "store"

    def __init__(self, storage: Storage, mailbox_size: int) -> None:
        self.storage = storage
        self.name = f"store:{type(storage).__name__}@{id(storage):x}"
        send, receive = trio.open_memory_channel[StoreRequest](mailbox_size)
        self._send = send
        self._receive = receive
        self.handle = SharedStore(send, self.name)
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
        }

    @property
    def mailbox_depth(self) -> int:
        """Requests waiting in the mailbox."""
        return self._send.statistics().current_buffer_used

    def retire(self) -> None:
        """Close the mailbox: the actor answers what is queued, then exits. Never blocks."""
        self.retiring = True
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the backend, report ready, then serve until :meth:`retire` is called.

        Raises the backend's StorageError from ``nursery.start`` if it cannot open.
        """
        try:
            try:
                await self.storage.open()
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
            await self._apply(batch)

    async def _apply(self, batch: list[StoreRequest]) -> None:
        self.in_flight = len(batch)
        answers = [await self._handlers[request.op](request) for request in batch]
        writes = [
            i
            for i, (request, answer) in enumerate(zip(batch, answers, strict=True))
            if request.op.writes and isinstance(answer, outcome.Value)
        ]
        if writes:
            answers = await self._commit(batch, answers, writes)
        for request, answer in zip(batch, answers, strict=True):
            request.reply.send(answer)
        self.messages_processed += len(batch)
        self.in_flight = 0

    async def _commit(
        self, batch: list[StoreRequest], answers: list[outcome.Outcome[Any]], writes: list[int]
    ) -> list[outcome.Outcome[Any]]:
        try:
            await self.storage.commit()
        except StorageError as exc:
            for i in writes:
                error = StorageError(f"{self.name}: commit failed: {exc}")
                error.__cause__ = exc
                answers[i] = outcome.Error(error)
        return answers

    async def _read(self, key: str, default: Any) -> outcome.Outcome[Any]:
        try:
            return outcome.Value(await self.storage.get(key))
        except KeyError:
            if default is MISSING:
                return outcome.Error(StoreKeyError(key))
            return outcome.Value(default)

    async def _get(self, request: StoreRequest) -> outcome.Outcome[Any]:
        return await self._read(request.key, request.argument)

    async def _contains(self, request: StoreRequest) -> outcome.Outcome[Any]:
        return outcome.Value(await self.storage.contains(request.key))

    async def _keys(self, request: StoreRequest) -> outcome.Outcome[Any]:
        return outcome.Value(await self.storage.keys())

    async def _size(self, request: StoreRequest) -> outcome.Outcome[Any]:
        return outcome.Value(await self.storage.size())

    async def _get_many(self, request: StoreRequest) -> outcome.Outcome[Any]:
        found: dict[str, Any] = {}
        for key in request.argument:
            value = await self._read(key, MISSING)
            if isinstance(value, outcome.Value):
                found[key] = value.value
        return outcome.Value(found)

    async def _set(self, request: StoreRequest) -> outcome.Outcome[Any]:
        return await _refusing_storage_errors(self.storage.set(request.key, request.argument))

    async def _set_many(self, request: StoreRequest) -> outcome.Outcome[Any]:
        return await _refusing_storage_errors(self._set_all_or_nothing(request.argument))

    async def _set_all_or_nothing(self, mapping: dict[str, Any]) -> None:
        """Set every key; if one value is refused, put back what was there before."""
        previous: dict[str, outcome.Outcome[Any]] = {}
        try:
            for key, value in mapping.items():
                previous[key] = await self._read(key, MISSING)
                await self.storage.set(key, value)
        except StorageError:
            for key, old in previous.items():
                if isinstance(old, outcome.Value):
                    await self.storage.set(key, old.value)
                else:
                    await self.storage.delete(key)
            raise

    async def _update(self, request: StoreRequest) -> outcome.Outcome[Any]:
        function: Callable[[Any], Any] = request.argument[0]
        current = await self._read(request.key, request.argument[1])
        if not isinstance(current, outcome.Value):
            return current
        new: outcome.Outcome[Any] = outcome.capture(function, current.value)
        if not isinstance(new, outcome.Value):
            return new
        stored = await _refusing_storage_errors(self.storage.set(request.key, new.value))
        return new if isinstance(stored, outcome.Value) else stored

    async def _delete(self, request: StoreRequest) -> outcome.Outcome[Any]:
        return outcome.Value(await self.storage.delete(request.key))

    async def _clear(self, request: StoreRequest) -> outcome.Outcome[Any]:
        return await _refusing_storage_errors(self.storage.clear())


async def _refusing_storage_errors(write: Awaitable[Any]) -> outcome.Outcome[Any]:
    """Run a write; a StorageError (a value it cannot encode) is the requester's answer."""
    try:
        return outcome.Value(await write)
    except StorageError as exc:
        return outcome.Error(exc)
