"""A tool-using agent: decide, act, observe, until it can answer.

PocketFlow's agent pattern. `decide` looks at the question and at what the tools have
found so far, and picks the next action: `search`, `calculate` or `answer`, with the
tool's arguments as the action's params. Each tool records an observation and routes
back to `decide`. A `when=` condition on those routes caps the loop: past the step
budget, the run goes to `give_up` instead.

The policy that an LLM would play here is a small deterministic function, so the
example needs no network and gives the same answers every time.

Run it: python examples/agent.py
or:     cosmoflow run examples/agent.py --param 'question=How many live in Paris and Lyon?'
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

import trio

import cosmoflow_actors as cf

KNOWLEDGE = {
    "python": "Python was first released in 1991.",
    "trio": "Trio was first released in 2017.",
    "pocketflow": "PocketFlow, an LLM framework in 100 lines, was first released in 2025.",
    "paris": "Paris has about 2100000 inhabitants.",
    "lyon": "Lyon has about 520000 inhabitants.",
}
DEFAULT_BUDGET = 6  # tool calls per question

Observation = dict[str, str]


def policy(question: str, notes: list[Observation]) -> cf.Action:
    """The stand-in for a language model: the next action, from the question and notes."""
    text = question.lower()
    searched = {note["input"] for note in notes if note["tool"] == "search"}
    topics = [topic for topic in KNOWLEDGE if re.search(rf"\b{topic}\b", text)]
    for topic in topics:
        if topic not in searched:
            return cf.Action.with_params("search", query=topic)
    if not topics:
        query = text.rstrip("?")
        if query not in searched:
            return cf.Action.with_params("search", query=query)
        return cf.Action.with_params("answer", text="I don't know.")
    calculations = [note for note in notes if note["tool"] == "calculate"]
    if calculations:
        return cf.Action.with_params("answer", text=calculations[-1]["output"])
    found = [re.findall(r"\d+", note["output"]) for note in notes if note["tool"] == "search"]
    values = sorted((int(numbers[-1]) for numbers in found if numbers), reverse=True)
    if len(values) == 1:
        return cf.Action.with_params("answer", text=str(values[0]))
    sign = "-" if re.search(r"\b(after|before|between|difference)\b", text) else "+"
    return cf.Action.with_params("calculate", expression=f" {sign} ".join(map(str, values)))


@cf.node
async def receive(ctx: cf.ExecutionContext) -> None:
    question = ctx.params.get("question", "")
    budget = ctx.params.get("budget", DEFAULT_BUDGET)
    await ctx.store.set_many({"question": question, "budget": budget, "notes": [], "calls": 0})


class Decide(cf.Node):
    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> dict[str, Any]:
        return await store.get_many(["question", "notes"])

    def exec(self, state: dict[str, Any], ctx: cf.ExecutionContext) -> cf.Action:
        return policy(state["question"], state["notes"])

    def post(
        self, store: cf.SharedStore, state: Any, action: cf.Action, ctx: cf.ExecutionContext
    ) -> cf.Action:
        return action  # its params become the tool's ctx.params


class Tool(cf.Node):
    """Runs `use(argument)` and notes what it returned; the action is always "observed"."""

    name = "tool"
    argument = "input"
    timeout = 1.0
    max_retries = 2

    async def exec(self, prep_res: None, ctx: cf.ExecutionContext) -> Observation:
        argument = str(ctx.params[self.argument])
        return {"tool": self.name, "input": argument, "output": await self.use(argument)}

    async def use(self, argument: str) -> str:
        raise NotImplementedError

    async def post(
        self, store: cf.SharedStore, prep_res: None, note: Observation, ctx: cf.ExecutionContext
    ) -> str:
        await store.update("notes", lambda notes: [*notes, note], default=[])
        await store.update("calls", lambda n: n + 1, default=0)
        return "observed"


class Search(Tool):
    name, argument = "search", "query"

    async def use(self, query: str) -> str:
        await trio.sleep(0.01)  # stands in for a call to a search service
        return KNOWLEDGE.get(query, "no results")


OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


class Calculate(Tool):
    name, argument = "calculate", "expression"

    async def use(self, expression: str) -> str:
        def evaluate(node: ast.AST) -> int:  # numbers and + - * only: never eval()
            if isinstance(node, ast.Constant) and isinstance(node.value, int):
                return node.value
            if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
                return int(OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right)))
            raise ValueError(f"not arithmetic: {ast.dump(node)}")

        return str(evaluate(ast.parse(expression, mode="eval").body))


@cf.node
async def answer(ctx: cf.ExecutionContext) -> cf.Action:
    notes = await ctx.store.get("notes")
    return cf.Action.complete({"answer": ctx.params["text"], "notes": notes})


@cf.node
async def give_up(ctx: cf.ExecutionContext) -> cf.Action:
    notes = await ctx.store.get("notes")
    budget = await ctx.store.get("budget")
    return cf.Action.complete({"answer": f"(gave up after {budget} tool calls)", "notes": notes})


within_budget = cf.ActionCondition.expression("${calls} < ${budget}")

flow = (
    cf.Flow.builder("agent")
    .add_node("receive", receive)
    .add_node("decide", Decide())
    .add_node("search", Search())
    .add_node("calculate", Calculate())
    .add_node("answer", answer)
    .add_node("give_up", give_up)
    .add_route("receive", "decide")
    .add_route("decide", "search", action="search")
    .add_route("decide", "calculate", action="calculate")
    .add_route("decide", "answer", action="answer")
    .add_route("search", "decide", action="observed", when=within_budget)
    .add_route("search", "give_up", action="observed")
    .add_route("calculate", "decide", action="observed", when=within_budget)
    .add_route("calculate", "give_up", action="observed")
    .build()
)

QUESTIONS: list[dict[str, Any]] = [
    {"question": "How many years after Python was Trio released?"},
    {"question": "How many people live in Paris and Lyon together?"},
    {"question": "When was PocketFlow first released?"},
    {"question": "What is the airspeed of an unladen swallow?"},
    {"question": "How many years after Python was Trio released?", "budget": 2},
]


async def main() -> list[str]:
    answers = []
    async with cf.open_engine() as engine:
        for params in QUESTIONS:
            result = await engine.run(flow, {}, params=params)
            outcome: dict[str, Any] = result.result
            budget = f" (budget: {params['budget']} tool calls)" if "budget" in params else ""
            print(f"Q: {params['question']}{budget}")
            for number, note in enumerate(outcome["notes"], start=1):
                call = f"{note['tool']}({note['input']!r})"
                print(f"  {number}. {call:<30} -> {note['output']}")
            print(f"  A: {outcome['answer']}  ({result.steps_executed} steps)")
            answers.append(outcome["answer"])
    return answers


if __name__ == "__main__":
    trio.run(main)
