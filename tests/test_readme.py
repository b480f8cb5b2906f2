"""The README is the landing page and docs/ the documentation: the generated blocks (config reference, chat-template
conformance, verl's RL keys) are current in their pages, the README links every page, and the site builds strictly
(no broken link, anchor or page left out of its nav)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_blocks_are_current():
    mod = _update_readme()
    assert {tag for _, tag, _ in mod.BLOCKS} == {"config-reference", "conformance", "verl-rl-keys"}
    for page, tag, _ in mod.BLOCKS:
        text = page.read_text()
        assert f"<!-- {tag}:start -->" in text, f"{page.relative_to(ROOT)} lost its {tag} block"
        assert mod.render(page, text) == text, (
            f"the {tag} block of {page.relative_to(ROOT)} is stale: run `python scripts/update_readme.py`"
        )
    readme = (ROOT / "README.md").read_text()
    assert ":start -->" not in readme, "the generated blocks live in docs/ (scripts/update_readme.py writes them there)"


def test_readme_has_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "bash scripts/setup.sh && python -m sftforge train" in text
    assert "bash scripts/setup.sh && python -m pytest -q" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci
    assert "mkdocs build --strict" in ci


def test_readme_is_a_landing_page_that_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250, "keep the README a landing page: the details go to docs/"
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    missing = [p for p in pages if f"](docs/{p}" not in text and p != "index.md"]
    assert not missing, f"link these pages from the README's feature table: {missing}"
    for target, anchor in re.findall(r"\]\((docs/[^)#]+)(?:#([^)]+))?\)", text):
        assert (ROOT / target).is_file(), f"the README links {target}, which does not exist"
        if anchor and target.endswith(".md"):
            headings = re.findall(r"^#+ (.+)$", (ROOT / target).read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"the README links {target}#{anchor}: no such heading"
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(re.search(rf":\s*{re.escape(p)}\s*$", nav, re.M) for p in pages), (
        "every docs page is in mkdocs.yml's nav"
    )


def test_the_python_api_page_shows_the_block_the_first_hour_test_runs():
    """tests/test_first_hour.py runs the README's ``<!-- readme-test: python -->`` block; docs/python-api.md has a copy."""
    block = re.compile(r"<!-- readme-test: python -->\s*\n```python\n(.*?)```", re.S)
    readme = block.search((ROOT / "README.md").read_text())
    page = block.search((DOCS / "python-api.md").read_text())
    assert readme and page and readme.group(1) == page.group(1)


def test_docs_build_strict(tmp_path):
    """``mkdocs build --strict`` (mkdocs.yml's validation makes a broken link or anchor, and a page missing from the
    nav, a warning, and strict makes a warning fail the build)."""
    missing = [m for m in ("mkdocs", "material") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (the docs extra: pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    p = subprocess.run([*cmd, "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, env=env)
    assert p.returncode == 0, f"mkdocs build --strict failed:\n{p.stdout[-3000:]}{p.stderr[-5000:]}"
    assert (tmp_path / "site" / "index.html").is_file()
