"""The file backend: a human-readable JSON snapshot plus an append-only journal."""

from __future__ import annotations

import functools
import os
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any, Final, TypeVar, TypeVarTuple, final

import msgspec
import outcome
import trio

from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.storage import journal, lock
from cosmoflow_actors.storage.base import (
    RESERVED_PREFIX,
    StagedOp,
    Storage,
    apply_step_op,
    check_steps,
    value_or,
)
from cosmoflow_actors.storage.codec import Codec, CodecName, check_json_key, get_codec
from cosmoflow_actors.storage.staged import ClearOp, Op, SetOp, StagedWrites
from cosmoflow_actors.validation import checked_path, require_seconds

COMPACT_MIN_BYTES: Final = 4 * 1024 * 1024
"""The journal is compacted once it is larger than this and than the snapshot. 4 MiB,
as SQLite's default WAL checkpoint: a compaction stalls the store actor while it rewrites
the whole store, while replaying a 4 MiB journal at open takes about 80 ms (53,000
one-key commits)."""

LOCK_POLL_SECONDS: Final = 0.05
"""How often :meth:`FileStorage.open` tries the lock again while it waits for another
holder (``wait=``)."""

PEEK_TRIES: Final = 5
"""How many times :func:`peek` reads the files while compactions replace them between
its reads of the snapshot and of the journal. A compaction syncs twice between the
two replacements, far longer than a read takes, so the second read mostly meets it
done; the others allow for a writer that compacts again and again."""

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


