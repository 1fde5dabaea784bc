"""The node actor: lifecycle order, retries, backoff, timeouts, fallback, limits."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import math
import random
import sys
import threading
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cosmoflow_actors as cf
from cosmoflow_actors.runtime.node_actor import NodeActor, fails_the_step
from tests.support import Gate, Recorder, ki_protection_seen, single


class Flaky(cf.Node):
    """exec fails ``failures`` times, then returns "ok"; records attempt times."""

    def __init__(
        self, failures: int, error: type[Exception] = ConnectionError, **config: Any
    ) -> None:
        super().__init__(**config)
        self.failures = failures
        self.error = error
        self.attempts: list[tuple[int, float]] = []

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
        self.attempts.append((ctx.current_retry, trio.current_time()))
        if len(self.attempts) <= self.failures:
            raise self.error(f"failure {len(self.attempts)}")
        return "ok"

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: str, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


async def test_phases_run_in_order_and_pass_results_along() -> None:
    calls: list[tuple[str, Any]] = []

    class Ordered(cf.Node):
        async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> str:
            calls.append(("prep", ctx.node_id))
            return "p"

        async def exec(self, prep_res: str, ctx: cf.ExecutionContext) -> str:
            calls.append(("exec", prep_res))
            return "e"

        async def post(
            self, store: cf.SharedStore, prep_res: str, exec_res: str, ctx: cf.ExecutionContext
        ) -> None:
            calls.append(("post", (prep_res, exec_res)))

    await single(Ordered()).run()
    assert calls == [("prep", "only"), ("exec", "p"), ("post", ("p", "e"))]


async def test_retries_wait_retry_delay_times_backoff(autojump_clock: trio.abc.Clock) -> None:
    node = Flaky(failures=3, max_retries=4, retry_delay=0.5, backoff=2.0)
    start = trio.current_time()
    result = await single(node).run()
    assert result.result == "ok"
    offsets = [(retry, at - start) for retry, at in node.attempts]
    assert offsets == [(0, 0.0), (1, 0.5), (2, 1.5), (3, 3.5)]


async def test_exhausted_retries_fail_with_node_error_keeping_the_cause(
    autojump_clock: trio.abc.Clock,
) -> None:
    with pytest.raises(cf.NodeError) as info:
        await single(Flaky(failures=5, max_retries=3, retry_delay=1.0), "flaky").run(run_id="r-1")
    error = info.value
    assert (error.node_id, error.phase, error.run_id, error.attempts) == ("only", "exec", "r-1", 3)
    assert isinstance(error.__cause__, ConnectionError)
    assert str(error.__cause__) == "failure 3"


async def test_an_error_outside_retry_on_is_not_retried() -> None:
    node = Flaky(failures=5, error=KeyError, max_retries=3, retry_on=(ConnectionError,))
    with pytest.raises(cf.NodeError) as info:
        await single(node).run()
    assert info.value.attempts == 1
    assert len(node.attempts) == 1


async def test_the_fallback_replaces_exec_after_the_last_attempt() -> None:
    class Fallback(Flaky):
        async def exec_fallback(
            self, prep_res: Any, error: Exception, ctx: cf.ExecutionContext
        ) -> str:
            return f"fallback after {error}"

    result = await single(Fallback(failures=9, max_retries=2)).run()
    assert result.result == "fallback after failure 2"


async def test_a_fallback_that_raises_fails_the_run_with_its_error() -> None:
    class Fallback(Flaky):
        def exec_fallback(self, prep_res: Any, error: Exception, ctx: cf.ExecutionContext) -> str:
            raise RuntimeError("no fallback either") from error

    with pytest.raises(cf.NodeError) as info:
        await single(Fallback(failures=9, max_retries=2)).run()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.attempts == 2


class ExitsLate(Flaky):
    """Fails twice, then its third attempt (``where="exec"``) or its fallback
    (``where="fallback"``) calls sys.exit()."""

    def __init__(self, where: str) -> None:
        super().__init__(failures=2, max_retries=3)
        self.where = where

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
        if self.where == "exec" and ctx.current_retry == 2:
            sys.exit(3)
        return await super().exec(prep_res, ctx)

    def exec_fallback(self, prep_res: Any, error: Exception, ctx: cf.ExecutionContext) -> str:
        sys.exit(4)


@pytest.mark.parametrize("where", ["exec", "fallback"])
async def test_a_base_exception_after_retries_names_the_attempts_made(where: str) -> None:
    """Not retried, it ends the attempt it was raised in (or the fallback after the
    last attempt): its NodeError counts the attempts made."""
    node = ExitsLate(where)
    if where == "fallback":
        node.failures = 9
    with pytest.raises(cf.NodeError) as info:
        await single(node).run()
    assert isinstance(info.value.__cause__, SystemExit)
    assert (info.value.phase, info.value.attempts) == ("exec", 3)


class ItemExitsLate(cf.ParallelBatchNode):
    """One item, whose two first attempts fail and whose third calls sys.exit()."""

    max_retries = 3

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[int]:
        return [1]

    async def exec(self, item: int, ctx: cf.ExecutionContext) -> None:
        if ctx.current_retry < 2:
            raise ConnectionError("down")
        sys.exit(3)


async def test_a_base_exception_after_retries_of_a_parallel_item_names_the_attempts_made(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The item's attempts are counted in its own context, not the step's."""
    with pytest.raises(cf.NodeError) as info:
        await single(ItemExitsLate(retry_on=(ConnectionError,))).run()
    assert isinstance(info.value.__cause__, SystemExit)
    assert (info.value.phase, info.value.attempts) == ("exec", 3)


async def test_a_timeout_is_a_failed_attempt(autojump_clock: trio.abc.Clock) -> None:
    class Slow(cf.Node):
        timeout = 2.0
        max_retries = 3
        retry_delay = 1.0

        async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
            await trio.sleep(100)

    start = trio.current_time()
    with pytest.raises(cf.NodeError) as info:
        await single(Slow(retry_on=(ValueError,))).run()
    assert trio.current_time() - start == 3 * 2.0 + 2 * 1.0
    assert isinstance(info.value.__cause__, trio.TooSlowError)
    assert str(info.value.__cause__) == "exec of 'only' overran its 2.0s timeout"
    assert info.value.attempts == 3


def waits(node: Flaky) -> list[float]:
    """The seconds between ``node``'s consecutive exec attempts."""
    times = [at for _, at in node.attempts]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


@pytest.mark.parametrize("jitter", [0.5, 1.0])
async def test_jitter_draws_each_delay_within_its_share_of_the_delay(
    jitter: float, autojump_clock: trio.abc.Clock
) -> None:
    random.seed(27)
    node = Flaky(failures=200, max_retries=201, retry_delay=2.0, retry_jitter=jitter)
    await single(node).run()
    drawn = waits(node)
    low = 2.0 * (1 - jitter)
    assert len(drawn) == 200
    assert all(low - 1e-9 <= wait <= 2.0 + 1e-9 for wait in drawn)
    # Spread over the whole range, not bunched at one end.
    spread = 2.0 - low
    assert min(drawn) < low + 0.1 * spread and max(drawn) > 2.0 - 0.1 * spread


async def test_backoff_multiplies_the_delay_before_the_draw(
    autojump_clock: trio.abc.Clock,
) -> None:
    random.seed(27)
    node = Flaky(failures=10, max_retries=11, retry_delay=1.0, backoff=2.0, retry_jitter=0.5)
    await single(node).run()
    # The k-th wait is drawn from [2**k / 2, 2**k]: the draws before it do not shrink it.
    ratios = [wait / 2**k for k, wait in enumerate(waits(node))]
    assert len(ratios) == 10
    assert all(0.5 - 1e-9 <= ratio <= 1.0 + 1e-9 for ratio in ratios)


@pytest.mark.parametrize("jitter", [0.1, 1.0])
async def test_a_delay_the_backoff_overflows_waits_forever_instead_of_failing(
    jitter: float, autojump_clock: trio.abc.Clock
) -> None:
    """The second delay, 1e300 * 1e10, is an infinite float: the run waits on (its
    draw was NaN, and trio's "deadline must not be NaN" replaced the exec's error)."""
    node = Flaky(failures=3, max_retries=3, retry_delay=1e300, backoff=1e10, retry_jitter=jitter)
    with trio.move_on_after(1e306) as waiting:
        await single(node).run()
    assert waiting.cancelled_caught
    assert len(node.attempts) == 2
    assert trio.current_time() >= 1e306


