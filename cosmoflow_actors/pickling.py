"""cloudpickle's ``dumps``, without the caches msgspec keeps on classes.

msgspec, once it has converted or decoded to a dataclass, an Enum, a NamedTuple or a
TypedDict (a typed ``SharedStore.get``), keeps what it learned about that class in the
class's ``__msgspec_cache__`` attribute, an object that cannot be pickled. cloudpickle
pickles a class it cannot import by name (one defined in ``__main__``, or in a function)
by value, its ``__dict__`` included, so such a value, or anything holding one, would no
longer pickle. :func:`dumps` leaves that attribute out of the class it writes; msgspec
builds it again the next time it needs it. Unpickled in the process that pickled it, the
class is the original one, its attribute kept; elsewhere, a class without it.

Every other object is pickled as ``cloudpickle.dumps`` pickles it. Nothing here awaits;
:func:`dumps` blocks while it pickles.
"""

from __future__ import annotations

import io
from typing import Any, Final

import cloudpickle

_MSGSPEC_CACHE: Final = "__msgspec_cache__"


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle is untyped
    """cloudpickle's Pickler, writing a class by value without its msgspec cache."""

    def reducer_override(self, obj: Any) -> Any:
        reduced = super().reducer_override(obj)
        if isinstance(obj, type) and _MSGSPEC_CACHE in vars(obj):
            return _without_cache(reduced)
        return reduced


def _without_cache(reduced: Any) -> Any:
    """``reduced``, cloudpickle's by-value reduction of a class (a tuple whose third
    item is the state ``(class_dict, slot_state)``), with a copy of the class dict that
    lacks the msgspec cache; ``reduced`` itself when it has another shape (a class
    pickled by name, say)."""
    if not (isinstance(reduced, tuple) and len(reduced) >= 3):
        return reduced
    state = reduced[2]
    if not (isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict)):
        return reduced
    class_dict = {name: value for name, value in state[0].items() if name != _MSGSPEC_CACHE}
    return (*reduced[:2], (class_dict, state[1]), *reduced[3:])


def dumps(value: Any, protocol: int | None = None) -> bytes:
    """``value`` pickled as ``cloudpickle.dumps(value, protocol)`` pickles it, each class
    pickled by value without its msgspec cache. Raises what pickling raises."""
    with io.BytesIO() as file:
        _Pickler(file, protocol=protocol).dump(value)
        return file.getvalue()
