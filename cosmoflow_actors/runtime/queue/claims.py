"""How a worker claims runs: it reads the queue's new entries and looks for runs whose
lease expired, takes each run's lease, and passes over the runs whose flow it lacks or
has in a version that does not fit the run's record."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import trio

from cosmoflow_actors.errors import RunRecordedError, StorageError, type_and_message
from cosmoflow_actors.flow import Flow
from cosmoflow_actors.runtime.queue.client import FINISHED, GROUP, RunQueue, as_str
from cosmoflow_actors.runtime.queue.entries import (
    UnreadableEntryError,
    decoded_info,
    decoded_passed,
    decoded_run_id,
    foreign_lease,
)
from cosmoflow_actors.runtime.queue.scripts import (
    ADVERTISE,
    CLAIM,
    EXPIRED,
    FAIL_AS_READ,
    FAIL_PASSED,
    HELD,
    PASS_OVER,
    READ_NEW,
    UNCLAIM,
)

LOGGER: Final = logging.getLogger("cosmoflow_actors.queue")
"""Where a worker says that its queue is out of reach, once per outage, and when it is
back (warnings; with logging not set up, Python prints them on stderr)."""

MAX_POLL: Final = 0.5
"""The longest a worker waits for a new entry before it looks for expired leases again,
and the longest between two of its looks for expired leases while it has free slots."""
SCAN_STEPS: Final = 100
"""The most ``XAUTOCLAIM`` steps (each examines up to 10 pending entries) one look for
expired leases takes on the server before it answers; the worker goes on from there."""
HAND_BACK_SECONDS: Final = 2.0
"""The longest a worker waits for the server while it records a run's outcome, and a
stopped worker while it hands a run back. Beyond it the worker goes on without, and
the run's lease expires by itself: another worker takes the run over and resumes it
after its last committed step (a run that ended gives the result its record holds)."""


@contextlib.contextmanager
def shielded_briefly() -> Iterator[None]:
    """Run the block shielded from cancellation, for HAND_BACK_SECONDS at most, and
    let a StorageError end it. What it tells the server is then left to time: a lease
    expires by itself, an entry is taken over once it has been idle for a lease."""
    with trio.move_on_after(HAND_BACK_SECONDS, shield=True), contextlib.suppress(StorageError):
        yield


RESUME: Final = "resume"
"""The field of a run's entry in the queue's hash that a worker leaving the run without
an outcome (stopped, or dropping it) sets to true: the next claim resumes the run's
record even if it says the run failed (see :attr:`Claim.resumes`). A claim removes it."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A run a worker holds the lease of: its stream entry, flow and parameters, its
    entry in the queue's hash as the claim wrote it (``info``) and as it was before
    (``read``), the passed-over note the claim forgot, when (trio time) the lease
    expires unless renewed, and whether the claim resumes the run's record whatever
    it says (``resumes``).

    A claim resumes a run that was pending (submitted, or requeued: a record that says
    it failed goes on after its last committed step) or that its last worker left
    without an outcome (see :data:`RESUME`). Any other claim takes the run over from a
    worker that died, lost its lease or could not record the outcome in time: a record
    that says the run ended gives that outcome, and the run is not run again."""

    entry_id: str
    run_id: str
    flow: Flow
    params: dict[str, Any]
    info: dict[str, Any]
    read: bytes
    passed: bytes | None
    expires: float
    resumes: bool


class Claimer:
    """The claiming side of one worker of a queue: finds the runs it may run, new ones
    and those whose lease expired, and takes their leases."""

    def __init__(
        self, queue: RunQueue, flows: dict[str, Flow], name: str, running: Container[str]
    ) -> None:
        self.queue = queue
        self.flows = flows
        self.name = name
        self._running = running
        """The ids of the runs the worker runs now (it holds their leases)."""
        self._poll = min(MAX_POLL, queue.third_of_lease)
        """Seconds: the longest wait for a new entry, and the shortest between two looks
        for expired leases that found none."""
        self._cursor = "0-0"
        """Where the look for expired leases goes on ("0-0": from the start)."""
        self._next_look = -math.inf
        """When (trio time) the next look for expired leases is due."""
        self._out_of_reach = False
        """Whether the worker's last attempt to claim a run found the queue out of
        reach (or refusing), so that an outage is logged once, and its end."""

    async def next_claim(self) -> Claim:
        """Claim a run: one whose lease expired, when it is time to look for one (see
        :meth:`_claim_one`), else a new one. Blocks until there is one to claim."""
        while True:
            try:
                claim = await self._claim_one()
            except StorageError as exc:
                # The server is out of reach, or restarted without the stream: wait a
                # third of a lease, make the group again if need be, and go on.
                self._outage_began(exc)
                await trio.sleep(self.queue.third_of_lease)
                with contextlib.suppress(StorageError):
                    await self.queue.ensure_group()
                continue
            self._outage_ended()
            if claim is not None:
                return claim

    def _outage_began(self, error: StorageError) -> None:
        """Log to :data:`LOGGER`, once an outage starts, that the queue cannot be used:
        ``error``, which names the queue, says why. Never blocks."""
        if not self._out_of_reach:
            self._out_of_reach = True
            # The error last: its text ends as it may (often in a full stop).
            LOGGER.warning(
                "worker %s cannot use its queue (trying again every %.3g s): %s",
                self.name,
                self.queue.third_of_lease,
                error,
            )

    def _outage_ended(self) -> None:
        """Log to :data:`LOGGER` that an outage of the queue has ended. Never blocks."""
        if self._out_of_reach:
            self._out_of_reach = False
            LOGGER.warning("worker %s uses %r again", self.name, self.queue)

    async def _claim_one(self) -> Claim | None:
        """Claim a run whose lease expired, if it is time to look for one (see
        :meth:`_expired_claim`), else a new run, waiting a poll interval at most for
        one. None when there is none."""
        if trio.current_time() >= self._next_look:
            claim = await self._expired_claim()
            if claim is not None:
                return claim
        entry = await self._read_new_at_once()
        if entry is None:
            entry = await self._wait_for_new()
        if entry is None:
            return None
        return await self._claim(*entry)

    async def _expired_claim(self) -> Claim | None:
        """Go on looking through the pending entries for one idle for at least a
        lease, until this worker claims its run (the next look goes on from there, at
        once) or has looked through them all, whether the last one looked at was
        claimed or not (the next look starts again a poll interval later, so that a
        run whose lease expired waits at most that long, whether the worker is busy or
        idle, and a run this worker gives back, idle for a lease, is not claimed again
        at once). None when it claimed none. A worker stopped during a look gives back
        the entry it took over (see :meth:`_delivering`)."""
        queue = self.queue
        while True:
            reply = await self._delivering(
                partial(
                    queue.script,
                    EXPIRED,
                    [queue.stream, queue.runs],
                    [GROUP, self.name, queue.lease_ms, self._cursor, SCAN_STEPS],
                ),
                _taken_over,
            )
            self._cursor = as_str(reply[0])
            if self._cursor == "0-0":
                self._next_look = trio.current_time() + self._poll
            claim = None
            if len(reply) > 1:
                claim = await self._claim(as_str(reply[1]), reply[2], reply[3])
            if claim is not None or self._cursor == "0-0":
                return claim

    async def _read_new_at_once(self) -> tuple[str, bytes | None, bytes | None] | None:
        """A new entry, without waiting for one: its id, its run id as the server holds
        it (None when it has none) and what the queue's hash holds about the run (None
        when nothing); None when there is none. One round trip, where
        :meth:`_wait_for_new` takes two (see :meth:`_delivering`)."""
        queue = self.queue
        read = partial(queue.script, READ_NEW, [queue.stream, queue.runs], [GROUP, self.name])
        reply = await self._delivering(read, _read_new)
        return (as_str(reply[0]), reply[1], reply[2]) if reply else None

    async def _wait_for_new(self) -> tuple[str, bytes | None, bytes | None] | None:
        """A new entry, as :meth:`_read_new_at_once` gives it, waiting a poll interval at most
        for one.

        The wait goes on in the server whatever becomes of this task, and may end with
        an entry delivered to this worker: a worker stopped meanwhile waits for it too,
        a poll interval and HAND_BACK_SECONDS at most, and gives back the entry it got
        (see :meth:`_delivering`), as it does when it is stopped while it reads what
        the queue holds about the entry's run.
        """
        queue = self.queue
        read = partial(
            queue.call,
            "XREADGROUP",
            "GROUP",
            GROUP,
            self.name,
            "COUNT",
            1,
            "BLOCK",
            max(1, round(self._poll * 1000)),
            "STREAMS",
            queue.stream,
            ">",
        )
        reply = await self._delivering(read, _first_read, self._poll + HAND_BACK_SECONDS)
        entries = _entries(reply[0][1]) if reply else []
        if not entries:
            return None
        entry_id, run_id = entries[0]
        if run_id is None:
            return entry_id, None, None
        async with self._given_back_if_cancelled(entry_id):
            data = await queue.call("HGET", queue.runs, run_id)
        return entry_id, run_id, data

    async def _delivering(
        self,
        send: Callable[[], Awaitable[Any]],
        delivered: Callable[[Any], str | None],
        limit: float = HAND_BACK_SECONDS,
    ) -> Any:
        """The reply to the round trip ``send()``, which may deliver a stream entry to
        this worker (a new one, or one it takes over): ``delivered(reply)`` is the
        entry's id, None when it delivered none.

        The server carries the command out whatever becomes of this task: so a worker
        stopped meanwhile waits for the reply too (shielded, ``limit`` seconds at most)
        and gives back the entry it got (:meth:`_give_back`) before the cancellation
        goes on. A server that has not answered by then raises StorageError (an outage,
        for a worker that is not stopped; an entry it delivers later is taken over once
        it has been idle for a lease).
        """
        reply = None
        with trio.move_on_after(limit, shield=True) as answered:
            reply = await send()
        if answered.cancelled_caught:
            await trio.lowlevel.checkpoint_if_cancelled()
            raise StorageError(f"{self.queue!r}: no answer from the server within {limit:g} s")
        async with self._given_back_if_cancelled(delivered(reply)):
            await trio.lowlevel.checkpoint_if_cancelled()
        return reply

    @contextlib.asynccontextmanager
    async def _given_back_if_cancelled(self, entry_id: str | None) -> AsyncIterator[None]:
        """Give back the entry ``entry_id`` (None: none), delivered to this worker (see
        :meth:`_give_back`), if the block is cancelled (the worker stopped), before the
        cancellation goes on."""
        try:
            yield
        except trio.Cancelled:
            if entry_id is not None:
                await self._give_back(entry_id)
            raise

    async def _give_back(self, entry_id: str) -> None:
        """Make the entry ``entry_id``, delivered to this stopped worker and not
        claimed, idle for a lease, so that the next worker to look for expired leases
        takes its run at once. Shielded; blocks HAND_BACK_SECONDS at most (beyond, the
        entry is taken over once it has been idle for a lease)."""
        queue = self.queue
        with shielded_briefly():
            await queue.call(
                "XCLAIM", queue.stream, GROUP, self.name, 0, entry_id, "IDLE", queue.lease_ms
            )

    async def _claim(
        self, entry_id: str, raw_run_id: bytes | None, data: bytes | None
    ) -> Claim | None:
        """Claim the run ``raw_run_id`` (as the stream entry ``entry_id`` holds it; None
        when it holds none), of which the queue's hash held ``data`` (None: nothing;
        see :meth:`_claim_readable`). None when it is not claimed: when the hash does
        not hold the run (logged), the run has ended, or what the queue holds for it is
        not what a queue writes (UnreadableEntryError, logged), the stream entry is
        acknowledged, so that no worker claims it again."""
        try:
            run_id = decoded_run_id(self.queue, raw_run_id, f"the stream entry {entry_id}")
            if data is None:
                LOGGER.warning(
                    "worker %s leaves the stream entry %s: %r holds no run %r",
                    self.name,
                    entry_id,
                    self.queue,
                    run_id,
                )
            else:
                info = decoded_info(self.queue, run_id, data)
                if info["state"] not in FINISHED:
                    return await self._claim_readable(entry_id, run_id, data, info)
        except UnreadableEntryError as exc:
            await self._leave(entry_id, exc)
            return None
        await self.queue.call("XACK", self.queue.stream, GROUP, entry_id)
        return None

    async def _leave(self, entry_id: str, error: UnreadableEntryError) -> None:
        """Log ``error``, about what the queue holds for the stream entry ``entry_id``,
        and acknowledge the entry, so that no worker claims it again."""
        LOGGER.warning("worker %s leaves the stream entry %s: %s", self.name, entry_id, error)
        await self.queue.call("XACK", self.queue.stream, GROUP, entry_id)

    async def _claim_readable(
        self, entry_id: str, run_id: str, data: bytes, info: dict[str, Any]
    ) -> Claim | None:
        """Take the lease of ``run_id``, not ended, whose entry in the queue's hash was
        ``data`` (decoded: ``info``), and record it running (see ``scripts.CLAIM``);
        None when another worker holds it or this worker runs it still (its stream
        entry is made due when the lease expires), its entry changed since, or this
        worker lacks its flow (it passes the run over), or its lease key holds another
        Redis type than a string, which no worker can take (it fails the run, see
        :meth:`_fail_unleasable`). Raises UnreadableEntryError when the run's
        passed-over note is not what a queue writes."""
        queue = self.queue
        lease_key = queue.lease_key(run_id)
        if run_id in self._running:
            keys = [lease_key, queue.stream]
            await queue.script(HELD, keys, [GROUP, self.name, entry_id, queue.lease_ms])
            return None
        flow = self.flows.get(info["flow"])
        if flow is None:
            await self._pass_over(entry_id, run_id, data, info)
            return None
        attempts = info.get("attempts", 0) + 1
        running = {**_unmarked(info), "state": "running", "owner": self.name, "attempts": attempts}
        encoded = json.dumps(running)
        expires = trio.current_time() + queue.lease
        taken = await queue.script(
            CLAIM,
            [lease_key, queue.runs, queue.passed, queue.stream],
            [self.name, queue.lease_ms, run_id, data, encoded, GROUP, entry_id],
        )
        if isinstance(taken, list):
            await self._fail_unleasable(entry_id, run_id, data, info, taken[0])
            return None
        if not taken:
            return None
        passed = taken if isinstance(taken, bytes) else None
        params = info.get("params", {})
        resumes = info["state"] == "pending" or info.get(RESUME) is True
        return Claim(entry_id, run_id, flow, params, running, data, passed, expires, resumes)

    async def advertise(self) -> None:
        """Say that this worker serves its flows, for a lease (see ``scripts.ADVERTISE``):
        while one of them is said to be served, a worker that lacks it passes its runs
        over without failing them for ``flow_wait`` (see :meth:`_pass_over`). Blocks
        for one round trip; raises StorageError when the server is out of reach."""
        queue = self.queue
        keys = [queue.flow_key(flow_name) for flow_name in self.flows]
        await queue.script(ADVERTISE, keys, [queue.lease_ms, self.name])

    async def pass_back(self, claim: Claim, refusal: RunRecordedError) -> None:
        """Give back ``claim``, whose run this worker cannot resume (``refusal``: its
        flow does not fit the run's record), untouched, and pass the run over as for a
        flow it lacks (see :meth:`_pass_over`): its entry in the queue's hash and its
        passed-over note put back as they were before the claim, its lease dropped.
        Nothing more when the lease is no longer this worker's; a passed-over note that
        is not what a queue writes leaves the stream entry, as :meth:`_claim` does.
        Blocks while the server answers; raises StorageError when it is out of reach
        (the lease then expires and the run is taken over)."""
        queue = self.queue
        keys = [queue.lease_key(claim.run_id), queue.runs, queue.passed]
        args = [self.name, claim.run_id, json.dumps(claim.info), claim.read, claim.passed or ""]
        if not await queue.script(UNCLAIM, keys, args):
            return
        info = decoded_info(queue, claim.run_id, claim.read)
        try:
            await self._pass_over(claim.entry_id, claim.run_id, claim.read, info, refusal)
        except UnreadableEntryError as exc:
            await self._leave(claim.entry_id, exc)

    async def _pass_over(
        self,
        entry_id: str,
        run_id: str,
        data: bytes,
        info: dict[str, Any],
        refusal: RunRecordedError | None = None,
    ) -> None:
        """Leave ``run_id``, whose flow this worker lacks (or has in a version that does
        not fit its record: ``refusal``), to the other workers: note this worker among
        those that passed it over and give its entry back, idle for a lease, so that
        the next worker to look for expired leases takes it over. Fail the run instead
        (with ``refusal``, if any) once workers have passed it over for ``flow_wait``
        seconds while no live worker served its flow (see :meth:`advertise`; once a
        worker has passed it over for a ``refusal``, whatever the workers serve: those
        that serve the flow may serve a version of it that does not fit either), unless
        it changed since ``data`` (what the queue's hash held about it, decoded as
        ``info``) was read. Leave it alone while a worker holds its lease (its entry is
        due again when the lease expires), and fail it when its lease key holds another
        Redis type than a string (see :meth:`_fail_unleasable`). Blocks while the server
        answers (two round trips at most). Raises UnreadableEntryError when the run's
        passed-over note is not what a queue writes."""
        queue = self.queue
        lease_key = queue.lease_key(run_id)
        served = [queue.flow_key(info["flow"])]
        heeded = "1" if refusal is None else ""
        now = time.time()
        reply = await queue.script(
            PASS_OVER,
            [queue.passed, lease_key, queue.stream, *served],
            [run_id, self.name, now, GROUP, entry_id, queue.lease_ms, heeded],
        )
        if reply is None:
            return
        if isinstance(reply, list):
            await self._fail_unleasable(entry_id, run_id, data, info, reply[0])
            return
        since, by = decoded_passed(queue, run_id, reply)
        # cjson keeps 14 digits of ``since``: this pass's own may read a little later
        # than ``now``, and flow_wait=0 must fail the run at its first pass.
        waited = max(0.0, now - since)
        if waited < queue.flow_wait:
            idle = ["IDLE", queue.lease_ms]
            await queue.call("XCLAIM", queue.stream, GROUP, self.name, 0, entry_id, *idle)
            return
        error = _untaken(queue, info["flow"], refusal, waited, by)
        failed = {**_unmarked(info), "state": "failed", "owner": self.name, "error": error}
        if json.loads(reply).get("refused") is True:
            heeded = ""  # the workers that serve the flow may be those that refused it
        await queue.script(
            FAIL_PASSED,
            [queue.runs, lease_key, queue.stream, *served],
            [run_id, data, json.dumps(failed), GROUP, entry_id, heeded, self.name, queue.lease_ms],
        )

    async def _fail_unleasable(
        self, entry_id: str, run_id: str, data: bytes, info: dict[str, Any], kind: bytes
    ) -> None:
        """Fail ``run_id``, whose lease key holds the Redis type ``kind``: SET NX would
        find it held for ever, so no worker can take the run. Its error names the key
        (logged too); its stream entry is acknowledged. Left alone if its entry changed
        since ``data`` (decoded as ``info``) was read. Once the key is deleted,
        ``requeue`` runs it."""
        queue = self.queue
        error = type_and_message(foreign_lease(queue, run_id, kind))
        LOGGER.warning("worker %s fails run %r: %s", self.name, run_id, error)
        failed = {**_unmarked(info), "state": "failed", "owner": self.name, "error": error}
        await queue.script(
            FAIL_AS_READ,
            [queue.runs, queue.stream],
            [run_id, data, json.dumps(failed), GROUP, entry_id],
        )


def _untaken(
    queue: RunQueue, flow_name: str, refusal: RunRecordedError | None, waited: float, by: list[str]
) -> str:
    """The error of a run of ``flow_name`` that workers ``by`` passed over for
    ``waited`` seconds, past ``queue.flow_wait``: for want of the flow, or for
    ``refusal`` (their version of it does not fit the run's record)."""
    passes = f"passed over by {', '.join(by)}; flow_wait={queue.flow_wait:g} s"
    if refusal is None:
        return f"CosmoFlowError: no worker took flow {flow_name!r} in {waited:.1f} s ({passes})"
    return f"{type_and_message(refusal)}; no worker took it in {waited:.1f} s ({passes})"


def _unmarked(info: dict[str, Any]) -> dict[str, Any]:
    """A run's entry ``info`` without the mark :data:`RESUME`, which the next claim or
    outcome takes away."""
    return {key: value for key, value in info.items() if key != RESUME}


def _read_new(reply: list[Any]) -> str | None:
    """The id of the entry a ``READ_NEW`` reply delivered (None: none)."""
    return as_str(reply[0]) if reply else None


def _taken_over(reply: list[Any]) -> str | None:
    """The id of the entry an ``EXPIRED`` reply took over (None: none)."""
    return as_str(reply[1]) if len(reply) > 1 else None


def _first_read(reply: Any) -> str | None:
    """The id of the first entry an ``XREADGROUP`` reply delivered (None: none)."""
    entries = _entries(reply[0][1]) if reply else []
    return entries[0][0] if entries else None


def _entries(raw: Iterable[Any]) -> list[tuple[str, bytes | None]]:
    """(entry id, run id as the server holds it, None when none) of stream entries as
    redis-py returns them (a deleted entry comes back without fields and is
    skipped)."""
    entries = []
    for entry in raw:
        if not entry or not entry[1]:
            continue
        entry_id, fields = entry
        run_id = fields.get(b"run_id") if isinstance(fields, dict) else None
        entries.append((as_str(entry_id), run_id))
    return entries
