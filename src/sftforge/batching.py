"""Batch arithmetic: which samples make up optimizer step N, on this rank, in which micro-batches.

data.train_batch_size is the GLOBAL number of sequences per optimizer step. Each data-parallel rank takes its share
(train_batch_size / dp world size), runs it as micro-batches of data.micro_batch_size_per_gpu sequences (gradient
accumulation = train_batch_size / (micro × world size)), and splits a micro-batch further when it exceeds
data.max_tokens_per_micro_batch. Epochs: the order of an epoch is a permutation seeded with trainer.seed + epoch (the
same on every rank and on resume); an incomplete last batch of an epoch is dropped (drop_last). ``sftforge plan``
uses the same functions, so the plan cannot disagree with the run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from sftforge.config import Config, ConfigError
from sftforge.packing import n_supervised, split_to_budget


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


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Sample indices of one epoch: a permutation seeded with seed + epoch (deterministic, same on every rank), as a
    read-only int32/int64 array (4 bytes a sample: millions of samples cost megabytes, not a tuple of ints)."""
    dtype = np.int32 if n < 2**31 else np.int64
    if not shuffle:
        order = np.arange(n, dtype=dtype)
    else:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g, dtype=torch.int32 if dtype == np.int32 else torch.int64).numpy()
    order.flags.writeable = False  # shared by the cache: nobody may shuffle it in place
    return order


@dataclass
class Plan:
    world_size: int
    rank: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    dropped_per_epoch: int


def event_count(total: int, freq: int) -> int:
    """Saves / validations / evals of a run of ``total`` steps: one at every multiple of ``freq`` plus one at the end
    (the trainer always does them at the last step); ``freq`` <= 0: only the one at the end."""
    if total <= 0:
        return 0
    if freq <= 0:
        return 1
    return total // freq + (1 if total % freq else 0)


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
    batch = [dataset[int(i)] for i in order[b * d.train_batch_size : (b + 1) * d.train_batch_size]]
    per_rank = d.train_batch_size // plan.world_size
    mine = batch[plan.rank * per_rank : (plan.rank + 1) * per_rank]
    micro = micro_batches(mine, d.micro_batch_size_per_gpu, d.max_tokens_per_micro_batch, d.packing)
    n_sup = sum(n_supervised(s) for s in batch)
    n_tok = sum(len(s.input_ids) for s in batch)
    return epoch, b, micro, n_sup, n_tok


def micro_batches(samples: list, micro_batch_size: int, max_tokens: int, packing: bool) -> list[list]:
    """``samples`` in groups of ``micro_batch_size``, each split further to stay under ``max_tokens``
    (data.max_tokens_per_micro_batch; 0 = no limit)."""
    lengths = [len(s.input_ids) for s in samples]
    return [[samples[i] for i in g] for g in micro_batch_groups(lengths, micro_batch_size, max_tokens, packing)]


def micro_batch_groups(lengths, micro_batch_size: int, max_tokens: int, packing: bool) -> list[list[int]]:
    """:func:`micro_batches` from the lengths alone: the indices of each micro-batch (no sample is read)."""
    out = []
    for k in range(0, len(lengths), micro_batch_size):
        for group in split_to_budget([int(n) for n in lengths[k : k + micro_batch_size]], max_tokens, packing):
            out.append([k + i for i in group])
    return out


__all__ = [
    "Plan",
    "epoch_order",
    "grad_accum_steps",
    "make_plan",
    "micro_batch_groups",
    "micro_batches",
    "step_micro_batches",
]
