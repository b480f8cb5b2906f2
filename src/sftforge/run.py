"""The run lifecycle shared by ``sftforge train`` and ``sftforge rl``: everything around the step.

A run, in order (both entry points call these; only their step differs):

1. :class:`Run` (a context manager): resolve trainer.device, join the process group under torchrun, and at the end
   leave it.
2. :meth:`Run.prepare_output`: create trainer.output_dir, take its lock (:class:`OutputLock`: a second run on the same
   folder refuses, naming the holder), refuse planted symlinks, remove interrupted saves, write config.yaml.
3. :meth:`Run.build`: model → adapters (LoRA / freezing) → the parallel engine (parallel.build_engine) → optimizer.
4. :meth:`Run.resume`: the newest complete checkpoint (trainer.resume), with a warning for every key that changes
   the data order or the schedule, and for training data that differs from the checkpoint's (its fingerprint).
5. the loop, written by the caller, asks components whether to act:
   - :class:`NonFiniteGuard` (before the optimizer step): loss or gradient norm not finite on any rank →
     trainer.nan_policy=error saves the last good state and raises :class:`NonFiniteError`; skip_step drops the
     update and counts it.
   - :class:`Checkpointer` (after the step): saves at trainer.save_freq, at the last step and after an interrupt
     (single-process safetensors or DCP shards), then keeps the newest trainer.max_ckpt_to_keep.
   - :class:`Signals`: the first SIGTERM/SIGINT finishes the current step, saves and ends the run (exit code
     128 + signal); the same command resumes exactly. A second signal stops at once.
   - :class:`Validator` (before the first step, after a step): validation on data.val_files before training
     (trainer.val_before_train), every trainer.test_freq steps and after the last step, timed; each trainer says
     what it measures and where the numbers go.
6. :meth:`Run.finish`: gather FSDP2 shards, export ``final/`` (LoRA: merged, adapter beside), close the metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from sftforge.checkpoint import (
    child,
    clean_incomplete,
    gather_full_state_dict,
    load_any,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
    save_distributed_checkpoint,
)
from sftforge.config import Config, ConfigError, to_dict
from sftforge.data import check_data_paths
from sftforge.distributed import (
    any_rank_max,
    barrier,
    broadcast_flag,
    destroy,
    init_distributed,
    init_single_process_group,
    is_distributed,
    launcher_notes,
    local_device,
    ranks_where,
    resolve_device,
    world,
)
from sftforge.export import export_model, generation_eos_ids
from sftforge.lora import prepare_model
from sftforge.loss import has_fast_path
from sftforge.metrics import MetricsLogger
from sftforge.model import build_model, check_model_options, compute_dtype, enable_tf32, with_dtype
from sftforge.optim import build_optimizer
from sftforge.parallel import build_engine, is_fsdp, materialize_from_rank0, resolve_strategy, to_float
from sftforge.progress import quiet_libraries
from sftforge.redact import redacted
from sftforge.ulysses import disabled as disabled_sp
from sftforge.ulysses import restore as restore_attention
from sftforge.vision import load_vision

LOCK_NAME = "run.lock"

# Keys that decide which samples make up step N or the learning rate of step N: changing them between a checkpoint
# and its resume silently changes the run, so the resume says so.
RESUME_KEYS = (
    "data.train_batch_size",
    "data.shuffle",
    "trainer.seed",
    "trainer.max_steps",
    "trainer.total_epochs",
    "optim.lr",
    "optim.lr_scheduler",
    "optim.warmup_steps",
    "optim.warmup_ratio",
    "optim.min_lr_ratio",
    "rollout.prompts_per_step",
    "rollout.n",
)


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm of a step is NaN/inf (trainer.nan_policy=error)."""


