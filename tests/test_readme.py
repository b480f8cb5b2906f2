"""The README's config reference is generated from the dataclasses and must be current."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (ROOT / "README.md").read_text()
    assert mod.render(text) == text, "README config reference is stale: run `python scripts/update_readme.py`"


def test_readme_has_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "bash scripts/setup.sh && python -m sftforge train" in text
    assert "bash scripts/setup.sh && python -m pytest -q" in text
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
