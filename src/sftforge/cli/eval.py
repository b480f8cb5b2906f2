"""``sftforge eval``: generate on a data file and score the answers. Its options live with the evaluation itself
(sftforge.evaluation.add_eval_arguments), which imports torch: this module imports it only when the ``eval``
parser is built or the command runs."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sftforge.evaluation import add_eval_arguments

    add_eval_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from sftforge.evaluation import eval_main

    return eval_main(args)
