"""A chat assistant with memory, replaying a scripted conversation.

The flow is PocketFlow's chat loop: `listen` takes the next user message, `reply` answers
it and goes back to `listen`, until the user says bye. The "model" is a small set of
deterministic rules, so the example needs no network and prints the same every time.

Memory lives in the store. The store is a `cf.FileStorage`, so the second session, a
new run on a new storage object over the same file (as a restarted program would
open it), still knows the user's name and what they like.

The nodes print nothing: each turn goes into the `history` in the store, and the run's
result is the session's transcript, which `main` prints (so that `cosmoflow run
examples/chat_assistant.py --json` prints JSON alone, the transcript as its result).

Run it: python examples/chat_assistant.py
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import cosmoflow_actors as cf

Memory = dict[str, Any]


@cf.node
async def begin(ctx: cf.ExecutionContext) -> None:
    """Start a session (one run): count it, note where its turns start in the history,
    and queue the scripted user's messages."""
    await ctx.store.update("sessions", lambda n: n + 1, default=0)
    await ctx.store.set("session_start", len(await ctx.store.get("history", [])))
    await ctx.store.set("inbox", list(ctx.params.get("messages", [])))


class Listen(cf.Node):
    """Take the next message from the scripted user (the `inbox` list in the store)."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> list[str]:
        return list(await store.get("inbox", []))

    def exec(self, inbox: list[str], ctx: cf.ExecutionContext) -> str | None:
        return inbox[0] if inbox else None

    async def post(
        self,
        store: cf.SharedStore,
        inbox: list[str],
        message: str | None,
        ctx: cf.ExecutionContext,
    ) -> str:
        if message is None:
            return "bye"
        await store.set("inbox", inbox[1:])
        await _say(store, "user", message)
        return "bye" if message.lower().rstrip("!. ") in {"bye", "quit"} else "heard"


def answer(message: str, memory: Memory, sessions: int, said: int) -> tuple[str, Memory]:
    """The pretend language model: a reply, and the memory to keep afterwards."""
    text = message.lower().rstrip("?!. ")
    memory = dict(memory)
    if match := re.search(r"my name is (\w+)", message, re.IGNORECASE):
        memory["name"] = match.group(1)
        return f"Nice to meet you, {memory['name']}!", memory
    if match := re.search(r"i like (.+)", message, re.IGNORECASE):
        thing = match.group(1).rstrip("!. ")
        memory["likes"] = [*memory.get("likes", []), thing]
        return f"Noted: you like {thing}.", memory
    if "my name" in text:
        name = memory.get("name")
        return (f"Your name is {name}." if name else "You have not told me yet."), memory
    if "what do i like" in text:
        likes = memory.get("likes", [])
        return (f"You like {' and '.join(likes)}." if likes else "I don't know yet."), memory
    if "how many" in text:
        return f"This is session {sessions}, and you have said {said} things to me.", memory
    if text.startswith(("hi", "hello")):
        name = memory.get("name")
        return (f"Welcome back, {name}!" if name else "Hello! Who are you?"), memory
    return f"Tell me more about {message!r}.", memory


class Reply(cf.Node):
    """Answer the last user message with what the memory holds."""

    async def prep(self, store: cf.SharedStore, ctx: cf.ExecutionContext) -> dict[str, Any]:
        history = await store.get("history", [])
        return {
            "message": history[-1]["text"],
            "memory": await store.get("memory", {}),
            "sessions": await store.get("sessions", 1),
            "said": sum(1 for turn in history if turn["role"] == "user"),
        }

    def exec(self, inputs: dict[str, Any], ctx: cf.ExecutionContext) -> tuple[str, Memory]:
        return answer(**inputs)

    async def post(
        self,
        store: cf.SharedStore,
        inputs: dict[str, Any],
        outcome: tuple[str, Memory],
        ctx: cf.ExecutionContext,
    ) -> str:
        reply, memory = outcome
        await store.set("memory", memory)
        await _say(store, "assistant", reply)
        return "replied"


@cf.node
async def farewell(ctx: cf.ExecutionContext) -> cf.Action:
    """Say goodbye; the run's result is the session's transcript."""
    memory = await ctx.store.get("memory", {})
    await _say(ctx.store, "assistant", f"Bye, {memory['name']}!" if "name" in memory else "Bye!")
    history = await ctx.store.get("history", [])
    turns = history[await ctx.store.get("session_start", 0) :]
    lines = [f"--- session {await ctx.store.get('sessions', 1)} ---"]
    lines += [f"{turn['role']:>9}: {turn['text']}" for turn in turns]
    return cf.Action.complete("\n".join(lines))


async def _say(store: cf.SharedStore, role: str, text: str) -> None:
    """Append one turn to the history in the store."""
    turn = {"role": role, "text": text}
    await store.update("history", lambda history: [*history, turn], default=[])


flow = (
    cf.Flow.builder("chat-assistant")
    .add_node("begin", begin)
    .add_node("listen", Listen())
    .add_node("reply", Reply())
    .add_node("farewell", farewell)
    .add_route("begin", "listen")
    .add_route("listen", "reply", action="heard")
    .add_route("listen", "farewell", action="bye")
    .add_route("reply", "listen", action="replied")
    .build()
)

SESSIONS = [
    [
        "Hi, my name is Ada",
        "I like trio",
        "I like structured concurrency",
        "What's my name?",
        "bye",
    ],
    ["Hello again", "What do I like?", "How many things have I said?", "bye"],
]


def main() -> list[str]:
    transcripts = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "chat-memory.json"
        for script in SESSIONS:
            # A new FileStorage over the same file: what a restarted program would open.
            result = flow.run_sync(cf.FileStorage(path), params={"messages": script})
            transcripts.append(result.result)
            print(result.result)
            print(f"({result.steps_executed} steps)")
    return transcripts


if __name__ == "__main__":
    main()
