"""Tokenization throughput: conversations/s for the TextCraft data, cold (no cache) and cached.

    python benchmarks/data_throughput.py [--data DIR] [--num-proc 1 2]

DIR defaults to ../shared/data/textcraft when it exists, else the repo's 40-row fixture. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from sftforge.bench import unpack_tokenizer
from sftforge.config import DataConfig
from sftforge.data import build_dataset

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def main() -> None:
    ap = argparse.ArgumentParser()
    shared = ROOT.parent / "shared" / "data" / "textcraft"
    ap.add_argument("--data", default=str(shared if shared.exists() else FIXTURES / "textcraft"))
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    print(f"data: {args.data}\n")
    print("| tokenizer | file | rows | num_proc | cold conv/s | cached conv/s | tokens | trained share |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("qwen3", "qwen2.5", "phi3"):
        tok = AutoTokenizer.from_pretrained(str(unpack_tokenizer(name, tmp)))
        for shape in ("react", "tools"):
            if name == "phi3" and shape == "tools":
                continue  # Phi-3's template does not render tool calls (sftforge refuses that data for it)
            f = str(Path(args.data) / f"train_{shape}.jsonl")
            for n in args.num_proc:
                cache = tmp / f"cache-{name}-{shape}-{n}"
                c = DataConfig(num_proc=n, cache_dir=str(cache), max_length=32768)
                t0 = time.perf_counter()
                ds = build_dataset(c, tok, f)
                cold = time.perf_counter() - t0
                t0 = time.perf_counter()
                build_dataset(c, tok, f)
                warm = time.perf_counter() - t0
                r = ds.report
                print(
                    f"| {name} | {shape} | {r.rows} | {n} | {r.rows / cold:,.0f} | {r.rows / warm:,.0f} | "
                    f"{r.tokens:,} | {r.trained_tokens / r.tokens:.1%} |"
                )
                sys.stdout.flush()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
