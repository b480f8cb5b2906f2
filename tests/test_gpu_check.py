"""benchmarks/gpu_check.py, the one command a GPU machine runs, in its CPU smoke form (as CI runs it): every part
runs and reports, resume is bit-exact with strategy none and with FSDP2 in a one-process group, and the generation
eval runs under FSDP2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_check.py"),
        "--device",
        "cpu",
        "--smoke",
        "--out",
        str(tmp_path),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not report["errors"] and report["environment"]["torch"]
    assert [r["trainer"] for r in report["throughput"]] == ["sftforge"] and report["throughput"][0]["tokens_per_s"] > 0
    assert [(r["check"], r["ok"]) for r in report["runs"]] == [
        ("resume, trainer.strategy=none, fp32", True), ("resume, trainer.strategy=fsdp2, fp32", True)]  # fmt: skip
    assert report["runs"][1]["checkpoint"] == "dcp" and len(report["runs"][1]["eval_accuracy"]) == 2
    assert "| sftforge | 256 | off |" in (tmp_path / "gpu_check.md").read_text()
    assert [(r["path"], r["same_episodes"]) for r in report["rollouts"]] == [("generate", True), ("engine", True)]
    assert report["rollouts"][1]["prompt"] < report["rollouts"][0]["prompt"]


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--device cpu --smoke" in p.stderr
