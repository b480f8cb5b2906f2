"""Live progress on a terminal: one rich display (label, bar, done/total, a line of numbers, ETA) for training,
tokenization and evaluation. Off a terminal (CI, a redirected log) it shows nothing: the callers print their plain
lines as they always did, so logs stay greppable and free of carriage returns.

Peak memory for the display and the step records: the GPU's peak allocated memory on CUDA, else the process's peak
resident set size (what ``free -h`` in another terminal was watched for).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def main_process() -> bool:
    """Whether this process speaks for the run: the only one, or rank 0 under torchrun ($RANK is set by the launcher
    before the process starts, so this holds before the process group exists)."""
    return os.environ.get("RANK", "0") in ("", "0")


def say(line: str) -> None:
    """An info or warning line that every process would print alike (a verl key's mapping, a cache warning): printed
    on stderr by the main process only. Lines that differ per rank are printed where they arise."""
    if main_process():
        print(line, file=sys.stderr, flush=True)


def on_terminal(stream=None) -> bool:
    """Whether live displays are shown: stderr is a terminal, $SFTFORGE_PLAIN is not set and this is the main process
    (one bar per run, not one per rank)."""
    stream = stream or sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return tty and not os.environ.get("SFTFORGE_PLAIN") and main_process()


class Live:
    """One progress display; a no-op off a terminal (``active`` is False). ``console``: share a rich Console with
    the caller's own prints so they appear above the bar."""

    _shown = 0  # rich shows one live display at a time: a display opened inside another (eval during training) is off

    def __init__(self, label: str, total: int | None, completed: int = 0, console: Console | None = None):
        self.active = on_terminal() and Live._shown == 0
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self._progress = None
        if not self.active:
            return
        self._progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        Live._shown += 1
        self._task = self._progress.add_task(label, total=total, completed=completed, info="")

    def update(self, completed: int, info: str = "", total: int | None = None) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=completed, info=info, **({"total": total} if total is not None else {})
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            Live._shown -= 1


class Periodic:
    """A progress line every ``interval`` seconds when the output is NOT a terminal (a log file, a job scheduler's
    output), where :class:`Live` shows nothing: ``label: 12/20 episodes, 340 tokens/s, 1m10s, ETA 58s``. The main
    process only; $SFTFORGE_PROGRESS_S sets the interval (default 30; 0 = off)."""

    def __init__(self, label: str, total: int, unit: str, interval: float | None = None):
        if interval is None:
            interval = float(os.environ.get("SFTFORGE_PROGRESS_S", "30") or 0)
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self.active = interval > 0 and not on_terminal() and main_process()
        self.t0 = self.last = time.monotonic()
        self.lines = 0

    def update(self, done: int, tokens: int | None = None) -> None:
        now = time.monotonic()
        if not self.active or now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.t0
        rate = f", {tokens / elapsed:,.0f} tokens/s" if tokens is not None and elapsed > 0 else ""
        eta = f", ETA {duration(elapsed * (self.total - done) / done)}" if 0 < done < self.total else ""
        print(
            f"{self.label}: {done}/{self.total} {self.unit}{rate}, {duration(elapsed)}{eta}",
            file=sys.stderr,
            flush=True,
        )
        self.lines += 1


def duration(s: float) -> str:
    """Seconds as ``42s``, ``3m07s`` or ``2h05m`` (whole seconds, truncated)."""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@contextlib.contextmanager
def quiet_libraries():
    """Inside: transformers' own tqdm bars ("Loading weights", "Writing model shards") are off, so the output is
    ours only; the hub's download bars stay (a large download should show it is moving). The previous state comes
    back after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def peak_memory_gb(device=None) -> float:
    """Peak GPU memory allocated on ``device`` (CUDA), else the process's peak resident memory, in GiB."""
    import torch

    if device is not None and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
        return kib / 2**20 if sys.platform != "darwin" else kib / 2**30
    except (ImportError, OSError):
        return 0.0


__all__ = ["Live", "Periodic", "duration", "main_process", "on_terminal", "peak_memory_gb", "quiet_libraries", "say"]
