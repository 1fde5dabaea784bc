"""The node actor: the only place a node's prep, exec and post ever run.

One actor per node of a registered flow. Its workers take :class:`Step` messages from
its bounded mailbox and run them; a worker that finishes a step takes the next one
straight away, so a busy node spawns no task per step. The pool grows to cover the
steps waiting (up to ``max_concurrency``) and shrinks when idle. Each step ends with a
:class:`StepDone` or :class:`StepFailed` to the router.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import trio
import trio_parallel

from cosmoflow_actors.action import Action, as_action
from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.errors import NodeError, StorageError
from cosmoflow_actors.events import EventHub, Fallback, Retry, StepFinished, StepStarted
from cosmoflow_actors.flow import BatchFlow, Flow, FlowResult
from cosmoflow_actors.node import BatchNode, Node, ParallelBatchNode
from cosmoflow_actors.runtime import durability
from cosmoflow_actors.runtime.executor import call, exec_call
from cosmoflow_actors.runtime.limits import RateLimiter
from cosmoflow_actors.runtime.messages import RouterMessage, Step, StepDone, StepFailed
from cosmoflow_actors.runtime.run import Branch, Durable, Run
from cosmoflow_actors.store import SharedStore

RunChild = Callable[..., Awaitable[FlowResult]]
"""How a BatchFlow node runs a child run: ``run_child(flow, storage, params=...,
run_id=..., durable=...)``."""

KEEP_IDLE: Final = 8
"""Idle workers a node actor keeps; more exit until work comes back."""


class NodeActor:
    """Runs the steps of every run that reaches one node."""

    kind = "node"

    def __init__(
        self,
        flow: Flow,
        node_id: str,
        node: Node,
        router: trio.MemorySendChannel[RouterMessage],
        mailbox_size: int,
        workers: trio_parallel.WorkerContext | None = None,
        run_child: RunChild | None = None,
        events: EventHub | None = None,
    ) -> None:
        self.flow_name = flow.name
        self.node_id = node_id
        self.node = node
        self.name = f"{flow.name}/{node_id}"
        self._router = router
        self.mailbox_size = node.mailbox_size or mailbox_size
        send, receive = trio.open_memory_channel[Step](self.mailbox_size)
        self.mailbox = send
        self._receive = receive
        self.max_concurrency = node.max_concurrency
        self._limit = node.max_concurrency or math.inf
        self.rate = RateLimiter(*node.rate_limit) if node.rate_limit else None
        self._exec_call = exec_call(node, workers)
        self._direct = node.executor == "inline" and node.timeout is None and self.rate is None
        self._plain = not isinstance(node, BatchNode | BatchFlow)
        self._simple = self._direct and self._plain and node.max_retries == 1
        self._run_child = run_child
        self._events = events if events is not None else EventHub()
        self._nursery: trio.Nursery | None = None
        self.serving = False
        self.messages_processed = 0
        self.in_flight = 0
        self._workers = 0

    @property
    def mailbox_depth(self) -> int:
        """Steps waiting in the mailbox."""
        return self.mailbox.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the workers' nursery until cancelled; one worker waits from the start."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._spawn(1)
            self.serving = True
            task_status.started()
            await trio.sleep_forever()

    def _spawn(self, count: int) -> None:
        assert self._nursery is not None
        for _ in range(count):
            self._workers += 1
            self._nursery.start_soon(self._work)

    async def _work(self) -> None:
        """Take steps until idle with enough other workers idle; a checkpoint per wait.

        The worker's steps run in a cancel scope of its own, which a run cancelled in
        the middle of a step cancels; the worker then carries on in a fresh scope.
        """
        receive = self._receive
        try:
            while True:
                with trio.CancelScope() as scope:
                    while not scope.cancel_called:
                        try:
                            step = receive.receive_nowait()
                        except trio.WouldBlock:
                            if self._workers - self.in_flight > KEEP_IDLE:
                                return
                            step = await receive.receive()
                        self.in_flight += 1
                        self._grow()
                        try:
                            await self._step(step, scope)
                        finally:
                            self.in_flight -= 1
                            self.messages_processed += 1
        finally:
            self._workers -= 1

    def _grow(self) -> None:
        """With no spare worker left, spawn one per step waiting plus a spare, within
        max_concurrency. (A spare worker that takes a step grows the pool in turn.)
        """
        if self._workers > self.in_flight:
            return
        room = self._limit - self._workers
        if room > 0:
            self._spawn(int(min(self.mailbox_depth + 1, room)))

    async def _step(self, step: Step, scope: trio.CancelScope) -> None:
        """Run prep → exec → post, cancellable through ``scope`` by the run, then report
        to the router: StepDone, or StepFailed for a NodeError (or a TypeError from post).
        A cancelled step reports nothing (trio.Cancelled leaves it).

        Kept as one frame with the common exec inline: a suspended step costs memory
        per coroutine frame, and 100,000 of them may be suspended at once.
        """
        run = step.run
        if run.finished:
            return
        run.start()
        run.path.append(self.node_id)
        node = self.node
        durable = run.durable
        # A durable step stages its writes in a handle of its own: a fan-out's branches
        # run steps of one run at once.
        store = run.store if durable is None else run.store_actor.handle(run.storage)
        ctx = ExecutionContext(
            run_id=run.run_id,
            node_id=self.node_id,
            flow_name=self.flow_name,
            step_number=step.branch.count,
            store=store,
            params=step.params,
            max_retries=node.max_retries,
            branch=step.branch.label,
        )
        events = self._events
        # The clock is read only for a subscriber: a step that emitted no StepStarted
        # emits no StepFinished either.
        started = trio.current_time() if events.active else None
        if started is not None:
            events.emit(
                StepStarted(run.run_id, started, self.flow_name, self.node_id, ctx.execution_id)
            )
        message: StepDone | StepFailed | None = None
        run.scopes.append(scope)
        if durable is not None:
            store.begin_step()
        try:
            # prep and post are called here, not through a helper coroutine: fewer
            # objects per step keep the garbage collector's share down at scale.
            try:
                prep_res = node.prep(store, ctx)
                if hasattr(prep_res, "__await__"):
                    prep_res = await prep_res
            except Exception as exc:
                raise NodeError(self.node_id, "prep", ctx.run_id, 1) from exc
            if self._simple:
                # executor.call inlined: one coroutine frame less per suspended step.
                try:
                    exec_res = node.exec(prep_res, ctx)
                    if hasattr(exec_res, "__await__"):
                        exec_res = await exec_res
                except Exception as exc:
                    exec_res = await self._fallback(prep_res, exc, ctx, 1)
            else:
                exec_res = await self._exec_phase(run, prep_res, ctx)
            try:
                post_res: Any = node.post(store, prep_res, exec_res, ctx)
                if hasattr(post_res, "__await__"):
                    post_res = await post_res
            except Exception as exc:
                raise NodeError(self.node_id, "post", ctx.run_id, 1) from exc
            action = as_action(post_res, self.node_id)
            if durable is not None:
                action = await self._commit(run, durable, store, step.branch, action)
            message = StepDone(run, step.branch, self.node_id, action)
        except (NodeError, TypeError, StorageError) as exc:
            message = StepFailed(run, step.branch, self.node_id, exc)
        finally:
            store.end_step()
            run.scopes.remove(scope)
            if started is not None and events.active:
                self._step_finished(ctx, started, message)
        self._router.send_nowait(message)

    def _step_finished(
        self, ctx: ExecutionContext, started: float, message: StepDone | StepFailed | None
    ) -> None:
        """Emit StepFinished: the action, the error, or neither for a cancelled step."""
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

    async def _commit(
        self, run: Run, durable: Durable, store: SharedStore, branch: Branch, action: Action
    ) -> Action:
        """Commit a durable step: its staged writes with the run's record, in one commit.

        A conditional action is resolved first (reading through the step's writes), so
        the record holds where the run goes. The steps of a run commit one at a time,
        each record built on the last. Raises StorageError when the commit fails,
        RunConflictError when another engine committed this step of the run first.
        """
        if action.is_conditional:
            action = action.resolve(await store.get_many(action.condition_keys()))
        ops = store.end_step()
        async with durable.lock:
            record, resume_at = durability.step_done(durable, branch, self.node_id, action)
            steps_before = len(durable.record["path"])
            key = durability.record_key(run.run_id)
            await store.commit_step(ops, key, record, steps_before)
            durable.record = record
            branch.resume_at = resume_at
        return action

    async def _exec_phase(self, run: Run, prep_res: Any, ctx: ExecutionContext) -> Any:
        """The exec phase, when it is more than one inline attempt."""
        if self._plain:
            return await self._exec(prep_res, ctx)
        if isinstance(self.node, BatchFlow):
            param_sets = _items(self.node_id, ctx, prep_res)
            return await self._run_children(self.node, param_sets, run, ctx)
        if isinstance(self.node, ParallelBatchNode):
            return await self._exec_parallel(_items(self.node_id, ctx, prep_res), ctx)
        return [await self._exec(item, ctx) for item in _items(self.node_id, ctx, prep_res)]

    async def _exec_parallel(self, items: list[Any], ctx: ExecutionContext) -> list[Any]:
        """Exec every item at once (within max_concurrency); the first failure cancels all."""
        jobs = [functools.partial(self._exec, item, dataclasses.replace(ctx)) for item in items]
        return await _all_or_first_error(self.max_concurrency, jobs)

    async def _run_children(
        self, batch: BatchFlow, param_sets: list[Any], run: Run, ctx: ExecutionContext
    ) -> list[FlowResult]:
        """Run ``batch.flow`` once per parameter set as child runs on this run's store;
        they are durable when this run is."""
        run_child = self._run_child
        assert run_child is not None
        jobs = [
            functools.partial(
                run_child,
                batch.flow,
                run.storage,
                params=params,
                run_id=f"{ctx.run_id}/{index}",
                durable=run.durable is not None,
            )
            for index, params in enumerate(param_sets)
        ]
        try:
            return await _all_or_first_error(self.max_concurrency, jobs)
        except Exception as exc:
            raise NodeError(self.node_id, "exec", ctx.run_id, 1) from exc

    async def _exec(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """Attempt exec up to ``max_retries`` times, then fall back."""
        node = self.node
        delay = node.retry_delay
        attempt = 0
        while True:
            ctx.current_retry = attempt
            try:
                if not self._direct:
                    return await self._attempt(prep_res, ctx)
                return await call(node.exec, prep_res, ctx)
            except Exception as exc:
                attempt += 1
                if attempt == node.max_retries or not self._retryable(exc):
                    return await self._fallback(prep_res, exc, ctx, attempt)
                if self._events.active:
                    now = trio.current_time()
                    self._events.emit(Retry(ctx.run_id, now, self.node_id, attempt, exc, delay))
            await trio.sleep(delay)
            delay *= node.backoff

    async def _attempt(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """One exec attempt, after the rate limit allows it.

        Past ``timeout`` it fails with TooSlowError: an async or process exec is
        cancelled at the deadline; a sync or thread one cannot be, so its late result
        is dropped.
        """
        if self.rate is not None:
            await self.rate.acquire()
        timeout = self.node.timeout
        if timeout is None:
            return await self._exec_call(prep_res, ctx)
        deadline = trio.current_time() + timeout
        with trio.fail_after(timeout):
            result = await self._exec_call(prep_res, ctx)
        if trio.current_time() > deadline:
            raise trio.TooSlowError(f"exec of {self.node_id!r} overran its {timeout}s timeout")
        return result

    def _retryable(self, error: Exception) -> bool:
        return isinstance(error, (trio.TooSlowError, *self.node.retry_on))

    async def _fallback(
        self, prep_res: Any, error: Exception, ctx: ExecutionContext, attempts: int
    ) -> Any:
        if self._events.active:
            now = trio.current_time()
            self._events.emit(Fallback(ctx.run_id, now, self.node_id, attempts, error))
        try:
            return await call(self.node.exec_fallback, prep_res, error, ctx)
        except Exception as exc:
            raise NodeError(self.node_id, "exec", ctx.run_id, attempts) from exc


async def _all_or_first_error(
    limit: int | None, jobs: Sequence[Callable[[], Awaitable[Any]]]
) -> list[Any]:
    """Run ``jobs`` concurrently, at most ``limit`` at once (None = all); return their
    results in order. The first job that raises cancels the others; its error is raised.
    """
    results: list[Any] = [None] * len(jobs)
    failures: list[Exception] = []
    slots = trio.CapacityLimiter(limit or max(len(jobs), 1))

    async def one(index: int, job: Callable[[], Awaitable[Any]], nursery: trio.Nursery) -> None:
        async with slots:
            try:
                results[index] = await job()
            except Exception as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for index, job in enumerate(jobs):
            nursery.start_soon(one, index, job, nursery)
    if failures:
        raise failures[0]
    return results


def _items(node_id: str, ctx: ExecutionContext, prep_res: Any) -> list[Any]:
    """A batch node's items: what prep returned, as a list."""
    if not isinstance(prep_res, Iterable) or isinstance(prep_res, str | bytes):
        error = TypeError(f"batch node {node_id!r}: prep must return an iterable of items")
        raise NodeError(node_id, "prep", ctx.run_id, 1) from error
    return list(prep_res)
