"""Durable runs: what the actors do for a run at fixed points of its life to keep its
record (see :mod:`~cosmoflow_actors.runtime.run_record` for the record itself): nothing
for a run that is not durable (:data:`NOT_DURABLE`), and for a durable one
(:class:`DurableRun`) each step's writes staged and committed with the record, one
commit at a time, and the run's end recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import trio

from cosmoflow_actors.action import Action
from cosmoflow_actors.errors import (
    NodeError,
    RunConflictError,
    StorageError,
    StoreValueError,
)
from cosmoflow_actors.flow import FlowResult
from cosmoflow_actors.runtime.places import Places, position
from cosmoflow_actors.runtime.run import ActiveRun, Branch, Fork
from cosmoflow_actors.runtime.run_record import (
    encode_action,
    failed,
    record_key,
    reordered,
    step_done,
    succeeded,
)
from cosmoflow_actors.runtime.store_client import SharedStore, StagedStore, step_handle
from cosmoflow_actors.storage.base import StagedOp


class Durability:
    """What the actors do for a run at fixed points to keep its record: nothing, for a
    run that is not durable (:data:`NOT_DURABLE`); see :class:`DurableRun`."""

    durable: ClassVar[bool] = False
    """Whether the run keeps a record: its steps commit, and ending it waits for the
    store."""

    def entered(self, branch: Branch, params: Mapping[str, Any]) -> None:
        """``branch`` was sent to the node its frames point at, with ``params``."""

    def left(self, branch: Branch) -> None:
        """``branch`` forked, reached its join or ended."""

    def arrived(self, fork: Fork) -> None:
        """The last of ``fork``'s arrivals reached its join, with params."""

    def step_store(self, store: SharedStore) -> SharedStore:
        """The handle a step of the run gets on ``store``."""
        return step_handle(store)

    async def commit(
        self, run: ActiveRun, branch: Branch, node_id: str, action: Action, store: SharedStore
    ) -> None:
        """Commit the step of ``branch`` at ``node_id`` that returned the resolved
        ``action``, with the writes it staged in ``store``."""

    def step_ended(self, run: ActiveRun, node_id: str, store: SharedStore) -> None:
        """The step at ``node_id`` whose handle is ``store`` ended (committed, failed or
        cancelled). Never blocks."""

    async def end(self, run: ActiveRun, end: FlowResult | BaseException) -> None:
        """End the run with the result or the error routing decided (see
        :meth:`succeed`, :meth:`fail`); for a durable run, blocks while its record is
        written."""
        if isinstance(end, FlowResult):
            await self.succeed(run, end)
        else:
            await self.fail(run, end)

    async def succeed(self, run: ActiveRun, result: FlowResult) -> None:
        """End the run with ``result``."""
        run.succeed(result)

    async def fail(self, run: ActiveRun, error: BaseException) -> None:
        """End the run with ``error``."""
        run.fail(error)


NOT_DURABLE: Final = Durability()
"""The durability of every run that is not durable (it holds no state)."""


