"""A run's observed state: observers whose code raises fail in their own task, never in
the engine's."""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from tests.support import Gate, single


class Refused(Exception):
    """What the observers here raise."""


def refuses_the_end(state: cf.RunState, *before: cf.RunState) -> bool:
    """A predicate that is false while the run goes on and raises once it has ended."""
    if state.finished:
        raise Refused(state.value)
    return False


async def test_a_predicate_raising_at_the_runs_end_raises_in_its_waiter_alone() -> None:
    gate = Gate()
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(gate))
        other = await engine.start_run(single(cf.Node(), name="other"))
        errors: list[Exception] = []

        async def watch() -> None:
            try:
                await run.state.wait_value(refuses_the_end)
            except Refused as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            gate.open.set()
            result = await run.wait()
        assert (await other.wait()).success
        assert (await engine.run(single(cf.Node(), name="after"))).success
    assert result.success
    assert [str(error) for error in errors] == ["succeeded"]


async def test_a_predicate_raising_when_a_run_is_cancelled_leaves_the_cancel_whole() -> None:
    """The cancelled run's step is cancelled and its admission slot freed at once."""
    gate = Gate()
    async with cf.open_engine(max_runs=1) as engine:
        run = await engine.start_run(single(gate))
        with pytest.RaisesGroup(Refused):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run.state.wait_value, refuses_the_end)
                await trio.testing.wait_all_tasks_blocked()
                run.cancel()
        assert run.current_state is cf.RunState.CANCELLED
        assert gate.inside == 0
        assert engine.statistics().runs_in_flight == 0
        with trio.move_on_after(5) as waited:
            assert (await engine.run(single(cf.Node(), name="next"))).success
    assert not waited.cancelled_caught


async def test_a_transition_predicate_raising_raises_in_its_waiter() -> None:
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(cf.Node()))
        with pytest.raises(Refused, match="succeeded"):
            await run.state.wait_transition(refuses_the_end)
        await run.wait()


@pytest.mark.parametrize("iterate", ["eventual_values", "transitions"])
async def test_an_iteration_whose_predicate_raises_raises_in_its_iterating_task(
    iterate: str,
) -> None:
    gate = Gate()
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(gate))
        await trio.testing.wait_all_tasks_blocked()
        seen: list[Any] = []

        async def iterate_states() -> None:
            async with aclosing(getattr(run.state, iterate)(refuses_the_end)) as states:
                async for state in states:
                    seen.append(state)

        with pytest.RaisesGroup(pytest.RaisesExc(Refused, match="succeeded")):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(iterate_states)
                await trio.testing.wait_all_tasks_blocked()
                gate.open.set()
        assert (await run.wait()).success
    assert seen == []


async def test_waiting_for_a_value_or_any_change_still_works() -> None:
    gate = Gate()
    changes: list[tuple[cf.RunState, cf.RunState]] = []
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(gate))
        assert await run.state.wait_value(cf.RunState.RUNNING) is cf.RunState.RUNNING

        async def watch() -> None:
            changes.append(await run.state.wait_transition())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            gate.open.set()
    assert changes == [(cf.RunState.SUCCEEDED, cf.RunState.RUNNING)]


async def test_a_transform_raising_later_is_logged_and_keeps_its_last_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def label(state: cf.RunState) -> str:
        if state.finished:
            raise Refused(state.value)
        return state.value

    gate = Gate()
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(gate))
        await trio.testing.wait_all_tasks_blocked()
        with run.state.open_transform(label) as labelled:
            assert labelled.value == "running"
            gate.open.set()
            assert (await run.wait()).success
            assert labelled.value == "running"
    assert "a transform of a run's state, raised at RunState.SUCCEEDED" in caplog.text
    assert caplog.records[-1].levelno == logging.ERROR


async def test_a_transform_raising_at_once_raises_in_the_task_opening_it() -> None:
    def refuse(state: cf.RunState) -> str:
        raise Refused(state.value)

    async with cf.open_engine() as engine:
        run = await engine.start_run(single(cf.Node()))
        with pytest.raises(Refused, match="pending"), run.state.open_transform(refuse):
            pass
        await run.wait()


async def test_an_observer_of_a_derived_value_raising_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The derived value is trio_util's own: its waiters' predicates run in the engine's
    task when the state changes; one that raises there is logged, and the run ends."""
    gate = Gate()
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(gate, name="derived"))
        await trio.testing.wait_all_tasks_blocked()
        with run.state.open_transform(lambda state: state.finished) as ended:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ended.wait_value, refuses_the_end_of_a_bool)
                await trio.testing.wait_all_tasks_blocked()
                gate.open.set()
                assert (await run.wait()).success
                nursery.cancel_scope.cancel()
    assert f"an observer of run {run.run_id}'s state raised at RunState.SUCCEEDED" in caplog.text


def refuses_the_end_of_a_bool(ended: bool) -> bool:
    if ended:
        raise Refused("ended")
    return False
