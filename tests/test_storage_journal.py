"""Tests for :mod:`cosmoflow_actors.storage.journal`."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cosmoflow_actors.errors import StorageError
from cosmoflow_actors.storage import journal
from cosmoflow_actors.storage.codec import get_codec
from cosmoflow_actors.storage.journal import Loaded, Seen
from cosmoflow_actors.storage.staged import ClearOp, DeleteOp, Op, SetOp
from tests.storage_suite import file_size_limit

JSON = get_codec("json")
SNAPSHOT = (
    '{"format": "cosmoflow-store", "version": 1, "codec": "json", "generation": %d, '
    '"data": {"a": 1}}'
)
HEADER = '{"format":"cosmoflow-journal","version":1,"codec":"json","generation":%d}\n'


def raw(value: Any, codec: str = "json") -> msgspec.Raw:
    return get_codec(codec).encode_json("k", value)


def values(loaded: Loaded, codec: str = "json") -> list[tuple[str, Any]]:
    """The loaded entries, decoded, in order."""
    return [(key, get_codec(codec).decode_json(value)) for key, value in loaded.entries.items()]


def seen(path: Path) -> Seen:
    status = path.stat()
    return Seen(status.st_ino, status.st_size)


def store(tmp_path: Path, snapshot: str, journal_text: str | None = None) -> Path:
    """Write hand-made files of a store at ``tmp_path / "store.json"``; return its path."""
    path = tmp_path / "store.json"
    path.write_text(snapshot)
    if journal_text is not None:
        journal.journal_path(path).write_text(journal_text)
    return path


def replaced(path: Path, content: bytes) -> None:
    """Put another file with ``content`` under ``path``'s name, as another writer would."""
    other = path.with_name("other")
    other.write_bytes(content)
    os.replace(other, path)


# --- paths and encoders ------------------------------------------------------------------


def test_the_journal_is_beside_the_snapshot() -> None:
    assert journal.journal_path(Path("/data/s.json")) == Path("/data/s.json.journal")


@pytest.mark.parametrize("codec", ["json", "pickle"])
def test_encoded_files_round_trip_through_load(tmp_path: Path, codec: str) -> None:
    path = tmp_path / "store.json"
    ops: list[list[Op[msgspec.Raw]]] = [
        [SetOp("b", raw("one\ntwo", codec)), DeleteOp("z"), SetOp("a", raw(3, codec))],
        [SetOp("z", raw(4, codec)), DeleteOp("missing"), SetOp("b", raw([5], codec))],
    ]
    snapshot = {"z": raw(0, codec), "a": raw({"x": [1, 2]}, codec)}
    path.write_bytes(journal.encode_snapshot(get_codec(codec), 3, snapshot))
    lines = [journal.encode_header(get_codec(codec), 3)]
    lines += [journal.encode_commit(commit) for commit in ops]
    journal.journal_path(path).write_bytes(b"".join(lines))

    loaded = journal.load(path, get_codec(codec))

    assert values(loaded, codec) == [("a", 3), ("b", [5]), ("z", 4)]
    assert loaded.generation == 3
    assert loaded.snapshot_bytes == path.stat().st_size
    assert loaded.journal_bytes == journal.journal_path(path).stat().st_size
    assert loaded.journal_usable
    assert loaded.journal_seen == seen(journal.journal_path(path))


def test_a_header_and_a_commit_are_one_line_each() -> None:
    header = journal.encode_header(JSON, 1)
    commit = journal.encode_commit([SetOp("a\nb", raw("c\nd")), DeleteOp("e"), ClearOp()])

    assert header.count(b"\n") == commit.count(b"\n") == 1
    assert header.endswith(b"\n") and commit.endswith(b"\n")
    assert commit == b'[["set","a\\nb","c\\nd"],["delete","e"],["clear"]]\n'


def test_apply_ops_applies_them_in_order_as_a_dict_would() -> None:
    entries = {"a": raw(1), "b": raw(2)}

    journal.apply_ops(
        entries,
        [SetOp("b", raw(3)), SetOp("c", raw(4)), DeleteOp("a"), DeleteOp("x"), SetOp("a", raw(5))],
    )
    assert [(key, JSON.decode_json(value)) for key, value in entries.items()] == [
        ("b", 3),
        ("c", 4),
        ("a", 5),
    ]

    journal.apply_ops(entries, [SetOp("d", raw(6)), ClearOp(), SetOp("e", raw(7))])
    assert list(entries) == ["e"]


