"""The on-disk format of :class:`~cosmoflow_actors.FileStorage`: a snapshot and a journal.

``PATH`` holds the *snapshot*, one JSON object indented by 2::

    {"format": "cosmoflow-store", "version": 1, "codec": "json", "generation": 3,
     "data": {"key": value, ...}}

``PATH.journal`` holds the commits made since that snapshot, as JSON lines. The first
line is a header naming the snapshot generation the journal continues; each further
line is one commit, a JSON array of its writes in order::

    {"format": "cosmoflow-journal", "version": 1, "codec": "json", "generation": 3}
    [["set", "key", value], ["delete", "other"]]
    [["clear"], ["set", "key", value]]

A commit is one appended line followed by ``fdatasync``. Compaction writes generation
``g + 1`` of the snapshot (temporary file, fsync, rename, directory fsync), then replaces
the journal with a bare header for ``g + 1`` the same way. Loading replays a journal whose
generation equals the snapshot's. A journal of an earlier generation was already folded
into the snapshot by a compaction that stopped before replacing it, and is ignored: it
can be several generations behind, because while it is there every commit compacts, and
each of those compactions may stop at the same point. A last line without its newline
is a commit a crash interrupted (its append never returned): it is ignored. So is a
last line holding a NUL byte, which no commit holds: it is what a file system leaves of
an append that a crash cut short (the blocks it never wrote read as zeros). Any other
line that is not a commit is damage, the last one too when it ends in its newline
(written whole, so its commit returned): loading refuses the journal.

Every function here except the encoders blocks on the file system: run them in a worker
thread.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.storage.codec import Codec, check_codec
from cosmoflow_actors.storage.staged import ClearOp, DeleteOp, Op, SetOp

SNAPSHOT_FORMAT: Final = "cosmoflow-store"
JOURNAL_FORMAT: Final = "cosmoflow-journal"
VERSION: Final = 1


class Snapshot(msgspec.Struct, forbid_unknown_fields=True):
    """The snapshot file's object."""

    format: str
    version: int
    codec: str
    generation: int
    data: dict[str, msgspec.Raw]


class JournalHeader(msgspec.Struct, forbid_unknown_fields=True):
    """The journal's first line."""

    format: str
    version: int
    codec: str
    generation: int


class SetRecord(msgspec.Struct, tag="set", array_like=True):
    """``["set", key, value]``."""

    key: str
    value: msgspec.Raw


class DeleteRecord(msgspec.Struct, tag="delete", array_like=True):
    """``["delete", key]``."""

    key: str


class ClearRecord(msgspec.Struct, tag="clear", array_like=True):
    """``["clear"]``."""


Record = SetRecord | DeleteRecord | ClearRecord

_encoder = msgspec.json.Encoder()
_snapshot_decoder = msgspec.json.Decoder(Snapshot)
_header_decoder = msgspec.json.Decoder(JournalHeader)
_commit_decoder = msgspec.json.Decoder(list[Record])


class JournalAhead(StorageError):
    """The journal continues a later snapshot than the one read: the two files do not
    belong together, or a compaction replaced both between the reads of a reader
    without the lock (see :func:`cosmoflow_actors.storage.file.peek`)."""


@dataclass(frozen=True, slots=True)
class Seen:
    """The journal file as a store last read or wrote it: a file of another size, or
    another file under the journal's name, means that another writer got there."""

    inode: int
    size: int


@dataclass
class Loaded:
    """What :func:`load` read: the committed entries and the state of both files."""

    entries: dict[str, msgspec.Raw] = field(default_factory=dict)
    generation: int = 0
    snapshot_bytes: int = 0
    journal_bytes: int = 0
    journal_usable: bool = False
    """Whether the next commit may append to the journal (else it must compact)."""
    journal_seen: Seen | None = None
    """The journal file as loaded or last written; None when there was none."""


def journal_path(path: Path) -> Path:
    """Return the journal's path for the snapshot at ``path``."""
    return path.with_name(f"{path.name}.journal")


def encode_snapshot(codec: Codec, generation: int, entries: dict[str, msgspec.Raw]) -> bytes:
    """Return the snapshot file's content. Does not block."""
    snapshot = Snapshot(SNAPSHOT_FORMAT, VERSION, codec.name, generation, entries)
    return msgspec.json.format(_encoder.encode(snapshot), indent=2) + b"\n"


def encode_header(codec: Codec, generation: int) -> bytes:
    """Return the journal's header line. Does not block."""
    return _encoder.encode(JournalHeader(JOURNAL_FORMAT, VERSION, codec.name, generation)) + b"\n"


def encode_commit(ops: list[Op[msgspec.Raw]]) -> bytes:
    """Return one commit's journal line. Does not block."""
    return _encoder.encode([_record(op) for op in ops]) + b"\n"


