"""Checks of configuration values, shared by the modules that take them.

It imports nothing of the package, so that any module may import it.
"""

from __future__ import annotations

import argparse


def require_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (a bool is
    not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


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
