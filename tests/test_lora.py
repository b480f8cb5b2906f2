"""LoRA through peft: exact resume, optimizer state only for the adapters, merged + adapter export, `sftforge export`."""

import pytest
import torch
from safetensors.torch import load_file
from test_train import cfg_for, final_weights, losses, make_samples

from sftforge.cli import main as cli_main
from sftforge.config import ConfigError, ModelConfig
from sftforge.model import load_model
from sftforge.sft import train

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "data.micro_batch_size_per_gpu=4", "trainer.save_freq=1"]


def base_model(model_config_dir):
    return load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_resume_is_exact_and_only_adapters_change(tmp_path, model_config_dir, tokenizer_dirs):
    data = make_samples(16)
    extra = [*LORA, "trainer.max_steps=4", "model.lora.dropout=0.1"]  # dropout: the RNG must resume too
    full = train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "full", extra=extra), train_dataset=data)
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "cut", extra=[*extra, "trainer.stop_at_step=2"])
    assert train(cfg, train_dataset=data)["step"] == 2
    second = train(cfg, train_dataset=data)
    a, b = final_weights(full), final_weights(second)
    for name in a:
        assert torch.equal(b[name], a[name]), name
    assert losses(second) == pytest.approx(losses(full), rel=1e-6)
    # the checkpoint: optimizer state for the adapter matrices only
    opt = torch.load(tmp_path / "full" / "step_4" / "optimizer.pt", weights_only=True)
    ckpt = load_file(str(tmp_path / "full" / "step_4" / "model.safetensors"))
    n_lora = sum(1 for k in ckpt if ".lora_" in k)
    assert n_lora > 0 and len(opt["state"]) == n_lora
    # base weights in the checkpoint are the untouched initialization
    base = base_model(model_config_dir).state_dict()
    for key, value in ckpt.items():
        if ".base_layer." in key or (".lora_" not in key and "lora" not in key):
            plain = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(value, base[plain]), key


def test_final_export_merged_and_adapter(tmp_path, model_config_dir, tokenizer_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = make_samples(8)
    result = train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "r", extra=LORA), train_dataset=data)
    final = tmp_path / "r" / "final"
    assert not any(".lora_" in k for k in load_file(str(final / "model.safetensors")))
    merged = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    adapted = PeftModel.from_pretrained(base_model(model_config_dir), str(final / "adapter")).eval()
    ids = torch.tensor([data[0].input_ids])
    ref = logits(adapted, ids)
    torch.testing.assert_close(logits(merged, ids), ref, rtol=0, atol=1e-5)
    assert (logits(base_model(model_config_dir), ids) - ref).abs().max() > 1e-4  # the adapter did learn something
    assert result["final_dir"] == str(final)


def test_export_cli_merge_and_adapter_only(tmp_path, model_config_dir, tokenizer_dirs, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = make_samples(8)
    extra = [*LORA, "trainer.max_steps=3", "trainer.stop_at_step=2"]  # export from a checkpoint of an unfinished run
    train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "r", extra=extra), train_dataset=data)
    run = tmp_path / "r"
    assert cli_main(["export", str(run / "step_2"), "--output", str(tmp_path / "merged"), "--merge"]) == 0
    assert cli_main(["export", str(run), "--output", str(tmp_path / "adapter")]) == 0  # run dir: newest (step_2)
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    ids = torch.tensor([data[1].input_ids])
    # reference: base + the checkpoint's adapter, loaded by hand
    ref_model = base_model(model_config_dir)
    from sftforge.checkpoint import load_checkpoint
    from sftforge.config import load_config
    from sftforge.lora import prepare_model

    cfg = load_config(run / "step_2" / "config.yaml")
    ref_model = prepare_model(ref_model, cfg.model)
    load_checkpoint(run / "step_2", ref_model, None, restore_rng=False)
    ref = logits(ref_model.eval(), ids)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(logits(merged, ids), ref, rtol=0, atol=1e-5)
    adapted = PeftModel.from_pretrained(base_model(model_config_dir), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(adapted, ids), ref, rtol=0, atol=1e-6)
    assert cli_main(["export", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_lora_config_errors(model_config_dir):
    from sftforge.lora import prepare_model

    model = base_model(model_config_dir)
    cfg = ModelConfig(path="x", trainable=["lm_head"])
    cfg.lora.rank = 4
    with pytest.raises(ConfigError, match="trains only the LoRA adapters"):
        prepare_model(model, cfg)
    cfg = ModelConfig(path="x")
    cfg.lora.rank, cfg.lora.target_modules = 4, ["qq_proj"]
    with pytest.raises(ConfigError, match=r"model.lora.target_modules=\['qq_proj'\].*q_proj"):
        prepare_model(model, cfg)
