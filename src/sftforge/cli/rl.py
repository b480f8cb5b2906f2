"""``sftforge rl``: GRPO / DAPO from an SFT checkpoint; its help says where the rollout and algorithm keys are."""

from __future__ import annotations

import argparse

from sftforge.cli.args import config_args, split_config
from sftforge.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "GRPO / DAPO from an SFT checkpoint (model.path) on the prompts of data.train_files."
    parser.epilog = (
        "Where the keys are: rollout.* (sampling: n, prompts_per_step, temperature, max_response_length, max_turns, "
        "...) and algorithm.* (reward, clip_ratio_low/high, kl_coef, dynamic_sampling, ...); model.*, data.*, optim.* "
        "and trainer.* as for sftforge train. `sftforge config` lists every key with its default and meaning."
    )
    config_args(parser)


def main(args: argparse.Namespace) -> int:
    """128+N when stopped by signal N after saving (rerun to resume)."""
    from sftforge.rl_loop import rl

    path, overrides = split_config(args.args)
    result = rl(load_config(path, overrides))
    return 128 + result["interrupted"] if result["interrupted"] else 0
