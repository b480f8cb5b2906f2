"""Reading a configuration: YAML files and dotted ``key=value`` overrides into a :class:`Config` (verl's keys
translated on the way), validation (choices, ranges, cross-key rules; every problem reported at once, with a "did you
mean" for a mistyped key or choice), memory sizes (``80GB``), and the reference table of every key (``sftforge
config``, docs/config.md) read from the help text under each field.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from sftforge.config.schema import CHOICES, Config, ConfigError, coerce
from sftforge.config.verl import VERL_ALIASES, apply_verl_aliases, dotted_leaves, drops_overlong_prompts, is_unset

# Numeric keys: (lowest, highest) allowed, None = unbounded; a bound in a 1-tuple is exclusive: (0,) means > 0.
RANGES: dict[str, tuple] = {
    "model.init_seed": (0, None),
    "model.loss_chunk_size": (0, None),
    "model.lora.rank": (0, None),
    "model.lora.alpha": ((0,), None),
    "model.lora.dropout": (0, (1,)),
    "data.image_min_pixels": (0, None),
    "data.image_max_pixels": (0, None),
    "data.max_length": (1, None),
    "data.cache_wait_s": (0, None),
    "data.train_batch_size": (1, None),
    "data.micro_batch_size_per_gpu": (1, None),
    "data.max_tokens_per_micro_batch": (0, None),
    "optim.lr": (0, None),
    "optim.weight_decay": (0, None),
    "optim.eps": ((0,), None),
    "optim.warmup_ratio": (0, 1),
    "optim.warmup_steps": (0, None),
    "optim.min_lr_ratio": (0, 1),
    "optim.decay_ratio": (0, 1),
    "optim.clip_grad": (0, None),
    "trainer.total_epochs": (1, None),
    "trainer.max_steps": (0, None),
    "trainer.seed": (0, None),
    "trainer.save_freq": (0, None),
    "trainer.test_freq": (0, None),
    "trainer.eval_freq": (0, None),
    "trainer.log_freq": (1, None),
    "trainer.max_ckpt_to_keep": (0, None),
    "trainer.stop_at_step": (0, None),
    "trainer.n_gpus_per_node": (0, None),
    "trainer.nnodes": (1, None),
    "trainer.sp_size": (1, None),
    "rollout.n": (1, None),
    "rollout.prompts_per_step": (1, None),
    "rollout.temperature": ((0,), None),
    "rollout.top_p": ((0,), 1),
    "rollout.max_response_length": (1, None),
    "rollout.max_turns": (1, None),
    "rollout.val_n": (1, None),
    "rollout.val_temperature": (0, None),
    "rollout.val_top_p": ((0,), 1),
    "algorithm.clip_ratio_low": (0, (1,)),
    "algorithm.clip_ratio_high": (0, None),
    "algorithm.kl_coef": (0, None),
    "algorithm.clip_ratio_c": (0, None),
    "algorithm.mini_batches": (1, None),
    "algorithm.overlong_buffer": (0, None),
    "algorithm.overlong_penalty": (0, None),
    "sandbox.wall_time_s": ((0,), None),
    "sandbox.cpu_time_s": (1, None),
    "sandbox.memory_mb": (64, None),
    "sandbox.max_processes": (1, None),
    "sandbox.scratch_mb": (1, None),
    "sandbox.max_output_bytes": (1, None),
    "sandbox.observation_chars": (1, None),
    "sandbox.max_concurrent": (0, None),
}


def _out_of_range(key: str, value: float) -> str:
    """'' when ``value`` is within RANGES[key]; else the sentence that says what is allowed."""
    low, high = RANGES[key]
    ok_low = low is None or (value > low[0] if isinstance(low, tuple) else value >= low)
    ok_high = high is None or (value < high[0] if isinstance(high, tuple) else value <= high)
    if ok_low and ok_high:
        return ""
    parts = []
    if low is not None:
        parts.append(f"> {low[0]}" if isinstance(low, tuple) else f">= {low}")
    if high is not None:
        parts.append(f"< {high[0]}" if isinstance(high, tuple) else f"<= {high}")
    doc = field_docs(type(_section(Config(), key))).get(key.rsplit(".", 1)[-1], "")
    return f"{key} must be {' and '.join(parts)}, got {value}." + (f" ({doc})" if doc else "")


def _section(cfg: Any, key: str) -> Any:
    for part in key.split(".")[:-1]:
        cfg = getattr(cfg, part)
    return cfg


def parse_memory(text: str | float | int | None, key: str = "--gpu-memory") -> int | None:
    """'80GB', '80G', '80GiB', '24000MB', '80' (GB) -> bytes. GB and GiB both mean 2**30, as GPU tools print them."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return int(float(text) * (1 << 30))
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.I)
    if not m:
        raise ConfigError(f"{key} {text!r}: write it like 80GB, 24GiB or 40000MB.")
    unit = {"": 1 << 30, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Help text of each field: the string literal written right under it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config (model.path, ..., algorithm.overlong_penalty)."""
    out = []
    for f in dataclasses.fields(cls or Config):
        sub = typing.get_type_hints(cls or Config)[f.name]
        out += all_keys(sub, f"{prefix}{f.name}.") if dataclasses.is_dataclass(sub) else [f"{prefix}{f.name}"]
    return out


def _suggest_key(key: str) -> str:
    """The key a user most likely meant by an unknown dotted ``key``: the same name in another section first
    (data.max_response_length -> rollout.max_response_length), then a close spelling in the same section, then one
    anywhere (ours and verl's names, which are accepted too)."""
    keys = all_keys()
    *section, leaf = key.split(".")
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_name:
        return f" Did you mean '{same_name[0]}'?"
    prefix = ".".join(section) + "." if section else ""
    near = difflib.get_close_matches(leaf, [k[len(prefix) :] for k in keys if k.startswith(prefix)], n=1, cutoff=0.6)
    if near and prefix:
        return f" Did you mean '{prefix}{near[0]}'?"
    verl = [k for k in VERL_ALIASES if not k.endswith("*") and "." in k]
    near = difflib.get_close_matches(key, keys + verl, n=1, cutoff=0.6)
    return f" Did you mean '{near[0]}'?" if near else ""


def _apply(obj: Any, values: dict, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {values!r}.")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"Unknown config key '{key}'.{_suggest_key(key)} (`sftforge config` lists every key.)")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v if v is not None else {}, f"{key}.")
        else:
            setattr(obj, k, coerce(v, hints[k], key))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"Override '{item}' must look like section.key=value, e.g. optim.lr=1e-5.")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("+")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _override_tree(item: str) -> dict:
    parts, value = _parse_override(item)
    return _dotted_tree(".".join(parts), value)


def _dotted_tree(key: str, value: Any) -> dict:
    """``optim.lr``, 1e-5 -> {"optim": {"lr": 1e-5}}."""
    nested: Any = value
    for part in reversed(key.lstrip("+").split(".")):
        nested = {part: nested}
    return nested


def _merge(into: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)
    return into


def names_model(overrides: list[str]) -> bool:
    """Whether ``overrides`` set a non-empty model path under any spelling: ``model.path``, ``+model.path``,
    ``model={path: ...}`` or a verl alias of it (``model.partial_pretrain``). Prints nothing; the last one wins."""
    spellings = {"model.path"} | {k for k, (ours, _) in VERL_ALIASES.items() if ours == "model.path"}
    named = False
    for item in overrides or []:
        try:
            leaves = dotted_leaves(_override_tree(item))
        except ConfigError:
            continue
        for key, value in leaves:
            if key in spellings:
                named = not is_unset(value)
    return named


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None, **sections: dict[str, Any]
) -> Config:
    """Build a validated :class:`Config`: the YAML file at ``path`` (optional), then ``sections`` (a mapping per
    section, as in the YAML: ``model={"path": "Qwen/Qwen3-0.6B"}``), then ``overrides``: ``key=value`` strings parsed
    as on the command line (``["optim.lr=1e-5"]``) or a mapping of dotted keys to values (``{"optim.lr": 1e-5}``).
    verl's keys are accepted everywhere, as on the command line."""
    cfg = Config()
    raw: Any = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {p} does not exist.")
        if p.suffix.lower() in (".parquet", ".jsonl", ".arrow", ".csv", ".gguf", ".safetensors"):
            what = "a model" if p.suffix.lower() in (".gguf", ".safetensors") else "a data"
            key = "model.path" if what == "a model" else "data.train_files"
            raise ConfigError(
                f"{p} is {what} file, not a config (the first argument is a YAML config): give it as {key}={p}."
            )
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"Config file {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"Config file {p} holds a {type(raw).__name__}, not a mapping of sections (model:, "
                "data:, optim:, trainer:, ...)."
            )
    if isinstance(overrides, dict):
        trees = [_dotted_tree(str(k), v) for k, v in overrides.items()]
    else:
        trees = [_override_tree(item) for item in overrides or []]
    trees = [{name: copy.deepcopy(value)} for name, value in sections.items()] + trees
    ctx: dict = _merge({}, raw) if isinstance(raw, dict) else {}
    for tree in trees:
        _merge(ctx, tree)
    if path:
        _apply(cfg, apply_verl_aliases(raw, ctx=ctx), "")
    for tree in trees:
        _apply(cfg, apply_verl_aliases(tree, ctx=ctx), "")
    if drops_overlong_prompts(ctx):
        cfg.data.truncation = "drop"  # verl filters before its data.truncation applies: whatever order the keys have
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check every choice-valued and range-bounded field; report all problems at once."""
    problems = []
    for dotted, choices in CHOICES.items():  # every Literal-typed field
        value = getattr(_section(cfg, dotted), dotted.rsplit(".", 1)[-1])
        if value not in choices:
            problems.append(
                f"{dotted} must be one of {' | '.join(choices)}, got {value!r}.{_suggest(str(value), choices)}"
            )
    n_proc = str(cfg.data.num_proc)
    if n_proc != "auto" and not (n_proc.isdigit() and int(n_proc) >= 1):
        problems.append(f"data.num_proc must be auto or a number >= 1, got {cfg.data.num_proc!r}.")
    for dotted in RANGES:
        problems.append(_out_of_range(dotted, getattr(_section(cfg, dotted), dotted.rsplit(".", 1)[-1])))
    betas = cfg.optim.betas
    if not (
        len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        problems.append(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.95]; got {betas!r}.")
    try:
        parse_memory(cfg.trainer.gpu_memory, "trainer.gpu_memory")
    except ConfigError as e:
        problems.append(str(e))
    if cfg.trainer.eval_freq > 0 and not cfg.data.eval_files:
        problems.append(
            f"trainer.eval_freq={cfg.trainer.eval_freq} needs data.eval_files (or set trainer.eval_freq=0)."
        )
    if not isinstance(cfg.data.chat_template_kwargs, dict):
        problems.append("data.chat_template_kwargs must be a mapping, e.g. {enable_thinking: false}.")
    if cfg.data.reasoning_history == "per_turn":
        needs = [
            (cfg.data.packing, "data.packing=true"),
            (cfg.model.attn_implementation in ("sdpa", "eager"), "model.attn_implementation=sdpa or eager"),
            (cfg.data.train_on == "assistant", "data.train_on=assistant"),
            (cfg.trainer.sp_size <= 1, "trainer.sp_size=1"),
        ]
        missing = [what for ok, what in needs if not ok]
        if missing:
            problems.append(f"data.reasoning_history=per_turn (prefix-tree packing) needs {', '.join(missing)}.")
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("\n".join(problems))


def config_reference() -> str:
    """Markdown table of every key, its default and its help text."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        inst = cls()
        lines += _reference_rows(cls, inst, section.name)
    return "\n".join(lines)


def _reference_rows(cls: type, inst: Any, prefix: str) -> list[str]:
    docs, rows = field_docs(cls), []
    for f in dataclasses.fields(cls):
        default = getattr(inst, f.name)
        if dataclasses.is_dataclass(default):  # a nested section (model.lora): its own keys
            rows += _reference_rows(type(default), default, f"{prefix}.{f.name}")
            continue
        text = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}.{f.name}` | `{default!r}` | {text} |")
    return rows


__all__ = [
    "RANGES",
    "all_keys",
    "config_reference",
    "field_docs",
    "load_config",
    "names_model",
    "parse_memory",
    "validate",
]
