"""Tests for the safe expression language (cosmoflow_actors.expression)."""

from __future__ import annotations

import itertools
import math
import operator
import sys
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosmoflow_actors.action import ActionCondition
from cosmoflow_actors.errors import ConditionError
from cosmoflow_actors.expression import (
    COMPARISON_OPERATORS,
    MAX_EXPRESSION_LENGTH,
    Expression,
    compare_values,
    parse,
    values_equal,
)

# --- examples ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"count": 4, "status": "ok"}, True),
        ({"count": 3, "status": "ok"}, False),
        ({"count": 4.5, "status": "failed"}, False),
        ({"count": "4", "status": "ok"}, False),
        ({}, False),
    ],
)
def test_documented_example(values: dict[str, Any], expected: bool) -> None:
    expression = parse("${count} > 3 and ${status} == 'ok'")
    assert expression.evaluate(values) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 == 1 or 1 == 2 and 1 == 2", True),  # and binds tighter than or
        ("(1 == 1 or 1 == 2) and 1 == 2", False),
        ("not 1 == 2", True),  # not binds looser than a comparison
        ("not not true", True),
        ("not true and false", False),  # (not true) and false
        ("not (true and false)", True),
        ("-2 < -0.5", True),
        ("1e3 == 1000", True),
        ("2.5E-1 == 0.25", True),
        ("'it\\'s' == \"it's\"", True),
        ('\'a\\\\b\\n\\t\\"\' == "a\\\\b\\n\\t\\""', True),
        ("'abc' < 'abd'", True),
        ("null == null", True),
        ("true != false", True),
        ("(1 < 2) == true", True),
        ("\t1\n==\r\n1 ", True),
    ],
)
def test_operators_and_literals(text: str, expected: bool) -> None:
    assert parse(text).evaluate({}) is expected


@pytest.mark.parametrize(
    ("text", "values", "expected"),
    [
        ("${flag}", {"flag": 1}, True),
        ("${flag}", {"flag": []}, False),
        ("${flag}", {}, False),
        ("${missing} == null", {}, True),
        ("${missing} != 3", {}, True),
        ("${x} == 1", {"x": 1.0}, True),
        ("${x} == 1", {"x": True}, False),
        ("${x} == true", {"x": 1}, False),
        ("${x} == '1'", {"x": 1}, False),
        ("${x} == null", {"x": False}, False),
        ("${x} == ${y}", {"x": [1, 2], "y": [1, 2]}, True),
        ("${x} == ${y}", {"x": [1, 2], "y": (1, 2)}, False),
        ("${x} == ${y}", {"x": {"a": 1}, "y": {"a": 1}}, True),
        ("${x} < 3", {"x": True}, False),
        ("${x} < 3", {"x": None}, False),
        ("${x} >= ${x}", {"x": [1]}, False),
        ("${x} <= 'b'", {"x": "a"}, True),
        ("${x} > 1", {"x": "2"}, False),
        ("${a b} == 1", {"a b": 1}, True),
        ("${x} or ${y}", {"x": 0, "y": "yes"}, True),
        ("(${x} or ${y}) == 'yes'", {"x": 0, "y": "yes"}, False),  # or produces a bool
    ],
)
def test_semantics(text: str, values: dict[str, Any], expected: bool) -> None:
    assert parse(text).evaluate(values) is expected


def _refuse() -> bool:
    raise RuntimeError("refused")


class _Hostile:
    """A store value whose equality and truthiness raise."""

    def __eq__(self, other: object) -> bool:
        return _refuse()

    def __bool__(self) -> bool:
        return _refuse()


class _HostileInt(int):
    """A number whose comparisons raise."""

    def __eq__(self, other: object) -> bool:
        return _refuse()

    def __lt__(self, other: object) -> bool:
        return _refuse()

    def __le__(self, other: object) -> bool:
        return _refuse()

    def __gt__(self, other: object) -> bool:
        return _refuse()

    def __ge__(self, other: object) -> bool:
        return _refuse()

    __hash__ = int.__hash__


