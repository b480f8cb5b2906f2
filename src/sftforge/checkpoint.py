"""Checkpoints for an exact resume, and the Hugging Face export.

``<output_dir>/step_<N>/`` holds:
  model.safetensors      fp32 master weights
  optimizer.pt           optimizer state_dict (torch.save; read back with weights_only=True)
  trainer_state.pt       step, data position (epoch, batch index in the epoch), RNG states, elapsed time
  trainer_state.json     the same numbers, readable
  config.yaml            the resolved config
  COMPLETE               written last: a folder without it is an interrupted save and is never resumed from

The folder is written as ``step_<N>.tmp`` and renamed, so a crash mid-save leaves no folder that looks complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from sftforge.config import ConfigError

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config: dict | None = None,
) -> Path:
    """Write ``step_<step>/`` atomically; ``state`` holds plain numbers (epoch, batch index, elapsed_s, ...)."""
    out = Path(output_dir)
    final = out / f"step_{step}"
    tmp = out / f"step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    st_save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, **state, "rng": rng_state()}, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
    if config is not None:
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp / MARKER).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete step_<N> folder with the largest N, or None."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = []
    for p in out.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """trainer.resume: auto -> newest complete checkpoint (or None); never -> None; else that folder."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    p = Path(resume)
    if not is_complete(p):
        raise ConfigError(
            f"trainer.resume={resume!r} is not a complete checkpoint folder (a step_<N> folder holding {MARKER}). "
            "Use trainer.resume=auto to pick the newest one in trainer.output_dir, or never to start fresh."
        )
    return p


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True
) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; returns the trainer state (step, epoch, ...); restores RNG."""
    p = Path(path)
    missing, unexpected = st_load_model(model, str(p / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"Checkpoint {p} does not match the model (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}): was it written with a different model.path?"
        )
    if optimizer is not None:
        device = next(model.parameters()).device
        optimizer.load_state_dict(torch.load(p / "optimizer.pt", map_location=device, weights_only=True))
    state = torch.load(p / "trainer_state.pt", weights_only=True)
    rng = state.pop("rng", None)
    if restore_rng and rng is not None:
        set_rng_state(rng)
    return state


def export_hf(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    eos_token_ids: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a folder ``AutoModelForCausalLM.from_pretrained`` loads: safetensors, config, tokenizer, generation config.

    generation_config.eos_token_id lists ``eos_token_ids`` (the template's end-of-turn token and the tokenizer's eos),
    so ``generate`` stops at the end of an assistant turn.
    """
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    old_dtype = getattr(model.config, "dtype", None)
    model.config.use_cache, model.config.dtype = True, dtype
    try:
        model.save_pretrained(str(out), state_dict=state_dict)
    finally:
        model.config.use_cache, model.config.dtype = False, old_dtype
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    gen = GenerationConfig.from_model_config(model.config)
    if eos_token_ids:
        gen.eos_token_id = list(eos_token_ids)
    if tokenizer is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(str(out))
    return out


__all__ = [
    "MARKER",
    "export_hf",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
