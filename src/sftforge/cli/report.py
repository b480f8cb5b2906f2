"""``sftforge report``: one self-contained HTML page of one or more runs (sftforge.report)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="trainer.output_dir of one or more runs")
    parser.add_argument(
        "--output",
        "-o",
        default=None,
        help="the .html to write (default: RUN_DIR/report.html for one run, ./report.html for several); the curves' "
        "PNGs go next to it",
    )


def main(args: argparse.Namespace) -> int:
    from sftforge.report import report_main  # matplotlib: imported when a report is written, not for --help

    return report_main(args.runs, args.output)
