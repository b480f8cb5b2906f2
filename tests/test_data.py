"""Files -> samples: formats on disk, bad-row and truncation policies, cache, processes, CLI, TextCraft."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftforge import chat
from sftforge.config import ConfigError, DataConfig, load_config
from sftforge.data import DataError, build_dataset, load_tokenizer, resolve_files

GOOD = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cfg(**kw):
    return DataConfig(**kw)


def test_jsonl_json_parquet_glob_list_and_verl_string(tmp_path, tokenizers):
    tok = tokenizers["qwen2.5"]
    rows = [GOOD, {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.table({"messages": [json.dumps(r["messages"]) for r in rows]}), tmp_path / "c.parquet")
    ref = build_dataset(cfg(), tok, str(tmp_path / "a.jsonl"))
    assert len(ref) == 2 and ref[0].source.endswith("a.jsonl:1")
    for files in [str(tmp_path / "b.json"), str(tmp_path / "c.parquet")]:
        ds = build_dataset(cfg(), tok, files)
        assert [s.input_ids for s in ds] == [s.input_ids for s in ref]
        assert [s.loss_mask for s in ds] == [s.loss_mask for s in ref]
    assert len(build_dataset(cfg(), tok, str(tmp_path / "*.json*"))) == 4
    assert len(build_dataset(cfg(), tok, [str(tmp_path / "a.jsonl"), str(tmp_path / "c.parquet")])) == 4
    verl = f"['{tmp_path / 'a.jsonl'}', '{tmp_path / 'c.parquet'}']"
    assert resolve_files(verl) == [str(tmp_path / "a.jsonl"), str(tmp_path / "c.parquet")]


def test_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_files(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="matches no file"):
        resolve_files(str(tmp_path / "*.parquet"))
    with pytest.raises(ConfigError, match="data.train_files is empty"):
        resolve_files(None)


BAD_ROWS = [
    ("{not json", "invalid JSON"),
    ({"text": "x"}, "missing key"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}, "wrong type"),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
            ]
        },
        "invalid tool-call arguments",
    ),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS)
def test_bad_row_error_names_file_line_and_reason(tmp_path, tokenizers, bad, reason):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        build_dataset(cfg(), tokenizers["qwen2.5"], str(f))
    msg = str(e.value)
    assert f"{f}:3: {reason}" in msg and "data.bad_rows=skip" in msg


def test_bad_row_in_parquet_names_row_index(tmp_path, tokenizers):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"messages": [json.dumps(GOOD["messages"]), '[{"role": "user"']}), p)
    with pytest.raises(DataError, match=rf"{p} row 1: invalid JSON"):
        build_dataset(cfg(), tokenizers["qwen2.5"], str(p))


def test_skip_counts_every_reason_and_adds_up(tmp_path, tokenizers):
    rows = [GOOD] + [b for b, _ in BAD_ROWS] + [GOOD]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = build_dataset(cfg(bad_rows="skip"), tokenizers["qwen2.5"], str(f))
    r = ds.report
    assert len(ds) == 2 and r.rows == len(rows)
    assert r.skipped == {reason: 1 for _, reason in BAD_ROWS}
    assert r.samples + sum(r.skipped.values()) == r.rows
    assert any("d.jsonl:2" in p for p in r.first_problems)


def long_row(n_words=60):
    return {
        "messages": [{"role": "user", "content": "word " * n_words}, {"role": "assistant", "content": "short answer"}]
    }


def test_truncation_error_reports_count_and_fix(tmp_path, tokenizers):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, long_row()])
    with pytest.raises(DataError) as e:
        build_dataset(cfg(max_length=40), tokenizers["qwen2.5"], str(f))
    msg = str(e.value)
    assert "1 of 2 samples are longer than data.max_length=40" in msg and f"{f}:2" in msg
    assert "data.truncation" in msg and "Raise data.max_length to at least" in msg


def test_truncation_left_right_drop(tmp_path, tokenizers):
    tok = tokenizers["qwen2.5"]
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, long_row()])
    full = build_dataset(cfg(max_length=4096), tok, str(f))[1]
    left = build_dataset(cfg(max_length=40, truncation="left"), tok, str(f))
    assert len(left) == 2 and left.report.truncated == 1 and left.report.over_length == 1
    assert left[1].input_ids == full.input_ids[-40:] and left[1].loss_mask == full.loss_mask[-40:]
    # right truncation keeps the start: the answer (at the end) is cut away -> dropped and counted, not kept
    right = build_dataset(cfg(max_length=40, truncation="right"), tok, str(f))
    assert len(right) == 1 and right.report.dropped_no_trained_tokens == 1
    assert any("cut away every trained token" in p for p in right.report.first_problems)
    right_ok = build_dataset(cfg(max_length=len(full.input_ids) - 1, truncation="right"), tok, str(f))
    assert right_ok[1].input_ids == full.input_ids[:-1] and right_ok.report.truncated == 1
    drop = build_dataset(cfg(max_length=40, truncation="drop"), tok, str(f))
    assert len(drop) == 1 and drop.report.dropped_over_length == 1


def test_all_rows_unusable_is_a_clear_error(tmp_path, tokenizers):
    f = write_jsonl(tmp_path / "d.jsonl", [long_row(), long_row()])
    with pytest.raises(DataError, match="No usable sample"):
        build_dataset(cfg(max_length=20, truncation="drop"), tokenizers["qwen2.5"], str(f))


def test_cache_hit_and_invalidation(tmp_path, tokenizers, monkeypatch):
    tok = tokenizers["qwen2.5"]
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    c = cfg(cache_dir=str(tmp_path / "cache"))
    first = build_dataset(c, tok, str(f))
    assert list((tmp_path / "cache" / "tokenized").glob("*/meta.json"))

    def boom(*a, **k):
        raise AssertionError("render called on a cache hit")

    monkeypatch.setattr("sftforge.data.render", boom)
    monkeypatch.setattr("sftforge.data.layout", boom)
    again = build_dataset(c, tok, str(f))
    assert [s.input_ids for s in again] == [s.input_ids for s in first] and again.report == first.report
    with pytest.raises(AssertionError):  # options are part of the key
        build_dataset(cfg(cache_dir=str(tmp_path / "cache"), train_on="all"), tok, str(f))
    write_jsonl(f, [GOOD, GOOD])  # so is the file content
    with pytest.raises(AssertionError):
        build_dataset(c, tok, str(f))


def test_num_proc_gives_identical_samples(textcraft_dir, tokenizers):
    tok = tokenizers["qwen3"]
    f = str(textcraft_dir / "train_tools.jsonl")
    one = build_dataset(cfg(cache_dir="none"), tok, f)
    two = build_dataset(cfg(cache_dir="none", num_proc=2), tok, f)
    assert [(s.input_ids, s.loss_mask, s.source) for s in one] == [(s.input_ids, s.loss_mask, s.source) for s in two]


def test_chat_template_override_inline_and_file(tmp_path, tokenizer_dirs):
    tmpl = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tmp_path / "t.jinja").write_text(tmpl)
    for value in (tmpl, str(tmp_path / "t.jinja")):
        c = load_config(None, [f"model.path={tokenizer_dirs['qwen2.5']}", f"data.chat_template={json.dumps(value)}"])
        tok = load_tokenizer(c)
        assert tok.chat_template == tmpl
        r = chat.render(tok, GOOD["messages"])
        assert "You are Qwen" not in r.text  # the override is used, not the model's template
    with pytest.raises(chat.TemplateError, match="neither an existing file"):
        load_tokenizer(
            load_config(None, [f"model.path={tokenizer_dirs['qwen2.5']}", "data.chat_template=missing.jinja"])
        )


# ---- the real data: TextCraft (vendored first 40 rows), both shapes, all three tokenizers


def check_sample_invariants(tok, sample, messages, eot):
    """Independent of how masks are computed: every trained run ends with the end-of-turn token, there is one
    trained run per assistant turn, and no user/tool/system text is trained."""
    text = tok.decode(sample.input_ids, skip_special_tokens=False)
    eot_id = tok.convert_tokens_to_ids(eot)
    runs, cur = [], []
    for t, m in zip(sample.input_ids, sample.loss_mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    assert len(runs) == n_assistant
    assert all(r[-1] == eot_id for r in runs)
    assert sample.loss_mask[0] == 0
    trained_text = "".join(tok.decode(r) for r in runs)
    for m in messages:
        if m["role"] in ("user", "tool") and len(m["content"]) > 20:
            assert m["content"] not in trained_text
            assert m["content"].split()[0] in text


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5", "phi3"])
@pytest.mark.parametrize("shape", ["react", "tools"])
def test_textcraft_all_tokenizers_both_shapes(textcraft_dir, tokenizers, name, shape):
    tok = tokenizers[name]
    jsonl = str(textcraft_dir / f"train_{shape}.jsonl")
    if name == "phi3" and shape == "tools":  # Phi-3's template ignores tool_calls and tool messages
        with pytest.raises(DataError, match="does not render") as e:
            build_dataset(cfg(), tok, jsonl)
        # the refusal names the file and row, the template and what to change
        assert "train_tools.jsonl:1" in str(e.value) and "chat template: the tokenizer's own" in str(e.value)
        assert "Set data.chat_template" in str(e.value)
        return
    ds = build_dataset(cfg(), tok, jsonl)
    assert len(ds) == 40 and ds.report.rows == 40
    rows = [json.loads(line) for line in open(jsonl)]
    eot = "<|end|>" if name == "phi3" else "<|im_end|>"
    for sample, row in zip(ds, rows):
        check_sample_invariants(tok, sample, row["messages"], eot)
    par = build_dataset(cfg(), tok, str(textcraft_dir / f"train_{shape}.parquet"))
    assert [s.input_ids for s in par] == [s.input_ids for s in ds]
    assert [s.loss_mask for s in par] == [s.loss_mask for s in ds]


# ---- CLI


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sftforge", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_tokenize_and_preview(tmp_path, tokenizer_dirs, textcraft_dir):
    out = tmp_path / "tok.jsonl"
    data = textcraft_dir / "train_react.jsonl"
    p = run_cli(
        "data", "tokenize", f"model.path={tokenizer_dirs['qwen3']}", f"data.train_files={data}", "--output", str(out)
    )
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 40 and set(lines[0]) == {"input_ids", "loss_mask"}
    assert all(len(x["input_ids"]) == len(x["loss_mask"]) and set(x["loss_mask"]) == {0, 1} for x in lines)
    assert "rows read: 40" in p.stderr
    p = run_cli(
        "data",
        "preview",
        f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
        f"data.train_files={data}",
        "--index",
        "3",
        "--no-color",
    )
    assert p.returncode == 0, p.stderr
    assert "sample 3" in p.stdout and "trained (highlighted)" in p.stdout and "Action: craft" in p.stdout
    # what was learned from the template is shown, so a user can see why these tokens are trained
    assert "assistant header (generation prompt): '<|im_start|>assistant\\n'" in p.stdout
    assert "closing, followed by a user message: '<|im_end|>'" in p.stdout


def test_cli_errors_are_one_paragraph_not_tracebacks(tmp_path, tokenizer_dirs):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": [{"role": "user", "content": "x"}]}])
    p = run_cli(
        "data",
        "tokenize",
        f"model.path={tokenizer_dirs['qwen3']}",
        f"data.train_files={f}",
        "-o",
        str(tmp_path / "o.jsonl"),
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"{f}:2: no assistant turn" in p.stderr
    p = run_cli("data", "preview", f"model.path={tokenizer_dirs['qwen3']}", "data.train_file=x")
    assert p.returncode == 2 and "Did you mean 'data.train_files'" in p.stderr


def test_hub_dataset_id_uses_datasets_when_installed(monkeypatch, tokenizers):
    import types

    calls = {}

    def load_dataset(name, split):
        calls["args"] = (name, split)
        return [GOOD, GOOD]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ds = build_dataset(cfg(cache_dir="none"), tokenizers["qwen3"], "someorg/chat-data:validation")
    assert calls["args"] == ("someorg/chat-data", "validation") and len(ds) == 2
    assert ds[1].source == "someorg/chat-data:validation row 1"


def test_hub_dataset_without_datasets_package_is_a_clear_error(monkeypatch, tokenizers):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'sftforge\[hub\]'"):
        build_dataset(cfg(cache_dir="none"), tokenizers["qwen3"], "someorg/chat-data")


def test_format_override_and_custom_keys(tmp_path, tokenizers):
    row = {"dialog": GOOD["messages"], "functions": None, "prompt": "ignored", "response": "ignored"}
    f = write_jsonl(tmp_path / "d.jsonl", [row])
    ds = build_dataset(
        cfg(format="messages", messages_key="dialog", tools_key="functions"), tokenizers["qwen3"], str(f)
    )
    tok = tokenizers["qwen3"]
    assert "Say hi." in tok.decode(ds[0].input_ids)
    ds2 = build_dataset(cfg(format="prompt_response"), tok, str(f))
    assert "ignored" in tok.decode(ds2[0].input_ids)
