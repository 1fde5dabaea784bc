"""An engine as a worker of a run queue: :func:`serve` claims runs (see
:mod:`~cosmoflow_actors.runtime.queue.claims`), runs each one durably on a store of its
own (:data:`RunStores`), renews the leases of the runs in flight, records their
outcomes, and hands them back when it is stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from cosmoflow_actors.errors import (
    DamagedRecordError,
    RunCancelledError,
    RunConflictError,
    RunRecordedError,
    StorageError,
    StoreValueError,
    UnreadableValueError,
    causes,
    type_and_message,
)
from cosmoflow_actors.flow import Flow, FlowResult
from cosmoflow_actors.runtime import run_record
from cosmoflow_actors.runtime.cancellation import cancelled_when
from cosmoflow_actors.runtime.queue.claims import (
    LOGGER,
    RESUME,
    Claim,
    Claimer,
    shielded_briefly,
)
from cosmoflow_actors.runtime.queue.client import GROUP, RunQueue, as_queue
from cosmoflow_actors.runtime.queue.scripts import FINISH, HAND_BACK, RELEASE, RENEW
from cosmoflow_actors.runtime.ray_executor import RayDisconnectedError
from cosmoflow_actors.storage.base import Storage, value_or
from cosmoflow_actors.storage.redis import RedisStorage, redacted, require_url
from cosmoflow_actors.tracing import describe_error
from cosmoflow_actors.validation import require_positive

if TYPE_CHECKING:
    from cosmoflow_actors.runtime.engine import Engine

RunStores = Callable[[str], Storage]
"""A function giving the store of the run whose id it is given."""
Settled = dict[str, Any] | RunRecordedError
"""How a claimed run ended, for the queue: what to record (its state, error, result),
or why its record does not fit the worker's flow (it is passed over)."""
Outcome = Settled | None
"""How a claimed run ended, for the queue (see :data:`Settled`), or None (dropped)."""
PER_RUN_URL: Final = "redis://HOST[:PORT][/DB][#PREFIX]"
"""The form of the URL of :func:`per_run_redis`."""
NOT_SENT = "no renewal was sent in time"
"""Why a lease expired when its last renewal did not fail: the worker did not send the
next one before it expired (its trio thread was held up)."""


@dataclass(frozen=True, slots=True)
class PerRunRedis:
    """The stores of a Redis server, one per run: run R's is the namespace
    ``PREFIX/R``, so runs neither share keys nor make each other's commits start over.
    Made by :func:`per_run_redis`; calling it makes run R's store (connecting to
    nothing)."""

    url: str = dataclasses.field(repr=False)
    """The server's URL (a password included, so left out of the repr)."""
    prefix: str

    def __call__(self, run_id: str) -> RedisStorage:
        return RedisStorage(self.url, namespace=f"{self.prefix}/{run_id}")


def per_run_redis(text: str) -> PerRunRedis:
    """The stores ``redis://HOST:PORT[/DB][#PREFIX]`` names, PREFIX ``runs`` by default.
    ValueError naming ``text`` (its password masked as ``***``) when it is not a redis:// or
    rediss:// URL, or one whose port or database is not a number."""
    url, _, prefix = text.partition("#")
    if not url.startswith(("redis://", "rediss://")):
        raise ValueError(f"store {redacted(text)!r}: expected {PER_RUN_URL}")
    require_url(url, "store", PER_RUN_URL)
    return PerRunRedis(url, prefix or "runs")


