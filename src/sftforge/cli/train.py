"""``sftforge train``: one SFT run from a YAML config and overrides, or the CPU demo when neither names a model."""

from __future__ import annotations

import argparse

from sftforge.cli.args import config_args, split_config
from sftforge.config import load_config, names_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_args(parser)


def main(args: argparse.Namespace) -> int:
    path, overrides = split_config(args.args)
    return train_main(path, overrides)


def train_main(path: str | None, overrides: list[str]) -> int:
    """``sftforge train``. With no config file and no model (under any spelling, verl's included): the CPU demo."""
    overrides = list(overrides or [])
    # Imported here, not at the top: `sftforge --help` stays free of torch (and a test swaps demo.run_demo).
    if path is None and not names_model(overrides):
        from sftforge.demo import run_demo

        return run_demo(overrides)
    from sftforge.sft import train

    cfg = load_config(path, overrides)
    if cfg.trainer.preset == "auto":
        from sftforge.plan import apply_preset

        cfg = apply_preset(cfg, path, overrides)
    result = train(cfg)
    return 128 + result["interrupted"] if result["interrupted"] else 0
