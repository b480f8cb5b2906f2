"""Ulysses sequence parallelism (``trainer.sp_size``; verl's ``ulysses_sequence_parallel_size``).

The world is data parallel × sequence parallel: ranks ``k·sp … k·sp + sp - 1`` form SP group ``k`` (data-parallel rank
``k``). All ranks of an SP group collate the SAME packed micro-batch; each keeps one contiguous slice of the row
(:func:`shard`): its tokens, labels (already shifted over the whole row) and position ids. Everything in a decoder
layer but attention is per token, so it runs on the slice unchanged; RoPE reads the sliced position ids.

Attention needs the whole sequence. The attention function registered here (:func:`attention`, selected through the
model's ``config._attn_implementation``; the model's ``forward`` is not patched) turns q/k/v from
[B, heads, L/sp, D] into [B, heads/sp, L, D] with one all-to-all (scatter heads, gather sequence), runs causal
scaled dot-product attention on each sample of the packed row separately (the samples' boundaries travel with the
micro-batch as ``sp_cu_seqlens``; no L × L mask exists, so memory grows with L, not L²), and turns the output back
with the inverse all-to-all. Key/value heads are repeated when there are fewer than sp (or not divisible by it), in a
way that keeps each query head with its own key/value head. Both all-to-alls are autograd functions whose backward is
the inverse all-to-all, so gradients flow to every rank's slice.

The loss of a rank is the CE sum over its slice's supervised tokens; summed over all ranks it is the sum over every
token once, and the trainer divides by the global supervised count as everywhere else. Gradients: the wrappers (DDP /
FSDP2) run over the whole world and the trainer scales their average into a sum, which adds the SP ranks' partial
gradients of the same micro-batch — the same gradient as one process.

Inside :func:`disabled` (generation during training) the model's own attention implementation is back in place.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from sftforge.attention import causal_per_sample
from sftforge.config import ConfigError
from sftforge.packing import IGNORE_INDEX, MicroBatch, boundaries

NAME = "sftforge_ulysses"
SUPPORTED_INNER = ("sdpa", "eager")


@dataclass
class _State:
    group: object = None  # the SP process group of this rank
    size: int = 1
    rank: int = 0
    active: bool = False


_STATE = _State()


def sp_group_layout(world_size: int, sp_size: int) -> tuple[int, int]:
    """(data-parallel size, SP size); an error naming the numbers when sp_size does not divide the world."""
    if sp_size < 1:
        raise ConfigError(f"trainer.sp_size must be >= 1, got {sp_size}.")
    if world_size % sp_size:
        raise ConfigError(
            f"trainer.sp_size={sp_size} must divide the world size ({world_size} processes): ranks form data-parallel "
            f"groups of sp_size. Launch a multiple of {sp_size} processes or set trainer.sp_size to a divisor of "
            f"{world_size}."
        )
    return world_size // sp_size, sp_size


def check_model(model: torch.nn.Module, sp_size: int, attn_implementation: str, packing: bool) -> None:
    """Clear errors for what SP cannot run: heads not divisible, an attention it does not wrap, unpacked batches."""
    if sp_size <= 1:
        return
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads is None:
        raise ConfigError(
            f"trainer.sp_size={sp_size}: the model config has no num_attention_heads; SP cannot split it."
        )
    if heads % sp_size:
        raise ConfigError(
            f"trainer.sp_size={sp_size} must divide the model's num_attention_heads ({heads}): each SP rank computes "
            f"attention for heads/sp_size heads. Use an sp_size that divides {heads}."
        )
    if heads % math.lcm(kv, sp_size):
        raise ConfigError(
            f"trainer.sp_size={sp_size} with {heads} query and {kv} key/value heads: the key/value heads cannot be "
            "split or repeated evenly over the SP ranks. Use an sp_size that divides or is a multiple of "
            f"{kv} and divides {heads}."
        )
    if attn_implementation not in SUPPORTED_INNER:
        raise ConfigError(
            f"trainer.sp_size={sp_size} supports model.attn_implementation={' | '.join(SUPPORTED_INNER)} (got "
            f"{attn_implementation!r}); set model.attn_implementation=sdpa."
        )
    if not packing:
        raise ConfigError(
            f"trainer.sp_size={sp_size} needs data.packing=true: SP slices one packed row of samples placed back to "
            "back and attends within each sample of the gathered row."
        )
    unsupported = {t for t in (getattr(cfg, "layer_types", None) or []) if t != "full_attention"}
    if unsupported or getattr(cfg, "use_sliding_window", False):
        raise ConfigError(
            f"trainer.sp_size={sp_size}: layers of type {sorted(unsupported) or ['sliding_attention']} are not "
            "supported by sequence parallelism yet; set trainer.sp_size=1."
        )


def _configs(model: torch.nn.Module) -> list:
    seen, out = set(), []
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation") and id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def _select(model: torch.nn.Module, name: str | None) -> None:
    """Set every config of ``model`` to attention ``name`` (None: back to the model's own, remembered by enable)."""
    for c in _configs(model):
        if name is None:
            c._attn_implementation = c._sftforge_own_attn
        else:
            c._sftforge_own_attn = getattr(c, "_sftforge_own_attn", c._attn_implementation)
            c._attn_implementation = name


def enable(model: torch.nn.Module, group, sp_size: int) -> None:
    """Register the attention function and select it for ``model``; slices are taken by :func:`shard`.

    No mask function is registered under this name, so transformers hands the attention no mask (early exit of its
    mask creation); the samples' boundaries come as ``sp_cu_seqlens``."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
    _STATE.group, _STATE.size, _STATE.rank = group, sp_size, dist.get_rank(group) if group is not None else 0
    _STATE.active = sp_size > 1
    _select(model, NAME)


def restore(model: torch.nn.Module) -> None:
    """Put the model's own attention implementation back (before export: the saved config names sdpa, not ours) and
    drop the SP process group, so that parallel.destroy can free it (a group alive at interpreter exit can abort)."""
    if _STATE.active:
        _select(model, None)
    _STATE.active, _STATE.group, _STATE.size, _STATE.rank = False, None, 1, 0


@contextlib.contextmanager
def disabled(model: torch.nn.Module):
    """The model's own attention on full sequences while inside (generation during training)."""
    if not _STATE.active:
        yield
        return
    _select(model, None)
    _STATE.active = False
    try:
        yield
    finally:
        _STATE.active = True
        _select(model, NAME)


def active() -> bool:
    return _STATE.active and _STATE.size > 1


# ---- slicing a packed micro-batch ----------------------------------------------------------------------------------


def shard(mb: MicroBatch, sp_size: int | None = None, sp_rank: int | None = None) -> MicroBatch:
    """This SP rank's slice of a packed micro-batch ([1, L]); L is padded to a multiple of sp_size with ignored
    positions (a sample of their own). The row's sample boundaries go along as ``extra["sp_cu_seqlens"]`` (attention
    runs per sample on the gathered sequence); the L × L mask is dropped."""
    if sp_size is None and not active():
        return mb
    size = _STATE.size if sp_size is None else sp_size
    rank = _STATE.rank if sp_rank is None else sp_rank
    if size <= 1:
        return mb
    n = mb.input_ids.shape[1]
    if mb.input_ids.shape[0] != 1 or sum(mb.seq_lens) != n:
        raise ValueError("sequence parallelism slices packed micro-batches ([1, L], samples back to back) only.")
    pad = -n % size
    ids, labels, pos = mb.input_ids, mb.labels, mb.position_ids
    lens = list(mb.seq_lens)
    if pad:
        ids = torch.cat([ids, ids.new_zeros(1, pad)], dim=1)
        labels = torch.cat([labels, labels.new_full((1, pad), IGNORE_INDEX)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype, device=pos.device)[None]], dim=1)
        lens.append(pad)
    cu = boundaries(lens)
    k = (n + pad) // size
    cut = slice(rank * k, (rank + 1) * k)
    extra = {key: v for key, v in mb.extra.items() if not key.startswith(("cu_seq_lens", "max_length", "packed_cu"))}
    extra["sp_cu_seqlens"] = torch.tensor(cu, dtype=torch.int64)  # on the host; a tensor: see attention.py
    return replace(
        mb,
        input_ids=ids[:, cut],
        labels=labels[:, cut],
        position_ids=pos[:, cut],
        attention_mask=None,
        extra=extra,
        supervised=None,
    )


