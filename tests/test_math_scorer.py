"""The ``math`` scorer (math-verify): AIME / MATH-style answers, DAPO's "Answer:" line, GSM8K-style numbers; garbage
scores 0 quickly without raising, the scorer works from worker threads (math-verify's own timeouts use signal.alarm,
main thread only), and a missing math-verify is a ConfigError that says what to install."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("math_verify", reason="the math scorer needs math-verify: pip install 'sftforge[math]'")

from sftforge import scorers  # noqa: E402
from sftforge.config import ConfigError  # noqa: E402
from sftforge.scorers import (  # noqa: E402
    EvalSample,
    extract_math_answer,
    get_scorer,
    is_task,
    last_boxed,
    score_gsm8k,
    score_math,
)


def sample(reference: str) -> EvalSample:
    return EvalSample(id="q", messages=[], tools=None, reference_message={"role": "assistant", "content": reference})


def score(generation: str, reference: str) -> float:
    return score_math(generation, sample(reference))["score"]


RIGHT = [
    # (reference, generation)
    ("033", r"The remainder is $\boxed{33}$."),  # AIME answers are written with leading zeros
    ("33", r"So $m+n = \boxed{033}$."),
    (r"\frac{3}{4}", r"The probability is $\boxed{0.75}$."),
    (r"\frac{3}{4}", r"$\boxed{3/4}$"),
    (r"\frac{3}{4}", r"$\boxed{\dfrac{3}{4}}$"),
    ("0.75", r"$\boxed{\frac34}$"),
    (r"\frac{1}{2}", r"\boxed{0.5}"),
    (r"2\sqrt{3}", r"The side is $\boxed{\sqrt{12}}$."),
    (r"\boxed{2\sqrt{3}}", r"$\boxed{2\sqrt 3}$"),  # a reference in a box
    ("(1, 3]", r"$x \in \boxed{(1,3]}$"),
    (r"[2, \infty)", r"\boxed{[2,\infty)}"),
    (r"\frac{\sqrt{2}}{2}", r"$\cos 45^\circ = \boxed{\frac{1}{\sqrt{2}}}$"),
    ("-7", r"$x = \boxed{-7}$"),
    ("-7", "Answer: -7"),
    ("42", "Some work.\nAnswer: 42"),  # DAPO's format
    (r"\frac{3}{4}", "Reasoning...\nAnswer: $\\frac{3}{4}$"),
    ("42", "**Answer:** 42"),
    ("42", "Answer: 42 apples"),
    (r"x^2+2x+1", r"\boxed{(x+1)^2}"),
    (r"\text{Monday}", r"\boxed{\text{Monday}}"),
    ("5", r"\fbox{5}"),
]


@pytest.mark.parametrize(("reference", "generation"), RIGHT)
def test_equivalent_answers_score_1(reference, generation):
    assert score_math(generation, sample(reference)) == {"score": 1.0, "valid": 1.0}


WRONG = [
    ("(1, 3]", r"\boxed{[1,3]}"),  # an interval's ends matter
    ("(1, 3]", r"\boxed{(1,3)}"),
    ("-7", r"\boxed{7}"),
    ("42", r"\boxed{43}"),
    (r"\frac{3}{4}", r"\boxed{\frac{4}{3}}"),
    (r"2\sqrt{3}", r"\boxed{3\sqrt{2}}"),
    (r"\frac{1}{2}", r"\boxed{0.5001}"),
    ("33", "Answer: 34"),
]


@pytest.mark.parametrize(("reference", "generation"), WRONG)
def test_wrong_answers_score_0_but_are_valid(reference, generation):
    assert score_math(generation, sample(reference)) == {"score": 0.0, "valid": 1.0}


def test_the_last_box_wins_and_reasoning_is_ignored():
    text = r"First I got \boxed{3}. Wait, that is wrong: the answer is \boxed{4}."
    assert score(text, "4") == 1.0 and score(text, "3") == 0.0
    assert score(r"<think>maybe \boxed{5}</think>The answer is \boxed{6}.", "5") == 0.0
    assert score(r"<think>maybe \boxed{5}</think>The answer is \boxed{6}.", "6") == 1.0
    # a box beats an "Answer:" line, and a later "Answer:" line beats an earlier one
    assert score("Answer: 1\n\\boxed{2}", "2") == 1.0
    assert score("Answer: 1\nNo, recheck.\nAnswer: 2", "2") == 1.0


def test_nested_braces_in_a_box():
    assert last_boxed(r"so $\boxed{\frac{1}{\sqrt{2}}}$ done") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{a} and \boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # cut off: no answer, not the earlier box
    assert last_boxed("no box") is None


def test_thousands_separators():
    product = 1383 * 1384  # a multiplication question: "What is 1383 x 1384?"
    ref = str(product)
    assert ref == "1914072"
    for generation in (
        rf"$1383 \times 1384 = \boxed{{{product:,}}}$",  # \boxed{1,914,072}
        r"$\boxed{1{,}914{,}072}$",
        r"$\boxed{1\,914\,072}$",
        f"The product is {product:,}.",  # no box: the last number (the reference is a plain number)
        f"Answer: {product:,}",
    ):
        assert score(generation, ref) == 1.0, generation
    assert score(r"\boxed{1,914,073}", ref) == 0.0


def test_gsm8k_style_references_and_generations():
    # a plain-number reference: the last number counts when there is no box or "Answer:" line
    assert score("48 + 24 = 72, so she sold 72 clips.", "72") == 1.0
    assert score("48 + 24 = 72 clips.\n#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72") == 1.0
    assert score("She sold $1,080.50 worth.", "1080.5") == 1.0
    assert score("48 + 24 = 73", "72") == 0.0
    # a LaTeX reference: a bare number in prose is not an answer
    assert score_math("I think it is 3/4 or so", sample(r"\frac{3}{4}")) == {"score": 0.0, "valid": 0.0}


def test_gsm8k_scorer_unchanged():
    s = sample("#### 1,234")
    assert score_gsm8k("so the answer is 1234", s) == 1.0
    assert score_gsm8k("#### 1234.00", s) == 1.0
    assert score_gsm8k("#### 1235", s) == 0.0
    assert score_gsm8k("no number", s) == 0.0


GARBAGE = [
    "",
    "   ",
    r"\boxed{",
    r"The answer is \boxed{\frac{1}{2}",
    r"\boxed{}",
    "Answer:",
    r"\boxed{" * 3000,
    "}" * 5000 + r"\boxed{1}}}}",
    "x" * 10_000,
    "".join(chr(33 + (i * 7919) % 90) for i in range(10_000)),  # 10k chars of punctuation and letters
    r"\boxed{" + "(" * 2000 + "}",
    r"\boxed{" + r"\frac{" * 300 + "}",
    r"\boxed{" + "1+" * 5000 + "1}",
    r"\boxed{10^{10^{10}}}",  # SymPy would evaluate these until memory runs out
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{(10^{100})!}",
    r"\boxed{2^{2^{20}}}",
    r"\boxed{(x+1)^{1000}}",
    r"\boxed{\sqrt{-1}^{\infty}}",
    r"\boxed{\frac{0}{0}}",
    r"\boxed{\begin{pmatrix} 1 & 2 \\ 3 & }",
    "Answer: $$$$",
    "<think>unfinished reasoning with \\boxed{5",
]


def test_garbage_scores_0_quickly_without_raising():
    start = time.perf_counter()
    for generation in GARBAGE:
        for reference in ("5", r"\frac{3}{4}", "(1, 3]", ""):
            result = score_math(generation, sample(reference))
            assert result["score"] == 0.0, (generation[:40], reference)
            assert set(result) == {"score", "valid"}
    assert time.perf_counter() - start < 6.0


def test_a_slow_comparison_scores_0_at_the_deadline(monkeypatch):
    mv = scorers._math_verify()

    def slow_verify(*args, **kwargs):
        time.sleep(2.0)
        return True

    monkeypatch.setattr(mv, "verify", slow_verify)
    monkeypatch.setattr(scorers, "_MATH_DEADLINE_S", 0.05)
    start = time.perf_counter()
    assert score_math(r"\boxed{5}", sample("5")) == {"score": 0.0, "valid": 1.0}
    assert time.perf_counter() - start < 1.0


def test_scores_from_worker_threads():
    """math-verify's default timeouts call signal.alarm, which raises outside the main thread: ours are off."""
    cases = [(ref, gen, 1.0) for ref, gen in RIGHT] + [(ref, gen, 0.0) for ref, gen in WRONG]
    cases += [("5", gen, 0.0) for gen in GARBAGE[:8]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda c: score(c[1], c[0]), cases * 2))
    assert results == [want for _, _, want in cases * 2]


def test_registered_and_lazy(monkeypatch):
    assert get_scorer("math") is score_math
    assert is_task("math")
    with pytest.raises(ConfigError, match="math"):
        get_scorer("maths")
    # math-verify missing: a ConfigError naming the package and the install command, at get_scorer time
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "math_verify", None)  # `import math_verify` raises ImportError
        scorers._math_verify.cache_clear()
        with pytest.raises(ConfigError, match=r"math-verify.*pip install 'sftforge\[math\]'"):
            get_scorer("math")
        with pytest.raises(ConfigError, match="math-verify"):
            score_math(r"\boxed{1}", sample("1"))
    scorers._math_verify.cache_clear()
    assert score(r"\boxed{1}", "1") == 1.0


def test_extract_math_answer():
    assert extract_math_answer(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_math_answer("Work.\nAnswer: $42$.") == "$42$"
    assert extract_math_answer("the total is 1,234 apples") is None
    assert extract_math_answer("the total is 1,234 apples", numeric=True) == "1234"
    assert extract_math_answer("") is None
