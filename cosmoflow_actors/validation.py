"""Checks of configuration values, shared by the modules that take them.

It imports nothing of the package, so that any module may import it.
"""

from __future__ import annotations


def require_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (a bool is
    not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
