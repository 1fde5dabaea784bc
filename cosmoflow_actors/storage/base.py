"""The storage backend contract.

A backend is owned by exactly one store actor at a time: the actor calls these methods
one at a time, in mailbox order, so a backend needs no locking of its own. Node code
never calls a backend directly; it goes through :class:`cosmoflow_actors.SharedStore`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Final

from cosmoflow_actors.errors import RunConflictError, StorageError, with_article
from cosmoflow_actors.storage.codec import check_key

RESERVED_PREFIX: Final = "__cosmoflow__/"
"""Keys under this prefix belong to the engine (durable run records and their parts)."""

RECORD_PREFIX: Final = RESERVED_PREFIX + "runs/"
"""A durable run's record is stored under this prefix followed by its run id."""

PARTS_PREFIX: Final = RESERVED_PREFIX + "parts/"
"""A durable run's parts kept beside its record are stored under this prefix followed by
its run id: the sealed chunks of its path (``__cosmoflow__/parts/job/path/0``, see
:func:`path_chunk_key`) and the places of its branches and fan-outs in flight
(``__cosmoflow__/parts/job/at/3``, see :func:`place_key`); outside
:data:`RECORD_PREFIX`, so that no listing of records meets them."""

StagedOp = tuple[str, str, Any]
"""A write staged by a durable step: ("set", key, value), ("delete", key, None),
("update", key, (function, default)) or ("clear", "", None)."""


