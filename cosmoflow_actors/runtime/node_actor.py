"""The node actor: the only place a node's prep, exec and post ever run.

One actor per node of a registered flow, with ``max_concurrency`` slots. A step sent to
an idle actor (a free slot, an empty mailbox) goes at once to a parked worker of the
actor, or a new one; otherwise it waits in the actor's bounded mailbox, and the next
slot freed takes it. A worker that ends a step frees its slot and routes its outcome
(the router's handler runs in its task when the router is idle) and, if the next node
is idle, takes that node's slot and runs the next step itself (hand-off;
:func:`carry`). So a run moves through idle nodes in one task, with no message queued
and no task woken.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import CoroutineType, MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NoReturn

import outcome
import trio
import trio_parallel

from cosmoflow_actors.action import Action, as_action
from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.errors import (
    ConditionError,
    CosmoFlowError,
    NodeError,
    Phase,
    StorageError,
)
from cosmoflow_actors.events import EventHub, Fallback, Retry, StepFinished, StepStarted
from cosmoflow_actors.flow import BatchFlow, Flow, FlowResult
from cosmoflow_actors.node import BatchNode, Node, ParallelBatchNode, is_finite_number
from cosmoflow_actors.runtime.actor import Actor
from cosmoflow_actors.runtime.cancellation import only_cancelled
from cosmoflow_actors.runtime.executor import (
    ExecCall,
    as_coroutine_function,
    call,
    exec_call,
    timed_call,
)
from cosmoflow_actors.runtime.limits import RateLimiter
from cosmoflow_actors.runtime.messages import Step, StepDone, StepFailed
from cosmoflow_actors.runtime.run import ActiveRun
from cosmoflow_actors.runtime.statistics import ActorStatistics
from cosmoflow_actors.runtime.store_client import SharedStore, all_awaited, unawaited
from cosmoflow_actors.runtime.transfer import ReturnedCoroutine

if TYPE_CHECKING:
    from cosmoflow_actors.runtime.router import Router

RunChild = Callable[..., Awaitable[FlowResult]]
"""How a BatchFlow node runs a child run: ``run_child(flow, storage, params=...,
run_id=..., durable=...)``."""

KEEP_IDLE: Final = 8
"""Parked workers a node actor keeps; a worker finding that many parked exits."""

RUN_FAILURES: Final = (NodeError, CosmoFlowError, StorageError, TypeError, ValueError)
"""What a step may end with that fails its run alone: the node's own errors and what its
post returned that is no action (wrapped in NodeError), its conditions, and its store's
refusals."""

_NO_VALUES: Final[Mapping[str, Any]] = MappingProxyType({})

_NOT_RESULTS: Final = frozenset({CoroutineType, ReturnedCoroutine})
"""The types of what prep, exec or exec_fallback may return that fail the step: a
coroutine returned instead of awaited, or what an exec away from the run's task hands
back for one (see :class:`~cosmoflow_actors.runtime.transfer.ReturnedCoroutine`)."""

NO_NURSERIES: Final[frozenset[trio.Nursery]] = frozenset()
"""A worker's nurseries open before it carried steps: none (one empty set for all
workers: each ``frozenset()`` is a new object)."""


class NodeActor(Actor[Step]):
    """Runs the steps of every run that reaches one node; the engine names it
    ``"<flow label>/<node_id>"`` (see :class:`~cosmoflow_actors.runtime.statistics.FlowLabels`)."""

    kind = "node"

    def __init__(
        self,
        name: str,
        flow: Flow,
        node_id: str,
        node: Node,
        router: Router,
        mailbox_size: int,
        workers: trio_parallel.WorkerContext | None,
        run_child: RunChild,
        events: EventHub,
        context: contextvars.Context,
    ) -> None:
        super().__init__(
            name,
            node.mailbox_size or mailbox_size,
            node.max_concurrency,
        )
        self.flow_name = flow.name
        self.node_id = node_id
        self.node = node
        self.router = router
        """The router of the outcomes of this actor's steps."""
        self.rate = RateLimiter(*node.rate_limit) if node.rate_limit else None
        self.exec_slots = (
            trio.CapacityLimiter(node.max_exec_concurrency)
            if node.max_exec_concurrency is not None
            else None
        )
        """The slots of ``max_exec_concurrency``: one per exec attempt in flight,
        taken first come, first served (trio's CapacityLimiter is fair)."""
        self._prep = as_coroutine_function(node.prep)
        self._post = as_coroutine_function(node.post)
        self._exec_call = exec_call(node, workers)
        self._timed_call = timed_call(self._exec_call)
        self._attempt: ExecCall = self._exec_call
        """One exec attempt: the executor's call itself, unless the node has exec
        slots, a rate limit or a timeout to apply around it (chosen once, here)."""
        if self.exec_slots is not None:
            self._attempt = self._slotted_attempt
        elif self.rate is not None or node.timeout is not None:
            self._attempt = self._limited_attempt
        self.takes_hand_off = node.executor != "thread"
        """Whether a step may be handed off to this actor (see :meth:`try_hand_off`)."""
        self.batch = isinstance(node, BatchNode | BatchFlow)
        """Whether exec runs once per item (or child run) prep returns."""
        self._run_child = run_child
        self._events = events
        self.hops: dict[str, NodeActor] = {}
        """The plain hops out of this node: action name → the next node's actor (the
        router's :meth:`~Router.learn` fills it)."""
        self.route_keys: frozenset[str] = frozenset()
        """The store keys the conditions of this node's routes read. The router's
        :meth:`~Router.learn` sets it."""
        self.may_end_flow = True
        """Whether a step of this node may end its flow (a route to END, or no route):
        in a nested flow, routing may then go on in the flows around it, and reads the
        run's ``condition_keys``. The router's :meth:`~Router.learn` sets it."""
        self._nursery: trio.Nursery | None = None
        self.began = trio.Event()
        """Set once :meth:`run` has begun: the actor serves, or has stopped already."""
        self._retired = trio.CancelScope()
        self._parked: deque[trio.lowlevel.Task] = deque()
        self._worker_context = context
        """The context variables a new worker starts with (the engine's, as where it was
        opened): a worker serves many runs, so it takes none from the task that happens
        to send it its first step."""
        self._worker_name = f"{name} worker"
        """The name of the actor's worker tasks (one string for them all: trio would
        build one per task from the function's name)."""

    def statistics(self) -> ActorStatistics:
        """This actor's counters now, with its rate limit and exec slots. Never blocks."""
        stats = super().statistics()
        rate = self.rate
        if rate is not None:
            stats = dataclasses.replace(
                stats, rate_limit=(rate.calls, rate.per_seconds), rate_waiting=rate.waiting
            )
        slots = self.exec_slots
        if slots is not None:
            held = slots.statistics()
            stats = dataclasses.replace(
                stats,
                max_exec_concurrency=self.node.max_exec_concurrency,
                exec_in_flight=held.borrowed_tokens,
                exec_waiting=held.tasks_waiting,
            )
        return stats

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the workers' nursery until cancelled or retired; start the steps sent
        before. Cancelled (the engine is closing) or retired, the actor stops before its
        nursery closes. Sets :attr:`began` as it starts serving, or as it ends if it
        never did."""
        try:
            with self._retired:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.serving = True
                    self.began.set()
                    self._drain()
                    task_status.started()
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._stop()
                # Reached only when the nursery's own scope was cancelled, by code
                # running in it: the actor is stopped, and that must not go unnoticed.
                raise RuntimeError(
                    f"{self.name} stopped: code running in it (a step's) cancelled the "
                    "cancel scope of its workers' nursery"
                )
        finally:
            self.began.set()

    def retire(self) -> None:
        """End :meth:`run` (at once, or as soon as it starts), cancelling the parked
        workers. Only for an actor that no run can reach any more (its flow is gone).
        Never blocks."""
        self._retired.cancel()

    def _stop(self) -> None:
        """Take no more steps: the engine is closing (it cancels every run in flight)
        or the actor retires (no run can reach it), so the steps queued and those sent
        from now on are dropped. A step
        still running (maybe in another actor's worker, handed off) frees its slot
        as it ends; nothing starts in the nursery after this. Never blocks."""
        # No slot left: the actor is never idle again and a freed slot takes nothing.
        # (``serving`` stays: an exception leaving the nursery is still a crash.)
        self.limit = 0
        self.mailbox.close()

    def try_hand_off(self) -> bool:
        """Take a slot for a step that the sending task will run itself (hand-off, see
        :func:`carry`) if the actor is idle; return whether it did. Never for a node
        whose exec runs on a thread: a thread cannot be stopped, so the task running
        the step is held until it returns, and that task must be one of the actor's own
        workers, never a caller of ``engine.run``, which returns at once when
        cancelled. Never blocks."""
        return self.takes_hand_off and self.try_enter()

    async def send(self, step: Step, scope: trio.CancelScope | None = None) -> None:
        """Deliver ``step``: to a worker at once when the actor is idle, else to the
        mailbox. Blocks (a checkpoint) only while the mailbox is full; meanwhile
        ``scope`` (the sender's, if given) is in the run's scopes: if the run ends, the
        wait is cancelled and the step dropped. A step of a run that has ended, or whose
        end is decided, is dropped here when the mailbox is full, else by
        :meth:`handle`."""
        if self.try_enter():
            self._dispatch(step)
            return
        mailbox = self.mailbox
        if scope is None or mailbox.has_room:
            await mailbox.put(step)
            return
        run = step.run
        if run.settled:
            return
        run.scopes[scope] = None
        try:
            await mailbox.put(step)
        finally:
            del run.scopes[scope]

    def send_nowait(self, step: Step) -> None:
        """Like :meth:`send`; raises trio.WouldBlock instead of waiting. Never blocks."""
        if self.try_enter():
            self._dispatch(step)
            return
        self.mailbox.put_nowait(step)

    def _drain(self) -> None:
        """Start what waits in the mailbox while slots are free (the steps sent before
        the actor ran)."""
        while self.serving and self.mailbox and self.busy < self.limit:
            self.enter()
            self._dispatch(self.mailbox.take())

    @trio.lowlevel.enable_ki_protection
    def _dispatch(self, step: Step) -> None:
        """Give ``step``, whose slot is taken, to a parked worker or a new one; either
        starts it in a fresh copy of the engine's context variables, so nothing the
        code of an earlier run set in the worker reaches this one. Protected from
        KeyboardInterrupt, as :meth:`_park` is: a worker taken must be woken."""
        if self._parked:
            worker = self._parked.pop()
            # Parked, the worker runs no code: trio enters the new context when it
            # resumes the worker.
            worker.context = self._worker_context.copy()
            trio.lowlevel.reschedule(worker, outcome.Value(step))
            return
        # start_soon gives the worker a copy of the context it is called in; entered
        # only for this call, which never comes back here.
        self._worker_context.run(self._start_worker, step)

    def _start_worker(self, step: Step) -> None:
        """Start a worker, named after the actor, in the actor's nursery, with ``step``."""
        assert self._nursery is not None, f"{self.name} is not running"
        self._nursery.start_soon(self._work, step, name=self._worker_name)

    def release(self) -> None:
        """Free the slot of a step that ended; a step waiting in the mailbox takes it
        and goes to another worker. Never blocks."""
        queued = self.leave()
        if queued is not None:
            self._dispatch(queued)

    async def _work(self, first: Step) -> None:
        """A worker: carries steps (see :func:`carry`) in one cancel scope, parked
        between them; exits when KEEP_IDLE others are parked, or when the end of a run
        cancelled it during a step of that run. It is among the router's carriers while
        it lives.

        Parked, it holds no step: a run that has ended (with its store) is not kept
        alive by the workers that carried it.
        """
        task = trio.lowlevel.current_task()
        self.router.carriers[task] = NO_NURSERIES
        step: Step | None = first
        del first
        try:
            with trio.CancelScope() as scope:
                while step is not None:
                    await carry(step, scope)
                    del step
                    step = await self._park()
        finally:
            del self.router.carriers[task]

    @trio.lowlevel.enable_ki_protection
    async def _park(self) -> Step | None:
        """Wait, parked, until :meth:`_dispatch` gives this worker a step; None, at
        once, when KEEP_IDLE workers are parked already. Protected from
        KeyboardInterrupt: a worker noted as parked must be parked."""
        if len(self._parked) >= KEEP_IDLE:
            return None
        task = trio.lowlevel.current_task()
        self._parked.append(task)

        def unpark(_: object) -> trio.lowlevel.Abort:
            self._parked.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        step: Step = await trio.lowlevel.wait_task_rescheduled(unpark)
        return step

    async def handle(self, step: Step, scope: trio.CancelScope) -> StepDone | StepFailed | None:
        """Run ``step`` (its slot taken) in ``scope``; return its outcome, for the
        router, or None if the run had ended, or routing had decided its end, before the
        step began (also while it waited for room). Waits first while a lossless event
        stream is full.

        ``scope`` is in the run's scopes while the step waits and runs: if the run ends
        meanwhile (another branch failed, it was cancelled), the step is cancelled and
        raises trio.Cancelled.
        """
        run = step.run
        if run.settled:
            return None
        scopes = run.scopes
        scopes[scope] = None
        try:
            events = self._events
            if events.congested:
                await events.wait_for_room()
                if run.settled:
                    return None
            run.mark_running()
            run.path.append(self.node_id)
            ctx = self._context(step)
            if events.active:
                return await self._observed_outcome(step, ctx)
            return await self._outcome(step, ctx)
        finally:
            del scopes[scope]

    async def _outcome(self, step: Step, ctx: ExecutionContext) -> StepDone | StepFailed:
        """Run prep, exec and post, read the values of the route conditions routing may
        evaluate and commit a durable step (whose store handle then closes, however the
        step ended); anything the run caused is a StepFailed."""
        run = step.run
        store = ctx.store  # the step's handle, whatever the node's code puts in ctx
        try:
            action = await self._phases(run, ctx)
            keys = self.route_keys
            if self.may_end_flow and len(step.branch.frames) > 1:
                keys = run.condition_keys
            values = await store.get_many(keys) if keys else _NO_VALUES
            await run.durability.commit(run, step.branch, self.node_id, action, store)
        except RUN_FAILURES as exc:
            return StepFailed(run, step.branch, self.node_id, exc)
        finally:
            run.durability.step_ended(run, self.node_id, store)
        return StepDone(run, step.branch, self, action, values)

    async def _observed_outcome(self, step: Step, ctx: ExecutionContext) -> StepDone | StepFailed:
        """:meth:`_outcome` between StepStarted and StepFinished, inside the step's
        tracing span when a tracer follows the engine."""
        started = self._step_started(ctx)
        result: StepDone | StepFailed | None = None
        try:
            with self._events.step_span(ctx):
                result = await self._outcome(step, ctx)
        finally:
            self._step_finished(ctx, started, result)
        return result

    def _context(self, step: Step) -> ExecutionContext:
        run = step.run
        branch = step.branch
        return ExecutionContext(
            run.run_id,
            self.node_id,
            self.flow_name,
            branch.count,
            run.durability.step_store(run.store),
            step.params,
            self.node.max_retries,
            0,
            branch.label,
        )

    async def _phases(self, run: ActiveRun, ctx: ExecutionContext) -> Action:
        """prep → exec → post; the action post returned, resolved against the store.

        Each phase's errors, its store calls never awaited, and a value post returned
        that is no action, fail the step with a NodeError naming the phase.
        """
        store = ctx.store
        try:
            prep_res = await self._prep(store, ctx)
        except BaseException as exc:
            if not fails_the_step(exc):
                raise
            raise self._failed("prep", ctx) from exc
        if not all_awaited(store):
            self._unawaited("prep", ctx)
        if type(prep_res) in _NOT_RESULTS:
            self._unawaited("prep", ctx, 1, ("prep", prep_res))
        try:
            if self.batch:
                exec_res = await self._exec_batch(run, prep_res, ctx)
            else:
                exec_res = await self._exec(prep_res, ctx)
        except BaseException as exc:
            if self.node.executor != "inline":
                # The calls exec on a worker made and never awaited are closed, not
                # left to warn: the step fails anyway.
                _ = unawaited(store)
            # exec's failures are NodeErrors already, after its retries and fallback;
            # any other error is not retried, and ends the attempt it was raised in.
            if isinstance(exc, NodeError) or not fails_the_step(exc):
                raise
            raise self._failed("exec", ctx, ctx.current_retry + 1) from exc
        if not all_awaited(store):
            self._unawaited("exec", ctx)
        try:
            post_res = await self._post(store, prep_res, exec_res, ctx)
        except BaseException as exc:
            if not fails_the_step(exc):
                raise
            raise self._failed("post", ctx) from exc
        if not all_awaited(store):
            self._unawaited("post", ctx)
        try:
            action = as_action(post_res, self.node_id)
        except (TypeError, ValueError) as exc:
            raise self._failed("post", ctx) from exc
        if action.is_conditional:
            action = await self._resolved(action, store)
        return action

    async def _resolved(self, action: Action, store: SharedStore) -> Action:
        """The conditional ``action`` post returned, resolved against the values of
        its conditions' keys in ``store``; a ConditionError (a condition's keys or
        evaluate at fault) is raised again naming this node, from the same cause.
        Blocks while the values are read."""
        try:
            keys = action.condition_keys()
            return action.resolve(await store.get_many(keys))
        except ConditionError as exc:
            message = f"conditional action of node {self.node_id!r}: {exc}"
            raise ConditionError(message) from exc.__cause__

    def _failed(self, phase: Phase, ctx: ExecutionContext, attempts: int = 1) -> NodeError:
        """The error that fails the step in ``phase`` (raise it from its cause)."""
        return NodeError(self.node_id, phase, ctx.run_id, attempts, ctx.flow_name)

    def _unawaited(
        self,
        phase: Phase,
        ctx: ExecutionContext,
        attempts: int = 1,
        returned: tuple[str, CoroutineType[Any, Any, Any] | ReturnedCoroutine] | None = None,
    ) -> NoReturn:
        """Fail the step in ``phase`` on what was left unawaited there: store calls exec
        made where the store is not reachable (a thread, a process, Ray), if any; else
        what ``returned`` says, a method (exec, exec_fallback) and the coroutine it
        returned instead of its result; else the store calls never awaited. A coroutine
        is closed (it never runs), and so are the calls left when exec is not inline."""
        if returned is not None:
            method, coroutine = returned
            carrier = (
                coroutine
                if isinstance(coroutine, ReturnedCoroutine)
                else ReturnedCoroutine.of(coroutine)
            )
        here: list[str] = []
        away: list[str] = []
        if returned is None or self.node.executor != "inline":
            here, away = unawaited(ctx.store)
        if away:
            raise self._failed(phase, ctx, attempts) from self._unreachable(away)
        if returned is not None:
            error: Exception = TypeError(
                f"{method} of node {self.node_id!r} returned a coroutine ({carrier.name}) "
                f"instead of its result: await it (`return await {carrier.name}(...)`)"
            )
        else:
            calls = ", ".join(f"store.{call}" for call in here)
            error = RuntimeError(
                f"{calls} in {phase} of node {self.node_id!r} was never awaited "
                "(a coroutine: write `await store...`); nothing was done"
            )
        raise self._failed(phase, ctx, attempts) from error

    def _unreachable(self, calls: list[str]) -> StorageError:
        """The error of the store ``calls`` exec made on a thread, a process or Ray."""
        made = ", ".join(f"store.{call}" for call in calls)
        return StorageError(
            f"{made} in exec of node {self.node_id!r} was not done: the store is not "
            f"reachable from exec with executor={self.node.executor!r} (a thread, a "
            "process or Ray has no store access); use the store in prep and post"
        )

    def _step_started(self, ctx: ExecutionContext) -> float:
        """Emit StepStarted; return its time."""
        started = trio.current_time()
        self._events.emit(
            StepStarted(ctx.run_id, started, self.flow_name, self.node_id, ctx.execution_id)
        )
        return started

    def _step_finished(
        self, ctx: ExecutionContext, started: float, message: StepDone | StepFailed | None
    ) -> None:
        """Emit StepFinished: the action, the error, or neither for a cancelled step
        (unless the last listener left during the step)."""
        if not self._events.active:
            return
        now = trio.current_time()
        action = message.action.name if isinstance(message, StepDone) else None
        error = message.error if isinstance(message, StepFailed) else None
        self._events.emit(
            StepFinished(
                ctx.run_id,
                now,
                self.flow_name,
                self.node_id,
                ctx.execution_id,
                now - started,
                action,
                error,
            )
        )

    async def _exec_batch(self, run: ActiveRun, prep_res: Any, ctx: ExecutionContext) -> Any:
        """The exec phase of a batch node: every item, or every child run."""
        if isinstance(self.node, BatchFlow):
            param_sets = self._param_sets(prep_res, ctx)
            return await self._run_children(self.node, param_sets, run, ctx)
        items = self._items(prep_res, ctx)
        if isinstance(self.node, ParallelBatchNode):
            return await self._exec_parallel(items, ctx)
        return await self._exec_in_turn(items, ctx)

    def _items(self, prep_res: Any, ctx: ExecutionContext) -> list[Any]:
        """A batch node's items (a BatchFlow's parameter sets): what prep returned, as a
        list. An error while reading them (a generator that raises) fails the step in
        prep."""
        if not isinstance(prep_res, Iterable) or isinstance(prep_res, str | bytes):
            error = TypeError(
                f"batch node {self.node_id!r}: prep must return an iterable of items, "
                f"not {type(prep_res).__name__}"
            )
            raise self._failed("prep", ctx) from error
        try:
            return list(prep_res)
        except BaseException as exc:
            if not fails_the_step(exc):
                raise
            raise self._failed("prep", ctx) from exc

    def _param_sets(self, prep_res: Any, ctx: ExecutionContext) -> list[dict[Any, Any]]:
        """A BatchFlow's parameter sets: what prep returned, as a list of dicts, each a
        mapping with str keys read once (a child run's params). Anything else, one dict
        instead of a list of them, or a mapping that cannot be read, fails the step in
        prep naming the item at fault."""
        if isinstance(prep_res, Mapping):
            self._bad_param_sets(f"prep returned one {type(prep_res).__name__}, not a list", ctx)
        param_sets = []
        for index, params in enumerate(self._items(prep_res, ctx)):
            if not isinstance(params, Mapping):
                self._bad_param_sets(f"item {index} is {type(params).__name__}", ctx)
            try:
                read = dict(params)
            except BaseException as exc:
                if not fails_the_step(exc):
                    raise
                raise self._failed("prep", ctx) from exc
            for key in read:
                if not isinstance(key, str):
                    kind = type(key).__name__
                    self._bad_param_sets(f"item {index} has the key {key!r} ({kind})", ctx)
            param_sets.append(read)
        return param_sets

    def _bad_param_sets(self, problem: str, ctx: ExecutionContext) -> NoReturn:
        """Fail the step in prep: what the BatchFlow's prep returned is not parameter
        sets, for ``problem``."""
        error = TypeError(
            f"BatchFlow node {self.node_id!r}: {problem}; prep must return parameter "
            "sets, dicts with str keys, one per child run"
        )
        raise self._failed("prep", ctx) from error

    async def _exec_in_turn(self, items: list[Any], ctx: ExecutionContext) -> list[Any]:
        """Exec every item, one after the other, each from its first attempt."""
        results = []
        for item in items:
            ctx.current_retry = 0
            results.append(await self._exec(item, ctx))
        return results

    async def _exec_parallel(self, items: list[Any], ctx: ExecutionContext) -> list[Any]:
        """Exec every item at once (within max_concurrency); the first failure cancels all."""
        jobs = [functools.partial(self._exec, item, ctx.copy()) for item in items]
        return await _all_or_first_error(self.max_concurrency, jobs)

    async def _run_children(
        self, batch: BatchFlow, param_sets: list[Any], run: ActiveRun, ctx: ExecutionContext
    ) -> list[FlowResult]:
        """Run ``batch.flow`` once per parameter set as child runs on this run's store;
        they are durable when this run is. The child of the ``index``-th set is the run
        ``<execution id>/<index>``: unique to this step within the run, and the same when
        a resumed durable run runs the step again (it then finds its children's
        records)."""
        run_child = self._run_child
        jobs = [
            functools.partial(
                run_child,
                batch.flow,
                run.storage,
                params=params,
                run_id=f"{ctx.execution_id}/{index}",
                durable=run.durability.durable,
            )
            for index, params in enumerate(param_sets)
        ]
        try:
            return await _all_or_first_error(self.max_concurrency, jobs)
        except Exception as exc:
            raise self._failed("exec", ctx) from exc

    async def _exec(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """One exec attempt; if it fails, the retries and the fallback (:meth:`_retry`).

        A BaseException that fails the step (``sys.exit()`` in an attempt or in the
        fallback) ends them with a NodeError counting the attempts made, as ``ctx``
        counts them: an item of a ParallelBatchNode has a context of its own."""
        try:
            try:
                result = await self._attempt(prep_res, ctx)
            except Exception as exc:
                return await self._retry(prep_res, exc, ctx)
        except BaseException as exc:
            if isinstance(exc, NodeError) or not fails_the_step(exc):
                raise
            raise self._failed("exec", ctx, ctx.current_retry + 1) from exc
        if type(result) in _NOT_RESULTS:
            self._unawaited("exec", ctx, 1, ("exec", result))
        return result

    async def _retry(self, prep_res: Any, error: Exception, ctx: ExecutionContext) -> Any:
        """After the first attempt failed with ``error``: attempt exec again until
        ``max_retries`` attempts were made or an error is not retryable, then fall back."""
        node = self.node
        delay = node.retry_delay
        attempt = 1
        while attempt < node.max_retries and self._retryable(error):
            wait = _retry_wait(delay, node.retry_jitter, error)
            if self._events.active:
                now = trio.current_time()
                self._events.emit(
                    Retry(ctx.run_id, now, self.node_id, ctx.execution_id, attempt, error, wait)
                )
            await trio.sleep(wait)
            delay *= node.backoff
            ctx.current_retry = attempt
            attempt += 1
            try:
                result = await self._attempt(prep_res, ctx)
            except Exception as exc:
                error = exc
                continue
            if type(result) in _NOT_RESULTS:
                self._unawaited("exec", ctx, attempt, ("exec", result))
            return result
        return await self._fallback(prep_res, error, ctx, attempt)

    async def _slotted_attempt(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """One exec attempt holding one of the exec slots: blocks until a slot is free
        (first come, first served), then runs :meth:`_limited_attempt`, whose rate
        limit and timeout start only then. The slot is freed as the attempt ends,
        however it ends (a thread exec that cannot be interrupted holds it until its
        thread returns)."""
        slots = self.exec_slots
        assert slots is not None
        # A token of its own per attempt: an exec that runs this node again in the same
        # task (a nested engine.run) waits for a slot instead of raising.
        holder = object()
        await slots.acquire_on_behalf_of(holder)
        try:
            return await self._limited_attempt(prep_res, ctx)
        finally:
            slots.release_on_behalf_of(holder)

    async def _limited_attempt(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """One exec attempt, after the rate limit allows it, within the timeout.

        Past ``timeout`` it fails with TooSlowError: an async, process or ray exec is
        cancelled at the deadline; a sync or thread one cannot be, so its late result
        is dropped. On a thread or a process, the wait for a free one is not counted.
        """
        if self.rate is not None:
            await self.rate.acquire()
        timeout = self.node.timeout
        if timeout is None:
            return await self._exec_call(prep_res, ctx)
        return await self._timed_call(prep_res, ctx, timeout)

    def _retryable(self, error: Exception) -> bool:
        return isinstance(error, (trio.TooSlowError, *self.node.retry_on))

    async def _fallback(
        self, prep_res: Any, error: Exception, ctx: ExecutionContext, attempts: int
    ) -> Any:
        if self._events.active:
            now = trio.current_time()
            self._events.emit(
                Fallback(ctx.run_id, now, self.node_id, ctx.execution_id, attempts, error)
            )
        try:
            result = await call(self.node.exec_fallback, prep_res, error, ctx)
        except Exception as exc:
            raise self._failed("exec", ctx, attempts) from exc
        if type(result) in _NOT_RESULTS:
            self._unawaited("exec", ctx, attempts, ("exec_fallback", result))
        return result


def _retry_wait(delay: float, jitter: float, error: Exception) -> float:
    """Seconds to wait before the attempt that follows ``error``: drawn uniformly from
    ``[delay * (1 - jitter), delay]``, and at least ``error.retry_after`` when that is a
    finite number >= 0 (any other value, or an attribute that raises, is ignored).

    A delay that the back-off made infinite (it overflowed a float) waits forever: the
    draw would be NaN, which trio refuses as a deadline."""
    if delay == math.inf:
        return math.inf
    wait = random.uniform(delay * (1 - jitter), delay) if jitter else delay
    try:
        retry_after = getattr(error, "retry_after", None)
    except Exception:  # a property of the error's class that fails: no hint
        return wait
    if is_finite_number(retry_after) and retry_after > wait:
        return float(retry_after)
    return wait


async def _all_or_first_error(
    limit: int | None, jobs: Sequence[Callable[[], Awaitable[Any]]]
) -> list[Any]:
    """Run ``jobs`` concurrently, at most ``limit`` at once (None = all), starting them in
    order; return their results in order. The first job that raises what fails a step
    (see :func:`fails_the_step`; ``sys.exit()`` too) cancels the others; its error is
    raised as it is. Cancelled from outside (the step's run or its caller), it raises
    the group of its jobs' trio.Cancelled (see :data:`~.cancellation.CANCELLED_ALONE`).
    """
    results: list[Any] = [None] * len(jobs)
    failures: list[BaseException] = []
    slots = trio.CapacityLimiter(limit or max(len(jobs), 1))

    async def one(index: int, job: Callable[[], Awaitable[Any]], nursery: trio.Nursery) -> None:
        try:
            results[index] = await job()
        except BaseException as exc:
            if not fails_the_step(exc):
                raise
            failures.append(exc)
            nursery.cancel_scope.cancel()
        finally:
            slots.release_on_behalf_of(index)

    async with trio.open_nursery() as nursery:
        for index, job in enumerate(jobs):
            # Taken here, in order: job i + 1 starts only once job i has its slot.
            await slots.acquire_on_behalf_of(index)
            nursery.start_soon(one, index, job, nursery)
    if failures:
        raise failures[0]
    return results


def fails_the_step(error: BaseException) -> bool:
    """Whether ``error``, which left a node's code, is the node's failure (its step
    fails, and its run alone): every Exception, and any other BaseException the code
    raised itself (``sys.exit()``, a ``trio.Cancelled`` of its own making, a
    GeneratorExit in a trio task), except KeyboardInterrupt (the operator's; also inside
    a group), a GeneratorExit outside a trio task (Python closing the coroutine of a
    step that was never finished, after its trio run ended: trio never closes the
    coroutine of a task that runs), and the Cancelled of a step being cancelled (the run
    or the engine ending; also a group of nothing else): those go on up."""
    if isinstance(error, Exception):
        return True
    if isinstance(error, KeyboardInterrupt):
        return False
    if isinstance(error, GeneratorExit):
        return trio.lowlevel.in_trio_task()
    if isinstance(error, BaseExceptionGroup) and error.subgroup(KeyboardInterrupt):
        return False
    if trio.current_effective_deadline() != -math.inf:
        return True
    return not only_cancelled(error)


async def carry(step: Step, scope: trio.CancelScope) -> None:
    """Run ``step`` (its actor's slot taken) in this task, then the steps that follow
    it while their node is idle (hand-off: this task takes that node's slot).

    A step's slot is released once its outcome is known, before the router has it:
    when routing ends the run, the run's waiters find its last node free. Steps that
    cannot be handed off are sent to their actors (blocks while a mailbox is full,
    holding no slot). Each step and the sending of the steps that follow run in
    ``scope`` (see :meth:`NodeActor.handle` and :meth:`NodeActor.send`), so no step is
    carried on, nor a mailbox waited for, once the run has ended. When routing ends the
    run, this task ends it, blocking while a durable run's record is written (see
    :meth:`Router.route`).
    """
    while True:
        actor = step.actor
        try:
            result = await actor.handle(step, scope)
        finally:
            actor.release()
        if result is None:
            return
        following = await actor.router.route(result)
        if not following:
            return
        step = following.pop()
        for other in following:
            await other.actor.send(other, scope)
        # The caller of engine.run may have been cancelled during the step, with no
        # checkpoint since: the next step must not start.
        await trio.lowlevel.checkpoint_if_cancelled()
        if not step.actor.try_hand_off():
            await step.actor.send(step, scope)
            return
