"""Flow diagrams: exact Mermaid and dot text for small flows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

import cosmoflow_actors as cf
from cosmoflow_actors.diagram import to_dot, to_mermaid
from tests.support import Recorder


def chain() -> cf.Flow:
    return (
        cf.Flow.builder("chain")
        .add_node("greet", Recorder("shout"))
        .add_node("shout", Recorder())
        .add_route("greet", "shout", action="shout")
        .build()
    )


def branching() -> cf.Flow:
    """A fan-out to a join, a conditional loop back, and END."""
    few = cf.ActionCondition.compare("n", "<", 3)
    return (
        cf.Flow.builder("branching")
        .add_node("split", Recorder())
        .add_node("left", Recorder())
        .add_node("right", Recorder())
        .add_join("merge", Recorder("again"))
        .add_route("split", ["left", "right"])
        .add_route("left", "merge")
        .add_route("right", "merge")
        .add_route("merge", "split", action="again", when=few)
        .add_route("merge", cf.END, action="again")
        .build()
    )


def nested() -> cf.Flow:
    """A flow nested in a flow nested in the top flow, each ending with END."""
    leaf = cf.Flow.builder("leaf").add_node("x", Recorder()).add_route("x", cf.END).build()
    inner = (
        cf.Flow.builder("inner")
        .add_node("check", Recorder())
        .add_node("deep", leaf)
        .add_route("check", "deep")
        .build()
    )
    return (
        cf.Flow.builder("outer")
        .add_node("start", Recorder())
        .add_node("sub", inner)
        .add_node("done", Recorder())
        .add_route("start", "sub")
        .add_route("sub", "done")
        .build()
    )


def test_a_chain_in_mermaid() -> None:
    assert to_mermaid(chain()) == (
        "---\n"
        'title: "chain"\n'
        "---\n"
        "flowchart TD\n"
        '    greet["greet"]\n'
        '    shout["shout"]\n'
        '    greet -->|"shout"| shout\n'
    )


def test_a_chain_in_dot() -> None:
    assert to_dot(chain()) == (
        'digraph "chain" {\n'
        "    compound=true;\n"
        "    node [shape=box];\n"
        '    "greet" [label="greet"];\n'
        '    "shout" [label="shout"];\n'
        '    "greet" -> "shout" [label="shout"];\n'
        "}\n"
    )


def test_fan_out_join_condition_and_end_in_mermaid() -> None:
    assert to_mermaid(branching()).splitlines()[4:] == [
        '    split["split"]',
        '    left["left"]',
        '    right["right"]',
        '    merge{{"merge (join)"}}',
        '    END(("END"))',
        "    split ==> left",
        "    split ==> right",
        "    left --> merge",
        "    right --> merge",
        "    merge -->|\"again when ActionCondition.compare('n', '#lt;', 3)\"| split",
        '    merge -->|"again"| END',
    ]


def test_fan_out_join_condition_and_end_in_dot() -> None:
    assert to_dot(branching()).splitlines()[3:-1] == [
        '    "split" [label="split"];',
        '    "left" [label="left"];',
        '    "right" [label="right"];',
        '    "merge" [label="merge (join)", shape=hexagon];',
        '    "END" [label="END", shape=doublecircle];',
        '    "split" -> "left" [style=bold];',
        '    "split" -> "right" [style=bold];',
        '    "left" -> "merge";',
        '    "right" -> "merge";',
        '    "merge" -> "split" [label="again when ActionCondition.compare(\'n\', \'<\', 3)"];',
        '    "merge" -> "END" [label="again"];',
    ]


def test_nested_flows_are_subgraphs_with_prefixed_ids_in_mermaid() -> None:
    assert to_mermaid(nested()).splitlines()[4:] == [
        '    start["start"]',
        '    subgraph sub ["sub: inner"]',
        '        sub__check["check"]',
        '        subgraph sub__deep ["deep: leaf"]',
        '            sub__deep__x["x"]',
        '            sub__deep__END(("END"))',
        "            sub__deep__x --> sub__deep__END",
        "        end",
        "        sub__check --> sub__deep__x",
        "    end",
        '    done["done"]',
        "    start --> sub__check",
        "    sub --> done",
    ]


def test_nested_flows_are_clusters_in_dot() -> None:
    assert to_dot(nested()).splitlines()[3:-1] == [
        '    "start" [label="start"];',
        '    subgraph "cluster_sub" {',
        '        label="sub: inner";',
        '        "sub__check" [label="check"];',
        '        subgraph "cluster_sub__deep" {',
        '            label="deep: leaf";',
        '            "sub__deep__x" [label="x"];',
        '            "sub__deep__END" [label="END", shape=doublecircle];',
        '            "sub__deep__x" -> "sub__deep__END";',
        "        }",
        '        "sub__check" -> "sub__deep__x";',
        "    }",
        '    "done" [label="done"];',
        '    "start" -> "sub__check";',
        '    "sub__check" -> "done" [ltail="cluster_sub"];',
    ]


def test_ids_are_made_safe_and_unique_and_labels_are_escaped() -> None:
    flow = (
        cf.Flow.builder('say "hi"')
        .add_node("end", Recorder())
        .add_node("a b", Recorder())
        .add_node("a_b", Recorder())
        .add_route("end", "a b", action='x"<y>#`')
        .add_route("a b", "a_b", action="two\nlines")
        .build()
    )
    assert to_mermaid(flow).splitlines() == [
        "---",
        'title: "say \\"hi\\""',
        "---",
        "flowchart TD",
        '    end_["end"]',
        '    a_b["a b"]',
        '    a_b_2["a_b"]',
        '    end_ -->|"x#quot;#lt;y#gt;#35;#96;"| a_b',
        '    a_b -->|"two lines"| a_b_2',
    ]
    assert to_dot(flow).splitlines()[0] == 'digraph "say \\"hi\\"" {'
    assert '    "end_" -> "a_b" [label="x\\"<y>#`"];' in to_dot(flow).splitlines()
    assert '    "a_b" -> "a_b_2" [label="two\\nlines"];' in to_dot(flow).splitlines()


def test_a_nested_flow_named_default_and_an_ampersand_are_safe_in_both_languages() -> None:
    # Mermaid reads `subgraph default` as a keyword; Mermaid and dot both decode an
    # entity such as &amp; in a label, so a literal & is written as one.
    inner = cf.Flow.builder("inner").add_node("a", Recorder()).build()
    flow = (
        cf.Flow.builder("outer")
        .add_node("default", inner)
        .add_node("a&amp;b", Recorder())
        .add_route("default", "a&amp;b")
        .build()
    )
    mermaid, dot = to_mermaid(flow), to_dot(flow)
    assert '    subgraph default_ ["default: inner"]' in mermaid
    assert 'a_amp_b["a#38;amp;b"]' in mermaid
    assert '"a_amp_b" [label="a&amp;amp;b"];' in dot


class _MostlySpam(cf.ActionCondition):
    """A user condition without a __repr__ of its own."""

    keys = frozenset({"labels"})

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        return True


@dataclass(frozen=True)
class _Above(cf.ActionCondition):
    """A user condition whose class defines its repr (a dataclass's)."""

    limit: int

    @property
    def keys(self) -> frozenset[str]:
        return frozenset({"n"})

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        return bool(values.get("n", 0) > self.limit)


def test_a_user_condition_is_labelled_by_its_class_or_its_own_repr() -> None:
    """No memory address: the same text in every process."""
    flow = (
        cf.Flow.builder("triage")
        .add_node("label", Recorder())
        .add_node("q", Recorder())
        .add_route("label", "q", "spam", when=_MostlySpam())
        .add_route("label", "q", "combined", when=cf.ActionCondition.always() & ~_MostlySpam())
        .add_route("label", "q", "above", when=_Above(3))
        .build()
    )
    assert [line for line in to_mermaid(flow).splitlines() if "-->" in line] == [
        '    label -->|"spam when #lt;_MostlySpam#gt;"| q',
        '    label -->|"combined when (ActionCondition.always() #38; ~#lt;_MostlySpam#gt;)"| q',
        '    label -->|"above when _Above(limit=3)"| q',
    ]
    assert '"label" -> "q" [label="spam when <_MostlySpam>"];' in to_dot(flow)


def test_flow_to_mermaid_is_the_diagram() -> None:
    flow = chain()
    assert flow.to_mermaid() == to_mermaid(flow)


def test_a_result_highlights_the_nodes_its_run_executed() -> None:
    flow = nested()
    result = flow.run_sync()
    assert result.execution_path == ("start", "check", "x", "done")
    lines = result.to_mermaid(flow).splitlines()
    assert lines[:-2] == to_mermaid(flow).splitlines()
    assert lines[-2:] == [
        "    classDef executed fill:#d7f5dd,stroke:#1e7b34,stroke-width:2px",
        "    class start,sub__check,sub__deep__x,done executed",
    ]


def test_only_the_executed_branch_is_highlighted() -> None:
    flow = (
        cf.Flow.builder("pick")
        .add_node("check", Recorder("login"))
        .add_node("dashboard", Recorder())
        .add_node("login", Recorder())
        .add_route("check", "dashboard", action="ok")
        .add_route("check", "login", action="login")
        .build()
    )
    assert flow.run_sync().to_mermaid(flow).splitlines()[-1] == "    class check,login executed"


def test_a_result_of_another_flow_is_refused() -> None:
    result = chain().run_sync()
    with pytest.raises(ValueError, match="the result is of flow 'chain', not of 'outer'"):
        result.to_mermaid(nested())
