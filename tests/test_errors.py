"""The error hierarchy: what each error says, and that it survives pickling."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import cloudpickle
import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.errors import causes, told_causes, type_and_message, with_article

EXAMPLES: dict[type[cf.CosmoFlowError], cf.CosmoFlowError] = {
    cf.CosmoFlowError: cf.CosmoFlowError("root"),
    cf.FlowValidationError: cf.FlowValidationError("f", ["no start node", "route to 'x'"]),
    cf.ConditionError: cf.ConditionError("bad operator '=>'"),
    cf.NoRouteError: cf.NoRouteError("a", "maybe", ["yes", "no"]),
    cf.MaxStepsExceeded: cf.MaxStepsExceeded(3, ["a", "b", "a", "b"]),
    cf.NodeError: cf.NodeError("a", "exec", "run-1", 3, "f"),
    cf.RunCancelledError: cf.RunCancelledError("run run-1 was cancelled"),
    cf.ActorCrashedError: cf.ActorCrashedError("router"),
    cf.StorageError: cf.StorageError("disk full"),
    cf.RunConflictError: cf.RunConflictError("another engine committed step 2"),
    cf.DamagedRecordError: cf.DamagedRecordError(
        "the store holds no valid run record under '__cosmoflow__/runs/r'", "__cosmoflow__/runs/r"
    ),
    cf.RunRecordedError: cf.RunRecordedError("run 'r' belongs to flow 'a'", "r", "a", "running"),
    cf.StoreKeyError: cf.StoreKeyError("k"),
    cf.StoreTypeError: cf.StoreTypeError("k", "int", "str"),
    cf.StoreValueError: cf.StoreValueError("k", "a value of type object cannot be pickled"),
    cf.UnreadableValueError: cf.UnreadableValueError("cannot read key 'k': not JSON", "k"),
    cf.WorkerTransferError: cf.WorkerTransferError("cannot send the context to a worker"),
    cf.UnreadableEntryError: cf.UnreadableEntryError("run 'r' of queue 'q' is not JSON"),
    cf.WorkerInterruptedError: cf.WorkerInterruptedError("exec was interrupted"),
    cf.RayDisconnectedError: cf.RayDisconnectedError("node 'a' cannot start its Ray task"),
}


def test_every_public_error_is_a_cosmoflow_error_with_an_example_here() -> None:
    public = {
        value
        for value in map(vars(cf).get, cf.__all__)
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert public == set(EXAMPLES)
    assert all(issubclass(error, cf.CosmoFlowError) for error in public)


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
@pytest.mark.parametrize("error", EXAMPLES.values(), ids=lambda error: type(error).__name__)
def test_an_error_pickles_with_its_message_and_attributes(
    error: cf.CosmoFlowError, dumps: Callable[[object], bytes]
) -> None:
    copy = pickle.loads(dumps(error))

    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_messages_name_what_is_at_fault() -> None:
    assert str(EXAMPLES[cf.NoRouteError]) == (
        "node 'a' returned action 'maybe', which no route accepts; available actions: 'yes', 'no'"
    )
    assert str(cf.NoRouteError("a", "go", ["go", "stop"])) == (
        "node 'a' returned action 'go', and the condition of every route on it failed; add "
        "a route on it without a condition to catch the rest"
    )
    assert str(cf.NoRouteError("chat", "default", ["continue"])) == (
        "node 'chat' returned action 'default', which no route accepts; available actions: "
        "'continue' (post returned nothing or 'default': to end the run there, add "
        "add_route('chat', cf.END))"
    )
    assert (
        str(EXAMPLES[cf.NodeError]) == "node 'a' failed in exec (flow 'f', run run-1, 3 attempts)"
    )
    assert (
        str(cf.NodeError("a", "post", "run-1", 1))
        == "node 'a' failed in post (run run-1, 1 attempt)"
    )
    assert str(EXAMPLES[cf.MaxStepsExceeded]).startswith(
        "run exceeded max_steps=3; steps: a -> b -> a -> b. A loop that never ends?"
    )
    assert str(EXAMPLES[cf.StoreKeyError]) == "key 'k' is not in the store"
    assert isinstance(EXAMPLES[cf.StoreKeyError], KeyError)
    assert str(EXAMPLES[cf.StoreValueError]) == (
        "cannot store key 'k': a value of type object cannot be pickled"
    )
    assert isinstance(EXAMPLES[cf.StoreValueError], cf.StorageError | ValueError)
    damaged = EXAMPLES[cf.DamagedRecordError]
    assert isinstance(damaged, cf.StorageError)  # what callers catch
    assert vars(damaged) == {"key": "__cosmoflow__/runs/r", "reason": str(damaged)}
    unreadable = EXAMPLES[cf.UnreadableValueError]
    assert isinstance(unreadable, cf.StorageError)
    assert vars(unreadable) == {"key": "k", "reason": str(unreadable)}


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (ValueError("bad data"), "ValueError: bad data"),
        (cf.StoreKeyError("k"), "StoreKeyError: key 'k' is not in the store"),
        (SystemExit(), "SystemExit"),
        (Unprintable("x"), "Unprintable: <unprintable>"),
    ],
)
def test_an_error_is_quoted_as_its_type_and_message(error: BaseException, line: str) -> None:
    assert type_and_message(error) == line


def test_max_steps_exceeded_says_how_to_end_the_loop_and_whose_limit_it_is() -> None:
    error = cf.MaxStepsExceeded(5, [*"vwxyz", "x"], "inner")

    assert error.flow_name == "inner"
    assert str(error) == (
        "run exceeded max_steps=5 of flow 'inner'; last steps: ... -> w -> x -> y -> z -> x. "
        "A loop that never ends? Give it an exit (a route with when=, or an action that "
        "leaves the loop), or raise the bound with .max_steps(n) on the flow's builder"
    )


def test_causes_follow_a_chain_and_stop_where_it_loops() -> None:
    first, second, third = ValueError("a"), KeyError("b"), OSError("c")
    first.__cause__, second.__cause__ = second, third
    assert list(causes(first)) == [first, second, third]
    third.__cause__ = first
    assert list(causes(first)) == [first, second, third]
    assert list(causes(second)) == [second, third, first]


def test_a_cause_whose_message_the_error_before_it_quotes_is_not_told() -> None:
    disk = OSError(28, "No space left on device")
    append = cf.StorageError(f"cannot append to x.journal: {disk}")
    commit = cf.StorageError(f"store:file: commit failed: {append}")
    commit.__cause__, append.__cause__ = append, disk

    assert told_causes(commit) == [commit]
    assert told_causes(append) == [append]


@pytest.mark.parametrize(
    "message",
    [
        "its evaluate raised KeyError: 'x'; it must return a bool",
        "has no truth value (RuntimeError: 'x')",
        "read <key: 'x'>, then gave up",
    ],
)
def test_a_cause_quoted_whole_before_the_end_of_a_clause_is_not_told(message: str) -> None:
    outer = cf.ConditionError(message)
    outer.__cause__ = KeyError("x")

    assert told_causes(outer) == [outer]


def test_a_cause_quoted_only_in_part_or_not_after_a_colon_is_told() -> None:
    short = ValueError("e")
    outer = RuntimeError("node 'fetch' failed in exec")
    outer.__cause__ = short
    middle = RuntimeError("failed: [Errno 28] No space left, then gave up")
    middle.__cause__ = OSError(28, "No space")
    twice = RuntimeError("failed: [Errno 28] No spaces; failed: [Errno 28] No space")
    twice.__cause__ = OSError(28, "No space")

    assert told_causes(outer) == [outer, short]
    assert len(told_causes(middle)) == 2
    assert told_causes(twice) == [twice]


@pytest.mark.parametrize(
    ("noun", "phrase"),
    [("int", "an int"), ("str", "a str"), ("Action", "an Action"), ("object", "an object")],
)
def test_a_noun_gets_the_article_its_first_letter_asks_for(noun: str, phrase: str) -> None:
    assert with_article(noun) == phrase
