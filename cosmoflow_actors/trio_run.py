"""The trio run an engine lives in: the engine, its runs' handles and its progress are
called and awaited only there (trio wakes a task only in its own run)."""

from __future__ import annotations

import trio


def require_trio_run(token: trio.lowlevel.TrioToken, what: str) -> None:
    """Raise RuntimeError, naming the way to call ``what``, unless called in the trio
    run of ``token`` (the engine's): a task of another trio run (another thread's
    ``trio.run``) or a thread outside any would corrupt both runs. Never blocks."""
    try:
        current = trio.lowlevel.current_trio_token()
    except RuntimeError:
        where = "outside any trio run"
    else:
        if current is token:
            return
        where = "in another trio run (another thread's trio.run)"
    raise RuntimeError(
        f"{what} was called {where}: call it in the trio run that opened the engine, from "
        "another thread with trio.from_thread.run (trio.from_thread.run_sync for "
        "start_run_nowait) in a thread that trio run started"
    )
