"""``--store`` (cli/stores.py): a store that cannot be opened or a value that cannot be
read, and stores of the user's own: python:MODULE:FACTORY[:ARGUMENT], schemes of
packages, and a worker's store per run."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import redis
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.cli import main, stores
from tests.cli_support import EXAMPLES, fill_sqlite_store, result_within, table_row
from tests.storage_suite import RedisServer, unique_namespace

pytestmark = pytest.mark.usefixtures("plain_output")


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("memory", "memory: a memory store lives only as long as its run; nothing to {doing}"),
        ("file:missing.json", "file:missing.json: no such file"),
        ("sqlite:missing.db", "sqlite:missing.db: no such file"),
    ],
)
@pytest.mark.parametrize("command", [["inspect"], ["forget", "r"]], ids=["inspect", "forget"])
def test_a_command_on_what_a_store_holds_needs_an_existing_persistent_store(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    store: str,
    message: str,
) -> None:
    """No file is created: opening a missing file store would make an empty one."""
    monkeypatch.chdir(tmp_path)
    [doing, *run_ids] = command
    assert main([doing, store, *run_ids]) == 2
    assert capsys.readouterr().err.strip() == f"cosmoflow: error: {message.format(doing=doing)}"
    assert list(tmp_path.iterdir()) == []


def test_a_store_that_cannot_be_opened_is_bad_input(
    tmp_path: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for argv in (
        ["run", str(counter_file), "--store", f"file:{broken}"],
        ["inspect", f"file:{broken}"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cosmoflow: error: cannot open the store: {broken}")
        assert err.count("\n") == 1
    assert broken.read_text() == "{not json"


def test_a_value_that_cannot_be_read_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.db"
    trio.run(fill_sqlite_store, path)
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("UPDATE cosmoflow_store SET value = 'text' WHERE key = 'b'")
    store = f"sqlite:{path}"
    assert main(["run", str(EXAMPLES / "hello_world.py"), "--store", store, "--json"]) == 0
    captured = capsys.readouterr()
    problem = "its stored value is a str, not bytes"
    assert json.loads(captured.out)["store"] == {
        "a": 1,
        "b": f"<unreadable: {problem}>",
        "greeting": "Hello, world!",
    }
    message = f"{store}: the value of 'b' cannot be read: {problem}"
    assert captured.err.startswith(f"cosmoflow: warning: {message}")
    assert main(["inspect", store]) == 2
    captured = capsys.readouterr()
    assert table_row(captured.out, "b")[1:] == ["unreadable", f"<unreadable: {problem}>"]
    assert captured.err == f"cosmoflow: error: {message}\n"
    assert captured.err.count("\n") == 1


USER_BACKEND = """
import json
from pathlib import Path

import trio

import cosmoflow_actors as cf


class JsonDocStorage(cf.Storage):
    \"\"\"The whole store as one JSON document, written by each commit, with the codec
    the store was built with.\"\"\"

    def __init__(self, path, codec="json"):
        self.document = Path(path)
        self.requested_codec = codec
        self.data = {}

    async def open(self):
        if self.document.exists():
            text = await trio.to_thread.run_sync(self.document.read_text)
            self.data = json.loads(text)["data"]

    async def get(self, key):
        return self.data[key]

    async def set(self, key, value):
        self.data[key] = value

    async def delete(self, key):
        return self.data.pop(key, None) is not None

    async def keys(self):
        return list(self.data)

    async def commit(self):
        text = json.dumps({"codec": self.requested_codec, "data": self.data})
        await trio.to_thread.run_sync(self.document.write_text, text)


def per_run(folder, run_id):
    if run_id.startswith("forbidden"):
        raise PermissionError(f"run {run_id} may not use {folder}")
    return JsonDocStorage(Path(folder) / f"{run_id}.json")


def not_storage(argument):
    return {argument: 1}


def broken(argument):
    raise ValueError(f"no bucket {argument}")