class Storage(ABC):
    """Abstract storage backend: a mapping from ``str`` keys to values.

    Required: :meth:`get`, :meth:`set`, :meth:`delete`, :meth:`keys`. The rest have
    defaults built on those. Every method may block only by awaiting (run blocking I/O
    with ``trio.to_thread``); each is a checkpoint only if the backend awaits.

    Errors: a :class:`~cosmoflow_actors.StorageError` fails only the requests concerned
    (``KeyError`` from :meth:`get` means a missing key). Any other exception is taken
    as a bug of the backend: it fails the request that met it too, as a StorageError
    that names the store actor and the operation and says what the backend raised (the
    cause), and the engine goes on. So a backend wraps its I/O errors (``raise
    StorageError(...) from exc``, with a message that names the store, its file or
    server, and the key when there is one: the run that fails gets it as it is), and
    never lets a key it cannot use escape as another error: a ``str`` holding a lone
    surrogate is a key like any other (``key.encode()`` raises ``UnicodeEncodeError``
    for it; ``key.encode("utf-8", "surrogatepass")`` does not), and a key another
    client stored that is no ``str`` (bytes that are not UTF-8) is a StorageError
    naming it.

    The engine also reads two optional attributes, when a backend has them:

    - ``path``: the file or directory the data lives in. A new instance whose ``path``
      equals that of an instance whose store actor is still closing waits until it has
      closed (its last commit may still be landing).
    - ``codec``: ``"json"`` or ``"pickle"``, the name of the library's own codec that
      the backend stores values with: ``"json"`` is msgspec JSON by the rules of
      docs/storage.md (bytes become a base64 ``str``, a tuple a list, NaN is refused),
      ``"pickle"`` is cloudpickle. A durable step then stages each value encoded with
      that codec, so a read within the step returns a fresh copy, and at the step's
      commit ``set`` gets the value as that codec decodes it (``b"\\x00hi"`` as the
      ``str`` ``"AGhp"``). A backend that encodes values any other way (the standard
      library's ``json`` module, say) leaves ``codec`` unset: a durable step then
      stages the objects themselves, a read within the step returns the very object it
      set, and ``set`` gets that object at the step's commit.
    """

    persistent: ClassVar[bool] = False
    """True for a backend whose commits survive the process (file, SQLite, Redis): runs
    given a ``run_id`` on it are durable (see docs/durability.md). Set it only when
    :meth:`commit` is all or nothing, since a durable step is one commit.

    On a persistent backend the engine keeps its run records under
    :data:`RESERVED_PREFIX` and hides them from node code: it counts and clears the
    user's keys itself with :meth:`keys` and :meth:`delete_many`, so the backend's own
    :meth:`size` and :meth:`clear` are not called (a faster override of them is
    unused)."""

    shared_actor: ClassVar[bool] = False
    """True for a volatile backend that needs no :meth:`open`, never awaits and never
    fails a commit: one engine-wide store actor then serves every instance (memory).
    False: each instance gets a store actor of its own."""

    async def open(self) -> None:  # noqa: B027 (an optional hook; no-op by default)
        """Prepare the backend (for example load a file); called before first use.

        The store actor calls it before it reports ready; it must be idempotent, and it
        must work again after :meth:`aclose` (the engine opens a storage again for a
        later run). Raises :class:`~cosmoflow_actors.StorageError` when the data cannot
        be read; any other error fails the runs waiting for the backend too (as a
        StorageError saying what ``open`` raised), not the engine.
        """

    @abstractmethod
    async def get(self, key: str) -> Any:
        """Return the value of ``key``; raise ``KeyError`` when it is missing."""

    @abstractmethod
    async def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``.

        A value the backend cannot encode raises
        :class:`~cosmoflow_actors.StoreValueError` ``(key, problem)`` (a StorageError
        naming the key: a durable run then fails naming the node and the key, and a run
        queue does not hand the run to another worker) and stores nothing. The write is
        durable once :meth:`commit` returns.
        """

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""

    @abstractmethod
    async def keys(self) -> list[str]:
        """Return every key, in insertion order where the backend keeps one.

        Insertion order is a ``dict``'s: a key set again keeps its place; a key deleted
        (or cleared) and then set again goes to the end.
        """

    async def keys_with_prefix(self, prefix: str) -> list[str]:
        """Return the keys that start with ``prefix``, each once, in no set order.

        The engine lists its own keys with it, under :data:`RESERVED_PREFIX`: the run
        records (``list_runs``, with :data:`RECORD_PREFIX`), and what is forgotten with a
        run when the store actor forgets it (:func:`forgotten_prefixes`). The default
        filters :meth:`keys`, so it costs the whole store, user keys included; a backend
        that can find the keys under a prefix without meeting the others (a sorted index,
        a key range) overrides it to cost what it returns. An override gives what the
        default would, the writes since the last commit included, in any order.
        """
        return [key for key in await self.keys() if key.startswith(prefix)]

    async def contains(self, key: str) -> bool:
        """Return whether ``key`` is stored."""
        try:
            await self.get(key)
        except KeyError:
            return False
        return True

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        """Return ``{key: value}`` for those of ``keys`` that are stored, in their order.

        One :meth:`get` per key; a backend that can read several keys in one round trip
        overrides it.
        """
        found: dict[str, Any] = {}
        for key in keys:
            try:
                found[key] = await self.get(key)
            except KeyError:
                continue
        return found

    async def delete_many(self, keys: list[str]) -> None:
        """Remove those of ``keys`` that are stored.

        One :meth:`delete` per key, whose answer is not needed here; a backend whose
        :meth:`delete` asks its data whether the key is there (to say whether it was)
        overrides it to remove the keys without asking. The engine clears a
        :attr:`persistent` backend with it, and with it removes the keys a
        ``set_many`` or a durable step added when it has to put back what was there.
        """
        for key in keys:
            await self.delete(key)

    async def size(self) -> int:
        """Return the number of keys. Not called on a :attr:`persistent` backend (see
        there)."""
        return len(await self.keys())

    async def clear(self) -> None:
        """Remove every key. Not called on a :attr:`persistent` backend (see there)."""
        await self.delete_many(await self.keys())

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
        raise, and then nothing is stored); the ops after the step's writes may set
        or delete parts of the run under :data:`PARTS_PREFIX` (sealed chunks of its
        path, places of its branches; a fan-out's or a run's final commit may write
        many), applied like any other op. The record stored under ``record_key`` must
        still count ``steps_before`` completed steps: check it inside the transaction
        with :func:`check_steps`, which raises RunConflictError when another engine
        committed a step first, and then store nothing.

        Return False (the default) to let the store actor check the record and apply the
        ops with :meth:`get`, :meth:`set` and :meth:`delete` in its batch, which is
        atomic within one engine; an override that returns False must have changed
        nothing.

        Return True once the step is applied. The store actor then calls :meth:`commit`,
        as after any write: an override may stage the step's writes for that commit
        (``FileStorage``), or write them in a transaction of its own (``SQLiteStorage``).
        :func:`apply_step_op` applies one op with the backend's own ``get``, ``set``
        and ``delete``, and :func:`value_or` reads the record. On any error (the
        RunConflictError of :func:`check_steps`, a StorageError, or whatever an update's
        ``function`` raised) the override puts back what it staged and lets the error
        propagate unchanged: the store actor hands an update function's error to the
        run as it is, so wrapping it in a StorageError would change what the run sees.
        """
        return False

    async def forget_record(self, record_key: str, check: Callable[[Any], None]) -> bool | None:
        """Optionally forget a durable run as one transaction of the backend's own, atomic
        against other processes writing the same data.

        Read the run record stored under ``record_key`` (return False when there is
        none) and call ``check(record)``, which raises to keep it: let its error
        propagate unchanged, with nothing deleted. Then delete the record, those of the
        run's BatchFlow children and the parts of them all (:func:`forgotten_with`
        of the stored keys, or of those under :func:`forgotten_prefixes`), with
        no write of another process between the read and the deletes, so that the
        record deleted is the one checked (a resume elsewhere may have gone on with the
        run meanwhile), and return True. The store actor calls :meth:`commit` next, as
        after any write: an override may stage the deletes for it.

        Return None (as the default does, at once) to let the store actor read, check
        and delete with :meth:`get`, :meth:`keys_with_prefix` and :meth:`delete` in its
        batch, which is atomic within one engine; an override that returns None must
        have changed nothing.
        """
        return None

    async def commit(self) -> None:  # noqa: B027 (an optional hook; no-op by default)
        """Make every write since the last commit durable, all or nothing.

        The store actor calls it once per batch of writes it drained from its mailbox,
        before it answers any of them. On failure it raises
        :class:`~cosmoflow_actors.StorageError` and the backend returns to its last
        committed state. The default (a volatile backend) does nothing.
        """

    async def aclose(self) -> None:  # noqa: B027 (an optional hook; no-op by default)
        """Release resources (files, connections) and drop the writes never committed.

        The engine calls it when the last run using the storage ends. It must do nothing
        on an instance that is not open, and :meth:`open` must work again after it.
        Durability never depends on it: every commit is durable on its own. An error
        from it, StorageError or not, is a warning, not a crash. The default does nothing.
        """


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


