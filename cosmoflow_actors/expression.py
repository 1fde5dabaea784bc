"""The safe expression language of ``ActionCondition.expression``.

An expression is parsed once, when the condition is built, by a tokenizer and a
recursive-descent parser; evaluating it walks the parsed tree. Python ``eval`` is never used.

Grammar, from the lowest precedence to the highest::

    expression := or_expr END
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := primary (OPERATOR primary)?        OPERATOR: == != > >= < <=
    primary    := "${" key "}" | NUMBER | STRING | "true" | "false" | "null"
                | "(" or_expr ")"

- ``${key}`` reads a store value; the key is any characters except ``}`` (at least one).
  A missing key reads as null (``None``).
- Numbers are integers or decimals with an optional leading ``-`` (no ``+``) and an
  optional exponent (``3``, ``-0.5``, ``1e3``, ``2.5E-3``); an integer of more digits
  than Python converts, or a decimal beyond the float range (``1e999``), is refused; a
  decimal too small for a float reads as the nearest float (``1e-999`` is ``0.0``).
  A number must be followed by a space, an operator, ``)`` or the end: ``3and true``,
  ``2true``, ``3_000`` (no ``_`` between digits) and ``0x10`` (numbers are decimal) are
  refused.
  Strings use single or double quotes with the escapes ``\\\\ \\' \\" \\n \\t``.
- Chained comparisons (``1 < ${x} < 3``) are rejected; write ``1 < ${x} and ${x} < 3``.
  Parentheses may nest at most 50 levels deep (``not`` counts as a level too).
- An expression is at most ``MAX_EXPRESSION_LENGTH`` characters long (65,536: 64 Ki); a
  longer one is refused before it is parsed.
- Anything else (other names, attribute access, calls, indexing, arithmetic, trailing
  tokens, unbalanced parentheses, unterminated strings, empty input) raises
  :class:`~cosmoflow_actors.errors.ConditionError` with where the fault is and the
  offending token (the source and the token each cut to about 80 characters in the
  message). Where is ``column C`` (counted from 1), or ``line L, column C`` when the text
  holds a line break (lines end at ``\\n``; a ``\\r`` before it counts as a character
  of its line).

Semantics:

- Equality (``==``, ``!=``; also ``ActionCondition.key_equals``): numbers (``int`` or
  ``float``, never ``bool``) compare numerically with each other; a bool equals only a bool;
  null equals only null; a string equals only a string; other values (lists, dicts read from
  the store) compare with Python ``==`` only when both have the same type, so their items
  compare as Python does (``[1]`` equals ``[True]``). Any other pair is unequal, and ``!=``
  is the negation of ``==``. A stored tuple comes back as a list from a store with the JSON
  codec, and a list never equals a tuple.
- Ordering (``< <= > >=``) is true only when both operands are numbers or both are strings,
  compared as Python does; any other pair (including null) gives false.
- ``and``, ``or`` and ``not`` use the Python truthiness of their operands and produce a
  bool. A bare operand as the whole expression (``${flag}``) yields its truthiness.
- Evaluation raises nothing but :class:`~cosmoflow_actors.errors.ConditionError`: when a
  store value's comparison or truthiness raises, the error names the expression, the
  operator (or truthiness) and the store keys at fault, and is chained from the original.
"""

from __future__ import annotations

import math
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Final, Literal, TypeGuard, final, get_args

from cosmoflow_actors.errors import ConditionError, type_and_message

__all__ = [
    "COMPARISON_OPERATORS",
    "MAX_EXPRESSION_LENGTH",
    "ComparisonOperator",
    "Expression",
    "compare_values",
    "evaluation_error",
    "is_number",
    "parse",
    "values_equal",
]

Scalar = int | float | str | bool | None
"""The type of a literal in an expression."""

_ORDERINGS: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}

ComparisonOperator = Literal["==", "!=", ">", ">=", "<", "<="]
COMPARISON_OPERATORS: Final[frozenset[str]] = frozenset(get_args(ComparisonOperator))
"""The comparison operators of the language (and of ``ActionCondition.compare``)."""

