"""Generation eval: does the fine-tuned model do the task?

Prompts are rendered by the same chat-template code as training (``sftforge.chat``): a row is normalized to
messages + tools with :func:`~sftforge.chat.row_to_conversation`, the conversation is cut before its last assistant
turn (or before each assistant turn with ``turns="all"``; a prompt-only row, scored against its ``answer`` column, is
its whole conversation) and rendered with ``add_generation_prompt=True`` and
``data.chat_template_kwargs``, so the model sees exactly the system prompt, tools and headers it was trained with.
Generation stops at the template's end-of-turn tokens (:func:`~sftforge.chat.end_of_turn_token_ids`).

Generation (backends, stop handling) is :mod:`sftforge.generation`; scorers (``exact``, ``gsm8k``, ``mcq``,
``tool_call``, ``module:function``) are :mod:`sftforge.scorers`; multi-turn environments are :mod:`sftforge.envs`.
This module builds the samples, runs generation + scoring, summarizes (with a Wilson interval) and holds the
``sftforge eval`` command and the in-training eval.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from sftforge.chat import ANSWER_COLUMNS, RowError, image_sources, prompt_or_conversation, row_answer
from sftforge.config import Config, ConfigError, DataConfig, load_config
from sftforge.data import DataError, load_tokenizer, read_rows, resolve_files
from sftforge.envs import Env, Task, rollout
from sftforge.envs.code import CodeEnv, load_code_tasks
from sftforge.envs.textcraft import TextCraftEnv, load_tasks
from sftforge.export import is_built_module, load_trained
from sftforge.generation import (
    GenerationOptions,
    GenerationStats,
    Generator,
    HFBackend,
    VLLMBackend,
    check_vllm,
    hf_generator,
    pad_id,
)
from sftforge.model import check_model_options, load_model, with_dtype
from sftforge.progress import Live, Periodic, quiet_libraries
from sftforge.sandbox import check_sandbox
from sftforge.scorers import ENV_TASKS, EvalSample, as_score, get_scorer, is_task
from sftforge.vision import load_vision

# ------------------------------------------------------------------------------------------------------------------
# Samples


def samples_from_rows(rows: Sequence[tuple], data_cfg: DataConfig, turns: str = "last") -> list[EvalSample]:
    """(location, row) pairs -> eval samples: one per row (``turns="last"``) or one per assistant turn (``"all"``).
    A prompt-only row (no assistant message) is one sample whose reference is its ``answer``/``reference`` column.
    A third item, the data file, is where the row's relative image paths start (:func:`file_rows`)."""
    if turns not in ("last", "all"):
        raise ConfigError(f"turns must be 'last' or 'all', got {turns!r}.")
    out = []
    for loc, row, *where in rows:
        base = str(Path(where[0]).resolve().parent) if where else None
        if isinstance(row, RowError):
            raise DataError(f"{loc}: {row.detail}")
        try:
            messages, tools, _, prompt_only = prompt_or_conversation(row, data_cfg)
        except RowError as e:
            raise DataError(f"{loc}: {e.detail}") from None
        rid = str(row.get("id", loc)) if isinstance(row, dict) else loc
        if prompt_only:
            if row_answer(row) is None:
                raise DataError(
                    f"{loc}: the row has no assistant message and no gold answer ({', '.join(ANSWER_COLUMNS)}): "
                    "nothing to score a generation against; add one of them."
                )
            out.append(EvalSample(rid, messages, tools, {"role": "assistant", "content": ""}, row, base))
            continue
        idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        chosen = idx if turns == "all" else idx[-1:]
        for i in chosen:
            sid = rid if turns == "last" else f"{rid}#{i}"
            out.append(EvalSample(sid, messages[:i], tools, messages[i], row, base))
    return out


def file_rows(files: Any, key: str) -> list[tuple[str, Any, str]]:
    """(location, row, file) of every row of ``files``."""
    return [(loc, row, f) for f in resolve_files(files, key) for loc, row in read_rows(f)]


def load_samples(files: Any, data_cfg: DataConfig, turns: str = "last", key: str = "--data") -> list[EvalSample]:
    return samples_from_rows(file_rows(files, key), data_cfg, turns)


