"""Memory estimate (sftforge.plan.estimate_memory) vs measured peak of real training steps on CPU.

Each case runs in a fresh process: it records the resident memory after the imports, builds the model (random init
from a config.json), runs 3 optimizer steps of 2 accumulated micro-batches with the trainer's own pieces
(collate -> loss_sum -> backward -> AdamW) and reports the peak resident memory minus that baseline. glibc is told to mmap every allocation >= 64 KiB so freed
tensors leave the resident set at once (otherwise the peak includes heap slack).

    python benchmarks/memory_estimate.py            # the table (a few minutes on 2 cores)
    python benchmarks/memory_estimate.py --quick    # the two smallest cases
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "fixtures" / "model_configs"

# (name, model config, tokens per sample, samples per micro-batch, supervised share, overrides)
CASES = [
    ("tiny 1x512", "qwen3-tiny", 512, 1, 0.5, []),
    ("tiny 1x2048 chunk 512", "qwen3-tiny", 2048, 1, 0.5, ["model.loss_chunk_size=512"]),
    ("small 1x1024", "qwen3-small", 1024, 1, 0.3, []),
    ("small 1x2048 gc", "qwen3-small", 2048, 1, 0.25, ["model.enable_gradient_checkpointing=true"]),
    ("small 1x1024 bf16", "qwen3-small", 1024, 1, 0.3, ["model.dtype=bf16"]),
]
QUICK = CASES[:2]

_CHILD = r"""
import json, sys
import torch
torch.set_num_threads(2)
from transformers import AutoConfig, AutoModelForCausalLM
from sftforge.attention import select
from sftforge.config import load_config
from sftforge.data import Sample
from sftforge.loss import loss_sum
from sftforge.model import autocast, load_model
from sftforge.optim import build_optimizer
from sftforge.packing import collate

args = json.loads(sys.argv[1])
cfg = load_config(None, args["overrides"])
with torch.device("meta"):  # import the model's code before the baseline
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.path))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

rss = lambda: status("VmRSS")

base = rss()
model = load_model(cfg.model, "cpu")
select(model)  # packed sdpa, as parallel.build_engine selects it (a no-op for other attention)
opt = build_optimizer(model, cfg.optim)
g = torch.Generator().manual_seed(0)
n, share = args["tokens"], args["share"]
samples = []
for _ in range(args["micro"]):
    ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
    k = max(2, int(n * share))
    samples.append(Sample(ids, [0] * (n - k) + [1] * k))
for _ in range(3):
    for _ in range(2):  # gradient accumulation: the gradients of the first micro-batch stay alive during the second
        mb = collate(samples, cfg.data.packing, cfg.model.attn_implementation, 0, torch.float32)
        with autocast(cfg.model.dtype, "cpu"):
            s, count = loss_sum(model, mb, cfg.model.loss_chunk_size)
        (s / count).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child of a big process (pytest) would report
# its parent's peak; VmHWM belongs to this process image only.
peak = status("VmHWM")
print(json.dumps({"measured": peak - base}))
"""


def measure(model: str, tokens: int, micro: int, share: float, overrides: list[str]) -> int:
    """Peak resident bytes of 3 training steps above the post-import baseline, in a fresh process."""
    ov = [f"model.path={CONFIGS / model}", f"data.micro_batch_size_per_gpu={micro}", *overrides]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    payload = json.dumps({"overrides": ov, "tokens": tokens, "micro": micro, "share": share})
    out = subprocess.run([sys.executable, "-c", _CHILD, payload], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["measured"]


def estimate(model: str, tokens: int, micro: int, share: float, overrides: list[str]):
    from sftforge.config import load_config
    from sftforge.plan import ModelShape, estimate_memory

    cfg = load_config(None, [f"model.path={CONFIGS / model}", f"data.micro_batch_size_per_gpu={micro}", *overrides])
    shape = ModelShape.from_path(cfg.model.path)
    sup = micro * max(2, int(tokens * share))
    return estimate_memory(shape, cfg, tokens * micro, sup, overhead=0)


def run(cases=CASES) -> list[dict]:
    rows = []
    for name, model, tokens, micro, share, overrides in cases:
        est = estimate(model, tokens, micro, share, overrides)
        got = measure(model, tokens, micro, share, overrides)
        rows.append({"case": name, "estimate": est.total, "measured": got, "error": est.total / got - 1})
    return rows


def table(rows: list[dict]) -> str:
    mib = 1 << 20
    lines = ["| case | estimate MiB | measured MiB | error |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['estimate'] / mib:,.0f} | {r['measured'] / mib:,.0f} | {r['error']:+.1%} |")
    worst = max(rows, key=lambda r: abs(r["error"]))
    lines.append(f"\nlargest error: {worst['error']:+.1%} ({worst['case']})")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the two smallest cases")
    print(table(run(QUICK if ap.parse_args().quick else CASES)))
