"""Every shipped example config validates; the TextCraft one carries the seed hyper-parameters."""

from pathlib import Path

import pytest

from sftforge.config import load_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_validates(path):
    cfg = load_config(path)
    assert cfg.model.path and cfg.data.train_files


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_paths_exist_from_a_clone(path, monkeypatch):
    """An example runs from the repository as shipped: every data path it names exists from the repository root,
    where the README runs it (examples/custom_module/memory.yaml names the files its run.py writes first; that flow
    runs end to end below)."""
    from sftforge.data import check_data_paths

    monkeypatch.chdir(path.parent.parent)
    check_data_paths(load_config(path).data)


def test_textcraft_seed_hyper_parameters():
    cfg = load_config(Path(__file__).parent.parent / "examples" / "textcraft_qwen3.yaml")
    assert (cfg.data.train_batch_size, cfg.data.micro_batch_size_per_gpu, cfg.optim.lr) == (256, 2, 1e-5)
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.01 and cfg.optim.warmup_ratio == 0.1
    assert cfg.optim.clip_grad == 1.0 and cfg.optim.lr_scheduler == "cosine"
    assert cfg.trainer.total_epochs == 10 and cfg.data.max_length == 4096


def test_vlm_demo_runs_end_to_end(tmp_path):
    """examples/vlm/vlm_demo.py (the README's command) for a few steps on a few pictures: before/after printed."""
    import subprocess
    import sys

    pytest.importorskip("PIL")
    script = Path(__file__).parent.parent / "examples" / "vlm" / "vlm_demo.py"
    p = subprocess.run([sys.executable, str(script), "--train", "64", "--test", "8", "trainer.max_steps=3",
                        "data.train_batch_size=8", "data.micro_batch_size_per_gpu=8", f"trainer.output_dir={tmp_path / 'o'}"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "before training:" in p.stdout and "after training:" in p.stdout, p.stdout
    assert (tmp_path / "o" / "final" / "preprocessor_config.json").is_file()


def test_custom_module_flow_runs_end_to_end(tmp_path):
    """examples/custom_module/run.py (the README's ExplicitLM flow) with a few steps per stage, from a copy."""
    import shutil
    import subprocess
    import sys

    src = Path(__file__).parent.parent / "examples" / "custom_module"
    shutil.copytree(src, tmp_path / "examples" / "custom_module", ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "examples/custom_module/run.py", "--stage1-steps", "3", "trainer.max_steps=3"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "before training:" in p.stdout and "after training the memory modules only:" in p.stdout, p.stdout
    final = tmp_path / "outputs" / "custom_module" / "run" / "final"
    assert {"model.safetensors", "trainable.safetensors", "config.yaml"} <= {f.name for f in final.iterdir()}


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples").glob("*/*.yaml")), ids=str)
def test_example_folder_configs_validate(path):
    cfg = load_config(path)
    assert cfg.data.train_files
