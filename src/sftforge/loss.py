"""Cross-entropy on supervised positions only.

The decoder's final hidden states are gathered at the positions that have a target; the LM head runs only there, a
chunk at a time, and each chunk's logits are recomputed in the backward pass instead of being kept (memory is bounded
by chunk × vocabulary). The result is a SUM and a COUNT: the trainer divides by the global number of supervised
tokens of the whole optimizer step (all micro-batches, all ranks) — a mean of micro-batch means would weigh a token
of a short micro-batch more than one of a long micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sftforge.attention import hidden_states_inputs
from sftforge.packing import MicroBatch


def decoder_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the decoder computes in: autocast's when on, else its embedding's (under FSDP2 mixed precision,
    inside the root's forward, the gathered bf16 weight)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = emb.weight if emb is not None else next(model.parameters())  # (a module of one's own: its first)
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def hidden_states(model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
    """Final hidden states [B, L, H] from the model's decoder (no LM head, no patched forward); a micro-batch with
    images goes through the multimodal model under the LM head (vision tower, projector, then the decoder)."""
    inputs = hidden_states_inputs(model, batch.model_inputs(decoder_dtype(model)))
    decoder = multimodal_body(model) if "pixel_values" in inputs else model.get_decoder()
    out = decoder(**inputs, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def multimodal_body(model: torch.nn.Module) -> torch.nn.Module:
    """The module under the LM head of an image-text model (Qwen2.5-VL's ``model``: vision tower + language model),
    through a peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def supervised_rows(hidden: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [N, H], targets [N]) at the N supervised positions, gathered with the host-made index
    (:attr:`MicroBatch.supervised`): no device-to-host sync, N is known on the host."""
    index = batch.supervised_index()
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), batch.labels.reshape(-1).index_select(0, index)


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of -log softmax(logits)[target], as logsumexp - target logit (fp32 logits [N, V], every row
    supervised). Not F.cross_entropy: torch's CPU fp32 log_softmax accumulates its normalizer with a bias that grows
    with the vocabulary (SmolLM2's 49,152: the loss 9e-6 low relative to fp64 and the head's gradient 5e-5 off,
    against 1e-8 and 8e-7 here), which is what kept sftforge and TRL's chunked kernel from agreeing to fp32 noise."""
    return (torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)).sum()


def _chunk_ce(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    logits = F.linear(h, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return ce_sum(logits, y)


def supervised_ce(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    lm_head: torch.nn.Module,
    chunk_size: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum of cross-entropy of ``lm_head(hidden)`` against ``targets``; hidden is [N, H] (supervised rows only)."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    n = hidden.shape[0]
    if n == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph (and ranks' collectives) consistent
    if chunk_size <= 0 or chunk_size >= n:
        return _chunk_ce(hidden, targets, weight, bias, softcap)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, h, y, weight, bias, softcap, use_reentrant=False)
        else:
            total = total + _chunk_ce(h, y, weight, bias, softcap)
    return total


def loss_sum(model: torch.nn.Module, batch: MicroBatch, chunk_size: int = 0) -> tuple[torch.Tensor, int]:
    """(sum of CE over the micro-batch's supervised positions, number of those positions)."""
    if not has_fast_path(model):
        return full_logits_loss(model, batch)
    h, y = supervised_rows(hidden_states(model, batch), batch)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return supervised_ce(h, y, model.get_output_embeddings(), chunk_size, softcap), int(y.numel())


def has_fast_path(model: torch.nn.Module) -> bool:
    """Whether the loss can run the decoder alone and the LM head only at trained positions: the module has
    ``get_decoder()`` (forward -> last_hidden_state) and ``get_output_embeddings()`` (a Linear-like head)."""
    try:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return hasattr(model, "get_decoder") and model.get_decoder() is not None and hasattr(head, "weight")
    except (AttributeError, NotImplementedError):
        return False


def full_logits_loss(model: torch.nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, int]:
    """The loss of a module without the fast path (model.builder): ``model(input_ids, attention_mask,
    position_ids)`` returns logits (a tensor, an output with ``.logits``, or a tuple whose first item they are) for
    every position of a PADDED micro-batch (a packed row would need per-sample attention the module may not do)."""
    if batch.attention_mask is None or batch.attention_mask.dim() != 2:
        raise ValueError(
            "a module without get_decoder()/get_output_embeddings() takes padded micro-batches only: "
            "set data.packing=false."
        )
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None:
        logits = out[0]
    index = batch.supervised_index()
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, index).float()
    return ce_sum(rows, batch.labels.reshape(-1).index_select(0, index)), int(index.numel())


def _chunk_logp_entropy(h, y, weight, bias, softcap):
    logits = F.linear(h, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, y[:, None]).squeeze(-1) - logz
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)
    return logp, entropy


def supervised_logprobs(
    model: torch.nn.Module, batch: MicroBatch, chunk_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(target), entropy of π) at the micro-batch's trained positions, in row order — what the RL objective
    needs. Same gather-then-chunk path as :func:`loss_sum`: the LM head runs only at trained positions, and each chunk
    is recomputed in the backward pass."""
    h, y = supervised_rows(hidden_states(model, batch), batch)
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    n = h.shape[0]
    size = n if chunk_size <= 0 else chunk_size
    parts = []
    for start in range(0, max(n, 1), max(size, 1)):
        args = (h[start : start + size], y[start : start + size], weight, bias, softcap)
        if torch.is_grad_enabled() and size < n:
            parts.append(checkpoint(_chunk_logp_entropy, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logp_entropy(*args))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


__all__ = [
    "decoder_dtype",
    "full_logits_loss",
    "has_fast_path",
    "hidden_states",
    "loss_sum",
    "multimodal_body",
    "supervised_ce",
    "supervised_logprobs",
    "supervised_rows",
]
