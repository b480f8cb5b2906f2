import random

import pytest
import torch
import yaml

from sftforge.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from sftforge.cli import train_main
from sftforge.config import ConfigError, ModelConfig, OptimConfig, load_config
from sftforge.export import export_hf
from sftforge.metrics import MetricsLogger, read_metrics
from sftforge.model import load_model
from sftforge.optim import build_optimizer


def _model(model_config_dir, name="qwen3-tiny", seed=0):
    return load_model(ModelConfig(path=str(model_config_dir / name), init_seed=seed))


def _one_step(model, opt):
    ids = torch.tensor([[11, 12, 13, 14]])
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_save_load_roundtrip_and_rng(tmp_path, model_config_dir):
    model = _model(model_config_dir)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    _one_step(model, opt)
    torch.manual_seed(5)
    random.seed(5)
    path = save_checkpoint(tmp_path, 3, model, opt, {"epoch": 1, "index_in_epoch": 2}, {"a": 1})
    expected = (torch.rand(3), random.random())
    assert path.name == "step_3" and (path / "COMPLETE").exists()
    assert yaml.safe_load((path / "config.yaml").read_text()) == {"a": 1}

    other = _model(model_config_dir, seed=1)
    other_opt = build_optimizer(other, OptimConfig(lr=1e-3))
    state = load_checkpoint(path, other, other_opt)
    assert state["step"] == 3 and state["epoch"] == 1 and state["index_in_epoch"] == 2
    assert (torch.rand(3), random.random()) == (pytest.approx(expected[0]), expected[1])
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    assert other.get_input_embeddings().weight is other.get_output_embeddings().weight  # still tied
    sa, sb = opt.state_dict(), other_opt.state_dict()
    for k in sa["state"]:
        assert torch.equal(sa["state"][k]["exp_avg"], sb["state"][k]["exp_avg"])


def test_latest_and_resume_policy(tmp_path, model_config_dir):
    assert latest_checkpoint(tmp_path) is None
    model = _model(model_config_dir)
    opt = build_optimizer(model, OptimConfig())
    save_checkpoint(tmp_path, 2, model, opt, {})
    save_checkpoint(tmp_path, 10, model, opt, {})
    (tmp_path / "step_20").mkdir()  # an interrupted save: no marker
    (tmp_path / "step_30.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_10"
    assert resolve_resume("auto", tmp_path).name == "step_10"
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(str(tmp_path / "step_2"), tmp_path).name == "step_2"
    with pytest.raises(ConfigError, match="trainer.resume"):
        resolve_resume(str(tmp_path / "step_20"), tmp_path)


def test_export_loads_with_from_pretrained(tmp_path, model_config_dir, tokenizers):
    from transformers import AutoModelForCausalLM

    model = _model(model_config_dir, "phi3-tiny").eval()
    out = export_hf(model, tmp_path / "final", tokenizers["phi3"], [32007, 32000])
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.generation_config.eos_token_id == [32007, 32000]
    assert not list(out.glob("*.bin"))
    # a folder with weights is loaded as pretrained, not re-initialized
    again = load_model(ModelConfig(path=str(out), init_seed=123)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_model_loading_rules(tmp_path, model_config_dir):
    a, b = _model(model_config_dir, seed=3), _model(model_config_dir, seed=3)
    c = _model(model_config_dir, seed=4)
    wa = a.get_input_embeddings().weight
    assert torch.equal(wa, b.get_input_embeddings().weight)
    assert not torch.equal(wa, c.get_input_embeddings().weight)
    (tmp_path / "config.json").write_text((model_config_dir / "qwen3-tiny" / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="safetensors"):
        load_model(ModelConfig(path=str(tmp_path)))
    with pytest.raises(ConfigError, match="flash-attn|attn_implementation"):
        load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"), attn_implementation="flash_attention_2"))


def test_missing_logger_package_names_the_fix(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("wandb", "swanlab") else real(n, *a))
    with pytest.raises(ConfigError, match=r"trainer.logger.*pip install wandb"):
        MetricsLogger(tmp_path, ["console", "wandb"], 10)
    with pytest.raises(ConfigError, match=r"trainer.logger includes 'swanlab'.*pip install swanlab"):
        MetricsLogger(tmp_path, ["console", "swanlab"], 10)
    with pytest.raises(ConfigError, match="unknown logger"):
        MetricsLogger(tmp_path, ["mlflow"], 10)


def test_train_main_end_to_end_with_data_pipeline(tmp_path, model_config_dir, tokenizer_dirs, textcraft_dir):
    rc = train_main(
        None,
        [
            f"model.path={model_config_dir / 'qwen3-tiny'}",
            f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
            f"data.train_files={textcraft_dir / 'train_tools.jsonl'}",
            f"data.val_files={textcraft_dir / 'train_tools.jsonl'}",
            "data.train_batch_size=4",
            "data.micro_batch_size_per_gpu=2",
            "data.max_length=2048",
            "data.truncation=drop",
            "trainer.max_steps=2",
            "trainer.device=cpu",
            "trainer.logger=[console,jsonl]",
            "model.dtype=bf16",
            "model.enable_gradient_checkpointing=true",
            f"trainer.output_dir={tmp_path / 'run'}",
        ],
    )
    assert rc == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("step") for r in records] == [1, 2, None]
    assert records[-2]["val_loss"] > 0 and records[-1]["event"] == "end"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert cfg.trainer.max_steps == 2 and cfg.model.dtype == "bf16"


def test_resume_warns_about_changed_batch_or_schedule(tmp_path):
    from sftforge.config import to_dict
    from sftforge.run import resume_differences

    saved = load_config(None, ["data.train_batch_size=8"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(saved)))
    assert resume_differences(tmp_path, saved) == []
    lines = resume_differences(tmp_path, load_config(None, ["data.train_batch_size=16", "trainer.stop_at_step=3"]))
    assert len(lines) == 1 and "data.train_batch_size was 8" in lines[0]


def test_export_names_a_step_folder_without_weights(tmp_path, capsys):
    from sftforge.cli import main as cli_main
    from sftforge.config import Config, to_dict

    step = tmp_path / "run" / "step_3"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("ok\n")
    (step / "config.yaml").write_text(yaml.safe_dump(to_dict(Config()), sort_keys=False))
    assert cli_main(["export", str(step), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(step) in err and "neither model.safetensors" in err and "dcp/" in err
    assert not (tmp_path / "out").exists()