@final
class FileStorage(Storage):
    """Storage in a JSON file ``PATH`` and its journal ``PATH.journal``.

    ``PATH`` is a snapshot: a pretty-printed JSON object holding every key and value
    under ``"data"``, next to the codec and a generation number. Each commit appends one
    line to the journal and syncs it, so a commit costs the size of its writes, not of
    the store. When the journal grows larger than the snapshot (and than
    :data:`COMPACT_MIN_BYTES`), the commit compacts instead: it writes the next snapshot
    atomically (temporary file, fsync, rename, directory fsync) and starts an empty
    journal. :meth:`aclose` compacts too, so a closed store is one readable file. Loading
    replays the journal and ignores a last line cut short by a crash. Every commit is
    durable when it returns, closed or not. The format is in
    :mod:`cosmoflow_actors.storage.journal`.

    ``codec`` is ``"json"`` (the default) or ``"pickle"`` (trusted data only; values
    are base64 strings in the files). Values are encoded by :meth:`set` and kept in
    memory encoded; :meth:`get` decodes a fresh copy. Keys are JSON strings, never paths.
    Files this backend creates get mode 0600. A snapshot that exists keeps its mode when
    it is rewritten, and gives it to the journal and the lock file when they are
    created: the journal anew at each compaction, the lock file at each open (less the
    process's umask). A journal that exists keeps its own mode until the next
    compaction.

    One open instance at a time may use a file: :meth:`open` locks ``PATH.lock`` (see
    :mod:`cosmoflow_actors.storage.lock`) and :meth:`aclose` unlocks it. Another
    opener, in another process or this one, gets :class:`~cosmoflow_actors.StorageError`
    naming the file and the holder's pid, or with ``wait`` (seconds) first waits that
    long for the holder to close. An instance that is garbage collected while open
    unlocks then.

    ``PATH`` is resolved once, by the constructor: a symbolic link in it (the file
    itself, or a folder on the way) is followed to the real file, and the lock, the
    journal, the snapshot and every message and the repr are that file's. So opening a
    store through a link and through its target are one file's opens (the second is
    refused as above), and a compaction replaces the real file, leaving the link a link.
    A link made or changed after the constructor does not move the instance.

    The constructor reads no file; it reads the symbolic links on the way to ``PATH``
    (and the current directory, when ``PATH`` is relative). :meth:`open`,
    :meth:`commit` and :meth:`aclose` block in a worker thread, whose work cancellation
    does not interrupt: a cancelled call waits for the file I/O under way in the thread
    to end. Every other method is memory work and awaits nothing once the file is
    loaded.
    """

    persistent = True

    def __init__(
        self, path: str | os.PathLike[str], *, codec: CodecName = "json", wait: float = 0.0
    ) -> None:
        require_seconds("wait", wait, zero=True)
        self._path = _real_path(checked_path("path", path))
        self._journal = journal.journal_path(self._path)
        self._lock_path = lock.lock_path(self._path)
        self._codec = get_codec(codec)
        self._wait = wait
        self._staged: StagedWrites[msgspec.Raw] = StagedWrites()
        self._state = journal.Loaded()
        self._reserved = _ReservedKeys()
        self._unlock: weakref.finalize[[lock.Held], FileStorage] | None = None
        self._opened = False

    def __repr__(self) -> str:
        return f"FileStorage({str(self._path)!r})"

    @property
    def path(self) -> Path:
        """The snapshot's absolute path, symbolic links resolved: the real file."""
        return self._path

    @property
    def journal_path(self) -> Path:
        """The journal's absolute path: the snapshot's with ``.journal`` appended."""
        return self._journal

    @property
    def lock_path(self) -> Path:
        """The lock file's absolute path: the snapshot's with ``.lock`` appended."""
        return self._lock_path

    @property
    def _committed(self) -> dict[str, msgspec.Raw]:
        """The committed entries, as loaded or last written (empty while closed)."""
        return self._state.entries

    @property
    def codec(self) -> CodecName:
        """The codec's name: ``"json"`` or ``"pickle"``."""
        return self._codec.name

    async def open(self) -> None:
        """Lock the files, load the snapshot and replay the journal, unless open already.

        Blocks in a worker thread while it locks ``PATH.lock``, removes temporary files a
        crash left next to the files, reads them and checks them; while another instance
        holds the lock, waits up to ``wait`` seconds for it (trying again every
        :data:`LOCK_POLL_SECONDS`). Raises :class:`~cosmoflow_actors.StorageError` naming
        the file when another instance still holds it (with the holder's pid), or when a
        file cannot be read, is not in this backend's format or was written with another
        codec; no file is changed and the lock is not kept. After :meth:`aclose` it
        opens the files afresh.
        """
        if self._opened:
            return
        held = await self._lock()
        unlock = weakref.finalize(self, lock.release, held)
        try:
            self._hold(await _in_thread(journal.load, self._path, self._codec))
        except BaseException:
            await _unlocked(unlock)
            raise
        self._unlock = unlock
        self._opened = True

    async def _lock(self) -> lock.Held:
        """Take the lock file, waiting up to ``wait`` seconds for another holder."""
        deadline = trio.current_time() + self._wait
        while True:
            try:
                found = await _in_thread(self._try_lock)
            except FileNotFoundError as exc:
                folder = self._path.parent
                raise StorageError(
                    f"cannot open {self._path}: the folder {folder} does not exist"
                ) from exc
            except OSError as exc:
                raise StorageError(f"cannot lock {self._path}: {exc}") from exc
            if isinstance(found, lock.Held):
                return found
            now = trio.current_time()
            if now >= deadline:
                raise self._in_use(found)
            await trio.sleep(min(LOCK_POLL_SECONDS, deadline - now))

    def _try_lock(self) -> lock.Held | lock.Busy:
        """Try the lock once, creating the lock file with the snapshot's mode (blocks)."""
        return lock.try_lock(self._lock_path, journal.mode_of(self._path))

    def _in_use(self, busy: lock.Busy) -> StorageError:
        if busy.pid is None:  # it has the lock, and writes its pid next
            holder = "another FileStorage (of this process or another, pid not written yet)"
        elif busy.pid == os.getpid():
            holder = f"process {busy.pid} (this process: another FileStorage over it is open)"
        else:
            holder = f"process {busy.pid}"
        waited = f" after waiting {self._wait:g} s" if self._wait else ""
        return StorageError(
            f"{self._path} is in use{waited}: {holder} holds its lock file {self._lock_path}. "
            "A FileStorage file serves one open instance at a time: close the other one, "
            "or wait for it (FileStorage(path, wait=seconds)); an SQLite store serves "
            "several processes at once"
        )

    async def get(self, key: str) -> Any:
        """Return a fresh decoded copy of the value; raise ``KeyError`` when it is missing."""
        return self._codec.read_json(repr(self), key, await self._raw(key))

    async def _raw(self, key: str) -> msgspec.Raw:
        await self.open()
        staged = self._staged.lookup(key)
        if isinstance(staged, msgspec.Raw):
            return staged
        if staged is None:
            raise KeyError(key)
        return self._committed[key]

    async def set(self, key: str, value: Any) -> None:
        """Encode ``value`` now and keep it in memory until :meth:`commit`.

        A non-``str`` key raises ``TypeError``. A key or value the codec cannot encode
        raises :class:`~cosmoflow_actors.StorageError` and stores nothing.
        """
        await self.open()
        check_json_key(key)
        self._staged.set(key, self._codec.encode_json(key, value))

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""
        if not await self.contains(key):
            return False
        self._staged.delete(key)
        return True

    async def keys(self) -> list[str]:
        """Return every key, in insertion order."""
        await self.open()
        if not self._staged:
            return list(self._committed)
        return self._staged.merge_keys(self._committed)

    async def keys_with_prefix(self, prefix: str) -> list[str]:
        """Return the keys that start with ``prefix``, in no set order.

        Under :data:`~cosmoflow_actors.storage.base.RESERVED_PREFIX` (the engine's keys)
        it costs what it returns (and the writes since the last commit): the committed
        ones are read from a sorted index of the reserved keys. Under any other prefix it
        looks at every key.
        """
        await self.open()
        if prefix.startswith(RESERVED_PREFIX):
            committed = self._reserved.starting_with(prefix)
        else:
            committed = [key for key in self._committed if key.startswith(prefix)]
        if not self._staged:
            return committed
        return [key for key in self._staged.merge_keys(committed) if key.startswith(prefix)]

    async def contains(self, key: str) -> bool:
        """Return whether ``key`` is stored."""
        try:
            await self._raw(key)
        except KeyError:
            return False
        return True

    async def size(self) -> int:
        """Return the number of keys."""
        await self.open()
        if not self._staged:
            return len(self._committed)
        return len(self._staged.merge_keys(self._committed))

    async def clear(self) -> None:
        """Remove every key."""
        if await self.size():
            self._staged.clear()

    async def commit_step(
        self, ops: list[StagedOp], record_key: str, record: Any, steps_before: int
    ) -> bool:
        """Stage a durable step's writes and its run record together, all or nothing;
        returns True. The batch's :meth:`commit` writes them (one instance holds the
        file, so nobody else writes in between).

        Checks that the stored record counts ``steps_before`` steps (else
        RunConflictError), then stages the ops in order (an update reads the value as
        the ops before it left it) and the record. When anything fails (the record
        check, a value that cannot be encoded, an update function's error) the step's
        writes are dropped, leaving the writes staged before it, and the order of the
        keys, as they were, and the error is raised. Awaits nothing once open.
        """
        await self.open()
        mark = self._staged.mark()
        try:
            check_steps(record_key, await value_or(self, record_key, None), steps_before)
            for kind, key, argument in ops:
                await apply_step_op(self, kind, key, argument)
            await self.set(record_key, record)
        except BaseException:
            self._staged.roll_back(mark)
            raise
        return True

    async def commit(self) -> None:
        """Make the writes since the last commit durable, all or nothing.

        Blocks in a worker thread while it appends them to the journal as one line and
        syncs it, or, when the journal has grown too large or cannot be appended to,
        while it compacts (see the class). An append that fails (a file size limit or a
        full disk, a journal removed or cut short meanwhile) is undone and the commit
        compacts instead: the snapshot holds the store once, where the journal holds
        its history, and it writes back every commit a removed journal held. When the
        write fails the files keep the last commit, the in-memory state returns to it
        and :class:`~cosmoflow_actors.StorageError` names the file, with the
        ``OSError`` as ``__cause__``. So it does, changing no file, when another process
        wrote the journal since this store last read or wrote it.
        """
        await self.open()
        if not self._staged:
            return
        try:
            if self._must_compact():
                await self._compact(self._staged_state())
            else:
                await self._append_or_compact()
        finally:
            self._staged.reset()

    async def aclose(self) -> None:
        """Compact the committed state into the snapshot, unlock the files and forget
        the in-memory state (a closed instance holds no value); does nothing unless open.

        Afterwards ``PATH`` alone holds every committed key and the journal holds no
        commit: it compacts when the journal holds commits, and when the snapshot is not
        the size this store last read or wrote (removed or cut short from outside while
        open), which writes back what the store holds. Uncommitted writes are dropped.
        Blocks in a worker thread while it checks, writes and unlocks. The storage can
        be used again: the next call opens the files afresh. When the compaction fails
        (:class:`~cosmoflow_actors.StorageError`, no file changed: every commit stays in
        the journal) the files are unlocked all the same. A cancelled close unlocks
        before the cancellation goes on. A close while another is under way does
        nothing.
        """
        if not self._opened:
            return
        self._opened = False
        self._staged.reset()
        unlock, self._unlock = self._unlock, None
        assert unlock is not None  # set by open
        try:
            if self._must_compact_at_close() or await _in_thread(self._snapshot_changed):
                await self._compact(self._committed)
        finally:
            self._hold(journal.Loaded())  # a closed instance keeps no value
            await _unlocked(unlock)

    def _hold(self, state: journal.Loaded) -> None:
        """Take ``state`` as the committed state, and index its reserved keys."""
        self._state = state
        self._reserved = _ReservedKeys(state.entries)

    def _committed_ops(self, ops: list[Op[msgspec.Raw]]) -> None:
        """Apply ``ops``, just written to the journal, to the committed state and its
        index of reserved keys."""
        journal.apply_ops(self._committed, ops)
        self._reserved.apply(ops)

    def _must_compact_at_close(self) -> bool:
        """Whether the journal holds commits, or belongs to no snapshot it can continue."""
        state = self._state
        records = state.journal_bytes > len(self._header())
        return records or (state.generation > 0 and not state.journal_usable)

    def _snapshot_changed(self) -> bool:
        """Whether the snapshot is not the size this store last read or wrote, 0 when
        missing (blocks)."""
        try:
            size = os.stat(self._path).st_size
        except FileNotFoundError:
            size = 0
        return size != self._state.snapshot_bytes

    def _must_compact(self) -> bool:
        state = self._state
        limit = max(COMPACT_MIN_BYTES, state.snapshot_bytes)
        return not state.journal_usable or state.journal_bytes > limit

    def _staged_state(self) -> dict[str, msgspec.Raw]:
        entries = self._committed.copy()
        journal.apply_ops(entries, self._staged.ops)
        return entries

    def _header(self) -> bytes:
        return journal.encode_header(self._codec, self._state.generation)

    async def _append_or_compact(self) -> None:
        """Append the staged writes to the journal, or compact them in when the journal
        cannot take them; raise StorageError naming both failures when neither works.

        A journal that another writer wrote to is no place for either: that fails the
        commit at once.
        """
        try:
            await self._append()
        except StorageError as append_error:
            if isinstance(append_error.__cause__, journal.AnotherWriter):
                raise
            try:
                await self._compact(self._staged_state())
            except StorageError as exc:
                raise StorageError(f"{append_error}; nor compact instead: {exc}") from (
                    exc.__cause__ or append_error.__cause__
                )

    async def _append(self) -> None:
        line = journal.encode_commit(self._staged.ops)
        state = self._state
        assert state.journal_seen is not None  # a usable journal was read or written
        try:
            seen = await _in_thread(journal.append, self._journal, line, state.journal_seen)
        except (OSError, StorageError) as exc:
            state.journal_usable = False
            raise StorageError(f"cannot append to {self._journal}: {exc}") from exc
        self._committed_ops(self._staged.ops)
        state.journal_bytes += len(line)
        state.journal_seen = seen

    async def _compact(self, entries: dict[str, msgspec.Raw]) -> None:
        """Write ``entries`` as the next snapshot, then start an empty journal for it.

        Refuses (StorageError, no file changed) when the journal is not as this store
        last left it: the snapshot would drop another writer's commits.
        """
        generation = self._state.generation + 1
        snapshot = journal.encode_snapshot(self._codec, generation, entries)
        seen = self._state.journal_seen
        try:
            mode = await _in_thread(self._write_snapshot, snapshot, seen)
        except OSError as exc:
            raise StorageError(f"cannot write {self._path}: {exc}") from exc
        self._hold(journal.Loaded(entries, generation, len(snapshot), journal_seen=seen))
        header = self._header()
        try:
            seen = await _in_thread(self._restart_journal, header, mode)
        except OSError as exc:
            raise StorageError(
                f"wrote {self._path}, but cannot sync its directory or start its journal: {exc}"
            ) from exc
        self._state.journal_bytes = len(header)
        self._state.journal_usable = True
        self._state.journal_seen = seen

    def _write_snapshot(self, content: bytes, seen: journal.Seen | None) -> int:
        """Check that the journal is as ``seen``, then replace the snapshot; return its
        mode (blocks; runs in a worker thread)."""
        journal.check_unchanged(self._journal, seen)
        mode = journal.mode_of(self._path)
        journal.replace_file(self._path, content, mode)
        return mode

    def _restart_journal(self, header: bytes, mode: int) -> journal.Seen:
        """Sync the snapshot's rename, then replace the journal with ``header``; return
        the new journal as seen (blocks)."""
        journal.sync_directory(self._path.parent)
        seen = journal.replace_file(self._journal, header, mode)
        journal.sync_directory(self._path.parent)
        return seen


