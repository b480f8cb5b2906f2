import math

import pytest
import torch

from sftforge.config import ModelConfig, OptimConfig
from sftforge.model import load_model
from sftforge.optim import build_optimizer, lr_factor, param_groups, warmup_steps


@pytest.mark.parametrize("name", ["qwen3-tiny", "phi3-tiny"])
def test_param_groups_no_decay_on_norms_biases_tied(name, model_config_dir):
    model = load_model(ModelConfig(path=str(model_config_dir / name)))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" not in n for n in decay["names"])
    assert any("norm" in n for n in no_decay["names"])
    assert all(p.ndim >= 2 for p in decay["params"])
    n_params = len(list(model.parameters()))
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    emb = model.get_input_embeddings().weight
    if model.config.tie_word_embeddings:
        assert any(p is emb for p in no_decay["params"])
    else:
        assert any(p is emb for p in decay["params"])
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_param_groups_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.01)
    assert decay["names"] == ["0.weight"]
    assert sorted(no_decay["names"]) == ["0.bias", "1.bias", "1.weight"]


def _f(sched, step, total=10, **kw):
    return lr_factor(step, total, OptimConfig(lr_scheduler=sched, **kw))


def test_warmup():
    assert warmup_steps(OptimConfig(warmup_ratio=0.2), 10) == 2
    assert warmup_steps(OptimConfig(warmup_ratio=0.2, warmup_steps=3), 10) == 3
    assert _f("cosine", 0, warmup_steps=4) == pytest.approx(0.25)
    assert _f("cosine", 3, warmup_steps=4) == pytest.approx(1.0)


def test_cosine():
    assert _f("cosine", 0) == pytest.approx(1.0)
    assert _f("cosine", 9) == pytest.approx(0.0, abs=1e-12)
    assert _f("cosine", 9, min_lr_ratio=0.1) == pytest.approx(0.1)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7))  # p = (5 - 2) / (10 - 2 - 1)
    assert _f("cosine", 5, warmup_steps=2, min_lr_ratio=0.1) == pytest.approx(mid)


def test_linear_constant_wsd():
    assert [round(_f("linear", s, total=5), 6) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [_f("constant", s, warmup_steps=2) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    wsd = [_f("wsd", s, total=10, decay_ratio=0.2, min_lr_ratio=0.1) for s in range(10)]
    assert wsd[:8] == [1.0] * 8
    assert wsd[8] == pytest.approx(0.55) and wsd[9] == pytest.approx(0.1)


def _adamw_weights(impl: str, model_config_dir) -> list[torch.Tensor]:
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny")))
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, implementation=impl))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_adamw_fused_and_foreach_equal_the_per_parameter_loop(model_config_dir):
    ref = _adamw_weights("for_loop", model_config_dir)
    for impl in ("fused", "foreach", "auto"):
        got = _adamw_weights(impl, model_config_dir)
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_adamw_auto_picks_fused_on_cpu(model_config_dir):
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny")))
    opt = build_optimizer(model, OptimConfig())
    assert all(g["fused"] for g in opt.param_groups)
    opt = build_optimizer(model, OptimConfig(implementation="for_loop"))
    assert not any(g["fused"] for g in opt.param_groups) and not any(g["foreach"] for g in opt.param_groups)
