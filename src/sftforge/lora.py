"""LoRA (through peft) and freezing, applied by a function to a plain loaded model; LoRA-aware HF export.

``prepare_model`` is called once after :func:`sftforge.model.load_model`: it wraps the model with peft LoRA adapters
(model.lora.rank > 0; on a vision-language model, by default, the language model's linear layers only) or freezes parameters by regex (model.trainable / model.frozen), and returns a table of frozen
vs trainable parameters. The optimizer is then built over ``requires_grad`` parameters only, so frozen parameters get
no optimizer state. Checkpoints keep holding every weight (base + adapter), so resume stays exact with LoRA too.
"""

from __future__ import annotations

import re

import torch

from sftforge.config import ConfigError, ModelConfig
from sftforge.loss import multimodal_body
from sftforge.model import is_vision_language


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def check_trainable_options(cfg: ModelConfig) -> None:
    if cfg.trainable and cfg.frozen:
        raise ConfigError(
            f"Set model.trainable ({cfg.trainable}) or model.frozen ({cfg.frozen}), not both: trainable freezes "
            "everything else, frozen trains everything else."
        )
    if cfg.lora.rank < 0:
        raise ConfigError(f"model.lora.rank must be >= 0 (0 = no LoRA), got {cfg.lora.rank}.")
    if cfg.lora.rank > 0 and (cfg.trainable or cfg.frozen):
        raise ConfigError(
            "model.lora.rank > 0 trains only the LoRA adapters; unset model.trainable/model.frozen, or set "
            "model.lora.rank=0 to train the selected base parameters."
        )
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {cfg.lora.dropout}.")


def apply_lora(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """The model wrapped in a peft ``PeftModel`` with fresh adapters; only the adapters require grad."""
    from peft import LoraConfig, get_peft_model
    from transformers import PreTrainedModel

    targets = list(cfg.lora.target_modules) or ["all-linear"]
    target = "all-linear" if targets == ["all-linear"] else targets
    hf = isinstance(model, PreTrainedModel)
    if target == "all-linear" and (not hf or is_vision_language(model.config)):
        # the vision tower and its projector keep their weights; a module of one's own (model.builder): every Linear
        # but the LM head (peft's all-linear only knows transformers models)
        target = language_model_linears(model) if hf else linears_but_head(model)
    lcfg = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target,
        bias="none",
        task_type="CAUSAL_LM" if hf else None,
    )
    try:  # adapters initialized from model.init_seed: the same run gets the same adapters whatever came before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            return get_peft_model(model, lcfg)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"model.lora.target_modules={targets}: {e} Linear layers here: {names}.") from None


def language_model_linears(model: torch.nn.Module) -> str:
    """peft target (a regex over module names) for every Linear of a vision-language model except the vision
    tower's, the projector's (the multimodal model's children other than the decoder) and the LM head."""
    body, decoder, head = multimodal_body(model), model.get_decoder(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    skip = [names[id(c)] for _, c in body.named_children() if c is not decoder]
    leafs = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and not any(n.startswith(s + ".") for s in skip)
        }
    )
    return rf"^(?!(?:{'|'.join(map(re.escape, skip))})\.).*\.(?:{'|'.join(map(re.escape, leafs))})$"


def linears_but_head(model: torch.nn.Module) -> str:
    """peft target (a regex over module names) for every Linear of ``model`` except its output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    if not names:
        raise ConfigError(f"model.lora: {type(model).__name__} has no Linear layer to put adapters on.")
    return "^(?:" + "|".join(map(re.escape, names)) + ")$"


def apply_freezing(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """model.trainable: only matching parameters train; model.frozen: matching parameters are frozen."""
    patterns = cfg.trainable or cfg.frozen
    if not patterns:
        return
    key = "model.trainable" if cfg.trainable else "model.frozen"
    names = [n for n, _ in model.named_parameters()]
    compiled = []
    for pat in patterns:
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise ConfigError(f"{key}: {pat!r} is not a valid regular expression ({e}).") from None
        if not any(rx.search(n) for n in names):
            shown = ", ".join(names[:3] + names[-3:])
            raise ConfigError(
                f"{key}: pattern {pat!r} matches no parameter name. Names look like: {shown} "
                f"({len(names)} parameters; patterns are Python regexes searched anywhere in the name)."
            )
        compiled.append(rx)
    for name, p in model.named_parameters():
        hit = any(rx.search(name) for rx in compiled)
        p.requires_grad_(hit if cfg.trainable else not hit)


def parameter_report(model: torch.nn.Module) -> dict[str, int]:
    counts = {"trainable": 0, "frozen": 0, "trainable_tensors": 0, "frozen_tensors": 0}
    for _, p in model.named_parameters():  # a tied weight is listed once
        kind = "trainable" if p.requires_grad else "frozen"
        counts[kind] += p.numel()
        counts[f"{kind}_tensors"] += 1
    return counts


def render_report(counts: dict[str, int], title: str = "parameters"):
    from rich.table import Table

    total = max(counts["trainable"] + counts["frozen"], 1)
    table = Table(title=title)
    for col in ("", "tensors", "parameters", "share"):
        table.add_column(col, justify="left" if not col else "right")
    for kind in ("trainable", "frozen"):
        n = counts[kind]
        table.add_row(kind, str(counts[f"{kind}_tensors"]), f"{n:,}", f"{n / total:.2%}")
    return table


def prepare_model(model: torch.nn.Module, cfg: ModelConfig, console=None) -> torch.nn.Module:
    """LoRA or freezing per ``cfg`` (a no-op for full fine-tuning); prints the frozen/trainable table when a
    ``console`` (rich) is given and anything is frozen."""
    check_trainable_options(cfg)
    if cfg.lora.rank > 0:
        model = apply_lora(model, cfg)
        if getattr(cfg, "enable_gradient_checkpointing", False) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    else:
        apply_freezing(model, cfg)
    counts = parameter_report(model)
    if counts["trainable"] == 0:
        raise ConfigError("No parameter is trainable: check model.trainable / model.frozen.")
    if console is not None and counts["frozen"]:
        console.print(render_report(counts, "LoRA" if cfg.lora.rank > 0 else "frozen vs trainable parameters"))
    return model


__all__ = [
    "apply_freezing",
    "apply_lora",
    "check_trainable_options",
    "is_peft",
    "parameter_report",
    "prepare_model",
    "render_report",
]
