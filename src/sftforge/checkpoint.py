"""Checkpoints for an exact resume (the Hugging Face export is export.py).

``<output_dir>/step_<N>/`` holds:
  model.safetensors      fp32 master weights
  optimizer.pt           optimizer state_dict (torch.save; read back with weights_only=True)
  trainer_state.pt       step, data position (epoch, batch index in the epoch), RNG states, elapsed time
  trainer_state.json     the same numbers, readable
  config.yaml            the resolved config
  COMPLETE               written last: a folder without it is an interrupted save and is never resumed from

The folder is written as ``step_<N>.tmp`` (files fsynced, marker last) and renamed, so a crash or SIGKILL at any
moment of a save leaves no folder that looks complete and the previous checkpoint untouched. A checkpoint is deleted
(keep-last-N, or replaced) by first removing its marker, so an interrupted deletion never leaves a half folder that
looks complete. :func:`clean_incomplete` removes the leftovers (``step_<N>.tmp``, unmarked ``step_<N>``,
``step_<N>.trash``) at the start of a run.

Every path written here is a fixed name or ``step_<int>`` built by us, checked by :func:`child` to stay inside
trainer.output_dir (a planted symlink pointing elsewhere is refused, not followed).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from sftforge import faults
from sftforge.config import ConfigError
from sftforge.distributed import barrier, broadcast_flag, world

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^step_\d+(\.tmp|\.trash)?$")


class CheckpointError(ConfigError):
    """A checkpoint folder that cannot be resumed from; the message names the file and what to do."""


def child(output_dir: str | Path, name: str) -> Path:
    """``output_dir / name`` for a single plain path component, refusing anything that would land outside output_dir
    (``..``, separators, absolute names, or an existing symlink that points elsewhere)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise ConfigError(f"Refusing to write {name!r}: only plain names inside trainer.output_dir are allowed.")
    out = Path(output_dir)
    p = out / name
    if p.is_symlink() or (p.exists() and p.resolve().parent != out.resolve()):
        raise ConfigError(
            f"{p} is a symlink (to {p.resolve()}); sftforge writes only inside trainer.output_dir and does not follow "
            "links there. Remove the link or choose another trainer.output_dir."
        )
    return p


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(p: Path) -> None:
    """Delete a checkpoint folder so that no moment of the deletion leaves something that looks complete."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
        return
    (p / MARKER).unlink(missing_ok=True)
    trash = p.with_name(p.name.split(".")[0] + ".trash")
    if p != trash:
        if trash.exists():
            _remove_tree(trash)
        p.rename(trash)
    shutil.rmtree(trash)


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
    extra: Callable[[Path], Any] | None = None,
) -> Path:
    """Write ``step_<step>/`` atomically; ``state`` holds plain numbers (epoch, batch index, elapsed_s, ...).
    ``extra(folder)`` writes more into the folder before it is marked complete (trainer.save_hf: huggingface/)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = child(out, f"step_{int(step)}")
    tmp = child(out, f"step_{int(step)}.tmp")
    if tmp.exists():
        _remove_tree(tmp)
    tmp.mkdir()
    st_save_model(model, str(tmp / "model.safetensors"))
    faults.in_save(step, "weights")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, **state, "rng": rng_state()}, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
    if config is not None:
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if extra is not None:
        extra(tmp)
    for f in tmp.rglob("*"):  # on disk before the marker says so (power loss, not only a killed process)
        if f.is_file():
            _fsync(f)
    (tmp / MARKER).write_text("ok\n")
    _fsync(tmp / MARKER)
    faults.in_save(step, "marker")
    if final.exists():  # re-saving a step (a resume from an older folder): unmark the old one first
        _remove_tree(final)
    tmp.rename(final)
    _fsync(out)
    return final


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete step_<N> folder, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (0 = all); returns the deleted folders. The newest is never
    deleted, and checkpoints written by earlier runs in the same output_dir count too."""
    if keep <= 0:
        return []
    doomed = [p for _, p in complete_checkpoints(output_dir)[: -max(keep, 1)]]
    for p in doomed:
        _remove_tree(p)
    return doomed


def clean_incomplete(output_dir: str | Path) -> list[str]:
    """Remove interrupted saves and deletions (step_<N>.tmp, step_<N>.trash, step_<N> without marker); returns
    their names. Only entries whose names sftforge itself creates are touched; symlinks are unlinked, never followed."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    removed = []
    for p in sorted(out.iterdir()):
        if _LEFTOVER.match(p.name) and (p.is_symlink() or not (_STEP_DIR.match(p.name) and is_complete(p))):
            _remove_tree(p)
            removed.append(p.name)
    return removed


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete step_<N> folder with the largest N, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


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
    fix = f"Delete {p} (the previous complete checkpoint is then used) or set trainer.resume=never to start fresh."
    try:
        missing, unexpected = st_load_model(model, str(p / "model.safetensors"), strict=False)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{p / 'model.safetensors'} cannot be read ({type(e).__name__}: {e}). {fix}") from None
    if missing or unexpected:
        raise ConfigError(
            f"Checkpoint {p} does not match the model (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}): was it written with a different model.path?"
        )
    if optimizer is not None:
        device = next(model.parameters()).device
        optimizer.load_state_dict(_safe_torch_load(p / "optimizer.pt", fix, map_location=device))
    state = _safe_torch_load(p / "trainer_state.pt", fix, map_location="cpu")
    rng = state.pop("rng", None)
    if restore_rng and rng is not None:
        set_rng_state(rng)
    return state


