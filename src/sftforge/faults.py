"""Fault injection for the reliability tests (tests/test_reliability*.py). Unset in normal use: nothing happens.

The tests run ``python -m sftforge train ...`` in a subprocess and need a signal or a kill to land at an exact point,
which timing alone cannot give. ``SFTFORGE_TEST_FAULT`` holds comma-separated items:

  signal=TERM@S.M      the process sends itself SIGTERM (or INT, KILL) right before micro-batch M (0-based) of
                       optimizer step S (1-based, the step being computed)
  save_sleep=S:PHASE   inside the save of step_S, print "fault: sleeping in save of step S at PHASE" to stderr and
                       sleep 60 s, so the test can SIGKILL the process there. PHASE: weights (model.safetensors
                       written, nothing else) | marker (the .tmp folder is complete, not yet renamed)
  store_kill=K         the writer of a tokenized store SIGKILLs itself right after its K-th chunk (1-based)
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "SFTFORGE_TEST_FAULT"


def _items() -> dict[str, str]:
    raw = os.environ.get(ENV, "")
    return dict(item.split("=", 1) for item in raw.split(",") if "=" in item)


def before_micro_batch(step: int, micro: int) -> None:
    """Called by the training loop before each micro-batch (step is 1-based)."""
    spec = _items().get("signal")
    if not spec:
        return
    name, _, at = spec.partition("@")
    s, _, m = at.partition(".")
    if int(s) == step and int(m or 0) == micro:
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def in_save(step: int, phase: str) -> None:
    """Called by save_checkpoint at each PHASE of writing step_<step>."""
    spec = _items().get("save_sleep")
    if spec and spec == f"{step}:{phase}":
        print(f"fault: sleeping in save of step {step} at {phase}", file=sys.stderr, flush=True)
        time.sleep(60)


def after_store_append(n: int) -> None:
    """Called by the tokenized store's writer after its n-th chunk (1-based)."""
    spec = _items().get("store_kill")
    if spec and int(spec) == n:
        os.kill(os.getpid(), signal.SIGKILL)
