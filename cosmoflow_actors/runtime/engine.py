"""The engine: one trio nursery holding the node actors and the store actors, and the
router (which has no task: its handler runs in the tasks that route).

``open_engine()`` is the only way to get an engine. A store actor starts with ``start_soon``
when its backend is first used, and its first runs wait until it has opened the backend;
a flow's node actors start with ``start_soon`` when the flow is first run (steps sent
before one runs wait in its mailbox), and are retired once the flow is garbage. A
crashing actor fails every run in flight with ActorCrashedError and its exception leaves
``open_engine``; leaving the block normally waits for the runs started in it.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Any, Final, TypeVar, final

import trio

from cosmoflow_actors.errors import (
    ActorCrashedError,
    RunCancelledError,
    RunRecordedError,
)
from cosmoflow_actors.events import (
    DEFAULT_BUFFER as DEFAULT_EVENT_BUFFER,
)
from cosmoflow_actors.events import (
    Event,
    EventHub,
    EventStream,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunStarted,
    StepSpans,
)
from cosmoflow_actors.flow import Flow, FlowResult, check_runs_allowed
from cosmoflow_actors.progress import Progress
from cosmoflow_actors.runtime import queue as run_queue
from cosmoflow_actors.runtime import run_record
from cosmoflow_actors.runtime.actor import Actor
from cosmoflow_actors.runtime.admission import Admission
from cosmoflow_actors.runtime.cancellation import CANCELLED_ALONE, refuse_closed
from cosmoflow_actors.runtime.durability import NOT_DURABLE, DurableRun
from cosmoflow_actors.runtime.flows import FlowRegistry
from cosmoflow_actors.runtime.messages import Step
from cosmoflow_actors.runtime.node_actor import NO_NURSERIES, NodeActor, carry
from cosmoflow_actors.runtime.queue import RunQueue, RunStores
from cosmoflow_actors.runtime.run import ActiveRun, Branch, Run, RunState
from cosmoflow_actors.runtime.run_record import ENDED_STATES, EndedState, RunRecord
from cosmoflow_actors.runtime.statistics import EngineStatistics
from cosmoflow_actors.runtime.store_actor import StoreActor
from cosmoflow_actors.runtime.store_client import SharedStore
from cosmoflow_actors.runtime.stores import StoreRegistry, as_storage, require_storage
from cosmoflow_actors.storage.base import Storage, batch_parent
from cosmoflow_actors.trio_run import require_trio_run
from cosmoflow_actors.validation import checked_params, require_positive, require_run_id

T = TypeVar("T")

DEFAULT_MAILBOX_SIZE: Final = 256
"""Steps (or store requests) an actor's mailbox holds before senders wait."""

DEFAULT_MAX_RUNS: Final = 256
"""Runs in flight before further starts wait. Measured (docs/performance.md): with
callers starting runs from a nursery, 256 ran 10 to 34% faster than 1,000 and than no
bound, and unlike 64 or 128 it does not cap runs that wait on I/O."""


