"""Long context with Ulysses sequence parallelism (trainer.sp_size): how long a sequence fits, and a CPU check.

1. Estimate (sftforge.plan.longest_sequence): the longest packed micro-batch per GPU for the Qwen3-1.7B shape
   (tests/fixtures/model_configs/qwen3-1.7b, copied from ../shared/assets/model_configs) on 8 GPUs of 80 GB, bf16,
   FSDP2 over the 8 GPUs, gradient checkpointing on, for sp_size 1, 2, 4, 8.
2. Validation on CPU: the peak resident memory of each rank for the same packed micro-batch on 1 process (sp 1) and
   on 2 processes (sp 2, gloo), measured (VmHWM above the post-import baseline, 2 training steps with the trainer's
   own collate -> ulysses.shard -> loss_sum -> backward -> AdamW) next to the estimate for the same case.

    python benchmarks/long_context.py            # both tables (a few minutes on 2 cores)
    python benchmarks/long_context.py --estimate # the estimate table only (seconds)
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
GIB, MIB = 1 << 30, 1 << 20

_CHILD = r"""
import json, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from transformers import AutoConfig, AutoModelForCausalLM
from sftforge import ulysses
from sftforge.attention import select
from sftforge.config import load_config
from sftforge.data import Sample
from sftforge.loss import loss_sum
from sftforge.model import load_model
from sftforge.optim import build_optimizer
from sftforge.packing import collate

args = json.loads(sys.argv[1])
cfg = load_config(None, args["overrides"])
with torch.device("meta"):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.path))
sp = int(os.environ.get("WORLD_SIZE", "1"))
group = None
if sp > 1:
    dist.init_process_group("gloo")
    group = dist.new_group(list(range(sp)))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
model = load_model(cfg.model, "cpu")
if sp == 1:
    select(model)  # packed sdpa, as parallel.build_engine selects it
if sp > 1:
    ulysses.enable(model, group, sp)
opt = build_optimizer(model, cfg.optim)
g = torch.Generator().manual_seed(0)
n, parts, share = args["tokens"], args["samples"], args["share"]
samples = []
for _ in range(parts):
    k = n // parts
    ids = torch.randint(0, model.config.vocab_size, (k,), generator=g).tolist()
    s = max(2, int(k * share))
    samples.append(Sample(ids, [0] * (k - s) + [1] * s))
for _ in range(2):
    mb = ulysses.shard(collate(samples, True, cfg.model.attn_implementation, 0, torch.float32))
    s, count = loss_sum(model, mb, cfg.model.loss_chunk_size)
    (s / max(count, 1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
peak = status("VmHWM") - base
if sp > 1:
    t = torch.tensor([peak], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    peak = int(t.item())
    dist.destroy_process_group()
if int(os.environ.get("RANK", "0")) == 0:
    print(json.dumps({"measured": peak}))
"""


def _cfg(model: str, overrides: list[str]):
    from sftforge.config import load_config

    return load_config(None, [f"model.path={CONFIGS / model}", "data.micro_batch_size_per_gpu=1", *overrides])


def estimate_table(gpu_gib: int = 80, world: int = 8) -> list[dict]:
    from sftforge.plan import ModelShape, estimate_memory, longest_sequence

    shape = ModelShape.from_path(str(CONFIGS / "qwen3-1.7b"))
    rows = []
    for sp, attn in ((1, "sdpa"), (1, "flash_attention_2"), (2, "sdpa"), (4, "sdpa"), (8, "sdpa")):
        cfg = _cfg("qwen3-1.7b", ["model.dtype=bf16", "model.enable_gradient_checkpointing=true",
                                  f"model.attn_implementation={attn}"])  # fmt: skip
        n = longest_sequence(shape, cfg, gpu_gib * GIB, sp_size=sp, shard_over=world)
        est = estimate_memory(shape, cfg, n, n // 2, micro_batch_size=1, gpu_memory=gpu_gib * GIB,
                              shard_over=world, sp_size=sp)  # fmt: skip
        rows.append({"sp": sp, "attn": LABELS[attn] if sp == 1 else "sdpa per sample, all-to-all", "longest": n, "total": est.total, "activations": est.activations,
                     "mask": est.attention_mask, "states": est.params + est.grads + est.optimizer})  # fmt: skip
    return rows


LABELS = {
    "sdpa": "sdpa per sample",
    "flash_attention_2": "flash_attention_2 (cu_seqlens)",
}


def measure(model: str, tokens: int, samples: int, share: float, sp: int) -> int:
    ov = [f"model.path={CONFIGS / model}", "model.loss_chunk_size=512"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    payload = json.dumps({"overrides": ov, "tokens": tokens, "samples": samples, "share": share})
    if sp == 1:
        cmd = [sys.executable, "-c", _CHILD, payload]
    else:
        script = Path(os.environ.get("TMPDIR", "/tmp")) / "sftforge_long_context_child.py"
        script.write_text(_CHILD)
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", f"--nproc_per_node={sp}", str(script), payload]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])["measured"]


def validation_table(model: str = "qwen3-small", tokens: int = 4096, samples: int = 4, share: float = 0.5):
    from sftforge.plan import ModelShape, estimate_memory

    cfg = _cfg(model, ["model.loss_chunk_size=512"])  # logits of one 512-row chunk: activations dominate
    shape = ModelShape.from_path(cfg.model.path)
    rows = []
    for sp in (1, 2):
        est = estimate_memory(shape, cfg, tokens, int(tokens * share), micro_batch_size=1, overhead=0, sp_size=sp)
        got = measure(model, tokens, samples, share, sp)
        rows.append({"sp": sp, "estimate": est.total, "measured": got, "error": est.total / got - 1,
                     "activations": est.activations})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimate", action="store_true", help="only the estimate table")
    ap.add_argument("--tokens", type=int, default=4096, help="packed micro-batch of the CPU validation")
    args = ap.parse_args()
    print("Qwen3-1.7B shape, 8 × 80 GB GPUs, bf16, FSDP2 over 8, gradient checkpointing, micro-batch 1 packed, "
          "half of the tokens supervised (estimate):\n")  # fmt: skip
    print("| sp_size | attention | longest sequence | peak GiB | activations GiB | attention mask GiB | "
          "weights+grads+AdamW GiB |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in estimate_table():
        print(f"| {r['sp']} | {r['attn']} | {r['longest']:,} | {r['total'] / GIB:.1f} | {r['activations'] / GIB:.1f} | "
              f"{r['mask'] / GIB:.1f} | {r['states'] / GIB:.1f} |")  # fmt: skip
    if args.estimate:
        return
    print(f"\nCPU validation: qwen3-small, one packed micro-batch of {args.tokens:,} tokens (4 samples), fp32, loss chunk 512, peak "
          "per rank above the post-import baseline:\n")  # fmt: skip
    print("| sp_size | processes | estimate MiB | measured MiB | error |")
    print("|---:|---:|---:|---:|---:|")
    for r in validation_table(tokens=args.tokens):
        print(
            f"| {r['sp']} | {r['sp']} | {r['estimate'] / MIB:,.0f} | {r['measured'] / MIB:,.0f} | {r['error']:+.1%} |"
        )


if __name__ == "__main__":
    main()
