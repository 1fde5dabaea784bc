"""Key checks and the JSON value codec shared by the storage backends.

Values are encoded with msgspec as soon as they are stored, so a value that cannot be
encoded fails the call that stored it. Nothing here blocks or awaits.
"""

from __future__ import annotations

from typing import Any

import msgspec

from cosmoflow_actors.errors import StorageError

_encoder = msgspec.json.Encoder()


def check_key(key: object) -> None:
    """Raise ``TypeError`` unless ``key`` is a ``str`` (keys are never coerced)."""
    if not isinstance(key, str):
        raise TypeError(f"storage keys must be str, not {type(key).__qualname__}: {key!r}")


def check_json_key(key: object) -> None:
    """Check ``key`` as :func:`check_key` does, and that it can be written as UTF-8 JSON.

    A key holding a lone surrogate raises :class:`~cosmoflow_actors.StorageError`.
    """
    check_key(key)
    try:
        _encoder.encode(key)
    except UnicodeEncodeError as exc:
        raise StorageError(f"key {key!r} cannot be encoded as JSON: {exc}") from exc


def encode_value(key: str, value: Any) -> msgspec.Raw:
    """Return ``value`` encoded as compact JSON; ``key`` only names it in errors.

    Anything msgspec encodes works: dicts, lists, tuples, str, int, float, bool, None,
    dataclasses, msgspec Structs, datetimes and more. Anything else raises
    :class:`~cosmoflow_actors.StorageError` naming the key and the value's type, with the
    encoder's error as ``__cause__``.
    """
    try:
        return msgspec.Raw(_encoder.encode(value))
    except (TypeError, ValueError, RecursionError) as exc:
        raise StorageError(
            f"cannot store key {key!r}: a value of type {type(value).__qualname__} "
            f"cannot be encoded as JSON ({exc})"
        ) from exc


def decode_value(raw: msgspec.Raw) -> Any:
    """Return a fresh object of plain JSON types (dict, list, str, int, float, bool, None)."""
    return msgspec.json.decode(raw)
