"""Reliability in-process: atomic checkpoints and keep-last-N, non-finite steps, crafted pickles, secrets, output
paths, determinism. The subprocess tests (real signals, SIGKILL during saves, CLI errors) are in
test_reliability_cli.py."""

import json
import math
import pickle
import sys
import types

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import cfg_for, final_weights, losses, make_samples

from sftforge.checkpoint import (
    MARKER,
    CheckpointError,
    child,
    clean_incomplete,
    complete_checkpoints,
    latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from sftforge.config import ConfigError, ModelConfig, OptimConfig, is_secret_key, load_config, redacted, scrub
from sftforge.metrics import read_metrics
from sftforge.model import load_model
from sftforge.optim import build_optimizer
from sftforge.run import NonFiniteError
from sftforge.sft import Runner, train


@pytest.fixture(scope="module")
def tiny(model_config_dir):
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny")))
    return model, build_optimizer(model, OptimConfig())


def _names(out):
    return sorted(p.name for p in out.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint folders


def test_keep_last_n_never_deletes_newest_and_counts_earlier_runs(tmp_path, tiny):
    model, opt = tiny
    for step in (1, 2, 3):  # an earlier run's checkpoints
        save_checkpoint(tmp_path, step, model, opt, {})
    (tmp_path / "step_9").mkdir()  # unmarked: not a checkpoint, never counted as one
    assert prune_checkpoints(tmp_path, 0) == []  # 0 = keep all
    save_checkpoint(tmp_path, 4, model, opt, {})
    deleted = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == ["step_1", "step_2"]
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]
    prune_checkpoints(tmp_path, 1)
    assert latest_checkpoint(tmp_path).name == "step_4" and (tmp_path / "step_4" / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.trash"))


def test_incomplete_leftovers_are_ignored_and_cleaned_safely(tmp_path, tiny):
    model, opt = tiny
    save_checkpoint(tmp_path, 2, model, opt, {})
    save_checkpoint(tmp_path, 5, model, opt, {})
    # what a SIGKILL can leave: a .tmp being written (even with its marker: not yet renamed), a step folder whose
    # deletion started (marker removed first), a .trash folder
    (tmp_path / "step_6.tmp").mkdir()
    (tmp_path / "step_6.tmp" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "step_7.tmp").mkdir()
    (tmp_path / "step_7.tmp" / MARKER).write_text("ok\n")
    (tmp_path / "step_5" / MARKER).unlink()
    (tmp_path / "step_1.trash").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours")
    (tmp_path / "step_8.tmp").symlink_to(outside, target_is_directory=True)
    for other in ("final", "notes", "step_x"):
        (tmp_path / other).mkdir()
    assert latest_checkpoint(tmp_path).name == "step_2"
    removed = clean_incomplete(tmp_path)
    assert sorted(removed) == ["step_1.trash", "step_5", "step_6.tmp", "step_7.tmp", "step_8.tmp"]
    assert _names(tmp_path) == ["final", "notes", "step_2", "step_x"]
    assert (outside / "keep.txt").read_text() == "not ours"  # the link was removed, not followed


def test_resaving_a_step_replaces_it_completely(tmp_path, tiny):
    model, opt = tiny
    save_checkpoint(tmp_path, 3, model, opt, {"epoch": 0})
    (tmp_path / "step_3" / "stale.txt").write_text("x")
    save_checkpoint(tmp_path, 3, model, opt, {"epoch": 1})
    assert not (tmp_path / "step_3" / "stale.txt").exists() and (tmp_path / "step_3" / MARKER).exists()
    assert _names(tmp_path) == ["step_3"]


def test_output_paths_stay_inside_output_dir(tmp_path, model_config_dir, tokenizer_dirs):
    for bad in ("../escape", "/etc/passwd", "a/b", "..", "", "a\\b"):
        with pytest.raises(ConfigError, match="Refusing"):
            child(tmp_path, bad)
    assert child(tmp_path, "step_3") == tmp_path / "step_3"
    # a planted symlink in the output folder would make the export write elsewhere: refused before training
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="symlink"):
        train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "run"), train_dataset=make_samples(8))
    assert list(outside.iterdir()) == [] and not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# Non-finite loss / grad norm


