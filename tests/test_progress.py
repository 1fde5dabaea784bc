"""Progress: exact run counts, and a wait for the next change that misses nothing."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from cosmoflow_actors.progress import Progress, ProgressSnapshot


def test_counts_runs_as_they_start_and_end() -> None:
    progress = Progress()
    for _ in range(5):
        progress.run_started()
    for state in ["succeeded", "succeeded", "failed", "cancelled"]:
        progress.run_finished(state)
    snapshot = progress.snapshot()
    assert snapshot == ProgressSnapshot(started=5, succeeded=2, failed=1, cancelled=1)
    assert (snapshot.finished, snapshot.in_flight) == (4, 1)


def test_a_snapshot_is_frozen() -> None:
    snapshot = Progress().snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.started = 1  # type: ignore[misc]


def test_a_run_cannot_finish_in_a_state_that_is_not_final() -> None:
    progress = Progress()
    with pytest.raises(ValueError, match="not in state 'running'"):
        progress.run_finished("running")
    assert progress.snapshot() == ProgressSnapshot()


async def test_wait_changed_returns_at_once_when_the_counts_moved_on() -> None:
    progress = Progress()
    before = progress.snapshot()
    progress.run_started()
    progress.run_finished("failed")
    assert await progress.wait_changed(before) == ProgressSnapshot(started=1, failed=1)


async def test_wait_changed_blocks_until_the_next_change_and_wakes_every_waiter() -> None:
    progress = Progress()
    seen: list[ProgressSnapshot] = []

    async def watch() -> None:
        seen.append(await progress.wait_changed(ProgressSnapshot()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        progress.run_started()
        progress.run_started()  # before the watchers run: they see both
    assert seen == [ProgressSnapshot(started=2)] * 2


async def test_a_watcher_that_falls_behind_still_ends_with_every_count() -> None:
    """5,000 runs start and end in bursts between the watcher's reads; it sees the
    counts grow and its last snapshot holds all of them."""
    progress = Progress()
    snapshots = [progress.snapshot()]

    async def watch() -> None:
        while snapshots[-1].finished < 5_000:
            snapshots.append(await progress.wait_changed(snapshots[-1]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for burst in range(50):
            for _ in range(100):
                progress.run_started()
                progress.run_finished("failed" if burst == 7 else "succeeded")
            await trio.lowlevel.checkpoint()
    assert snapshots[-1] == ProgressSnapshot(started=5_000, succeeded=4_900, failed=100)
    finished = [snapshot.finished for snapshot in snapshots]
    assert finished == sorted(finished)
    assert len(snapshots) > 2


async def test_a_cancelled_wait_leaves_the_counts_working(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = Progress()
    with trio.move_on_after(1) as scope:
        await progress.wait_changed(ProgressSnapshot())
    assert scope.cancelled_caught
    progress.run_started()
    assert progress.snapshot().started == 1
