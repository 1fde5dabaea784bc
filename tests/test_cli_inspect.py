"""``cosmoflow graph`` and ``cosmoflow inspect`` (cli/inspect.py): the diagram, and a
store's keys and durable runs, read without changing a file of the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.cli import main
from cosmoflow_actors.cli.run_view import read_run
from cosmoflow_actors.runtime import run_record
from cosmoflow_actors.storage.base import RECORD_PREFIX
from tests.cli_support import fill_sqlite_store, table_row
from tests.storage_suite import RedisServer, unique_namespace
from tests.support import ticking

pytestmark = pytest.mark.usefixtures("plain_output")


def test_graph_prints_the_diagram(counter_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", str(counter_file)]) == 0
    assert capsys.readouterr().out.splitlines()[3:] == [
        "flowchart TD",
        '    subgraph checks ["checks"]',
        '        checks__flaky["flaky"]',
        "    end",
        '    count["count"]',
        "    checks --> count",
    ]
    assert main(["graph", f"{counter_file}:checks", "--format", "dot"]) == 0
    assert capsys.readouterr().out == (
        'digraph "checks" {\n'
        "    compound=true;\n"
        "    node [shape=box];\n"
        '    "flaky" [label="flaky"];\n'
        "}\n"
    )


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_run_on_a_persistent_store_then_inspect_it(
    kind: str, tmp_path: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"{kind}:{tmp_path / 'state'}"
    for _ in range(2):
        assert main(["run", str(counter_file), "--store", store, "--param", "who=ada"]) == 0
    assert "result:       2" in capsys.readouterr().out
    assert main(["inspect", store]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"store: {store}\nkeys (2)")
    assert table_row(out, "count") == ["count", "int", "2"]
    assert table_row(out, "who") == ["who", "str", "'ada'"]
    assert main(["inspect", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "store": store,
        "keys": {"count": 2, "who": "ada"},
        "runs": [],
    }


def test_run_and_inspect_on_redis(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"{redis_server.url}#{unique_namespace()}"
    assert main(["run", str(counter_file), "--store", store, "--runs", "3"]) == 0
    capsys.readouterr()
    assert main(["inspect", store]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"store: RedisStorage('{redis_server.url}', namespace=")
    assert table_row(out, "count") == ["count", "int", "3"]


def test_inspect_shows_long_values_shortened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fill() -> None:
        storage = cf.FileStorage(tmp_path / "s.json")
        await storage.set("items", list(range(100)))
        await storage.commit()
        await storage.aclose()

    trio.run(fill)
    before = (tmp_path / "s.json").read_bytes()
    assert main(["inspect", f"file:{tmp_path / 's.json'}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == {"items": list(range(100))}
    assert main(["inspect", f"file:{tmp_path / 's.json'}"]) == 0
    [_, kind, value] = table_row(capsys.readouterr().out, "items")
    assert (kind, value) == ("list", repr(list(range(100)))[:59] + "…")
    assert (tmp_path / "s.json").read_bytes() == before


class ReprRaises:
    """A value whose ``repr`` raises."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr here")