# --- load --------------------------------------------------------------------------------


def test_missing_files_or_directory_load_as_an_empty_store(tmp_path: Path) -> None:
    assert journal.load(tmp_path / "store.json", JSON) == Loaded()
    assert journal.load(tmp_path / "missing" / "store.json", JSON) == Loaded()
    assert os.listdir(tmp_path) == []


def test_a_snapshot_without_a_journal_loads_but_the_journal_is_not_usable(
    tmp_path: Path,
) -> None:
    path = store(tmp_path, SNAPSHOT % 4)

    loaded = journal.load(path, JSON)

    assert values(loaded) == [("a", 1)]
    assert (loaded.generation, loaded.snapshot_bytes) == (4, len(SNAPSHOT % 4))
    assert (loaded.journal_bytes, loaded.journal_usable, loaded.journal_seen) == (0, False, None)


@pytest.mark.parametrize(
    "torn", ['[["set","x",', '[["set","x",9]]', "\x00\x00\x00\n", '\x00\x00\x00"x",9]]\n']
)
def test_a_torn_last_line_is_left_out_and_the_journal_is_not_usable(
    tmp_path: Path, torn: str
) -> None:
    good = HEADER % 1 + '[["set","b",2]]\n'
    path = store(tmp_path, SNAPSHOT % 1, good + torn)

    loaded = journal.load(path, JSON)

    assert values(loaded) == [("a", 1), ("b", 2)]
    assert loaded.journal_bytes == len(good)
    assert not loaded.journal_usable
    assert loaded.journal_seen == seen(journal.journal_path(path))
    assert journal.journal_path(path).read_text() == good + torn


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ('[["set","b",2]]\nnot json\n[["set","c",3]]\n', 3),
        ('[["set","b",2]]\n[["rename","b"]]\n[["set","c",3]]\n', 3),
        ('[["set","b"]]\n[["set","c",3]]\n', 2),
        ('[["set","b",2]]\n\n[["set","c",3]]\n', 3),
    ],
)
def test_a_bad_line_before_the_last_is_refused_naming_the_file_and_line(
    tmp_path: Path, body: str, line: int
) -> None:
    path = store(tmp_path, SNAPSHOT % 1, HEADER % 1 + body)
    name = journal.journal_path(path)

    with pytest.raises(StorageError) as info:
        journal.load(path, JSON)

    assert str(info.value).startswith(f"{name}, line {line}: not a journal commit")
    assert name.read_text() == HEADER % 1 + body


@pytest.mark.parametrize(
    "damaged",
    ["[[\n", "not json\n", '[["rename","b"]]\n', '{"set":"x"}\n', '[["set","x"]]\n', "\n"],
)
def test_a_damaged_last_line_ended_by_its_newline_is_refused_naming_it(
    tmp_path: Path, damaged: str
) -> None:
    """A last line written whole, newline and all, is a commit that returned: when it
    cannot be read, loading it as a torn append would lose it."""
    content = HEADER % 1 + '[["set","b",2]]\n' + damaged
    path = store(tmp_path, SNAPSHOT % 1, content)
    name = journal.journal_path(path)

    with pytest.raises(StorageError) as info:
        journal.load(path, JSON)

    assert str(info.value).startswith(f"{name}, line 3: not a journal commit")
    assert isinstance(info.value.__cause__, msgspec.DecodeError)
    assert name.read_text() == content


def test_an_unreadable_line_before_a_cut_off_one_is_refused(tmp_path: Path) -> None:
    body = '[["set","b",2]]\nnot json\n[["set","c",'
    path = store(tmp_path, SNAPSHOT % 1, HEADER % 1 + body)

    with pytest.raises(StorageError, match=r", line 3: not a journal commit"):
        journal.load(path, JSON)


