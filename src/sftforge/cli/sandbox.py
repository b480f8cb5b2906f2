"""``sftforge sandbox run``: one program through the code path of a rollout's code_interpreter call
(sftforge.sandbox), to see what a model's tool call would get back."""

from __future__ import annotations

import argparse
import sys

from sftforge.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sandbox_command", required=True)
    p_run = sub.add_parser(
        "run",
        help="run FILE.py (or - for stdin) exactly as a rollout's code_interpreter call runs; prints stdout, stderr, "
        "how it ended and the time",
    )
    p_run.add_argument("file", help="a Python file, or - to read the program from stdin")
    p_run.add_argument("overrides", nargs="*", metavar="sandbox.key=value", help="limits, e.g. sandbox.wall_time_s=5")


def main(args: argparse.Namespace) -> int:
    """Exit code: the program's exit status (128+N when signal N ended it), 3 when a sandbox limit stopped it."""
    from sftforge.sandbox import SandboxUnavailable, run_code

    bad = [o for o in args.overrides if not o.startswith("sandbox.")]
    if bad:
        raise ConfigError(f"sftforge sandbox run takes sandbox.* keys only, not {', '.join(bad)}.")
    cfg = load_config(None, args.overrides).sandbox
    if args.file == "-":
        code = sys.stdin.read()
    else:
        try:
            code = open(args.file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"sftforge sandbox run: cannot read {args.file!r} ({type(e).__name__}: {e}).") from None
    try:
        result = run_code(code, cfg)
    except SandboxUnavailable as e:  # no usable backend here: a setup problem, exit code 2 like a bad config
        raise ConfigError(str(e)) from None
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        print(f"--- {name} ({len(text)} characters)")
        if text:
            print(text, end="" if text.endswith("\n") else "\n")
    print(f"--- {result.status()} after {result.seconds:.3f} s (sandbox.backend={cfg.backend})")
    return 3 if result.limit else (result.exit_code if result.exit_code is not None else 128 + (result.signal or 0))
