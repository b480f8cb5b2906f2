"""``sftforge plan``: the numbers of a run before it spends a GPU — data, batches, steps, memory, warnings.

The batch and schedule arithmetic is the trainer's own (:func:`sftforge.batching.make_plan`,
:func:`sftforge.batching.grad_accum_steps`, :func:`sftforge.optim.warmup_steps`), so the plan cannot disagree with the
run. The memory estimate is per GPU and counts, from the model's config.json alone (no weights are read):

* parameters: fp32 master weights (model.dtype=bf16 is bf16 autocast over fp32 weights), plus the bf16 copies
  autocast keeps for the step;
* gradients (fp32) and AdamW's two fp32 moments, for the trainable parameters;
* activations saved for the backward pass, per layer and per token of the micro-batch (only the layer inputs plus one
  layer when model.enable_gradient_checkpointing), an L × L attention mask where one is built (padded rows, eager
  packing; packed sdpa and flash have none), and a backward workspace;
* logits: the LM head runs only on supervised positions, model.loss_chunk_size at a time, recomputed in the
  backward pass, so only one chunk × vocabulary of logits (and its gradients) is alive at once.

With FSDP2 over S ranks (trainer.strategy=fsdp2, or auto with several GPUs) the weights, gradients and optimizer state
are 1/S per GPU, plus the gathered full weights of the layers in flight (two decoder layers: the current one and the
prefetched next) and of the root (embeddings, LM head). With Ulysses sequence parallelism (trainer.sp_size) every
per-token term is for the rank's 1/sp slice of the micro-batch, while the packed row's attention mask stays whole
(attention runs on the gathered sequence). benchmarks/memory_estimate.py compares the estimate with measured peaks
(docs/plan.md); benchmarks/long_context.py gives the longest sequence that fits per sp_size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sftforge.batching import event_count, grad_accum_steps, make_plan
from sftforge.chat import render_prompt
from sftforge.config import AlgorithmConfig, Config, ConfigError, RolloutConfig, load_config, parse_memory
from sftforge.data import build_dataset, load_tokenizer
from sftforge.evaluation import file_rows
from sftforge.measure import DEFAULT_STEPS, WARMUP, format_measured, process_age_s
from sftforge.measure import measure as run_measure
from sftforge.metrics import check_loggers
from sftforge.model import auto_class
from sftforge.model_files import pretrained_args
from sftforge.optim import warmup_steps
from sftforge.progress import say
from sftforge.rl_loop import check_rl_config, load_env_tasks, load_prompts
from sftforge.run import check_paths
from sftforge.sandbox import check_sandbox
from sftforge.ulysses import sp_group_layout
from sftforge.vision import load_vision

GIB = 1 << 30
# Fixed GPU cost outside the tensors counted below: CUDA context, cuBLAS/NCCL workspaces, allocator slack.
GPU_OVERHEAD_BYTES = int(1.0 * GIB)
# Throughput of a step with gradient checkpointing relative to one without (one extra forward: ~4/3 of the work).
CHECKPOINTING_SPEED = 0.75
LR_HIGH_FOR_FINE_TUNING = 2e-4
LR_HIGH_FOR_RL = 2e-5  # verl's GRPO/DAPO scripts use 1e-6; policy-gradient steps on their own samples drift fast
VAL_BATCH = 64  # rl_loop.validate's generation batch


def visible_gpu_memory() -> int | None:
    import torch

    if torch.cuda.is_available():  # free memory, not the card's total: other processes (and the driver) hold some
        free, _ = torch.cuda.mem_get_info(0)
        return int(free)
    return None


def world_size(cfg: Config) -> int:
    """trainer.n_gpus_per_node × trainer.nnodes; n_gpus_per_node=0 means every visible GPU (1 on CPU)."""
    n = cfg.trainer.n_gpus_per_node
    if n <= 0:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return max(1, n) * cfg.trainer.nnodes


# ------------------------------------------------------------------------------------------------------------------
# Model shape and memory


@dataclass
class ModelShape:
    n_params: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Exact parameter count from the config, by building the model on the meta device (no memory, no weights)."""
        import torch

        with torch.device("meta"):
            model = auto_class(config).from_config(config)  # (a vision-language model: its vision tower counted)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        names = [n for n, _ in model.named_modules()]
        return cls(
            n_params=sum(p.numel() for p in model.parameters()),
            hidden=text.hidden_size,
            layers=text.num_hidden_layers,
            intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=text.vocab_size,
            tied=bool(getattr(text, "tie_word_embeddings", False)),
            qk_norm=any(n.endswith("q_norm") for n in names),
        )

    @classmethod
    def from_path(cls, path: str, trust_remote_code: bool = False, gguf_file: str = "") -> ModelShape:
        from transformers import AutoConfig

        if not path:
            raise ConfigError("Set model.path: the plan reads the model's config.json (no weights).")
        source, gguf = pretrained_args(path, gguf_file)  # a GGUF file: its header holds the config
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf)
        except Exception as e:
            raise ConfigError(f"model.path={path!r}: could not read its config ({type(e).__name__}: {e}).") from None
        return cls.from_config(config)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention + MLP + norms), from the shape."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (2 * self.head_dim if self.qk_norm else 0)
        return attn + 3 * h * self.intermediate + 2 * h

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, LM head (unless tied), final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def activation_bytes_per_token_layer(self, dtype: str) -> int:
        """Bytes one decoder layer saves for the backward pass per token (RMSNorm + GQA attention + gated MLP).

        The residual stream and the RMSNorms are fp32 (RMSNorm upcasts); under bf16 autocast the projections'
        inputs are saved as bf16 copies and their outputs are bf16.
        """
        b = 2 if dtype == "bf16" else 4
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        norms = 2 * (3 * 4 * h + (h * b if b == 2 else 0))  # input, normalized, output (+ bf16 cast for the linears)
        qk_norm = (q + kv) * (3 * 4) if self.qk_norm else 0  # per-head RMSNorm on q and k, in fp32
        # rotated q, k and v (saved by sdpa), sdpa's output and its contiguous copy (o_proj's input), log-sum-exp
        attention = (q + kv) * b + kv * b + q * b * 2 + self.heads * 4
        mlp = 4 * i * b  # gate out, up out, silu(gate), their product (the down projection's input)
        return norms + qk_norm + attention + mlp


@dataclass
class MemoryEstimate:
    """Bytes per GPU; ``total`` is the peak during a step."""

    params: int
    weight_copies: int
    """bf16 autocast copies of the weights; with FSDP2, the gathered full weights of the root and two layers."""
    grads: int
    optimizer: int
    activations: int
    logits: int
    attention_mask: int
    workspace: int
    overhead: int
    total: int
    tokens_per_micro_batch: int
    supervised_per_micro_batch: int
    gradient_checkpointing: bool
    micro_batch_size: int
    gpu_memory: int | None = None
    fits: bool | None = None
    sp_size: int = 1
    shard_over: int = 1

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in dataclasses.asdict(self).items() if k in _PARTS}


_PARTS = (
    "params",
    "weight_copies",
    "grads",
    "optimizer",
    "activations",
    "logits",
    "attention_mask",
    "workspace",
    "overhead",
    "total",
)


