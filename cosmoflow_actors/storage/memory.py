"""The in-memory backend: a plain ``dict``, used in place."""

from __future__ import annotations

from typing import Any, Final, final

from cosmoflow_actors.storage.base import Storage
from cosmoflow_actors.storage.codec import check_key

_MISSING: Final = object()


@final
class MemoryStorage(Storage):
    """Storage in a ``dict`` that the caller may keep and read afterwards.

    The dict passed in is used in place, zero-copy: :meth:`set` writes into that very
    object, and values are stored and returned as the same objects (never copied). With
    no dict a new one is made. Keys given to :meth:`set` must be ``str``; any other key
    raises ``TypeError``. Other methods just look keys up.

    Nothing is durable: :meth:`commit` does nothing. No method blocks or awaits, so no
    method is a checkpoint. One engine-wide store actor serves every memory storage.
    """

    shared_actor = True

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        if data is not None and not isinstance(data, dict):
            raise TypeError(f"data must be a dict or None, got {type(data).__name__}")
        self._data: dict[str, Any] = {} if data is None else data

    @property
    def data(self) -> dict[str, Any]:
        """The dict holding the data: the caller's own when one was given."""
        return self._data

    def snapshot(self) -> dict[str, Any]:
        """Return a shallow copy of the data as it is now."""
        return self._data.copy()

    async def get(self, key: str) -> Any:
        """Return the stored object itself; raise ``KeyError`` when ``key`` is missing.

        A ``defaultdict`` given as data does not create the missing key.
        """
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    async def set(self, key: str, value: Any) -> None:
        """Store ``value`` itself under ``key``; raise ``TypeError`` if ``key`` is not a str."""
        check_key(key)
        self._data[key] = value

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""
        return self._data.pop(key, _MISSING) is not _MISSING

    async def keys(self) -> list[str]:
        """Return every key, in the dict's insertion order."""
        return list(self._data)

    async def contains(self, key: str) -> bool:
        """Return whether ``key`` is stored."""
        return key in self._data

    async def size(self) -> int:
        """Return the number of keys."""
        return len(self._data)

    async def clear(self) -> None:
        """Remove every key from the dict (the same dict object stays in use)."""
        self._data.clear()