_CHILD_SUFFIX: Final = r":(?:[0-9]+\.[0-9]+/)*[0-9]+/[0-9]+"
"""What a BatchFlow child's run id adds to its parent's: ``:`` and the rest of its step's
execution id (the step's branch and number), then ``/`` and the child's index."""
_CHILD_ID: Final = re.compile(f"(.+){_CHILD_SUFFIX}")
_CHILD_PATH: Final = re.compile(f"(?:{_CHILD_SUFFIX})+")
"""What the run ids of a run's BatchFlow children at any depth add to the run's."""
_PART_OF_RUN: Final = re.compile(f"(?:{_CHILD_SUFFIX})*/(?:path|at)/[0-9]+")
"""What the key of a part of a run or of its children adds to ``PARTS_PREFIX`` and the
run's id."""


def record_children(record_key: str, keys: Iterable[str]) -> list[str]:
    """Those of ``keys`` that are records of the BatchFlow children of the run recorded
    under ``record_key``, at any depth: a child's run id is the execution id of its
    BatchFlow's step and its index (``record_key:3/0``, ``record_key:2.1/4/0``,
    ``record_key:3/0:1/2``...). Every such key starts with :func:`children_prefix`: a
    backend that lists its keys by prefix may give only those. Does not block."""
    prefix = children_prefix(record_key)
    start = len(record_key)
    return [key for key in keys if key.startswith(prefix) and _CHILD_PATH.fullmatch(key, start)]


def path_chunk_key(run_id: str, number: int) -> str:
    """The store key of the sealed path chunk ``number`` (0, 1, ...) of the run ``run_id``.
    Does not block."""
    return f"{PARTS_PREFIX}{run_id}/path/{number}"


def place_key(run_id: str, number: int) -> str:
    """The store key of the place ``number`` (0, 1, ...) of the run ``run_id``: where
    one of its branches in flight or fan-outs in progress is. Does not block."""
    return f"{PARTS_PREFIX}{run_id}/at/{number}"


def part_prefixes(record_key: str) -> tuple[str, str]:
    """The starts of the keys of the parts of the run recorded under ``record_key``
    (``__cosmoflow__/parts/job/``) and of its BatchFlow children's
    (``__cosmoflow__/parts/job:``), and of no run whose id does not start with ``job/``
    or ``job:`` (:func:`record_parts` leaves out those that are not the run's). Each
    ends in an ASCII character (a key range may end at the character after it). Does
    not block."""
    run_parts = PARTS_PREFIX + record_key.removeprefix(RECORD_PREFIX)
    return f"{run_parts}/", f"{run_parts}:"


def record_parts(record_key: str, keys: Iterable[str]) -> list[str]:
    """Those of ``keys`` that are parts (path chunks, places) of the run recorded under
    ``record_key`` or of its BatchFlow children at any depth (see
    :func:`record_children`): what is forgotten with the run. Every such key starts with
    one of :func:`part_prefixes`: a backend that lists its keys by prefix may give only
    those. Does not block."""
    run_parts = PARTS_PREFIX + record_key.removeprefix(RECORD_PREFIX)
    start = len(run_parts)
    return [
        key
        for key in keys
        if key.startswith(run_parts) and _PART_OF_RUN.fullmatch(key, start) is not None
    ]


