"""Command line: ``sftforge train|data ...``; ``python -m sftforge`` is the same (and works under torchrun)."""

from __future__ import annotations

import argparse
import sys

from sftforge.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="YAML config and dotted overrides")


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    path = None
    if args and "=" not in args[0]:
        path, args = args[0], args[1:]
    return path, args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sftforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train a model (no config: the built-in CPU demo)")
    _add_config_args(p_train)

    args = parser.parse_args(argv)
    try:
        path, overrides = _split_config(args.args)
        if args.command == "train":
            from sftforge.train import train_main

            return train_main(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
