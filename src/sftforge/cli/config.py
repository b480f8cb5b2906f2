"""``sftforge config``: every config key with its default and meaning, as markdown."""

from __future__ import annotations

import argparse

from sftforge.config import config_reference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments: the reference is the whole of the schema."""


def main(args: argparse.Namespace) -> int:
    print(config_reference())
    return 0
