"""Actions: what a node's ``post`` returns to say where its run goes next.

An :class:`Action` is an immutable value: a simple name (``Action.simple("next")``), a name
with parameters for the next node (``Action.with_params("retry", count=3)``), the end of the
run (``Action.complete(result)``), or a choice between two actions that the node actor
makes against the store as the step ends (``Action.conditional(condition, if_true,
if_false)``).

An :class:`ActionCondition` is an immutable test of store values: of a route (``when=``),
which the router evaluates, or of a conditional action. The step's node actor fetches
every key in ``condition.keys`` in one message, and ``condition.evaluate(values)`` gets
the keys that exist. Evaluating a condition raises nothing but
:class:`~cosmoflow_actors.errors.ConditionError`: when a store value's comparison (or
truthiness) raises, the error names the condition, the operator and the store keys, and is
chained from the original.

Actions are compared by value and are deliberately unhashable (their params and results may
be unhashable); conditions are compared by value and hash like tuples of their parts.
Both can be copied and pickled (with ``pickle`` or ``cloudpickle``), so they cross process
boundaries; a copy equals the original.
"""

from __future__ import annotations

import functools
import inspect
import keyword
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, final

from cosmoflow_actors.errors import ConditionError, type_and_message
from cosmoflow_actors.expression import (
    COMPARISON_OPERATORS,
    ComparisonOperator,
    Expression,
    compare_values,
    evaluation_error,
    is_number,
    parse,
    values_equal,
)
from cosmoflow_actors.validation import checked_params

__all__ = ["Action", "ActionCondition", "as_action", "checked_keys", "holds"]


