"""Nodes: the prep → exec → post units a flow is made of.

A node instance serves every run that passes through it, concurrently, inside its node
actor; keep per-run state in the store or in the context, never on ``self``.
"""

from __future__ import annotations

import functools
import inspect
import math
import reprlib
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    Literal,
    Protocol,
    TypedDict,
    TypeGuard,
    TypeVar,
    Unpack,
    get_args,
    overload,
)

from cosmoflow_actors import pickling
from cosmoflow_actors.action import Action
from cosmoflow_actors.context import ExecutionContext

if TYPE_CHECKING:
    from cosmoflow_actors.runtime.store_client import SharedStore

PostResult = Action | str | None
StepResult = Awaitable[PostResult] | PostResult
"""What a step function (``@node``) returns: the action, or an awaitable of it."""
StepFunction = Callable[[ExecutionContext], StepResult]
R = TypeVar("R", bound=StepResult)
Executor = Literal["inline", "thread", "process", "ray"]


class NodeConfig(TypedDict, total=False):
    """The config a node takes as keyword arguments (``Fetch(max_retries=5)``,
    ``@node(timeout=2.0)``), typed so that a type checker catches a wrong name or
    type; :class:`Node` documents each."""

    max_retries: int
    retry_delay: float
    backoff: float
    retry_jitter: float
    timeout: float | None
    max_concurrency: int | None
    max_exec_concurrency: int | None
    retry_on: tuple[type[BaseException], ...]
    mailbox_size: int | None
    rate_limit: tuple[int, float] | None
    executor: Executor
    ray_options: Mapping[str, Any] | None


_CONFIG_NAMES: Final = tuple(NodeConfig.__annotations__)
EXECUTORS: Final[tuple[Executor, ...]] = get_args(Executor)
RAY_OPTIONS = ("num_cpus", "num_gpus", "resources", "runtime_env", "max_retries")
"""The Ray task options a node may set in ``ray_options``."""


