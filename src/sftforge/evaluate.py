"""Generation eval: does the fine-tuned model do the task?

Prompts are rendered by the same chat-template code as training (``sftforge.chat``): a row is normalized to
messages + tools with :func:`~sftforge.chat.row_to_conversation`, the conversation is cut before its last assistant
turn (or before each assistant turn with ``turns="all"``) and rendered with ``add_generation_prompt=True`` and
``data.chat_template_kwargs``, so the model sees exactly the system prompt, tools and headers it was trained with.
Generation stops at the template's end-of-turn tokens (:func:`~sftforge.chat.end_of_turn_token_ids`).

Backends produce new token ids only; cutting at the stop token, decoding and scoring are shared:
- ``hf``: ``model.generate`` on LEFT-padded batches (greedy unless ``do_sample``); works with an in-memory model, so
  training can call it every ``trainer.eval_freq`` steps.
- ``vllm``: only when vllm is importable and a GPU is present.

Scorers (``task``): ``exact``, ``gsm8k``, ``mcq``, ``tool_call``, or a custom ``module:function`` /
``module.function``. A scorer is called as ``fn(generation: str, sample: EvalSample)`` and returns a bool, a float in
[0, 1], or a dict with a ``score`` key (other numeric keys are averaged into the summary, e.g. ``valid``).
``sample.reference`` is the reference assistant turn's text, ``sample.reference_message`` the whole message.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftforge.chat import RowError, end_of_turn_token_ids, render_prompt, row_to_conversation
from sftforge.config import ConfigError, DataConfig

# ------------------------------------------------------------------------------------------------------------------
# Samples and prompts


@dataclass
class EvalSample:
    id: str
    messages: list[dict]
    """The conversation before the reference assistant turn (what the prompt is rendered from)."""
    tools: list | None
    reference_message: dict
    """The assistant message the model should produce."""
    row: Any = None

    @property
    def reference(self) -> str:
        """The text of the reference answer; a row's ``reference``/``answer`` column wins over the message."""
        if isinstance(self.row, dict):
            for key in ("reference", "answer"):
                if isinstance(self.row.get(key), (str, int, float)) and not isinstance(self.row.get(key), bool):
                    return str(self.row[key])
        return self.reference_message.get("content", "")


def samples_from_rows(rows: Sequence[tuple[str, Any]], data_cfg: DataConfig, turns: str = "last") -> list[EvalSample]:
    """(location, row) pairs -> eval samples: one per row (``turns="last"``) or one per assistant turn (``"all"``)."""
    if turns not in ("last", "all"):
        raise ConfigError(f"turns must be 'last' or 'all', got {turns!r}.")
    from sftforge.data import DataError

    out = []
    for loc, row in rows:
        if isinstance(row, RowError):
            raise DataError(f"{loc}: {row.detail}")
        try:
            messages, tools, _ = row_to_conversation(row, data_cfg)
        except RowError as e:
            raise DataError(f"{loc}: {e.detail}") from None
        rid = str(row.get("id", loc)) if isinstance(row, dict) else loc
        idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        chosen = idx if turns == "all" else idx[-1:]
        for i in chosen:
            sid = rid if turns == "last" else f"{rid}#{i}"
            out.append(EvalSample(sid, messages[:i], tools, messages[i], row))
    return out


def load_samples(files: Any, data_cfg: DataConfig, turns: str = "last", key: str = "--data") -> list[EvalSample]:
    from sftforge.data import read_rows, resolve_files

    rows = [pair for f in resolve_files(files, key) for pair in read_rows(f)]
    return samples_from_rows(rows, data_cfg, turns)


# ------------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = False
    """Greedy decoding unless True; temperature and top_p only apply when sampling."""
    batch_size: int = 8
    seed: int = 0


@dataclass
class Generation:
    text: str
    n_tokens: int
    """Generated tokens, the stop token included."""
    hit_max: bool
    """Ended by max_new_tokens without a stop token."""


