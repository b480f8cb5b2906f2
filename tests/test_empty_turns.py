"""An assistant turn with no content and no tool calls: a bad row by default (data.bad_rows decides), kept and
counted with data.empty_assistant_turns=keep; a tool-call turn with empty content is normal."""

import json
import re

import pytest

from sftforge import chat
from sftforge.cli import main
from sftforge.config import ConfigError, DataConfig, load_config
from sftforge.convert import check_file
from sftforge.data import DataError, build_dataset

GOOD = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}
EMPTY = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
REASON = "empty assistant turn"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def with_reply(content, **extra):
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content, **extra}]}


TOOL_ROW = {
    "tools": [{"type": "function", "function": {"name": "look", "description": "look around",
                                                "parameters": {"type": "object", "properties": {}}}}],
    "messages": [
        {"role": "user", "content": "What is here?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "look", "arguments": "{}"}}]},
        {"role": "tool", "content": "a crafting table"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "look", "arguments": {}}}]},
        {"role": "tool", "content": "still a crafting table"},
        {"role": "assistant", "content": "A crafting table."},
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    "row",
    [
        EMPTY,
        with_reply(None),
        with_reply("  \n "),
        with_reply([]),
        with_reply([{"type": "text", "text": " "}]),
        with_reply("", reasoning_content="Let me think."),
        with_reply("", tool_calls=[]),
    ],
    ids=["empty", "none", "whitespace", "no-parts", "blank-part", "reasoning-only", "tool-calls-empty-list"],
)
@pytest.mark.parametrize("history", ["template", "per_turn"])
def test_default_refuses_with_file_row_and_message(tmp_path, tokenizers, row, history):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, row, GOOD])
    with pytest.raises(DataError) as e:
        build_dataset(DataConfig(reasoning_history=history), tokenizers["qwen2.5"], str(f))
    msg = str(e.value)
    assert f"{f}:2: {REASON}: message 1 (assistant)" in msg
    assert "data.bad_rows=skip" in msg and "data.empty_assistant_turns=keep" in msg


def test_an_empty_earlier_turn_is_refused_too(tmp_path, tokenizers):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}  # fmt: skip
    f = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=rf"d\.jsonl:1: {REASON}: message 1 \(assistant\)"):
        build_dataset(DataConfig(train_on="last_assistant"), tokenizers["qwen2.5"], str(f))


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "Say hi.", "output": ""},
        {"prompt": "Say hi.", "response": " "},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
    ],
    ids=["alpaca", "prompt_response", "sharegpt"],
)
def test_every_format_is_checked(row):
    messages, _, _ = chat.row_to_conversation(row, DataConfig())
    with pytest.raises(chat.RowError) as e:
        chat.check_empty_assistant_turns(messages, DataConfig())
    assert e.value.reason == REASON
    assert chat.check_empty_assistant_turns(messages, DataConfig(empty_assistant_turns="keep")) == 1


def test_skip_drops_and_counts_it(tmp_path, tokenizers):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, EMPTY, with_reply(None), GOOD])
    ds = build_dataset(DataConfig(bad_rows="skip"), tokenizers["qwen2.5"], str(f))
    r = ds.report
    assert len(ds) == 2 and r.rows == 4 and r.skipped == {REASON: 2}
    assert r.empty_assistant_turns == 0
    assert any(p.startswith(f"{f}:2: {REASON}") for p in r.first_problems)
    assert f"skipped (data.bad_rows=skip): 2 rows — {REASON}" in r.lines()


def test_keep_trains_it_counts_it_and_is_part_of_the_cache_key(tmp_path, tokenizers):
    tok = tokenizers["qwen2.5"]
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, EMPTY, GOOD])
    ds = build_dataset(DataConfig(empty_assistant_turns="keep"), tok, str(f))
    assert len(ds) == 3 and ds.report.skipped == {} and ds.report.empty_assistant_turns == 1
    assert any("empty assistant turns kept and trained" in line for line in ds.report.lines())
    trained = [t for t, m in zip(ds[1].input_ids, ds[1].loss_mask) if m]
    assert tok.decode(trained) == "<|im_end|>"  # the turn as it is: the model is taught to stop at once
    # the same files with the default policy are not read back from the cache entry written with keep
    with pytest.raises(DataError, match=REASON):
        build_dataset(DataConfig(), tok, str(f))
    per_turn = build_dataset(DataConfig(empty_assistant_turns="keep", reasoning_history="per_turn"), tok, str(f))
    assert len(per_turn) == 3 and per_turn.report.empty_assistant_turns == 1


def test_config_key_is_validated():
    assert load_config(None, ["data.empty_assistant_turns=keep"]).data.empty_assistant_turns == "keep"
    with pytest.raises(ConfigError, match=re.escape("must be one of error | keep")):
        load_config(None, ["data.empty_assistant_turns=drop"])


def test_data_check_reports_it(tmp_path, tokenizer_dirs, capsys):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, EMPTY, with_reply("   ")])
    assert main(["data", "check", str(f), f"model.path={tokenizer_dirs['qwen2.5']}"]) == 1
    out = capsys.readouterr().out
    assert f"{REASON}: 2" in out and f"{f}:2: {REASON}: message 1 (assistant)" in out and "no problems" not in out
    assert main(["data", "check", str(f), "data.empty_assistant_turns=keep"]) == 0
    out = capsys.readouterr().out
    assert "no problems" in out and "empty assistant turns kept (data.empty_assistant_turns=keep): 2" in out


def test_tool_call_turns_with_empty_content_are_not_a_problem(tmp_path, tokenizers):
    assert chat.empty_assistant_turns(chat.row_to_conversation(TOOL_ROW, DataConfig())[0]) == []
    f = write_jsonl(tmp_path / "d.jsonl", [TOOL_ROW])
    ds = build_dataset(DataConfig(), tokenizers["qwen2.5"], str(f))
    assert len(ds) == 1 and ds.report.skipped == {} and ds.report.empty_assistant_turns == 0
    assert check_file(str(f), DataConfig(), tokenizers["qwen2.5"])["problems"] == {}
