"""Load a Hugging Face causal LM: pretrained weights (local folder or hub id) or a config-only folder (random init).

Master weights are always fp32; model.dtype=bf16 means the forward pass runs under bf16 autocast (see
:func:`autocast`; FSDP2: its mixed precision), so the optimizer updates and its state stay fp32. model.dtype=auto (the
default) is bf16 on a GPU that supports it and fp32 on the CPU (:func:`resolve_dtype`). Weights are read from safetensors only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from sftforge.config import Config, ConfigError, ModelConfig
from sftforge.loss import has_fast_path
from sftforge.model_files import check_gguf_packages, drop_quantizer, gguf_location, pretrained_args

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
    """What can be checked without loading anything: model.path set (or model.builder) and, when it is a local
    path, present; model.builder and model.init_checkpoint well formed; model.attn_implementation valid and its
    package installed."""
    if not cfg.path and not cfg.builder:
        raise ConfigError(
            "Set model.path to a model folder, a hub id, or a folder with only config.json (or "
            "model.builder to build your own module)."
        )
    if cfg.builder:
        _builder_parts(cfg.builder)
    if cfg.init_checkpoint and not Path(cfg.init_checkpoint).expanduser().is_file():
        raise ConfigError(
            f"model.init_checkpoint={cfg.init_checkpoint!r} is not a file: give a .safetensors file or "
            "a .pt/.pth state dict."
        )
    for key in ("path", "tokenizer_path"):
        value = getattr(cfg, key)
        where = Path(value).expanduser()
        if value and _looks_local(value) and not where.exists():
            raise ConfigError(
                f"model.{key}={value!r} does not exist; point it to a model folder, a .gguf file or a hub id (org/name)."
            )
        gguf = gguf_location(value, cfg.gguf_file if key == "path" or not cfg.path else "", f"model.{key}")
        if gguf is not None:
            check_gguf_packages(f"model.{key}={value!r}")
            continue
        if value and where.is_file():
            raise ConfigError(
                f"model.{key}={value!r} is a file; give the model's folder (config.json, weights, "
                "tokenizer files), a .gguf file or a hub id (org/name)."
            )
        if value and where.is_dir() and not any((where / f).is_file() for f in _MODEL_FILES):
            raise ConfigError(
                f"model.{key}={value!r} is a folder with no config.json, no tokenizer files and no .gguf "
                "file; give the model's folder (a Hugging Face save_pretrained folder) or a hub id "
                "(org/name)."
            )
    if cfg.gguf_file and not cfg.path:
        raise ConfigError("model.gguf_file is set but model.path is empty: set model.path to the folder that holds it.")
    check_attn_implementation(cfg.attn_implementation)


_MODEL_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "adapter_config.json")


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
    source, gguf = pretrained_args(cfg.path, cfg.gguf_file)
    try:
        if skeleton:
            config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **gguf)
            with torch.device("meta"):
                model = auto_class(config).from_config(config, dtype=torch.float32, **common)
        elif gguf:  # dequantized to fp32 by transformers' GGUF reader; then a plain model
            config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **gguf)
            model = auto_class(config).from_pretrained(source, dtype=torch.float32, **gguf, **common)
            drop_quantizer(model)
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


def build_model(
    cfg: Config, device: str | torch.device = "cpu", *, skeleton: bool = False, notes: list | None = None
) -> torch.nn.Module:
    """The module to train: model.path's model (:func:`load_model`; None when model.path is empty) given to
    model.builder when set, then model.init_checkpoint's weights loaded into it. ``notes``: lines for the run log."""
    m = cfg.model
    check_model_options(m)
    base = load_model(m, device, skeleton=skeleton) if m.path else None
    model = base
    if m.builder:
        fn = import_builder(m.builder)
        with _seeded(m.init_seed):  # the new modules' random init: the same on every rank and every run
            model = fn(base, cfg)
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model.builder={m.builder!r} returned {type(model).__name__}, not a torch.nn.Module.")
        if not skeleton:
            model.to(device)
        model.train()
        if notes is not None:
            n = sum(p.numel() for p in model.parameters())
            notes.append(
                f"model.builder: {m.builder} built {type(model).__name__} ({n:,} parameters)"
                + (
                    ""
                    if has_fast_path(model)
                    else (
                        "; it has no get_decoder()/get_output_embeddings(): "
                        "the loss computes full logits (slower, more memory; see docs/custom-models.md)"
                    )
                )
            )
    if m.init_checkpoint:
        line = load_init_checkpoint(model, m.init_checkpoint, m.init_checkpoint_strict)
        if notes is not None:
            notes.append(line)
    return model