class _HostileStr(str):
    """A string whose equality and ordering raise."""

    def __eq__(self, other: object) -> bool:
        return _refuse()

    def __lt__(self, other: object) -> bool:
        return _refuse()

    __hash__ = str.__hash__


class _Ambiguous:
    """A store value whose ``==`` gives a result without a truthiness (like a numpy array)."""

    def __eq__(self, other: object) -> Any:
        return _Hostile()


@pytest.mark.parametrize(
    ("text", "values", "operation", "keys"),
    [
        ("${x} == 3", {"x": _HostileInt(1)}, "'=='", ["x"]),
        ("${x} != 3", {"x": _HostileInt(1)}, "'!='", ["x"]),
        ("${x} < 3", {"x": _HostileInt(1)}, "'<'", ["x"]),
        ("${x} <= 3", {"x": _HostileInt(1)}, "'<='", ["x"]),
        ("3 > ${x}", {"x": _HostileInt(1)}, "'>'", ["x"]),
        ("${x} >= 3.5", {"x": _HostileInt(1)}, "'>='", ["x"]),
        ("${x} == 'a'", {"x": _HostileStr("a")}, "'=='", ["x"]),
        ("${x} < 'b'", {"x": _HostileStr("a")}, "'<'", ["x"]),
        ("${x} == ${y}", {"x": _Hostile(), "y": _Hostile()}, "'=='", ["x", "y"]),
        ("${x} == ${y}", {"x": _Ambiguous(), "y": _Ambiguous()}, "'=='", ["x", "y"]),
        ("${x}", {"x": _Hostile()}, "truthiness", ["x"]),
        ("not ${x}", {"x": _Hostile()}, "truthiness", ["x"]),
        ("true and (${x})", {"x": _Hostile()}, "truthiness", ["x"]),
        ("false or ${x}", {"x": _Hostile()}, "truthiness", ["x"]),
        ("${y} == 1 or ${x} < 3", {"x": _HostileInt(1), "y": 2}, "'<'", ["x"]),
    ],
)
def test_a_value_whose_comparison_raises_fails_evaluation_with_condition_error(
    text: str, values: dict[str, Any], operation: str, keys: list[str]
) -> None:
    with pytest.raises(ConditionError) as caught:
        parse(text).evaluate(values)
    message = str(caught.value)
    assert message.startswith(f"expression {text!r} could not be evaluated: {operation} on ")
    assert all(repr(key) in message for key in keys)
    assert "RuntimeError: refused" in message
    assert isinstance(caught.value.__cause__, RuntimeError)


class _Exiting(int):
    """A number whose comparisons and truthiness call sys.exit()."""

    def __bool__(self) -> bool:
        sys.exit(2)

    def __lt__(self, other: object) -> bool:
        sys.exit(3)

    def __eq__(self, other: object) -> bool:
        sys.exit(4)

    __hash__ = int.__hash__


@pytest.mark.parametrize(
    "condition",
    [
        ActionCondition.expression("${x}"),
        ActionCondition.expression("${x} < 3"),
        ActionCondition.key_equals("x", 1),
        ActionCondition.compare("x", "<", 3),
    ],
    ids=["truthiness", "expression <", "key_equals", "compare <"],
)
def test_a_value_whose_comparison_calls_sys_exit_fails_evaluation_with_condition_error(
    condition: ActionCondition,
) -> None:
    with pytest.raises(ConditionError) as caught:
        condition.evaluate({"x": _Exiting(1)})
    assert "SystemExit" in str(caught.value)
    assert isinstance(caught.value.__cause__, SystemExit)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${x} == 3", False),
        ("${x} != 'a'", True),
        ("${x} < 3", False),
        ("${x} == null", False),
        ("${n} == ${x}", False),
        ("false and ${x}", False),  # and stops at the first false operand
        ("true or ${x}", True),
    ],
)
def test_a_hostile_value_that_is_not_compared_does_not_raise(text: str, expected: bool) -> None:
    """Values of different kinds are unequal without calling their ``==``."""
    assert parse(text).evaluate({"x": _Hostile(), "n": _HostileInt(1)}) is expected


