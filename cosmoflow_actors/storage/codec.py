"""Key checks and the value codecs shared by the persistent storage backends.

A codec turns values into bytes as soon as they are stored, so a value that cannot be
encoded fails the call that stored it and nothing is stored. Two codecs exist:

- ``"json"`` (the default): msgspec JSON. Values come back as plain JSON types (dict,
  list, str, int, float, bool, None); ``SharedStore.get(key, type=T)`` rebuilds a
  dataclass, set, tuple, bytes or other typed value. A float JSON cannot hold (NaN,
  infinity) is refused rather than stored as ``null``, and so is a dict whose keys
  collide once written as JSON strings (``{1: "one", "1": "uno"}``: one entry would be
  lost).
- ``"pickle"``: cloudpickle, for arbitrary Python objects. Reading a pickle runs code
  chosen by whoever wrote it, so use it for trusted data only. It is never chosen
  implicitly: a store records its codec, and opening it with another one is a
  :class:`~cosmoflow_actors.StorageError`.

Nothing here blocks or awaits.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import pickle
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Final, Literal, final

import msgspec

from cosmoflow_actors import pickling
from cosmoflow_actors.errors import StorageError, StoreValueError, UnreadableValueError

CodecName = Literal["json", "pickle"]
"""A codec's name, as the persistent storages' ``codec=`` takes it: the keys of CODECS."""

_encoder = msgspec.json.Encoder()
_str_keys_only = msgspec.json.Encoder(order="deterministic")
"""An encoder used as a check only: it refuses (TypeError) a value holding a dict with
a key that is not a ``str``, in C, which is what makes the check cheap. Its output, whose
dict keys it sorts, is not kept. A set it cannot sort (``{1, "a"}``) or a stack too
shallow for it fails it as well: :func:`_check_distinct_keys` then gives the answer."""
_string_decoder = msgspec.json.Decoder(str)


def check_key(key: object) -> str:
    """Return ``key``; raise ``TypeError`` unless it is a ``str`` (keys are never
    coerced)."""
    if not isinstance(key, str):
        raise TypeError(f"storage keys must be str, not {type(key).__qualname__}: {key!r}")
    return key


def check_json_key(key: object) -> None:
    """Check ``key`` as :func:`check_key` does, and that it can be written as UTF-8.

    A key holding a lone surrogate raises :class:`~cosmoflow_actors.StoreValueError`.
    """
    text = check_key(key)
    try:
        _encoder.encode(text)
    except UnicodeEncodeError as exc:
        raise StoreValueError(text, f"the key cannot be encoded as UTF-8 ({exc})") from exc


def utf8_key(key: str) -> bytes | None:
    """Return ``key`` as UTF-8, or None when it cannot be encoded or is not a ``str``
    (so it is never stored: a lookup of a key of another type, through the Storage API
    directly, finds nothing)."""
    if not isinstance(key, str):
        return None
    try:
        return key.encode()
    except UnicodeEncodeError:
        return None


class Codec(ABC):
    """Encodes values to bytes and back; each form also has a JSON-document form.

    ``encode``/``decode`` give the bytes a database stores. ``encode_json``/``decode_json``
    give the same value as a JSON fragment, which is how the file backend embeds it in
    its snapshot and journal.
    """

    name: CodecName

    @abstractmethod
    def encode(self, key: str, value: Any) -> bytes:
        """Return ``value`` as bytes; ``key`` only names it in the StoreValueError raised
        when the value cannot be encoded."""

    @abstractmethod
    def decode(self, data: bytes) -> Any:
        """Return a fresh value from bytes :meth:`encode` made; StorageError if it cannot."""

    def read(self, where: str, key: str, data: bytes) -> Any:
        """:meth:`decode` the value stored under ``key``; its StorageError names
        ``where`` (the store) and ``key``."""
        try:
            return self.decode(data)
        except StorageError as exc:
            raise unreadable(where, key, exc) from exc

    def read_json(self, where: str, key: str, raw: msgspec.Raw) -> Any:
        """:meth:`decode_json` the value stored under ``key``; its StorageError names
        ``where`` (the store) and ``key``."""
        try:
            return self.decode_json(raw)
        except StorageError as exc:
            raise unreadable(where, key, exc) from exc

    @abstractmethod
    def encode_json(self, key: str, value: Any) -> msgspec.Raw:
        """Return ``value`` as a JSON fragment (the file backend's form)."""

    @abstractmethod
    def decode_json(self, raw: msgspec.Raw) -> Any:
        """Return a fresh value from a fragment :meth:`encode_json` made."""

    @abstractmethod
    def check_json(self, raw: msgspec.Raw) -> bool:
        """Return whether ``raw`` (already valid JSON) is a fragment this codec wrote."""


def unreadable(where: str, key: str, reason: object) -> UnreadableValueError:
    """A new UnreadableValueError: ``where`` cannot read ``key``, for ``reason`` (a text,
    or the error that says it)."""
    why = str(reason)
    return UnreadableValueError(f"{where}: cannot read key {key!r}: {why}", key, why)


@final
class JsonCodec(Codec):
    """msgspec JSON: dicts, lists, str, numbers, bool, None, dataclasses, Structs,
    datetimes, sets, tuples, bytes; see docs/storage.md for what comes back as what.

    A value holding NaN or an infinity is refused: msgspec would write ``null``. So is a
    value holding a dict two of whose keys JSON writes as one string (``1`` and ``"1"``,
    an enum member and its value): the JSON object would hold the key twice and come
    back with one entry. So is an int of more digits than
    ``sys.get_int_max_str_digits()`` (Python converts no longer int to text); one stored
    while the limit allowed it, which the limit in force no longer does, cannot be read
    (StorageError).
    """

    name = "json"

    def encode(self, key: str, value: Any) -> bytes:
        try:
            data = _encoder.encode(value)
        except (TypeError, ValueError, RecursionError) as exc:
            raise StoreValueError(
                key, f"a value of type {type(value).__qualname__} cannot be encoded as JSON ({exc})"
            ) from exc
        if b"null" in data and not _comes_back(value, data):
            _check_finite(key, value)
        try:  # refuses a dict key that is not a str (see _str_keys_only), in C
            _str_keys_only.encode(value)
        except (TypeError, ValueError, RecursionError):
            _check_distinct_keys(key, value, data)
        return data

    def decode(self, data: bytes) -> Any:
        return _read_json(data)

    def encode_json(self, key: str, value: Any) -> msgspec.Raw:
        return msgspec.Raw(self.encode(key, value))

    def decode_json(self, raw: msgspec.Raw) -> Any:
        return _read_json(raw)

    def check_json(self, raw: msgspec.Raw) -> bool:
        return True


def _read_json(data: bytes | msgspec.Raw) -> Any:
    """The value the JSON text ``data`` holds; StorageError saying why when there is none.

    msgspec reads no number longer than 4300 characters, whatever
    ``sys.get_int_max_str_digits()`` says, where it writes an int of as many digits as
    that limit allows (4300 by default), with a sign besides: the json module reads such
    text instead, refusing as msgspec does the numbers no float holds and NaN and the
    infinities.
    """
    try:
        try:
            return msgspec.json.decode(data)
        except msgspec.ValidationError:  # a number out of msgspec's range
            return json.loads(bytes(data), parse_float=_finite, parse_constant=_no_constant)
    except (msgspec.DecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"a stored value is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # nested deeper than the stack left here allows
        raise StorageError(f"a stored value nests too deep to decode here: {exc}") from exc
    except ValueError as exc:  # a number out of range for json too
        raise StorageError(f"a stored number is out of range: {exc}") from exc


def _finite(text: str) -> float:
    """The float JSON ``text`` writes; ValueError when no float holds it."""
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is beyond a float")
    return number


def _no_constant(name: str) -> Any:
    """Refuse ``NaN``, ``Infinity`` and ``-Infinity``, which the json module reads and
    JSON has not (msgspec.DecodeError, as msgspec refuses them)."""
    raise msgspec.DecodeError(f"{name} is not JSON")


def _comes_back(value: Any, data: bytes) -> bool:
    """Whether ``data``, ``value`` as msgspec encoded it, decodes to ``value``'s
    builtins form (what msgspec makes of it: lists for tuples and sets, str keys).

    Invariant: msgspec writes NaN and the infinities as ``null``, which decodes to None,
    never equal to the float; every other value comes back equal. So True means
    ``value`` holds no such float, as :func:`_check_finite` would find, at C speed
    (the walk takes Python time per item, and a long run's record has thousands). False
    leaves the answer to that walk.
    """
    return bool(_read_json(data) == msgspec.to_builtins(value, str_keys=True))


def _check_distinct_keys(key: str, value: Any, data: bytes) -> None:
    """Raise StoreValueError if ``data``, ``value`` encoded, holds an object with one
    key twice: two keys of a dict that JSON writes as the same string."""
    try:
        json.loads(data, object_pairs_hook=_distinct_pairs)
    except _DuplicateKey as exc:
        raise StoreValueError(
            key,
            f"a value of type {type(value).__qualname__} holds a dict with two keys that "
            f"JSON writes as the string {exc.name!r} (JSON keys are strings; one entry "
            "would be lost); give the dict distinct str keys, or use codec='pickle'",
        ) from exc
    except RecursionError as exc:
        raise StoreValueError(
            key,
            f"a value of type {type(value).__qualname__} nests too deep to check that "
            "its dicts' keys stay distinct as JSON strings",
        ) from exc


class _DuplicateKey(ValueError):
    """A JSON object holds the key ``name`` twice."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _distinct_pairs(pairs: list[tuple[str, Any]]) -> None:
    """The ``object_pairs_hook`` of :func:`_check_distinct_keys`: raise _DuplicateKey
    when two of an object's ``pairs`` have one key. Returns None: nothing is kept."""
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise _DuplicateKey(name)
        seen.add(name)


def _check_finite(key: str, value: Any) -> None:
    """Raise StoreValueError if ``value`` holds a float that JSON cannot hold."""
    pending = [msgspec.to_builtins(value)]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):  # to_builtins makes sets lists
            pending.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise StoreValueError(
                key,
                f"a value of type {type(value).__qualname__} holds the float {item!r}, which "
                "JSON cannot hold (it would come back as null); store it as a string, or use "
                "codec='pickle'",
            )


@final
class PickleCodec(Codec):
    """cloudpickle: any picklable object, lambdas and local classes included.

    Trusted data only: decoding a pickle can run arbitrary code. In JSON documents a
    pickle is a base64 string.
    """

    name = "pickle"

    def encode(self, key: str, value: Any) -> bytes:
        try:
            data = pickling.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # pickling reports failure with many exception types
            raise StoreValueError(
                key, f"a value of type {type(value).__qualname__} cannot be pickled ({exc})"
            ) from exc
        return data

    def decode(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:  # unpickling reports failure with many exception types
            raise StorageError(f"a stored value cannot be unpickled: {exc}") from exc

    def encode_json(self, key: str, value: Any) -> msgspec.Raw:
        return msgspec.Raw(_encoder.encode(base64.b64encode(self.encode(key, value)).decode()))

    def decode_json(self, raw: msgspec.Raw) -> Any:
        return self.decode(base64.b64decode(_string_decoder.decode(raw)))

    def check_json(self, raw: msgspec.Raw) -> bool:
        try:
            base64.b64decode(_string_decoder.decode(raw), validate=True)
        except (msgspec.ValidationError, binascii.Error):
            return False
        return True


CODECS: Final[dict[str, Codec]] = {codec.name: codec for codec in (JsonCodec(), PickleCodec())}


def get_codec(name: object) -> Codec:
    """Return the codec called ``name`` (``"json"`` or ``"pickle"``); ``ValueError`` otherwise."""
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, not {name!r}")
    return codec


DATABASE_FORMAT: Final = "cosmoflow-store"
DATABASE_VERSION: Final = "1"


def database_meta(codec: Codec) -> dict[str, str]:
    """What a database backend (SQLite, Redis) records beside its data: the format, its
    version and the codec of the values."""
    return {"format": DATABASE_FORMAT, "version": DATABASE_VERSION, "codec": codec.name}


def check_database_meta(where: str, meta: Mapping[str, str], codec: Codec) -> None:
    """Raise StorageError unless ``meta``, what the database ``where`` records beside
    its data, is this format and version, of ``codec``."""
    if meta.get("format") != DATABASE_FORMAT or meta.get("version") != DATABASE_VERSION:
        raise StorageError(
            f"{where} holds format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"not {DATABASE_FORMAT!r} version {DATABASE_VERSION!r}"
        )
    recorded = meta.get("codec")
    if recorded is None:
        raise StorageError(
            f"{where} names no codec beside its data: it was not written by this version "
            "of cosmoflow_actors, or it is damaged"
        )
    check_codec(where, recorded, codec)


def check_codec(where: str, recorded: object, codec: Codec) -> None:
    """Raise StorageError unless the codec ``where`` records is ``codec``."""
    if recorded != codec.name:
        raise StorageError(
            f"{where} was written with codec {recorded!r} but is opened with codec "
            f"{codec.name!r}; open it with codec={recorded!r} (--codec {recorded} on the "
            "command line; the pickle codec is for trusted data only and is never chosen "
            "implicitly)"
        )
