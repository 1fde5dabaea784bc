"""The ``cosmoflow`` command (also ``python -m cosmoflow_actors``).

- ``cosmoflow run FILE.py[:NAME]`` runs a flow defined in a Python file once, or
  ``--runs N`` times (once per line of ``--params-file``) with at most
  ``--concurrency C`` at once, on a ``--store``, and prints the outcome (a summary per
  node for several runs, also of runs Ctrl-C stopped); ``--trace`` prints every event
  on stderr as it happens.
- ``cosmoflow graph FILE.py[:NAME]`` prints the flow's diagram (Mermaid or dot).
- ``cosmoflow inspect STORE`` lists the keys of a persistent store.
- ``cosmoflow forget STORE RUN_ID...``, or ``--state succeeded|failed`` for every run in
  that state, deletes the records of durable runs that ended.
- ``--store`` takes the built-in stores, or one of the user's own:
  ``python:MODULE:FACTORY[:ARGUMENT]``, or ``SCHEME:ARGUMENT`` for a scheme a package
  declares in the entry point group ``cosmoflow_actors.storage``.
- ``cosmoflow submit FILE.py[:NAME] --queue URL`` adds runs to a run queue on Redis,
  ``cosmoflow worker FILE.py[:NAME]... --queue URL --store URL`` runs the queue's runs,
  ``cosmoflow status --queue URL`` shows them, ``cosmoflow requeue RUN_ID --queue URL``
  puts a failed one back (see docs/distributed.md).

Arguments after ``--`` go to the file: while the command loads and runs it, ``sys.argv``
is ``[FILE, *arguments]``. The file is imported under the name ``__cosmoflow__``, and a
flow it runs while it is imported (outside ``if __name__ == "__main__":``) is an error.

Errors are one line on stderr and a non-zero exit status: 2 for bad input (a file, a
flow, a store, an option), 1 for runs that failed, 74 when stdout cannot be written
(a full disk), 130 for Ctrl-C (within
``STOP_GRACE`` seconds; a second one exits at once), 141 when the reader of stdout
went away (``| head``), 143 for SIGTERM on ``worker`` (which hands its runs back to the
queue either way); ``--debug`` shows the traceback. ``inspect`` changes nothing, and
``--json`` prints strict JSON. docs/cli.md has every option and example outputs.

The modules, one a concept:

- :mod:`.app`: :func:`main`: the parser, the dispatch to a command, errors and exit
  statuses.
- :mod:`.signals`: running trio under Ctrl-C and SIGTERM, and the deadline after which
  a command exits without its runs.
- :mod:`.errors`: ``CliError``, bad input. :mod:`.output`: JSON and tables on stdout.
- :mod:`.loading`: flows from ``FILE.py[:NAME]``. :mod:`.stores`: ``--store``, and
  reading a store.
- :mod:`.run`: ``run``, with :mod:`.batch` (``--runs N``) and :mod:`.trace`
  (``--trace``).
- :mod:`.inspect`: ``graph`` and ``inspect``. :mod:`.forget`: ``forget``.
  :mod:`.queue`: ``submit``, ``worker``, ``status`` and ``requeue``.
"""

from cosmoflow_actors.cli.app import main

__all__ = ["main"]
