"""Generation eval: scorers on hand-written cases, prompts from the training template, a tiny model that learns a
Q->A set scores ~100% exact (untrained ~0%), batched left-padded generation = one at a time, CLI end to end, and
the in-training hook."""

import json

import pytest

from sftforge import demo
from sftforge.chat import render, row_to_conversation
from sftforge.config import ConfigError, DataConfig, load_config
from sftforge.evaluation import evaluate_samples, samples_from_rows, wilson
from sftforge.generation import GenerationOptions, hf_generator
from sftforge.scorers import (
    EvalSample,
    extract_letter,
    extract_number,
    get_scorer,
    parse_tool_calls,
    score_exact,
    score_gsm8k,
    score_mcq,
    score_tool_call,
)

QA = [
    ("Capital of France?", "Paris"),
    ("Capital of Japan?", "Tokyo"),
    ("Capital of Italy?", "Rome"),
    ("Color of the sky?", "blue"),
    ("Color of grass?", "green"),
    ("2 + 3 =", "5"),
    ("4 + 4 =", "8"),
    ("Opposite of hot?", "cold"),
    ("Opposite of up?", "down"),
    ("First letter?", "A"),
    ("Last letter?", "Z"),
    ("Sound of a cat?", "meow"),
]


def sample(reference: str = "", message: dict | None = None, tools=None) -> EvalSample:
    return EvalSample(
        "s", [{"role": "user", "content": "q"}], tools, message or {"role": "assistant", "content": reference}
    )


# ------------------------------------------------------------------------------------------------------------------
# Scorers


def test_exact_normalizes_case_space_punctuation_and_reasoning():
    assert score_exact("  Paris. ", sample("paris")) == 1.0
    assert score_exact("New   York", sample("new york")) == 1.0
    assert score_exact("<think>hmm, Rome?</think>\nParis", sample("Paris")) == 1.0
    assert score_exact("Paris, France", sample("Paris")) == 0.0
    assert score_exact("", sample("Paris")) == 0.0


def test_gsm8k_number_after_hashes_or_last_number():
    ref = sample("She has 3 + 4 = 7 apples.\n#### 7")
    assert extract_number(ref.reference) == "7"
    assert score_gsm8k("3 + 4 = 7, so #### 7", ref) == 1.0
    assert score_gsm8k("First 3, then 4, total 7", ref) == 1.0  # the last number
    assert score_gsm8k("#### 7 apples, not 8", ref) == 1.0  # the number after ####, not the last one
    assert score_gsm8k("The answer is 8", ref) == 0.0
    assert score_gsm8k("no number here", ref) == 0.0
    assert score_gsm8k("#### $1,234.50", sample("#### 1234.5")) == 1.0
    assert score_gsm8k("-3", sample("#### -3")) == 1.0
    assert extract_number("7.00") == "7" and extract_number("nothing") is None


def test_mcq_letter():
    assert extract_letter("The answer is (C).") == "C"
    assert extract_letter("Answer: b") == "B"
    assert extract_letter("B. Paris") == "B"
    assert extract_letter("(D)") == "D"
    assert extract_letter("I think it's A") == "A"
    assert score_mcq("The answer is B", sample("B")) == 1.0
    assert score_mcq("B", sample("(B) Paris")) == 1.0
    assert score_mcq("C", sample("B")) == 0.0
    assert score_mcq("I don't know", sample("B")) == 0.0


TOOLS = [
    {"type": "function", "function": {"name": "craft", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "finish", "parameters": {"type": "object"}}},
]


def call_msg(name, args):
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}],
    }


def test_tool_call_validity_and_accuracy():
    ref = sample(
        message=call_msg("craft", {"item": "stick", "times": 1, "ingredients": {"oak_planks": 2}}), tools=TOOLS
    )
    good = '<tool_call>\n{"name": "craft", "arguments": {"times": 1, "item": "stick", "ingredients": {"oak_planks": 2}}}\n</tool_call>'
    assert score_tool_call(good, ref) == {"score": 1.0, "valid": 1.0}
    wrong_args = good.replace('"times": 1', '"times": 2')
    assert score_tool_call(wrong_args, ref) == {"score": 0.0, "valid": 1.0}
    unknown = good.replace('"craft"', '"smelt"')
    assert score_tool_call(unknown, ref) == {"score": 0.0, "valid": 0.0}
    broken = '<tool_call>{"name": "craft", "arguments": {"item": </tool_call>'
    assert score_tool_call(broken, ref) == {"score": 0.0, "valid": 0.0}
    assert score_tool_call("I would craft a stick.", ref) == {"score": 0.0, "valid": 0.0}
    string_args = '<tool_call>{"name": "craft", "arguments": "{\\"item\\": \\"stick\\", \\"times\\": 1, \\"ingredients\\": {\\"oak_planks\\": 2}}"}</tool_call>'
    assert score_tool_call(string_args, ref)["score"] == 1.0
    # a reference turn without a call expects none
    text_ref = sample("All done.", tools=TOOLS)
    assert score_tool_call("All done.", text_ref) == {"score": 1.0, "valid": 1.0}
    assert score_tool_call(good, text_ref)["score"] == 0.0
    assert parse_tool_calls("no calls") == []


