"""``python -m cosmoflow_actors``: the ``cosmoflow`` command."""

from cosmoflow_actors.cli import main

raise SystemExit(main())
