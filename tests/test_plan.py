"""sftforge plan: the trainer's arithmetic on tricky cases, every warning, --json fields, memory estimate, preset."""

import json
import re
from pathlib import Path

import pytest

from sftforge.cli import main
from sftforge.config import load_config
from sftforge.plan import (
    GIB,
    ModelShape,
    build_plan,
    choose_preset,
    estimate_memory,
    longest_sequence,
    parse_memory,
    world_size,
)

ROOT = Path(__file__).resolve().parent.parent


def _plan(n=100, length=100, sup=30, **kw):
    overrides = [f"{k.replace('__', '.')}={v}" for k, v in kw.items()]
    cfg = load_config(None, ["trainer.n_gpus_per_node=1", *overrides])
    return build_plan(cfg, [length] * n, [sup] * n)


def test_textcraft_374_samples_at_global_batch_256_is_one_step_per_epoch():
    p = _plan(374, data__train_batch_size=256, data__micro_batch_size_per_gpu=2, trainer__n_gpus_per_node=8,
              trainer__total_epochs=10, optim__warmup_ratio=0.1)  # fmt: skip
    assert p["steps_per_epoch"] == 1 and p["total_steps"] == 10 and p["grad_accum_steps"] == 16
    assert p["dropped_per_epoch"] == 118 and p["warmup_steps"] == 1 and p["world_size"] == 8
    assert any("data.train_batch_size (256) leaves 118 of 374" in w for w in p["warnings"])


@pytest.mark.parametrize("ws,accum", [(1, 16), (2, 8), (8, 2)])
def test_world_sizes(ws, accum):
    p = _plan(100, data__train_batch_size=32, data__micro_batch_size_per_gpu=2, trainer__n_gpus_per_node=ws)
    assert (p["grad_accum_steps"], p["steps_per_epoch"], p["world_size"]) == (accum, 3, ws)
    assert p["sequences_per_step"] == 32


def test_uneven_last_batch_is_dropped_and_counted():
    p = _plan(70, data__train_batch_size=32, trainer__total_epochs=3)
    assert (p["steps_per_epoch"], p["total_steps"], p["dropped_per_epoch"]) == (2, 6, 6)


def test_nodes_multiply_world_size():
    cfg = load_config(None, ["trainer.n_gpus_per_node=4", "trainer.nnodes=2"])
    assert world_size(cfg) == 8
    assert world_size(load_config(None, [])) >= 1  # 0 = what is visible (1 on CPU)


def test_accumulation_not_dividing_is_an_error_naming_the_keys():
    p = _plan(100, data__train_batch_size=30, data__micro_batch_size_per_gpu=4, trainer__n_gpus_per_node=2)
    assert p["grad_accum_steps"] is None
    assert any(
        "data.train_batch_size (30) must be a multiple of data.micro_batch_size_per_gpu" in e for e in p["errors"]
    )
    assert p["steps_per_epoch"] == 3  # the rest of the plan is still computed


def test_max_steps_overrides_epochs_and_counts_checkpoints_and_validations():
    p = _plan(100, data__train_batch_size=10, trainer__max_steps=25, trainer__save_freq=10, trainer__test_freq=5,
              data__val_files="v.jsonl")  # fmt: skip
    assert p["total_steps"] == 25 and p["num_checkpoints"] == 3 and p["num_validations"] == 5


