"""data.reasoning_history=per_turn on a multi-turn reasoning set: tokens per epoch (one render / naive per-turn
expansion / prefix tree), training step time of the tree vs the one render, and what a model trained each way does
mid-conversation; the step time by number of assistant turns (the tree's extra tokens grow with them).

The reasoning set: the 1,000 TextCraft react episodes (data/textcraft/train_react.parquet) with each assistant turn
"Thought: X\\nAction: Y" split into reasoning_content X and content "Action: Y", rendered by the real Qwen3 template
(which drops the <think> of every assistant turn before the last user message).

    python benchmarks/prefix_tree.py                # the tables (~10 minutes on 2 CPU cores)
    python benchmarks/prefix_tree.py --time-model qwen3-small   # the step times in docs/data.md (~15 minutes)
    python benchmarks/prefix_tree.py --rows 200 --steps 60
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sftforge.bench import unpack_tokenizer
from sftforge.chat import render_prompt, template_markers
from sftforge.config import DataConfig, ModelConfig, load_config
from sftforge.data import read_rows, tokenize_row
from sftforge.generation import GenerationOptions, HFBackend
from sftforge.model import load_model
from sftforge.sft import train

ROOT = Path(__file__).resolve().parent.parent
THOUGHT = re.compile(r"^Thought:\s*(.*?)\n(Action:.*)$", re.S)


def reasoning_rows(n: int) -> list[dict]:
    rows = []
    for _, row in read_rows(str(ROOT / "data" / "textcraft" / "train_react.parquet")):
        msgs = json.loads(row["messages"]) if isinstance(row["messages"], str) else row["messages"]
        out = []
        for m in msgs:
            m = dict(m)
            hit = THOUGHT.match(m.get("content") or "") if m["role"] == "assistant" else None
            if hit:
                m["reasoning_content"], m["content"] = hit.group(1).strip(), hit.group(2).strip()
            out.append(m)
        rows.append({"messages": out})
        if len(rows) == n:
            break
    return rows


def outputs_unused(parents: list[int], mask: list[int]) -> int:
    """Nodes of a tree whose output no target uses: neither predicting a trained child nor an ancestor of one that
    does (each branch's last tokens) — what even an exact method could leave out."""
    used = [False] * len(parents)
    for j, p in enumerate(parents):
        if p >= 0 and mask[j]:
            used[p] = True
    for j in range(len(parents) - 1, -1, -1):
        if used[j] and parents[j] >= 0:
            used[parents[j]] = True
    return used.count(False)


def token_counts(rows, tok) -> dict:
    markers = template_markers(tok)
    one = [tokenize_row(str(i), r, tok, DataConfig(), markers) for i, r in enumerate(rows)]
    tree = [tokenize_row(str(i), r, tok, DataConfig(reasoning_history="per_turn"), markers) for i, r in enumerate(rows)]
    return {
        "rows": len(rows),
        "contexts": sum(s.contexts for s in tree),
        "one_render": sum(len(s.input_ids) for s in one),
        "one_render_trained": sum(sum(s.loss_mask) for s in one),
        "expanded": sum(s.expanded_tokens for s in tree),
        "tree": sum(len(s.input_ids) for s in tree),
        "tree_trained": sum(sum(s.loss_mask) for s in tree),
        "branched": sum(s.parents is not None for s in tree),
        "unused": sum(outputs_unused(s.parents, s.loss_mask) for s in tree if s.parents is not None),
    }


def write_jsonl(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp: Path, name: str, data: Path, tok_dir: Path, mode: str, steps: int, extra=(), model="qwen3-tiny") -> dict:
    cfg = load_config(None, [f"model.path={ROOT / 'tests' / 'fixtures' / 'model_configs' / model}",
                             f"model.tokenizer_path={tok_dir}", f"data.train_files={data}", "data.max_length=8192",
                             f"data.reasoning_history={mode}", "data.train_batch_size=8",
                             "data.micro_batch_size_per_gpu=8", "optim.lr=3e-3", "optim.weight_decay=0",
                             "optim.warmup_steps=10", f"trainer.max_steps={steps}", "trainer.device=cpu",
                             "trainer.logger=[jsonl]", "trainer.log_freq=1000", f"trainer.output_dir={tmp / name}",
                             *extra])  # fmt: skip
    return train(cfg)


def step_times(out: Path) -> tuple[float, float]:
    """(median step seconds after the first step, mean tokens per step) of a finished run."""
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    el = [r["elapsed_s"] for r in steps]
    return statistics.median(b - a for a, b in zip(el, el[1:])), statistics.mean(r["tokens"] for r in steps[1:])


def assistant_turns(row: dict) -> int:
    return sum(m["role"] == "assistant" for m in row["messages"])


def by_turns(rows, tok, tok_dir: Path, tmp: Path, model: str, timed: int) -> None:
    """Step time of the tree vs the one render on episodes grouped by their number of assistant turns: the tree's
    extra tokens (each earlier turn's context-specific branch) grow with the turns, and so does its step."""
    lines = []
    for lo, hi in ((2, 3), (4, 6), (7, 99)):
        sel = [r for r in rows if lo <= assistant_turns(r) <= hi][:200]
        c = token_counts(sel, tok)
        data = write_jsonl(sel, tmp / f"turns-{lo}.jsonl")
        t = {}
        for mode in ("template", "per_turn"):
            res = run(tmp, f"turns-{lo}-{mode}", data, tok_dir, mode, timed + 1, model=model)
            t[mode] = step_times(Path(res["output_dir"]))[0]
        label = f"{lo}-{hi}" if hi < 99 else f"{lo}+"
        lines.append(f"| {label} | {len(sel)} | {c['tree'] / c['one_render']:.2f}× | {t['template']:.3f} | "
                     f"{t['per_turn']:.3f} | {t['per_turn'] / t['template']:.2f}× |")  # fmt: skip
    print(f"\nby assistant turns (up to 200 episodes each, 8 per step, {model} shape, median of {timed} steps):\n")
    print("| turns | episodes | tree tokens vs one render | one render s | tree s | tree step vs one render |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(lines))


def opens_with_reasoning(final_dir: str, rows, tok, n_turns: int) -> float:
    """Share of generated MID-conversation assistant turns (a user message follows in the data) that open a
    non-empty <think> block."""
    model = load_model(ModelConfig(path=final_dir))
    backend = HFBackend(model, tok.pad_token_id or 0)
    prompts = []
    for r in rows:
        msgs = r["messages"]
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i < users[-1] and len(prompts) < n_turns:
                prompts.append(tok(render_prompt(tok, msgs[:i]), add_special_tokens=False)["input_ids"])
    outs = backend.generate(prompts, GenerationOptions(max_new_tokens=24, batch_size=16), stop_ids=[])
    texts = [tok.decode(o) for o in outs]
    return sum(bool(re.match(r"\s*<think>\s*\S", t)) and not t.lstrip().startswith("<think>\n\n</think>")
               for t in texts) / max(len(texts), 1)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000, help="episodes for the token counts (default all 1,000)")
    ap.add_argument("--steps", type=int, default=150, help="training steps of each model (default 150)")
    ap.add_argument("--timed", type=int, default=20, help="steps of the step-time comparison (default 20)")
    ap.add_argument("--time-model", default="qwen3-tiny", help="tests/fixtures/model_configs shape of the timing")
    ap.add_argument("--no-eval", action="store_true", help="skip the two training runs and their generations")
    ap.add_argument("--no-turns", action="store_true", help="skip the step times by number of assistant turns")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp(prefix="sftforge-tree-"))
    try:
        tables(args, tmp)
    finally:  # the runs' checkpoints (GBs)
        shutil.rmtree(tmp, ignore_errors=True)