_KEYWORD_VALUES: Final[dict[str, Scalar]] = {"true": True, "false": False, "null": None}
_KEYWORDS: Final[frozenset[str]] = frozenset({"and", "or", "not", *_KEYWORD_VALUES})
_ESCAPES: Final[dict[str, str]] = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t"}
_NUMBER: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD: Final = re.compile(r"[A-Za-z0-9_]+")
_OPERATOR: Final = re.compile(r"==|!=|<=|>=|<|>")
_MAX_DEPTH: Final = 50
MAX_EXPRESSION_LENGTH: Final = 64 * 1024
"""The longest expression :func:`parse` accepts, in characters."""
_MAX_QUOTED: Final = 80


def is_number(value: object) -> TypeGuard[int | float]:
    """Return whether ``value`` is a number of the language: an int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def values_equal(left: object, right: object) -> bool:
    """Return whether ``left == right`` under the language's equality (see the module doc).

    Raises whatever the values' ``==`` or the truthiness of its result raises.
    """
    if is_number(left) or is_number(right):
        return is_number(left) and is_number(right) and bool(left == right)
    if isinstance(left, str) or isinstance(right, str):
        return isinstance(left, str) and isinstance(right, str) and bool(left == right)
    return type(left) is type(right) and bool(left == right)


def compare_values(op: str, left: object, right: object) -> bool:
    """Return the result of ``left op right``; ``op`` must be in ``COMPARISON_OPERATORS``.

    Raises whatever the values' comparison or the truthiness of its result raises.
    """
    if op == "==":
        return values_equal(left, right)
    if op == "!=":
        return not values_equal(left, right)
    both_numbers = is_number(left) and is_number(right)
    both_strings = isinstance(left, str) and isinstance(right, str)
    if not (both_numbers or both_strings):
        return False
    return bool(_ORDERINGS[op](left, right))


def evaluation_error(
    condition: str, operation: str, keys: Collection[str], cause: BaseException
) -> ConditionError:
    """Return the ConditionError for ``operation`` on the store ``keys`` raising ``cause``
    while ``condition`` was evaluated; raise it ``from cause``."""
    noun = "key" if len(keys) == 1 else "keys"
    names = ", ".join(map(repr, sorted(keys)))
    return ConditionError(
        f"{condition} could not be evaluated: {operation} on store {noun} {names} "
        f"raised {type_and_message(cause)}"
    )


class _EvaluationFault(Exception):
    """A store value's comparison or truthiness raised ``cause`` while a node was computed;
    :meth:`Expression.evaluate` turns it into a ConditionError naming the expression."""

    def __init__(self, operation: str, keys: frozenset[str], cause: BaseException) -> None:
        super().__init__(operation)
        self.operation = operation
        self.keys = keys
        self.cause = cause


def _truthy(node: _Node, values: Mapping[str, Any]) -> bool:
    """Return the Python truthiness of the value of ``node`` for the store ``values``.

    Raises:
        _EvaluationFault: ``bool()`` of the value raised.
    """
    value = node.compute(values)
    try:
        return bool(value)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # sys.exit() in a value's __bool__ too
        raise _EvaluationFault("truthiness", node.keys(), exc) from exc


# --- the parsed tree -----------------------------------------------------------------------


class _Node(ABC):
    """A node of a parsed expression."""

    __slots__ = ()

    @abstractmethod
    def compute(self, values: Mapping[str, Any]) -> object:
        """Return the value of this node for the store ``values``."""

    @abstractmethod
    def keys(self) -> frozenset[str]:
        """Return every store key this node reads."""


@final
@dataclass(frozen=True, slots=True)
class _Ref(_Node):
    """``${key}``: a store value, ``None`` when missing."""

    key: str

    def compute(self, values: Mapping[str, Any]) -> object:
        """Return the store value of the key, or ``None``."""
        return values.get(self.key)

    def keys(self) -> frozenset[str]:
        """Return the key."""
        return frozenset({self.key})


@final
@dataclass(frozen=True, slots=True)
class _Literal(_Node):
    """A number, string, ``true``, ``false`` or ``null``."""

    constant: Scalar

    def compute(self, values: Mapping[str, Any]) -> object:
        """Return the constant."""
        return self.constant

    def keys(self) -> frozenset[str]:
        """Return no keys."""
        return frozenset()


@final
@dataclass(frozen=True, slots=True)
class _Compare(_Node):
    """``left op right``."""

    op: str
    left: _Node
    right: _Node

    def compute(self, values: Mapping[str, Any]) -> object:
        """Return the comparison of both operands.

        Raises:
            _EvaluationFault: the operands' comparison raised.
        """
        left = self.left.compute(values)
        right = self.right.compute(values)
        try:
            return compare_values(self.op, left, right)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # sys.exit() in a value's __eq__ too
            raise _EvaluationFault(f"{self.op!r}", self.keys(), exc) from exc

    def keys(self) -> frozenset[str]:
        """Return the keys of both operands."""
        return self.left.keys() | self.right.keys()


@final
@dataclass(frozen=True, slots=True)
class _Not(_Node):
    """``not operand``."""

    operand: _Node

    def compute(self, values: Mapping[str, Any]) -> object:
        """Return the negated truthiness of the operand."""
        return not _truthy(self.operand, values)

    def keys(self) -> frozenset[str]:
        """Return the keys of the operand."""
        return self.operand.keys()


@final
@dataclass(frozen=True, slots=True)
class _And(_Node):
    """``a and b and ...``."""

    operands: tuple[_Node, ...]

    def compute(self, values: Mapping[str, Any]) -> object:
        """Return whether every operand is truthy (stopping at the first that is not)."""
        return all(_truthy(operand, values) for operand in self.operands)

    def keys(self) -> frozenset[str]:
        """Return the keys of every operand."""
        return frozenset().union(*(operand.keys() for operand in self.operands))


@final
@dataclass(frozen=True, slots=True)
class _Or(_Node):
    """``a or b or ...``."""

    operands: tuple[_Node, ...]

    def compute(self, values: Mapping[str, Any]) -> object:
        """Return whether any operand is truthy (stopping at the first that is)."""
        return any(_truthy(operand, values) for operand in self.operands)

    def keys(self) -> frozenset[str]:
        """Return the keys of every operand."""
        return frozenset().union(*(operand.keys() for operand in self.operands))


@final
@dataclass(frozen=True, slots=True)
class Expression:
    """A parsed expression; build it with :func:`parse`. Equal when the sources are equal."""

    source: str
    root: _Node = field(compare=False)

    @property
    def keys(self) -> frozenset[str]:
        """Every store key the expression reads."""
        return self.root.keys()

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Return the truthiness of the expression for the store ``values``.

        Raises:
            ConditionError: a store value's comparison or truthiness raised; the message
                names the expression, the operator (or truthiness) and the store keys, and
                the original exception is ``__cause__``.
        """
        try:
            return _truthy(self.root, values)
        except _EvaluationFault as fault:
            condition = f"expression {_quoted(self.source)}"
            error = evaluation_error(condition, fault.operation, fault.keys, fault.cause)
            raise error from fault.cause

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