NOT_CALLABLE = 42
"""


@pytest.fixture
def user_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The module ``user_backend`` (a Storage of its own and factories) in a folder on
    sys.path, with ``raising_backend`` (raises when imported) and ``needy_backend``
    (imports a module that is not installed); yields the folder."""
    folder = tmp_path / "backends"
    folder.mkdir()
    (folder / "user_backend.py").write_text(USER_BACKEND)
    (folder / "raising_backend.py").write_text("raise RuntimeError('no credentials')\n")
    (folder / "needy_backend.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in ("user_backend", "raising_backend", "needy_backend"):
        sys.modules.pop(name, None)


def declare_schemes(folder: Path, package: str, schemes: dict[str, str]) -> None:
    """Install (in ``folder``, on sys.path) a package's metadata that declares
    ``schemes`` in the group cosmoflow_actors.storage, as its packaging would."""
    info = folder / f"{package}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    lines = [f"{scheme} = {target}" for scheme, target in schemes.items()]
    (info / "entry_points.txt").write_text("[cosmoflow_actors.storage]\n" + "\n".join(lines))


def test_a_python_store_runs_a_flow_in_a_process(
    user_backend: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The factory gets ARGUMENT (colons and all) and --codec; inspect reads the store."""
    document = user_backend / "state:1.json"
    store = f"python:user_backend:JsonDocStorage:{document}"
    command = [sys.executable, "-m", "cosmoflow_actors", "run", str(counter_file)]
    command += ["--store", store, "--codec", "pickle", "--param", "who=ada", "--json"]
    paths = [str(user_backend), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["store"] == {"who": "ada", "count": 1}
    assert json.loads(document.read_text()) == {
        "codec": "pickle",
        "data": {"who": "ada", "count": 1},
    }
    assert main(["inspect", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keys"] == {"who": "ada", "count": 1}


def test_a_scheme_a_package_declares_names_its_store(
    user_backend: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    declare_schemes(user_backend, "jsondoc", {"jsondoc": "user_backend:JsonDocStorage"})
    document = user_backend / "doc.json"
    for _ in range(2):
        assert main(["run", str(counter_file), "--store", f"jsondoc:{document}"]) == 0
    assert "result:       2" in capsys.readouterr().out
    assert json.loads(document.read_text())["data"] == {"who": "nobody", "count": 2}


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("python:no_such_module:make", "no module named 'no_such_module'"),
        (
            "python:needy_backend:make",
            "importing needy_backend raised ModuleNotFoundError: No module named"
            " 'no_such_dependency'",
        ),
        (
            "python:raising_backend:make",
            "importing raising_backend raised RuntimeError: no credentials",
        ),
        ("python:user_backend:absent", "module 'user_backend' has no attribute 'absent'"),
        ("python:user_backend:broken.inner", "user_backend:broken has no attribute 'inner'"),
        ("python:user_backend:NOT_CALLABLE", "user_backend:NOT_CALLABLE is an int, not a"),
        (
            "python:user_backend:not_storage:x",
            "user_backend:not_storage('x') returned a dict, not a Storage",
        ),
        ("python:user_backend:broken:x", "user_backend:broken('x') raised ValueError: no bucket x"),
        (
            "python:user_backend:JsonDocStorage",
            "cannot call user_backend:JsonDocStorage(): missing a required argument: 'path'",
        ),
        ("python:user_backend", "expected python:MODULE:FACTORY[:ARGUMENT], where MODULE"),
        ("python://host/x", "expected python:MODULE:FACTORY[:ARGUMENT], where MODULE"),
        ("C:\\stores\\x.db", "store 'C:\\\\stores\\\\x.db': expected memory, file:PATH"),
        ("https://host/x", "no installed package declares the scheme 'https'"),
    ],
)
def test_a_store_of_ones_own_that_cannot_be_built_is_bad_input(
    user_backend: Path,
    counter_file: Path,
    capsys: pytest.CaptureFixture[str],
    store: str,
    message: str,
) -> None:
    assert main(["run", str(counter_file), "--store", store]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cosmoflow: error: store {store!r}")
    assert message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("store", ["file:.", "sqlite:/"])
def test_a_store_whose_path_cannot_be_a_file_is_bad_input(
    counter_file: Path, capsys: pytest.CaptureFixture[str], store: str
) -> None:
    assert main(["run", str(counter_file), "--store", store]) == 2
    path = store.partition(":")[2]
    expected = f"cosmoflow: error: store {store!r}: path must name a file, not {path!r}\n"
    assert capsys.readouterr().err == expected


def test_a_mistyped_redis_store_is_refused_showing_no_password(
    counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = "redis:/:s3cret@127.0.0.1:1/0"
    assert main(["run", str(counter_file), "--store", store]) == 2
    ran = capsys.readouterr().err
    queue = "redis://127.0.0.1:1/0/q"
    assert main(["worker", str(counter_file), "--queue", queue, "--store", store]) == 2
    served = capsys.readouterr().err
    assert ran.startswith("cosmoflow: error: store 'redis:/:***@127.0.0.1:1/0': expected")
    assert served.startswith("cosmoflow: error: store 'redis:/:***@127.0.0.1:1/0': expected")


@pytest.mark.parametrize("store", ["redis://:s3cret@h:1/seven", "redis//:s3cret@127.0.0.1:1"])
def test_a_redis_store_whose_url_is_wrong_is_refused_before_any_run(
    store: str, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not run on database 0, nor failed at open; and its password is not shown."""
    assert main(["run", str(counter_file), "--store", store]) == 2
    ran = capsys.readouterr().err
    queue = "redis://127.0.0.1:1/0/q"
    assert main(["worker", str(counter_file), "--queue", queue, "--store", store]) == 2
    served = capsys.readouterr().err
    for err in (ran, served):
        assert "s3cret" not in err
        assert err.count("\n") == 1
    if store.startswith("redis://"):
        assert ran.startswith(
            "cosmoflow: error: RedisStorage url 'redis://:***@h:1/seven': the path"
        )
        assert served.startswith("cosmoflow: error: store 'redis://:***@h:1/seven': the path")
    else:
        assert ran.startswith("cosmoflow: error: store '***@127.0.0.1:1': expected")
        assert served.startswith("cosmoflow: error: store '***@127.0.0.1:1': expected")


def test_a_factory_that_takes_no_codec_is_refused_with_codec(
    user_backend: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = "python:user_backend:not_storage:x"
    assert main(["run", str(counter_file), "--store", store, "--codec", "json"]) == 2
    err = capsys.readouterr().err
    assert "cannot call user_backend:not_storage('x', codec='json'): got an unexpected" in err


def test_a_scheme_several_packages_declare_or_whose_factory_is_missing_is_bad_input(
    user_backend: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    declare_schemes(user_backend, "first", {"twice": "user_backend:JsonDocStorage"})
    declare_schemes(user_backend, "second", {"twice": "user_backend:per_run"})
    declare_schemes(user_backend, "third", {"gone": "user_backend:absent"})
    assert main(["run", str(counter_file), "--store", "twice:x"]) == 2
    err = capsys.readouterr().err
    assert "the scheme 'twice' is declared by several packages: first, second" in err
    assert main(["inspect", "gone:x"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "cosmoflow: error: store 'gone:x' (scheme 'gone' of third):"
        " module 'user_backend' has no attribute 'absent'\n"
    )


def test_a_worker_needs_a_factory_that_takes_the_run_id(
    user_backend: Path, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["worker", str(counter_file), "--queue", "redis://127.0.0.1:1/q", "--store"]
    assert main([*command, f"python:user_backend:JsonDocStorage:{user_backend}"]) == 2
    err = capsys.readouterr().err
    assert "cannot call user_backend:JsonDocStorage('" in err
    assert "got an unexpected keyword argument 'run_id'" in err


def test_a_worker_gives_each_run_the_store_its_factory_makes(
    redis_server: RedisServer, user_backend: Path, counter_file: Path
) -> None:
    """Run R's store is FACTORY(ARGUMENT, run_id=R); a factory that raises fails that
    run alone, and the worker goes on."""
    queue = f"{redis_server.url}/{unique_namespace()}"
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", str(counter_file)]
    command += ["--queue", queue, "--store", f"python:user_backend:per_run:{user_backend}"]
    paths = [str(user_backend), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    with subprocess.Popen(
        [*command, "--name", "w1"], stdout=subprocess.PIPE, text=True, env=env
    ) as worker:
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().startswith("worker w1 serving ")
            trio.run(partial(cf.submit, queue, "counter", run_id="forbidden-1"))
            with pytest.raises(cf.CosmoFlowError, match="PermissionError: run forbidden-1 may"):
                trio.run(result_within, queue, "forbidden-1", 30)
            trio.run(partial(cf.submit, queue, "counter", run_id="r2"))
            done = trio.run(result_within, queue, "r2", 30)
        finally:
            worker.terminate()
    assert (done.result, done.worker) == (1, "w1")
    assert json.loads((user_backend / "r2.json").read_text())["data"]["count"] == 1


def redis_database(redis_server: RedisServer, number: int) -> str:
    """The URL of database ``number`` of the test's server, emptied: its namespaces are
    the test's own."""
    url = f"redis://127.0.0.1:{redis_server.port}/{number}"
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        client.flushdb()
    return url


@pytest.mark.parametrize("command", [["inspect"], ["forget", "r"], ["forget", "--state", "failed"]])
def test_a_command_on_what_a_store_holds_refuses_a_redis_namespace_the_server_lacks(
    redis_server: RedisServer,
    counter_file: Path,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    """Nothing is written (opening the namespace would claim it); the error names the
    namespaces the server holds."""
    url = redis_database(redis_server, 3)
    [doing, *rest] = command
    assert main([doing, f"{url}#orders", *rest]) == 2
    assert capsys.readouterr().err == (
        f"cosmoflow: error: RedisStorage('{url}', namespace='orders'): the server holds "
        "no namespace 'orders' (it holds none)\n"
    )
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        assert client.dbsize() == 0
        assert main(["run", str(counter_file), "--store", f"{url}#orders"]) == 0
        written = sorted(client.keys())
        capsys.readouterr()
        assert main([doing, f"{url}#ordres", *rest]) == 2
        assert capsys.readouterr().err.endswith(
            "the server holds no namespace 'ordres' (its namespaces: 'orders')\n"
        )
        assert sorted(client.keys()) == written
    assert main(["inspect", f"{url}#orders"]) == 0


def test_a_namespace_is_checked_with_the_rights_opening_it_needs(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user the server refuses SCAN and EXISTS inspects a namespace it holds, and is
    told of one it lacks, without a listing; a queue's lease whose run id ends in
    ":meta" is listed as no namespace."""
    url = redis_database(redis_server, 5)
    user = f"limited{uuid.uuid4().hex[:6]}"
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        client.execute_command(
            "ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-scan", "-exists"
        )
        try:
            assert main(["run", str(counter_file), "--store", f"{url}#orders"]) == 0
            client.set("cosmoflow:queue:q:lease:x:meta", "worker")
            capsys.readouterr()
            assert main(["inspect", f"{url}#ordres"]) == 2
            assert capsys.readouterr().err.endswith(
                "the server holds no namespace 'ordres' (its namespaces: 'orders')\n"
            )
            limited = url.replace("redis://", f"redis://{user}:pw@")
            assert main(["inspect", f"{limited}#orders"]) == 0
            capsys.readouterr()
            assert main(["inspect", f"{limited}#ordres"]) == 2
            assert capsys.readouterr().err.endswith("the server holds no namespace 'ordres'\n")
        finally:
            client.execute_command("ACL", "DELUSER", user)


def test_the_namespaces_a_refusal_names_are_capped(
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """At most ten, and none when the scan stops before it saw every key."""
    url = redis_database(redis_server, 4)
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        for number in range(12):
            client.hset(f"cosmoflow:n{number:02}:meta", "format", "x")
        assert main(["inspect", f"{url}#typo"]) == 2
        names = ", ".join(f"'n{number:02}'" for number in range(10))
        assert capsys.readouterr().err.endswith(f"(its namespaces include {names})\n")
        client.flushdb()
        client.mset({f"key{number}": number for number in range(100)})
        monkeypatch.setattr(stores, "NAMESPACE_SCANS", 1)
        monkeypatch.setattr(stores, "SCAN_COUNT", 1)
        assert main(["inspect", f"{url}#typo"]) == 2
        assert capsys.readouterr().err.endswith("(none found among the first 1 keys)\n")
        assert client.dbsize() == 100