class RateLimited(Exception):
    """What a client raises on an HTTP 429, with the server's Retry-After."""

    def __init__(self, retry_after: object) -> None:
        super().__init__(f"429, retry after {retry_after!r}")
        self.retry_after = retry_after


class Refused(Flaky):
    """exec raises ``errors`` in turn, then returns "ok"; records attempt times."""

    def __init__(self, errors: list[Exception], **config: Any) -> None:
        super().__init__(failures=len(errors), **config)
        self.errors = errors

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
        self.attempts.append((ctx.current_retry, trio.current_time()))
        if len(self.attempts) <= len(self.errors):
            raise self.errors[len(self.attempts) - 1]
        return "ok"


async def test_retry_after_lengthens_the_delay_and_never_shortens_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    errors: list[Exception] = [RateLimited(5), RateLimited(0.25), ConnectionError("down")]
    node = Refused(errors, max_retries=4, retry_delay=1.0, backoff=2.0)
    assert (await single(node).run()).result == "ok"
    # 5 > 1.0; then 0.25 < 2.0; the back-off goes on from the delay, not from the 5.
    assert waits(node) == [5.0, 2.0, 4.0]


async def test_retry_after_is_the_least_wait_of_a_jittered_delay(
    autojump_clock: trio.abc.Clock,
) -> None:
    random.seed(27)
    errors: list[Exception] = [RateLimited(0.75) for _ in range(50)]
    node = Refused(errors, max_retries=51, retry_delay=1.0, retry_jitter=1.0)
    await single(node).run()
    drawn = waits(node)
    assert all(0.75 - 1e-9 <= wait <= 1.0 + 1e-9 for wait in drawn)
    assert min(drawn) == pytest.approx(0.75)  # most draws of [0, 1] fall below 0.75


@pytest.mark.parametrize("retry_after", [-1, math.nan, math.inf, 10**400, True, "30", None])
async def test_a_retry_after_that_is_not_a_finite_number_at_least_0_is_ignored(
    retry_after: object, autojump_clock: trio.abc.Clock
) -> None:
    node = Refused([RateLimited(retry_after)], max_retries=2, retry_delay=1.0)
    await single(node).run()
    assert waits(node) == [1.0]


async def test_a_retry_after_that_raises_is_ignored(autojump_clock: trio.abc.Clock) -> None:
    class BadHeader(Exception):
        @property
        def retry_after(self) -> float:
            raise ValueError("Retry-After: soon")

    node = Refused([BadHeader("429")], max_retries=2, retry_delay=1.0)
    assert (await single(node).run()).result == "ok"
    assert waits(node) == [1.0]


@pytest.mark.parametrize(
    "config", [{"max_retries": 1}, {"max_retries": 3, "retry_on": (ValueError,)}]
)
async def test_no_retry_after_is_waited_when_no_attempt_follows(
    config: dict[str, Any], autojump_clock: trio.abc.Clock
) -> None:
    fell_back_at: list[float] = []

    class Fallback(Refused):
        def exec_fallback(self, prep_res: Any, error: Exception, ctx: cf.ExecutionContext) -> str:
            fell_back_at.append(trio.current_time())
            return "fallback"

    start = trio.current_time()
    result = await single(Fallback([RateLimited(100)], **config)).run()
    assert result.result == "fallback"
    assert fell_back_at == [start]


async def test_the_retry_event_reports_the_wait_drawn_and_lengthened(
    autojump_clock: trio.abc.Clock,
) -> None:
    random.seed(27)
    errors: list[Exception] = [ConnectionError("down"), RateLimited(30), ConnectionError("down")]
    node = Refused(errors, max_retries=4, retry_delay=1.0, backoff=2.0, retry_jitter=0.5)
    retries: list[cf.Retry] = []

    async def watch(events: cf.EventStream) -> None:
        async for event in events:
            if isinstance(event, cf.Retry):
                retries.append(event)

    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        nursery.start_soon(watch, engine.events())
        await engine.run(single(node))
    assert [event.attempt for event in retries] == [1, 2, 3]
    assert [event.delay for event in retries] == pytest.approx(waits(node))
    assert retries[1].delay == 30.0
    assert 0.5 <= retries[0].delay <= 1.0 and 2.0 <= retries[2].delay <= 4.0


@pytest.mark.parametrize("phase", ["prep", "post"])
async def test_prep_and_post_errors_name_their_phase(phase: str) -> None:
    class Broken(cf.Node):
        max_retries = 3

        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
            if phase == "prep":
                raise ValueError(phase)

        def post(
            self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
        ) -> None:
            raise ValueError(phase)

    with pytest.raises(cf.NodeError) as info:
        await single(Broken()).run()
    assert info.value.phase == phase
    assert isinstance(info.value.__cause__, ValueError)


async def test_post_returning_a_non_action_fails_in_post_from_a_type_error() -> None:
    class Numeric(cf.Node):
        def post(
            self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
        ) -> Any:
            return 42

    flow = cf.Flow.builder("f").add_node("counter", Numeric()).build()
    with pytest.raises(cf.NodeError) as info:
        await flow.run()
    assert (info.value.node_id, info.value.phase, info.value.flow_name) == ("counter", "post", "f")
    assert isinstance(info.value.__cause__, TypeError)
    assert str(info.value.__cause__) == (
        "node 'counter' returned int from post; expected Action, str or None"
    )


async def test_max_concurrency_bounds_the_steps_in_flight() -> None:
    gate = Gate(max_concurrency=3)
    flow = single(gate, "limited")
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow) for _ in range(10)]
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics().actor("limited/only")
        assert (stats.in_flight, stats.mailbox_depth, gate.inside) == (3, 7, 3)
        gate.open.set()
        for run in runs:
            await run.wait()
    assert gate.most_inside == 3
    assert gate.entered == 10


async def test_a_sync_exec_that_overruns_its_timeout_is_a_failed_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Blocking(cf.Node):
        timeout = 1.0

        def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
            autojump_clock.jump(5)  # a blocking call that took five seconds
            return "too late"

    with pytest.raises(cf.NodeError) as info:
        await single(Blocking()).run()
    assert isinstance(info.value.__cause__, trio.TooSlowError)
    assert "overran its 1.0s timeout" in str(info.value.__cause__)


async def test_an_async_exec_that_swallows_its_timeout_is_a_failed_attempt(
    autojump_clock: trio.abc.Clock,
) -> None:
    class Stubborn(cf.Node):
        timeout = 1.0

        async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
            with contextlib.suppress(trio.Cancelled):
                await trio.sleep(100)
            return "late"

    with pytest.raises(cf.NodeError) as info:
        await single(Stubborn()).run()
    assert isinstance(info.value.__cause__, trio.TooSlowError)
    assert trio.current_time() == 1.0


class Doubler(cf.BatchNode):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[int]:
        return [1, 2, 3]

    async def exec(self, item: int, ctx: cf.ExecutionContext) -> int:
        if item == 2 and ctx.current_retry == 0:
            raise ConnectionError("flaky item")
        return item * 2

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: list[int], ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


async def test_a_batch_node_execs_each_item_with_retries_in_order() -> None:
    assert (await single(Doubler(max_retries=2)).run()).result == [2, 4, 6]


async def test_a_batch_node_whose_prep_is_not_iterable_fails_in_prep() -> None:
    class Scalar(cf.BatchNode):
        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
            return 5

    with pytest.raises(cf.NodeError) as info:
        await single(Scalar()).run()
    assert info.value.phase == "prep"
    assert str(info.value.__cause__) == (
        "batch node 'only': prep must return an iterable of items, not int"
    )


