"""What several subcommands share: the ``[CONFIG.yaml] [key=value ...]`` positional and how it splits, and the
error a subcommand raises for a command line argparse accepted but the subcommand cannot use."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A wrong command line found after parsing (``sftforge export`` given its folder twice): ``sftforge.cli.main``
    turns it into argparse's usage error, exit code 2, as if argparse had found it."""


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="YAML config and dotted overrides")


def split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is a YAML file unless it looks like key=value."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args
