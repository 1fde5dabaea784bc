"""``--store``: the built-in stores (memory, file, SQLite, Redis) and stores of the
user's own (``python:MODULE:FACTORY[:ARGUMENT]``, or ``SCHEME:ARGUMENT`` for a scheme a
package declares in the entry point group :data:`STORAGE_GROUP`), for a command
(:func:`parse_store`) or for each run of a worker (:func:`worker_stores`); and opening
a store and reading all it holds, values that cannot be read included
(:class:`Unreadable`)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from inspect import signature
from typing import TYPE_CHECKING, Any, Final

from cosmoflow_actors.cli.errors import CliError
from cosmoflow_actors.cli.output import StdoutFailed, jsonable
from cosmoflow_actors.errors import (
    StorageError,
    UnreadableValueError,
    type_and_message,
    with_article,
)
from cosmoflow_actors.runtime.engine import Engine
from cosmoflow_actors.runtime.queue import RunStores, per_run_redis
from cosmoflow_actors.runtime.run_record import RunRecord
from cosmoflow_actors.runtime.store_client import SharedStore
from cosmoflow_actors.storage import FileStorage, RedisStorage, SQLiteStorage, Storage
from cosmoflow_actors.storage.codec import CodecName
from cosmoflow_actors.storage.redis import (
    NAMESPACE_PARTS,
    SCAN_COUNT,
    namespace_key,
    namespace_of,
    redacted,
    send_command,
    shared_client,
)

if TYPE_CHECKING:
    from redis import Redis

PYTHON_STORE: Final = "python:MODULE:FACTORY[:ARGUMENT]"
"""``--store`` for a backend of the user's own: ``FACTORY(ARGUMENT)`` returns the Storage."""
STORE_SYNTAX: Final = (
    "memory, file:PATH, sqlite:PATH, redis://HOST[:PORT][/DB][#NAMESPACE], "
    f"{PYTHON_STORE} or SCHEME:ARGUMENT (a scheme an installed package declares)"
)
WORKER_STORE_SYNTAX: Final = (
    f"redis://HOST[:PORT][/DB][#PREFIX], {PYTHON_STORE} or SCHEME:ARGUMENT"
    " (a scheme an installed package declares)"
)
STORAGE_GROUP: Final = "cosmoflow_actors.storage"
"""The entry point group in which a package declares a ``--store`` scheme of its own:
``SCHEME = "module:factory"``, where ``factory(ARGUMENT)`` returns a Storage."""
RESERVED_SCHEMES: Final = frozenset({"memory", "file", "sqlite", "redis", "rediss", "python"})
"""The schemes of the built-in stores, which no package's scheme replaces."""
NAMESPACES_SHOWN: Final = 10
"""How many of the namespaces a server holds an error names, at most."""
NAMESPACE_SCANS: Final = 10
"""How many ``SCAN`` round trips (each looking at SCAN_COUNT keys) the search for those
namespaces makes, at most."""
SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+")
"""A scheme name, as in a URL, of two characters at least: ``C:`` is a drive letter."""


def parse_store(text: str, codec: CodecName | None = None) -> Storage | None:
    """The storage ``--store TEXT`` names; None for ``memory`` (a fresh dict per run).
    ``codec`` is that of ``--codec``, None when it was not given (a built-in store's is
    then ``json``). A store of the user's own is built now: blocks while its module is
    imported and its factory runs. CliError naming what is wrong."""
    kind, separator, rest = text.partition(":")
    if text == "memory":
        return None
    if kind in ("file", "sqlite") and separator and rest:
        backend = FileStorage if kind == "file" else SQLiteStorage
        try:
            return backend(rest, codec=codec or "json")
        except ValueError as exc:  # a path that cannot be a file's
            raise CliError(f"store {text!r}: {exc}") from exc
    if kind in ("redis", "rediss") and rest.startswith("//"):
        url, _, namespace = text.partition("#")
        try:
            return RedisStorage(url, namespace=namespace or "default", codec=codec or "json")
        except ValueError as exc:  # a Redis URL refused: its port, database or an option
            raise CliError(str(exc)) from exc
    custom = custom_store(text, STORE_SYNTAX)
    if custom is None:
        raise CliError(f"store {redacted(text)!r}: expected {STORE_SYNTAX}")
    return custom.build_now({} if codec is None else {"codec": codec})


