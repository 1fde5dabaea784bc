"""Decision, error and converge routes, run concurrently on a custom Storage.

CosmoFlow's async-workflows example, for orders: `receive` fans out to two checks that
run at the same time; they converge at the join `decide`, which takes the success
route (`ship`) or the error route (`refund`); both paths converge again at `final`.
A payment gateway that keeps failing is retried, then its fallback turns the failure
into a decision instead of a crash.

Each order runs on its own `AuditedStorage`, a custom `cf.Storage` that stages writes
and records each one when the store actor commits it. The three orders run at once in
one engine.

Run it: python examples/async_workflows.py
"""

from __future__ import annotations

from typing import Any, Final

import trio

import cosmoflow_actors as cf

_DELETED: Final = object()


class AuditedStorage(cf.Storage):
    """A dict backend with staged writes and an audit trail of committed keys.

    The store actor calls one method at a time, so no locking is needed; it calls
    `commit()` once per batch of writes, before it answers any of them.
    """

    def __init__(self, name: str, initial: dict[str, Any] | None = None) -> None:
        self.name = name
        self._committed: dict[str, Any] = dict(initial or {})
        self._staged: dict[str, Any] = {}  # key -> value, or _DELETED
        self.audit: list[str] = []  # keys, in the order their writes were committed
        self.commits = 0

    async def get(self, key: str) -> Any:
        value = self._staged.get(key, self._committed.get(key, _DELETED))
        if value is _DELETED:
            raise KeyError(key)
        return value

    async def set(self, key: str, value: Any) -> None:
        self._staged.pop(key, None)  # keep the staged keys in write order
        self._staged[key] = value

    async def delete(self, key: str) -> bool:
        existed = await self.contains(key)
        self._staged[key] = _DELETED
        return existed

    async def keys(self) -> list[str]:
        merged = {**self._committed, **self._staged}
        return [key for key, value in merged.items() if value is not _DELETED]

    async def commit(self) -> None:
        for key, value in self._staged.items():
            if value is _DELETED:
                self._committed.pop(key, None)
            else:
                self._committed[key] = value
            self.audit.append(key)
        self._staged.clear()
        self.commits += 1

    def __repr__(self) -> str:
        return f"AuditedStorage({self.name!r})"


@cf.node
async def receive(ctx: cf.ExecutionContext) -> None:
    await ctx.store.set("order", dict(ctx.params))


class CheckStock(cf.Node):
    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> tuple[int, int]:
        order = await store.get("order")
        inventory = await store.get("inventory")
        return order["quantity"], inventory.get(order["item"], 0)

    def exec(self, wanted_and_held: tuple[int, int], ctx: cf.ExecutionContext) -> bool:
        wanted, held = wanted_and_held
        return wanted <= held

    async def post(
        self, store: cf.SharedStore, prep_res: Any, in_stock: bool, ctx: cf.ExecutionContext
    ) -> cf.Action:
        await store.set("stock_ok", in_stock)
        return cf.Action.with_params("checked", stock_ok=in_stock)


class CheckPayment(cf.Node):
    max_retries = 3
    retry_delay = 0.01
    retry_on = (ConnectionError,)

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> str:
        return str((await store.get("order"))["card"])

    async def exec(self, card: str, ctx: cf.ExecutionContext) -> bool:
        await trio.sleep(0.05)  # the payment gateway takes its time
        if card == "gateway-down":
            raise ConnectionError("payment gateway unreachable")
        return card != "declined"

    async def exec_fallback(self, card: str, error: Exception, ctx: cf.ExecutionContext) -> bool:
        return False  # after the last attempt: treat as not paid, and say why in post

    async def post(
        self, store: cf.SharedStore, card: str, paid: bool, ctx: cf.ExecutionContext
    ) -> cf.Action:
        await store.set("payment_ok", paid)
        reason = "" if paid else ("gateway down" if card == "gateway-down" else "card declined")
        return cf.Action.with_params("checked", payment_ok=paid, payment_problem=reason)


@cf.node
async def decide(ctx: cf.ExecutionContext) -> str:
    # A join: runs once, after both checks; ctx.params merges their action params.
    problems = []
    if not ctx.params["stock_ok"]:
        problems.append("out of stock")
    if not ctx.params["payment_ok"]:
        problems.append(ctx.params["payment_problem"])
    await ctx.store.set("decision", "; ".join(problems) or "approved")
    return "error" if problems else "default"


@cf.node
async def ship(ctx: cf.ExecutionContext) -> str:
    order = await ctx.store.get("order")
    await ctx.store.set("status", f"shipped {order['quantity']} x {order['item']}")
    return "continue"


@cf.node
async def refund(ctx: cf.ExecutionContext) -> str:
    decision = await ctx.store.get("decision")
    await ctx.store.set("status", f"refunded ({decision})")
    return "continue"


@cf.node
async def final(ctx: cf.ExecutionContext) -> cf.Action:
    return cf.Action.complete(await ctx.store.get("status"))


flow = (
    cf.Flow.builder("orders")
    .add_node("receive", receive)
    .add_node("check_stock", CheckStock())
    .add_node("check_payment", CheckPayment())
    .add_join("decide", decide)
    .add_node("ship", ship)
    .add_node("refund", refund)
    .add_node("final", final)
    .add_route("receive", ["check_stock", "check_payment"])  # fan out: both at once
    .add_route("check_stock", "decide", action="checked")  # converge at the join
    .add_route("check_payment", "decide", action="checked")
    .add_route("decide", "ship")  # the decision: success route...
    .add_route("decide", "refund", action="error")  # ...or error route
    .add_route("ship", "final", action="continue")  # converge again
    .add_route("refund", "final", action="continue")
    .build()
)

ORDERS: list[dict[str, Any]] = [
    {"id": "A-1", "item": "widget", "quantity": 2, "card": "ok"},
    {"id": "A-2", "item": "gadget", "quantity": 5, "card": "ok"},
    {"id": "A-3", "item": "widget", "quantity": 1, "card": "gateway-down"},
]


def describe(path: tuple[str, ...]) -> str:
    """The path, with the two checks shown as one fan-out.

    The checks run at the same time, so they appear in `execution_path` in the order
    they started, which may differ from run to run.
    """
    forked, after = path[:3], path[3:]
    assert forked[0] == "receive" and set(forked[1:]) == {"check_stock", "check_payment"}
    return " -> ".join(["receive", "[check_stock | check_payment]", *after])


async def main() -> list[str]:
    storages = {
        o["id"]: AuditedStorage(o["id"], {"inventory": {"widget": 4, "gadget": 3}}) for o in ORDERS
    }
    async with cf.open_engine() as engine:
        runs = [
            await engine.start_run(flow, storages[o["id"]], params=o, run_id=o["id"])
            for o in ORDERS
        ]  # all three are in flight now
        results = [await run.wait() for run in runs]
    statuses = []
    for order, result in zip(ORDERS, results, strict=True):
        storage = storages[order["id"]]
        statuses.append(str(result.result))
        print(f"order {order['id']}: {result.result}")
        print(f"  path:  {describe(result.execution_path)}")
        print(f"  audit: {len(storage.audit)} committed writes ({', '.join(storage.audit)})")
    return statuses


if __name__ == "__main__":
    trio.run(main)