@final
class _ReservedKeys:
    """The keys under :data:`~cosmoflow_actors.storage.base.RESERVED_PREFIX` among
    the committed keys of a :class:`FileStorage`, sorted, so that those under a longer
    prefix are found by bisection: a listing costs what it returns, not the size of the
    store. :meth:`FileStorage._hold` builds it with each committed state and
    :meth:`FileStorage._committed_ops` applies each commit to both. Never blocks."""

    __slots__ = ("_sorted",)

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._sorted = sorted(key for key in keys if key.startswith(RESERVED_PREFIX))

    def apply(self, ops: Iterable[Op[Any]]) -> None:
        """Apply the sets, deletes and clears of ``ops``, in order."""
        for op in ops:
            if isinstance(op, ClearOp):
                self._sorted.clear()
            elif op.key.startswith(RESERVED_PREFIX):
                at = bisect_left(self._sorted, op.key)
                found = at < len(self._sorted) and self._sorted[at] == op.key
                if isinstance(op, SetOp) and not found:
                    self._sorted.insert(at, op.key)
                elif not isinstance(op, SetOp) and found:
                    del self._sorted[at]

    def starting_with(self, prefix: str) -> list[str]:
        """The keys that start with ``prefix``, sorted."""
        start = end = bisect_left(self._sorted, prefix)
        while end < len(self._sorted) and self._sorted[end].startswith(prefix):
            end += 1
        return self._sorted[start:end]


