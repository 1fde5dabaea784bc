"""The error hierarchy: every error a run fails with, and every error of the engine's
own, is a :class:`CosmoFlowError` (a bad argument is a ``TypeError`` or ``ValueError``).

Errors keep their origin: a :class:`NodeError` names the node, the phase and the run,
and carries the exception the node raised as ``__cause__`` (never as a string). Where a
message must quote another exception, :func:`type_and_message` writes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal


class CosmoFlowError(Exception):
    """The root of every error a run fails with, and of the engine's own errors.

    A call given a bad argument raises ``TypeError`` or ``ValueError`` instead, as
    Python's convention is, and a call made where it cannot work ``RuntimeError``.

    Every one pickles with its message and attributes (to and from a worker process or
    a Ray task), whatever its constructor takes; like any exception, it leaves its
    ``__cause__`` and traceback behind.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuilt, (type(self), self.args, self.__dict__))


class FlowValidationError(CosmoFlowError, ValueError):
    """``FlowBuilder.build()`` found the flow invalid; ``problems`` lists each fault."""

    def __init__(self, flow_name: str, problems: Sequence[str]) -> None:
        self.flow_name = flow_name
        self.problems = tuple(problems)
        super().__init__(f"flow {flow_name!r} is invalid: " + "; ".join(self.problems))


class ConditionError(CosmoFlowError, ValueError):
    """A condition could not be built (a malformed expression, a bad operator), or could
    not be evaluated: a store value's comparison or truthiness raised (its
    ``__cause__``), which fails that run alone."""


