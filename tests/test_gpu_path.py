"""The GPU path, proven on CPU where its mechanism can be reached (issue: "make the GPU path right before it first
runs"); tests marked ``gpu`` run only with CUDA (benchmarks/gpu_check.py runs them on a GPU machine).

- scalar collectives put their tensors where the backend can move them (NCCL: the GPU);
- FSDP2 + bf16: the packed-sdpa placeholder mask reaches every layer without being materialized;
- packed attention splits q/k/v once and shares grouped K/V heads in the kernel;
- the loss gathers supervised positions with an index made on the host (no device-to-host sync);
- generation under FSDP2 (the in-training eval) runs on gathered weights without collectives.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftforge import distributed
from sftforge.attention import causal_per_sample
from sftforge.config import ModelConfig
from sftforge.loss import loss_sum
from sftforge.model import load_model
from sftforge.packing import IGNORE_INDEX, collate, pack

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _python(script: Path, *args, nproc: int = 0) -> str:
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    p = subprocess.run([*cmd, str(script), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


# ---- item 1: scalar collectives and the backend ---------------------------------------------------------------------


def test_scalar_collectives_use_the_gpu_under_nccl(monkeypatch):
    """NCCL has no CPU transport: under an NCCL group the scalar collectives' tensors are on this rank's GPU; under
    gloo (and without a group) on the CPU."""
    assert distributed.collective_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(distributed.torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


def test_every_collective_goes_through_the_distributed_module():
    """No module but distributed.py (and ulysses.py's all-to-all of activations, checkpoint.py's DCP) calls a
    torch.distributed collective on a tensor it built itself: a CPU scalar there would crash under NCCL."""
    src = Path(__file__).resolve().parent.parent / "src" / "sftforge"
    calls = ("dist.all_reduce(", "dist.broadcast(", "dist.all_gather(", "dist.reduce(", "dist.gather(")
    allowed = {"distributed.py"}
    wrong = [f"{p.name}:{i}" for p in src.rglob("*.py") if p.name not in allowed
             for i, line in enumerate(p.read_text().splitlines(), 1) if any(c in line for c in calls)]  # fmt: skip
    assert not wrong, wrong


# ---- item 2: FSDP2 mixed precision and the packed-sdpa placeholder -------------------------------------------------

PLACEHOLDER_WORKER = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=0, world_size=1)
from sftforge.config import load_config
from sftforge.model import load_model
from sftforge.packing import collate
from sftforge.parallel import build_engine
cfg = load_config(None, [f"model.path={sys.argv[1]}", "model.dtype=bf16", "trainer.device=cpu"])
dev = torch.device("cpu")
model = load_model(cfg.model, dev)
engine, _ = build_engine(model, cfg, dev, 1, "fsdp2")
seen = []  # registered after fully_shard's hooks: sees what each layer gets after FSDP2's input cast
for layer in model.model.layers:
    layer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((str(kw["attention_mask"].dtype), kw["attention_mask"].untyped_storage().nbytes())),
        with_kwargs=True)
samples = [(list(range(5, 5 + n)), [0] * 3 + [1] * (n - 3)) for n in (40, 25, 60)]
s, n = engine(collate(samples, True, "sdpa", 0, torch.bfloat16).to(dev))
s.backward()
sys.stdout.write(f"SEEN {sorted(set(seen))} layers {len(seen)}\\n")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_bf16_never_materializes_the_packed_placeholder(tmp_path, model_config_dir):
    """Item 2: FSDP2's mixed precision casts every floating-point input of every layer to bf16; the placeholder is
    made in the decoder's compute dtype, so the cast is a no-op and each layer sees a 2-byte storage (an fp32
    placeholder would be materialized: 125² × 2 bytes here, 8 GiB at 64k tokens, in every layer)."""
    script = tmp_path / "worker.py"
    script.write_text(PLACEHOLDER_WORKER)
    out = _python(script, model_config_dir / "qwen3-tiny", tmp_path / "pg")
    assert "SEEN [('torch.bfloat16', 2)] layers 2" in out, out


# ---- item 3: packed attention ---------------------------------------------------------------------------------------


def _graph_names(t: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_packed_attention_splits_once_and_shares_grouped_heads():
    """Item 3: one split per tensor (not a slice per sample, whose backward each allocates a full-size zero gradient),
    no copy of K/V per query group, one dtype for q/k/v; same output and gradients as attention with a
    block-diagonal mask over repeated heads."""
    torch.manual_seed(0)
    lens = [7, 1, 12, 5]
    cu = [0, 7, 8, 20, 25]
    q = torch.randn(1, 4, 25, 8, requires_grad=True)
    k = torch.randn(1, 2, 25, 8, requires_grad=True)
    v = torch.randn(1, 2, 25, 8, requires_grad=True)
    out = causal_per_sample(q, k, v, torch.tensor(cu))
    names = _graph_names(out)
    assert "SliceBackward0" not in names and "RepeatInterleaveBackward0" not in names, names
    assert sum(n.startswith("Split") for n in names) == 3, names
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(25, 25, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=allowed
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_attention_runs_q_k_v_in_one_dtype():
    """Item 3: q/k leave an fp32 RMSNorm while v is bf16 in some models; all three are cast once (to the lowest
    precision, or autocast's dtype)."""
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    v = torch.randn(1, 2, 6, 4, dtype=torch.bfloat16)
    assert causal_per_sample(q, k, v, [0, 4, 6]).dtype == torch.bfloat16


# ---- item 8: the loss without a host sync ---------------------------------------------------------------------------


def test_micro_batch_carries_a_host_made_supervised_index(model_config_dir):
    """Item 8: ``MicroBatch.to`` computes the supervised positions on the host (before the copy), and the loss uses
    them: no boolean indexing (which waits for the device) in the loss."""
    samples = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([6, 7, 8], [0, 1, 1])]
    mb = pack(samples, "sdpa").to("cpu")
    want = (mb.labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    assert torch.equal(mb.supervised, want) and mb.n_supervised == len(want)
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).eval()
    from sftforge.attention import select

    select(model)
    with torch.no_grad():
        s, n = loss_sum(model, mb)
        half = collate(samples, True, "sdpa").to("cpu")
        half.supervised = half.supervised[:2]  # the loss reads the index it is given
        s2, n2 = loss_sum(model, half)
    assert n == len(want) and n2 == 2 and float(s2) < float(s)