def test_inspect_lists_a_value_it_cannot_show_as_such_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value read but whose repr or JSON text raises (an int longer than Python
    converts to text, a ``__repr__`` that raises) is shown as one that cannot be shown;
    every other value is listed, and the first such key named (status 2)."""
    path = tmp_path / "s.db"

    async def fill() -> None:
        storage = cf.SQLiteStorage(path, codec="pickle")
        for key, value in (("a", 1), ("big", 10**5000), ("odd", [ReprRaises()]), ("z", "end")):
            await storage.set(key, value)
        await storage.commit()
        await storage.aclose()

    trio.run(fill)
    store = f"sqlite:{path}"
    digits = "ValueError: Exceeds the limit (4300 digits) for integer string conversion"
    assert main(["inspect", store, "--codec", "pickle"]) == 2
    captured = capsys.readouterr()
    assert table_row(captured.out, "a")[1:] == ["int", "1"]
    assert table_row(captured.out, "big")[1:] == ["int", f"<cannot be shown: {digits}"[:59] + "…"]
    assert table_row(captured.out, "odd")[1:] == [
        "list",
        "<cannot be shown: RuntimeError: no repr here>",
    ]
    assert table_row(captured.out, "z")[1:] == ["str", "'end'"]
    assert captured.err.startswith(
        f"cosmoflow: error: {store}: the value of 'big' cannot be shown (and 1 more): {digits}"
    )
    assert main(["inspect", store, "--codec", "pickle", "--json"]) == 2
    captured = capsys.readouterr()
    keys = json.loads(captured.out)["keys"]
    assert keys["big"].startswith(f"<cannot be shown: {digits}")
    assert keys | {"big": None} == {
        "a": 1,
        "big": None,
        "odd": "<cannot be shown: RuntimeError: no repr here>",
        "z": "end",
    }
    assert captured.err.count("\n") == 1


def test_inspect_lists_the_durable_runs_of_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "runs.json"
    flow = cf.Flow.builder("chain").add_node("a", cf.Node()).add_node("b", cf.Node())
    flow.add_route("a", "b").build().run_sync(cf.FileStorage(path), run_id="nightly")
    assert main(["inspect", f"file:{path}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == [
        {
            "run_id": "nightly",
            "flow_name": "chain",
            "state": "succeeded",
            "last_node_id": "b",
            "steps": 2,
            "owner": None,
            "queue": None,
            "lease_left": None,
            "parent_id": None,
            "error": None,
        }
    ]
    assert main(["inspect", f"file:{path}"]) == 0
    out = capsys.readouterr().out
    assert "runs (1)" in out
    row = ["nightly", "-", "chain", "succeeded", "b", "2", "-", "-", "-"]
    assert table_row(out, "nightly") == row


def test_inspect_says_what_a_failed_run_failed_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    @cf.node
    def fails(ctx: cf.ExecutionContext) -> None:
        raise RuntimeError("b fails")

    path = tmp_path / "runs.json"
    flow = cf.Flow.builder("chain").add_node("a", cf.Node()).add_node("b", fails)
    with pytest.raises(cf.NodeError):
        flow.add_route("a", "b").build().run_sync(cf.FileStorage(path), run_id="nightly")
    failure = "NodeError: node 'b' failed in exec (flow 'chain', run nightly, 1 attempt)"
    assert main(["inspect", f"file:{path}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["error"] == failure
    assert main(["inspect", f"file:{path}"]) == 0
    out = capsys.readouterr().out
    row = ["nightly", "-", "chain", "failed", "a", "1", "-", "-", failure]
    assert table_row(out, "nightly") == row


def run_ticking(scheme: str, path: Path, steps: int) -> None:
    """The durable run "long" of the flow ``ticking``, ``steps`` steps, in the file or
    SQLite (``scheme``) store at ``path``."""
    storage = cf.FileStorage(path) if scheme == "file" else cf.SQLiteStorage(path)

    async def seeded_run() -> None:
        async with cf.open_engine() as engine:
            async with engine.open_store(storage) as store:
                await store.set("steps", steps)
            await engine.run(ticking(), storage, run_id="long")

    trio.run(seeded_run)


@pytest.mark.parametrize("scheme", ["file", "sqlite"])
def test_inspect_counts_the_steps_of_a_run_whose_path_is_in_chunks_and_hides_them(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    scheme: str,
) -> None:
    monkeypatch.setattr(run_record, "PATH_CHUNK", 3)
    path = tmp_path / "runs.db"
    run_ticking(scheme, path, 7)
    assert main(["inspect", f"{scheme}:{path}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["keys"] == {"steps": 7, "n": 7}
    assert [(run["run_id"], run["steps"]) for run in report["runs"]] == [("long", 7)]


class EachName(cf.BatchFlow):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, str]]:
        return [{"name": name} for name in ("a", "b")]


def test_inspect_shows_the_parent_of_a_batch_flows_child_runs(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Read without an engine (a file) and through one (Redis): each child names its
    parent, right after it, "-" for a run that is no child."""
    inner = cf.Flow.builder("child").add_node("one", cf.Node()).build()
    flow = cf.Flow.builder("parent").add_node("each", EachName(inner)).build()
    namespace = unique_namespace()
    stores = {
        f"file:{tmp_path / 'runs.json'}": cf.FileStorage(tmp_path / "runs.json"),
        f"{redis_server.url}#{namespace}": redis_server.storage(namespace),
    }
    for store, storage in stores.items():
        flow.run_sync(storage, run_id="job")
        assert main(["inspect", store]) == 0
        out = capsys.readouterr().out
        runs = out[out.index("runs (3)") :].splitlines()
        rows = [line.strip("│ ").split("│") for line in runs if line.startswith("│")]
        assert [[cell.strip() for cell in row] for row in rows] == [
            ["job", "-", "parent", "succeeded", "each", "1", "-", "-", "-"],
            ["job:1/0", "job", "child", "succeeded", "one", "1", "-", "-", "-"],
            ["job:1/1", "job", "child", "succeeded", "one", "1", "-", "-", "-"],
        ]


