"""The store actor: the only code that touches a storage backend.

One actor serves every memory storage of the engine; each other backend instance gets
an actor of its own (see :mod:`cosmoflow_actors.runtime.stores`). Requests are handled
one at a time in mailbox order:

- **directly**, in the requesting task, when the actor is idle and the backend is a
  :class:`MemoryStorage`, whose operations are dict operations that never wait
  (:meth:`StoreActor.handle_now`);
- otherwise **in batches** by the actor's own task: it takes every request waiting in
  its mailbox, applies them in order, commits the batch's writes once, and only then
  answers. So ``update`` is an atomic read-modify-write, concurrent writers lose
  nothing, and a file backend writes once per batch instead of once per ``set``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import warnings
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, TypeVar

import outcome
import trio

from cosmoflow_actors.errors import (
    ActorCrashedError,
    RunConflictError,
    StorageError,
    StoreKeyError,
    type_and_message,
    with_article,
)
from cosmoflow_actors.runtime.actor import Actor
from cosmoflow_actors.runtime.cancellation import only_cancelled
from cosmoflow_actors.runtime.gil import SHORT_SWITCH_INTERVAL
from cosmoflow_actors.runtime.messages import Reply, StoreOp, StoreRequest
from cosmoflow_actors.runtime.statistics import ActorStatistics
from cosmoflow_actors.runtime.store_client import MISSING, SharedStore, updated
from cosmoflow_actors.storage.base import (
    RECORD_PREFIX,
    RESERVED_PREFIX,
    StagedOp,
    Storage,
    apply_step_op,
    check_steps,
    forgotten_with,
    stored_with,
    value_or,
)
from cosmoflow_actors.storage.memory import MemoryStorage

MAX_BATCH: Final = 1024
"""Most requests applied under one commit; bounds the latency of the first in a batch."""

CLOSE_SECONDS: Final = 30.0
"""How long a store actor's backend may go on once the engine begins to close (see
:meth:`StoreActor.bound_closing`): its commits (``commit``, ``commit_step``), shielded
from cancellation so that closing does not cut one half-way, and its close (``aclose``)
all end by then. A commit still going on is then cancelled (an async backend's; a
thread cannot be) and fails. An actor that retires while the engine stays open gives
its backend's close as long, from when the close begins."""

Handler = Callable[[StoreRequest], Awaitable[Any]]
T = TypeVar("T")