class Node:
    """Base class of a node. Override any of :meth:`prep`, :meth:`exec`, :meth:`post`,
    :meth:`exec_fallback`, as plain ``def`` or ``async def``.

    Config is class attributes, overridable per instance by keyword arguments
    (``MyNode(max_retries=5)``). Invalid config raises ``ValueError`` when the class is
    defined or the instance is made. A class that keeps a PocketFlow name this package
    never reads raises ``TypeError`` when it is defined: a number ``wait``
    (``retry_delay`` here), ``max_retry`` or ``cur_retry``, or an ``_exec`` or
    ``_orch`` method (or its ``_async`` variant). A method named ``wait`` is the
    node's own, and is accepted.
    """

    max_retries: int = 1
    """Total exec attempts (>= 1); 1 means no retry."""
    retry_delay: float = 0.0
    """Seconds before the first retry. An exec error with a ``retry_after`` attribute
    (seconds, a finite number >= 0, such as an HTTP 429's Retry-After; any other value,
    or an attribute that raises, is ignored) makes the wait before the next attempt at
    least that long."""
    backoff: float = 1.0
    """Multiplier applied to the delay after each retry."""
    retry_jitter: float = 0.0
    """How much of each retry delay is random, from 0 to 1: the wait is drawn uniformly
    from ``[delay * (1 - retry_jitter), delay]`` (0 = exactly the delay, 1 = anywhere
    from 0 to the delay), so that runs failing together do not retry together. The
    back-off multiplies the delay before the draw, so the randomness does not compound."""
    timeout: float | None = None
    """Seconds one exec attempt may take; exceeding it is a failed attempt."""
    max_concurrency: int | None = None
    """Steps this node's actor runs at once (None = unbounded)."""
    max_exec_concurrency: int | None = None
    """Exec attempts of this node in flight at once, across its steps, every run and a
    batch node's items (None = unbounded). An attempt waits for a slot, first come first
    served, before the rate limit and before its timeout starts, and holds it until it
    ends (a thread, process or Ray exec too); retry delays, the fallback, prep and post
    hold none."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Exception types that are retried; others go straight to the fallback."""
    mailbox_size: int | None = None
    """Steps this node's mailbox holds before senders wait (None = the engine's size)."""
    rate_limit: tuple[int, float] | None = None
    """``(calls, per_seconds)``: at most ``calls`` exec attempts start in any window of
    ``per_seconds`` (None = no limit)."""
    executor: Executor = "inline"
    """Where exec runs: "inline" (the trio thread), "thread" (``trio.to_thread``),
    "process" (a trio-parallel worker process) or "ray" (a Ray task). All but inline
    need a plain ``def exec`` and get no store access."""
    ray_options: Mapping[str, Any] | None = None
    """Options of the Ray task of an ``executor="ray"`` node: ``num_cpus``, ``num_gpus``
    (numbers >= 0), ``resources`` (name → amount), ``runtime_env`` (a dict),
    ``max_retries`` (times Ray runs the task again when its worker is lost; an int >= 0,
    default 3)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        validate_config(cls, cls.__qualname__)
        problem = pocketflow_problem(_class_attributes(cls))
        if problem is not None:
            raise TypeError(f"{cls.__qualname__}: {problem}")

    def __init__(self, **config: Unpack[NodeConfig]) -> None:
        owner = self._config_owner()
        unknown = sorted(set(config) - set(_CONFIG_NAMES))
        if unknown:
            raise TypeError(_unknown_config_message(owner, unknown))
        for name, value in config.items():
            setattr(self, name, value)
        validate_config(self, owner)

    def _config_owner(self) -> str:
        """How errors in this node's config name it."""
        return type(self).__qualname__

    def prep(self, store: SharedStore, ctx: ExecutionContext, /) -> Any:
        """Read what exec needs from the store. The default returns None."""
        return None

    def exec(self, prep_res: Any, ctx: ExecutionContext, /) -> Any:
        """Do the work, without store access; retried per the config. Default: None."""
        return None

    def exec_fallback(self, prep_res: Any, error: Exception, ctx: ExecutionContext, /) -> Any:
        """Called after the last failed exec attempt; its return value replaces exec's.

        The default re-raises ``error``, which fails the run with a ``NodeError``.
        """
        raise error

    def post(
        self, store: SharedStore, prep_res: Any, exec_res: Any, ctx: ExecutionContext, /
    ) -> Awaitable[PostResult] | PostResult:
        """Write results and choose the action. The default returns None ("default")."""
        return None


_POCKETFLOW_CONFIG: Final = {"wait": "retry_delay"}
"""PocketFlow's node config names that have another name here."""


_POCKETFLOW_NUMBERS: Final = {
    "wait": "PocketFlow's name for retry_delay: set retry_delay",
    "max_retry": "a misspelling of max_retries: set max_retries",
    "cur_retry": "PocketFlow's attempt number, never set here: read ctx.current_retry",
}
"""Numeric attributes of PocketFlow's nodes (or close to their names) that no code of
this package reads, with what to do instead."""
_POCKETFLOW_METHODS: Final = ("_exec", "_orch", "_exec_async", "_orch_async")
"""PocketFlow's internal methods that a node overrode there (its retry loop, a flow's
orchestration); nothing here calls them. ``_run`` is not among them: it is a common
name for a helper of one's own."""


def _class_attributes(cls: type) -> dict[str, object]:
    """What the instances of ``cls`` find on their class: its attributes and those of
    its bases (a mixin's too), the nearest first."""
    found: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        found.update(vars(klass))
    return found


def pocketflow_problem(attributes: Mapping[str, object]) -> str | None:
    """Why ``attributes`` (a node class's or a node's own, ``vars()``) hold a PocketFlow
    name that nothing here reads, which would be silently ignored, or None."""
    for name, advice in _POCKETFLOW_NUMBERS.items():
        value = attributes.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{name} = {value!r} is never read ({advice})"
    for name in _POCKETFLOW_METHODS:
        if name in attributes:
            return (
                f"{name} is PocketFlow's internal method, never called here: retries are "
                "config (max_retries, retry_delay, backoff, retry_on) and exec_fallback "
                "handles the last failure; override prep, exec, exec_fallback or post, "
                "or rename it if it is a helper of yours"
            )
    return None


