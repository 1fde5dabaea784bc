"""The node actor: the only place a node's prep, exec and post ever run.

One actor per node of a registered flow. It takes :class:`Step` messages from its bounded
mailbox and runs each as a task in its own nursery, at most ``max_concurrency`` at once,
then tells the router how the step ended (:class:`StepDone` / :class:`StepFailed`).
"""

from __future__ import annotations

import inspect
from typing import Any

import trio

from cosmoflow_actors.action import Action, as_action
from cosmoflow_actors.context import ExecutionContext
from cosmoflow_actors.errors import NodeError
from cosmoflow_actors.flow import Flow
from cosmoflow_actors.node import Node
from cosmoflow_actors.runtime.messages import RouterMessage, Step, StepDone, StepFailed, take
from cosmoflow_actors.runtime.run import Run, RunState


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
    ) -> None:
        self.flow_name = flow.name
        self.node_id = node_id
        self.node = node
        self.name = f"{flow.name}/{node_id}"
        self._router = router
        send, receive = trio.open_memory_channel[Step](mailbox_size)
        self.mailbox = send
        self._receive = receive
        limit = node.max_concurrency
        self._slots = trio.Semaphore(limit) if limit is not None else None
        self.serving = False
        self.messages_processed = 0
        self.in_flight = 0

    @property
    def mailbox_depth(self) -> int:
        """Steps waiting in the mailbox."""
        return self.mailbox.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve steps until cancelled.

        With ``max_concurrency`` it waits for a free slot before taking the next step,
        so waiting steps stay in the mailbox and its senders feel the backpressure.
        """
        async with trio.open_nursery() as steps:
            self.serving = True
            task_status.started()
            while True:
                if self._slots is not None:
                    await _acquire(self._slots)
                step = await take(self._receive)
                self.in_flight += 1
                steps.start_soon(self._step, step)

    async def _step(self, step: Step) -> None:
        run = step.run
        try:
            if not run.finished:
                await self._step_in_scope(run, step)
        finally:
            self.in_flight -= 1
            self.messages_processed += 1
            if self._slots is not None:
                self._slots.release()

    async def _step_in_scope(self, run: Run, step: Step) -> None:
        """Run the step under the run's cancel scope, then report it to the router."""
        if run.state.value is RunState.PENDING:
            run.state.value = RunState.RUNNING
        run.path.append(self.node_id)
        message: StepDone | StepFailed
        with trio.CancelScope() as scope:
            run.scope = scope
            try:
                action = await self._lifecycle(run, step)
                message = StepDone(run, self.node_id, action)
            except (NodeError, TypeError) as exc:
                message = StepFailed(run, self.node_id, exc)
            finally:
                run.scope = None
        if not scope.cancelled_caught:
            self._router.send_nowait(message)

    async def _lifecycle(self, run: Run, step: Step) -> Action:
        """prep → exec (retries, timeout, fallback) → post. Raises NodeError or TypeError."""
        node = self.node
        ctx = ExecutionContext(
            run_id=run.run_id,
            node_id=self.node_id,
            flow_name=self.flow_name,
            execution_id=f"{run.run_id}:{len(run.path)}",
            store=run.store,
            params=step.params,
            max_retries=node.max_retries,
        )
        prep_res = await self._phase("prep", ctx, node.prep, run.store, ctx)
        exec_res = await self._exec(prep_res, ctx)
        post_res = await self._phase("post", ctx, node.post, run.store, prep_res, exec_res, ctx)
        return as_action(post_res, self.node_id)

    async def _phase(self, phase: str, ctx: ExecutionContext, method: Any, *args: Any) -> Any:
        try:
            return await _call(method, *args)
        except Exception as exc:
            raise NodeError(self.node_id, phase, ctx.run_id, 1) from exc

    async def _exec(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """Attempt exec up to ``max_retries`` times, then fall back."""
        node = self.node
        delay = node.retry_delay
        attempt = 0
        while True:
            ctx.current_retry = attempt
            try:
                return await self._attempt(prep_res, ctx)
            except Exception as exc:
                attempt += 1
                if attempt == node.max_retries or not self._retryable(exc):
                    return await self._fallback(prep_res, exc, ctx, attempt)
            await trio.sleep(delay)
            delay *= node.backoff

    async def _attempt(self, prep_res: Any, ctx: ExecutionContext) -> Any:
        """One exec attempt. Past ``timeout`` it fails with TooSlowError: an async exec
        is cancelled at the deadline; a sync one cannot be, so its late result is dropped.
        """
        timeout = self.node.timeout
        if timeout is None:
            return await _call(self.node.exec, prep_res, ctx)
        deadline = trio.current_time() + timeout
        with trio.fail_after(timeout):
            result = await _call(self.node.exec, prep_res, ctx)
        if trio.current_time() > deadline:
            raise trio.TooSlowError(f"exec of {self.node_id!r} overran its {timeout}s timeout")
        return result

    def _retryable(self, error: Exception) -> bool:
        return isinstance(error, (trio.TooSlowError, *self.node.retry_on))

    async def _fallback(
        self, prep_res: Any, error: Exception, ctx: ExecutionContext, attempts: int
    ) -> Any:
        try:
            return await _call(self.node.exec_fallback, prep_res, error, ctx)
        except Exception as exc:
            raise NodeError(self.node_id, "exec", ctx.run_id, attempts) from exc


async def _acquire(slots: trio.Semaphore) -> None:
    """Take a slot; wait (a checkpoint) only when none is free."""
    try:
        slots.acquire_nowait()
    except trio.WouldBlock:
        await slots.acquire()


async def _call(method: Any, *args: Any) -> Any:
    """Call a node method that may be sync or async."""
    result = method(*args)
    if inspect.isawaitable(result):
        return await result
    return result
