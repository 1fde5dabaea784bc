"""The messages actors exchange, and the reply slot a requester waits on.

Messages are frozen slotted dataclasses. A request that needs an answer carries a
:class:`Reply`: the requesting task parks on it (trio's lowlevel parking, no channel
per request) and the actor answers with :meth:`Reply.send`.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import outcome
import trio

if TYPE_CHECKING:
    from cosmoflow_actors.action import Action
    from cosmoflow_actors.runtime.run import Branch, Run
    from cosmoflow_actors.storage.base import Storage

T = TypeVar("T")
M = TypeVar("M")


async def deliver(mailbox: trio.MemorySendChannel[M], message: M) -> None:
    """Put ``message`` in ``mailbox``; wait only while it is full.

    Not a checkpoint when there is room: actors hand messages on without yielding, and
    yield when they wait for their own mailbox.
    """
    try:
        mailbox.send_nowait(message)
    except trio.WouldBlock:
        await mailbox.send(message)


class Reply(Generic[T]):
    """A one-shot answer slot: one task waits, one actor sends.

    The answer may arrive before the requester starts waiting; it is kept until then.
    A requester cancelled while waiting abandons the slot, and a later answer is dropped.
    """

    __slots__ = ("_answer", "_task")

    def __init__(self) -> None:
        self._answer: outcome.Outcome[T] | None = None
        self._task: trio.lowlevel.Task | None = None

    def send(self, answer: outcome.Outcome[T]) -> None:
        """Deliver ``answer``; wakes the waiting task. Never blocks."""
        task = self._task
        if task is None:
            self._answer = answer
            return
        self._task = None
        trio.lowlevel.reschedule(task, answer)

    def wait(self) -> Awaitable[T]:
        """Await the result to block until the answer arrives; it is the answer's value,
        or its error is raised. A checkpoint: cancellable while waiting.

        Call it once, from the waiting task. It returns trio's own parking awaitable
        rather than being a coroutine itself: one object less per request.
        """
        answer = self._answer
        if answer is not None:
            return _checkpoint_then(answer)
        self._task = trio.lowlevel.current_task()
        # The reply is its own abort function: no bound method made per wait.
        waiting: Awaitable[T] = trio.lowlevel.wait_task_rescheduled(self)  # noqa: ASYNC105 (awaited by the caller)
        return waiting

    def __call__(self, _: object) -> trio.lowlevel.Abort:
        """Trio's abort function for the waiter: it was cancelled, so forget it and
        drop a late answer."""
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


async def _checkpoint_then(answer: outcome.Outcome[T]) -> T:
    await trio.lowlevel.checkpoint()
    return answer.unwrap()


class StoreOp(enum.Enum):
    """What a :class:`StoreRequest` asks the store actor to do."""

    GET = (1, False)
    CONTAINS = (2, False)
    KEYS = (3, False)
    SIZE = (4, False)
    GET_MANY = (5, False)
    SET = (6, True)
    SET_MANY = (7, True)
    UPDATE = (8, True)
    DELETE = (9, True)
    CLEAR = (10, True)
    COMMIT_STEP = (11, True)
    RECORDS = (12, False)

    writes: bool
    """Whether the operation changes the store (and so needs a commit)."""

    def __init__(self, number: int, writes: bool) -> None:
        self.writes = writes

    # Members are singletons, equal only to themselves: hashing by identity agrees with
    # that, and spares a Python-level Enum.__hash__ per handler lookup.
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """SharedStore → store actor: one operation on the backend.

    ``key`` and ``argument`` depend on ``op``: the value to set, the keys to read, the
    mapping to write, or for UPDATE a ``(fn, default)`` pair.
    """

    op: StoreOp
    storage: Storage
    key: str
    argument: Any
    reply: Reply[Any]


@dataclass(frozen=True, slots=True)
class Step:
    """Engine or router → node actor: run one step of ``branch`` of ``run``."""

    run: Run
    branch: Branch
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StepDone:
    """Node actor → router: the step of ``branch`` at ``node_id`` returned ``action``."""

    run: Run
    branch: Branch
    node_id: str
    action: Action


@dataclass(frozen=True, slots=True)
class StepFailed:
    """Node actor → router: the step of ``run`` at ``node_id`` failed with ``error``."""

    run: Run
    branch: Branch
    node_id: str
    error: Exception


@dataclass(frozen=True, slots=True)
class FlowEnded:
    """Engine → router, resuming a durable run: the innermost flow of ``branch`` ended,
    its last step at ``node_id`` having returned ``action`` (the last branch of a
    fan-out without a join had ended)."""

    run: Run
    branch: Branch
    node_id: str
    action: Action


RouterMessage = StepDone | StepFailed | FlowEnded
