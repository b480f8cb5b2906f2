"""Peak resident memory (CPU) of training qwen3-small: full fine-tuning vs LoRA vs freezing vs gradient checkpointing.

Each case runs `sftforge.sft.train` (so LoRA/freezing go through the trainer's own code) in a fresh Python process
on the same synthetic samples and the real Qwen3 tokenizer fixture, and reports that process's own peak resident set
(VmHWM in /proc/self/status; ru_maxrss of the parent would survive execve and report the parent's peak), minus its
resident set after the imports. glibc is told to mmap every allocation >= 64 KiB so freed tensors leave the resident
set at once (otherwise the peak includes heap slack).

    python benchmarks/memory_modes.py                 # the table
    python benchmarks/memory_modes.py --tokens 512    # shorter samples (faster)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "model_configs" / "qwen3-small"

CASES = {
    "full": [],
    "LoRA r=16 (all-linear)": ["model.lora.rank=16", "model.lora.alpha=32"],
    "frozen (last layer trainable)": [r"model.trainable=[layers\.3\.]"],
    "full + gradient checkpointing": ["model.enable_gradient_checkpointing=true"],
    "LoRA + gradient checkpointing": ["model.lora.rank=16", "model.lora.alpha=32",
                                      "model.enable_gradient_checkpointing=true"],
}  # fmt: skip


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(case: str, tokens: int, micro: int, steps: int) -> None:
    import time

    import torch

    from sftforge.bench import unpack_tokenizer
    from sftforge.config import load_config
    from sftforge.data import Sample
    from sftforge.lora import parameter_report  # noqa: F401 (imported before the baseline)
    from sftforge.sft import train

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        tok = unpack_tokenizer("qwen3", Path(tmp) / "tok")
        g = torch.Generator().manual_seed(0)
        samples = []
        for _ in range(micro * 2):
            ids = torch.randint(10, 150000, (tokens,), generator=g).tolist()
            samples.append(Sample(ids, [0] * (tokens // 2) + [1] * (tokens - tokens // 2)))
        cfg = load_config(None, [
            f"model.path={MODEL}", f"model.tokenizer_path={tok}", f"trainer.output_dir={Path(tmp) / 'run'}",
            "trainer.logger=[jsonl]", "trainer.device=cpu", f"data.train_batch_size={micro * 2}",
            f"data.micro_batch_size_per_gpu={micro}", f"data.max_length={tokens}", f"trainer.max_steps={steps}",
            "optim.lr=1e-4", *CASES[case],
        ])  # fmt: skip
        base = status_kib("VmRSS")
        t0 = time.perf_counter()
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train(cfg, train_dataset=samples)
        elapsed = time.perf_counter() - t0
        peak = status_kib("VmHWM")
    print(json.dumps({"case": case, "base_mib": base / 1024, "peak_mib": peak / 1024, "train_s": elapsed}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sample (default 1024)")
    ap.add_argument("--micro", type=int, default=2, help="samples per micro-batch (2 micro-batches per step)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps (default 2)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # the child's side
    args = ap.parse_args()
    if args.case:
        child(args.case, args.tokens, args.micro, args.steps)
        return
    import torch
    from rich.console import Console
    from rich.table import Table

    from sftforge.config import ModelConfig
    from sftforge.lora import parameter_report, prepare_model
    from sftforge.model import load_model

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    table = Table(title=f"qwen3-small on CPU, {args.micro}x{args.tokens} tokens per micro-batch, 2 micro-batches, "
                        f"{args.steps} steps, fp32 AdamW")  # fmt: skip
    for col in ("case", "trainable params", "peak RSS MiB", "peak − baseline MiB", "train s"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for case, overrides in CASES.items():
        cfg = ModelConfig(path=str(MODEL))
        for o in overrides:
            key, value = o.split("=", 1)
            if key == "model.trainable":
                cfg.trainable = [value.strip("[]")]
            elif key.startswith("model.lora."):
                setattr(cfg.lora, key.rsplit(".", 1)[1], type(getattr(cfg.lora, key.rsplit(".", 1)[1]))(value))
        with torch.no_grad():
            trainable = parameter_report(prepare_model(load_model(cfg), cfg))["trainable"]
        cmd = [sys.executable, __file__, "--case", case, "--tokens", str(args.tokens), "--micro", str(args.micro),
               "--steps", str(args.steps)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            table.add_row(case, f"{trainable:,}", "failed", proc.stderr.strip().splitlines()[-1][:60], "")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        table.add_row(case, f"{trainable:,}", f"{r['peak_mib']:.0f}", f"{r['peak_mib'] - r['base_mib']:.0f}",
                      f"{r['train_s']:.1f}")  # fmt: skip
        Console().print(f"done: {case}", style="dim")
    Console().print(table)


if __name__ == "__main__":
    main()
