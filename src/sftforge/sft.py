"""``train(cfg)``: SFT. The step (forward/backward over the micro-batches of a global batch) and its loop; the
lifecycle around it (output folder, model stack, resume, signals, non-finite guard, saves, export) is run.py.

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

Epochs: the order of an epoch is a permutation seeded with trainer.seed + epoch (batching.py; the same on every rank
and on resume); an incomplete last batch of an epoch is dropped (drop_last) — the number is printed at the start.

Validation and the generation eval: the loop asks :class:`LossValidator` (run.Validator's schedule: trainer.test_freq,
trainer.val_before_train, the last step) and :class:`GenerationEval` (trainer.eval_freq, the last step) after each
step; each decides whether it runs, and its numbers join the step's record.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any

import numpy as np
import torch

from sftforge import faults, ulysses
from sftforge.attention import resolve_tree_attention
from sftforge.batching import Plan, grad_accum_steps, make_plan, micro_batch_groups, step_micro_batches
from sftforge.config import Config, ConfigError
from sftforge.data import build_dataset, load_tokenizer
from sftforge.distributed import Lockstep, all_reduce_sum
from sftforge.evaluation import TrainingEval
from sftforge.generation import pad_id
from sftforge.metrics import check_loggers
from sftforge.model import autocast, compute_dtype
from sftforge.optim import lr_at, set_lr
from sftforge.packing import collate, padded_tokens
from sftforge.parallel import grad_scale, no_grad_sync, unsharded
from sftforge.progress import peak_memory_gb
from sftforge.run import NonFiniteError, Run, Signals, Validator, check_paths, clip_gradients, data_fingerprint
from sftforge.ulysses import sp_group_layout
from sftforge.vision import load_vision


class Runner:
    """Turns sample lists into a loss on the device; holds what every micro-batch needs."""

    def __init__(self, cfg: Config, engine, device, pad_id: int, world_size: int, vision=None):
        # engine: the model under its strategy (parallel.build_engine), engine(micro_batch) -> (loss sum, count)
        self.cfg, self.model, self.device, self.pad_id, self.world_size = cfg, engine, device, pad_id, world_size
        self.scale = grad_scale(engine, world_size)  # wrappers average gradients over ranks; the loss needs their sum
        self.mask_dtype = compute_dtype(cfg.model.dtype)  # an eager L × L mask in the compute dtype: never cast again
        self.vision = vision  # a vision-language model's image settings: micro-batches with images get their pixels
        per_turn = cfg.data.reasoning_history == "per_turn" and cfg.model.attn_implementation == "sdpa"
        self.tree_attention = resolve_tree_attention(cfg.model.tree_attention, device) if per_turn else "mask"

    def loss(self, samples) -> tuple[torch.Tensor, int]:
        c = self.cfg
        if self.vision is not None and self.world_size > 1 and not any(getattr(s, "images", None) for s in samples):
            samples = [*samples, self.vision.blank_sample()]  # every rank runs the vision tower (vision.py)
        mb = collate(
            samples,
            c.data.packing,
            c.model.attn_implementation,
            self.pad_id,
            self.mask_dtype,
            self.vision,
            self.tree_attention,
        )
        mb = ulysses.shard(mb).to(self.device)  # this rank's slice of the row under sequence parallelism, on the host
        with autocast(c.model.dtype, self.device):
            return self.model(mb)

    def forward_backward(self, step: int, micro: list[list], n_sup: int) -> float:
        """Backward of every micro-batch of this rank; returns the loss of the whole global batch (every rank)."""
        sums = []  # on the device: read once after the last backward, not after each (a host sync per micro-batch)
        # as many micro-batches as the busiest rank (a forward is a collective under FSDP2, DDP syncs on the last
        # backward); a repeat of the first one, with weight 0, fills up
        steps = Lockstep(micro, self.world_size, lambda: micro[0])
        for m, samples, real in steps:
            faults.before_micro_batch(step + 1, m)
            with no_grad_sync(self.model, sync=steps.last(m)):
                s, _ = self.loss(samples)
                # divided by the GLOBAL supervised count of the step; × world size undoes the wrappers' average
                (s * (self.scale if real else 0.0) / max(n_sup, 1)).backward()
            if real:
                sums.append(s.detach().float())
        (total,) = all_reduce_sum(float(torch.stack(sums).sum()) if sums else 0.0)
        return total / max(n_sup, 1)

    @torch.no_grad()
    def validate(self, dataset, dp_size: int, dp_rank: int) -> float:
        """Token-weighted loss over every validation sample (sum of CE / number of supervised tokens)."""
        self.model.eval()
        d = self.cfg.data
        mine = range(dp_rank, len(dataset), dp_size)  # read a micro-batch at a time (the store stays on disk)
        own = getattr(dataset, "lengths", None)
        lengths = [own[i] for i in mine] if own is not None else [len(dataset[i].input_ids) for i in mine]
        groups = micro_batch_groups(lengths, d.micro_batch_size_per_gpu, d.max_tokens_per_micro_batch, d.packing)
        total, count = 0.0, 0
        for _, group, real in Lockstep(groups, dp_size):  # a repeat (a rank with fewer groups) counts 0
            s, n = self.loss([dataset[mine[j]] for j in group] if real else [dataset[0]])
            if real:
                total, count = total + float(s), count + n
        total, count = all_reduce_sum(total, count)  # token-weighted over all ranks
        self.model.train()
        return total / max(count, 1)


class LossValidator(Validator):
    """SFT's validation: the token-weighted loss on data.val_files (:meth:`Runner.validate`); after a step it goes
    into the step's record (``val_loss``, ``val_s``), before training into a validation event of its own."""

    def __init__(self, run: Run, total: int, runner: Runner, dataset, dp_size: int, dp_rank: int):
        super().__init__(run, total, dataset is not None)
        self.runner, self.dataset, self.dp_size, self.dp_rank = runner, dataset, dp_size, dp_rank

    def measure(self, done: int) -> dict[str, Any]:
        return {"val_loss": self.runner.validate(self.dataset, self.dp_size, self.dp_rank)}

    def report(self, done: int, numbers: dict[str, Any], record: dict[str, Any] | None) -> None:
        if record is not None:
            record.update(numbers)
        else:
            self.run.log.log_validation(
                done, numbers, f"validation before step {done + 1}: val_loss {numbers['val_loss']:.4f}"
            )