class DurableRun(Durability):
    """A durable run's record as last committed, the places of its branches (see
    :mod:`~cosmoflow_actors.runtime.places`), and the lock that commits their steps (and
    the run's end) one at a time.

    ``entered``, ``left`` and ``arrived`` keep the places up to date for the next commit;
    a step's writes are staged in a :class:`StagedStore` of its own, since a fan-out's
    branches run steps of one run at once.
    """

    durable = True

    def __init__(self, record: dict[str, Any], places: Places | None = None) -> None:
        self.record = record
        self.places = Places(record["run_id"], record["places"]) if places is None else places
        self.lock = trio.Lock()
        self.reordered: set[int] = set()
        """The path chunks this process sealed in another order than the steps started
        (see :func:`~cosmoflow_actors.runtime.run_record.reordered`): the run's final
        record writes them again."""

    def entered(self, branch: Branch, params: Mapping[str, Any]) -> None:
        """After a crash, ``branch`` is sent to this node again."""
        branch.resume_at = {**position(branch), "params": dict(params)}
        self.places.entered(branch)

    def left(self, branch: Branch) -> None:
        """Its fork holds where ``branch`` went."""
        self.places.left(branch)

    def arrived(self, fork: Fork) -> None:
        """A place holds the arrival until its fan-out is over."""
        self.places.arrived(fork)

    def step_store(self, store: SharedStore) -> SharedStore:
        """A handle that stages the step's writes."""
        return StagedStore(store)

    async def commit(
        self, run: ActiveRun, branch: Branch, node_id: str, action: Action, store: SharedStore
    ) -> None:
        """Commit the step's staged writes with the run's record, the path chunk the
        step sealed (if it did) and the places that changed since the last commit (see
        :meth:`Places.staged`), in one commit, built on the last record committed.

        Raises NodeError (phase ``"commit"``, caused by a StoreValueError) when the
        storage cannot encode what the step wrote or the params or result of its
        action, which the record holds: nothing is stored. Raises StorageError when the
        commit fails, RunConflictError when another engine committed this step of the
        run first.
        """
        assert isinstance(store, StagedStore)
        async with self.lock:
            resume_at = {**position(branch), "node": node_id, "action": encode_action(action)}
            plan = self.places.staged(branch, resume_at)
            record, sealed = step_done(self.record, node_id, plan.last, plan.count)
            steps_before = self.record["steps"]
            ops = [*store.ops, *sealed, *plan.ops]
            key = record_key(run.run_id)
            try:
                await run.store_actor.commit_step(run.storage, ops, key, record, steps_before)
            except StoreValueError as exc:
                self.places.abandoned(plan)
                cause = exc if exc.key != key else _unstorable_action(exc, action)
                flow_name = branch.frames[-1].flow.name
                raise NodeError(node_id, "commit", run.run_id, 1, flow_name) from cause
            except BaseException:
                self.places.abandoned(plan)
                raise
            self.record = record
            self.places.committed(plan, branch)
            branch.resume_at = resume_at
            chunk = reordered(record, sealed, run.path)
            if chunk is not None:
                self.reordered.add(chunk)

    def step_ended(self, run: ActiveRun, node_id: str, store: SharedStore) -> None:
        """Close the step's handle: what it stages now would be committed with no step."""
        assert isinstance(store, StagedStore)
        store.end(f"node {node_id!r} of run {run.run_id!r}")

    async def succeed(self, run: ActiveRun, result: FlowResult) -> None:
        """Record the result, then end the run (so ``wait`` sees it recorded). Blocks
        while it waits for the run's lock and while the record is written.

        Under the lock, after a step commit of another branch still in flight: the
        record is built on the last one committed, never over it (see
        :meth:`_write_end`). A run that ended while this waited for the lock (it was
        cancelled) is not recorded: it stays running in its record. When the store
        refuses the record (StorageError; RunConflictError: another engine went on with
        the run), the run fails with that error alone; its record still says it is
        running after its last step, for ``resume`` to end it.
        """
        async with self.lock:
            if run.finished:
                return
            try:
                record, ops = succeeded(self.record, result, self.reordered)
                await self._write_end(run, record, [*ops, *self.places.cleared()])
            except StorageError as exc:
                run.fail(exc)
                return
            run.succeed(result)

    async def fail(self, run: ActiveRun, error: BaseException) -> None:
        """Record the failure (best effort, see :meth:`_write_end`), then fail the run;
        unless another engine has taken the run over (RunConflictError): the record is
        its. Blocks as :meth:`succeed`; a run that ended meanwhile is not recorded.
        """
        if run.finished or isinstance(error, RunConflictError):
            run.fail(error)
            return
        async with self.lock:
            if run.finished:
                return
            with contextlib.suppress(StorageError):  # RunConflictError among them
                await self._write_end(run, failed(self.record, error), [])
            run.fail(error)

    async def _write_end(self, run: ActiveRun, record: dict[str, Any], ops: list[StagedOp]) -> None:
        """Write the run's final ``record`` (with ``ops``, the path chunks it writes
        again) as a step's commit is, only if the stored record still counts the steps
        this engine committed: another engine that committed a step of the run
        meanwhile keeps its record, which a record counting fewer steps would put back
        in the run's future (to be applied again on resume). Blocks while it is
        written; raises StorageError, RunConflictError when the stored record counts
        other steps."""
        steps = self.record["steps"]
        key = record_key(run.run_id)
        await run.store_actor.commit_step(run.storage, ops, key, record, steps)


def _unstorable_action(error: StoreValueError, action: Action) -> StoreValueError:
    """``error``, raised for a run's record, said of the step's ``action``: the record
    holds its params and result, the only values in it that the run's code chose."""
    problem = (
        f"the run's record holds the params and result of the action {action.name!r} "
        f"the step returned, and {error.problem}"
    )
    unstorable = StoreValueError(error.key, problem)
    unstorable.__cause__ = error
    return unstorable
