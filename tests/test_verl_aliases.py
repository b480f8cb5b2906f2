"""verl SFT keys map to ours with one info line each, or fail with a clear error when there is no equivalent."""

from pathlib import Path

import pytest

from sftforge.config import VERL_ALIASES, load_config

ROOT = Path(__file__).resolve().parent.parent

# (override, attribute path, expected value)
CASES = [
    ("data.micro_batch_size=4", "data.micro_batch_size_per_gpu", 4),
    ("data.multiturn.enable=false", "data.format", "prompt_response"),
    ("data.multiturn.enable=true", "data.format", "auto"),
    ("data.multiturn.messages_key=conv", "data.messages_key", "conv"),
    ("data.multiturn.tools_key=fns", "data.tools_key", "fns"),
    ("model.partial_pretrain=Qwen/Qwen3-1.7B", "model.path", "Qwen/Qwen3-1.7B"),
    ("optim.lr_warmup_steps_ratio=0.05", "optim.warmup_ratio", 0.05),
    ("trainer.default_local_dir=/tmp/ckpt", "trainer.output_dir", "/tmp/ckpt"),
    ("trainer.total_training_steps=123", "trainer.max_steps", 123),
    ("trainer.total_training_steps=null", "trainer.max_steps", 0),
    ("use_remove_padding=false", "data.packing", False),
    ("model.use_remove_padding=true", "data.packing", True),
    ("ulysses_sequence_parallel_size=1", "data.packing", True),
    ("ulysses_sequence_parallel_size=4", "trainer.sp_size", 4),
]


def _get(cfg, dotted):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("override,attr,expected", CASES, ids=[c[0] for c in CASES])
def test_alias_maps_with_one_info_line(override, attr, expected, capsys):
    cfg = load_config(None, [override])
    assert _get(cfg, attr) == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"info: verl key {override.split('=')[0]}=")


def test_every_alias_has_a_case():
    covered = {c[0].split("=")[0] for c in CASES} | {"trainer.project_name", "trainer.experiment_name"}
    assert set(VERL_ALIASES) <= covered


def test_project_and_experiment_name_name_the_wandb_run(monkeypatch, capsys):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_NAME", raising=False)
    import os

    load_config(None, ["trainer.project_name=textcraft", "trainer.experiment_name=qwen3-sft"])
    assert os.environ["WANDB_PROJECT"] == "textcraft" and os.environ["WANDB_NAME"] == "qwen3-sft"
    assert capsys.readouterr().err.count("info: verl key") == 2


def test_native_verl_keys_need_no_alias(capsys):
    cfg = load_config(None, ["model.enable_gradient_checkpointing=true", "trainer.logger=[console,wandb]"])
    assert cfg.model.enable_gradient_checkpointing and cfg.trainer.logger == ["console", "wandb"]
    assert capsys.readouterr().err == ""


def test_ulysses_is_sp_size():
    assert load_config(None, ["ulysses_sequence_parallel_size=2"]).trainer.sp_size == 2


def test_aliases_in_yaml_nested_sections(tmp_path):
    p = tmp_path / "verl.yaml"
    p.write_text(
        "data:\n  micro_batch_size: 2\n  multiturn:\n    enable: true\n    messages_key: msgs\n"
        "model:\n  partial_pretrain: some/model\n  use_remove_padding: true\n"
        "trainer:\n  default_local_dir: out\n  total_training_steps: 7\n"
        "use_remove_padding: true\nulysses_sequence_parallel_size: 1\n"
    )
    cfg = load_config(p)
    assert cfg.data.micro_batch_size_per_gpu == 2 and cfg.data.messages_key == "msgs"
    assert cfg.model.path == "some/model" and cfg.trainer.output_dir == "out" and cfg.trainer.max_steps == 7


def test_verl_textcraft_example_matches_the_native_one():
    verl = load_config(ROOT / "examples" / "textcraft_verl.yaml")
    ours = load_config(ROOT / "examples" / "textcraft_qwen3.yaml")
    for key in ("data.train_batch_size", "data.micro_batch_size_per_gpu", "data.max_length", "optim.lr",
                "optim.warmup_ratio", "optim.lr_scheduler", "trainer.total_epochs", "data.packing"):  # fmt: skip
        assert _get(verl, key) == _get(ours, key), key
