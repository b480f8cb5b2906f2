"""Distributed engine on CPU (gloo, 2 processes via torchrun): world-size invariance per strategy, and resume across
world sizes (stop on 2 -> resume on 1, stop on 1 -> resume on 2) with the same final weights."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftforge.metrics import read_metrics

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
QA = [(f"What is {a} plus {b}? Answer briefly.", f"{a} plus {b} is {a + b}.") for a in range(7) for b in range(3)]


@pytest.fixture
def data_file(tmp_path) -> Path:
    p = tmp_path / "qa.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def run(
    nproc: int, out: Path, data: Path, model_config_dir, tokenizer_dirs, *extra: str, script: Path | None = None
) -> subprocess.CompletedProcess:
    """``sftforge train`` on ``nproc`` processes (``script``: a Python file run instead of ``-m sftforge``)."""
    args = [
        "train", f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
        f"data.train_files={data}", f"data.val_files={data}", "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2",
        "optim.lr=1e-3", "optim.warmup_steps=1", "optim.clip_grad=1.0", "trainer.max_steps=4",
        "trainer.device=cpu", "trainer.logger=[jsonl]", f"trainer.output_dir={out}", *extra,
    ]  # fmt: skip
    entry = [str(script)] if script is not None else ["-m", "sftforge"]
    if nproc == 1:
        cmd = [sys.executable, *entry, *args]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *entry, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    errors = [ln for ln in p.stderr.splitlines() if "Error" in ln or "error" in ln or "what()" in ln]
    assert p.returncode == 0, p.stdout[-2000:] + "\n".join(errors[-20:]) + p.stderr[-3000:]
    return p


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def max_diff(a: dict, b: dict) -> tuple[float, float]:
    assert a.keys() == b.keys()
    abs_d = max(float((a[k] - b[k]).abs().max()) for k in a)
    rel_d = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
    return abs_d, rel_d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_config_dir, tokenizer_dirs):
    """One uninterrupted single-process run (the reference for every other run)."""
    tmp = tmp_path_factory.mktemp("ref")
    data = tmp / "qa.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(1, tmp / "one", data, model_config_dir, tokenizer_dirs)
    return data, tmp / "one"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one(strategy, reference, tmp_path, model_config_dir, tokenizer_dirs):
    data, one = reference
    two = tmp_path / "two"
    verl = ["trainer.project_name=sftforge-test", "trainer.experiment_name=two"]  # verl keys: one info line each
    p = run(2, two, data, model_config_dir, tokenizer_dirs, f"trainer.strategy={strategy}", *verl)
    said = (p.stdout + p.stderr).splitlines()
    assert sum(f"world size 2 (trainer.strategy={strategy})" in line for line in said) == 1
    ours = [line for line in said if line.startswith(("info:", "warning:", "rows read:", "tokenized store:", "step "))]
    assert ours and len(ours) == len(set(ours)), ours  # one process speaks for the run
    assert sum(line.startswith("info: verl key trainer.project_name") for line in said) == 1
    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 4
    assert l1 == pytest.approx(l2, rel=1e-4)
    norms = [[r["grad_norm"] for r in read_metrics(o / "metrics.jsonl") if "grad_norm" in r] for o in (one, two)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)  # the global norm (clipping at 1.0 is active)
    vals = [[r["val_loss"] for r in read_metrics(o / "metrics.jsonl") if "val_loss" in r] for o in (one, two)]
    assert len(vals[0]) == 1 and vals[0] == pytest.approx(vals[1], rel=1e-5)  # token-weighted over both ranks
    abs_d, rel_d = max_diff(weights(two), weights(one))
    print(f"{strategy}: 1 vs 2 processes: max abs diff {abs_d:.3g}, max rel diff {rel_d:.3g}")
    assert rel_d < 1e-4
    assert (two / "step_4" / "dcp").is_dir() and (two / "step_4" / "COMPLETE").is_file()


@pytest.mark.slow
def test_stop_on_two_resume_on_one(reference, tmp_path, model_config_dir, tokenizer_dirs):
    data, one = reference
    out = tmp_path / "run"
    run(2, out, data, model_config_dir, tokenizer_dirs, "trainer.stop_at_step=2")
    assert (out / "step_2" / "dcp").is_dir() and not (out / "final").exists()
    run(1, out, data, model_config_dir, tokenizer_dirs)
    assert losses(out) == pytest.approx(losses(one), rel=1e-4)
    abs_d, rel_d = max_diff(weights(out), weights(one))
    print(f"2 -> 1 resume: max abs diff {abs_d:.3g}, max rel diff {rel_d:.3g}")
    assert rel_d < 1e-4


@pytest.mark.slow
def test_stop_on_one_resume_on_two(reference, tmp_path, model_config_dir, tokenizer_dirs):
    data, one = reference
    out = tmp_path / "run"
    run(1, out, data, model_config_dir, tokenizer_dirs, "trainer.stop_at_step=2")
    assert (out / "step_2" / "model.safetensors").is_file()
    run(2, out, data, model_config_dir, tokenizer_dirs, "trainer.strategy=fsdp2")
    assert losses(out) == pytest.approx(losses(one), rel=1e-4)
    abs_d, rel_d = max_diff(weights(out), weights(one))
    print(f"1 -> 2 resume: max abs diff {abs_d:.3g}, max rel diff {rel_d:.3g}")
    assert rel_d < 1e-4


@pytest.mark.slow
def test_export_of_a_two_process_checkpoint(data_file, tmp_path, model_config_dir, tokenizer_dirs):
    """`sftforge export step_N` on a DCP checkpoint (no model.safetensors): one process reads both ranks' shards."""
    from transformers import AutoModelForCausalLM

    from sftforge.cli import main as cli_main

    out = tmp_path / "two"
    run(2, out, data_file, model_config_dir, tokenizer_dirs, "trainer.strategy=fsdp2")
    step = out / "step_4"
    assert (step / "dcp").is_dir() and not (step / "model.safetensors").exists()
    assert cli_main(["export", str(step), "--output", str(tmp_path / "exported")]) == 0
    exported, final = load_file(tmp_path / "exported" / "model.safetensors"), weights(out)
    assert exported.keys() == final.keys()
    for key in final:  # the same fp32 weights the 2-process run exported after its last step
        assert torch.equal(exported[key], final[key]), key
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"))
    assert torch.equal(model.state_dict()["model.norm.weight"], final["model.norm.weight"])