def _unknown_config_message(owner: str, unknown: list[str]) -> str:
    """Name the ``unknown`` config of ``owner``, the names a node takes, and the name
    here of a PocketFlow config among them."""
    message = f"{owner}: unknown config {', '.join(unknown)}"
    renamed = [
        f"{name!r} is {_POCKETFLOW_CONFIG[name]!r}"
        for name in unknown
        if name in _POCKETFLOW_CONFIG
    ]
    if renamed:
        message += f" (PocketFlow's {', '.join(renamed)} here)"
    return f"{message}; a node takes {', '.join(_CONFIG_NAMES)}"


def validate_config(target: object, owner: str) -> None:
    """Raise ``ValueError`` naming ``owner`` when the node config on ``target`` is invalid."""
    max_retries = getattr(target, "max_retries", 1)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 1:
        raise ValueError(f"{owner}: max_retries must be an int >= 1, got {max_retries!r}")
    for name in ("retry_delay", "backoff"):
        _require_number(owner, name, getattr(target, name, 0.0))
    jitter = getattr(target, "retry_jitter", 0.0)
    if not is_finite_number(jitter) or not 0 <= jitter <= 1:
        raise ValueError(f"{owner}: retry_jitter must be a number from 0 to 1, got {jitter!r}")
    timeout = getattr(target, "timeout", None)
    if timeout is not None and (not is_finite_number(timeout) or timeout <= 0):
        raise ValueError(f"{owner}: timeout must be a finite number > 0 or None, got {timeout!r}")
    for name in ("max_concurrency", "max_exec_concurrency", "mailbox_size"):
        _require_count(owner, name, getattr(target, name, None))
    _validate_rate_limit(owner, getattr(target, "rate_limit", None))
    executor = getattr(target, "executor", "inline")
    if executor not in EXECUTORS:
        raise ValueError(
            f"{owner}: executor must be one of {', '.join(EXECUTORS)}, got {executor!r}"
        )
    _validate_ray_options(owner, getattr(target, "ray_options", None))
    retry_on = getattr(target, "retry_on", (Exception,))
    if not isinstance(retry_on, tuple) or not all(_is_exception_type(t) for t in retry_on):
        raise ValueError(f"{owner}: retry_on must be a tuple of exception types, got {retry_on!r}")


