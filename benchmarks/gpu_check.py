"""One command that tells us, on a GPU machine we hold for a few minutes, whether sftforge's GPU path is right and how
fast it is. Nothing to edit there; everything it finds goes into one JSON and one markdown file.

    python benchmarks/gpu_check.py --out gpu_check                 # on a CUDA machine (about 5-8 minutes)
    python benchmarks/gpu_check.py --device cpu --smoke --out tmp  # the same script in CI (under a minute)

What it does, each part on its own (a failing part is recorded and the next one runs):

1. **environment**: Python, torch, CUDA, transformers, the card (name, capability, free memory, bf16), which optional
   packages are present (trl, flash-attn, vllm, liger-kernel, peft), the sftforge commit.
2. **gpu tests**: ``pytest -m gpu`` (the tests that need CUDA: host-sync-free loss gather, the GPU RNG left alone by
   sampling, ...).
3. **throughput**: the Qwen2.5-0.5B shape (random init, ``tests/fixtures/model_configs/qwen2.5-0.5b``) on TextCraft
   conversations packed into micro-batches of 2,048 and 4,096 tokens, bf16, ``model.compile`` off and on: step time,
   tokens/s, peak memory (``torch.cuda.max_memory_allocated``) and MFU. TRL's SFTTrainer rows (at its defaults, and
   padding-free: ``trl-best``; same data, model and batch) when trl is installed. MFU = (6·N·T + 12·L·d_attn·Σ s²/2) / step time / peak, N the
   non-embedding parameters, T the step's tokens, s each sample's length, peak the card's bf16 dense data-sheet figure
   (sftforge.bench.DENSE_BF16_PEAK; a measured matmul probe for a card not in it).
4. **runs** (``sftforge train`` as a user runs it, a tiny model, bf16): resume exactness (stopped at step 2 and
   resumed == uninterrupted, bit for bit) with ``trainer.strategy=none`` and with FSDP2 in a one-process group (NCCL
   scalar collectives, DCP checkpoints, the in-training generation eval), and fp32 training (TF32).
5. **rollouts**: 16 TextCraft episodes of 6 turns × 32 new tokens (Qwen2.5-0.5B shape, random init, bf16, greedy):
   ``model.generate`` re-prefilling every turn against sftforge.engine (benchmarks/rollout_speed.py's rows): prompt
   tokens computed, wall time, episodes/s, peak memory, and whether the episodes are the same (bf16 may differ).

``--smoke`` shrinks every part (a tiny model, 256-token micro-batches, one timed step, compile off) so that CI runs the
whole script on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "src"))

from sftforge.bench import bench, unpack_tokenizer  # noqa: E402

OPTIONAL = ("trl", "flash_attn", "vllm", "liger_kernel", "peft")


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "device": device, "cpu_count": os.cpu_count(),
           "packages": {m: importlib.util.find_spec(m) is not None for m in OPTIONAL}}  # fmt: skip
    try:
        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        env["commit"] = ""
    if device.startswith("cuda"):
        d = torch.device(device)
        free, total = torch.cuda.mem_get_info(d)
        env.update(gpu=torch.cuda.get_device_name(d), capability=".".join(map(str, torch.cuda.get_device_capability(d))),
                   gpu_count=torch.cuda.device_count(), free_gib=round(free / 2**30, 1), total_gib=round(total / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())))  # fmt: skip
    return env


def gpu_tests(timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    tail = p.stdout.strip().splitlines()[-1:] or [""]
    return {"rc": p.returncode, "summary": tail[0], "output": p.stdout[-4000:] + p.stderr[-2000:]}


def data_file(tmp: Path, copies: int) -> Path:
    """The vendored TextCraft conversations, repeated: enough samples for every timed step (speed does not depend on
    which tokens they are)."""
    rows = (FIXTURES / "textcraft" / "train_react.jsonl").read_text().splitlines()
    out = tmp / "textcraft_x.jsonl"
    out.write_text("".join(r + "\n" for _ in range(copies) for r in rows))
    return out


def throughput(device: str, smoke: bool, tmp: Path) -> list[dict]:
    model = FIXTURES / "model_configs" / ("qwen3-tiny" if smoke else "qwen2.5-0.5b")
    data = data_file(tmp, 2 if smoke else 12)
    lengths = (256,) if smoke else (2048, 4096)
    compiles = (False,) if smoke else (False, True)
    rows = []
    for tokens in lengths:
        for compiled in compiles:
            overrides = ["data.packing=true", f"data.max_tokens_per_micro_batch={tokens}", f"data.max_length={tokens}",
                         "data.truncation=right", f"model.compile={str(compiled).lower()}", "model.dtype=auto"]  # fmt: skip
            batch = 8 if smoke else 32
            try:
                out = bench(model, data, [batch], steps=1 if smoke else 4, micro=batch, with_trl=None if not smoke
                            else False, overrides=overrides, device=device, print_fn=lambda *a: None)  # fmt: skip
            except Exception as e:  # recorded, the next case runs
                rows.append({"tokens": tokens, "compile": compiled, "error": f"{type(e).__name__}: {e}"[-2000:]})
                continue
            for r in out:
                rows.append({"tokens": tokens, "compile": compiled, **r})
    return rows


def train(
    tmp: Path, name: str, device: str, *extra: str, timeout: int = 300
) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / name
    tok = unpack_tokenizer("qwen3", tmp / "tokenizers")
    args = [sys.executable, "-m", "sftforge", "train", f"model.path={FIXTURES / 'model_configs' / 'qwen3-tiny'}",
            f"model.tokenizer_path={tok}", f"data.train_files={FIXTURES / 'textcraft' / 'train_react.jsonl'}",
            "data.max_length=4096", "data.train_batch_size=4", "trainer.max_steps=4", "optim.lr=1e-3",
            "optim.warmup_steps=0", f"trainer.device={device}", "trainer.logger=[jsonl]", f"trainer.output_dir={out}",
            *extra]  # fmt: skip
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return p, out


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def runs(device: str, tmp: Path) -> list[dict]:
    """Resume exactness with strategy none and fsdp2 (a one-process group; its runs also generate for the
    in-training eval), and fp32 on a GPU (TF32)."""
    dtype = "model.dtype=bf16" if device.startswith("cuda") else "model.dtype=fp32"
    rows = (FIXTURES / "textcraft" / "train_react.jsonl").read_text().splitlines()[:4]
    (tmp / "eval.jsonl").write_text("".join(r + "\n" for r in rows))
    eval_keys = [f"data.eval_files={tmp / 'eval.jsonl'}", "trainer.eval_freq=2", "trainer.eval_task=exact"]
    results = []
    for strategy in ("none", "fsdp2"):
        extra = [dtype, f"trainer.strategy={strategy}", *(eval_keys if strategy == "fsdp2" else [])]
        t0 = time.perf_counter()
        full, a = train(tmp, f"{strategy}-full", device, *extra)
        stop, b = train(tmp, f"{strategy}-resumed", device, *extra, "trainer.stop_at_step=2", "trainer.save_freq=2")
        again, _ = train(tmp, f"{strategy}-resumed", device, *extra, "trainer.save_freq=2")
        row = {"check": f"resume, trainer.strategy={strategy}, {dtype.split('=')[1]}", "ok": False}
        failed = [p for p in (full, stop, again) if p.returncode != 0]
        if failed:
            row["error"] = failed[0].stderr[-2000:]
        else:
            row["max_abs_diff"] = max_diff(a, b)
            row["ok"] = row["max_abs_diff"] == 0.0
            row["checkpoint"] = "dcp" if (b / "step_2" / "dcp").is_dir() else "safetensors"
            if strategy == "fsdp2":
                metrics = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()]
                row["eval_accuracy"] = [m["eval_accuracy"] for m in metrics if "eval_accuracy" in m]
                row["ok"] = row["ok"] and len(row["eval_accuracy"]) == 2  # generation under FSDP2 ran twice
        row["s"] = round(time.perf_counter() - t0, 1)
        results.append(row)
    if device.startswith("cuda"):
        t0 = time.perf_counter()
        p, _ = train(tmp, "fp32", device, "model.dtype=fp32", "trainer.max_steps=2")
        results.append({"check": "fp32 (TF32 matmuls)", "ok": p.returncode == 0 and "TF32" in p.stdout + p.stderr,
                        "s": round(time.perf_counter() - t0, 1),
                        **({} if p.returncode == 0 else {"error": p.stderr[-2000:]})})  # fmt: skip
    return results


def rollouts(device: str, smoke: bool) -> list[dict]:
    """TextCraft episodes, greedy: model.generate re-prefilling every turn against the engine (KV cache kept across
    turns, continuous batching); benchmarks/rollout_speed.py's rows, in this process."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import rollout_speed

    args = argparse.Namespace(episodes=2 if smoke else 16, turns=2 if smoke else 6, new_tokens=8 if smoke else 32,
                              batch_size=16, smollm2="", device=device, dtype="fp32" if smoke else "bf16")  # fmt: skip
    model = "qwen3-tiny" if smoke else "qwen2.5-0.5b"
    rows = [rollout_speed.child(model, path, args) for path in ("generate", "engine")]
    reference = rows[0]["actions"]
    for r in rows:
        r["same_episodes"] = r.pop("actions") == reference
    return rows


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# sftforge GPU check ({env.get('gpu', env['device'])})", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, Python {env['python']}, "
             f"sftforge {env.get('commit', '')}; optional packages: "
             + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in env["packages"].items()), ""]  # fmt: skip
    if "gpu" in env:
        lines += [f"{env['gpu']} × {env['gpu_count']}, compute capability {env['capability']}, {env['free_gib']} of "
                  f"{env['total_gib']} GiB free, bf16 {env['bf16']}, NCCL {env['nccl']}", ""]  # fmt: skip
    t = report.get("gpu_tests", {})
    lines += [f"gpu tests: {t.get('summary', t.get('error', 'not run'))}", ""]
    lines += [
        "| trainer | tokens / micro-batch | compile | step s | tokens/s | peak MiB | MFU |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report.get("throughput", []):
        if "error" in r:
            lines.append(f"| error | {r['tokens']} | {r['compile']} | {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['trainer']} | {r['tokens']:,} | {'on' if r['compile'] else 'off'} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} | {r['mfu']:.1%} |")  # fmt: skip
    lines += ["", "| rollouts (TextCraft, greedy) | episodes × turns | prompt tokens computed | generated | wall s | "
              "episodes/s | peak MiB | same as generate |", "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in report.get("rollouts", []):
        lines.append(f"| {r['model']} {r['path']} | {r['episodes']} × {r['turns'] / r['episodes']:.1f} | "
                     f"{r['prompt']:,} | {r['generated']:,} | {r['wall_s']:.1f} | {r['episodes'] / r['wall_s']:.3f} | "
                     f"{r['peak_rss_mb']:,.0f} | {'yes' if r['same_episodes'] else 'no'} |")  # fmt: skip
    lines += ["", "| check | ok | detail |", "|---|---|---|"]
    for r in report.get("runs", []):
        detail = {k: v for k, v in r.items() if k not in ("check", "ok", "error")}
        lines.append(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {json.dumps(detail)} |")
    for part, err in report.get("errors", {}).items():
        lines += ["", f"**{part} failed**: `{err[:500]}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu")
    ap.add_argument("--smoke", action="store_true", help="every part shrunk (CI on the CPU)")
    ap.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; use --device cpu --smoke for the CPU run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.smoke, "errors": {}}
    tmp = Path(tempfile.mkdtemp(prefix="sftforge-gpu-check-"))
    parts = [("environment", lambda: environment(args.device)), ("gpu_tests", lambda: gpu_tests(240)),
             ("throughput", lambda: throughput(args.device, args.smoke, tmp)), ("runs", lambda: runs(args.device, tmp)),
             ("rollouts", lambda: rollouts(args.device, args.smoke))]  # fmt: skip
    try:
        for name, fn in parts:
            t0 = time.perf_counter()
            try:
                report[name] = fn()
            except Exception as e:  # one part's failure is a finding; the next part still runs
                report["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))  # what ran so far is kept
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = report["errors"] or not all(r["ok"] for r in report.get("runs", []))
    failed = failed or any("error" in r for r in report.get("throughput", []))
    failed = failed or report.get("gpu_tests", {}).get("rc", 0) not in (0, 5)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
