"""Load a Hugging Face causal LM: pretrained weights (local folder or hub id) or a config-only folder (random init).

Master weights are always fp32; model.dtype=bf16 means the forward pass runs under bf16 autocast (see
:func:`autocast`; FSDP2: its mixed precision), so the optimizer updates and its state stay fp32. model.dtype=auto (the
default) is bf16 on a GPU that supports it and fp32 on the CPU (:func:`resolve_dtype`). Weights are read from safetensors only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from pathlib import Path

import torch

from sftforge.config import Config, ConfigError, ModelConfig

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def has_weights(path: str | Path) -> bool:
    p = Path(path)
    return any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()


def check_attn_implementation(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation must be one of {' | '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}.")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package: pip install flash-attn "
            "(CUDA only), or set model.attn_implementation=sdpa."
        )


def check_model_options(cfg: ModelConfig) -> None:
    """What can be checked without loading anything: model.path set and, when it is a local path, present;
    model.attn_implementation valid and its package installed."""
    if not cfg.path:
        raise ConfigError("Set model.path to a model folder, a hub id, or a folder with only config.json.")
    for key in ("path", "tokenizer_path"):
        value = getattr(cfg, key)
        if value and _looks_local(value) and not Path(value).expanduser().exists():
            raise ConfigError(
                f"model.{key}={value!r} does not exist; point it to a model folder or a hub id (org/name)."
            )
    check_attn_implementation(cfg.attn_implementation)


def _looks_local(path: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything absolute, relative with ./ ../ ~, or deeper is a local path."""
    return path.startswith(("/", ".", "~", "\\")) or path.count("/") > 1 or (len(path) > 1 and path[1] == ":")


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu", *, skeleton: bool = False) -> torch.nn.Module:
    """The model in fp32 on ``device``, in train mode, with use_cache off (and gradient checkpointing if asked).

    ``skeleton``: the same module tree on the meta device, without reading or initializing any weight (FSDP2's
    ranks other than 0 build this; their shards come from rank 0, see parallel.materialize_from_rank0)."""
    from transformers import AutoConfig

    check_model_options(cfg)
    common = {"trust_remote_code": cfg.trust_remote_code, "attn_implementation": cfg.attn_implementation}
    local = Path(cfg.path)
    try:
        if skeleton:
            config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
            with torch.device("meta"):
                model = auto_class(config).from_config(config, dtype=torch.float32, **common)
        elif local.is_dir() and not has_weights(local):
            if any(local.glob("*.bin")) or any(local.glob("*.pt")) or any(local.glob("*.pth")):
                raise ConfigError(
                    f"model.path={cfg.path!r} holds pickled weights (.bin/.pt) but no .safetensors; sftforge only loads "
                    "safetensors. Convert them (e.g. load and save_pretrained with transformers) first."
                )
            if not (local / "config.json").exists():
                raise ConfigError(f"model.path={cfg.path!r} has neither weights nor a config.json.")
            config = AutoConfig.from_pretrained(str(local), trust_remote_code=cfg.trust_remote_code)
            with _seeded(cfg.init_seed):
                model = auto_class(config).from_config(config, dtype=torch.float32, **common)
        else:
            config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
            model = auto_class(config).from_pretrained(cfg.path, dtype=torch.float32, use_safetensors=True, **common)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"model.path={cfg.path!r}: could not load the model ({type(e).__name__}: {e}).") from None
    model.config.use_cache = False
    if cfg.enable_gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not skeleton:
        model.to(device)
    model.train()
    return model


def is_vision_language(config) -> bool:
    """A model with a vision tower (Qwen2.5-VL, Qwen3-VL, ...): its config has a vision_config."""
    return getattr(config, "vision_config", None) is not None


def auto_class(config):
    """transformers' auto class for ``config``: image-text-to-text for a vision-language model, else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


@contextlib.contextmanager
def _seeded(seed: int):
    """Random init from model.init_seed without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """model.dtype=auto: bf16 on a GPU that computes in bf16 (Ampere and newer), fp32 elsewhere (the CPU, whose bf16
    matmuls are slower than fp32 ones on most machines)."""
    if dtype != "auto":
        return dtype
    d = torch.device(device)
    return "bf16" if d.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def with_dtype(cfg: Config, device: torch.device | str) -> Config:
    """``cfg`` with model.dtype resolved for ``device`` (see :func:`resolve_dtype`) and checked against the
    attention: flash-attn computes in bf16/fp16 only."""
    dtype = resolve_dtype(cfg.model.dtype, device)
    check_attn_implementation(cfg.model.attn_implementation)  # a missing flash-attn first: the more basic fix
    if cfg.model.attn_implementation == "flash_attention_2" and dtype == "fp32":
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 computes in bf16 only and model.dtype is fp32 here: set "
            "model.dtype=bf16 (or auto on a GPU), or model.attn_implementation=sdpa."
        )
    if dtype == cfg.model.dtype:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))


def enable_tf32(device: torch.device, dtype: str) -> bool:
    """fp32 compute on a GPU: matmuls and convolutions in TF32 (10-bit mantissa inputs, fp32 accumulation), as
    most trainers do; returns whether it was switched on."""
    if torch.device(device).type != "cuda" or dtype != "fp32":
        return False
    torch.set_float32_matmul_precision("high")  # the API every torch >= 2.6 has (newer: fp32_precision="tf32")
    return True


def autocast(dtype: str, device: torch.device | str):
    """bf16 autocast for model.dtype=bf16; a no-op context for fp32."""
    device_type = torch.device(device).type
    if dtype == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bf16" else torch.float32


__all__ = ["auto_class", "is_vision_language", "autocast", "check_attn_implementation", "check_model_options", "compute_dtype", "enable_tf32", "has_weights",
           "load_model", "resolve_dtype", "with_dtype"]  # fmt: skip