def test_a_header_without_its_newline_loads_but_takes_no_append(tmp_path: Path) -> None:
    header = (HEADER % 1).rstrip("\n")
    path = store(tmp_path, SNAPSHOT % 1, header)

    loaded = journal.load(path, JSON)

    assert values(loaded) == [("a", 1)]
    assert (loaded.journal_bytes, loaded.journal_usable) == (len(header), False)


def test_a_journal_value_not_of_the_codec_is_refused_even_on_the_last_line(
    tmp_path: Path,
) -> None:
    snapshot = (SNAPSHOT % 1).replace('"json"', '"pickle"').replace('{"a": 1}', "{}")
    header = (HEADER % 1).replace('"json"', '"pickle"')
    path = store(tmp_path, snapshot, header + '[["set","a",1]]\n')

    with pytest.raises(StorageError) as info:
        journal.load(path, get_codec("pickle"))

    assert str(info.value) == (
        f"{journal.journal_path(path)}: the value of 'a' was not written by codec 'pickle'"
    )


@pytest.mark.parametrize(
    ("snapshot", "journal_text", "named", "message"),
    [
        ("{not json", None, "store.json", "does not hold a cosmoflow store"),
        (
            (SNAPSHOT % 1).replace("cosmoflow-store", "other"),
            None,
            "store.json",
            "holds format 'other' version 1, not 'cosmoflow-store' version 1",
        ),
        (
            (SNAPSHOT % 1).replace('"json"', '"pickle"'),
            None,
            "store.json",
            "was written with codec 'pickle' but is opened with codec 'json'",
        ),
        (SNAPSHOT % 1, "not a header\n", "store.json.journal", "does not start with a journal"),
        (
            SNAPSHOT % 1,
            (HEADER % 1).replace('"version":1', '"version":2'),
            "store.json.journal",
            "is not a 'cosmoflow-journal' version 1 journal",
        ),
        (
            SNAPSHOT % 1,
            HEADER % 5,
            "store.json.journal",
            "continues snapshot generation 5, but the snapshot is generation 1",
        ),
    ],
)
def test_a_file_this_format_did_not_write_is_refused_naming_it(
    tmp_path: Path, snapshot: str, journal_text: str | None, named: str, message: str
) -> None:
    path = store(tmp_path, snapshot, journal_text)

    with pytest.raises(StorageError) as info:
        journal.load(path, JSON)

    assert str(info.value).startswith(f"{tmp_path / named} ")
    assert message in str(info.value)


def test_an_unreadable_journal_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    path = store(tmp_path, SNAPSHOT % 1)
    journal.journal_path(path).mkdir()

    with pytest.raises(StorageError) as info:
        journal.load(path, JSON)

    assert str(info.value).startswith(f"cannot read {journal.journal_path(path)}: ")
    assert isinstance(info.value.__cause__, IsADirectoryError)


def test_a_journal_one_generation_behind_is_skipped_but_seen(tmp_path: Path) -> None:
    """A compaction stopped before it replaced the journal: the snapshot already holds
    its commits, and the next commit may replace it (it is as seen)."""
    path = store(tmp_path, SNAPSHOT % 2, HEADER % 1 + '[["set","x",1]]\n')

    loaded = journal.load(path, JSON)

    assert values(loaded) == [("a", 1)]
    assert (loaded.generation, loaded.journal_bytes, loaded.journal_usable) == (2, 0, False)
    assert loaded.journal_seen == seen(journal.journal_path(path))
    journal.check_unchanged(journal.journal_path(path), loaded.journal_seen)


def test_a_journal_two_generations_behind_is_skipped_too(tmp_path: Path) -> None:
    """Two compactions stopped before they replaced the journal (the second one ran
    because the first left the journal behind): it is stale, not from another store."""
    path = store(tmp_path, SNAPSHOT % 3, HEADER % 1 + '[["set","x",1]]\n')

    loaded = journal.load(path, JSON)

    assert values(loaded) == [("a", 1)]
    assert (loaded.generation, loaded.journal_bytes, loaded.journal_usable) == (3, 0, False)


# --- append and check_unchanged ----------------------------------------------------------