async def _unlocked(unlock: weakref.finalize[[lock.Held], FileStorage]) -> None:
    """Release the lock ``unlock`` releases (once), in a worker thread, shielded from
    cancellation so that the lock is never kept."""
    with trio.CancelScope(shield=True):
        await _in_thread(unlock)


@trio.lowlevel.enable_ki_protection
async def _in_thread(function: Callable[[*Ts], T], *args: *Ts) -> T:
    """Return ``function(*args)``, called in a worker thread; blocks only that thread.

    ``trio.to_thread.run_sync`` for less: it checks for cancellation on entry, hands the
    call to trio's thread cache, then waits for it, uncancellably, so a commit is never
    abandoned half done. It skips what to_thread adds to every call (the global thread
    limiter's extra pass through the scheduler, a copied context, renaming the thread
    twice), which made each commit's round trip to the thread half as long again. No
    limiter is needed: each call is a short burst of file I/O that its caller waits for.
    Protected from KeyboardInterrupt (as to_thread is): an interrupt landing between
    starting the thread and parking would leave the thread's answer to wake this task
    wherever it waits next.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()

    def deliver(result: outcome.Outcome[T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(functools.partial(function, *args), deliver)
    value: T = await trio.lowlevel.wait_task_rescheduled(_keep_waiting)
    return value


def _keep_waiting(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
    """Refuse to abandon the thread's call: a cancellation arrives once it returns."""
    return trio.lowlevel.Abort.FAILED


