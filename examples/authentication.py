"""The seed guide's conditional action: authenticated users go one way, others log in.

Run it: python examples/authentication.py
"""

from __future__ import annotations

from typing import Any

import cosmoflow_actors as cf


@cf.node
async def check_session(ctx: cf.ExecutionContext) -> cf.Action:
    token = await ctx.store.get("token", None)
    if token == "valid-token":
        await ctx.store.set("user_authenticated", True)
    condition = cf.ActionCondition.key_exists("user_authenticated")
    return cf.Action.conditional(condition, "authenticated_flow", "login_flow")


@cf.node
async def dashboard(ctx: cf.ExecutionContext) -> cf.Action:
    return cf.Action.complete("dashboard")


@cf.node
async def login(ctx: cf.ExecutionContext) -> cf.Action:
    attempts = await ctx.store.update("login_attempts", lambda n: n + 1, default=0)
    return cf.Action.complete(f"login page (attempt {attempts})")


flow = (
    cf.Flow.builder("authentication")
    .add_node("check", check_session)
    .add_node("dashboard", dashboard)
    .add_node("login", login)
    .add_route("check", "dashboard", action="authenticated_flow")
    .add_route("check", "login", action="login_flow")
    .build()
)


def main() -> list[Any]:
    outcomes = []
    for token in ["valid-token", "expired-token", None]:
        result = flow.run_sync({"token": token})
        outcomes.append(result.result)
        print(f"token={token!s:14} -> {' -> '.join(result.execution_path):16} => {result.result}")
    return outcomes


if __name__ == "__main__":
    main()