def existing_store(text: str, codec: CodecName | None, doing: str) -> Storage:
    """The persistent storage ``STORE`` names, for a command ``doing`` something to
    what it holds; CliError for ``memory`` and for a file or SQLite store whose file
    does not exist (opening it would create an empty one)."""
    storage = parse_store(text, codec)
    if storage is None:
        raise CliError(f"memory: a memory store lives only as long as its run; nothing to {doing}")
    if isinstance(storage, FileStorage | SQLiteStorage) and not storage.path.exists():
        raise CliError(f"{text}: no such file")
    if isinstance(storage, RedisStorage):
        _require_namespace(storage)
    return storage


def _require_namespace(storage: RedisStorage) -> None:
    """CliError naming the namespace of ``storage`` (and some its server holds) when the
    server holds none of its keys: opening it would claim it, writing its metadata.
    Blocks for a few round trips; writes nothing."""
    try:
        client = shared_client(storage.url, storage.timeout, "RedisStorage")
    except StorageError as exc:  # the redis package is missing
        raise CliError(str(exc)) from exc
    from redis.exceptions import RedisError

    namespace = storage.namespace
    try:
        if _holds_namespace(client, namespace):
            return
        held = _namespaces_held(client)
    except RedisError as exc:
        raise CliError(f"cannot open the store: {storage!r}: {exc}") from exc
    raise CliError(f"{storage!r}: the server holds no namespace {namespace!r}{held}")


def _holds_namespace(client: Redis, namespace: str) -> bool:
    """Whether the server of ``client`` holds a key of ``namespace``, asked with ``TYPE``
    as opening the store asks (a user the server allows to open it may check it).
    Blocks for a round trip a key."""
    for part in NAMESPACE_PARTS:
        if send_command(client, "TYPE", namespace_key(namespace, part)) != b"none":
            return True
    return False


def _namespaces_held(client: Redis) -> str:
    """Which namespaces the server of ``client`` holds (in its database), in words after
    a space: at most :data:`NAMESPACES_SHOWN` of them (see :func:`_scan_namespaces`);
    nothing when the server does not let this user list its keys. Blocks."""
    from redis.exceptions import NoPermissionError

    try:
        names, complete = _scan_namespaces(client)
    except NoPermissionError:
        return ""
    shown = ", ".join(repr(name) for name in sorted(names)[:NAMESPACES_SHOWN])
    if complete and len(names) <= NAMESPACES_SHOWN:
        return f" (its namespaces: {shown})" if names else " (it holds none)"
    if not names:
        return f" (none found among the first {NAMESPACE_SCANS * SCAN_COUNT:,} keys)"
    return f" (its namespaces include {shown})"


def _scan_namespaces(client: Redis) -> tuple[set[str], bool]:
    """Namespaces of the server of ``client``, found by a ``SCAN`` for their metadata
    hashes (a queue's lease of a run whose id ends in ``:meta`` is no namespace) that
    stops once it has more than :data:`NAMESPACES_SHOWN` or after
    :data:`NAMESPACE_SCANS` round trips, and whether it saw every key. Blocks."""
    names: set[str] = set()
    pattern = namespace_key("*", "meta")
    cursor = 0
    for _ in range(NAMESPACE_SCANS):
        cursor, found = send_command(
            client, "SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT, "TYPE", "hash"
        )
        names.update(namespace_of(key.decode(errors="replace"), "meta") for key in found)
        if int(cursor) == 0 or len(names) > NAMESPACES_SHOWN:
            break
    return names, int(cursor) == 0


def described(text: str, storage: Storage) -> str:
    """How to name the store ``text`` names to people: as given, but a Redis URL
    with its password masked."""
    return repr(storage) if isinstance(storage, RedisStorage) else text


