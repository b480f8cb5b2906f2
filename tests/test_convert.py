"""sftforge data convert / data check: formats -> messages, multiple choice, GSM8K, jsonl <-> parquet, exit codes."""

import json

import pytest

from sftforge.chat import RowError, row_to_conversation
from sftforge.cli import main
from sftforge.config import DataConfig
from sftforge.convert import check_file, convert_file, convert_row, gsm8k_to_messages, multiple_choice_to_messages
from sftforge.data import read_rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = {
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "alpaca": {"instruction": "Add", "input": "1+1", "output": "2"},
    "prompt_response": {"prompt": "Q?", "response": "A."},
    "messages": {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y", "train": False},
            {"role": "user", "content": "z"},
            {"role": "assistant", "content": "w"},
        ]
    },  # fmt: skip
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_formats_convert_to_the_same_conversation(fmt):
    row = ROWS[fmt]
    out = convert_row(row, "auto", DataConfig())
    messages, _, flags = row_to_conversation(row, DataConfig())
    again, _, flags_again = row_to_conversation(out, DataConfig())
    assert [(m["role"], m["content"]) for m in again] == [(m["role"], m["content"]) for m in messages]
    assert flags_again == [f if f is None else bool(f) for f in flags] or fmt == "prompt_response"


def test_multiple_choice_forms():
    a = multiple_choice_to_messages({"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1})
    assert "A. 3\nB. 4\nC. 5" in a[0]["content"] and a[1]["content"] == "B. 4"
    arc = {"question": "Sky?", "choices": {"label": ["A", "B"], "text": ["blue", "green"]}, "answerKey": "A"}
    assert multiple_choice_to_messages(arc)[1]["content"] == "A. blue"
    cols = {"question": "Q", "A": "x", "B": "y", "C": "z", "answer": "C"}
    assert multiple_choice_to_messages(cols)[1]["content"] == "C. z"
    with pytest.raises(RowError, match="outside the 2 choices"):
        multiple_choice_to_messages({"question": "Q", "choices": ["a", "b"], "answer": 5})


def test_gsm8k_reasoning_ends_with_the_number():
    row = {"question": "Natalia sold 48 clips...", "answer": "She sold 48/2 = <<48/2=24>>24 more.\n#### 1,072"}
    m = gsm8k_to_messages(row)
    assert m[1]["content"] == "She sold 48/2 = 24 more.\n#### 1072" and m[0]["role"] == "user"
    assert gsm8k_to_messages({"question": "q", "answer": 7})[1]["content"] == "#### 7"
    with pytest.raises(RowError, match="must be a number"):
        gsm8k_to_messages({"question": "q", "answer": "x #### seven"})


def test_jsonl_parquet_jsonl_round_trip(tmp_path, textcraft_dir):
    src = textcraft_dir / "train_tools.jsonl"
    n, problems = convert_file(str(src), str(tmp_path / "a.parquet"), "copy")
    assert n == 40 and not problems
    convert_file(str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl"), "copy")
    original = [r for _, r in read_rows(str(src))]
    back = [r for _, r in read_rows(str(tmp_path / "b.jsonl"))]
    cfg = DataConfig()
    assert [row_to_conversation(r, cfg) for r in back] == [row_to_conversation(r, cfg) for r in original]


def test_convert_to_messages_parquet_keeps_tools(tmp_path, textcraft_dir):
    n, _ = convert_file(str(textcraft_dir / "train_tools.jsonl"), str(tmp_path / "m.parquet"), "messages")
    rows = [r for _, r in read_rows(str(tmp_path / "m.parquet"))]
    assert n == 40 and row_to_conversation(rows[0], DataConfig())[1]  # tools survive (as a JSON string if needed)


def test_cli_convert_and_check_exit_codes(tmp_path, capsys):
    good = _write_jsonl(tmp_path / "mc.jsonl", [{"question": "2+2?", "choices": ["3", "4"], "answer": "B"}])
    assert main(["data", "convert", str(good), str(tmp_path / "out.jsonl"), "--from", "multiple_choice"]) == 0
    assert main(["data", "check", str(tmp_path / "out.jsonl")]) == 0
    assert "no problems" in capsys.readouterr().out
    bad = _write_jsonl(tmp_path / "bad.jsonl", [ROWS["alpaca"], {"nothing": 1}, ROWS["alpaca"]])
    (tmp_path / "bad.jsonl").write_text((tmp_path / "bad.jsonl").read_text() + "{not json\n")
    assert main(["data", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "missing key: 1" in out and "duplicate: 1" in out and "invalid JSON: 1" in out
    assert main(["data", "convert", str(bad), str(tmp_path / "o.jsonl")]) == 1


def test_check_with_a_tokenizer_reports_tokens_and_over_length(tokenizer_dirs, textcraft_dir, capsys):
    path = str(textcraft_dir / "train_tools.jsonl")
    assert main(["data", "check", path, f"model.tokenizer_path={tokenizer_dirs['qwen3']}", "data.max_length=600"]) == 1
    out = capsys.readouterr().out
    assert "tokens min" in out and "over data.max_length" in out
    assert "chat template: assistant header (generation prompt)" in out and "arguments as a dict" in out
    r = check_file(path, DataConfig(max_length=100000), None)
    assert r["rows"] == 40 and r["problems"] == {} and r["formats"] == {"messages": 40}
