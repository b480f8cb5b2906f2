"""AdamW with parameter groups, and learning-rate schedules as pure functions of the step.

The schedule has no state besides the step, so resuming only needs the step number: ``lr_at(step, total, cfg)``
gives the learning rate of optimizer step ``step`` (0-based) of ``total``.
"""

from __future__ import annotations

import math

import torch

from sftforge.config import OptimConfig


def _tied_embedding(model: torch.nn.Module) -> torch.nn.Parameter | None:
    try:
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if emb is not None and out is not None and emb.weight is out.weight:
        return emb.weight
    return None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and the rest (norms, biases, and the embedding when tied to the LM head)."""
    tied = _tied_embedding(model)
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():  # named_parameters() lists a shared tensor once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or p is tied or "norm" in name.lower():
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW runs on CPU and on accelerators with floating-point parameters."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; ``optim.implementation`` picks the kernel (the math is the same: fused
    and the per-parameter loop agree to float rounding, see tests/test_optim.py)."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, cfg.weight_decay)]
    groups = [g for g in groups if g["params"]]
    impl = getattr(cfg, "implementation", "auto")
    params = [p for g in groups for p in g["params"]]
    if impl == "auto":
        impl = "fused" if params and _fused_supported(params) else "foreach"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
    if impl not in kernel:
        raise ValueError(f"optim.implementation={impl!r} is not one of auto | fused | foreach | for_loop.")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kernel[impl])


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps > 0:
        return min(cfg.warmup_steps, total_steps)
    return min(int(round(cfg.warmup_ratio * total_steps)), total_steps)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of optim.lr at optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup rises linearly to 1 over the warmup steps (reaching 1 at the last one, never 0 at step 0); then cosine
    and linear fall to optim.min_lr_ratio at the last step, constant stays at 1, and wsd stays at 1 until the final
    optim.decay_ratio share of the steps, over which it falls linearly to min_lr_ratio.
    """
    w = warmup_steps(cfg, total_steps)
    if step < w:
        return (step + 1) / w
    lo = cfg.min_lr_ratio
    if cfg.lr_scheduler == "constant":
        return 1.0
    if cfg.lr_scheduler == "wsd":
        n_decay = max(1, int(round(cfg.decay_ratio * total_steps))) if cfg.decay_ratio > 0 else 0
        start = total_steps - n_decay
        if n_decay == 0 or step < start:
            return 1.0
        return 1.0 - (1.0 - lo) * min(1.0, (step - start + 1) / n_decay)
    span = total_steps - w - 1
    p = 1.0 if span <= 0 else min(1.0, (step - w) / span)
    if cfg.lr_scheduler == "linear":
        return 1.0 - (1.0 - lo) * p
    if cfg.lr_scheduler == "cosine":
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"optim.lr_scheduler={cfg.lr_scheduler!r} is not one of cosine | linear | constant | wsd.")


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    return cfg.lr * lr_factor(step, total_steps, cfg)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


__all__ = ["build_optimizer", "lr_at", "lr_factor", "param_groups", "set_lr", "warmup_steps"]