def snapshot_of(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``directory`` with its content and mtime."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in directory.iterdir()}


async def fill_file_store(path: Path) -> None:
    """A file store with commits in its journal (not closed: not compacted)."""
    storage = cf.FileStorage(path)
    await storage.set("a", 1)
    await storage.commit()
    await storage.set("b", [1, 2])
    await storage.commit()


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_inspect_changes_no_file_of_the_store(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It may only add the files of an SQLite reader: a closed database's -shm index
    and its -wal, empty."""
    path = tmp_path / "store"
    trio.run(fill_file_store if kind == "file" else fill_sqlite_store, path)
    if kind == "file":  # and a torn last line, as a crash during an append leaves
        with (tmp_path / "store.journal").open("ab") as journal:
            journal.write(b'[["set","c",')
    before = snapshot_of(tmp_path)
    assert main(["inspect", f"{kind}:{path}"]) == 0
    assert table_row(capsys.readouterr().out, "b") == ["b", "list", "[1, 2]"]
    assert main(["inspect", f"{kind}:{path}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == {"a": 1, "b": [1, 2]}
    after = snapshot_of(tmp_path)
    assert {name: after[name] for name in before} == before
    added = {name: after[name][0] for name in after.keys() - before.keys()}
    assert added.keys() == ({"store-shm", "store-wal"} if kind == "sqlite" else set())
    assert added.get("store-wal", b"") == b""


def test_inspect_shows_an_empty_sqlite_file_as_an_empty_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    before = snapshot_of(tmp_path)
    assert main(["inspect", f"sqlite:{path}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == {}
    assert snapshot_of(tmp_path) == before


def test_inspect_shows_keys_values_and_run_ids_as_they_are_not_as_rich_markup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Brackets and colons a user chose are text: rich neither styles them, nor turns
    them into emoji, nor fails on a closing tag that closes nothing."""
    path = tmp_path / "s.json"

    @cf.node
    async def write(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set("[bold]name", ":thumbs_up: a[/]b")

    flow = cf.Flow.builder("marked").add_node("write", write).build()
    flow.run_sync(cf.FileStorage(path), run_id="[dim]r1")
    assert main(["inspect", f"file:{path}"]) == 0
    out = capsys.readouterr().out
    assert table_row(out, "[bold]name") == ["[bold]name", "str", "':thumbs_up: a[/]b'"]
    assert table_row(out, "[dim]r1")[:4] == ["[dim]r1", "-", "marked", "succeeded"]


def test_inspect_piped_keeps_each_row_whole_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a stdout that is no terminal the tables are as wide as their rows, so that a
    line holds a whole id (for grep, awk, xargs), however long."""
    path = tmp_path / "s.json"
    run_id = "nightly-report-of-the-eu-west-region-" + "0" * 30
    long_name = "flow-with-a-name-long-enough-to-share-the-width"
    flow = cf.Flow.builder(long_name).add_node("a-node-with-a-long-id", cf.Node()).build()
    flow.run_sync(cf.FileStorage(path), run_id=run_id)
    assert main(["inspect", f"file:{path}"]) == 0
    row = table_row(capsys.readouterr().out, run_id)
    assert row[:5] == [run_id, "-", long_name, "succeeded", "a-node-with-a-long-id"]


class Go(cf.Node):
    """Goes on with ``params`` in its action."""

    def __init__(self, **params: str) -> None:
        super().__init__()
        self.params = params

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.with_params("default", **self.params)


class Hold(cf.Node):
    """Never ends its step: the run's failure cancels it, under way."""

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        await trio.sleep_forever()


@cf.node
def fails(ctx: cf.ExecutionContext) -> None:
    raise RuntimeError("e2 fails")


def stopped_fan_out() -> cf.Flow:
    """A fan-out from ``start`` to its join ``j`` (which it reaches itself, with
    ``start``'s params), a branch held inside the nested flow ``b`` and one that fans out
    again at ``c1`` (no join), to ``d``, held, and ``e``, whose next step fails the run.
    Only ``start``, ``c1`` and ``e`` commit, in that order, so the places the run leaves
    are always the same."""
    inner = cf.Flow.builder("inner").add_node("x", Hold()).build()
    return (
        cf.Flow.builder("fan")
        .add_node("start", Go(who="start"))
        .add_node("b", inner)
        .add_node("c1", Go())
        .add_node("d", Hold())
        .add_node("e", Go())
        .add_node("e2", fails)
        .add_join("j", cf.Node())
        .add_route("start", ["j", "b", "c1"])
        .add_route("b", "j")
        .add_route("c1", ["d", "e"])
        .add_route("e", "e2")
        .build()
    )


STOPPED_LINES = [
    "path:       start -> c1 -> e",
    "in flight:",
    "  fan-out at 'start': join 'j', 2 branches still out",
    "    branch '1.1/': its step at 'b' > 'x' was under way, with params {'who': 'start'}:"
    " runs 'b' > 'x' again on resume",
    "    arrived at the join: {'who': 'start'}",
    "    fan-out at 'c1' by branch '1.2/': join none reached yet, 2 branches still out",
    "      branch '1.2/2.0/': its step at 'd' was under way, with params {}:"
    " runs 'd' again on resume",
    "      branch '1.2/2.1/': done at 'e', returned 'default': routed on from there on resume",
    "      arrived at the join: none with params",
]


def stopped_store(kind: str, tmp_path: Path, redis_server: RedisServer) -> tuple[str, cf.Storage]:
    """A store of ``kind`` as ``--store`` names it, and its storage."""
    if kind == "redis":
        namespace = unique_namespace()
        return f"{redis_server.url}#{namespace}", redis_server.storage(namespace)
    path = tmp_path / "runs"
    storage = cf.FileStorage(path) if kind == "file" else cf.SQLiteStorage(path)
    return f"{kind}:{path}", storage


@pytest.mark.parametrize("kind", ["file", "sqlite", "redis"])
def test_inspect_run_shows_where_each_branch_of_a_stopped_fan_out_stands(
    kind: str, tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each open fan-out, nested in the branch that forked it, with its branches in
    flight (under way or done), how many are out and the params at its join; the same
    in JSON; and the files of a file or SQLite store are left as they were."""
    store, storage = stopped_store(kind, tmp_path, redis_server)
    with pytest.raises(cf.NodeError):
        stopped_fan_out().run_sync(storage, run_id="r2")
    before = snapshot_of(tmp_path)
    assert main(["inspect", store, "--run", "r2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    failure = "NodeError: node 'e2' failed in exec (flow 'fan', run r2, 1 attempt)"
    assert lines[1:4] == ["run:        r2", "flow:       fan", "state:      failed"]
    assert f"error:      {failure}" in lines
    assert lines[-len(STOPPED_LINES) :] == STOPPED_LINES
    assert main(["inspect", store, "--run", "r2", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert (run["state"], run["steps"], run["error"]) == ("failed", 3, failure)
    assert run["path"] == ["start", "c1", "e"]
    assert run["in_flight"] == {
        "branches": [],
        "fan_outs": [
            {
                "forked_at": ["start"],
                "from_branch": "",
                "join": "j",
                "pending": 2,
                "branches": [under_way("1.1/", ["b", "x"], {"who": "start"})],
                "arrivals": [{"who": "start"}],
                "fan_outs": [
                    {
                        "forked_at": ["c1"],
                        "from_branch": "1.2/",
                        "join": None,
                        "pending": 2,
                        "branches": [
                            under_way("1.2/2.0/", ["d"], {}),
                            {
                                "label": "1.2/2.1/",
                                "at": ["e"],
                                "under_way": False,
                                "params": {},
                                "action": {"name": "default", "params": {}},
                            },
                        ],
                        "arrivals": [],
                        "fan_outs": [],
                    }
                ],
            }
        ],
    }
    after = snapshot_of(tmp_path)  # an SQLite reader may add its -shm and -wal files
    assert {name: after[name] for name in before} == before


def under_way(label: str, at: list[str], params: dict[str, str]) -> dict[str, Any]:
    """A branch in ``--json``, whose step at ``at`` was under way with ``params``."""
    return {"label": label, "at": at, "under_way": True, "params": params, "action": None}


@pytest.mark.parametrize("scheme", ["file", "sqlite"])
def test_inspect_run_shows_the_last_of_a_long_path_and_json_all_of_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    scheme: str,
) -> None:
    """A run that succeeded has nothing in flight; its path is read from its chunks."""
    monkeypatch.setattr(run_record, "PATH_CHUNK", 4)
    path = tmp_path / "runs"
    run_ticking(scheme, path, 25)
    assert main(["inspect", f"{scheme}:{path}", "--run", "long"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "state:      succeeded" in lines
    assert lines[-2:] == [
        "path:       (5 earlier steps) -> " + " -> ".join(["tick"] * 20),
        "in flight:  -",
    ]
    assert main(["inspect", f"{scheme}:{path}", "--run", "long", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert (run["steps"], run["path"]) == (25, ["tick"] * 25)
    assert run["in_flight"] == {"branches": [], "fan_outs": []}


def test_inspect_run_names_a_batch_flows_children_and_refuses_an_unknown_run(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inner = cf.Flow.builder("child").add_node("one", cf.Node()).build()
    flow = cf.Flow.builder("parent").add_node("each", EachName(inner)).build()
    namespace = unique_namespace()
    stores = {
        f"file:{tmp_path / 'runs.json'}": cf.FileStorage(tmp_path / "runs.json"),
        f"{redis_server.url}#{namespace}": redis_server.storage(namespace),
    }
    for store, storage in stores.items():
        flow.run_sync(storage, run_id="job")
        assert main(["inspect", store, "--run", "job"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert "children:   job:1/0 (succeeded), job:1/1 (succeeded)" in out
        assert main(["inspect", store, "--run", "job:1/1", "--json"]) == 0
        run = json.loads(capsys.readouterr().out)["run"]
        assert (run["parent_id"], run["children"], run["path"]) == ("job", [], ["one"])
        assert main(["inspect", store, "--run", "job:1/2"]) == 2
        named = store if store.startswith("file:") else repr(storage)
        assert capsys.readouterr().err == (
            f"cosmoflow: error: {named}: no run 'job:1/2' is recorded\n"
        )


def test_inspect_run_names_a_damaged_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "runs.json"
    with pytest.raises(cf.NodeError):
        stopped_fan_out().run_sync(cf.FileStorage(path), run_id="r2")
    key = "__cosmoflow__/parts/r2/at/1"

    async def damage() -> None:
        storage = cf.FileStorage(path)
        await storage.open()
        assert await storage.contains(key)
        await storage.set(key, {"branch": 5})
        await storage.commit()
        await storage.aclose()

    trio.run(damage)
    assert main(["inspect", f"file:{path}", "--run", "r2"]) == 2
    assert capsys.readouterr().err == (
        f"cosmoflow: error: file:{path}: cannot read run 'r2': run 'r2': the store holds "
        f"no valid place under {key!r}: branch is 5 (int), not an object (the engine never "
        "writes that: the place was crafted or damaged)\n"
    )


class MovedOnOnce(cf.Storage):
    """A store of the user's own on the SQLite file ``path``, where, right after the
    first read of a run's record alone (``get``; ``list_runs`` reads the records with
    ``get_many``), another engine forgets the run and runs it again
    (the store's "steps" set to 3 first), as another process moving the run on would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sqlite = cf.SQLiteStorage(path)
        self.moved = False

    async def open(self) -> None:
        await self.sqlite.open()

    async def aclose(self) -> None:
        await self.sqlite.aclose()

    async def get(self, key: str) -> Any:
        value = await self.sqlite.get(key)
        if not self.moved and key.startswith(RECORD_PREFIX):
            self.moved = True
            await self._run_again(key.removeprefix(RECORD_PREFIX))
        return value

    async def _run_again(self, run_id: str) -> None:
        other = cf.SQLiteStorage(self.path)
        assert await cf.forget_run(other, run_id)
        async with cf.open_engine() as engine:
            async with engine.open_store(other) as store:
                await store.set_many({"steps": 3, "n": 0})
            await engine.run(ticking(), other, run_id=run_id)

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        return await self.sqlite.get_many(keys)

    async def set(self, key: str, value: Any) -> None:
        await self.sqlite.set(key, value)

    async def delete(self, key: str) -> bool:
        return await self.sqlite.delete(key)

    async def keys(self) -> list[str]:
        return await self.sqlite.keys()


def test_inspect_run_reads_again_a_run_another_engine_moved_on_meanwhile(
    tmp_path: Path,
) -> None:
    """Its record read, then its parts with the record again, which has changed: the
    run is read again and shown as it is now, not refused as a conflict."""
    path = tmp_path / "runs.db"

    async def two_steps() -> None:
        async with cf.open_engine() as engine:
            async with engine.open_store(cf.SQLiteStorage(path)) as store:
                await store.set("steps", 2)
            await engine.run(ticking(), cf.SQLiteStorage(path), run_id="r")

    trio.run(two_steps)
    view = trio.run(read_run, "mine", MovedOnOnce(path), "r")
    assert (view.run.steps, view.path) == (3, ["tick"] * 3)


@pytest.mark.parametrize("run", [["--run", "good"], []], ids=["--run", "the whole store"])
def test_inspect_on_redis_names_the_store_of_a_damaged_record_of_another_run(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str], run: list[str]
) -> None:
    """The runs' rows (for the run's children and lease) cannot be read: bad input
    naming the store and the key, as forget --state says."""
    namespace = unique_namespace()
    storage = redis_server.storage(namespace)
    flow = cf.Flow.builder("one").add_node("one", cf.Node()).build()
    flow.run_sync(storage, run_id="good")
    damaged = f"{RECORD_PREFIX}zz"

    async def damage() -> None:
        await storage.open()
        await storage.set(damaged, {"bogus": 1})
        await storage.commit()
        await storage.aclose()

    trio.run(damage)
    assert main(["inspect", f"{redis_server.url}#{namespace}", *run]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cosmoflow: error: {storage!r}: cannot list its runs: ")
    assert repr(damaged) in err


def test_inspect_on_redis_of_a_field_that_is_not_utf8_is_bad_input_naming_it(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another client wrote a field that is no key of the store: status 2 (a bad store,
    as an SQLite store's key that is not text gives), not 1 (a run failed)."""
    namespace = unique_namespace()
    storage = redis_server.storage(namespace)
    cf.Flow.builder("one").add_node("one", cf.Node()).build().run_sync(storage, run_id="r")
    with redis_server.client() as client:
        client.hset(f"cosmoflow:{namespace}:data", b"\xff\xfe", b"1")

    assert main(["inspect", f"{redis_server.url}#{namespace}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cosmoflow: error: cannot list the keys of the store: {storage!r}: ")
    assert f"cosmoflow:{namespace}:data holds the field b'\\xff\\xfe'" in err


def test_inspect_run_of_a_run_that_took_no_step_escapes_its_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose first step failed shows "-" for its path; a newline and a terminal's
    escape in its id are shown as Python escapes, on the line of the id."""
    path = tmp_path / "store.json"
    run_id = "odd\n\x1b[31mred"
    flow = cf.Flow.builder("fails").add_node("boom", cf.node(lambda ctx: 1 / 0)).build()
    with pytest.raises(cf.NodeError):
        flow.run_sync(cf.FileStorage(path), run_id=run_id)
    assert main(["inspect", f"file:{path}", "--run", run_id]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "run:        odd\\n\\x1b[31mred" in lines
    assert "path:       -" in lines