class NoRouteError(CosmoFlowError):
    """A node returned an action that none of its routes accepts; or, when
    ``returned_by`` is set, the nested flow ``node_id`` ended with an action (which its
    node ``returned_by`` returned) that none of the routes from ``node_id`` accepts.
    ``flow_name`` is the name of the flow whose routes those are, when known."""

    def __init__(
        self,
        node_id: str,
        action: str,
        available: Sequence[str],
        returned_by: str | None = None,
        flow_name: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.action = action
        self.available = tuple(available)
        self.returned_by = returned_by
        self.flow_name = flow_name
        of_flow = "" if flow_name is None else f" of flow {flow_name!r}"
        subject = f"node {node_id!r}{of_flow} returned action {action!r}"
        if returned_by is not None:
            subject = (
                f"nested flow {node_id!r}{of_flow} ended with action {action!r} (returned "
                f"by node {returned_by!r} inside it)"
            )
        message = (
            f"{subject}, which no route accepts; available actions: "
            f"{', '.join(map(repr, self.available))}"
        )
        if action in self.available:
            message = (
                f"{subject}, and the condition of every route on it failed; add a route on "
                "it without a condition to catch the rest"
            )
        elif action == "default":
            message += (
                f" (post returned nothing or 'default': to end the run there, add "
                f"add_route({node_id!r}, cf.END))"
            )
        super().__init__(message)


class MaxStepsExceeded(CosmoFlowError):
    """A run would take more steps than its flow's ``max_steps`` allows (``flow_name``,
    when given, names the flow whose limit it is: the run's or a nested flow's)."""

    def __init__(
        self, max_steps: int, execution_path: Sequence[str], flow_name: str | None = None
    ) -> None:
        self.max_steps = max_steps
        self.execution_path = tuple(execution_path)
        self.flow_name = flow_name
        shown = self.execution_path[-5:]
        steps = " -> ".join(shown)
        if len(shown) < len(self.execution_path):
            steps = f"last steps: ... -> {steps}"
        else:
            steps = f"steps: {steps}"
        limit = f"max_steps={max_steps}"
        if flow_name is not None:
            limit += f" of flow {flow_name!r}"
        super().__init__(
            f"run exceeded {limit}; {steps}. A loop that never ends? Give "
            "it an exit (a route with when=, or an action that leaves the loop), or raise the "
            "bound with .max_steps(n) on the flow's builder"
        )


Phase = Literal["prep", "exec", "post", "commit"]
"""Where a step failed: in one of the node's phases, or (``"commit"``) at its durable
commit."""


class NodeError(CosmoFlowError):
    """A node's prep, exec (after retries and fallback) or post raised, or (phase
    ``"commit"``) a durable step's storage could not encode what the step wrote.

    The exception the node raised is ``__cause__``. ``flow_name`` is the name of the
    flow that holds the node (a nested flow's, for a node of one), when known.
    """

    def __init__(
        self, node_id: str, phase: Phase, run_id: str, attempts: int, flow_name: str | None = None
    ) -> None:
        self.node_id = node_id
        self.phase = phase
        self.run_id = run_id
        self.attempts = attempts
        self.flow_name = flow_name
        flow = "" if flow_name is None else f"flow {flow_name!r}, "
        super().__init__(
            f"node {node_id!r} failed in {phase} ({flow}run {run_id}, {attempts} attempt"
            f"{'' if attempts == 1 else 's'})"
        )


class RunCancelledError(CosmoFlowError):
    """The run was cancelled (``run.cancel()``, a cancelled caller, or the engine closing)."""


class ActorCrashedError(CosmoFlowError):
    """An actor of the engine crashed; every run in flight fails with this error.

    The actor's exception is ``__cause__`` and also leaves ``open_engine``.
    """

    def __init__(self, actor: str) -> None:
        self.actor = actor
        super().__init__(f"actor {actor!r} crashed; the engine is shutting down")


class StorageError(CosmoFlowError):
    """A storage backend could not read, encode or commit data."""


class StoreValueError(StorageError, ValueError):
    """A key or value the storage cannot encode (its codec refuses it); nothing of the
    write is stored. It is the data's fault, never the storage's: retrying cannot help.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"cannot store key {key!r}: {problem}")


class RunConflictError(StorageError):
    """Another engine committed a step of this durable run first, or created its
    record first.

    Two engines (or processes) ran the same ``run_id`` at once, and the other committed
    the step this one was about to commit, or (both starting a run the store did not
    know) stored the new run's record first. Nothing of this step or run is stored,
    and the run fails here without touching the record, which stays the other engine's.
    """


class DamagedRecordError(StorageError):
    """The store holds, under ``key``, a durable run's record, a path chunk its record
    counts or a place of the run, something the engine never writes (crafted or
    damaged), or no chunk where the record counts one: the run cannot be read back.
    Nothing is run or written. It is the data's fault, never the storage's: retrying
    cannot help (a queue's worker fails the run at once)."""

    def __init__(self, message: str, key: str, reason: str | None = None) -> None:
        self.key = key
        self.reason = message if reason is None else reason
        """Why the value cannot be read, without the store and the key the message
        names (the message itself when it was not given)."""
        super().__init__(message)


class UnreadableValueError(StorageError):
    """The store holds, under ``key``, a value its codec cannot read: another client
    wrote it, or it was damaged. It is the data's fault, never the storage's: retrying
    cannot help (a queue's worker fails the run that meets it at once)."""

    def __init__(self, message: str, key: str, reason: str | None = None) -> None:
        self.key = key
        self.reason = message if reason is None else reason
        """Why the value cannot be read, without the store and the key the message
        names (the message itself when it was not given)."""
        super().__init__(message)


class RunRecordedError(CosmoFlowError):
    """The store holds a record for the ``run_id`` that the call cannot take: a run of
    another flow (``flow``), which ``run``, ``start_run`` and ``resume`` refuse, or a
    run recorded as ``state`` "running" or "failed", which ``run`` and ``start_run``
    refuse (continue it with ``resume``), or a record that the flow given to ``resume``
    no longer fits (it changed since the run started: resume with that version), or a
    BatchFlow's child run recorded with other params than its BatchFlow's ``prep``
    returned for it on resume (the step fails with it as the NodeError's cause)."""

    def __init__(self, message: str, run_id: str, flow: str, state: str) -> None:
        self.run_id = run_id
        self.flow = flow
        self.state = state
        super().__init__(message)


class StoreKeyError(CosmoFlowError, KeyError):
    """The key is not in the store and no default was given."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)

    def __str__(self) -> str:
        return f"key {self.key!r} is not in the store"


class StoreTypeError(CosmoFlowError, TypeError):
    """The stored value is not of the type asked for."""

    def __init__(
        self, key: str, expected: object, actual: object, detail: str | None = None
    ) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        holds, wanted = with_article(str(actual)), with_article(str(expected))
        message = f"key {key!r} holds {holds}, not {wanted}"
        super().__init__(message if detail is None else f"{message}: {detail}")


def error_text(error: BaseException) -> str:
    """``str(error)``, or ``<unprintable>`` when its ``__str__`` raises."""
    try:
        return str(error)
    except Exception:
        return "<unprintable>"


def type_and_message(error: BaseException) -> str:
    """``Type: message`` for ``error`` alone (not its cause): ``Type`` alone when it has
    no message (``sys.exit()``), ``Type: <unprintable>`` when its ``__str__`` raises."""
    text = error_text(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def with_article(noun: str) -> str:
    """``noun`` after "a", or "an" when it starts with a vowel: "an int", "a str"."""
    article = "an" if noun[:1].lower() in {"a", "e", "i", "o", "u"} else "a"
    return f"{article} {noun}"


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then its ``__cause__``, then that one's, and so on, each once: a chain
    that loops back (node code may build one) ends where it would repeat. Never
    blocks."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def told_causes(error: BaseException) -> list[BaseException]:
    """``error`` and its causes (see :func:`causes`), less each cause whose message the
    one before it in this list quotes after a colon (see :func:`_quotes`): a StorageError
    ``"cannot write x: [Errno 28] No space left on device"`` tells its OSError, and a
    ConditionError ``"its evaluate raised KeyError: 'x'; it must..."`` its KeyError.
    Never blocks."""
    told: list[BaseException] = []
    for each in causes(error):
        if not told or not _quotes(told[-1], each):
            told.append(each)
    return told


def _quotes(outer: BaseException, cause: BaseException) -> bool:
    """Whether ``outer``'s message holds ``": "`` and ``cause``'s whole message, at its
    end or before one of ``;`` ``,`` ``)`` ``>`` (where a quote ends in a sentence):
    ``"failed: No space left"`` does not quote ``"No space"``."""
    text = error_text(cause)
    quoted = re.search(f": {re.escape(text)}(?:\\Z|[;,)>])", error_text(outer))
    return bool(text) and quoted is not None


def _rebuilt(
    cls: type[CosmoFlowError], args: tuple[Any, ...], state: dict[str, Any]
) -> CosmoFlowError:
    """An unpickled error: its message arguments and attributes restored, without
    calling its constructor (whose parameters differ from ``args``)."""
    error = cls.__new__(cls, *args)
    error.__dict__.update(state)
    return error