def sample_images(samples: list[EvalSample], vision) -> list | None:
    """Per sample, its prompt's images as (bytes, grid) (None without); None when no sample has one."""
    found = [image_sources(s.messages) for s in samples]
    if not any(found):
        return None
    if vision is None:
        raise ConfigError("the eval data has images but the model has no vision tower (no vision_config).")
    out = []
    for s, sources in zip(samples, found):
        try:
            out.append([vision.load(src, s.base_dir, f"image {k}") for k, src in enumerate(sources)] or None)
        except RowError as e:
            raise DataError(f"sample {s.id}: {e.detail}") from None
    return out


# ------------------------------------------------------------------------------------------------------------------
# Evaluate + summary


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0% and 100%, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` right answers among ``n`` samples (Chen et al. 2021): the chance
    that k of the n, drawn without replacement, hold at least one right answer: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(n: int) -> list[int]:
    """The k reported for n samples per problem: 1, the powers of 2 below n, and n."""
    return sorted({1, n} | {2**i for i in range(1, n.bit_length()) if 2**i < n})


def bootstrap_mean(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (one per problem: a problem's samples move
    together, so the interval is over problems, not samples)."""
    if not values:
        return 0.0, 0.0
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(math.ceil(0.975 * (resamples - 1)))]


def k_sample_metrics(scores: dict[Any, list[float]]) -> dict[str, Any]:
    """Per problem its K scores (a score >= 0.5 counts as right) -> :func:`count_metrics`."""
    ks = {len(v) for v in scores.values()}
    if len(ks) != 1:
        raise ValueError(f"every problem needs the same number of samples, got {sorted(ks)}")
    values = list(scores.values())
    return count_metrics([sum(v) for v in values], [sum(x >= 0.5 for x in v) for v in values], ks.pop())


def count_metrics(sums: list[float], rights: list[int], k_all: int) -> dict[str, Any]:
    """Per problem the sum of its ``k_all`` scores and how many were right -> with one sample, the accuracy and its
    Wilson interval; with several, ``mean@K`` and ``pass@k`` for every k of :func:`k_values`, each with a 95%
    bootstrap interval over problems (``..._ci95``)."""
    n = len(sums)
    if k_all == 1:
        return {"problems": n, "accuracy": sum(sums) / max(n, 1), "ci95": wilson(sum(sums), n)}
    out: dict[str, Any] = {"problems": n, "samples_per_problem": k_all}
    per_problem = {f"mean@{k_all}": [s / k_all for s in sums]}
    for k in k_values(k_all):
        per_problem[f"pass@{k}"] = [pass_at_k(k_all, c, k) for c in rights]
    for name, values in per_problem.items():
        out[name] = sum(values) / max(n, 1)
        out[f"{name}_ci95"] = bootstrap_mean(values)
    return out


@dataclass
class EvalResult:
    records: list[dict]
    summary: dict = field(default_factory=dict)


def summarize(records: list[dict], stats: GenerationStats, task: str, score_key: str = "score") -> dict:
    """Accuracy with its 95% Wilson interval, the scorer's extra metrics and generation figures; with several
    samples per problem (records carry ``problem``/``sample``) mean@K and pass@k with intervals over problems instead;
    and, when the rows name a ``data_source``, the same per source (``by_source``)."""
    n = len(records)
    overall = _problem_metrics(records, score_key)
    k = overall.get("samples_per_problem")
    if k:
        accuracy, (low, high) = overall[f"mean@{k}"], overall[f"mean@{k}_ci95"]
    else:
        accuracy, (low, high) = overall["accuracy"], overall["ci95"]
    summary = {"task": task, "n": n, "accuracy": accuracy, "ci95_low": low, "ci95_high": high}
    if k:
        summary.update(overall)
    per_source = {}
    for source in sorted({str(r["data_source"]) for r in records if r.get("data_source") is not None}):
        per_source[source] = _problem_metrics([r for r in records if str(r.get("data_source")) == source], score_key)
    if per_source:
        summary["by_source"] = per_source
    extras = sorted({k for r in records for k, v in r.get("metrics", {}).items() if isinstance(v, float)})
    for k in extras:
        summary[k] = sum(r["metrics"].get(k, 0.0) for r in records) / max(n, 1)
    gens = [g for r in records for g in r.get("_gens", [])]
    summary["mean_generated_tokens"] = sum(g.n_tokens for g in gens) / max(len(gens), 1)
    summary["hit_max_new_tokens"] = sum(g.hit_max for g in gens) / max(len(gens), 1)
    summary["generated_tokens"] = stats.tokens
    summary["generation_s"] = round(stats.seconds, 3)
    summary["tokens_per_s"] = stats.tokens_per_s
    return summary


def _problem_metrics(records: list[dict], score_key: str) -> dict:
    """:func:`count_metrics` of records (one per answer; ``problem`` groups several answers to one problem)."""
    scores: dict[Any, list[float]] = {}
    for i, r in enumerate(records):
        scores.setdefault(r.get("problem", i), []).append(float(r[score_key]))
    return k_sample_metrics(scores)


def row_source(row: Any) -> dict:
    """``{"data_source": ...}`` of a row that names one (verl's RL data does), else nothing."""
    source = row.get("data_source") if isinstance(row, dict) else None
    return {"data_source": source} if isinstance(source, (str, int)) and not isinstance(source, bool) else {}


def evaluate_samples(generator: Generator, samples: list[EvalSample], task: str = "exact", k: int = 1) -> EvalResult:
    """Generate ``k`` answers for every sample and score them; records hold prompt, generation, reference and score
    (and, with k > 1, which problem and which of its samples)."""
    scorer = get_scorer(task)
    prompts = [generator.prompt(s.messages, s.tools) for s in samples]
    images = sample_images(samples, generator.vision)
    live = Live(f"eval {task}", len(prompts) * k)
    periodic = Periodic(f"eval {task}", len(prompts) * k, "answers")

    def on_batch(done: int, total: int) -> None:
        live.update(done)
        periodic.update(done)

    if (live.active or periodic.active) and hasattr(generator.backend, "on_batch"):
        generator.backend.on_batch = on_batch
    try:
        gens = generator.generate(
            [p for p in prompts for _ in range(k)], [im for im in images for _ in range(k)] if images else None
        )
    finally:
        live.close()
        if hasattr(generator.backend, "on_batch"):
            generator.backend.on_batch = None
    records = []
    for i, g in enumerate(gens):
        s, p = samples[i // k], prompts[i // k]
        scored = as_score(scorer(g.text, s))
        ref: Any = s.reference
        if task == "tool_call":
            ref = s.reference_message.get("tool_calls") or s.reference
        extra = {key: v for key, v in scored.items() if key != "score"}
        which = {"problem": i // k, "sample": i % k} if k > 1 else {}
        records.append(
            {
                "id": s.id,
                **which,
                **row_source(s.row),
                "prompt": p,
                "generation": g.text,
                "reference": ref,
                "score": scored["score"],
                "metrics": extra,
                "generated_tokens": g.n_tokens,
                "hit_max": g.hit_max,
                "_gens": [g],
            }
        )
    return EvalResult(records, summarize(records, generator.stats, task))


def write_records(path: str | Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            clean = {k: v for k, v in r.items() if not k.startswith("_")}
            clean.update(clean.pop("metrics", {}))
            f.write(json.dumps(clean, ensure_ascii=False, default=str) + "\n")


def _interval(pair) -> str:
    return f"[{pair[0]:.1%}, {pair[1]:.1%}]"


def _k_rows(metrics: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Table rows of :func:`_problem_metrics`'s output: mean@K / pass@k with their intervals, or an accuracy."""
    if "samples_per_problem" not in metrics:
        return [
            (
                f"{prefix}accuracy ({metrics['problems']} problems)",
                f"{metrics['accuracy']:.1%} {_interval(metrics['ci95'])}",
            )
        ]
    return [
        (f"{prefix}{name}", f"{metrics[name]:.1%} {_interval(metrics[name + '_ci95'])}")
        for name in metrics
        if "@" in name and not name.endswith("_ci95")
    ]


def print_summary(summary: dict, console=None) -> None:
    console = console or Console(highlight=False)
    name = "success rate" if summary.get("episodes") else "accuracy"
    table = Table(title=f"sftforge eval: {summary['task']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("samples" if not summary.get("episodes") else "episodes", str(summary["n"]))
    k = summary.get("samples_per_problem")
    skip = {
        "task",
        "n",
        "accuracy",
        "ci95_low",
        "ci95_high",
        "episodes",
        "generated_tokens",
        "generation_s",
        "by_source",
        "problems",
        "samples_per_problem",
    }
    if k:
        table.add_row("problems × samples", f"{summary['problems']} × {k}")
        for label, value in _k_rows(summary):
            table.add_row(label, value)
        table.add_row("95% intervals", "bootstrap over problems")
        skip |= {key for key in summary if "@" in key}
    else:
        table.add_row(name, f"{summary['accuracy']:.1%}")
        table.add_row("95% interval (Wilson)", f"{summary['ci95_low']:.1%} – {summary['ci95_high']:.1%}")
    for source, metrics in summary.get("by_source", {}).items():
        for label, value in _k_rows(metrics, f"{source}: "):
            table.add_row(label, value)
    for key, v in summary.items():
        if key in skip or key in ("mean_generated_tokens", "hit_max_new_tokens", "tokens_per_s"):
            continue
        rate = isinstance(v, float) and 0 <= v <= 1 and key != "mean_turns"
        table.add_row(key, f"{v:.1%}" if rate else f"{v:.2f}" if isinstance(v, float) else str(v))
    table.add_row("mean generated tokens", f"{summary['mean_generated_tokens']:.1f}")
    table.add_row("hit max_new_tokens", f"{summary['hit_max_new_tokens']:.1%}")
    table.add_row(
        "tokens/s", f"{summary['tokens_per_s']:,.1f} ({summary['generated_tokens']} in {summary['generation_s']}s)"
    )
    console.print(table)


# ------------------------------------------------------------------------------------------------------------------
# Multi-turn environments


def environment(
    task: str, rows: list[tuple], cfg: Config, check: bool = True
) -> tuple[list[Task], Callable[[], Env], int]:
    """(tasks, a new environment, how many of its steps may run at once) of the environment ``task`` on ``rows``
    ((location, row) pairs): what ``sftforge eval`` and ``sftforge rl`` roll out. ``check``: the code_math sandbox is
    checked here (``sftforge plan`` reports it instead)."""
    rows = [r[:2] for r in rows]  # (location, row): the file is not needed
    if task == "textcraft":
        tasks, book = load_tasks(rows, cfg.data)
        return tasks, lambda: TextCraftEnv(book), 1
    if task == "code_math":
        if check:
            check_sandbox(cfg.sandbox)  # bubblewrap missing or blocked: said before any model loads
        scorer = get_scorer("math")
        workers = cfg.sandbox.max_concurrent or os.cpu_count() or 1
        return load_code_tasks(rows, cfg.data), lambda: CodeEnv(cfg.sandbox, scorer), workers
    raise ConfigError(f"unknown environment {task!r}; available: {', '.join(ENV_TASKS)}")


def evaluate_env(
    generator: Generator, rows: list[tuple], cfg: Config, task: str = "textcraft", max_turns: int = 40, k: int = 1
) -> EvalResult:
    """Roll out the model in an environment on every task in ``rows``, ``k`` episodes each; the score is success."""
    tasks, make_env, workers = environment(task, rows, cfg)
    sources = [row_source(r[1]) for r in rows] if len(rows) == len(tasks) else [{}] * len(tasks)

    def policy(conversations):
        return generator.chat(conversations)

    n = len(tasks) * k
    live, periodic = Live(f"eval {task}", n), Periodic(f"eval {task}", n, "episodes")

    def on_turn(done: int, total: int) -> None:
        live.update(done)
        periodic.update(done, generator.stats.tokens)

    try:
        episodes = rollout(
            make_env,
            [t for t in tasks for _ in range(k)],
            policy,
            max_turns=max_turns,
            workers=workers,
            on_turn=on_turn,
        )
    finally:
        live.close()
    records = []
    for i, ep in enumerate(episodes):
        first = 2 if ep.messages[0]["role"] == "system" else 1
        which = {"problem": i // k, "sample": i % k} if k > 1 else {}
        records.append(
            {
                "id": ep.task_id,
                **which,
                **sources[i // k],
                "prompt": generator.prompt(ep.messages[:first], ep.tools),
                "generation": ep.actions,
                "reference": ep.reference,
                "score": float(ep.success),
                "metrics": {"finished": float(ep.done)},
                "turns": ep.turns,
                "observations": ep.observations,
                "_gens": ep.generations,
            }
        )
    summary = summarize(records, generator.stats, task)
    summary["episodes"] = True
    summary["mean_turns"] = sum(ep.turns for ep in episodes) / max(len(episodes), 1)
    return EvalResult(records, summary)


# ------------------------------------------------------------------------------------------------------------------
# In training


class TrainingEval:
    """Called by the training loop every trainer.eval_freq steps with the in-memory model."""

    def __init__(self, cfg, tokenizer, max_new_tokens: int = 256):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.task = cfg.trainer.eval_task
        self.rows = file_rows(cfg.data.eval_files, "data.eval_files")
        self.vision = load_vision(cfg, tokenizer)
        self.samples = None if self.task in ENV_TASKS else samples_from_rows(self.rows, cfg.data)
        self.opts = GenerationOptions(
            max_new_tokens=max_new_tokens, batch_size=max(cfg.data.micro_batch_size_per_gpu, 8)
        )

    def __call__(self, model, records_path=None) -> dict:
        """The eval numbers for the step's record; ``records_path``: also write every sample's result there."""
        gen = hf_generator(
            model, self.tokenizer, self.opts, self.cfg.data.chat_template_kwargs, self.cfg.model.dtype, self.vision
        )
        if self.samples is None:
            res = evaluate_env(gen, self.rows, self.cfg, self.task)
        else:
            res = evaluate_samples(gen, self.samples, self.task)
        if records_path is not None:
            Path(records_path).parent.mkdir(parents=True, exist_ok=True)
            write_records(records_path, res.records)
        s = res.summary
        out = {"eval_accuracy": s["accuracy"], "eval_ci95_low": s["ci95_low"], "eval_ci95_high": s["ci95_high"]}
        out.update({f"eval_{k}": v for k, v in s.items() if k in ("valid", "hit_max_new_tokens", "tokens_per_s")})
        return out


# ------------------------------------------------------------------------------------------------------------------
# CLI: sftforge eval


def add_eval_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model folder (e.g. outputs/run/final) or hub id")
    p.add_argument("--data", required=True, help=".jsonl/.json/.parquet file(s) or glob, as data.train_files")
    p.add_argument(
        "--task",
        required=True,
        help="exact | gsm8k | math | mcq | tool_call | textcraft | code_math (math with a sandboxed "
        "code_interpreter tool; sandbox.* keys) | module:function",
    )
    p.add_argument(
        "--output", "-o", default="", help="per-sample results .jsonl (prompt, generation, reference, score)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --do-sample)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="sequences generated at once (default 32; the engine keeps each one's KV cache, the generate fallback "
        "pads a batch to its longest prompt)",
    )
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="hf (default) | vllm (GPU)")
    p.add_argument(
        "--turns",
        choices=("last", "all"),
        default="last",
        help="score the last assistant turn of each row (default) or every assistant turn",
    )
    p.add_argument("--max-turns", type=int, default=40, help="environment tasks: actions per episode (default 40)")
    p.add_argument("--limit", type=int, default=0, help="only the first N rows (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="K",
        help="answers per problem (with --do-sample): mean@K and pass@k (unbiased) with intervals over "
        "problems, per data_source (verl's n_resp_per_prompt_val; AIME-style K=30)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.format=alpaca")


def evaluate(
    model: str | Path | torch.nn.Module,
    data: Any,
    task: str = "exact",
    *,
    tokenizer=None,
    overrides: list[str] | dict[str, Any] | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    turns: str = "last",
    max_turns: int = 40,
    limit: int = 0,
    backend: str = "hf",
    output: str | Path | None = None,
    samples: int = 1,
) -> EvalResult:
    """Generate on ``data`` and score the answers with ``task``; what ``sftforge eval`` runs.

    ``model``: a folder (e.g. a run's ``final/``) or hub id, or a loaded model (then give ``tokenizer``).
    ``data``: a file, glob or list of files as data.train_files, or rows in memory (a list of dicts in any format
    data.format reads; errors name them ``rows[i]``). ``task``: exact | gsm8k | mcq | tool_call | textcraft |
    module:function. ``overrides``: config keys as on the command line (``["data.format=alpaca"]``) or a mapping.
    ``samples``: answers per problem (needs ``do_sample``): the summary then has mean@K and pass@k with 95% intervals
    over problems. Returns :class:`EvalResult`: ``summary`` (accuracy, 95% interval, tokens/s, per ``data_source``
    when the rows name one, ...) and one record per answer (prompt, generation, reference, score); ``output`` also
    writes the records as jsonl."""
    if not is_task(task):
        get_scorer(task)  # raises with the list of tasks
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
        ("max_turns", max_turns),
        ("samples", samples),
    ):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if samples > 1 and not do_sample:
        raise ConfigError(
            f"--samples {samples} draws {samples} answers per problem: add --do-sample (greedy decoding "
            f"would give the same answer {samples} times), with --temperature / --top-p as wanted."
        )
    if backend not in ("hf", "vllm"):
        raise ConfigError(f"backend must be hf or vllm, got {backend!r}.")
    loaded = isinstance(model, torch.nn.Module)
    if loaded and tokenizer is None:
        raise ConfigError("evaluate(model=<a loaded model>) needs tokenizer= as well (or pass the model's folder).")
    if loaded and backend == "vllm":
        raise ConfigError("backend='vllm' loads the model itself: pass the model's folder or hub id, not a module.")
    cfg = load_config(None, overrides, **({} if loaded else {"model": {"path": str(model)}}))
    if not loaded and not is_built_module(str(model)):
        check_model_options(cfg.model)  # a missing folder, a file for a folder: said before anything loads
    if loaded:
        device = next(model.parameters()).device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu")
    cfg = with_dtype(cfg, device)  # model.dtype=auto: bf16 on a bf16 GPU, fp32 on the CPU
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    if isinstance(data, (list, tuple)) and data and all(isinstance(r, dict) for r in data):
        rows = [(f"rows[{i}]", r) for i, r in enumerate(data)]
    else:
        rows = file_rows(data, "--data")
    if limit > 0:
        rows = rows[:limit]
    opts = GenerationOptions(max_new_tokens, temperature, top_p, do_sample, batch_size, seed)
    if backend == "vllm":
        check_vllm()
        engine: Any = VLLMBackend(str(model), cfg.model.dtype, cfg.model.trust_remote_code)
    else:
        if not loaded:
            with quiet_libraries():
                path = str(model)
                model = load_trained(path, device) if is_built_module(path) else load_model(cfg.model, device)
        engine = HFBackend(model, pad_id(tok), cfg.model.dtype)
    generator = Generator(engine, tok, opts, cfg.data.chat_template_kwargs, load_vision(cfg, tok))
    if task in ENV_TASKS:
        result = evaluate_env(generator, rows, cfg, task, max_turns, samples)
    else:
        result = evaluate_samples(generator, samples_from_rows(rows, cfg.data, turns), task, samples)
    if output:
        write_records(output, result.records)
    return result


def eval_main(args) -> int:
    """``sftforge eval``: load the model, generate, score, write the jsonl, print the summary table."""
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument(s) {' '.join(bad)}: overrides are key=value (e.g. data.format=alpaca).")
    if not args.do_sample and (args.temperature != 1.0 or args.top_p != 1.0):
        print("note: --temperature/--top-p apply only with --do-sample; decoding is greedy.", file=sys.stderr)
    result = evaluate(
        args.model,
        args.data,
        args.task,
        overrides=args.overrides,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        turns=args.turns,
        max_turns=args.max_turns,
        limit=args.limit,
        backend=args.backend,
        output=args.output or None,
        samples=args.samples,
    )
    print_summary(result.summary)
    if args.output:
        print(f"wrote {len(result.records)} records to {args.output}")
    return 0