@pytest.mark.gpu
def test_loss_gather_runs_no_host_sync_on_gpu():
    """Item 8 on a GPU: gathering the supervised rows raises nothing under CUDA's sync-debug mode 'error'."""
    from sftforge.loss import supervised_rows

    mb = pack([([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([6, 7, 8], [0, 1, 1])], "sdpa").to("cuda")
    hidden = torch.randn(1, 8, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        h, y = supervised_rows(hidden, mb)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert h.shape == (mb.n_supervised, 16) and y.shape == (mb.n_supervised,)


# ---- item 4: generation under FSDP2 ----------------------------------------------------------------------------------

UNSHARDED_WORKER = """
import os, sys, torch
from sftforge.distributed import destroy, init_distributed, world
init_distributed("cpu")
from sftforge.config import load_config
from sftforge.model import load_model
from sftforge.packing import collate
from sftforge.parallel import build_engine, unsharded
world_size, rank = world()
cfg = load_config(None, [f"model.path={sys.argv[1]}", "model.dtype=bf16", "trainer.device=cpu"])
dev = torch.device("cpu")
torch.manual_seed(0)
model = load_model(cfg.model, dev)
engine, _ = build_engine(model, cfg, dev, world_size, "fsdp2")
mb = collate([(list(range(5, 45)), [0] * 3 + [1] * 37)], True, "sdpa", 0, torch.bfloat16).to(dev)
s, _ = engine(mb); s.backward()
with unsharded(engine), torch.no_grad():
    # a different number of forwards per rank: any collective inside generate would hang or fail
    gen = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2 + 5 * rank, min_new_tokens=2 + 5 * rank,
                         do_sample=False, pad_token_id=0)
s2, _ = engine(mb); s2.backward()  # training goes on on the shards
kind = type(model.model.embed_tokens.weight).__name__
sys.stdout.write(f"RANK {rank} generated {gen.shape[1] - 3} loss {float(s.detach()):.4f} {float(s2.detach()):.4f} {kind}\\n")
sys.stdout.flush()
destroy()
"""


@pytest.mark.slow
def test_fsdp2_generation_runs_on_gathered_weights_without_collectives(tmp_path, model_config_dir):
    """Item 4: the in-training eval generates on the HF model under FSDP2 (its embedding and LM head belong to the
    sharded root): inside ``parallel.unsharded`` every rank holds full weights and generates on its own, for a
    different number of tokens per rank; afterwards training goes on on the shards."""
    script = tmp_path / "worker.py"
    script.write_text(UNSHARDED_WORKER)
    out = _python(script, model_config_dir / "qwen3-tiny", nproc=2)
    lines = sorted(ln for ln in out.splitlines() if ln.startswith("RANK"))
    assert [ln.split()[3] for ln in lines] == ["2", "7"], out
    assert all(ln.endswith("DTensor") for ln in lines), out
    assert len({ln.split()[5] for ln in lines}) == 1, out  # both ranks computed the same loss


# ---- item 10: checkpoints ---------------------------------------------------------------------------------------------

RNG_WORKER = """
import sys, torch
from sftforge.distributed import destroy, init_distributed, world
init_distributed("cpu")
from sftforge.checkpoint import load_any, save_distributed_checkpoint
from sftforge.parallel import build_mesh, parallelize
world_size, rank = world()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 4))
engine = parallelize(model, "ddp", build_mesh(torch.device("cpu"), world_size))
opt = torch.optim.AdamW(model.parameters())
torch.rand(5 + 7 * rank)  # dropout draws differ per rank
save_distributed_checkpoint(sys.argv[1], 1, model, opt, {"epoch": 0})
want = torch.rand(3).tolist()
torch.manual_seed(123)
load_any(sys.argv[1] + "/step_1", model, opt)
got = torch.rand(3).tolist()
sys.stdout.write(f"RANK {rank} {'same' if got == want else 'differs'} {want[0]:.6f}\\n")
sys.stdout.flush()
destroy()
"""


@pytest.mark.slow
def test_distributed_resume_restores_each_ranks_own_rng(tmp_path):
    """Item 10: a multi-process checkpoint keeps every rank's RNG and a resume on as many ranks restores each its
    own (rank 0's on every rank would change rank 1's dropout after a resume)."""
    script = tmp_path / "worker.py"
    script.write_text(RNG_WORKER)
    out = _python(script, tmp_path / "ckpt", nproc=2)
    lines = sorted(ln for ln in out.splitlines() if ln.startswith("RANK"))
    assert [ln.split()[2] for ln in lines] == ["same", "same"], out
    assert lines[0].split()[3] != lines[1].split()[3], out  # the two ranks' streams did differ


def test_checkpoint_tensors_load_onto_the_cpu_first(tmp_path, monkeypatch):
    """Item 10: optimizer and trainer state are read with map_location (a GPU-written tensor is never loaded onto
    cuda:0 by every rank, nor fails on a machine without a GPU)."""
    from sftforge import checkpoint

    calls = []
    real = checkpoint._safe_torch_load

    def spy(path, fix, **kwargs):
        calls.append((path.name, kwargs.get("map_location")))
        return real(path, fix, **kwargs)

    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    checkpoint.save_checkpoint(tmp_path, 1, model, opt, {"epoch": 0})
    monkeypatch.setattr(checkpoint, "_safe_torch_load", spy)
    checkpoint.load_any(tmp_path / "step_1", model, opt)
    assert calls and all(loc is not None for _, loc in calls), calls


# ---- item 9: RL sampling and the rollout copy -----------------------------------------------------------------------


def _tiny(model_config_dir):
    return load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).eval()


def test_sampling_leaves_the_callers_rng_alone(model_config_dir):
    """Item 9: sampled generation seeds its own stream and restores the caller's (CPU here; the GPU's below): the
    same seed gives the same samples, and the trainer's next random draw is the one it would have been."""
    from sftforge.generation import GenerationOptions, HFBackend

    backend = HFBackend(_tiny(model_config_dir), pad_id=0)
    opts = GenerationOptions(max_new_tokens=6, do_sample=True, seed=7)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = backend.generate([[5, 6, 7]] * 2, opts, stop_ids=[])
    assert torch.equal(torch.get_rng_state(), before)
    assert backend.generate([[5, 6, 7]] * 2, opts, stop_ids=[]) == a


@pytest.mark.gpu
def test_sampling_leaves_the_gpu_rng_alone(model_config_dir):
    from sftforge.generation import GenerationOptions, HFBackend

    backend = HFBackend(_tiny(model_config_dir).cuda(), pad_id=0)
    torch.cuda.manual_seed(1)
    before = torch.cuda.get_rng_state()
    backend.generate([[5, 6, 7]] * 2, GenerationOptions(max_new_tokens=6, do_sample=True, seed=7), stop_ids=[])
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_rollout_copy_casts_weights_not_buffers(model_config_dir):
    """Item 9: the FSDP2 rollout copy is in the compute dtype, its buffers (RoPE's inv_freq) stay fp32: a bf16
    inv_freq shifts every rotary angle, and the sampled log-probs would no longer be the trained model's."""
    from sftforge.rl_loop import RolloutWeights

    copy = RolloutWeights(_tiny(model_config_dir), True, torch.bfloat16).module
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {b.dtype for n, b in copy.named_buffers() if "inv_freq" in n} == {torch.float32}


# ---- item 6: FSDP2 (and so trainer.offload) in one process ------------------------------------------------------------


def test_offload_resolves_to_fsdp2_even_on_one_gpu():
    from sftforge.parallel import resolve_strategy

    assert resolve_strategy("auto", torch.device("cuda"), 1, offload=True) == "fsdp2"
    assert resolve_strategy("auto", torch.device("cuda"), 1) == "none"


@pytest.mark.slow
def test_fsdp2_in_one_process_trains_like_none_and_resumes(tmp_path, model_config_dir, tokenizer_dirs, textcraft_dir):
    """Item 6: trainer.strategy=fsdp2 without torchrun (what trainer.offload=true resolves to on one GPU) makes its own
    one-process group, trains like strategy=none, saves sharded checkpoints and resumes from them."""
    import json

    from safetensors.torch import load_file

    def train(out, *extra, resumed=False):
        args = [sys.executable, "-m", "sftforge", "train", f"model.path={model_config_dir / 'qwen3-tiny'}",
                f"model.tokenizer_path={tokenizer_dirs['qwen3']}", f"data.train_files={textcraft_dir / 'train_react.jsonl'}",
                "data.max_length=4096", "data.train_batch_size=4", "trainer.max_steps=3", "trainer.save_freq=1",
                "optim.lr=1e-3", "optim.warmup_steps=0", "trainer.device=cpu", "trainer.logger=[jsonl]",
                f"trainer.output_dir={out}", *extra]  # fmt: skip
        p = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert ("resumed from" in p.stdout + p.stderr) == resumed
        return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]

    plain = train(tmp_path / "none", "trainer.strategy=none")
    sharded = train(tmp_path / "fsdp2", "trainer.strategy=fsdp2")
    assert sharded == pytest.approx(plain, rel=1e-5)
    assert (tmp_path / "fsdp2" / "step_1" / "dcp").is_dir()
    (tmp_path / "fsdp2" / "step_3").rename(tmp_path / "fsdp2" / "old_step_3")
    (tmp_path / "fsdp2" / "step_2").rename(tmp_path / "fsdp2" / "old_step_2")
    train(tmp_path / "fsdp2", "trainer.strategy=fsdp2", resumed=True)  # from step_1
    a, b = (
        load_file(tmp_path / "fsdp2" / "final" / "model.safetensors"),
        load_file(tmp_path / "none" / "final" / "model.safetensors"),
    )
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


# ---- item 5: per-rank sharded loading ----------------------------------------------------------------------------------

LOAD_WORKER = """
import os, sys
from sftforge import model as model_module
from sftforge.cli import main
real = model_module.load_model
def spy(cfg, device="cpu", skeleton=False):
    m = real(cfg, device, skeleton=skeleton)
    kinds = sorted({p.device.type for p in m.parameters()})
    sys.stdout.write(f"RANK {os.environ['RANK']} load device={device} skeleton={skeleton} params_on={kinds}\\n")
    sys.stdout.flush()
    return m
model_module.load_model = spy  # (run.build -> model.build_model -> load_model)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_fsdp2_ranks_other_than_0_never_hold_the_full_model(tmp_path, model_config_dir, tokenizer_dirs, textcraft_dir):
    """Item 5: under FSDP2 rank 0 reads the weights (host memory), the other ranks build the model on the meta device
    and receive only their shards; the run trains like before (tests/test_distributed.py: 2 processes == 1)."""
    script = tmp_path / "worker.py"
    script.write_text(LOAD_WORKER)
    out = _python(script, "train", f"model.path={model_config_dir / 'qwen3-tiny'}",
                  f"model.tokenizer_path={tokenizer_dirs['qwen3']}", f"data.train_files={textcraft_dir / 'train_react.jsonl'}",
                  "data.max_length=4096", "data.train_batch_size=4", "trainer.max_steps=1", "trainer.strategy=fsdp2",
                  "trainer.device=cpu", "trainer.logger=[jsonl]", f"trainer.output_dir={tmp_path / 'out'}", nproc=2)  # fmt: skip
    lines = sorted(ln for ln in out.splitlines() if ln.startswith("RANK"))
    assert lines == ["RANK 0 load device=cpu skeleton=False params_on=['cpu']",
                     "RANK 1 load device=cpu skeleton=True params_on=['meta']"], out  # fmt: skip


# ---- item 7: precision defaults -----------------------------------------------------------------------------------------


def test_dtype_auto_is_bf16_on_a_bf16_gpu_and_fp32_on_cpu(monkeypatch):
    from sftforge.config import load_config
    from sftforge.model import resolve_dtype, with_dtype

    assert load_config(None, []).model.dtype == "auto"
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("bf16", "cpu") == "bf16" and resolve_dtype("fp32", "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 / T4
    assert resolve_dtype("auto", "cuda:0") == "fp32"
    assert with_dtype(load_config(None, []), "cpu").model.dtype == "fp32"


def test_flash_attention_with_fp32_is_refused(monkeypatch):
    from sftforge import model as model_module
    from sftforge.config import ConfigError, load_config
    from sftforge.model import with_dtype

    monkeypatch.setattr(model_module, "check_attn_implementation", lambda name: None)  # as if flash-attn were here

    cfg = load_config(None, ["model.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="flash_attention_2 computes in bf16 only.*model.dtype=bf16"):
        with_dtype(cfg, "cpu")
    assert with_dtype(load_config(None, ["model.attn_implementation=flash_attention_2", "model.dtype=bf16"]), "cpu")


def test_fp32_on_a_gpu_turns_tf32_on():
    from sftforge.model import enable_tf32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not enable_tf32(torch.device("cpu"), "fp32") and not enable_tf32(torch.device("cuda"), "bf16")
        assert torch.get_float32_matmul_precision() == "highest"
        assert enable_tf32(torch.device("cuda"), "fp32")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.gpu
def test_micro_batch_reaches_the_gpu_through_pinned_memory():
    """Item 8: host -> GPU copies of a micro-batch are asynchronous (pinned), and the values arrive intact."""
    mb = pack([([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([6, 7, 8], [0, 1, 1])], "sdpa")
    on = mb.to("cuda")
    torch.cuda.synchronize()
    assert on.input_ids.is_cuda and torch.equal(on.input_ids.cpu(), mb.input_ids)
    assert on.extra["packed_cu_seqlens"].device.type == "cpu" and on.supervised.is_cuda
