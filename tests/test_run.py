"""The run lifecycle (run.py): one run per output folder, the data fingerprint on resume, the engine built up front."""

import json
import os
import socket
import subprocess
import sys

import pytest
from test_train import cfg_for, make_samples

from sftforge.checkpoint import latest_checkpoint
from sftforge.config import ConfigError
from sftforge.run import LOCK_NAME, OutputLock, data_fingerprint, resume_differences
from sftforge.sft import train


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_run_on_the_same_folder_refuses_naming_the_holder(tmp_path, model_config_dir, tokenizer_dirs):
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "busy")
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-12-02 10:00:00"}
        (out / LOCK_NAME).write_text(json.dumps(lock))
        with pytest.raises(ConfigError, match=rf"in use by pid {holder.pid} on host .*started 2026-12-02 10:00:00"):
            train(cfg, train_dataset=make_samples(8))
        assert not (out / "metrics.jsonl").exists() and latest_checkpoint(out) is None  # nothing touched
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # the holder's lock stays
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_message_and_released_at_the_end(
    tmp_path, model_config_dir, tokenizer_dirs, capsys
):
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "stale")
    out = tmp_path / "stale"
    out.mkdir()
    dead = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "earlier"}))
    result = train(cfg, train_dataset=make_samples(8))
    assert result["final_dir"]
    assert f"took over {out / LOCK_NAME}: its holder (pid {dead}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()  # released when the run ended


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "node-7", "started": "then"}))
    with pytest.raises(ConfigError, match=r"pid 1 on host node-7 \(another host.*delete .*run.lock"):
        OutputLock(tmp_path).acquire()


def test_the_lock_is_released_when_the_run_fails(tmp_path, model_config_dir, tokenizer_dirs, monkeypatch):
    from sftforge.sft import Runner

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(Runner, "forward_backward", boom)
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "fails")
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, train_dataset=make_samples(8))
    assert (tmp_path / "fails" / "config.yaml").exists()  # the run had started
    assert not (tmp_path / "fails" / LOCK_NAME).exists()
    lock = OutputLock(tmp_path / "fails")
    lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_resume_on_different_data_says_so(tmp_path, model_config_dir, tokenizer_dirs, capsys):
    data = make_samples(16)
    stop = ["trainer.max_steps=4", "trainer.stop_at_step=2"]
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "fp", extra=stop)
    train(cfg, train_dataset=data)
    ckpt = latest_checkpoint(tmp_path / "fp")
    saved = json.loads((ckpt / "trainer_state.json").read_text())["data_fingerprint"]
    assert saved == data_fingerprint(data) and saved != data_fingerprint(make_samples(16, seed=9))
    assert resume_differences(ckpt, cfg, data_fingerprint(data)) == []
    capsys.readouterr()
    train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "fp", extra=["trainer.max_steps=4"]),
          train_dataset=make_samples(16, seed=9))  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: the training data differs from the data" in err and f"fingerprint {saved} then" in err


def test_build_engine_selects_packed_attention_up_front(model_config_dir):
    """Packed sdpa is chosen when the engine is built, not by the first loss; padded runs keep sdpa."""
    import torch

    from sftforge.attention import NAME
    from sftforge.config import load_config
    from sftforge.model import load_model
    from sftforge.parallel import build_engine

    for packing, expected in ((True, NAME), (False, "sdpa")):
        cfg = load_config(
            None, [f"model.path={model_config_dir / 'qwen3-tiny'}", f"data.packing={str(packing).lower()}"]
        )
        model = load_model(cfg.model)
        engine, notes = build_engine(model, cfg, torch.device("cpu"), 1, "none")
        assert model.config._attn_implementation == expected and notes == []
        assert engine.model is model


def test_other_libraries_progress_bars_stay_out_of_the_run_log(tmp_path, model_config_dir, tokenizer_dirs):
    """transformers' own bars ("Loading weights", "Writing model shards") are off during a run, back after it."""
    import json
    import subprocess
    import sys

    from transformers.utils import logging as hf_logging

    data = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "ok"}]} for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = subprocess.run([sys.executable, "-m", "sftforge", "train", f"model.path={model_config_dir / 'qwen3-tiny'}",
                        f"model.tokenizer_path={tokenizer_dirs['qwen3']}", f"data.train_files={data}",
                        "data.train_batch_size=4", "trainer.max_steps=1", "trainer.device=cpu",
                        f"trainer.output_dir={tmp_path / 'o'}"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "o" / "final" / "model.safetensors").exists()
    for bar in ("Writing model shards", "Loading weights", "it/s]"):
        assert bar not in p.stdout + p.stderr, bar
    from sftforge.config import load_config
    from sftforge.run import Run

    with Run(load_config(None, [f"model.path={model_config_dir / 'qwen3-tiny'}", "trainer.device=cpu"])):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()  # restored after the run