def _record(op: Op[msgspec.Raw]) -> Record:
    if isinstance(op, SetOp):
        return SetRecord(op.key, op.value)
    if isinstance(op, DeleteOp):
        return DeleteRecord(op.key)
    return ClearRecord()


def apply_ops(entries: dict[str, msgspec.Raw], ops: list[Op[msgspec.Raw]]) -> None:
    """Apply staged ops to ``entries`` in place. Does not block."""
    for op in ops:
        if isinstance(op, SetOp):
            entries[op.key] = op.value
        elif isinstance(op, DeleteOp):
            entries.pop(op.key, None)
        else:
            entries.clear()


def load(path: Path, codec: Codec) -> Loaded:
    """Remove stray temporary files, then :func:`read` the store (blocks).

    Raises StorageError naming the file when a file cannot be read or is not what this
    format writes; no file is changed but the temporary ones.
    """
    try:
        remove_stray_temps(path, journal_path(path))
    except OSError as exc:
        raise StorageError(f"cannot read {exc.filename or path}: {exc}") from exc
    return read(path, codec)


def read(path: Path, codec: Codec) -> Loaded:
    """Read the snapshot and replay the journal, changing no file (blocks).

    Raises StorageError naming the file when a file cannot be read or is not what this
    format writes.
    """
    journal = journal_path(path)
    try:
        snapshot = _read(path)
        journal_content, journal_seen = _read_journal(journal)
    except OSError as exc:
        raise StorageError(f"cannot read {exc.filename or path}: {exc}") from exc
    loaded = Loaded(journal_seen=journal_seen)
    if snapshot is not None:
        _load_snapshot(path, snapshot, codec, loaded)
    if journal_content is not None:
        _load_journal(journal, journal_content, codec, loaded)
    return loaded


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read_journal(journal: Path) -> tuple[bytes | None, Seen | None]:
    """The journal's content and how it was seen, or (None, None) when it is missing."""
    try:
        with open(journal, "rb") as file:
            content = file.read()
            return content, Seen(os.fstat(file.fileno()).st_ino, len(content))
    except FileNotFoundError:
        return None, None


def check_unchanged(journal: Path, seen: Seen | None) -> None:
    """Raise StorageError when the journal may hold commits a store has not seen: it
    grew, or another file took its name, since the store last read or wrote it (blocks).

    A journal that was removed, or cut short in place, holds no commit of another
    writer (a writer only appends to the journal, or replaces it whole): what it lost
    are this store's own commits, which the compaction that checks writes back.
    """
    try:
        status = os.stat(journal)
    except FileNotFoundError:
        return
    if _another_wrote(status, seen):
        raise _another_writer(journal)


def _another_wrote(status: os.stat_result, seen: Seen | None) -> bool:
    """Whether the journal file ``status`` describes may hold commits that a store
    which saw it as ``seen`` has not seen: another file took its name, or it grew."""
    return seen is None or status.st_ino != seen.inode or status.st_size > seen.size


class AnotherWriter(StorageError):
    """The journal may hold commits of another writer, which the store has not seen."""


def _another_writer(journal: Path) -> StorageError:
    return AnotherWriter(
        f"{journal} is not as this store last left it: another process wrote to it or "
        "put another file in its place "
        "(a FileStorage serves one process at a time; reopen the store to see its writes)"
    )


def _load_snapshot(path: Path, content: bytes, codec: Codec, loaded: Loaded) -> None:
    if not content.strip():
        raise StorageError(
            f"{path} is empty, which no store leaves (an empty store is a snapshot with no "
            "keys): remove it to start a new store there"
        )
    try:
        snapshot = _snapshot_decoder.decode(content)
    except msgspec.DecodeError as exc:
        raise StorageError(f"{path} does not hold a cosmoflow store: {exc}") from exc
    if snapshot.format != SNAPSHOT_FORMAT or snapshot.version != VERSION:
        raise StorageError(
            f"{path} holds format {snapshot.format!r} version {snapshot.version}, "
            f"not {SNAPSHOT_FORMAT!r} version {VERSION}"
        )
    check_codec(str(path), snapshot.codec, codec)
    for key, raw in snapshot.data.items():
        _check_value(path, codec, key, raw)
    loaded.entries = snapshot.data
    loaded.generation = snapshot.generation
    loaded.snapshot_bytes = len(content)


def _check_value(path: Path, codec: Codec, key: str, raw: msgspec.Raw) -> None:
    if not codec.check_json(raw):
        raise StorageError(f"{path}: the value of {key!r} was not written by codec {codec.name!r}")


