"""The per-step context a node receives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cosmoflow_actors.store import SharedStore


@dataclass(slots=True, eq=False)
class ExecutionContext:
    """What a node knows about the step it is running.

    One context is made per step; ``current_retry`` advances with each exec attempt.
    Per-run state belongs in the store or in ``metadata``, never on the node.
    """

    run_id: str
    node_id: str
    flow_name: str
    step_number: int
    """The step's place in the run: 1 for its first step."""
    store: SharedStore
    params: Mapping[str, Any]
    max_retries: int
    current_retry: int = 0
    _metadata: dict[str, Any] | None = None

    @property
    def execution_id(self) -> str:
        """``"<run_id>:<step number>"``: unique within the run, and the same when a
        resumed durable run runs the step again."""
        return f"{self.run_id}:{self.step_number}"

    @property
    def metadata(self) -> dict[str, Any]:
        """A dict for this step's own notes (made on first use)."""
        if self._metadata is None:
            self._metadata = {}
        return self._metadata