# ---- output folder ---------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class OutputLock:
    """``trainer.output_dir/run.lock``: one run per folder. Created atomically (O_EXCL) with the holder's pid, host
    and start time; removed when the run ends. A lock left by a process that is gone (same host) is taken over with a
    message; a live holder, or one on another host (whose liveness cannot be checked here), is refused."""

    def __init__(self, out: Path):
        self.path, self.held, self.note = child(out, LOCK_NAME), False, ""

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                if host == me["host"] and isinstance(pid, int) and pid != me["pid"] and not _alive(pid):
                    self.note = (
                        f"took over {self.path}: its holder (pid {pid}, started {holder.get('started')}) is "
                        "no longer running"
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                where = f"pid {pid} on host {host}" if pid else "an unreadable lock file"
                check = "" if host == me["host"] else " (another host: this one cannot tell whether it still runs)"
                raise ConfigError(
                    f"trainer.output_dir={self.path.parent} is in use by {where}{check}, started "
                    f"{holder.get('started', '?')}: two runs in one folder would resume from each other's checkpoints "
                    f"and interleave metrics.jsonl. Wait for it or stop it, choose another trainer.output_dir, or, if "
                    f"that run is gone, delete {self.path}."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def _holder(self) -> dict:
        try:
            value = json.loads(self.path.read_text())
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def data_fingerprint(samples) -> str:
    """What the run trains on, as a short hash: the dataset's own fingerprint when it has one (data.build_dataset:
    files, tokenizer, template and options), else the hash of every sample's ids and mask, in order."""
    own = getattr(samples, "fingerprint", "")
    if own:
        return own
    h = hashlib.sha256()
    for s in samples:
        ids = getattr(s, "input_ids", None)
        if ids is None:
            h.update(repr(s).encode())
            continue
        h.update(str(len(ids)).encode() + b":")
        h.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
        h.update(torch.tensor(list(getattr(s, "loss_mask", [])), dtype=torch.int8).numpy().tobytes())
    return h.hexdigest()[:16]


def resume_differences(ckpt: Path, cfg: Config, fingerprint: str = "") -> list[str]:
    """Warnings for a resume whose config keys (RESUME_KEYS) or training data differ from the checkpoint's."""
    out = []
    saved_path = Path(ckpt) / "config.yaml"
    if saved_path.exists():
        saved, now = yaml.safe_load(saved_path.read_text()) or {}, to_dict(cfg)
        for key in RESUME_KEYS:
            section, name = key.split(".")
            old, new = (saved.get(section) or {}).get(name), now[section][name]
            if old is not None and old != new:
                out.append(
                    f"warning: {key} was {old!r} in {ckpt} and is {new!r} now; data order or schedule will differ."
                )
    state_path = Path(ckpt) / "trainer_state.json"
    if fingerprint and state_path.exists():
        old = json.loads(state_path.read_text()).get("data_fingerprint")
        if old and old != fingerprint:
            out.append(
                f"warning: the training data differs from the data {ckpt} was trained on (fingerprint {old} then, "
                f"{fingerprint} now: other files, rows, tokenizer, template or data options); the resumed steps see "
                "other samples than the interrupted run would have."
            )
    return out


# ---- components the loop asks ----------------------------------------------------------------------------------------


class Signals:
    """Records the first SIGTERM/SIGINT while the loop runs (the loop acts on it after the optimizer step); a second
    one restores the default action and re-raises it, stopping the process at once."""

    def __init__(self):
        self.received = 0
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum  # no printing here: the handler may interrupt a write to the same stream

    def any_rank(self) -> int:
        """The signal received on any rank (0: none), the same on every rank."""
        return any_rank_max(self.received)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Validator:
    """When the loop validates on data.val_files, and how long it takes: before the first step of this process
    (trainer.val_before_train), after every trainer.test_freq-th step and after the run's last step. Each validation's
    numbers end with ``val_s`` (its seconds, rounded to :attr:`digits`); :attr:`last` holds the latest ones ({}: none
    yet). Each trainer's subclass says what a validation measures (:meth:`measure`) and where its numbers go
    (:meth:`report`)."""

    digits = 4  # of val_s

    def __init__(self, run: Run, total: int, enabled: bool):
        # total: the run's last step (not trainer.stop_at_step); enabled: there is validation data
        self.run, self.total, self.enabled = run, total, enabled
        self.last: dict[str, Any] = {}

    def due(self, done: int) -> bool:
        """Validate after step ``done``?"""
        freq = self.run.cfg.trainer.test_freq
        return self.enabled and ((freq > 0 and done % freq == 0) or done == self.total)

    def before_train(self, start: int) -> None:
        if self.enabled and self.run.cfg.trainer.val_before_train:
            self.report(start, self._validate(start), None)

    def after_step(self, done: int, record: dict[str, Any]) -> None:
        if self.due(done):
            self.report(done, self._validate(done), record)

    def _validate(self, done: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        numbers = self.measure(done)
        numbers["val_s"] = round(time.perf_counter() - t0, self.digits)
        self.last = numbers
        return numbers

    def measure(self, done: int) -> dict[str, Any]:
        """The numbers of a validation after ``done`` steps (``val_*`` keys)."""
        raise NotImplementedError

    def report(self, done: int, numbers: dict[str, Any], record: dict[str, Any] | None) -> None:
        """Where ``numbers`` go; ``record``: the record of step ``done`` (None before training)."""
        raise NotImplementedError


class Checkpointer:
    """When and how to save: ``step_<N>`` after trainer.save_freq steps, after the last step of the run and after an
    interrupt; one process writes safetensors, several write DCP shards (collective); then keep-last-N."""

    def __init__(self, run: Run, model, optimizer, position, tokenizer=None):
        # position(done) -> the data position after ``done`` steps (epoch, index_in_epoch): read by humans
        self.run, self.model, self.optimizer, self.position = run, model, optimizer, position
        self.tokenizer = tokenizer
        self.last_saved = -1

    def resume(self, fingerprint: str) -> tuple[int, dict[str, Any]]:
        """(start step, saved state) from trainer.resume; (0, {}) for a fresh run."""
        r = self.run
        ckpt = resolve_resume(r.cfg.trainer.resume, r.out)
        r.fingerprint = fingerprint
        if ckpt is None:
            self.last_saved = 0
            return 0, {}
        state = load_any(ckpt, self.model, self.optimizer)
        r.resumed_from, self.last_saved = ckpt, int(state["step"])
        r.lines.extend(resume_differences(ckpt, r.cfg, fingerprint))
        return int(state["step"]), state

    def save(self, done: int) -> None:
        """step_<done>: the state after ``done`` steps. Collective with several processes."""
        r = self.run
        state = {
            **self.position(done),
            "elapsed_s": r.elapsed(),
            "skipped_steps": r.guard.skipped,
            "data_fingerprint": r.fingerprint,
        }
        extra = self._hf_writer() if r.cfg.trainer.save_hf else None
        if r.world_size > 1 or is_fsdp(r.engine):  # FSDP2 in one process too: its parameters are shards
            save_distributed_checkpoint(r.out, done, self.model, self.optimizer, state, r.saved_config, extra)
        elif r.main:
            save_checkpoint(r.out, done, self.model, self.optimizer, state, r.saved_config, extra)
        self.last_saved = done
        if r.main:
            for p in prune_checkpoints(r.out, r.cfg.trainer.max_ckpt_to_keep):
                r.print(f"removed {p} (trainer.max_ckpt_to_keep={r.cfg.trainer.max_ckpt_to_keep})")

    def _hf_writer(self):
        """trainer.save_hf: the writer of ``step_<N>/huggingface/`` (as ``final/``: safetensors, config, tokenizer,
        generation config; LoRA merged, the adapter in huggingface/adapter). FSDP2: the full weights are gathered
        here, by every rank (collective), for rank 0 to write."""
        r = self.run
        full = gather_full_state_dict(self.model) if is_fsdp(r.engine) else None

        def write(folder: Path) -> None:
            with disabled_sp(self.model):  # the saved config names the model's own attention
                r.export(self.model, folder / "huggingface", self.tokenizer, full)

        return write

    def after_step(self, done: int, stop: int, interrupted: int) -> None:
        freq = self.run.cfg.trainer.save_freq
        if done == stop or (freq > 0 and done % freq == 0) or interrupted:
            self.save(done)


class NonFiniteGuard:
    """Before an optimizer step: are the loss and the gradient norm finite on every rank? trainer.nan_policy decides
    what a non-finite step does (error: save the last good state, raise; skip_step: drop the update, count it)."""

    def __init__(self, run: Run, skipped: int = 0):
        self.run, self.skipped = run, skipped
        self.checkpointer: Checkpointer | None = None

    def ok(self, step: int, loss: float, grad_norm: float, can_save: bool = True) -> bool:
        """True: apply the update of step ``step + 1``. ``can_save``: the model still holds the state after ``step``
        steps (rl: no mini-batch update of this step applied yet)."""
        r = self.run
        bad = ranks_where(not (math.isfinite(loss) and math.isfinite(grad_norm)))
        if not bad:
            return True
        done = step + 1
        if r.cfg.trainer.nan_policy == "error":
            ck = self.checkpointer
            if ck is not None and can_save and step > ck.last_saved:
                ck.save(step)  # nothing since the last save or resume is lost
            last = ck.last_saved if ck is not None else 0
            if last == step and step > 0:
                kept = f"the state after step {step} is saved in {r.out / f'step_{step}'}"
            elif last == step:
                kept = "nothing was lost since the last checkpoint"
            else:  # rl: an update of this step was applied already
                kept = f"the last complete checkpoint is {r.out / f'step_{last}'}"
            raise NonFiniteError(
                f"step {done}: the loss ({loss}) or gradient norm ({grad_norm}) is not finite on rank(s) "
                f"{', '.join(map(str, bad))} (this is rank {r.rank}); the update was not applied and {kept}. Lower "
                "optim.lr, set optim.clip_grad, check the data of this step, or set trainer.nan_policy=skip_step to "
                "skip such steps."
            )
        self.skipped += 1
        r.print(f"warning: step {done} skipped: loss {loss}, grad_norm {grad_norm} (nan_policy)")
        return False


def clip_gradients(model: torch.nn.Module, clip_grad: float) -> float:
    """Clip to optim.clip_grad (0 = no clipping) and return the global norm (FSDP2: of the sharded DTensors)."""
    max_norm = clip_grad if clip_grad > 0 else float("inf")
    return to_float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


# ---- paths, checked before anything slow -----------------------------------------------------------------------------


def check_output_paths(cfg: Config) -> None:
    """trainer.output_dir can be a folder here (it is one, or it can be created: no file in its way, writable) and an
    explicit trainer.resume is a complete checkpoint."""
    out = Path(cfg.trainer.output_dir).expanduser()
    key = f"trainer.output_dir={cfg.trainer.output_dir!r}"
    if not cfg.trainer.output_dir:
        raise ConfigError("trainer.output_dir is empty: set it to the folder the run writes (e.g. outputs/run).")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key} is a file, not a folder: choose another trainer.output_dir (or move the file).")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key} cannot be created: {parent} is a file. Choose another trainer.output_dir.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key} cannot be written: {parent} is not writable for this user. Choose another trainer.output_dir."
        )
    if cfg.trainer.resume not in ("auto", "never"):
        resolve_resume(cfg.trainer.resume, out)


def check_paths(cfg: Config, *, model: bool = True, output: bool = True) -> None:
    """Every path the config names, checked before the model or the data is loaded (one ConfigError each, so the
    command line prints one paragraph and exits 2): (``model``: not when a model is passed in) model.path,
    model.tokenizer_path, model.init_checkpoint, model.builder; the data files, data.chat_template,
    data.image_processor, data.cache_dir; (``output``) trainer.output_dir and trainer.resume."""
    if model:
        check_model_options(cfg.model)
    check_data_paths(cfg.data)
    if output:
        check_output_paths(cfg)


# ---- the run ---------------------------------------------------------------------------------------------------------


class Run:
    """One training run's process, folder, model stack and components (see the module docstring for the order)."""

    def __init__(self, cfg: Config):
        self.device = resolve_device(cfg.trainer.device)
        self.cfg = cfg = with_dtype(cfg, self.device)  # model.dtype=auto -> bf16 on a bf16 GPU, fp32 on the CPU
        self.out = Path(cfg.trainer.output_dir)
        self.saved_config = redacted(to_dict(cfg))
        self.lines: list[str] = []  # printed once the metrics logger is open
        self.resumed_from: Path | None = None
        self.fingerprint = ""
        self.guard = NonFiniteGuard(self)
        self.log: MetricsLogger | None = None
        self.model = self.engine = self.optimizer = None
        self._created_group = False
        self._lock: OutputLock | None = None
        self._t0, self._prior_elapsed = time.perf_counter(), 0.0

    def __enter__(self) -> Run:
        self.lines.extend(launcher_notes(self.cfg.model.dtype, self.cfg.model.compile))  # (accelerate launch)
        self._quiet = quiet_libraries()  # transformers' own bars would cut through the run's log
        self._quiet.__enter__()
        self._created_group = init_distributed(self.device.type)  # under torchrun (WORLD_SIZE > 1)
        self.world_size, self.rank = world()
        if self.world_size == 1 and not is_distributed() and self.strategy() == "fsdp2":
            self._created_group = init_single_process_group(self.device.type)  # FSDP2 shards over a mesh of one
        self.main = self.rank == 0
        self.device = local_device(self.device)
        if enable_tf32(self.device, self.cfg.model.dtype):
            self.lines.append(
                "model.dtype=fp32 on a GPU: matmuls in TF32 (fp32 accumulation); model.dtype=bf16 is faster"
            )
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._lock is not None:
                self._lock.release()
        finally:
            # the model, engine and optimizer hold the process groups (DDP's reducer, FSDP2's mesh): dropped first,
            # so that destroy() can free the groups
            self.model = self.engine = self.optimizer = None
            self.guard.checkpointer = None
            if getattr(self, "_quiet", None) is not None:
                self._quiet.__exit__(None, None, None)
            if self._created_group:
                destroy()

    # -- 2. output folder
    def prepare_output(self) -> None:
        ok = False
        try:
            if self.main:
                self.out.mkdir(parents=True, exist_ok=True)
                self._lock = OutputLock(self.out)
                self._lock.acquire()
                if self._lock.note:
                    self.lines.append(self._lock.note)
                for name in (
                    "config.yaml",
                    "metrics.jsonl",
                    "final",
                    "tensorboard",
                    "data_report.json",
                    "plan.json",
                    "eval",
                ):
                    child(self.out, name)  # refuse planted symlinks before training, not after
                for name in clean_incomplete(self.out):
                    self.lines.append(f"removed {self.out / name}: left by an interrupted save")
                child(self.out, "config.yaml").write_text(yaml.safe_dump(self.saved_config, sort_keys=False))
            ok = True
        finally:
            if not broadcast_flag(ok) and ok:  # every rank stops when rank 0 could not prepare the folder
                raise ConfigError(f"rank 0 could not prepare trainer.output_dir={self.out}; see its error.")
        barrier()  # output_dir is prepared by rank 0 before anyone reads or writes it

    # -- 3. model stack
    def strategy(self) -> str:
        return resolve_strategy(self.cfg.trainer.strategy, self.device, self.world_size, self.cfg.trainer.offload)

    def build(self, model=None, *, before_engine=None, sp_size: int = 1, console: bool = True):
        """(model, engine, optimizer): the HF model (loaded unless given) with its adapters, the engine the loss
        runs through (parallel.build_engine), AdamW over the trainable parameters. ``before_engine(model)`` runs on
        the plain model just before sharding (rl: its rollout copy)."""
        c = self.cfg
        # FSDP2 on several processes: rank 0 reads the weights into host memory, the others build the module tree on
        # the meta device; after sharding each rank receives its shards from rank 0 (never the full model per rank)
        from_rank0 = model is None and before_engine is None and self.strategy() == "fsdp2" and self.world_size > 1
        from_rank0 = from_rank0 and not c.model.builder  # (a built module: every rank builds it, seeded alike)
        if model is None:
            model = build_model(
                c, "cpu" if from_rank0 else self.device, skeleton=from_rank0 and not self.main, notes=self.lines
            )
        if not has_fast_path(model) and c.data.packing:
            raise ConfigError(
                f"{type(model).__name__} has no get_decoder()/get_output_embeddings(), so the loss "
                "computes full logits from model(input_ids, attention_mask, position_ids), which cannot "
                "keep packed samples apart: set data.packing=false (or give the module those two "
                "methods; see docs/custom-models.md)."
            )
        model = prepare_model(model, c.model, console=Console() if console and self.main else None)
        full = dict(model.state_dict()) if from_rank0 and self.main else {}  # rank 0's weights, kept for the copy
        torch.manual_seed(c.trainer.seed)  # dropout (e.g. LoRA's); a resume restores the checkpoint's RNG instead
        if before_engine is not None:
            before_engine(model)
        engine, notes = build_engine(model, c, self.device, self.world_size, self.strategy(), sp_size)
        if from_rank0:
            materialize_from_rank0(model, full, self.device)
            del full
            notes.append("fsdp2: weights read once on rank 0 and sent shard by shard (other ranks built on meta)")
        self.lines.extend(notes)
        self.model, self.engine = model, engine
        self.optimizer = build_optimizer(model, c.optim)
        return model, engine, self.optimizer

    # -- 4. resume
    def checkpointer(self, position, tokenizer=None) -> Checkpointer:
        ck = Checkpointer(self, self.model, self.optimizer, position, tokenizer)
        self.guard.checkpointer = ck
        return ck

    def resume(self, ck: Checkpointer, fingerprint: str) -> int:
        start, state = ck.resume(fingerprint)
        self._prior_elapsed = float(state.get("elapsed_s", 0.0))
        self.guard.skipped = int(state.get("skipped_steps", 0))
        return start

    def stop_step(self, start: int, total: int) -> int:
        s = self.cfg.trainer.stop_at_step
        return s if start < s < total else total

    def open_log(self, total: int, start: int, header: str) -> MetricsLogger:
        t = self.cfg.trainer
        self.log = MetricsLogger(self.out, t.logger, total, t.log_freq, start, self.saved_config, enabled=self.main)
        self.print(header + (f"; resumed from {self.resumed_from} at step {start}" if self.resumed_from else ""))
        for line in self.lines:
            self.print(line)
        self.lines = []
        self._t0 = time.perf_counter()
        return self.log

    def write_json(self, name: str, obj: Any) -> None:
        """(rank 0) ``name`` in the output folder: what sftforge report reads besides metrics.jsonl."""
        if self.main:
            child(self.out, name).write_text(json.dumps(obj, indent=1, default=str))

    def print(self, line: str) -> None:
        if self.log is None:
            self.lines.append(line)
        else:
            self.log.print(line)

    def elapsed(self) -> float:
        """Seconds of training so far, over every resume of the run."""
        return self._prior_elapsed + time.perf_counter() - self._t0

    def runtime(self) -> float:
        """Seconds of training in this process."""
        return time.perf_counter() - self._t0

    def end_step(self, record: dict, signals: Signals, checkpointer: Checkpointer, done: int, stop: int) -> int:
        """After step ``done``: log its record, ask whether a signal stops the run, let the checkpointer save;
        returns the stopping signal (0: go on)."""
        self.log.log_step(record)
        sig = self.interrupted(signals, done, stop)
        checkpointer.after_step(done, stop, sig)
        return sig

    def interrupted(self, signals: Signals, done: int, stop: int) -> int:
        """The signal to stop after step ``done`` for (0: go on), decided on every rank alike; prints the resume hint."""
        sig = signals.any_rank()
        if not sig or done >= stop:
            return 0  # a signal during the last step: the run is complete anyway
        self.print(
            f"{signal.Signals(sig).name}: stopped after step {done} with a checkpoint in "
            f"{self.out / f'step_{done}'}; run the same command again to resume."
        )
        return sig

    # -- 6. the end
    def finish(self, tokenizer, finished: bool, end: dict[str, Any]) -> Path | None:
        """Export ``final/`` when the run reached its last step (collective under FSDP2), close the metrics."""
        restore_attention(self.model)  # the exported config names the model's own attention
        final_dir = None
        if finished:
            # FSDP2: every rank takes part in the gather; rank 0 ends up with the full weights (LoRA: merged from them)
            full = gather_full_state_dict(self.model) if is_fsdp(self.engine) else None
            if self.main:
                final_dir = self.export(self.model, self.out / "final", tokenizer, full)
            barrier()
        if self.guard.skipped:
            end["skipped_steps"] = self.guard.skipped
        if self.log is not None:
            self.log.close(end)
        return final_dir

    def export(self, model, folder: Path, tokenizer, state_dict: dict | None) -> Path:
        """The trained ``model`` as a Hugging Face folder (``final/``, or a checkpoint's ``huggingface/`` under
        trainer.save_hf): safetensors, config, tokenizer, generation config (it stops at the template's end of turn);
        LoRA merged, the adapter in ``folder/adapter``. ``state_dict``: FSDP2's full weights, gathered beforehand."""
        c = self.cfg
        return export_model(
            model,
            folder,
            tokenizer,
            generation_eos_ids(tokenizer, c.data.chat_template_kwargs),  # [] without a tokenizer: no eos is written
            compute_dtype(c.model.dtype),
            adapter_dir=folder / "adapter",
            base_path=c.model.path,
            state_dict=state_dict,
            vision=load_vision(c, tokenizer) if tokenizer else None,
            run_config=self.saved_config,
        )


__all__ = [
    "LOCK_NAME",
    "RESUME_KEYS",
    "Checkpointer",
    "NonFiniteError",
    "NonFiniteGuard",
    "OutputLock",
    "Run",
    "Signals",
    "Validator",
    "check_output_paths",
    "check_paths",
    "clip_gradients",
    "data_fingerprint",
    "resume_differences",
]