def _load_journal(journal: Path, content: bytes, codec: Codec, loaded: Loaded) -> None:
    header_line, newline, body = content.partition(b"\n")
    try:
        header = _header_decoder.decode(header_line)
    except msgspec.DecodeError as exc:
        raise StorageError(f"{journal} does not start with a journal header: {exc}") from exc
    if header.format != JOURNAL_FORMAT or header.version != VERSION:
        raise StorageError(f"{journal} is not a {JOURNAL_FORMAT!r} version {VERSION} journal")
    check_codec(str(journal), header.codec, codec)
    if header.generation < loaded.generation:
        return  # already folded into the snapshot; the next commit replaces it
    if header.generation > loaded.generation:
        raise JournalAhead(
            f"{journal} continues snapshot generation {header.generation}, but the snapshot "
            f"is generation {loaded.generation}: the two files do not belong together"
        )
    replayed = _replay(journal, body, codec, loaded.entries)
    loaded.journal_bytes = len(header_line) + len(newline) + replayed
    # A header whose line is not ended (an editor removed the newline) takes no
    # appended line: the next commit compacts instead.
    loaded.journal_usable = bool(newline) and replayed == len(body)


def _replay(journal: Path, body: bytes, codec: Codec, entries: dict[str, msgspec.Raw]) -> int:
    """Apply every complete commit line; return the bytes replayed (a torn tail is left).

    A torn tail is what a crash during the last append leaves: a last line without its
    newline, or a last line holding a NUL byte with nothing after it (see the module).
    Any other line that is not a commit (not JSON, or JSON but no commit), the last one
    ended by its newline too, is damage, and raises StorageError naming the line.
    """
    lines = body.split(b"\n")
    offset = 0
    for number, line in enumerate(lines[:-1], start=2):
        try:
            records = _commit_decoder.decode(line)
        except msgspec.DecodeError as exc:
            if number == len(lines) and not lines[-1] and b"\0" in line:
                return offset
            raise StorageError(f"{journal}, line {number}: not a journal commit: {exc}") from exc
        for record in records:
            if isinstance(record, SetRecord):
                _check_value(journal, codec, record.key, record.value)
        apply_ops(entries, [_op(record) for record in records])
        offset += len(line) + 1
    return offset


def _op(record: Record) -> Op[msgspec.Raw]:
    if isinstance(record, SetRecord):
        return SetOp(record.key, record.value)
    if isinstance(record, DeleteRecord):
        return DeleteOp(record.key)
    return ClearOp()


def append(journal: Path, content: bytes, seen: Seen) -> Seen:
    """Append one commit line and ``fdatasync`` it (blocks); return the journal as seen
    after it.

    Raises OSError when the write fails, after cutting the journal back to its size
    before if it can; AnotherWriter when the journal may hold commits ``seen`` does not
    (another writer), and StorageError when it was cut short, appending nothing.
    """
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
    try:
        status = os.fstat(fd)
        if _another_wrote(status, seen):
            raise _another_writer(journal)
        if status.st_size < seen.size:
            raise StorageError(
                f"{journal} was cut short to {status.st_size} bytes (it held {seen.size}): "
                "commits were lost from it"
            )
        try:
            _write_all(fd, content)
            os.fdatasync(fd)
        except OSError:
            with suppress(OSError):
                os.ftruncate(fd, seen.size)
            raise
    finally:
        os.close(fd)
    return Seen(seen.inode, seen.size + len(content))


def _write_all(fd: int, content: bytes) -> None:
    """Write all of ``content``: a write cut short (a file size limit) is retried, and
    that retry raises the OSError (blocks)."""
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]


def temp_path(path: Path) -> Path:
    """Return a fresh name for a temporary file next to ``path``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def remove_stray_temps(path: Path, *beside: Path) -> None:
    """Remove the temporary files :func:`temp_path` names for ``path`` and for each of
    the files ``beside`` it (in its folder), listing the folder once (blocks): a listing
    costs the size of the folder, so an open of one store among thousands in a folder
    would otherwise pay for it twice."""
    files = "|".join(re.escape(each.name) for each in (path, *beside))
    pattern = re.compile(rf"\.(?:{files})\.[0-9a-f]{{16}}\.tmp")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return  # no directory yet: an empty store, which the first commit creates
    for name in names:
        if pattern.fullmatch(name):
            with suppress(FileNotFoundError):
                os.unlink(path.parent / name)


def replace_file(path: Path, content: bytes, mode: int) -> Seen:
    """Atomically replace ``path`` with ``content`` via a synced temporary file (blocks);
    return the new file as seen.

    The new file gets permission bits ``mode``. The directory is not synced.
    """
    temp = temp_path(path)
    try:
        with open(temp, "xb", opener=_open_private) as file:
            file.write(content)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
            inode = os.fstat(file.fileno()).st_ino
        os.replace(temp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise
    return Seen(inode, len(content))


def _open_private(path: str, flags: int) -> int:
    """Open ``path`` for :func:`open`, creating it readable and writable by its owner only."""
    return os.open(path, flags, 0o600)


def mode_of(path: Path) -> int:
    """Return the permission bits of ``path``, or 0o600 when it does not exist (blocks)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o600


def sync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries to disk, making a rename durable (blocks)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