class StoreActor(Actor[StoreRequest]):
    """Owns a backend (or, for ``shared_actor`` backends, every instance of them) and
    serves its requests."""

    kind = "store"

    def __init__(
        self,
        name: str,
        mailbox_size: int,
        storage: Storage | None = None,
        *,
        closing: Callable[[], None],
    ) -> None:
        super().__init__(name, mailbox_size, 1)
        self._storage = storage
        self._closing = closing
        """The engine's close (never blocks): called when the actor is cancelled, which
        only the engine closing does (its nursery, or a scope around it, cancelled)."""
        self.path: object = getattr(storage, "path", None)
        """The file its backend is on (``storage.path``), if it has one."""
        self.users = 0
        self.retiring = False
        self.opened = trio.Event()
        self.open_error: StorageError | None = None
        """Why the backend could not be opened, for every run that waited for it."""
        self.exited = trio.Event()
        self._in_hand: list[StoreRequest] = []
        """The batch being applied (answered only once it is all applied)."""
        self._committing: trio.CancelScope | None = None
        """The shield of the backend's commit under way, if one is."""
        self._close_deadline = math.inf
        """When the backend's commits and close are cut: CLOSE_SECONDS after the engine
        began to close (see :meth:`bound_closing`)."""
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
            StoreOp.FORGET: self._forget,
        }

    @property
    def shared(self) -> bool:
        """Whether it serves every ``shared_actor`` backend (memory storage) of the
        engine, rather than one backend of its own."""
        return self._storage is None

    def statistics(self) -> ActorStatistics:
        """This actor's counters now, ``in_flight`` the requests of the batch being
        applied (its one slot serves them all). Never blocks."""
        return dataclasses.replace(super().statistics(), in_flight=len(self._in_hand))

    def client(self, storage: Storage) -> SharedStore:
        """A SharedStore whose calls this actor serves against ``storage``."""
        return SharedStore(self, storage, self.name)

    async def request(self, op: StoreOp, storage: Storage, key: str, argument: Any) -> Any:
        """Have ``op`` done on ``storage``; return its answer or raise its error.

        Handled at once when :meth:`handle_now` may; else queued (blocks while the
        mailbox is full) and answered after the actor commits it (blocks until then).
        Raises StorageError once the actor has retired; trio.Cancelled instead in a
        cancelled scope (a step of a run that the engine's close cancelled, see
        :meth:`run`).
        """
        if self.retiring:
            await trio.lowlevel.checkpoint_if_cancelled()
            raise StorageError(f"{self.name} is closed: its store actor has stopped")
        if self.idle and type(storage) is MemoryStorage:
            return self.handle_now(op, storage, key, argument)
        reply: Reply[Any] = Reply()
        await self.mailbox.put(StoreRequest(op, storage, key, argument, reply))
        return await reply.wait()

    def handle_now(self, op: StoreOp, storage: MemoryStorage, key: str, argument: Any) -> Any:
        """Direct dispatch: handle one request on a memory storage in the caller's task.

        Invariant: the caller found the actor idle (no slot taken, nothing queued), and a
        memory storage's handlers never wait, so no other request can run in between
        and none can be queued meanwhile: the actor's serial order holds without its
        slot being taken, and the answer is what :meth:`request` would give through the
        mailbox (the same handlers answer there). Never blocks.
        """
        self.messages_processed += 1
        try:
            return _MEMORY[op](storage.data, key, argument)
        except _Refused as refused:
            raise refused.error from refused.error.__cause__
        except (StorageError, StoreKeyError):
            raise
        except Exception as exc:  # the dict's own code (a dict subclass's method) raised
            raise self._broken(op.name.lower(), exc) from exc

    async def records(self, storage: Storage) -> dict[str, Any]:
        """Every run record in ``storage``, by key."""
        found: dict[str, Any] = await self.request(StoreOp.RECORDS, storage, "", None)
        return found

    async def read_record(self, storage: Storage, key: str) -> Any:
        """The run record under ``key``, or None."""
        return await self.request(StoreOp.GET, storage, key, None)

    async def read_parts(self, storage: Storage, keys: list[str]) -> dict[str, Any]:
        """Those of the parts of a run (path chunks, places) under ``keys`` that are
        stored, by key. Blocks until read."""
        found: dict[str, Any] = await self.request(StoreOp.GET_MANY, storage, "", keys)
        return found

    async def forget_record(
        self, storage: Storage, key: str, check: Callable[[str, Any], None]
    ) -> bool:
        """Delete the run record under ``key``, with the records of its BatchFlow
        children (``key:3/0``...) and the parts (path chunks, places) of them all, once
        ``check(key, record)`` has passed (it raises to keep them), with nothing in
        between in the actor's serial order; return whether there was a record. Blocks
        until done."""
        forgotten: bool = await self.request(StoreOp.FORGET, storage, key, check)
        return forgotten

    async def create_record(self, storage: Storage, key: str, record: Any) -> None:
        """Store the record of a run that starts, unless the store holds one under ``key``
        already: another engine started the run since it was read (RunConflictError,
        nothing stored). Atomic across processes on a backend whose ``update`` is."""
        await self.request(
            StoreOp.UPDATE, storage, key, (functools.partial(_created_record, key, record), None)
        )

    async def commit_step(
        self, storage: Storage, ops: list[StagedOp], key: str, record: Any, steps_before: int
    ) -> None:
        """Apply a durable step's ``ops`` and store its ``record`` in one commit, all or
        nothing, if the stored record still counts ``steps_before`` steps; else raise
        RunConflictError."""
        await self.request(StoreOp.COMMIT_STEP, storage, key, (ops, record, steps_before))

    def bound_closing(self) -> None:
        """The engine is closing: a backend commit under way, one that starts from now
        on, and the backend's close are cut CLOSE_SECONDS from now (a commit cut then
        fails). Never blocks."""
        self._close_deadline = trio.current_time() + CLOSE_SECONDS
        if self._committing is not None:
            self._committing.deadline = self._close_deadline

    async def _uncut(self, commit: Awaitable[T]) -> T:
        """Await ``commit``, a backend's commit, shielded from cancellation, so that the
        engine closing does not cut it half-way; but once the engine closes, only until
        the close deadline (see :meth:`bound_closing`), then StorageError (the commit
        failed)."""
        with trio.CancelScope(shield=True, deadline=self._close_deadline) as self._committing:
            try:
                return await commit
            finally:
                self._committing = None
        # Reached only when the deadline cut the commit.
        raise StorageError(
            f"the commit was cut {CLOSE_SECONDS:g} s after the engine began to close"
        )

    def retire(self) -> None:
        """Refuse new requests; the actor answers what is queued, closes its backend and
        exits. Never blocks."""
        self.retiring = True
        self.mailbox.wake()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open its backend, report ready, serve until :meth:`retire`, then close the
        backend (shielded, until the close deadline: see :meth:`_close_backend`).

        A backend that cannot open is no crash: whatever its ``open`` raised is kept in
        :attr:`open_error` (as a StorageError), for every run that waits for the actor,
        and the actor exits. However the actor ends (retired, crashed, cancelled, not
        opened), every request not answered yet is answered before the backend closes
        (see :meth:`_stop`). Cancelled, it first has the engine close (``closing``),
        which cancels the runs in flight: a scope around the engine's nursery may be
        cancelled before the engine's own close has run, and a step that finds the actor
        stopped (or is answered that it stopped) is then cancelled with its run, not
        failed, also in a task outside the engine (the caller of ``engine.run``).
        """
        stopped_by: BaseException | None = None
        try:
            try:
                if self._storage is not None:
                    with SHORT_SWITCH_INTERVAL:
                        await self._storage.open()
                self.serving = True
            except Exception as exc:
                self.open_error = self._open_failed(exc)
                return
            finally:
                self.opened.set()
            task_status.started()
            await self._serve()
        except BaseException as exc:
            stopped_by = exc
            if only_cancelled(exc):  # a group too: a backend's open() with a nursery
                self._closing()
            raise
        finally:
            self._stop(stopped_by)
            if self.serving and self._storage is not None:
                await self._close_backend(self._storage)
            self.exited.set()

    def _open_failed(self, error: Exception) -> StorageError:
        """Why the backend could not open: its StorageError, or one naming this actor
        for any other error (the cause)."""
        if isinstance(error, StorageError):
            return error
        failure = StorageError(f"{self.name} could not be opened: {type_and_message(error)}")
        failure.__cause__ = error
        return failure

    def open_failure(self) -> StorageError:
        """A new error for a run that waited for a backend this actor did not open: a
        copy of :attr:`open_error` (its type, message and attributes) caused by what
        caused it (the OSError or the redis error, say), or that the engine closed
        first. Never blocks."""
        if self.open_error is None:
            return StorageError(f"{self.name} was not opened: the engine closed first")
        failure = copy.copy(self.open_error)
        failure.__cause__ = self.open_error.__cause__
        return failure

    async def _close_backend(self, storage: Storage) -> None:
        """Close the backend after its last run. Every write was committed before, so
        a backend that cannot close (a read-only FileStorage cannot compact), whatever
        it raises, loses nothing: that is a warning, not a crash of the engine. Shielded,
        and cut at the close deadline (see :meth:`bound_closing`), or CLOSE_SECONDS from
        now when the engine is still open."""
        deadline = min(self._close_deadline, trio.current_time() + CLOSE_SECONDS)
        with trio.CancelScope(shield=True, deadline=deadline):
            try:
                await storage.aclose()
            except Exception as exc:
                text = str(exc) if isinstance(exc, StorageError) else type_and_message(exc)
                _warn_unregistered(f"{self.name}: closing failed: {text}")

    async def _serve(self) -> None:
        """Apply what waits in the mailbox, batch after batch, until retired and empty."""
        mailbox = self.mailbox
        while True:
            while not mailbox and not self.retiring:
                await mailbox.wait()
            if not mailbox:
                return
            self._in_hand = mailbox.take_batch(MAX_BATCH)
            if self._storage is None:
                # The shared actor's backends never await (see Storage.shared_actor):
                # no worker thread to let in.
                await self._apply(self._in_hand)
            else:
                with SHORT_SWITCH_INTERVAL:
                    await self._apply(self._in_hand)
            self._in_hand = []

    def _stop(self, stopped_by: BaseException | None) -> None:
        """Take no more requests, and answer every one not answered yet (the batch in
        hand, those queued, those of senders waiting for room) with why the actor
        stopped, so that no requester waits for an actor that is gone. Never blocks."""
        self.retiring = True
        unanswered = [*self._in_hand, *self.mailbox.close()]
        self._in_hand = []
        for request in unanswered:
            request.reply.send(outcome.Error(self._stopped_error(stopped_by)))

    def _stopped_error(self, stopped_by: BaseException | None) -> Exception:
        """A new error for a request the actor stopped without answering: why its
        backend did not open, ActorCrashedError (caused by what crashed it), or that
        it stopped (its engine closed)."""
        if not self.serving:
            return self.open_failure()
        if isinstance(stopped_by, Exception):
            crashed = ActorCrashedError(self.name)
            crashed.__cause__ = stopped_by
            return crashed
        return StorageError(f"{self.name} stopped before answering: its engine closed")

    async def _apply(self, batch: list[StoreRequest]) -> None:
        """Answer every request of ``batch`` after committing its writes.

        What a requester should see (a StorageError, a missing key, an error of an
        update function) is its answer; so is any other error a backend raised, as a
        StorageError naming the backend and the operation (see :meth:`_broken`): a
        broken backend fails the requests it fails, never the actor.
        """
        self.busy = 1
        answers = [await self._answer(request) for request in batch]
        # Every backend a write went to commits, a refused one's too: an SQLite update
        # may have opened the transaction before its function raised.
        for storage in {request.storage for request in batch if request.op.writes}:
            if type(storage).commit is not Storage.commit:  # the default does nothing
                await self._commit(storage, batch, answers)
        for request, answer in zip(batch, answers, strict=True):
            request.reply.send(answer)
        self.messages_processed += len(batch)
        self.busy = 0

    async def _answer(self, request: StoreRequest) -> outcome.Outcome[Any]:
        """Apply one request; its outcome is the requester's answer."""
        storage = request.storage
        try:
            if type(storage) is MemoryStorage:
                return outcome.Value(
                    _MEMORY[request.op](storage.data, request.key, request.argument)
                )
            return outcome.Value(await self._handlers[request.op](request))
        except _Refused as refused:
            return outcome.Error(refused.error)
        except (StorageError, StoreKeyError) as exc:
            return outcome.Error(exc)
        except Exception as exc:  # a backend bug: it fails this request alone
            return outcome.Error(self._broken(request.op.name.lower(), exc))

    def _broken(self, operation: str, error: Exception) -> StorageError:
        """A new StorageError for an ``operation`` whose backend raised ``error``, which
        is no StorageError: it names the backend (this actor) and the operation, with
        ``error`` as its cause. Never blocks."""
        failure = StorageError(
            f"{self.name}: {operation} failed: the backend raised {type_and_message(error)}"
        )
        failure.__cause__ = error
        return failure

    async def _commit(
        self, storage: Storage, batch: list[StoreRequest], answers: list[outcome.Outcome[Any]]
    ) -> None:
        """Commit ``storage``; if that fails (whatever it raised), every request to it
        from its first write in the batch on fails: the writes were not stored, and the
        reads after them may have seen what they wrote."""
        try:
            await self._uncut(storage.commit())
        except Exception as exc:
            first = next(i for i, r in enumerate(batch) if r.storage is storage and r.op.writes)
            for i in range(first, len(batch)):
                if batch[i].storage is storage and isinstance(answers[i], outcome.Value):
                    answers[i] = outcome.Error(self._commit_failed(exc))

    def _commit_failed(self, error: Exception) -> StorageError:
        """A new StorageError for a write whose batch's commit raised ``error`` (its
        cause). Never blocks."""
        if isinstance(error, StorageError):
            failure = StorageError(f"{self.name}: commit failed: {error}")
            failure.__cause__ = error
            return failure
        return self._broken("commit", error)

    # The handlers of backends that may wait, one per StoreOp.

    async def _get(self, request: StoreRequest) -> Any:
        return await _read(request.storage, request.key, request.argument)

    async def _contains(self, request: StoreRequest) -> Any:
        return await request.storage.contains(request.key)

    async def _keys(self, request: StoreRequest) -> Any:
        return await _user_keys(request.storage)

    async def _size(self, request: StoreRequest) -> Any:
        if not request.storage.persistent:
            return await request.storage.size()
        return len(await _user_keys(request.storage))

    async def _get_many(self, request: StoreRequest) -> Any:
        return await self._found(request.storage, request.argument)

    async def _set(self, request: StoreRequest) -> Any:
        await request.storage.set(request.key, request.argument)

    async def _set_many(self, request: StoreRequest) -> Any:
        """Set every key; if the backend refuses one value, put back what was there,
        read beforehand with one ``get_many``."""
        storage = request.storage
        items: dict[str, Any] = request.argument
        undo = _StoreUndo(storage)
        undo.remember_found(items, await self._found(storage, list(items)))
        try:
            for key, value in items.items():
                await storage.set(key, value)
        except Exception:
            await undo.restore()
            raise

    async def _update(self, request: StoreRequest) -> Any:
        """The backend's atomic read-modify-write, with the caller's function guarded so
        that its errors (and a missing key without default) reach the caller."""
        function, default = request.argument
        return await request.storage.update(request.key, _guard(request.key, function), default)

    async def _delete(self, request: StoreRequest) -> Any:
        return await request.storage.delete(request.key)

    async def _clear(self, request: StoreRequest) -> Any:
        await _clear_user_keys(request.storage)

    async def _commit_step(self, request: StoreRequest) -> Any:
        """A durable step's staged writes and its run record, all or nothing."""
        storage = request.storage
        staged, record, steps_before = request.argument
        ops = [_guarded(op) for op in staged]
        if await self._uncut(storage.commit_step(ops, request.key, record, steps_before)):
            return
        check_steps(request.key, await value_or(storage, request.key, None), steps_before)
        undo = _StoreUndo(storage)
        try:
            for op, key, argument in ops:
                await self._apply_staged(storage, undo, op, key, argument)
            await undo.remember(request.key)
            await storage.set(request.key, record)
        except Exception:
            await undo.restore()
            raise

    async def _forget(self, request: StoreRequest) -> Any:
        """Delete a run's record and its children's, and the parts (path chunks, places)
        of them all, once the check passed: in a transaction of the backend's own when
        it has one (``Storage.forget_record``), so that no other process changes the
        record between the check and the deletes; else here, putting back what was
        deleted if the backend refuses one delete."""
        storage = request.storage
        check = functools.partial(_refusing, request.argument, request.key)
        forgotten = await storage.forget_record(request.key, check)
        if forgotten is not None:
            return forgotten
        record = await value_or(storage, request.key, None)
        if record is None:
            return False
        check(record)
        keys = await stored_with(storage, request.key)
        undo = _StoreUndo(storage)
        try:
            for key in keys:
                await undo.remember(key)
                await storage.delete(key)
        except Exception:
            await undo.restore()
            raise
        return True

    async def _apply_staged(
        self, storage: Storage, undo: _StoreUndo, op: str, key: str, argument: Any
    ) -> None:
        """Apply one staged write of a durable step, remembering what it replaces (a
        clear's keys read with one ``get_many``)."""
        if op == "clear":
            stored = await _user_keys(storage)
            undo.remember_found(stored, await self._found(storage, stored))
        else:
            await undo.remember(key)
        await apply_step_op(storage, op, key, argument)

    async def _records(self, request: StoreRequest) -> Any:
        storage = request.storage
        return await self._found(storage, await storage.keys_with_prefix(RECORD_PREFIX))

    async def _found(self, storage: Storage, keys: list[str]) -> dict[str, Any]:
        """``storage.get_many(keys)``, checked: a StorageError naming this actor when
        the backend answers with no dict, or with keys it was not asked for (route
        conditions and run records are read this way: a wrong answer would route a run
        wrongly or hide it)."""
        found = await storage.get_many(keys)
        if not isinstance(found, dict):
            raise StorageError(
                f"{self.name}: get_many returned {with_article(type(found).__name__)}, not a dict"
            )
        extra = found.keys() - set(keys)
        if extra:
            raise StorageError(
                f"{self.name}: get_many returned keys it was not asked for: {sorted(extra)!r}"
            )
        return found