def test_evaluation_error_names_a_long_expression_briefly() -> None:
    text = "${x} < 3" + " or ${y} == 1" * 20
    with pytest.raises(ConditionError, match=r"\.\.\.' could not be evaluated: '<' on"):
        parse(text).evaluate({"x": _HostileInt(1)})


def test_keys_source_and_repr() -> None:
    expression = parse("${a} == 1 or not (${b} < ${a}) and ${c}")
    assert expression.keys == frozenset({"a", "b", "c"})
    assert parse("1 == 1").keys == frozenset()
    assert expression.source == "${a} == 1 or not (${b} < ${a}) and ${c}"
    assert repr(parse("${x} > 3")) == "Expression('${x} > 3')"


def test_equality_is_by_source() -> None:
    assert parse("${x} > 1") == parse("${x} > 1")
    assert parse("${x} > 1") != parse("${x}>1")
    assert hash(parse("1 == 1")) == hash(parse("1 == 1"))


def test_long_chains_do_not_recurse() -> None:
    expression = parse(" and ".join(["${x} == 1"] * 3000))
    assert expression.evaluate({"x": 1}) is True
    assert expression.evaluate({"x": 2}) is False


def test_nesting_within_the_limit_parses() -> None:
    assert parse("(" * 50 + "true" + ")" * 50).evaluate({}) is True


def test_an_expression_at_the_length_limit_parses() -> None:
    text = "${x} == 1" + " " * (MAX_EXPRESSION_LENGTH - len("${x} == 1"))
    assert len(text) == MAX_EXPRESSION_LENGTH == 65_536
    assert parse(text).evaluate({"x": 1}) is True


@pytest.mark.parametrize(
    "text",
    [
        "${x} == 1" + " " * MAX_EXPRESSION_LENGTH,
        " or ".join(["${key} == 'value'"] * 200_000),  # about 4 MB
        "(" * (MAX_EXPRESSION_LENGTH + 1),  # refused before any syntax error is found
    ],
    ids=["one-over", "4MB", "invalid"],
)
def test_an_expression_over_the_length_limit_is_refused_before_parsing(text: str) -> None:
    with pytest.raises(ConditionError) as caught:
        ActionCondition.expression(text)
    assert str(caught.value) == (
        f"expression of {len(text):,} characters is too long; the limit is 65,536 characters"
    )


def test_non_str_source_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        parse(42)  # type: ignore[arg-type]


