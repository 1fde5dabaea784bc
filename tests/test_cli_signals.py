"""How the cosmoflow command stops (cli/signals.py): a real SIGINT, a second one, a
step in a thread that does not stop, and a Ctrl-C handed to the command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cosmoflow_actors.cli import main
from cosmoflow_actors.cli.signals import trio_run

pytestmark = pytest.mark.usefixtures("plain_output")


def test_ctrl_c_exits_with_status_130(tmp_path: Path) -> None:
    """A real SIGINT, as Ctrl-C sends, while a run is in a node."""
    flow_file = tmp_path / "waits.py"
    flow_file.write_text(
        "import trio\n"
        "import cosmoflow_actors as cf\n"
        "@cf.node\n"
        "async def wait(ctx):\n"
        "    print('waiting', flush=True)\n"
        "    await trio.sleep_forever()\n"
        "flow = cf.Flow.builder('waits').add_node('wait', wait).build()\n"
    )
    command = [sys.executable, "-m", "cosmoflow_actors", "run", str(flow_file)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "waiting\n"  # the run is in its node
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert (out, err) == ("", "cosmoflow: interrupted\n")


STUCK = """
import time

import trio

import cosmoflow_actors as cf


@cf.node
async def stuck(ctx):
    try:
        print("waiting", flush=True)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            print("stopping", flush=True)
            await trio.to_thread.run_sync(time.sleep, 60)


flow = cf.Flow.builder("stuck").add_node("stuck", stuck).build()
"""
"""A run that, once cancelled, waits a minute for a thread, as a thread executor can."""


def test_a_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    flow_file = tmp_path / "stuck.py"
    flow_file.write_text(STUCK)
    command = [sys.executable, "-m", "cosmoflow_actors", "run", str(flow_file)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "waiting\n"
        process.send_signal(signal.SIGINT)
        assert process.stdout.readline() == "stopping\n"  # the first one is under way
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert (out, err) == ("", "cosmoflow: interrupted\n")


IN_A_THREAD = """
import os
import time

import cosmoflow_actors as cf


@cf.node
async def first(ctx):
    await ctx.store.update("first", lambda n: n + 1, default=0)


class Block(cf.Node):
    executor = "thread"

    def exec(self, prep_res, ctx):
        if os.environ.get("BLOCK"):
            print("blocking", flush=True)
            time.sleep(60)
        return "done"

    async def post(self, store, prep_res, exec_res, ctx):
        await store.set("block", exec_res)


flow = (
    cf.Flow.builder("threads")
    .add_node("first", first)
    .add_node("block", Block())
    .add_route("first", "block")
    .build()
)
"""
"""A durable flow whose second step blocks a thread for a minute when BLOCK is set."""


def test_ctrl_c_does_not_wait_for_a_thread_and_the_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow_file = tmp_path / "threads.py"
    flow_file.write_text(IN_A_THREAD)
    store = f"sqlite:{tmp_path / 'runs.db'}"
    argv = ["run", str(flow_file), "--store", store, "--run-id", "r1"]
    command = [sys.executable, "-m", "cosmoflow_actors", *argv]
    env = {**os.environ, "BLOCK": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "blocking\n"  # "first" has committed
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 130
    assert (out, err) == (
        "",
        "cosmoflow: interrupted (stopped without waiting for a step still running after 1 s)\n",
    )
    assert main([*argv, "--resume", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["store"] == {"first": 1, "block": "done"}  # "first" ran once


def test_on_interrupt_gets_the_first_ctrl_c_and_the_command_returns() -> None:
    """A real SIGINT to this process, in the trio run: handed to ``on_interrupt`` on the
    trio thread, not raised as KeyboardInterrupt; the handler is put back after."""
    interrupted = trio.Event()
    threads: list[bool] = []

    def stop() -> None:
        threads.append(trio.lowlevel.in_trio_run())
        interrupted.set()

    async def until_interrupted() -> str:
        os.kill(os.getpid(), signal.SIGINT)
        await interrupted.wait()
        await trio.lowlevel.checkpoint()  # where a KeyboardInterrupt pending would come
        return "stopped by itself"

    assert trio_run(until_interrupted, on_interrupt=stop) == "stopped by itself"
    assert threads == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
