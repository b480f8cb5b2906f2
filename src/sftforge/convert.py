"""``sftforge data convert`` and ``sftforge data check``.

convert: rows of any supported format (messages, sharegpt, alpaca, prompt_response — normalized by
:func:`sftforge.chat.row_to_conversation`, the same code the trainer uses), multiple-choice questions and GSM8K-style
question/answer rows -> one ``{"messages": [...], "tools"?: [...]}`` row each, written as .jsonl or .parquet (by the
output's suffix). ``--from copy`` only changes the container (jsonl <-> parquet), keeping rows as they are.

check: per file, the number of rows, their formats, conversation sizes (and token lengths when a tokenizer is given
with model.path=...), and every problem counted by reason with the first locations; exit code 1 when there is one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from sftforge.chat import (
    RowError,
    check_empty_assistant_turns,
    detect_format,
    render,
    row_to_conversation,
    template_markers,
)
from sftforge.config import ConfigError, DataConfig, load_config
from sftforge.data import DataError, load_tokenizer, read_rows

SOURCE_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_response", "multiple_choice", "gsm8k", "copy")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ------------------------------------------------------------------------------------------------------------------
# Row conversions


def _choices(row: dict) -> list[str]:
    """Options of a multiple-choice row: a list, ARC's {"label": [...], "text": [...]}, or columns A, B, C, ..."""
    for key in ("choices", "options"):
        value = row.get(key)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if isinstance(value, dict) and isinstance(value.get("text"), list):
            return [str(t) for t in value["text"]]
        if isinstance(value, dict):  # {"A": "...", "B": "..."}
            return [str(value[k]) for k in sorted(value)]
        if isinstance(value, list) and value:
            return [str(v) for v in value]
    columns = [row[k] for k in LETTERS if k in row and row[k] is not None]
    if len(columns) >= 2:
        return [str(c) for c in columns]
    raise RowError("missing key", "a multiple-choice row needs 'choices' (or 'options', or columns A, B, ...)")


def _answer_index(row: dict, n: int) -> int:
    for key in ("answer", "answerKey", "label", "target"):
        if key not in row or row[key] is None:
            continue
        value = row[key]
        if isinstance(value, bool):
            break
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            idx = int(value)
        elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
            idx = LETTERS.index(value.strip().upper())
        else:
            raise RowError("wrong type", f"'{key}' must be a letter (A..) or a 0-based index, got {value!r}")
        if not 0 <= idx < n:
            raise RowError("wrong type", f"'{key}'={value!r} is outside the {n} choices")
        return idx
    raise RowError("missing key", "a multiple-choice row needs 'answer' (letter or 0-based index) or 'answerKey'")


def multiple_choice_to_messages(row: dict) -> list[dict]:
    """Question + lettered options -> the user turn; the answer letter and its text -> the assistant turn."""
    question = row.get("question") or row.get("question_stem") or row.get("prompt")
    if not isinstance(question, str) or not question.strip():
        raise RowError("missing key", "a multiple-choice row needs a 'question' string")
    choices = _choices(row)
    if len(choices) > len(LETTERS):
        raise RowError("wrong type", f"{len(choices)} choices: at most {len(LETTERS)} are supported")
    idx = _answer_index(row, len(choices))
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    user = f"{question.strip()}\n\n{options}\n\nAnswer with the letter of the correct option."
    return [{"role": "user", "content": user}, {"role": "assistant", "content": f"{LETTERS[idx]}. {choices[idx]}"}]


