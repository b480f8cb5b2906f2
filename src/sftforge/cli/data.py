"""``sftforge data``: look at data without loading a model. ``tokenize`` and ``preview`` build the dataset a config
would train on; ``check`` and ``convert`` read data files on their own (sftforge.convert)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from sftforge.cli.args import config_args, split_config
from sftforge.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    p_tok = sub.add_parser("tokenize", help="write input_ids + loss_mask per sample as jsonl")
    config_args(p_tok)
    p_tok.add_argument("--output", "-o", required=True, help="output .jsonl file")

    p_prev = sub.add_parser("preview", help="show a rendered sample with its trained tokens highlighted")
    config_args(p_prev)
    p_prev.add_argument("--index", type=int, default=0, help="sample index (default 0)")
    p_prev.add_argument("--color", action="store_true", help="force colors even when not writing to a terminal")
    p_prev.add_argument("--no-color", action="store_true", help="no colors")

    p_check = sub.add_parser("check", help="stats and problems per file (exit code 1 on problems)")
    p_check.add_argument("files", nargs="+", metavar="FILE", help="data files; trailing key=value are config overrides")
    p_check.add_argument("--json", action="store_true", help="one JSON object per file")

    p_conv = sub.add_parser("convert", help="convert rows to messages jsonl/parquet (by the output's suffix)")
    p_conv.add_argument("input", help=".jsonl / .json / .parquet file")
    p_conv.add_argument("output", help=".jsonl or .parquet file")
    p_conv.add_argument(
        "--from",
        dest="source_format",
        default="auto",
        help="auto | messages | sharegpt | alpaca | prompt_response | multiple_choice | gsm8k | copy (default auto)",
    )
    p_conv.add_argument("overrides", nargs="*", metavar="key=value", help="data.* keys, e.g. data.messages_key=conv")


def main(args: argparse.Namespace) -> int:
    return {"tokenize": tokenize, "preview": preview, "check": check, "convert": convert}[args.data_command](args)


def check(args: argparse.Namespace) -> int:
    from sftforge.convert import check_main

    # One list on the command line (`FILE ... [key=value ...]`): the ones with `=` are the overrides.
    files = [f for f in args.files if "=" not in f]
    return check_main(files, [f for f in args.files if "=" in f], as_json=args.json)


def convert(args: argparse.Namespace) -> int:
    from sftforge.convert import convert_main

    return convert_main(args.input, args.output, args.source_format, args.overrides)


def tokenize(args: argparse.Namespace) -> int:
    cfg, tok, ds, seconds = _load(args)
    with open(args.output, "w", encoding="utf-8") as f:
        for s in ds:
            f.write(json.dumps({"input_ids": s.input_ids, "loss_mask": s.loss_mask}) + "\n")
    for line in ds.report.lines():
        print(line, file=sys.stderr)
    rate = ds.report.rows / max(seconds, 1e-9)
    print(f"wrote {len(ds)} samples to {args.output} ({seconds:.2f}s, {rate:,.0f} rows/s)", file=sys.stderr)
    return 0


def preview(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from sftforge.chat import template_markers

    cfg, tok, ds, _ = _load(args)
    if not 0 <= args.index < len(ds):
        raise ConfigError(
            f"--index {args.index} is out of range: the dataset has {len(ds)} samples (0..{len(ds) - 1})."
        )
    s = ds[args.index]
    console = Console(force_terminal=args.color or None, no_color=args.no_color, highlight=False, soft_wrap=True)
    # Decode whole runs of equally-masked tokens: per-token decoding loses SentencePiece spaces.
    text = Text()
    start = 0
    for i in range(1, len(s.input_ids) + 1):
        if i == len(s.input_ids) or s.loss_mask[i] != s.loss_mask[start]:
            piece = tok.decode(s.input_ids[start:i], skip_special_tokens=False)
            piece = _collapse_image_tokens(piece, s)
            text.append(piece, style="bold black on green" if s.loss_mask[start] else "dim")
            start = i
    console.rule(f"sample {args.index} — {s.source}")
    console.print(text)
    console.rule()
    n_trained = sum(s.loss_mask)
    console.print(
        f"tokens: {len(s.input_ids)}   trained (highlighted): {n_trained} ({n_trained / len(s.input_ids):.1%})   "
        f"dataset: {len(ds)} samples"
    )
    for line in ds.report.lines():
        console.print(line)
    console.rule("what sftforge learned from the chat template")
    for line in template_markers(tok, cfg.data.chat_template_kwargs).describe():
        console.print(line, markup=False)
    return 0


def _load(args: argparse.Namespace) -> tuple:
    """The config, tokenizer and dataset of ``tokenize`` / ``preview``, and the seconds the dataset took to build."""
    from sftforge.data import build_dataset, load_tokenizer
    from sftforge.vision import load_vision

    path, overrides = split_config(args.args)
    cfg = load_config(path, overrides)
    tok = load_tokenizer(cfg)
    t0 = time.perf_counter()
    ds = build_dataset(cfg.data, tok, vision=load_vision(cfg, tok))
    return cfg, tok, ds, time.perf_counter() - t0


def _collapse_image_tokens(piece: str, sample) -> str:
    """An image's run of placeholder tokens shown as one: <|image_pad|>×16 (1×4×4 patches)."""
    if not getattr(sample, "images", None):
        return piece
    return re.sub(r"(<\|image_pad\|>)(?:\1)+", lambda m: f"{m.group(1)}×{len(m.group(0)) // len(m.group(1))}", piece)