def _warn_unregistered(message: str) -> None:
    """Warn ``message`` (a RuntimeWarning of this module, shown or not as the warning
    filters say) without entering it in the module's warning registry, which keeps
    every message warned once for good: each message names a store and its error, so
    a long-lived engine whose stores fail to close would add one entry per store."""
    warnings.warn_explicit(message, RuntimeWarning, __file__, 0, module=__name__, registry=None)


async def _user_keys(storage: Storage) -> list[str]:
    """The keys a user sees: a persistent store's run records are hidden."""
    keys = await storage.keys()
    if not storage.persistent:
        return keys
    return [key for key in keys if not key.startswith(RESERVED_PREFIX)]


async def _clear_user_keys(storage: Storage) -> None:
    """Remove the keys a user sees: a persistent store's run records stay."""
    if not storage.persistent:
        await storage.clear()
        return
    await storage.delete_many(await _user_keys(storage))


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
        return _refusing(updated, key, function, value)

    return apply


class _StoreUndo:
    """What a multi-write request replaced, to put back if a later write is refused."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._previous: dict[str, Any] = {}

    async def remember(self, key: str) -> None:
        """Remember what ``key`` holds now, unless it is remembered already (one ``get``)."""
        if key not in self._previous:
            self._previous[key] = await value_or(self._storage, key, _ABSENT)

    def remember_found(self, keys: Iterable[str], found: dict[str, Any]) -> None:
        """Remember what ``keys`` hold now, as ``found``, a ``get_many`` of them, says: a
        key it leaves out is not stored. A key remembered already keeps what it was
        remembered with. Never blocks."""
        for key in keys:
            if key not in self._previous:
                self._previous[key] = found.get(key, _ABSENT)

    async def restore(self) -> None:
        """Put back every value remembered, and remove the keys that were not stored
        (with one ``delete_many``)."""
        absent: list[str] = []
        for key, old in self._previous.items():
            if old is _ABSENT:
                absent.append(key)
            else:
                await self._storage.set(key, old)
        await self._storage.delete_many(absent)


def _created_record(key: str, record: Any, stored: Any) -> Any:
    """``record``, to be stored under ``key`` where ``stored`` (None: nothing) is."""
    if stored is not None:
        run_id = key.removeprefix(RECORD_PREFIX)
        raise RunConflictError(
            f"run {run_id!r}: another engine started it first (its record appeared in "
            "the store meanwhile); continue it with engine.resume"
        )
    return record


class _Refused(Exception):
    """Carries an error meant for the requester out of a backend call."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