# ---- the all-to-all and the attention function ----------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = dist.get_world_size(group)
    inputs = [t.contiguous() for t in x.chunk(n, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(n)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Scatter ``scatter_dim`` over the SP ranks and gather ``gather_dim``; the backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H, L/sp, D] (all heads, my slice) -> [B, H/sp, L, D] (my heads, the whole sequence)."""
    return _AllToAll.apply(x, group, 1, 2)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H/sp, L, D] -> [B, H, L/sp, D]."""
    return _AllToAll.apply(x, group, 2, 1)


def _repeat_kv_for(kv_heads: int, sp_size: int) -> int:
    """How many times to repeat each key/value head so that their number divides evenly over the SP ranks."""
    return math.lcm(kv_heads, sp_size) // kv_heads


def attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sp_cu_seqlens: torch.Tensor | None = None,
    **kwargs,
):
    """The attention interface transformers calls per layer: (output [B, L/sp, H, D], None)."""
    if not active() or sp_cu_seqlens is None:
        raise RuntimeError(
            "sftforge's sequence-parallel attention ran without its micro-batch slice (ulysses.shard); call the model "
            "through the trainer, or inside ulysses.disabled(model) for generation."
        )
    dropout = dropout if module.training else 0.0
    group = _STATE.group
    r = _repeat_kv_for(key.shape[1], _STATE.size)
    if r > 1:
        key, value = key.repeat_interleave(r, dim=1), value.repeat_interleave(r, dim=1)
    q, k, v = (seq_to_heads(t, group) for t in (query, key, value))  # [B, H/sp, L, D]
    out = causal_per_sample(q, k, v, sp_cu_seqlens, dropout, scaling)  # [B, L, H/sp, D]
    out = heads_to_seq(out.transpose(1, 2), group)  # [B, H, L/sp, D]
    return out.transpose(1, 2).contiguous(), None


__all__ = [
    "NAME",
    "active",
    "attention",
    "check_model",
    "disabled",
    "enable",
    "heads_to_seq",
    "restore",
    "seq_to_heads",
    "shard",
    "sp_group_layout",
]