class ActionCondition(ABC):
    """A test of store values that decides a conditional :class:`Action`.

    Build conditions with the static constructors (:meth:`always`, :meth:`key_exists`,
    :meth:`compare`, :meth:`expression`, ...) and combine them with ``&``, ``|`` and ``~``.

    For a test in Python, subclass it: implement :meth:`evaluate` and :attr:`keys`. An
    error the subclass's ``evaluate`` raises (its own or one it inherits, from a mixin
    say) where the engine evaluates it (see :func:`holds`) reaches the run as a
    ``ConditionError`` naming the condition's class, chained from the error, so it
    fails that run alone, as the built-in conditions' errors do;
    an ``async def evaluate`` is refused (``TypeError``) when the class is made. Its
    ``keys`` must be a frozenset of str: ``build()``, ``Action.conditional`` and the
    combinators check it (``ConditionError`` naming the class).
    """

    __slots__ = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__module__.startswith("cosmoflow_actors."):
            _refuse_async_evaluate(cls)

    @abstractmethod
    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Return whether the condition holds for ``values`` (missing keys are absent).

        Raises:
            ConditionError: a store value's comparison or truthiness raised; the message
                names the condition, the operator and the store keys, and the original
                exception is ``__cause__``.
        """

    @property
    @abstractmethod
    def keys(self) -> frozenset[str]:
        """Every store key the condition reads."""

    def __repr__(self) -> str:
        """``<ClassName>``: what a user subclass without a ``__repr__`` of its own shows
        (in diagrams, in the repr of an action or a combination), the same in every
        process (never a memory address)."""
        return f"<{type(self).__qualname__}>"

    def __and__(self, other: object) -> ActionCondition:
        if not isinstance(other, ActionCondition):
            return NotImplemented
        return _AllOf((self, other))

    def __or__(self, other: object) -> ActionCondition:
        if not isinstance(other, ActionCondition):
            return NotImplemented
        return _AnyOf((self, other))

    def __invert__(self) -> ActionCondition:
        return _Not(self)

    @staticmethod
    def always() -> ActionCondition:
        """A condition that always holds."""
        return _Constant(True)

    @staticmethod
    def never() -> ActionCondition:
        """A condition that never holds."""
        return _Constant(False)

    @staticmethod
    def key_exists(key: str) -> ActionCondition:
        """Holds when ``key`` is in the store (whatever its value, ``None`` included)."""
        return _KeyExists(_check_key(key))

    @staticmethod
    def key_equals(key: str, value: Any) -> ActionCondition:
        """Holds when ``key`` is in the store and its value equals ``value``.

        Equality is the expression language's: see :func:`~.expression.values_equal`.
        """
        return _KeyEquals(_check_key(key), value)

    @staticmethod
    def compare(key: str, op: ComparisonOperator, number: int | float) -> ActionCondition:
        """Holds when the value of ``key`` is a number and ``value op number`` is true.

        ``op`` is one of ``== != > >= < <=``. A missing key, or a value that is not a number
        (bools are not numbers), makes the condition false, whatever ``op`` is.

        Raises:
            ConditionError: ``op`` is not a comparison operator, or ``number`` is not an
                int or float (or is a bool).
        """
        if not isinstance(op, str) or op not in COMPARISON_OPERATORS:
            expected = ", ".join(sorted(COMPARISON_OPERATORS))
            raise ConditionError(f"unknown comparison operator {op!r}; expected one of {expected}")
        if not is_number(number):
            raise ConditionError(
                f"compare() needs an int or float to compare with, not {type(number).__name__}"
            )
        return _Compare(_check_key(key), op, number)

    @staticmethod
    def expression(text: str) -> ActionCondition:
        """Holds when the expression ``text`` is true; see :mod:`cosmoflow_actors.expression`.

        Raises:
            ConditionError: ``text`` is not a valid expression (the message says where).
        """
        return _ExpressionCondition(parse(text))

    @staticmethod
    def all_of(*conditions: ActionCondition) -> ActionCondition:
        """Holds when every one of ``conditions`` holds (so ``all_of()`` always holds)."""
        return _AllOf(_check_conditions("all_of", conditions))

    @staticmethod
    def any_of(*conditions: ActionCondition) -> ActionCondition:
        """Holds when any of ``conditions`` holds (so ``any_of()`` never holds)."""
        return _AnyOf(_check_conditions("any_of", conditions))


def _refuse_async_evaluate(cls: type[ActionCondition]) -> None:
    """Raise TypeError when the evaluate that ``cls``, a user subclass, resolves (its
    own, or one it inherits, from a mixin say) is an ``async def``: routing evaluates
    conditions without awaiting."""
    if not inspect.iscoroutinefunction(cls.evaluate):
        return
    owner = next(klass for klass in cls.__mro__ if "evaluate" in vars(klass))
    defined = "" if owner is cls else f" (inherited from {owner.__qualname__})"
    raise TypeError(
        f"{cls.__qualname__}.evaluate{defined} must be a plain def returning a bool, "
        "not an async def: routing evaluates conditions without awaiting"
    )


def holds(condition: ActionCondition, values: Mapping[str, Any]) -> bool:
    """Whether ``condition`` holds for the store ``values``: its evaluate, whatever the
    condition is (a user's included, whatever its evaluate raises or returns), as a
    bool. What routing, conditional actions and the combinators call.

    Raises:
        ConditionError: evaluate raised (a ConditionError as it is, any other error
            chained), or returned an awaitable or what has no truth value.
    """
    try:
        result: object = condition.evaluate(values)
    except (ConditionError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # sys.exit() too: the run fails, not the engine
        raise ConditionError(
            f"condition {type(condition).__qualname__} could not be evaluated: its "
            f"evaluate raised {type_and_message(exc)}; it must return a bool for any "
            "store values (a key that is not stored is absent from them)"
        ) from exc
    return result if type(result) is bool else _truth(condition, result)


def _truth(condition: ActionCondition, result: object) -> bool:
    """What a user subclass's evaluate returned, as a bool. ConditionError when it is
    awaitable (an evaluate that hands back a coroutine: it is closed unrun) or has no
    truth value (``bool()`` raises, as for an array of comparisons)."""
    name = type(condition).__qualname__
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise ConditionError(
            f"condition {name}: evaluate returned an awaitable ({type(result).__name__}), "
            "not a bool"
        )
    try:
        return bool(result)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise ConditionError(
            f"condition {name}: what evaluate returned (of type {type(result).__name__}) "
            f"has no truth value ({type_and_message(exc)}); it must return a bool"
        ) from exc


def checked_keys(condition: ActionCondition) -> frozenset[str]:
    """The ``keys`` of ``condition``, a frozenset of str (a user subclass's may be
    anything, or raise).

    Raises:
        ConditionError: naming the condition's class, and chained from the error its
            ``keys`` raised, if any.
    """
    name = type(condition).__qualname__
    try:
        keys = condition.keys
    except (ConditionError, KeyboardInterrupt):
        raise
    except BaseException as exc:
        raise ConditionError(
            f"the keys of condition {name} raised {type_and_message(exc)}"
        ) from exc
    if not isinstance(keys, frozenset) or not all(isinstance(key, str) for key in keys):
        raise ConditionError(
            f"the keys of condition {name} must be a frozenset of str (the store keys "
            f"evaluate reads), got {keys!r}"
        )
    return keys


def _check_key(key: object) -> str:
    """Return ``key`` if it is a non-empty str; raise ConditionError otherwise."""
    if not isinstance(key, str) or not key:
        raise ConditionError(f"a store key must be a non-empty str, not {key!r}")
    return key


def _check_conditions(
    combinator: str, conditions: tuple[object, ...]
) -> tuple[ActionCondition, ...]:
    """Return ``conditions`` if each is an ActionCondition; raise TypeError otherwise."""
    checked: list[ActionCondition] = []
    for condition in conditions:
        if not isinstance(condition, ActionCondition):
            kind = type(condition).__name__
            raise TypeError(f"{combinator}() takes ActionCondition arguments, not {kind}")
        checked.append(condition)
    return tuple(checked)


@final
@dataclass(frozen=True, slots=True)
class _Constant(ActionCondition):
    """``always()`` or ``never()``."""

    holds: bool

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Return the constant."""
        return self.holds

    @property
    def keys(self) -> frozenset[str]:
        """No keys."""
        return frozenset()

    def __repr__(self) -> str:
        return "ActionCondition.always()" if self.holds else "ActionCondition.never()"


@final
@dataclass(frozen=True, slots=True)
class _KeyExists(ActionCondition):
    """``key_exists(key)``."""

    key: str

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Return whether the key is present."""
        return self.key in values

    @property
    def keys(self) -> frozenset[str]:
        """The key."""
        return frozenset({self.key})

    def __repr__(self) -> str:
        return f"ActionCondition.key_exists({self.key!r})"


@final
@dataclass(frozen=True, slots=True, eq=False)
class _KeyEquals(ActionCondition):
    """``key_equals(key, value)``; equal to another only if the values have the same type."""

    key: str
    value: Any

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Return whether the key is present with a value equal to ours."""
        if self.key not in values:
            return False
        try:
            return values_equal(values[self.key], self.value)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # sys.exit() in a value's __eq__ too
            raise evaluation_error(repr(self), "'=='", self.keys, exc) from exc

    @property
    def keys(self) -> frozenset[str]:
        """The key."""
        return frozenset({self.key})

    def _identity(self) -> tuple[object, ...]:
        """What equality and hashing compare: ``key_equals(k, 1) != key_equals(k, True)``."""
        return (self.key, type(self.value), self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _KeyEquals):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        return f"ActionCondition.key_equals({self.key!r}, {self.value!r})"


@final
@dataclass(frozen=True, slots=True)
class _Compare(ActionCondition):
    """``compare(key, op, number)``."""

    key: str
    op: str
    number: int | float

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Return whether the key holds a number for which ``value op number`` is true."""
        value = values.get(self.key)
        try:
            return is_number(value) and compare_values(self.op, value, self.number)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # sys.exit() in a value's comparison too
            raise evaluation_error(repr(self), repr(self.op), self.keys, exc) from exc

    @property
    def keys(self) -> frozenset[str]:
        """The key."""
        return frozenset({self.key})

    def __repr__(self) -> str:
        return f"ActionCondition.compare({self.key!r}, {self.op!r}, {self.number!r})"


@final
@dataclass(frozen=True, slots=True)
class _ExpressionCondition(ActionCondition):
    """``expression(text)``, holding the parsed expression."""

    parsed: Expression

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Return the value of the expression."""
        return self.parsed.evaluate(values)

    @property
    def keys(self) -> frozenset[str]:
        """The keys the expression reads."""
        return self.parsed.keys

    def __repr__(self) -> str:
        return f"ActionCondition.expression({self.parsed.source!r})"


def _keys_of(conditions: tuple[ActionCondition, ...]) -> frozenset[str]:
    """Return the union of the keys of ``conditions``.

    Raises:
        ConditionError: the keys of one of them are not a frozenset of str, or raised
            (see :func:`checked_keys`).
    """
    return frozenset().union(*map(checked_keys, conditions))


def _combination_repr(combinator: str, symbol: str, conditions: tuple[ActionCondition, ...]) -> str:
    """Return ``(a & b)`` for two or more conditions, ``ActionCondition.all_of(a)`` otherwise."""
    if len(conditions) < 2:
        inner = ", ".join(map(repr, conditions))
        return f"ActionCondition.{combinator}({inner})"
    return "(" + f" {symbol} ".join(map(repr, conditions)) + ")"


@final
@dataclass(frozen=True, slots=True)
class _AllOf(ActionCondition):
    """``all_of(...)`` or ``a & b``."""

    conditions: tuple[ActionCondition, ...]

    def __post_init__(self) -> None:
        """Check the keys of every condition (ConditionError naming the one at fault)."""
        _keys_of(self.conditions)

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Return whether every condition holds."""
        return all(holds(condition, values) for condition in self.conditions)

    @property
    def keys(self) -> frozenset[str]:
        """The keys of every condition."""
        return _keys_of(self.conditions)

    def __repr__(self) -> str:
        return _combination_repr("all_of", "&", self.conditions)


@final
@dataclass(frozen=True, slots=True)
class _AnyOf(ActionCondition):
    """``any_of(...)`` or ``a | b``."""

    conditions: tuple[ActionCondition, ...]

    def __post_init__(self) -> None:
        """Check the keys of every condition (ConditionError naming the one at fault)."""
        _keys_of(self.conditions)

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Return whether any condition holds."""
        return any(holds(condition, values) for condition in self.conditions)

    @property
    def keys(self) -> frozenset[str]:
        """The keys of every condition."""
        return _keys_of(self.conditions)

    def __repr__(self) -> str:
        return _combination_repr("any_of", "|", self.conditions)


@final
@dataclass(frozen=True, slots=True)
class _Not(ActionCondition):
    """``~condition``."""

    condition: ActionCondition

    def __post_init__(self) -> None:
        """Check the keys of the condition (ConditionError naming its class)."""
        checked_keys(self.condition)

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Return whether the condition does not hold."""
        return not holds(self.condition, values)

    @property
    def keys(self) -> frozenset[str]:
        """The keys of the condition."""
        return checked_keys(self.condition)

    def __repr__(self) -> str:
        return f"~{self.condition!r}"


@final
@dataclass(frozen=True, slots=True)
class _Branches:
    """The condition and the two actions of a conditional action."""

    condition: ActionCondition
    if_true: Action
    if_false: Action

    __hash__: ClassVar[None] = None  # type: ignore[assignment]

    def choose(self, values: Mapping[str, Any]) -> Action:
        """Return the branch the condition picks for ``values`` (not yet resolved)."""
        return self.if_true if holds(self.condition, values) else self.if_false

    def keys(self) -> frozenset[str]:
        """Return every key the condition and the branches may read."""
        keys = checked_keys(self.condition)
        return keys | self.if_true.condition_keys() | self.if_false.condition_keys()


@final
@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Action:
    """What a node's ``post`` returns: where the run goes next.

    Build actions with :meth:`simple`, :meth:`with_params`, :meth:`conditional` and
    :meth:`complete`. Actions are equal when their kind, name, params, result and branches
    are equal; they are unhashable.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    result: Any = None
    is_complete: bool = False
    _branches: _Branches | None = None

    __hash__: ClassVar[None] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"an action name must be a str, not {type(self.name).__name__}")
        object.__setattr__(self, "name", exact_str(self.name))
        if not self.name:
            raise ValueError("an action name must not be empty")
        object.__setattr__(self, "params", MappingProxyType(checked_params(self.params)))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle (and copy) an action as the call that rebuilds it, its params as a dict
        (the read-only view of them cannot be pickled)."""
        fields = (self.name, dict(self.params), self.result, self.is_complete, self._branches)
        return (_rebuild, fields)

    @staticmethod
    def simple(name: str) -> Action:
        """Go to the route for ``name``."""
        return Action(name=name)

    @staticmethod
    def with_params(name: str, /, **params: Any) -> Action:
        """Go to the route for ``name``; the next node receives ``params`` as ``ctx.params``."""
        return Action(name=name, params=params)

    @staticmethod
    def conditional(
        condition: ActionCondition, if_true: Action | str, if_false: Action | str
    ) -> Action:
        """Take ``if_true`` when ``condition`` holds, ``if_false`` otherwise.

        The node actor that ran the step resolves the choice against the store, before
        the router routes the chosen action. A ``str`` branch means
        ``Action.simple(branch)``; branches may themselves be conditional.
        """
        if not isinstance(condition, ActionCondition):
            kind = type(condition).__name__
            raise TypeError(f"conditional() needs an ActionCondition, not {kind}")
        checked_keys(condition)
        branches = _Branches(condition, _as_branch(if_true), _as_branch(if_false))
        return Action(name="<conditional>", _branches=branches)

    @staticmethod
    def complete(result: Any = None) -> Action:
        """End the run; ``result`` becomes ``FlowResult.result``."""
        return Action(name="complete", result=result, is_complete=True)

    @property
    def is_conditional(self) -> bool:
        """Whether this action is a choice resolved against the store (see
        :meth:`conditional`)."""
        return self._branches is not None

    @property
    def condition(self) -> ActionCondition | None:
        """The condition of a conditional action; ``None`` otherwise."""
        return None if self._branches is None else self._branches.condition

    @property
    def if_true(self) -> Action | None:
        """The action taken when the condition holds; ``None`` unless conditional."""
        return None if self._branches is None else self._branches.if_true

    @property
    def if_false(self) -> Action | None:
        """The action taken when the condition does not hold; ``None`` unless conditional."""
        return None if self._branches is None else self._branches.if_false

    def resolve(self, values: Mapping[str, Any]) -> Action:
        """Return the action this one stands for, given the store ``values``.

        A conditional action evaluates its condition and resolves the chosen branch in turn;
        any other action is returned as is.
        """
        if self._branches is None:
            return self
        return self._branches.choose(values).resolve(values)

    def condition_keys(self) -> frozenset[str]:
        """Return every store key that resolving this action may read."""
        if self._branches is None:
            return frozenset()
        return self._branches.keys()

    def __repr__(self) -> str:
        if self._branches is not None:
            branches = self._branches
            args = f"{branches.condition!r}, {branches.if_true!r}, {branches.if_false!r}"
            return f"Action.conditional({args})"
        if self.is_complete and self.result is None:
            return "Action.complete()"
        if self.is_complete:
            return f"Action.complete(result={self.result!r})"
        if not self.params:
            return f"Action.simple({self.name!r})"
        params = ", ".join(_param_repr(key, value) for key, value in self.params.items())
        return f"Action.with_params({self.name!r}, {params})"


def _rebuild(
    name: str,
    params: dict[str, Any],
    result: Any,
    is_complete: bool,
    branches: _Branches | None,
) -> Action:
    """The Action an unpickled or copied action stands for (see ``Action.__reduce__``)."""
    return Action(
        name=name, params=params, result=result, is_complete=is_complete, _branches=branches
    )


def _as_branch(branch: object) -> Action:
    """Return ``branch`` as an Action: a ``str`` means ``Action.simple(branch)``."""
    if isinstance(branch, Action):
        return branch
    if isinstance(branch, str):
        return Action.simple(branch)
    raise TypeError(f"a conditional branch must be an Action or a str, not {type(branch).__name__}")


def _param_repr(key: str, value: Any) -> str:
    """Return ``key=value``, or ``**{'key': value}`` when ``key`` cannot be a keyword
    argument's name (not an identifier, or a Python keyword such as ``class``)."""
    if key.isidentifier() and not keyword.iskeyword(key):
        return f"{key}={value!r}"
    return f"**{{{key!r}: {value!r}}}"


def as_action(value: object, node_id: str) -> Action:
    """Return what the ``post`` of node ``node_id`` returned as an Action.

    An ``Action`` is returned as is, a ``str`` means ``Action.simple(value)`` and ``None``
    means ``Action.simple("default")``.

    Raises:
        ValueError: ``value`` is ``""``; the message names the node.
        TypeError: ``value`` is anything else; the message names the node and the type.
    """
    if isinstance(value, Action):
        return value
    if isinstance(value, str):
        name = exact_str(value)
        if not name:
            raise ValueError(f"node {node_id!r} returned an empty action name from post")
        return _simple(name)
    if value is None:
        return _simple("default")
    raise TypeError(
        f"node {node_id!r} returned {type(value).__name__} from post; expected Action, str or None"
    )


def exact_str(text: str) -> str:
    """``text`` as a str itself, not a subclass: what the engine hashes, compares and
    stores of a user's name is then a plain str, whatever a subclass's methods do."""
    return text if type(text) is str else str.__str__(text)


@functools.lru_cache(maxsize=1024)
def _simple(name: str) -> Action:
    """``Action.simple(name)``, shared: an Action is immutable, and a node returns the
    same few names step after step."""
    return Action.simple(name)
