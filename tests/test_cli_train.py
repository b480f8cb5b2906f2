"""End to end through the CLI: a from-scratch tiny model memorizes a Q->A set, then answers and stops."""

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftforge import demo
from sftforge.chat import end_of_turn_token_ids

QA = [
    ("Capital of France?", "Paris"),
    ("Capital of Japan?", "Tokyo"),
    ("Color of the sky?", "blue"),
    ("2 + 3 =", "5"),
    ("Opposite of hot?", "cold"),
    ("First letter?", "A"),
]


def test_cli_train_memorizes_qa_and_stops(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tok = demo.make_tokenizer(model_dir)
    demo.make_model_config(model_dir, len(tok))
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=192, num_hidden_layers=2, head_dim=16)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in QA
        )
    )
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "sftforge", "train",
        f"model.path={model_dir}", f"data.train_files={data}", "data.train_batch_size=6",
        "data.micro_batch_size_per_gpu=3", "optim.lr=1e-2", "optim.weight_decay=0", "optim.warmup_steps=5",
        "trainer.max_steps=80", f"trainer.output_dir={out}", "trainer.logger=[jsonl]",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert len(steps) == 80 and steps[-1]["loss"] < 0.05 < steps[0]["loss"]
    assert records[-1]["event"] == "end"

    final = out / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    stop = end_of_turn_token_ids(tok)
    assert model.generation_config.eos_token_id in (stop, stop[0]) or set(stop) <= set(
        model.generation_config.eos_token_id
    )
    for q, a in QA:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        new = gen[0, ids.shape[1] :].tolist()
        assert new[-1] == stop[0], f"{q!r}: did not stop: {tok.decode(new)!r}"  # stops by itself at <|im_end|>
        assert tok.decode(new[:-1]) == a