def test_append_adds_the_line_and_returns_the_journal_as_seen(tmp_path: Path) -> None:
    path = store(tmp_path, SNAPSHOT % 1, HEADER % 1)
    name = journal.journal_path(path)
    first = journal.encode_commit([SetOp("b", raw(2))])
    second = journal.encode_commit([DeleteOp("a")])

    after = journal.append(name, first, seen(name))
    after = journal.append(name, second, after)

    assert after == seen(name)
    assert name.read_bytes() == (HEADER % 1).encode() + first + second
    assert values(journal.load(path, JSON)) == [("b", 2)]


@pytest.mark.parametrize("change", ["appended", "replaced"])
def test_append_refuses_a_journal_not_as_seen_and_writes_nothing(
    tmp_path: Path, change: str
) -> None:
    name = journal.journal_path(store(tmp_path, SNAPSHOT % 1, HEADER % 1))
    before = seen(name)
    if change == "appended":
        with open(name, "a") as file:
            file.write('[["set","b",2]]\n')
    else:
        replaced(name, name.read_bytes())
    content = name.read_bytes()

    with pytest.raises(journal.AnotherWriter) as info:
        journal.append(name, b'[["clear"]]\n', before)

    assert str(info.value).startswith(f"{name} is not as this store last left it")
    assert name.read_bytes() == content


def test_append_refuses_a_journal_cut_short_and_writes_nothing(tmp_path: Path) -> None:
    """The lines cut off are commits that the appending store holds; appending after
    them would leave a journal without them (the store compacts instead)."""
    name = journal.journal_path(store(tmp_path, SNAPSHOT % 1, HEADER % 1 + '[["clear"]]\n'))
    before = seen(name)
    os.truncate(name, 10)

    with pytest.raises(StorageError, match="cut short to 10 bytes") as info:
        journal.append(name, b'[["clear"]]\n', before)

    assert not isinstance(info.value, journal.AnotherWriter)
    assert name.read_bytes() == (HEADER % 1).encode()[:10]


def test_append_never_creates_a_journal(tmp_path: Path) -> None:
    name = tmp_path / "store.json.journal"

    with pytest.raises(FileNotFoundError):
        journal.append(name, b'[["clear"]]\n', Seen(1, 0))

    assert os.listdir(tmp_path) == []


def test_a_failed_append_cuts_the_journal_back_to_as_seen(tmp_path: Path) -> None:
    """The write fails halfway (EFBIG, as on a full disk): the part written is cut off,
    so the journal is again as seen and the next append may follow."""
    path = store(tmp_path, SNAPSHOT % 1, HEADER % 1)
    name = journal.journal_path(path)
    before = seen(name)
    line = journal.encode_commit([SetOp("big", raw("x" * 8192))])

    with file_size_limit(4096), pytest.raises(OSError) as info:
        journal.append(name, line, before)

    assert info.value.errno == errno.EFBIG
    assert name.read_text() == HEADER % 1
    journal.append(name, journal.encode_commit([SetOp("b", raw(2))]), before)
    assert values(journal.load(path, JSON)) == [("a", 1), ("b", 2)]


def test_check_unchanged_accepts_the_journal_as_seen_or_still_missing(tmp_path: Path) -> None:
    name = tmp_path / "store.json.journal"
    journal.check_unchanged(name, None)
    name.write_text(HEADER % 1)
    journal.check_unchanged(name, seen(name))


@pytest.mark.parametrize("change", ["removed", "cut short"])
def test_check_unchanged_accepts_a_journal_that_lost_commits_this_store_holds(
    tmp_path: Path, change: str
) -> None:
    """No writer removes the journal or cuts it short: what it lost are the checking
    store's own commits, which its compaction writes back."""
    name = tmp_path / "store.json.journal"
    name.write_text(HEADER % 1 + '[["clear"]]\n')
    before = seen(name)
    if change == "removed":
        name.unlink()
    else:
        os.truncate(name, 10)

    journal.check_unchanged(name, before)


@pytest.mark.parametrize("change", ["appended", "replaced", "created"])
def test_check_unchanged_refuses_a_journal_that_changed_naming_it(
    tmp_path: Path, change: str
) -> None:
    name = tmp_path / "store.json.journal"
    name.write_text(HEADER % 1)
    before: Seen | None = seen(name)
    if change == "appended":
        name.write_text(HEADER % 1 + '[["clear"]]\n')
    elif change == "replaced":
        replaced(name, name.read_bytes())
    else:
        before = None

    with pytest.raises(StorageError) as info:
        journal.check_unchanged(name, before)

    assert str(info.value).startswith(f"{name} is not as this store last left it")


