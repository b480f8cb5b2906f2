"""Process group and device queries: the bottom of the house (every other module asks here, nothing here asks them).

- :func:`init_distributed` / :func:`destroy`: the default process group from torchrun's environment, and its end.
- :func:`world`, :func:`resolve_device`, :func:`local_device`: who and where this process is.
- scalar collectives (:func:`all_reduce_sum`, :func:`any_rank_max`, :func:`ranks_where`, :func:`broadcast_flag`,
  :func:`barrier`): plain Python numbers in and out, identity without a process group. Their tensors live on
  :func:`collective_device`: the GPU under NCCL (NCCL has no CPU transport), the CPU under gloo.
- :class:`Lockstep`: a rank's micro-batches stretched to the busiest rank's count, so that every rank runs the same
  number of forwards (collectives under FSDP2) and backwards (DDP's gradient sync).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Generic, TypeVar

import torch
import torch.distributed as dist

from sftforge.config import ConfigError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(world_size, rank); (1, 0) without a process group."""
    if is_distributed():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def resolve_device(name: str) -> torch.device:
    """trainer.device (auto | cpu | cuda | cuda:N) as a device; auto picks CUDA when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available; set trainer.device=auto or cpu.")
    return torch.device(name)


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU under torchrun (LOCAL_RANK), else ``device``."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(device_type: str) -> bool:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns True when this call created it. gloo on CPU, nccl on CUDA; a single process without torchrun stays
    uninitialized."""
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _import_before_group()
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return True


def launcher_notes(model_dtype: str, compile_: bool) -> list[str]:
    """What a launcher set that sftforge reads differently, checked before anything starts. ``accelerate launch``
    is a torchrun with other flag names: its processes and rendezvous (RANK, WORLD_SIZE, MASTER_ADDR) are used as
    torchrun's; its --mixed_precision and --dynamo_backend are not read (model.dtype and model.compile are), and its
    --cpu starts ONE process whatever --num_processes says (CPU processes need --multi_gpu, which uses gloo here)."""
    env, notes = os.environ, []
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed == "fp16":
        raise ConfigError(
            "accelerate launch --mixed_precision fp16: sftforge trains in fp32 or bf16 only (fp16 needs "
            "loss scaling it does not do); use --mixed_precision bf16 with model.dtype=bf16."
        )
    if mixed == "bf16" and model_dtype != "bf16":
        raise ConfigError(
            f"accelerate launch --mixed_precision bf16 but model.dtype={model_dtype}: sftforge's "
            "precision is model.dtype; set model.dtype=bf16 (or launch with --mixed_precision no)."
        )
    if env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper() not in ("NO", "") and not compile_:
        notes.append("accelerate launch --dynamo_backend is not read: set model.compile=true to compile the layers")
    if env.get("ACCELERATE_USE_CPU", "").lower() == "true" and int(env.get("WORLD_SIZE", "1")) <= 1:
        notes.append(
            "accelerate launch --cpu starts one process: for N processes on CPUs use accelerate launch "
            "--multi_gpu --num_processes N (gloo) or torchrun --nproc_per_node N"
        )
    return notes


def init_single_process_group(device_type: str) -> bool:
    """A process group of this process alone (an in-memory store, no rendezvous), for FSDP2 in one process
    (trainer.strategy=fsdp2 or trainer.offload=true without torchrun); returns True."""
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _import_before_group()
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


def _import_before_group() -> None:
    """Import, before the default process group exists, the torch modules that capture it at import time.

    ``torch.distributed.nn.functional`` declares ``group=group.WORLD`` as a default argument of its collectives;
    imported after ``init_process_group`` (DDP, FSDP2 and DCP import it through ``torch.distributed._shard``) those
    defaults hold the default group for the life of the interpreter, so :func:`destroy` cannot free it: its gloo
    worker and transport threads then live on into interpreter shutdown, where a worker abort ("terminate called
    without an active exception") can end a completed run with a non-zero exit code. Imported first, the defaults
    are None (the group is looked up at call time)."""
    import torch.distributed.nn.functional  # noqa: F401


