"""The messages actors exchange, and the reply slot a requester waits on.

Messages are frozen ``msgspec.Struct`` classes: immutable, slotted and typed as a
frozen slotted dataclass is, and built in about a tenth of its time (a frozen
dataclass sets each field through ``object.__setattr__``), which matters for the two
made per step. A request that needs an answer carries a
:class:`Reply`: the requesting task parks on it (trio's lowlevel parking, no channel
per request) and the actor answers with :meth:`Reply.send`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import outcome
import trio

if TYPE_CHECKING:
    from cosmoflow_actors.action import Action
    from cosmoflow_actors.runtime.node_actor import NodeActor
    from cosmoflow_actors.runtime.run import ActiveRun, Branch
    from cosmoflow_actors.storage.base import Storage

T = TypeVar("T")


class Reply(Generic[T]):
    """A one-shot answer slot: one task waits, one actor sends.

    The answer may arrive before the requester starts waiting; it is kept until then.
    A requester cancelled while waiting abandons the slot, and a later answer is dropped.
    Both ends are protected from KeyboardInterrupt, as :class:`~.actor.Mailbox` is.
    """

    __slots__ = ("_answer", "_task")

    def __init__(self) -> None:
        self._answer: outcome.Outcome[T] | None = None
        self._task: trio.lowlevel.Task | None = None

    @trio.lowlevel.enable_ki_protection
    def send(self, answer: outcome.Outcome[T]) -> None:
        """Deliver ``answer``; wakes the waiting task. Never blocks."""
        task = self._task
        if task is None:
            self._answer = answer
            return
        self._task = None
        trio.lowlevel.reschedule(task, answer)

    @trio.lowlevel.enable_ki_protection
    async def wait(self) -> T:
        """Block until the answer arrives; return its value or raise its error.

        Call it once, from the waiting task. A checkpoint: cancellable while waiting.
        """
        answer = self._answer
        if answer is None:
            self._task = trio.lowlevel.current_task()
            # The reply is its own abort function: no bound method made per wait.
            value: T = await trio.lowlevel.wait_task_rescheduled(self)
            return value
        await trio.lowlevel.checkpoint()
        return answer.unwrap()

    def __call__(self, _: object) -> trio.lowlevel.Abort:
        """Trio's abort function for the waiter: it was cancelled, so forget it and
        drop a late answer."""
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


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
    FORGET = (13, True)

    writes: bool
    """Whether the operation changes the store (and so needs a commit)."""

    def __init__(self, number: int, writes: bool) -> None:
        self.writes = writes

    # Members are singletons, equal only to themselves: hashing by identity agrees with
    # that, and spares a Python-level Enum.__hash__ per handler lookup.
    __hash__ = object.__hash__


class StoreRequest(msgspec.Struct, frozen=True):
    """SharedStore → store actor: one operation on the backend.

    ``key`` and ``argument`` depend on ``op``: the value to set, the keys to read, the
    mapping to write, or for UPDATE a ``(fn, default)`` pair.
    """

    op: StoreOp
    storage: Storage
    key: str
    argument: Any
    reply: Reply[Any]


class Step(msgspec.Struct, frozen=True):
    """To a node actor: run one step of ``branch`` of ``run`` with ``params``."""

    run: ActiveRun
    branch: Branch
    params: Mapping[str, Any]
    actor: NodeActor


class StepDone(msgspec.Struct, frozen=True):
    """To the router: the step of ``branch`` at ``actor``'s node returned ``action``
    (resolved), and ``values`` holds the store values its routes' conditions read."""

    run: ActiveRun
    branch: Branch
    actor: NodeActor
    action: Action
    values: Mapping[str, Any]

    @property
    def node_id(self) -> str:
        """The node the step ran at."""
        return self.actor.node_id


class StepFailed(msgspec.Struct, frozen=True):
    """To the router: the step of ``run`` at ``node_id`` failed with ``error``."""

    run: ActiveRun
    branch: Branch
    node_id: str
    error: Exception


Outcome = StepDone | StepFailed
"""What the router routes."""
