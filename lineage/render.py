"""A :class:`lineage.graph.Lineage` as text (an indented tree), JSON, or a Mermaid flowchart."""

from __future__ import annotations

import json

from lineage.graph import Lineage, Node

FORMATS = ("text", "json", "mermaid")


def to_text(graph: Lineage) -> str:
    """The graph as a tree from its root; a node reached twice is printed once, then referred to."""
    lines: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str, prefix: str, relation: str | None, last: bool) -> None:
        node = graph.nodes[node_id]
        branch = "" if relation is None else ("└─ " if last else "├─ ")
        head = f"{relation}: " if relation else ""
        if node_id in seen:
            lines.append(f"{prefix}{branch}{head}{node.label} (see above)")
            return
        seen.add(node_id)
        lines.append(f"{prefix}{branch}{head}{node.label}")
        inner = prefix + ("" if relation is None else ("   " if last else "│  "))
        children = graph.children(node_id)
        for detail in node.details:
            lines.append(f"{inner}{'│  ' if children else '   '}{detail}")
        for i, edge in enumerate(children):
            visit(edge.target, inner, edge.relation, i == len(children) - 1)

    visit(graph.root, "", None, True)
    return "\n".join(lines)


def to_json(graph: Lineage) -> str:
    return json.dumps(graph.to_dict(), indent=2, default=str)


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def _mermaid_label(node: Node) -> str:
    return "<br/>".join(_mermaid_text(line) for line in [node.label, *node.details[:3]])


def to_mermaid(graph: Lineage) -> str:
    """``flowchart LR`` with one box per node; missing links are dashed boxes."""
    ids = {node_id: f"n{i}" for i, node_id in enumerate(graph.nodes)}
    lines = ["flowchart LR"]
    lines += [f'  {ids[n.id]}["{_mermaid_label(n)}"]' for n in graph.nodes.values()]
    lines += [f'  {ids[e.source]} -->|"{_mermaid_text(e.relation)}"| {ids[e.target]}' for e in graph.edges]
    missing = [ids[n.id] for n in graph.nodes.values() if n.missing]
    if missing:
        lines.append("  classDef missing stroke-dasharray: 5 5,color:#a00")
        lines.append(f"  class {','.join(missing)} missing")
    return "\n".join(lines)


def render(graph: Lineage, fmt: str) -> str:
    return {"text": to_text, "json": to_json, "mermaid": to_mermaid}[fmt](graph)
