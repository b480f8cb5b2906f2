"""The cost of one tool call: a fresh sandboxed Python program per call (sftforge.sandbox), against its peers.

    python benchmarks/sandbox.py [--calls 100] [--interpreter /usr/bin/python3] [--fusion-url URL]

Rows, each timed over --calls calls of the same small program (ReTool-sized: an import and a print) on this machine:
- ``bwrap``: sftforge's default (namespaces, limits, scratch tmpfs), end to end through ``run_code``;
- ``rlimits_only``: the same launcher and limits without namespaces (the weaker mode);
- ``python subprocess``: the bare interpreter, no sandbox (the floor any fresh process pays);
- ``bwrap, N at once``: calls issued from N threads, as a rollout turn runs them (``sandbox.max_concurrent``):
  per-call latency and calls per second;
- ``fusion``: with ``--fusion-url http://127.0.0.1:PORT/run_code``, a SandboxFusion server (a loopback one: this
  benchmark sends nothing off the machine you point it at), HTTP included.
Median and p95 in milliseconds; the ratio column is against the bare subprocess.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from sftforge.config import SandboxConfig
from sftforge.sandbox import run_code

PROGRAM = "import math\nprint(math.comb(40, 20) * 3)"


def _stats(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000


def timed(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--interpreter", default="/usr/bin/python3")
    p.add_argument("--fusion-url", default="", help="a SandboxFusion run_code endpoint to time as well")
    args = p.parse_args(argv)
    box = SandboxConfig(interpreter=args.interpreter)
    weak = SandboxConfig(interpreter=args.interpreter, backend="rlimits_only")
    want = f"{3 * 137846528820}\n"
    assert run_code(PROGRAM, box).stdout == want  # warm: the probe, the page cache
    rows = {}
    rows["python subprocess (no sandbox)"] = timed(
        lambda: subprocess.run([args.interpreter, "-I", "-c", PROGRAM], capture_output=True, check=True), args.calls
    )
    rows["bwrap (sftforge default)"] = timed(lambda: run_code(PROGRAM, box), args.calls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows["rlimits_only (no isolation)"] = timed(lambda: run_code(PROGRAM, weak), args.calls)
    if args.fusion_url:
        fusion = SandboxConfig(backend="fusion", fusion_url=args.fusion_url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert run_code(PROGRAM, fusion).stdout == want
        rows["SandboxFusion server (its isolation)"] = timed(lambda: run_code(PROGRAM, fusion), args.calls)
    throughput = {}
    for n in (2, 8):
        with ThreadPoolExecutor(n) as pool:
            t = time.perf_counter()
            lat = list(pool.map(lambda _: timed(lambda: run_code(PROGRAM, box), 1)[0], range(args.calls)))
            throughput[f"bwrap, {n} at once"] = args.calls / (time.perf_counter() - t)
            rows[f"bwrap, {n} at once"] = lat
    floor = _stats(rows["python subprocess (no sandbox)"])[0]
    print(f"one tool call ({args.calls} calls each; program: {PROGRAM!r}; interpreter {args.interpreter})")
    print(f"{'mode':34} {'median ms':>10} {'p95 ms':>8} {'x bare':>7} {'calls/s':>8}")
    for name, times in rows.items():
        med, p95 = _stats(times)
        per_s = throughput.get(name, 1 / statistics.mean(times))
        print(f"{name:34} {med:10.1f} {p95:8.1f} {med / floor:7.2f} {per_s:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
