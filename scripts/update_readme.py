"""Rewrite the documentation's generated blocks, each between ``<!-- TAG:start -->`` and ``<!-- TAG:end -->`` in its
page (tests/test_readme.py checks they are current):

- ``config-reference`` in docs/config.md: the config reference, from the dataclasses;
- ``conformance`` in docs/data.md: the chat-template conformance table, from
  tests/fixtures/chat_templates/conformance.json (the reviewed matrix that tests/test_chat_families.py checks);
- ``verl-rl-keys`` in docs/verl.md: what each of verl's RL keys becomes here.

A file is written only when its text changes.
"""

import json
import re
from pathlib import Path

from sftforge.config import config_reference, verl_rl_table

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
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


# each generated block: its page, its tag, what writes its body
BLOCKS = [
    (DOCS / "config.md", "config-reference", config_reference),
    (DOCS / "data.md", "conformance", conformance_table),
    (DOCS / "verl.md", "verl-rl-keys", verl_rl_table),
]


def render(path: Path, text: str) -> str:
    """``text`` (the text of ``path``) with each of its generated blocks rewritten."""
    for page, tag, body in BLOCKS:
        if page == path:
            if text.count(f"<!-- {tag}:start -->") != 1 or text.count(f"<!-- {tag}:end -->") != 1:
                raise ValueError(
                    f"{path.relative_to(ROOT)} needs one <!-- {tag}:start --> ... <!-- {tag}:end --> block"
                )
            text = _replace(text, tag, body())
    return text


def main() -> None:
    for path in dict.fromkeys(page for page, _, _ in BLOCKS):
        old = path.read_text()
        new = render(path, old)
        if new != old:
            path.write_text(new)
        print(f"{'updated' if new != old else 'current'}: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