def worker_stores(text: str) -> RunStores:
    """The stores ``worker --store TEXT`` gives runs: namespaces of a Redis server, or a
    factory of the user's own called once per run (checked now to take ``run_id``;
    blocks while its module is imported). CliError when ``text`` names neither."""
    custom = custom_store(text, WORKER_STORE_SYNTAX)
    if custom is not None:
        custom.check_call({"run_id": "RUN_ID"})
        return PerRunStores(custom)
    if not text.startswith(("redis://", "rediss://")):
        raise CliError(f"store {redacted(text)!r}: expected {WORKER_STORE_SYNTAX}")
    try:
        return per_run_redis(text)
    except ValueError as exc:  # a Redis URL refused: its port, database or an option
        raise CliError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class CustomStore:
    """A storage backend of the user's own that ``--store`` names: its factory (a
    function or class) and the argument to call it with (None: called without one)."""

    label: str
    """How errors name the store: ``store 'TEXT'``, and the package of a scheme."""
    reference: str
    """The factory as ``module:name``."""
    factory: Callable[..., object]
    argument: str | None

    def call_text(self, keywords: dict[str, str]) -> str:
        """The call, for people: ``module:name('ARGUMENT', codec='pickle')``."""
        arguments = [] if self.argument is None else [repr(self.argument)]
        arguments += [f"{key}={value!r}" for key, value in keywords.items()]
        return f"{self.reference}({', '.join(arguments)})"

    def check_call(self, keywords: dict[str, str]) -> None:
        """CliError unless the factory's signature takes the argument and ``keywords``
        (a factory whose signature Python cannot read is taken as it is)."""
        try:
            parameters = signature(self.factory)
        except (TypeError, ValueError):  # a builtin without a signature: the call will tell
            return
        try:
            parameters.bind(*self.arguments(), **keywords)
        except TypeError as exc:
            raise CliError(f"{self.label}: cannot call {self.call_text(keywords)}: {exc}") from exc

    def arguments(self) -> list[str]:
        return [] if self.argument is None else [self.argument]

    def build(self, keywords: dict[str, str]) -> Storage:
        """Call the factory with the argument and ``keywords``; blocks while it runs.
        Raises what the factory raises, and TypeError when it returns no Storage."""
        made = self.factory(*self.arguments(), **keywords)
        return _as_storage(self.call_text(keywords), made)

    def build_now(self, keywords: dict[str, str]) -> Storage:
        """:meth:`build`, where whatever goes wrong is a CliError naming the store."""
        self.check_call(keywords)
        call = self.call_text(keywords)
        try:
            made = self.factory(*self.arguments(), **keywords)
        except (KeyboardInterrupt, StdoutFailed):
            raise
        except BaseException as exc:  # SystemExit too: a factory that exits builds nothing
            raise CliError(f"{self.label}: {call} raised {type_and_message(exc)}") from exc
        try:
            return _as_storage(call, made)
        except TypeError as exc:
            raise CliError(f"{self.label}: {exc}") from exc


def _as_storage(call: str, made: object) -> Storage:
    """``made``, what ``call`` returned; TypeError saying so unless it is a Storage."""
    if not isinstance(made, Storage):
        kind = "None" if made is None else with_article(type(made).__name__)
        raise TypeError(f"{call} returned {kind}, not a Storage")
    return made


@dataclass(frozen=True, slots=True)
class PerRunStores:
    """A worker's stores from a factory of the user's own: run R's store is
    ``FACTORY(ARGUMENT, run_id=R)``. A factory that raises, or returns no Storage,
    fails that run alone."""

    custom: CustomStore

    def __call__(self, run_id: str) -> Storage:
        return self.custom.build({"run_id": run_id})


