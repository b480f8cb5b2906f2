"""Ulysses sequence parallelism (``trainer.sp_size``; verl's ``ulysses_sequence_parallel_size``).

The world is data parallel × sequence parallel: ranks ``k·sp … k·sp + sp - 1`` form SP group ``k`` (data-parallel rank
``k``). All ranks of an SP group collate the SAME packed micro-batch; each keeps one contiguous slice of the row
(:func:`shard`): its tokens, labels (already shifted over the whole row) and position ids. Everything in a decoder
layer but attention is per token, so it runs on the slice unchanged; RoPE reads the sliced position ids.

Attention needs the whole sequence. The attention function registered here (:func:`attention`, selected through the
model's ``config._attn_implementation``; the model's ``forward`` is not patched) turns q/k/v from
[B, heads, L/sp, D] into [B, heads/sp, L, D] with one all-to-all (scatter heads, gather sequence), runs scaled
dot-product attention over the full row with the full block-diagonal mask of the packed row, and turns the output back
with the inverse all-to-all. Key/value heads are repeated when there are fewer than sp (or not divisible by it), in a
way that keeps each query head with its own key/value head. Both all-to-alls are autograd functions whose backward is
the inverse all-to-all, so gradients flow to every rank's slice.

The loss of a rank is the CE sum over its slice's supervised tokens; summed over all ranks it is the sum over every
token once, and the trainer divides by the global supervised count as everywhere else. Gradients: the wrappers (DDP /
FSDP2) run over the whole world and the trainer scales their average into a sum, which adds the SP ranks' partial
gradients of the same micro-batch — the same gradient as one process.

When SP is off (``sp_size`` 1, or inside :func:`disabled`, e.g. generation), the function is plain sdpa on the tokens
it is given.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sftforge.config import ConfigError
from sftforge.packing import IGNORE_INDEX, MicroBatch

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
            f"trainer.sp_size={sp_size} needs data.packing=true: a packed row carries the block-diagonal mask of its "
            "samples, which attention over the gathered sequence uses."
        )
    unsupported = {t for t in (getattr(cfg, "layer_types", None) or []) if t != "full_attention"}
    if unsupported or getattr(cfg, "use_sliding_window", False):
        raise ConfigError(
            f"trainer.sp_size={sp_size}: layers of type {sorted(unsupported) or ['sliding_attention']} are not "
            "supported by sequence parallelism yet; set trainer.sp_size=1."
        )


def enable(model: torch.nn.Module, group, sp_size: int) -> None:
    """Register the attention function and select it for ``model``; slices are taken by :func:`shard`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # 2-D masks (generation) build like sdpa's
    _STATE.group, _STATE.size, _STATE.rank = group, sp_size, dist.get_rank(group) if group is not None else 0
    _STATE.active = sp_size > 1
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            c._original_attn_implementation = getattr(c, "_original_attn_implementation", c._attn_implementation)
            c._attn_implementation = NAME


def restore(model: torch.nn.Module) -> None:
    """Put the model's own attention implementation back (before export: the saved config names sdpa, not ours)."""
    for m in model.modules():
        c = getattr(m, "config", None)
        original = getattr(c, "_original_attn_implementation", None)
        if original is not None:
            c._attn_implementation = original
            del c._original_attn_implementation
    _STATE.active = False


@contextlib.contextmanager
def disabled():
    """Plain attention on the tokens given (every rank runs the full sequence), e.g. for generation."""
    was, _STATE.active = _STATE.active, False
    try:
        yield
    finally:
        _STATE.active = was


def active() -> bool:
    return _STATE.active and _STATE.size > 1


# ---- slicing a packed micro-batch ----------------------------------------------------------------------------------


def _padded_mask(mask: torch.Tensor, pad: int) -> torch.Tensor:
    """The [1, 1, L, L] mask grown by ``pad`` trailing positions that only see each other (causally)."""
    n = mask.shape[-1]
    if mask.dtype == torch.bool:
        out = torch.zeros(*mask.shape[:-2], n + pad, n + pad, dtype=torch.bool, device=mask.device)
        out[..., n:, n:] = torch.ones(pad, pad, dtype=torch.bool, device=mask.device).tril()
    else:  # additive float mask (eager)
        lo = torch.finfo(mask.dtype).min
        out = torch.full((*mask.shape[:-2], n + pad, n + pad), lo, dtype=mask.dtype, device=mask.device)
        out[..., n:, n:] = torch.full((pad, pad), lo, dtype=mask.dtype, device=mask.device).triu(1)
    out[..., :n, :n] = mask
    return out


def shard(mb: MicroBatch, sp_size: int | None = None, sp_rank: int | None = None) -> MicroBatch:
    """This SP rank's slice of a packed micro-batch ([1, L]); L is padded to a multiple of sp_size with ignored
    positions that attend only among themselves. The attention mask stays the full row's (attention runs on the
    gathered sequence)."""
    if sp_size is None and not active():
        return mb
    size = _STATE.size if sp_size is None else sp_size
    rank = _STATE.rank if sp_rank is None else sp_rank
    if size <= 1:
        return mb
    if mb.input_ids.shape[0] != 1 or mb.attention_mask is None or mb.attention_mask.ndim != 4:
        raise ValueError("sequence parallelism slices packed micro-batches ([1, L] with a 4-D mask) only.")
    n = mb.input_ids.shape[1]
    pad = -n % size
    ids, labels, pos, mask = mb.input_ids, mb.labels, mb.position_ids, mb.attention_mask
    if pad:
        ids = torch.cat([ids, ids.new_zeros(1, pad)], dim=1)
        labels = torch.cat([labels, labels.new_full((1, pad), IGNORE_INDEX)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype, device=pos.device)[None]], dim=1)
        mask = _padded_mask(mask, pad)
    k = (n + pad) // size
    cut = slice(rank * k, (rank + 1) * k)
    return replace(mb, input_ids=ids[:, cut], labels=labels[:, cut], position_ids=pos[:, cut], attention_mask=mask)


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


def _sdpa(module, q, k, v, mask, dropout: float, scaling: float | None) -> torch.Tensor:
    """Scaled dot-product attention with grouped key/value heads; [B, Hq, L, D] -> [B, L, Hq, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if mask is not None and mask.shape[-1] != k.shape[-2]:
        mask = mask[..., : k.shape[-2]]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None and q.shape[2] > 1
    )
    return out.transpose(1, 2).contiguous()


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """The attention interface transformers calls per layer: (output [B, L, H, D], None)."""
    dropout = dropout if module.training else 0.0
    if not active():
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling), None
    group = _STATE.group
    r = _repeat_kv_for(key.shape[1], _STATE.size)
    if r > 1:
        key, value = key.repeat_interleave(r, dim=1), value.repeat_interleave(r, dim=1)
    q, k, v = (seq_to_heads(t, group) for t in (query, key, value))
    out = _sdpa(module, q, k, v, attention_mask, dropout, scaling)  # [B, L, H/sp, D]
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
