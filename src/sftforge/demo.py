"""The built-in CPU demo: `sftforge train` with no config.

A from-scratch tiny Qwen3-shaped model learns a synthetic multi-turn calculator task in a few minutes on a CPU:

    user: add 3 4          assistant: 7
    user: times 2          assistant: 14
    user: minus 5          assistant: 9

Every answer depends on the previous one, so the model must read the conversation, not only the last message.
Everything the run needs is generated into the output folder: a character-level tokenizer with a ChatML template,
a config.json (random init), and train/val/test conversations. Exact-match of every assistant answer on held-out
conversations is measured with greedy generation that stops at the template's end-of-turn token, before and after
training.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from sftforge.config import DataConfig, load_config
from sftforge.data import load_tokenizer, read_rows
from sftforge.evaluation import evaluate_samples, samples_from_rows
from sftforge.generation import GenerationOptions, hf_generator
from sftforge.model import load_model
from sftforge.progress import quiet_libraries
from sftforge.sft import train

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(folder: Path, extra_specials: tuple[str, ...] = (), template: str = CHATML):
    """A character-level tokenizer (letters, digits, punctuation, space, newline) with a ChatML template (or
    ``template``); ``extra_specials``: more special tokens (a vision model's placeholders)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {t: i for i, t in enumerate(SPECIALS + list(extra_specials) + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:] + list(extra_specials),
    )
    tok.chat_template = template
    tok.save_pretrained(str(folder))
    return tok


def make_model_config(folder: Path, vocab_size: int) -> None:
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "initializer_range": 0.02,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def conversation(rng: random.Random, turns: int = 3) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    value = a + b
    messages = [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": str(value)}]
    for _ in range(turns - 1):
        if rng.random() < 0.5:
            value *= 2
            op = "times 2"
        else:
            k = rng.randint(1, min(value, 9)) if value > 0 else 0
            value -= k
            op = f"minus {k}"
        messages += [{"role": "user", "content": op}, {"role": "assistant", "content": str(value)}]
    return {"messages": messages}


def write_conversations(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng, turns=rng.randint(1, 3))) + "\n")
    return path


def prepare(root: Path) -> dict[str, Path]:
    """Write the demo's model folder (tokenizer + config.json) and data files under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "demo_model"
    model_dir.mkdir(exist_ok=True)
    tok = make_tokenizer(model_dir)
    make_model_config(model_dir, len(tok))
    return {
        "model": model_dir,
        "train": write_conversations(root / "train.jsonl", 2000, seed=1),
        "val": write_conversations(root / "val.jsonl", 100, seed=2),
        "test": write_conversations(root / "test.jsonl", 100, seed=3),
    }


def demo_overrides(paths: dict[str, Path], output_dir: Path) -> list[str]:
    """The demo's settings as ordinary key=value overrides (the user's own overrides are applied after these)."""
    return [
        f"model.path={paths['model']}",
        f"data.train_files={paths['train']}",
        f"data.val_files={paths['val']}",
        "data.max_length=256",
        "data.train_batch_size=32",
        "data.micro_batch_size_per_gpu=32",
        "optim.lr=3e-3",
        "optim.weight_decay=0.0",
        "optim.warmup_steps=20",
        "optim.lr_scheduler=cosine",
        "optim.min_lr_ratio=0.1",
        "trainer.max_steps=800",
        "trainer.test_freq=200",
        "trainer.log_freq=100",
        f"trainer.output_dir={output_dir}",
    ]


def exact_match(model, tokenizer, path: Path, limit: int = 100, max_new_tokens: int = 8) -> tuple[float, list[str]]:
    """Share of assistant answers reproduced exactly by greedy generation, given the gold conversation so far
    (sftforge.evaluation with task exact on every assistant turn)."""
    rows = list(read_rows(str(path)))[:limit]
    samples = samples_from_rows(rows, DataConfig(), turns="all")
    gen = hf_generator(model, tokenizer, GenerationOptions(max_new_tokens=max_new_tokens, batch_size=64))
    result = evaluate_samples(gen, samples, "exact")
    shown = []
    for s, r in zip(samples, result.records):
        last = len(s.messages) + 1 == len(s.row["messages"])
        if len(shown) < 3 and last:
            dialog = " | ".join(f"{x['role']}: {x['content']}" for x in s.messages if x["role"] != "system")
            ok = r["score"] == 1.0
            shown.append(f"{dialog} | assistant -> {r['generation']!r} ({'ok' if ok else 'expected ' + s.reference})")
    return result.summary["accuracy"], shown


def demo_config_overrides(user_overrides: list[str]) -> list[str]:
    """The overrides that make the demo's run (its assets written under trainer.output_dir/assets, default
    outputs/demo), then the user's own: what `sftforge train` trains and `sftforge plan` plans with no config."""
    out = next((o.split("=", 1)[1] for o in user_overrides if o.startswith("trainer.output_dir=")), "outputs/demo")
    return demo_overrides(prepare(Path(out) / "assets"), Path(out)) + list(user_overrides)


def run_demo(user_overrides: list[str]) -> int:
    """`sftforge train` with no config: prepare the assets, score the untrained model, train, score again."""
    out = next((o.split("=", 1)[1] for o in user_overrides if o.startswith("trainer.output_dir=")), "outputs/demo")
    paths = prepare(Path(out) / "assets")
    cfg = load_config(None, demo_overrides(paths, Path(out)) + user_overrides)
    tok = load_tokenizer(cfg)
    with quiet_libraries():
        untrained = load_model(cfg.model)
    before, _ = exact_match(untrained, tok, paths["test"])
    print(f"demo: exact match of assistant answers on held-out conversations before training: {before:.1%}")
    result = train(cfg, tokenizer=tok)
    if result["final_dir"]:
        from transformers import AutoModelForCausalLM

        with quiet_libraries():
            trained = AutoModelForCausalLM.from_pretrained(result["final_dir"])
        score, shown = exact_match(trained, tok, paths["test"])
        print(f"demo: exact match of assistant answers on held-out conversations after training: {score:.1%}")
        print("demo: sample generations (greedy, stopped at <|im_end|>):")
        for line in shown:
            print("  " + line)
    return 0
