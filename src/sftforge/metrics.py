"""Where the numbers of a run go: metrics.jsonl (always: it is the run's record), the console (rich progress bar + a
summary line every trainer.log_freq steps), and optionally tensorboard / wandb / swanlab (trainer.logger; "jsonl"
there is accepted and changes nothing).

metrics.jsonl has one JSON object per optimizer step::

    {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "padding_fraction", "elapsed_s",
     "tokens_per_s", "memory_gb" [, "val_loss", "val_s"] [, "eval_accuracy", ..., "eval_s"]}

``tokens`` counts non-padding input tokens of the step, ``supervised_tokens`` the trained targets,
``padding_fraction`` the share of padding in this rank's micro-batches (0 with data.packing; packing efficiency is
1 - padding_fraction), ``tokens_per_s`` the mean over this process's steps so far, ``memory_gb`` the peak memory so
far (progress.peak_memory_gb), ``val_s`` / ``eval_s`` the seconds the step's validation / generation eval took. The last line is
``{"event": "end", "train_runtime_s", "tokens", "tokens_per_s"[, "skipped_steps", "interrupted_by"]}``. ``sftforge rl``
with data.val_files also writes ``{"event": "validation", "step", "val_score", "val_mean@K", "val_pass@k", ...,
"val_<data_source>_mean@K", ..., "val_s"}`` after the steps it validates at (step 0: before training). A step skipped
by trainer.nan_policy=skip_step has ``"skipped": true, "skipped_steps": <count so far>``; non-finite numbers are
written as the strings "nan" / "inf" / "-inf" so the file stays strict JSON.

SwanLab: project from $SWANLAB_PROJECT (else $WANDB_PROJECT, which verl's trainer.project_name sets, else
"sftforge"), experiment name from $SWANLAB_EXP_NAME (else $WANDB_NAME / trainer.experiment_name, else the output
folder's name); the API key is swanlab's own ($SWANLAB_API_KEY or `swanlab login`), never read here.

Every message and the run config given to wandb and swanlab pass through :func:`sftforge.redact.redacted` / ``scrub``: secrets
never reach the console or a logger.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

from sftforge.config import ConfigError
from sftforge.progress import Live
from sftforge.redact import redacted, scrub

LOGGERS = ("console", "jsonl", "tensorboard", "wandb", "swanlab")
_PIP = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb", "swanlab": "pip install swanlab"}


def check_loggers(names: list[str]) -> None:
    """Fail before training if trainer.logger names an unknown logger or one whose package is missing."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"trainer.logger: unknown logger {name!r}; choose from {' | '.join(LOGGERS)}.")
        if name in _PIP and importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"trainer.logger includes {name!r} but the {name} package is not installed: {_PIP[name]} "
                f"(or remove {name} from trainer.logger)."
            )


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl ([] when there is none). A half-written last line (a run still writing, or
    killed mid-write) is left out; a damaged line before it is an error naming its number."""
    p = Path(path)
    if not p.exists():
        return []
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ConfigError(f"{p}: line {n} is not JSON ({e.msg}); the file was damaged.") from None
    return rows


def _strict(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3e}" if (x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4)) else f"{x:.4f}"
    return str(x)


class MetricsLogger:
    """Fan-out of step records to the chosen loggers. Only the main rank should create one with enabled=True."""

    def __init__(
        self,
        output_dir: str | Path,
        loggers: list[str],
        total_steps: int,
        log_freq: int = 1,
        start_step: int = 0,
        run_config: dict | None = None,
        enabled: bool = True,
    ):
        check_loggers(loggers)
        self.enabled = enabled
        self.log_freq = max(1, log_freq)
        self.total_steps = total_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._swanlab = None
        self._progress = None
        self._console = None
        self._first_step: int | None = None
        self._first_elapsed = 0.0
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # metrics.jsonl is the run's record (sftforge report, plan --measure and a resume read it): written whatever
        # trainer.logger says, which only adds outputs. A resumed run continues the file: records after the
        # checkpoint's step (and the old end line) are dropped, so every step appears exactly once.
        kept = [r for r in read_metrics(self.path) if "step" in r and r["step"] <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._jsonl = self.path.open("a", encoding="utf-8")
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if "wandb" in loggers:
            import wandb

            self._wandb = wandb.init(config=redacted(run_config or {}), dir=str(output_dir), resume="allow")
        if "swanlab" in loggers:
            import os

            import swanlab

            self._swanlab = swanlab.init(
                project=os.environ.get("SWANLAB_PROJECT") or os.environ.get("WANDB_PROJECT") or "sftforge",
                experiment_name=(
                    os.environ.get("SWANLAB_EXP_NAME")
                    or os.environ.get("WANDB_NAME")
                    or Path(output_dir).resolve().name
                ),
                config=redacted(run_config or {}),
                logdir=str(Path(output_dir) / "swanlab"),
            )
        if "console" in loggers:
            self._progress = Live("train", total_steps, completed=start_step)
            self._console = self._progress.console

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        message = scrub(message)
        if self._console is not None:
            self._console.print(message)
        else:
            print(message, file=sys.stderr)

    def log_validation(self, step: int, metrics: dict[str, float], line: str) -> None:
        """A validation of ``sftforge rl`` after step ``step`` (0: before the first): a jsonl event, the trackers'
        ``val/...`` scalars, and ``line`` on the console."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_strict({"event": "validation", "step": step, **metrics})) + "\n")
            self._jsonl.flush()
        scalars = {f"val/{k.removeprefix('val_')}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._swanlab is not None:
            self._swanlab.log(scalars, step=step)
        self.print(line)

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = record["step"]
        if self._first_step is None:  # the ETA measures from the first step of this process (not a resumed past)
            self._first_step, self._first_elapsed = step, record["elapsed_s"]
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_strict(record)) + "\n")
            self._jsonl.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._swanlab is not None:
            self._swanlab.log(scalars, step=step)
        if self._progress is not None:
            tps = record.get("tokens_per_s", 0.0)
            info = f"epoch {record['epoch']}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  {tps:,.0f} tok/s"
            if "memory_gb" in record:
                info += f"  {record['memory_gb']:.1f} GiB peak"
            self._progress.update(step, info)
            if step % self.log_freq == 0 or step == self.total_steps or "val_loss" in record:
                self._console.print(self.summary(record))

    def summary(self, record: dict[str, Any]) -> str:
        """One line: step/total, epoch, loss, [val_loss], lr, grad_norm, tokens/s, ETA."""
        step = record["step"]
        parts = [f"step {step}/{self.total_steps}", f"epoch {record['epoch']}", f"loss {record['loss']:.4f}"]
        if "val_loss" in record:
            parts.append(f"val_loss {record['val_loss']:.4f}")
        if "reward_mean" in record:  # sftforge rl
            parts.append(f"reward {record['reward_mean']:.3f}  kept groups {record['kept_groups']}")
        parts += [f"lr {record['lr']:.2e}", f"grad_norm {record['grad_norm']:.3f}"]
        parts.append(f"{record.get('tokens_per_s', 0.0):,.0f} tok/s")
        if self._first_step is not None and step > self._first_step and step < self.total_steps:
            per_step = (record["elapsed_s"] - self._first_elapsed) / (step - self._first_step)
            parts.append(f"ETA {int(per_step * (self.total_steps - step))}s")
        return "  ".join(parts)

    def close(self, end: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.close()
        if end is not None:
            if self._jsonl is not None:
                self._jsonl.write(json.dumps({"event": "end", **end}) + "\n")
            if self._console is not None:
                self._console.print(" ".join(f"{k}={_fmt(v)}" for k, v in end.items()))
                self._console.print(f"curves, data and config of this run: sftforge report {self.path.parent}")
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._swanlab is not None:
            self._swanlab.finish()


def is_finite(x: float) -> bool:
    return math.isfinite(x)


__all__ = ["LOGGERS", "MetricsLogger", "check_loggers", "is_finite", "read_metrics"]
