"""What the commands print on stdout: strict JSON (:func:`dump_json`), rich tables on a
console that leaves a reader gone away (``| head``) to
:func:`~cosmoflow_actors.cli.app.main` (:class:`StdoutConsole`), and stdout itself
checked (:func:`checked_stdout`): a write that fails raises :class:`StdoutFailed`; and
the error line on stderr (:func:`print_error`)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any, cast

from rich.console import Console
from rich.table import Table
from rich.text import Text

from cosmoflow_actors.tracing import one_line


class StdoutFailed(Exception):
    """stdout could not be written (a full disk): what the command printed is lost.
    :func:`~cosmoflow_actors.cli.app.main` prints it as one line, with its own exit
    status."""


class _CheckedStdout:
    """``stream`` (sys.stdout), whose failed writes and flushes raise StdoutFailed
    from the OSError; BrokenPipeError (a reader gone away) goes on as it is."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        with _stdout_errors():
            return self._stream.write(text)

    def writelines(self, lines: Iterable[str]) -> None:
        with _stdout_errors():
            self._stream.writelines(lines)

    def flush(self) -> None:
        with _stdout_errors():
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _stdout_errors() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise StdoutFailed(f"cannot write to stdout: {exc}") from exc


@contextlib.contextmanager
def checked_stdout() -> Iterator[None]:
    """Inside, a write to stdout that fails raises StdoutFailed (see
    :class:`_CheckedStdout`), and what stdout holds is flushed at the end (blocks
    while it is written)."""
    real = sys.stdout
    sys.stdout = cast(IO[str], _CheckedStdout(real))
    try:
        yield
        sys.stdout.flush()
    finally:
        sys.stdout = real


class StdoutConsole(Console):
    """rich's Console on stdout, where a reader that went away (``| head``) raises
    BrokenPipeError for :func:`~cosmoflow_actors.cli.app.main` to handle, not rich's
    ``SystemExit(1)``."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def print_table(table: Table) -> None:
    """Print ``table`` on stdout, as wide as a terminal is; on a file or a pipe (``|
    grep``), as wide as its rows, so that a line holds a whole row (rich would fold
    them at 80 columns). Blocks while stdout is written."""
    console = StdoutConsole(highlight=False)
    if not console.is_terminal:
        unbounded = console.options.update_width(sys.maxsize)
        console.width = max(console.width, console.measure(table, options=unbounded).maximum)
    console.print(table)


def plain(*cells: str) -> list[Text]:
    """``cells`` as rich shows them as they are: a ``[bold]`` or ``:smile:`` in a key,
    a value, an id, a node's name or an error is text, not rich's markup or emoji code,
    and a control character in it (a newline, a terminal's escape, which Ray's errors
    carry) is written as a Python escape (see :func:`one_line`). Does not block."""
    return [Text(one_line(cell)) for cell in cells]


def dump_json(value: Any) -> str:
    """``value`` as strict JSON, indented by 2 (see :func:`jsonable`)."""
    return json.dumps(jsonable(value), indent=2, allow_nan=False)


def jsonable(value: Any) -> Any:
    """``value`` with what JSON cannot hold replaced by its ``repr``: NaN and the
    infinities, the keys of a dict that has a key that is not str (see
    :func:`_json_keys`), and values of other types (a tuple is a list)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, dict):
        return dict(zip(_json_keys(value), map(jsonable, value.values()), strict=True))
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    return repr(value)


def _json_keys(value: dict[Any, Any]) -> list[str]:
    """The keys of ``value`` as JSON keys: as they are when all are str; else each as
    its ``repr``, so that ``1`` and ``"1"`` stay two keys (``"1"`` and ``"'1'"``)."""
    keys = list(value)
    if all(isinstance(key, str) for key in keys):
        return keys
    return [repr(key) for key in keys]


def print_error(message: str) -> None:
    """Print ``cosmoflow: error: MESSAGE`` on stderr, as one line: the control
    characters of a message a run or a file chose (a newline, a terminal's escape) are
    written as Python escapes. Blocks while stderr is written."""
    print(f"cosmoflow: error: {one_line(message)}", file=sys.stderr)


def print_warning(message: str) -> None:
    """Print ``cosmoflow: warning: MESSAGE`` on stderr, as one line, as
    :func:`print_error` does. Blocks while stderr is written."""
    print(f"cosmoflow: warning: {one_line(message)}", file=sys.stderr, flush=True)