@pytest.mark.parametrize("base", [cf.BatchNode, cf.ParallelBatchNode])
async def test_a_batch_whose_items_raise_while_read_fails_in_prep_alone(
    base: type[cf.BatchNode],
) -> None:
    class Lazy(base):  # type: ignore[valid-type,misc]
        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
            return (1 // item for item in [1, 0])

    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError) as info:
            await engine.run(single(Lazy(), "lazy"))
        assert await engine.run(single(Recorder())) is not None
    assert (info.value.node_id, info.value.phase) == ("only", "prep")
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("base", [cf.BatchNode, cf.ParallelBatchNode])
async def test_a_batch_whose_items_call_sys_exit_while_read_fails_in_prep(
    base: type[cf.BatchNode],
) -> None:
    class Exits(base):  # type: ignore[valid-type,misc]
        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
            return (item if item else sys.exit(2) for item in [1, 0])

    with pytest.raises(cf.NodeError) as info:
        await single(Exits(), "exits").run()
    assert (info.value.node_id, info.value.phase) == ("only", "prep")
    assert isinstance(info.value.__cause__, SystemExit)


class Returns(cf.BatchFlow):
    """A BatchFlow whose prep returns ``param_sets``, whatever they are."""

    def __init__(self, flow: cf.Flow, param_sets: Any) -> None:
        super().__init__(flow)
        self.param_sets = param_sets

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
        return self.param_sets


@pytest.mark.parametrize(
    ("param_sets", "problem"),
    [
        (["a.txt", "b.txt"], "item 0 is str"),
        ({"file": "a.txt"}, "prep returned one dict, not a list"),
        ([{"file": "a"}, {1: "b"}], "item 1 has the key 1 (int)"),
        ([{None: "a"}], "item 0 has the key None (NoneType)"),
        ([{"file": "a"}, None], "item 1 is NoneType"),
    ],
)
async def test_a_batch_flow_whose_prep_returns_no_parameter_sets_fails_in_prep(
    param_sets: Any, problem: str
) -> None:
    """Named for the item at fault, before any child run starts (a child's params were
    checked as each started, failing the step in exec with no index)."""
    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError) as info:
            await engine.run(single(Returns(single(Recorder(), "child"), param_sets)))
        assert engine.statistics().runs_started == 1
    assert (info.value.node_id, info.value.phase) == ("only", "prep")
    assert str(info.value.__cause__) == (
        f"BatchFlow node 'only': {problem}; prep must return parameter sets, dicts with "
        "str keys, one per child run"
    )


class Escapes(cf.Node):
    """Raises ``error`` from ``phase``, a BaseException that is not an Exception."""

    def __init__(self, phase: str, error: BaseException, **config: Any) -> None:
        super().__init__(**config)
        self.phase = phase
        self.error = error

    def _maybe(self, phase: str) -> None:
        if phase == self.phase:
            raise self.error

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
        self._maybe("prep")

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self._maybe("exec")

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        self._maybe("post")


class Custom(BaseException):
    pass


@pytest.mark.parametrize("phase", ["prep", "exec", "post"])
@pytest.mark.parametrize(
    "error",
    [SystemExit(3), Custom("mine"), trio.Cancelled._create(), GeneratorExit()],
    ids=["SystemExit", "custom", "Cancelled", "GeneratorExit"],
)
@pytest.mark.parametrize("executor", ["inline", "thread"])
async def test_a_base_exception_a_node_raises_fails_its_run_alone_naming_the_phase(
    phase: str, error: BaseException, executor: str
) -> None:
    """However the run was started, and whichever task carries its step."""
    gate = Gate()
    async with cf.open_engine() as engine:
        other = await engine.start_run(single(gate, "other"))
        await trio.testing.wait_all_tasks_blocked()
        bad = single(Escapes(phase, error, executor=executor), "bad")
        with pytest.raises(cf.NodeError) as carried:
            await engine.run(bad)
        started = await engine.start_run(bad)
        with pytest.raises(cf.NodeError) as sent:
            await started.wait()
        gate.open.set()
        assert (await other.wait()).success
        assert await engine.run(bad.__class__.builder("ok").add_node("r", Recorder()).build())
    for info in (carried, sent):
        assert (info.value.node_id, info.value.phase) == ("only", phase)
        assert info.value.__cause__ is error


async def test_a_base_exception_of_a_parallel_item_fails_the_step_as_it_is() -> None:
    error = SystemExit(5)

    class Exits(cf.ParallelBatchNode):
        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[int]:
            return [1, 2, 3]

        async def exec(self, item: int, ctx: cf.ExecutionContext) -> None:
            if item == 2:
                raise error
            await trio.sleep_forever()

    async with cf.open_engine() as engine:
        with pytest.raises(cf.NodeError) as info:
            await engine.run(single(Exits()))
        assert await engine.run(single(Recorder())) is not None
    assert (info.value.node_id, info.value.phase) == ("only", "exec")
    assert info.value.__cause__ is error


async def test_a_keyboard_interrupt_in_a_node_goes_on_up() -> None:
    with pytest.raises(BaseExceptionGroup) as info:
        async with cf.open_engine() as engine:
            await engine.start_run(single(Escapes("exec", KeyboardInterrupt())))
    assert info.group_contains(KeyboardInterrupt, depth=None)


class Sleepy(cf.ParallelBatchNode):
    """Item i sleeps i seconds; tracks how many items run at once."""

    def __init__(self, items: int, **config: Any) -> None:
        super().__init__(**config)
        self.items = items
        self.inside = 0
        self.most = 0
        self.finished = 0

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> range:
        return range(self.items, 0, -1)

    async def exec(self, item: int, ctx: cf.ExecutionContext) -> int:
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            await trio.sleep(item)
            if item == 13:
                raise ValueError("unlucky item")
        finally:
            self.inside -= 1
        self.finished += 1
        return item

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: list[int], ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


async def test_a_parallel_batch_runs_items_at_once_and_keeps_their_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    result = await single(Sleepy(10)).run()
    assert result.result == list(range(10, 0, -1))
    assert trio.current_time() - start == 10


async def test_a_parallel_batch_is_bounded_by_max_concurrency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = Sleepy(10, max_concurrency=3)
    await single(node).run()
    assert node.most == 3


async def test_a_failing_item_cancels_the_rest_of_the_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = Sleepy(20)
    start = trio.current_time()
    with pytest.raises(cf.NodeError) as info:
        await single(node).run()
    assert isinstance(info.value.__cause__, ValueError)
    assert trio.current_time() - start == 13
    assert (node.inside, node.finished) == (0, 12)


async def test_cancelling_a_run_stops_its_hundred_batch_items() -> None:
    class Forever(cf.ParallelBatchNode):
        def __init__(self) -> None:
            self.inside = 0

        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> range:
            return range(100)

        async def exec(self, item: int, ctx: cf.ExecutionContext) -> None:
            self.inside += 1
            try:
                await trio.sleep_forever()
            finally:
                self.inside -= 1

    node = Forever()
    async with cf.open_engine() as engine:
        run = await engine.start_run(single(node, "batch"))
        await trio.testing.wait_all_tasks_blocked()
        assert node.inside == 100
        run.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert node.inside == 0
        stats = engine.statistics().actor("batch/only")
        assert (stats.in_flight, stats.mailbox_depth) == (0, 0)


async def test_a_worker_goes_on_with_other_runs_after_one_is_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The one worker's cancel scope is cancelled by run a (with no checkpoint left in
    its step); run b's step on the same worker must not see that cancellation."""
    runs: list[cf.Run] = []
    seen: list[str] = []

    @cf.node(max_concurrency=1)
    async def cancel_first(ctx: cf.ExecutionContext) -> None:
        seen.append(ctx.params["name"])
        if ctx.params["name"] == "a":
            runs[0].cancel()
        else:
            await trio.lowlevel.checkpoint()

    flow = single(cancel_first, "cancel-first")
    async with cf.open_engine() as engine:
        runs.append(engine.start_run_nowait(flow, params={"name": "a"}))
        second = engine.start_run_nowait(flow, params={"name": "b"})  # queued behind a
        with trio.fail_after(10):
            result = await second.wait()
    assert seen == ["a", "b"]
    assert runs[0].current_state is cf.RunState.CANCELLED
    assert result.success


