"""Fuzz: thousands of generated broken rows, every one either a clear row error or a sample; counts add up."""

import copy
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftforge.config import DataConfig
from sftforge.data import DataError, build_dataset

BASES = [
    {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
            },
            {"role": "tool", "tool_call_id": "c", "content": "ok"},
            {"role": "assistant", "content": "done", "train": True},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    },
    {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "system": "s"},
    {"instruction": "do", "input": "this", "output": "done"},
    {"prompt": [{"role": "user", "content": "q"}], "response": "r"},
    {"prompt": "q", "response": "r"},
]

JUNK = [None, 0, 1.5, True, "", "x", [], {}, [1, 2], {"a": 1}, "[", '{"role": 1}', ["user"], [{"role": None}]]


def mutate(value, rng, depth=0):
    """Return a randomly broken copy of value (sometimes unchanged)."""
    r = rng.random()
    if depth > 3 or r < 0.15:
        return rng.choice(JUNK)
    if isinstance(value, dict):
        value = dict(value)
        if value and rng.random() < 0.3:
            del value[rng.choice(list(value))]
        if value and rng.random() < 0.6:
            k = rng.choice(list(value))
            value[k] = mutate(value[k], rng, depth + 1)
        if rng.random() < 0.1:
            value[rng.choice(["role", "content", "train", "loss_mask", "tool_calls", "from", "value"])] = rng.choice(
                JUNK
            )
        return value
    if isinstance(value, list):
        value = list(value)
        if value and rng.random() < 0.3:
            value.pop(rng.randrange(len(value)))
        if value and rng.random() < 0.6:
            i = rng.randrange(len(value))
            value[i] = mutate(value[i], rng, depth + 1)
        if rng.random() < 0.1:
            value.append(rng.choice(JUNK))
        return value
    if isinstance(value, str):
        return rng.choice(
            [value, value[: len(value) // 2], json.dumps(value)[:-1], "<|im_start|>assistant\n", "unknown"]
        )
    return rng.choice(JUNK)


def broken_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = mutate(copy.deepcopy(rng.choice(BASES)), rng)
        if isinstance(row, dict) and rng.random() < 0.2:  # JSON-string columns, as parquet files hold them
            for key in ("messages", "tools"):
                if key in row:
                    row[key] = json.dumps(row[key])[: None if rng.random() < 0.7 else -2]
        rows.append(row)
    return rows


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "phi3"])
def test_fuzz_skip_accounts_for_every_row(tmp_path, tokenizers, name):
    rows = broken_rows(3000, seed=0)
    lines = [json.dumps(r) for r in rows]
    rng = random.Random(1)
    for i in rng.sample(range(len(lines)), 100):  # some lines are not even JSON
        lines[i] = lines[i][: rng.randrange(1, len(lines[i]))]
    f = tmp_path / "fuzz.jsonl"
    f.write_text("\n".join(lines) + "\n")
    ds = build_dataset(DataConfig(bad_rows="skip", cache_dir="none", max_length=100000), tokenizers[name], str(f))
    r = ds.report
    assert r.rows == 3000
    assert r.samples + sum(r.skipped.values()) == r.rows
    assert r.skipped.get("invalid JSON", 0) >= 100
    assert len(r.skipped) >= 6, r.skipped  # many distinct reasons, each named
    assert 0 < r.samples < 3000


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "json"])
def test_fuzz_error_mode_names_file_and_row(tmp_path, tokenizers, fmt):
    rows = broken_rows(400, seed=2)
    tok = tokenizers["qwen2.5"]
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    checked = 0
    for row in rows:
        if fmt == "jsonl":
            f = tmp_path / "one.jsonl"
            f.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
            where = f"{f}:2: "
        elif fmt == "json":
            f = tmp_path / "one.json"
            f.write_text(json.dumps([good, row]))
            where = f"{f} row 1: "
        else:
            if not isinstance(row, dict) or not row:
                continue
            f = tmp_path / "one.parquet"
            keys = sorted(set(good) | set(row))
            cols = {
                k: [json.dumps(good[k]) if k in good else None, json.dumps(row[k]) if k in row else None] for k in keys
            }
            pq.write_table(pa.table(cols), f)
            where = f"{f} row 1: "
        try:
            build_dataset(DataConfig(cache_dir="none", max_length=100000), tok, str(f))
        except DataError as e:
            assert str(e).startswith(where), str(e)
            assert "data.bad_rows=skip" in str(e)
            checked += 1
    assert checked > 100