def _safe_torch_load(path: Path, fix: str, **kwargs) -> Any:
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused, not run."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        why = next(
            (
                ln.split("error:", 1)[-1].split(". Please")[0].strip()
                for ln in str(e).splitlines()
                if "WeightsUnpickler" in ln
            ),
            "it is not a weights-only pickle",
        )
        raise CheckpointError(
            f"{path} holds more than tensors and plain values and was NOT loaded ({why}); sftforge only reads its own "
            f"weights-only state, so the file was not written by sftforge or was replaced. {fix}"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}). {fix}") from None


# --- distributed checkpoints (torch.distributed.checkpoint) -------------------------------------------------------
# A run with several processes writes ``step_<N>/dcp/`` with DCP (each rank writes its own shards, FQN-keyed model
# and optimizer state that any world size and any strategy can read back) instead of model.safetensors/optimizer.pt;
# trainer_state/config/COMPLETE are as above, written by rank 0 after a barrier. :func:`load_any` reads both formats
# on any world size: a DCP folder is resharded by DCP, a one-process safetensors folder is read as full state dicts.


def save_distributed_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config: dict | None = None,
    extra: Callable[[Path], Any] | None = None,
) -> Path:
    """Collective (every rank calls it): DCP shards of model + optimizer into ``step_<step>.tmp/dcp``, then rank 0
    writes the trainer state, fsyncs, writes the marker and renames, after a barrier."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = world()[1]
    out = Path(output_dir)
    final = child(out, f"step_{int(step)}")
    tmp = child(out, f"step_{int(step)}.tmp")
    ok = False
    try:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                _remove_tree(tmp)
            (tmp / "dcp").mkdir(parents=True)
        ok = True
    finally:
        if not broadcast_flag(ok):  # every rank learns whether rank 0 could prepare the folder
            raise CheckpointError("rank 0 could not prepare the checkpoint folder; see its error above.")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    # each rank's own RNG (dropout draws differ per rank): restored on the same rank by a resume on as many ranks
    torch.save(rng_state(), tmp / "dcp" / f"rng_rank{rank}.pt")
    faults.in_save(step, "weights")
    barrier()  # every shard is written before rank 0 marks the folder complete
    if rank == 0:
        torch.save({"step": step, **state, "rng": rng_state()}, tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
        if config is not None:
            (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if extra is not None:  # rank 0 (trainer.save_hf: the full weights were gathered by every rank before)
            extra(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        (tmp / MARKER).write_text("ok\n")
        _fsync(tmp / MARKER)
        faults.in_save(step, "marker")
        if final.exists():
            _remove_tree(final)
        tmp.rename(final)
        _fsync(out)
    barrier()  # nobody goes on (prunes, resumes, exits) before the folder is complete
    return final


def _optimizer_by_name(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A one-process optimizer.pt (keyed by position) keyed by parameter name instead, matched through the current
    optimizer's parameter order (the same :func:`build_optimizer` made both)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    index = {i: order[k] for k, i in enumerate(i for g in saved["param_groups"] for i in g["params"])}
    return {
        "state": {index[int(i)]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [index[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def load_any(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True
) -> dict[str, Any]:
    """Load a checkpoint written by any number of processes into ``model`` (plain, DDP or FSDP2) on any number.
    ``optimizer=None``: the weights only (a distributed checkpoint's optimizer shards are then not read)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    p = Path(path)
    fix = f"Delete {p} (the previous complete checkpoint is then used) or set trainer.resume=never to start fresh."
    if not (p / "dcp").is_dir() and not (p / "model.safetensors").is_file():
        raise CheckpointError(
            f"{p} holds neither model.safetensors (a one-process checkpoint) nor dcp/ (a distributed checkpoint): "
            f"it is not a step_<N> folder written by sftforge, or its weights were removed. {fix}"
        )
    sharded = any(hasattr(t, "full_tensor") for t in model.parameters())  # FSDP2 DTensor shards
    if not (p / "dcp").is_dir():
        if not sharded:
            return load_checkpoint(p, model, optimizer, restore_rng)
        full = StateDictOptions(full_state_dict=True, strict=False)
        try:
            weights = load_file(str(p / "model.safetensors"))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(
                f"{p / 'model.safetensors'} cannot be read ({type(e).__name__}: {e}). {fix}"
            ) from None
        set_model_state_dict(model, weights, options=full)
        if optimizer is not None:
            saved = _safe_torch_load(p / "optimizer.pt", fix, map_location="cpu")  # this rank's shards are cut from it
            set_optimizer_state_dict(model, optimizer, _optimizer_by_name(saved, model, optimizer), options=full)
    else:
        # without a process group (one process, e.g. `sftforge export`) DCP reads every rank's shards itself
        if optimizer is None:  # the weights only (export): the optimizer entries of the checkpoint are not read
            state = {"model": get_model_state_dict(model)}
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, checkpoint_id=str(p / "dcp"))
        except Exception as e:  # DCP raises several types (CheckpointException, ValueError, OSError)
            raise CheckpointError(f"{p / 'dcp'} cannot be read ({type(e).__name__}: {e}). {fix}") from None
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    state = _safe_torch_load(p / "trainer_state.pt", fix, map_location="cpu")
    rng = state.pop("rng", None)
    own = p / "dcp" / f"rng_rank{world()[1]}.pt"
    if own.is_file():  # written by this rank's counterpart; else (more ranks now than then) rank 0's
        rng = _safe_torch_load(own, fix, map_location="cpu")
    if restore_rng and rng is not None:
        set_rng_state(rng)
    return state


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights on rank 0's CPU, gathered one tensor at a time (never every shard twice); an empty
    dict on other ranks. Collective for FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight appears under both names; keep the first (as model.state_dict() + save_pretrained would)
    unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in full.items() if k in unique}


__all__ = [
    "MARKER",
    "CheckpointError",
    "child",
    "clean_incomplete",
    "complete_checkpoints",
    "prune_checkpoints",
    "gather_full_state_dict",
    "load_any",
    "save_distributed_checkpoint",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
