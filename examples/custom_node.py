"""A custom node with retries, a timeout, backoff and a fallback.

`Forecast` calls a pretend weather service that misbehaves in a different way in each
scenario. The node's config decides what happens: which errors are retried, how long
to wait between attempts, how long one attempt may take, and what `exec_fallback`
answers once the attempts are used up. The engine's event stream shows each retry and
fallback as it happens.

Run it: python examples/custom_node.py
or one scenario: cosmoflow run examples/custom_node.py --param trouble=down --param bad_attempts=2
"""

from __future__ import annotations

from typing import Any

import trio

import cosmoflow_actors as cf


class ServiceDown(ConnectionError):
    """The pretend service did not answer."""


class Forecast(cf.Node):
    """Looks up tomorrow's weather; falls back to yesterday's answer when it must."""

    max_retries = 3  # total exec attempts
    retry_delay = 0.02  # seconds before the first retry...
    backoff = 2.0  # ...doubled before each later one
    timeout = 0.2  # seconds one attempt may take; a timeout is a failed attempt
    retry_on = (ConnectionError,)  # anything else skips the remaining attempts

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> str:
        return str(await store.get("city", "Lyon"))

    async def exec(self, city: str, ctx: cf.ExecutionContext) -> str:
        # The scenario says how the service misbehaves, and on how many attempts.
        trouble = ctx.params.get("trouble", "none")
        bad_attempts = int(ctx.params.get("bad_attempts", 0))
        if ctx.current_retry < bad_attempts:
            if trouble == "down":
                raise ServiceDown(f"no answer for {city}")
            if trouble == "slow":
                await trio.sleep(10)  # cancelled by the timeout
            if trouble == "bad-city":
                raise ValueError(f"unknown city {city!r}")
            if trouble == "bug":
                raise KeyError("temperature")
        return f"{city}: sunny, 21 C (live, attempt {ctx.current_retry + 1})"

    async def exec_fallback(self, city: str, error: Exception, ctx: cf.ExecutionContext) -> str:
        # Runs once, after the last failed attempt; what it returns replaces exec's result.
        if isinstance(error, ServiceDown | trio.TooSlowError):
            return f"{city}: sunny, 20 C (cached, after {type(error).__name__})"
        if isinstance(error, ValueError):
            return f"{city}: no forecast ({error})"
        raise error  # anything else fails the run with a NodeError

    async def post(
        self, store: cf.SharedStore, city: str, forecast: str, ctx: cf.ExecutionContext
    ) -> cf.Action:
        await store.set("forecast", forecast)
        return cf.Action.complete(forecast)


flow = cf.Flow.builder("forecast").add_node("forecast", Forecast()).build()

SCENARIOS: list[tuple[str, dict[str, Any]]] = [
    ("healthy", {"trouble": "none"}),
    ("flaky", {"trouble": "down", "bad_attempts": 2}),
    ("slow", {"trouble": "slow", "bad_attempts": 1}),
    ("down", {"trouble": "down", "bad_attempts": 3}),
    ("bad-city", {"trouble": "bad-city", "bad_attempts": 3}),
    ("bug", {"trouble": "bug", "bad_attempts": 3}),
]


async def watch(events: cf.EventStream, log: dict[str, list[str]]) -> None:
    """Keep the retry and fallback events of each run (the run id is the scenario)."""
    async for event in events:
        if isinstance(event, cf.Retry):
            line = f"attempt {event.attempt} failed ({type(event.error).__name__}),"
            log.setdefault(event.run_id, []).append(f"{line} retry in {event.delay:.2f} s")
        elif isinstance(event, cf.Fallback):
            line = f"{event.attempts} attempt(s) failed ({type(event.error).__name__}),"
            log.setdefault(event.run_id, []).append(f"{line} exec_fallback runs")


async def main() -> dict[str, str]:
    outcomes: dict[str, str] = {}
    log: dict[str, list[str]] = {}
    async with trio.open_nursery() as nursery, cf.open_engine() as engine:
        # The stream ends when the engine closes, and then `watch` returns.
        nursery.start_soon(watch, engine.events(), log)
        for name, params in SCENARIOS:
            try:
                result = await engine.run(flow, {"city": "Lyon"}, params=params, run_id=name)
                outcomes[name] = str(result.result)
            except cf.NodeError as exc:
                cause = exc.__cause__
                outcomes[name] = f"run failed: {exc} <- {type(cause).__name__}: {cause}"
    for name, _ in SCENARIOS:
        print(f"[{name}]")
        for line in log.get(name, []):
            print(f"  {line}")
        print(f"  => {outcomes[name]}")
    return outcomes


if __name__ == "__main__":
    trio.run(main)
