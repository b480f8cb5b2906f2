"""Ulysses sequence parallelism (trainer.sp_size): slicing of packed rows, clear errors, and on CPU with gloo
(2 processes via torchrun) the same losses, gradient norms and weights as one process on packed multi-turn data."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_distributed import losses, max_diff, run, weights

from sftforge.config import ConfigError, ModelConfig
from sftforge.metrics import read_metrics
from sftforge.model import load_model
from sftforge.packing import IGNORE_INDEX, collate
from sftforge.ulysses import check_model, shard, sp_group_layout

FIXTURE = Path(__file__).parent / "fixtures" / "textcraft" / "train_react.jsonl"


def _packed(lengths, attn="sdpa"):
    samples = []
    start = 1
    for n in lengths:
        ids = list(range(start, start + n))
        samples.append({"input_ids": ids, "loss_mask": [0] * (n // 2) + [1] * (n - n // 2)})
        start += n
    return collate(samples, True, attn, 0, torch.float32)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shard_pads_to_a_multiple_and_slices_contiguously(attn):
    mb = _packed([3, 4], attn)  # 7 tokens -> padded to 8 for sp 2
    parts = [shard(mb, 2, r) for r in range(2)]
    ids = torch.cat([p.input_ids for p in parts], dim=1)
    assert ids.shape == (1, 8) and ids[0, :7].tolist() == mb.input_ids[0].tolist()
    labels = torch.cat([p.labels for p in parts], dim=1)[0]
    assert labels[:7].tolist() == mb.labels[0].tolist() and labels[7] == IGNORE_INDEX
    pos = torch.cat([p.position_ids for p in parts], dim=1)[0].tolist()
    assert pos == [0, 1, 2, 0, 1, 2, 3, 0]
    # no L x L mask: attention runs per sample of the gathered row; the pad is a sample of its own
    assert all(p.attention_mask is None and p.extra["sp_cu_seqlens"].tolist() == [0, 3, 7, 8] for p in parts)
    assert shard(mb, 1, 0) is mb
    exact = _packed([2, 2])
    assert shard(exact, 2, 1).input_ids.shape == (1, 2) and shard(exact, 2, 1).extra["sp_cu_seqlens"].tolist() == [
        0,
        2,
        4,
    ]


def test_layout_and_model_errors(model_config_dir):
    assert sp_group_layout(4, 2) == (2, 2)
    with pytest.raises(ConfigError, match=r"trainer.sp_size=3 must divide the world size \(4 processes\)"):
        sp_group_layout(4, 3)
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny")))  # 4 query heads, 2 key/value heads
    check_model(model, 2, "sdpa", True)
    check_model(model, 4, "sdpa", True)  # key/value heads repeated to 4
    with pytest.raises(ConfigError, match=r"must divide the model's num_attention_heads \(4\)"):
        check_model(model, 8, "sdpa", True)
    with pytest.raises(ConfigError, match=r"set model.attn_implementation=sdpa"):
        check_model(model, 2, "flash_attention_2", True)
    with pytest.raises(ConfigError, match=r"needs data.packing=true"):
        check_model(model, 2, "sdpa", False)


def test_generation_inside_disabled_uses_the_models_own_attention(model_config_dir):
    from sftforge import ulysses

    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny")))
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    ulysses.enable(model, None, 2)
    try:
        assert model.config._attn_implementation == ulysses.NAME
        with pytest.raises(RuntimeError, match="without its micro-batch slice"):
            model(ids)
        with ulysses.disabled(model):
            assert model.config._attn_implementation == "sdpa"
            assert model.generate(ids, max_new_tokens=4, do_sample=False).equal(expected)
        assert model.config._attn_implementation == ulysses.NAME
    finally:
        ulysses.restore(model)
    assert model.config._attn_implementation == "sdpa" and not ulysses.active()


@pytest.fixture(scope="module")
def tc_data(tmp_path_factory) -> Path:
    """16 multi-turn TextCraft conversations (the repo's fixture), long enough to span several slices."""
    p = tmp_path_factory.mktemp("tc") / "tc.jsonl"
    p.write_text("".join(FIXTURE.read_text().splitlines(keepends=True)[:16]))
    return p


def _grad_norms(out: Path) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(out / "metrics.jsonl") if "grad_norm" in r]


