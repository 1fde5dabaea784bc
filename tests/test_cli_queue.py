"""The queue commands (cli/queue.py): ``submit``, ``worker``, ``status`` and ``requeue``
against a real redis-server, workers as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.cli import main
from tests.cli_support import EXAMPLES, result_within, table_row
from tests.storage_suite import RedisServer, free_port, unique_namespace

pytestmark = pytest.mark.usefixtures("plain_output")


def test_submit_prints_the_run_id_and_status_shows_the_run_pending(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = f"{redis_server.url}/{unique_namespace()}"
    argv = ["submit", str(counter_file), "--queue", queue, "--param", "n=1", "--run-id", "job-1"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "job-1\n"
    assert main(["status", "--queue", queue]) == 0
    out = capsys.readouterr().out
    assert "0 pending" not in out and "1 pending, 0 running, 0 orphaned" in out
    assert table_row(out, "job-1") == ["job-1", "counter", "pending", "-", "-", "0"]
    assert main(["status", "--queue", queue, "--json"]) == 0
    [run] = json.loads(capsys.readouterr().out)
    assert (run["run_id"], run["state"], run["owner"]) == ("job-1", "pending", None)
    assert main(["status", "--queue", queue, "--state", "failed"]) == 0
    out = capsys.readouterr().out
    assert "1 pending, 0 running" in out and "runs (0)" in out
    assert main(["status", "--queue", queue, "--state", "pending", "--json"]) == 0
    assert [run["run_id"] for run in json.loads(capsys.readouterr().out)] == ["job-1"]


def test_status_piped_prints_each_row_whole(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Piped (``| grep``), a run id longer than a terminal's column is not cut."""
    queue = f"{redis_server.url}/{unique_namespace()}"
    run_id = "a-run-id-long-enough-to-be-cut-" + "x" * 80
    assert main(["submit", str(counter_file), "--queue", queue, "--run-id", run_id]) == 0
    capsys.readouterr()
    assert main(["status", "--queue", queue]) == 0
    assert table_row(capsys.readouterr().out, run_id)[0] == run_id


IMPORTS_COUNTED = """
from pathlib import Path

import cosmoflow_actors as cf

with Path(__file__).with_name("imports.log").open("a") as log:
    log.write("imported\\n")


@cf.node
async def greet(ctx):
    return cf.Action.complete(ctx.params)


hello = cf.Flow.builder("hello").add_node("greet", greet).build()
bye = cf.Flow.builder("bye").add_node("greet", greet).build()
"""
"""Two flows in a file that notes each time it is imported, in imports.log beside it."""