@dataclass
class GenerationStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class HFBackend:
    """``model.generate`` on left-padded batches, longest prompts first."""

    def __init__(self, model, pad_id: int, dtype: str = "fp32"):
        self.model, self.pad_id, self.dtype = model, pad_id, dtype

    def generate(self, prompts: list[list[int]], opts: GenerationOptions, stop_ids: list[int]) -> list[list[int]]:
        import torch
        from transformers import GenerationConfig

        from sftforge.model import autocast

        model = self.model
        device = next(model.parameters()).device
        cfg = {"max_new_tokens": opts.max_new_tokens, "do_sample": opts.do_sample, "eos_token_id": stop_ids,
               "pad_token_id": self.pad_id, "use_cache": True}  # fmt: skip
        if opts.do_sample:
            cfg.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)
            torch.manual_seed(opts.seed)
        gen_cfg = GenerationConfig(**cfg)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast(self.dtype, device):
                for k in range(0, len(order), opts.batch_size):
                    batch = order[k : k + opts.batch_size]
                    width = max(len(prompts[i]) for i in batch)
                    ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for r, i in enumerate(batch):
                        n = len(prompts[i])
                        ids[r, width - n :] = torch.tensor(prompts[i], dtype=torch.long)
                        mask[r, width - n :] = 1
                    res = model.generate(
                        input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
                    )
                    for r, i in enumerate(batch):
                        out[i] = res[r, width:].tolist()
        finally:
            model.train(was_training)
        return out


class VLLMBackend:
    """vLLM on a GPU, loaded from the model folder or hub id."""

    def __init__(self, model_path: str, dtype: str = "fp32", trust_remote_code: bool = False):
        check_vllm()
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            dtype="bfloat16" if dtype == "bf16" else "float32",
            trust_remote_code=trust_remote_code,
            skip_tokenizer_init=False,
        )

    def generate(self, prompts: list[list[int]], opts: GenerationOptions, stop_ids: list[int]) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=opts.max_new_tokens,
            temperature=opts.temperature if opts.do_sample else 0.0,
            top_p=opts.top_p if opts.do_sample else 1.0,
            stop_token_ids=stop_ids,
            seed=opts.seed,
            skip_special_tokens=False,
        )
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def check_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError("--backend vllm needs the vllm package (pip install vllm); use --backend hf.") from None
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--backend vllm needs a CUDA GPU and none is available; use --backend hf.")


class Generator:
    """Renders conversations with the chat template, runs a backend, cuts at the end-of-turn token, decodes."""

    def __init__(self, backend, tokenizer, opts: GenerationOptions | None = None, template_kwargs: dict | None = None):
        self.backend, self.tokenizer = backend, tokenizer
        self.opts = opts or GenerationOptions()
        self.template_kwargs = template_kwargs or {}
        self.stop_ids = end_of_turn_token_ids(tokenizer, self.template_kwargs)
        self.stats = GenerationStats()

    def prompt(self, messages: list[dict], tools: list | None = None) -> str:
        return render_prompt(self.tokenizer, messages, tools, self.template_kwargs)

    def generate(self, prompts: list[str]) -> list[Generation]:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        t0 = time.perf_counter()
        new = self.backend.generate(ids, self.opts, self.stop_ids)
        self.stats.seconds += time.perf_counter() - t0
        out = []
        for toks in new:
            kept, body, stopped = cut_at_stop(toks, self.stop_ids)
            self.stats.tokens += len(kept)
            text = self.tokenizer.decode(body, skip_special_tokens=False)
            out.append(Generation(text, len(kept), not stopped and len(kept) >= self.opts.max_new_tokens))
        return out

    def chat(self, conversations: list[tuple[list[dict], list | None]]) -> list[Generation]:
        return self.generate([self.prompt(m, t) for m, t in conversations])


def cut_at_stop(tokens: list[int], stop_ids) -> tuple[list[int], list[int], bool]:
    """(generated tokens up to and including the first stop token, the same without it, whether a stop was found)."""
    cut = next((j for j, t in enumerate(tokens) if t in stop_ids), None)
    if cut is None:
        return list(tokens), list(tokens), False
    return list(tokens[: cut + 1]), list(tokens[:cut]), True