def _config_kv1(tmp_path: Path, model_config_dir) -> Path:
    """qwen3-tiny with ONE key/value head: sp 2 must repeat it so that each rank has its query heads' key/value."""
    d = tmp_path / "qwen3-tiny-kv1"
    shutil.copytree(model_config_dir / "qwen3-tiny", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["ddp", "fsdp2+checkpointing", "kv_heads=1", "bf16"],
)
def test_sp2_equals_one_process(case, tc_data, tmp_path, model_config_dir, tokenizer_dirs):
    extra = ["data.max_length=1024", "data.truncation=right", "model.loss_chunk_size=64"]
    model_dir = model_config_dir
    if case == "kv_heads=1":
        model_dir = tmp_path / "models"
        (model_dir / "qwen3-tiny").parent.mkdir()
        shutil.copytree(_config_kv1(tmp_path, model_config_dir), model_dir / "qwen3-tiny")
    one, two = tmp_path / "one", tmp_path / "two"
    run(1, one, tc_data, model_dir, tokenizer_dirs, *extra)
    if case == "bf16":
        extra.append("model.dtype=bf16")
    sp_extra = {"ddp": ["trainer.strategy=ddp"], "kv_heads=1": ["trainer.strategy=ddp"], "bf16": ["trainer.strategy=fsdp2"],
                "fsdp2+checkpointing": ["trainer.strategy=fsdp2", "model.enable_gradient_checkpointing=true"]}[case]  # fmt: skip
    p = run(2, two, tc_data, model_dir, tokenizer_dirs, *extra, "trainer.sp_size=2", *sp_extra)
    assert "world size 2 = dp 1 × sp 2" in p.stdout + p.stderr
    tol = 2e-2 if case == "bf16" else 1e-4  # bf16 compute: rounding differs between the two attention paths
    assert losses(two) == pytest.approx(losses(one), rel=tol)
    assert _grad_norms(two) == pytest.approx(_grad_norms(one), rel=tol if case != "bf16" else 5e-2)
    vals = [[r["val_loss"] for r in read_metrics(o / "metrics.jsonl") if "val_loss" in r] for o in (one, two)]
    assert len(vals[0]) == 1 and vals[0] == pytest.approx(vals[1], rel=tol)
    abs_d, rel_d = max_diff(weights(two), weights(one))
    print(f"sp 2 ({case}) vs 1 process: max abs diff {abs_d:.3g}, max rel diff {rel_d:.3g}")
    # bf16: Adam turns tiny gradient differences into whole steps on a few elements (4 steps of lr 1e-3 here)
    assert rel_d < (0.1 if case == "bf16" else tol)
    saved = json.loads((two / "final" / "config.json").read_text())
    assert saved.get("attn_implementation", "sdpa") != "sftforge_ulysses"


@pytest.mark.slow
def test_dp2_sp1_agrees_with_dp1_sp2(tc_data, tmp_path, model_config_dir, tokenizer_dirs):
    extra = ["data.max_length=1024", "data.truncation=right", "trainer.strategy=ddp"]
    dp, sp = tmp_path / "dp", tmp_path / "sp"
    run(2, dp, tc_data, model_config_dir, tokenizer_dirs, *extra)
    run(2, sp, tc_data, model_config_dir, tokenizer_dirs, *extra, "trainer.sp_size=2")
    assert losses(sp) == pytest.approx(losses(dp), rel=1e-4)
    assert max_diff(weights(sp), weights(dp))[1] < 1e-4
