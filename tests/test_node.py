"""Node config, sync and async methods, and the @node decorator."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.node import executor_problem
from tests.support import single


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_retries": 0}, "max_retries must be an int >= 1"),
        ({"max_retries": 1.5}, "max_retries must be an int >= 1"),
        ({"retry_delay": -1}, "retry_delay must be a finite number >= 0, got -1"),
        ({"backoff": -0.5}, "backoff must be a finite number >= 0, got -0.5"),
        ({"backoff": math.inf}, "backoff must be a finite number >= 0, got inf"),
        ({"retry_delay": 10**400}, "retry_delay must be a finite number >= 0"),
        ({"retry_jitter": -0.1}, "retry_jitter must be a number from 0 to 1, got -0.1"),
        ({"retry_jitter": 1.5}, "retry_jitter must be a number from 0 to 1, got 1.5"),
        ({"retry_jitter": math.nan}, "retry_jitter must be a number from 0 to 1, got nan"),
        ({"retry_jitter": True}, "retry_jitter must be a number from 0 to 1, got True"),
        ({"retry_jitter": "0.5"}, "retry_jitter must be a number from 0 to 1, got '0.5'"),
        ({"timeout": -3}, "timeout must be a finite number > 0 or None, got -3"),
        ({"timeout": 0}, "timeout must be a finite number > 0 or None, got 0"),
        ({"timeout": math.inf}, "timeout must be a finite number > 0 or None, got inf"),
        ({"rate_limit": (2**63, 1.0)}, r"rate_limit must be \(calls: an int from 1 to"),
        ({"rate_limit": (1, 10**400)}, "per_seconds: a finite number > 0"),
        ({"max_concurrency": 0}, "max_concurrency must be an int >= 1"),
        ({"max_exec_concurrency": 0}, "max_exec_concurrency must be an int >= 1 or None, got 0"),
        ({"max_exec_concurrency": True}, "max_exec_concurrency must be an int >= 1"),
        ({"max_exec_concurrency": 2.0}, "max_exec_concurrency must be an int >= 1"),
        ({"retry_on": (ValueError, 3)}, "retry_on must be a tuple of exception types"),
    ],
)
def test_invalid_config_raises_value_error_at_construction(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cf.Node(**config)


def test_invalid_class_config_raises_when_the_class_is_defined() -> None:
    with pytest.raises(ValueError, match="Broken: max_retries"):

        class Broken(cf.Node):
            max_retries = 0


def test_unknown_config_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown config max_retry"):
        cf.Node(max_retry=3)


def test_unknown_config_names_the_config_a_node_takes_and_pocketflow_wait() -> None:
    with pytest.raises(TypeError) as info:
        cf.Node(wait=0.1, max_retry=3)
    assert str(info.value) == (
        "Node: unknown config max_retry, wait (PocketFlow's 'wait' is 'retry_delay' here); "
        "a node takes max_retries, retry_delay, backoff, retry_jitter, timeout, max_concurrency, "
        "max_exec_concurrency, retry_on, mailbox_size, rate_limit, executor, ray_options"
    )


@pytest.mark.parametrize(
    ("name", "advice"),
    [
        ("wait", "PocketFlow's name for retry_delay: set retry_delay"),
        ("max_retry", "a misspelling of max_retries: set max_retries"),
        ("cur_retry", "PocketFlow's attempt number, never set here: read ctx.current_retry"),
    ],
)
def test_a_pocketflow_setting_is_refused_when_the_class_is_defined(name: str, advice: str) -> None:
    with pytest.raises(TypeError) as info:
        type("Ported", (cf.Node,), {name: 3})
    assert str(info.value) == f"Ported: {name} = 3 is never read ({advice})"


@pytest.mark.parametrize("name", ["_exec", "_orch", "_exec_async", "_orch_async"])
def test_a_pocketflow_internal_method_is_refused_when_the_class_is_defined(name: str) -> None:
    def hook(self: cf.Node, prep_res: Any) -> str:
        return "never called"

    with pytest.raises(TypeError, match=f"^Ported: {name} is PocketFlow's internal method"):
        type("Ported", (cf.Node,), {name: hook})


def test_a_pocketflow_name_from_a_mixin_is_refused_when_the_class_is_defined() -> None:
    """A node class finds the names of its bases too: one a mixin brings is as silently
    ignored as one of its own body."""
    mixin = type("Retrying", (), {"wait": 2})
    with pytest.raises(TypeError) as info:
        type("Ported", (mixin, cf.Node), {})
    assert str(info.value) == (
        "Ported: wait = 2 is never read (PocketFlow's name for retry_delay: set retry_delay)"
    )


def test_a_method_named_wait_or_run_is_a_nodes_own() -> None:
    class Polls(cf.Node):
        def wait(self) -> None:
            """The node's own helper, not PocketFlow's number of seconds."""

        def _run(self) -> None:
            """A helper of the node's own: PocketFlow's ``_run`` is not refused."""

    cf.Flow.builder("f").add_node("a", Polls()).build()


def test_keyword_config_overrides_the_class_default_per_instance() -> None:
    class Patient(cf.Node):
        max_retries = 3
        retry_delay = 0.5

    node = Patient(max_retries=5)
    assert (node.max_retries, node.retry_delay) == (5, 0.5)
    assert Patient().max_retries == 3


def test_max_exec_concurrency_is_set_by_class_keyword_or_decorator() -> None:
    class Bounded(cf.Node):
        max_exec_concurrency = 4

    @cf.node(max_exec_concurrency=2)
    async def call(ctx: cf.ExecutionContext) -> None: ...

    assert (cf.Node().max_exec_concurrency, Bounded().max_exec_concurrency) == (None, 4)
    assert Bounded(max_exec_concurrency=None).max_exec_concurrency is None
    assert call.max_exec_concurrency == 2
    with pytest.raises(ValueError, match="Broken: max_exec_concurrency must be an int >= 1"):

        class Broken(cf.Node):
            max_exec_concurrency = -1


def test_retry_jitter_takes_0_to_1_by_class_keyword_or_decorator() -> None:
    class Jittered(cf.Node):
        retry_jitter = 1

    @cf.node(retry_jitter=0.25)
    async def call(ctx: cf.ExecutionContext) -> None: ...

    assert (cf.Node().retry_jitter, Jittered().retry_jitter) == (0.0, 1)
    assert (Jittered(retry_jitter=0).retry_jitter, call.retry_jitter) == (0, 0.25)
    with pytest.raises(ValueError, match="Broken: retry_jitter must be a number from 0 to 1"):

        class Broken(cf.Node):
            retry_jitter = 2


class WithoutSuperInit(cf.Node):
    max_retries = 2

    def __init__(self, label: str) -> None:
        self.label = label

    def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> str:
        return self.label


async def test_a_subclass_need_not_call_super_init() -> None:
    class Post(WithoutSuperInit):
        def post(
            self, store: cf.SharedStore, prep_res: Any, exec_res: str, ctx: cf.ExecutionContext
        ) -> cf.Action:
            return cf.Action.complete(exec_res)

    assert (await single(Post("hi")).run()).result == "hi"


class SyncNode(cf.Node):
    def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        return 2

    def exec(self, prep_res: int, ctx: cf.ExecutionContext) -> int:
        return prep_res * 10

    def post(
        self, store: cf.SharedStore, prep_res: int, exec_res: int, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return cf.Action.complete(prep_res + exec_res)


class AsyncNode(cf.Node):
    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> int:
        return int(await store.get("x"))

    async def exec(self, prep_res: int, ctx: cf.ExecutionContext) -> int:
        return prep_res * 10

    async def post(
        self, store: cf.SharedStore, prep_res: int, exec_res: int, ctx: cf.ExecutionContext
    ) -> cf.Action:
        await store.set("y", exec_res)
        return cf.Action.complete(prep_res + exec_res)


async def test_sync_and_async_methods_both_work() -> None:
    assert (await single(SyncNode()).run()).result == 22
    store = {"x": 3}
    assert (await single(AsyncNode()).run(store)).result == 33
    assert store["y"] == 30


async def test_a_node_with_no_overrides_returns_default() -> None:
    result = await single(cf.Node()).run()
    assert result.final_action == cf.Action.simple("default")


async def test_the_node_decorator_without_arguments() -> None:
    @cf.node
    async def greet(ctx: cf.ExecutionContext) -> None:
        name = await ctx.store.get("name", "world")
        await ctx.store.set("greeting", f"Hello, {name}!")

    store = {"name": "Ada"}
    result = await single(greet).run(store)
    assert store["greeting"] == "Hello, Ada!"
    assert result.final_action == cf.Action.simple("default")
    assert repr(greet) == "<node greet>"


def test_node_called_with_a_function_and_config_configures_it() -> None:
    """``cf.node(fn, ...)``: the config is the node's, and checked as ``@node(...)``
    checks it."""

    def plain(ctx: cf.ExecutionContext) -> None:
        return None

    made = cf.node(plain, max_retries=3, timeout=5.0)
    assert (made.max_retries, made.timeout) == (3, 5.0)
    with pytest.raises(ValueError, match="timeout"):
        cf.node(plain, timeout=-5)


async def _two(ctx: cf.ExecutionContext, extra: int) -> None: ...


async def _steps(ctx: cf.ExecutionContext) -> Any:
    yield "a"


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (42, "@node needs a function of the context, got int"),
        (_two, r"needs a function of one argument, the context; _two\(ctx"),
        (_steps, "_steps is a generator"),
    ],
)
def test_the_node_decorator_refuses_what_cannot_be_a_step(function: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        cf.node(function)
    with pytest.raises(TypeError, match=message):
        cf.node(max_retries=2)(function)


def test_the_node_decorator_names_the_function_whose_config_is_wrong() -> None:
    async def summarize(ctx: cf.ExecutionContext) -> None: ...

    with pytest.raises(ValueError) as bad_value:
        cf.node(max_retries=0)(summarize)
    with pytest.raises(TypeError) as unknown:
        cf.node(retries=3)(summarize)  # type: ignore[call-overload]

    owner = "@node test_the_node_decorator_names_the_function_whose_config_is_wrong.<locals>"
    assert str(bad_value.value) == f"{owner}.summarize: max_retries must be an int >= 1, got 0"
    assert str(unknown.value).startswith(f"{owner}.summarize: unknown config retries;")


async def test_the_node_decorator_with_config_retries_the_function() -> None:
    calls: list[int] = []

    @cf.node(max_retries=3)
    def flaky(ctx: cf.ExecutionContext) -> str:
        calls.append(ctx.current_retry)
        if len(calls) < 3:
            raise ConnectionError("try again")
        return "ok"

    assert isinstance(flaky, cf.FunctionNode)
    result = await single(flaky).run()
    assert calls == [0, 1, 2]
    assert result.final_action == cf.Action.simple("ok")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"mailbox_size": 0}, "mailbox_size must be an int >= 1"),
        ({"rate_limit": (0, 1.0)}, "rate_limit must be"),
        ({"rate_limit": (3, 0)}, "rate_limit must be"),
        ({"rate_limit": 5}, "rate_limit must be"),
        ({"executor": "gpu"}, "executor must be one of inline, thread, process"),
    ],
)
def test_invalid_limits_and_executors_raise_value_error(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cf.Node(**config)


class AsyncCall:
    async def __call__(self, ctx: cf.ExecutionContext) -> None:
        pass


class PartialExec(cf.Node):
    executor = "thread"

    async def _work(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        pass

    exec = functools.partialmethod(_work)  # type: ignore[assignment]


async def async_exec(prep_res: Any, ctx: cf.ExecutionContext) -> None:
    pass


def async_on_the_instance() -> cf.Node:
    node = cf.Node(executor="thread")
    node.exec = async_exec  # type: ignore[method-assign]
    return node


@pytest.mark.parametrize(
    "make",
    [
        lambda: cf.node(executor="thread")(AsyncCall()),
        PartialExec,
        async_on_the_instance,
        lambda: cf.node(executor="process")(functools.partial(AsyncCall())),
    ],
    ids=["async __call__", "partialmethod", "set on the instance", "partial of async __call__"],
)
def test_an_exec_that_makes_a_coroutine_is_refused_off_the_trio_thread(
    make: Callable[[], cf.Node],
) -> None:
    node = make()
    problem = executor_problem(node)
    assert problem is not None
    assert problem[0] == f"executor={node.executor!r} needs a plain def exec, not async def"


def test_a_callable_object_with_a_plain_call_may_run_on_a_thread() -> None:
    class PlainCall:
        def __call__(self, ctx: cf.ExecutionContext) -> None:
            pass

    assert executor_problem(cf.node(executor="thread")(PlainCall())) is None
