import json

import pytest
import torch
from safetensors.torch import load_file

from sftforge.batching import epoch_order, grad_accum_steps, make_plan
from sftforge.config import ConfigError, load_config
from sftforge.data import Sample
from sftforge.metrics import read_metrics
from sftforge.sft import train


def make_samples(n: int, vocab: int = 151000, seed: int = 0, lo: int = 6, hi: int = 20) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(10, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append(Sample(ids, [0] * prompt + [1] * (length - prompt)))
    return out


def cfg_for(tmp_path, model_config_dir, tokenizer_dirs, name="run", model="qwen3-tiny", tok="qwen3", extra=()):
    return load_config(
        None,
        [
            f"model.path={model_config_dir / model}",
            f"model.tokenizer_path={tokenizer_dirs[tok]}",
            f"trainer.output_dir={tmp_path / name}",
            "trainer.logger=[jsonl]",
            "trainer.device=cpu",
            "data.train_batch_size=8",
            "optim.lr=1e-3",
            "optim.warmup_steps=1",
            "optim.clip_grad=0",
            "trainer.max_steps=3",
            *extra,
        ],
    )


def final_weights(result) -> dict:
    return load_file(f"{result['final_dir']}/model.safetensors")


def losses(result) -> list[float]:
    return [r["loss"] for r in read_metrics(f"{result['output_dir']}/metrics.jsonl") if "loss" in r]


def test_batch_arithmetic_error_names_the_numbers():
    assert grad_accum_steps(8, 2, 1) == 4
    with pytest.raises(
        ConfigError, match=r"data.train_batch_size \(10\).*micro_batch_size_per_gpu \(4\).*world size \(1\)"
    ):
        grad_accum_steps(10, 4, 1)
    with pytest.raises(ConfigError, match=r"\(256\).*\(2\) × world size \(3\) = 6. Fix: set data.train_batch_size=252"):
        grad_accum_steps(256, 2, 3)


def test_plan_and_epoch_order():
    cfg = load_config(None, ["data.train_batch_size=4", "trainer.total_epochs=2"])
    plan = make_plan(cfg, 10)
    assert (plan.steps_per_epoch, plan.total_steps, plan.dropped_per_epoch) == (2, 4, 2)
    a, b = tuple(epoch_order(10, 42, 0)), tuple(epoch_order(10, 42, 1))
    assert sorted(a) == list(range(10)) and a != b and a == tuple(epoch_order(10, 42, 0))
    assert tuple(epoch_order(5, 42, 0, shuffle=False)) == (0, 1, 2, 3, 4)
    with pytest.raises(ConfigError, match="fewer than data.train_batch_size"):
        make_plan(cfg, 3)


def test_accumulation_and_packing_invariance(tmp_path, model_config_dir, tokenizer_dirs):
    data = make_samples(24)
    runs = {
        "1x8": ["data.micro_batch_size_per_gpu=8", "data.packing=false"],
        "2x4": ["data.micro_batch_size_per_gpu=2", "data.packing=false"],
        "packed": ["data.micro_batch_size_per_gpu=8", "data.packing=true"],
        "packed_budget": ["data.micro_batch_size_per_gpu=4", "data.max_tokens_per_micro_batch=30"],
    }
    results = {
        k: train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, k, extra=v), train_dataset=data)
        for k, v in runs.items()
    }
    ref_loss, ref_w = losses(results["1x8"]), final_weights(results["1x8"])
    assert len(ref_loss) == 3
    for k in runs:
        torch.testing.assert_close(torch.tensor(losses(results[k])), torch.tensor(ref_loss), rtol=1e-5, atol=0)
        w = final_weights(results[k])
        for name, t in ref_w.items():
            rel = (w[name] - t).norm() / t.norm().clamp_min(1e-12)
            assert rel < 1e-5, (k, name, float(rel))


