"""A DFA lexer built from nested flows.

CosmoFlow's lexer example. The main flow is a dispatcher: `dispatch` looks at the next
character and routes to the nested flow for that kind of token. Each nested flow is a
deterministic finite automaton whose *states are nodes* and whose *transitions are
routes*: a state node reads one character and returns the name of the next state as
its action, or "accept" (the token ends here) or "reject" (it cannot end here). The
nested flow's last node returns "token", which the main flow routes back to `dispatch`.

Run it: python examples/lexer.py
or:     cosmoflow run examples/lexer.py --param 'source=if x >= 10 { y = "big" }'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cosmoflow_actors as cf

KEYWORDS = frozenset({"let", "if", "else", "while", "print"})

CLASSES: dict[str, Callable[[str], bool]] = {
    "digit": str.isdigit,
    "alpha": lambda c: c.isalpha() or c == "_",
    "alnum": lambda c: c.isalnum() or c == "_",
    "space": lambda c: c in " \t\n",
    "string_char": lambda c: c not in {'"', "\\", "\n", ""},
    "comment_char": lambda c: c not in {"\n", ""},
    "any": lambda c: c != "",
}
"""Character classes a transition can name; any other name is a literal character."""


def position(source: str, index: int) -> str:
    """``line:column`` of ``source[index]``, both counted from 1."""
    line = source.count("\n", 0, index) + 1
    column = index - (source.rfind("\n", 0, index) + 1) + 1
    return f"{line}:{column}"


def matches(label: str, char: str) -> bool:
    test = CLASSES.get(label)
    return test(char) if test is not None else char == label


class State(cf.Node):
    """One DFA state: consume the next character along the first transition it matches.

    With no matching transition the token ends here: "accept" (with the token kind) if
    this state accepts, else "reject".
    """

    def __init__(self, moves: list[tuple[str, str]], accepts: str | None = None) -> None:
        super().__init__()
        self.moves = moves
        self.accepts = accepts

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> str:
        source, pos = await store.get("source", type=str), await store.get("pos", type=int)
        return source[pos] if pos < len(source) else ""

    def exec(self, char: str, ctx: cf.ExecutionContext) -> str | None:
        return next((target for label, target in self.moves if matches(label, char)), None)

    async def post(
        self, store: cf.SharedStore, char: str, target: str | None, ctx: cf.ExecutionContext
    ) -> cf.Action | str:
        if target is not None:
            await store.update("pos", lambda pos: pos + 1)
            return target
        if self.accepts is None:
            return "reject"
        return cf.Action.with_params("accept", kind=self.accepts)


class Emit(cf.Node):
    """The end of every token flow: record the token from `start` to `pos`."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> dict[str, Any]:
        return await store.get_many(["source", "start", "pos"])

    def exec(self, span: dict[str, Any], ctx: cf.ExecutionContext) -> dict[str, Any] | None:
        text = span["source"][span["start"] : span["pos"]]
        kind = ctx.params.get("kind", "ERROR")
        if kind == "SPACE":
            return None
        if kind == "IDENT" and text in KEYWORDS:
            kind = "KEYWORD"
        return {"kind": kind, "text": text, "at": position(span["source"], span["start"])}

    async def post(
        self,
        store: cf.SharedStore,
        span: dict[str, Any],
        token: dict[str, Any] | None,
        ctx: cf.ExecutionContext,
    ) -> str:
        if token is not None:
            await store.update("tokens", lambda tokens: [*tokens, token], default=[])
        return "token"


def token_flow(name: str, states: dict[str, State]) -> cf.Flow:
    """A nested flow from DFA states: the first state is the start state."""
    builder = cf.Flow.builder(name).add_node("emit", Emit())
    for state_id, state in states.items():
        builder.add_node(state_id, state)
        for target in dict.fromkeys(target for _, target in state.moves):
            builder.add_route(state_id, target, action=target)
        builder.add_route(state_id, "emit", action="accept")
        builder.add_route(state_id, "emit", action="reject")
    return builder.start(next(iter(states))).build()


