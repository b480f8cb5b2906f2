"""The tokenized store at scale: the batched, multi-process path gives exactly the samples of the row-by-row
reference; a killed writer leaves nothing readable; concurrent writers produce one good entry; a crashed run resumes
on the same store; lengths are read without the tokens; files are streamed."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftforge import data as data_mod
from sftforge.chat import RowError, template_markers
from sftforge.config import DataConfig, load_config
from sftforge.data import DataError, DataReport, Sample, build_dataset, read_rows, tokenize_row
from sftforge.store import Store, exclusive, open_store

SRC = Path(__file__).resolve().parent.parent / "src"


def reference(files, tok, c: DataConfig):
    """The row-by-row path as it was before the store: one tokenize_row per row, then the truncation policy."""
    markers = template_markers(tok, c.chat_template_kwargs)
    samples, report, skipped, problems = [], DataReport(), Counter(), []
    for f in files:
        for loc, row in read_rows(f):
            report.rows += 1
            try:
                s = tokenize_row(loc, row, tok, c, markers)
            except RowError as e:
                if c.bad_rows == "error":
                    raise DataError(f"{loc}: {e.reason}") from None
                skipped[e.reason] += 1
                if len(problems) < 20:
                    problems.append(f"{loc}: {e.reason}: {e.detail}")
                continue
            samples.append(s)
            report.system_merged += s.system_merged
            report.reasoning_dropped += s.reasoning_dropped
            if c.reasoning_history == "per_turn":
                report.contexts += s.contexts
                report.expanded_tokens += s.expanded_tokens
    report.skipped = dict(skipped)
    report.max_tokens_seen = max((len(s.input_ids) for s in samples), default=0)
    kept = []
    for s in samples:
        if len(s.input_ids) <= c.max_length:
            kept.append(s)
            continue
        report.over_length += 1
        if c.truncation == "drop":
            report.dropped_over_length += 1
            problems.append(f"{s.source}: dropped, {len(s.input_ids)} tokens > data.max_length")
            continue
        cut = slice(-c.max_length, None) if c.truncation == "left" else slice(0, c.max_length)
        t = Sample(s.input_ids[cut], s.loss_mask[cut], s.source)
        if not any(t.loss_mask[1:]):
            report.dropped_no_trained_tokens += 1
            problems.append(f"{s.source}: dropped, truncation cut away every trained token")
            continue
        report.truncated += 1
        kept.append(t)
    report.first_problems = problems
    report.samples = len(kept)
    report.tokens = sum(len(s.input_ids) for s in kept)
    report.trained_tokens = sum(sum(s.loss_mask) for s in kept)
    return kept, report


def same(ds, ref) -> None:
    samples, report = ref
    assert len(ds) == len(samples)
    for i, s in enumerate(samples):
        got = ds[i]
        assert (got.input_ids, got.loss_mask, got.source, got.parents) == (s.input_ids, s.loss_mask, s.source,
                                                                             s.parents), i  # fmt: skip
    assert ds.report == report
    assert list(ds.lengths) == [len(s.input_ids) for s in samples]
    assert list(ds.trained) == [sum(s.loss_mask) for s in samples]


def messy_file(tmp_path, textcraft_dir):
    """TextCraft rows with bad rows in between: invalid JSON, no messages, no assistant turn, blank lines, CRLF."""
    rows = (textcraft_dir / "train_tools.jsonl").read_text().splitlines()[:12]
    bad = ["{not json", json.dumps({"other": 1}), json.dumps({"messages": [{"role": "user", "content": "hi"}]})]
    lines = rows[:3] + [bad[0], ""] + rows[3:7] + [bad[1]] + rows[7:10] + [bad[2]] + rows[10:]
    path = tmp_path / "messy.jsonl"
    path.write_bytes(("\r\n".join(lines[:6]) + "\n" + "\n".join(lines[6:]) + "\n").encode())
    return path


@pytest.mark.parametrize("tok_name", ["qwen3", "qwen2.5", "phi3"])
def test_store_equals_the_row_by_row_path_on_the_fixtures(tmp_path, tokenizers, textcraft_dir, tok_name, monkeypatch):
    monkeypatch.setattr(data_mod, "_CHUNK_BYTES", 20_000)  # many chunks: order across chunks and workers
    monkeypatch.setattr(data_mod, "_CHUNK_ROWS", 7)
    tok = tokenizers[tok_name]
    shapes = ["react"] if tok_name == "phi3" else ["react", "tools"]  # Phi-3's template renders no tool calls
    for shape in shapes:
        for suffix in ("jsonl", "parquet"):
            files = [str(textcraft_dir / f"train_{shape}.{suffix}")]
            for procs in ("1", "2"):
                c = DataConfig(max_length=32768, num_proc=procs, cache_dir=str(tmp_path / f"c-{procs}"))
                same(build_dataset(c, tok, files), reference(files, tok, c))


def test_store_equals_reference_with_bad_rows_truncation_and_per_turn(tmp_path, tokenizers, textcraft_dir, monkeypatch):
    monkeypatch.setattr(data_mod, "_CHUNK_BYTES", 9_000)
    tok = tokenizers["qwen3"]
    files = [str(messy_file(tmp_path, textcraft_dir))]
    for trunc in ("left", "right", "drop"):
        for procs in ("1", "2"):
            c = DataConfig(bad_rows="skip", max_length=700, truncation=trunc, num_proc=procs, cache_dir="none")
            ds = build_dataset(c, tok, files)
            ref = reference(files, tok, c)
            same(ds, ref)
            assert ds.report.skipped and ds.report.over_length and ds.origin == "tokenized"
    # per_turn prefix trees (reasoning in every assistant turn: Qwen3 re-renders history, so the rows are trees)
    rows = [json.loads(x) for x in (textcraft_dir / "train_react.jsonl").read_text().splitlines()[:8]]
    for r in rows:
        for k, m in enumerate(r["messages"]):
            if m["role"] == "assistant":
                m["reasoning_content"] = f"step {k}: think about the recipe"
    per = tmp_path / "reasoning.jsonl"
    per.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for procs in ("1", "2"):
        c = DataConfig(reasoning_history="per_turn", max_length=32768, num_proc=procs, cache_dir=str(tmp_path / "pt"))
        ds = build_dataset(c, tok, [str(per)])
        same(ds, reference([str(per)], tok, c))
        assert all(ds[i].parents is not None for i in range(len(ds))) and ds.report.contexts > len(ds)


def test_first_bad_row_and_truncation_errors_are_the_same(tmp_path, tokenizers, textcraft_dir):
    tok = tokenizers["qwen3"]
    f = str(messy_file(tmp_path, textcraft_dir))
    with pytest.raises(DataError, match=r"messy.jsonl:4: invalid JSON: the line is not valid JSON"):
        build_dataset(DataConfig(num_proc="2", cache_dir="none"), tok, f)
    with pytest.raises(DataError, match=r"12 of 12 samples are longer than data.max_length=100 \(longest \d+ tokens\), "
                                        r"e.g. .*messy.jsonl:1 \(\d+ tokens\)"):  # fmt: skip
        build_dataset(DataConfig(bad_rows="skip", max_length=100, cache_dir="none"), tok, f)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"messages": []}).encode() + b"\n" + '{"a": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:2: the line is not valid UTF-8"):
        build_dataset(DataConfig(bad_rows="skip", cache_dir="none"), tok, str(bad))


def test_json_files_are_streamed_not_loaded(tmp_path, tokenizers, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": f"q {i} " + "x" * (i % 50)},
                          {"role": "assistant", "content": f"a {i}"}]} for i in range(3000)]  # fmt: skip
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("a .json file was read whole"))
    for name in ("list.json", "wrapped.json"):
        assert [r for _, r in read_rows(str(tmp_path / name))] == rows
    monkeypatch.undo()
    for text, msg in [("[1, 2", "not valid JSON"), ('{"a": [], "b": []}', "more than one key"),
                      ('{"a": 1}', "list of rows"), ("[] []", "extra data")]:  # fmt: skip
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(DataError, match=msg):
            list(read_rows(str(tmp_path / "bad.json")))


def _tiny_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(n)]  # fmt: skip


BUILD = """
import json, os, sys
from transformers import AutoTokenizer
from sftforge import data
from sftforge.config import DataConfig
data._CHUNK_BYTES = 400
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ds = data.build_dataset(DataConfig(cache_dir=sys.argv[3], num_proc="1"), tok, sys.argv[2])
print(json.dumps({"origin": ds.origin, "n": len(ds), "ids": [ds[i].input_ids for i in range(len(ds))]}))
"""


def _build_proc(tokenizer_dir, data, cache, fault="") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "SFTFORGE_TEST_FAULT": fault}
    return subprocess.Popen([sys.executable, "-c", BUILD, str(tokenizer_dir), str(data), str(cache)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_a_killed_writer_leaves_no_readable_half_cache(tmp_path, tokenizer_dirs):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _tiny_rows(60)))
    cache = tmp_path / "cache"
    p = _build_proc(tokenizer_dirs["qwen2.5"], data, cache, fault="store_kill=2")
    p.communicate(timeout=120)
    assert p.returncode == -9
    root = cache / "tokenized"
    partial = [x for x in root.iterdir() if ".tmp-" in x.name]
    assert partial and all(open_store(x) is None for x in root.iterdir())  # nothing readable, a private leftover
    p = _build_proc(tokenizer_dirs["qwen2.5"], data, cache)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert json.loads(out)["origin"] == "tokenized" and json.loads(out)["n"] == 60
    assert not [x for x in root.iterdir() if ".tmp-" in x.name]  # the next writer removed the leftover


def test_two_concurrent_writers_produce_one_good_cache(tmp_path, tokenizer_dirs):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _tiny_rows(400)))
    cache = tmp_path / "cache"
    procs = [_build_proc(tokenizer_dirs["qwen2.5"], data, cache) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["origin"] for r in results) in (["tokenized", "waited"], ["cache", "tokenized"])
    assert results[0]["ids"] == results[1]["ids"] and results[0]["n"] == 400
    entries = list((cache / "tokenized").iterdir())
    assert len([e for e in entries if open_store(e)]) == 1 and not [e for e in entries if ".tmp-" in e.name]


def test_waiting_for_a_writer_says_who_and_times_out(tmp_path, tokenizers):
    lock = tmp_path / "k.lock"
    with exclusive(lock, 10, "tokenizing data.train_files") as holder:
        holder.progress("1,000 rows")
        errors = []

        def other():
            try:
                with exclusive(lock, 0.5, "tokenizing data.train_files"):
                    pass
            except TimeoutError as e:
                errors.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert errors and f"process {os.getpid()}" in errors[0] and "1,000 rows" in errors[0]
    assert "data.cache_wait_s" in errors[0]
    with exclusive(lock, 0.5, "x"):  # released: free again
        pass


def test_cache_key_is_the_same_in_every_process(tmp_path, tokenizer_dirs):
    """The key must not depend on Python's per-process string hashing (set order): else every rank and every rerun
    would miss the cache."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _tiny_rows(3)))
    code = ("import sys; from transformers import AutoTokenizer; from sftforge import data, chat; "
            "from sftforge.config import DataConfig; tok = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "print(data.cache_key([sys.argv[2]], tok, DataConfig(), chat.template_markers(tok)))")  # fmt: skip
    keys = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONHASHSEED": seed}
        keys.add(subprocess.check_output([sys.executable, "-c", code, str(tokenizer_dirs["qwen3"]), str(data)],
                                         env=env, text=True).strip())  # fmt: skip
    assert len(keys) == 1


def test_plan_reads_lengths_without_touching_the_tokens(tmp_path, tokenizer_dirs, model_config_dir, monkeypatch,
                                                        textcraft_dir):  # fmt: skip
    from sftforge.plan import plan_from_config

    cfg = load_config(None, [f"model.path={model_config_dir / 'qwen3-tiny'}",
                             f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
                             f"data.train_files={textcraft_dir / 'train_react.jsonl'}", "data.max_length=32768",
                             "data.train_batch_size=4"])  # fmt: skip
    first, _ = plan_from_config(cfg)
    monkeypatch.setattr(Store, "tokens", lambda *a: pytest.fail("the plan read a sample's tokens"))
    again, lengths = plan_from_config(cfg)  # cached: the store's length and trained columns only
    assert "tokenized into the cache" in first.pop("store") and "read from the cache" in again.pop("store")
    assert again == first and len(lengths) == 40


def test_a_crashed_run_resumes_on_the_same_store(tmp_path, tokenizer_dirs, model_config_dir, textcraft_dir):
    out = tmp_path / "run"
    args = [f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
            f"data.train_files={textcraft_dir / 'train_react.jsonl'}", "data.max_length=32768",
            "data.train_batch_size=8", "trainer.max_steps=3", "trainer.save_freq=1", "trainer.device=cpu",
            f"data.cache_dir={tmp_path / 'cache'}", f"trainer.output_dir={out}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    run = [sys.executable, "-m", "sftforge", "train", *args]
    p = subprocess.run(run, env={**env, "SFTFORGE_TEST_FAULT": "signal=KILL@2.0"}, capture_output=True, text=True)
    assert p.returncode == -9 and "tokenized into the cache" in p.stderr, p.stderr[-2000:]
    p = subprocess.run(run, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"resumed from {out / 'step_1'} at step 1" in p.stderr and "read from the cache" in p.stderr
    assert "the training data differs" not in p.stderr  # same store, same fingerprint: no warning


def test_num_proc_auto_and_validation(tmp_path):
    assert data_mod.worker_count(DataConfig(num_proc="3"), []) == 3
    small = tmp_path / "s.jsonl"
    small.write_text("{}\n")
    assert data_mod.worker_count(DataConfig(), [str(small)]) == 1  # auto: a small file is not worth a pool
    from sftforge.config import ConfigError

    with pytest.raises(ConfigError, match="data.num_proc must be auto or a number"):
        load_config(None, ["data.num_proc=many"])
    assert dataclasses.asdict(load_config(None, ["data.num_proc=4"]).data)["num_proc"] == "4"


def test_progress_line_has_rate_and_eta(capsys):
    p = data_mod._Progress("data.train_files", after_s=0.0)
    p.update(5000, 400_000, 0.25)
    p.close(20000, 1_600_000)
    err = capsys.readouterr().err
    assert "rows/s" in err and "ETA" in err and "25%" in err and "tokenized data.train_files: 20,000 rows" in err


def test_dataset_rows_stay_on_disk(tmp_path, tokenizers):
    """The samples are memory maps of the store's files, not Python lists; the ids are read per index."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _tiny_rows(50)))
    ds = build_dataset(DataConfig(cache_dir=str(tmp_path / "c")), tokenizers["qwen2.5"], str(data))
    assert isinstance(ds.store.offsets, np.memmap) and isinstance(ds.lengths, np.memmap)
    assert ds[-1].source.endswith("d.jsonl:50") and ds[49].input_ids == ds[-1].input_ids
    with pytest.raises(IndexError):
        ds[50]
    pq.write_table(pa.table({"messages": [json.dumps(r["messages"]) for r in _tiny_rows(5)]}), tmp_path / "p.parquet")
    ds = build_dataset(DataConfig(cache_dir="none"), tokenizers["qwen2.5"], str(tmp_path / "p.parquet"))
    assert ds[4].source.endswith("p.parquet row 4") and "temporary store" in ds.describe()


def test_a_damaged_entry_is_not_read_but_rewritten(tmp_path, tokenizers, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _tiny_rows(30)))
    c = DataConfig(cache_dir=str(tmp_path / "c"))
    good = build_dataset(c, tokenizers["qwen2.5"], str(data))
    ids = [good[i].input_ids for i in range(len(good))]
    col = good.store.path / "input_ids.bin"
    col.write_bytes(col.read_bytes()[:-8])  # a half-copied cache
    assert open_store(good.store.path) is None
    again = build_dataset(c, tokenizers["qwen2.5"], str(data))
    assert again.origin == "tokenized" and [again[i].input_ids for i in range(len(again))] == ids
    assert "is damaged" in capsys.readouterr().err and open_store(good.store.path) is not None


def test_the_tokenizer_fingerprint_is_kept_per_object_and_follows_its_changes(tokenizers):
    """Serializing a 150k-token tokenizer is kept per object (a tiny build_dataset spent 97% of its time there), and
    the fingerprint still changes with added tokens or a new chat template, as a fresh computation says."""
    import copy

    from sftforge.data import _tokenizer_digest, tokenizer_fingerprint

    tok = copy.deepcopy(tokenizers["qwen2.5"])
    first = tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tok) == first == _tokenizer_digest(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|zq_new|>"]})
    added = tokenizer_fingerprint(tok)
    assert added != first and added == _tokenizer_digest(tok)
    tok.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(tok) not in (first, added) and tokenizer_fingerprint(tok) == _tokenizer_digest(tok)
