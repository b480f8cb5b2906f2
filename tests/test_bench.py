"""`sftforge bench`: runs end to end on the tiny config (sftforge rows only, no TRL) and prints the table."""

from __future__ import annotations

import types

import pytest

from sftforge import bench
from sftforge.cli import main


def test_bench_cli_sftforge_only_prints_table(capsys, model_config_dir, textcraft_dir, tmp_path):
    out_json = tmp_path / "rows.json"
    rc = main(
        ["bench", "--no-trl", f"model.path={model_config_dir / 'qwen3-tiny'}", "--data",
         str(textcraft_dir / "train_react.jsonl"), "--batch", "2", "--steps", "1", "--json", str(out_json)]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| trainer"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(bench.COLUMNS)
    row = next(line for line in text.splitlines() if line.startswith("| sftforge | 2 |"))
    assert "0.0%" in row  # packed: no padding
    import json

    (r,) = json.loads(out_json.read_text())
    assert r["tokens_per_s"] > 0 and r["peak_mib"] > 100 and 0 < r["mfu"] < 1 and r["padding"] == 0
    assert len(r["losses"]) == 2 and all(x > 0 for x in r["losses"])  # warmup + 1 timed step, each step's mean loss


def test_bench_model_given_twice_or_missing_is_refused(capsys, model_config_dir, tmp_path):
    tiny = str(model_config_dir / "qwen3-tiny")
    assert main(["bench", "--no-trl", "--model", tiny, f"model.path={tiny}"]) == 2
    assert "give the model once" in capsys.readouterr().err
    assert main(["bench", "--no-trl", "--model", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_loss_table_puts_the_steps_side_by_side_with_the_largest_relative_difference():
    rows = [{"trainer": "sftforge", "batch": 8, "losses": [2.0, 1.5, 1.0]},
            {"trainer": "trl", "batch": 8, "losses": [2.0, 1.5003, 1.0]},
            {"trainer": "trl-best", "batch": 8, "losses": [2.2, 1.5, 1.0]}]  # fmt: skip
    text = bench.loss_table(rows)
    assert "| step | sftforge | trl | trl-best | largest rel. diff |" in text
    assert "| 1 | 2.000000 | 2.000000 | 2.200000 | 1.0e-01 |" in text
    assert "trl vs sftforge: largest relative loss difference 2.0e-04 over 3 steps" in text
    assert "trl-best vs sftforge: largest relative loss difference 1.0e-01 over 3 steps" in text
    assert bench.loss_table(rows[1:]) == ""  # nothing to compare against


def test_bench_without_trl_says_how_to_install(monkeypatch, model_config_dir, textcraft_dir):
    monkeypatch.setattr(bench, "trl_available", lambda: False)
    calls = []
    monkeypatch.setattr(bench, "run_case", lambda spec, verbose=False: calls.append(spec) or _fake_result())
    lines: list[str] = []
    rows = bench.bench(model_config_dir / "qwen3-tiny", textcraft_dir / "train_react.jsonl", [8, 16], 1,
                       print_fn=lines.append)  # fmt: skip
    assert [c["trainer"] for c in calls] == ["sftforge", "sftforge"]
    assert [r["batch"] for r in rows] == [8, 16]
    assert any("pip install 'sftforge[bench]'" in line for line in lines)


def _fake_result() -> dict:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    steps = [{"s": 1.0, "tokens": 100, "cells": 100, "lens": [60, 40]}] * 2
    return {"steps": steps, "tokenize_s": 0.1, "rows": 40, "config": cfg.to_dict(), "peak": 2**30}


def test_model_flops_formula():
    cfg = types.SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=4)  # fmt: skip
    # per layer: q 8*8 + k,v 2*8*4 + o 8*8 + mlp 3*8*16 = 64 + 64 + 64 + 384 = 576; N = 1152
    n = 1152
    assert bench.model_flops(cfg, [10, 6]) == pytest.approx(6 * n * 16 + 12 * 2 * 8 * (50 + 18))


@pytest.mark.slow
def test_bench_with_trl_has_its_default_and_its_padding_free_rows(model_config_dir, textcraft_dir):
    """Runs only where the optional trl package is installed (pip install 'sftforge[bench]'; not in CI)."""
    pytest.importorskip("trl")
    lines: list[str] = []
    rows = bench.bench(model_config_dir / "qwen3-tiny", textcraft_dir / "train_react.jsonl", [4], 1,
                       print_fn=lines.append)  # fmt: skip
    assert [r["trainer"] for r in rows] == ["sftforge", "trl", "trl-best"]
    by = {r["trainer"]: r for r in rows}
    assert by["sftforge"]["padding"] == 0 and by["trl-best"]["padding"] == 0 and by["trl"]["padding"] > 0
    assert all(r["tokens_per_s"] > 0 for r in rows)
    text = "\n".join(lines)
    assert "sftforge / TRL tokens/s" in text and "sftforge / TRL padding-free tokens/s" in text
