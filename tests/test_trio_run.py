"""``trio_run``: what is called outside the engine's trio run is refused, saying how to
call it."""

from __future__ import annotations

import pytest
import trio

from cosmoflow_actors.trio_run import require_trio_run


async def test_a_call_in_the_trio_run_of_the_token_passes() -> None:
    require_trio_run(trio.lowlevel.current_trio_token(), "the thing")


async def test_a_call_in_another_trio_run_is_refused_naming_the_thing() -> None:
    token = trio.lowlevel.current_trio_token()

    async def elsewhere() -> None:
        require_trio_run(token, "the thing")

    with pytest.raises(RuntimeError, match=r"^the thing was called in another trio run .*"):
        await trio.to_thread.run_sync(trio.run, elsewhere)


async def test_a_call_outside_any_trio_run_says_how_to_make_it() -> None:
    token = trio.lowlevel.current_trio_token()
    with pytest.raises(RuntimeError, match="outside any trio run") as info:
        await trio.to_thread.run_sync(require_trio_run, token, "the thing")
    assert "trio.from_thread.run" in str(info.value)
