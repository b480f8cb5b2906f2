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

from __future__ import annotations

import argparse
import json
import sys
import time

from sftforge.config import ConfigError, load_config, names_model, scrub


def train_main(path: str | None, overrides: list[str]) -> int:
    """``sftforge train``. With no config file and no model (under any spelling, verl's included): the CPU demo."""
    overrides = list(overrides or [])
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


def rl_main(path: str | None, overrides: list[str]) -> int:
    """``sftforge rl CONFIG [key=value ...]``; 128+N when stopped by signal N after saving (rerun to resume)."""
    from sftforge.rl_loop import rl

    result = rl(load_config(path, list(overrides or [])))
    return 128 + result["interrupted"] if result["interrupted"] else 0


def sandbox_main(file: str, overrides: list[str]) -> int:
    """``sftforge sandbox run FILE.py|-``: the code path of a rollout's tool call, for one program."""
    from sftforge.sandbox import SandboxUnavailable, run_code

    bad = [o for o in overrides if not o.startswith("sandbox.")]
    if bad:
        raise ConfigError(f"sftforge sandbox run takes sandbox.* keys only, not {', '.join(bad)}.")
    cfg = load_config(None, overrides).sandbox
    if file == "-":
        code = sys.stdin.read()
    else:
        try:
            code = open(file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"sftforge sandbox run: cannot read {file!r} ({type(e).__name__}: {e}).") from None
    try:
        result = run_code(code, cfg)
    except SandboxUnavailable as e:
        raise ConfigError(str(e)) from None
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        print(f"--- {name} ({len(text)} characters)")
        if text:
            print(text, end="" if text.endswith("\n") else "\n")
    print(f"--- {result.status()} after {result.seconds:.3f} s (sandbox.backend={cfg.backend})")
    return 3 if result.limit else (result.exit_code if result.exit_code is not None else 128 + (result.signal or 0))


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is a YAML file unless it looks like key=value."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="YAML config and dotted overrides")


def _load(args) -> tuple:
    from sftforge.data import build_dataset, load_tokenizer
    from sftforge.vision import load_vision

    path, overrides = _split_config(args.args)
    cfg = load_config(path, overrides)
    tok = load_tokenizer(cfg)
    t0 = time.perf_counter()
    ds = build_dataset(cfg.data, tok, vision=load_vision(cfg, tok))
    return cfg, tok, ds, time.perf_counter() - t0


def cmd_tokenize(args) -> int:
    cfg, tok, ds, seconds = _load(args)
    with open(args.output, "w", encoding="utf-8") as f:
        for s in ds:
            f.write(json.dumps({"input_ids": s.input_ids, "loss_mask": s.loss_mask}) + "\n")
    for line in ds.report.lines():
        print(line, file=sys.stderr)
    rate = ds.report.rows / max(seconds, 1e-9)
    print(f"wrote {len(ds)} samples to {args.output} ({seconds:.2f}s, {rate:,.0f} rows/s)", file=sys.stderr)
    return 0


def cmd_preview(args) -> int:
    from rich.console import Console
    from rich.text import Text

    from sftforge.chat import template_markers

    cfg, tok, ds, _ = _load(args)
    if not 0 <= args.index < len(ds):
        raise ConfigError(
            f"--index {args.index} is out of range: the dataset has {len(ds)} samples (0..{len(ds) - 1})."
        )
    s = ds[args.index]
    console = Console(force_terminal=args.color or None, no_color=args.no_color, highlight=False, soft_wrap=True)
    # Decode whole runs of equally-masked tokens: per-token decoding loses SentencePiece spaces.
    text = Text()
    start = 0
    for i in range(1, len(s.input_ids) + 1):
        if i == len(s.input_ids) or s.loss_mask[i] != s.loss_mask[start]:
            piece = tok.decode(s.input_ids[start:i], skip_special_tokens=False)
            piece = _collapse_image_tokens(piece, s)
            text.append(piece, style="bold black on green" if s.loss_mask[start] else "dim")
            start = i
    console.rule(f"sample {args.index} — {s.source}")
    console.print(text)
    console.rule()
    n_trained = sum(s.loss_mask)
    console.print(
        f"tokens: {len(s.input_ids)}   trained (highlighted): {n_trained} ({n_trained / len(s.input_ids):.1%})   "
        f"dataset: {len(ds)} samples"
    )
    for line in ds.report.lines():
        console.print(line)
    console.rule("what sftforge learned from the chat template")
    for line in template_markers(tok, cfg.data.chat_template_kwargs).describe():
        console.print(line, markup=False)
    return 0