_CALC = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def gsm8k_to_messages(row: dict) -> list[dict]:
    """question + 'reasoning #### 42' (or a bare number) -> a reasoning response ending in '#### 42'."""
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise RowError("missing key", "a GSM8K row needs a 'question' string")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise RowError("missing key", "a GSM8K row needs an 'answer' string ('reasoning #### number')")
    reasoning, sep, final = answer.rpartition("####")
    if not sep:
        reasoning, final = "", answer
    final = final.strip()
    m = _NUMBER.fullmatch(final)
    if not m:
        raise RowError("wrong type", f"the final answer after '####' must be a number, got {final[:40]!r}")
    number = final.replace(",", "")
    reasoning = _CALC.sub("", reasoning).strip()
    content = f"{reasoning}\n#### {number}" if reasoning else f"#### {number}"
    return [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": content}]


def convert_row(row: Any, source: str, data_cfg: DataConfig) -> dict:
    """One row -> {"messages": [...]} (+ "tools"); per-message train flags are kept as "train"."""
    if source == "copy":
        return row
    if not isinstance(row, dict):
        raise RowError("wrong type", f"a row must be a JSON object, got {type(row).__name__}")
    if source == "multiple_choice":
        return {"messages": multiple_choice_to_messages(row)}
    if source == "gsm8k":
        return {"messages": gsm8k_to_messages(row)}
    cfg = dataclasses.replace(data_cfg, format=source)
    messages, tools, flags = row_to_conversation(row, cfg)
    out_messages = []
    for msg, flag in zip(messages, flags):
        msg = {k: v for k, v in msg.items() if k not in ("train", "loss_mask")}
        if flag is not None:
            msg["train"] = bool(flag)
        out_messages.append(msg)
    out: dict[str, Any] = {"messages": out_messages}
    if tools:
        out["tools"] = tools
    return out


# ------------------------------------------------------------------------------------------------------------------
# Writing


def write_rows(rows: list[dict], path: str | Path) -> None:
    """jsonl (one JSON object per line) or parquet; nested columns that arrow cannot type uniformly (tool-call
    arguments of varying shapes) are stored as JSON strings, which the reader accepts for messages and tools."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(rows)
            if pa.Table.from_pylist(table.to_pylist()).to_pylist() != rows and all(isinstance(r, dict) for r in rows):
                raise pa.ArrowInvalid("lossy")  # missing keys would come back as nulls
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            keys = list(dict.fromkeys(k for r in rows for k in r))
            nested = {k for k in keys if any(isinstance(r.get(k), (list, dict)) for r in rows)}
            table = pa.Table.from_pylist(
                [
                    {k: json.dumps(r[k], ensure_ascii=False) if k in nested and k in r else r.get(k) for k in keys}
                    for r in rows
                ]
            )
        pq.write_table(table, path)
    else:
        raise ConfigError(f"{path}: the output must end in .jsonl or .parquet.")


def convert_file(src: str, dest: str, source: str = "auto", data_cfg: DataConfig | None = None) -> tuple[int, list]:
    """Convert every row; returns (rows written, [(location, problem)]). Rows with a problem are not written."""
    if source not in SOURCE_FORMATS:
        raise ConfigError(f"--from must be one of {' | '.join(SOURCE_FORMATS)}, got {source!r}.")
    data_cfg = data_cfg or DataConfig()
    rows, problems = [], []
    for loc, row in read_rows(src):
        try:
            if isinstance(row, RowError):
                raise row
            rows.append(convert_row(row, source, data_cfg))
        except RowError as e:
            problems.append((loc, f"{e.reason}: {e.detail}"))
    write_rows(rows, dest)
    return len(rows), problems


def convert_main(src: str, dest: str, source: str, overrides: list[str]) -> int:
    cfg = load_config(None, overrides)
    n, problems = convert_file(src, dest, source, cfg.data)
    for loc, p in problems[:10]:
        print(f"{loc}: {p}", file=sys.stderr)
    print(f"wrote {n} rows to {dest}" + (f"; {len(problems)} rows not converted" if problems else ""), file=sys.stderr)
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------------------------------
# Check


def _stats(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    s = sorted(values)
    return {"min": s[0], "median": int(statistics.median(s)), "max": s[-1]}


def check_file(path: str, data_cfg: DataConfig, tokenizer=None) -> dict[str, Any]:
    """Stats and problems of one file (problems: reason -> count, and the first few locations)."""

    formats: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    examples: list[str] = []
    n_messages, n_tokens, n_trained = [], [], []
    roles: Counter[str] = Counter()
    seen: dict[str, str] = {}
    rows = empty_kept = 0
    markers = template_markers(tokenizer, data_cfg.chat_template_kwargs) if tokenizer is not None else None

    def problem(loc: str, reason: str, detail: str) -> None:
        problems[reason] += 1
        if len(examples) < 10:
            examples.append(f"{loc}: {reason}: {detail}")

    try:
        for loc, row in read_rows(path):
            rows += 1
            try:
                if isinstance(row, RowError):
                    raise row
                if isinstance(row, dict) and data_cfg.format == "auto":
                    formats[detect_format(row, data_cfg)] += 1
                elif isinstance(row, dict):
                    formats[data_cfg.format] += 1
                messages, tools, flags = row_to_conversation(row, data_cfg)
                if not any(m["role"] == "assistant" for m in messages):
                    raise RowError("no assistant turn", "the conversation has no assistant message to train on")
                empty_kept += check_empty_assistant_turns(messages, data_cfg)
                n_messages.append(len(messages))
                roles.update(m["role"] for m in messages)
                key = json.dumps(messages, sort_keys=True, default=str)
                if key in seen:
                    problem(loc, "duplicate", f"same conversation as {seen[key]}")
                else:
                    seen[key] = loc
                if tokenizer is not None:
                    r = render(
                        tokenizer,
                        messages,
                        tools,
                        flags,
                        data_cfg.train_on,
                        data_cfg.chat_template_kwargs,
                        markers,
                        data_cfg.system_into_first_user,
                    )
                    n_tokens.append(len(r.input_ids))
                    n_trained.append(sum(r.loss_mask))
                    if len(r.input_ids) > data_cfg.max_length:
                        problem(
                            loc,
                            "over data.max_length",
                            f"{len(r.input_ids)} tokens > {data_cfg.max_length} (see data.truncation)",
                        )
                    if not any(r.loss_mask):
                        problem(loc, "no trained tokens", "no token of this conversation is trained")
            except RowError as e:
                problem(loc, e.reason, e.detail)
    except (DataError, OSError) as e:
        problem(path, "unreadable file", str(e))
    out: dict[str, Any] = {
        "file": path,
        "rows": rows,
        "formats": dict(formats),
        "messages": _stats(n_messages),
        "roles": dict(roles),
    }
    if tokenizer is not None:
        out["tokens"] = _stats(n_tokens)
        out["trained_share"] = round(sum(n_trained) / max(1, sum(n_tokens)), 4)
        out["template"] = markers.describe()
    if rows == 0 and not problems:
        problem(path, "empty file", "no rows")
    out["problems"] = dict(problems)
    out["examples"] = examples
    if empty_kept:
        out["empty_assistant_turns_kept"] = empty_kept
    return out


def check_main(files: list[str], overrides: list[str], as_json: bool = False) -> int:
    cfg = load_config(None, overrides)
    tokenizer = None
    if cfg.model.path or cfg.model.tokenizer_path:
        tokenizer = load_tokenizer(cfg)
    if not files:
        raise ConfigError("sftforge data check needs at least one data file.")
    bad = False
    if tokenizer is not None and not as_json:
        print("chat template: " + "; ".join(template_markers(tokenizer, cfg.data.chat_template_kwargs).describe()))
    for path in files:
        if not Path(path).exists():
            raise ConfigError(f"{path} does not exist.")
        r = check_file(path, cfg.data, tokenizer)
        bad = bad or bool(r["problems"])
        if as_json:
            print(json.dumps(r))
            continue
        line = f"{path}: {r['rows']} rows, formats {r['formats'] or '-'}"
        if r["messages"]:
            m = r["messages"]
            line += f", messages/conversation min {m['min']} median {m['median']} max {m['max']}"
        if r.get("tokens"):
            t = r["tokens"]
            line += f", tokens min {t['min']} median {t['median']} max {t['max']}, trained {r['trained_share']:.1%}"
        print(line)
        if r["problems"]:
            print("  problems: " + ", ".join(f"{k}: {v}" for k, v in sorted(r["problems"].items())))
            for e in r["examples"]:
                print(f"    {e}")
        else:
            print("  no problems")
        if r.get("empty_assistant_turns_kept"):
            print(f"  empty assistant turns kept (data.empty_assistant_turns=keep): {r['empty_assistant_turns_kept']}")
    return 1 if bad else 0


__all__ = [
    "SOURCE_FORMATS",
    "check_file",
    "check_main",
    "convert_file",
    "convert_main",
    "convert_row",
    "gsm8k_to_messages",
    "multiple_choice_to_messages",
    "write_rows",
]
