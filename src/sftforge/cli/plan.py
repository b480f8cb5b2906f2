"""``sftforge plan``: the run's arithmetic, memory and warnings without training (sftforge.plan), optionally
measured with a few real steps (sftforge.measure)."""

from __future__ import annotations

import argparse

from sftforge.cli.args import config_args, split_config
from sftforge.config import names_model

# `sftforge plan --json data.max_length=8192`: key=value written after an option still belong to the overrides
# (argparse leaves them over once an option has ended the positional run); sftforge.cli.main adds them to args.args.
OVERRIDES_AFTER_OPTIONS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--gpu-memory", default=None, help="GPU memory to fit, e.g. 80GB (default: the visible GPU)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--rl",
        action="store_true",
        default=None,
        help="plan `sftforge rl` (default: when the config sets rollout.* or algorithm.* keys): rollout sizes, "
        "tokens per step, memory of both phases",
    )
    kind.add_argument("--sft", dest="rl", action="store_false", help="plan `sftforge train` whatever the config sets")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also run a few real steps here (in a temporary folder, removed after) and turn the plan into measured "
        "time per step, epoch and run, and measured peak memory",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="--measure: steps to time after 2 warm-up steps (default: 10, fewer when the run is shorter)",
    )


def main(args: argparse.Namespace) -> int:
    from sftforge.plan import plan_main

    path, overrides = split_config(args.args)
    if path is None and not names_model(overrides):  # as `sftforge train`: no config, no model = the demo
        from sftforge.demo import demo_config_overrides

        overrides = demo_config_overrides(overrides)
    return plan_main(
        path,
        overrides,
        as_json=args.json,
        gpu_memory=args.gpu_memory,
        measure=args.measure,
        steps=args.steps,
        rl=args.rl,
    )