def pad_id(tokenizer) -> int:
    """The id left-padded batches use: the tokenizer's pad token, else its eos, else 0."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def hf_generator(model, tokenizer, opts: GenerationOptions | None = None, template_kwargs=None, dtype="fp32"):
    pad = pad_id(tokenizer)
    return Generator(HFBackend(model, pad, dtype), tokenizer, opts, template_kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Scorers

_THINK = re.compile(r"<think>.*?</think>", re.S)


def strip_reasoning(text: str) -> str:
    """The answer part of a generation: without <think> blocks (and anything before a dangling </think>)."""
    text = _THINK.sub("", text)
    return text.split("</think>")[-1]


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", strip_reasoning(text)).lower()
    text = " ".join(text.split())
    return text.strip().rstrip(".!?").strip()


def score_exact(generation: str, sample: EvalSample) -> float:
    return float(normalize(generation) == normalize(sample.reference))


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> str | None:
    """The number after '####', else the last number in the text; commas, '$' and trailing zeros removed."""
    text = strip_reasoning(text)
    if "####" in text:
        after = _NUMBER.findall(text.split("####")[-1])
        nums = after[:1] if after else []
    else:
        nums = _NUMBER.findall(text)[-1:]
    if not nums:
        return None
    s = nums[0].replace(",", "").replace("$", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def score_gsm8k(generation: str, sample: EvalSample) -> float:
    got, want = extract_number(generation), extract_number(sample.reference)
    if got is None or want is None:
        return 0.0
    try:
        return float(float(got) == float(want))
    except ValueError:
        return float(got == want)


_MCQ_STRONG = (
    re.compile(r"answer(?:\s+is)?\s*[:\-]?\s*\(?\**([A-J])\b", re.I),
    re.compile(r"^\s*\(?\**([A-J])\**\)?(?:[.):]|\s*$)"),
    re.compile(r"\(([A-J])\)"),
)


def extract_letter(text: str) -> str | None:
    """The answer letter A-J: 'answer is (B)', 'Answer: B', a leading 'B.'/'(B)', else the last standalone letter."""
    text = strip_reasoning(text).strip()
    for pattern in _MCQ_STRONG:
        m = pattern.search(text)
        if m:
            return m.group(1).upper()
    found = re.findall(r"\b([A-J])\b", text)
    letters = [c for c in found if c != "I"] or found  # "I think ..." is not option I
    return letters[-1] if letters else None


def score_mcq(generation: str, sample: EvalSample) -> float:
    want = extract_letter(sample.reference)
    return float(want is not None and extract_letter(generation) == want)


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


class ToolCallError(ValueError):
    pass


def parse_tool_calls(text: str) -> list[dict]:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks -> [{"name", "arguments"}].

    Raises :class:`ToolCallError` when a block is not JSON or has no name / object arguments. No block -> [].
    """
    calls = []
    for m in _TOOL_CALL.finditer(strip_reasoning(text)):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError as e:
            raise ToolCallError(f"tool call is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ToolCallError("tool call has no 'name'")
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ToolCallError(f"tool call arguments are not valid JSON: {e}") from None
        if not isinstance(args, dict):
            raise ToolCallError("tool call arguments are not an object")
        calls.append({"name": obj["name"], "arguments": args})
    return calls


def format_tool_call(name: str, arguments: dict) -> str:
    """The text form a Qwen-style template renders (and a model generates) for one tool call."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def _tool_names(tools: list | None) -> set[str] | None:
    if not tools:
        return None
    return {(t.get("function", t) or {}).get("name") for t in tools if isinstance(t, dict)}


def _canon(call: dict) -> str:
    return json.dumps([call["name"], call["arguments"]], sort_keys=True)


def score_tool_call(generation: str, sample: EvalSample) -> dict:
    """valid: the calls parse and name functions of the tools schema; score: valid and equal to the reference calls
    (same names and arguments, in any order). A reference turn without calls expects none."""
    ref = [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in sample.reference_message.get("tool_calls", [])
    ]
    try:
        calls = parse_tool_calls(generation)
    except ToolCallError:
        return {"score": 0.0, "valid": 0.0}
    names = _tool_names(sample.tools)
    valid = bool(calls) == bool(ref) and (names is None or all(c["name"] in names for c in calls))
    if not ref:
        valid = not calls and "<tool_call>" not in generation
    correct = valid and sorted(map(_canon, calls)) == sorted(map(_canon, ref))
    return {"score": float(correct), "valid": float(valid)}


SCORERS: dict[str, Callable] = {
    "exact": score_exact,
    "gsm8k": score_gsm8k,
    "mcq": score_mcq,
    "tool_call": score_tool_call,
}


def get_scorer(task: str) -> Callable:
    """A built-in scorer by name, or a custom one by ``module:function`` / ``module.function``."""
    if task in SCORERS:
        return SCORERS[task]
    if ":" in task:
        module, _, name = task.partition(":")
    elif "." in task:
        module, _, name = task.rpartition(".")
    else:
        raise ConfigError(
            f"--task {task!r} is not a scorer: use one of {', '.join(SCORERS)}, textcraft, or a custom scorer as "
            "module:function (a Python function taking (generation, sample))."
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--task {task!r}: cannot import the scorer ({type(e).__name__}: {e}).") from None
    if not callable(fn):
        raise ConfigError(f"--task {task!r} is not callable.")
    return fn


def is_task(task: str) -> bool:
    return task in SCORERS or task in ENV_TASKS or ":" in task or "." in task


ENV_TASKS = ("textcraft",)


def _as_score(value: Any) -> dict:
    if isinstance(value, dict):
        if "score" not in value:
            raise ConfigError("a scorer that returns a dict must include a 'score' key")
        return {k: float(v) if isinstance(v, (bool, int, float)) else v for k, v in value.items()}
    return {"score": float(value)}


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


@dataclass
class EvalResult:
    records: list[dict]
    summary: dict = field(default_factory=dict)


def summarize(records: list[dict], stats: GenerationStats, task: str, score_key: str = "score") -> dict:
    n = len(records)
    total = sum(r[score_key] for r in records)
    low, high = wilson(total, n)
    summary = {"task": task, "n": n, "accuracy": total / n if n else 0.0, "ci95_low": low, "ci95_high": high}
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


def evaluate(generator: Generator, samples: list[EvalSample], task: str = "exact") -> EvalResult:
    """Generate an answer for every sample and score it; records hold prompt, generation, reference and score."""
    scorer = get_scorer(task)
    prompts = [generator.prompt(s.messages, s.tools) for s in samples]
    gens = generator.generate(prompts)
    records = []
    for s, p, g in zip(samples, prompts, gens):
        scored = _as_score(scorer(g.text, s))
        ref: Any = s.reference
        if task == "tool_call":
            ref = s.reference_message.get("tool_calls") or s.reference
        extra = {k: v for k, v in scored.items() if k != "score"}
        records.append({"id": s.id, "prompt": p, "generation": g.text, "reference": ref, "score": scored["score"],
                        "metrics": extra, "generated_tokens": g.n_tokens, "hit_max": g.hit_max, "_gens": [g]})  # fmt: skip
    return EvalResult(records, summarize(records, generator.stats, task))


def write_records(path: str | Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            clean = {k: v for k, v in r.items() if not k.startswith("_")}
            clean.update(clean.pop("metrics", {}))
            f.write(json.dumps(clean, ensure_ascii=False, default=str) + "\n")


def print_summary(summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    name = "success rate" if summary.get("episodes") else "accuracy"
    table = Table(title=f"sftforge eval: {summary['task']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("samples" if not summary.get("episodes") else "episodes", str(summary["n"]))
    table.add_row(name, f"{summary['accuracy']:.1%}")
    table.add_row("95% interval (Wilson)", f"{summary['ci95_low']:.1%} – {summary['ci95_high']:.1%}")
    skip = {"task", "n", "accuracy", "ci95_low", "ci95_high", "episodes", "generated_tokens", "generation_s"}
    for k, v in summary.items():
        if k in skip or k in ("mean_generated_tokens", "hit_max_new_tokens", "tokens_per_s"):
            continue
        table.add_row(k, f"{v:.1%}" if isinstance(v, float) and 0 <= v <= 1 else str(v))
    table.add_row("mean generated tokens", f"{summary['mean_generated_tokens']:.1f}")
    table.add_row("hit max_new_tokens", f"{summary['hit_max_new_tokens']:.1%}")
    table.add_row(
        "tokens/s", f"{summary['tokens_per_s']:,.1f} ({summary['generated_tokens']} in {summary['generation_s']}s)"
    )
    console.print(table)


# ------------------------------------------------------------------------------------------------------------------
# Multi-turn environments


def evaluate_env(generator: Generator, rows: list[tuple[str, Any]], data_cfg: DataConfig, task: str = "textcraft",
                 max_turns: int = 40) -> EvalResult:  # fmt: skip
    """Roll out the model in an environment on every task in ``rows``; the score is success (1/0)."""
    from sftforge.envs import rollout
    from sftforge.envs.textcraft import TextCraftEnv, load_tasks

    if task != "textcraft":
        raise ConfigError(f"unknown environment {task!r}; available: {', '.join(ENV_TASKS)}")
    tasks, book = load_tasks(rows, data_cfg)

    def policy(conversations):
        return generator.chat(conversations)

    episodes = rollout(lambda: TextCraftEnv(book), tasks, policy, max_turns=max_turns)
    records = []
    for ep in episodes:
        records.append({"id": ep.task_id, "prompt": generator.prompt(ep.messages[:2], ep.tools),
                        "generation": ep.actions, "reference": ep.reference, "score": float(ep.success),
                        "metrics": {"finished": float(ep.done)}, "turns": ep.turns,
                        "observations": ep.observations, "_gens": ep.generations})  # fmt: skip
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
        from sftforge.data import read_rows, resolve_files

        self.rows = [p for f in resolve_files(cfg.data.eval_files, "data.eval_files") for p in read_rows(f)]
        self.samples = None if self.task in ENV_TASKS else samples_from_rows(self.rows, cfg.data)
        self.opts = GenerationOptions(
            max_new_tokens=max_new_tokens, batch_size=max(cfg.data.micro_batch_size_per_gpu, 8)
        )

    def __call__(self, model) -> dict:
        gen = hf_generator(model, self.tokenizer, self.opts, self.cfg.data.chat_template_kwargs, self.cfg.model.dtype)
        if self.samples is None:
            res = evaluate_env(gen, self.rows, self.cfg.data, self.task)
        else:
            res = evaluate(gen, self.samples, self.task)
        s = res.summary
        out = {"eval_accuracy": s["accuracy"], "eval_ci95_low": s["ci95_low"], "eval_ci95_high": s["ci95_high"]}
        out.update({f"eval_{k}": v for k, v in s.items() if k in ("valid", "hit_max_new_tokens", "tokens_per_s")})
        return out


__all__ = [
    "SCORERS",
    "EvalResult",
    "EvalSample",
    "Generation",
    "GenerationOptions",
    "Generator",
    "HFBackend",
    "TrainingEval",
    "VLLMBackend",
    "evaluate",
    "evaluate_env",
    "extract_letter",
    "extract_number",
    "format_tool_call",
    "get_scorer",
    "cut_at_stop",
    "hf_generator",
    "pad_id",
    "load_samples",
    "normalize",
    "parse_tool_calls",
    "print_summary",
    "render_prompt",
    "samples_from_rows",
    "score_exact",
    "score_gsm8k",
    "score_mcq",
    "score_tool_call",
    "wilson",
    "write_records",
]


# ------------------------------------------------------------------------------------------------------------------
# CLI: sftforge eval


def add_eval_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model folder (e.g. outputs/run/final) or hub id")
    p.add_argument("--data", required=True, help=".jsonl/.json/.parquet file(s) or glob, as data.train_files")
    p.add_argument("--task", required=True, help="exact | gsm8k | mcq | tool_call | textcraft | module:function")
    p.add_argument(
        "--output", "-o", default="", help="per-sample results .jsonl (prompt, generation, reference, score)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --do-sample)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="hf (default) | vllm (GPU)")
    p.add_argument("--turns", choices=("last", "all"), default="last",
                   help="score the last assistant turn of each row (default) or every assistant turn")  # fmt: skip
    p.add_argument("--max-turns", type=int, default=40, help="environment tasks: actions per episode (default 40)")
    p.add_argument("--limit", type=int, default=0, help="only the first N rows (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.format=alpaca")


def eval_main(args) -> int:
    """``sftforge eval``: load the model, generate, score, write the jsonl, print the summary table."""
    import sys

    from sftforge.config import load_config
    from sftforge.data import load_tokenizer, read_rows, resolve_files

    if not is_task(args.task):
        get_scorer(args.task)  # raises with the list of tasks
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument(s) {' '.join(bad)}: overrides are key=value (e.g. data.format=alpaca).")
    for name in ("max_new_tokens", "batch_size", "max_turns"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not args.do_sample and (args.temperature != 1.0 or args.top_p != 1.0):
        print("note: --temperature/--top-p apply only with --do-sample; decoding is greedy.", file=sys.stderr)
    cfg = load_config(None, [f"model.path={args.model}", *args.overrides])
    tok = load_tokenizer(cfg)
    rows = [pair for f in resolve_files(args.data, "--data") for pair in read_rows(f)]
    if args.limit > 0:
        rows = rows[: args.limit]
    opts = GenerationOptions(args.max_new_tokens, args.temperature, args.top_p, args.do_sample, args.batch_size,
                             args.seed)  # fmt: skip
    if args.backend == "vllm":
        check_vllm()
        backend: Any = VLLMBackend(args.model, cfg.model.dtype, cfg.model.trust_remote_code)
    else:
        import torch

        from sftforge.model import load_model

        device = "cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu"
        model = load_model(cfg.model, device)
        pad = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
        backend = HFBackend(model, pad, cfg.model.dtype)
    generator = Generator(backend, tok, opts, cfg.data.chat_template_kwargs)
    if args.task in ENV_TASKS:
        result = evaluate_env(generator, rows, cfg.data, args.task, args.max_turns)
    else:
        result = evaluate(generator, samples_from_rows(rows, cfg.data, args.turns), args.task)
    if args.output:
        write_records(args.output, result.records)
    print_summary(result.summary)
    if args.output:
        print(f"wrote {len(result.records)} records to {args.output}")
    return 0
