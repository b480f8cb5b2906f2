"""Scorers: is a generation right? Built-in ones by name, a custom one by ``module:function``.

A scorer is called as ``fn(generation: str, sample: EvalSample)`` and returns a bool, a float in [0, 1], or a dict
with a ``score`` key (other numeric keys are averaged into the summary, e.g. ``valid``). ``sample.reference`` is the
reference assistant turn's text, ``sample.reference_message`` the whole message. Tool-call parsing lives here too:
the ``tool_call`` scorer and the environments (``sftforge.envs``) read a model's calls the same way.
"""

from __future__ import annotations

import importlib
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sftforge.config import ConfigError


@dataclass
class EvalSample:
    id: str
    messages: list[dict]
    """The conversation before the reference assistant turn (what the prompt is rendered from)."""
    tools: list | None
    reference_message: dict
    """The assistant message the model should produce."""
    row: Any = None
    base_dir: str | None = None
    """The data file's folder: relative image paths resolve from there."""

    @property
    def reference(self) -> str:
        """The text of the reference answer; a row's ``reference``/``answer`` column wins over the message."""
        if isinstance(self.row, dict):
            for key in ("reference", "answer"):
                if isinstance(self.row.get(key), (str, int, float)) and not isinstance(self.row.get(key), bool):
                    return str(self.row[key])
        return self.reference_message.get("content", "")


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


ENV_TASKS = ("textcraft",)
"""Tasks scored by rolling out an environment (``sftforge.envs``) rather than by a scorer."""


def is_task(task: str) -> bool:
    return task in SCORERS or task in ENV_TASKS or ":" in task or "." in task


def as_score(value: Any) -> dict:
    if isinstance(value, dict):
        if "score" not in value:
            raise ConfigError("a scorer that returns a dict must include a 'score' key")
        return {k: float(v) if isinstance(v, (bool, int, float)) else v for k, v in value.items()}
    return {"score": float(value)}
