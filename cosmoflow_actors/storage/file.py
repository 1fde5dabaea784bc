"""The JSON file backend: one pretty-printed JSON object on disk, replaced atomically."""

from __future__ import annotations

import os
import re
import secrets
import stat
from contextlib import suppress
from pathlib import Path
from typing import Any, final

import msgspec
import trio

from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.storage.base import Storage
from cosmoflow_actors.storage.codec import check_json_key, decode_value, encode_value

_entries_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_entries_encoder = msgspec.json.Encoder()


@final
class FileStorage(Storage):
    """Storage in one JSON file: an object mapping each key to its value, indented by 2.

    The constructor does no I/O. :meth:`open` (called by every other method when needed)
    loads the file; a missing file is an empty store, created by the first commit that has
    something to write. Values are encoded to JSON by :meth:`set` and kept in memory as
    raw JSON; :meth:`get` decodes them into plain JSON types (use ``msgspec.convert`` for
    dataclasses and other types). Only :meth:`commit` writes the file: it replaces the
    whole file atomically (temporary file, fsync, rename, directory fsync), so the file
    always holds the last successful commit. A file the commit creates gets mode 0600; an
    existing file keeps its mode. Keys are JSON object keys, never paths.

    :meth:`open` and :meth:`commit` block in a worker thread (``trio.to_thread``), which
    cancellation does not interrupt; every other method is pure memory work and awaits
    nothing once the file is loaded.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path).absolute()
        self._data: dict[str, msgspec.Raw] = {}
        self._committed: dict[str, msgspec.Raw] = {}
        self._dirty = False
        self._opened = False

    def __repr__(self) -> str:
        return f"FileStorage({str(self._path)!r})"

    @property
    def path(self) -> Path:
        """The file's absolute path."""
        return self._path

    async def open(self) -> None:
        """Load the file, the first time only; later calls return at once.

        Blocks in a worker thread while it removes temporary files that a crash during an
        earlier commit left next to the file, and reads and parses the file. Raises
        :class:`~cosmoflow_actors.StorageError` naming the path when the file cannot be
        read or does not hold a JSON object; the file is left as it is.
        """
        if self._opened:
            return
        entries = await trio.to_thread.run_sync(_load, self._path)
        self._committed = entries
        self._data = entries.copy()
        self._opened = True

    async def get(self, key: str) -> Any:
        """Return a fresh decoded copy of the value; raise ``KeyError`` when it is missing."""
        await self.open()
        return decode_value(self._data[key])

    async def set(self, key: str, value: Any) -> None:
        """Encode ``value`` now and keep it in memory until :meth:`commit`.

        A non-``str`` key raises ``TypeError``. A key or value that cannot be encoded as
        JSON raises :class:`~cosmoflow_actors.StorageError` and stores nothing.
        """
        await self.open()
        check_json_key(key)
        self._data[key] = encode_value(key, value)
        self._dirty = True

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""
        await self.open()
        if self._data.pop(key, None) is None:
            return False
        self._dirty = True
        return True

    async def keys(self) -> list[str]:
        """Return every key, in insertion order."""
        await self.open()
        return list(self._data)

    async def contains(self, key: str) -> bool:
        """Return whether ``key`` is stored."""
        await self.open()
        return key in self._data

    async def size(self) -> int:
        """Return the number of keys."""
        await self.open()
        return len(self._data)

    async def clear(self) -> None:
        """Remove every key."""
        await self.open()
        if self._data:
            self._data.clear()
            self._dirty = True

    async def commit(self) -> None:
        """Write the file if anything changed since the last commit; all or nothing.

        Blocks in a worker thread while it writes and syncs a temporary file in the same
        directory, renames it onto the path and syncs the directory. When the write fails
        the previous file stays intact, the in-memory state returns to the last commit and
        :class:`~cosmoflow_actors.StorageError` names the path, with the ``OSError`` as
        ``__cause__``. When only the directory sync fails, the new file is already in place,
        so it stays the committed state and the StorageError says so.
        """
        await self.open()
        if not self._dirty:
            return
        pending = self._data.copy()
        content = msgspec.json.format(_entries_encoder.encode(pending), indent=2) + b"\n"
        await self._write(content)
        self._committed = pending
        self._dirty = False
        try:
            await trio.to_thread.run_sync(_sync_directory, self._path.parent)
        except OSError as exc:
            raise StorageError(f"wrote {self._path} but cannot sync its directory: {exc}") from exc

    async def _write(self, content: bytes) -> None:
        """Replace the file with ``content``; on failure roll back to the last commit."""
        try:
            await trio.to_thread.run_sync(_replace_file, self._path, content)
        except OSError as exc:
            self._data = self._committed.copy()
            self._dirty = False
            raise StorageError(f"cannot write {self._path}: {exc}") from exc


def _load(path: Path) -> dict[str, msgspec.Raw]:
    """Remove stray temporary files, then read and parse ``path`` (blocks: run in a thread)."""
    try:
        _remove_stray_temps(path)
        content = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    try:
        return _entries_decoder.decode(content)
    except msgspec.DecodeError as exc:
        raise StorageError(f"{path} does not hold a JSON object: {exc}") from exc


def _temp_path(path: Path) -> Path:
    """Return a fresh name for a temporary file next to ``path``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _remove_stray_temps(path: Path) -> None:
    """Remove the temporary files :func:`_temp_path` names for ``path`` (blocks)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{16}}\.tmp")
    for name in os.listdir(path.parent):
        if pattern.fullmatch(name):
            with suppress(FileNotFoundError):
                os.unlink(path.parent / name)


def _replace_file(path: Path, content: bytes) -> None:
    """Atomically replace ``path`` with ``content`` via a synced temporary file (blocks)."""
    mode = _mode_of(path)
    temp = _temp_path(path)
    try:
        with open(temp, "xb", opener=_open_private) as file:
            file.write(content)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise


def _open_private(path: str, flags: int) -> int:
    """Open ``path`` for :func:`open`, creating it readable and writable by its owner only."""
    return os.open(path, flags, 0o600)


def _mode_of(path: Path) -> int:
    """Return the permission bits of ``path``, or 0o600 when it does not exist (blocks)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o600


def _sync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries to disk, making a rename durable (blocks)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
