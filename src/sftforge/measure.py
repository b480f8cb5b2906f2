"""``sftforge plan --measure``: a few real steps of the planned run on the machine at hand, timed.

The run is the user's own config with three changes: trainer.output_dir is a temporary folder (removed after, so
nothing is left behind but the data cache, which the real run then reuses), trainer.stop_at_step ends it after
2 warm-up steps + ``steps`` timed ones, and the one validation / generation eval / checkpoint it does are at that
last step, so each is timed once. From the step records (metrics.jsonl) and the clock around the run:

    startup   = from the process start to the first step (imports, data, model, engine)
    step      = mean time of the timed steps (the warm-up steps' extra time is added once)
    run       = startup + warm-up extra + total_steps x step + validations x val + evals x eval
                + checkpoints x save + the final export (timed as one save)

Peak memory: the GPU's peak allocated memory on CUDA (next to the plan's estimate, which counts the same things),
else the process's peak resident memory (which also holds the Python runtime and the data).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sftforge.config import Config
from sftforge.distributed import barrier, is_distributed, resolve_device, world
from sftforge.metrics import read_metrics
from sftforge.progress import duration
from sftforge.sft import train

WARMUP = 2
DEFAULT_STEPS = 10


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): the interpreter and import time the real run
    pays too."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return max(0.0, time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, StopIteration, IndexError):
        return 0.0


def measure(cfg: Config, plan: dict[str, Any], steps: int = 0, imports_s: float = 0.0) -> dict[str, Any]:
    """Run WARMUP + ``steps`` steps of ``cfg`` (fewer when the run is shorter) and extrapolate ``plan`` (plan.py's
    dict: total_steps, steps_per_epoch, num_checkpoints, num_validations, num_evals) to measured times.
    ``imports_s``: the interpreter and import time of a fresh process (:func:`process_age_s` at the command's start),
    which the real run pays before its own startup."""
    total, t = plan["total_steps"], cfg.trainer
    k = min(total, WARMUP + (steps if steps > 0 else DEFAULT_STEPS))
    if k <= WARMUP:
        k = total  # a run of 1-2 steps: time it whole
    distributed = is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    out = (
        Path(str(Path(t.output_dir)) + ".measure")
        if distributed
        else Path(tempfile.mkdtemp(prefix="sftforge-measure-"))
    )
    evals = t.eval_freq > 0 and bool(cfg.data.eval_files)
    trainer = dataclasses.replace(
        t,
        output_dir=str(out),
        stop_at_step=k if k < total else 0,
        logger=["jsonl"],
        max_ckpt_to_keep=1,
        test_freq=k,
        eval_freq=k if evals else 0,
        save_freq=0,
        resume="never",
    )
    run_cfg = dataclasses.replace(cfg, trainer=trainer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        result = train(run_cfg)
        wall = time.perf_counter() - t0
        records = [r for r in read_metrics(out / "metrics.jsonl") if "step" in r]
    finally:
        barrier()
        if not distributed or world()[0] == 0:
            shutil.rmtree(out, ignore_errors=True)
    elapsed = [0.0] + [r["elapsed_s"] for r in records]
    durations = [b - a for a, b in zip(elapsed, elapsed[1:])]
    timed = durations[WARMUP:] if len(durations) > WARMUP else durations
    step_s = sum(timed) / max(len(timed), 1)
    warm_extra = (
        max(0.0, sum(durations[:WARMUP]) - step_s * min(WARMUP, len(durations))) if len(durations) > WARMUP else 0.0
    )
    last = records[-1] if records else {}
    val_s, eval_s = float(last.get("val_s", 0.0)), float(last.get("eval_s", 0.0))
    # the checkpoint at the stop step is written after the last record (its elapsed_s) and inside train_runtime_s
    save_s = max(0.0, result["train_runtime_s"] - (last.get("elapsed_s", 0.0) + val_s + eval_s))
    startup_s = imports_s + max(0.0, wall - result["train_runtime_s"])
    n_val = plan.get("num_validations", 0)
    n_eval = plan.get("num_evals", 0)
    n_save = plan.get("num_checkpoints", 1)
    spe = plan["steps_per_epoch"]
    epoch_s = spe * step_s + (n_val * val_s + n_eval * eval_s) * spe / max(total, 1)
    run_s = startup_s + warm_extra + total * step_s + n_val * val_s + n_eval * eval_s + (n_save + 1) * save_s
    memory = max((r.get("memory_gb", 0.0) for r in records), default=0.0)
    return {
        "steps_run": len(records),
        "warmup_steps": min(WARMUP, len(records)),
        "step_s": round(step_s, 4),
        "step_s_min": round(min(timed), 4) if timed else None,
        "step_s_max": round(max(timed), 4) if timed else None,
        "warmup_extra_s": round(warm_extra, 3),
        "startup_s": round(startup_s, 3),
        "imports_s": round(imports_s, 3),
        "val_s": round(val_s, 3),
        "eval_s": round(eval_s, 3),
        "save_s": round(save_s, 3),
        "validations": n_val,
        "evals": n_eval,
        "checkpoints": n_save,
        "epoch_s": round(epoch_s, 2),
        "run_s": round(run_s, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in records[WARMUP:]) / max(sum(timed), 1e-9), 1),
        "peak_memory_gib": round(memory, 3),
        "memory_kind": "gpu" if resolve_device(t.device).type == "cuda" else "resident",
    }


def format_measured(m: dict[str, Any], plan: dict[str, Any]) -> str:
    mem = plan.get("memory") or {}
    est = f"{mem['total']:.2f} GiB estimated per GPU" if mem.get("total") is not None else "no estimate"
    kind = "GPU peak allocated" if m["memory_kind"] == "gpu" else "peak resident (CPU process: Python, torch, data)"
    extra = [
        f"validation {m['val_s']:.2f}s × {m['validations']}" if m["validations"] else "",
        f"eval {m['eval_s']:.2f}s × {m['evals']}" if m["evals"] else "",
        f"checkpoint {m['save_s']:.2f}s × {m['checkpoints']} + final export",
    ]
    return "\n".join(
        [
            f"measured here: {m['steps_run']} steps ({m['warmup_steps']} warm-up): {m['step_s']:.3f} s/step "
            f"(min {m['step_s_min']}, max {m['step_s_max']}), {m['tokens_per_s']:,.0f} tokens/s; "
            f"startup {m['startup_s']:.1f}s (imports, data, model); " + "; ".join(x for x in extra if x),
            f"measured time: {duration(m['epoch_s'])} per epoch, {duration(m['run_s'])} for the run "
            f"({plan['total_steps']} steps)",
            f"measured memory: {m['peak_memory_gib']:.2f} GiB {kind}; plan: {est}",
        ]
    )


__all__ = ["DEFAULT_STEPS", "WARMUP", "format_measured", "measure", "process_age_s"]
