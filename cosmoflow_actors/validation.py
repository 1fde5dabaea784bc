"""Checks of what users pass in (sizes, seconds, paths, run ids, params), shared by the modules
that take them.

It imports nothing of the package, so that any module may import it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def require_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (a bool is
    not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def require_seconds(name: str, value: object, *, zero: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a number of seconds above
    0, or 0 itself with ``zero`` (a bool or NaN is not a number here)."""
    if not _is_seconds(value, zero=zero):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")


def _is_seconds(value: object, *, zero: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return False
    return value >= 0 if zero else value > 0


def checked_path(name: str, value: object) -> Path:
    """``value``, a file's path (a str or an ``os.PathLike`` of one), as an absolute
    Path; blocks for the current directory when ``value`` is relative.

    Raises ``TypeError`` or ``ValueError`` naming ``name`` and ``value`` when it is no
    path, or one that cannot be a file's: empty (``Path("")`` is the current directory),
    ``.``, ``..`` or a root.
    """
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str or an os.PathLike of one, not {value!r}")
    path = Path(text)
    if path.name in ("", ".."):
        raise ValueError(f"{name} must name a file, not {value!r}")
    return path.absolute()


def require_run_id(run_id: object) -> None:
    """Raise ``ValueError`` unless ``run_id`` is a non-empty str that UTF-8 can encode
    (a store or a queue keeps it as UTF-8: a lone surrogate cannot be)."""
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty str, not {run_id!r}")
    problem = utf8_problem(run_id)
    if problem is not None:
        raise ValueError(f"run_id {run_id!r} {problem}")


def utf8_problem(text: str) -> str | None:
    """Why UTF-8 cannot encode ``text`` (a lone surrogate in it), as words to follow its
    name ("cannot be encoded as UTF-8: ..."), or None. A store or a queue keeps run
    ids, flow names and node ids as UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return f"cannot be encoded as UTF-8: {exc.reason}"
    return None


def checked_params(params: object) -> dict[str, Any]:
    """A run's ``params`` (a mapping with str keys, or None for none) as a new dict.

    Raises ``TypeError`` naming what is wrong otherwise.
    """
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping or None, got {type(params).__name__}")
    for key in params:
        if not isinstance(key, str):
            raise TypeError(f"params keys must be str, got {key!r}")
    return dict(params)


def positive_int(text: str) -> int:
    """``text`` as an int >= 1, for a command-line option (an argparse ``type``).

    Raises argparse.ArgumentTypeError quoting ``text`` otherwise.
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value
