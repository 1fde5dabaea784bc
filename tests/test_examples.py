"""Every example runs as `python examples/<name>.py` and prints what it promises.

Examples that define one module-level Flow also run through the command line, and
every ```python block of the guides written as complete scripts runs as it is.
None of them needs a network: `rate_limited_api.py` serves itself on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"

EXPECTED = {
    "durable_resume.py": [
        "crashed:  the first attempt died in summarize (exit status 1)",
        "recorded: nightly-report running after 3 steps",
        "resumed:  summarize -> publish",
        "log:      fetch, clean, enrich, summarize, publish (each step once: True)",
    ],
    "hello_world.py": [
        "greeting: Hello, CosmoFlow!",
        "result:   HELLO, COSMOFLOW!",
        "greet -> shout",
    ],
    "start_process.py": [
        "word counts: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]",
        "runs: 10 succeeded, 0 failed",
    ],
    "authentication.py": [
        "token=valid-token    -> check -> dashboard => dashboard",
        "token=expired-token  -> check -> login",
        "=> login page (attempt 1)",
    ],
    "simple_loops.py": [
        "limit=5   step=1: counted [1, 2, 3, 4, 5] -> stopped at 5",
        "  7 steps: start -> increment x5 -> report",
        "limit=10  step=3: counted [3, 6, 9, 12] -> stopped at 12",
        "runaway loop stopped by max_steps=7",
    ],
    "custom_node.py": [
        "[flaky]\n"
        "  attempt 1 failed (ServiceDown), retry in 0.02 s\n"
        "  attempt 2 failed (ServiceDown), retry in 0.04 s\n"
        "  => Lyon: sunny, 21 C (live, attempt 3)",
        "[slow]\n  attempt 1 failed (TooSlowError), retry in 0.02 s\n",
        "  3 attempt(s) failed (ServiceDown), exec_fallback runs\n"
        "  => Lyon: sunny, 20 C (cached, after ServiceDown)",
        "  => Lyon: no forecast (unknown city 'Lyon')",
        "  => run failed: node 'forecast' failed in exec (flow 'forecast', run bug, 1 attempt)"
        " <- KeyError: 'temperature'",
    ],
    "chat_assistant.py": [
        "--- session 1 ---",
        "assistant: Your name is Ada.",
        "--- session 2 ---",
        "assistant: Welcome back, Ada!",
        "assistant: You like trio and structured concurrency.",
        "assistant: This is session 2, and you have said 8 things to me.",
        "     user: bye\nassistant: Bye, Ada!\n(9 steps)\n",
    ],
    "async_workflows.py": [
        "order A-1: shipped 2 x widget",
        "  path:  receive -> [check_stock | check_payment] -> decide -> ship -> final",
        "order A-2: refunded (out of stock)",
        "order A-3: refunded (gateway down)",
        "  audit: 5 committed writes (order, stock_ok, payment_ok, decision, status)",
    ],
    "lexer.py": [
        "    1:1  KEYWORD  let",
        "   1:21  FLOAT    2.5",
        "   1:26  COMMENT  // with tax",
        "   2:10  OP       >=",
        '   2:24  STRING   "big \\"order\\""',
        "   2:42  EOF",
        "  19 tokens in 174 steps (140 in token flows)",
        "    1:5  ERROR    1.",
        "   1:10  UNKNOWN  @",
    ],
    "better_ls.py": [
        "$ better_ls <demo>\n╭──────┬────────────┬───────┬─────────────┬──────────────────╮",
        "│ DIR  │ src/       │ -     │ drwxr-xr-x  │ 2025-06-15 12:20 │",
        "│ FILE │ data.bin   │ 2.4M  │ -rw-------  │ 2025-06-15 19:06 │",
        "│ FILE │ .hidden    │ 3 B   │ -rw-r--r--  │ 2025-06-15 18:06 │",
        "6 entries\n$ better_ls -a -t <demo>",
        "7 entries",
        "better_ls: <demo>/missing: no such directory",
    ],
    "map_reduce.py": [
        "6 files, words counted in each:",
        "  trio.txt      16 words",
        "65 words counted (stop words left out), 46 distinct",
        "longest word: backpressure",
        "top words: actor 4, mailbox 3, nursery 3, store 3, tasks 3,",
    ],
    "rate_limited_api.py": [
        "progress: 500/1000 requests done",
        "progress: 1000/1000 requests done",
        "requests: 1000 (1000 answered)",
        "failures: 0",
        "retries:  10 (the server's 503s, retried by the node)",
        "ok: True)",
        "checksum: 332833500",
    ],
    "agent.py": [
        "  3. calculate('2017 - 1991')       -> 26\n  A: 26  (9 steps)",
        "  A: 2620000  (9 steps)",
        "  A: 2025  (5 steps)",
        "  A: I don't know.  (5 steps)",
        "  A: (gave up after 2 tool calls)  (6 steps)",
    ],
    "workers.py": [
        "invoice-1: total 30.60 (price -> tax -> total)",
        "invoice-2: total 15.00 (price -> tax -> total)",
        "invoice-3: total 126.00 (price -> tax -> total)",
        "invoice-4: total 19.20 (price -> tax -> total)",
        "4 runs succeeded on ",
    ],
}

CLI: dict[str, tuple[list[str], object]] = {  # target: (arguments, the run's result)
    "hello_world.py": ([], "HELLO, WORLD!"),
    "simple_loops.py:flow": (["--param", "limit=3"], "stopped at 3"),
    "custom_node.py": (
        ["--param", "trouble=down", "--param", "bad_attempts=2"],
        "Lyon: sunny, 21 C (live, attempt 3)",
    ),
    "lexer.py": (
        ["--param", "source=x >= 10"],
        [
            {"kind": "IDENT", "text": "x", "at": "1:1"},
            {"kind": "OP", "text": ">=", "at": "1:3"},
            {"kind": "INT", "text": "10", "at": "1:6"},
            {"kind": "EOF", "text": "", "at": "1:8"},
        ],
    ),
    "workers.py": (["--param", "items=[[2, 10.0]]"], 24.0),
    "chat_assistant.py": (
        ["--param", 'messages=["my name is Bob", "what is my name?"]'],
        "--- session 1 ---\n"
        "     user: my name is Bob\n"
        "assistant: Nice to meet you, Bob!\n"
        "     user: what is my name?\n"
        "assistant: Your name is Bob.\n"
        "assistant: Bye, Bob!",
    ),
    "agent.py": (
        ["--param", "question=When was Trio released?"],
        {
            "answer": "2017",
            "notes": [
                {"tool": "search", "input": "trio", "output": "Trio was first released in 2017."}
            ],
        },
    ),
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the Python of these tests with ``args``; output is captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    done = run(str(EXAMPLES / name))
    assert done.returncode == 0, done.stderr
    for text in EXPECTED[name]:
        assert text in done.stdout


def test_rate_limited_api_reports_requests_that_all_fail() -> None:
    """With the API down, every request fails after its three attempts, and the summary
    says so, counting those attempts against the rate limit too."""
    done = run(str(EXAMPLES / "rate_limited_api.py"), "--requests", "20", "--fail-all")
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    assert "requests: 20 (0 answered)\nfailures: 20\n" in done.stdout
    assert re.search(
        r"first failure: node 'call_api' failed in exec "
        r"\(flow 'rate-limited-api', run \S+, 3 attempts\)"
        r" <- RequestFailed: 3 attempts failed <- HttpError: HTTP 503\n",
        done.stdout,
    )
    assert "retries:  40 " in done.stdout
    per_second = re.search(r"started in each second: \[(.*)\]", done.stdout)
    assert per_second is not None
    assert sum(map(int, per_second.group(1).split(", "))) == 20 * 3
    assert "checksum: 0" in done.stdout


@pytest.mark.parametrize("target", sorted(CLI))
def test_example_flow_runs_from_the_command_line(target: str) -> None:
    args, expected = CLI[target]
    done = run("-m", "cosmoflow_actors", "run", str(EXAMPLES / target), *args, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == expected


def test_chat_assistant_prints_json_alone_with_json_and_its_transcript_without() -> None:
    """Its nodes print nothing: with --json, stdout is the outcome's JSON alone (the
    transcript is the run's result); without, the transcript shows under result:."""
    target = str(EXAMPLES / "chat_assistant.py")
    done = run("-m", "cosmoflow_actors", "run", target, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    outcome = json.loads(done.stdout)
    assert outcome["result"] == "--- session 1 ---\nassistant: Bye!"
    assert outcome["store"]["history"] == [{"role": "assistant", "text": "Bye!"}]
    done = run("-m", "cosmoflow_actors", "run", target, "--param", 'messages=["hi"]')
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("flow:         chat-assistant\n")
    assert done.stdout.endswith(
        "result:\n"
        "  --- session 1 ---\n"
        "       user: hi\n"
        "  assistant: Hello! Who are you?\n"
        "  assistant: Bye!\n"
    )


# Pages whose ```python blocks are complete scripts (```py marks a fragment), and
# pytest files when the first line is "# test_<name>.py"; paths from the repository root.
GUIDES = [
    "README.md",
    "docs/index.md",
    "docs/getting-started.md",
    "docs/from-pocketflow.md",
    "docs/durability.md",
    "docs/storage.md",
    "docs/tracing.md",
    "docs/concurrency.md",
    "docs/concepts.md",
    *(f"docs/{p.name}" for p in (ROOT / "docs").glob("howto-*.md")),
]
SNIPPETS = [
    (page, number, code)
    for page in sorted(GUIDES)
    for number, code in enumerate(
        re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), re.S | re.M),
        start=1,
    )
]


@pytest.mark.parametrize(
    ("page", "number", "code"), SNIPPETS, ids=[f"{p}-{n}" for p, n, _ in SNIPPETS]
)
def test_guide_snippet_runs(page: str, number: int, code: str, tmp_path: Path) -> None:
    test_file = re.match(r"# (test_\w+\.py)\n", code)
    args: tuple[str, ...]
    if test_file:
        (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
        (tmp_path / test_file.group(1)).write_text(code)
        args = ("-m", "pytest", "-q", "-p", "no:cacheprovider", test_file.group(1))
    else:
        (tmp_path / "snippet.py").write_text(code)
        args = ("snippet.py",)
    done = run(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