# --- syntax errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("${x}.y", 5, "'.'"),
        ("a.b", 1, "unknown name 'a'"),
        ("__import__('os')", 1, "unknown name '__import__'"),
        ("f()", 1, "unknown name 'f'"),
        ("foo", 1, "unknown name 'foo'"),
        ("n > 3", 1, "unknown name 'n' (a store value is read as ${n})"),
        ("${x}[0]", 5, "'['"),
        ("1 +", 3, "'+'"),
        ("1 - 2", 3, "'-'"),
        ("2 * 3", 3, "'*'"),
        ("1 = 1", 3, "'='"),
        ("!true", 1, "'!'"),
        ("!${a}", 1, "unexpected character '!' (write 'not' to negate, or '!=')"),
        ("1 = 1", 3, "unexpected character '=' (did you mean '=='?)"),
        ("+3", 1, "unexpected character '+'"),
        ("1e999 == 1e400", 1, "number '1e999' is beyond the float range"),
        ("${x} < -1e400", 8, "number '-1e400' is beyond the float range"),
        ("(1 == 1", 8, "expected ')' but found end of input"),
        ("1 == 1)", 7, "unexpected ')'"),
        ("()", 2, "found ')'"),
        ("'abc", 1, "unterminated string"),
        ('"abc\\"', 1, "unterminated string"),
        ("'abc\\", 5, "ends with a backslash"),
        ("'\\x'", 2, "invalid escape"),
        ("", 1, "empty expression"),
        ("   ", 4, "empty expression"),
        ("1 < 2 < 3", 7, "chained comparison"),
        ("1 < ${x} < 3", 10, "chained comparison"),
        ("1 2", 3, "unexpected '2'"),
        ("true false", 6, "unexpected 'false'"),
        ("1 ==", 5, "found end of input"),
        ("and", 1, "found 'and'"),
        ("1 == not 2", 6, "found 'not'"),
        ("${}", 1, "empty key"),
        ("${x", 1, "unterminated '${'"),
        ("$x", 1, "'$'"),
        ("1.", 2, "'.'"),
        ("True", 1, "unknown name 'True'"),
        ("\u00e9", 1, "'\u00e9'"),
        ("(" * 51 + "1" + ")" * 51, 51, "nested more than 50 levels"),
        ("not " * 51 + "true", 201, "nested more than 50 levels"),
    ],
)
def test_syntax_errors_say_where(text: str, column: int, fragment: str) -> None:
    with pytest.raises(ConditionError) as caught:
        ActionCondition.expression(text)
    message = str(caught.value)
    assert f"at column {column}:" in message
    assert fragment in message


@pytest.mark.parametrize(
    ("text", "column", "word", "number"),
    [
        ("3and true", 2, "and", "3"),
        ("${x} == 1.5or true", 12, "or", "1.5"),
        ("2true", 2, "true", "2"),
        ("-3and true", 3, "and", "-3"),
        ("1e5and true", 4, "and", "1e5"),
        ("3_000 == ${x}", 2, "_000", "3"),
        ("0x10", 2, "x10", "0"),
        ("1e5e5", 4, "e5", "1e5"),
        ("3e", 2, "e", "3"),
    ],
)
def test_a_number_followed_directly_by_a_name_is_refused(
    text: str, column: int, word: str, number: str
) -> None:
    with pytest.raises(ConditionError) as caught:
        parse(text)
    message = str(caught.value)
    assert f"at column {column}: {word!r} right after the number {number!r}" in message
    assert "a number must be followed by a space, an operator, ')' or the end" in message


@pytest.mark.parametrize("text", ["3 and true", "(3)and true", "${x}==3", "-3<=${x}", "(1e5)"])
def test_a_number_followed_by_a_space_an_operator_or_a_parenthesis_parses(text: str) -> None:
    assert parse(text).evaluate({"x": 3})


@pytest.mark.parametrize(
    ("text", "place", "fragment"),
    [
        ("${a} == 1 and\n    ${b} = 2", "line 2, column 10", "did you mean '=='?"),
        ("\n${a} == 1\n  and 3and true\n", "line 3, column 8", "'and' right after"),
        ("${a} ==\n", "line 2, column 1", "found end of input"),
        ("'abc\n", "line 1, column 1", "unterminated string"),
        ("(1 == 1\r\n  or x)", "line 2, column 6", "unknown name 'x'"),
        ("\n\n\n", "line 4, column 1", "empty expression"),
    ],
)
def test_syntax_errors_in_text_of_several_lines_give_the_line_and_column(
    text: str, place: str, fragment: str
) -> None:
    with pytest.raises(ConditionError) as caught:
        parse(text)
    message = str(caught.value)
    assert f" at {place}: " in message
    assert fragment in message


def test_a_syntax_error_in_a_long_text_of_several_lines_quotes_it_cut() -> None:
    text = "${a} == 1 and\n" * 3000 + "x"
    with pytest.raises(ConditionError) as caught:
        parse(text)
    assert " at line 3001, column 1: unknown name 'x'" in str(caught.value)
    assert len(str(caught.value)) < 250


