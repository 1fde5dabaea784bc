"""What ``Engine.statistics()`` reports: the run counters and every actor's counters."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.runtime import statistics
from cosmoflow_actors.runtime.statistics import FlowLabels
from tests.support import Gate, Recorder, a_then_b, single


async def test_statistics_cover_every_actor() -> None:
    flow = a_then_b("stats")
    store = cf.MemoryStorage()
    async with cf.open_engine() as engine:
        await engine.run(flow, store)
        stats = engine.statistics()
    assert {(a.kind, a.name) for a in stats.actors if a.kind != "store"} == {
        ("router", "router"),
        ("node", "stats/a"),
        ("node", "stats/b"),
    }
    assert stats.actor("stats/a").messages_processed == 1
    assert stats.actor("router").messages_processed == 2
    assert (stats.runs_started, stats.runs_succeeded, stats.runs_in_flight) == (1, 1, 0)


@pytest.mark.parametrize("kind", ["memory", "file", "durable"])
async def test_statistics_count_every_message_handled_directly_or_queued(
    kind: str, tmp_path: Path
) -> None:
    """Three runs of a -> b (one store update per step): each node counts three steps
    and the router six outcomes, whether handled in the sender's task or queued (a
    durable run's); the store actor counts each request, handled in the sender's task
    (memory) or by its own (a file)."""
    flow = a_then_b("counted")
    storage = cf.MemoryStorage() if kind == "memory" else cf.FileStorage(tmp_path / "s.json")
    ids = iter(["r1", "r2", "r3"] if kind == "durable" else [None] * 3)
    gate = Gate()
    async with cf.open_engine() as engine:
        holder = await engine.start_run(single(gate, "holder"), storage)  # keeps the store
        for _ in range(2):
            await engine.run(flow, storage, run_id=next(ids))  # carried by the caller
        await (await engine.start_run(flow, storage, run_id=next(ids))).wait()  # by workers
        stats = engine.statistics()
        gate.open.set()
        await holder.wait()
    assert stats.actor("counted/a").messages_processed == 3
    assert stats.actor("counted/b").messages_processed == 3
    assert stats.actor("router").messages_processed == 6
    store = next(actor for actor in stats.actors if actor.kind == "store")
    # A durable run's step reads "seen" and commits; its record is read, written at the
    # start and written at the end.
    assert store.messages_processed == (7 * 3 if kind == "durable" else 6)
    assert stats.runs_succeeded == 3


async def test_an_actor_is_found_by_name_and_an_unknown_name_is_refused() -> None:
    flow = single(Recorder())
    async with cf.open_engine() as engine:
        await engine.run(flow, {})
        stats = engine.statistics()
    assert (stats.actor("single/only").kind, stats.actor("router").kind) == ("node", "router")
    with pytest.raises(KeyError, match="single/elsewhere"):
        stats.actor("single/elsewhere")


async def test_flows_of_the_same_name_alive_at_once_have_actors_of_their_own_names() -> None:
    """Two Flow objects called "answer" (two tenants, a flow built per request): the
    second's actors are "answer#2/...", each counting its own steps; a flow whose name
    is taken by a label gets the next number; once the first flow is garbage, a new one
    takes its name again, its actors counting their own steps. Another engine labels
    its flows on its own."""
    first, second, literal = a_then_b("answer"), a_then_b("answer"), a_then_b("answer#2")
    elsewhere = a_then_b("answer")
    async with cf.open_engine() as engine, cf.open_engine() as other:
        await engine.run(first)
        for _ in range(2):
            await engine.run(second)
        await engine.run(literal)
        await other.run(elsewhere)
        stats = engine.statistics()
        del first
        gc.collect()
        fresh = a_then_b("answer")
        for _ in range(3):
            await engine.run(fresh)
        later = engine.statistics()
        other_stats = other.statistics()
    assert node_counts(stats) == {
        "answer/a": 1,
        "answer/b": 1,
        "answer#2/a": 2,
        "answer#2/b": 2,
        "answer#2#2/a": 1,
        "answer#2#2/b": 1,
    }
    assert node_counts(later) == {**node_counts(stats), "answer/a": 3, "answer/b": 3}
    assert node_counts(other_stats) == {"answer/a": 1, "answer/b": 1}


def node_counts(stats: cf.EngineStatistics) -> dict[str, int]:
    """The steps each node actor counted, by actor name."""
    return {a.name: a.messages_processed for a in stats.actors if a.kind == "node"}


def test_many_live_flows_of_one_name_get_distinct_labels_and_a_freed_name_is_taken_again() -> None:
    labels = FlowLabels()
    flows = [a_then_b("req") for _ in range(500)]
    given = [labels.label(flow) for flow in flows]
    assert len(set(given)) == 500
    assert given[0] == "req"
    assert [labels.label(flow) for flow in flows] == given
    del flows[0]
    gc.collect()
    assert labels.label(a_then_b("req")) == "req"


def test_a_dropped_label_is_free_while_its_flow_lives() -> None:
    labels = FlowLabels()
    refused, kept = a_then_b("x"), a_then_b("x")
    assert labels.label(refused) == "x"
    labels.drop(refused)
    assert labels.label(kept) == "x"
    assert labels.label(refused) == "x#2"


def test_labels_keep_nothing_of_names_whose_flows_are_gone() -> None:
    """Flows built per request, each request a name of its own and two flows of it
    alive at once (the second is numbered): once they are garbage, the labels hold
    about as much after 2N such names as after N."""
    labels = FlowLabels()
    node = Recorder()
    where = [tracemalloc.Filter(True, statistics.__file__)]

    def label_pairs(first: int, count: int) -> int:
        """Label two flows of each of ``count`` new names and drop them; return the
        memory that the labels' code allocated and still holds."""
        for number in range(first, first + count):
            name = f"request-{number}"
            pair = [cf.Flow.builder(name).add_node("a", node).build() for _ in range(2)]
            for flow in pair:
                labels.label(flow)
        gc.collect()
        held = tracemalloc.take_snapshot().filter_traces(where).statistics("filename")
        return sum(stat.size for stat in held)

    tracemalloc.start()
    try:
        after_n = label_pairs(0, 400)
        after_2n = label_pairs(400, 400)
    finally:
        tracemalloc.stop()
    # Each name kept would hold about 32 bytes here; what the labels hold between two
    # clean-ups is bounded whatever N.
    assert after_2n - after_n < 400 * 16
    assert labels.label(cf.Flow.builder("request-0").add_node("a", node).build()) == "request-0"