def _refusing(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, a function of the requester's (an update function, a
    record check): what it raises leaves as _Refused, for the requester, a
    ``sys.exit()`` too; only a KeyboardInterrupt (the operator's) goes on up."""
    try:
        return function(*args)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise _Refused(exc) from None


_ABSENT: Final[Any] = object()
"""Marks a key that is not stored: one a multi-write request found absent, or one a
memory handler looked up in vain."""


async def _read(storage: Storage, key: str, default: Any) -> Any:
    """The value of ``key``, else ``default``; StoreKeyError when there is no default."""
    try:
        return await storage.get(key)
    except KeyError:
        if default is MISSING:
            raise StoreKeyError(key) from None
        return default


# The handlers of memory storage: dict operations that never wait, used by direct
# dispatch and by the actor's own task alike. Each takes (data, key, argument).


def _memory_get(data: dict[str, Any], key: str, default: Any) -> Any:
    # .get, not [], so that a defaultdict given as data does not create the key.
    value = data.get(key, _ABSENT)
    if value is not _ABSENT:
        return value
    if default is MISSING:
        raise StoreKeyError(key)
    return default


def _memory_set(data: dict[str, Any], key: str, value: Any) -> None:
    data[key] = value


def _memory_update(data: dict[str, Any], key: str, argument: Any) -> Any:
    function, default = argument
    value = data.get(key, default)
    if value is MISSING:
        raise StoreKeyError(key)
    new = _refusing(updated, key, function, value)
    data[key] = new
    return new


def _memory_delete(data: dict[str, Any], key: str, _: Any) -> bool:
    return data.pop(key, _ABSENT) is not _ABSENT


def _memory_get_many(data: dict[str, Any], _: str, keys: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key in keys:
        value = data.get(key, _ABSENT)
        if value is not _ABSENT:
            found[key] = value
    return found


def _memory_set_many(data: dict[str, Any], _: str, items: dict[str, Any]) -> None:
    data.update(items)


def _memory_clear(data: dict[str, Any], _: str, __: Any) -> None:
    data.clear()


def _memory_forget(data: dict[str, Any], key: str, check: Callable[[str, Any], None]) -> bool:
    if key not in data:
        return False
    _refusing(check, key, data[key])
    for forgotten in forgotten_with(key, data):
        del data[forgotten]
    return True


_MEMORY: Final[dict[StoreOp, Callable[[dict[str, Any], str, Any], Any]]] = {
    StoreOp.GET: _memory_get,
    StoreOp.CONTAINS: lambda data, key, _: key in data,
    StoreOp.KEYS: lambda data, _, __: list(data),
    StoreOp.SIZE: lambda data, _, __: len(data),
    StoreOp.GET_MANY: _memory_get_many,
    StoreOp.SET: _memory_set,
    StoreOp.SET_MANY: _memory_set_many,
    StoreOp.UPDATE: _memory_update,
    StoreOp.DELETE: _memory_delete,
    StoreOp.CLEAR: _memory_clear,
    StoreOp.FORGET: _memory_forget,
    StoreOp.RECORDS: lambda data, _, __: {
        key: value for key, value in data.items() if key.startswith(RECORD_PREFIX)
    },
}
"""The memory handlers by operation (no COMMIT_STEP: a memory store holds no durable
run, so a step is never committed there)."""
