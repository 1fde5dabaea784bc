""":class:`CliError`, a problem the person running the command can fix, which
:func:`~cosmoflow_actors.cli.app.main` prints as one line with exit status 2."""

from __future__ import annotations


class CliError(Exception):
    """A problem the person running the command can fix; printed as one line."""