def custom_store(text: str, expected: str) -> CustomStore | None:
    """The store of the user's own that ``text`` names: ``python:MODULE:FACTORY[:ARGUMENT]``,
    or ``SCHEME:ARGUMENT`` for a scheme an installed package declares (in the entry point
    group :data:`STORAGE_GROUP`). None when ``text`` has neither form (nor that of a
    scheme), or names a built-in scheme; CliError when it names one that cannot be
    loaded, or a scheme no package declares (saying the command ``expected`` this).
    Blocks while the factory's module is imported."""
    scheme, separator, rest = text.partition(":")
    if scheme == "python" and separator:
        return _python_store(text, rest)
    if not separator or scheme in RESERVED_SCHEMES or not SCHEME.fullmatch(scheme):
        return None
    return _declared_store(text, scheme, rest, expected)


def _python_store(text: str, reference: str) -> CustomStore:
    """The store ``python:MODULE:FACTORY[:ARGUMENT]`` names (``reference`` is what follows
    ``python:``); ARGUMENT is the rest, colons and all."""
    module, _, rest = reference.partition(":")
    name, given, argument = rest.partition(":")
    label = f"store {text!r}"
    if not (_dotted(module) and _dotted(name)):
        problem = "MODULE and FACTORY are dotted Python names"
        raise CliError(f"{label}: expected {PYTHON_STORE}, where {problem}")
    factory = _load_factory(label, module, name)
    return CustomStore(label, f"{module}:{name}", factory, argument if given else None)


def _declared_store(text: str, scheme: str, argument: str, expected: str) -> CustomStore:
    """The store ``SCHEME:ARGUMENT`` names, for a scheme an installed package declares.
    CliError when none does or several do, or its factory cannot be loaded."""
    points = importlib.metadata.entry_points(group=STORAGE_GROUP, name=scheme)
    if not points:
        raise CliError(
            f"store {text!r}: no installed package declares the scheme {scheme!r}"
            f" (entry point group {STORAGE_GROUP}); expected {expected}"
        )
    packages = sorted(point.dist.name if point.dist else point.value for point in points)
    if len(packages) > 1:
        raise CliError(
            f"store {text!r}: the scheme {scheme!r} is declared by several packages:"
            f" {', '.join(packages)}"
        )
    [point] = points
    label = f"store {text!r} (scheme {scheme!r} of {packages[0]})"
    if not (_dotted(point.module) and _dotted(point.attr or "")):
        raise CliError(f"{label}: the entry point {point.value!r} is not module:factory")
    factory = _load_factory(label, point.module, point.attr)
    return CustomStore(label, f"{point.module}:{point.attr}", factory, argument)


def _dotted(name: str) -> bool:
    """Whether ``name`` is a dotted Python name (``package.module``, ``Class.method``)."""
    return all(part.isidentifier() for part in name.split("."))


def _load_factory(label: str, module_name: str, name: str) -> Callable[..., object]:
    """The callable ``name`` (dotted) of the module ``module_name``, imported now (blocks
    while its top level runs). CliError when the module is not found or raises, lacks
    an attribute, or the object is not callable."""
    try:
        found: object = importlib.import_module(module_name)
    except (KeyboardInterrupt, StdoutFailed):
        raise
    except BaseException as exc:  # SystemExit too: a module that exits gives no factory
        raise CliError(f"{label}: {_import_failure(module_name, exc)}") from exc
    parts = name.split(".")
    for depth, part in enumerate(parts):
        try:
            found = getattr(found, part)
        except AttributeError as exc:
            owner = ".".join(parts[:depth])
            where = f"{module_name}:{owner}" if owner else f"module {module_name!r}"
            raise CliError(f"{label}: {where} has no attribute {part!r}") from exc
    if not callable(found):
        kind = with_article(type(found).__name__)
        raise CliError(f"{label}: {module_name}:{name} is {kind}, not a function or class")
    return found


def _import_failure(module_name: str, error: BaseException) -> str:
    """Why importing ``module_name`` failed: the module (or its package) is not found, or
    its code raised ``error`` (a module it imports not found included)."""
    missing = error.name if isinstance(error, ModuleNotFoundError) else None
    if missing is not None and (module_name + ".").startswith(missing + "."):
        return f"no module named {missing!r}"
    return f"importing {module_name} raised {type_and_message(error)}"


