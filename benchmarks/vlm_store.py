"""What the tokenized store keeps per image: encoded bytes (what sftforge does) vs processed pixels (float32 /
bfloat16), and what decoding + processing costs when a micro-batch is collated.

    python benchmarks/vlm_store.py [--n 200]

Images: the VLM demo's 112×112 PNG pictures (examples/vlm/vlm_demo.py) and a 448×448 / 1024×768 JPEG photo-like
picture (smooth gradients + noise), through the Qwen2.5-VL image processor settings (tests/fixtures/processors) with
max_pixels 112×112 for the demo (as the demo sets it) and the processor's own for the others.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "vlm"))

from vlm_demo import picture  # noqa: E402

from sftforge.vision import Vision  # noqa: E402


def photo(w: int, h: int, rng: np.random.Generator) -> bytes:
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def vision(max_pixels: int | None) -> Vision:
    settings = json.loads((ROOT / "tests/fixtures/processors/qwen2.5-vl/preprocessor_config.json").read_text())
    if max_pixels:
        settings["max_pixels"] = max_pixels
    return Vision(settings, "<|image_pad|>", 151655, (151655,), 2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    rng, prng = np.random.default_rng(0), random.Random(0)
    cases = []
    demo = []
    for _ in range(args.n):
        buf = io.BytesIO()
        picture(prng, "red", "circle").save(buf, "PNG")
        demo.append(buf.getvalue())
    cases.append(("demo 112×112 PNG", demo, vision(112 * 112)))
    cases.append(("448×448 JPEG", [photo(448, 448, rng) for _ in range(args.n // 4)], vision(None)))
    cases.append(("1024×768 JPEG", [photo(1024, 768, rng) for _ in range(args.n // 10)], vision(None)))
    print("| images | encoded bytes / image | image tokens | float32 pixels / image | ratio | bf16 ratio | "
          "decode + process / image |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, images, v in cases:
        grids = [v.load(b, None, "image")[1] for b in images]
        v.pixels(images[:2], grids[:2])  # warm up
        t0 = time.perf_counter()
        out = v.pixels(images, grids)
        dt = (time.perf_counter() - t0) / len(images)
        enc = sum(map(len, images)) / len(images)
        px = out["pixel_values"].numel() * 4 / len(images)
        print(f"| {name} | {enc / 1024:.1f} KiB | {v.tokens(grids[0])} | {px / 1024:.1f} KiB | {px / enc:.0f}× | "
              f"{px / 2 / enc:.0f}× | {dt * 1e3:.2f} ms |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
