"""Scorers: is a generation right? Built-in ones by name, a custom one by ``module:function``.

A scorer is called as ``fn(generation: str, sample: EvalSample)`` and returns a bool, a float in [0, 1], or a dict
with a ``score`` key (other numeric keys are averaged into the summary, e.g. ``valid``). ``sample.reference`` is the
reference assistant turn's text, ``sample.reference_message`` the whole message. Tool-call parsing lives here too:
the ``tool_call`` scorer and the environments (``sftforge.envs``) read a model's calls the same way.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import re
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sftforge.chat import row_answer
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
        """The text of the reference answer; a row's gold-answer column (``answer``, ``reference``, verl's
        ``reward_model.ground_truth``: :func:`~sftforge.chat.row_answer`) wins over the message."""
        answer = row_answer(self.row)
        return answer if answer is not None else self.reference_message.get("content", "")


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


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE = re.compile(r"\banswer\s*:\s*([^\n]+)", re.I)  # DAPO's "Answer: $X$"
_WORDS_AND_NUMBER = re.compile(r"[A-Za-z ]*-?[\d.,/]*\d[A-Za-z .]*")  # "The total is 42", "42 apples"
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DIGIT_SPACE = re.compile(r"(?<=\d)(?:\\[,;:! ]|~|\{,\})(?=\d)")  # 1\,913\,937 and 1{,}913{,}937: one number
_MATH_MAX_CHARS = 1000
"""A longer extracted answer is not an answer (and only costs parse time)."""
_MATH_DEADLINE_S = 5.0
"""The most one comparison may take before it scores 0 (the work goes on in a background thread)."""
_MATH_MAX_DIGITS = 1e5
_MATH_MAX_NESTED_DIGITS = 150
_MATH_MAX_EXPANDED_POWER = 20


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), as verl's math reward reads it.

    An unclosed last box is a cut-off answer: None, not an earlier box."""
    boxes = list(_BOXED.finditer(text))
    if not boxes:
        return None
    found = boxes[-1]
    depth = 1
    for i in range(found.end(), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[found.end() : i]
    return None


def _plain_number(text: str) -> bool:
    return bool(_NUMBER.fullmatch(text.strip()))


def extract_math_answer(generation: str, numeric: bool = False) -> str | None:
    """The model's final answer: the last ``\\boxed{}``, else the last "Answer: X" line (DAPO), else (``numeric``:
    the reference is a plain number, GSM8K-style) the last number. None when there is none."""
    text = strip_reasoning(generation)
    if _BOXED.search(text):
        return last_boxed(text)
    lines = _ANSWER_LINE.findall(text)
    if lines:
        answer = lines[-1].strip().strip("*").strip().removesuffix(".").strip()
        return answer or None
    return extract_number(text) if numeric else None


def _gold_answer(reference: str) -> str:
    """The reference's answer: a full solution's last box, a GSM8K ``#### 72``, else the whole text."""
    ref = strip_reasoning(reference).strip()
    boxed = last_boxed(ref)
    if boxed is not None:
        return boxed.strip()
    if "####" in ref:
        return extract_number(ref) or ref
    return ref


def _as_latex(answer: str) -> str:
    """An answer as math_verify's LaTeX extraction finds it: in ``$...$`` unless it already has math delimiters."""
    answer = _DIGIT_SPACE.sub("", answer.strip())
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    if "$" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return f"${answer}$"


@functools.cache
def _math_verify():
    """math_verify, imported on first use (an optional dependency); its once-per-process warning about timeouts
    being off is dropped: they are off on purpose (see :func:`_math_equal`)."""
    try:
        import math_verify
    except ImportError as e:
        raise ConfigError(
            f"the math scorer needs the math-verify package: pip install 'sftforge[math]' ({e})"
        ) from None
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(lambda r: not r.getMessage().startswith("Timeout is disabled"))
    return math_verify


def _parse_math(answer: str) -> list:
    """As LaTeX; one number in words ("42 apples") also as text, where math_verify picks out the number."""
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    parsed = mv.parse(_as_latex(answer), extraction_config=config, parsing_timeout=None)
    if re.search(r"[A-Za-z]{3}", answer) and _WORDS_AND_NUMBER.fullmatch(answer.strip()):
        parsed += mv.parse(answer, extraction_config=config, parsing_timeout=None)
    return parsed


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> tuple:
    """Cached: a GRPO group scores many generations against one reference."""
    return tuple(_parse_math(answer))


def _digits(expr: Any) -> float:
    """A rough upper bound on the decimal digits of a parsed answer's value (and so on the work of comparing it).

    SymPy evaluates ``10^{10^{10}}`` or ``(10^{100})!`` until memory runs out, and compares nested powers such as
    ``2^{2^{12}}`` or expanded polynomials like ``(x+1)^{1000}`` by factoring (over 5 s each): such answers score 0."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return 0.0
    if expr.is_Rational:
        return math.log10(max(abs(expr.p), abs(expr.q), 1))
    if expr.is_Float:
        value = abs(float(expr))
        return math.inf if math.isinf(value) else math.log10(max(value, 1.0))
    if expr.is_Atom:
        return 1.0
    if expr.is_Pow:
        base, exp = expr.args
        if exp.free_symbols:
            return _digits(base) + _digits(exp)
        exp_digits = _digits(exp)
        if exp_digits > 15:
            return math.inf
        size = max(_digits(base), 1.0) * 10**exp_digits
        if base.is_Add and base.free_symbols and 10**exp_digits > _MATH_MAX_EXPANDED_POWER:
            return math.inf
        if not exp.is_Number and size > _MATH_MAX_NESTED_DIGITS:
            return math.inf
        return size
    if isinstance(expr, sympy.functions.combinatorial.factorials.CombinatorialFunction | sympy.gamma):
        arg_digits = max((_digits(a) for a in expr.args), default=0.0)
        return math.inf if arg_digits > 15 else 10**arg_digits * max(arg_digits, 1.0)
    return sum(_digits(a) for a in expr.args) + 1.0


def _tame(parsed: list | tuple) -> bool:
    try:
        return all(_digits(p) <= _MATH_MAX_DIGITS for p in parsed)
    except (RecursionError, ValueError, TypeError, OverflowError):
        return False


def _math_equal(gold: str, answer: str) -> bool:
    """math_verify's parse + verify with its timeouts off: they use signal.alarm, which raises outside the main
    thread (rollouts score from worker threads) and cannot stop a long C-level computation anyway. Instead answers
    whose comparison would blow up are refused up front (:func:`_digits`) and the rest run under a deadline."""
    mv = _math_verify()
    result: list[bool] = []

    def compare() -> None:
        try:
            want, got = _parse_gold(gold), _parse_math(answer)
            if want and got and _tame(want) and _tame(got):
                result.append(bool(mv.verify(list(want), got, timeout_seconds=None)))
        except Exception:  # math_verify and SymPy raise on odd input; an odd answer is a wrong one
            pass

    worker = threading.Thread(target=compare, name="sftforge-math-verify", daemon=True)
    worker.start()
    worker.join(_MATH_DEADLINE_S)
    return bool(result and result[0])


def score_math(generation: str, sample: EvalSample) -> dict:
    """valid: the generation states an answer (the last ``\\boxed{}``, an "Answer:" line, or for a plain-number
    reference the last number); score: math_verify finds it equal to the reference (``\\frac{1}{2}`` = ``0.5``,
    ``2\\sqrt{3}`` = ``\\sqrt{12}``, intervals as intervals)."""
    _math_verify()
    gold = _gold_answer(sample.reference)
    answer = extract_math_answer(generation, numeric=_plain_number(gold))
    if answer is None or not answer.strip():
        return {"score": 0.0, "valid": 0.0}
    if len(answer) > _MATH_MAX_CHARS or not gold:
        return {"score": 0.0, "valid": 1.0}
    return {"score": float(_math_equal(gold, answer)), "valid": 1.0}


SCORERS: dict[str, Callable] = {
    "exact": score_exact,
    "gsm8k": score_gsm8k,
    "mcq": score_mcq,
    "tool_call": score_tool_call,
    "math": score_math,
}


def get_scorer(task: str) -> Callable:
    """A built-in scorer by name, or a custom one by ``module:function`` / ``module.function``."""
    if task in SCORERS:
        if task == "math":
            _math_verify()  # fail at startup, not on the first rollout
        return SCORERS[task]
    if ":" in task:
        module, _, name = task.partition(":")
    elif "." in task:
        module, _, name = task.rpartition(".")
    else:
        raise ConfigError(
            f"--task {task!r} is not a scorer: use one of {', '.join(SCORERS)}, {', '.join(ENV_TASKS)}, or a custom scorer as "
            "module:function (a Python function taking (generation, sample))."
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--task {task!r}: cannot import the scorer ({type(e).__name__}: {e}).") from None
    if not callable(fn):
        raise ConfigError(f"--task {task!r} is not callable.")
    return fn


ENV_TASKS = ("textcraft", "code_math")
"""Tasks scored by rolling out an environment (``sftforge.envs``) rather than by a scorer."""


def is_task(task: str) -> bool:
    return task in SCORERS or task in ENV_TASKS or ":" in task or "." in task


def as_score(value: Any) -> dict:
    if isinstance(value, dict):
        if "score" not in value:
            raise ConfigError("a scorer that returns a dict must include a 'score' key")
        return {k: float(v) if isinstance(v, (bool, int, float)) else v for k, v in value.items()}
    return {"score": float(value)}
