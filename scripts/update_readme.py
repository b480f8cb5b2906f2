"""Rewrite the README's generated blocks (tests/test_readme.py checks they are current):

- the config reference, from the dataclasses;
- the chat-template conformance table, from tests/fixtures/chat_templates/conformance.json (the reviewed matrix
  that tests/test_chat_families.py checks).
"""

import json
import re
from pathlib import Path

from sftforge.config import config_reference, verl_rl_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEMPLATES = ROOT / "tests" / "fixtures" / "chat_templates"

# Why a cell is refused, in a few words; keyed by (family, shape), else by what the refusal says.
NOTES = {
    ("deepseek-v3", "tool calls"): "refused: the template renders a 2nd tool-call turn without its header",
    ("gemma2", "multi-turn"): "refused: no system role (✓ with `data.system_into_first_user=true`)",
}


def _cell(name: str, shape: str, o: dict) -> str:
    if (name, shape) in NOTES:
        return NOTES[(name, shape)]
    if "refused" in o:
        d = o["detail"]
        if "tool calls and" in d:
            return "refused: the template renders no tool calls"
        if "failed to render a probe" in d:
            return "refused: the template fails on plain-text messages (a VLM template: content parts)"
        if o["refused"] == "template needs tools":
            return "refused: the template renders only conversations with tools (rows with tools ✓)"
        if "IDs should be alphanumeric strings with length 9" in d:
            return "refused by the template: tool-call ids must be 9 letters or digits (these are `c0`, `c1`)"
        if o["refused"] == "system role":
            return "refused: the template drops the system message (✓ with `data.system_into_first_user=true`)"
        return f"refused: {o['refused']}"
    segs = o["trained"]
    if shape == "multi-turn":
        ends = [s.rsplit("It is ", 1)[-1][2:] for s in segs]
        return "✓ closes with " + " … ".join(f"`{e}`" for e in dict.fromkeys(ends))
    if shape == "reasoning":
        text = "".join(segs)
        kept = [r for r in ("Two plus two.", "Three plus three.") if r in text]
        return (
            "✓ "
            + {0: "(reasoning not rendered: counted)", 1: "(last turn's reasoning)", 2: "(every turn's)"}[len(kept)]
        )
    return "✓"


def conformance_table() -> str:
    families = json.loads((TEMPLATES / "families.json").read_text())
    matrix = json.loads((TEMPLATES / "conformance.json").read_text())
    shapes = list(next(iter(matrix.values())))
    lines = ["| family | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for name, outcomes in matrix.items():
        cells = [_cell(name, s, outcomes[s]) for s in shapes]
        cells = [c.replace("|", "\\|") for c in cells]  # a pipe inside a code span still splits a table cell
        lines.append(f"| {families[name]['family']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _replace(text: str, tag: str, body: str) -> str:
    block = f"<!-- {tag}:start -->\n{body}\n<!-- {tag}:end -->"
    return re.sub(rf"<!-- {tag}:start -->.*?<!-- {tag}:end -->", lambda _: block, text, flags=re.S)


def render(text: str) -> str:
    text = _replace(text, "config-reference", config_reference())
    text = _replace(text, "verl-rl-keys", verl_rl_table())
    return _replace(text, "conformance", conformance_table())


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
    print(f"updated {README}")
