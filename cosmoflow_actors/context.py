"""The per-step context a node receives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cosmoflow_actors.runtime.store_client import SharedStore


@dataclass(slots=True, eq=False)
class ExecutionContext:
    """What a node knows about the step it is running.

    One context is made per step; ``current_retry`` advances with each exec attempt.
    Per-run state belongs in the store, never on the node; ``metadata`` holds what the
    prep, exec and post of this one step share.
    """

    run_id: str
    node_id: str
    flow_name: str
    step_number: int
    """The step's place in its branch: 1 for the run's first step. A branch of a fan-out
    goes on counting from the step that forked it (see ``branch``)."""
    store: SharedStore
    params: Mapping[str, Any]
    max_retries: int
    current_retry: int = 0
    branch: str = ""
    """Which branch of the run the step is on: ``""`` until the run fans out; the
    ``i``-th branch of a fork at step ``n`` adds ``"<n>.<i>/"`` to its parent's."""
    _metadata: dict[str, Any] | None = None

    @property
    def execution_id(self) -> str:
        """``"<run_id>:<branch><step number>"`` (``"r:3"``, or ``"r:2.1/3"`` on a
        fan-out's second branch): unique within the run, and the same when a resumed
        durable run runs the step again."""
        return f"{self.run_id}:{self.branch}{self.step_number}"

    @property
    def metadata(self) -> dict[str, Any]:
        """A dict for this step's own notes (made on first use)."""
        if self._metadata is None:
            self._metadata = {}
        return self._metadata

    def copy(self, **changes: Any) -> ExecutionContext:
        """A copy with ``changes``, for work of this step elsewhere (an exec on a thread,
        an item of a parallel batch): it shares this step's ``metadata``."""
        return replace(self, _metadata=self.metadata, **changes)
