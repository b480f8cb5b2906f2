"""``train(cfg)``: batches -> step -> log -> validate -> save, in one loop.

Batch arithmetic: data.train_batch_size is the GLOBAL number of sequences per optimizer step. Each rank takes its
share (train_batch_size / world_size), runs it as micro-batches of data.micro_batch_size_per_gpu sequences (gradient
accumulation = train_batch_size / (micro × world_size)), and splits a micro-batch further when it exceeds
data.max_tokens_per_micro_batch. Whatever the split, the loss of the step is the sum of CE over every supervised token
of the step divided by the number of those tokens in the whole global batch, so 1×8, 2×4 and packed give one loss.

Interruption: SIGTERM/SIGINT during the loop finishes the current optimizer step (all its micro-batches), writes a
checkpoint and ends the run with exit code 128+signal; the same command resumes from it exactly. A second signal stops
at once (the previous complete checkpoint stays usable).

Non-finite loss or gradient norm: checked before the optimizer step (on every rank); trainer.nan_policy=error stops
with an error naming the step and rank after saving the last good state, skip_step drops the update and counts it.

Epochs: the order of an epoch is a permutation seeded with trainer.seed + epoch (same on every rank and on resume);
an incomplete last batch of an epoch is dropped (drop_last) — the number is printed at the start.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sftforge import faults, ulysses
from sftforge.checkpoint import (
    child,
    clean_incomplete,
    gather_full_state_dict,
    load_any,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
    save_distributed_checkpoint,
)
from sftforge.config import Config, ConfigError, load_config, redacted, to_dict
from sftforge.evaluate import TrainingEval
from sftforge.lora import export_model, prepare_model
from sftforge.metrics import MetricsLogger, check_loggers
from sftforge.model import autocast, check_model_options, compute_dtype, load_model
from sftforge.optim import build_optimizer, lr_at, set_lr
from sftforge.packing import collate, n_supervised, padded_tokens, split_to_budget
from sftforge.parallel import (
    all_reduce_sum,
    barrier,
    build_mesh,
    build_sp_group,
    compile_layers,
    destroy,
    grad_scale,
    init_distributed,
    is_fsdp,
    local_device,
    no_grad_sync,
    parallelize,
    resolve_strategy,
    to_float,
)
from sftforge.ulysses import sp_group_layout


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm of a step is NaN/inf (trainer.nan_policy=error)."""