async def test_the_rate_limit_is_never_exceeded(autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []

    @cf.node(rate_limit=(3, 1.0))
    def call_api(ctx: cf.ExecutionContext) -> None:
        starts.append(trio.current_time())

    flow = single(call_api, "api")
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow) for _ in range(10)]
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics().actor("api/only")
        assert (stats.rate_limit, stats.rate_waiting) == ((3, 1.0), 7)
        for run in runs:
            await run.wait()
    window_counts = [sum(1 for t in starts if s <= t < s + 1.0) for s in starts]
    assert max(window_counts) == 3
    assert starts[-1] - starts[0] == 3.0


class Counted(cf.ParallelBatchNode):
    """Each item's exec takes a second; counts the execs in flight and their peak."""

    def __init__(self, items: int, **config: Any) -> None:
        super().__init__(**config)
        self.items = items
        self.inside = 0
        self.peak = 0

    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> range:
        return range(self.items)

    async def exec(self, item: int, ctx: cf.ExecutionContext) -> None:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        try:
            await trio.sleep(1)
        finally:
            self.inside -= 1


async def test_max_exec_concurrency_bounds_attempts_across_runs_and_items(
    autojump_clock: trio.abc.Clock,
) -> None:
    node = Counted(4, max_exec_concurrency=3)
    flow = single(node, "slots")
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow) for _ in range(5)]
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics().actor("slots/only")
        assert (stats.max_exec_concurrency, stats.exec_in_flight, stats.exec_waiting) == (3, 3, 17)
        assert stats.in_flight == 5  # every step runs; only their attempts wait
        for run in runs:
            await run.wait()
        stats = engine.statistics().actor("slots/only")
        assert (stats.exec_in_flight, stats.exec_waiting) == (0, 0)
    assert node.peak == 3
    assert trio.current_time() == 7.0  # 20 one-second attempts, 3 at a time


async def test_a_node_without_max_exec_concurrency_reports_no_slots() -> None:
    flow = single(Recorder(), "plain")
    async with cf.open_engine() as engine:
        await engine.run(flow)
        stats = engine.statistics().actor("plain/only")
    assert (stats.max_exec_concurrency, stats.exec_in_flight, stats.exec_waiting) == (None, 0, 0)


async def test_the_wait_for_an_exec_slot_never_counts_against_the_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    served: list[str] = []

    class Summaries(cf.ParallelBatchNode):
        timeout = 1.0  # per attempt; the service needs 0.6 s
        max_retries = 2
        max_exec_concurrency = 1  # the service takes one call at a time

        def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[str]:
            return ["a", "b", "c", "d"]

        async def exec(self, chunk: str, ctx: cf.ExecutionContext) -> str:
            await trio.sleep(0.6)
            served.append(chunk)
            return chunk.upper()

        def exec_fallback(self, chunk: str, error: Exception, ctx: cf.ExecutionContext) -> str:
            return f"fallback({type(error).__name__})"

        def post(
            self, store: cf.SharedStore, prep_res: Any, results: list[str], ctx: cf.ExecutionContext
        ) -> cf.Action:
            return cf.Action.complete(results)

    result = await single(Summaries(), "llm").run()
    assert result.result == ["A", "B", "C", "D"]
    assert sorted(served) == ["a", "b", "c", "d"]  # each once: nothing timed out
    assert trio.current_time() == pytest.approx(2.4)


async def test_an_exec_slot_is_taken_before_the_rate_limit(
    autojump_clock: trio.abc.Clock,
) -> None:
    starts: list[float] = []

    @cf.node(max_exec_concurrency=1, rate_limit=(1, 1.0))
    def call_api(ctx: cf.ExecutionContext) -> None:
        starts.append(trio.current_time())

    flow = single(call_api, "api")
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics().actor("api/only")
        # The slot's holder waits for the rate limit; the other waits for the slot.
        assert (stats.exec_in_flight, stats.rate_waiting, stats.exec_waiting) == (1, 1, 1)
        for run in runs:
            await run.wait()
    assert starts == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("ending", ["fails", "times out", "is cancelled"])
async def test_an_attempt_frees_its_exec_slot_however_it_ends(
    ending: str, autojump_clock: trio.abc.Clock
) -> None:
    entered: list[str] = []

    @cf.node(max_exec_concurrency=1, timeout=5.0)
    async def call(ctx: cf.ExecutionContext) -> None:
        name = ctx.params["name"]
        entered.append(name)
        if name == "first":
            if ending == "fails":
                raise ConnectionError("refused")
            await trio.sleep_forever()  # times out, or is cancelled with its run

    flow = single(call, "ends")
    async with cf.open_engine() as engine:
        first = await engine.start_run(flow, params={"name": "first"})
        second = await engine.start_run(flow, params={"name": "second"})
        if ending == "is cancelled":
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
        with pytest.raises((cf.NodeError, cf.RunCancelledError)):
            await first.wait()
        with trio.fail_after(60):  # a slot never freed leaves second waiting
            assert (await second.wait()).success
        stats = engine.statistics().actor("ends/only")
        assert (stats.exec_in_flight, stats.exec_waiting) == (0, 0)
    assert entered == ["first", "second"]
    assert trio.current_time() == (5.0 if ending == "times out" else 0.0)


async def test_an_attempt_cancelled_while_waiting_for_a_slot_gives_its_place_up(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = Gate(max_exec_concurrency=1)
    flow = single(gate, "line")
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        runs[1].cancel()
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics().actor("line/only")
        assert (stats.exec_in_flight, stats.exec_waiting) == (1, 1)
        gate.open.set()
        with trio.fail_after(60):
            for run in (runs[0], runs[2]):
                assert (await run.wait()).success
    assert (gate.entered, gate.most_inside) == (2, 1)


async def test_the_retry_delay_holds_no_exec_slot(autojump_clock: trio.abc.Clock) -> None:
    starts: list[tuple[str, float]] = []

    @cf.node(max_exec_concurrency=1, max_retries=2, retry_delay=10.0)
    async def call(ctx: cf.ExecutionContext) -> None:
        starts.append((ctx.params["name"], trio.current_time()))
        await trio.sleep(1)
        if ctx.params["name"] == "a" and ctx.current_retry == 0:
            raise ConnectionError("try again")

    flow = single(call, "retries")
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow, params={"name": name}) for name in "ab"]
        for run in runs:
            await run.wait()
    # b runs during a's ten-second delay, not after it.
    assert starts == [("a", 0.0), ("b", 1.0), ("a", 11.0)]


async def test_exec_slots_go_first_come_first_served(autojump_clock: trio.abc.Clock) -> None:
    order: list[int] = []

    @cf.node(max_exec_concurrency=1)
    async def call(ctx: cf.ExecutionContext) -> None:
        order.append(ctx.params["n"])
        await trio.sleep(1)

    flow = single(call, "fifo")
    async with cf.open_engine() as engine:
        runs = []
        for n in range(6):
            runs.append(await engine.start_run(flow, params={"n": n}))
            await trio.testing.wait_all_tasks_blocked()  # n waits in line behind n - 1
        for run in runs:
            await run.wait()
    assert order == list(range(6))


async def test_a_thread_exec_holds_its_exec_slot_until_its_thread_returns() -> None:
    release = threading.Event()
    both_inside = trio.Event()
    lock = threading.Lock()
    inside = peak = 0

    def call(ctx: cf.ExecutionContext) -> None:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
            second = inside == 2
        if second:
            trio.from_thread.run_sync(both_inside.set)
        release.wait(timeout=10)
        with lock:
            inside -= 1

    node = cf.node(max_exec_concurrency=2, executor="thread")(call)
    flow = single(node, "threads")
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow) for _ in range(6)]
        try:
            with trio.fail_after(10):
                await both_inside.wait()
            await trio.testing.wait_all_tasks_blocked()
            stats = engine.statistics().actor("threads/only")
            assert (stats.exec_in_flight, stats.exec_waiting) == (2, 4)
        finally:
            release.set()
        for run in runs:
            await run.wait()
    assert peak == 2


async def test_a_node_mailbox_size_overrides_the_engine_default() -> None:
    gate = Gate(max_concurrency=1, mailbox_size=2)
    flow = single(gate, "small")
    async with cf.open_engine(mailbox_size=100) as engine:
        runs = [await engine.start_run(flow) for _ in range(3)]
        with pytest.raises(trio.WouldBlock):
            engine.start_run_nowait(flow)
        stats = engine.statistics().actor("small/only")
        assert (stats.mailbox_size, stats.mailbox_depth, stats.max_concurrency) == (2, 2, 1)
        gate.open.set()
        for run in runs:
            await run.wait()