def tables(args, tmp: Path) -> None:
    tok_dir = unpack_tokenizer("qwen3", tmp / "tok")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    rows = reasoning_rows(args.rows)
    c = token_counts(rows, tok)
    print(f"TextCraft react with reasoning, {c['rows']} episodes, {c['contexts']} assistant turns, Qwen3 template "
          f"({c['branched']} episodes branch)\n")  # fmt: skip
    print("| layout | tokens per epoch | vs one render | trained tokens |")
    print("|---|---:|---:|---:|")
    print(
        f"| one render (data.reasoning_history=template) | {c['one_render']:,} | 1.00× | {c['one_render_trained']:,} |"
    )
    print(f"| naive per-turn expansion | {c['expanded']:,} | {c['expanded'] / c['one_render']:.2f}× | "
          f"{c['tree_trained']:,} |")  # fmt: skip
    print(f"| prefix tree (per_turn) | {c['tree']:,} | {c['tree'] / c['one_render']:.2f}× | {c['tree_trained']:,} |")
    print(f"\n{c['unused']:,} of the tree's tokens ({c['unused'] / c['tree']:.1%}) have outputs no target uses (each "
          "branch's last tokens); every other one is needed by a trained prediction")  # fmt: skip
    train_rows = rows[:200]
    data = write_jsonl(train_rows, tmp / "train.jsonl")
    # step time: the same 8 episodes per step, the same model; medians of the timed steps after the first. The naive
    # expansion trains each turn's context as its own sample (the conversation cut after it, its last turn trained):
    # a step holds the contexts of 8 episodes.
    expanded_rows = [{"messages": r["messages"][: k + 1]} for r in train_rows
                     for k, m in enumerate(r["messages"]) if m["role"] == "assistant"]  # fmt: skip
    batch = round(8 * len(expanded_rows) / len(train_rows))
    expanded = write_jsonl(expanded_rows, tmp / "expanded.jsonl")
    times = {}
    for mode in ("template", "per_turn"):
        res = run(tmp, f"time-{mode}", data, tok_dir, mode, args.timed + 1, model=args.time_model)
        times[mode] = step_times(Path(res["output_dir"]))
    extra = ["data.train_on=last_assistant", f"data.train_batch_size={batch}", f"data.micro_batch_size_per_gpu={batch}"]
    res = run(tmp, "time-expanded", expanded, tok_dir, "template", args.timed + 1, extra, model=args.time_model)
    times["expanded"] = step_times(Path(res["output_dir"]))
    print(f"\nstep time, 8 episodes per step ({args.time_model} shape, CPU, median of {args.timed} steps):\n")
    print("| layout | tokens per step | step s | vs one render | ms per 1k tokens |\n|---|---:|---:|---:|---:|")
    base = times["template"][0]
    for name, key in (("one render", "template"), (f"naive expansion ({batch} contexts)", "expanded"),
                      ("prefix tree", "per_turn")):  # fmt: skip
        s, n = times[key]
        print(f"| {name} | {n:,.0f} | {s:.3f} | {s / base:.2f}× | {1e6 * s / n:.0f} |")
    if not args.no_turns:
        by_turns(rows, tok, tok_dir, tmp, args.time_model, args.timed)
    if args.no_eval:
        return
    # what the models do mid-conversation
    share = {}
    for mode in ("template", "per_turn"):
        res = run(tmp, f"eval-{mode}", data, tok_dir, mode, args.steps)
        share[mode] = opens_with_reasoning(res["final_dir"], rows[200:] or rows[-20:], tok, 100)
    print(
        f"\nmid-conversation turns that open with a reasoning block (100 held-out turns, {args.steps} steps): "
        f"trained with one render {share['template']:.0%}, trained per_turn {share['per_turn']:.0%}"
    )


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - t0:.0f}s)")
