"""The demo's task, generated: arithmetic a 135M model cannot do in its head, and Python does in one line.

    python examples/retool_smollm2/make_data.py      # rewrites data/*.jsonl here (the committed files are its output)

Five kinds of problem, each asked in a few phrasings, with integer answers: products of multi-digit numbers, sums of
integer ranges, sums of squares, modular powers, counts of divisors. Three disjoint splits (no question in two):

- ``sft.jsonl``: tool-use trajectories (system, problem, an assistant ``code_interpreter`` call, the tool's output,
  the answer in ``\\boxed{}``) for supervised fine-tuning;
- ``rl.jsonl``: problems for DAPO, prompt only (system, problem and the ``answer`` column, as verl's RL data holds a
  prompt and its ground truth); the RL environment offers the code_interpreter tool itself;
- ``heldout.jsonl``: problems for the accuracy table, never trained on, prompt only too: ``--task code_math`` offers
  the tool, ``--task math`` asks the same problems without it. (A full trajectory here would hand ``--task math``
  the tool's output in its prompt: it continues the conversation before the last assistant turn.)

The tool's output in the trajectories is what the sandbox prints for the code (a tool message is never trained).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from sftforge.envs.code import CODE_TOOL

HERE = Path(__file__).resolve().parent
SYSTEM = "Solve the problem. Give the final answer as \\boxed{N}."
SIZES = {"sft": 400, "rl": 240, "heldout": 80}


def _product(rng):
    a, b = rng.randint(100, 9999), rng.randint(100, 999)
    ask = rng.choice(["What is {a} * {b}?", "Compute {a} times {b}.", "What is the product of {a} and {b}?"])
    return ask.format(a=a, b=b), f"print({a} * {b})", a * b


def _range_sum(rng):
    a = rng.randint(1, 500)
    b = a + rng.randint(50, 3000)
    ask = rng.choice(["What is the sum of all integers from {a} to {b}?", "Add up every integer from {a} through {b}.",
                      "Compute {a} + {a1} + ... + {b}."])  # fmt: skip
    return ask.format(a=a, a1=a + 1, b=b), f"print(sum(range({a}, {b + 1})))", sum(range(a, b + 1))


def _squares(rng):
    xs = [rng.randint(11, 999) for _ in range(rng.randint(2, 4))]
    terms = " + ".join(f"{x}^2" for x in xs)
    ask = rng.choice(["What is {t}?", "Compute {t}.", "Find the value of {t}."])
    return ask.format(t=terms), "print(" + " + ".join(f"{x}**2" for x in xs) + ")", sum(x * x for x in xs)


def _powmod(rng):
    a, e, m = rng.randint(2, 99), rng.randint(5, 60), rng.choice([7, 11, 13, 97, 100, 101, 997, 1000])
    ask = rng.choice(["What is the remainder when {a}^{e} is divided by {m}?", "Compute {a}^{e} mod {m}."])
    return ask.format(a=a, e=e, m=m), f"print(pow({a}, {e}, {m}))", pow(a, e, m)


def _divisors(rng):
    n = rng.randint(100, 20000)
    ask = rng.choice(["How many positive divisors does {n} have?", "Count the positive divisors of {n}."])
    return (
        ask.format(n=n),
        f"n = {n}\nprint(sum(1 for d in range(1, n + 1) if n % d == 0))",
        sum(1 for d in range(1, n + 1) if n % d == 0),
    )


KINDS = [_product, _range_sum, _squares, _powmod, _divisors]


def row(i: int, kind: str, question: str, code: str, answer: int, trajectory: bool) -> dict:
    """A trajectory (with the ``tools`` column) for SFT, else the prompt and its answer."""
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    out = {"id": f"{kind}-{i}", "kind": kind, "answer": str(answer), "messages": prompt}
    if not trajectory:
        return out
    messages = [
        *prompt,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "code_interpreter", "arguments": {"code": code}},
                }
            ],
        },  # fmt: skip
        {"role": "tool", "tool_call_id": "call_0", "name": "code_interpreter", "content": f"{answer}\n"},
        {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."},
    ]
    return {**out, "messages": messages, "tools": [CODE_TOOL]}


def generate(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in SIZES.items():
        rows = []
        while len(rows) < size:
            make = KINDS[len(rows) % len(KINDS)]
            question, code, answer = make(rng)
            if question in seen:
                continue
            seen.add(question)
            rows.append(row(len(rows), make.__name__.strip("_"), question, code, answer, trajectory=split == "sft"))
        splits[split] = rows
    return splits


def write(folder: Path = HERE / "data") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in generate().items():
        with open(folder / f"{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "data")
