"""Reliability through the command line: real SIGTERM/SIGINT and SIGKILL sent to ``python -m sftforge train``, and
every bad-input error as one clean paragraph with exit code 2 (never a traceback).

Signals land at exact points through the SFTFORGE_TEST_FAULT hook (see sftforge/faults.py)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sftforge.checkpoint import MARKER, complete_checkpoints, latest_checkpoint
from sftforge.cli import main
from sftforge.config import load_config
from sftforge.demo import make_tokenizer
from sftforge.metrics import read_metrics
from sftforge.sft import train

WORDS = ["red", "blue", "green", "one", "two", "three", "cat", "dog", "sun", "moon", "tree", "sea"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A character-level tokenizer + a very small Qwen3 config (random init) and 12 short conversations."""
    root = tmp_path_factory.mktemp("tiny")
    model = root / "model"
    model.mkdir()
    tok = make_tokenizer(model)
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": len(tok), "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
              "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": True,
              "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    data = root / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {w} {i}"}, {"role": "assistant", "content": w * (1 + i % 3)}]}
            for i, w in enumerate(WORDS)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model, "data": data, "root": root}


def _args(tiny, out, *extra) -> list[str]:
    # 12 samples, 4 per step as 4 micro-batches of 1 (accumulation 4): 3 steps per epoch, 2 epochs = 6 steps
    return [f"model.path={tiny['model']}", f"data.train_files={tiny['data']}", "data.train_batch_size=4",
            "data.micro_batch_size_per_gpu=1", "trainer.total_epochs=2", "optim.lr=1e-2", "optim.warmup_steps=1",
            "trainer.logger=[console,jsonl]", "trainer.device=cpu", f"trainer.output_dir={out}", *extra]  # fmt: skip


def _run(args, fault="", **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "SFTFORGE_TEST_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "sftforge", "train", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def reference(tiny):
    """Final weights of the uninterrupted run (in-process: same code, same CPU, same thread count)."""
    out = tiny["root"] / "reference"
    train(load_config(None, _args(tiny, out)))
    return load_file(out / "final" / "model.safetensors")


def _assert_same_weights(out, reference):
    final = load_file(out / "final" / "model.safetensors")
    assert final.keys() == reference.keys()
    for k in reference:
        assert torch.equal(final[k], reference[k]), k  # bitwise


def _steps(out):
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "step" in r]


