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

import torch
from torch.distributed.device_mesh import init_device_mesh

from sftforge import attention, ulysses
from sftforge.config import Config, ConfigError
from sftforge.distributed import broadcast_tensor, is_distributed
from sftforge.loss import loss_sum, supervised_logprobs

STRATEGIES = ("auto", "none", "ddp", "fsdp2")


def build_mesh(device: torch.device, world_size: int):
    """A 1-D data-parallel mesh named ``dp`` (None for one process without a process group)."""
    if world_size <= 1 and not is_distributed():
        return None
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))


def build_sp_group(device: torch.device, world_size: int, sp_size: int):
    """This rank's sequence-parallel process group: the ``sp`` axis of a (dp, sp) mesh, i.e. ranks
    k·sp … k·sp + sp - 1 together (neighbours, so on one node when sp_size <= GPUs per node); None when sp_size is 1."""
    if sp_size <= 1:
        return None
    mesh = init_device_mesh(device.type, (world_size // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
    return mesh["sp"].get_group()


def resolve_strategy(strategy: str, device: torch.device, world_size: int, offload: bool = False) -> str:
    """trainer.strategy=auto: none for one process (fsdp2 with trainer.offload: the shards' CPU offload is FSDP2's),
    fsdp2 on several GPUs, ddp on several CPU processes."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}.")
    if strategy == "auto":
        if offload:
            return "fsdp2"
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
    """The repeated transformer blocks of the decoder (each its own FSDP unit): the children of the largest
    ModuleList under ``get_decoder()`` (not a vision tower's blocks, which may be more numerous)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    lists = [m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList)]
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


def materialize_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """After ``fully_shard``: every rank's shards from rank 0's full weights (``full``: its state dict, on the CPU;
    empty elsewhere), sent one tensor at a time, each rank keeping its shard. The other ranks built the model on the
    meta device (model.load_model(skeleton=True)): they never hold the full model, on the GPU or in host memory.
    Buffers (RoPE's inv_freq is not in a state dict) are sent from rank 0 as well."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full, options=options)
    for buf in model.buffers():
        broadcast_tensor(buf, src=0)


@contextlib.contextmanager
def unsharded(engine: torch.nn.Module):
    """Inside: the HF model under ``engine`` holds full weights on every rank, so that it can ``generate`` (the
    in-training eval). FSDP2: every unit is gathered once (collective: every rank enters together) and kept gathered
    between forwards, so that the ranks' generations, of different lengths, run no collective; on exit each unit is
    resharded and its reshard-after-forward setting restored (the root's is off, as fully_shard sets it). Costs one
    full copy of the weights in the compute dtype per rank while inside. Other strategies: nothing to do."""
    if not is_fsdp(engine):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in engine.modules() if isinstance(m, FSDPModule)]
    if not all(hasattr(m, "set_reshard_after_forward") for m in units):
        raise ConfigError(
            f"generation under FSDP2 (trainer.eval_freq) needs FSDPModule.set_reshard_after_forward, which torch "
            f"{torch.__version__} lacks: upgrade torch, or set trainer.eval_freq=0 and run `sftforge eval` on final/."
        )
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not engine, recurse=False)


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


def to_float(x) -> float:
    """A (possibly DTensor) scalar as a Python float."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def build_engine(
    model: torch.nn.Module, cfg: Config, device: torch.device, world_size: int, strategy: str, sp_size: int = 1
) -> tuple[torch.nn.Module, list[str]]:
    """Everything that changes how ``model`` runs, applied up front in this order, and the lines that say so:

    1. sequence parallelism (trainer.sp_size > 1: Ulysses attention over the ``sp`` process group);
    2. packed attention (data.packing with sdpa: each packed sample attends on its own, attention.py);
    3. ``torch.compile`` of every decoder layer (model.compile);
    4. the data-parallel wrapper: DDP, or FSDP2 sharding (with mixed precision and CPU offload), or none.

    Returns (engine, notes); ``engine(micro_batch)`` -> (loss sum, count)."""
    c, notes = cfg, []
    if c.trainer.offload and strategy != "fsdp2":
        raise ConfigError(f"trainer.offload=true needs trainer.strategy=fsdp2 (it is {strategy}).")
    if c.trainer.offload and device.type != "cuda":
        raise ConfigError("trainer.offload=true needs GPUs (on trainer.device=cpu all of it is in CPU memory).")
    ulysses.check_model(model, sp_size, c.model.attn_implementation, c.data.packing)
    if sp_size > 1:
        ulysses.enable(model, build_sp_group(device, world_size, sp_size), sp_size)
    if c.data.packing and c.model.attn_implementation == "sdpa":
        attention.select(model)
    if c.model.compile:
        n = compile_layers(model, c.model.compile_backend)
        notes.append(
            f"model.compile: {n} decoder layers compiled ({c.model.compile_backend}); the first steps "
            "include the compilation"
        )
    engine = parallelize(
        model, strategy, build_mesh(device, world_size), c.model.dtype, c.trainer.offload, c.model.loss_chunk_size
    )
    return engine, notes


def prepare_reference(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """A frozen model that scores the same batches as the engine (rl's KL reference): no gradients, eval mode, the
    same packed attention (step 2 of :func:`build_engine`); it is not wrapped or sharded."""
    model.requires_grad_(False).eval()
    if cfg.data.packing and cfg.model.attn_implementation == "sdpa":
        attention.select(model)
    return model


__all__ = [
    "prepare_reference",
    "STRATEGIES",
    "build_mesh",
    "build_sp_group",
    "compile_layers",
    "grad_scale",
    "is_fsdp",
    "no_grad_sync",
    "parallelize",
    "resolve_strategy",
    "to_float",
    "unsharded",
    "materialize_from_rank0",
    "LossForward",
    "build_engine",
]