def _require_number(owner: str, name: str, value: object) -> None:
    if not is_finite_number(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is an int or float (not a bool) that a float holds, finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _require_count(owner: str, name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{owner}: {name} must be an int >= 1 or None, got {value!r}")


def _validate_rate_limit(owner: str, value: object) -> None:
    if value is None:
        return
    message = (
        f"{owner}: rate_limit must be (calls: an int from 1 to {sys.maxsize}, per_seconds: "
        f"a finite number > 0), got {value!r}"
    )
    if not isinstance(value, tuple) or len(value) != 2:
        raise ValueError(message)
    calls, per = value
    if isinstance(calls, bool) or not isinstance(calls, int) or not 1 <= calls <= sys.maxsize:
        raise ValueError(message)
    if not is_finite_number(per) or per <= 0:
        raise ValueError(message)


def _validate_ray_options(owner: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ValueError(f"{owner}: ray_options must be a dict or None, got {value!r}")
    unknown = sorted(set(value) - set(RAY_OPTIONS))
    if unknown:
        raise ValueError(
            f"{owner}: ray_options may set {', '.join(RAY_OPTIONS)}, not {', '.join(unknown)}"
        )
    for name in ("num_cpus", "num_gpus"):
        if name in value:
            _require_number(owner, f"ray_options[{name!r}]", value[name])
    resources = value.get("resources", {})
    if not isinstance(resources, Mapping) or not all(isinstance(k, str) for k in resources):
        raise ValueError(f"{owner}: ray_options['resources'] must map names to amounts")
    for name, amount in resources.items():
        _require_number(owner, f"ray_options['resources'][{name!r}]", amount)
    if not isinstance(value.get("runtime_env", {}), Mapping):
        raise ValueError(f"{owner}: ray_options['runtime_env'] must be a dict")
    retries = value.get("max_retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(
            f"{owner}: ray_options['max_retries'] must be an int >= 0, got {retries!r}"
        )


def _is_exception_type(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException)


_PHASE_ARGUMENTS: Final = {
    "prep": "store, ctx",
    "exec": "prep_res, ctx",
    "exec_fallback": "prep_res, error, ctx",
    "post": "store, prep_res, exec_res, ctx",
}
"""What the node actor passes each phase method."""


def phase_problem(node: Node, *, batch: bool = False) -> str | None:
    """Which phase method of ``node`` is not callable, or cannot take what the node
    actor passes it, or cannot return a result (a generator function), or is missing
    while PocketFlow's ``<phase>_async`` is there, or None; checked by ``Flow.build``.

    With ``batch`` (a BatchNode or BatchFlow, whose prep returns an iterable of items),
    a plain generator prep is its items.
    """
    for name, arguments in _PHASE_ARGUMENTS.items():
        method = getattr(node, name)
        problem = _async_name_problem(node, name)
        if problem is not None:
            return problem
        if not callable(method):
            return (
                f"{name} is {reprlib.repr(method)}, which cannot be called: it must be a "
                f"method, {name}(self, {arguments})"
            )
        problem = _generator_problem(name, method, items=batch and name == "prep")
        if problem is not None:
            return problem
        try:
            signature = inspect.signature(method)
        except (TypeError, ValueError):
            continue  # no signature to read: a wrong call fails the step
        try:
            signature.bind(*arguments.split(", "))
        except TypeError:
            return f"{name}{_unannotated(signature)} cannot be called as {name}({arguments})"
    return None


def _async_name_problem(node: Node, name: str) -> str | None:
    """Why ``node`` defines PocketFlow's ``<name>_async`` instead of phase ``name``, or
    None. The engine never calls ``<name>_async``, so without this the phase would
    silently do nothing (the default of Node, or of a class of this package such as
    BatchFlow's prep). A class that defines both keeps its ``<name>_async`` as its own
    helper."""
    async_name = f"{name}_async"
    if not hasattr(node, async_name) or _defined_outside_the_package(type(node), name):
        return None
    return (
        f"{async_name} is never called (it is PocketFlow's name); "
        f"name it {name}, as async def {name}(self, {_PHASE_ARGUMENTS[name]})"
    )


def _defined_outside_the_package(cls: type, name: str) -> bool:
    """Whether the attribute ``name`` of ``cls`` comes from a class of the user's, not
    from one of this package's (Node, BatchFlow...)."""
    owner = next(base for base in cls.__mro__ if name in vars(base))
    return not owner.__module__.startswith("cosmoflow_actors.")


def _generator_problem(name: str, method: object, *, items: bool) -> str | None:
    """Why phase ``name`` cannot be ``method``, a generator function, or None. A plain
    generator is fine when the phase returns ``items`` (an iterable)."""
    if inspect.isasyncgenfunction(method):
        kind = "an async generator"
    elif inspect.isgeneratorfunction(method) and not items:
        kind = "a generator"
    else:
        return None
    return f"{name} is {kind} function (it yields); it must return its result"


def _unannotated(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` without its annotations, to name a method's parameters briefly."""
    parameters = [p.replace(annotation=p.empty) for p in signature.parameters.values()]
    return signature.replace(parameters=parameters, return_annotation=signature.empty)


def executor_problem(node: Node) -> tuple[str, Exception | None] | None:
    """Why ``node`` cannot run on its executor, with the error that says so (the
    pickling error of a node that cannot be sent to a worker; None for a check of this
    module's), or None; checked by ``Flow.build``. Blocks while it pickles a "process"
    or "ray" node."""
    if node.executor == "inline":
        return None
    exec_method = node.function if isinstance(node, FunctionNode) else node.exec
    if _is_async(exec_method):
        return f"executor={node.executor!r} needs a plain def exec, not async def", None
    if node.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            return "executor='ray' needs Ray: pip install 'cosmoflow-actors[ray]'", None
    if node.executor in ("process", "ray"):
        try:
            pickling.dumps(node)
        except Exception as exc:
            return f"executor={node.executor!r} cannot send the node to a worker: {exc}", exc
    return None


def _is_async(function: object) -> bool:
    """Whether calling ``function`` makes a coroutine, as far as can be seen before
    calling it: an ``async def`` (also bound, set on the instance, or in a
    ``functools.partial`` or ``partialmethod``), or an object whose class has an ``async
    def __call__``. A plain def that returns a coroutine cannot be seen."""
    while isinstance(function, functools.partial):
        function = function.func
    if inspect.iscoroutinefunction(function):
        return True
    if inspect.isroutine(function) or isinstance(function, type):
        return False
    return callable(function) and inspect.iscoroutinefunction(type(function).__call__)


class BatchNode(Node):
    """A node whose exec runs once per item of what prep returns.

    ``prep`` returns an iterable of items; ``exec(item, ctx)`` runs for each, one after
    the other, with retries, timeout and fallback per item; ``post`` receives the list
    of results in item order.
    """


class ParallelBatchNode(BatchNode):
    """A :class:`BatchNode` whose items run concurrently, at most ``max_concurrency`` at
    once (None = all at once). The first item that fails cancels the others and fails
    the step; results reach ``post`` in item order.
    """


class FunctionNode(Node, Generic[R]):
    """A node made from one function of the context (the ``@node`` decorator).

    The function runs as the exec phase (so retries, timeout and fallback apply) and may
    use ``ctx.store``; what it returns is the action. ``R`` is what the function returns
    (``Coroutine[Any, Any, str]`` for an ``async def`` returning a str), so that
    ``node.function(ctx)`` keeps its type.
    """

    def __init__(
        self, function: Callable[[ExecutionContext], R], **config: Unpack[NodeConfig]
    ) -> None:
        _check_step_function(function)
        self.function = function
        self.__name__ = getattr(function, "__name__", "node")
        self.__doc__ = function.__doc__
        super().__init__(**config)

    def _config_owner(self) -> str:
        """``@node <the function's name>``."""
        return f"@node {getattr(self.function, '__qualname__', self.__name__)}"

    def exec(self, prep_res: Any, ctx: ExecutionContext, /) -> R:
        """Call the function; the node actor awaits what an async one returns."""
        return self.function(ctx)

    def post(
        self, store: SharedStore, prep_res: Any, exec_res: Any, ctx: ExecutionContext, /
    ) -> PostResult:
        """Return the function's result, ``exec_res``, as the action."""
        return exec_res  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<node {self.__name__}>"


def _check_step_function(function: object) -> None:
    """Raise TypeError unless ``function`` may be called as ``function(ctx)`` and return
    the action (or an awaitable of it, as an ``async def`` does)."""
    if not callable(function):
        raise TypeError(f"@node needs a function of the context, got {type(function).__name__}")
    name = getattr(function, "__qualname__", repr(function))
    if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
        raise TypeError(f"@node needs a function that returns the action; {name} is a generator")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # no signature to read (some builtins): a wrong call fails the step
    try:
        signature.bind(None)
    except TypeError as exc:
        raise TypeError(
            f"@node needs a function of one argument, the context; {name}{signature} "
            f"cannot be called so ({exc})"
        ) from exc


class NodeDecorator(Protocol):
    """What ``@node(...)`` with config returns: it makes the node of a function."""

    def __call__(self, function: Callable[[ExecutionContext], R], /) -> FunctionNode[R]: ...


@overload
def node(
    function: Callable[[ExecutionContext], R], /, **config: Unpack[NodeConfig]
) -> FunctionNode[R]: ...


@overload
def node(**config: Unpack[NodeConfig]) -> NodeDecorator: ...


def node(
    function: StepFunction | None = None, /, **config: Unpack[NodeConfig]
) -> FunctionNode[Any] | NodeDecorator:
    """Make a node from ``fn(ctx) -> Action | str | None``; use as ``@node``,
    ``@node(...)`` or ``node(fn, ...)``, the config keywords those of Node."""
    if function is not None:
        return FunctionNode(function, **config)

    def decorate(fn: Callable[[ExecutionContext], R], /) -> FunctionNode[R]:
        return FunctionNode(fn, **config)

    return decorate
