"""Bring your own model: model.builder, model.init_checkpoint, the export of a module that is not a transformers
model, its reload, greedy eval, and the ExplicitLM-style example (examples/custom_module)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sftforge.config import ConfigError, load_config
from sftforge.export import load_trained
from sftforge.metrics import read_metrics
from sftforge.model import build_model, import_builder
from sftforge.sft import train

ROOT = Path(__file__).resolve().parent.parent
BUILDER = f"{ROOT / 'examples' / 'custom_module' / 'memory.py'}:build"
QA = [(f"Which word goes with {w}?", w[::-1]) for w in ("apple", "stone", "river", "cloud", "ember", "frost")]


@pytest.fixture
def data(tmp_path) -> Path:
    p = tmp_path / "qa.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA * 2]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def args(model_config_dir, tokenizer_dirs, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
            f"model.builder={BUILDER}", "model.trainable=[memory]", f"data.train_files={data}",
            "data.train_batch_size=4", "data.micro_batch_size_per_gpu=2", "optim.lr=1e-2", "optim.warmup_steps=1",
            "trainer.max_steps=4", "trainer.device=cpu", "trainer.logger=[jsonl]", f"trainer.output_dir={out}",
            *extra]  # fmt: skip


def test_builder_trains_the_memory_only_the_base_stays_bit_identical(
    model_config_dir, tokenizer_dirs, data, tmp_path, capsys
):
    cfg = load_config(None, args(model_config_dir, tokenizer_dirs, data, tmp_path / "run"))
    start = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    result = train(cfg)
    out = capsys.readouterr()
    assert "model.builder: " in out.out + out.err and "built MemoryLM" in out.out + out.err
    assert "trainable" in out.out + out.err  # the frozen / trainable table
    final = Path(result["final_dir"])
    assert {p.name for p in final.iterdir()} >= {"model.safetensors", "trainable.safetensors", "config.yaml"}
    after, trained = load_file(final / "model.safetensors"), load_file(final / "trainable.safetensors")
    assert trained and all(".memory." in k for k in trained)
    assert set(trained) == {k for k in start if ".memory." in k}
    for k, v in after.items():
        if ".memory." in k:
            assert torch.equal(trained[k], v)
        else:
            assert torch.equal(v, start[k]), k  # frozen: bit-identical
    assert any(not torch.equal(after[k], start[k]) for k in trained)  # the memories learned
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]


def test_resume_is_exact_and_the_readme_lines_reload_the_same_logits(model_config_dir, tokenizer_dirs, data, tmp_path):
    full = train(load_config(None, args(model_config_dir, tokenizer_dirs, data, tmp_path / "full")))
    cut = args(model_config_dir, tokenizer_dirs, data, tmp_path / "cut", "trainer.save_freq=2")
    assert train(load_config(None, [*cut, "trainer.stop_at_step=2"]))["final_dir"] is None
    second = train(load_config(None, cut))
    a, b = (
        load_file(Path(full["final_dir"]) / "model.safetensors"),
        load_file(Path(second["final_dir"]) / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the README's three lines
    folder = Path(full["final_dir"])
    model = build_model(load_config(folder / "config.yaml"))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    reloaded = load_trained(folder)
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))
        trained = build_model(load_config(folder / "config.yaml"))
        trained.load_state_dict(a)
        assert torch.equal(trained.eval()(ids), model(ids))


def test_init_checkpoint_pth_and_safetensors_strict_and_refused(model_config_dir, tokenizer_dirs, data, tmp_path):
    base = args(model_config_dir, tokenizer_dirs, data, tmp_path / "x")
    model = build_model(load_config(None, base))
    sd = {k: v + 1.0 for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "stage1.pth")  # a training script's wrapper dict
    save_file({k: v.clone() for k, v in sd.items()}, tmp_path / "stage1.safetensors")
    for f in ("stage1.pth", "stage1.safetensors"):
        notes = []
        got = build_model(load_config(None, [*base, f"model.init_checkpoint={tmp_path / f}"]), notes=notes)
        assert all(torch.equal(got.state_dict()[k], sd[k]) for k in sd), f
        assert any(f"{len(sd)} tensors loaded from" in n for n in notes), notes
    partial = {k: v for k, v in sd.items() if ".memory." not in k}
    partial["extra.weight"] = torch.zeros(2)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(
        ConfigError, match=r"missing in the file: .*memory.*in the file but not in the model: extra.weight"
    ):
        build_model(load_config(None, [*base, f"model.init_checkpoint={tmp_path / 'partial.pth'}"]))
    notes = []
    build_model(load_config(None, [*base, f"model.init_checkpoint={tmp_path / 'partial.pth'}",
                                   "model.init_checkpoint_strict=false"]), notes=notes)  # fmt: skip
    assert any("warning: missing in the file" in n for n in notes)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ConfigError, match=r"NOT loaded: it is a pickle that needs code"):
        build_model(load_config(None, [*base, f"model.init_checkpoint={tmp_path / 'evil.pth'}"]))


def test_builder_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model.builder='nope': expected package.module:function"):
        import_builder("nope")
    with pytest.raises(ConfigError, match=r"is not a file"):
        import_builder(f"{tmp_path / 'missing.py'}:build")
    (tmp_path / "b.py").write_text("def build(model, cfg):\n    return 3\n")
    with pytest.raises(ConfigError, match=r"has no function 'other'"):
        import_builder(f"{tmp_path / 'b.py'}:other")
    with pytest.raises(ConfigError, match=r"importing no_such_pkg_xyz.mod failed \(ModuleNotFoundError"):
        import_builder("no_such_pkg_xyz.mod:build")
    with pytest.raises(ConfigError, match=r"returned int, not a torch.nn.Module"):
        build_model(load_config(None, [f"model.builder={tmp_path / 'b.py'}:build"]))


def test_a_module_without_the_fast_path_trains_on_padded_batches_with_full_logits(
    model_config_dir, tokenizer_dirs, data, tmp_path
):
    (tmp_path / "plain.py").write_text(
        "import torch\n\n"
        "class Plain(torch.nn.Module):\n"
        "    def __init__(self, base):\n        super().__init__()\n        self.inner = base\n"
        "    def forward(self, input_ids, attention_mask=None, position_ids=None):\n"
        "        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits\n\n"
        "def build(model, cfg):\n    return Plain(model)\n"
    )  # fmt: skip
    common = [f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
              f"data.train_files={data}", "data.train_batch_size=4", "data.micro_batch_size_per_gpu=2",
              "trainer.max_steps=2", "trainer.device=cpu", "trainer.logger=[jsonl]", "optim.warmup_steps=1"]  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"Plain has no get_decoder\(\)/get_output_embeddings\(\).*data.packing=false"
    ):
        train(
            load_config(
                None, [*common, f"model.builder={tmp_path / 'plain.py'}:build", f"trainer.output_dir={tmp_path / 'p0'}"]
            )
        )
    plain = train(load_config(None, [*common, f"model.builder={tmp_path / 'plain.py'}:build", "data.packing=false",
                                     f"trainer.output_dir={tmp_path / 'p1'}"]))  # fmt: skip
    hf = train(load_config(None, [*common, "data.packing=false", f"trainer.output_dir={tmp_path / 'p2'}"]))
    lp, lh = (
        [r["loss"] for r in read_metrics(Path(x["output_dir"]) / "metrics.jsonl") if "loss" in r] for x in (plain, hf)
    )
    assert lp == pytest.approx(lh, rel=1e-5)  # full logits == the fast path's loss


def test_sftforge_eval_mcq_on_an_exported_module(model_config_dir, tokenizer_dirs, tmp_path):
    rows = [{"question": f"Which is {w}?", "options": ["red", "green", "blue", "gold"], "answer": i % 4}
            for i, w in enumerate(("first", "second", "third", "fourth"))]  # fmt: skip
    (tmp_path / "mcq.json").write_text(json.dumps(rows))
    conv = subprocess.run([sys.executable, "-m", "sftforge", "data", "convert", str(tmp_path / "mcq.json"),
                           str(tmp_path / "mcq.jsonl"), "--from", "multiple_choice"], capture_output=True, text=True)  # fmt: skip
    assert conv.returncode == 0, conv.stderr
    result = train(load_config(None, args(model_config_dir, tokenizer_dirs, tmp_path / "mcq.jsonl", tmp_path / "m")))
    p = subprocess.run([sys.executable, "-m", "sftforge", "eval", "--model", result["final_dir"], "--data",
                        str(tmp_path / "mcq.jsonl"), "--task", "mcq", "--max-new-tokens", "3", "-o",
                        str(tmp_path / "ev.jsonl")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["generated_tokens"] >= 1 for r in records)
    assert "accuracy" in p.stdout


def test_launcher_notes_say_what_accelerate_set_that_is_not_read(monkeypatch):
    from sftforge.distributed import launcher_notes

    for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_CPU", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert launcher_notes("fp32", False) == []
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert "starts one process" in launcher_notes("fp32", False)[0]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match=r"--mixed_precision bf16 but model.dtype=fp32: .*set model.dtype=bf16"):
        launcher_notes("fp32", False)
    assert launcher_notes("bf16", False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match=r"fp16: sftforge trains in fp32 or bf16 only"):
        launcher_notes("bf16", False)


@pytest.mark.slow
def test_accelerate_launch_two_processes_equals_torchrun(model_config_dir, tokenizer_dirs, data, tmp_path):
    """The ChatLM-mini launch line (accelerate launch --multi_gpu --num_processes 2) on CPUs: gloo, the same losses
    and weights as torchrun, with a built module."""
    import os

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate is not installed (pip install accelerate)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = {
        "accelerate": [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"],
        "torchrun": [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"],
    }  # fmt: skip
    for name, launch in launchers.items():
        cmd = [*launch, "-m", "sftforge", "train", *args(model_config_dir, tokenizer_dirs, data, tmp_path / name)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "world size 2 (trainer.strategy=ddp)" in p.stdout + p.stderr
    ml = [[r["loss"] for r in read_metrics(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in launchers]
    assert len(ml[0]) == 4 and ml[0] == ml[1]
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in launchers)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sftforge_export_of_a_built_module_checkpoint(model_config_dir, tokenizer_dirs, data, tmp_path):
    """`sftforge export step_N`: the checkpoint's weights, rebuilt by the builder (its init_checkpoint, used at the
    start of training, is not needed any more)."""
    pth = tmp_path / "stage1.pth"
    torch.save(
        build_model(load_config(None, args(model_config_dir, tokenizer_dirs, data, tmp_path / "x"))).state_dict(), pth
    )
    run = args(model_config_dir, tokenizer_dirs, data, tmp_path / "run", f"model.init_checkpoint={pth}",
               "trainer.max_steps=2", "trainer.save_freq=2")  # fmt: skip
    result = train(load_config(None, run))
    pth.unlink()
    p = subprocess.run([sys.executable, "-m", "sftforge", "export", str(tmp_path / "run" / "step_2"), "-o",
                        str(tmp_path / "exp")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(tmp_path / "exp" / "model.safetensors"), load_file(Path(result["final_dir"]) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert torch.equal(load_trained(tmp_path / "exp")(ids), load_trained(result["final_dir"])(ids))
