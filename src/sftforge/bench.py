"""``sftforge bench``: the same data, model and batch trained through sftforge and through TRL's SFTTrainer.

Every case (trainer × global batch) runs in a fresh child process, so its peak memory is that process's own VmHWM
(``/proc/self/status``; not ``ru_maxrss``, which survives execve and would report the parent's peak). Cases run
alternately (sftforge 8, TRL 8, sftforge 16, TRL 16): on a shared machine, load changes hit both trainers alike.

What is identical: the tokens (both get sftforge's one render of each conversation: ``input_ids`` + the assistant
loss mask; TRL receives them pre-tokenized as ``input_ids`` + ``assistant_masks`` and builds its labels from them), the
samples of every step (the first samples in file order, no shuffling), the model (same config and random init, or
the same real weights: ``--model`` / ``model.path=`` takes a .gguf file, a Hugging Face folder or a hub id; sdpa
attention, no gradient checkpointing), the precision (model.dtype: auto is fp32 on the CPU, bf16 on a GPU that has
it), global batch and micro-batch size, AdamW with a constant lr and the same betas, eps, clipping and no weight
decay. Both record each step's loss (divided by the step's supervised tokens): :func:`loss_table` prints them side
by side with their largest relative difference, which is fp32 noise unless one trainer computes something else. ``--device cuda`` trains every case on the GPU; peak memory is
then ``torch.cuda.max_memory_allocated`` of the timed steps, and the MFU divides by the card's bf16 dense data-sheet
peak (:data:`DENSE_BF16_PEAK`; a measured matmul probe for a card not in it).

TRL runs with SFTConfig's defaults except: ``bf16`` as model.dtype (TRL's default bf16 needs a GPU),
``gradient_checkpointing=False`` (TRL defaults to True; sftforge's default is off — leaving it on would slow TRL by
the recomputation), ``max_length=None`` (TRL's default 1024 would truncate long conversations and train fewer
tokens), ``train_sampling_strategy="sequential"`` (same samples per step), ``use_cpu`` on the CPU, no saving/reporting.
So TRL keeps its defaults that matter for speed: right padding to the longest sample of each micro-batch
(``padding_free=False``, ``packing=False``), its LM head at every position (TRL 1.16's fused chunked log-prob
kernel: at labelled positions only on a Triton GPU), and its per-step token accuracy/entropy metrics. Its loss is assistant-only through the ``assistant_masks`` column (TRL's own
``assistant_only_loss=True`` needs ``{% generation %}`` markers that the Qwen3 template does not have).
A second TRL row, ``trl-best``, is TRL at its best on the same data: ``padding_free=True`` (each micro-batch's
samples concatenated into one row with restarting positions, no padding: TRL's packing without cross-sample
attention, which transformers' sdpa mask builds from the positions) plus the same assistant-only loss.

MFU (one formula for both trainers, counting only useful work — non-padding tokens, each sample's own context)::

    FLOPs per step = 6 · N · T  +  12 · L · d_attn · Σ_samples s² / 2

N = parameters without the embedding / LM head matrices, T = non-padding tokens of the step, L = layers, d_attn =
heads × head_dim, s = sample length (causal attention sees on average s/2 keys: 12·L·d_attn·S_eff per token with
S_eff = s/2). MFU = FLOPs per step / step time / peak FLOP/s, the peak being measured by an fp32 matmul probe on
the same threads. The LM head is left out (standard for MFU), so MFU ratios equal tokens/s ratios.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sftforge.model_files import gguf_files

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
INSTALL_HINT = "pip install 'sftforge[bench]' (from a checkout: pip install -e '.[bench]')"
COLUMNS = ("trainer", "batch", "step s", "tokens/s", "padding", "peak MiB", "MFU")


def default_data() -> Path:
    vendored = ROOT / "data" / "textcraft" / "train_react.parquet"  # the 1,000 TextCraft conversations
    return vendored if vendored.exists() else FIXTURES / "textcraft" / "train_react.jsonl"


def unpack_tokenizer(name: str, dest_root: Path) -> Path:
    """The vendored tokenizer fixture (tokenizer.json xz-compressed) as a plain folder under dest_root."""
    src, dest = FIXTURES / "tokenizers" / name, dest_root / name
    if not (dest / "tokenizer.json").exists():
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name.endswith(".xz"):
                (dest / f.name[:-3]).write_bytes(lzma.decompress(f.read_bytes()))
            else:
                shutil.copy(f, dest / f.name)
    return dest


TRL_ROWS = ("trl", "trl-best")  # TRL's SFTTrainer at its defaults, and at its best (padding-free)


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def matmul_peak_flops(n: int = 1024, seconds: float = 1.0, device: str = "cpu", dtype: str = "fp32") -> float:
    """Best matmul FLOP/s over ~``seconds`` of n×n products on ``device`` (the CPU peak the MFU column divides by;
    on a GPU the fallback when the card is not in :data:`DENSE_BF16_PEAK`)."""
    import torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


# bf16 dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s; matched against the device name
DENSE_BF16_PEAK = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 PCIe": 756.5e12,
    "H100": 989.4e12,
    "H20": 148e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362.05e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
    "B200": 2250e12,
}


def device_peak_flops(device: str, dtype: str = "bf16") -> tuple[float, str]:
    """(peak FLOP/s the MFU divides by, where it comes from): a GPU's data-sheet bf16 dense peak when its name is
    known, else a measured matmul probe (the CPU always)."""
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        for key, peak in DENSE_BF16_PEAK.items():  # the longest keys first where two match ("H100 SXM" before "H100")
            if key in name:
                if dtype != "bf16":
                    return peak / 2, f"{name}: half its bf16 data-sheet peak (TF32)"
                return peak, f"{name}: bf16 dense data-sheet peak"
        return matmul_peak_flops(4096, 1.0, device, dtype), f"{name}: measured {dtype} matmul probe (not in the table)"
    return matmul_peak_flops(), "fp32 matmul probe"


def model_flops(config: Any, seq_lens: list[int]) -> float:
    """6·N·T + 12·L·d_attn·Σ s²/2 (see the module docstring) for one step's samples."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    # per layer: q, k, v, o projections + gated MLP (3 matrices); norms and biases are negligible
    n = layers * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter)
    tokens = sum(seq_lens)
    return 6 * n * tokens + 12 * layers * heads * hd * sum(s * s / 2 for s in seq_lens)