def my_scorer(generation, sample):
    return {"score": generation.startswith(sample.reference), "length": float(len(generation))}


def test_custom_scorer_by_dotted_path_and_errors():
    assert get_scorer("test_eval:my_scorer") is my_scorer
    assert get_scorer("test_eval.my_scorer") is my_scorer
    assert get_scorer("exact") is score_exact
    with pytest.raises(ConfigError, match="exact, gsm8k, mcq, tool_call"):
        get_scorer("bleu")
    with pytest.raises(ConfigError, match="cannot import"):
        get_scorer("no_such_module:fn")


def test_wilson_interval():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and 0.65 < lo < 0.75
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 0) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------------------------------
# Prompts = the training render


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5", "phi3"])
def test_prompt_is_the_training_render_cut_at_the_last_assistant_turn(tokenizers, textcraft_dir, name):
    from sftforge.chat import render_prompt
    from sftforge.data import read_rows

    tok = tokenizers[name]
    cfg = DataConfig()
    files = ["train_react.jsonl"] if name == "phi3" else ["train_react.jsonl", "train_tools.parquet"]
    for f in files:
        rows = list(read_rows(str(textcraft_dir / f)))[:3]
        for s, (_, row) in zip(samples_from_rows(rows, cfg), rows):
            messages, tools, _ = row_to_conversation(row, cfg)
            full = render(tok, messages, tools).text
            prompt = render_prompt(tok, s.messages, s.tools)
            assert s.reference_message == messages[-1] and s.tools == tools
            assert full.startswith(prompt), (f, prompt[-200:], full[len(prompt) - 200 : len(prompt) + 50])
    every = samples_from_rows(rows, cfg, turns="all")
    assert len(every) == sum(sum(m["role"] == "assistant" for m in row_to_conversation(r, cfg)[0]) for _, r in rows)


def test_a_prompt_only_row_is_scored_against_its_answer_column_and_one_without_is_refused():
    """RL-style rows (prompt + answer) evaluate with --task math/exact: the prompt is the whole conversation (a
    trajectory's tool output never leaks into it); without an answer column there is nothing to score against."""
    from sftforge.data import DataError

    prompt = [{"role": "system", "content": "Box it."}, {"role": "user", "content": "6 * 7?"}]
    (s,) = samples_from_rows([("rl.jsonl:1", {"id": "p", "messages": prompt, "answer": 42})], DataConfig(), "all")
    assert (s.id, s.messages, s.reference) == ("p", prompt, "42")
    assert get_scorer("math")("The product is \\boxed{42}.", s)["score"] == 1.0
    with pytest.raises(DataError, match=r"rl.jsonl:2: .*no 'answer' or 'reference' column"):
        samples_from_rows([("rl.jsonl:2", {"messages": prompt})], DataConfig())


# ------------------------------------------------------------------------------------------------------------------
# A tiny model learns Q->A


def write_qa(path):
    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in QA
        )
    )
    return path