# --- files: replace, temporary files, modes ----------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_replace_file_gives_the_mode_asked_and_leaves_no_temp_file(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "store.json"
    path.write_text("old")
    path.chmod(0o666)
    old_inode = path.stat().st_ino

    new = journal.replace_file(path, b"new content", mode)

    assert path.read_bytes() == b"new content"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert new == seen(path)
    assert new.inode != old_inode  # a new file renamed over the old one, not a rewrite
    assert os.listdir(tmp_path) == ["store.json"]


def test_replace_file_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "store.json"

    journal.replace_file(path, b"{}", 0o640)

    assert path.read_bytes() == b"{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["store.json"]


def test_a_replace_that_fails_writing_leaves_the_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    path.write_text("old")

    with file_size_limit(4096), pytest.raises(OSError):
        journal.replace_file(path, b"x" * 8192, 0o600)

    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["store.json"]


def test_a_replace_onto_a_directory_fails_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    path.mkdir()
    (path / "inside").write_text("kept")

    with pytest.raises(OSError):
        journal.replace_file(path, b"{}", 0o600)

    assert os.listdir(tmp_path) == ["store.json"]
    assert (path / "inside").read_text() == "kept"


def test_temp_paths_are_fresh_hidden_names_beside_the_file(tmp_path: Path) -> None:
    path = tmp_path / "store.json"

    first, second = journal.temp_path(path), journal.temp_path(path)

    assert first != second
    assert first.parent == second.parent == tmp_path
    assert re.fullmatch(r"\.store\.json\.[0-9a-f]{16}\.tmp", first.name)


def test_remove_stray_temps_removes_only_the_names_temp_path_makes(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    strays = [journal.temp_path(path), journal.temp_path(path)]
    others = [
        "store.json",
        journal.temp_path(journal.journal_path(path)).name,  # the journal's, not this file's
        journal.temp_path(tmp_path / "other.json").name,
        ".store.json.0123456789ABCDEF.tmp",
        ".store.json.0123456789abcde.tmp",
        ".store.json.0123456789abcdef.tmp.bak",
        "store.json.0123456789abcdef.tmp",
        ".store.json.tmp",
    ]
    for stray in strays:
        stray.write_text("{")
    for name in others:
        (tmp_path / name).write_text("keep")

    journal.remove_stray_temps(path)

    assert sorted(os.listdir(tmp_path)) == sorted(others)


def test_remove_stray_temps_of_files_side_by_side_removes_each_ones(tmp_path: Path) -> None:
    path, beside = tmp_path / "store.json", tmp_path / "store.json.journal"
    strays = [journal.temp_path(path), journal.temp_path(beside)]
    others = ["store.json", journal.temp_path(tmp_path / "other.json").name, ".store.json.tmp"]
    for stray in strays:
        stray.write_text("{")
    for name in others:
        (tmp_path / name).write_text("keep")

    journal.remove_stray_temps(path, beside)

    assert sorted(os.listdir(tmp_path)) == sorted(others)


def test_load_lists_the_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An open costs one listing of the folder, whose size is that of every store in it."""
    listed: list[str] = []
    real_listdir = os.listdir

    def listdir(folder: str) -> list[str]:
        listed.append(str(folder))
        return real_listdir(folder)

    path = tmp_path / "store.json"
    stray = journal.temp_path(journal.journal_path(path))
    stray.write_text("{")
    monkeypatch.setattr(os, "listdir", listdir)

    journal.load(path, get_codec("json"))

    assert listed == [str(tmp_path)]
    assert not stray.exists()


def test_remove_stray_temps_in_a_missing_directory_does_nothing(tmp_path: Path) -> None:
    journal.remove_stray_temps(tmp_path / "missing" / "store.json")

    assert os.listdir(tmp_path) == []


def test_mode_of_is_the_files_mode_or_0600_when_it_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    assert journal.mode_of(path) == 0o600

    path.write_text("{}")
    path.chmod(0o640)
    assert journal.mode_of(path) == 0o640
