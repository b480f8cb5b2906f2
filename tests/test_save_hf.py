"""trainer.save_hf: every step_<N>/ also holds huggingface/ (verl's global_step_N/huggingface), written with the
checkpoint before it is marked complete and pruned with it; it loads with AutoModelForCausalLM.from_pretrained, and at
the last step it equals final/. LoRA: merged + adapter. FSDP2 (one process): gathered from the shards."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import cfg_for, make_samples
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftforge.checkpoint import is_complete
from sftforge.sft import train


def _equal(a, b):
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_each_checkpoint_holds_a_loadable_hf_folder_pruned_with_it(tmp_path, model_config_dir, tokenizer_dirs):
    extra = ["trainer.save_hf=true", "trainer.save_freq=2", "trainer.max_steps=4", "trainer.max_ckpt_to_keep=1"]
    res = train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, extra=extra), train_dataset=make_samples(16))
    out = tmp_path / "run"
    hf = out / "step_4" / "huggingface"
    assert is_complete(out / "step_4") and not (out / "step_2").exists()  # pruned, huggingface/ with it
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in hf.iterdir()
    }
    assert _equal(hf, out / "final")
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(res["final_dir"])(ids).logits
        assert torch.equal(model(ids).logits, want)
    assert AutoTokenizer.from_pretrained(str(hf)).encode("hi") == AutoTokenizer.from_pretrained(
        res["final_dir"]
    ).encode("hi")
    assert "sftforge" not in (hf / "config.json").read_text()  # the model's own attention, not the packed one
    # training turns the KV cache off; the export's generate() must have it (it wrote use_cache: false once)
    assert json.loads((hf / "generation_config.json").read_text()).get("use_cache", True) is True


def test_save_hf_lora_writes_merged_and_adapter(tmp_path, model_config_dir, tokenizer_dirs):
    extra = ["trainer.save_hf=true", "trainer.save_freq=2", "trainer.max_steps=2", "model.lora.rank=4",
             "model.lora.alpha=8"]  # fmt: skip
    train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, extra=extra), train_dataset=make_samples(16))
    hf = tmp_path / "run" / "step_2" / "huggingface"
    assert (hf / "adapter" / "adapter_config.json").is_file()
    assert not any("lora" in k for k in load_file(hf / "model.safetensors"))
    assert _equal(hf, tmp_path / "run" / "final")


@pytest.mark.slow
def test_save_hf_under_fsdp2_gathers_the_shards(tmp_path, model_config_dir, tokenizer_dirs, textcraft_dir):
    import subprocess
    import sys

    args = [sys.executable, "-m", "sftforge", "train", f"model.path={model_config_dir / 'qwen3-tiny'}",
            f"model.tokenizer_path={tokenizer_dirs['qwen3']}", f"data.train_files={textcraft_dir / 'train_react.jsonl'}",
            "data.max_length=4096", "data.train_batch_size=4", "trainer.max_steps=2", "trainer.save_freq=2",
            "trainer.save_hf=true", "trainer.strategy=fsdp2", "trainer.device=cpu", "trainer.logger=[jsonl]",
            f"trainer.output_dir={tmp_path / 'out'}"]  # fmt: skip
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    hf = tmp_path / "out" / "step_2" / "huggingface"
    assert (tmp_path / "out" / "step_2" / "dcp").is_dir() and _equal(hf, tmp_path / "out" / "final")