def _nan_at_call(monkeypatch, bad_call: int):
    """Make the loss of the ``bad_call``-th micro-batch (1-based) NaN."""
    real, calls = Runner.loss, []

    def loss(self, samples):
        s, n = real(self, samples)
        calls.append(1)
        return (s * float("nan"), n) if len(calls) == bad_call else (s, n)

    monkeypatch.setattr(Runner, "loss", loss)


def test_nan_loss_stops_before_the_update_and_saves_last_good_state(
    tmp_path, model_config_dir, tokenizer_dirs, monkeypatch
):
    data = make_samples(8)
    extra = ["data.micro_batch_size_per_gpu=8", "trainer.save_freq=1"]
    clean = train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "clean", extra=extra), train_dataset=data)
    _nan_at_call(monkeypatch, 2)  # one micro-batch per step: step 2
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "nan", extra=extra)
    with pytest.raises(NonFiniteError, match=r"step 2: the loss \(nan\).*rank\(s\) 0.*not applied.*step_1"):
        train(cfg, train_dataset=data)
    assert [r["step"] for r in read_metrics(tmp_path / "nan" / "metrics.jsonl")] == [1]
    assert [s for s, _ in complete_checkpoints(tmp_path / "nan")] == [1]
    a, b = (
        load_file(tmp_path / "nan/step_1/model.safetensors"),
        load_file(f"{clean['output_dir']}/step_1/model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_through_cli_is_a_clean_error_exit_1(
    tmp_path, model_config_dir, tokenizer_dirs, textcraft_dir, monkeypatch, capsys
):
    from sftforge.cli import main

    _nan_at_call(monkeypatch, 1)
    args = [f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
            f"data.train_files={textcraft_dir / 'train_tools.jsonl'}", "data.max_length=2048", "data.truncation=drop",
            "data.train_batch_size=2", "trainer.max_steps=1", "trainer.logger=[jsonl]", f"trainer.output_dir={tmp_path}"]  # fmt: skip
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the data report lines
    assert (
        last.startswith("error: step 1: the loss (nan)") and "nan_policy=skip_step" in last and "Traceback" not in err
    )


def test_nan_grad_norm_skip_step_policy(tmp_path, model_config_dir, tokenizer_dirs):
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny")))
    norm = model.model.norm.weight
    steps = []
    # the loss stays finite; only the gradient of one weight becomes NaN, at the second backward pass
    norm.register_hook(lambda g: g * float("nan") if len(steps.append(1) or steps) == 2 else g)
    extra = [
        "data.micro_batch_size_per_gpu=8",
        "trainer.save_freq=1",
        "trainer.nan_policy=skip_step",
        "trainer.max_steps=4",
    ]
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "skip", extra=extra)
    result = train(cfg, model=model, train_dataset=make_samples(8))
    records = read_metrics(tmp_path / "skip" / "metrics.jsonl")
    assert [r.get("skipped", False) for r in records[:-1]] == [False, True, False, False]
    assert math.isfinite(records[1]["loss"]) and records[1]["grad_norm"] == "nan" and records[1]["skipped_steps"] == 1
    assert records[-1]["skipped_steps"] == 1 and result["skipped_steps"] == 1
    w1, w2 = (load_file(tmp_path / f"skip/step_{i}/model.safetensors") for i in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the update of step 2 was not applied
    w3 = load_file(tmp_path / "skip/step_3/model.safetensors")
    assert all(torch.isfinite(t).all() for t in w3.values()) and not all(torch.equal(w2[k], w3[k]) for k in w2)
    assert json.loads((tmp_path / "skip/step_3/trainer_state.json").read_text())["skipped_steps"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Security


class _Evil:
    """Unpickling this runs code that creates a file."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (exec, (f"open({self.flag!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("victim", ["optimizer.pt", "trainer_state.pt"])
def test_crafted_pickle_in_checkpoint_does_not_execute(tmp_path, model_config_dir, tokenizer_dirs, victim, capsys):
    from sftforge.cli import main

    data = make_samples(8)
    extra = ["trainer.max_steps=2", "data.micro_batch_size_per_gpu=8", "trainer.stop_at_step=1"]
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "run", extra=extra)
    train(cfg, train_dataset=data)
    flag = tmp_path / "pwned"
    torch.save({"state": _Evil(flag), "param_groups": []}, tmp_path / "run" / "step_1" / victim)
    (tmp_path / "run" / "step_1" / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(flag)))  # never read
    with pytest.raises(CheckpointError, match=rf"{victim} holds more than tensors.*NOT loaded.*exec.*Delete"):
        train(cfg, train_dataset=data)
    assert not flag.exists()
    # through the CLI: a clean error, exit code 2
    args = [f"{k}={v}" for k, v in [("model.path", model_config_dir / "qwen3-tiny"),
            ("model.tokenizer_path", tokenizer_dirs["qwen3"]), ("trainer.output_dir", tmp_path / "run"),
            ("data.train_files", model_config_dir.parent / "textcraft" / "train_tools.jsonl"),
            ("data.max_length", 2048), ("data.truncation", "drop"), ("trainer.logger", "[jsonl]"),
            ("data.train_batch_size", 8), ("trainer.max_steps", 2)]]  # fmt: skip
    capsys.readouterr()
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "NOT loaded" in err and "Traceback" not in err
    assert not flag.exists()


def test_trust_remote_code_is_off_unless_set(model_config_dir, tokenizer_dirs, monkeypatch):
    import transformers

    from sftforge.data import load_tokenizer

    seen = []
    for cls, name in [(transformers.AutoConfig, "from_pretrained"), (transformers.AutoModelForCausalLM, "from_config"),
                      (transformers.AutoTokenizer, "from_pretrained")]:  # fmt: skip
        real = getattr(cls, name)
        monkeypatch.setattr(
            cls, name, lambda *a, _real=real, **k: seen.append(k["trust_remote_code"]) or _real(*a, **k)
        )
    for overrides, expected in [([], False), (["model.trust_remote_code=true"], True)]:
        seen.clear()
        cfg = load_config(None, [f"model.path={model_config_dir / 'qwen3-tiny'}",
                                 f"model.tokenizer_path={tokenizer_dirs['qwen3']}", *overrides])  # fmt: skip
        load_model(cfg.model)
        load_tokenizer(cfg)
        assert len(seen) >= 3 and set(seen) == {expected}  # config, model and tokenizer loads all got it


def test_redaction_helper():
    assert [is_secret_key(k) for k in ("hf_token", "WANDB_API_KEY", "db_password", "secret", "private_key")] == [
        True
    ] * 5
    not_secret = ("tokenizer_path", "messages_key", "tools_key", "max_tokens_per_micro_batch", "eos_token", "author")
    assert not any(is_secret_key(k) for k in not_secret)
    d = {"a": {"api_token": "sk-abcdef123", "tokenizer_path": "/x", "n": 3}, "l": [{"password": "hunter22"}]}
    assert redacted(d) == {"a": {"api_token": "***", "tokenizer_path": "/x", "n": 3}, "l": [{"password": "***"}]}
    assert d["a"]["api_token"] == "sk-abcdef123"  # a copy
    assert scrub("key sk-abcdef123 here") == "key *** here"  # values seen under secret keys are scrubbed later too


@pytest.mark.parametrize("logger", ["wandb", "swanlab"])
def test_secrets_never_printed_logged_or_saved(logger, tmp_path, model_config_dir, tokenizer_dirs, monkeypatch, capsys):
    import importlib.machinery

    wandb_key, hf_token, cfg_secret = "wandb-secret-1234567890", "hf_SECRETsecret0987", "sk-config-secret-777"
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("HF_TOKEN", hf_token)
    logged = []
    monkeypatch.setenv("SWANLAB_API_KEY", wandb_key)
    monkeypatch.setenv("WANDB_PROJECT", "proj-x")
    for name in ("WANDB_NAME", "SWANLAB_PROJECT", "SWANLAB_EXP_NAME"):  # (a verl-alias test may have set one)
        monkeypatch.delenv(name, raising=False)
    fake = types.ModuleType(logger)
    fake.__spec__ = importlib.machinery.ModuleSpec(logger, None)
    run = types.SimpleNamespace(log=lambda *a, **k: logged.append((a, k)), finish=lambda: logged.append("finish"))
    fake.init = lambda **k: logged.append(k) or run
    monkeypatch.setitem(sys.modules, logger, fake)
    extra = [f"trainer.logger=[console,jsonl,{logger}]", "trainer.save_freq=1", "trainer.max_steps=2",
             f"data.chat_template_kwargs={{api_token: {cfg_secret}, enable_thinking: false}}",
             f"data.cache_dir=/tmp/{hf_token}"]  # fmt: skip
    cfg = cfg_for(tmp_path, model_config_dir, tokenizer_dirs, "run", extra=extra)
    assert cfg.data.chat_template_kwargs["api_token"] == cfg_secret  # the run itself still gets the value
    train(cfg, train_dataset=make_samples(8))
    out = capsys.readouterr()
    written = [p.read_text() for p in (tmp_path / "run").rglob("*") if p.suffix in (".yaml", ".json", ".jsonl")]
    places = {"stdout": out.out, "stderr": out.err, logger: repr(logged), **dict(enumerate(written))}
    for where, text in places.items():
        for secret in (wandb_key, hf_token, cfg_secret):
            assert secret not in text, (where, secret)
    assert "step 2/2" in out.err and logged[0]["config"]["data"]["chat_template_kwargs"]["api_token"] == "***"
    steps = [k["step"] for a, k in (x for x in logged[1:] if isinstance(x, tuple))]
    assert steps == [1, 2] and logged[-1] == "finish"
    if logger == "swanlab":  # project from $WANDB_PROJECT (verl's trainer.project_name), name = the output folder
        assert logged[0]["project"] == "proj-x" and logged[0]["experiment_name"] == "run"
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["chat_template_kwargs"] == {"api_token": "***", "enable_thinking": False}
    assert saved["data"]["cache_dir"] == "/tmp/***"


# ---------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_bitwise_identical(tmp_path, model_config_dir, tokenizer_dirs):
    data = make_samples(16)
    extra = ["data.micro_batch_size_per_gpu=4", "trainer.max_steps=4"]
    a, b = (
        train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, n, extra=extra), train_dataset=data) for n in "ab"
    )
    assert losses(a) == losses(b) and len(losses(a)) == 4  # exact float equality
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_data_order_independent_of_tokenization_processes(tmp_path, model_config_dir, tokenizer_dirs):
    from sftforge.demo import write_conversations

    data = write_conversations(tmp_path / "train.jsonl", 200, seed=0)  # > 64 rows: several chunks per worker pool
    runs = {}
    for n in (1, 2):
        extra = [f"data.train_files={data}", f"data.num_proc={n}", "data.cache_dir=none", "data.train_batch_size=4",
                 "trainer.max_steps=2", "data.micro_batch_size_per_gpu=4"]  # fmt: skip
        runs[n] = train(cfg_for(tmp_path, model_config_dir, tokenizer_dirs, f"p{n}", extra=extra))
    assert losses(runs[1]) == losses(runs[2]) and len(losses(runs[1])) == 2
    tokens = [
        [r["tokens"] for r in read_metrics(f"{runs[n]['output_dir']}/metrics.jsonl") if "step" in r] for n in (1, 2)
    ]
    assert tokens[0] == tokens[1]
