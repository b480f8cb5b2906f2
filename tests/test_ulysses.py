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
    assert all(p.attention_mask is None and p.extra["sp_cu_seqlens"] == (0, 3, 7, 8) for p in parts)
    assert shard(mb, 1, 0) is mb
    exact = _packed([2, 2])
    assert shard(exact, 2, 1).input_ids.shape == (1, 2) and shard(exact, 2, 1).extra["sp_cu_seqlens"] == (0, 2, 4)


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
    ["ddp", "fsdp2+checkpointing", "kv_heads=1"],
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
    sp_extra = {"ddp": ["trainer.strategy=ddp"], "kv_heads=1": ["trainer.strategy=ddp"],
                "fsdp2+checkpointing": ["trainer.strategy=fsdp2", "model.enable_gradient_checkpointing=true"]}[case]  # fmt: skip
    p = run(2, two, tc_data, model_dir, tokenizer_dirs, *extra, "trainer.sp_size=2", *sp_extra)
    assert "world size 2 = dp 1 × sp 2" in p.stdout + p.stderr
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert _grad_norms(two) == pytest.approx(_grad_norms(one), rel=1e-4)
    vals = [[r["val_loss"] for r in read_metrics(o / "metrics.jsonl") if "val_loss" in r] for o in (one, two)]
    assert len(vals[0]) == 1 and vals[0] == pytest.approx(vals[1], rel=1e-4)
    abs_d, rel_d = max_diff(weights(two), weights(one))
    print(f"sp 2 ({case}) vs 1 process: max abs diff {abs_d:.3g}, max rel diff {rel_d:.3g}")
    assert rel_d < 1e-4
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