@pytest.mark.slow  # 4 (3) subprocess runs, ~20-40 s on 2 busy cores
def test_sigterm_sigint_mid_accumulation_and_at_epoch_boundaries_resume_exactly(tmp_path, tiny, reference):
    out = tmp_path / "run"
    args = _args(tiny, out)
    # 1. SIGTERM before micro-batch 1 of step 2 (mid gradient accumulation): step 2 is finished, saved, exit 143
    p = _run(args, "signal=TERM@2.1")
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-2000:]
    assert "SIGTERM: stopped after step 2" in p.stderr and "Traceback" not in p.stderr
    assert [s for s, _ in complete_checkpoints(out)] == [2] and _steps(out) == [1, 2]
    assert not (out / "final").exists()
    # 2. the same command resumes; SIGINT during the LAST micro-batch of step 3 = the end of epoch 0: exit 130
    p = _run(args, "signal=INT@3.3")
    assert p.returncode == 128 + signal.SIGINT, p.stderr[-2000:]
    assert f"resumed from {out / 'step_2'} at step 2" in p.stderr
    state = json.loads((out / "step_3" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["index_in_epoch"]) == (3, 0, 3)
    # 3. SIGTERM before the FIRST micro-batch of step 4 = the start of epoch 1: step 4 still runs completely
    p = _run(args, "signal=TERM@4.0")
    assert p.returncode == 143 and latest_checkpoint(out).name == "step_4", p.stderr[-2000:]
    # 4. no signal: runs to the end, with exactly the weights of the uninterrupted run
    p = _run(args)
    assert p.returncode == 0, p.stderr[-2000:]
    _assert_same_weights(out, reference)
    assert _steps(out) == [1, 2, 3, 4, 5, 6]  # every step logged exactly once across the four processes


def _kill_in_save(args, fault: str) -> str:
    """Start a run, wait until the hook says it is inside the save, SIGKILL it; returns its stderr."""
    env = {**os.environ, "SFTFORGE_TEST_FAULT": fault}
    cmd = [sys.executable, "-m", "sftforge", "train", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("fault: sleeping in save"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-2000:]
    return "".join(lines)


@pytest.mark.slow  # 4 (3) subprocess runs, ~20-40 s on 2 busy cores
def test_sigkill_during_saves_keeps_previous_checkpoint_and_keep_last_n(tmp_path, tiny, reference):
    out = tmp_path / "run"
    args = _args(tiny, out, "trainer.save_freq=1", "trainer.max_ckpt_to_keep=2")
    # killed while step_3 is half written (weights only): step_2 is the newest complete checkpoint
    _kill_in_save(args, "save_sleep=3:weights")
    assert (out / "step_3.tmp" / "model.safetensors").exists() and not (out / "step_3").exists()
    assert [s for s, _ in complete_checkpoints(out)] == [1, 2]
    # killed after step_5.tmp got its marker but before the rename: still not a checkpoint
    err = _kill_in_save(args, "save_sleep=5:marker")
    assert f"resumed from {out / 'step_2'} at step 2" in err and "step_3.tmp: left by an interrupted save" in err
    assert (out / "step_5.tmp" / MARKER).exists() and latest_checkpoint(out).name == "step_4"
    assert [s for s, _ in complete_checkpoints(out)] == [3, 4]  # keep-last-2 also counted the first process's ones
    p = _run(args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"resumed from {out / 'step_4'} at step 4" in p.stderr
    assert sorted(x.name for x in out.iterdir() if x.name.startswith("step_")) == ["step_5", "step_6"]
    _assert_same_weights(out, reference)


# ---------------------------------------------------------------------------------------------------------------
# Bad data and bad config: one paragraph on stderr, exit code 2, no traceback


def test_empty_or_all_over_length_data_stops_before_training(tmp_path, tiny):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    p = _run([*_args(tiny, out), f"data.train_files={empty}"])
    assert p.returncode == 2 and p.stderr.startswith("error: No usable sample") and "Traceback" not in p.stderr
    assert str(empty) in p.stderr and not (out / "metrics.jsonl").exists()
    for policy, hint in [("drop", "over"), ("error", "data.max_length")]:
        p = _run([*_args(tiny, out), "data.max_length=5", f"data.truncation={policy}"])
        assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert hint in p.stderr and not (out / "metrics.jsonl").exists()


BAD_CONFIGS = {
    "unknown key": (["trainer.max_step=3"], "Unknown config key 'trainer.max_step'. Did you mean 'trainer.max_steps'?"),
    "wrong type": (["trainer.max_steps=three"], "trainer.max_steps must be int, got 'three'"),
    "bad choice": (["trainer.nan_policy=ignore"], "trainer.nan_policy must be one of error | skip_step"),
    "batch arithmetic": (["data.train_batch_size=10", "data.micro_batch_size_per_gpu=4"], "must be a multiple of"),
    "missing config file": (["@missing.yaml"], "missing.yaml does not exist"),
    "missing data file": (["data.train_files=/no/such/train.jsonl"], "'/no/such/train.jsonl' does not exist"),
    "missing model": (["model.path=/no/such/model"], "model.path='/no/such/model' does not exist"),
    "missing tokenizer": (
        ["model.tokenizer_path=./no/such/tok"],
        "model.tokenizer_path='./no/such/tok' does not exist",
    ),
    "missing resume": (["trainer.resume=/no/step_3"], "is not a complete checkpoint folder"),
    "no wandb": (["trainer.logger=[jsonl,wandb]"], "pip install wandb"),
    "no tensorboard": (["trainer.logger=[tensorboard]"], "pip install tensorboard"),
    "no flash-attn": (["model.attn_implementation=flash_attention_2"], "pip install flash-attn"),
    "negative keep": (["trainer.max_ckpt_to_keep=-1"], "trainer.max_ckpt_to_keep must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_paragraph_exit_2(tmp_path, tiny, capsys, case, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    hide = {"wandb", "tensorboard", "flash_attn"}  # absent in the test venv; hidden in case they get installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in hide else real(n, *a))
    monkeypatch.chdir(tmp_path)
    overrides, expected = BAD_CONFIGS[case]
    config = [o[1:] for o in overrides if o.startswith("@")]
    argv = ["train", *config, *_args(tiny, tmp_path / "run"), *(o for o in overrides if not o.startswith("@"))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err and "\n\n" not in err.strip() and len(err.strip().splitlines()) <= 3
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training