def _builder_parts(spec: str) -> tuple[str, str]:
    """(module or file, function) of model.builder; a file that is not there is an error here, before any loading."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ConfigError(f"model.builder={spec!r}: expected package.module:function or path/to/file.py:function.")
    if _is_file_form(target) and not Path(target).expanduser().is_file():
        raise ConfigError(
            f"model.builder={spec!r}: {Path(target).expanduser()} is not a file (relative paths start "
            "at the current folder)."
        )
    return target, name


def _is_file_form(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def import_builder(spec: str):
    """The function model.builder names, imported now (a module by name, or a .py file by path)."""
    target, name = _builder_parts(spec)
    try:
        if _is_file_form(target):
            path = Path(target).expanduser()
            mod_name = f"sftforge_builder_{path.stem}"
            loader = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[mod_name] = module  # (pickling, dataclasses and torch.compile look modules up by name)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"model.builder={spec!r}: importing {target} failed ({type(e).__name__}: {e}).") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"model.builder={spec!r}: {target} has no function {name!r}.")
    return fn


def read_state_dict(path: str | Path, key: str = "model.init_checkpoint") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a weights-only .pt/.pth pickle (``{"state_dict": ...}`` / ``{"model":
    ...}`` wrappers and DDP's ``module.`` prefix are taken off)."""
    import pickle

    p = Path(path).expanduser()
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    if p.suffix not in (".pt", ".pth", ".bin"):
        raise ConfigError(f"{key}={str(path)!r}: expected a .safetensors, .pt or .pth file.")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "global" in ln), str(e)[:200])
        raise ConfigError(
            f"{key}={str(path)!r} was NOT loaded: it is a pickle that needs code to load, which sftforge never runs "
            f"(torch.load(weights_only=True): {why}). Save a plain state dict instead: torch.save(model.state_dict(), "
            "path), or safetensors."
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ConfigError(f"{key}={str(path)!r} cannot be read ({type(e).__name__}: {e}).") from None
    if isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
        sd = next((sd[w] for w in ("state_dict", "model", "module") if isinstance(sd.get(w), dict)), sd)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{key}={str(path)!r} is not a state dict (a mapping of names to tensors).")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_init_checkpoint(model: torch.nn.Module, path: str, strict: bool = True) -> str:
    """Load ``path`` into ``model``; missing/unexpected keys are an error when ``strict``. Returns the log line."""
    sd = read_state_dict(path)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes that differ
        raise ConfigError(f"model.init_checkpoint={path!r} does not fit the model: {str(e)[:1500]}") from None

    def shown(keys):
        return ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")

    problems = [f"missing in the file: {shown(missing)}"] * bool(missing) + [
        f"in the file but not in the model: {shown(unexpected)}"
    ] * bool(unexpected)
    if problems and strict:
        raise ConfigError(
            f"model.init_checkpoint={path!r}: {'; '.join(problems)}. Fix the names, or set "
            "model.init_checkpoint_strict=false to load what matches."
        )
    line = f"model.init_checkpoint: {len(sd) - len(unexpected):,} tensors loaded from {path}"
    return line + (f" (warning: {'; '.join(problems)})" if problems else "")


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


__all__ = [
    "auto_class",
    "build_model",
    "import_builder",
    "is_vision_language",
    "load_init_checkpoint",
    "read_state_dict",
    "autocast",
    "check_attn_implementation",
    "check_model_options",
    "compute_dtype",
    "enable_tf32",
    "has_weights",
    "load_model",
    "resolve_dtype",
    "with_dtype",
]
