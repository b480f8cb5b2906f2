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
    with pytest.raises(
        DataError, match=r"rl.jsonl:2: .*no gold answer \(answer, reference, reward_model.ground_truth\)"
    ):
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


# ------------------------------------------------------------------------------------------------------------------
# verl's RL data, several samples per problem (mean@K, pass@k), per data_source

GSM8K_ROW = {  # the layout of verl's examples/data_preprocess/gsm8k.py output
    "data_source": "openai/gsm8k",
    "prompt": [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in all? "
                                           "Let's think step by step and output the final answer after \"####\"."}],
    "ability": "math",
    "reward_model": {"style": "rule", "ground_truth": "72"},
    "extra_info": {"split": "train", "index": 0, "answer": "48/2 = 24\n48+24 = 72\n#### 72", "question": "..."},
}  # fmt: skip
DAPO_ROW = {  # DAPO-Math-17k's layout (BytedTsinghua-SIA/DAPO-Math-17k)
    "data_source": "math_dapo",
    "prompt": [{"role": "user", "content": "Solve the following math problem step by step. The last line of your "
                                           "response should be of the form Answer: $Answer (without quotes) where "
                                           "$Answer is the answer to the problem.\n\nWhat is 3/4 + 1/4?\n\nRemember to "
                                           "put your answer on its own line after \"Answer:\"."}],
    "ability": "MATH",
    "reward_model": {"ground_truth": "1", "style": "rule-lighteval/MATH_v2"},
    "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"},
}  # fmt: skip


def test_pass_at_k_by_hand():
    from sftforge.evaluation import k_sample_metrics, k_values, pass_at_k

    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(30, 0, 30) == 0.0 and pass_at_k(30, 1, 30) == 1.0 and pass_at_k(30, 3, 1) == pytest.approx(0.1)
    assert k_values(30) == [1, 2, 4, 8, 16, 30] and k_values(1) == [1] and k_values(32) == [1, 2, 4, 8, 16, 32]
    m = k_sample_metrics({"a": [1, 0, 0, 0], "b": [1, 1, 0, 0]})
    assert (m["problems"], m["samples_per_problem"]) == (2, 4)
    assert m["mean@4"] == pytest.approx(0.375) and m["pass@1"] == pytest.approx(0.375)
    assert m["pass@2"] == pytest.approx((0.5 + (1 - 1 / 6)) / 2) and m["pass@4"] == 1.0
    low, high = m["mean@4_ci95"]
    assert 0.25 <= low <= 0.375 <= high <= 0.5  # over the two problems' means (0.25, 0.5)
    with pytest.raises(ValueError, match="same number of samples"):
        k_sample_metrics({"a": [1, 0], "b": [1]})


class _Scripted:
    """A generator that answers from a script (the eval's bookkeeping without a model)."""

    def __init__(self, answers):
        from sftforge.generation import GenerationStats

        self.answers, self.vision, self.backend, self.stats = list(answers), None, object(), GenerationStats()

    def prompt(self, messages, tools=None):
        return messages[-1]["content"]

    def generate(self, prompts, images=None):
        from sftforge.generation import Generation

        return [Generation(self.answers.pop(0), 5, False) for _ in prompts]


def test_verl_rl_parquet_rows_score_k_samples_per_data_source(tmp_path):
    """verl's GSM8K and DAPO-Math rows as parquet: the prompt column is the prompt, reward_model.ground_truth the
    answer, data_source the group; 3 samples each give mean@3 / pass@k as computed by hand, per source."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from rich.console import Console

    from sftforge.evaluation import evaluate_samples, file_rows, print_summary

    pq.write_table(pa.Table.from_pylist([GSM8K_ROW]), tmp_path / "gsm8k.parquet")  # two files, as verl writes them
    half = {**DAPO_ROW, "reward_model": {"ground_truth": "\\frac{1}{2}", "style": "rule-lighteval/MATH_v2"}}
    pq.write_table(pa.Table.from_pylist([DAPO_ROW, half]), tmp_path / "dapo-math-17k.parquet")
    files = [str(tmp_path / "gsm8k.parquet"), str(tmp_path / "dapo-math-17k.parquet")]
    samples = samples_from_rows(file_rows(files, "--data"), DataConfig())
    assert [s.reference for s in samples] == ["72", "1", "\\frac{1}{2}"]
    assert samples[0].messages == GSM8K_ROW["prompt"] and samples[1].messages == DAPO_ROW["prompt"]
    gsm = get_scorer("gsm8k")
    assert [gsm(a, samples[0]) for a in ("24 + 48\n#### 72", "#### 71")] == [1.0, 0.0]
    script = ["#### 72", "#### 70", "#### 72",  # gsm8k: 2 of 3
              "so\nAnswer: 1", "Answer: 2", "Answer: 3",  # dapo 1: 1 of 3
              "Answer: 0.5", "Answer: 1/2", "Answer: $\\frac{1}{2}$"]  # dapo 2: 3 of 3 (equivalent forms)  # fmt: skip
    by_source = {}
    for source in ("openai/gsm8k", "math_dapo"):
        mine = [s for s in samples if s.row["data_source"] == source]
        take = 3 * len(mine)
        result = evaluate_samples(_Scripted(script[:take]), mine, "gsm8k" if "gsm8k" in source else "math", k=3)
        script = script[take:]
        by_source[source] = result.summary["by_source"][source]
        assert [r["sample"] for r in result.records] == [0, 1, 2] * len(mine)
        console = Console(record=True, width=120)
        print_summary(result.summary, console)
        shown = console.export_text()
        assert f"{source}: pass@2" in shown and "bootstrap over problems" in shown and "× 3" in shown
    assert by_source["openai/gsm8k"]["mean@3"] == pytest.approx(2 / 3)
    assert by_source["openai/gsm8k"]["pass@2"] == pytest.approx(1 - 0 / 3)  # C(1,2)=0: any 2 of 3 hold a right one
    dapo = by_source["math_dapo"]
    assert dapo["mean@3"] == pytest.approx((1 / 3 + 1) / 2) and dapo["pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert dapo["pass@2"] == pytest.approx(((1 - 1 / 3) + 1) / 2) and dapo["pass@3"] == 1.0  # 1 - C(2,2)/C(3,2)


def test_several_samples_need_sampling(tmp_path):
    from sftforge.evaluation import evaluate

    with pytest.raises(ConfigError, match="--samples 30 draws 30 answers per problem: add --do-sample"):
        evaluate(tmp_path / "model", [GSM8K_ROW], "gsm8k", samples=30)