def collective_device() -> torch.device:
    """Where the scalar collectives put their tensors: NCCL moves GPU memory only, gloo CPU memory."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(*values: float) -> list[float]:
    """Sum of each value over ranks (fp64); the values themselves when not distributed."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank_max(value: int) -> int:
    """The largest of ``value`` over all ranks, so that every rank takes the same decision."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


T = TypeVar("T")


class Lockstep(Generic[T]):
    """This rank's ``items`` run in step with the other ranks: iterating yields ``(index, item, real)`` for ``n``
    indices, ``n`` the largest count over the ranks; past this rank's own items, ``item`` is ``filler()`` and ``real``
    is False (the caller gives such a repeat weight 0). FSDP2 gathers the weights in every forward, so a forward is a
    collective, and DDP syncs gradients on the last backward: every rank has to run as many as the busiest one.

    ``ranks``: how many processes run these items side by side; with 1 there is no collective (the count is this
    rank's own). ``filler`` is called only when a repeat is needed; without one a repeat's ``item`` is None."""

    def __init__(self, items: Sequence[T], ranks: int, filler: Callable[[], T] | None = None):
        self.items, self.filler = items, filler
        self.n = any_rank_max(len(items)) if ranks > 1 else len(items)

    def last(self, index: int) -> bool:
        """``index`` is the last of the ``n`` (where DDP and FSDP2 sync the gradients)."""
        return index == self.n - 1

    def __iter__(self) -> Iterator[tuple[int, T, bool]]:
        for k in range(self.n):
            real = k < len(self.items)
            yield k, self.items[k] if real else (self.filler() if self.filler is not None else None), real


def ranks_where(flag: bool) -> list[int]:
    """The ranks on which ``flag`` is true (every rank learns the list)."""
    world_size, rank = world()
    t = torch.zeros(world_size, dtype=torch.int64, device=collective_device())
    t[rank] = int(flag)
    if world_size > 1:
        dist.all_reduce(t)
    return [r for r, v in enumerate(t.tolist()) if v]


def broadcast_flag(flag: bool, src: int = 0) -> bool:
    """Rank ``src``'s ``flag`` on every rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=collective_device())
    dist.broadcast(t, src=src)
    return bool(t.item())


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> None:
    """Rank ``src``'s values of ``t`` into ``t`` on every rank (in place; through the GPU under NCCL)."""
    if not is_distributed():
        return
    dev = collective_device()
    moved = t.device != dev
    buf = t.detach().to(dev) if moved else t.detach()
    dist.broadcast(buf, src=src)
    if moved:
        with torch.no_grad():
            t.copy_(buf)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _release_mesh_caches() -> None:
    """Empty torch's DTensor caches (sharding propagation, redistribution plans, mesh topology): their entries hold
    the DeviceMesh of a finished FSDP2 run, and a mesh holds its process groups, so that
    ``destroy_process_group`` could not free them (see :func:`destroy`). Each is a torch internal, skipped when a torch
    version lacks it."""
    import importlib

    clears = (
        ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache", ()),
        ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache", ()),
        ("torch.distributed.tensor._redistribute", "_gen_transform_infos", ("cache_clear",)),
        ("torch.distributed.tensor._collective_utils", "MeshTopoInfo", ("build_from_mesh", "cache_clear")),
    )
    for module, name, attrs in clears:
        try:
            fn = getattr(importlib.import_module(module), name)
            for attr in attrs:
                fn = getattr(fn, attr)
            fn()
        except (ImportError, AttributeError):
            pass


def destroy() -> None:
    """End the process groups so that none outlives this call.

    The barrier first, so that no rank tears down its connections while a peer still uses them. Then the references
    torch itself keeps to finished meshes are dropped (:func:`_release_mesh_caches`; the default group's, by
    :func:`_import_before_group`), so that ``destroy_process_group`` frees the groups and gloo joins its worker and
    transport threads here. A group left alive is only freed during interpreter shutdown, where its threads abort
    the process now and then ("terminate called without an active exception", exit code 134) after a run that
    completed. The run calls this once its model, engine and optimizer are gone (they hold the groups too)."""
    if is_distributed():
        import gc

        dist.barrier()
        _release_mesh_caches()
        gc.collect()  # FSDP2 state and hooks form reference cycles with the modules they hold
        dist.destroy_process_group()


__all__ = [
    "Lockstep",
    "all_reduce_sum",
    "any_rank_max",
    "barrier",
    "broadcast_flag",
    "broadcast_tensor",
    "collective_device",
    "destroy",
    "init_distributed",
    "launcher_notes",
    "init_single_process_group",
    "is_distributed",
    "local_device",
    "ranks_where",
    "resolve_device",
    "world",
]