class Picky(cf.Node):
    """post returns ``ctx.params.get("action")``; with ``params["wait"]``, exec first waits
    for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()
        self.waiting = 0

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if ctx.params.get("wait"):
            self.waiting += 1
            await self.release.wait()

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> Any:
        return ctx.params.get("action")


@pytest.mark.parametrize(
    ("returned", "error_type", "cause_type"),
    [
        ("", cf.NodeError, ValueError),
        (42, cf.NodeError, TypeError),
        ("unknown", cf.NoRouteError, type(None)),
    ],
)
async def test_a_bad_action_from_post_fails_its_run_alone_naming_the_node(
    returned: Any, error_type: type[Exception], cause_type: type[BaseException]
) -> None:
    picky = Picky()
    flow = (
        cf.Flow.builder("bad-actions")
        .add_node("picky", picky)
        .add_node("next", Picky())
        .add_route("picky", "next", "go")
        .build()
    )
    fine = {"action": "go", "wait": True}
    async with cf.open_engine() as engine:
        others = [await engine.start_run(flow, params=fine) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert picky.waiting == 3
        with pytest.raises(error_type) as info:
            await engine.run(flow, params={"action": returned})
        picky.release.set()
        for run in others:
            assert (await run.wait()).execution_path == ("picky", "next")
        later = await engine.run(flow, params={"action": "go"})
        assert later.execution_path == ("picky", "next")
        assert (engine.statistics().runs_failed, engine.statistics().runs_succeeded) == (1, 4)
    assert "'picky'" in str(info.value)
    assert isinstance(info.value.__cause__, cause_type)
    if isinstance(info.value, cf.NodeError):
        assert (info.value.node_id, info.value.phase) == ("picky", "post")
        assert "'picky'" in str(info.value.__cause__)


class Timed(cf.Node):
    """exec sleeps ``params["delay"]`` (default ``seconds``); notes the run ids that
    enter it, in order, and the most steps inside at once."""

    def __init__(self, seconds: float = 0, **config: Any) -> None:
        super().__init__(**config)
        self.seconds = seconds
        self.entered: list[str] = []
        self.inside = 0
        self.most_inside = 0

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.entered.append(ctx.run_id)
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await trio.sleep(ctx.params.get("delay", self.seconds))
        finally:
            self.inside -= 1


def chain(first: cf.Node, second: cf.Node, name: str) -> cf.Flow:
    """first → second."""
    return (
        cf.Flow.builder(name)
        .add_node("first", first)
        .add_node("second", second)
        .add_route("first", "second")
        .build()
    )


async def test_hand_off_never_exceeds_the_next_nodes_max_concurrency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    narrow = Timed(1, max_concurrency=3)
    flow = chain(Timed(0), narrow, "hand-off")
    started: list[cf.Run] = []
    async with cf.open_engine() as engine:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(engine.run, flow)  # the callers carry their runs
                started.append(await engine.start_run(flow))  # these go to workers
            await trio.testing.wait_all_tasks_blocked()
            stats = engine.statistics().actor("hand-off/second")
            assert (stats.in_flight, stats.mailbox_depth, narrow.inside) == (3, 17, 3)
        for run in started:
            await run.wait()
        assert engine.statistics().runs_succeeded == 20
    assert narrow.most_inside == 3
    assert len(narrow.entered) == 20
    assert trio.current_time() == 7  # ceil(20 / 3) one-second steps


async def test_a_full_node_serves_its_mailbox_first_come_first_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Runs leave the unbounded first node at t = delay and queue for the second (one
    slot, two mailbox places, the rest of the senders parked): they enter it in the
    order they arrived, not the order they started."""
    delays = [5, 2, 8, 1, 7, 3, 10, 4, 9, 6]
    narrow = Timed(100, max_concurrency=1, mailbox_size=2)
    flow = chain(Timed(), narrow, "fifo")
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        for delay in delays:
            run = partial(engine.run, flow, params={"delay": delay}, run_id=f"r{delay}")
            nursery.start_soon(run)
        await trio.sleep_until(10.5)
        stats = engine.statistics().actor("fifo/second")
        assert (stats.in_flight, stats.mailbox_depth, stats.senders_waiting) == (1, 2, 7)
    assert narrow.entered == [f"r{delay}" for delay in sorted(delays)]
    assert narrow.most_inside == 1


class CancelsInPost(cf.Node):
    """A plain post (no checkpoint) that, when ``params["cancel"]`` is set, cancels
    ``runs[run_id]`` or, for a run not in ``runs``, the cancel scope ``caller``."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.runs: dict[str, cf.Run] = {}
        self.caller = trio.CancelScope()

    def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> None:
        if not ctx.params.get("cancel"):
            return
        if ctx.run_id in self.runs:
            self.runs[ctx.run_id].cancel()
        else:
            self.caller.cancel()


class Touches(Timed):
    """Timed, whose prep first notes the run in the store (no checkpoint)."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
        await store.set(f"prep:{ctx.run_id}", True)


def assert_no_slot_taken(engine: cf.Engine) -> None:
    """No actor of ``engine`` has a slot taken or a message queued."""
    busy = [
        (stats.name, stats.in_flight, stats.mailbox_depth)
        for stats in engine.statistics().actors
        if stats.in_flight or stats.mailbox_depth
    ]
    assert busy == []


async def test_a_run_cancelled_in_post_is_not_handed_off_and_its_worker_goes_on() -> None:
    first = CancelsInPost(max_concurrency=1)
    second = Touches()
    flow = chain(first, second, "cancel-in-post")
    data: dict[str, Any] = {}
    async with cf.open_engine() as engine:
        doomed = engine.start_run_nowait(flow, data, params={"cancel": True}, run_id="doomed")
        first.runs["doomed"] = doomed
        kept = engine.start_run_nowait(flow, data, run_id="kept")  # queued behind doomed
        with pytest.raises(cf.RunCancelledError):
            await doomed.wait()
        assert (await kept.wait()).execution_path == ("first", "second")
        await trio.testing.wait_all_tasks_blocked()
        assert_no_slot_taken(engine)
        stats = engine.statistics()
    assert doomed.current_state is cf.RunState.CANCELLED
    assert doomed.error is not None and "doomed" in str(doomed.error)
    assert second.entered == ["kept"]
    assert data == {"prep:kept": True}
    assert (stats.runs_cancelled, stats.runs_succeeded, stats.runs_in_flight) == (1, 1, 0)


async def test_a_caller_cancelled_in_post_does_not_start_the_next_step() -> None:
    first = CancelsInPost()
    second = Touches()
    flow = chain(first, second, "caller-cancelled")
    data: dict[str, Any] = {}
    async with cf.open_engine() as engine:
        with first.caller:
            await engine.run(flow, data, params={"cancel": True}, run_id="doomed")
        assert first.caller.cancelled_caught
        result = await engine.run(flow, data, run_id="after")
        assert result.execution_path == ("first", "second")
        await trio.testing.wait_all_tasks_blocked()
        assert_no_slot_taken(engine)
        assert engine.statistics().runs_cancelled == 1
    assert second.entered == ["after"]
    assert data == {"prep:after": True}


async def test_a_run_cancelled_while_it_waits_for_the_next_node_never_enters_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    second = Touches(10, max_concurrency=1)
    flow = chain(Timed(), second, "queued")
    data: dict[str, Any] = {}
    async with cf.open_engine() as engine:
        holder = await engine.start_run(flow, data, run_id="holder")
        doomed = await engine.start_run(flow, data, params={"delay": 1}, run_id="doomed")
        await trio.sleep_until(2)
        assert engine.statistics().actor("queued/second").mailbox_depth == 1
        doomed.cancel()
        assert doomed.current_state is cf.RunState.CANCELLED
        await holder.wait()
        assert (await engine.run(flow, data, run_id="after")).success
        await trio.testing.wait_all_tasks_blocked()
        assert_no_slot_taken(engine)
    assert second.entered == ["holder", "after"]
    assert data == {"prep:holder": True, "prep:after": True}