TOKEN_FLOWS = {
    "whitespace": token_flow(
        "whitespace",
        {"start": State([("space", "blank")]), "blank": State([("space", "blank")], "SPACE")},
    ),
    "identifier": token_flow(
        "identifier",
        {"start": State([("alpha", "word")]), "word": State([("alnum", "word")], "IDENT")},
    ),
    "number": token_flow(
        "number",
        {
            "start": State([("digit", "int")]),
            "int": State([("digit", "int"), (".", "dot")], "INT"),
            "dot": State([("digit", "frac")]),  # "1." is not a number
            "frac": State([("digit", "frac")], "FLOAT"),
        },
    ),
    "string": token_flow(
        "string",
        {
            "start": State([('"', "body")]),
            "body": State([("string_char", "body"), ("\\", "escape"), ('"', "closed")]),
            "escape": State([("any", "body")]),
            "closed": State([], "STRING"),
        },
    ),
    "operator": token_flow(  # "/" starts an operator or a comment: the DFA tells them apart
        "operator",
        {
            "start": State(
                [("/", "slash"), ("<", "cmp"), (">", "cmp"), ("=", "cmp"), ("!", "bang")]
                + [(op, "single") for op in "+-*"]
            ),
            "slash": State([("/", "comment")], "OP"),
            "comment": State([("comment_char", "comment")], "COMMENT"),
            "cmp": State([("=", "op_eq")], "OP"),
            "bang": State([("=", "op_eq")]),
            "op_eq": State([], "OP"),
            "single": State([], "OP"),
        },
    ),
    "delimiter": token_flow(
        "delimiter", {"start": State([("any", "one")]), "one": State([], "DELIM")}
    ),
}


DELIMITERS = "(){};,"


@cf.node
async def begin(ctx: cf.ExecutionContext) -> None:
    """Entry: take the source from the run's params (or the store) and start at 0."""
    source = ctx.params.get("source", await ctx.store.get("source", ""))
    await ctx.store.set_many({"source": source, "pos": 0, "tokens": []})


class Dispatch(cf.Node):
    """The main DFA's one state: pick the token flow from the next character."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> str:
        source, pos = await store.get("source", type=str), await store.get("pos", type=int)
        await store.set("start", pos)
        return source[pos] if pos < len(source) else ""

    def exec(self, char: str, ctx: cf.ExecutionContext) -> str:
        if char == "":
            return "eof"
        if matches("space", char):
            return "whitespace"
        if matches("alpha", char):
            return "identifier"
        if char.isdigit():
            return "number"
        if char == '"':
            return "string"
        if char in "+-*/<>=!":
            return "operator"
        if char in DELIMITERS:
            return "delimiter"
        return "unknown"

    def post(self, store: cf.SharedStore, char: str, action: str, ctx: cf.ExecutionContext) -> str:
        return action


@cf.node
async def unknown(ctx: cf.ExecutionContext) -> cf.Action:
    """A character no token starts with: consume it as an ERROR token."""
    await ctx.store.update("pos", lambda pos: pos + 1)
    return cf.Action.with_params("reject", kind="UNKNOWN")


@cf.node
async def eof(ctx: cf.ExecutionContext) -> cf.Action:
    state = await ctx.store.get_many(["tokens", "source", "pos"])
    end = {"kind": "EOF", "text": "", "at": position(state["source"], state["pos"])}
    return cf.Action.complete([*state["tokens"], end])


def build_lexer() -> cf.Flow:
    builder = (
        cf.Flow.builder("lexer")
        .add_node("begin", begin)
        .add_node("dispatch", Dispatch())
        .add_node("unknown", unknown)
        .add_node("emit_unknown", Emit())
        .add_node("eof", eof)
        .add_route("begin", "dispatch")
        .add_route("dispatch", "eof", action="eof")
        .add_route("dispatch", "unknown", action="unknown")
        .add_route("unknown", "emit_unknown", action="reject")
        .add_route("emit_unknown", "dispatch", action="token")
        .max_steps(10_000)
    )
    for name, token_flow_ in TOKEN_FLOWS.items():
        builder.add_node(name, token_flow_)  # a Flow used as a node: a nested flow
        builder.add_route("dispatch", name, action=name)
        builder.add_route(name, "dispatch", action="token")  # its final action, routed here
    return builder.build()


lexer = build_lexer()

SOURCES = [
    'let total = price * 2.5; // with tax\nif total >= 10 { print("big \\"order\\"") }',
    "n = 1. + @",
]


def main() -> list[list[dict[str, Any]]]:
    outputs = []
    for source in SOURCES:
        result = lexer.run_sync({}, params={"source": source})
        tokens: list[dict[str, Any]] = result.result
        outputs.append(tokens)
        print(f"source: {source!r}")
        for token in tokens:
            print(f"  {token['at']:>5}  {token['kind']:<8} {token['text']}".rstrip())
        nested = sum(1 for node_id in result.execution_path if node_id not in lexer.nodes)
        print(f"  {len(tokens)} tokens in {result.steps_executed} steps ({nested} in token flows)")
    return outputs


if __name__ == "__main__":
    main()