def _collapse_image_tokens(piece: str, sample) -> str:
    """An image's run of placeholder tokens shown as one: <|image_pad|>×16 (1×4×4 patches)."""
    import re

    if not getattr(sample, "images", None):
        return piece
    return re.sub(r"(<\|image_pad\|>)(?:\1)+", lambda m: f"{m.group(1)}×{len(m.group(0)) // len(m.group(1))}", piece)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sftforge", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train a model (no config and no model.path: the built-in CPU demo)")
    _config_args(p_train)

    p_rl = sub.add_parser("rl", help="GRPO / DAPO with verifiable rewards on data.train_files prompts",
                          description="GRPO / DAPO from an SFT checkpoint (model.path) on the prompts of "
                          "data.train_files.", epilog="Where the keys are: rollout.* (sampling: n, prompts_per_step, "
                          "temperature, max_response_length, max_turns, ...) and algorithm.* (reward, clip_ratio_low/"
                          "high, kl_coef, dynamic_sampling, ...); model.*, data.*, optim.* and trainer.* as for sftforge "
                          "train. `sftforge config` lists every key with its default and meaning.")  # fmt: skip
    _config_args(p_rl)

    p_ref = sub.add_parser("config", help="print every config key with its default and meaning (markdown)")
    p_ref.set_defaults(reference=True)

    p_data = sub.add_parser("data", help="inspect and tokenize data without loading a model")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_tok = data_sub.add_parser("tokenize", help="write input_ids + loss_mask per sample as jsonl")
    _config_args(p_tok)
    p_tok.add_argument("--output", "-o", required=True, help="output .jsonl file")
    p_prev = data_sub.add_parser("preview", help="show a rendered sample with its trained tokens highlighted")
    _config_args(p_prev)
    p_prev.add_argument("--index", type=int, default=0, help="sample index (default 0)")
    p_prev.add_argument("--color", action="store_true", help="force colors even when not writing to a terminal")
    p_prev.add_argument("--no-color", action="store_true", help="no colors")

    p_check = data_sub.add_parser("check", help="stats and problems per file (exit code 1 on problems)")
    p_check.add_argument("files", nargs="+", metavar="FILE", help="data files; trailing key=value are config overrides")
    p_check.add_argument("--json", action="store_true", help="one JSON object per file")
    p_conv = data_sub.add_parser("convert", help="convert rows to messages jsonl/parquet (by the output's suffix)")
    p_conv.add_argument("input", help=".jsonl / .json / .parquet file")
    p_conv.add_argument("output", help=".jsonl or .parquet file")
    p_conv.add_argument(
        "--from",
        dest="source_format",
        default="auto",
        help="auto | messages | sharegpt | alpaca | prompt_response | multiple_choice | gsm8k | copy (default auto)",
    )
    p_conv.add_argument("overrides", nargs="*", metavar="key=value", help="data.* keys, e.g. data.messages_key=conv")

    p_plan = sub.add_parser("plan", help="data, batch and step arithmetic, memory per GPU and warnings; trains nothing")
    _config_args(p_plan)
    p_plan.add_argument("--json", action="store_true", help="print one JSON object")
    p_plan.add_argument("--gpu-memory", default=None, help="GPU memory to fit, e.g. 80GB (default: the visible GPU)")
    kind = p_plan.add_mutually_exclusive_group()
    kind.add_argument("--rl", action="store_true", default=None, help="plan `sftforge rl` (default: when the config "
                      "sets rollout.* or algorithm.* keys): rollout sizes, tokens per step, memory of both phases")  # fmt: skip
    kind.add_argument("--sft", dest="rl", action="store_false", help="plan `sftforge train` whatever the config sets")
    p_plan.add_argument("--measure", action="store_true", help="also run a few real steps here (in a temporary "
                        "folder, removed after) and turn the plan into measured time per step, epoch and run, and "
                        "measured peak memory")  # fmt: skip
    p_plan.add_argument("--steps", type=int, default=0, help="--measure: steps to time after 2 warm-up steps "
                        "(default: 10, fewer when the run is shorter)")  # fmt: skip

    p_report = sub.add_parser("report", help="one self-contained HTML file of runs: curves, data, plan, config, evals")
    p_report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="trainer.output_dir of one or more runs")
    p_report.add_argument("--output", "-o", default=None, help="the .html to write (default: RUN_DIR/report.html "
                          "for one run, ./report.html for several); the curves' PNGs go next to it")  # fmt: skip

    p_eval = sub.add_parser("eval", help="generate on a data file and score the answers (accuracy, 95%% interval)")
    from sftforge.evaluation import add_eval_arguments

    add_eval_arguments(p_eval)

    p_bench = sub.add_parser("bench", help="tokens/s, step time, peak memory, MFU: sftforge vs TRL SFTTrainer (CPU)")
    from sftforge.bench import add_arguments as add_bench_arguments

    add_bench_arguments(p_bench)

    p_export = sub.add_parser("export", help="write a Hugging Face folder from a step_<N> checkpoint (or a run folder, "
                              "or a .gguf model)")  # fmt: skip
    p_export.add_argument(
        "checkpoint",
        help="a step_<N> folder, a run's output_dir (its newest complete checkpoint), or a .gguf file "
        "(dequantized to a safetensors folder)",
    )
    p_export.add_argument("output_dir", nargs="?", default=None, help="folder to write (or --output)")
    p_export.add_argument("--output", "-o", default=None, help="folder to write")
    p_export.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="a .gguf model: the dtype of "
                          "the written weights (default fp32)")  # fmt: skip
    p_export.add_argument("--merge", action="store_true", help="LoRA run: merge the adapter into the base weights "
                          "(default: write the adapter only)")  # fmt: skip

    p_box = sub.add_parser("sandbox", help="run a program in the sandbox a model's tool calls run in")
    box_sub = p_box.add_subparsers(dest="sandbox_command", required=True)
    p_run = box_sub.add_parser("run", help="run FILE.py (or - for stdin) exactly as a rollout's code_interpreter "
                               "call runs; prints stdout, stderr, how it ended and the time")  # fmt: skip
    p_run.add_argument("file", help="a Python file, or - to read the program from stdin")
    p_run.add_argument("overrides", nargs="*", metavar="sandbox.key=value", help="limits, e.g. sandbox.wall_time_s=5")

    args, extra = parser.parse_known_args(argv)
    # key=value overrides written after an option (sftforge plan --json data.max_length=8192) belong to the args.
    if extra and args.command == "plan" and all("=" in e and not e.startswith("-") for e in extra):
        args.args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from sftforge.chat import TemplateError
    from sftforge.data import DataError

    try:
        if args.command == "train":
            path, overrides = _split_config(args.args)
            return train_main(path, overrides)
        if args.command == "rl":
            path, overrides = _split_config(args.args)
            return rl_main(path, overrides)
        if args.command == "config":
            from sftforge.config import config_reference

            print(config_reference())
            return 0
        if args.command == "plan":
            from sftforge.plan import plan_main

            path, overrides = _split_config(args.args)
            if path is None and not names_model(overrides):  # as `sftforge train`: no config, no model = the demo
                from sftforge.demo import demo_config_overrides

                overrides = demo_config_overrides(overrides)
            return plan_main(path, overrides, as_json=args.json, gpu_memory=args.gpu_memory, measure=args.measure,
                             steps=args.steps, rl=args.rl)  # fmt: skip
        if args.command == "report":
            from sftforge.report import report_main

            return report_main(args.runs, args.output)
        if args.command == "data" and args.data_command in ("check", "convert"):
            from sftforge import convert

            if args.data_command == "check":
                files = [f for f in args.files if "=" not in f]
                return convert.check_main(files, [f for f in args.files if "=" in f], as_json=args.json)
            return convert.convert_main(args.input, args.output, args.source_format, args.overrides)
        if args.command == "bench":
            from sftforge.bench import bench_main

            return bench_main(args)
        if args.command == "export":
            from sftforge.export import export_checkpoint, export_gguf
            from sftforge.model_files import gguf_location

            output = args.output or args.output_dir
            if not output or (args.output and args.output_dir):
                parser.error("export: give the folder to write once, as a second argument or with --output")
            if gguf_location(args.checkpoint) is not None:
                print(f"wrote {export_gguf(args.checkpoint, output, args.dtype)}")
            else:
                print(f"wrote {export_checkpoint(args.checkpoint, output, merge=args.merge)}")
            return 0
        if args.command == "sandbox":
            return sandbox_main(args.file, args.overrides)
        if args.command == "eval":
            from sftforge.evaluation import eval_main

            return eval_main(args)
        if args.command == "data":
            return {"tokenize": cmd_tokenize, "preview": cmd_preview}[args.data_command](args)
    except (ConfigError, DataError, TemplateError) as e:
        print(f"error: {scrub(str(e))}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # trainer.nan_policy=error: the message names the step, the rank and the fixes
        print(f"error: {scrub(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the training loop (inside it, the loop saves and returns 130 itself)
        print("interrupted", file=sys.stderr)
        return 128 + 2
    return 0
