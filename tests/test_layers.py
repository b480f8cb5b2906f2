"""The house's imports flow one way: read with ``ast``, every sftforge import goes to a module LOWER in ``ORDER``
(so there is no cycle), at module level (function-level imports only in the CLI, which keeps ``--help`` fast), and
no private name (``_x``) crosses a module boundary. A new module has to take its place in ``ORDER``."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "sftforge"

# Lowest first; docs/architecture.md lists the same flow.
ORDER = [
    "faults", "progress", "redact", "config.schema", "config.verl", "config.load", "config", "model_files", "sandbox", "distributed",  # bottom: live displays, config, process-group queries, test hooks
    "chat", "vision", "prefix_tree", "store", "data", "attention", "packing", "batching",  # rows -> samples -> micro-batches
    "loss", "ulysses", "optim", "model", "lora", "parallel",  # the model stack
    "checkpoint", "export", "metrics",  # what a run writes
    "scorers", "engine", "generation", "envs", "envs.textcraft", "envs.code", "evaluation", "grpo",  # generation, scoring, RL maths
    "run",  # the lifecycle shared by train and rl
    "sft", "rl_loop",  # the steps
    "measure", "plan", "demo", "bench", "convert", "report",  # entry points
    "cli.args", "cli.train", "cli.rl", "cli.config", "cli.data", "cli.plan", "cli.report", "cli.eval", "cli.bench", "cli.export", "cli.sandbox",  # one module per subcommand
    "cli", "__main__",
]  # fmt: skip
# the CLI keeps `--help` fast; bench runs each measured trainer in a child process that imports only what it measures
FUNCTION_LEVEL_ALLOWED = {*(m for m in ORDER if m.split(".")[0] == "cli"), "__main__", "bench"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path):
    """(target module, imported names, line, at module level) for every sftforge import of ``name``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(["sftforge", *base, *([mod] if mod else [])])
            if not (mod == "sftforge" or mod.startswith("sftforge.")):
                continue
            for alias in node.names:
                if mod == "sftforge":
                    yield alias.name, [], node.lineno, id(node) in top
                else:
                    yield mod.removeprefix("sftforge."), [alias.name], node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sftforge."):
                    yield alias.name.removeprefix("sftforge."), [], node.lineno, id(node) in top


def test_every_module_has_a_layer():
    missing = sorted(set(_modules()) - set(ORDER))
    assert not missing, f"add {missing} to ORDER in tests/test_layers.py (and docs/architecture.md)"


def test_imports_go_down_only():
    rank = {m: i for i, m in enumerate(ORDER)}
    wrong = []
    for name, path in _modules().items():
        for target, _, line, _ in _imports(name, path):
            target = target if target in rank else target.rsplit(".", 1)[0]  # `from sftforge.envs import textcraft`
            if target == name:
                continue
            if rank.get(target, -1) >= rank[name]:
                wrong.append(f"{path.name}:{line} imports {target} (layer {rank.get(target)}) from layer {rank[name]}")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_sftforge_imports_are_at_module_level():
    inner = [f"{path.relative_to(SRC)}:{line} imports {target}" for name, path in _modules().items()
             if name not in FUNCTION_LEVEL_ALLOWED for target, _, line, top in _imports(name, path) if not top]  # fmt: skip
    assert not inner, "function-level sftforge imports (only the CLI may):\n" + "\n".join(inner)


def test_no_private_name_crosses_a_module():
    crossing = []
    for name, path in _modules().items():
        aliases = set()
        for target, names, line, _ in _imports(name, path):
            crossing += [f"{path.name}:{line} imports {target}.{n}" for n in names if n.startswith("_")]
            if not names:
                aliases.add(target.rsplit(".", 1)[-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):  # fmt: skip
                crossing.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not crossing, "private names used across modules:\n" + "\n".join(crossing)


def test_the_checker_sees_a_cycle(tmp_path):
    """The rule itself: a module importing one above it is reported."""
    rank = {m: i for i, m in enumerate(ORDER)}
    p = tmp_path / "checkpoint.py"
    p.write_text("from sftforge.sft import train\n\ndef f():\n    from sftforge.data import read_rows\n")
    found = list(_imports("checkpoint", p))
    assert [(t, top) for t, _, _, top in found] == [("sft", True), ("data", False)]
    assert rank["sft"] > rank["checkpoint"]
