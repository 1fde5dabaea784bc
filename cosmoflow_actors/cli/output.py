"""What the commands print on stdout: strict JSON (:func:`dump_json`), and rich tables
on a console that leaves a reader gone away (``| head``) to
:func:`~cosmoflow_actors.cli.app.main` (:class:`StdoutConsole`)."""

from __future__ import annotations

import errno
import json
import math
import os
from typing import Any

from rich.console import Console


class StdoutConsole(Console):
    """rich's Console on stdout, where a reader that went away (``| head``) raises
    BrokenPipeError for :func:`~cosmoflow_actors.cli.app.main` to handle, not rich's
    ``SystemExit(1)``."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def dump_json(value: Any) -> str:
    """``value`` as strict JSON, indented by 2 (see :func:`_jsonable`)."""
    return json.dumps(_jsonable(value), indent=2, allow_nan=False)


def _jsonable(value: Any) -> Any:
    """``value`` with what JSON cannot hold replaced by its ``repr``: NaN and the
    infinities, keys that are not str, and values of other types (a tuple is a list)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, dict):
        return {_json_key(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return repr(value)


def _json_key(key: object) -> str:
    return key if isinstance(key, str) else repr(key)