@pytest.mark.slow
def test_lora_fsdp2_two_processes(data_file, tmp_path, model_config_dir, tokenizer_dirs):
    """LoRA with FSDP2: final/ is the merged model (gathered from the shards, then merged), final/adapter loads with
    peft, both equal a one-process LoRA run; `sftforge export --merge` of the DCP checkpoint gives final/ again."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftforge.cli import main as cli_main
    from sftforge.config import ModelConfig
    from sftforge.model import load_model

    lora = ["model.lora.rank=4", "model.lora.alpha=8"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(1, one, data_file, model_config_dir, tokenizer_dirs, *lora)
    run(2, two, data_file, model_config_dir, tokenizer_dirs, "trainer.strategy=fsdp2", *lora)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    final = weights(two)
    assert not any("lora" in k or "base_layer" in k for k in final)
    abs_d, rel_d = max_diff(final, weights(one))
    print(f"LoRA fsdp2: 1 vs 2 processes: merged weights max abs diff {abs_d:.3g}, max rel diff {rel_d:.3g}")
    assert rel_d < 1e-4

    def base():
        return load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).eval()

    adapted = PeftModel.from_pretrained(base(), str(two / "final" / "adapter")).eval()
    merged_by_peft = PeftModel.from_pretrained(base(), str(two / "final" / "adapter")).merge_and_unload().state_dict()
    for key, value in final.items():  # base + B·A·scaling, as peft merges it
        torch.testing.assert_close(value, merged_by_peft[key], rtol=0, atol=1e-6, msg=key)
    assert max(float((final[k] - v).abs().max()) for k, v in base().state_dict().items() if k in final) > 1e-4
    ids = torch.tensor([list(range(100, 140))])
    with torch.no_grad():
        ref = adapted(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(two / "final")).eval()(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)

    assert cli_main(["export", str(two / "step_4"), "--output", str(tmp_path / "merged"), "--merge"]) == 0
    exported = load_file(tmp_path / "merged" / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


# Runs sftforge train, then lists the gloo threads still alive in this worker: destroy() must have freed every group.
PROBE = """
import os, sys
from sftforge.cli import main
rc = main(sys.argv[1:])
names = []
for tid in os.listdir("/proc/self/task"):
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    except OSError:  # a thread that ended meanwhile
        pass
# one write per line: two processes share the pipe, and print's separate write of the newline could interleave
sys.stdout.write(f"rank {os.environ['RANK']} gloo threads after the run: {sorted(n for n in names if 'gloo' in n)}\\n")
sys.stdout.flush()
sys.exit(rc)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc (Linux)")
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["trainer.strategy=ddp"], id="ddp"),
        pytest.param(["trainer.strategy=fsdp2"], id="fsdp2"),
        pytest.param(["trainer.strategy=ddp", "trainer.sp_size=2"], id="sp2"),
    ],
)
def test_no_process_group_outlives_the_run(extra, data_file, tmp_path, model_config_dir, tokenizer_dirs):
    """After a 2-process run no gloo group is left: a group that outlives destroy_process_group (torch keeps
    references: collectives' default arguments, DTensor caches holding the DeviceMesh) is freed only during
    interpreter shutdown, where its worker threads abort the process now and then ("terminate called without an
    active exception", exit code 134) although the run completed. parallel.destroy frees them."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    p = run(2, tmp_path / "out", data_file, model_config_dir, tokenizer_dirs, "trainer.max_steps=2", *extra,
            script=script)  # fmt: skip
    lines = sorted(re.findall(r"rank \d gloo threads after the run: \[[^\]]*\]", p.stdout))
    assert lines == [f"rank {r} gloo threads after the run: []" for r in (0, 1)], lines