def test_the_largest_float_literal_parses() -> None:
    assert parse("${x} == 1.7976931348623157e308").evaluate({"x": 1.7976931348623157e308})


@pytest.mark.parametrize(
    "text",
    [
        "'a' '" + "x" * 60_000 + "'",  # a long unexpected string token
        "'" + "x" * 60_000,  # an unterminated string, quoted from its start
        "1 == 1 ${" + "k" * 60_000 + "}",  # a long unexpected key
        "(1 == 1 " + "'" + "s" * 60_000 + "'",  # found instead of ')'
        "n" * 60_000,  # a long unknown name, and its hint
        "3" + "n" * 60_000,  # a long name right after a number
    ],
    ids=["string", "unterminated", "key", "expected_close", "name", "after_number"],
)
def test_a_syntax_error_message_quotes_a_long_token_cut(text: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse(text)
    assert len(str(caught.value)) < 400
    assert "..." in str(caught.value).partition(" at column ")[2]


def test_overlong_integer_is_a_condition_error_with_its_cause() -> None:
    with pytest.raises(ConditionError, match="too long") as caught:
        parse("9" * 5000)
    assert isinstance(caught.value.__cause__, ValueError)
    assert len(str(caught.value)) < 200


# --- the equality and ordering helpers -------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (1, 1.0, True),
        (True, True, True),
        (True, 1, False),
        (0, False, False),
        (None, None, True),
        (None, 0, False),
        ("a", "a", True),
        ("1", 1, False),
        ([1], [1], True),
        ([1], (1,), False),
        (math.nan, math.nan, False),
    ],
)
def test_values_equal(left: object, right: object, expected: bool) -> None:
    assert values_equal(left, right) is expected
    assert values_equal(right, left) is expected


@pytest.mark.parametrize(
    ("op", "left", "right", "expected"),
    [
        ("<", 1, 2.5, True),
        (">=", "b", "a", True),
        ("<", "a", 1, False),
        ("<=", None, None, False),
        (">", True, False, False),
        ("!=", 1, "1", True),
        ("==", 2, 2.0, True),
    ],
)
def test_compare_values(op: str, left: object, right: object, expected: bool) -> None:
    assert compare_values(op, left, right) is expected


# --- property-based: generated expressions against a reference evaluator -------------------

Tree = tuple[Any, ...]
_KEYS = ("a", "b", "c")
_ORDERING: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_LEVELS = {"or": 1, "and": 2, "not": 3, "cmp": 4}

# Values of every kind, with pairs that are equal across types (1 and 1.0, True and 1).
_POOL: tuple[Any, ...] = (None, True, False, 0, 1, 1.0, 0.0, -0.5, 2.5, "", "a", "b", "1")
_scalars = st.one_of(
    st.sampled_from(_POOL),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)
_store_values = st.one_of(
    st.sampled_from(_POOL),
    _scalars,
    st.just(math.nan),
    st.lists(st.integers(min_value=0, max_value=1), max_size=2),
    st.tuples(st.integers(min_value=0, max_value=1)),
)
_stores = st.dictionaries(st.sampled_from(_KEYS), _store_values)