# --- tokens --------------------------------------------------------------------------------


class _Kind(Enum):
    """The kinds of token."""

    REF = auto()
    NUMBER = auto()
    STRING = auto()
    KEYWORD = auto()
    OPERATOR = auto()
    OPEN = auto()
    CLOSE = auto()
    END = auto()


@dataclass(frozen=True, slots=True)
class _Token:
    """A token: its kind, its source text, its value and the index of its first character
    in the source (the length of the source for the END token)."""

    kind: _Kind
    text: str
    start: int
    value: Scalar = None

    def describe(self) -> str:
        """Describe the token for an error message."""
        if self.kind is _Kind.END:
            return "end of input"
        return _quoted(self.text)


def _cut(text: str) -> str:
    """Return ``text``, cut to ``_MAX_QUOTED`` characters (ending ``...``) for a message."""
    if len(text) > _MAX_QUOTED:
        return text[: _MAX_QUOTED - 3] + "..."
    return text


def _quoted(text: str) -> str:
    """Return ``repr(text)``, cut to about ``_MAX_QUOTED`` characters for a message."""
    return repr(_cut(text))


def _place(source: str, index: int) -> str:
    """Return where ``source[index]`` is for a message: ``column C``, or ``line L, column C``
    when ``source`` holds a line break (both counted from 1)."""
    if "\n" not in source:
        return f"column {index + 1}"
    line = source.count("\n", 0, index) + 1
    line_start = source.rfind("\n", 0, index) + 1
    return f"line {line}, column {index - line_start + 1}"


