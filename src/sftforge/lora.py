"""LoRA (through peft) and freezing, applied by a function to a plain loaded model; LoRA-aware HF export.

``prepare_model`` is called once after :func:`sftforge.model.load_model`: it wraps the model with peft LoRA adapters
(model.lora.rank > 0) or freezes parameters by regex (model.trainable / model.frozen), and returns a table of frozen
vs trainable parameters. The optimizer is then built over ``requires_grad`` parameters only, so frozen parameters get
no optimizer state. Checkpoints keep holding every weight (base + adapter), so resume stays exact with LoRA too.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sftforge.config import ConfigError, ModelConfig


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

    targets = list(cfg.lora.target_modules) or ["all-linear"]
    target = "all-linear" if targets == ["all-linear"] else targets
    lcfg = LoraConfig(
        r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=target,
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    try:  # adapters initialized from model.init_seed: the same run gets the same adapters whatever came before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            return get_peft_model(model, lcfg)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"model.lora.target_modules={targets}: {e} Linear layers here: {names}.") from None


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


# --- export -----------------------------------------------------------------------------------------------------------


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA delta added to its base weight, without changing ``model``."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    lora_modules = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            owner, _, leaf = key.partition(".base_layer.")
            module = lora_modules[owner]
            if leaf == "weight":
                value = value.detach().clone()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        value += module.get_delta_weight(adapter).to(value.dtype)
            key = f"{owner}.{leaf}"
        out[key] = value
    return out


def save_adapter(model: torch.nn.Module, out_dir: str | Path, base_path: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if base_path:
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = base_path
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU PeftModel like ``model`` (whose parameters are FSDP2 shards) holding its full weights
    ``state_dict`` (:func:`sftforge.checkpoint.gather_full_state_dict`, keyed like ``model.state_dict()``), so that
    the merge and the adapter files come from the same peft code as on one process. The copy is built on the meta
    device and takes the tensors of ``state_dict`` as they are: nothing is initialized or copied."""
    import copy

    from peft import get_peft_model

    if len(model.peft_config) != 1:
        raise ConfigError(f"exporting a sharded LoRA model supports one adapter, found {sorted(model.peft_config)}.")
    (adapter, lcfg), base = next(iter(model.peft_config.items())), model.get_base_model()
    with torch.device("meta"):
        plain = get_peft_model(type(base)(base.config), copy.deepcopy(lcfg), adapter_name=adapter)
    weights, first = dict(state_dict), {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: every name gets the one tensor
        first.setdefault(id(p), name)
        weights.setdefault(name, state_dict[first[id(p)]])
    plain.load_state_dict(weights, strict=True, assign=True)
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary frequencies) are not in a state dict
        owner, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(owner), leaf, buf.detach().to("cpu"))
    return plain.eval()


def export_model(model, out_dir, tokenizer=None, eos_token_ids=None, dtype=torch.float32, *, merge=True, adapter_dir=None,
                 base_path: str = "", state_dict=None) -> Path:  # fmt: skip
    """HF export of a plain or LoRA model. LoRA: ``merge`` writes the merged full model to ``out_dir`` (and the
    adapter to ``adapter_dir`` when given); without ``merge`` the adapter alone goes to ``out_dir``. ``state_dict``:
    the full weights when ``model``'s parameters are FSDP2 shards (gathered on this rank beforehand)."""
    from sftforge.checkpoint import export_hf

    if not is_peft(model):
        return export_hf(model, out_dir, tokenizer, eos_token_ids, dtype, state_dict=state_dict)
    if state_dict is not None:
        model = unsharded_copy(model, state_dict)
    if not merge:
        out = save_adapter(model, out_dir, base_path)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        return out
    out = export_hf(
        model.get_base_model(), out_dir, tokenizer, eos_token_ids, dtype, state_dict=merged_state_dict(model)
    )
    if adapter_dir is not None:
        save_adapter(model, adapter_dir, base_path)
    return out


def export_checkpoint(ckpt: str | Path, output: str | Path, merge: bool = False) -> Path:
    """``sftforge export``: a step_<N> checkpoint (or a run folder: its newest complete checkpoint) to an HF folder."""
    from transformers import AutoTokenizer

    from sftforge.checkpoint import is_complete, latest_checkpoint, load_any
    from sftforge.config import load_config
    from sftforge.model import compute_dtype, load_model
    from sftforge.train import _eos_ids

    p = Path(ckpt)
    if not p.is_dir():
        raise ConfigError(f"{p} is not a folder: give a step_<N> checkpoint or a run's trainer.output_dir.")
    if not is_complete(p):
        newest = latest_checkpoint(p)
        if newest is None:
            raise ConfigError(f"{p} is neither a complete step_<N> checkpoint nor a folder holding one.")
        p = newest
    if not (p / "config.yaml").exists():
        raise ConfigError(f"{p / 'config.yaml'} is missing: cannot tell which model the checkpoint belongs to.")
    cfg = load_config(p / "config.yaml")
    if not (p / "model.safetensors").is_file() and not (p / "dcp").is_dir():
        raise ConfigError(
            f"{p} holds neither model.safetensors (written by one process) nor dcp/ (a distributed checkpoint, written "
            "by several): nothing to export. Give a complete step_<N> folder written by sftforge train."
        )
    model = prepare_model(load_model(cfg.model, "cpu"), cfg.model)
    load_any(p, model, None, restore_rng=False)  # one-process safetensors, or DCP shards of any world size
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
    return export_model(model, output, tokenizer, _eos_ids(tokenizer, cfg), compute_dtype(cfg.model.dtype),
                        merge=merge, base_path=cfg.model.path)  # fmt: skip


__all__ = [
    "apply_freezing",
    "apply_lora",
    "check_trainable_options",
    "export_checkpoint",
    "export_model",
    "is_peft",
    "merged_state_dict",
    "parameter_report",
    "prepare_model",
    "render_report",
    "save_adapter",
    "unsharded_copy",
]
