"""The ExplicitLM flow on CPU, end to end, from the committed files here (docs/custom-models.md):

    python examples/custom_module/run.py [--stage1-steps N] [key=value ...]    # overrides: the SFT stage (5.)

1. a Qwen3-shaped base (config.json + a character tokenizer, random init) in outputs/custom_module/base;
2. ``sftforge data convert`` of the OMCQ-style JSON files (question, options, answer) to conversations;
3. the earlier stage: the base trained on the question format with other things (omcq_stage1.json), its weights
   put into the built model and saved as a plain ``.pth`` state dict (what model.init_checkpoint reads);
4. ``sftforge eval --task mcq`` of the model before training (its export, as a folder);
5. ``sftforge train examples/custom_module/memory.yaml``: only the memory modules train;
6. ``sftforge eval --task mcq`` of ``outputs/custom_module/run/final`` on the held-out questions.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sftforge.config import load_config, redacted, to_dict
from sftforge.data import load_tokenizer
from sftforge.demo import make_model_config, make_tokenizer
from sftforge.export import export_module
from sftforge.model import build_model

HERE = Path(__file__).resolve().parent
OUT = Path("outputs/custom_module")


def sh(*cmd: str) -> str:
    print("$ sftforge " + " ".join(cmd[3:]), flush=True)
    p = subprocess.run(list(cmd), capture_output=True, text=True)
    if p.returncode:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(p.returncode)
    return p.stdout + p.stderr


def accuracy(output: str) -> str:
    line = next((ln for ln in output.splitlines() if "accuracy" in ln.lower()), "")
    return line.strip()


def main(argv: list[str]) -> int:
    steps1, overrides = 300, list(argv)
    if "--stage1-steps" in overrides:
        i = overrides.index("--stage1-steps")
        steps1 = int(overrides[i + 1])
        del overrides[i : i + 2]
    sftforge = (sys.executable, "-m", "sftforge")
    base = OUT / "base"
    base.mkdir(parents=True, exist_ok=True)
    make_model_config(base, len(make_tokenizer(base)))
    for split in ("stage1", "train", "test"):
        sh(*sftforge, "data", "convert", str(HERE / f"omcq_{split}.json"), str(OUT / f"{split}.jsonl"), "--from",
           "multiple_choice")  # fmt: skip
    config = str(HERE / "memory.yaml")
    stage1 = OUT / "stage1"
    if not (stage1 / "final").exists():
        sh(*sftforge, "train", f"model.path={base}", f"data.train_files={OUT / 'stage1.jsonl'}", "data.max_length=256",
           "data.train_batch_size=16", "data.micro_batch_size_per_gpu=16", "optim.lr=3e-3", "optim.warmup_steps=10",
           f"trainer.max_steps={steps1}", "trainer.logger=[jsonl]", f"trainer.output_dir={stage1}")  # fmt: skip
    cfg = load_config(config, ["model.init_checkpoint=", *overrides])
    model = build_model(cfg)
    # the base's weights under the built model's names (each decoder layer is wrapped: model.layers.N.layer.*)
    trained = {re.sub(r"^model\.layers\.(\d+)\.", r"model.layers.\1.layer.", k): v
               for k, v in load_file(stage1 / "final" / "model.safetensors").items()}  # fmt: skip
    missing = model.base.load_state_dict(trained, strict=False).missing_keys
    assert all(".memory." in k or k == "lm_head.weight" for k in missing), missing  # (the tied head)
    torch.save(model.state_dict(), OUT / "stage1.pth")  # the earlier stage's .pth: base + fresh memories
    export_module(model, OUT / "before", load_tokenizer(cfg), redacted(to_dict(cfg)))
    evaluate = ("eval", "--data", str(OUT / "test.jsonl"), "--task", "mcq", "--max-new-tokens", "2")
    before = sh(*sftforge, *evaluate[:1], "--model", str(OUT / "before"), *evaluate[1:])
    print(sh(*sftforge, "train", config, *overrides), end="")
    final = load_config(config, overrides).trainer.output_dir + "/final"
    after = sh(*sftforge, *evaluate[:1], "--model", final, *evaluate[1:])
    print(f"held-out multiple choice (48 things, each in a phrasing never trained for it) before training: "
          f"{accuracy(before)}")  # fmt: skip
    print(f"after training the memory modules only: {accuracy(after)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