def _syntax_error(source: str, index: int, message: str) -> ConditionError:
    """Return the ConditionError for a fault at ``source[index]``."""
    where = _place(source, index)
    return ConditionError(f"invalid expression {_quoted(source)} at {where}: {message}")


class _Lexer:
    """Splits the source into tokens, left to right."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._pos = 0

    def tokens(self) -> Iterator[_Token]:
        """Yield every token, ending with an END token."""
        while True:
            self._skip_space()
            if self._pos >= len(self._source):
                yield _Token(_Kind.END, "", self._pos)
                return
            yield self._next_token()

    def _skip_space(self) -> None:
        while self._pos < len(self._source) and self._source[self._pos].isspace():
            self._pos += 1

    def _next_token(self) -> _Token:
        char = self._source[self._pos]
        if char in "()":
            kind = _Kind.OPEN if char == "(" else _Kind.CLOSE
            return self._take(kind, 1)
        if char == "$":
            return self._reference()
        if char in "'\"":
            return self._string(char)
        if char == "-" or (char.isascii() and char.isdigit()):
            return self._number()
        if char in "=!<>":
            return self._operator()
        name = _NAME.match(self._source, self._pos)
        if name is not None:
            return self._keyword(name.group())
        raise self._error(self._pos, f"unexpected character {char!r}")

    def _take(self, kind: _Kind, length: int, value: Scalar = None) -> _Token:
        """Return a token of ``length`` characters at the current position and skip it."""
        start = self._pos
        self._pos += length
        return _Token(kind, self._source[start : self._pos], start, value)

    def _error(self, pos: int, message: str) -> ConditionError:
        return _syntax_error(self._source, pos, message)

    def _reference(self) -> _Token:
        if not self._source.startswith("${", self._pos):
            raise self._error(self._pos, "unexpected character '$' (write ${key})")
        end = self._source.find("}", self._pos + 2)
        if end == -1:
            raise self._error(self._pos, "unterminated '${' (missing '}')")
        key = self._source[self._pos + 2 : end]
        if not key:
            raise self._error(self._pos, "empty key in '${}'")
        return self._take(_Kind.REF, end + 1 - self._pos, key)

    def _string(self, quote: str) -> _Token:
        start = self._pos
        chars: list[str] = []
        pos = start + 1
        while pos < len(self._source) and self._source[pos] != quote:
            if self._source[pos] == "\\":
                chars.append(self._escape(pos))
                pos += 2
            else:
                chars.append(self._source[pos])
                pos += 1
        if pos >= len(self._source):
            raise self._error(start, f"unterminated string {_quoted(self._source[start:])}")
        return self._take(_Kind.STRING, pos + 1 - start, "".join(chars))

    def _escape(self, pos: int) -> str:
        """Return the character the escape sequence at ``pos`` stands for."""
        sequence = self._source[pos : pos + 2]
        if len(sequence) < 2:
            raise self._error(pos, "unterminated string (it ends with a backslash)")
        if sequence[1] not in _ESCAPES:
            raise self._error(pos, f"invalid escape {sequence!r}")
        return _ESCAPES[sequence[1]]

    def _number(self) -> _Token:
        match = _NUMBER.match(self._source, self._pos)
        if match is None:
            raise self._error(self._pos, "unexpected character '-' (arithmetic is not supported)")
        text = match.group()
        glued = _WORD.match(self._source, match.end())
        if glued is not None:
            raise self._error(
                match.end(),
                f"{_quoted(glued.group())} right after the number {_quoted(text)}; "
                "a number must be followed by a space, an operator, ')' or the end",
            )
        return self._take(_Kind.NUMBER, len(text), self._number_value(text))

    def _number_value(self, text: str) -> int | float:
        if any(char in text for char in ".eE"):
            value = float(text)
            if math.isinf(value):
                raise self._error(self._pos, f"number {_quoted(text)} is beyond the float range")
            return value
        try:
            return int(text)
        except ValueError as exc:
            raise self._error(self._pos, f"number with {len(text)} digits is too long") from exc

    def _operator(self) -> _Token:
        match = _OPERATOR.match(self._source, self._pos)
        if match is None:
            char = self._source[self._pos]
            hint = "did you mean '=='?" if char == "=" else "write 'not' to negate, or '!='"
            raise self._error(self._pos, f"unexpected character {char!r} ({hint})")
        return self._take(_Kind.OPERATOR, len(match.group()))

    def _keyword(self, name: str) -> _Token:
        if name not in _KEYWORDS:
            hint = f"a store value is read as ${{{_cut(name)}}}"
            raise self._error(self._pos, f"unknown name {_quoted(name)} ({hint})")
        return self._take(_Kind.KEYWORD, len(name), _KEYWORD_VALUES.get(name))


# --- parser --------------------------------------------------------------------------------


class _Parser:
    """A recursive-descent parser over the tokens of one source."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._tokens = list(_Lexer(source).tokens())
        self._index = 0
        self._depth = 0

    def parse(self) -> _Node:
        """Parse the whole source as one expression."""
        if self._peek().kind is _Kind.END:
            raise self._error(self._peek(), "empty expression")
        root = self._or()
        token = self._peek()
        if token.kind is not _Kind.END:
            raise self._error(token, f"unexpected {token.describe()} after a complete expression")
        return root

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _advance(self) -> _Token:
        """Return the current token and move past it (never past the END token)."""
        token = self._tokens[self._index]
        if token.kind is not _Kind.END:
            self._index += 1
        return token

    def _at_keyword(self, word: str) -> bool:
        token = self._peek()
        return token.kind is _Kind.KEYWORD and token.text == word

    def _error(self, token: _Token, message: str) -> ConditionError:
        return _syntax_error(self._source, token.start, message)

    def _enter(self, token: _Token) -> None:
        """Count one more level of nesting, refusing to go deeper than ``_MAX_DEPTH``."""
        self._depth += 1
        if self._depth > _MAX_DEPTH:
            raise self._error(token, f"expression nested more than {_MAX_DEPTH} levels deep")

    def _or(self) -> _Node:
        operands = [self._and()]
        while self._at_keyword("or"):
            self._advance()
            operands.append(self._and())
        return operands[0] if len(operands) == 1 else _Or(tuple(operands))

    def _and(self) -> _Node:
        operands = [self._not()]
        while self._at_keyword("and"):
            self._advance()
            operands.append(self._not())
        return operands[0] if len(operands) == 1 else _And(tuple(operands))

    def _not(self) -> _Node:
        if not self._at_keyword("not"):
            return self._comparison()
        self._enter(self._advance())
        operand = self._not()
        self._depth -= 1
        return _Not(operand)

    def _comparison(self) -> _Node:
        left = self._primary()
        if self._peek().kind is not _Kind.OPERATOR:
            return left
        op = self._advance().text
        right = self._primary()
        token = self._peek()
        if token.kind is _Kind.OPERATOR:
            message = f"chained comparison at {token.describe()}; join comparisons with 'and'"
            raise self._error(token, message)
        return _Compare(op, left, right)

    def _primary(self) -> _Node:
        token = self._advance()
        if token.kind is _Kind.REF:
            return _Ref(str(token.value))
        if token.kind in (_Kind.NUMBER, _Kind.STRING):
            return _Literal(token.value)
        if token.kind is _Kind.KEYWORD and token.text in _KEYWORD_VALUES:
            return _Literal(token.value)
        if token.kind is _Kind.OPEN:
            return self._parenthesized(token)
        raise self._error(token, f"expected a value but found {token.describe()}")

    def _parenthesized(self, opening: _Token) -> _Node:
        self._enter(opening)
        inner = self._or()
        closing = self._advance()
        if closing.kind is not _Kind.CLOSE:
            raise self._error(closing, f"expected ')' but found {closing.describe()}")
        self._depth -= 1
        return inner


def parse(text: str) -> Expression:
    """Parse ``text`` into an :class:`Expression`.

    Raises:
        ConditionError: ``text`` is not a valid expression; the message gives the column
            (and the line, when ``text`` holds a line break) and the offending token. Or
            ``text`` is longer than ``MAX_EXPRESSION_LENGTH`` characters (refused before
            parsing it); the message gives both lengths.
    """
    if not isinstance(text, str):
        raise TypeError(f"an expression must be a str, not {type(text).__name__}")
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ConditionError(
            f"expression of {len(text):,} characters is too long; "
            f"the limit is {MAX_EXPRESSION_LENGTH:,} characters"
        )
    return Expression(text, _Parser(text).parse())
