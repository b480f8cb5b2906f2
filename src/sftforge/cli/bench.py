"""``sftforge bench``: sftforge against TRL's SFTTrainer on this machine. The options and the run are
sftforge.bench's; this module only hands them over."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sftforge.bench import add_arguments as add_bench_arguments

    add_bench_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from sftforge.bench import bench_main

    return bench_main(args)