# ----------------------------------------------------------------------------------------------------------------
# Children (one per case)


def _vmhwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _setup(spec: dict):
    import torch

    from sftforge.config import load_config
    from sftforge.data import build_dataset, load_tokenizer
    from sftforge.model import with_dtype

    torch.manual_seed(0)
    cfg = with_dtype(load_config(None, spec["overrides"]), spec.get("device", "cpu"))  # auto: bf16 on a bf16 GPU
    tok = load_tokenizer(cfg)
    t0 = time.perf_counter()
    ds = build_dataset(cfg.data, tok)
    n = spec["batch"] * (spec["steps"] + 1)
    if len(ds) < n:
        raise SystemExit(f"bench: {n} samples needed ({spec['steps']}+1 steps × batch {spec['batch']}), {len(ds)} read")
    return cfg, tok, ds, n, time.perf_counter() - t0


def _child_sftforge(spec: dict) -> dict:
    import torch

    from sftforge.batching import make_plan, step_micro_batches
    from sftforge.model import autocast, compute_dtype, load_model
    from sftforge.optim import build_optimizer
    from sftforge.packing import collate
    from sftforge.parallel import build_engine

    cfg, tok, ds, n, tok_s = _setup(spec)
    dev = torch.device(spec.get("device", "cpu"))
    model = load_model(cfg.model, dev)
    engine, _ = build_engine(model, cfg, dev, 1, "none")  # packed attention and compile, as a run applies them
    opt = build_optimizer(model, cfg.optim)
    plan = make_plan(cfg, len(ds))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    steps = []
    for step in range(spec["steps"] + 1):
        if step == 1 and dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)  # the peak of the timed steps (not of the warmup's allocations)
        sync()
        t0 = time.perf_counter()
        _, _, micro, n_sup, n_tok = step_micro_batches(ds, step, cfg, plan)
        cells, loss = 0, 0.0
        for samples in micro:
            mb = collate(samples, cfg.data.packing, cfg.model.attn_implementation, pad, compute_dtype(cfg.model.dtype))
            cells += mb.input_ids.numel()
            with autocast(cfg.model.dtype, dev):
                s, _ = engine(mb.to(dev))
            part = s / max(n_sup, 1)
            part.backward()
            loss += float(part.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        lens = [len(x.input_ids) for group in micro for x in group]
        steps.append({"s": time.perf_counter() - t0, "tokens": n_tok, "cells": cells, "lens": lens, "loss": loss})
    out = {"steps": steps, "tokenize_s": tok_s, "rows": len(ds), "config": model.config.to_dict()}
    if dev.type == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated(dev)
    return out


def _child_trl(spec: dict) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftforge.model import load_model

    cfg, tok, ds, n, tok_s = _setup(spec)
    rows = [ds[i] for i in range(min(n, len(ds)))]
    data = datasets.Dataset.from_dict(
        {"input_ids": [s.input_ids for s in rows], "assistant_masks": [s.loss_mask for s in rows]}
    )
    device = spec.get("device", "cpu")
    model = load_model(cfg.model, device)
    stamps: list[float] = []
    counts: list[list] = [[0, 0, 0.0]]

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())
            counts.append([0, 0, 0.0])

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, *a, **kw):
            counts[-1][0] += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else 0
            counts[-1][1] += int(inputs["input_ids"].numel())
            loss = super().training_step(model, inputs, *a, **kw)
            # with num_items_in_batch (the step's label count) each micro-batch returns its share of the step's loss
            counts[-1][2] += float(loss)
            return loss

    micro = cfg.data.micro_batch_size_per_gpu
    best = spec["trainer"] == "trl-best"  # padding-free (packed, no padding) + assistant-only loss
    args = SFTConfig(
        padding_free=best,
        output_dir=spec["tmp"],
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=spec["batch"] // micro,
        max_steps=spec["steps"] + 1,
        learning_rate=cfg.optim.lr,  # the optimizer of the sftforge child: AdamW, constant lr, same betas/eps/clip
        lr_scheduler_type="constant",
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else 1e9,
        bf16=cfg.model.dtype == "bf16",
        gradient_checkpointing=False,
        max_length=None,
        train_sampling_strategy="sequential",
        use_cpu=device == "cpu",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Counting(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    torch.manual_seed(0)
    trainer.train()
    steps = []
    for k in range(len(stamps) - 1):
        batch = rows[k * spec["batch"] : (k + 1) * spec["batch"]]
        lens = [len(s.input_ids) for s in batch]
        steps.append(
            {
                "s": stamps[k + 1] - stamps[k],
                "tokens": sum(lens),
                "cells": counts[k][1],
                "lens": lens,
                "counted_tokens": counts[k][0],
                "loss": counts[k][2],
            }
        )
    return {"steps": steps, "tokenize_s": tok_s, "rows": len(ds), "config": model.config.to_dict()}


def _child_main(spec: dict) -> None:
    out = _child_trl(spec) if spec["trainer"] in TRL_ROWS else _child_sftforge(spec)
    if spec.get("device", "cpu").startswith("cuda"):
        import torch

        out["peak"] = out.get("gpu_peak") or torch.cuda.max_memory_allocated()  # GPU memory: the one that runs out
    else:
        out["peak"] = _vmhwm()
    print("BENCH_RESULT " + json.dumps(out))


# ----------------------------------------------------------------------------------------------------------------
# Parent


def run_case(spec: dict, verbose: bool = False) -> dict:
    threads = str(spec.get("threads") or os.cpu_count() or 1)
    env = dict(os.environ, OMP_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory(prefix="sftforge-bench-") as tmp:
        spec = {**spec, "tmp": tmp}
        cmd = [sys.executable, "-m", "sftforge.bench", "--child", json.dumps(spec)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if verbose:
        sys.stderr.write(proc.stderr[-3000:])
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench case {spec['trainer']} batch {spec['batch']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH_RESULT ") :])


def summarize(trainer: str, batch: int, result: dict, peak_flops: float) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.for_model(**result["config"])
    timed = result["steps"][1:] or result["steps"]  # the first step is warmup
    secs = sum(s["s"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    cells = sum(s["cells"] for s in timed)
    flops = sum(model_flops(config, s["lens"]) for s in timed)
    return {
        "trainer": trainer,
        "batch": batch,
        "steps": len(timed),
        "step_s": secs / len(timed),
        "tokens_per_s": tokens / secs,
        "padding": 1 - tokens / max(cells, 1),
        "peak_mib": result["peak"] / 2**20,
        "mfu": flops / secs / peak_flops,
        "tokenize_s": result["tokenize_s"],
        "rows": result["rows"],
        "losses": [s.get("loss") for s in result["steps"]],  # every step, warmup included (step 1 = same weights)
    }


def loss_table(rows: list[dict]) -> str:
    """Per-step training loss of every trainer, side by side, and the largest relative difference to sftforge's:
    the same tokens, order, weights and optimizer, each normalized by the step's supervised tokens, so they agree
    to float noise unless one of them computes something else (a mask, a normalization, attention across samples)."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        group = [r for r in rows if r["batch"] == batch and r.get("losses")]
        ours = next((r for r in group if r["trainer"] == "sftforge"), None)
        if ours is None or len(group) < 2:
            continue
        names = [r["trainer"] for r in group]
        out += [
            f"\nper-step loss, batch {batch}:",
            "| step | " + " | ".join(names) + " | largest rel. diff |",
            "|---:|" + "---:|" * (len(names) + 1),
        ]
        for k, mine in enumerate(ours["losses"]):
            vals = [r["losses"][k] if k < len(r["losses"]) else None for r in group]
            diffs = [abs(v - mine) / abs(mine) for v in vals if v is not None and mine]
            out.append(
                f"| {k + 1} | " + " | ".join("-" if v is None else f"{v:.6f}" for v in vals) + f" | {max(diffs):.1e} |"
            )
        for r in group:
            if r is not ours:
                d = max_rel_diff(ours["losses"], r["losses"])
                out.append(
                    f"{r['trainer']} vs sftforge: largest relative loss difference {d:.1e} over "
                    f"{min(len(r['losses']), len(ours['losses']))} steps"
                )
    return "\n".join(out)


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / abs(x) for x, y in zip(a, b) if x), default=0.0)


def table(rows: list[dict]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['trainer']} | {r['batch']} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['padding']:.1%} | "
            f"{r['peak_mib']:,.0f} | {r['mfu']:.2%} |"
        )
    for batch in sorted({r["batch"] for r in rows}):
        ours = [r for r in rows if r["batch"] == batch and r["trainer"] == "sftforge"]
        for name, label in (("trl", "TRL"), ("trl-best", "TRL padding-free")):
            trl = [r for r in rows if r["batch"] == batch and r["trainer"] == name]
            if ours and trl:
                out.append(
                    f"\nbatch {batch}: sftforge / {label} tokens/s = "
                    f"{ours[0]['tokens_per_s'] / trl[0]['tokens_per_s']:.1f}×, "
                    f"peak memory {ours[0]['peak_mib'] / trl[0]['peak_mib']:.2f}×"
                )
    return "\n".join(out)


def tokenizer_overrides(model: str | Path) -> list[str]:
    """A config-only folder (a shape, random init) gets the vendored Qwen3 tokenizer; a real model (weights, a .gguf
    file, a hub id) its own."""
    p = Path(model)
    if p.is_dir() and not any(p.glob("*.safetensors")) and not gguf_files(p) and not (p / "tokenizer.json").exists():
        tok = unpack_tokenizer("qwen3", Path(tempfile.gettempdir()) / "sftforge-bench-tokenizers")
        return [f"model.tokenizer_path={tok}"]
    return []


def bench(
    model_config: str | Path,
    data: str | Path,
    batches: list[int],
    steps: int = 3,
    micro: int = 2,
    with_trl: bool | None = None,
    overrides: list[str] | None = None,
    verbose: bool = False,
    print_fn=print,
    threads: int = 0,
    device: str = "cpu",
) -> list[dict]:
    with_trl = trl_available() if with_trl is None else with_trl
    base = [
        f"model.path={model_config}",
        *tokenizer_overrides(model_config),
        f"data.train_files={data}",
        f"data.micro_batch_size_per_gpu={micro}",
        "data.shuffle=false",
        "optim.weight_decay=0",  # (the trainers' decay groups differ: sftforge exempts tied embeddings, TRL does not)
        *(overrides or []),
    ]
    import torch

    from sftforge.config import load_config
    from sftforge.model import resolve_dtype

    dtype = resolve_dtype(load_config(None, base).model.dtype, device)
    threads = threads or os.cpu_count() or 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the probe runs on the threads the cases get
    try:
        peak, source = device_peak_flops(device, dtype)
    finally:
        torch.set_num_threads(before)
    where = f"{threads} threads" if device == "cpu" else device
    print_fn(
        f"model {model_config}, data {data}, micro-batch {micro}, {steps} timed steps after 1 warmup, {dtype}, "
        f"{where}; peak {peak / 1e9:,.1f} GFLOP/s ({source}); peak memory: "
        + ("the process's VmHWM" if device == "cpu" else "torch.cuda.max_memory_allocated")
    )
    if not with_trl:
        print_fn(f"TRL is not installed: sftforge rows only. For the comparison: {INSTALL_HINT}")
    rows = []
    for batch in batches:
        trainers = ["sftforge", *TRL_ROWS] if with_trl else ["sftforge"]
        for trainer in trainers:
            spec = {
                "trainer": trainer,
                "batch": batch,
                "steps": steps,
                "threads": threads,
                "device": device,
                "overrides": [*base, f"data.train_batch_size={batch}"],
            }
            t0 = time.perf_counter()
            result = run_case(spec, verbose)
            row = summarize(trainer, batch, result, peak)
            rows.append(row)
            print_fn(
                f"  {trainer} batch {batch}: {row['tokens_per_s']:,.0f} tokens/s ({time.perf_counter() - t0:.0f}s)"
            )
    print_fn(table(rows))
    losses = loss_table(rows)
    if losses:
        print_fn(losses)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "--model-config",
        dest="model",
        default=None,
        help="a real model (folder with weights, .gguf file, hub id) or a folder with only a config.json "
        "(random init, the vendored Qwen3 tokenizer); default: the qwen3-small shape. model.path=... works too",
    )
    p.add_argument("--data", default=None, help="conversations file (default: data/textcraft/train_react.parquet)")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16], help="global batch sizes (default 8 16)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after 1 warmup step (default 3)")
    p.add_argument("--micro", type=int, default=2, help="micro-batch size (default 2)")
    p.add_argument("--no-trl", action="store_true", help="sftforge rows only")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every case (default: all CPU cores)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N: where every case trains")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra sftforge config overrides")


def bench_main(args: argparse.Namespace) -> int:
    from sftforge.config import ModelConfig
    from sftforge.model import check_model_options

    named = [o.split("=", 1)[1] for o in args.overrides if o.startswith("model.path=")]
    if named and args.model:
        print("error: give the model once: --model or model.path=", file=sys.stderr)
        return 2
    model_config = (named[-1] if named else args.model) or FIXTURES / "model_configs" / "qwen3-small"
    overrides = [o for o in args.overrides if not o.startswith("model.path=")]
    gguf = [o.split("=", 1)[1] for o in overrides if o.startswith("model.gguf_file=")]
    check_model_options(ModelConfig(path=str(model_config), gguf_file=gguf[-1] if gguf else ""))  # exit 2 if wrong
    data = args.data or default_data()
    if not Path(data).exists():
        print(
            f"error: {data} does not exist (the default data is in a source checkout; give --data FILE)",
            file=sys.stderr,
        )
        return 2
    if args.no_trl:
        with_trl = False
    else:
        with_trl = trl_available()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is available; use --device cpu", file=sys.stderr)
            return 2
    rows = bench(
        model_config,
        data,
        args.batch,
        args.steps,
        args.micro,
        with_trl,
        overrides,
        threads=args.threads,
        device=args.device,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(json.loads(sys.argv[2]))
    else:
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(ap)
        sys.exit(bench_main(ap.parse_args()))