class GenerationEval:
    """The generation eval on data.eval_files (evaluation.TrainingEval) every trainer.eval_freq steps and after the
    last step (none when trainer.eval_freq is 0): it generates with the HF model under the engine, with sequence
    parallelism off and FSDP2's weights gathered, so that every rank runs its own full sequences; its numbers and
    ``eval_s`` go into the step's record, every sample's result into eval/step_<N>.jsonl (rank 0), its accuracy to
    the console."""

    def __init__(self, run: Run, total: int, model, engine, tokenizer):
        self.run, self.total, self.model, self.engine = run, total, model, engine
        self.freq = run.cfg.trainer.eval_freq
        self.evaluate = TrainingEval(run.cfg, tokenizer) if self.freq > 0 else None

    def due(self, done: int) -> bool:
        return self.evaluate is not None and (done % self.freq == 0 or done == self.total)

    def after_step(self, done: int, record: dict[str, Any]) -> None:
        if not self.due(done):
            return
        r = self.run
        t0 = time.perf_counter()
        with ulysses.disabled(self.model), unsharded(self.engine):  # generation: every rank on its own sequences
            record.update(self.evaluate(self.model, r.out / "eval" / f"step_{done}.jsonl" if r.main else None))
        record["eval_s"] = round(time.perf_counter() - t0, 4)
        r.log.print(f"step {done}: eval {self.evaluate.task} accuracy {record['eval_accuracy']:.1%} on data.eval_files")


