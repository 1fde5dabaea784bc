"""Tests for actions and action conditions (cosmoflow_actors.action)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import cloudpickle
import pytest
import trio

import cosmoflow_actors as cf
from cosmoflow_actors.action import Action, ActionCondition, as_action, holds
from cosmoflow_actors.errors import ConditionError
from tests.support import Recorder, single

# --- constructors --------------------------------------------------------------------------


def test_simple_action() -> None:
    action = Action.simple("next")
    assert action.name == "next"
    assert dict(action.params) == {}
    assert action.result is None
    assert not action.is_complete
    assert not action.is_conditional
    assert (action.condition, action.if_true, action.if_false) == (None, None, None)


def test_action_with_params() -> None:
    action = Action.with_params("retry", count=3, name="x")
    assert action.name == "retry"
    assert dict(action.params) == {"count": 3, "name": "x"}
    assert not action.is_complete
    assert not action.is_conditional


def test_params_are_read_only_and_copied() -> None:
    source = {"count": 3}
    action = Action(name="retry", params=source)
    source["count"] = 4
    assert action.params["count"] == 3
    with pytest.raises(TypeError):
        action.params["count"] = 5  # type: ignore[index]


@pytest.mark.parametrize(
    ("params", "message"),
    [([("count", 3)], "params must be a mapping or None, got list"), ({3: 3}, "keys must be str")],
)
def test_params_that_are_not_a_mapping_of_str_keys_are_refused(params: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        Action(name="retry", params=params)


def test_complete_action() -> None:
    action = Action.complete(result={"answer": 42})
    assert action.name == "complete"
    assert action.is_complete
    assert action.result == {"answer": 42}
    assert not action.is_conditional
    assert Action.complete().result is None


def test_conditional_action_turns_str_branches_into_simple_actions() -> None:
    condition = ActionCondition.key_exists("user")
    action = Action.conditional(condition, "authenticated", Action.with_params("login", r=1))
    assert action.name == "<conditional>"
    assert action.is_conditional
    assert not action.is_complete
    assert action.condition == condition
    assert action.if_true == Action.simple("authenticated")
    assert action.if_false == Action.with_params("login", r=1)


def test_actions_are_immutable() -> None:
    action = Action.simple("next")
    with pytest.raises(dataclasses.FrozenInstanceError):
        action.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [("", ValueError, "must not be empty"), (3, TypeError, "must be a str, not int")],
)
def test_action_name_is_validated(name: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Action.simple(name)
    with pytest.raises(error, match=match):
        Action.with_params(name, count=1)


def test_conditional_arguments_are_validated() -> None:
    with pytest.raises(TypeError, match="needs an ActionCondition, not bool"):
        Action.conditional(True, "a", "b")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be an Action or a str, not int"):
        Action.conditional(ActionCondition.always(), "a", 3)  # type: ignore[arg-type]


# --- equality and repr ---------------------------------------------------------------------


def test_equal_actions() -> None:
    condition = ActionCondition.compare("n", "<", 3)
    assert Action.simple("a") == Action.simple("a")
    assert Action.with_params("a", x=[1]) == Action.with_params("a", x=[1])
    assert Action.with_params("a") == Action.simple("a")
    assert Action.complete(1) == Action.complete(1)
    assert Action.conditional(condition, "a", "b") == Action.conditional(
        ActionCondition.compare("n", "<", 3), Action.simple("a"), "b"
    )


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (Action.simple("a"), Action.simple("b")),
        (Action.simple("complete"), Action.complete()),
        (Action.with_params("a", x=1), Action.with_params("a", x=2)),
        (Action.with_params("a", x=1), Action.simple("a")),
        (Action.complete(1), Action.complete(2)),
        (
            Action.conditional(ActionCondition.always(), "a", "b"),
            Action.conditional(ActionCondition.always(), "a", "c"),
        ),
        (
            Action.conditional(ActionCondition.always(), "a", "b"),
            Action.conditional(ActionCondition.never(), "a", "b"),
        ),
    ],
)
def test_unequal_actions(left: Action, right: Action) -> None:
    assert left != right
    assert right != left


def test_actions_are_unhashable_and_not_equal_to_other_types() -> None:
    with pytest.raises(TypeError):
        hash(Action.simple("a"))
    name: object = "a"
    assert Action.simple("a") != name


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (Action.simple("next"), "Action.simple('next')"),
        (Action.with_params("retry", count=3), "Action.with_params('retry', count=3)"),
        (
            Action.with_params("go", **{"a-b": 1, "c": "d"}),
            "Action.with_params('go', **{'a-b': 1}, c='d')",
        ),
        (
            Action.with_params("go", **{"class": 2, "None": 3}),
            "Action.with_params('go', **{'class': 2}, **{'None': 3})",
        ),
        (Action.complete(result=42), "Action.complete(result=42)"),
        (Action.complete(), "Action.complete()"),
        (
            Action.conditional(ActionCondition.key_exists("user"), "a", "b"),
            "Action.conditional(ActionCondition.key_exists('user'), "
            "Action.simple('a'), Action.simple('b'))",
        ),
    ],
)
def test_repr(action: Action, expected: str) -> None:
    assert repr(action) == expected


# --- resolve and condition_keys ------------------------------------------------------------

_NESTED = Action.conditional(
    ActionCondition.key_exists("user"),
    Action.conditional(ActionCondition.compare("age", ">=", 18), "adult", "minor"),
    Action.conditional(ActionCondition.expression("${guest} == true"), "guest", "login"),
)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"user": "ann", "age": 30}, Action.simple("adult")),
        ({"user": "bob", "age": 12}, Action.simple("minor")),
        ({"user": "cy"}, Action.simple("minor")),
        ({"guest": True}, Action.simple("guest")),
        ({}, Action.simple("login")),
    ],
)
def test_resolve_nested_conditional(values: dict[str, Any], expected: Action) -> None:
    assert _NESTED.resolve(values) == expected


def test_resolve_returns_other_actions_themselves() -> None:
    for action in (Action.simple("a"), Action.with_params("a", x=1), Action.complete(3)):
        assert action.resolve({"a": 1}) is action


def test_condition_keys() -> None:
    assert _NESTED.condition_keys() == frozenset({"user", "age", "guest"})
    assert Action.simple("a").condition_keys() == frozenset()
    assert Action.complete().condition_keys() == frozenset()


# --- as_action -----------------------------------------------------------------------------


def test_as_action() -> None:
    action = Action.with_params("retry", count=1)
    assert as_action(action, "fetch") is action
    assert as_action("next", "fetch") == Action.simple("next")
    assert as_action(None, "fetch") == Action.simple("default")


@pytest.mark.parametrize(("value", "type_name"), [(42, "int"), (["next"], "list"), (True, "bool")])
def test_as_action_rejects_other_values(value: object, type_name: str) -> None:
    expected = f"node 'fetch' returned {type_name} from post; expected Action, str or None"
    with pytest.raises(TypeError) as caught:
        as_action(value, "fetch")
    assert str(caught.value) == expected


# --- conditions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "values", "expected"),
    [
        (ActionCondition.always(), {}, True),
        (ActionCondition.never(), {"k": 1}, False),
        (ActionCondition.key_exists("k"), {"k": None}, True),
        (ActionCondition.key_exists("k"), {"other": 1}, False),
        (ActionCondition.key_equals("k", "ok"), {"k": "ok"}, True),
        (ActionCondition.key_equals("k", "ok"), {"k": "no"}, False),
        (ActionCondition.key_equals("k", "ok"), {}, False),
        (ActionCondition.key_equals("k", None), {}, False),
        (ActionCondition.key_equals("k", None), {"k": None}, True),
        (ActionCondition.key_equals("k", 1), {"k": 1.0}, True),
        (ActionCondition.key_equals("k", 1), {"k": True}, False),
        (ActionCondition.key_equals("k", [1, 2]), {"k": [1, 2]}, True),
        (ActionCondition.key_equals("k", [1, 2]), {"k": (1, 2)}, False),
        (ActionCondition.compare("n", "<", 3), {"n": 2}, True),
        (ActionCondition.compare("n", "<", 3), {"n": 3}, False),
        (ActionCondition.compare("n", "<=", 3), {"n": 3.0}, True),
        (ActionCondition.compare("n", ">", 2.5), {"n": 3}, True),
        (ActionCondition.compare("n", ">=", 3), {"n": 2}, False),
        (ActionCondition.compare("n", "==", 3), {"n": 3}, True),
        (ActionCondition.compare("n", "!=", 3), {"n": 4}, True),
        (ActionCondition.compare("n", "!=", 3), {}, False),
        (ActionCondition.compare("n", "!=", 3), {"n": "4"}, False),
        (ActionCondition.compare("n", "!=", 1), {"n": True}, False),
        (ActionCondition.compare("n", "<", 3), {"n": None}, False),
        (ActionCondition.expression("${n} > 1 and ${s} == 'ok'"), {"n": 2, "s": "ok"}, True),
        (ActionCondition.expression("${n} > 1 and ${s} == 'ok'"), {"n": 2}, False),
    ],
)
def test_condition_evaluation(
    condition: ActionCondition, values: dict[str, Any], expected: bool
) -> None:
    assert condition.evaluate(values) is expected


class _HostileInt(int):
    """A number whose equality and ordering raise."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("refused")

    def __lt__(self, other: object) -> bool:
        raise RuntimeError("refused")

    def __le__(self, other: object) -> bool:
        raise RuntimeError("refused")

    def __gt__(self, other: object) -> bool:
        raise RuntimeError("refused")

    def __ge__(self, other: object) -> bool:
        raise RuntimeError("refused")

    __hash__ = int.__hash__