async def serve(
    engine: Engine,
    queue: RunQueue | str,
    flows: Mapping[str, Flow] | Iterable[Flow],
    store: str | RunStores,
    *,
    concurrency: int = 1,
    name: str | None = None,
    set_up: Callable[[Flow], Awaitable[None]],
    closed: trio.Event,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the runs of ``queue`` on ``engine``, at most ``concurrency`` at once, until
    cancelled or until ``closed`` (the engine's) is set (see :meth:`Engine.serve`).
    Before it reads the queue, ``set_up`` each flow's executors (blocks while Ray or
    the worker processes start): a worker that cannot reach its Ray cluster raises
    that, instead of failing each run it claims. Then it says which flows it serves
    (see :meth:`Claimer.advertise`) and reports the worker's name to ``task_status``.

    Once ``closed`` is set it stops claiming, hands back the runs it holds as a stopped
    worker does (a run the engine's close ended included, recording no outcome for it)
    and returns, after HAND_BACK_SECONDS at most; it returns only then."""
    require_positive("concurrency", concurrency)
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"a worker's name must be a non-empty str, not {name!r}")
    served = _flows_by_name(flows)
    worker = _Worker(
        engine,
        as_queue(queue),
        served,
        per_run_redis(store) if isinstance(store, str) else store,
        name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}",
        closed,
    )
    await worker.queue.ensure_group()
    for flow in served.values():
        await set_up(flow)
    await worker.claimer.advertise()
    slots = trio.Semaphore(concurrency)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled_when, closed.wait, nursery.cancel_scope)
        nursery.start_soon(worker.renew_leases)
        nursery.start_soon(worker.keep_advertising)
        task_status.started(worker.name)
        while True:
            await slots.acquire()
            try:
                claim = await worker.claimer.next_claim()
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(worker.run_claimed, claim, slots)


class _EngineClosed(Exception):
    """The engine closed under a claimed run: the worker hands the run back, recording
    no outcome, and stops (see :func:`serve`)."""


@dataclass(slots=True)
class _Lease:
    """A lease its worker holds on a run it runs: the run's scope, cancelled once the
    lease is lost, when (trio time) the lease expires unless renewed, and whether the
    run has ended and its outcome is being recorded (which drops the lease on the
    server: a renewal that finds it gone then gives nothing up)."""

    scope: trio.CancelScope
    expires: float
    settling: bool = False


class _Worker:
    """One engine serving a queue: its :class:`Claimer` claims runs; it runs them and
    renews their leases."""

    def __init__(
        self,
        engine: Engine,
        queue: RunQueue,
        flows: dict[str, Flow],
        stores: RunStores,
        name: str,
        closed: trio.Event | None = None,
    ) -> None:
        self.engine = engine
        self.queue = queue
        self.stores = stores
        self.name = name
        self.closed = trio.Event() if closed is None else closed
        """Set once the engine closes (None: never): a run that ends then is handed
        back."""
        self._leases: dict[str, _Lease] = {}
        """The leases of the runs this worker runs now, by run id."""
        self._renewal_failure = NOT_SENT
        """Why the last renewal failed (NOT_SENT when it did not): what a run given up
        for an expired lease logs."""
        self.claimer = Claimer(queue, flows, name, self._leases)

    async def run_claimed(self, claim: Claim, slots: trio.Semaphore) -> None:
        """Run (or resume) the claimed run while :meth:`renew_leases` renews its lease;
        record its outcome unless the lease was lost or another engine committed first.
        Blocks until the run ends. A worker stopped meanwhile (this task cancelled)
        cancels the run and hands it back to the queue (see :meth:`_hand_back`: at most
        HAND_BACK_SECONDS more) before the cancellation goes on; so does a run that the
        engine's close ended, without raising. Frees a slot."""
        lease = _Lease(trio.CancelScope(), claim.expires)
        self._leases[claim.run_id] = lease
        try:
            outcome = await self._outcome(claim, lease.scope)
            # The outcome is known: record it, even if the worker is stopped now, for
            # HAND_BACK_SECONDS at most.
            lease.settling = True
            with shielded_briefly():
                await self._settle(claim, outcome)
        except _EngineClosed:
            await self._hand_back(claim)
        except BaseException:
            await self._hand_back(claim)
            raise
        finally:
            del self._leases[claim.run_id]
            slots.release()

    async def _settle(self, claim: Claim, outcome: Outcome) -> None:
        """Record ``outcome`` and acknowledge the entry, or only drop the lease for a
        dropped run (None), or pass a run whose record its flow does not fit over to
        the other workers (see :meth:`Claimer.pass_back`). Blocks while the server
        answers (run_claimed bounds it by HAND_BACK_SECONDS); raises StorageError when
        it is out of reach (run_claimed lets it go: the lease expires instead and
        another worker takes the run over; its record says how far it got)."""
        if outcome is None:
            queue = self.queue
            keys = [queue.lease_key(claim.run_id), queue.runs]
            await queue.script(RELEASE, keys, [self.name, claim.run_id, *_left(claim)])
        elif isinstance(outcome, RunRecordedError):
            await self.claimer.pass_back(claim, outcome)
        else:
            await self._finish(claim.entry_id, claim.run_id, {**claim.info, **outcome})

    async def _hand_back(self, claim: Claim) -> None:
        """Give the run of a stopped worker back to the queue: drop its lease, make
        its entry idle for a lease and mark it to be resumed (see ``scripts.HAND_BACK``),
        so that the next worker to look for expired leases takes it over at once and
        resumes it after its last committed step, even if its record says it failed.
        Shielded from cancellation; blocks at most HAND_BACK_SECONDS. A server out of
        reach or too slow leaves the lease to expire by itself."""
        queue = self.queue
        keys = [queue.lease_key(claim.run_id), queue.stream, queue.runs]
        args = [self.name, GROUP, claim.entry_id, queue.lease_ms, claim.run_id, *_left(claim)]
        with shielded_briefly():
            await queue.script(HAND_BACK, keys, args)

    async def _outcome(self, claim: Claim, scope: trio.CancelScope) -> Outcome:
        """The run's outcome as the queue records it; None when it was dropped: its
        lease was lost (logged by :meth:`_give_up`), another engine committed a step of
        it first (logged), or its store was out of reach (see :func:`_out_of_reach`: when
        the worker opened it, or when a step called it or committed; logged): the run is
        taken over once its entry has been idle for a lease. A node's own error (another
        StorageError included) fails the run, and so does data at fault (see
        :data:`DATA_FAULTS`: nothing is run when a worker meets it reading the run back,
        and the key at fault is left as it was). The RunRecordedError of a record the
        worker's flow does not fit (see :meth:`_own_record`), with nothing run. The
        outcome its record holds for a run taken over that ended there (see
        :meth:`_own_record`), with nothing run.

        Raises the error of a run that failed because this process lost its connection
        to Ray (see :func:`_ray_lost`): the worker cannot run a "ray" node any more, so
        it stops, and the run is handed back (see :meth:`run_claimed`). Raises
        _EngineClosed for a run that the engine's close ended or refused (see
        :data:`CLOSE_ERRORS`): the worker stops, and the run is handed back."""
        with scope:
            try:
                storage = self.stores(claim.run_id)
                settled = await self._owned(storage, claim)
                if settled is not None:
                    return settled
                done = await self.engine.resume(
                    claim.flow, storage, run_id=claim.run_id, params=claim.params
                )
            except Exception as exc:
                if self.closed.is_set() and isinstance(exc, CLOSE_ERRORS):
                    raise _EngineClosed from exc
                if _conflict(exc):
                    self._dropped(claim.run_id, "its record has moved on", exc)
                    return None
                if _out_of_reach(exc):
                    self._dropped(claim.run_id, "its store is out of reach", exc)
                    return None
                if _ray_lost(exc):
                    raise
                return {"state": "failed", "error": describe_error(exc)}
            return {"state": "succeeded", "error": None, "result": _result_info(done)}
        return None

    def _dropped(self, run_id: str, why: str, error: Exception) -> None:
        """Log to :data:`LOGGER` that the run ``run_id`` is dropped, to be taken over
        after a lease: ``why`` says why in words, ``error`` in full. Never blocks."""
        LOGGER.warning(
            "worker %s drops run %r, to be taken over after a lease: %s (%s)",
            self.name,
            run_id,
            why,
            describe_error(error),
        )

    async def _owned(self, storage: Storage, claim: Claim) -> Settled | None:
        """:meth:`_own_record`, closing ``storage`` unless the run goes on with it: when
        that settles the run or raises (the close shielded, as :func:`shielded_briefly`
        bounds it). Blocks while the store opens, is read, commits and closes."""
        try:
            settled = await self._own_record(storage, claim)
        except BaseException:
            with shielded_briefly():
                await storage.aclose()
            raise
        if settled is not None:
            await storage.aclose()
        return settled

    async def _own_record(self, storage: Storage, claim: Claim) -> Settled | None:
        """Name this worker and its queue in the run's record (written first if the run
        has none yet), so that the store tells who runs it; None then. Unless the claim
        takes over a run whose record says it failed (see :attr:`Claim.resumes`): then
        return that failure, for the queue to record, nothing written. Unless the record
        is of a run in flight or failed, to be resumed, that the claim's flow does not
        fit (a version of it changed since the run was recorded, see
        ``run_record.require_fit``): then return why, the record left as it was. Blocks
        while ``storage`` opens, is read and commits; raises StorageError when it
        cannot, DamagedRecordError (nothing written) for a place of the record that the
        engine never writes, RunConflictError (nothing written) when another engine
        committed a step of the run while its record and its places were read (see
        ``run_record.parts_read``)."""
        owner = {"worker": self.name, "queue": self.queue.address}

        def named(stored: Any) -> Any:
            return run_record.owned(stored, claim.run_id, claim.flow.name, claim.params, owner)

        await storage.open()
        key = run_record.record_key(claim.run_id)
        stored = await value_or(storage, key, None)
        if not claim.resumes and _failed(claim.run_id, stored):
            return _recorded_failure(stored)
        if _resumable(claim.run_id, stored):
            read = await storage.get_many([*run_record.place_keys(stored), key])
            places = run_record.parts_read(stored, read)
            try:
                run_record.require_fit(claim.flow, claim.run_id, stored, places)
            except RunRecordedError as exc:
                return exc
        await storage.update(key, named, None)
        await storage.commit()
        return None

    async def keep_advertising(self) -> None:
        """Every third of a lease, say again that this worker serves its flows (see
        :meth:`Claimer.advertise`); a server out of reach is left to the next time.
        Blocks until cancelled."""
        while True:
            await trio.sleep(self.queue.third_of_lease)
            with contextlib.suppress(StorageError):
                await self.claimer.advertise()

    async def renew_leases(self) -> None:
        """Every third of a lease, renew the leases of all the runs this worker runs in
        one round trip (see :meth:`_renew`). Blocks until cancelled."""
        while True:
            await trio.sleep(self.queue.third_of_lease)
            if self._leases:
                await self._renew(dict(self._leases))

    async def _renew(self, leases: dict[str, _Lease]) -> None:
        """Renew ``leases`` (by run id) in one round trip; give up the run of each one
        that is lost, unless the run ended meanwhile (its recorded outcome dropped the
        lease), or expired before the round trip was sent (see :meth:`_give_up`).
        When the server is out of reach or does not answer before the first of them
        expires, none is renewed, and the runs of those that have expired by then are
        given up. Blocks while the server answers, until the first of them expires at
        most."""
        queue = self.queue
        sent = trio.current_time()
        live = self._unexpired(leases, sent)
        if not live:
            return
        first = min(lease.expires for lease in live.values())
        keys = [queue.lease_key(run_id) for run_id in live]
        try:
            with trio.fail_after(first - sent):
                held = await queue.script(RENEW, keys, [self.name, queue.lease_ms])
        except StorageError as exc:
            self._renewal_failure = f"the last renewal failed: {exc}"
            self._unexpired(live, trio.current_time())
            return
        except trio.TooSlowError:
            self._renewal_failure = f"{queue!r} did not answer the last renewal in time"
            self._unexpired(live, trio.current_time())
            return
        self._renewal_failure = NOT_SENT
        for (run_id, lease), renewed in zip(live.items(), held, strict=True):
            if renewed:
                # The server renewed it after ``sent``: it expires no sooner than this.
                lease.expires = sent + queue.lease
            elif not lease.settling:
                self._give_up(run_id, lease, f"{queue!r} no longer holds its lease for it")

    def _unexpired(self, leases: dict[str, _Lease], now: float) -> dict[str, _Lease]:
        """The leases of ``leases`` that have not expired at ``now``, leaving out those
        whose runs were given up already; give up the runs of the others, unless the
        run ended and its outcome is being recorded. Never blocks."""
        live = {}
        for run_id, lease in leases.items():
            if lease.scope.cancel_called:
                continue
            if lease.expires > now:
                live[run_id] = lease
            elif not lease.settling:
                why = f"its lease expired unrenewed ({self._renewal_failure})"
                self._give_up(run_id, lease, why)
        return live

    def _give_up(self, run_id: str, lease: _Lease, why: str) -> None:
        """Cancel the run ``run_id``, whose ``lease`` this worker has lost (``why`` says
        how), and log it to :data:`LOGGER`: another worker takes the run over and
        resumes it after its last committed step. Never blocks."""
        lease.scope.cancel()
        LOGGER.warning("worker %s gives up run %r, to be taken over: %s", self.name, run_id, why)

    async def _finish(self, entry_id: str, run_id: str, info: dict[str, Any]) -> None:
        """Record ``info``, acknowledge the entry and drop the lease, if it is ours."""
        queue = self.queue
        await queue.script(
            FINISH,
            [queue.lease_key(run_id), queue.runs, queue.stream],
            [self.name, run_id, _entry_json(info), GROUP, entry_id],
        )


def _entry_json(info: dict[str, Any]) -> str:
    """The run's entry ``info`` as JSON, what JSON has no type for as its ``repr``; a
    result that JSON cannot hold at all (a dict with a tuple key, a value that holds
    itself, a ``__repr__`` that raises) as the repr of the whole result, or
    ``<cannot be shown: ...>``: one run's result must not stop the worker."""
    try:
        return json.dumps(info, default=repr)
    except Exception:  # what the result holds, the only part of info that may fail
        result = info["result"]
        return json.dumps({**info, "result": {**result, "value": _shown(result["value"])}})


def _shown(value: Any) -> str:
    """``repr(value)``, or ``<cannot be shown: ...>`` saying why when that raises."""
    try:
        return repr(value)
    except Exception as exc:
        return f"<cannot be shown: {type_and_message(exc)}>"


def _resumable(run_id: str, stored: Any) -> bool:
    """Whether ``stored`` is a record of the run ``run_id`` in flight or failed, as
    the engine writes them (a resume puts the run back where it records)."""
    ok = stored is not None and run_record.record_problem(run_id, stored) is None
    return ok and stored["state"] != "succeeded"


def _failed(run_id: str, stored: Any) -> bool:
    """Whether ``stored`` is a record of the run ``run_id`` that failed, as the engine
    writes them."""
    ok = stored is not None and run_record.record_problem(run_id, stored) is None
    return ok and stored["state"] == "failed"


def _recorded_failure(stored: dict[str, Any]) -> dict[str, Any]:
    """What the queue records for a run taken over whose record ``stored`` says it
    failed: its error, and the worker the record names (which ran it)."""
    failure = {"state": "failed", "error": stored["error"]}
    if "owner" in stored:
        failure["owner"] = stored["owner"]["worker"]
    return failure


def _left(claim: Claim) -> list[str]:
    """The run's entry in the queue's hash as ``claim`` wrote it, and that entry marked
    to be resumed by the next claim (see ``claims.RESUME``), as JSON: what a worker that
    leaves the run without an outcome puts in its place."""
    return [json.dumps(claim.info), json.dumps({**claim.info, RESUME: True})]


CLOSE_ERRORS: Final = (RunCancelledError, RuntimeError)
"""What ``engine.resume`` raises once its engine has closed: the close cancelled the run,
or refused to start it. (A node's own error comes wrapped in NodeError.)"""
DATA_FAULTS: Final = (StoreValueError, DamagedRecordError, UnreadableValueError)
"""The StorageErrors about the data, not the store: a value the store cannot encode, a
run's record or part that the engine refuses to read back, a stored value the codec
cannot read. Retrying cannot help: a run that meets one fails."""


def _out_of_reach(error: BaseException) -> bool:
    """Whether ``error`` says the run's store could not be reached: a StorageError the
    worker's own calls to the store raised that is not about the data (see
    :data:`DATA_FAULTS`), or a StorageError caused by a failed connection anywhere in
    the chain of causes (a step's store call, wrapped in NodeError)."""
    if isinstance(error, StorageError) and not isinstance(error, DATA_FAULTS):
        return True
    return any(
        isinstance(each, StorageError) and _connection_failed(each.__cause__)
        for each in causes(error)
    )


def _connection_failed(error: BaseException | None) -> bool:
    """Whether ``error`` is redis-py's: the server could not be reached or did not
    answer in time (it was loading its data, restarting or away)."""
    from redis.exceptions import ConnectionError, TimeoutError

    return isinstance(error, ConnectionError | TimeoutError)


def _ray_lost(error: BaseException) -> bool:
    """Whether ``error`` was caused by this process having lost its connection to Ray
    (a step's attempt on Ray, wrapped in NodeError)."""
    return any(isinstance(each, RayDisconnectedError) for each in causes(error))


def _conflict(error: BaseException) -> bool:
    """Whether ``error`` is, or was caused by, a RunConflictError."""
    return any(isinstance(each, RunConflictError) for each in causes(error))


def _result_info(done: FlowResult) -> dict[str, Any]:
    return {
        "value": done.result,
        "final_action": done.final_action.name,
        "path": list(done.execution_path),
        "duration": done.duration,
    }


def _flows_by_name(flows: Mapping[str, Flow] | Iterable[Flow]) -> dict[str, Flow]:
    """``flows`` as a mapping name -> Flow (a list is keyed by each flow's name; two
    flows of one name in it are a ValueError: a run names its flow by name)."""
    named = dict(flows) if isinstance(flows, Mapping) else _keyed_by_name(flows)
    for key, flow in named.items():
        if not isinstance(flow, Flow):
            raise TypeError(f"flow {key!r}: expected a built Flow, got {type(flow).__name__}")
    if not named:
        raise ValueError("a worker needs at least one flow")
    return named


def _keyed_by_name(flows: Iterable[Flow]) -> dict[str, Flow]:
    """``flows`` keyed by name; ValueError when two of them share one."""
    named: dict[str, Flow] = {}
    for flow in flows:
        if not isinstance(flow, Flow):
            raise TypeError(f"expected a built Flow, got {type(flow).__name__}")
        if flow.name in named and named[flow.name] is not flow:
            raise ValueError(f"two flows are named {flow.name!r}: a run names its flow by name")
        named[flow.name] = flow
    return named