def tiny_model_dir(root):
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = demo.make_tokenizer(model_dir)
    demo.make_model_config(model_dir, len(tok))
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=192, num_hidden_layers=2, head_dim=16)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train once (in process) with the in-training eval hook on; returns (model_dir, final_dir, data, result)."""
    from sftforge.sft import train

    root = tmp_path_factory.mktemp("qa")
    model_dir = tiny_model_dir(root)
    data = write_qa(root / "qa.jsonl")
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}", f"data.train_files={data}", f"data.eval_files={data}",
            "data.train_batch_size=12", "data.micro_batch_size_per_gpu=12", "optim.lr=1e-2", "optim.weight_decay=0",
            "optim.warmup_steps=5", "trainer.max_steps=60", "trainer.eval_freq=30", "trainer.device=cpu",
            f"trainer.output_dir={root / 'run'}", "trainer.logger=[jsonl]", "data.cache_dir=none",
        ],
    )  # fmt: skip
    result = train(cfg)
    return model_dir, result["final_dir"], data, result


def qa_samples(data):
    from sftforge.data import read_rows

    return samples_from_rows(list(read_rows(str(data))), DataConfig())


@pytest.mark.slow  # shares one ~20-60 s training run (module fixture)
def test_trained_tiny_model_scores_100_exact_and_untrained_0(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftforge.model import load_model

    model_dir, final, data, _ = trained
    tok = AutoTokenizer.from_pretrained(final)
    samples = qa_samples(data)
    untrained = load_model(load_config(None, [f"model.path={model_dir}"]).model)
    before = evaluate_samples(
        hf_generator(untrained, tok, GenerationOptions(max_new_tokens=12)), samples, "exact"
    ).summary
    model = AutoModelForCausalLM.from_pretrained(final)
    gen = hf_generator(model, tok, GenerationOptions(max_new_tokens=12, batch_size=5))
    result = evaluate_samples(gen, samples, "exact")
    after = result.summary
    assert before["accuracy"] == 0.0 and before["hit_max_new_tokens"] > 0.5
    assert after["accuracy"] == 1.0, [(r["reference"], r["generation"]) for r in result.records]
    assert after["hit_max_new_tokens"] == 0.0 and after["ci95_low"] > 0.7
    assert after["mean_generated_tokens"] == pytest.approx(sum(len(a) + 1 for _, a in QA) / len(QA))
    assert after["tokens_per_s"] > 0
    # left-padded batches give the same greedy answers as one prompt at a time
    one = evaluate_samples(
        hf_generator(model, tok, GenerationOptions(max_new_tokens=12, batch_size=1)), samples, "exact"
    )
    assert [r["generation"] for r in one.records] == [r["generation"] for r in result.records]
    assert all(r["generation"] == a for r, (_, a) in zip(result.records, QA))


@pytest.mark.slow  # shares one ~20-60 s training run (module fixture)
def test_training_logs_eval_accuracy(trained):
    from sftforge.metrics import read_metrics

    _, _, _, result = trained
    records = [r for r in read_metrics(f"{result['output_dir']}/metrics.jsonl") if "eval_accuracy" in r]
    assert [r["step"] for r in records] == [30, 60]
    assert records[-1]["eval_accuracy"] == 1.0 and records[-1]["eval_ci95_high"] == 1.0


def test_eval_freq_needs_eval_files():
    with pytest.raises(ConfigError, match="trainer.eval_freq=5 needs data.eval_files"):
        load_config(None, ["trainer.eval_freq=5"])


@pytest.mark.slow  # shares one ~20-60 s training run (module fixture)
def test_cli_eval_end_to_end(trained, tmp_path, capsys):
    from sftforge.cli import main

    _, final, data, _ = trained
    out = tmp_path / "results.jsonl"
    rc = main(["eval", "--model", final, "--data", str(data), "--task", "exact", "--output", str(out),
               "--max-new-tokens", "12", "--batch-size", "4"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    assert "accuracy" in printed and "100.0%" in printed and "95% interval" in printed and "tokens/s" in printed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(QA)
    assert set(records[0]) >= {"id", "prompt", "generation", "reference", "score", "generated_tokens", "hit_max"}
    assert records[0]["prompt"].endswith("<|im_start|>assistant\n") and records[0]["score"] == 1.0

    rc = main(["eval", "--model", final, "--data", str(data), "--task", "bleu"])
    assert rc == 2 and "is not a scorer" in capsys.readouterr().err
    rc = main(["eval", "--model", final, "--data", str(data), "--task", "exact", "--backend", "vllm"])
    assert rc == 2 and "vllm" in capsys.readouterr().err


def test_cli_eval_textcraft_env_with_untrained_model(tmp_path, textcraft_dir, capsys):
    from sftforge.cli import main

    model_dir = tiny_model_dir(tmp_path)
    out = tmp_path / "tc.jsonl"
    rc = main(["eval", "--model", str(model_dir), "--data", str(textcraft_dir / "train_react.jsonl"), "--task",
               "textcraft", "--limit", "3", "--max-turns", "2", "--max-new-tokens", "8", "--output", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0 and "success rate" in printed and "0.0%" in printed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(r["score"] == 0.0 and r["turns"] == 2 for r in records)
