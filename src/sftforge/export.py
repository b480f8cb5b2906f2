"""The Hugging Face export: a folder ``AutoModelForCausalLM.from_pretrained`` loads (``final/``, ``sftforge export``).

Plain models are saved as they are; LoRA models merged (adapters added to their base weights, with the adapter saved
beside) or as the adapter alone; FSDP2 shards are gathered beforehand (checkpoint.gather_full_state_dict) and passed
as ``state_dict``. generation_config.json names the end-of-turn tokens, so ``generate`` stops after an assistant turn.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, PreTrainedModel

from sftforge.chat import end_of_turn_token_ids
from sftforge.checkpoint import child, is_complete, latest_checkpoint, load_any
from sftforge.config import ConfigError, load_config
from sftforge.data import load_tokenizer
from sftforge.lora import is_peft, prepare_model
from sftforge.model import build_model, compute_dtype, load_model
from sftforge.model_files import gguf_location
from sftforge.vision import load_vision


def generation_eos_ids(tokenizer, template_kwargs: dict | None = None) -> list[int]:
    """The tokens ``generate`` stops at: the template's end-of-turn token(s) and the tokenizer's eos."""
    if tokenizer is None:
        return []
    try:
        return end_of_turn_token_ids(tokenizer, template_kwargs)
    except Exception:  # a tokenizer without a chat template: its eos only
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def export_hf(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    eos_token_ids: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    state_dict: dict[str, torch.Tensor] | None = None,
    vision=None,
) -> Path:
    """Save a folder ``AutoModelForCausalLM.from_pretrained`` loads: safetensors, config, tokenizer, generation config
    (a vision-language model: ``AutoModelForImageTextToText``, with the image processor's preprocessor_config.json).

    generation_config.eos_token_id lists ``eos_token_ids`` (the template's end-of-turn token and the tokenizer's eos),
    so ``generate`` stops at the end of an assistant turn.
    """
    out = Path(out_dir)
    child(out.parent, out.name)
    out.mkdir(parents=True, exist_ok=True)
    # state_dict: full weights gathered from FSDP2 shards (see gather_full_state_dict); else the model's own
    source = model.state_dict() if state_dict is None else state_dict
    state_dict = {k: v.detach().to("cpu", dtype) for k, v in source.items()}
    old_dtype = getattr(model.config, "dtype", None)
    model.config.use_cache, model.config.dtype = True, dtype
    try:
        model.save_pretrained(str(out), state_dict=state_dict)
    finally:
        model.config.use_cache, model.config.dtype = False, old_dtype
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if vision is not None:
        vision.save(out)
    gen = GenerationConfig.from_model_config(model.config)
    gen.use_cache = True  # (training turns the cache off in model.config; generate() with the export needs it)
    if eos_token_ids:
        gen.eos_token_id = list(eos_token_ids)
    if tokenizer is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(str(out))
    return out


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


def export_module(
    model: torch.nn.Module, out_dir, tokenizer=None, run_config: dict | None = None, state_dict: dict | None = None
) -> Path:
    """The export of a module that is not a transformers model (model.builder): ``model.safetensors`` (every
    weight), ``trainable.safetensors`` (only the trained ones), ``config.yaml`` (the resolved config, without
    model.init_checkpoint: the weights are here) and the tokenizer. :func:`load_trained` rebuilds it."""
    out = Path(out_dir)
    child(out.parent, out.name)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft(model):  # LoRA on a built module: its weights with the adapters merged; trainable = the adapters
        if state_dict is not None:
            model = unsharded_copy(model, state_dict)
        adapters = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
        source, model = merged_state_dict(model), model.get_base_model()
    else:
        source = model.state_dict() if state_dict is None else state_dict
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        adapters = {k: v for k, v in source.items() if k in trained}
    full = {k: v.detach().to("cpu").clone().contiguous() for k, v in source.items()}  # (tied weights: one copy each)
    save_file(full, str(out / "model.safetensors"))
    save_file(
        {k: v.detach().to("cpu").clone().contiguous() for k, v in adapters.items()}, str(out / "trainable.safetensors")
    )
    if run_config is not None:
        cfg = copy.deepcopy(run_config)
        cfg.setdefault("model", {})["init_checkpoint"] = ""
        (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_trained(folder: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A module exported by :func:`export_module`, rebuilt from its config.yaml (model.builder) and loaded."""
    folder = Path(folder)
    cfg = load_config(folder / "config.yaml")
    model = build_model(cfg, device)
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
    return model.eval()


def is_built_module(folder: str | Path) -> bool:
    """A folder :func:`export_module` wrote (config.yaml + model.safetensors, no config.json)."""
    p = Path(folder)
    return (p / "config.yaml").is_file() and (p / "model.safetensors").is_file() and not (p / "config.json").exists()


def export_model(
    model,
    out_dir,
    tokenizer=None,
    eos_token_ids=None,
    dtype=torch.float32,
    *,
    merge=True,
    adapter_dir=None,
    base_path: str = "",
    state_dict=None,
    vision=None,
    run_config: dict | None = None,
) -> Path:
    """HF export of a plain or LoRA model. LoRA: ``merge`` writes the merged full model to ``out_dir`` (and the
    adapter to ``adapter_dir`` when given); without ``merge`` the adapter alone goes to ``out_dir``. ``state_dict``:
    the full weights when ``model``'s parameters are FSDP2 shards (gathered on this rank beforehand). A module that
    is not a transformers model (model.builder): :func:`export_module`."""
    inner = model.get_base_model() if is_peft(model) else model
    if not isinstance(inner, PreTrainedModel):
        return export_module(model, out_dir, tokenizer, run_config, state_dict)
    if not is_peft(model):
        return export_hf(model, out_dir, tokenizer, eos_token_ids, dtype, state_dict=state_dict, vision=vision)
    if state_dict is not None:
        model = unsharded_copy(model, state_dict)
    if not merge:
        out = save_adapter(model, out_dir, base_path)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        if vision is not None:
            vision.save(out)
        return out
    out = export_hf(
        model.get_base_model(),
        out_dir,
        tokenizer,
        eos_token_ids,
        dtype,
        state_dict=merged_state_dict(model),
        vision=vision,
    )
    if adapter_dir is not None:
        save_adapter(model, adapter_dir, base_path)
    return out


def export_checkpoint(ckpt: str | Path, output: str | Path, merge: bool = False) -> Path:
    """``sftforge export``: a step_<N> checkpoint (or a run folder: its newest complete checkpoint) to an HF folder."""
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
    cfg = load_config(p / "config.yaml", ["model.init_checkpoint="])  # (the weights come from the checkpoint)
    if not (p / "model.safetensors").is_file() and not (p / "dcp").is_dir():
        raise ConfigError(
            f"{p} holds neither model.safetensors (written by one process) nor dcp/ (a distributed checkpoint, written "
            "by several): nothing to export. Give a complete step_<N> folder written by sftforge train."
        )
    model = prepare_model(build_model(cfg, "cpu"), cfg.model)
    load_any(p, model, None, restore_rng=False)  # one-process safetensors, or DCP shards of any world size
    model.eval()
    tokenizer = load_tokenizer(cfg)  # with data.chat_template when the run set one
    return export_model(
        model,
        output,
        tokenizer,
        generation_eos_ids(tokenizer, cfg.data.chat_template_kwargs),
        compute_dtype(cfg.model.dtype),
        merge=merge,
        base_path=cfg.model.path,
        vision=load_vision(cfg, tokenizer),
        run_config=yaml.safe_load((p / "config.yaml").read_text()),
    )


def export_gguf(source: str | Path, output: str | Path, dtype: str = "fp32") -> Path:
    """``sftforge export model.gguf OUT/``: a GGUF model (the file, or a folder with one) as a safetensors folder that
    ``from_pretrained`` loads without the gguf package: weights dequantized to ``dtype``, config with no quantization
    flag, tokenizer with its chat template, generation_config stopping at the template's end of turn."""
    cfg = load_config(None, {"model.path": str(source), "model.dtype": dtype})
    if gguf_location(cfg.model.path) is None:
        raise ConfigError(f"{source} is neither a .gguf file nor a folder holding one (or a step_<N> checkpoint).")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder: give a new folder to write.")
    model = load_model(cfg.model, "cpu")
    model.eval()
    tokenizer = load_tokenizer(cfg)
    return export_hf(model, out, tokenizer, generation_eos_ids(tokenizer), compute_dtype(dtype))


__all__ = [
    "export_gguf",
    "export_checkpoint",
    "export_hf",
    "export_model",
    "export_module",
    "is_built_module",
    "load_trained",
    "generation_eos_ids",
    "merged_state_dict",
    "save_adapter",
    "unsharded_copy",
]