WARNINGS = [
    (dict(trainer__save_freq=1000), "trainer.save_freq (1000) is larger than the total steps"),
    (dict(trainer__test_freq=1000, data__val_files="v.jsonl"), "trainer.test_freq (1000) is larger than the total"),
    (dict(trainer__test_freq=2), "trainer.test_freq (2) is set but data.val_files is empty"),
    (dict(optim__warmup_ratio=0.0), "no warmup (optim.warmup_ratio=0, optim.warmup_steps=0) with the decaying"),
    (
        dict(optim__warmup_ratio=0.05, trainer__max_steps=5),
        "optim.warmup_ratio=0.05 of 5 steps rounds to 0 warmup "
        "steps (the run is too short for a ratio; it gives 1 from 11 steps)",
    ),
    (dict(optim__warmup_steps=1000), "the learning rate never leaves warmup"),
    (dict(data__train_files="t.jsonl", data__val_files="t.jsonl"), "data.val_files is the same as data.train_files"),
    (dict(optim__lr=1e-3), "optim.lr (0.001) is unusually high"),
    (dict(data__train_batch_size=64), "data.train_batch_size (64) leaves 36 of 100 samples"),
]
# What `sftforge train` refuses, the plan refuses with the same words ("errors"; sftforge plan exits 2).
ERRORS = [
    (dict(data__train_batch_size=512), "fewer than data.train_batch_size (512)"),
    (dict(data__train_batch_size=6, data__micro_batch_size_per_gpu=4), "must be a multiple of"),
    (dict(trainer__sp_size=3, trainer__n_gpus_per_node=2), "trainer.sp_size=3 must divide the world size (2"),
]


@pytest.mark.parametrize("kw,text", WARNINGS, ids=[t for _, t in WARNINGS])
def test_every_warning(kw, text):
    base = dict(data__train_batch_size=10, optim__warmup_ratio=0.1)
    p = _plan(100, **{**base, **kw})
    assert any(text in w for w in p["warnings"]), p["warnings"]


@pytest.mark.parametrize("kw,text", ERRORS, ids=[t for _, t in ERRORS])
def test_every_error(kw, text):
    p = _plan(100, **{**dict(data__train_batch_size=10, optim__warmup_ratio=0.1), **kw})
    assert any(text in e for e in p["errors"]), p["errors"]
    assert not any(text in w for w in p["warnings"])


def test_a_clean_config_has_no_warnings():
    p = _plan(100, data__train_batch_size=10, optim__warmup_ratio=0.1, optim__lr=1e-5)
    assert p["warnings"] == []


def test_constant_schedule_needs_no_warmup():
    p = _plan(100, data__train_batch_size=10, optim__lr_scheduler="constant")
    assert not any("warmup" in w for w in p["warnings"])


@pytest.fixture(scope="module")
def small_shape(model_config_dir):
    return ModelShape.from_path(str(model_config_dir / "qwen3-small"))


def test_shape_counts_parameters_exactly(model_config_dir, small_shape):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_config_dir / "qwen3-small"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert small_shape.n_params == sum(p.numel() for p in model.parameters())
    assert small_shape.tied and small_shape.qk_norm and small_shape.vocab == 151936


