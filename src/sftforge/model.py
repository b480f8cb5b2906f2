"""Load a Hugging Face causal LM: pretrained weights (local folder or hub id) or a config-only folder (random init).

Master weights are always fp32; model.dtype=bf16 means the forward pass runs under bf16 autocast (see
:func:`autocast`), so the optimizer updates and its state stay fp32. Weights are read from safetensors only.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch

from sftforge.config import ConfigError, ModelConfig

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


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model in fp32 on ``device``, in train mode, with use_cache off (and gradient checkpointing if asked)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_options(cfg)
    common = {"trust_remote_code": cfg.trust_remote_code, "attn_implementation": cfg.attn_implementation}
    local = Path(cfg.path)
    try:
        if local.is_dir() and not has_weights(local):
            if any(local.glob("*.bin")) or any(local.glob("*.pt")) or any(local.glob("*.pth")):
                raise ConfigError(
                    f"model.path={cfg.path!r} holds pickled weights (.bin/.pt) but no .safetensors; sftforge only loads "
                    "safetensors. Convert them (e.g. load and save_pretrained with transformers) first."
                )
            if not (local / "config.json").exists():
                raise ConfigError(f"model.path={cfg.path!r} has neither weights nor a config.json.")
            config = AutoConfig.from_pretrained(str(local), trust_remote_code=cfg.trust_remote_code)
            with _seeded(cfg.init_seed):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **common)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32, use_safetensors=True, **common)
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
    model.to(device)
    model.train()
    return model


@contextlib.contextmanager
def _seeded(seed: int):
    """Random init from model.init_seed without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def autocast(dtype: str, device: torch.device | str):
    """bf16 autocast for model.dtype=bf16; a no-op context for fp32."""
    device_type = torch.device(device).type
    if dtype == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bf16" else torch.float32


__all__ = ["autocast", "check_attn_implementation", "check_model_options", "compute_dtype", "has_weights", "load_model"]
