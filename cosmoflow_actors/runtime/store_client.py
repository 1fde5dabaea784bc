"""SharedStore: the handle node code uses to reach a run's storage.

Every call is a request to the store actor that owns the backend (see
:mod:`cosmoflow_actors.runtime.store_actor`): handled at once in the caller's task when
that actor is idle and its handler never waits (memory storage), otherwise queued in
its mailbox and answered after the actor's next commit. Nothing is sent before the call
is awaited, so a call never awaited changes nothing; inside a step it fails the step's
run (see :func:`unawaited`).

A durable run's step gets a :class:`StagedStore`: its writes are kept back and reach the
store together with the step's record, all or nothing.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import CoroutineType, GenericAlias
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, final, overload

import msgspec

from cosmoflow_actors.errors import StorageError, StoreKeyError, StoreTypeError, StoreValueError
from cosmoflow_actors.runtime.messages import StoreOp
from cosmoflow_actors.storage.base import RESERVED_PREFIX, StagedOp, check_user_key
from cosmoflow_actors.storage.codec import CODECS, Codec, check_key
from cosmoflow_actors.storage.memory import MemoryStorage

if TYPE_CHECKING:
    from cosmoflow_actors.storage.base import Storage

T = TypeVar("T")
D = TypeVar("D")
Call = Coroutine[Any, Any, T]
"""What a store method returns: a coroutine that does the call when awaited."""


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final[Any] = _Missing()
"""Marks an absent default."""

_NOT_STORED: Final[Any] = object()
"""What a typed get asks for in place of a missing key's value: never a stored value,
so a stored object that happens to be the default is still converted."""

FORGET_AT: Final = 64
"""Calls a step handle remembers before it forgets those that have started."""


class StoreService(Protocol):
    """What a SharedStore sends its calls to: the store actor (or :class:`Unreachable`)."""

    async def request(self, op: StoreOp, storage: Storage, key: str, argument: Any) -> Any:
        """Have ``op`` done on ``storage``; return its answer or raise its error."""


class Unreachable:
    """The service of a detached handle: every call raises StorageError naming the
    store (exec in a thread, a process or on Ray has no store access)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def request(self, op: StoreOp, storage: Storage, key: str, argument: Any) -> Any:
        """Raise StorageError. Never blocks."""
        raise StorageError(f"{self.name} is not reachable here: use the store in prep and post")


