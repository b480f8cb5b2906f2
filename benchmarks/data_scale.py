"""Data at scale: cold and cached starts of a large conversation set, one process and a 2-process torchrun start.

    python benchmarks/data_scale.py --rows 1570000 [5000000] [--torchrun] [--tokenizer DIR]
    python benchmarks/data_scale.py --file F.parquet --set data.messages_key=messages [--torchrun]

Without --file it writes a multiple-choice set shaped like the ExplicitLM notes' (system, a question with four
options, a one-line answer; ``conversations`` role/content, ~90 Qwen3 tokens a row) with --rows rows. Each
measurement is a child process that imports torch, notes its resident memory (the baseline), then does what
``sftforge plan`` and a training start do with the data: tokenize (cold: an empty cache) or map the store (cached),
compute the lengths, the plan's statistics and the first step's micro-batches. Printed per run: wall, rows/s,
tokens/s, peak resident memory (ru_maxrss) and the peak above the baseline; under torchrun, per rank, and which rank
tokenized (the others wait for it and map the same store).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there one all we can cell energy force light water acid plant atom heat").split()  # fmt: skip


def write_mcq(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize()

    with open(path, "w") as f:
        for i in range(rows):
            options = [sentence(rng.randint(2, 8)) for _ in range(4)]
            answer = rng.randrange(4)
            user = (sentence(rng.randint(8, 30)) + "?\n" + "\n".join(f"{'ABCD'[j]}. {o}" for j, o in enumerate(options))
                    + "\nAnswer with the letter.")  # fmt: skip
            conv = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": user},
                    {"role": "assistant", "content": f"{'ABCD'[answer]}. {options[answer]}"}]  # fmt: skip
            f.write(json.dumps({"id": i, "conversations": conv}) + "\n")


def child(args) -> None:
    """One measured start (run as its own process; under torchrun, one rank)."""
    import torch  # noqa: F401  (the baseline is the interpreter with torch imported)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    from sftforge.batching import make_plan, step_micro_batches
    from sftforge.config import load_config
    from sftforge.data import build_dataset
    from sftforge.plan import build_plan

    over = [f"data.train_files={args.file}", f"data.cache_dir={args.cache}", "data.format=messages",
            "data.messages_key=conversations", "data.max_length=2048", "data.train_batch_size=64",
            f"model.path={args.tokenizer}", *args.set]  # fmt: skip
    cfg = load_config(None, over)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    ds = build_dataset(cfg.data, tok)
    build_plan(cfg, ds.store.column("length"), ds.store.column("trained"), report=ds.report)  # as `sftforge plan`
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    plan = make_plan(cfg, len(ds), world, rank)
    _, _, micro, _, _ = step_micro_batches(ds, 0, cfg, plan)  # a training start: the first step's samples
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r = ds.report
    print("RESULT " + json.dumps({"rank": rank, "wall": wall, "rows": r.rows, "tokens": r.tokens, "peak": peak,
                                  "base": base, "origin": ds.origin, "samples": len(ds)}), flush=True)  # fmt: skip


def run(cmd: list[str], env: dict) -> list[dict]:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return sorted((json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")),
                  key=lambda x: x["rank"])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000])
    ap.add_argument("--file", default="", help="a .jsonl/.parquet in conversations form instead of the generated set")
    shared = ROOT.parent / "shared" / "assets" / "tokenizers" / "qwen3"
    ap.add_argument("--tokenizer", default=str(shared) if shared.exists() else "")
    ap.add_argument("--torchrun", action="store_true", help="also a 2-process torchrun start (cold and cached)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for --file (e.g. data.messages_key=messages)")  # fmt: skip
    ap.add_argument("--workdir", default="", help="keep the data and the caches here (default: a temporary folder)")
    ap.add_argument("--cached-only", action="store_true", help="only the cached starts (after a run with --workdir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not args.tokenizer:
        from sftforge.bench import unpack_tokenizer

        args.tokenizer = str(unpack_tokenizer("qwen3", Path(tempfile.mkdtemp())))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sftforge-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    me = [sys.executable, str(Path(__file__).resolve()), "--child", "--tokenizer", args.tokenizer, "--set", *args.set]
    print(f"{os.cpu_count()} cores; tokenizer {args.tokenizer}\n")
    print("| rows | start | processes | wall | rows/s | tokens/s | peak resident | above torch import | tokenized by |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for rows in [0] if args.file else args.rows:
        data = Path(args.file) if args.file else work / f"mcq-{rows}.jsonl"
        if not args.file and not data.exists():
            t0 = time.perf_counter()
            write_mcq(data, rows)
            print(f"(wrote {data} in {time.perf_counter() - t0:.0f} s, {data.stat().st_size / 2**20:,.0f} MiB)",
                  file=sys.stderr)  # fmt: skip
        launches = [("1", me)]
        if args.torchrun:
            launches.append(("2", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                   "2", *me[1:]]))  # fmt: skip
        for procs, cmd in launches:
            cache = work / f"cache-{procs}-{data.stem}"
            if not args.cached_only:
                shutil.rmtree(cache, ignore_errors=True)
            for start in ("cached",) if args.cached_only else ("cold", "cached"):
                results = run([*cmd, "--file", str(data), "--cache", str(cache)], env)
                for r in results:
                    who = "this rank" if r["origin"] == "tokenized" else "the store" if r["origin"] == "cache" else (
                        "another rank (waited)")  # fmt: skip
                    rank = f" (rank {r['rank']})" if procs != "1" else ""
                    print(f"| {r['rows']:,} | {start}{rank} | {procs} | {r['wall']:.1f} s | {r['rows'] / r['wall']:,.0f} | "
                          f"{r['tokens'] / r['wall']:,.0f} | {r['peak'] / 2**30:.2f} GiB | "
                          f"{(r['peak'] - r['base']) / 2**30:.2f} GiB | {who} |", flush=True)  # fmt: skip
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