def world() -> tuple[int, int]:
    """(world_size, rank): the one place the trainer asks about distribution."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def grad_accum_steps(train_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    per_step = micro_batch_size * world_size
    if train_batch_size % per_step:
        lower = max(per_step, train_batch_size // per_step * per_step)
        divisors = [d for d in range(1, micro_batch_size + 1) if (train_batch_size // world_size) % d == 0]
        hint = f" or data.micro_batch_size_per_gpu={max(divisors)}" if train_batch_size % world_size == 0 else ""
        raise ConfigError(
            f"data.train_batch_size ({train_batch_size}) must be a multiple of data.micro_batch_size_per_gpu "
            f"({micro_batch_size}) × world size ({world_size}) = {per_step}. Fix: set data.train_batch_size={lower} "
            f"or {lower + per_step}{hint}."
        )
    return train_batch_size // per_step


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> tuple[int, ...]:
    """Sample indices of one epoch: a permutation seeded with seed + epoch (deterministic, same on every rank)."""
    if not shuffle:
        return tuple(range(n))
    g = torch.Generator().manual_seed(seed + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


@dataclass
class Plan:
    world_size: int
    rank: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    dropped_per_epoch: int


def make_plan(cfg: Config, n_samples: int, world_size: int = 1, rank: int = 0) -> Plan:
    d, t = cfg.data, cfg.trainer
    accum = grad_accum_steps(d.train_batch_size, d.micro_batch_size_per_gpu, world_size)
    spe = n_samples // d.train_batch_size
    if spe == 0:
        raise ConfigError(
            f"The training set has {n_samples} samples, fewer than data.train_batch_size ({d.train_batch_size}): "
            "lower data.train_batch_size or add data."
        )
    total = t.max_steps if t.max_steps > 0 else t.total_epochs * spe
    return Plan(world_size, rank, accum, spe, total, n_samples - spe * d.train_batch_size)


def step_micro_batches(dataset, step: int, cfg: Config, plan: Plan) -> tuple[int, int, list[list], int, int]:
    """(epoch, batch index in the epoch, this rank's micro-batches as sample lists, global supervised, global tokens)."""
    d = cfg.data
    epoch, b = divmod(step, plan.steps_per_epoch)
    order = epoch_order(len(dataset), cfg.trainer.seed, epoch, d.shuffle)
    batch = [dataset[i] for i in order[b * d.train_batch_size : (b + 1) * d.train_batch_size]]
    per_rank = d.train_batch_size // plan.world_size
    mine = batch[plan.rank * per_rank : (plan.rank + 1) * per_rank]
    micro = []
    for k in range(0, per_rank, d.micro_batch_size_per_gpu):
        chunk = mine[k : k + d.micro_batch_size_per_gpu]
        for group in split_to_budget([len(s.input_ids) for s in chunk], d.max_tokens_per_micro_batch, d.packing):
            micro.append([chunk[i] for i in group])
    n_sup = sum(n_supervised(s) for s in batch)
    n_tok = sum(len(s.input_ids) for s in batch)
    return epoch, b, micro, n_sup, n_tok


class _Runner:
    """Turns sample lists into a loss on the device; holds what every micro-batch needs."""

    def __init__(self, cfg: Config, engine, device, pad_id: int):
        # engine: the model under its strategy (parallel.parallelize), engine(micro_batch) -> (loss sum, count)
        self.cfg, self.model, self.device, self.pad_id = cfg, engine, device, pad_id

    def loss(self, samples) -> tuple[torch.Tensor, int]:
        c = self.cfg
        mb = collate(samples, c.data.packing, c.model.attn_implementation, self.pad_id, torch.float32).to(self.device)
        mb = ulysses.shard(mb)  # this rank's slice of the row under sequence parallelism (else mb itself)
        with autocast(c.model.dtype, self.device):
            return self.model(mb)

    @torch.no_grad()
    def validate(self, dataset, dp_size: int, dp_rank: int) -> float:
        """Token-weighted loss over every validation sample (sum of CE / number of supervised tokens)."""
        self.model.eval()
        d = self.cfg.data
        mine = [dataset[i] for i in range(dp_rank, len(dataset), dp_size)]
        groups = []
        for k in range(0, len(mine), d.micro_batch_size_per_gpu):
            chunk = mine[k : k + d.micro_batch_size_per_gpu]
            for group in split_to_budget([len(s.input_ids) for s in chunk], d.max_tokens_per_micro_batch, d.packing):
                groups.append([chunk[i] for i in group])
        total, count = 0.0, 0
        for k in range(_any_rank(len(groups)) if dp_size > 1 else len(groups)):
            # FSDP2 gathers weights in every forward: every rank runs as many as the busiest (extra ones count 0)
            s, n = self.loss(groups[k] if k < len(groups) else [dataset[0]])
            if k < len(groups):
                total, count = total + float(s), count + n
        total, count = all_reduce_sum(total, count)  # token-weighted over all ranks
        self.model.train()
        return total / max(count, 1)


def _any_rank(value: int) -> int:
    """The largest of ``value`` over all ranks, so that every rank takes the same decision."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())
    return value


def _nonfinite_ranks(loss_value: float, grad_norm: float, world_size: int, rank: int) -> list[int]:
    bad = torch.zeros(world_size, dtype=torch.int64)
    bad[rank] = int(not (math.isfinite(loss_value) and math.isfinite(grad_norm)))
    if world_size > 1:
        torch.distributed.all_reduce(bad)
    return [r for r in range(world_size) if bad[r]]


class _Signals:
    """Records the first SIGTERM/SIGINT while the loop runs (the loop acts on it after the optimizer step); a second
    one restores the default action and re-raises it, stopping the process at once."""

    def __init__(self):
        self.received = 0
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum  # no printing here: the handler may interrupt a write to the same stream

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _console():
    from rich.console import Console

    return Console()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; set trainer.device=auto or cpu.")
    return torch.device(name)


def _load_data(cfg: Config, tokenizer, train_dataset, val_dataset):
    from sftforge.data import build_dataset, load_tokenizer

    if tokenizer is None and (cfg.model.tokenizer_path or train_dataset is None):
        tokenizer = load_tokenizer(cfg)
    if train_dataset is None:
        train_dataset = build_dataset(cfg.data, tokenizer, cfg.data.train_files, key="data.train_files")
    if val_dataset is None and cfg.data.val_files:
        val_dataset = build_dataset(cfg.data, tokenizer, cfg.data.val_files, key="data.val_files")
    return tokenizer, train_dataset, val_dataset


def _eos_ids(tokenizer, cfg: Config) -> list[int]:
    if tokenizer is None:
        return []
    from sftforge.chat import end_of_turn_token_ids

    try:
        return end_of_turn_token_ids(tokenizer, cfg.data.chat_template_kwargs)
    except Exception:  # a tokenizer without a chat template: its eos only
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


# Keys that decide which samples make up step N or the learning rate of step N: changing them between a checkpoint
# and its resume silently changes the run, so the resume says so.
_RESUME_KEYS = ("data.train_batch_size", "data.shuffle", "trainer.seed", "trainer.max_steps", "trainer.total_epochs",
                "optim.lr", "optim.lr_scheduler", "optim.warmup_steps", "optim.warmup_ratio", "optim.min_lr_ratio")  # fmt: skip


def _resume_differences(ckpt: Path, cfg: Config) -> list[str]:
    saved_path = Path(ckpt) / "config.yaml"
    if not saved_path.exists():
        return []
    saved, now = yaml.safe_load(saved_path.read_text()) or {}, to_dict(cfg)
    out = []
    for key in _RESUME_KEYS:
        section, name = key.split(".")
        old, new = saved.get(section, {}).get(name), now[section][name]
        if old is not None and old != new:
            out.append(f"warning: {key} was {old!r} in {ckpt} and is {new!r} now; data order or schedule will differ.")
    return out


def train(cfg: Config, *, model=None, tokenizer=None, train_dataset=None, val_dataset=None) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary (step, loss, val_loss, output_dir, final_dir, stopped_early, ...).

    ``model``/``tokenizer``/``train_dataset``/``val_dataset`` may be passed in (datasets: any sequence of objects with
    input_ids and loss_mask); otherwise they are built from the config.
    """
    device = _device(cfg.trainer.device)
    created_group = init_distributed(device.type)  # under torchrun (WORLD_SIZE > 1)
    try:
        return _train(cfg, device, model, tokenizer, train_dataset, val_dataset)
    finally:
        if created_group:
            destroy()


def _train(cfg: Config, device, model, tokenizer, train_dataset, val_dataset) -> dict[str, Any]:
    t, o = cfg.trainer, cfg.optim
    world_size, rank = world()
    main = rank == 0
    device = local_device(device)
    check_loggers(t.logger)
    if model is None:
        check_model_options(cfg.model)  # before the (slow) data loading
    dp_size, sp_size = sp_group_layout(world_size, t.sp_size)
    dp_rank = rank // sp_size  # ranks k·sp … k·sp+sp-1 share data-parallel rank k (ulysses.py)
    grad_accum_steps(cfg.data.train_batch_size, cfg.data.micro_batch_size_per_gpu, dp_size)
    strategy = resolve_strategy(t.strategy, device, world_size)
    if t.offload and strategy != "fsdp2":
        raise ConfigError(f"trainer.offload=true needs trainer.strategy=fsdp2 (it is {strategy}).")
    if t.offload and device.type != "cuda":
        raise ConfigError("trainer.offload=true needs GPUs (on trainer.device=cpu all of it is in CPU memory).")
    out = Path(t.output_dir)
    saved_config = redacted(to_dict(cfg))
    tokenizer, train_ds, val_ds = _load_data(cfg, tokenizer, train_dataset, val_dataset)
    plan = make_plan(cfg, len(train_ds), dp_size, dp_rank)
    log_lines = list(getattr(getattr(train_ds, "report", None), "lines", list)())
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "metrics.jsonl", "final", "tensorboard"):
            child(out, name)  # refuse planted symlinks before training, not after
        for name in clean_incomplete(out):
            log_lines.append(f"removed {out / name}: left by an interrupted save")
        child(out, "config.yaml").write_text(yaml.safe_dump(saved_config, sort_keys=False))
    barrier()  # output_dir is prepared by rank 0 before anyone reads or writes it
    model = model if model is not None else load_model(cfg.model, device)
    model = prepare_model(model, cfg.model, console=_console() if main else None)  # LoRA / freezing
    torch.manual_seed(t.seed)  # dropout (e.g. LoRA's); a resume restores the checkpoint's RNG instead
    ulysses.check_model(model, sp_size, cfg.model.attn_implementation, cfg.data.packing)
    if sp_size > 1:
        ulysses.enable(model, build_sp_group(device, world_size, sp_size), sp_size)
    if cfg.model.compile:
        log_lines.append(f"model.compile: {compile_layers(model, cfg.model.compile_backend)} decoder layers compiled "
                         f"({cfg.model.compile_backend}); the first steps include the compilation")  # fmt: skip
    mesh = build_mesh(device, world_size)
    engine = parallelize(model, strategy, mesh, cfg.model.dtype, t.offload, cfg.model.loss_chunk_size)
    scale = grad_scale(engine, world_size)  # wrappers average gradients over ranks; the loss needs their sum
    optimizer = build_optimizer(model, o)
    pad_id = next((i for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                   if i is not None), 0)  # fmt: skip
    runner = _Runner(cfg, engine, device, pad_id)
    evaluator = TrainingEval(cfg, tokenizer) if t.eval_freq > 0 else None  # generation eval on data.eval_files
    start, prior_elapsed, skipped = 0, 0.0, 0
    ckpt = resolve_resume(t.resume, out)
    if ckpt is not None:
        state = load_any(ckpt, model, optimizer)
        start, prior_elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        skipped = int(state.get("skipped_steps", 0))
        for line in _resume_differences(ckpt, cfg):
            log_lines.append(line)
    stop = t.stop_at_step if start < t.stop_at_step < plan.total_steps else plan.total_steps
    log = MetricsLogger(out, t.logger, plan.total_steps, t.log_freq, start, saved_config, enabled=main)
    log.print(
        f"{len(train_ds)} samples, {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, grad accumulation "
        f"{plan.grad_accum}, world size {world_size}{f' = dp {dp_size} × sp {sp_size}' if sp_size > 1 else ''} "
        f"(trainer.strategy={strategy}); drop_last leaves out {plan.dropped_per_epoch} samples per epoch"
        + (f"; resumed from {ckpt} at step {start}" if ckpt is not None else "")
    )
    for line in log_lines:
        log.print(line)
    t0, run_tokens = time.perf_counter(), 0
    record: dict[str, Any] = {}
    val_loss = None

    def save(done: int) -> None:
        """step_<done>: the state after ``done`` optimizer steps; then keep-last-N. Collective with several
        processes (DCP: each rank writes its shards)."""
        epoch, index = divmod(done - 1, plan.steps_per_epoch)
        elapsed = prior_elapsed + time.perf_counter() - t0
        position = {"epoch": epoch, "index_in_epoch": index + 1, "elapsed_s": elapsed, "skipped_steps": skipped}
        if world_size > 1:
            save_distributed_checkpoint(out, done, model, optimizer, position, saved_config)
        elif main:
            save_checkpoint(out, done, model, optimizer, position, saved_config)
        if not main:
            return
        for p in prune_checkpoints(out, t.max_ckpt_to_keep):
            log.print(f"removed {p} (trainer.max_ckpt_to_keep={t.max_ckpt_to_keep})")

    interrupted = 0
    with _Signals() as signals:
        for step in range(start, stop):
            epoch, index, micro_batches, n_sup, n_tok = step_micro_batches(train_ds, step, cfg, plan)
            lr = lr_at(step, plan.total_steps, o)
            set_lr(optimizer, lr)
            step_loss = 0.0
            lens = [[len(s.input_ids) for s in samples] for samples in micro_batches]  # this rank's
            padding = 1 - sum(map(sum, lens)) / max(sum(padded_tokens(x, cfg.data.packing) for x in lens), 1)
            # every rank runs as many micro-batches as the busiest one (FSDP2 gathers weights in each forward; DDP
            # syncs on the last backward only); the extra ones are a repeat with weight 0
            n_micro = _any_rank(len(micro_batches)) if world_size > 1 else len(micro_batches)
            for m in range(n_micro):
                faults.before_micro_batch(step + 1, m)
                real = m < len(micro_batches)
                with no_grad_sync(engine, sync=m == n_micro - 1):
                    s, _ = runner.loss(micro_batches[m] if real else micro_batches[0])
                    # divided by the GLOBAL supervised count of the step; × world size undoes the wrappers' average
                    (s * (scale if real else 0.0) / max(n_sup, 1)).backward()
                step_loss += float(s.detach()) if real else 0.0
            (step_loss,) = all_reduce_sum(step_loss)  # the loss of the whole global batch, the same on every rank
            loss_value = step_loss / max(n_sup, 1)
            max_norm = o.clip_grad if o.clip_grad > 0 else float("inf")
            # DDP: gradients are already identical on all ranks; FSDP2: the norm of the sharded DTensors is global
            grad_norm = to_float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            bad_ranks = _nonfinite_ranks(loss_value, grad_norm, world_size, rank)
            if not bad_ranks:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if bad_ranks and t.nan_policy == "error":
                if step > start:
                    save(step)  # nothing since the last save or resume is lost
                kept = f"the state after step {step} is saved in {out / f'step_{step}'}" if step > start else (
                    "nothing was lost since the last checkpoint")  # fmt: skip
                raise NonFiniteError(
                    f"step {done}: the loss ({loss_value}) or gradient norm ({grad_norm}) is not finite on rank(s) "
                    f"{', '.join(map(str, bad_ranks))} (this is rank {rank}); the update was not applied and "
                    f"{kept}. Lower optim.lr, set optim.clip_grad, check the data of this step, or set "
                    "trainer.nan_policy=skip_step to skip such steps."
                )
            skipped += bool(bad_ranks)
            run_tokens += n_tok
            elapsed = prior_elapsed + time.perf_counter() - t0
            record = {"step": done, "epoch": epoch, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "tokens": n_tok, "supervised_tokens": n_sup, "padding_fraction": round(padding, 4),
                      "elapsed_s": round(elapsed, 4), "tokens_per_s": run_tokens / max(time.perf_counter() - t0, 1e-9)}  # fmt: skip
            if bad_ranks:
                record.update(skipped=True, skipped_steps=skipped)
                log.print(f"warning: step {done} skipped: loss {loss_value}, grad_norm {grad_norm} (nan_policy)")
            if val_ds is not None and ((t.test_freq > 0 and done % t.test_freq == 0) or done == plan.total_steps):
                val_loss = runner.validate(val_ds, dp_size, dp_rank)
                record["val_loss"] = val_loss
            if evaluator is not None and (done % t.eval_freq == 0 or done == plan.total_steps):
                with ulysses.disabled(model):  # generation: every rank attends over its own full sequences
                    record.update(evaluator(model))
                log.print(f"step {done}: eval {t.eval_task} accuracy {record['eval_accuracy']:.1%} on data.eval_files")
            log.log_step(record)
            saved = done == stop or (t.save_freq > 0 and done % t.save_freq == 0)
            if saved:
                save(done)
            interrupted = _any_rank(signals.received)
            if interrupted and done < stop:
                if not saved:
                    save(done)
                stop = done
                log.print(
                    f"{signal.Signals(interrupted).name}: stopped after step {done} with a checkpoint in "
                    f"{out / f'step_{done}'}; run the same command again to resume."
                )
                break
            interrupted = 0  # a signal during the last step: the run is complete anyway
    runtime = time.perf_counter() - t0
    finished = stop == plan.total_steps
    ulysses.restore(model)  # the exported config names the model's own attention
    final_dir = None
    if finished:
        # FSDP2: every rank takes part in the gather; rank 0 ends up with the full weights (LoRA: merged from them)
        full = gather_full_state_dict(model) if is_fsdp(engine) else None
        if main:
            final_dir = export_model(model, out / "final", tokenizer, _eos_ids(tokenizer, cfg), compute_dtype(cfg.model.dtype),
                                     adapter_dir=out / "final" / "adapter", base_path=cfg.model.path, state_dict=full)  # fmt: skip
        barrier()
    end = {"train_runtime_s": round(runtime, 4), "tokens": run_tokens, "tokens_per_s": run_tokens / max(runtime, 1e-9)}
    if skipped:
        end["skipped_steps"] = skipped
    if interrupted:
        end["interrupted_by"] = signal.Signals(interrupted).name
    log.close(end)
    return {"step": stop, "total_steps": plan.total_steps, "loss": record.get("loss"), "val_loss": val_loss,
            "stopped_early": not finished, "interrupted": interrupted, "skipped_steps": skipped, "output_dir": str(out), "final_dir": str(final_dir) if final_dir else None,
            "plan": dataclasses.asdict(plan), **end}  # fmt: skip


def train_main(path: str | None, overrides: list[str]) -> int:
    """Entry point of ``sftforge train``. With no config file and no model.path: the built-in CPU demo."""
    overrides = list(overrides or [])
    if path is None and not any(o.split("=", 1)[0].strip().lstrip("+") == "model.path" for o in overrides):
        from sftforge.demo import run_demo

        return run_demo(overrides)
    cfg = load_config(path, overrides)
    if cfg.trainer.preset == "auto":
        from sftforge.plan import apply_preset

        cfg = apply_preset(cfg, path, overrides)
    result = train(cfg)
    return 128 + result["interrupted"] if result["interrupted"] else 0


__all__ = [
    "NonFiniteError",
    "Plan",
    "epoch_order",
    "grad_accum_steps",
    "make_plan",
    "step_micro_batches",
    "train",
    "train_main",
    "world",
]
