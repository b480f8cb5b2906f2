"""The README and the docs are the contract: every ```bash block of README.md and docs/*.md is tagged
``<!-- readme-test: run -->`` (run here, as written) or ``<!-- readme-test: skip: why -->``; the run blocks execute in a
copy of the repository with no ``../shared`` beside it, with ``MODEL`` set to a tiny random-init Qwen3 folder
(config.json + the real Qwen3 tokenizer), on CPU, from the repository's root."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TAG = re.compile(r"<!-- readme-test: (run|skip: [^>]+?) -->\s*\n```bash\n(.*?)```", re.S)


def pages() -> list[Path]:
    """The README, then the docs pages, by name."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path | None = None) -> list[tuple[str, str, str]]:
    """(page, tag, script) of every tagged ```bash block of ``page``, or of every page."""
    return [
        (str(p.relative_to(ROOT)), m.group(1), m.group(2))
        for p in ([page] if page else pages())
        for m in TAG.finditer(p.read_text())
    ]


def test_every_bash_block_is_tagged():
    for page in pages():
        assert page.read_text().count("```bash") == len(blocks(page)), (
            f"tag each ```bash block of {page.relative_to(ROOT)} with <!-- readme-test: run --> or "
            "<!-- readme-test: skip: why -->"
        )
    assert sum(kind == "run" for _, kind, _ in blocks(ROOT / "README.md")) >= 1
    assert sum(kind == "run" for _, kind, _ in blocks()) >= 2


def test_the_walkthrough_is_the_same_in_the_readme_and_the_docs():
    """The README's walkthrough runs below; docs/getting-started.md shows the same block (tagged skip)."""
    [walk] = [s for _, kind, s in blocks(ROOT / "README.md") if kind == "run" and "sftforge train" in s]
    assert walk in [s for _, _, s in blocks(ROOT / "docs" / "getting-started.md")]


def _repo_copy(dest: Path) -> Path:
    """The files a clone would have (tracked + untracked-not-ignored: a clean clone of this working tree)."""
    args = ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()
    for rel in out:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def copy_env(tmp_path_factory, model_config_dir, tokenizer_dirs):
    """(repository copy, environment): ``sftforge`` runs the copy's code; ``MODEL`` is a tiny random-init Qwen3."""
    tmp = tmp_path_factory.mktemp("readme")
    repo = _repo_copy(tmp / "work" / "sftforge")
    assert not (repo.parent / "shared").exists()
    model = tmp / "tiny-qwen3"
    model.mkdir()
    shutil.copy(model_config_dir / "qwen3-tiny" / "config.json", model)
    for f in tokenizer_dirs["qwen3"].iterdir():
        shutil.copy(f, model)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "sftforge").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m sftforge "$@"\n')
    (bin_dir / "sftforge").chmod(0o755)
    env = {
        **os.environ,
        "MODEL": str(model),
        "PYTHONPATH": str(repo / "src"),
        "OMP_NUM_THREADS": "2",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    args = [sys.executable, "-c", "import sftforge; print(sftforge.__file__)"]
    where = subprocess.run(args, env=env, cwd=repo, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(repo)), where
    return repo, env


def _run(args, repo, env, timeout=900):
    return subprocess.run(args, env=env, cwd=repo, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_readme_run_blocks_work_from_a_copy_without_shared(copy_env):
    repo, env = copy_env
    for page, kind, script in blocks():
        if kind != "run":
            continue
        p = _run(["bash", "-euo", "pipefail", "-c", script], repo, env)
        assert p.returncode == 0, f"a block of {page} failed:\n{script}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    out = repo / "outputs" / "tc"
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf = out / "step_4" / "huggingface"
    AutoModelForCausalLM.from_pretrained(str(hf))
    a, b = load_file(hf / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (repo / "outputs" / "tc_rl" / "final" / "model.safetensors").is_file()


# hub models of the examples -> the same shape from tests/fixtures (config only) and the family's real tokenizer
LOCAL_SHAPES = {"Qwen/Qwen3-1.7B": ("qwen3-1.7b", "qwen3"), "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2.5-0.5b", "qwen2.5")}


@pytest.mark.slow
def test_every_example_plans_and_the_cpu_sized_one_trains(copy_env, model_config_dir, tokenizer_dirs):
    """Every examples/*.yaml plans from the repository alone (its data is in the repository; a user's own data
    file, data/train.parquet, is stood in for by the vendored TextCraft set); quickstart also trains a step."""
    import yaml

    repo, env = copy_env
    configs = sorted((repo / "examples").glob("*.yaml"))
    assert len(configs) >= 4
    for cfg in configs:
        raw = yaml.safe_load(cfg.read_text())
        model = (raw.get("model") or {}).get("path") or (raw.get("model") or {}).get("partial_pretrain")
        extra = []
        if model in LOCAL_SHAPES:
            shape, tok = LOCAL_SHAPES[model]
            extra += [f"model.path={model_config_dir / shape}", f"model.tokenizer_path={tokenizer_dirs[tok]}"]
        for key in ("train_files", "val_files"):
            value = (raw.get("data") or {}).get(key)
            if value and not (repo / value).exists():
                extra.append(f"data.{key}=data/textcraft/train_tools.parquet")
        p = _run(["sftforge", "plan", str(cfg.relative_to(repo)), *extra], repo, env, timeout=300)
        assert p.returncode == 0, f"{cfg.name}: {p.stdout[-2000:]}{p.stderr[-2000:]}"
        assert "memory per GPU" in p.stdout, p.stdout[-2000:]
    args = ["sftforge", "train", "examples/quickstart.yaml", "trainer.max_steps=1", "trainer.output_dir=outputs/q"]
    p = _run(args, repo, env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (repo / "outputs" / "q" / "final" / "model.safetensors").is_file()