def _state_bytes(shape: ModelShape, shards: int, bf16: bool) -> tuple[int, int, int, int]:
    """(fp32 weights, their compute-dtype copies, gradients, AdamW's moments) per GPU, over ``shards`` FSDP2 ranks."""
    n = shape.n_params
    params, grads, optimizer = -(-4 * n // shards), -(-4 * n // shards), -(-8 * n // shards)
    if shards > 1:  # gathered full weights in compute dtype: the root for the whole step, two layers at a time
        weight_copies = (shape.root_params + 2 * shape.layer_params) * (2 if bf16 else 4)
    else:
        weight_copies = 2 * n if bf16 else 0
    return params, weight_copies, grads, optimizer


def _activation_bytes(shape: ModelShape, tokens: int, sup: int, gc: bool, bf16: bool) -> tuple[int, int]:
    """(activations kept for the backward pass, its workspace) of ``tokens`` tokens per GPU, ``sup`` supervised."""
    per_layer = shape.activation_bytes_per_token_layer("bf16" if bf16 else "fp32") * tokens
    h = shape.hidden
    outside = tokens * (4 * h + 3 * 4 * h) + sup * 4 * h  # embeddings out, final norm, gathered supervised rows
    if gc:  # only each layer's input is kept; one layer is recomputed at a time in the backward pass
        activations = shape.layers * tokens * 4 * h + per_layer + outside
    else:
        activations = shape.layers * per_layer + outside
    workspace = 2 * per_layer + 2 * tokens * 4 * h  # activation gradients of the layer in flight
    return activations, workspace


def _square_attention_bytes(
    shape: ModelShape, attn: str, packing: bool, row: int, mbs: int, sp: int, gc: bool, b: int
) -> tuple[int, int, int]:
    """The L × L terms of rows of ``row`` tokens: (the attention mask, eager's kept probabilities, their gradient)."""
    mask_rows = 1 if packing else mbs
    # Padded (unpacked) rows get a [B, 1, L, L] mask from transformers, and packed rows under eager an explicit
    # block-diagonal one. sdpa turns a bool mask into an additive one in the compute dtype and keeps it for the backward
    # pass of every layer whose activations are kept (measured on CPU: L² × 4 bytes per layer in fp32). Packed sdpa
    # (attention.py: causal attention per sample), flash_attention_2 (cu_seqlens) and sequence parallelism (attention
    # per sample) have no L × L mask at all.
    if sp > 1 or attn == "flash_attention_2" or (packing and attn == "sdpa"):
        attention_mask = 0
    else:
        kept = 1 if gc else shape.layers
        own = 1 if attn == "sdpa" else 4  # bool, or eager's additive float
        attention_mask = mask_rows * row * row * (own + (b * kept if attn == "sdpa" else 0))
    if attn != "eager" or sp > 1:
        return attention_mask, 0, 0
    # eager materializes the [rows, heads, L, L] probabilities: the fp32 softmax (and its compute-dtype copy under
    # bf16) is kept for the backward pass of every layer whose activations are kept; their fp32 gradient is
    # alive for the layer in flight
    scores = mask_rows * shape.heads * row * row
    return attention_mask, scores * (4 + (b if b == 2 else 0)) * (1 if gc else shape.layers), scores * 4


def estimate_memory(
    shape: ModelShape,
    cfg: Config,
    tokens_per_micro_batch: int,
    supervised_per_micro_batch: int | None = None,
    *,
    micro_batch_size: int | None = None,
    gradient_checkpointing: bool | None = None,
    gpu_memory: int | None = None,
    overhead: int | None = None,
    shard_over: int = 1,
    sp_size: int | None = None,
) -> MemoryEstimate:
    """Peak bytes per GPU of one training step with ``tokens_per_micro_batch`` tokens in a forward pass (the whole
    micro-batch; with ``sp_size`` > 1 each rank holds 1/sp of it). ``shard_over``: ranks FSDP2 shards the weights,
    gradients and optimizer state over (1 = every GPU holds all of them)."""
    m, d = cfg.model, cfg.data
    gc = m.enable_gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    mbs = d.micro_batch_size_per_gpu if micro_batch_size is None else micro_batch_size
    sp = max(1, cfg.trainer.sp_size if sp_size is None else sp_size)
    row_tokens = max(1, tokens_per_micro_batch)  # the whole packed row (the attention mask's side)
    sup = row_tokens if supervised_per_micro_batch is None else max(0, min(supervised_per_micro_batch, row_tokens))
    tokens = -(-row_tokens // sp)  # this rank's slice
    sup = min(sup, tokens)  # worst case: the slice is all supervised
    bf16 = m.dtype in ("bf16", "auto")  # auto is bf16 on the GPUs planned for
    b = 2 if bf16 else 4
    s = max(1, shard_over)
    params, weight_copies, grads, optimizer = _state_bytes(shape, s, bf16)
    activations, workspace = _activation_bytes(shape, tokens, sup, gc, bf16)
    chunk = sup if m.loss_chunk_size <= 0 else min(sup, m.loss_chunk_size)
    # One chunk at a time, recomputed in backward: fp32 logits, their log-softmax/gradient, and the gradient of the
    # logits (+ the bf16 logits under autocast).
    logits = chunk * shape.vocab * (3 * 4 + (2 if b == 2 else 0))
    row = row_tokens if d.packing else max(1, row_tokens // max(1, mbs))
    attention_mask, scores_kept, scores_grad = _square_attention_bytes(
        shape, m.attn_implementation, d.packing, row, mbs, sp, gc, b
    )
    activations += scores_kept
    workspace += scores_grad
    if sp > 1:  # all-to-all buffers: q, k, v and the output of one layer, in and out of the exchange
        workspace += 2 * tokens * (2 * shape.heads + 2 * max(shape.kv_heads, sp)) * shape.head_dim * b
    ovh = (GPU_OVERHEAD_BYTES if gpu_memory is not None else 0) if overhead is None else overhead
    total = params + weight_copies + grads + optimizer + activations + logits + attention_mask + workspace + ovh
    fits = None if gpu_memory is None else total <= gpu_memory
    return MemoryEstimate(
        params=params,
        weight_copies=weight_copies,
        grads=grads,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
        attention_mask=attention_mask,
        workspace=workspace,
        overhead=ovh,
        total=total,
        tokens_per_micro_batch=row_tokens,
        supervised_per_micro_batch=sup,
        gradient_checkpointing=gc,
        micro_batch_size=mbs,
        gpu_memory=gpu_memory,
        fits=fits,
        sp_size=sp,
        shard_over=s,
    )


def fsdp_shards(cfg: Config, world: int) -> int:
    """Ranks the weights are sharded over: the world with FSDP2 (trainer.strategy=fsdp2, or auto on several GPUs)."""
    strategy = cfg.trainer.strategy
    return world if world > 1 and (strategy == "fsdp2" or (strategy == "auto" and cfg.trainer.device != "cpu")) else 1


def longest_sequence(
    shape: ModelShape, cfg: Config, gpu_memory: int, *, sp_size: int, shard_over: int, supervised_share: float = 0.5
) -> int:
    """The longest packed micro-batch (tokens, a multiple of 1,024) whose estimated peak fits ``gpu_memory``."""

    def fits(n: int) -> bool:
        est = estimate_memory(
            shape,
            cfg,
            n,
            int(n * supervised_share),
            micro_batch_size=1,
            gpu_memory=gpu_memory,
            shard_over=shard_over,
            sp_size=sp_size,
        )
        return bool(est.fits)

    lo, hi = 0, 1024
    while fits(hi) and hi < (1 << 24):
        lo, hi = hi, hi * 2
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def micro_batch_tokens(cfg: Config, micro_batch_size: int, longest: int | None = None) -> int:
    """Worst-case tokens in one forward pass: micro-batch × the longest sample (data.max_length when the data is not
    known), capped by data.max_tokens_per_micro_batch."""
    longest = min(cfg.data.max_length, longest) if longest else cfg.data.max_length
    tokens = micro_batch_size * longest
    if cfg.data.max_tokens_per_micro_batch > 0:
        tokens = min(tokens, max(cfg.data.max_tokens_per_micro_batch, longest))
    return tokens


# ------------------------------------------------------------------------------------------------------------------
# Preset


@dataclass
class PresetChoice:
    micro_batch_size: int
    gradient_checkpointing: bool
    memory: MemoryEstimate
    reason: str
    candidates: list[dict] = field(default_factory=list)

    def overrides(self) -> list[str]:
        return [
            f"data.micro_batch_size_per_gpu={self.micro_batch_size}",
            f"model.enable_gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
        ]


def _throughput(tokens: int, gc: bool) -> float:
    # A GPU is near full utilization from a few thousand tokens per forward; bigger micro-batches add little.
    return tokens / (tokens + 2048) * (CHECKPOINTING_SPEED if gc else 1.0)


def choose_preset(
    shape: ModelShape, cfg: Config, gpu_memory: int, world: int, longest: int | None = None, max_sup_share: float = 1.0
) -> PresetChoice:
    """trainer.preset=auto: the (micro-batch, gradient checkpointing) that fits ``gpu_memory`` with the highest
    estimated throughput. Micro-batches divide the per-GPU batch, so accumulation stays exact."""
    # the sequences per data-parallel rank
    per_gpu = max(1, cfg.data.train_batch_size // max(1, world // max(1, cfg.trainer.sp_size)))
    shards = fsdp_shards(cfg, world)

    def estimate(s: int, gc: bool) -> tuple[int, MemoryEstimate]:  # (tokens per forward, the estimate)
        tokens = micro_batch_tokens(cfg, s, longest)
        kwargs = dict(micro_batch_size=s, gradient_checkpointing=gc, gpu_memory=gpu_memory, shard_over=shards)
        return tokens, estimate_memory(shape, cfg, tokens, int(tokens * max_sup_share), **kwargs)

    sizes = [s for s in range(1, min(per_gpu, 64) + 1) if per_gpu % s == 0]
    best, rows = None, []
    for gc in (False, True):
        for s in sizes:
            tokens, mem = estimate(s, gc)
            score = _throughput(tokens, gc)
            rows.append(
                {
                    "micro_batch_size": s,
                    "gradient_checkpointing": gc,
                    "total_gib": round(mem.total / GIB, 2),
                    "fits": mem.fits,
                    "relative_throughput": round(score, 3),
                }
            )
            key = (score, -mem.total)
            if mem.fits and (best is None or key > best[0]):
                best = (key, s, gc, mem)
    if best is None:
        _, mem = estimate(1, True)
        reason = (
            f"nothing fits {gpu_memory / GIB:.1f} GiB: even micro-batch 1 with gradient checkpointing needs "
            f"{mem.total / GIB:.1f} GiB; lower data.max_length or data.max_tokens_per_micro_batch, or use a "
            "bigger GPU"
        )
        return PresetChoice(1, True, mem, reason, rows)
    _, s, gc, mem = best
    reason = (
        f"micro-batch {s} ({mem.tokens_per_micro_batch:,} tokens/forward) "
        f"{'with' if gc else 'without'} gradient checkpointing: {mem.total / GIB:.1f} of "
        f"{gpu_memory / GIB:.1f} GiB, the highest estimated throughput among {len(rows)} candidates "
        f"({sum(bool(r['fits']) for r in rows)} fit)"
    )
    if gc:
        reason += "; without checkpointing no micro-batch fits"
    return PresetChoice(s, gc, mem, reason, rows)


# ------------------------------------------------------------------------------------------------------------------
# The plan


_SLICE = 1 << 20  # elements per slice when reading a store's columns (no whole-column temporaries)


def _length_counts(lengths) -> np.ndarray:
    """counts[L] = how many samples have L tokens, read slice by slice (memory: the longest length, not the data)."""
    counts = np.zeros(1, np.int64)
    for k in range(0, len(lengths), _SLICE):
        c = np.bincount(np.asarray(lengths[k : k + _SLICE]))
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[: len(c)] += c
    return counts


def _column_sum(values) -> int:
    return sum(int(np.asarray(values[k : k + _SLICE]).sum(dtype=np.int64)) for k in range(0, len(values), _SLICE))


def length_stats(lengths) -> dict[str, int]:
    """min, median, p95 and max of a list or an array of lengths (a store's column is read slice by slice)."""
    n = len(lengths)
    if not n:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    cum = np.cumsum(_length_counts(lengths))

    def kth(k: int) -> int:  # the k-th smallest (0-based)
        return int(np.searchsorted(cum, k + 1))

    median = kth(n // 2) if n % 2 else int((kth(n // 2 - 1) + kth(n // 2)) / 2)
    return {"min": kth(0), "median": median, "p95": kth(min(n - 1, math.ceil(0.95 * n) - 1)), "max": kth(n - 1)}


def histogram(lengths, bins: int = 8, width: int = 30) -> list[str]:
    if not len(lengths):
        return []
    per_length = _length_counts(lengths)
    present = np.flatnonzero(per_length)
    lo, hi = int(present[0]), int(present[-1])
    step = max(1, math.ceil((hi - lo + 1) / bins))
    counts = [int(per_length[lo + k * step : lo + (k + 1) * step].sum()) for k in range(bins)]
    counts[-1] += int(per_length[lo + bins * step :].sum())
    top = max(counts)
    return [
        f"{lo + k * step:>7}-{lo + (k + 1) * step - 1:<7} {'█' * round(width * c / top):<{width}} {c}"
        for k, c in enumerate(counts)
        if lo + k * step <= hi
    ]


def _planned_dtype(cfg: Config) -> Config:
    """The config as planned for GPUs: model.dtype=auto is bf16 there (model.resolve_dtype)."""
    if cfg.model.dtype == "auto":
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bf16"))
    return cfg


def _data_summary(cfg: Config, lengths, supervised, ws: int, report: Any) -> dict[str, Any]:
    """The data section: samples, tokens, supervised share, length statistics and what data.max_length cut."""
    d = cfg.data
    out: dict[str, Any] = {"samples": len(lengths), "world_size": ws, "sp_size": max(1, cfg.trainer.sp_size)}
    tokens, sup_tokens = _column_sum(lengths), _column_sum(supervised)
    out["tokens"], out["supervised_tokens"] = tokens, sup_tokens
    out["supervised_share"] = round(sup_tokens / tokens, 4) if tokens else 0.0
    out["length"] = length_stats(lengths)
    if report is not None:
        out["over_max_length"] = {
            "count": report.over_length,
            "truncation": d.truncation,
            "truncated": report.truncated,
            "dropped": report.dropped_over_length,
            "dropped_no_trained_tokens": report.dropped_no_trained_tokens,
            "rows_read": report.rows,
            "skipped_rows": dict(report.skipped),
        }
    return out


def _batch_layout(cfg: Config, ws: int, errors: list[str]) -> tuple[int | None, int | None]:
    """(data-parallel size, gradient accumulation steps), or None where the trainer refuses the layout."""
    dp = accum = None
    try:
        dp = sp_group_layout(ws, cfg.trainer.sp_size)[0]
        accum = grad_accum_steps(cfg.data.train_batch_size, cfg.data.micro_batch_size_per_gpu, dp)
    except ConfigError as e:
        errors.append(str(e))
    return dp, accum


def _epoch_steps(cfg: Config, n: int, errors: list[str]) -> tuple[int, int, int]:
    """(steps per epoch, total steps, samples dropped per epoch) of ``n`` samples, by batching.make_plan."""
    try:
        p = make_plan(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch_size_per_gpu=1)), n, 1)
        return p.steps_per_epoch, p.total_steps, p.dropped_per_epoch
    except ConfigError as e:
        errors.append(str(e))
        return 0, 0, 0


def _batch_schedule(
    cfg: Config, data: dict[str, Any], report: Any, val_samples: int | None, errors: list[str]
) -> dict[str, Any]:
    """The batch and steps section: the trainer's own arithmetic. What it refuses, `sftforge train` refuses with the
    same words: collected in ``errors`` (the plan still shows what it can; plan_main then exits 2)."""
    d, t = cfg.data, cfg.trainer
    n, tokens, sup_tokens = data["samples"], data["tokens"], data["supervised_tokens"]
    dp, accum = _batch_layout(cfg, data["world_size"], errors)
    steps_per_epoch, total, dropped = _epoch_steps(cfg, n, errors)
    return dict(
        dp_size=dp,
        micro_batch_size_per_gpu=d.micro_batch_size_per_gpu,
        grad_accum_steps=accum,
        sequences_per_step=d.train_batch_size,
        tokens_per_step=round(tokens / n * d.train_batch_size) if n else 0,
        supervised_tokens_per_step=round(sup_tokens / n * d.train_batch_size) if n else 0,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=round(total / steps_per_epoch, 3) if steps_per_epoch else 0,
        dropped_per_epoch=dropped,
        warmup_steps=warmup_steps(cfg.optim, total),
        expanded_tokens_per_step=(
            round(report.expanded_tokens / n * d.train_batch_size) if n and getattr(report, "contexts", 0) else None
        ),  # per_turn: without the tree
        num_checkpoints=event_count(total, t.save_freq),
        num_validations=event_count(total, t.test_freq) if d.val_files else 0,
        num_evals=event_count(total, t.eval_freq) if d.eval_files and t.eval_freq > 0 else 0,
        val_samples=val_samples,
    )


def _frequency_warnings(cfg: Config, total: int, validates: bool = True) -> list[str]:
    """trainer.save_freq and trainer.test_freq longer than the run (``validates``: the run has validation data)."""
    t, warnings = cfg.trainer, []
    if total and t.save_freq > total:
        warnings.append(
            f"trainer.save_freq ({t.save_freq}) is larger than the total steps ({total}): only the final "
            f"checkpoint is written; set trainer.save_freq <= {total} for intermediate ones."
        )
    if total and t.test_freq > total and validates:
        warnings.append(
            f"trainer.test_freq ({t.test_freq}) is larger than the total steps ({total}): validation runs "
            f"only at the end; set trainer.test_freq <= {total}."
        )
    return warnings


def _warmup_warnings(cfg: Config, total: int, warm: int) -> list[str]:
    """No warmup under a decaying schedule (or a warmup_ratio that rounds to 0 steps)."""
    o = cfg.optim
    if not (total and warm == 0 and o.lr_scheduler != "constant"):
        return []
    if o.warmup_ratio > 0:  # a ratio of too few steps rounds to 0
        need = math.floor(0.5 / o.warmup_ratio)  # the fewest total steps where the ratio gives 1 warmup step
        while warmup_steps(o, need) == 0:
            need += 1
        return [
            f"optim.warmup_ratio={o.warmup_ratio:g} of {total} steps rounds to 0 warmup steps (the run is "
            f"too short for a ratio; it gives 1 from {need} steps): the first steps run at the full "
            "optim.lr; set optim.warmup_steps=1 or more."
        ]
    return [
        f"no warmup (optim.warmup_ratio=0, optim.warmup_steps=0) with the decaying "
        f"optim.lr_scheduler={o.lr_scheduler}: the first steps run at the full optim.lr; set "
        f"optim.warmup_ratio=0.03..0.1 or optim.warmup_steps."
    ]


def _endless_warmup(total: int, warm: int) -> list[str]:
    """A warmup as long as the run."""
    if total and warm >= total:
        return [
            f"optim.warmup_steps/warmup_ratio give {warm} warmup steps of {total}: the learning rate "
            "never leaves warmup; lower it."
        ]
    return []


def _schedule_warnings(cfg: Config, p: dict[str, Any], warnings: list[str], notes: list[str]) -> None:
    """The warnings and notes on the step arithmetic of plan ``p``: frequencies, warmup, lr, dropped samples."""
    d, o, t = cfg.data, cfg.optim, cfg.trainer
    n, total, warm = p["samples"], p["total_steps"], p["warmup_steps"]
    steps_per_epoch, dropped = p["steps_per_epoch"], p["dropped_per_epoch"]
    warnings += _frequency_warnings(cfg, total)
    if t.test_freq > 0 and not d.val_files:
        warnings.append(f"trainer.test_freq ({t.test_freq}) is set but data.val_files is empty: nothing is validated.")
    warnings += _warmup_warnings(cfg, total, warm) + _endless_warmup(total, warm)
    if d.val_files and _same_files(d.val_files, d.train_files):
        warnings.append(
            "data.val_files is the same as data.train_files: the validation loss measures memorization, "
            "not generalization; hold out separate validation data."
        )
    if o.lr > LR_HIGH_FOR_FINE_TUNING:
        warnings.append(
            f"optim.lr ({o.lr:g}) is unusually high for full fine-tuning (typical 1e-6 .. 5e-5); check the value."
        )
    if steps_per_epoch and dropped > 0.1 * n:
        warnings.append(
            f"data.train_batch_size ({d.train_batch_size}) leaves {dropped} of {n} samples out of every "
            f"epoch (drop_last); choose a batch size that divides {n} more evenly."
        )
    if steps_per_epoch and total < 10 and t.max_steps <= 0:
        notes.append(
            f"only {total} optimizer steps in total: consider a smaller data.train_batch_size or more "
            "trainer.total_epochs."
        )


def _max_supervised_share(lengths, supervised) -> float:
    """The largest supervised share of one sample (read slice by slice)."""
    return max(
        (
            float((np.asarray(supervised[k : k + _SLICE]) / np.maximum(np.asarray(lengths[k : k + _SLICE]), 1)).max())
            for k in range(0, len(lengths), _SLICE)
        ),
        default=1.0,
    )


def _preset_choice(
    cfg: Config, shape: ModelShape, gpu_memory: int, ws: int, longest: int | None, lengths, supervised
) -> dict[str, Any]:
    """trainer.preset=auto: the plan's choice of micro-batch and gradient checkpointing (choose_preset)."""
    choice = choose_preset(shape, cfg, gpu_memory, ws, longest, _max_supervised_share(lengths, supervised))
    return {
        "micro_batch_size_per_gpu": choice.micro_batch_size,
        "enable_gradient_checkpointing": choice.gradient_checkpointing,
        "reason": choice.reason,
        "total_gib": round(choice.memory.total / GIB, 2),
        "candidates": choice.candidates,
    }


def _memory_section(
    est: MemoryEstimate, shape: ModelShape, shards: int, dtype: str, gpu_memory: int | None
) -> dict[str, Any]:
    """The plan's memory dict: the estimate's parts in GiB, its micro-batch, and where the weights are loaded."""
    memory = {
        **est.gib(),
        "n_params": shape.n_params,
        "tokens_per_micro_batch": est.tokens_per_micro_batch,
        "sp_size": est.sp_size,
        "sharded_over": shards,
        "supervised_per_micro_batch": est.supervised_per_micro_batch,
        "dtype": dtype,
        "gradient_checkpointing": est.gradient_checkpointing,
        "gpu_memory_gib": round(gpu_memory / GIB, 2) if gpu_memory else None,
        "fits": est.fits,
    }
    # loading (run.Run.build): FSDP2 on several ranks reads the weights once, on rank 0, into host memory
    memory["host_load_gib"] = round(4 * shape.n_params / GIB, 2)
    memory["host_load"] = "rank 0 only (others build on meta)" if shards > 1 else "every process"
    return memory


def _sft_memory(
    cfg: Config,
    p: dict[str, Any],
    lengths,
    supervised,
    shape: ModelShape,
    gpu_memory: int | None,
    warnings: list[str],
    notes: list[str],
) -> dict[str, Any]:
    """The memory section of plan ``p``: the peak per GPU of a step on its longest micro-batch, the warning when it
    does not fit, trainer.preset=auto's choice (into ``p["preset"]``) and the longest micro-batch that fits."""
    d, t, n = cfg.data, cfg.trainer, p["samples"]
    longest = p["length"]["max"] or None
    mb_tokens = micro_batch_tokens(cfg, d.micro_batch_size_per_gpu, longest)
    most = max(int(np.asarray(supervised[k : k + _SLICE]).max()) for k in range(0, n, _SLICE)) if n else 0
    mb_sup = min(mb_tokens, d.micro_batch_size_per_gpu * most) if n else mb_tokens
    shards = fsdp_shards(cfg, p["world_size"])
    est = estimate_memory(shape, cfg, mb_tokens, mb_sup, gpu_memory=gpu_memory, shard_over=shards)
    memory = _memory_section(est, shape, shards, cfg.model.dtype, gpu_memory)
    if est.fits is False:
        warnings.append(
            f"estimated peak {est.total / GIB:.1f} GiB per GPU exceeds the {gpu_memory / GIB:.1f} GiB "
            "of --gpu-memory: set model.enable_gradient_checkpointing=true, lower "
            "data.micro_batch_size_per_gpu or data.max_tokens_per_micro_batch, or trainer.preset=auto."
        )
    if t.preset == "auto" and gpu_memory is None:
        notes.append("trainer.preset=auto needs the GPU memory: pass --gpu-memory (no GPU is visible).")
    elif t.preset == "auto":
        p["preset"] = _preset_choice(cfg, shape, gpu_memory, p["world_size"], longest, lengths, supervised)
    if gpu_memory is not None:
        memory["longest_sequence"] = longest_sequence(
            shape, cfg, gpu_memory, sp_size=max(1, t.sp_size), shard_over=shards
        )
    return memory


def build_plan(
    cfg: Config,
    lengths: list[int],
    supervised: list[int] | None = None,
    *,
    shape: ModelShape | None = None,
    gpu_memory: int | None = None,
    report: Any = None,
    val_samples: int | None = None,
) -> dict[str, Any]:
    """Everything ``sftforge plan`` prints, as one JSON-able dict (``warnings`` name the config key to change)."""
    cfg = _planned_dtype(cfg)
    supervised = supervised if supervised is not None else np.zeros(len(lengths), np.int32)
    warnings: list[str] = []
    notes: list[str] = []
    errors: list[str] = []
    out = _data_summary(cfg, lengths, supervised, world_size(cfg), report)
    out.update(_batch_schedule(cfg, out, report, val_samples, errors))
    _schedule_warnings(cfg, out, warnings, notes)
    memory = None
    if shape is not None:
        memory = _sft_memory(cfg, out, lengths, supervised, shape, gpu_memory, warnings, notes)
    out["memory"] = memory
    out["warnings"] = warnings
    out["notes"] = notes
    out["errors"] = errors
    return out


def _same_files(a: Any, b: Any) -> bool:
    import os

    def norm(x):
        items = x if isinstance(x, (list, tuple)) else [x]
        return sorted(os.path.abspath(os.path.expanduser(str(i))) for i in items)

    return norm(a) == norm(b)


def plan_from_config(cfg: Config, gpu_memory: str | int | None = None) -> tuple[dict[str, Any], list[int]]:
    """(the plan, the sample lengths): reads (and tokenizes, cached) the data and the model's config; no weights."""

    gpu_memory = gpu_memory or cfg.trainer.gpu_memory or None
    mem = parse_memory(gpu_memory) if not isinstance(gpu_memory, int) else gpu_memory
    mem = mem if mem is not None else visible_gpu_memory()
    tok = load_tokenizer(cfg)
    vision = load_vision(cfg, tok)
    ds = build_dataset(cfg.data, tok, vision=vision)
    val_n = None
    if cfg.data.val_files:
        val_n = len(build_dataset(cfg.data, tok, cfg.data.val_files, "data.val_files", vision))
    shape = ModelShape.from_path(cfg.model.path, cfg.model.trust_remote_code, cfg.model.gguf_file)
    # the store's length and trained columns, read slice by slice: neither the tokens nor whole columns in memory
    lengths, supervised = ds.store.column("length"), ds.store.column("trained")
    plan = build_plan(cfg, lengths, supervised, shape=shape, gpu_memory=mem, report=ds.report, val_samples=val_n)
    plan["store"] = ds.describe()  # where the tokenized samples are (and whether this run tokenized them)
    return plan, lengths


def _histogram_lines(lengths) -> list[str]:
    """The length histogram, indented under the length statistics (none without ``lengths``)."""
    return ["  " + h for h in histogram(lengths if lengths is not None else [])]


def _peak_suffix(m: dict[str, Any]) -> str:
    """ " of <GPU memory> GiB — fits" after a peak (or how to give the GPU memory)."""
    fit = "" if m["fits"] is None else (" — fits" if m["fits"] else " — DOES NOT FIT")
    gpu = f" of {m['gpu_memory_gib']} GiB" if m["gpu_memory_gib"] else " (no GPU memory given: --gpu-memory 80GB)"
    return gpu + fit


def _sharded_suffix(m: dict[str, Any]) -> str:
    """The FSDP2 sharding of a memory line, if any."""
    return (
        f"; weights/gradients/optimizer sharded over {m['sharded_over']} GPUs (FSDP2)" if m["sharded_over"] > 1 else ""
    )


def _message_lines(p: dict[str, Any]) -> list[str]:
    """A plan's notes, warnings and errors, one a line."""
    lines = [f"note: {x}" for x in p.get("notes", [])]
    lines += [f"warning: {w}" for w in p["warnings"]]
    lines += [f"error: {e}" for e in p.get("errors", [])]
    return lines


def _format_data(p: dict[str, Any], lengths: list[int] | None) -> list[str]:
    """The data lines of plan ``p``: samples and tokens, lengths, the store and what data.max_length cut."""
    L = p["length"]
    lines = [
        f"data: {p['samples']:,} samples, {p['tokens']:,} tokens, supervised {p['supervised_tokens']:,} "
        f"({p['supervised_share']:.1%})"
        + (f"; validation: {p['val_samples']:,} samples" if p.get("val_samples") else ""),
        f"tokens per sample: min {L['min']}, median {L['median']}, p95 {L['p95']}, max {L['max']}",
    ]
    lines += _histogram_lines(lengths)
    if p.get("store"):
        lines.append(p["store"])
    ov = p.get("over_max_length")
    if ov:
        lines.append(
            f"over data.max_length: {ov['count']} (data.truncation={ov['truncation']}: truncated {ov['truncated']}, "
            f"dropped {ov['dropped']}, dropped with no trained token left {ov['dropped_no_trained_tokens']})"
        )
        if ov["skipped_rows"]:
            lines.append(f"skipped rows (data.bad_rows=skip): {ov['skipped_rows']}")
    return lines


def _format_steps(p: dict[str, Any]) -> list[str]:
    """The batch and steps lines of plan ``p``."""
    accum = p["grad_accum_steps"] if p["grad_accum_steps"] is not None else "— (does not divide)"
    sp = p.get("sp_size", 1)
    dp = p.get("dp_size") or "— (trainer.sp_size does not divide the world)"
    ranks = f"world size {p['world_size']}" if sp <= 1 else f"data-parallel {dp} (world {p['world_size']} / sp {sp})"
    lines = [
        f"{ranks} × micro-batch {p['micro_batch_size_per_gpu']} × accumulation {accum} = "
        f"{p['sequences_per_step']} sequences/step (~{p['tokens_per_step']:,} tokens, "
        f"~{p['supervised_tokens_per_step']:,} supervised)",
        f"steps: {p['steps_per_epoch']}/epoch, {p['total_steps']} total ({p['epochs']} epochs), warmup "
        f"{p['warmup_steps']}; drop_last leaves out {p['dropped_per_epoch']} samples/epoch",
        f"checkpoints: {p['num_checkpoints']}; validations: {p['num_validations']}",
    ]
    if p.get("expanded_tokens_per_step"):
        e = p["expanded_tokens_per_step"]
        lines.append(
            f"data.reasoning_history=per_turn: ~{p['tokens_per_step']:,} tokens/step as prefix trees instead of "
            f"~{e:,} with every turn's context expanded ({1 - p['tokens_per_step'] / e:.1%} saved)"
        )
    return lines


def _format_memory(m: dict[str, Any]) -> list[str]:
    """The memory lines of a plan: the peak per GPU, the longest micro-batch that fits, loading, and the parts."""
    lines = [
        f"memory per GPU ({m['n_params'] / 1e6:,.1f}M params, {m['dtype']}, "
        f"{'with' if m['gradient_checkpointing'] else 'no'} gradient checkpointing, "
        f"{m['tokens_per_micro_batch']:,} tokens/forward, {m['supervised_per_micro_batch']:,} supervised): "
        f"{m['total']:.2f} GiB{_peak_suffix(m)}"
        + (f"; sp {m['sp_size']}: each GPU holds 1/{m['sp_size']} of the tokens" if m["sp_size"] > 1 else "")
        + _sharded_suffix(m)
    ]
    if m.get("longest_sequence") is not None:
        lines.append(f"  longest packed micro-batch that fits (estimate): {m['longest_sequence']:,} tokens")
    if m.get("host_load_gib") is not None:
        lines.append(f"  loading: {m['host_load_gib']:.2f} GiB of fp32 weights in host memory, {m['host_load']}")
    lines.append("  " + ", ".join(f"{k} {m[k]:.2f}" for k in _PARTS[:-1] if m[k]))
    return lines


def format_plan(p: dict[str, Any], lengths: list[int] | None = None) -> str:
    """The text ``sftforge plan`` prints for plan ``p`` (``lengths``: the sample lengths, for the histogram)."""
    lines = _format_data(p, lengths) + _format_steps(p)
    if p.get("memory"):
        lines += _format_memory(p["memory"])
    if p.get("preset"):
        pr = p["preset"]
        lines.append(
            f"trainer.preset=auto: data.micro_batch_size_per_gpu={pr['micro_batch_size_per_gpu']}, "
            f"model.enable_gradient_checkpointing={str(pr['enable_gradient_checkpointing']).lower()} — {pr['reason']}"
        )
    return "\n".join(lines + _message_lines(p))


# ------------------------------------------------------------------------------------------------------------------
# sftforge rl


def is_rl_config(cfg: Config) -> bool:
    """A config that sets any rollout.* or algorithm.* key (verl's actor_rollout_ref.rollout.*, algorithm.* included)
    is planned as `sftforge rl`; `sftforge plan --rl` forces it."""
    return cfg.rollout != RolloutConfig() or cfg.algorithm != AlgorithmConfig()


def kv_cache_bytes(shape: ModelShape, sequences: int, tokens: int, dtype: str) -> int:
    """The key/value cache of ``sequences`` generated side by side, each up to ``tokens`` long."""
    b = 2 if dtype in ("bf16", "auto") else 4
    return sequences * tokens * shape.layers * 2 * shape.kv_heads * shape.head_dim * b


def _rl_errors(cfg: Config, ws: int) -> list[str]:
    """What `sftforge rl` refuses, in its own words (rl_loop.check_rl_config, and the trainer options it lacks)."""
    errors: list[str] = []
    try:
        check_rl_config(cfg, ws)
    except ConfigError as e:
        errors.append(str(e))
    for key, value in (("trainer.offload", cfg.trainer.offload), ("trainer.sp_size", cfg.trainer.sp_size > 1)):
        if value:
            errors.append(
                f"sftforge rl does not support {key} yet; set {key}={'false' if key.endswith('offload') else 1}."
            )
    return errors


def _rl_sequence_bounds(cfg: Config, longest_prompt: int) -> tuple[int, int, int]:
    """(the longest sequence the update trains on, the most tokens one response generates, the most it trains on)."""
    r, d = cfg.rollout, cfg.data
    # a sequence the update trains on: the prompt and its response (single-turn), or the whole episode, its turns and
    # observations, cut at data.max_length (rl_loop.episode_response)
    if r.max_turns > 1:
        generated_max = r.max_turns * r.max_response_length
        return d.max_length, generated_max, min(generated_max, d.max_length)
    return longest_prompt + r.max_response_length, r.max_response_length, r.max_response_length


def _rl_sizes(
    cfg: Config, prompt_lengths: list[int], counts: dict[str, int], ws: int, val_prompts: int
) -> dict[str, Any]:
    """The rollout sizes and the step and token arithmetic of rl_loop."""
    r, a, o, t = cfg.rollout, cfg.algorithm, cfg.optim, cfg.trainer
    n_prompts, k = len(prompt_lengths), r.prompts_per_step
    per_epoch = max(1, n_prompts // k)
    total = t.max_steps if t.max_steps > 0 else t.total_epochs * per_epoch
    lengths = length_stats(prompt_lengths)
    longest, generated_max, trained_max = _rl_sequence_bounds(cfg, lengths["max"])
    responses = k * r.n
    return {
        "kind": "rl",
        "prompts": n_prompts,
        "prompt_counts": counts,
        "prompt_length": lengths,
        "world_size": ws,
        "reward": a.reward,
        "multi_turn": r.max_turns > 1,
        "prompts_per_step": k,
        "responses_per_prompt": r.n,
        "responses_per_step": responses,
        "responses_per_process": responses // ws if responses % ws == 0 else responses / ws,
        "max_turns": r.max_turns,
        "max_new_tokens_per_turn": r.max_response_length,
        "generated_tokens_per_step_max": responses * generated_max,
        "trained_tokens_per_step_max": responses * trained_max,
        "sequence_tokens_max": longest,
        "sequence_tokens_per_step_max": responses * longest,
        "mini_batches": a.mini_batches,
        "steps_per_epoch": per_epoch,
        "total_steps": total,
        "optimizer_steps": total * a.mini_batches,
        "epochs": round(total / per_epoch, 3),
        "dropped_per_epoch": n_prompts - per_epoch * k if n_prompts >= k else 0,
        "warmup_steps": warmup_steps(o, total),
        "num_checkpoints": event_count(total, t.save_freq),
        "num_validations": event_count(total, t.test_freq) + int(t.val_before_train) if val_prompts else 0,
        "val_prompts": val_prompts,
        "val_responses": val_prompts * r.val_n,
        "reference_model": a.kl_coef > 0,
    }


def _rl_prompt_warnings(cfg: Config, p: dict[str, Any], warnings: list[str], notes: list[str]) -> None:
    """The warnings and notes on the prompts of RL plan ``p``: too few, truncated or dropped, episodes cut."""
    r, d = cfg.rollout, cfg.data
    n_prompts, k, counts = p["prompts"], p["prompts_per_step"], p["prompt_counts"]
    generated_max = _rl_sequence_bounds(cfg, p["prompt_length"]["max"])[1]
    if n_prompts < k:
        warnings.append(
            f"data.train_files has {n_prompts} prompts, fewer than rollout.prompts_per_step ({k}): every "
            f"step rolls out only those {n_prompts}; lower rollout.prompts_per_step or add prompts."
        )
    if counts.get("truncated"):
        warnings.append(
            f"{counts['truncated']} of {counts.get('rows', n_prompts)} prompts are longer than "
            f"data.max_length ({d.max_length}) and were truncated (data.truncation={d.truncation}): the "
            "model answers a question it does not see whole; raise data.max_length "
            "(verl's data.max_prompt_length) or set data.truncation=drop."
        )
    if counts.get("dropped"):
        notes.append(
            f"{counts['dropped']} of {counts.get('rows', n_prompts)} prompts are longer than data.max_length "
            f"({d.max_length}) and are dropped (data.truncation=drop)."
        )
    if p["multi_turn"] and generated_max > d.max_length:
        notes.append(
            f"episodes can generate up to {generated_max:,} tokens (rollout.max_turns {r.max_turns} × "
            f"rollout.max_response_length {r.max_response_length}) but train on at most data.max_length "
            f"({d.max_length}) tokens each, prompt and observations included: longer ones are cut and "
            "counted as truncated."
        )


def _rl_algorithm_warnings(cfg: Config, warnings: list[str], notes: list[str]) -> None:
    """The warnings and notes on rollout.n, algorithm.overlong_buffer and algorithm.mini_batches."""
    r, a = cfg.rollout, cfg.algorithm
    if r.n < 4 and a.dynamic_sampling:
        notes.append(
            f"rollout.n={r.n}: with dynamic sampling, groups of few responses are often all right or all "
            "wrong and dropped; 8 or more is usual."
        )
    if a.overlong_buffer >= r.max_response_length > 0:
        warnings.append(
            f"algorithm.overlong_buffer ({a.overlong_buffer}) is not shorter than "
            f"rollout.max_response_length ({r.max_response_length}): every response is penalized; "
            "use a buffer of a fraction of the length (DAPO: 4096 of 20480)."
        )
    if a.mini_batches > 1:
        notes.append(
            f"algorithm.mini_batches={a.mini_batches}: {a.mini_batches} optimizer steps per rollout batch; "
            "all but the first are off-policy (the clipped ratio bounds them)."
        )


def _rl_schedule_warnings(cfg: Config, p: dict[str, Any], warnings: list[str]) -> None:
    """The warnings on the schedule of RL plan ``p``: frequencies, validation prompts, lr and warmup."""
    d, o = cfg.data, cfg.optim
    total, warm = p["total_steps"], p["warmup_steps"]
    warnings += _frequency_warnings(cfg, total, validates=bool(p["val_prompts"]))
    if d.val_files and _same_files(d.val_files, d.train_files):
        warnings.append(
            "data.val_files is the same as data.train_files: the validation score measures the prompts "
            "the policy trains on; hold out separate prompts."
        )
    if o.lr > LR_HIGH_FOR_RL:
        warnings.append(
            f"optim.lr ({o.lr:g}) is high for RL on a policy's own samples (verl's GRPO/DAPO scripts use "
            "1e-6); check the value."
        )
    warnings += _endless_warmup(total, warm)


def _generation_bytes(cfg: Config, shape: ModelShape, longest: int, val_prompts: int) -> tuple[int, int, int]:
    """(sequences generated at once, their KV cache, their logits) of the rollout phase."""
    r = cfg.rollout
    # generation: one group (rollout.n sequences) at a time, each up to its longest sequence; validation batches
    # of up to 64 prompts; logits of the last position only, in fp32, with the sampling's sorted copy
    gen_seqs = max(r.n, min(VAL_BATCH, val_prompts * r.val_n) if val_prompts else 0)
    kv = kv_cache_bytes(shape, gen_seqs, longest, cfg.model.dtype)
    return gen_seqs, kv, gen_seqs * shape.vocab * 4 * 3


def _rl_update_estimate(
    cfg: Config, p: dict[str, Any], shape: ModelShape, gpu_memory: int | None, shards: int
) -> MemoryEstimate:
    """The update's training step: micro-batches of RL plan ``p``'s longest sequence, trained on its responses."""
    d, mbs = cfg.data, cfg.data.micro_batch_size_per_gpu
    longest, _, trained_max = _rl_sequence_bounds(cfg, p["prompt_length"]["max"])
    mb_cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, max_length=longest))
    mb_tokens = micro_batch_tokens(mb_cfg, mbs, longest)
    mb_sup = min(mb_tokens, mbs * trained_max)
    return estimate_memory(shape, cfg, mb_tokens, mb_sup, gpu_memory=gpu_memory, shard_over=shards)


def _rl_memory(
    cfg: Config, p: dict[str, Any], shape: ModelShape, gpu_memory: int | None, warnings: list[str]
) -> dict[str, Any]:
    """The memory of RL plan ``p``'s two phases, the update and generation, per GPU (and the warning when the peak
    does not fit)."""
    shards = fsdp_shards(cfg, p["world_size"])
    train = _rl_update_estimate(cfg, p, shape, gpu_memory, shards)
    # rl_loop.RolloutWeights: under FSDP2 every process keeps a full copy in the compute dtype to sample with;
    # the KL reference (algorithm.kl_coef > 0) is a full fp32 copy on every process (parallel.prepare_reference)
    rollout_copy = shape.n_params * (2 if cfg.model.dtype == "bf16" else 4) if shards > 1 else 0
    reference = 4 * shape.n_params if cfg.algorithm.kl_coef > 0 else 0
    gen_seqs, kv, gen_logits = _generation_bytes(cfg, shape, p["sequence_tokens_max"], p["val_prompts"])
    resident = train.params + train.optimizer + rollout_copy + reference + train.overhead
    # (one process: autocast's compute-dtype copies of the weights; FSDP2 samples with the rollout copy)
    rollout_peak = resident + (train.weight_copies if shards == 1 else 0) + kv + gen_logits
    train_peak = train.total + rollout_copy + reference
    peak = max(rollout_peak, train_peak)
    fits = None if gpu_memory is None else peak <= gpu_memory
    if fits is False:
        phase = "the update" if train_peak >= rollout_peak else "generation"
        warnings.append(
            f"estimated peak {peak / GIB:.1f} GiB per GPU (in {phase}) exceeds the "
            f"{gpu_memory / GIB:.1f} GiB of --gpu-memory: set model.enable_gradient_checkpointing=true, "
            "lower data.micro_batch_size_per_gpu or data.max_tokens_per_micro_batch, rollout.n, "
            "rollout.max_response_length, or use LoRA (model.lora.rank)."
        )
    return {
        "n_params": shape.n_params,
        "dtype": cfg.model.dtype,
        "sharded_over": shards,
        "gradient_checkpointing": train.gradient_checkpointing,
        "tokens_per_micro_batch": train.tokens_per_micro_batch,
        "supervised_per_micro_batch": train.supervised_per_micro_batch,
        "train_step_gib": round(train_peak / GIB, 3),
        "rollout_gib": round(rollout_peak / GIB, 3),
        "kv_cache_gib": round(kv / GIB, 3),
        "kv_cache_sequences": gen_seqs,
        "rollout_copy_gib": round(rollout_copy / GIB, 3),
        "reference_gib": round(reference / GIB, 3),
        "total": round(peak / GIB, 3),
        "gpu_memory_gib": round(gpu_memory / GIB, 2) if gpu_memory else None,
        "fits": fits,
        "train_parts": train.gib(),
    }


def _sandbox_notes(cfg: Config, warnings: list[str], notes: list[str]) -> None:
    """Where the model's code runs in a multi-turn code_math run, and whether the sandbox works on this machine."""
    if cfg.rollout.max_turns <= 1 or cfg.algorithm.reward != "code_math":
        return
    if cfg.sandbox.backend == "fusion":
        notes.append(
            "the model's code runs on the SandboxFusion server of sandbox.fusion_url (the plan does not "
            "contact it; `sftforge rl` runs one program there before loading the model)."
        )
        return
    try:
        check_sandbox(cfg.sandbox)
        notes.append(f"the model's code runs in sandbox.backend={cfg.sandbox.backend} (checked on this machine).")
    except ConfigError as e:
        warnings.append(f"the sandbox cannot run here, so `sftforge rl` would stop here: {e}")


def build_rl_plan(
    cfg: Config,
    prompt_lengths: list[int],
    counts: dict[str, int],
    *,
    shape: ModelShape | None = None,
    gpu_memory: int | None = None,
    val_prompts: int = 0,
) -> dict[str, Any]:
    """What ``sftforge rl`` will do, as one JSON-able dict: the rollout sizes, the step and token arithmetic of
    rl_loop (``prompt_lengths``: the rendered prompt of every training prompt or environment task after
    data.truncation; ``counts``: load_prompts' counts), the memory of its two phases and the warnings."""
    cfg = _planned_dtype(cfg)
    ws = world_size(cfg)
    errors = _rl_errors(cfg, ws)
    warnings: list[str] = []
    notes: list[str] = []
    out = _rl_sizes(cfg, prompt_lengths, counts, ws, val_prompts)
    _rl_prompt_warnings(cfg, out, warnings, notes)
    _rl_algorithm_warnings(cfg, warnings, notes)
    _rl_schedule_warnings(cfg, out, warnings)
    memory = _rl_memory(cfg, out, shape, gpu_memory, warnings) if shape is not None else None
    _sandbox_notes(cfg, warnings, notes)
    out["memory"] = memory
    out["warnings"], out["notes"], out["errors"] = warnings, notes, errors
    return out


def prompt_lengths(cfg: Config, tokenizer) -> tuple[list[int], dict[str, int]]:
    """(the token length of every prompt `sftforge rl` samples from, its counts): data.train_files' prompts after
    data.truncation, or each environment task's first prompt (system + the environment's first observation)."""
    if cfg.rollout.max_turns <= 1:
        prompts, counts = load_prompts(cfg, tokenizer)
        return [len(p.ids) for p in prompts], counts
    tasks, make_env, _ = load_env_tasks(cfg, check=False)  # build_rl_plan reports the sandbox
    kwargs = cfg.data.chat_template_kwargs
    lengths = []
    for task in tasks:
        messages = ([{"role": "system", "content": task.system}] if task.system else []) + [
            {"role": "user", "content": make_env().reset(task)}
        ]
        text = render_prompt(tokenizer, messages, task.tools, kwargs)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    over = sum(n > cfg.data.max_length for n in lengths)
    return lengths, {"rows": len(tasks), "over_max_length": over, "truncated": 0, "dropped": 0}


def rl_plan_from_config(cfg: Config, gpu_memory: str | int | None = None) -> tuple[dict[str, Any], list[int]]:
    """(the RL plan, the prompt lengths): reads and renders the prompts and the model's config; no weights."""
    gpu_memory = gpu_memory or cfg.trainer.gpu_memory or None
    mem = parse_memory(gpu_memory) if not isinstance(gpu_memory, int) else gpu_memory
    mem = mem if mem is not None else visible_gpu_memory()
    tok = load_tokenizer(cfg)
    lengths, counts = prompt_lengths(cfg, tok)
    val = len(file_rows(cfg.data.val_files, "data.val_files")) if cfg.data.val_files else 0
    shape = ModelShape.from_path(cfg.model.path, cfg.model.trust_remote_code, cfg.model.gguf_file)
    return build_rl_plan(cfg, lengths, counts, shape=shape, gpu_memory=mem, val_prompts=val), lengths


def _format_rl_steps(p: dict[str, Any], lengths: list[int] | None) -> list[str]:
    """The prompt, rollout, token and step lines of RL plan ``p``."""
    L, c = p["prompt_length"], p["prompt_counts"]
    what = "environment tasks" if p["multi_turn"] else "prompts"
    over = ""
    if c.get("over_max_length"):
        over = f"; over data.max_length {c['over_max_length']} (truncated {c['truncated']}, dropped {c['dropped']})"
    lines = [
        f"sftforge rl: {p['prompts']:,} {what} (algorithm.reward={p['reward']}); prompt tokens: min {L['min']}, "
        f"median {L['median']}, p95 {L['p95']}, max {L['max']}{over}",
    ]
    lines += _histogram_lines(lengths)
    turns = f"up to {p['max_new_tokens_per_turn']} new tokens"
    if p["multi_turn"]:
        turns = f"up to {p['max_turns']} turns × {p['max_new_tokens_per_turn']} new tokens"
    val = ""
    if p["val_prompts"]:
        val = f" of {p['val_prompts']} prompts × {p['val_responses'] // max(p['val_prompts'], 1)}"
    return lines + [
        f"rollout: {p['prompts_per_step']} prompts × {p['responses_per_prompt']} responses = {p['responses_per_step']} "
        f"per step ({p['responses_per_process']} per process over world size {p['world_size']}), each {turns}",
        f"tokens per step (at most): {p['generated_tokens_per_step_max']:,} generated, "
        f"{p['trained_tokens_per_step_max']:,} trained, {p['sequence_tokens_per_step_max']:,} in the update's "
        f"forward passes (sequences up to {p['sequence_tokens_max']:,} tokens)",
        f"steps: {p['steps_per_epoch']}/epoch, {p['total_steps']} total ({p['epochs']} epochs), "
        f"{p['optimizer_steps']} optimizer steps (algorithm.mini_batches {p['mini_batches']}), warmup "
        f"{p['warmup_steps']}; {p['dropped_per_epoch']} prompts left out per epoch",
        f"checkpoints: {p['num_checkpoints']}; validations: {p['num_validations']}{val}",
    ]


def _format_rl_memory(m: dict[str, Any]) -> list[str]:
    """The memory lines of an RL plan: the peak per GPU, then the update and generation phases."""
    extra = [
        f"rollout copy {m['rollout_copy_gib']:.2f}" if m["rollout_copy_gib"] else "",
        f"KL reference {m['reference_gib']:.2f}" if m["reference_gib"] else "",
    ]
    return [
        f"memory per GPU ({m['n_params'] / 1e6:,.1f}M params, {m['dtype']}): peak {m['total']:.2f} GiB"
        f"{_peak_suffix(m)}{_sharded_suffix(m)}",
        f"  update: {m['train_step_gib']:.2f} GiB ({m['tokens_per_micro_batch']:,} tokens/forward, "
        f"{m['supervised_per_micro_batch']:,} trained, "
        f"{'with' if m['gradient_checkpointing'] else 'no'} gradient checkpointing)",
        f"  generation: {m['rollout_gib']:.2f} GiB (KV cache {m['kv_cache_gib']:.2f} GiB for "
        f"{m['kv_cache_sequences']} sequences at once)"
        + (f"; both phases hold {', '.join(x for x in extra if x)} GiB" if any(extra) else ""),
    ]


def format_rl_plan(p: dict[str, Any], lengths: list[int] | None = None) -> str:
    """The text ``sftforge plan`` prints for RL plan ``p`` (``lengths``: the prompt lengths, for the histogram)."""
    lines = _format_rl_steps(p, lengths)
    if p.get("memory"):
        lines += _format_rl_memory(p["memory"])
    return "\n".join(lines + _message_lines(p))


def apply_preset(cfg: Config, path: str | None, overrides: list[str]) -> Config:
    """trainer.preset=auto for a training run: the plan's choice of micro-batch and gradient checkpointing, as
    overrides applied after the user's (the choice is printed with its reason)."""

    p, _ = plan_from_config(cfg)
    if "preset" not in p:
        say(
            "info: trainer.preset=auto: no GPU memory known (no GPU visible and trainer.gpu_memory empty); keeping "
            f"data.micro_batch_size_per_gpu={cfg.data.micro_batch_size_per_gpu}."
        )
        return cfg
    pr = p["preset"]
    chosen = [
        f"data.micro_batch_size_per_gpu={pr['micro_batch_size_per_gpu']}",
        f"model.enable_gradient_checkpointing={str(pr['enable_gradient_checkpointing']).lower()}",
    ]
    say(f"info: trainer.preset=auto: {' '.join(chosen)} — {pr['reason']}")
    return load_config(path, list(overrides) + chosen)


def plan_main(
    path: str | None,
    overrides: list[str],
    as_json: bool = False,
    gpu_memory: str | None = None,
    measure: bool = False,
    steps: int = 0,
    rl: bool | None = None,
) -> int:
    """``sftforge plan``; ``measure``: also run a few real steps here and print the measured times (measure.py);
    ``rl``: plan `sftforge rl` (None: when the config sets rollout.* or algorithm.* keys)."""
    imports_s = process_age_s() if measure else 0.0  # a fresh `sftforge train` pays it too (interpreter, torch, ...)
    cfg = load_config(path, overrides)
    check_loggers(cfg.trainer.logger)  # what `sftforge train` checks before loading anything, in the same words
    check_paths(cfg)
    if rl if rl is not None else is_rl_config(cfg):
        if measure:
            raise ConfigError(
                "--measure times `sftforge train` steps; to time `sftforge rl`, run it for two steps "
                "(trainer.max_steps=2) and read rollout_s / train tokens/s in its log."
            )
        p, lengths = rl_plan_from_config(cfg, gpu_memory)
        if rl is None and not as_json:
            say("info: planned as `sftforge rl` (the config sets rollout.* / algorithm.* keys; --rl forces it).")
        print(json.dumps(p, indent=2) if as_json else format_rl_plan(p, lengths))
        return 2 if p["errors"] else 0
    if measure and cfg.trainer.preset == "auto":  # the measured run is the run `sftforge train` would do
        cfg = apply_preset(cfg, path, overrides)
    p, lengths = plan_from_config(cfg, gpu_memory)
    if p["errors"]:  # `sftforge train` refuses this config: the plan shows what it can, then the same errors
        print(json.dumps(p, indent=2) if as_json else format_plan(p, lengths))
        return 2
    if measure:
        if not as_json:
            print(format_plan(p, lengths), flush=True)
            print(
                f"measuring: {min(p['total_steps'], WARMUP + (steps or DEFAULT_STEPS))} steps of this run here "
                "(in a temporary folder, removed after) ...",
                flush=True,
            )
        p["measured"] = run_measure(cfg, p, steps, imports_s)
        print(json.dumps(p, indent=2) if as_json else format_measured(p["measured"], p))
        return 0
    print(json.dumps(p, indent=2) if as_json else format_plan(p, lengths))
    return 0


__all__ = [
    "MemoryEstimate",
    "apply_preset",
    "ModelShape",
    "PresetChoice",
    "build_plan",
    "build_rl_plan",
    "format_rl_plan",
    "is_rl_config",
    "kv_cache_bytes",
    "rl_plan_from_config",
    "choose_preset",
    "estimate_memory",
    "format_plan",
    "micro_batch_tokens",
    "parse_memory",
    "plan_from_config",
    "plan_main",
    "world_size",
]
