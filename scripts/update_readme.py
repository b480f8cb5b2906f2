"""Rewrite the README's config reference from the dataclasses (tests/test_readme.py checks it is current)."""

import re
from pathlib import Path

from sftforge.config import config_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def render(text: str) -> str:
    block = f"<!-- config-reference:start -->\n{config_reference()}\n<!-- config-reference:end -->"
    return re.sub(r"<!-- config-reference:start -->.*?<!-- config-reference:end -->", lambda _: block, text, flags=re.S)


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
    print(f"updated {README}")