def peek(
    path: str | os.PathLike[str], *, codec: CodecName = "json"
) -> dict[str, outcome.Outcome[Any]]:
    """Every committed key of the store at ``path`` (the engine's reserved keys too),
    each with its decoded value or the error decoding it raised (blocks).

    Reads the snapshot and replays the journal as :meth:`FileStorage.open` does, but
    takes no lock and changes no file: it removes no temporary file and compacts
    nothing. So it reads a store an engine in another process has open: it sees the
    commits made before it read, every one whole (a line being appended is left out),
    and reads again when that process's compaction replaced the files between its two
    reads. Raises :class:`~cosmoflow_actors.StorageError` naming the file when a file
    cannot be read, is not in this backend's format or was written with another codec.
    Symbolic links in ``path`` are followed, as :class:`FileStorage` follows them, so it
    reads the journal of the file a link points to.
    """
    reader = get_codec(codec)
    absolute = _real_path(Path(path).absolute())
    loaded = _read_between_compactions(absolute, reader)
    return {
        key: outcome.capture(reader.read_json, str(absolute), key, raw)
        for key, raw in loaded.entries.items()
    }


def _real_path(path: Path) -> Path:
    """``path``, absolute, with its symbolic links resolved, as far as they exist: the
    file a store at ``path`` is (blocks briefly, reading links). A link to a missing
    file names the file it would create."""
    return Path(os.path.realpath(path))


def _read_between_compactions(path: Path, codec: Codec) -> journal.Loaded:
    """:func:`journal.read` without the lock (blocks): read again, up to
    :data:`PEEK_TRIES` times in all, while the journal continues a later snapshot than
    the one read, as it does when a compaction in the lock holder replaced both files
    between the two reads."""
    for _ in range(PEEK_TRIES - 1):
        with suppress(journal.JournalAhead):
            return journal.read(path, codec)
    return journal.read(path, codec)