@contextlib.asynccontextmanager
async def opened(engine: Engine, store: Storage | dict[str, Any]) -> AsyncIterator[SharedStore]:
    """``engine.open_store(store)``: the store is opened now, so that one that cannot be
    is bad input (CliError), not a failed run, and stays open for the command's runs."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            handle = await stack.enter_async_context(engine.open_store(store))
        except StorageError as exc:
            raise CliError(f"cannot open the store: {exc}") from exc
        yield handle


async def listed_runs(engine: Engine, storage: Storage, name: str) -> list[RunRecord]:
    """``engine.list_runs(storage)``; CliError naming the store ``name`` when its runs
    cannot be listed (a record the engine did not write). Blocks while they are read."""
    try:
        return await engine.list_runs(storage)
    except StorageError as exc:
        raise CliError(f"{name}: cannot list its runs: {exc}") from exc


def unknown_run(name: str, run_id: str) -> CliError:
    """The error for the run ``run_id`` that the store ``name`` does not record."""
    return CliError(f"{name}: no run {run_id!r} is recorded")


async def read_contents(store: SharedStore) -> dict[str, Any]:
    """Every key and value of ``store``; a value that cannot be read is Unreadable.

    Blocks while they are read. CliError when the keys cannot be listed (a key another
    client wrote that is no key of the store, say): the store is bad input.
    """
    try:
        keys = await store.keys()
    except StorageError as exc:
        raise CliError(f"cannot list the keys of the store: {exc}") from exc
    try:
        return await store.get_many(keys)
    except Exception:  # a value cannot be read: read them one by one to find which
        return {key: await _read_one(store, key) for key in keys}


async def _read_one(store: SharedStore, key: str) -> Any:
    try:
        return await store.get(key)
    except Exception as exc:
        return Unreadable(exc)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """In what the command shows of a store: a value that could not be read."""

    error: BaseException

    def __repr__(self) -> str:
        return f"<unreadable: {self.why}>"

    @property
    def why(self) -> str:
        """Why the value could not be read: the reason an UnreadableValueError gives
        (the row names the store and the key already), else the error."""
        if isinstance(self.error, UnreadableValueError):
            return self.error.reason
        return type_and_message(self.error)


@dataclass(frozen=True, slots=True)
class Unshowable(Unreadable):
    """In what the command shows of a store: a value that was read but cannot be shown,
    its ``repr`` or its JSON form raising ``error`` (an int of more digits than Python
    converts to text, a ``__repr__`` that raises)."""

    def __repr__(self) -> str:
        return f"<cannot be shown: {self.why}>"


def json_form(value: Any) -> Any:
    """``value``'s JSON form (see :func:`~cosmoflow_actors.cli.output.jsonable`), or
    Unshowable when it cannot be made (a value that holds itself, an int of more digits
    than Python converts to text, a ``__repr__`` that raises). An Unreadable value is
    kept as it is."""
    if isinstance(value, Unreadable):
        return value
    try:
        form = jsonable(value)
        json.dumps(form)  # raises what printing it would
    except Exception as exc:
        return Unshowable(exc)
    return form


def repr_form(value: Any) -> str | Unshowable:
    """``repr(value)``, or Unshowable when that raises (its text, as ``str()`` gives
    it, is ``<cannot be shown: ...>``)."""
    try:
        return repr(value)
    except Exception as exc:
        return Unshowable(exc)


def first_unreadable(store: str, contents: dict[str, Any]) -> str | None:
    """The line that names the first value of ``contents`` that could not be read or
    shown (and says how many more there are), or None when every value was read and
    shown."""
    bad = [(key, value) for key, value in contents.items() if isinstance(value, Unreadable)]
    if not bad:
        return None
    key, value = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    problem = "shown" if isinstance(value, Unshowable) else "read"
    return f"{store}: the value of {key!r} cannot be {problem}{more}: {value.why}"
