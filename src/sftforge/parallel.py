"""Distribution: process group, device mesh, and the function that applies a strategy to a plain model.

The model file stays plain (``model.py`` builds an ordinary HF module); :func:`parallelize` wraps it per
``trainer.strategy``:

- ``ddp``: ``DistributedDataParallel`` (every rank holds full weights and optimizer state).
- ``fsdp2``: ``fully_shard`` on every decoder layer and then the root (weights, gradients and optimizer state sharded
  over the data-parallel mesh axis); ``model.dtype=bf16`` uses FSDP mixed precision (bf16 params in compute, fp32
  gradient reduce, fp32 master weights); ``trainer.offload=true`` keeps the shards on the CPU (``CPUOffloadPolicy``).
- ``none``: the model as is (one process).

Default (``trainer.strategy=auto``): ``none`` for one process, ``fsdp2`` on GPUs, ``ddp`` on CPU with several processes
(one gradient all-reduce per step instead of per-layer all-gathers on every micro-batch; fsdp2 on CPU/gloo also works
and is tested).

Both DDP and FSDP2 AVERAGE gradients over ranks. The trainer's loss is already the sum of CE divided by the GLOBAL
supervised-token count, so the right gradient is the SUM over ranks: :func:`grad_scale` is the factor the trainer
multiplies the loss by (world size for a wrapped model) so that the average equals the sum.

With ``trainer.sp_size`` > 1 (Ulysses, see ulysses.py) the ranks also form a (dp, sp) mesh: its ``sp`` groups share
micro-batches and exchange attention heads; DDP / FSDP2 still span the whole world (the SP ranks' partial gradients of
one micro-batch are summed like those of different micro-batches).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from sftforge.config import ConfigError

STRATEGIES = ("auto", "none", "ddp", "fsdp2")


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


def _import_before_group() -> None:
    """Import, before the default process group exists, the torch modules that capture it at import time.

    ``torch.distributed.nn.functional`` declares ``group=group.WORLD`` as a default argument of its collectives;
    imported after ``init_process_group`` (DDP, FSDP2 and DCP import it through ``torch.distributed._shard``) those
    defaults hold the default group for the life of the interpreter, so :func:`destroy` cannot free it: its gloo
    worker and transport threads then live on into interpreter shutdown, where a worker abort ("terminate called
    without an active exception") can end a completed run with a non-zero exit code. Imported first, the defaults
    are None (the group is looked up at call time)."""
    import torch.distributed.nn.functional  # noqa: F401


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU under torchrun (LOCAL_RANK), else ``device``."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def build_mesh(device: torch.device, world_size: int):
    """A 1-D data-parallel mesh named ``dp`` (None for one process)."""
    if world_size <= 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))


def build_sp_group(device: torch.device, world_size: int, sp_size: int):
    """This rank's sequence-parallel process group: the ``sp`` axis of a (dp, sp) mesh, i.e. ranks
    k·sp … k·sp + sp - 1 together (neighbours, so on one node when sp_size <= GPUs per node); None when sp_size is 1."""
    if sp_size <= 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
    return mesh["sp"].get_group()


def resolve_strategy(strategy: str, device: torch.device, world_size: int) -> str:
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}.")
    if strategy == "auto":
        if world_size <= 1:
            return "none"
        return "fsdp2" if device.type == "cuda" else "ddp"
    if strategy == "none" and world_size > 1:
        raise ConfigError(
            f"trainer.strategy=none with {world_size} processes would train {world_size} unsynchronized copies; "
            "set trainer.strategy=ddp or fsdp2 (or auto)."
        )
    return strategy


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` each decoder layer in place (parameter names and checkpoints unchanged), dynamic shapes since
    packed rows vary in length; returns the number of layers compiled."""
    layers = _decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (each its own FSDP unit): the children of the largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


class LossForward(torch.nn.Module):
    """``forward(micro_batch) -> (sum of CE, n supervised)`` of the wrapped HF model.

    The trainer's loss runs the decoder and the LM head only at supervised positions (loss.py), not the model's own
    forward; the wrappers (DDP's gradient-sync preparation, FSDP2's all-gather of the root's embeddings/norm/LM head)
    act on ``forward`` of the module they wrap, so they wrap this one. Its only child is ``model``: parameter names
    inside it are the HF model's with a ``model.`` prefix; checkpoints use the HF model itself (no prefix)."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = 0):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, batch, logprobs: bool = False):
        """(CE sum, count); with ``logprobs``: (log π, entropy) at the trained positions (sftforge rl)."""
        from sftforge.loss import loss_sum, supervised_logprobs

        if logprobs:
            return supervised_logprobs(self.model, batch, self.chunk_size)
        return loss_sum(self.model, batch, self.chunk_size)


def parallelize(
    model: torch.nn.Module,
    strategy: str,
    mesh,
    dtype: str = "fp32",
    offload: bool = False,
    chunk_size: int = 0,
) -> torch.nn.Module:
    """Apply ``strategy`` (already resolved) to the plain ``model``; returns the engine the trainer calls for
    losses (``engine(micro_batch) -> (loss sum, count)``). ``model`` itself stays the HF module (for FSDP2 its
    parameters become DTensor shards in place) and is what the optimizer, checkpoints and export use."""
    if offload and strategy != "fsdp2":
        raise ConfigError("trainer.offload=true needs trainer.strategy=fsdp2 (CPU offload of FSDP shards).")
    engine = LossForward(model, chunk_size)
    if strategy == "none":
        return engine
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(engine, device_ids=ids)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs = {"mesh": mesh}
        if dtype == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for layer in _decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(engine, **kwargs)  # the root: embeddings, final norm, LM head (tied or not)
        return engine
    raise ConfigError(f"unknown trainer.strategy {strategy!r}")


def _is_ddp(engine: torch.nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(engine, DistributedDataParallel)


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def grad_scale(model: torch.nn.Module, world_size: int) -> float:
    """Factor on the loss so that the wrappers' gradient AVERAGE over ranks equals the SUM the loss needs."""
    return float(world_size) if world_size > 1 and (is_fsdp(model) or _is_ddp(model)) else 1.0


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on every micro-batch but the last of a step (the sum is the same)."""
    if sync:
        yield
    elif _is_ddp(model):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(*values: float) -> list[float]:
    """Sum of each value over ranks (fp64); the values themselves when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def to_float(x) -> float:
    """A (possibly DTensor) scalar as a Python float."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
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
    completed. The trainer calls this once its model, engine and optimizer are gone (they hold the groups too)."""
    if dist.is_available() and dist.is_initialized():
        import gc

        dist.barrier()
        _release_mesh_caches()
        gc.collect()  # FSDP2 state and hooks form reference cycles with the modules they hold
        dist.destroy_process_group()


__all__ = [
    "STRATEGIES",
    "all_reduce_sum",
    "barrier",
    "build_mesh",
    "build_sp_group",
    "compile_layers",
    "destroy",
    "grad_scale",
    "init_distributed",
    "is_fsdp",
    "local_device",
    "no_grad_sync",
    "parallelize",
    "resolve_strategy",
    "to_float",
    "LossForward",
]
