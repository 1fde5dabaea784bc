"""The store actors' registry: one actor per backend, shared by its runs, retired
after the last; a backend over the same file opens only once the old actor has exited."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from tests.support import Gate, Recorder, engine_in, single


class OwnActorStorage(cf.MemoryStorage):
    """A memory storage served by an actor of its own, like a file or a database."""

    shared_actor = False


async def test_runs_on_one_backend_share_one_store_actor_until_the_last_ends() -> None:
    gate = Gate()
    store = OwnActorStorage()
    async with cf.open_engine() as engine:
        first = await engine.start_run(single(gate), store)
        second = await engine.start_run(single(gate), store)
        stores = [a for a in engine.statistics().actors if a.kind == "store"]
        assert len(stores) == 1
        gate.open.set()
        await first.wait()
        await second.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert [a for a in engine.statistics().actors if a.kind == "store"] == []


async def test_the_memory_store_actor_serves_every_memory_run_until_the_engine_closes() -> None:
    """The engine-wide memory actor is not retired between runs: later runs reach the
    same actor (its counters go on), and none waits for it to restart."""
    flow = single(Recorder())
    async with cf.open_engine() as engine:
        await engine.run(flow, {})
        await trio.testing.wait_all_tasks_blocked()
        [first] = [a for a in engine.statistics().actors if a.kind == "store"]
        await engine.run(flow, {})
        [second] = [a for a in engine.statistics().actors if a.kind == "store"]
    assert first.name == second.name == "store:memory"
    assert 0 < first.messages_processed < second.messages_processed


class GatedFileStorage(cf.FileStorage):
    """A real FileStorage whose commits wait for ``gate`` (and tell ``waiting``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.waiting = trio.Event()
        self.gate = trio.Event()

    async def commit(self) -> None:
        self.waiting.set()
        await self.gate.wait()
        await super().commit()


async def test_a_new_instance_over_a_file_waits_for_the_old_ones_last_commit(
    tmp_path: Path,
) -> None:
    """A run cancelled while its store commits leaves that commit landing; a new
    FileStorage over the same file opens only once the old store actor has exited, so
    it sees that commit and neither store finds the other's writes in its journal."""
    path = tmp_path / "store.json"

    @cf.node
    async def write(ctx: cf.ExecutionContext) -> None:
        await ctx.store.set(ctx.params["key"], 1)

    old = GatedFileStorage(path)
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        cancelled = await engine.start_run(single(write), old, params={"key": "first"})
        await old.waiting.wait()
        cancelled.cancel()
        new = cf.FileStorage(path)
        nursery.start_soon(partial(engine.run, single(write), new, params={"key": "second"}))
        await trio.testing.wait_all_tasks_blocked()
        old.gate.set()
    fresh = cf.FileStorage(path)
    await fresh.open()
    assert {key: await fresh.get(key) for key in await fresh.keys()} == {"first": 1, "second": 1}


async def test_a_storage_that_cannot_open_fails_start_run_only(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    path.write_bytes(b"{not json")
    async with cf.open_engine() as engine:
        with pytest.raises(cf.StorageError, match=r"store\.json"):
            await engine.run(single(Recorder()), cf.FileStorage(path))
        assert (await engine.run(single(Recorder()), {})).success
    assert path.read_bytes() == b"{not json"


async def test_an_instance_another_engine_serves_is_refused_until_that_one_lets_go(
    tmp_path: Path,
) -> None:
    """Two actors on one instance would interleave its staged writes: a second engine
    gets a clear error, and the instance once the first engine is done with it."""
    gate = Gate()
    storage = cf.FileStorage(tmp_path / "s.json")
    async with cf.open_engine() as second:
        async with cf.open_engine() as first:
            await first.start_run(single(gate), storage)
            with pytest.raises(cf.StorageError, match="in use by another engine"):
                await second.run(single(Recorder()), storage)
            gate.open.set()
        assert (await second.run(single(Recorder()), storage)).success


class SlowToOpen(OwnActorStorage):
    """Its backend opens once the test lets it."""

    def __init__(self) -> None:
        super().__init__()
        self.may_open = trio.Event()

    async def open(self) -> None:
        await self.may_open.wait()
        await super().open()


async def test_a_caller_cancelled_while_its_backend_opens_leaves_it_to_the_others() -> None:
    """The first run on a backend gives up while the backend opens: the store actor
    opens all the same and serves the run that waited with it."""
    store = SlowToOpen()
    flow = single(Recorder(), "opens")
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        impatient = trio.CancelScope()

        async def first() -> None:
            with impatient:
                await engine.run(flow, store)

        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(partial(engine.run, flow, store))
        await trio.testing.wait_all_tasks_blocked()
        impatient.cancel()
        await trio.testing.wait_all_tasks_blocked()
        store.may_open.set()
    assert impatient.cancelled_caught
    assert store.data["seen"] == ["only"]
    stats = engine.statistics()
    assert (stats.runs_started, stats.runs_succeeded) == (1, 1)


class BrokenOpen(OwnActorStorage):
    """Its backend's open raises an error of its own (not a StorageError)."""

    async def open(self) -> None:
        raise OSError("disk on fire")


async def test_a_backend_whose_open_raises_fails_the_runs_on_it_alone() -> None:
    gate = Gate()
    async with cf.open_engine() as engine:
        other = await engine.start_run(single(gate), {})
        with pytest.raises(cf.StorageError, match="could not be opened: OSError: disk") as caught:
            await engine.run(single(Recorder()), BrokenOpen())
        assert isinstance(caught.value.__cause__, OSError)
        gate.open.set()
        assert (await other.wait()).success


async def test_a_run_waiting_for_its_backend_when_the_engine_closes_is_told_so() -> None:
    store = SlowToOpen()
    flow = single(Recorder(), "late")
    async with trio.open_nursery() as nursery:
        closing = trio.CancelScope()
        engine = await nursery.start(engine_in, closing)
        with pytest.raises(cf.StorageError, match="not opened: the engine closed first"):
            nursery.start_soon(_close_when_blocked, closing)
            await engine.run(flow, store)
    assert engine.statistics().runs_in_flight == 0


class CallsWhenItsOpenIsCancelled(OwnActorStorage):
    """Its backend opens only when cancelled: then it calls ``cancelled``, in the store
    actor's task, just before the actor wakes the runs that waited."""

    def __init__(self, cancelled: Callable[[], None]) -> None:
        super().__init__()
        self._cancelled = cancelled

    async def open(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._cancelled()


async def test_a_cancelled_caller_woken_as_the_engine_closes_gets_cancelled() -> None:
    """The closing engine wakes the caller waiting for the backend, and the caller's own
    scope is cancelled before it runs again (its deadline passes then): it gets
    trio.Cancelled, not the StorageError that the engine closed first."""
    caller = trio.CancelScope()

    def cancel_the_caller_at_the_next_scheduler_pass() -> None:
        caller.deadline = trio.current_time()

    store = CallsWhenItsOpenIsCancelled(cancel_the_caller_at_the_next_scheduler_pass)
    async with trio.open_nursery() as nursery:
        closing = trio.CancelScope()
        engine = await nursery.start(engine_in, closing)
        nursery.start_soon(_close_when_blocked, closing)
        with caller:
            await engine.run(single(Recorder(), "late"), store)
    assert caller.cancelled_caught
    assert engine.statistics().runs_in_flight == 0


async def _close_when_blocked(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


async def test_two_starts_of_one_run_id_waiting_for_its_backend_start_it_once() -> None:
    """Both starts pass the check for a run id in flight before they wait for the
    backend to open; the second to go on is refused, and the engine goes on."""
    store = SlowToOpen()
    flow = single(Recorder(), "twice")
    outcomes: list[object] = []

    async def start() -> None:
        try:
            outcomes.append((await engine.run(flow, store, run_id="same")).success)
        except ValueError as exc:
            outcomes.append(str(exc))

    async with cf.open_engine() as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            nursery.start_soon(start)
            await trio.testing.wait_all_tasks_blocked()
            store.may_open.set()
        assert sorted(map(str, outcomes)) == ["True", "run 'same' is already in flight"]
        assert (await engine.run(flow, store, run_id="after")).success
