"""The engine's store actors: one per storage backend in use, shared by its runs.

Every memory storage is served by one engine-wide actor (``Storage.shared_actor``),
started on first use and kept until the engine closes; any other backend gets an actor
of its own, started (and its backend opened) on first use and retired when its last
user is done. A later user of a retiring backend waits
for the old actor to exit, so two actors never serve one backend at once; so does the
first user of another instance over the same file (``storage.path``), whose opening
must see the old actor's last commit. An instance with an actor of its own serves one
engine at a time: another engine's start on it is refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.runtime.cancellation import refuse_closed
from cosmoflow_actors.runtime.store_actor import StoreActor
from cosmoflow_actors.storage.base import Storage
from cosmoflow_actors.storage.memory import MemoryStorage

Supervise = Callable[..., Awaitable[None]]
"""The engine's supervisor: ``await supervise(actor)``."""

_SERVED_BY: dict[int, StoreRegistry] = {}
"""The registry (engine) whose actor serves each storage instance with an actor of its
own, by ``id``: the actor holds the instance until its entry goes, so the id stays its."""


def as_storage(store: Storage | dict[str, Any] | None) -> Storage:
    """The Storage a run uses: a dict (in place) or None (fresh) is memory storage."""
    if store is None or isinstance(store, dict):
        return MemoryStorage(store)
    require_storage(store)
    return store


def require_storage(store: object) -> None:
    """Raise TypeError unless ``store`` is what a run may be given: a Storage, a dict
    or None."""
    if store is not None and not isinstance(store, Storage | dict):
        raise TypeError(f"store must be a Storage, a dict or None, got {type(store).__name__}")


class StoreRegistry:
    """Starts, shares and retires store actors in the engine's nursery.

    Every :meth:`acquire` or :meth:`acquire_nowait` that returns an actor is matched by
    one :meth:`release`.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        mailbox_size: int,
        supervise: Supervise,
        closing: Callable[[], None],
    ) -> None:
        self._nursery = nursery
        self._mailbox_size = mailbox_size
        self._supervise = supervise
        self._closing = closing
        """The engine's close, for every actor to call when it is cancelled (see
        :meth:`StoreActor.run`)."""
        self._actors: dict[object, StoreActor] = {}

    def actors(self) -> Iterable[StoreActor]:
        """The store actors alive now."""
        return self._actors.values()

    def bound_closing(self) -> None:
        """The engine is closing: bound the backend commits and closes of every store
        actor (see :meth:`StoreActor.bound_closing`). Never blocks."""
        for actor in self._actors.values():
            actor.bound_closing()

    async def acquire(self, storage: Storage) -> StoreActor:
        """The actor serving ``storage``, started if needed.

        Blocks while the actor opens its backend (or an old one retires); raises
        StorageError if the backend cannot be opened. The actor starts in the engine's
        nursery and opens whatever becomes of the caller: a caller cancelled while it
        opens gives up its use, and the runs waiting with it still get the actor.
        """
        key = _key(storage)
        while (old := self._in_the_way(key, storage)) is not None:
            await old.exited.wait()
        actor = self._actors.get(key)
        if actor is None:
            actor = self._new(key, storage)
            self._nursery.start_soon(self._run, actor, key)
        # Counted before the wait below, so that no other run's release retires it
        # while this one waits for it.
        actor.users += 1
        try:
            if not actor.opened.is_set():
                await actor.opened.wait()
        except BaseException:
            self.release(actor)
            raise
        if not actor.serving:
            self.release(actor)
            if actor.open_error is None:  # the engine closed first
                await refuse_closed(actor.open_failure())
            raise actor.open_failure()
        return actor

    def acquire_nowait(self, storage: Storage) -> StoreActor:
        """Like :meth:`acquire` without waiting: a memory actor is started at once.

        Raises trio.WouldBlock when a backend that must be opened has no actor serving.
        """
        key = _key(storage)
        actor = self._actors.get(key)
        if storage.shared_actor:
            if actor is None:
                actor = self._new(key, storage)
                self._nursery.start_soon(self._run, actor, key)
        elif actor is None or not actor.serving or actor.retiring:
            raise trio.WouldBlock(f"{storage!r} has no store actor open yet; use start_run")
        actor.users += 1
        return actor

    def release(self, actor: StoreActor) -> None:
        """One use of ``actor`` ended; the last one retires it, unless it is the shared
        actor (it has no backend to close: it serves until the engine closes, so a
        stream of runs never waits for it to restart). Never blocks."""
        actor.users -= 1
        if actor.users == 0 and not actor.shared:
            actor.retire()

    def _in_the_way(self, key: object, storage: Storage) -> StoreActor | None:
        """A retiring actor that must exit before ``storage`` is served: its own old one,
        or that of another instance over the same file (``storage.path``), whose last
        commit may still be landing (one its cancelled runs were waiting for)."""
        actor = self._actors.get(key)
        if actor is not None:
            return actor if actor.retiring else None
        path = getattr(storage, "path", None)
        if path is None:
            return None
        for other in self._actors.values():
            if other.retiring and other.path == path:
                return other
        return None

    def _new(self, key: object, storage: Storage) -> StoreActor:
        """A new actor for ``storage``. Raises StorageError when another engine's actor
        serves the instance: two actors would interleave its staged writes."""
        if storage.shared_actor:
            actor = StoreActor("store:memory", self._mailbox_size, closing=self._closing)
        else:
            if _SERVED_BY.setdefault(id(storage), self) is not self:
                raise StorageError(
                    f"{_describe(storage)} is in use by another engine; give each engine "
                    "its own instance (an instance serves one engine at a time)"
                )
            name = f"store:{_describe(storage)}"
            actor = StoreActor(name, self._mailbox_size, storage, closing=self._closing)
        self._actors[key] = actor
        return actor

    async def _run(self, actor: StoreActor, key: object) -> None:
        try:
            await self._supervise(actor)
        finally:
            if self._actors.get(key) is actor:
                del self._actors[key]
            if key is not MemoryStorage:
                del _SERVED_BY[id(key)]


def _key(storage: Storage) -> object:
    """Storages with the same key share a store actor: every memory one, or each other."""
    return MemoryStorage if storage.shared_actor else storage


def _describe(storage: Storage) -> str:
    """The storage's own repr if it has one (a path, a URL), else class and address."""
    if type(storage).__repr__ is not object.__repr__:
        return repr(storage)
    return f"{type(storage).__name__}@{id(storage):x}"