def children_prefix(record_key: str) -> str:
    """The start of the key of every record of a BatchFlow child of the run recorded
    under ``record_key`` (see :func:`record_children`). Does not block."""
    return f"{record_key}:"


def forgotten_prefixes(record_key: str) -> tuple[str, ...]:
    """The starts of the keys :func:`forgotten_with` may take besides ``record_key``
    (:func:`children_prefix` and :func:`part_prefixes`): a backend that lists its keys
    by prefix may give it only those. Each ends in an ASCII character. Does not block."""
    return (children_prefix(record_key), *part_prefixes(record_key))


def forgotten_with(record_key: str, keys: Iterable[str]) -> list[str]:
    """``record_key`` and those of ``keys`` forgotten with the run recorded under it:
    the records of its BatchFlow children (:func:`record_children`) and the parts of
    them all (:func:`record_parts`). Does not block."""
    prefixes = forgotten_prefixes(record_key)
    near = [key for key in keys if key.startswith(prefixes)]
    return [record_key, *record_children(record_key, near), *record_parts(record_key, near)]


async def stored_with(storage: Storage, record_key: str) -> list[str]:
    """``record_key`` and the keys of ``storage`` forgotten with the run recorded under
    it (see :func:`forgotten_with`), listed under :func:`forgotten_prefixes` with
    :meth:`Storage.keys_with_prefix`. Blocks while they are listed."""
    listed = [
        key
        for prefix in forgotten_prefixes(record_key)
        for key in await storage.keys_with_prefix(prefix)
    ]
    return forgotten_with(record_key, listed)


def batch_parent(run_id: str) -> str | None:
    """The run a BatchFlow child of id ``run_id`` belongs to (``job`` for ``job:3/0``,
    ``job:3/0`` for ``job:3/0:1/2``), or None when ``run_id`` is not of a child's form.
    Does not block."""
    match = _CHILD_ID.fullmatch(run_id)
    return None if match is None else match[1]


def check_steps(record_key: str, stored: Any, steps_before: int) -> None:
    """Raise RunConflictError unless ``stored``, the run record read from the store under
    ``record_key`` (None when missing), counts ``steps_before`` completed steps (its
    ``"steps"``); StorageError when ``stored`` is not a run record. Does not block."""
    run_id = record_key.removeprefix(RECORD_PREFIX)
    if stored is None:
        raise RunConflictError(
            f"run {run_id!r}: the store no longer holds its record; step {steps_before + 1} "
            "is not applied"
        )
    steps = _recorded_steps(record_key, stored)
    if steps != steps_before:
        raise RunConflictError(
            f"run {run_id!r}: another engine committed step {steps_before + 1} first "
            f"(the store's record counts {steps} steps); this step is not applied"
        )


def _recorded_steps(record_key: str, stored: Any) -> int:
    """How many steps the run record ``stored`` counts; StorageError naming the key when
    it is no run record (a dict holding the run's count of ``steps``), as when a
    backend's ``get`` does not return what its ``set`` was given."""
    steps = stored.get("steps") if isinstance(stored, dict) else None
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise StorageError(
            f"the storage holds no run record under {record_key!r}: its get returned "
            f"{with_article(type(stored).__name__)} ({stored!r:.60}) where a dict with the "
            "run's 'steps' was stored; a storage's get must return the value its set was given"
        )
    return steps


async def value_or(storage: Storage, key: str, missing: Any) -> Any:
    """The value of ``key`` in ``storage``, or ``missing`` when it is not stored."""
    try:
        return await storage.get(key)
    except KeyError:
        return missing


async def apply_step_op(storage: Storage, kind: str, key: str, argument: Any) -> None:
    """Apply one staged op of a durable step (see :data:`StagedOp`) with ``storage``'s
    own ``get``, ``set``, ``delete`` and ``delete_many``: an update calls its function
    on the value the ops before it left, or on its default (which may be the store
    client's MISSING) when there is none; a clear deletes the user's keys and leaves the
    run records."""
    if kind == "clear":
        stored = await storage.keys()
        await storage.delete_many([key for key in stored if not key.startswith(RESERVED_PREFIX)])
    elif kind == "delete":
        await storage.delete(key)
    elif kind == "set":
        await storage.set(key, argument)
    else:
        function, default = argument
        await storage.set(key, function(await value_or(storage, key, default)))
