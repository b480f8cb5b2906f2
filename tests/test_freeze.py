"""Freezing by regex (model.trainable / model.frozen): no optimizer state, bitwise unchanged weights, report, errors."""

import pytest
import torch
from safetensors.torch import load_file
from test_train import cfg_for, final_weights, make_samples

from sftforge.config import ConfigError, ModelConfig, load_config
from sftforge.lora import parameter_report, prepare_model
from sftforge.model import load_model
from sftforge.optim import build_optimizer
from sftforge.sft import train


def tiny(model_config_dir):
    return load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny")))


def test_frozen_params_unchanged_and_without_optimizer_state(tmp_path, model_config_dir, tokenizer_dirs, capsys):
    extra = ["model.trainable=[layers\\.1\\.mlp,norm\\.weight$]", "data.micro_batch_size_per_gpu=4"]
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "f", extra=extra)
    result = train(cfg, train_dataset=make_samples(8))
    out = capsys.readouterr().out
    assert "frozen vs trainable parameters" in out and "trainable" in out and "frozen" in out
    before = tiny(model_config_dir).state_dict()
    after = final_weights(result)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("layers.1.mlp" in k or k.endswith("norm.weight") for k in changed), changed
    for k, v in after.items():
        if not ("layers.1.mlp" in k or k.endswith("norm.weight")):
            assert torch.equal(v, before[k]), k  # bitwise unchanged
    # optimizer state exists only for the trainable parameters
    opt = torch.load(tmp_path / "f" / "step_3" / "optimizer.pt", weights_only=True)
    ckpt = load_file(str(tmp_path / "f" / "step_3" / "model.safetensors"))
    trainable = [k for k in ckpt if "layers.1.mlp" in k or k.endswith("norm.weight")]
    assert len(opt["state"]) == len(trainable)


def test_optimizer_built_over_trainable_only(model_config_dir):
    model = tiny(model_config_dir)
    cfg = ModelConfig(path="x", frozen=["embed_tokens", r"layers\.0\."])
    prepare_model(model, cfg)
    opt = build_optimizer(model, load_config(None).optim)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad, name
        assert p.requires_grad == ("embed_tokens" not in name and "layers.0." not in name), name
    counts = parameter_report(model)
    assert counts["frozen"] > counts["trainable"] > 0


def test_freezing_errors(model_config_dir):
    model = tiny(model_config_dir)
    with pytest.raises(ConfigError, match="model.trainable .* or model.frozen .*not both"):
        prepare_model(model, ModelConfig(path="x", trainable=["a"], frozen=["b"]))
    with pytest.raises(ConfigError, match=r"model.frozen: pattern 'self_atn' matches no parameter.*model.embed_tokens"):
        prepare_model(model, ModelConfig(path="x", frozen=["self_atn"]))
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        prepare_model(model, ModelConfig(path="x", trainable=["("]))
    with pytest.raises(ConfigError, match="No parameter is trainable"):
        prepare_model(model, ModelConfig(path="x", frozen=["."]))