class _HostileList(list[int]):
    """A list whose equality raises."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("refused")

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("condition", "values", "named", "operation"),
    [
        (ActionCondition.key_equals("k", 1), {"k": _HostileInt(1)}, "key_equals('k', 1)", "'=='"),
        (
            ActionCondition.key_equals("k", _HostileList()),
            {"k": _HostileList()},
            "key_equals('k', [])",
            "'=='",
        ),
        *(
            (ActionCondition.compare("n", op, 3), {"n": _HostileInt(1)}, f"'{op}', 3)", f"'{op}'")
            for op in ("==", "!=", "<", "<=", ">", ">=")
        ),
        (
            ActionCondition.expression("${n} < 3"),
            {"n": _HostileInt(1)},
            "expression '${n} < 3'",
            "'<'",
        ),
        (
            ActionCondition.key_exists("n") & ActionCondition.compare("n", "<", 3),
            {"n": _HostileInt(1)},
            "compare('n', '<', 3)",
            "'<'",
        ),
        (
            ~ActionCondition.any_of(ActionCondition.never(), ActionCondition.key_equals("n", 1)),
            {"n": _HostileInt(1)},
            "key_equals('n', 1)",
            "'=='",
        ),
    ],
)
def test_a_value_whose_comparison_raises_fails_the_condition_with_condition_error(
    condition: ActionCondition, values: dict[str, Any], named: str, operation: str
) -> None:
    key = next(iter(values))
    with pytest.raises(ConditionError) as caught:
        condition.evaluate(values)
    message = str(caught.value)
    assert f"{named} could not be evaluated: {operation} on store key {key!r} raised" in message
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_resolving_a_conditional_action_whose_comparison_raises_raises_condition_error() -> None:
    action = Action.conditional(ActionCondition.compare("n", ">", 3), "big", "small")
    with pytest.raises(ConditionError, match="compare\\('n', '>', 3\\) could not be evaluated"):
        action.resolve({"n": _HostileInt(5)})


_TRUE = ActionCondition.always()
_FALSE = ActionCondition.never()


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (_TRUE & _TRUE, True),
        (_TRUE & _FALSE, False),
        (_FALSE | _TRUE, True),
        (_FALSE | _FALSE, False),
        (~_TRUE, False),
        (~_FALSE, True),
        (ActionCondition.all_of(), True),
        (ActionCondition.any_of(), False),
        (ActionCondition.all_of(_TRUE, _TRUE, _FALSE), False),
        (ActionCondition.any_of(_FALSE, _FALSE, _TRUE), True),
        (~(_FALSE | _FALSE) & _TRUE, True),
    ],
)
def test_combinators(condition: ActionCondition, expected: bool) -> None:
    assert condition.evaluate({}) is expected


def test_combinators_reject_other_operands() -> None:
    with pytest.raises(TypeError):
        _ = _TRUE & True
    with pytest.raises(TypeError, match=r"all_of\(\) takes ActionCondition arguments, not int"):
        ActionCondition.all_of(_TRUE, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"any_of\(\)"):
        ActionCondition.any_of("x")  # type: ignore[arg-type]


def test_condition_keys_of_every_kind() -> None:
    condition = (
        ActionCondition.key_exists("a") & ActionCondition.key_equals("b", 1)
        | ~ActionCondition.compare("c", ">", 0)
        | ActionCondition.any_of(ActionCondition.expression("${d} or ${e}"), _TRUE)
    )
    assert condition.keys == frozenset({"a", "b", "c", "d", "e"})
    assert _TRUE.keys == frozenset()


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (ActionCondition.always(), "ActionCondition.always()"),
        (ActionCondition.never(), "ActionCondition.never()"),
        (ActionCondition.key_exists("user"), "ActionCondition.key_exists('user')"),
        (ActionCondition.key_equals("s", "ok"), "ActionCondition.key_equals('s', 'ok')"),
        (ActionCondition.compare("n", "<", 3), "ActionCondition.compare('n', '<', 3)"),
        (ActionCondition.expression("${n} > 1"), "ActionCondition.expression('${n} > 1')"),
        (_TRUE & _FALSE, "(ActionCondition.always() & ActionCondition.never())"),
        (_TRUE | ~_FALSE, "(ActionCondition.always() | ~ActionCondition.never())"),
        (ActionCondition.all_of(), "ActionCondition.all_of()"),
        (ActionCondition.any_of(_TRUE), "ActionCondition.any_of(ActionCondition.always())"),
    ],
)
def test_condition_repr(condition: ActionCondition, expected: str) -> None:
    assert repr(condition) == expected


def test_condition_equality() -> None:
    assert ActionCondition.compare("n", "<", 3) == ActionCondition.compare("n", "<", 3)
    assert ActionCondition.compare("n", "<", 3) != ActionCondition.compare("n", "<=", 3)
    assert ActionCondition.key_equals("k", [1]) == ActionCondition.key_equals("k", [1])
    assert ActionCondition.key_equals("k", 1) != ActionCondition.key_equals("k", True)
    assert hash(ActionCondition.key_equals("k", 1)) == hash(ActionCondition.key_equals("k", 1))
    assert ActionCondition.expression("${a}") == ActionCondition.expression("${a}")
    assert ActionCondition.all_of(_TRUE, _FALSE) == _TRUE & _FALSE
    assert _TRUE != _FALSE


@pytest.mark.parametrize("op", ["=>", "=", "<>", "in", ""])
def test_compare_rejects_unknown_operators(op: str) -> None:
    with pytest.raises(ConditionError, match=f"unknown comparison operator '{op}'"):
        ActionCondition.compare("n", op, 3)


@pytest.mark.parametrize(
    ("number", "type_name"), [(True, "bool"), ("3", "str"), (None, "NoneType")]
)
def test_compare_rejects_non_numbers(number: Any, type_name: str) -> None:
    with pytest.raises(ConditionError, match=f"not {type_name}"):
        ActionCondition.compare("n", "<", number)


@pytest.mark.parametrize("key", ["", 3, None])
def test_condition_keys_are_validated(key: Any) -> None:
    with pytest.raises(ConditionError, match="non-empty str"):
        ActionCondition.key_exists(key)
    with pytest.raises(ConditionError, match="non-empty str"):
        ActionCondition.key_equals(key, 1)


def test_expression_syntax_error_is_raised_at_construction() -> None:
    with pytest.raises(ConditionError, match="column 5"):
        ActionCondition.expression("${x}.y")


# --- copying and pickling ------------------------------------------------------------------

_EVERY_CONDITION = ActionCondition.any_of(
    ActionCondition.always(),
    ActionCondition.never(),
    ActionCondition.key_exists("a") & ActionCondition.key_equals("b", [1, {"x": 2}]),
    ~ActionCondition.compare("c", ">=", 2.5),
    ActionCondition.expression("${d} > 1 and (${e} == 'ok' or not ${f})"),
    ActionCondition.all_of(ActionCondition.key_equals("g", None)),
)

_ROUND_TRIPS: dict[str, Callable[[Any], Any]] = {
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
    "pickle": lambda value: pickle.loads(pickle.dumps(value)),
    "cloudpickle": lambda value: cloudpickle.loads(cloudpickle.dumps(value)),
}


@pytest.mark.parametrize("round_trip", list(_ROUND_TRIPS.values()), ids=list(_ROUND_TRIPS))
@pytest.mark.parametrize(
    "action",
    [
        Action.simple("next"),
        Action.with_params("retry", count=3, tags=["a"], **{"not-an-identifier": {"n": 1}}),
        Action.complete(),
        Action.complete({"rows": [1, 2], "ok": True}),
        Action.conditional(
            _EVERY_CONDITION,
            Action.with_params("go", n=1),
            Action.conditional(ActionCondition.key_exists("z"), "left", Action.complete(7)),
        ),
    ],
    ids=["simple", "with_params", "complete", "complete_with_result", "conditional"],
)
def test_actions_survive_copies_and_pickles(
    action: Action, round_trip: Callable[[Action], Action]
) -> None:
    """Actions cross process boundaries (a process executor, a durable record): a copy
    is an equal Action that behaves the same, with read-only params of its own."""
    copied = round_trip(action)
    assert type(copied) is Action
    assert copied == action
    assert repr(copied) == repr(action)
    assert copied.condition_keys() == action.condition_keys()
    for values in ({}, {"d": 2, "e": "ok"}, {"z": 1}):
        assert copied.resolve(values) == action.resolve(values)
    with pytest.raises(TypeError):
        copied.params["count"] = 4  # type: ignore[index]


# --- in an engine --------------------------------------------------------------------------


class _Put(cf.Node):
    """Stores ``n`` (a hostile int when the run's params say so) and returns "next";
    a run with ``hold`` waits in exec until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()

    async def exec(self, prep_res: Any, ctx: cf.ExecutionContext) -> None:
        if ctx.params.get("hold"):
            await self.release.wait()

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> Action:
        n = _HostileInt(5) if ctx.params.get("hostile") else ctx.params.get("n", 5)
        await store.set("n", n)
        if ctx.params.get("conditional"):
            return Action.conditional(ActionCondition.compare("n", ">", 3), "big", "small")
        return Action.simple("next")


class _Done(cf.Node):
    """Completes the run with its label."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    async def post(
        self, store: cf.SharedStore, prep_res: Any, exec_res: Any, ctx: cf.ExecutionContext
    ) -> Action:
        return Action.complete(self.label)


def _sizing_flow(put: _Put) -> cf.Flow:
    """put -> big when ``${n} > 3`` (route condition) or on "big" (conditional action);
    put -> small otherwise."""
    builder = cf.Flow.builder("sizing").add_node("put", put)
    builder = builder.add_node("big", _Done("big")).add_node("small", _Done("small"))
    builder = builder.add_route("put", "big", "next", when=ActionCondition.expression("${n} > 3"))
    builder = builder.add_route("put", "small", "next")
    builder = builder.add_route("put", "big", "big").add_route("put", "small", "small")
    return builder.build()


@pytest.mark.parametrize("conditional", [False, True], ids=["route_condition", "conditional"])
async def test_a_condition_that_raises_fails_its_run_alone(conditional: bool) -> None:
    """The router (route conditions) and the node actor (conditional actions) fail the
    run with ConditionError; a run in flight meanwhile and later runs succeed."""
    put = _Put()
    flow = _sizing_flow(put)
    async with cf.open_engine() as engine:
        other = await engine.start_run(flow, params={"hold": True, "conditional": conditional})
        doomed = await engine.start_run(flow, params={"hostile": True, "conditional": conditional})
        with pytest.raises(ConditionError) as caught:
            await doomed.wait()
        assert "on store key 'n' raised RuntimeError: refused" in str(caught.value)
        assert isinstance(caught.value.__cause__, RuntimeError)
        put.release.set()
        assert (await other.wait()).result == "big"
        later = await engine.run(flow, params={"n": 1, "conditional": conditional})
        assert later.result == "small"
        assert engine.statistics().runs_failed == 1


class _AboveLimit(ActionCondition):
    """A condition in Python: ``n`` is above the store's ``limit``, which it reads
    without checking that it is there (``values["limit"]`` raises KeyError when not)."""

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        return bool(values["n"] > values["limit"])

    @property
    def keys(self) -> frozenset[str]:
        return frozenset({"n", "limit"})


def _deciding(name: str, condition: Callable[[], ActionCondition]) -> cf.Flow:
    """A flow whose node "decide" goes to "big" when ``condition()`` holds, else to
    "small": through a route's condition, or, with the param ``conditional``, through
    the conditional action its post returns."""

    @cf.node
    async def decide(ctx: cf.ExecutionContext) -> Action:
        if ctx.params.get("conditional"):
            return Action.conditional(condition(), "big", "small")
        return Action.simple("next")

    return (
        cf.Flow.builder(name)
        .add_node("decide", decide)
        .add_node("big", _Done("big"))
        .add_node("small", _Done("small"))
        .add_route("decide", "big", "next", when=condition())
        .add_route("decide", "small", "next")
        .add_route("decide", "big", "big")
        .add_route("decide", "small", "small")
        .build()
    )


_DECIDE = _deciding("decide", _AboveLimit)


@pytest.mark.parametrize("conditional", [False, True], ids=["route_condition", "conditional"])
async def test_a_user_condition_that_raises_fails_its_run_alone(conditional: bool) -> None:
    """An ActionCondition subclass's error reaches the run as a ConditionError naming
    where it was evaluated and the condition; the engine serves the next run."""
    params = {"conditional": conditional}
    async with cf.open_engine() as engine:
        with pytest.raises(ConditionError) as caught:
            await engine.run(_DECIDE, {"n": 5}, params=params)
        where = (
            "conditional action of node 'decide'"
            if conditional
            else "route 'decide' on action 'next' of flow 'decide'"
        )
        assert str(caught.value) == (
            f"{where}: condition _AboveLimit could not be evaluated: its evaluate raised KeyError: "
            "'limit'; it must return a bool for any store values (a key that is not stored "
            "is absent from them)"
        )
        assert isinstance(caught.value.__cause__, KeyError)
        later = await engine.run(_DECIDE, {"n": 5, "limit": 3}, params=params)
        assert later.result == "big"


class _NoTruth:
    """What numpy's ``values["xs"] > 3`` gives for an array: no truth value."""

    def __bool__(self) -> bool:
        raise ValueError("the truth value of an array is ambiguous")


class _Ambiguous(ActionCondition):
    """A condition in Python returning something whose bool() raises."""

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        return _NoTruth()  # type: ignore[return-value]

    @property
    def keys(self) -> frozenset[str]:
        return frozenset({"n"})


@pytest.mark.parametrize("where", ["route", "all_of", "conditional"])
async def test_a_user_condition_returning_what_has_no_truth_value_fails_its_run_alone(
    where: str,
) -> None:
    condition: ActionCondition = _Ambiguous()
    if where == "all_of":
        condition = ActionCondition.all_of(condition)

    @cf.node
    async def decide(ctx: cf.ExecutionContext) -> Action | str:
        return Action.conditional(condition, "go", "stop") if where == "conditional" else "go"

    flow = (
        cf.Flow.builder("ambiguous")
        .add_node("decide", decide)
        .add_node("done", _Done("done"))
        .add_route("decide", "done", "go", when=None if where == "conditional" else condition)
        .add_route("decide", cf.END, "stop")
        .build()
    )
    async with cf.open_engine() as engine:
        with pytest.raises(ConditionError) as caught:
            await engine.run(flow, {"n": 1})
        assert await engine.run(single(Recorder()), {})
    assert str(caught.value).endswith(
        "condition _Ambiguous: what evaluate returned (of type _NoTruth) has no truth value "
        "(ValueError: the truth value of an array is ambiguous); it must return a bool"
    )


def test_an_async_evaluate_is_refused_when_its_class_is_made() -> None:
    with pytest.raises(TypeError, match=r"Later.evaluate must be a plain def"):

        class Later(ActionCondition):
            async def evaluate(self, values: Mapping[str, Any]) -> bool:  # type: ignore[override]
                return True

            @property
            def keys(self) -> frozenset[str]:
                return frozenset()


def test_a_user_condition_evaluates_directly_and_its_keys_are_checked() -> None:
    class KeysRaise(_AboveLimit):
        @property
        def keys(self) -> frozenset[str]:
            raise LookupError("no keys")

    assert _AboveLimit().evaluate({"n": 2, "limit": 1})
    with pytest.raises(ConditionError, match=r"keys of condition .*KeysRaise raised LookupError"):
        Action.conditional(KeysRaise(), "big", "small")


class _ThresholdMixin:
    """An evaluate in a class that is not an ActionCondition: it reads ``score``
    without checking that it is there (KeyError when not)."""

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        return bool(values["score"] > 3)


class _Threshold(_ThresholdMixin, ActionCondition):
    """A condition whose evaluate comes from a mixin."""

    @property
    def keys(self) -> frozenset[str]:
        return frozenset({"score"})


_THRESHOLD = _deciding("threshold", _Threshold)


def test_an_evaluate_from_a_mixin_is_guarded() -> None:
    with pytest.raises(ConditionError, match=r"condition _Threshold could not be evaluated: its "):
        holds(_Threshold(), {})
    assert holds(_Threshold(), {"score": 4}) is True


@pytest.mark.parametrize("conditional", [False, True], ids=["route_condition", "conditional"])
async def test_an_evaluate_from_a_mixin_that_raises_fails_its_run_alone(conditional: bool) -> None:
    """Started with start_run (its step runs in a node actor's worker): the run fails
    with ConditionError, a run in flight meanwhile and the engine go on."""
    put = _Put()
    params = {"conditional": conditional}
    async with cf.open_engine() as engine:
        other = await engine.start_run(_sizing_flow(put), params={"hold": True})
        doomed = await engine.start_run(_THRESHOLD, {}, params=params)
        with pytest.raises(ConditionError) as caught:
            await doomed.wait()
        assert "condition _Threshold could not be evaluated: its evaluate raised KeyError" in str(
            caught.value
        )
        assert isinstance(caught.value.__cause__, KeyError)
        put.release.set()
        assert (await other.wait()).result == "big"
        assert (await engine.run(_THRESHOLD, {"score": 1}, params=params)).result == "small"


def test_an_async_evaluate_from_a_mixin_is_refused_when_its_class_is_made() -> None:
    class LaterMixin:
        async def evaluate(self, values: Mapping[str, Any]) -> bool:
            return False

    message = r"Later.evaluate \(inherited from .*LaterMixin\) must be a plain def"
    with pytest.raises(TypeError, match=message):

        class Later(LaterMixin, ActionCondition):  # type: ignore[misc]
            @property
            def keys(self) -> frozenset[str]:
                return frozenset()


class _Rogue(ActionCondition):
    """A condition that gets past its class's checks: an evaluate set on the instance
    (``rogue``) shadows the guarded method, and ``keys`` raises once ``keys_broken``."""

    def __init__(self, rogue: bool = False) -> None:
        self.keys_broken = False
        if rogue:
            setattr(self, "evaluate", lambda values: values["missing"])  # noqa: B010

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        return True

    @property
    def keys(self) -> frozenset[str]:
        if self.keys_broken:
            raise LookupError("keys gone")
        return frozenset({"n"})


@cf.node
async def _rogue(ctx: cf.ExecutionContext) -> Action | str:
    if not ctx.params.get("conditional"):
        return "go"
    condition = _Rogue(rogue=ctx.params["fault"] == "evaluate")
    action = Action.conditional(condition, "go", "go")
    condition.keys_broken = ctx.params["fault"] == "keys"
    return action


@pytest.mark.parametrize(
    ("where", "fault", "message"),
    [
        ("route", "evaluate", "route 'decide' on action 'go' of flow 'rogue': condition _Rogue"),
        ("all_of", "evaluate", "route 'decide' on action 'go' of flow 'rogue': condition _Rogue"),
        ("conditional", "evaluate", "conditional action of node 'decide': condition _Rogue"),
        ("conditional", "keys", "conditional action of node 'decide': the keys of condition"),
    ],
)
async def test_a_condition_past_its_class_checks_fails_its_run_alone(
    where: str, fault: str, message: str
) -> None:
    """An evaluate set on the instance, or keys that raise after they were checked: the
    run started with start_run fails with ConditionError, and the engine goes on."""
    condition: ActionCondition = _Rogue(rogue=True)
    if where == "all_of":
        condition = ActionCondition.all_of(condition)
    flow = (
        cf.Flow.builder("rogue")
        .add_node("decide", _rogue)
        .add_node("done", _Done("done"))
        .add_route("decide", "done", "go", when=None if where == "conditional" else condition)
        .build()
    )
    async with cf.open_engine() as engine:
        doomed = await engine.start_run(
            flow, {}, params={"conditional": where == "conditional", "fault": fault}
        )
        with pytest.raises(ConditionError, match=message) as caught:
            await doomed.wait()
        assert isinstance(caught.value.__cause__, KeyError | LookupError)
        assert (await engine.run(single(Recorder()), {})).success


class _StrKeys(ActionCondition):
    """A user condition whose keys are a str (a mistake for ``frozenset({"flag"})``)."""

    keys = "flag"  # type: ignore[assignment]

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        return values.get("flag") is True


@pytest.mark.parametrize(
    "combine",
    [
        lambda c: _TRUE & c,
        lambda c: c | _FALSE,
        lambda c: ~c,
        lambda c: ActionCondition.all_of(_TRUE, c),
        lambda c: ActionCondition.any_of(c),
    ],
    ids=["and", "or", "not", "all_of", "any_of"],
)
def test_combinators_check_the_keys_of_each_condition(
    combine: Callable[[ActionCondition], ActionCondition],
) -> None:
    """Keys that are a str would be read as single characters: refused where the
    combination is made, naming the user's class."""
    with pytest.raises(ConditionError) as caught:
        combine(_StrKeys())
    assert str(caught.value) == (
        "the keys of condition _StrKeys must be a frozenset of str (the store keys evaluate "
        "reads), got 'flag'"
    )


def test_a_user_condition_without_a_repr_of_its_own_shows_its_class() -> None:
    """Never a memory address: the repr is the same in every process."""
    action = Action.conditional(_Threshold() | _TRUE, "big", "small")
    assert repr(action) == (
        "Action.conditional((<_Threshold> | ActionCondition.always()), Action.simple('big'), "
        "Action.simple('small'))"
    )
