"""sftforge command line. ``python -m sftforge`` is the same (and works under torchrun).

sftforge train [CONFIG.yaml] [key=value ...]
    exit code 0 done | 1 non-finite loss (trainer.nan_policy=error) | 2 bad config, data or checkpoint |
    128+N stopped by signal N after saving a checkpoint (143 SIGTERM, 130 SIGINT): rerun the same command to resume
sftforge rl CONFIG.yaml [key=value ...]       GRPO/DAPO from an SFT checkpoint (rollout.*, algorithm.*)
sftforge data tokenize [CONFIG.yaml] [key=value ...] --output FILE.jsonl
sftforge data preview  [CONFIG.yaml] [key=value ...] [--index N]
sftforge eval --model DIR|HUB_ID --data FILE --task TASK [--output results.jsonl] [gen options] [key=value ...]
sftforge data check    FILE ... [key=value ...] [--json]
sftforge data convert  IN OUT [--from F] [key=value ...]
sftforge plan [CONFIG.yaml] [key=value ...] [--json] [--gpu-memory 80GB] [--measure [--steps N]] [--rl|--sft]
sftforge report RUN_DIR [RUN_DIR ...] [--output report.html]
sftforge sandbox run FILE.py|- [sandbox.key=value ...]   run one program exactly as a model's tool call runs
    prints its stdout, stderr, how it ended (exit status, or the limit that stopped it) and the time; exit code: the
    program's exit status, 3 when a sandbox limit stopped it, 2 when the sandbox cannot start here
sftforge bench [--batch 8 16] [--steps 3] [--no-trl] [--model-config DIR] [--data FILE]
"""


# What this package owns: the command line's table of subcommands below, and the one place their errors turn into
# exit codes (main). Each subcommand is a module sftforge.cli.<name> with add_arguments(parser) and
# main(args) -> int; the docstring above is the usage summary `sftforge --help` prints.

from __future__ import annotations

import argparse
import importlib
import sys

from sftforge.cli.args import UsageError
from sftforge.cli.train import train_main
from sftforge.config import ConfigError, scrub

__all__ = ["COMMANDS", "main", "train_main"]

# (name, the line `sftforge --help` shows for it), in the order --help lists them. The name is also the module,
# sftforge.cli.<name>. The help lines live here so that the top-level help needs none of the modules: a module is
# imported only when its subcommand is the one on the command line (`sftforge eval --help` imports torch, through
# sftforge.evaluation; `sftforge --help` and `sftforge plan --help` do not).
COMMANDS: list[tuple[str, str]] = [
    ("train", "train a model (no config and no model.path: the built-in CPU demo)"),
    ("rl", "GRPO / DAPO with verifiable rewards on data.train_files prompts"),
    ("config", "print every config key with its default and meaning (markdown)"),
    ("data", "inspect and tokenize data without loading a model"),
    ("plan", "data, batch and step arithmetic, memory per GPU and warnings; trains nothing"),
    ("report", "one self-contained HTML file of runs: curves, data, plan, config, evals"),
    ("eval", "generate on a data file and score the answers (accuracy, 95%% interval)"),
    ("bench", "tokens/s, step time, peak memory, MFU: sftforge vs TRL SFTTrainer (CPU)"),
    ("export", "write a Hugging Face folder from a step_<N> checkpoint (or a run folder, or a .gguf model)"),
    ("sandbox", "run a program in the sandbox a model's tool calls run in"),
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="sftforge", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # The top-level parser has no option that takes a value, so the first word that is not an option is the
    # subcommand argparse will pick: only its parser gets its arguments (and its module imported).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_line in COMMANDS:
        p = sub.add_parser(name, help=help_line)
        if name == chosen:
            _module(name).add_arguments(p)

    args, extra = parser.parse_known_args(argv)
    command = _module(args.command)
    if extra:
        # What argparse left over is an error, except where the subcommand takes key=value overrides after its
        # options (sftforge plan --json data.max_length=8192): those join its positional overrides.
        overrides = all("=" in e and not e.startswith("-") for e in extra)
        if not (overrides and getattr(command, "OVERRIDES_AFTER_OPTIONS", False)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.args += extra
    from sftforge.chat import TemplateError
    from sftforge.data import DataError

    try:
        return command.main(args)
    except UsageError as e:
        parser.error(str(e))
    except (ConfigError, DataError, TemplateError) as e:
        print(f"error: {scrub(str(e))}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # trainer.nan_policy=error: the message names the step, the rank and the fixes
        print(f"error: {scrub(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the training loop (inside it, the loop saves and returns 130 itself)
        print("interrupted", file=sys.stderr)
        return 128 + 2


def _module(name: str):
    return importlib.import_module(f"sftforge.cli.{name}")
