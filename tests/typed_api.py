"""What a user's type checker sees of the API: checked by ``mypy --strict`` in CI
(`.ci/run`), never run. Each ``assert_type`` is a promise of the types; each
``type: ignore`` marks a mistake the types must catch (an unused one fails the check)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, assert_type

import cosmoflow_actors as cf


@dataclass
class Point:
    x: int
    y: int


def increment(value: int) -> int:
    return value + 1


class Typed(cf.Node):
    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> str:
        assert_type(await store.get("any"), Any)
        assert_type(await store.get("count", type=int), int)
        assert_type(await store.get("count", None, type=int), int | None)
        assert_type(await store.get("point", type=Point), Point)
        assert_type(await store.get("pair", (0, 0), type=tuple[int, int]), tuple[int, int])
        # Typing forms that are not classes are accepted; their values are typed Any.
        assert_type(await store.get("maybe", type=int | None), Any)
        assert_type(await store.get("maybe", None, type=Optional[int]), Any)  # noqa: UP045
        assert_type(await store.get("mode", type=Literal["x", "y"]), Any)
        assert_type(await store.update("count", increment, default=0), int)
        assert_type(await store.get_many(["a", "b"]), dict[str, Any])
        return await store.get("name", type=str)

    # The engine passes the phases' arguments by position: any names will do.
    def exec(self, name: str, ctx: cf.ExecutionContext) -> str:
        return name.upper()


class Misconfigured(cf.Node):
    executor = "threads"  # type: ignore[assignment]


@cf.node
async def greet(ctx: cf.ExecutionContext) -> str:
    return "greeted"


@cf.node(max_retries=2)
def finish(ctx: cf.ExecutionContext) -> cf.Action:
    return cf.Action.complete()


async def call_the_functions(ctx: cf.ExecutionContext) -> None:
    assert_type(await greet.function(ctx), str)
    assert_type(finish.function(ctx), cf.Action)


@cf.node  # type: ignore[type-var]
def counts(ctx: cf.ExecutionContext) -> int:
    return 1


adult = cf.ActionCondition.compare("age", ">=", 18)
misspelt = cf.ActionCondition.compare("age", "=>", 18)  # type: ignore[arg-type]


async def read_the_states(engine: cf.Engine, storage: cf.Storage) -> None:
    for record in await engine.list_runs(storage):
        assert record.state != "finished"  # type: ignore[comparison-overlap]
    for actor in engine.statistics().actors:
        assert actor.kind != "worker"  # type: ignore[comparison-overlap]
    error = cf.NodeError("a", "exec", "r1", 1)
    assert error.phase != "run"  # type: ignore[comparison-overlap]


def open_the_storages(path: str) -> None:
    cf.SQLiteStorage(path, codec="pickle")
    cf.FileStorage(path, codec="jsn")  # type: ignore[arg-type]