def test_memory_is_monotonic_and_sane(small_shape):
    cfg = load_config(None, ["model.dtype=fp32"])
    m = [estimate_memory(small_shape, cfg, t, t // 4).total for t in (256, 1024, 4096, 16384)]
    assert m == sorted(m) and len(set(m)) == 4
    fp32 = estimate_memory(small_shape, cfg, 4096, 1024)
    assert fp32.params == 4 * small_shape.n_params and fp32.optimizer == 8 * small_shape.n_params
    gc = estimate_memory(small_shape, cfg, 4096, 1024, gradient_checkpointing=True)
    assert gc.activations < fp32.activations and gc.total < fp32.total
    chunked = estimate_memory(
        small_shape, load_config(None, ["model.dtype=fp32", "model.loss_chunk_size=256"]), 4096, 1024
    )
    assert chunked.logits == fp32.logits // 4
    bf16 = estimate_memory(small_shape, load_config(None, ["model.dtype=bf16"]), 4096, 1024)
    assert bf16.weight_copies == 2 * small_shape.n_params and bf16.activations < fp32.activations
    auto = estimate_memory(small_shape, load_config(None, []), 4096, 1024)  # the default: bf16 on the GPUs planned
    assert auto.total == bf16.total
    assert estimate_memory(small_shape, cfg, 4096, 1024, gpu_memory=80 * GIB).fits is True
    assert estimate_memory(small_shape, cfg, 4096, 1024, gpu_memory=1 * GIB).fits is False


def test_memory_with_sequence_parallelism_and_fsdp2(small_shape):
    cfg = load_config(None, ["model.dtype=fp32"])
    one = estimate_memory(small_shape, cfg, 8192, 2048)
    two = estimate_memory(small_shape, cfg, 8192, 2048, sp_size=2)
    eager = estimate_memory(
        small_shape, load_config(None, ["model.dtype=fp32", "model.attn_implementation=eager"]), 8192, 2048
    )
    unpacked = estimate_memory(
        small_shape, load_config(None, ["model.dtype=fp32", "data.packing=false"]), 8192, 2048, micro_batch_size=1
    )
    assert eager.attention_mask > 0 and unpacked.attention_mask > 0  # an L x L mask (block-diagonal / padding)
    # eager keeps every layer's [heads, L, L] fp32 probabilities for the backward pass
    scores = small_shape.layers * small_shape.heads * 8192 * 8192 * 4
    assert eager.activations - one.activations == scores
    assert one.attention_mask == 0 and two.attention_mask == 0  # packed sdpa and SP attend per sample: no mask
    assert two.activations < 0.55 * one.activations and two.tokens_per_micro_batch == 8192
    sharded = estimate_memory(small_shape, cfg, 8192, 2048, shard_over=4)
    assert sharded.optimizer == -(-8 * small_shape.n_params // 4) and sharded.params < one.params
    chunked = load_config(
        None, ["model.dtype=fp32", "model.loss_chunk_size=1024"]
    )  # else this small shape's logits dominate
    longest = [longest_sequence(small_shape, chunked, 8 * GIB, sp_size=sp, shard_over=1) for sp in (1, 2, 4)]
    assert longest[0] < longest[1] < longest[2] and all(n % 1024 == 0 for n in longest)
    fits = estimate_memory(small_shape, chunked, longest[1], longest[1] // 2, micro_batch_size=1, sp_size=2,
                           gpu_memory=8 * GIB)  # fmt: skip
    assert fits.fits and not estimate_memory(small_shape, chunked, longest[1] + 4096, (longest[1] + 4096) // 2,
                                             micro_batch_size=1, sp_size=2, gpu_memory=8 * GIB).fits  # fmt: skip


def test_plan_shows_sp_layout():
    p = _plan(n=64, trainer__n_gpus_per_node=4, trainer__sp_size=2, data__train_batch_size=8,
              data__micro_batch_size_per_gpu=2)  # fmt: skip
    assert p["sp_size"] == 2 and p["grad_accum_steps"] == 2  # 8 sequences / (2 data-parallel ranks × 2)


def test_parse_memory():
    assert parse_memory("80GB") == parse_memory("80GiB") == parse_memory("80") == 80 * GIB
    assert parse_memory("40000MB") == 40000 * (1 << 20) and parse_memory(None) is None
    with pytest.raises(Exception, match="--gpu-memory"):
        parse_memory("lots")


def test_preset_picks_the_fastest_fitting_choice(small_shape):
    cfg = load_config(None, ["data.train_batch_size=64", "data.max_length=4096", "trainer.preset=auto"])
    big = choose_preset(small_shape, cfg, 80 * GIB, 1)
    assert big.micro_batch_size > 1 and not big.gradient_checkpointing and big.memory.fits
    small = choose_preset(small_shape, cfg, 12 * GIB, 1)
    assert small.memory.total <= 12 * GIB and small.micro_batch_size < big.micro_batch_size
    none = choose_preset(small_shape, cfg, int(0.5 * GIB), 1)
    assert "nothing fits" in none.reason and none.gradient_checkpointing
    assert 64 % big.micro_batch_size == 0 and "highest estimated throughput" in big.reason


def test_memory_estimate_within_measured_error_on_a_tiny_shape():
    """The benchmark's smallest case, measured here: the estimate is within the error stated in the README."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "benchmarks" / "memory_estimate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (row,) = mod.run(mod.CASES[:1])
    assert abs(row["error"]) < 0.25, row


@pytest.fixture
def textcraft_cfg(tmp_path, model_config_dir, tokenizer_dirs, textcraft_dir):
    return [
        f"model.path={model_config_dir / 'qwen3-tiny'}",
        f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
        f"data.train_files={textcraft_dir / 'train_tools.jsonl'}",
        "data.train_batch_size=16",
        "data.micro_batch_size_per_gpu=2",
        "trainer.n_gpus_per_node=1",
        "trainer.save_freq=100",
    ]


def test_cli_json_has_the_fields(textcraft_cfg, capsys):
    assert main(["plan", *textcraft_cfg, "--json", "--gpu-memory", "80GB", "trainer.preset=auto"]) == 0
    p = json.loads(capsys.readouterr().out)
    for key in ("grad_accum_steps", "steps_per_epoch", "total_steps", "warmup_steps", "num_checkpoints", "memory",
                "warnings"):  # fmt: skip
        assert key in p, key
    assert p["samples"] == 40 and p["grad_accum_steps"] == 8 and p["steps_per_epoch"] == 2
    assert p["memory"]["fits"] is True and p["memory"]["total"] > 0 and p["preset"]["micro_batch_size_per_gpu"] >= 1
    assert any(w.startswith("trainer.save_freq (100)") for w in p["warnings"])
    assert p["length"]["min"] <= p["length"]["median"] <= p["length"]["p95"] <= p["length"]["max"]


def test_cli_text_report(textcraft_cfg, capsys):
    assert main(["plan", *textcraft_cfg, "data.max_length=600", "data.truncation=drop"]) == 0
    out = capsys.readouterr().out
    assert "tokens per sample: min" in out and "█" in out and "steps:" in out and "memory per GPU" in out
    assert "over data.max_length:" in out and "data.truncation=drop" in out


def test_cli_plan_reads_the_verl_example(textcraft_cfg, capsys):
    verl = ROOT / "examples" / "textcraft_verl.yaml"
    assert main(["plan", str(verl), *textcraft_cfg[:3], "--json", "--gpu-memory", "80GB"]) == 2  # as train would
    p = json.loads(capsys.readouterr().out)
    assert p["world_size"] == 8 and p["sequences_per_step"] == 256 and p["steps_per_epoch"] == 0
    assert any("fewer than data.train_batch_size (256)" in e for e in p["errors"])  # 40 fixture rows


def test_train_with_preset_auto_uses_the_plans_choice(textcraft_cfg, tmp_path, capsys):
    from sftforge.cli import train_main

    out = tmp_path / "run"
    args = [*textcraft_cfg, "trainer.preset=auto", "trainer.gpu_memory=80GB", "trainer.max_steps=1",
            f"trainer.output_dir={out}", "trainer.logger=[jsonl]", "data.max_length=8192"]  # fmt: skip
    assert train_main(None, args) == 0
    err = capsys.readouterr().err
    assert "info: trainer.preset=auto: data.micro_batch_size_per_gpu=" in err
    chosen = int(err.split("data.micro_batch_size_per_gpu=")[1].split()[0])
    saved = (out / "config.yaml").read_text()
    assert f"micro_batch_size_per_gpu: {chosen}" in saved and chosen != 2  # 80 GB: more than the config's 2 fits


def test_preset_auto_without_gpu_memory_keeps_the_config(textcraft_cfg, capsys):
    from sftforge.plan import apply_preset

    cfg = load_config(None, [*textcraft_cfg, "trainer.preset=auto"])
    if cfg.trainer.gpu_memory or __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    assert apply_preset(cfg, None, [*textcraft_cfg, "trainer.preset=auto"]) is cfg
    assert "no GPU memory known" in capsys.readouterr().err


def test_plan_says_where_the_weights_are_loaded(small_shape):
    """FSDP2 over several GPUs: rank 0 alone reads the fp32 weights into host memory (run.Run.build)."""
    sharded = build_plan(load_config(None, ["trainer.n_gpus_per_node=4", "trainer.strategy=fsdp2"]), [100] * 64,
                         [30] * 64, shape=small_shape)  # fmt: skip
    one = build_plan(load_config(None, ["trainer.n_gpus_per_node=1"]), [100] * 64, [30] * 64, shape=small_shape)
    assert sharded["memory"]["host_load"].startswith("rank 0 only") and one["memory"]["host_load"] == "every process"
    assert sharded["memory"]["host_load_gib"] == round(4 * small_shape.n_params / 2**30, 2)


def test_plan_measure_times_real_steps_and_leaves_nothing_behind(textcraft_cfg, tmp_path, monkeypatch, capsys):
    """--measure runs warm-up + N steps of the run in a temporary folder (removed after) and extrapolates them."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # (tempfile caches its folder)
    out = tmp_path / "would_be_the_run"
    args = [*textcraft_cfg, "data.train_batch_size=4", "trainer.total_epochs=3", "trainer.device=cpu",
            f"trainer.output_dir={out}", "--json", "--measure", "--steps", "3"]  # fmt: skip
    assert main(["plan", *args]) == 0
    p = json.loads(capsys.readouterr().out)  # stdout: the JSON only (the run's own lines go to stderr)
    m = p["measured"]
    assert p["total_steps"] == 30 and m["steps_run"] == 5 and m["warmup_steps"] == 2
    assert m["step_s_min"] <= m["step_s"] <= m["step_s_max"] and m["step_s"] > 0 and m["tokens_per_s"] > 0
    assert m["startup_s"] > 0 and m["save_s"] >= 0 and m["checkpoints"] == p["num_checkpoints"] == 1
    steps_only = p["total_steps"] * m["step_s"]
    parts = steps_only + m["startup_s"] + m["warmup_extra_s"] + 2 * m["save_s"]  # (1 checkpoint + the final export)
    assert steps_only < m["run_s"] == pytest.approx(parts, abs=0.05)
    assert m["epoch_s"] == pytest.approx(p["steps_per_epoch"] * m["step_s"], rel=1e-3)
    assert m["peak_memory_gib"] > 0 and m["memory_kind"] == "resident"
    assert not out.exists() and list((tmp_path / "tmp").iterdir()) == []  # nothing left behind


def test_plan_measure_text_and_validation_timing(textcraft_cfg, tmp_path, capsys):
    data = textcraft_cfg[2].split("=", 1)[1]
    args = [*textcraft_cfg, "data.train_batch_size=4", "trainer.max_steps=40", "trainer.test_freq=10",
            f"data.val_files={data}", "trainer.device=cpu", f"trainer.output_dir={tmp_path / 'r'}", "--measure",
            "--steps", "2"]  # fmt: skip
    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    assert "steps: 10/epoch, 40 total" in out  # the plan first
    assert re.search(r"measured here: 4 steps \(2 warm-up\): [\d.]+ s/step", out)
    assert re.search(r"validation [\d.]+s × 4", out) and "measured time:" in out and "for the run (40 steps)" in out
    assert "measured memory:" in out and "peak resident" in out


# ------------------------------------------------------------------------------------------------------------------
# sftforge plan on `sftforge rl` configs


def _rl_plan(lengths, *overrides, shape=None, gpu_memory=None, val_prompts=0, counts=None):
    from sftforge.plan import build_rl_plan

    cfg = load_config(None, ["trainer.n_gpus_per_node=1", "optim.lr=1e-6", *overrides])
    return build_rl_plan(cfg, lengths, counts or {"rows": len(lengths)}, shape=shape, gpu_memory=gpu_memory,
                         val_prompts=val_prompts)  # fmt: skip


def test_rl_plan_arithmetic_by_hand():
    p = _rl_plan([50] * 100, "rollout.prompts_per_step=8", "rollout.n=4", "rollout.max_response_length=32",
                 "algorithm.mini_batches=2", "trainer.n_gpus_per_node=2", "trainer.total_epochs=2")  # fmt: skip
    assert (p["responses_per_step"], p["responses_per_process"]) == (32, 16)
    assert p["generated_tokens_per_step_max"] == 32 * 32 == p["trained_tokens_per_step_max"]
    assert (p["sequence_tokens_max"], p["sequence_tokens_per_step_max"]) == (82, 32 * 82)
    assert (p["steps_per_epoch"], p["total_steps"], p["optimizer_steps"], p["dropped_per_epoch"]) == (12, 24, 48, 4)
    assert p["errors"] == [] and p["warnings"] == [] and p["kind"] == "rl"


def test_rl_plan_episodes_are_capped_by_max_length():
    p = _rl_plan([100] * 16, "algorithm.reward=textcraft", "rollout.max_turns=10", "rollout.max_response_length=64",
                 "rollout.n=2", "rollout.prompts_per_step=4", "data.max_length=512", "trainer.max_steps=3")  # fmt: skip
    assert p["multi_turn"] and p["sequence_tokens_max"] == 512 and p["generated_tokens_per_step_max"] == 8 * 640
    assert p["trained_tokens_per_step_max"] == 8 * 512 and p["total_steps"] == 3
    assert any("train on at most data.max_length (512)" in n for n in p["notes"])
    assert any("rollout.n=2" in n for n in p["notes"])


@pytest.mark.parametrize(
    "overrides,text",
    [
        (["rollout.prompts_per_step=64"], "fewer than rollout.prompts_per_step (64)"),
        (["optim.lr=1e-4"], "optim.lr (0.0001) is high for RL"),
        (["algorithm.overlong_buffer=256", "rollout.max_response_length=256"], "every response is penalized"),
        (["trainer.save_freq=1000", "trainer.max_steps=5"], "trainer.save_freq (1000) is larger than the total steps"),
    ],
)
def test_rl_plan_warnings(overrides, text):
    p = _rl_plan([40] * 20, *overrides)
    assert any(text in w for w in p["warnings"]), p["warnings"]


@pytest.mark.parametrize(
    "overrides,text",
    [
        (["rollout.n=1"], "rollout.n=1: group-relative advantages need at least 2"),
        (["rollout.prompts_per_step=6", "algorithm.mini_batches=4"], "must be a multiple of algorithm.mini_batches"),
        (["trainer.offload=true"], "does not support trainer.offload"),
        (["trainer.test_freq=5"], "data.val_files, which is empty"),
        (["rollout.val_n=4"], "need sampling: set rollout.val_temperature"),
    ],
)
def test_rl_plan_errors_are_the_ones_rl_raises(overrides, text):
    p = _rl_plan([40] * 20, *overrides)
    assert any(text in e for e in p["errors"]), p["errors"]


def test_rl_plan_memory_counts_kv_cache_reference_and_rollout_copy(small_shape):
    from sftforge.plan import kv_cache_bytes

    s = small_shape
    assert kv_cache_bytes(s, 8, 1000, "bf16") == 8 * 1000 * s.layers * 2 * s.kv_heads * s.head_dim * 2
    base = _rl_plan([100] * 64, "rollout.n=8", "rollout.max_response_length=900", shape=s, gpu_memory=80 * GIB)
    m = base["memory"]
    assert m["kv_cache_gib"] == round(kv_cache_bytes(s, 8, 1000, "bf16") / GIB, 3) and m["kv_cache_sequences"] == 8
    assert m["reference_gib"] == 0 and m["rollout_copy_gib"] == 0 and m["fits"] is True
    kl = _rl_plan([100] * 64, "rollout.n=8", "rollout.max_response_length=900", "algorithm.kl_coef=0.01", shape=s,
                  gpu_memory=80 * GIB)["memory"]  # fmt: skip
    assert kl["reference_gib"] == round(4 * s.n_params / GIB, 3) and kl["total"] > m["total"]
    fsdp = _rl_plan([100] * 64, "rollout.n=8", "rollout.max_response_length=900", "trainer.n_gpus_per_node=4",
                    "trainer.strategy=fsdp2", shape=s, gpu_memory=80 * GIB)["memory"]  # fmt: skip
    assert fsdp["sharded_over"] == 4 and fsdp["rollout_copy_gib"] == round(2 * s.n_params / GIB, 3)
    small = _rl_plan([100] * 64, "rollout.n=8", "rollout.max_response_length=900", shape=s, gpu_memory=2 * GIB)
    assert small["memory"]["fits"] is False and any("exceeds the 2.0 GiB" in w for w in small["warnings"])
    val = _rl_plan([100] * 64, "rollout.n=8", "rollout.max_response_length=900", shape=s, val_prompts=100,
                   gpu_memory=80 * GIB)["memory"]  # fmt: skip
    assert val["kv_cache_sequences"] == 64  # validation generates 64 prompts at once


def _verl_rl_parquet(path: Path, n: int = 24) -> Path:
    """Rows in the layout of verl's GSM8K / DAPO-Math preprocessing: prompt, reward_model.ground_truth, data_source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"What is {i} + {i}? " * (1 + i % 5)}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
             "extra_info": {"split": "train", "index": i}} for i in range(n)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_cli_plans_a_verl_rl_config_on_verl_parquet(tmp_path, model_config_dir, tokenizer_dirs, capsys):
    data = _verl_rl_parquet(tmp_path / "gsm8k.parquet")
    args = [f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
            f"data.train_files={data}", f"data.val_files={data}", "data.train_batch_size=8",
            "actor_rollout_ref.rollout.n=4", "data.max_prompt_length=30", "data.truncation=left",
            "data.max_response_length=64", "actor_rollout_ref.actor.optim.lr=1e-6", "trainer.n_gpus_per_node=1",
            "trainer.total_epochs=2", "trainer.test_freq=2", "trainer.val_before_train=true"]  # fmt: skip
    assert main(["plan", *args, "--json", "--gpu-memory", "24GB"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["kind"] == "rl" and p["prompts"] == 24 and p["prompts_per_step"] == 8 and p["responses_per_step"] == 32
    assert p["total_steps"] == 6 and p["num_validations"] == 3 + 1 and p["val_prompts"] == 24
    assert p["prompt_counts"]["truncated"] > 0 and p["prompt_length"]["max"] == 30
    assert any("were truncated (data.truncation=left)" in w for w in p["warnings"])
    assert any("data.val_files is the same as data.train_files" in w for w in p["warnings"])
    assert p["memory"]["fits"] is True
    assert main(["plan", *args]) == 0
    out = capsys.readouterr()
    assert "planned as `sftforge rl`" in out.err
    assert "rollout: 8 prompts × 4 responses = 32 per step" in out.out and "KV cache" in out.out


def test_plan_rl_flag_on_a_config_without_rl_keys(tmp_path, model_config_dir, tokenizer_dirs, capsys):
    data = _verl_rl_parquet(tmp_path / "gsm8k.parquet")
    args = [f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
            f"data.train_files={data}", "trainer.n_gpus_per_node=1", "optim.lr=1e-6"]  # fmt: skip
    assert main(["plan", *args, "--rl", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["kind"] == "rl" and p["responses_per_step"] == 8 * 8


def test_plan_rl_on_the_textcraft_environment(model_config_dir, tokenizer_dirs, textcraft_dir, capsys):
    args = [f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
            f"data.train_files={textcraft_dir / 'train_tools.jsonl'}", "algorithm.reward=textcraft",
            "rollout.max_turns=8", "rollout.n=4", "rollout.prompts_per_step=4", "data.max_length=4096",
            "trainer.n_gpus_per_node=1", "optim.lr=1e-6"]  # fmt: skip
    assert main(["plan", *args, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["multi_turn"] and p["prompts"] == 40 and p["prompt_length"]["min"] > 50 and p["steps_per_epoch"] == 10
