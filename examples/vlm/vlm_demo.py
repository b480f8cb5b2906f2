"""A tiny Qwen2.5-VL-shaped model, from config (random init), learns to name the colour and the shape in a picture.

    python examples/vlm/vlm_demo.py [--train N] [--test N] [key=value ...]   # e.g. trainer.output_dir=outputs/x

Everything is generated under trainer.output_dir (default outputs/vlm-demo): 112×112 PNG pictures of one shape
(circle, square, triangle) in one of six colours, at a random place and size on a noisy background; train / test
conversations that ask "What colour is the shape?" or "What shape is it?"; a character-level tokenizer with Qwen's
vision tokens and Qwen2.5-VL's chat template (chat_template.jinja here, from the Qwen2.5-VL processor files,
Apache-2.0); a 2-layer Qwen2.5-VL config and the Qwen2.5-VL image processor settings with max_pixels = 112 × 112
(64 patches, 16 image tokens per picture). Half the rows use image parts in the messages, half the verl /
LLaMA-Factory form (an ``images`` column and ``<image>`` in the text). Exact match of the answer on 200 held-out
pictures is measured with greedy generation before and after training (sftforge.evaluation, task exact).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from sftforge.config import load_config
from sftforge.data import load_tokenizer
from sftforge.demo import make_tokenizer
from sftforge.evaluation import evaluate_samples, file_rows, samples_from_rows
from sftforge.generation import GenerationOptions, hf_generator
from sftforge.model import load_model
from sftforge.sft import train
from sftforge.vision import load_vision

HERE = Path(__file__).resolve().parent
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40),
           "purple": (150, 60, 200), "orange": (245, 140, 30)}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
SIZE = 112


def picture(rng: random.Random, colour: str, shape: str) -> Image.Image:
    bg = tuple(rng.randint(0, 60) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    px = img.load()
    for _ in range(150):  # speckle noise
        px[rng.randrange(SIZE), rng.randrange(SIZE)] = tuple(rng.randint(0, 90) for _ in range(3))
    r = rng.randint(32, 44)
    cx, cy = rng.randint(r + 2, SIZE - r - 3), rng.randint(r + 2, SIZE - r - 3)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def write_split(root: Path, name: str, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            rel = f"{name}/{i}.png"
            picture(rng, colour, shape).save(root / rel)
            question, answer = (
                ("What colour is the shape?", colour) if rng.random() < 0.5 else ("What shape is it?", shape)
            )
            if i % 2:  # image parts in the message
                user = {
                    "role": "user",
                    "content": [{"type": "image", "image": rel}, {"type": "text", "text": question}],
                }
                row = {"messages": [user, {"role": "assistant", "content": answer}]}
            else:  # the verl / LLaMA-Factory form
                row = {"messages": [{"role": "user", "content": f"<image>{question}"},
                                    {"role": "assistant", "content": answer}], "images": [rel]}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


def make_model(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, VISION_SPECIALS, (HERE / "chat_template.jinja").read_text())
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_SPECIALS}
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "text_config": {"model_type": "qwen2_5_vl_text", "vocab_size": len(tok), "hidden_size": 128,
                        "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0},
        "vision_config": {"depth": 3, "hidden_size": 128, "intermediate_size": 256, "num_heads": 4,
                          "out_hidden_size": 128, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [2]},
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    settings = json.loads((HERE / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))


def exact_match(model, tok, vision, path: Path) -> tuple[float, list[str]]:
    samples = samples_from_rows(file_rows(str(path), "test"), load_config(None, []).data)
    gen = hf_generator(model, tok, GenerationOptions(max_new_tokens=12, batch_size=50), vision=vision)
    res = evaluate_samples(gen, samples, "exact")
    shown = [f"{Path(s.row.get('images', [None])[0] or s.messages[0]['parts'][0]['image']).name}: "
             f"{s.messages[0]['content'].replace('<image>', '')} -> {r['generation']!r} (expected {s.reference})"
             for s, r in list(zip(samples, res.records))[:4]]  # fmt: skip
    return res.summary["accuracy"], shown


def main(argv: list[str]) -> int:
    counts, overrides = {"--train": 10000, "--test": 200}, []
    it = iter(argv)
    for a in it:
        if a in counts:
            counts[a] = int(next(it))
        else:
            overrides.append(a)
    out = Path(next((o.split("=", 1)[1] for o in overrides if o.startswith("trainer.output_dir=")), "outputs/vlm-demo"))
    assets = out / "assets"
    make_model(assets / "model")
    train_file = write_split(assets, "train", counts["--train"], seed=1)
    test_file = write_split(assets, "test", counts["--test"], seed=2)
    cfg = load_config(None, [
        f"model.path={assets / 'model'}", f"data.train_files={train_file}", "data.max_length=128",
        "data.train_batch_size=32", "data.micro_batch_size_per_gpu=32", "optim.lr=2e-3", "optim.weight_decay=0.0",
        "optim.warmup_steps=20", "optim.lr_scheduler=cosine", "optim.min_lr_ratio=0.1", "trainer.max_steps=1000",
        "trainer.log_freq=100", f"trainer.output_dir={out}", *overrides,
    ])  # fmt: skip
    tok = load_tokenizer(cfg)
    vision = load_vision(cfg, tok)
    before, _ = exact_match(load_model(cfg.model), tok, vision, test_file)
    print(f"vlm demo: exact match on {counts['--test']} held-out pictures ({test_file}) before training: {before:.1%}")
    result = train(cfg, tokenizer=tok)
    if result["final_dir"]:
        from transformers import AutoModelForImageTextToText

        trained = AutoModelForImageTextToText.from_pretrained(result["final_dir"])
        after, shown = exact_match(trained, tok, vision, test_file)
        print(f"vlm demo: exact match on the same pictures after training: {after:.1%}")
        for line in shown:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