class HoldsRun(cf.Node):
    """exec waits forever in the runs named ``held-*``; passes a checkpoint and returns
    1 in the others."""

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> int:
        if ctx.run_id.startswith("held-"):
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        return 1


async def test_workers_whose_step_a_run_end_cancelled_run_later_steps_uncancelled() -> None:
    """A worker's cancel scope is cancelled when a run ends during its step; the worker
    then takes later runs' steps in a new scope: they all succeed."""
    flow = single(HoldsRun(max_concurrency=3))
    async with cf.open_engine() as engine:
        held = [await engine.start_run(flow, {}, run_id=f"held-{i}") for i in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        for run in held:
            run.cancel()
        later = [await engine.start_run(flow, {}) for _ in range(20)]
        results = [await run.wait() for run in later]
    assert [result.execution_path for result in results] == [("only",)] * 20
    assert [run.current_state for run in held] == [cf.RunState.CANCELLED] * 3


async def test_a_durable_runs_last_node_is_free_when_its_wait_returns(tmp_path: Path) -> None:
    """A durable run's end is written by the task that ran its last step, after that
    step's slot was released, so the waiter finds the node free."""
    flow = single(Recorder())
    async with cf.open_engine() as engine:
        storage = cf.SQLiteStorage(tmp_path / "runs.db")
        for index in range(20):
            run = await engine.start_run(flow, storage, run_id=f"run-{index}")
            await run.wait()
            assert engine.statistics().actor("single/only").in_flight == 0


REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("REQUEST", default="none")


async def test_workers_see_the_context_the_engine_was_opened_in_not_a_senders() -> None:
    """A worker serves many runs: it must not keep the context variables of the task
    that sent it its first step, and sees those of the engine's opener."""
    seen: list[tuple[str, str]] = []
    gate = trio.Event()

    @cf.node
    async def look(ctx: cf.ExecutionContext) -> None:
        seen.append((ctx.params["who"], REQUEST.get()))
        if ctx.params["who"] == "a":
            await gate.wait()

    flow = single(look, "context")

    async def started(engine: cf.Engine, who: str) -> cf.Run:
        REQUEST.set(who)
        return await engine.start_run(flow, params={"who": who})

    REQUEST.set("opener")
    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        first = await started(engine, "a")  # its worker starts from this task
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
        await first.wait()
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(started, engine, "b")
    assert seen == [("a", "opener"), ("b", "opener")]


async def test_a_workers_task_is_named_after_its_actor() -> None:
    """trio's task tree (and a debugger) shows which actor a worker serves."""
    names: list[str] = []

    @cf.node
    async def look(ctx: cf.ExecutionContext) -> None:
        names.append(trio.lowlevel.current_task().name)

    async with cf.open_engine() as engine:
        run = await engine.start_run(single(look, "named"))
        await run.wait()
    assert names == ["named/only worker"]


async def test_what_a_runs_code_sets_in_a_worker_never_reaches_another_runs_step() -> None:
    seen: list[str] = []

    @cf.node(max_concurrency=1)
    async def tags(ctx: cf.ExecutionContext) -> None:
        seen.append(REQUEST.get())
        REQUEST.set(ctx.params["who"])
        await trio.lowlevel.checkpoint()

    flow = single(tags, "tags")
    async with cf.open_engine() as engine:
        runs = [await engine.start_run(flow, params={"who": f"run{i}"}) for i in range(4)]
        for run in runs:
            await run.wait()
        assert engine.statistics().actor("tags/only").messages_processed == 4
    assert seen == ["none"] * 4


async def test_what_fails_a_step_and_what_goes_on_up() -> None:
    """The operator's Ctrl-C and the cancellation of a step being cancelled go on up;
    anything else fails the step (a coroutine closed outside trio: see below)."""
    assert fails_the_step(ValueError()) and fails_the_step(SystemExit(1))
    assert fails_the_step(trio.Cancelled._create())
    assert fails_the_step(GeneratorExit())
    assert not fails_the_step(BaseExceptionGroup("g", [KeyboardInterrupt()]))
    with trio.CancelScope() as scope:
        scope.cancel()
        assert not fails_the_step(trio.Cancelled._create())
        assert not fails_the_step(BaseExceptionGroup("g", [trio.Cancelled._create()]))
        assert fails_the_step(SystemExit(1))
        assert fails_the_step(ValueError())
        await trio.lowlevel.checkpoint()


class Endless(cf.ParallelBatchNode):
    """Three items, each waiting until it is cancelled."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[int]:
        return [1, 2, 3]

    async def exec(self, item: int, ctx: cf.ExecutionContext) -> None:
        await trio.sleep_forever()


class Twice(cf.BatchFlow):
    """Two child runs."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[dict[str, Any]]:
        return [{}, {}]


@cf.node
async def endless(ctx: cf.ExecutionContext) -> None:
    await trio.sleep_forever()


@cf.node
async def endless_nursery(ctx: cf.ExecutionContext) -> None:
    """A step whose own nursery holds two tasks waiting until they are cancelled."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        await trio.sleep_forever()


STEPS_OF_MANY_TASKS = {
    "ParallelBatchNode": lambda: single(Endless(), "items"),
    "BatchFlow": lambda: single(Twice(single(endless, "child")), "children"),
    "BatchFlow of ParallelBatchNodes": lambda: single(
        Twice(single(Endless(), "child items")), "nested"
    ),
    "a nursery of the node's own": lambda: single(endless_nursery, "own nursery"),
}


@pytest.mark.parametrize("kind", STEPS_OF_MANY_TASKS)
async def test_a_caller_cancelled_during_a_step_of_many_tasks_gets_one_cancelled(
    kind: str,
) -> None:
    """The items, child runs or tasks of the step each end with trio.Cancelled; the
    caller of engine.run gets one of them, as during any other step, not a group of
    them (which ``except trio.Cancelled`` misses)."""
    flow = STEPS_OF_MANY_TASKS[kind]()
    caught: list[BaseException] = []
    scope = trio.CancelScope()

    async def call(engine: cf.Engine) -> None:
        with scope:
            try:
                await engine.run(flow)
            except BaseException as exc:
                caught.append(exc)
                raise

    async with cf.open_engine() as engine, trio.open_nursery() as nursery:
        nursery.start_soon(call, engine)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    assert [type(exc) for exc in caught] == [trio.Cancelled]
    assert scope.cancelled_caught
    assert engine.statistics().runs_in_flight == 0


def test_a_coroutine_closed_outside_trio_goes_on_closing() -> None:
    """Python closes the coroutine of a step never finished, once its trio run is over,
    by throwing GeneratorExit into it: that is no failure of the node's."""
    assert not fails_the_step(GeneratorExit())


async def test_a_node_exiting_while_its_run_is_cancelled_fails_only_that_run() -> None:
    class GivesUp(cf.Node):
        async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise SystemExit("cleanup gave up")

    gate = Gate()
    async with cf.open_engine() as engine:
        other = await engine.start_run(single(gate, "other"))
        victim = await engine.start_run(single(GivesUp(), "victim"))
        await trio.testing.wait_all_tasks_blocked()
        victim.cancel()
        gate.open.set()
        assert (await other.wait()).success
        assert (await engine.run(single(Recorder()))).success
    assert victim.current_state == cf.RunState.CANCELLED


class SlowToStop(cf.Node):
    """exec waits until cancelled, then takes ``cleanup`` seconds, shielded, to stop."""

    max_concurrency = 1

    def __init__(self, cleanup: float) -> None:
        super().__init__()
        self.cleanup = cleanup

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(self.cleanup)


async def test_a_handed_off_step_ending_after_its_node_stopped_closes_the_engine_cleanly(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker of ``a`` carries a step of ``b`` that is still stopping when ``b`` has
    stopped with the engine; the step queued behind it is dropped (its run is cancelled),
    not started in b's closed nursery, and b's slot is free."""
    flow = cf.Flow.builder("stop").add_node("a", Recorder()).add_node("b", SlowToStop(1.0))
    flow = flow.add_route("a", "b").build()
    with trio.CancelScope() as scope:
        async with cf.open_engine(mailbox_size=1) as engine:
            carried = await engine.start_run(flow)
            queued = await engine.start_run(flow)
            await trio.testing.wait_all_tasks_blocked()
            stats = engine.statistics().actor("stop/b")
            assert (stats.in_flight, stats.mailbox_depth) == (1, 1)
            scope.cancel()
    stats = engine.statistics().actor("stop/b")
    assert (stats.in_flight, stats.mailbox_depth, stats.senders_waiting) == (0, 0, 0)
    assert {carried.current_state, queued.current_state} == {cf.RunState.CANCELLED}


class ComesBack(cf.Node):
    """One slot; records each step's run as it starts. Run "held" waits in exec for
    ``gate``; run "loops" comes back once (its step ends without a checkpoint)."""

    max_concurrency = 1

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.order: list[str] = []

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
        self.order.append(ctx.run_id)

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if ctx.run_id == "held":
            await self.gate.wait()

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> str | None:
        if ctx.run_id == "loops" and not await store.contains("back"):
            await store.set("back", True)
            return "again"
        return None


async def test_a_sender_let_into_a_full_nodes_mailbox_is_not_overtaken_by_a_hand_off() -> None:
    """The slot freed by "held" takes "loops" from the mailbox and lets the waiting
    sender of "waits" in. "loops" ends at once and comes back to the node: it must
    queue behind "waits", whose sender came first, not take the free slot. (Which of
    the two woken tasks runs first is trio's choice; every try must keep the order.)"""
    for _ in range(10):
        node = ComesBack()
        flow = cf.Flow.builder("loop").add_node("b", node).add_route("b", "b", "again")
        flow = flow.add_route("b", cf.END).build()
        async with cf.open_engine(mailbox_size=1) as engine, trio.open_nursery() as nursery:
            await engine.start_run(flow, run_id="held")
            await engine.start_run(flow, run_id="loops")
            nursery.start_soon(partial(engine.start_run, flow, run_id="waits"))
            await trio.testing.wait_all_tasks_blocked()
            assert engine.statistics().actor("loop/b").senders_waiting == 1
            node.gate.set()
        assert node.order == ["held", "loops", "waits", "loops"]


class FailsDoomed(cf.Node):
    """exec raises at once in the run called "doomed"."""

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if ctx.run_id == "doomed":
            raise ValueError("doomed")


async def test_a_run_ending_while_its_sender_waits_for_a_full_node_ends_its_caller_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The caller of engine.run fans out to ``b`` and ``c``; ``c`` is full, so the
    caller waits for room there while ``b`` fails the run. engine.run raises the run's
    error then, not once ``c`` has room; the step meant for ``c`` never runs."""
    gate = Gate(max_concurrency=1, mailbox_size=1)
    flow = cf.Flow.builder("fan").add_node("a", Recorder()).add_node("b", FailsDoomed())
    flow = flow.add_node("c", gate).add_route("a", ["b", "c"]).build()
    async with cf.open_engine() as engine:
        held = [await engine.start_run(flow) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        assert engine.statistics().actor("fan/c").mailbox_depth == 1
        with trio.fail_after(60), pytest.raises(cf.NodeError, match="'b' failed in exec"):
            await engine.run(flow, run_id="doomed")
        assert engine.statistics().actor("fan/c").senders_waiting == 0
        gate.open.set()
        assert [(await run.wait()).success for run in held] == [True, True]
    assert gate.entered == 2


class Scripted(cf.BatchNode):
    """A batch node whose item is the list of what each attempt does: "fail" or a result;
    records the ``current_retry`` of each attempt."""

    max_retries = 3

    def __init__(self) -> None:
        super().__init__()
        self.retries_seen: list[int] = []

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[list[str]]:
        return [["fail", "one"], ["two"]]

    async def exec(self, script: list[str], ctx: cf.ExecutionContext) -> str:
        self.retries_seen.append(ctx.current_retry)
        if script[ctx.current_retry] == "fail":
            raise ConnectionError("failed")
        return script[ctx.current_retry]

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: list[str], ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(exec_res)


async def test_each_item_of_a_batch_node_starts_from_its_first_attempt() -> None:
    node = Scripted()
    result = await single(node).run()
    assert result.result == ["one", "two"]
    assert node.retries_seen == [0, 1, 0]


def in_flight(engine: cf.Engine, actor: str) -> int:
    """The steps that node actor ``actor`` holds a slot for."""
    (stats,) = [stats for stats in engine.statistics().actors if stats.name == actor]
    return stats.in_flight


async def test_a_run_cancelled_while_its_step_waits_for_a_full_lossless_stream_ends_it() -> None:
    """The step waits for room holding its node's slot; cancelling the run frees it."""
    async with cf.open_engine() as engine, engine.events(buffer=1, lossless=True):
        run = await engine.start_run(single(Recorder()))
        await trio.testing.wait_all_tasks_blocked()
        assert in_flight(engine, "single/only") == 1
        run.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert in_flight(engine, "single/only") == 0


async def test_a_node_error_names_the_nested_flow_that_holds_the_node() -> None:
    """Two flows hold a node "work": the error of the one in the nested flow names it."""

    @cf.node
    async def work(ctx: cf.ExecutionContext) -> None:
        raise ValueError("inner trouble")

    inner = cf.Flow.builder("inner").add_node("work", work).build()
    outer = (
        cf.Flow.builder("outer")
        .add_node("work", Recorder())
        .add_node("nested", inner)
        .add_route("work", "nested")
        .build()
    )
    with pytest.raises(cf.NodeError) as info:
        await outer.run({})
    assert (info.value.node_id, info.value.flow_name) == ("work", "inner")
    assert str(info.value).startswith("node 'work' failed in exec (flow 'inner', run ")


async def test_workers_are_parked_and_given_steps_protected_from_keyboard_interrupt() -> None:
    """A Ctrl-C landing between taking a parked worker and waking it would lose the step
    it was given: those lines run protected."""
    flow = single(Recorder())
    with ki_protection_seen(NodeActor._dispatch, NodeActor._park) as seen:
        async with cf.open_engine() as engine:
            for _ in range(2):  # the second step goes to the worker the first one parked
                run = await engine.start_run(flow)
                await run.wait()
    assert seen == {"NodeActor._dispatch": {True}, "NodeActor._park": {True}}


async def answer_of(question: str) -> str:
    return f"answer to {question}"


class ForgetsToAwait(cf.Node):
    """exec (or, failing, exec_fallback), an async def, returns a coroutine instead of
    awaiting it; keeps it."""

    max_retries = 2

    def __init__(self, failing: bool) -> None:
        super().__init__()
        self.failing = failing
        self.returned: list[Any] = []

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> Any:
        if self.failing:
            raise ValueError("down")
        self.returned.append(answer_of("q"))
        return self.returned[-1]

    async def exec_fallback(self, prep_res: Any, error: Exception, ctx: cf.ExecutionContext) -> Any:
        self.returned.append(answer_of("q"))
        return self.returned[-1]


@pytest.mark.parametrize(
    ("failing", "method", "attempts"), [(False, "exec", 1), (True, "exec_fallback", 2)]
)
async def test_an_async_exec_that_returns_a_coroutine_fails_the_step(
    failing: bool, method: str, attempts: int
) -> None:
    node = ForgetsToAwait(failing)
    with pytest.raises(cf.NodeError) as info:
        await single(node).run()
    assert (info.value.phase, info.value.attempts) == ("exec", attempts)
    cause = info.value.__cause__
    assert isinstance(cause, TypeError)
    assert str(cause) == (
        f"{method} of node 'only' returned a coroutine (answer_of) instead of its result: "
        "await it (`return await answer_of(...)`)"
    )
    [coroutine] = node.returned
    assert inspect.getcoroutinestate(coroutine) == "CORO_CLOSED"


async def test_a_prep_that_returns_a_coroutine_fails_the_step_in_prep() -> None:
    returned: list[Any] = []

    class PrepForgets(cf.Node):
        async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> Any:
            returned.append(answer_of("q"))
            return returned[-1]

        async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> Any:
            return prep_res

    with pytest.raises(cf.NodeError) as info:
        await single(PrepForgets()).run()
    assert info.value.phase == "prep"
    assert str(info.value.__cause__) == (
        "prep of node 'only' returned a coroutine (answer_of) instead of its result: "
        "await it (`return await answer_of(...)`)"
    )
    [coroutine] = returned
    assert inspect.getcoroutinestate(coroutine) == "CORO_CLOSED"


class LastInFirstOut(cf.Node):
    """A leaf of a fan-out of ``width``: its step ends once every leaf's step has begun,
    the steps begun last ending first."""

    def __init__(self, begun: list[str], width: int) -> None:
        super().__init__()
        self.begun = begun
        self.width = width

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        self.begun.append(ctx.node_id)
        await trio.sleep(self.width - self.begun.index(ctx.node_id))


async def test_a_step_that_ends_takes_its_scope_out_of_a_wide_fan_out_without_a_scan(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every branch's scope is among the run's scopes while its step runs; the steps end
    # in the reverse of the order they began, so a list would be scanned through the
    # scopes of all the branches still in flight at each end (width² / 2 comparisons).
    width = 200
    comparisons = 0

    def counted(scope: trio.CancelScope, other: object) -> bool:
        nonlocal comparisons
        comparisons += 1
        return scope is other

    begun: list[str] = []
    builder = cf.Flow.builder("wide").add_node("start", Recorder("go")).add_join("join", Recorder())
    leaves = [f"leaf{i}" for i in range(width)]
    for leaf in leaves:
        builder.add_node(leaf, LastInFirstOut(begun, width)).add_route(leaf, "join")
    flow = builder.add_route("start", leaves, "go").max_steps(width + 2).build()
    async with cf.open_engine() as engine:
        monkeypatch.setattr(trio.CancelScope, "__eq__", counted)
        result = await engine.run(flow, {})
    assert result.last_node_id == "join"
    assert sorted(begun) == sorted(leaves)
    assert comparisons < width, comparisons


class Exits(cf.ActionCondition):
    """A condition whose evaluate calls sys.exit()."""

    @property
    def keys(self) -> frozenset[str]:
        return frozenset({"k"})

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        sys.exit(5)


class UnreadableParams(Mapping[str, Any]):
    """Params that cannot be iterated."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("cannot iterate these params")


class WriteOnlyFlag(dict[str, Any]):
    """A user's dict subclass whose get refuses the key a route condition reads."""

    def get(self, key: str, default: Any = None) -> Any:
        if key == "flag":
            raise PermissionError("'flag' is write-only")
        return super().get(key, default)


@cf.node
async def goes(ctx: cf.ExecutionContext) -> str:
    return "go"


@cf.node
async def done(ctx: cf.ExecutionContext) -> cf.Action:
    return cf.Action.complete("done")


class ExitsInAnUpdate(cf.Node):
    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> None:
        await store.update("k", sys.exit, 0)


def routed_when(condition: cf.ActionCondition) -> cf.Flow:
    """a → b on "go" when ``condition`` holds, else the run ends."""
    builder = cf.Flow.builder("routed").add_node("a", goes).add_node("b", done)
    return builder.add_route("a", "b", "go", when=condition).add_route("a", cf.END, "go").build()


class ExitsInPost(cf.Node):
    async def post(self, store: cf.SharedStore, *_: Any) -> cf.Action:
        return cf.Action.conditional(Exits(), "go", "stop")


class EachUnreadable(cf.BatchFlow):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[Any]:
        return [UnreadableParams()]


def mistakes(tmp_path: Path) -> dict[str, tuple[cf.Flow, Any, type[Exception], str]]:
    """Mistakes of a run outside its nodes' phases, each its flow, its store, the error
    the run fails with and the node it names."""
    file_store = cf.FileStorage(tmp_path / "store.json")
    then_done = cf.Flow.builder("conditional").add_node("a", ExitsInPost()).add_node("b", done)
    batch = cf.Flow.builder("child").add_node("c", done).build()
    return {
        "route condition exits": (routed_when(Exits()), None, cf.ConditionError, "'a'"),
        "conditional action exits": (
            then_done.add_route("a", "b", "go").add_route("a", cf.END, "stop").build(),
            None,
            cf.ConditionError,
            "'a'",
        ),
        "update function exits": (single(ExitsInAnUpdate()), file_store, cf.NodeError, "'only'"),
        "unreadable params": (
            cf.Flow.builder("batch").add_node("each", EachUnreadable(batch)).build(),
            None,
            cf.NodeError,
            "'each'",
        ),
        "store's get raises": (
            routed_when(cf.ActionCondition.key_exists("flag")),
            WriteOnlyFlag(),
            cf.StorageError,
            "get_many failed",
        ),
    }


@pytest.mark.parametrize(
    "mistake",
    [
        "route condition exits",
        "conditional action exits",
        "update function exits",
        "unreadable params",
        "store's get raises",
    ],
)
async def test_a_runs_mistake_outside_its_phases_fails_that_run_alone(
    tmp_path: Path, mistake: str
) -> None:
    flow, store, error, named = mistakes(tmp_path)[mistake]
    gate = Gate()
    async with cf.open_engine() as engine:
        others = [await engine.start_run(single(gate, "other")) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        failing = await engine.start_run(flow, store)
        with pytest.raises(error) as info:
            await failing.wait()
        gate.open.set()
        for other in others:
            assert (await other.wait()).success
        assert (await engine.run(single(gate, "after"))).success
    assert named in str(info.value)


class NamedLater(str):
    """An action name of a str subclass whose hash and length raise."""

    def __hash__(self) -> int:
        raise RuntimeError("no hash")

    def __len__(self) -> int:
        raise RuntimeError("no length")


@pytest.mark.parametrize(
    "returned",
    [NamedLater("go"), cf.Action.simple(NamedLater("go"))],
    ids=["str", "Action.simple"],
)
async def test_an_action_name_of_a_str_subclass_routes_as_its_str(returned: Any) -> None:
    class Returns(cf.Node):
        async def post(self, store: cf.SharedStore, *_: Any) -> Any:
            return returned

    flow = cf.Flow.builder("subclass").add_node("a", Returns()).add_node("b", done)
    result = await flow.add_route("a", "b", "go").build().run()
    assert result.execution_path == ("a", "b")


class InAThread(cf.Node):
    """exec, on a thread, blocks until ``release`` is set."""

    executor = "thread"

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started = threading.Event()

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
        self.started.set()
        self.release.wait(10)
        return "late"


@pytest.mark.parametrize("first", [True, False])
async def test_a_cancelled_caller_of_engine_run_returns_at_once_from_a_step_on_a_thread(
    first: bool,
) -> None:
    """The caller carries no step on a thread (the node takes no hand-off): its
    worker keeps the step until the thread returns."""
    blocking = InAThread()
    builder = cf.Flow.builder("thread")
    if not first:
        builder.add_node("inline", Recorder()).add_route("inline", "blocking")
    flow = builder.add_node("blocking", blocking).build()
    async with cf.open_engine() as engine:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.run, flow)
                await trio.to_thread.run_sync(blocking.started.wait)
                scope.cancel()
        assert not blocking.release.is_set()
        assert engine.statistics().actor("thread/blocking").in_flight == 1
        blocking.release.set()
    assert engine.statistics().runs_cancelled == 1


async def test_a_step_cancelling_its_workers_nursery_crashes_the_engine_out_loud() -> None:
    """The node's code cancels the cancel scope of the nursery its worker runs in,
    which is the node actor's: the actor cannot serve any more, so the engine fails
    its runs and leaves its block with the actor's crash (not a silent hang)."""

    @cf.node
    async def rogue(ctx: cf.ExecutionContext) -> None:
        task = trio.lowlevel.current_task()
        assert task.parent_nursery is not None
        task.parent_nursery.cancel_scope.cancel()
        await trio.lowlevel.checkpoint()

    with pytest.RaisesGroup(
        pytest.RaisesExc(RuntimeError, match="cancelled the cancel scope of its workers"),
        flatten_subgroups=True,
    ):
        async with cf.open_engine() as engine:
            run = await engine.start_run(single(rogue, "rogue"))
            with pytest.raises(cf.ActorCrashedError, match="rogue/only"):
                await run.wait()
