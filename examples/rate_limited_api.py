"""1,000 HTTP requests through one node with `max_concurrency` and `rate_limit`.

The example starts its own small HTTP/1.1 server with trio on 127.0.0.1 (on a free
port), then runs one flow per request. The `call_api` node allows 50 requests in
flight and 400 request starts per second; the server answers 503 the first time each
hundredth item is asked for, and the node retries it. A progress bar follows the
engine's event stream (`engine.events()`); it is drawn with `rich` when that is
installed and the output is a terminal, and printed as plain lines otherwise. The
summary counts the attempts (retries included) that started in each second since the
first one: never more than the limit.

No network is needed: client and server are both in this process, written with trio
streams, with no HTTP library.

Run it: python examples/rate_limited_api.py [--requests N] [--fail-all]

`--fail-all` makes the server answer every request with a 503, as an API that is down
would: each request is tried three times and fails, and the summary reports the
failures (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import trio

import cosmoflow_actors as cf

REQUESTS = 1_000
MAX_CONCURRENCY = 50  # requests in flight at once
RATE_LIMIT = (400, 1.0)  # at most 400 request starts in any 1.0 s


# --- the server ---------------------------------------------------------------------


class ApiServer:
    """Answers `GET /items/<n>` with JSON; the first request for every 100th item is a 503
    (every request, with `fail_all`)."""

    def __init__(self, fail_all: bool = False) -> None:
        self.hits: collections.Counter[int] = collections.Counter()
        self.fail_all = fail_all

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                head = await _read_head(stream)
                _method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                item = int(target.removeprefix("/items/"))
            except (ValueError, trio.BrokenResourceError):
                await _respond(stream, 400, {"error": "bad request"})
                return
            self.hits[item] += 1
            if self.fail_all or (item % 100 == 0 and self.hits[item] == 1):
                await _respond(stream, 503, {"error": "busy, try again"})
            else:
                await _respond(stream, 200, {"item": item, "square": item * item})


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk or len(data) > 65_536:
            raise ValueError("incomplete request")
        data += chunk
    return data


async def _respond(stream: trio.SocketStream, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 503: "Service Unavailable"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(trio.BrokenResourceError):  # the client went away
        await stream.send_all(head.encode() + body)


# --- the client and the flow --------------------------------------------------------


class HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class RequestFailed(Exception):
    """Every attempt of a request failed; holds when each attempt started."""

    def __init__(self, starts: list[float]) -> None:
        super().__init__(f"{len(starts)} attempts failed")
        self.starts = starts


async def http_get(port: int, path: str) -> dict[str, Any]:
    """One GET over a new connection; the JSON body, or HttpError for a non-200 answer."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        response = b""
        while chunk := await stream.receive_some(65_536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise HttpError(status)
    answer: dict[str, Any] = json.loads(body)
    return answer


class CallApi(cf.Node):
    max_concurrency = MAX_CONCURRENCY
    rate_limit = RATE_LIMIT
    max_retries = 3
    retry_delay = 0.05
    timeout = 5.0
    retry_on = (HttpError, OSError)

    async def exec(self, prep_res: None, ctx: cf.ExecutionContext) -> dict[str, Any]:
        # Runs once the rate limit lets this attempt start: note when, for the summary.
        # ctx is this step's context (shared by its attempts), so the note is per run.
        ctx.metadata.setdefault("starts", []).append(trio.current_time())
        return await http_get(ctx.params["port"], f"/items/{ctx.params['item']}")

    def exec_fallback(self, prep_res: None, error: Exception, ctx: cf.ExecutionContext) -> None:
        # The last attempt failed: the run fails, and its error carries the attempts'
        # starts, so that the summary counts them too.
        raise RequestFailed(ctx.metadata.get("starts", [])) from error

    async def post(
        self, store: cf.SharedStore, prep_res: None, answer: Any, ctx: cf.ExecutionContext
    ) -> cf.Action:
        await store.set("attempt_starts", ctx.metadata["starts"])
        return cf.Action.complete(answer)


flow = cf.Flow.builder("rate-limited-api").add_node("call_api", CallApi()).build()


# --- progress -------------------------------------------------------------------------


class Progress(Protocol):
    def update(self, done: int) -> None: ...


class PlainProgress:
    """One line at every quarter: for logs and pipes."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.marks = [total * quarter // 4 for quarter in range(1, 5)]

    def update(self, done: int) -> None:
        while self.marks and done >= self.marks[0]:
            print(f"progress: {self.marks.pop(0)}/{self.total} requests done")


@dataclass
class Tally:
    done: int = 0
    retries: int = 0


async def follow(events: cf.EventStream, engine: cf.Engine, bar: Progress, tally: Tally) -> None:
    """Count finished runs and retries from the event stream; ends when the engine closes."""
    async for event in events:
        if isinstance(event, cf.RunFinished | cf.RunFailed):
            tally.done += 1
        elif isinstance(event, cf.Retry):
            tally.retries += 1
        elif isinstance(event, cf.EventsDropped):  # fell behind: catch up from the counters
            stats = engine.statistics()
            tally.done = stats.runs_succeeded + stats.runs_failed + stats.runs_cancelled
        bar.update(tally.done)


async def run_requests(port: int, bar: Progress, requests: int) -> dict[str, Any]:
    stores: list[dict[str, Any]] = [{} for _ in range(requests)]
    tally = Tally()
    async with trio.open_nursery() as nursery, cf.open_engine(max_runs=200) as engine:
        nursery.start_soon(follow, engine.events(), engine, bar, tally)
        started = trio.current_time()
        runs = [  # start_run waits while 200 runs are in flight: backpressure
            await engine.start_run(flow, stores[i], params={"item": i, "port": port})
            for i in range(requests)
        ]
        answers, errors = [], []
        for run in runs:
            try:
                answers.append((await run.wait()).result)
            except cf.NodeError as exc:  # the last attempt failed too
                errors.append(exc)
        elapsed = trio.current_time() - started
    # Every attempt's start, retries and failed requests included, counted per whole
    # second since the first.
    starts = [t for store in stores for t in store.get("attempt_starts", [])]
    starts += [t for error in errors for t in failed_starts(error)]
    per_second = collections.Counter(int(t - started) for t in starts)
    return {
        "requests": requests,
        "succeeded": len(answers),
        "failed": len(errors),
        "first_error": errors[0] if errors else None,
        "retries": tally.retries,
        "elapsed": elapsed,
        "per_second": [per_second[s] for s in range(max(per_second, default=-1) + 1)],
        "checksum": sum(answer["square"] for answer in answers),
    }


def failed_starts(error: cf.NodeError) -> list[float]:
    """When the attempts of a failed request started (none if it failed otherwise)."""
    cause = error.__cause__
    return cause.starts if isinstance(cause, RequestFailed) else []


def describe(error: BaseException) -> str:
    """The error and its causes: `node 'call_api' failed ... <- ... <- HttpError: HTTP 503`."""
    text = str(error)
    cause = error.__cause__
    while cause is not None:
        text += f" <- {type(cause).__name__}: {cause}"
        cause = cause.__cause__
    return text


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Progress]:
    """A rich progress bar when rich is installed and stdout is a terminal, else lines."""
    try:
        from rich import progress as rich_progress
    except ImportError:  # rich is optional
        rich_progress = None  # type: ignore[assignment]
    if rich_progress is None or not sys.stdout.isatty():
        yield PlainProgress(total)
        return
    with rich_progress.Progress() as progress:
        yield RichBar(progress, progress.add_task("requests", total=total))


@dataclass
class RichBar:
    progress: Any
    task: Any

    def update(self, done: int) -> None:
        self.progress.update(self.task, completed=done)


async def main(requests: int = REQUESTS, fail_all: bool = False) -> dict[str, Any]:
    server = ApiServer(fail_all)
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)  # returns once the server is listening
        port = listeners[0].socket.getsockname()[1]
        with progress_bar(requests) as bar:
            summary = await run_requests(port, bar, requests)
        nursery.cancel_scope.cancel()  # stop the server
    report(summary)
    return summary


def report(summary: dict[str, Any]) -> None:
    calls, per = RATE_LIMIT
    peak = max(summary["per_second"], default=0)
    print(f"requests: {summary['requests']} ({summary['succeeded']} answered)")
    print(f"failures: {summary['failed']}")
    if summary["first_error"] is not None:
        print(f"first failure: {describe(summary['first_error'])}")
    print(f"retries:  {summary['retries']} (the server's 503s, retried by the node)")
    print(f"elapsed:  {summary['elapsed']:.2f} s")
    print(f"started in each second: {summary['per_second']}")
    print(
        f"observed max rate: {peak} per second (limit: {calls} per {per:g} s, ok: {peak <= calls})"
    )
    print(f"checksum: {summary['checksum']}")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Requests through a rate-limited node.")
    parser.add_argument("--requests", type=positive, default=REQUESTS, metavar="N")
    parser.add_argument("--fail-all", action="store_true", help="the server answers only 503s")
    options = parser.parse_args()
    outcome = trio.run(main, options.requests, options.fail_all)
    sys.exit(1 if outcome["failed"] else 0)