def load_data(cfg: Config, tokenizer, train_dataset, val_dataset):
    """(tokenizer, train, val, vision): what is not given is built from the config; vision: the image settings of a
    vision-language model (vision.py), else None."""
    if tokenizer is None and (cfg.model.tokenizer_path or train_dataset is None):
        tokenizer = load_tokenizer(cfg)
    vision = load_vision(cfg, tokenizer) if tokenizer is not None else None
    if train_dataset is None:
        train_dataset = build_dataset(cfg.data, tokenizer, cfg.data.train_files, "data.train_files", vision)
    if val_dataset is None and cfg.data.val_files:
        val_dataset = build_dataset(cfg.data, tokenizer, cfg.data.val_files, "data.val_files", vision)
    return tokenizer, train_dataset, val_dataset, vision


def train(cfg: Config, *, model=None, tokenizer=None, train_dataset=None, val_dataset=None) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary (step, loss, val_loss, output_dir, final_dir, stopped_early, ...).

    ``model``/``tokenizer``/``train_dataset``/``val_dataset`` may be passed in (datasets: any sequence of objects with
    input_ids and loss_mask); otherwise they are built from the config.
    """
    with Run(cfg) as run:
        return _train(run, model, tokenizer, train_dataset, val_dataset)


def _train(run: Run, model, tokenizer, train_dataset, val_dataset) -> dict[str, Any]:
    cfg, t, o = run.cfg, run.cfg.trainer, run.cfg.optim
    check_loggers(t.logger)
    check_paths(cfg, model=model is None)  # before the (slow) model and data loading
    dp_size, sp_size = sp_group_layout(run.world_size, t.sp_size)
    dp_rank = run.rank // sp_size  # ranks k·sp … k·sp+sp-1 share data-parallel rank k (ulysses.py)
    grad_accum_steps(cfg.data.train_batch_size, cfg.data.micro_batch_size_per_gpu, dp_size)
    strategy = run.strategy()
    tokenizer, train_ds, val_ds, vision = load_data(cfg, tokenizer, train_dataset, val_dataset)
    if vision is not None and sp_size > 1:
        raise ConfigError(
            f"trainer.sp_size={sp_size}: sequence parallelism does not split a vision-language model's "
            "3-D positions and images yet; set trainer.sp_size=1."
        )
    plan = make_plan(cfg, len(train_ds), dp_size, dp_rank)
    run.lines.extend(getattr(getattr(train_ds, "report", None), "lines", list)())
    if hasattr(train_ds, "describe"):
        run.lines.append(train_ds.describe())
    run.prepare_output()
    run.write_json("data_report.json", data_summary(train_ds, val_ds, cfg))
    run.write_json("plan.json", _plan_json(run, plan, len(train_ds), dp_size, sp_size, strategy))
    model, engine, optimizer = run.build(model, sp_size=sp_size)
    runner = Runner(cfg, engine, run.device, pad_id(tokenizer), run.world_size, vision)
    evaluator = GenerationEval(run, plan.total_steps, model, engine, tokenizer)
    checkpointer = run.checkpointer(lambda done: _position(done, plan), tokenizer)
    start = run.resume(checkpointer, data_fingerprint(train_ds))
    stop = run.stop_step(start, plan.total_steps)
    sp = f" = dp {dp_size} × sp {sp_size}" if sp_size > 1 else ""
    run.open_log(
        plan.total_steps,
        start,
        f"{len(train_ds)} samples, {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, grad accumulation "
        f"{plan.grad_accum}, world size {run.world_size}{sp} (trainer.strategy={strategy}); drop_last leaves out "
        f"{plan.dropped_per_epoch} samples per epoch",
    )
    validator = LossValidator(run, plan.total_steps, runner, val_ds, dp_size, dp_rank)
    validator.before_train(start)
    run_tokens, record, interrupted = 0, {}, 0
    with Signals() as signals:
        for step in range(start, stop):
            epoch, _, micro, n_sup, n_tok = step_micro_batches(train_ds, step, cfg, plan)
            lr = lr_at(step, plan.total_steps, o)
            set_lr(optimizer, lr)
            loss = runner.forward_backward(step, micro, n_sup)
            grad_norm = clip_gradients(model, o.clip_grad)
            applied = run.guard.ok(step, loss, grad_norm)
            if applied:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            run_tokens += n_tok
            record = _record(done, epoch, loss, lr, grad_norm, micro, n_sup, n_tok, run, run_tokens, cfg)
            if not applied:
                record.update(skipped=True, skipped_steps=run.guard.skipped)
            validator.after_step(done, record)
            evaluator.after_step(done, record)
            interrupted = run.end_step(record, signals, checkpointer, done, stop)
            if interrupted:
                stop = done
                break
    runtime = run.runtime()
    finished = stop == plan.total_steps
    end = {"train_runtime_s": round(runtime, 4), "tokens": run_tokens, "tokens_per_s": run_tokens / max(runtime, 1e-9)}
    if interrupted:
        end["interrupted_by"] = signal.Signals(interrupted).name
    final_dir = run.finish(tokenizer, finished, end)
    return {
        "step": stop,
        "total_steps": plan.total_steps,
        "loss": record.get("loss"),
        "val_loss": validator.last.get("val_loss"),
        "stopped_early": not finished,
        "interrupted": interrupted,
        "skipped_steps": run.guard.skipped,
        "output_dir": str(run.out),
        "final_dir": str(final_dir) if final_dir else None,
        "plan": dataclasses.asdict(plan),
        **end,
    }


def _plan_json(run: Run, plan: Plan, samples: int, dp_size: int, sp_size: int, strategy: str) -> dict[str, Any]:
    """plan.json of an SFT run: batching.Plan, the sample count and the layout."""
    layout = {"dp_size": dp_size, "sp_size": sp_size, "strategy": strategy, "device": str(run.device)}
    return {**dataclasses.asdict(plan), "samples": samples, **layout}


def _position(done: int, plan: Plan) -> dict[str, int]:
    epoch, index = divmod(done - 1, plan.steps_per_epoch)
    return {"epoch": epoch, "index_in_epoch": index + 1}


def _record(done, epoch, loss, lr, grad_norm, micro, n_sup, n_tok, run: Run, run_tokens, cfg) -> dict[str, Any]:
    lens = [[len(s.input_ids) for s in samples] for samples in micro]  # this rank's
    padding = 1 - sum(map(sum, lens)) / max(sum(padded_tokens(x, cfg.data.packing) for x in lens), 1)
    return {
        "step": done,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": n_tok,
        "supervised_tokens": n_sup,
        "padding_fraction": round(padding, 4),
        "elapsed_s": round(run.elapsed(), 4),
        "tokens_per_s": run_tokens / max(run.runtime(), 1e-9),
        "memory_gb": round(peak_memory_gb(run.device), 3),
    }


def data_summary(train_ds, val_ds, cfg: Config) -> dict[str, Any]:
    """What data_report.json holds (for sftforge report): each split's DataReport, its files and its length
    histogram (tokens per sample after truncation)."""
    out = {}
    for name, ds, files in (("train", train_ds, cfg.data.train_files), ("val", val_ds, cfg.data.val_files)):
        if ds is None:
            continue
        report = getattr(ds, "report", None)
        lengths = np.asarray(ds.lengths if hasattr(ds, "lengths") else [len(s.input_ids) for s in ds], np.int64)
        counts, edges = np.histogram(lengths, bins=min(20, max(1, len(np.unique(lengths)))))
        out[name] = {
            "files": files,
            "report": dataclasses.asdict(report) if dataclasses.is_dataclass(report) else None,
            "samples": int(len(lengths)),
            "tokens": int(lengths.sum()),
            "lengths": {
                "min": int(lengths.min()),
                "median": float(np.median(lengths)),
                "max": int(lengths.max()),
                "mean": float(lengths.mean()),
                "counts": counts.tolist(),
                "edges": edges.tolist(),
            },
        }
    return out


__all__ = ["GenerationEval", "LossValidator", "NonFiniteError", "Runner", "load_data", "train"]