class SharedStore:
    """A run's view of its storage; all access goes through the store actor.

    Values are returned as the backend holds them: the same objects for memory storage,
    fresh decoded copies for persistent storage. Every method returns a coroutine and
    does nothing until it is awaited. A call handled directly (an idle memory store
    actor) is not a checkpoint; one that goes through the mailbox blocks while the
    mailbox is full and until the actor has committed it.
    """

    __slots__ = ("_forget_at", "_made", "_service", "_storage", "name")

    def __init__(
        self,
        service: StoreService,
        storage: Storage,
        name: str,
        made: list[Coroutine[Any, Any, Any]] | None = None,
    ) -> None:
        self._service = service
        self._storage = storage
        self._made = made
        self._forget_at = FORGET_AT
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (for a worker process) it becomes a detached handle."""
        return (_unpickled, (self.name,))

    def _call(self, op: StoreOp, key: str, argument: Any) -> Call[Any]:
        """The coroutine of one request to the service (it does nothing until awaited),
        remembered in a step handle."""
        return self._made_now(self._service.request(op, self._storage, key, argument))

    def _made_now(self, call: Call[T]) -> Call[T]:
        """Remember ``call`` in a step handle; return it unchanged."""
        made = self._made
        if made is not None:
            made.append(call)
            if len(made) >= self._forget_at:
                self._forget_started(made)
        return call

    def _forget_started(self, made: list[Coroutine[Any, Any, Any]]) -> None:
        """Forget the remembered calls that have started (none of them can be lost any
        more), so that a phase making many calls keeps few of them; the next time comes
        when the handle remembers twice as many as it keeps now. Never blocks."""
        made[:] = [call for call in made if _never_started(call)]
        self._forget_at = max(FORGET_AT, 2 * len(made))

    @overload
    def get(self, key: str, default: Any = ..., *, type: None = None) -> Call[Any]: ...

    @overload
    def get(self, key: str, *, type: builtins.type[T]) -> Call[T]: ...

    @overload
    def get(self, key: str, default: D, *, type: builtins.type[T]) -> Call[T | D]: ...

    # Any other typing form (int | None, Optional[int], Literal["a", "b"]): not a
    # builtins.type, so the value is typed Any.
    @overload
    def get(self, key: str, default: Any = ..., *, type: object) -> Call[Any]: ...

    def get(self, key: str, default: Any = MISSING, *, type: Any = None) -> Call[Any]:
        """Return the value of ``key``, or ``default`` when it is missing.

        Raises StoreKeyError when it is missing and there is no default. With ``type=T``
        the value is returned as a ``T`` (a dataclass is rebuilt from its JSON form) or
        StoreTypeError is raised; the default is returned as it is. A typing form that
        is not a class (``int | None``, ``Literal["a", "b"]``) works the same, but type
        checkers see its value as ``Any``. A ``type=`` the codec cannot convert to
        (``type="int"``) raises TypeError here, at the call.
        """
        check_key(key)
        if type is None:
            return self._call(StoreOp.GET, key, default)
        _check_type(type)
        return self._made_now(self._typed_get(key, default, type))

    def set(self, key: str, value: Any) -> Call[None]:
        """Store ``value`` under ``key``; return once the write is committed (in a
        durable run's step: once it is staged, to be committed with the step).

        Raises:
            TypeError: at the call, ``key`` is not a str.
            StorageError: at the call, ``key`` is under ``__cosmoflow__/`` (the
                engine's); when awaited, the commit failed.
            StoreValueError: the store's codec refuses ``value``; nothing is stored
                (in a durable run's step, the step's commit fails instead).
        """
        check_user_key(key)
        return self._call(StoreOp.SET, key, value)

    def update(self, key: str, function: Callable[[Any], T], default: Any = MISSING) -> Call[T]:
        """Atomically replace the value of ``key`` with ``function(value)``; return it.

        ``function`` is a plain (sync) function, run inside the store actor: no other
        access to this store happens in between. A missing key uses ``default``, or
        raises StoreKeyError when there is none. An error ``function`` raises is raised
        here and nothing is stored. In a durable run's step the update is staged: the
        value returned is ``function`` of what the step sees, and at the step's commit
        ``function`` is applied again, in the store actor, to the value stored then, so
        concurrent updates are never lost (``function`` must be pure).

        Raises:
            TypeError: at the call, ``key`` is not a str; when awaited, ``function``
                returned an awaitable (an ``async def``): nothing is stored.
            StorageError: at the call, ``key`` is under ``__cosmoflow__/``; when
                awaited, the commit failed.
            StoreValueError: the store's codec refuses the new value; nothing is
                stored (in a durable run's step, the step's commit fails instead).
        """
        check_user_key(key)
        return self._call(StoreOp.UPDATE, key, (function, default))

    def delete(self, key: str) -> Call[bool]:
        """Remove ``key``; return whether it was there.

        Raises:
            TypeError: at the call, ``key`` is not a str.
            StorageError: at the call, ``key`` is under ``__cosmoflow__/``; when
                awaited, the commit failed.
        """
        check_user_key(key)
        return self._call(StoreOp.DELETE, key, None)

    def contains(self, key: str) -> Call[bool]:
        """Return whether ``key`` is stored."""
        check_key(key)
        return self._call(StoreOp.CONTAINS, key, None)

    def keys(self) -> Call[list[str]]:
        """Return every key outside ``__cosmoflow__/`` (the run records)."""
        return self._call(StoreOp.KEYS, "", None)

    def size(self) -> Call[int]:
        """Return the number of keys outside ``__cosmoflow__/``."""
        return self._call(StoreOp.SIZE, "", None)

    def clear(self) -> Call[None]:
        """Remove every key outside ``__cosmoflow__/`` (the run records stay)."""
        return self._call(StoreOp.CLEAR, "", None)

    def get_many(self, keys: Iterable[str]) -> Call[dict[str, Any]]:
        """Return ``{key: value}`` for those of ``keys`` that are stored (one request).

        Raises:
            TypeError: at the call, ``keys`` is a str or bytes (not a list of keys),
                or holds a key that is not a str.
        """
        if isinstance(keys, str | bytes):
            raise TypeError(
                f"get_many(keys) takes a list of keys, not a {builtins.type(keys).__name__} "
                f"({keys!r}): pass [{keys!r}]"
            )
        wanted = list(keys)
        for key in wanted:
            check_key(key)
        return self._call(StoreOp.GET_MANY, "", wanted)

    def set_many(self, mapping: Mapping[str, Any]) -> Call[None]:
        """Store every item in one request, all or nothing.

        Raises:
            TypeError: at the call, a key is not a str.
            StorageError: at the call, a key is under ``__cosmoflow__/``; when awaited,
                the commit failed.
            StoreValueError: the store's codec refuses a value; nothing is stored
                (in a durable run's step, the step's commit fails instead).
        """
        items = dict(mapping)
        for key in items:
            check_user_key(key)
        return self._call(StoreOp.SET_MANY, "", items)

    async def _typed_get(self, key: str, default: Any, expected: Any) -> Any:
        """The value of ``key`` as ``expected``; ``default``, as it is, for a missing
        key (StoreKeyError when it is MISSING)."""
        absent = MISSING if default is MISSING else _NOT_STORED
        value = await self._service.request(StoreOp.GET, self._storage, key, absent)
        if value is _NOT_STORED:
            return default
        return as_type(key, value, expected)

    def __repr__(self) -> str:
        return f"<SharedStore {self.name}>"


def step_handle(store: SharedStore) -> SharedStore:
    """A handle on ``store``'s storage that remembers the calls made through it, for
    :func:`all_awaited` (one per step)."""
    return SharedStore(store._service, store._storage, store.name, [])


def all_awaited(store: SharedStore) -> bool:
    """Whether every call made through the step handle ``store`` since the last check
    has been awaited (a call still running counts as awaited); if so, forget them.

    Always true for a handle that does not remember its calls. Never blocks.
    """
    made = store._made
    if not made:
        return True
    for call in made:
        if _never_started(call):
            return False
    made.clear()
    return True


def unawaited(store: SharedStore) -> tuple[list[str], list[str]]:
    """The calls made through the step handle ``store`` since the last check that were
    never awaited, described as ``"set('k')"``: those made through it, and those handed
    over to it (see :func:`hand_over`), made where the store is not reachable. Each is
    closed (it will never run), and all are forgotten. Never blocks."""
    here: list[str] = []
    away: list[str] = []
    for op, key, unreachable in _lost(store):
        (away if unreachable else here).append(_described(op.name, key))
    return here, away


def detached(store: SharedStore) -> SharedStore:
    """A handle on ``store``'s storage that refuses every call (for exec in a thread,
    a process or on Ray) and remembers the calls made through it, for
    :func:`lost_calls`."""
    return SharedStore(Unreachable(store.name), store._storage, store.name, [])


LostCall = tuple[str, str]
"""A store call never awaited, as ``(operation, key)``: ``("SET", "k")``; plain strings,
to be sent back from a worker process or a Ray task."""


def lost_calls(handle: SharedStore) -> list[LostCall]:
    """The calls made through ``handle`` (a step's, or a detached one) since the last
    check that were never awaited; each is closed (it will never run), and all are
    forgotten. Never blocks."""
    return [(op.name, key) for op, key, _ in _lost(handle)]


def _lost(handle: SharedStore) -> list[tuple[StoreOp, str, bool]]:
    """What :func:`lost_calls` finds, closes and forgets, each call as its operation,
    its key and whether it was made where the store is not reachable."""
    made = handle._made or []
    lost = [call for call in made if _never_started(call)]
    made.clear()
    found = [_call_of(call) for call in lost]
    for call in lost:
        call.close()
    return found


def hand_over(calls: Iterable[LostCall], step: SharedStore) -> None:
    """Have the step handle ``step`` remember ``calls``, lost by exec on a thread, a
    process or Ray, as calls made through it and never awaited, for the step's check
    (:func:`all_awaited`), which fails the step naming them as it does for an inline
    exec. Each is a coroutine of a request that refuses, never started. Never blocks."""
    if step._made is None:
        return
    unreachable = Unreachable(step.name)
    for op, key in calls:
        _ = step._made_now(unreachable.request(StoreOp[op], _NOWHERE, key, None))


@final
class StagedStore(SharedStore):
    """The handle of a durable run's step: its requests go to a :class:`Staging` that
    keeps its writes back (:attr:`ops`) until the node actor commits the step with the
    run's record; its reads see them."""

    __slots__ = ("ops",)

    def __init__(self, base: SharedStore) -> None:
        staging = Staging(base._service)
        super().__init__(staging, base._storage, base.name, [])
        self.ops = staging.ops
        """The staged writes, in order."""

    def end(self, step: str) -> None:
        """Refuse every later call, with a StorageError naming ``step`` (``"node 'n'
        of run 'r'"``): the step has ended, and a write staged now would be committed
        with no step. Never blocks."""
        assert isinstance(self._service, Staging)
        self._service.ended = (
            f"the store handle of the durable step at {step} is closed: the step has "
            "ended, and a call through it now would belong to no step; use the store in "
            "prep and post, or engine.open_store outside a step"
        )


@final
class Staging:
    """The service of a durable step's handle: writes are staged, in order, and reads
    see them; reads of keys the step has not written go to ``service``.

    A value is staged as the backend will hold it: encoded by its codec, so that every
    read returns a fresh decoded copy and the commit stores the value as it was when it
    was set, as in a step that is not durable. A value the codec cannot encode is kept
    as it is, for the step's commit to refuse (see docs/durability.md), and so is every
    value of a backend without a codec.
    """

    @final
    class _Encoded:
        """A staged value as the backend will hold it."""

        __slots__ = ("codec", "data")

        def __init__(self, codec: Codec, data: bytes) -> None:
            self.codec = codec
            self.data = data

    def __init__(self, service: StoreService) -> None:
        self._service = service
        self._values: dict[str, Any] = {}
        self._cleared = False
        self.ops: list[StagedOp] = []
        self.ended: str | None = None
        """Why every request is refused, once the step has ended (see
        :meth:`StagedStore.end`)."""

    async def request(self, op: StoreOp, storage: Storage, key: str, argument: Any) -> Any:
        """Stage a write, or answer a read from the staged writes and the store.
        Blocks only while a read waits for the store. Raises StorageError once the
        step has ended."""
        if self.ended is not None:
            raise StorageError(self.ended)
        handler = _STAGED[op]
        return await handler(self, storage, key, argument)

    def _lookup(self, key: str) -> Any:
        """The staged value, _ABSENT if the step removed it, else _UNKNOWN. A clear
        removes no key under RESERVED_PREFIX (the engine's records), as its commit does
        not."""
        if key in self._values:
            return self._values[key]
        return _ABSENT if self._cleared and not key.startswith(RESERVED_PREFIX) else _UNKNOWN

    def _stage(self, op: StagedOp, key: str, value: Any) -> None:
        self.ops.append(op)
        self._values[key] = value

    @staticmethod
    def _held(storage: Storage, key: str, value: Any) -> Any:
        """``value`` encoded as ``storage`` will hold it, if its codec (the one its
        ``codec`` attribute names) can encode it; else ``value`` itself."""
        name = getattr(storage, "codec", None)
        codec = CODECS.get(name) if isinstance(name, str) else None
        if codec is None:
            return value
        try:
            return Staging._Encoded(codec, codec.encode(key, value))
        except StoreValueError:
            return value

    @staticmethod
    def _fresh(held: Any) -> Any:
        """A staged value as a read returns it: a fresh copy of an encoded one."""
        if isinstance(held, Staging._Encoded):
            return held.codec.decode(held.data)
        return held

    async def _get(self, storage: Storage, key: str, default: Any) -> Any:
        staged = self._lookup(key)
        if staged is _UNKNOWN:
            return await self._service.request(StoreOp.GET, storage, key, default)
        if staged is not _ABSENT:
            return self._fresh(staged)
        if default is MISSING:
            raise StoreKeyError(key)
        return default

    async def _set(self, storage: Storage, key: str, value: Any) -> None:
        held = self._held(storage, key, value)
        self._stage(("set", key, self._fresh(held)), key, held)

    async def _update(self, storage: Storage, key: str, argument: Any) -> Any:
        function, default = argument
        new = updated(key, function, await self._get(storage, key, default))
        self._stage(("update", key, argument), key, self._held(storage, key, new))
        return new

    async def _delete(self, storage: Storage, key: str, _: Any) -> bool:
        existed = await self._contains(storage, key, None)
        self._stage(("delete", key, None), key, _ABSENT)
        return existed

    async def _contains(self, storage: Storage, key: str, _: Any) -> bool:
        staged = self._lookup(key)
        if staged is _UNKNOWN:
            found: bool = await self._service.request(StoreOp.CONTAINS, storage, key, None)
            return found
        return staged is not _ABSENT

    async def _keys(self, storage: Storage, _: str, __: Any) -> list[str]:
        """The stored keys with the staged writes replayed over them, in the order the
        commit leaves them: a key set anew goes to the end, as in a ``dict``."""
        stored: list[str] = []
        if not self._cleared:
            stored = await self._service.request(StoreOp.KEYS, storage, "", None)
        keys = dict.fromkeys(stored)
        for kind, key, _argument in self.ops:
            if kind == "clear":
                keys.clear()
            elif kind == "delete":
                keys.pop(key, None)
            else:
                keys.setdefault(key)
        return list(keys)

    async def _size(self, storage: Storage, _: str, __: Any) -> int:
        return len(await self._keys(storage, "", None))

    async def _clear(self, storage: Storage, _: str, __: Any) -> None:
        self.ops.append(("clear", "", None))
        self._values.clear()
        self._cleared = True

    async def _get_many(self, storage: Storage, _: str, keys: list[str]) -> dict[str, Any]:
        unknown = [key for key in keys if self._lookup(key) is _UNKNOWN]
        stored: dict[str, Any] = {}
        if unknown:
            stored = await self._service.request(StoreOp.GET_MANY, storage, "", unknown)
        found: dict[str, Any] = {}
        for key in keys:
            value = self._lookup(key)
            if value is _UNKNOWN and key in stored:
                found[key] = stored[key]
            elif value is not _UNKNOWN and value is not _ABSENT:
                found[key] = self._fresh(value)
        return found

    async def _set_many(self, storage: Storage, _: str, items: dict[str, Any]) -> None:
        for key, value in items.items():
            await self._set(storage, key, value)


_STAGED: Final[dict[StoreOp, Callable[..., Coroutine[Any, Any, Any]]]] = {
    StoreOp.GET: Staging._get,
    StoreOp.CONTAINS: Staging._contains,
    StoreOp.KEYS: Staging._keys,
    StoreOp.SIZE: Staging._size,
    StoreOp.GET_MANY: Staging._get_many,
    StoreOp.SET: Staging._set,
    StoreOp.SET_MANY: Staging._set_many,
    StoreOp.UPDATE: Staging._update,
    StoreOp.DELETE: Staging._delete,
    StoreOp.CLEAR: Staging._clear,
}
"""How a :class:`Staging` answers each request a step's handle makes."""


_NOWHERE: Final = MemoryStorage()
"""The storage of an unpickled detached handle, which no call reaches."""

_ABSENT: Final[Any] = object()
_UNKNOWN: Final[Any] = object()


def updated(key: str, function: Callable[[Any], T], value: Any) -> T:
    """``function(value)``: the new value an update of ``key`` stores. TypeError when
    it is awaitable (``function`` is an ``async def``; its coroutine is closed unrun):
    an update never stores a coroutine. Never blocks."""
    new = function(value)
    if inspect.isawaitable(new):
        if inspect.iscoroutine(new):
            new.close()
        raise TypeError(
            f"the update function of key {key!r} returned an awaitable "
            f"({type(new).__name__}): it must be a plain def returning the new value"
        )
    return new


def _unpickled(name: str) -> SharedStore:
    """A detached handle on the store ``name`` (what a pickled SharedStore becomes),
    which remembers the calls made through it (see :func:`lost_calls`)."""
    return SharedStore(Unreachable(name), _NOWHERE, name, [])


_CONVERTIBLE: Final[dict[Any, None]] = {}
"""The types :func:`_check_type` has found the codec can convert to (at most
:data:`_CONVERTIBLE_KEPT`)."""
_CONVERTIBLE_KEPT: Final = 256


def _check_type(expected: Any) -> None:
    """Raise TypeError naming ``type=`` and ``expected`` when msgspec cannot convert a
    value to ``expected`` (not a type, or one it does not support), from msgspec's
    reason. A hashable type found convertible is remembered: checked again, it costs a
    dict lookup. Never blocks."""
    try:
        if expected in _CONVERTIBLE:
            return
    except TypeError:  # unhashable (an Annotated type with a list in its metadata)
        pass
    try:
        msgspec.json.Decoder(expected)
    except TypeError as exc:
        raise TypeError(
            f"type={expected!r} is not a type the store can convert a value to: pass a "
            "class (int, a dataclass) or a typing form (list[int], int | None)"
        ) from exc
    with contextlib.suppress(TypeError):
        if len(_CONVERTIBLE) < _CONVERTIBLE_KEPT:
            _CONVERTIBLE[expected] = None


def as_type(key: str, value: Any, expected: Any) -> Any:
    """Return ``value`` as an ``expected``; raise StoreTypeError naming ``key`` if it is not."""
    if _is_already(value, expected):
        return value
    try:
        return msgspec.convert(value, expected, str_keys=True)
    except (msgspec.ValidationError, TypeError) as exc:
        detail = str(exc) if isinstance(exc, msgspec.ValidationError) else None
        actual = _type_name(type(value))
        raise StoreTypeError(key, _type_name(expected), actual, detail) from exc


def _is_already(value: Any, expected: Any) -> bool:
    """Whether ``value`` is an instance of the class ``expected`` as msgspec's
    conversion takes one, returned as it is: a bool is no int nor float for it; a
    typing form that ``isinstance`` refuses (a TypedDict, Any) is left to msgspec."""
    if not isinstance(expected, type) or (type(value) is bool and expected is not bool):
        return False
    try:
        return isinstance(value, expected)
    except TypeError:
        return False


def _type_name(kind: Any) -> str:
    """A class's name; the form written in code of anything else (``tuple[int, int]``,
    ``int | None``)."""
    if isinstance(kind, type) and not isinstance(kind, GenericAlias):
        return kind.__qualname__
    return repr(kind)


def _never_started(call: Coroutine[Any, Any, Any]) -> bool:
    """Whether ``call`` was never awaited. A call that ran to its end has no frame left,
    so only the others need a look."""
    return (
        getattr(call, "cr_frame", None) is not None
        and inspect.getcoroutinestate(call) == "CORO_CREATED"
    )


def _described(op: str, key: str) -> str:
    """``"set('k')"`` for a store call of the operation named ``op`` on ``key``."""
    name = op.lower()
    return f"{name}({key!r})" if key else f"{name}()"


def _call_of(call: Coroutine[Any, Any, Any]) -> tuple[StoreOp, str, bool]:
    """The operation, the key (``""`` for none) and whether it is a request to an
    :class:`Unreachable` of the coroutine of a store call never started: a request to
    the handle's service, or a typed get."""
    assert isinstance(call, CoroutineType) and call.cr_frame is not None
    arguments = call.cr_frame.f_locals
    op: StoreOp = arguments.get("op", StoreOp.GET)
    key: str = arguments.get("key") or ""
    return op, key, isinstance(arguments.get("self"), Unreachable)
