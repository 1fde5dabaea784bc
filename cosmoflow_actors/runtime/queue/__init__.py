"""Runs across engine processes: a run queue on Redis, served by workers with leases.

A :class:`RunQueue` is a Redis stream with one consumer group (``workers``) and a hash
of what is known about each submitted run. :func:`submit` adds a run to both;
:func:`serve` (``engine.serve``) makes an engine a worker: it claims runs from the
stream and runs each one durably (its ``run_id`` on a store of the run's own), so every
step commits with the run's record.

A worker holds a lease on each run it runs: a key ``...:lease:<run_id>`` naming the
worker, set with ``SET NX PX`` (so two workers never hold it at once) and renewed every
``lease / 3`` seconds while the run is alive. A worker that dies or is cut off stops
renewing; once the lease has expired, another worker takes the run's stream entry over
(``XAUTOCLAIM`` of entries idle for at least the lease) and resumes the run from its last
committed step; a run whose record says it ended gives the queue that outcome instead
(a failed run stays failed). A worker that lost its lease cancels the run, and one
whose commit lost to another engine (RunConflictError) drops it: neither reports an
outcome. A worker that is stopped (its ``serve`` cancelled, or its engine closed)
cancels its runs and hands each one back: it drops the lease and makes the stream
entry idle for a lease, so the next worker that looks for expired leases takes the run
over at once. A run handed back or dropped so is marked ``"resume"`` in its entry, as
is a requeued run: the next claim resumes it even when its record says it failed.

A worker that lacks a run's flow, or has it in a version that does not fit the run's
record (see ``run_record.require_fit``: it gives back its claim untouched), leaves the
run to the others: it notes itself among the workers that passed the run over and
gives the stream entry back, idle enough for any worker to take over at once. Once
workers have passed a run over for ``flow_wait`` seconds with none taking it, and no
live worker says it serves the flow (a busy one may), the next one to pass it over
fails it.

Redis keys of the queue ``NAME``: ``cosmoflow:queue:NAME:stream`` (the stream),
``cosmoflow:queue:NAME:runs`` (a hash, run id -> JSON),
``cosmoflow:queue:NAME:lease:<run_id>`` (the leases) and
``cosmoflow:queue:NAME:passed`` (a hash, run id -> JSON: since when workers lacking
its flow, or a version of it that fits its record, pass the run over, and which) and
``cosmoflow:queue:NAME:flow:<flow>`` (a worker that serves the flow, renewed with its
leases, expiring a lease after the last one stops). Nothing of these is ever deleted
but the leases and the flow keys: the entries of finished runs stay in
the hash and the stream (acknowledged), every worker name stays a consumer of the
group, and the runs' stores keep their data.

The modules: :mod:`~cosmoflow_actors.runtime.queue.scripts` (the Lua scripts),
:mod:`~cosmoflow_actors.runtime.queue.client` (:class:`RunQueue`, :func:`submit`,
:func:`requeue`, :func:`result`), :mod:`~cosmoflow_actors.runtime.queue.entries` (how
what the queue holds reads back, checked), :mod:`~cosmoflow_actors.runtime.queue.status`
(:func:`queue_status`, :func:`leases_checked`),
:mod:`~cosmoflow_actors.runtime.queue.claims` (how a worker claims runs) and
:mod:`~cosmoflow_actors.runtime.queue.worker` (:func:`serve`: running the claimed runs,
their leases). This package gives the names the rest of cosmoflow_actors uses.
"""

from cosmoflow_actors.runtime.queue.claims import HAND_BACK_SECONDS
from cosmoflow_actors.runtime.queue.client import (
    DEFAULT_FLOW_WAIT,
    DEFAULT_LEASE,
    FINISHED,
    MAX_LEASE,
    QueuedResult,
    RunQueue,
    requeue,
    result,
    submit,
)
from cosmoflow_actors.runtime.queue.entries import MAX_DEPTH, UnreadableEntryError
from cosmoflow_actors.runtime.queue.status import QueuedRun, leases_checked, queue_status
from cosmoflow_actors.runtime.queue.worker import PerRunRedis, RunStores, per_run_redis, serve

__all__ = [
    "DEFAULT_FLOW_WAIT",
    "DEFAULT_LEASE",
    "FINISHED",
    "HAND_BACK_SECONDS",
    "MAX_DEPTH",
    "MAX_LEASE",
    "PerRunRedis",
    "QueuedResult",
    "QueuedRun",
    "RunQueue",
    "RunStores",
    "UnreadableEntryError",
    "leases_checked",
    "per_run_redis",
    "queue_status",
    "requeue",
    "result",
    "serve",
    "submit",
]