def _extend(children: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    return st.one_of(
        st.tuples(
            st.just("cmp"), st.sampled_from(sorted(COMPARISON_OPERATORS)), children, children
        ),
        st.tuples(st.just("not"), children),
        st.tuples(st.just("and"), children, children),
        st.tuples(st.just("or"), children, children),
        st.tuples(st.just("paren"), children),
    )


_trees = st.recursive(
    st.one_of(
        st.tuples(st.just("lit"), _scalars),
        st.tuples(st.just("ref"), st.sampled_from(_KEYS)),
    ),
    _extend,
    max_leaves=10,
)


def _render_literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace("'", "\\'")
        return "'" + escaped.replace("\n", "\\n").replace("\t", "\\t") + "'"
    return repr(value)


def _render_at(tree: Tree, min_level: int) -> str:
    text = _render(tree)
    if _LEVELS.get(tree[0], 5) < min_level:
        return f"({text})"
    return text


def _render(tree: Tree) -> str:
    kind = tree[0]
    if kind == "lit":
        return _render_literal(tree[1])
    if kind == "ref":
        return "${" + str(tree[1]) + "}"
    if kind == "paren":
        return f"({_render(tree[1])})"
    if kind == "not":
        return "not " + _render_at(tree[1], 3)
    if kind == "cmp":
        return f"{_render_at(tree[2], 5)} {tree[1]} {_render_at(tree[3], 5)}"
    level = _LEVELS[kind]
    return f"{_render_at(tree[1], level)} {kind} {_render_at(tree[2], level)}"


def _is_num(value: Any) -> bool:
    return type(value) in (int, float)


def _reference_equal(left: Any, right: Any) -> bool:
    if _is_num(left) and _is_num(right):
        return bool(left == right)
    if _is_num(left) or _is_num(right) or type(left) is not type(right):
        return False
    return bool(left == right)


def _reference_compare(op: str, left: Any, right: Any) -> bool:
    if op == "==":
        return _reference_equal(left, right)
    if op == "!=":
        return not _reference_equal(left, right)
    comparable = (_is_num(left) and _is_num(right)) or (type(left) is str and type(right) is str)
    return comparable and _ORDERING[op](left, right)


def _reference(tree: Tree, values: Mapping[str, Any]) -> Any:
    kind = tree[0]
    if kind == "lit":
        return tree[1]
    if kind == "ref":
        return values.get(tree[1])
    if kind == "paren":
        return _reference(tree[1], values)
    if kind == "not":
        return not _reference(tree[1], values)
    if kind == "cmp":
        return _reference_compare(tree[1], _reference(tree[2], values), _reference(tree[3], values))
    left = bool(_reference(tree[1], values))
    right = bool(_reference(tree[2], values))
    return (left and right) if kind == "and" else (left or right)


def _refs(tree: Tree) -> set[str]:
    if tree[0] == "ref":
        return {tree[1]}
    children = [part for part in tree[1:] if isinstance(part, tuple)]
    return set().union(*(_refs(child) for child in children))


@settings(deadline=None)  # no test depends on the machine's speed
@given(_trees, _stores)
def test_generated_expressions_match_the_reference(tree: Tree, values: dict[str, Any]) -> None:
    expression = parse(_render(tree))
    assert expression.evaluate(values) is bool(_reference(tree, values))


def test_every_comparison_of_pool_values_matches_the_reference() -> None:
    for left, right, op in itertools.product(_POOL, _POOL, sorted(COMPARISON_OPERATORS)):
        tree = ("cmp", op, ("lit", left), ("ref", "a"))
        expected = _reference(tree, {"a": right})
        assert parse(_render(tree)).evaluate({"a": right}) is expected, (left, op, right)


@settings(deadline=None)  # no test depends on the machine's speed
@given(_trees)
def test_generated_expressions_report_their_keys(tree: Tree) -> None:
    assert parse(_render(tree)).keys == frozenset(_refs(tree))


def _parse_or_reject(text: str) -> Expression | None:
    try:
        return parse(text)
    except ConditionError:
        return None


@settings(deadline=None)  # no test depends on the machine's speed
@given(st.text())
def test_arbitrary_text_parses_or_raises_condition_error(text: str) -> None:
    expression = _parse_or_reject(text)
    if expression is not None:
        assert isinstance(expression.evaluate({}), bool)


@settings(deadline=None)  # no test depends on the machine's speed
@given(st.text(alphabet="${}()'\"\\ .-=!<>0123456789eabndortuflsx"))
def test_expression_like_text_parses_or_raises_condition_error(text: str) -> None:
    expression = _parse_or_reject(text)
    if expression is not None:
        assert isinstance(expression.evaluate({"x": 1}), bool)