def test_resume_is_exact(tmp_path, model_config_dir, tokenizer_dirs):
    data = make_samples(16)
    extra = ["trainer.max_steps=4", "data.micro_batch_size_per_gpu=4", "trainer.save_freq=1"]
    full = train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "full", extra=extra), train_dataset=data)
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "cut", extra=[*extra, "trainer.stop_at_step=2"])
    first = train(cfg, train_dataset=data)
    assert first["stopped_early"] and first["final_dir"] is None and first["step"] == 2
    assert (tmp_path / "cut" / "step_2" / "COMPLETE").exists()
    second = train(cfg, train_dataset=data)  # the same command resumes from step_2 and finishes
    assert not second["stopped_early"]
    a, b = final_weights(full), final_weights(second)
    for name in a:
        assert torch.equal(b[name], a[name]), name  # bitwise: same data order, schedule, optimizer state, RNG
    assert losses(second) == pytest.approx(losses(full), rel=1e-6)
    assert [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "step" in r] == [1, 2, 3, 4]


def test_metrics_jsonl_and_final_export(tmp_path, model_config_dir, tokenizer_dirs, tokenizers):
    from transformers import AutoModelForCausalLM, GenerationConfig

    data = make_samples(10, vocab=32000)
    val = make_samples(5, vocab=32000, seed=1)
    extra = ["trainer.max_steps=2", "trainer.test_freq=1", "data.micro_batch_size_per_gpu=4"]
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "m", model="phi3-tiny", tok="phi3", extra=extra)
    result = train(cfg, train_dataset=data, val_dataset=val)
    records = read_metrics(tmp_path / "m" / "metrics.jsonl")
    steps, end = records[:-1], records[-1]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "elapsed_s"} <= r.keys()
        assert "val_loss" in r
    assert steps[0]["tokens"] > steps[0]["supervised_tokens"] > 0
    assert all(r["padding_fraction"] == 0 for r in steps)  # packed (data.packing defaults to true)
    assert end["event"] == "end" and {"train_runtime_s", "tokens", "tokens_per_s"} <= end.keys()
    assert end["tokens"] == sum(r["tokens"] for r in steps)
    assert json.loads(json.dumps(result["val_loss"])) == steps[-1]["val_loss"]
    assert (tmp_path / "m" / "config.yaml").exists()

    final = tmp_path / "m" / "final"
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = tokenizers["phi3"]
    gen = GenerationConfig.from_pretrained(str(final))
    end_id = tok.convert_tokens_to_ids("<|end|>")
    assert end_id in gen.eos_token_id and tok.eos_token_id in gen.eos_token_id
    assert (final / "tokenizer_config.json").exists()
    ids = torch.tensor([data[0].input_ids])
    with torch.no_grad():
        ref = model(ids).logits
    assert torch.isfinite(ref).all()


def test_validation_is_token_weighted(tmp_path, model_config_dir, tokenizer_dirs):
    from sftforge.attention import select
    from sftforge.config import ModelConfig
    from sftforge.loss import loss_sum
    from sftforge.model import load_model
    from sftforge.packing import collate

    val = make_samples(5, seed=3)
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "v", extra=["trainer.max_steps=1", "optim.lr=0"])
    result = train(cfg, train_dataset=make_samples(8), val_dataset=val)
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).eval()
    select(model)
    with torch.no_grad():
        s, n = loss_sum(model, collate(val))
    assert result["val_loss"] == pytest.approx(float(s) / n, rel=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_layers_train_like_eager(backend, tmp_path, model_config_dir, tokenizer_dirs):
    """model.compile=true compiles the decoder layers in place: same losses and weights (1e-5), same weight names."""
    samples = make_samples(24)
    ref = train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "eager"), train_dataset=samples)
    extra = ("model.compile=true", f"model.compile_backend={backend}")
    got = train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "compiled", extra=extra), train_dataset=samples)
    assert losses(got) == pytest.approx(losses(ref), rel=1e-5)
    a, b = final_weights(ref), final_weights(got)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_compile_layers_compiles_each_decoder_layer_in_place(model_config_dir):
    from sftforge.config import ModelConfig
    from sftforge.model import load_model
    from sftforge.parallel import compile_layers

    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny")))
    names = [n for n, _ in model.named_parameters()]
    assert compile_layers(model, "aot_eager") == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert [n for n, _ in model.named_parameters()] == names  # no _orig_mod prefixes in checkpoints
