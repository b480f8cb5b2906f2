"""Writes the OMCQ-style files (committed; rerun to regenerate): multiple-choice questions (question, options,
answer) about made-up things, each one a kind of animal, plant, mineral or machine, the same four options in the same
order every time.

- omcq_stage1.json: 48 things, for the base model's earlier stage (it learns the question format on them);
- omcq_train.json: 48 OTHER things, each asked in three of the four phrasings: the knowledge the memory modules must
  hold;
- omcq_test.json: each of those 48 things asked in its fourth phrasing (held out: never trained for that thing, though
  trained for others), so a right answer needs the thing's fact, not a memorized sentence."""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPTIONS = ["animal", "plant", "mineral", "machine"]
TEMPLATES = [
    "What kind of thing is a {x}?",
    "A {x} is which of these?",
    "Pick the category of the {x}.",
    "Which group does the {x} belong to?",
]


def names(n: int, rng: random.Random) -> list[str]:
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)))
    return sorted(out)


def main() -> None:
    rng = random.Random(7)
    all_things = [(x, rng.randrange(4)) for x in names(96, rng)]
    rng.shuffle(all_things)
    earlier, things = all_things[:48], all_things[48:]
    held = {x: i % len(TEMPLATES) for i, (x, _) in enumerate(things)}  # each thing's held-out phrasing
    splits = {
        "stage1": [(x, k, t) for x, k in earlier for t in TEMPLATES],
        "train": [(x, k, t) for x, k in things for j, t in enumerate(TEMPLATES) if j != held[x]],
        "test": [(x, k, TEMPLATES[held[x]]) for x, k in things],
    }
    for name, rows in splits.items():
        out = [{"question": t.format(x=x), "options": OPTIONS, "answer": "ABCD"[k]} for x, k, t in rows]
        (HERE / f"omcq_{name}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