def test_submit_adds_many_runs_and_imports_the_file_once(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flows = tmp_path / "flows.py"
    flows.write_text(IMPORTS_COUNTED)
    queue = f"{redis_server.url}/{unique_namespace()}"
    target = f"{flows}:hello"
    assert main(["submit", target, "--queue", queue, "--runs", "3", "--param", "n=1"]) == 0
    fresh = capsys.readouterr().out.split()
    assert len(set(fresh)) == 3
    params_file = tmp_path / "params.jsonl"
    params_file.write_text('{"n": 2}\n\n{"n": 3, "who": "ada"}\n')
    argv = ["submit", target, "--queue", queue, "--param", "who=bob", "--run-id", "b"]
    assert main([*argv, "--params-file", str(params_file)]) == 0
    assert capsys.readouterr().out == "b-1\nb-2\n"
    assert (tmp_path / "imports.log").read_text() == "imported\n" * 2  # once a command

    async def params_of(run_ids: list[str]) -> list[object]:
        runs = cf.RunQueue.from_url(queue)
        return [(await runs.info(run_id) or {}).get("params") for run_id in run_ids]

    assert trio.run(params_of, [*fresh, "b-1", "b-2"]) == [
        *[{"n": 1}] * 3,
        {"who": "bob", "n": 2},
        {"who": "ada", "n": 3},
    ]
    params_file.write_text('{"n": 4}\n{"n": NaN}\n')
    assert main([*argv, "--params-file", str(params_file)]) == 2
    assert capsys.readouterr().err == (
        f"cosmoflow: error: {params_file}:2: not JSON: NaN is not JSON\n"
    )
    assert trio.run(params_of, ["b-3"]) == [None]  # a bad line: nothing submitted


def test_a_worker_imports_a_file_once_for_all_its_flows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flows = tmp_path / "flows.py"
    flows.write_text(IMPORTS_COUNTED)
    argv = ["worker", f"{flows}:hello", f"{flows}:bye", "--queue", "redis://h/q"]
    assert main([*argv, "--store", "file:x"]) == 2  # refused once the flows are loaded
    assert "store 'file:x'" in capsys.readouterr().err
    assert (tmp_path / "imports.log").read_text() == "imported\n"


def test_requeue_refuses_a_run_that_is_not_failed_or_not_on_the_queue(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = f"{redis_server.url}/{unique_namespace()}"
    assert main(["submit", str(counter_file), "--queue", queue, "--run-id", "job-1"]) == 0
    capsys.readouterr()
    assert main(["requeue", "job-1", "--queue", queue]) == 2
    assert "run 'job-1' is pending on" in capsys.readouterr().err
    assert main(["requeue", "nobody", "--queue", queue]) == 2
    assert "run 'nobody' is not on" in capsys.readouterr().err


def test_status_prints_the_error_of_each_failed_run(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = f"{redis_server.url}/{unique_namespace()}"
    store = f"{redis_server.url}#{unique_namespace()}"

    @cf.node
    async def broken(ctx: cf.ExecutionContext) -> None:
        raise RuntimeError("disk full")

    flow = cf.Flow.builder("broken").add_node("broken", broken).build()

    async def fail_one() -> None:
        async with cf.open_engine() as engine, trio.open_nursery() as nursery:
            await nursery.start(partial(engine.serve, name="w1"), queue, [flow], store)
            await cf.submit(queue, "broken", run_id="job-1")
            with pytest.raises(cf.CosmoFlowError, match="disk full"):
                await cf.result(queue, "job-1")
            nursery.cancel_scope.cancel()

    trio.run(fail_one)
    assert main(["status", "--queue", queue, "--state", "failed"]) == 0
    out = capsys.readouterr().out
    assert table_row(out, "job-1")[2] == "failed"
    error = "NodeError: node 'broken' failed in exec (flow 'broken', run job-1, 1 attempt)"
    assert f"\njob-1 failed: {error} (caused by RuntimeError: disk full)\n" in out  # one line


def test_a_worker_process_runs_the_submitted_runs(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = f"{redis_server.url}/{unique_namespace()}"
    store = f"{redis_server.url}#{unique_namespace()}"
    hello = str(EXAMPLES / "hello_world.py")
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", hello, "--queue", queue]
    command += ["--store", store, "--name", "w1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as worker:
        assert worker.stdout is not None
        assert worker.stdout.readline().startswith("worker w1 serving ")
        assert main(["submit", hello, "--queue", queue]) == 0
        run_id = capsys.readouterr().out.strip()
        done = trio.run(cf.result, queue, run_id)
        worker.terminate()
    assert (done.result, done.worker) == ("HELLO, WORLD!", "w1")
    assert main(["status", "--queue", queue]) == 0
    assert table_row(capsys.readouterr().out, run_id)[2:4] == ["succeeded", "w1"]
    assert main(["inspect", f"{store}/{run_id}", "--json"]) == 0
    [record] = json.loads(capsys.readouterr().out)["runs"]
    assert (record["run_id"], record["state"], record["owner"]) == (run_id, "succeeded", "w1")
    assert record["queue"] == queue


BLOCKS = """
import os

import trio

import cosmoflow_actors as cf


@cf.node
async def step(ctx):
    if os.environ.get("BLOCK"):
        print("in step", flush=True)
        await trio.sleep_forever()
    return cf.Action.complete("done")


flow = cf.Flow.builder("blocks").add_node("step", step).build()
"""
"""A flow whose step never ends in a worker started with BLOCK set in its environment."""


def test_sigterm_stops_a_worker_which_hands_its_run_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A real SIGTERM while the worker's run is in its node: the worker exits with status
    143 and one line, having dropped its lease and given the run back to the queue, so
    that a worker started afterwards takes the run over at once, not after the lease."""
    flow_file = tmp_path / "blocks.py"
    flow_file.write_text(BLOCKS)
    queue = f"{redis_server.url}/{unique_namespace()}"
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", str(flow_file), "--queue"]
    command += [queue, "--store", f"{redis_server.url}#{unique_namespace()}", "--lease", "60"]
    blocking = {**os.environ, "BLOCK": "1"}
    with subprocess.Popen(
        [*command, "--name", "w1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=blocking,
    ) as w1:
        assert w1.stdout is not None
        assert w1.stdout.readline().startswith("worker w1 serving ")
        run_id = trio.run(cf.submit, queue, "blocks")
        assert w1.stdout.readline() == "in step\n"
        w1.send_signal(signal.SIGTERM)
        out, err = w1.communicate(timeout=60)
    assert w1.returncode == 143
    assert (out, err) == ("", "cosmoflow: terminated\n")
    [run] = trio.run(cf.queue_status, queue)
    assert (run.state, run.owner, run.lease_left) == ("orphaned", "w1", None)
    with subprocess.Popen([*command, "--name", "w2"], stdout=subprocess.PIPE, text=True) as w2:
        try:
            assert w2.stdout is not None
            assert w2.stdout.readline().startswith("worker w2 serving ")
            done = trio.run(result_within, queue, run_id, 10)  # far less than the lease
        finally:
            w2.terminate()
    assert (done.result, done.worker) == ("done", "w2")


async def passed_over(queue: str) -> None:
    """Return once a worker has passed a run of ``queue`` over (read every 20 ms);
    raise TooSlowError after 10 s."""
    with trio.fail_after(10):
        while True:
            if any(run.passed_over for run in await cf.queue_status(queue)):
                return
            await trio.sleep(0.02)


def test_status_names_the_workers_that_passed_a_run_over(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker serving only another flow leaves the run pending, and says so."""
    queue = f"{redis_server.url}/{unique_namespace()}"
    hello = str(EXAMPLES / "hello_world.py")
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", hello, "--queue", queue]
    command += ["--store", f"{redis_server.url}#{unique_namespace()}", "--name", "w1"]
    assert main(["submit", str(counter_file), "--queue", queue, "--run-id", "job-1"]) == 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as worker:
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().startswith("worker w1 serving ")
            trio.run(passed_over, queue)
        finally:
            worker.terminate()
    capsys.readouterr()
    assert main(["status", "--queue", queue]) == 0
    out = capsys.readouterr().out
    assert "1 pending, 0 running" in out
    assert "1 wait for a worker with their flow (passed over by w1)" in out
    assert main(["status", "--queue", queue, "--json"]) == 0
    [run] = json.loads(capsys.readouterr().out)
    assert (run["state"], run["passed_over"]) == ("pending", ["w1"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["submit", "FILE", "--queue", "redis://127.0.0.1:1"], "expected redis://HOST"),
        (["status", "--queue", "http://host/q"], "expected redis://HOST"),
        (
            ["submit", "FILE", "--queue", "redis://127.0.0.1:1/q/extra"],
            "queue 'redis://127.0.0.1:1/q/extra': the path before NAME is not a database number",
        ),
        (["worker", "FILE", "--queue", "redis://h/q", "--store", "file:x"], "store 'file:x'"),
        (
            ["worker", "FILE", "--queue", "redis://h/q", "--store", "redis://h", "--lease", "0"],
            "--lease must be > 0",
        ),
        (
            ["worker", "FILE", "--queue", "redis://h/q", "--store", "redis://h", "--flow-wait=-1"],
            "--flow-wait must be >= 0",
        ),
        (
            ["worker", "FILE", "--queue", "redis://h/q", "--store", "redis://h", "--lease", "inf"],
            "--lease must be > 0 seconds and at most 604800 (a week), got inf",
        ),
        (
            ["worker", "FILE", "--queue", "redis://h/q", "--store", "redis://h", "--lease", "1e9"],
            "--lease must be > 0 seconds and at most 604800 (a week), got 1e+09",
        ),
        (
            ["submit", "FILE", "--queue", "redis://127.0.0.1:1/q", "--param", "x=NaN"],
            "error: param 'x' is not JSON: Out of range float values",
        ),
        (
            ["worker", "FILE", "FILE", "--queue", "redis://h/q", "--store", "redis://h"],
            "both give a flow named 'counter'; a worker serves one flow per name",
        ),
        (
            ["worker", "FILE", "--queue", "redis://h/q", "--store", "redis://h", "--name="],
            "--name must not be empty",
        ),
    ],
)
def test_queue_commands_refuse_a_bad_queue_or_store(
    counter_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [str(counter_file) if arg == "FILE" else arg for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_a_queue_whose_keys_no_queue_wrote_is_named_not_called_unreachable(
    redis_server: RedisServer, counter_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique_namespace()
    queue = f"{redis_server.url}/{name}"
    trio.run(cf.RunQueue(redis_server.url, name).call, "SET", f"cosmoflow:queue:{name}:runs", "x")
    for argv in (["status", "--queue", queue], ["submit", str(counter_file), "--queue", queue]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cosmoflow: error: queue {queue}: ")
        assert "WRONGTYPE" in err and err.count("\n") == 1


RAY_FLOW_FILE = """
import cosmoflow_actors as cf


class OnRay(cf.Node):
    executor = "ray"

    def exec(self, prep_res, ctx):
        return 1


flow = cf.Flow.builder("on_ray").add_node("r", OnRay()).build()
"""


@pytest.mark.ray
def test_a_worker_refuses_a_ray_cluster_it_cannot_reach_before_it_claims_a_run(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Not a worker that fails every run it claims: a process, in case it serves."""
    pytest.importorskip("ray")
    flow_file = tmp_path / "on_ray.py"
    flow_file.write_text(RAY_FLOW_FILE)
    queue = f"{redis_server.url}/{unique_namespace()}"
    run_id = trio.run(partial(cf.submit, queue, "on_ray"))
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", str(flow_file)]
    command += ["--queue", queue, "--store", f"{redis_server.url}#x"]
    environment = {**os.environ, "RAY_ADDRESS": address}
    process = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert (process.returncode, process.stdout) == (2, "")
    assert process.stderr.startswith(f"cosmoflow: error: cannot reach the Ray cluster at {address}")
    assert process.stderr.endswith("(from RAY_ADDRESS)\n")
    [status] = trio.run(cf.queue_status, queue)
    assert (status.run_id, status.state, status.attempts) == (run_id, "pending", 0)


def test_a_worker_refuses_a_store_it_cannot_reach(
    redis_server: RedisServer, counter_file: Path
) -> None:
    """Not a worker that claims runs only to drop them: a process, in case it serves."""
    queue = f"{redis_server.url}/{unique_namespace()}"
    command = [sys.executable, "-m", "cosmoflow_actors", "worker", str(counter_file)]
    command += ["--queue", queue, "--store", "redis://127.0.0.1:1#x"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert (process.returncode, process.stdout) == (2, "")
    assert process.stderr.startswith("cosmoflow: error: cannot reach the store RedisStorage(")
    assert process.stderr.count("\n") == 1


@pytest.mark.usefixtures("without_redis")
@pytest.mark.parametrize(
    ("argv", "user"),
    [
        (["submit", "FILE", "--queue", "redis://127.0.0.1:1/q"], "RunQueue"),
        (["status", "--queue", "redis://127.0.0.1:1/q"], "RunQueue"),
        (["requeue", "--queue", "redis://127.0.0.1:1/q", "run-1"], "RunQueue"),
        (
            [
                "worker",
                "FILE",
                "--queue",
                "redis://127.0.0.1:1/q",
                "--store",
                "redis://127.0.0.1:1",
            ],
            "worker --store",
        ),
    ],
)
def test_without_the_redis_package_the_queue_commands_name_the_extra(
    counter_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], user: str
) -> None:
    argv = [str(counter_file) if arg == "FILE" else arg for arg in argv]
    assert main(argv) == 2
    missing = f"{user} needs the redis package: pip install 'cosmoflow-actors[redis]'"
    assert capsys.readouterr().err == f"cosmoflow: error: {missing}\n"
