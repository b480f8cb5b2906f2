"""``sftforge export``: a Hugging Face folder from a step_<N> checkpoint, a run's newest complete checkpoint, or a
.gguf model (sftforge.export)."""

from __future__ import annotations

import argparse

from sftforge.cli.args import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="a step_<N> folder, a run's output_dir (its newest complete checkpoint), or a .gguf file "
        "(dequantized to a safetensors folder)",
    )
    parser.add_argument("output_dir", nargs="?", default=None, help="folder to write (or --output)")
    parser.add_argument("--output", "-o", default=None, help="folder to write")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="a .gguf model: the dtype of the written weights (default fp32)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="LoRA run: merge the adapter into the base weights (default: write the adapter only)",
    )


def main(args: argparse.Namespace) -> int:
    output = args.output or args.output_dir
    if not output or (args.output and args.output_dir):
        raise UsageError("export: give the folder to write once, as a second argument or with --output")
    from sftforge.export import export_checkpoint, export_gguf
    from sftforge.model_files import gguf_location

    if gguf_location(args.checkpoint) is not None:
        print(f"wrote {export_gguf(args.checkpoint, output, args.dtype)}")
    else:
        print(f"wrote {export_checkpoint(args.checkpoint, output, merge=args.merge)}")
    return 0