@final
class Engine:
    """Runs flows. Get one from :func:`open_engine`; all methods run in its trio context.

    Calls that start work (runs, stores, event streams, a tracer, serving a queue) made
    outside the trio run that opened the engine raise RuntimeError saying how to make
    them (``trio.from_thread.run`` from a thread that trio run started)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        mailbox_size: int,
        max_runs: int | None,
        ray_address: str | None = None,
    ) -> None:
        self._nursery = nursery
        self.max_runs = max_runs
        self._admission = Admission(max_runs) if max_runs is not None else None
        self._events = EventHub()
        self._flows = FlowRegistry(
            nursery, mailbox_size, self._supervise, self._run_child, self._events, ray_address
        )
        self._router = self._flows.router
        self._stores = StoreRegistry(nursery, mailbox_size, self._supervise, self._close)
        self._runs: dict[str, ActiveRun] = {}
        """The runs in flight, by id."""
        self._idle: trio.Event | None = None
        """Set once no run is in flight or being started; made only while
        :meth:`_wait_idle` waits for that."""
        self._starting = 0
        """Start calls of :meth:`_start` that have no run in flight yet (waiting for
        admission, a storage, set-up): leaving the engine's block waits for them too."""
        self._closed = False
        self._closed_event = trio.Event()
        self._trio_token = trio.lowlevel.current_trio_token()
        """The trio run the engine lives in: every call that starts work or waits must
        be made in it (see :meth:`_require_its_trio_run`)."""
        self._progress = Progress(self._trio_token)
        """The run counts (also those of :meth:`statistics`)."""
        self._on_admitted_end = self._admitted_ended
        self._on_end = self._ended
        """The bound methods an admitted run and another one call when they end (made
        once, not once per run)."""
        self._run_ids = _run_ids()

    def _require_its_trio_run(self) -> None:
        """Raise RuntimeError, naming the way to call it, unless called in the trio
        run the engine was opened in (see :func:`require_trio_run`). Never blocks."""
        require_trio_run(self._trio_token, "the engine")

    async def run(
        self,
        flow: Flow,
        store: Storage | dict[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> FlowResult:
        """Run ``flow`` to its end and return its result; raise its error if it fails.

        Blocks until the run ends; waits first like :meth:`start_run`. The calling task
        runs the run's steps itself while their nodes are idle (under those nodes'
        slots), and waits for the rest. Cancelling the caller cancels the run; the
        caller gets one trio.Cancelled (also from a step that runs items or child runs
        at once, and when the engine closes before the run started).
        """
        run, first = await self._start(flow, store, params, run_id, _Start.NEW)
        return await self._drive(run, first)

    async def start_run(
        self,
        flow: Flow,
        store: Storage | dict[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Start a run of ``flow`` and return its handle once the entry node has it.

        ``store`` is a Storage, a dict used in place as memory storage, or None for a
        fresh MemoryStorage. A checkpoint; blocks while ``max_runs`` runs are in flight
        (callers wait in FIFO order; a run started inside a step of this engine does
        not), while the storage opens and while the entry
        node's mailbox is full. Raises StorageError when the storage cannot be opened;
        before it waits, TypeError for ``params`` that are not a mapping with str keys
        and ValueError for a ``run_id`` that is not a non-empty str; once admitted,
        ValueError for a ``run_id`` in flight.

        With a ``run_id`` on a persistent storage the run is durable: each step commits
        its writes with the run's record. A run_id whose run already succeeded returns
        a finished handle with the recorded result; one that is still recorded as
        running or failed raises RunRecordedError (continue it with :meth:`resume`), as
        does a run_id recorded for another flow. RunConflictError: another engine
        created the new run's record first.
        """
        run, first = await self._start(flow, store, params, run_id, _Start.NEW)
        if first is not None:
            await _send(run, first)
        return Run(run, self._trio_token)

    async def resume(
        self,
        flow: Flow,
        store: Storage | dict[str, Any],
        *,
        run_id: str,
        params: Mapping[str, Any] | None = None,
    ) -> FlowResult:
        """Continue the durable run ``run_id`` after its last committed step and return
        its result; blocks until the run ends.

        A run that succeeded returns its recorded result; one that failed or was
        interrupted goes on from its last committed step (no committed step runs
        again); one the store does not know starts from the beginning with ``params``.
        Raises ValueError unless ``run_id`` is a non-empty str; before anything runs,
        RunRecordedError for a record of another flow or one ``flow`` no longer fits
        (changed since the run started), and MaxStepsExceeded for a step that was under
        way past a lowered ``max_steps`` (see ``run_record.restore``), the record left as
        it was.
        """
        require_run_id(run_id)
        run, first = await self._start(flow, store, params, run_id, _Start.RESUME)
        return await self._drive(run, first)

    def start_run_nowait(
        self,
        flow: Flow,
        store: Storage | dict[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Start a run like :meth:`start_run`, without waiting. Never blocks.

        Raises ``trio.WouldBlock`` when it would have to wait: ``max_runs`` runs are in
        flight (unless it is called inside a step of this engine), a lossless event
        stream is full, the entry node's mailbox is full, the store (other than memory)
        has no store actor open yet, the flow has process nodes and no worker processes
        are set up yet, or it has Ray nodes and the engine has not connected to Ray yet
        (``start_run`` waits for all of these). A durable run (a ``run_id`` on a
        persistent storage) reads and writes its record in a task of the engine's before
        its first step.
        """
        self._require_its_trio_run()
        first_params = _checked_arguments(flow, store, params, run_id)
        storage = as_storage(store)
        durable = run_id is not None and storage.persistent
        run_id = self._check_start(run_id)
        if self._events.congested:
            raise trio.WouldBlock("a lossless event stream is full")
        keys = self._flows.register_nowait(flow).condition_keys
        entry = self._router.entry(flow)
        if not (entry.idle or entry.mailbox.has_room):
            raise trio.WouldBlock(f"the mailbox of {entry.name!r} is full")
        actor = self._stores.acquire_nowait(storage)
        admission = None if self._inside_a_step() else self._admission
        try:
            if admission is not None:
                admission.acquire_nowait()
        except trio.WouldBlock:
            self._stores.release(actor)
            raise
        on_finish = self._on_end if admission is None else self._on_admitted_end
        run = self._new_run(run_id, flow, storage, actor, on_finish, keys)
        if durable:
            self._nursery.start_soon(self._launch_later, run, first_params)
        else:
            entry.send_nowait(self._first_step(run, first_params))
        return Run(run, self._trio_token)

    @asynccontextmanager
    async def open_store(self, store: Storage | dict[str, Any]) -> AsyncIterator[SharedStore]:
        """Open ``store``'s backend, unless a run has it open, and keep it open until the
        block ends; yield a handle on it, whose calls its store actor serves in order
        with the runs' (as a step's are).

        Without it, a backend is closed (a FileStorage compacted into its JSON file)
        whenever its last run ends, and the next run opens it again: hold it open
        around a series of runs on one store. Blocks while the backend opens (raises
        StorageError if it cannot) and, when the block ends and no run uses it, until
        it is closed. Raises RuntimeError once the engine is closed.
        """
        async with self._served(store) as (storage, actor):
            yield actor.client(storage)

    @asynccontextmanager
    async def _served(
        self, store: Storage | dict[str, Any]
    ) -> AsyncIterator[tuple[Storage, StoreActor]]:
        """``store`` as a Storage, and the store actor serving it, held for the block.
        Blocks while the backend opens and, when the block ends and no run uses the
        storage, until its backend is closed (as at the end of a run). Raises
        RuntimeError once the engine is closed (see :meth:`_closed_error`)."""
        self._require_its_trio_run()
        if self._closed:
            await refuse_closed(self._closed_error())
        storage = as_storage(store)
        actor = await self._stores.acquire(storage)
        try:
            yield storage, actor
        finally:
            self._stores.release(actor)
        await _closed_if_retired(actor)

    async def list_runs(self, store: Storage | dict[str, Any]) -> list[RunRecord]:
        """The durable runs recorded in ``store``, sorted by run id (a BatchFlow's
        children right after their parent, ``job``, ``job:2/0``, ``job:10/0``, see
        ``run_record.run_order``), with their state, last node and steps, and, for a
        run a queue's worker claimed, its owner; a running one is "orphaned"
        when the store is on the queue's server and no worker holds its lease (see
        ``queue.leases_checked``). Blocks while it reads and, when no run uses the
        store, until its backend is closed (as at the end of a run); raises
        RuntimeError once the engine is closed."""
        async with self._served(store) as (storage, actor):
            records = await actor.records(storage)
        runs = run_record.with_parents(
            RunRecord.of(run_record.checked_record(k, v)) for k, v in records.items()
        )
        return await run_queue.leases_checked(storage, runs)

    async def forget_run(
        self,
        store: Storage | dict[str, Any],
        run_id: str,
        *,
        states: Iterable[EndedState] = ENDED_STATES,
    ) -> bool:
        """Delete the record of the durable run ``run_id`` from ``store``, a run that has
        ended in one of ``states`` (succeeded or failed), with the records of its
        BatchFlow children (``run_id:2/0``...); return whether there was one. What the
        runs wrote to the store stays; the run id is free again. Blocks while the
        records are read and deleted (in the store actor's serial order, so no step of
        this engine commits in between; in a transaction of the backend's own where it
        has one, see ``Storage.forget_record``, so no step of another process either)
        and, when no run uses the store, until its backend is closed.

        Raises RunRecordedError for a run in flight on this engine, recorded as
        "running" (finish it with :meth:`resume` first) or in an ended state not in
        ``states`` (a run listed as failed, then resumed to success elsewhere, is kept
        by ``states=["failed"]``), or a BatchFlow's child run whose parent is recorded
        (forget the parent: a resume of the parent would run the child's steps again);
        ValueError when ``states`` names no state or one of a run that did not end;
        StorageError when the store holds something else under the record's key, and
        RuntimeError once the engine is closed.
        """
        require_run_id(run_id)
        ended = run_record.checked_states(states)
        self._refuse_in_flight(run_id)
        async with self._served(store) as (storage, actor):
            parent = await _recorded_parent(storage, actor, run_id)

            def check(key: str, record: Any) -> None:
                """Again in the store actor's order, where a start that has read the
                record has its run in flight."""
                self._refuse_in_flight(run_id)
                run_record.require_ended(key, record, ended)  # checks the record whole
                if parent is not None:
                    run_record.refuse_child(record, parent)

            key = run_record.record_key(run_id)
            return await actor.forget_record(storage, key, check)

    def _refuse_in_flight(self, run_id: str) -> None:
        """Raise RunRecordedError if the run ``run_id`` is in flight on this engine."""
        in_flight = self._runs.get(run_id)
        if in_flight is not None:
            message = f"run {run_id!r} is in flight on this engine"
            raise RunRecordedError(message, run_id, in_flight.flow.name, "running")

    async def _drive(self, run: ActiveRun, first: Step | None) -> FlowResult:
        """Carry ``run`` from ``first`` in this task while its nodes are idle (see
        node_actor.carry; in a cancel scope of the run's), then wait for its end;
        cancelling this task cancels the run. If the run was its storage's last user,
        wait until the backend is closed (a FileStorage is then compacted into its JSON
        file)."""
        try:
            if first is not None and first.actor.try_hand_off():
                with CANCELLED_ALONE, trio.CancelScope() as scope:
                    await self._carry_here(first, scope)
            elif first is not None:
                await first.actor.send(first)
            if not run.finished:
                with contextlib.suppress(Exception):  # raised by unwrap below
                    await run.wait()
        finally:
            run.cancel()
        await _closed_if_retired(run.store_actor)
        return run.unwrap()

    def _inside_a_step(self) -> bool:
        """Whether this task carries steps of this engine (it is among the router's
        carriers), or was started, directly or not, by a carrier in a nursery it opened
        since it began: a run it starts is part of a step's work, which already holds
        a place among the runs in flight. Admitting it would deadlock once
        ``max_runs`` such steps wait for their runs. Never blocks."""
        carriers = self._router.carriers
        task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        came_through: trio.Nursery | None = None
        while task is not None:
            opened_before = carriers.get(task)
            if opened_before is not None and came_through not in opened_before:
                return True
            came_through = task.parent_nursery
            task = None if came_through is None else came_through.parent_task
        return False

    async def _carry_here(self, first: Step, scope: trio.CancelScope) -> None:
        """:func:`carry` ``first`` and its run's next steps in this task, among the
        router's carriers meanwhile (it may be one already: a run started in a step)."""
        task = trio.lowlevel.current_task()
        carriers = self._router.carriers
        if task in carriers:
            await carry(first, scope)
            return
        carriers[task] = _open_nurseries(task)
        try:
            await carry(first, scope)
        finally:
            del carriers[task]

    async def _start(
        self,
        flow: Flow,
        store: Storage | dict[str, Any] | None,
        params: Mapping[str, Any] | None,
        run_id: str | None,
        start: _Start,
    ) -> tuple[ActiveRun, Step | None]:
        """Start (or resume) a run as ``start`` says: admit it (FIFO; a child of a
        running BatchFlow needs no admission), open its store, read and write its
        record if it is durable; return it with its first step to send (None when the
        run is over, or a resumed one's branches were sent on).

        A checkpoint: admission is one (it parks while ``max_runs`` runs are in flight),
        else one is taken; no other unless it must wait. A caller waiting for admission
        has built nothing yet (it holds only its arguments). A run started from inside a
        step of this engine (see :meth:`_inside_a_step`) needs no admission either.
        """
        self._require_its_trio_run()
        first_params = _checked_arguments(flow, store, params, run_id)
        self._starting += 1
        try:
            run = await self._open_run(flow, store, run_id, child=start.is_child)
        finally:
            self._starting -= 1
            self._wake_if_idle()
        durable = start.durable(run_id is not None, run.storage)
        try:
            first = await self._launch(
                run, first_params, resume=start.resumes, durable=durable, child=start.is_child
            )
            return run, first
        except Exception as exc:
            run.fail(exc)
            raise
        except BaseException:
            run.cancel()
            raise

    async def _open_run(
        self,
        flow: Flow,
        store: Storage | dict[str, Any] | None,
        run_id: str | None,
        *,
        child: bool,
    ) -> ActiveRun:
        """Admit a run (see :meth:`_start`), open its store and record it as in flight.
        Blocks while it waits for admission, for room in a lossless event stream, for
        the flow's set-up and for its store."""
        if self._closed:
            await refuse_closed(self._closed_error())
        if self._events.congested:
            await self._events.wait_for_room()
        admission = None if child or self._inside_a_step() else self._admission
        if admission is not None:
            await admission.acquire()
        else:
            await trio.lowlevel.checkpoint()
        try:
            # A slot handed over by a run that ended comes without a cancellation
            # check: a caller cancelled meanwhile must not start its run.
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed:
                await refuse_closed(self._closed_meanwhile_error())
            storage = as_storage(store)
            run_id = self._check_start(run_id)
            keys = (await self._flows.register(flow)).condition_keys
            actor = await self._stores.acquire(storage)
            try:
                # Waited for set-up and for the store: the engine may have closed, or
                # another start taken the run id, meanwhile.
                if self._closed:
                    await refuse_closed(self._closed_meanwhile_error())
                self._check_start(run_id)
            except BaseException:
                self._stores.release(actor)
                raise
        except BaseException:
            if admission is not None:
                admission.release()
            raise
        on_finish = self._on_end if admission is None else self._on_admitted_end
        return self._new_run(run_id, flow, storage, actor, on_finish, keys)

    async def _launch_later(self, run: ActiveRun, params: dict[str, Any]) -> None:
        """start_run_nowait's durable start, in a task of the engine's: its failure
        (the store refused the record) fails the run alone. A run cancelled before
        this task ran is not recorded."""
        if run.finished:
            return
        try:
            first = await self._launch(run, params, resume=False, durable=True, child=False)
        except Exception as exc:
            run.fail(exc)
            return
        if first is not None:
            await _send(run, first)

    async def _launch(
        self, run: ActiveRun, params: dict[str, Any], *, resume: bool, durable: bool, child: bool
    ) -> Step | None:
        """Return the run's first step; for a ``durable`` one, after reading and writing
        its record (None after sending a resumed run's branches on, or ending a
        recorded one). A recorded BatchFlow ``child`` must have been recorded with
        ``params`` (RunRecordedError, nothing run or written, if not)."""
        if not durable:
            return self._first_step(run, params)
        key = run_record.record_key(run.run_id)
        stored = await run.store_actor.read_record(run.storage, key)
        if stored is None:
            return await self._new_durable(run, key, params)
        record = run_record.checked_record(key, stored)
        run_record.require_flow(run, record)
        if child:
            run_record.require_params(run, record, params)
        if record["state"] == "succeeded":
            path = await _recorded_path(run, record)
            if path is None:  # forgotten since it was read: the run id is free again
                return await self._new_durable(run, key, params)
            run.succeed(run_record.recorded_result(record, path, run.storage))
            return None
        if not resume:
            raise RunRecordedError(
                f"run {run.run_id!r} is already recorded in {run.storage!r} as "
                f"{record['state']}; continue it with engine.resume, giving it the flow as it "
                "was when the run started (the version that recorded it)",
                run.run_id,
                record["flow"],
                record["state"],
            )
        return await self._restore(run, record)

    async def _new_durable(self, run: ActiveRun, key: str, params: dict[str, Any]) -> Step:
        """Record the new durable run ``run`` under ``key`` and return its first step.
        Blocks while the record is stored; RunConflictError (nothing stored) if another
        engine stored one first."""
        run.durability = DurableRun(run_record.new_record(run.run_id, run.flow.name, params))
        await run.store_actor.create_record(run.storage, key, run.durability.record)
        return self._first_step(run, params)

    async def _restore(self, run: ActiveRun, record: dict[str, Any]) -> Step | None:
        """Put a recorded run back where it was (its path chunks and places read in one
        request, with its record again: RunConflictError if another engine committed a
        step of it since ``record`` was read, see :func:`run_record.parts_read`); send
        its branches on. Blocks while a node's mailbox is full, until the run ends (a
        branch sent first may fail it meanwhile), and while the run's end is recorded
        when a branch's recorded outcome ends it."""
        keys = run_record.parts_request(record)
        parts = run_record.parts_read(record, await run.store_actor.read_parts(run.storage, keys))
        path = run_record.whole_path(record, parts)
        branches, places = run_record.restore(run, record, path, parts)
        run.durability = DurableRun({**record, "state": "running", "error": None}, places)
        if not branches:
            return self._first_step(run, record["params"])
        values = await run.store.get_many(run.condition_keys) if run.condition_keys else {}
        with trio.CancelScope() as scope:
            for branch in branches:
                await self._resend(run, branch, values, scope)
        return None

    async def _resend(
        self, run: ActiveRun, branch: Branch, values: Mapping[str, Any], scope: trio.CancelScope
    ) -> None:
        """Send a restored ``branch`` on: its step, or the steps its recorded outcome
        routes to. Blocks as :meth:`_restore`; ``scope`` is cancelled if the run ends."""
        frame = branch.frames[-1]
        actor = self._flows.actor(frame.flow, frame.node_id)
        message = run_record.resumed(run, branch, actor, values)
        if isinstance(message, Step):
            await actor.send(message, scope)
            return
        for step in await self._router.route(message):
            await step.actor.send(step, scope)

    def _first_step(self, run: ActiveRun, params: dict[str, Any]) -> Step:
        return self._router.first_step(run, MappingProxyType(params) if params else _NO_PARAMS)

    def _check_start(self, run_id: str | None) -> str:
        """The run's id (a fresh one if None); refuses a closed engine and an id in
        flight."""
        self._require_open()
        run_id = next(self._run_ids) if run_id is None else run_id
        if run_id in self._runs:
            raise ValueError(f"run {run_id!r} is already in flight")
        return run_id

    @staticmethod
    def _closed_meanwhile_error() -> RunCancelledError:
        """The refusal of a start, called before the engine closed, that waited until
        after (for admission, set-up or its store): its run is cancelled with the runs
        in flight. A caller whose own scope is cancelled gets trio.Cancelled instead
        (see :func:`~.cancellation.refuse_closed`)."""
        return RunCancelledError("the engine closed while the run waited to start")

    def _require_open(self) -> None:
        """Raise RuntimeError once the engine is closed."""
        if self._closed:
            raise self._closed_error()

    @staticmethod
    def _closed_error() -> RuntimeError:
        """The refusal of a call made once the engine is closed. A caller whose own scope
        is cancelled gets trio.Cancelled instead, where it may wait (see
        :func:`~.cancellation.refuse_closed`): a task started before the close, in the
        nursery that holds the engine, cancelled, may first run after it."""
        return RuntimeError(
            "the engine is closed (its open_engine block has ended): use it while the block is open"
        )

    def _new_run(
        self,
        run_id: str,
        flow: Flow,
        storage: Storage,
        actor: StoreActor,
        on_finish: Callable[[ActiveRun], None],
        condition_keys: frozenset[str],
    ) -> ActiveRun:
        """Record a new run; it holds one use of ``actor`` until it ends."""
        run = ActiveRun(run_id, flow, actor, storage, on_finish, NOT_DURABLE, condition_keys)
        self._runs[run_id] = run
        self._progress.run_started()
        if self._events.active:
            self._events.emit(RunStarted(run_id, run.started_at, flow.name))
        return run

    async def _run_child(
        self,
        flow: Flow,
        store: Storage,
        *,
        params: Mapping[str, Any],
        run_id: str,
        durable: bool,
    ) -> FlowResult:
        """How a BatchFlow runs a child, in the node's task: durable (resumed, or its
        recorded result) when its parent is durable, else an ordinary run. It needs no
        admission: its parent was admitted."""
        start = _Start.DURABLE_CHILD if durable else _Start.CHILD
        run, first = await self._start(flow, store, params, run_id, start)
        return await self._drive(run, first)

    def events(self, *, buffer: int = DEFAULT_EVENT_BUFFER, lossless: bool = False) -> EventStream:
        """A stream of every run and step event from now on.

        Use as ``async with engine.events() as events: async for event in events: ...``.
        At most ``buffer`` events wait for the consumer; by default later ones are
        dropped (never blocking the engine) and reported by one EventsDropped. With
        ``lossless=True`` nothing is dropped: while the stream holds ``buffer`` events,
        new runs and steps wait for the consumer (the engine slows down). The stream
        ends when the engine closes (at once if it has closed already). Never blocks;
        raises ValueError for a ``buffer`` that is not an int >= 1.
        """
        self._require_its_trio_run()
        return self._events.open(buffer, lossless=lossless)

    def progress(self) -> Progress:
        """The engine's run counts, exact, with an awaitable for change. Never blocks."""
        return self._progress

    def trace(self, spans: StepSpans) -> Callable[[], None]:
        """Have ``spans`` see every event as it is emitted and make each step's span
        current in its code; returns the function that stops it. Never blocks.

        ``spans`` has ``handle(event)``, called with every event in the task that emits
        it, ``step_span(ctx)``, the context manager each step runs inside, and
        ``detached()``, called once when it stops; :func:`~cosmoflow_actors.tracing.trace_events`
        passes a ``tracing.LiveSpans``. Raises RuntimeError while other ``spans`` follow
        the engine (one at a time).
        """
        self._require_its_trio_run()
        return self._events.trace(spans)

    async def wait_closed(self) -> None:
        """Block until the engine closes. Raises RuntimeError outside the engine's trio
        run (see :meth:`run`)."""
        self._require_its_trio_run()
        await self._closed_event.wait()

    def statistics(self) -> EngineStatistics:
        """A snapshot of the run counters and of every live actor. Never blocks."""
        actors: list[Actor[Any]] = [self._router, *self._flows.actors(), *self._stores.actors()]
        counts = self._progress.snapshot()
        return EngineStatistics(
            runs_started=counts.started,
            runs_succeeded=counts.succeeded,
            runs_failed=counts.failed,
            runs_cancelled=counts.cancelled,
            runs_in_flight=len(self._runs),
            actors=tuple(actor.statistics() for actor in actors),
        )

    async def _supervise(
        self,
        actor: NodeActor | StoreActor,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run an actor; if it crashes after it started, fail every run in flight."""
        try:
            await actor.run(task_status=task_status)
        except Exception as exc:
            if actor.serving:
                self._crash(actor.name, exc)
            raise

    def _crash(self, name: str, exc: Exception) -> None:
        for run in list(self._runs.values()):
            error = ActorCrashedError(name)
            error.__cause__ = exc
            run.fail(error)

    def _admitted_ended(self, run: ActiveRun) -> None:
        """Called once when an admitted ``run`` ends, whatever ended it (so the engine
        has an admission)."""
        self._ended(run)
        assert self._admission is not None
        self._admission.release()

    def _ended(self, run: ActiveRun) -> None:
        """Called once when ``run`` ends, whatever ended it (directly for a run that
        was not admitted: with no ``max_runs``, a BatchFlow's child, one started inside
        a step)."""
        del self._runs[run.run_id]
        self._progress.run_finished(run.current_state.value)
        self._stores.release(run.store_actor)
        self._wake_if_idle()
        if self._events.active:
            self._events.emit(_run_event(run))

    def _wake_if_idle(self) -> None:
        """Wake :meth:`_wait_idle` once no run is in flight or being started. Never
        blocks."""
        if not self._runs and not self._starting and self._idle is not None:
            self._idle.set()

    async def _wait_idle(self) -> None:
        """Block until no run is in flight or being started (a checkpoint, also when
        none is)."""
        if not self._runs and not self._starting:
            await trio.lowlevel.checkpoint()
            return
        if self._idle is None or self._idle.is_set():
            self._idle = trio.Event()
        await self._idle.wait()

    def _close(self) -> None:
        """Refuse new runs, cancel the ones still in flight, and stop every actor; once
        (a later call does nothing). Called as the engine's block ends, or before that
        by a store actor that is cancelled: a scope around the engine's nursery was
        cancelled, and the block has not ended yet. Never blocks."""
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        self._flows.close()
        self._stores.bound_closing()
        for run in list(self._runs.values()):
            run.cancel()
        self._events.close()
        self._nursery.cancel_scope.cancel()

    async def serve(
        self,
        queue: RunQueue | str,
        flows: Mapping[str, Flow] | Iterable[Flow],
        store: str | RunStores,
        *,
        concurrency: int = 1,
        name: str | None = None,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Be a worker of ``queue``: claim its runs and run them, at most
        ``concurrency`` at once; blocks until cancelled.

        ``queue`` is a :class:`RunQueue` or its URL ``redis://HOST:PORT[/DB]/NAME``;
        ``flows`` maps flow names to flows (a list is keyed by each flow's name; two
        flows of one name in it raise ValueError). Each run is durable, on the store
        ``store(run_id)`` gives, or, for a URL ``redis://HOST:PORT[/DB][#PREFIX]``, in
        the Redis namespace ``PREFIX/<run_id>``.
        The worker holds a lease on each run it runs and renews it every third of
        ``queue.lease``; runs whose lease expired are taken over and resumed from their
        last committed step. ``name`` names the worker in the queue's status (default:
        host, process id and a random part); ``task_status`` gets it once the worker
        reads the queue, after setting up what its flows' nodes need (the connection to
        Ray of ``executor="ray"`` nodes, the worker processes of ``"process"`` ones).
        Raises ValueError for a ``name`` that is not a non-empty str, StorageError if
        the queue cannot be reached at first, ConnectionError if the Ray cluster cannot
        (see :func:`open_engine`), RuntimeError once the engine is closed: at the start,
        or as the engine closes while it serves (its ``open_engine`` block ended while
        ``serve`` runs in a nursery outside it), once it has stopped claiming and handed
        back the runs it held, as a stopped worker does (no run is failed for the
        close); and, while it serves, the NodeError of a run that failed because this
        process lost its Ray connection (caused by RayDisconnectedError), its runs
        handed back to the queue.
        """
        self._require_its_trio_run()
        if self._closed:
            await refuse_closed(self._closed_error())
        await run_queue.serve(
            self,
            queue,
            flows,
            store,
            concurrency=concurrency,
            name=name,
            set_up=self._flows.set_up,
            closed=self._closed_event,
            task_status=task_status,
        )
        # It returns only once the engine has closed.
        await refuse_closed(self._closed_error())


@asynccontextmanager
async def open_engine(
    *,
    mailbox_size: int = DEFAULT_MAILBOX_SIZE,
    max_runs: int | None = DEFAULT_MAX_RUNS,
    ray_address: str | None = None,
) -> AsyncIterator[Engine]:
    """Open an engine inside the current trio task; close it when the block ends.

    ``mailbox_size`` bounds every mailbox (a node may set its own). ``max_runs`` bounds
    the runs in flight (default :data:`DEFAULT_MAX_RUNS`; None: no bound): a start
    beyond it waits, in FIFO order, before its run is built; a run that a step's code
    starts on this engine is part of that step's work and does not count. Together they carry
    backpressure from the slowest node back to whoever starts runs.

    ``ray_address`` is the Ray cluster of ``executor="ray"`` nodes (None: the
    ``RAY_ADDRESS`` environment variable, else a Ray started on this machine). The engine
    connects the first time it registers a flow with a Ray node, unless this process is
    connected already, and shuts down a Ray it started when it closes.

    Leaving the block normally waits for every run started in it. An error in the block,
    a crashing actor or a cancelled enclosing scope cancels the runs in flight and stops
    every actor before this returns; errors leave as trio nursery errors do.

    Raises RuntimeError when entered outside a trio run (under asyncio, say), and
    ValueError, opening nothing, for a ``mailbox_size`` or ``max_runs`` that is not an
    int >= 1.
    """
    if not trio.lowlevel.in_trio_run():
        raise RuntimeError(
            "open_engine() was entered outside a trio run; the engine runs on trio, not "
            "asyncio: enter it inside `trio.run`"
        )
    check_runs_allowed("an engine was opened")
    require_positive("mailbox_size", mailbox_size)
    if max_runs is not None:
        require_positive("max_runs", max_runs)
    engine: Engine | None = None
    try:
        async with trio.open_nursery() as nursery:
            engine = Engine(nursery, mailbox_size, max_runs, ray_address)
            try:
                yield engine
                await engine._wait_idle()
            finally:
                engine._close()
    finally:
        if engine is not None:
            await engine._flows.disconnect_ray()


def _open_nurseries(task: trio.lowlevel.Task) -> frozenset[trio.Nursery]:
    """The nurseries ``task`` has open now: NO_NURSERIES, shared, when it has none (as
    most callers of ``engine.run``), so that a run carried in its caller's task holds
    no set of its own."""
    if not task.child_nurseries:
        return NO_NURSERIES
    return frozenset(task.child_nurseries)


async def _closed_if_retired(actor: StoreActor) -> None:
    """Once its last user let go of ``actor`` (it is retiring), block until it has
    closed its backend: the storage is then free for another opener (a FileStorage is
    compacted into its JSON file and unlocked)."""
    if actor.retiring and not actor.exited.is_set():
        await actor.exited.wait()


async def _send(run: ActiveRun, step: Step) -> None:
    """Send ``step`` of ``run`` to its actor; cancelled while the mailbox is full, the
    run is cancelled (it would have no step left)."""
    try:
        await step.actor.send(step)
    except BaseException:
        run.cancel()
        raise


class _Start(enum.Enum):
    """How a run starts."""

    NEW = "new"
    """``run``, ``start_run``: durable with a run id on a persistent storage; a run
    recorded unfinished is refused."""
    RESUME = "resume"
    """``resume``: as NEW, but a run recorded unfinished goes on."""
    CHILD = "child"
    """A BatchFlow's child run, of a parent that is not durable: not admitted (its
    parent was), never durable."""
    DURABLE_CHILD = "durable child"
    """A BatchFlow's child run, of a durable parent: not admitted, durable, and it goes
    on where its record says."""

    @property
    def is_child(self) -> bool:
        """Whether the run is a BatchFlow's child (it needs no admission)."""
        return self in (_Start.CHILD, _Start.DURABLE_CHILD)

    @property
    def resumes(self) -> bool:
        """Whether a run recorded unfinished goes on (else it is refused)."""
        return self in (_Start.RESUME, _Start.DURABLE_CHILD)

    def durable(self, named: bool, storage: Storage) -> bool:
        """Whether the run keeps a record: a child as its parent does, any other run
        when it is ``named`` (given a run id) on a persistent ``storage``."""
        if self.is_child:
            return self is _Start.DURABLE_CHILD
        return named and storage.persistent


_NO_PARAMS: Final[Mapping[str, Any]] = MappingProxyType({})
"""The params of a run started without any (one read-only mapping for all of them)."""


async def _recorded_parent(storage: Storage, actor: StoreActor, run_id: str) -> str | None:
    """The id of the run whose BatchFlow started the run ``run_id``, when that run is
    recorded in ``storage``; else None. Blocks while the record is read."""
    parent = batch_parent(run_id)
    if parent is None:
        return None
    recorded = await actor.read_record(storage, run_record.record_key(parent))
    return None if recorded is None else parent


async def _recorded_path(run: ActiveRun, record: Mapping[str, Any]) -> list[str] | None:
    """The whole path of the succeeded ``run`` as its ``record`` (checked) and the path
    chunks it counts say, read in one request with its record again; None when the
    store no longer holds the record (it was forgotten since it was read: its chunks
    went with it). RunConflictError when the record read again is another (see
    :func:`run_record.parts_read`), DamagedRecordError naming a chunk that is missing or
    damaged. Blocks while they are read (nothing is read for a run of fewer than
    PATH_CHUNK steps)."""
    chunk_keys = run_record.chunk_keys(record)
    if not chunk_keys:
        return run_record.whole_path(record, {})
    key = run_record.record_key(run.run_id)
    read = await run.store_actor.read_parts(run.storage, [*chunk_keys, key])
    if read.get(key) is None:
        return None
    return run_record.whole_path(record, run_record.parts_read(record, read))


def _checked_arguments(
    flow: object, store: object, params: object, run_id: object
) -> dict[str, Any]:
    """Check what a start was given, before it waits for anything; return ``params``
    as a new dict. Raises TypeError or ValueError naming the argument at fault."""
    if not isinstance(flow, Flow):
        raise TypeError(f"expected a built Flow, got {type(flow).__name__}")
    require_storage(store)
    if run_id is not None:
        require_run_id(run_id)
    return checked_params(params)


def _run_ids() -> Iterator[str]:
    """Fresh run ids: a random prefix for this engine, then a counter (``3f9c0a1b2d4e-1``).

    Unique within the engine and, with 48 random bits, across engines and processes in
    practice; cheaper than a uuid4 per run.
    """
    prefix = secrets.token_hex(6)
    for number in itertools.count(1):
        yield f"{prefix}-{number:x}"


def _run_event(run: ActiveRun) -> Event:
    """The event for a run that has just ended."""
    now = trio.current_time()
    duration = now - run.started_at
    name = run.flow.name
    if run.result is not None:
        final = run.result.final_action.name
        return RunFinished(run.run_id, now, name, duration, run.result.steps_executed, final)
    if run.current_state is RunState.CANCELLED:
        return RunCancelled(run.run_id, now, name, duration)
    assert run.error is not None
    return RunFailed(run.run_id, now, name, duration, run.error)


async def list_runs(store: Storage | dict[str, Any]) -> list[RunRecord]:
    """The durable runs recorded in ``store``, sorted by run id (on a temporary engine;
    blocks until read; see :meth:`Engine.list_runs`).

    Raises StorageError, as itself, when the store cannot be read or holds a record
    the engine did not write.
    """
    return await on_temporary_engine(lambda engine: engine.list_runs(store))


async def forget_run(
    store: Storage | dict[str, Any],
    run_id: str,
    *,
    states: Iterable[EndedState] = ENDED_STATES,
) -> bool:
    """Delete the record of the durable run ``run_id``, ended in one of ``states``, from
    ``store`` (on a temporary engine; blocks until done); see :meth:`Engine.forget_run`."""
    return await on_temporary_engine(lambda engine: engine.forget_run(store, run_id, states=states))


async def on_temporary_engine(work: Callable[[Engine], Awaitable[T]]) -> T:
    """Do ``work`` on an engine opened for it; blocks until the work is done and the
    engine closed. An Exception the work raises leaves as itself, not wrapped in the
    group of the engine's nursery."""
    failure: Exception | None = None
    async with open_engine() as engine:
        try:
            return await work(engine)
        except Exception as exc:  # raised below, outside the engine's nursery
            failure = exc
    assert failure is not None
    raise failure
