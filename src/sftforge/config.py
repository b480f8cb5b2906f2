"""Typed configuration: nested dataclasses, YAML + dotted ``key=value`` overrides, validation.

The string literal written under a field is its help text (read back with :func:`field_docs`), so the
README's config reference and ``--help`` come from this one file.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A problem with the user's configuration; the message says what to change."""


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank through peft (0 = off: full fine-tuning). With LoRA only the adapter weights are trained."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / rank) × B A."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (e.g. [q_proj, v_proj]); all-linear = every linear layer except the LM head."""


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face model: a local folder, a hub id, or a folder with only config.json + tokenizer files
    (random init, see model.init_seed)."""
    tokenizer_path: str = ""
    """Tokenizer folder or hub id; empty means model.path."""
    dtype: str = "fp32"
    """fp32 | bf16 (bf16 compute, fp32 master weights and optimizer state)."""
    attn_implementation: str = "sdpa"
    """sdpa | eager | flash_attention_2 (needs flash-attn installed)."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you trust the model's author."""
    init_seed: int = 0
    """Seed of the random initialization when model.path holds no weights."""
    enable_gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    compile: bool = False
    """torch.compile every decoder layer (in place, dynamic shapes; the first steps pay the compilation)."""
    compile_backend: str = "inductor"
    """torch.compile backend for model.compile (inductor needs a C/C++ compiler on CPU; aot_eager for debugging)."""
    loss_chunk_size: int = 4096
    """Supervised positions per chunk when computing the LM head + cross-entropy (0 = all at once); bounds the
    memory of the logits to chunk × vocabulary."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (model.lora.rank > 0 turns them on)."""
    trainable: list = field(default_factory=list)
    """Regex patterns over parameter names (re.search): train only the matching parameters, freeze the rest."""
    frozen: list = field(default_factory=list)
    """Regex patterns over parameter names (re.search): freeze the matching parameters (not with model.trainable)."""


@dataclass
class DataConfig:
    train_files: Any = None
    """Training data: a path, a glob, a list of paths, or a verl-style string "['a.parquet','b.parquet']"."""
    val_files: Any = None
    """Validation data, same forms as data.train_files; empty means no validation."""
    eval_files: Any = None
    """Generation-eval data scored every trainer.eval_freq steps with trainer.eval_task (same forms as
    data.train_files); the prompt is each row minus its last assistant turn, that turn is the reference."""
    format: str = "auto"
    """auto | messages | sharegpt | alpaca | prompt_response. auto detects it from each row's keys."""
    messages_key: str = "messages"
    """Column holding OpenAI-style messages (list of {role, content, tool_calls?}) or its JSON string."""
    tools_key: str = "tools"
    """Column holding the tools schema (list or JSON string) passed to the chat template."""
    prompt_key: str = "prompt"
    """Column of the prompt for the prompt_response format (a string or a list of messages)."""
    response_key: str = "response"
    """Column of the response for the prompt_response format."""
    chat_template: str = ""
    """Override the tokenizer's chat template: a path to a .jinja file or an inline Jinja string."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra variables for the chat template, e.g. {enable_thinking: false}."""
    system_into_first_user: bool = False
    """For chat templates without a system role (Gemma 1/2, ...): prepend the system text to the first user message
    (counted in the data report). Off: such rows are refused with this hint."""
    train_on: str = "assistant"
    """assistant | last_assistant | all: which tokens get loss. A message's own "train"/"loss_mask" wins."""
    max_length: int = 4096
    """Maximum tokens per sample; longer samples follow data.truncation."""
    truncation: str = "error"
    """error | left | right | drop, applied to samples longer than data.max_length, decided before training."""
    bad_rows: str = "error"
    """error: stop at the first malformed row; skip: drop it and report counts per reason."""
    num_proc: int = 1
    """Processes used to tokenize."""
    cache_dir: str = ""
    """Tokenization cache folder; empty means $SFTFORGE_CACHE or ~/.cache/sftforge; "none" disables it."""
    train_batch_size: int = 8
    """GLOBAL number of sequences per optimizer step (all micro-batches, all ranks)."""
    micro_batch_size_per_gpu: int = 1
    """Sequences per forward pass on one device."""
    packing: bool = True
    """Padding-free packing of the micro-batch's sequences into one row with per-sample attention."""
    max_tokens_per_micro_batch: int = 0
    """Upper bound on tokens in one packed micro-batch (0 = no bound)."""
    shuffle: bool = True
    """Shuffle training samples every epoch with trainer.seed."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to norms, biases or tied embeddings."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.0
    """Warmup steps as a share of total steps (ignored when optim.warmup_steps > 0)."""
    warmup_steps: int = 0
    """Warmup steps; overrides optim.warmup_ratio when > 0."""
    lr_scheduler: str = "cosine"
    """cosine | linear | constant | wsd."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a share of optim.lr."""
    decay_ratio: float = 0.1
    """wsd only: share of total steps spent in the final decay."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    implementation: str = "auto"
    """AdamW kernel: auto | fused | foreach | for_loop. auto = fused (one kernel over all parameters, same math)
    where torch supports it for the parameters' device, else foreach."""


@dataclass
class TrainerConfig:
    output_dir: str = "outputs/run"
    """Where metrics.jsonl, config.yaml, step_<N>/ checkpoints and final/ go."""
    total_epochs: int = 1
    """Passes over the training data (ignored when trainer.max_steps > 0)."""
    max_steps: int = 0
    """Total optimizer steps; overrides trainer.total_epochs when > 0."""
    seed: int = 42
    """Seed of data order and dropout."""
    save_freq: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    test_freq: int = 0
    """Validate every N steps (0 = only at the end)."""
    eval_freq: int = 0
    """Generate on data.eval_files and score with trainer.eval_task every N steps and at the end (0 = never); logs
    eval_accuracy in metrics.jsonl. Greedy, up to 256 new tokens."""
    eval_task: str = "exact"
    """Scorer of trainer.eval_freq: exact | gsm8k | mcq | tool_call | textcraft | module:function."""
    log_freq: int = 1
    """Print one summary line every N steps."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir) | never | PATH to a step_<N> folder."""
    max_ckpt_to_keep: int = 0
    """Keep only the newest N complete step_<N> checkpoints in trainer.output_dir, counting those of earlier runs
    there (0 = keep all). The newest complete checkpoint is never deleted."""
    nan_policy: str = "error"
    """error: stop before the optimizer step when the loss or gradient norm is not finite (NaN/inf), naming the step
    (the last good state is saved); skip_step: drop that step's update, count it and log it in metrics.jsonl."""
    stop_at_step: int = 0
    """End the run after this step as if interrupted (checkpoint written, schedule unchanged). Ignored by a run that
    resumes at or after this step, so rerunning the same command continues to the end."""
    logger: list = field(default_factory=lambda: ["console", "jsonl"])
    """Any of console | jsonl | tensorboard | wandb."""
    device: str = "auto"
    """auto | cpu | cuda."""
    n_gpus_per_node: int = 0
    """GPUs per node (0 = every visible GPU, 1 on CPU). World size = trainer.n_gpus_per_node × trainer.nnodes, used by
    `sftforge plan` and trainer.preset (a torchrun launch uses its own world size)."""
    nnodes: int = 1
    """Number of nodes (see trainer.n_gpus_per_node)."""
    preset: str = "none"
    """none | auto. auto picks data.micro_batch_size_per_gpu and model.enable_gradient_checkpointing to fit the GPU
    memory with the highest estimated throughput; `sftforge plan` explains the choice."""
    gpu_memory: str = ""
    """Memory per GPU for trainer.preset=auto and `sftforge plan`, e.g. 80GB; empty = the visible GPU's."""
    strategy: str = "auto"
    """auto | none | ddp | fsdp2. How several processes (torchrun) share the work: fsdp2 shards weights, gradients and
    optimizer state (FSDP2 fully_shard), ddp replicates them. auto: none for one process, fsdp2 on GPUs, ddp on CPU."""
    offload: bool = False
    """Keep FSDP2 shards of parameters, gradients and optimizer state in CPU memory (trainer.strategy=fsdp2 only)."""
    sp_size: int = 1
    """Ulysses sequence parallelism: ranks in groups of sp_size share each packed micro-batch, each holding 1/sp_size
    of its tokens (attention all-to-all over the group). Data-parallel size = world size / sp_size. Needs
    data.packing=true and heads divisible by sp_size."""


@dataclass
class RolloutConfig:
    """`sftforge rl` only: how responses are sampled from the policy."""

    n: int = 8
    """Responses per prompt (one group)."""
    prompts_per_step: int = 8
    """Prompts per RL step; the step trains on prompts_per_step × n responses."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_response_length: int = 256
    """New tokens per response (per turn in multi-turn episodes)."""
    max_turns: int = 1
    """1 = single-turn; > 1 = episodes in the environment named by algorithm.reward (e.g. textcraft)."""
    backend: str = "hf"
    """hf (transformers generate; CPU and GPU)."""


@dataclass
class AlgorithmConfig:
    """`sftforge rl` only: the GRPO / DAPO objective."""

    reward: str = "exact"
    """Scorer: exact | gsm8k | mcq | tool_call | textcraft (environment success, multi-turn) | module:function."""
    clip_ratio_low: float = 0.2
    """Lower clip of the policy ratio: 1 - clip_ratio_low."""
    clip_ratio_high: float = 0.28
    """Upper clip of the policy ratio: 1 + clip_ratio_high (DAPO's clip-higher)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to the initial (reference) model; 0 = no reference model is loaded."""
    scale_by_std: bool = True
    """Divide advantages by the group's reward standard deviation (GRPO); false = mean-centred only (Dr. GRPO)."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal (no learning signal), DAPO-style."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch (the later ones are off-policy; the clipped ratio keeps them close)."""
    overlong_buffer: int = 0
    """DAPO soft overlong penalty: the last N tokens before rollout.max_response_length ramp the reward down by up
    to algorithm.overlong_penalty (0 = off)."""
    overlong_penalty: float = 1.0
    """Largest overlong penalty subtracted from the reward."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)


CHOICES = {
    "model.dtype": ("fp32", "bf16"),
    "data.format": ("auto", "messages", "sharegpt", "alpaca", "prompt_response"),
    "data.train_on": ("assistant", "last_assistant", "all"),
    "data.truncation": ("error", "left", "right", "drop"),
    "data.bad_rows": ("error", "skip"),
    "optim.lr_scheduler": ("cosine", "linear", "constant", "wsd"),
    "optim.implementation": ("auto", "fused", "foreach", "for_loop"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.preset": ("none", "auto"),
    "trainer.nan_policy": ("error", "skip_step"),
    "trainer.strategy": ("auto", "none", "ddp", "fsdp2"),
}


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


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field's type, or explain why not."""
    if typ is Any:
        return value
    if isinstance(typ, str):  # postponed annotations
        typ = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict, "Any": Any}[typ]
        if typ is Any:
            return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
    elif typ is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    elif typ is dict:
        if isinstance(value, dict):
            return dict(value)
        if value is None:
            return {}
    name = getattr(typ, "__name__", str(typ))
    shown = REDACTED if is_secret_key(key.rsplit(".", 1)[-1]) else repr(value)
    raise ConfigError(f"{key} must be {name}, got {shown} ({type(value).__name__}).")


def _apply(obj: Any, values: dict, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {values!r}.")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"Unknown config key '{key}'.{_suggest(k, names)}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v if v is not None else {}, f"{key}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


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


# ------------------------------------------------------------------------------------------------------------------
# verl compatibility: a verl SFT user's keys are renamed to ours before the dataclasses see them (YAML and overrides
# alike), each with one info line on stderr. Keys that already mean the same here (model.enable_gradient_checkpointing,
# trainer.logger, data.micro_batch_size_per_gpu, trainer.n_gpus_per_node, ...) need no entry.


def _truthy(value: Any) -> bool:
    return _coerce(value, bool, "data.multiturn.enable")


def _multiturn(value: Any) -> list[tuple[str, Any]]:
    # verl's single-turn dataset reads data.prompt_key/data.response_key; its multi-turn one reads messages, which
    # data.format=auto already recognizes (as well as sharegpt/alpaca rows).
    return [] if _truthy(value) else [("data.format", "prompt_response")]


def _wandb_env(var: str) -> Any:
    def apply(value: Any) -> list[tuple[str, Any]]:
        import os

        os.environ.setdefault(var, str(value))  # read by wandb.init when trainer.logger has wandb
        return []

    return apply


def _rename(ours: str, convert=None):
    return lambda value: [(ours, convert(value) if convert else value)]


VERL_ALIASES: dict[str, tuple[str, Any]] = {
    "data.micro_batch_size": ("data.micro_batch_size_per_gpu", _rename("data.micro_batch_size_per_gpu")),
    "data.multiturn.enable": ("data.format=prompt_response when false, else data.format=auto", _multiturn),
    "data.multiturn.messages_key": ("data.messages_key", _rename("data.messages_key")),
    "data.multiturn.tools_key": ("data.tools_key", _rename("data.tools_key")),
    "model.partial_pretrain": ("model.path", _rename("model.path")),
    "optim.lr_warmup_steps_ratio": ("optim.warmup_ratio", _rename("optim.warmup_ratio")),
    "trainer.default_local_dir": ("trainer.output_dir", _rename("trainer.output_dir")),
    "trainer.total_training_steps": (
        "trainer.max_steps",
        _rename("trainer.max_steps", lambda v: 0 if v is None else v),
    ),
    "use_remove_padding": ("data.packing", _rename("data.packing")),
    "model.use_remove_padding": ("data.packing", _rename("data.packing")),
    "ulysses_sequence_parallel_size": ("trainer.sp_size", _rename("trainer.sp_size")),
    "trainer.project_name": ("$WANDB_PROJECT (wandb's project)", _wandb_env("WANDB_PROJECT")),
    "trainer.experiment_name": ("$WANDB_NAME (wandb's run name)", _wandb_env("WANDB_NAME")),
}


def _pop_path(d: dict, parts: list[str]) -> tuple[bool, Any]:
    node = d
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    if parts[-1] not in node:
        return False, None
    value = node.pop(parts[-1])
    for depth in range(len(parts) - 1, 0, -1):  # drop parents left empty (data.multiturn: {})
        parent = d
        for part in parts[: depth - 1]:
            parent = parent[part]
        if parent[parts[depth - 1]] == {}:
            del parent[parts[depth - 1]]
    return True, value


def _set_path(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = d
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def apply_verl_aliases(raw: dict, log=None) -> dict:
    """Rename verl's keys in a nested mapping to ours (in place, returned), one info line per key; raise
    :class:`ConfigError` for a verl setting with no equivalent yet."""
    import sys

    if not isinstance(raw, dict):
        return raw
    log = log or (lambda line: print(line, file=sys.stderr))
    for verl_key, (ours, convert) in VERL_ALIASES.items():
        found, value = _pop_path(raw, verl_key.split("."))
        if not found:
            continue
        mapped = convert(value)
        for key, new in mapped:
            _set_path(raw, key, new)
        shown = ", ".join(f"{k}={v!r}" for k, v in mapped) or ours
        log(f"info: verl key {verl_key}={value!r} -> {shown}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and ``key=value`` overrides."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {p} does not exist.")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file {p} is not valid YAML: {e}") from None
        _apply(cfg, apply_verl_aliases(raw), "")
    for item in overrides or []:
        parts, value = _parse_override(item)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        _apply(cfg, apply_verl_aliases(nested), "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check every choice-valued and range-bounded field; report all problems at once."""
    problems = []
    for dotted, choices in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            problems.append(
                f"{dotted} must be one of {' | '.join(choices)}, got {value!r}.{_suggest(str(value), choices)}"
            )
    positive = ["data.max_length", "data.train_batch_size", "data.micro_batch_size_per_gpu", "data.num_proc"]
    for dotted in positive:
        section, name = dotted.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            problems.append(f"{dotted} must be >= 1, got {getattr(getattr(cfg, section), name)}.")
    if cfg.trainer.max_ckpt_to_keep < 0:
        problems.append(f"trainer.max_ckpt_to_keep must be >= 0 (0 = keep all), got {cfg.trainer.max_ckpt_to_keep}.")
    if cfg.trainer.nnodes < 1:
        problems.append(f"trainer.nnodes must be >= 1, got {cfg.trainer.nnodes}.")
    if cfg.trainer.n_gpus_per_node < 0:
        problems.append(
            f"trainer.n_gpus_per_node must be >= 0 (0 = every visible GPU), got {cfg.trainer.n_gpus_per_node}."
        )
    if cfg.trainer.eval_freq > 0 and not cfg.data.eval_files:
        problems.append(
            f"trainer.eval_freq={cfg.trainer.eval_freq} needs data.eval_files (or set trainer.eval_freq=0)."
        )
    if cfg.trainer.eval_freq < 0:
        problems.append(f"trainer.eval_freq must be >= 0 (0 = never), got {cfg.trainer.eval_freq}.")
    if not isinstance(cfg.data.chat_template_kwargs, dict):
        problems.append("data.chat_template_kwargs must be a mapping, e.g. {enable_thinking: false}.")
    if problems:
        raise ConfigError("\n".join(problems))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------------------------
# Secrets: never printed, logged or saved.

REDACTED = "***"
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
"""Always treated as secrets; any other environment variable whose name looks secret (see is_secret_key) too."""
_SECRET_NAME = re.compile(
    r"(^|[_\-.])(token|secret|password|passwd|api[_\-]?key|access[_\-]?key|secret[_\-]?key|private[_\-]?key|"
    r"auth|credentials?)$|^(key|secret)$",
    re.IGNORECASE,
)
_NOT_SECRET = re.compile(r"^(bos|eos|pad|unk|sep|cls|mask)_token$", re.IGNORECASE)  # template kwargs, not secrets
_seen_secrets: set[str] = set()


def is_secret_key(name: str) -> bool:
    """True for names like hf_token, WANDB_API_KEY, secret, db_password; False for tokenizer_path, messages_key."""
    return bool(_SECRET_NAME.search(str(name))) and not _NOT_SECRET.match(str(name))


def _secret_values() -> list[str]:
    env = [v for k, v in os.environ.items() if (k in SECRET_ENV or is_secret_key(k)) and len(v) >= 8]
    return sorted({*env, *_seen_secrets}, key=len, reverse=True)


def scrub(text: str) -> str:
    """``text`` with every known secret value (secret-looking environment variables and config values) replaced."""
    for value in _secret_values():
        text = text.replace(value, REDACTED)
    return text


def redacted(obj: Any) -> Any:
    """A copy of a config dict (nested dicts/lists) safe to print, log or save: values under secret-looking keys
    become ``***`` and known secret values inside any string are replaced. Use it for everything that shows a config.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if is_secret_key(k) and v not in (None, "", [], {}):
                if isinstance(v, str) and len(v) >= 6:
                    _seen_secrets.add(v)
                out[k] = REDACTED
            else:
                out[k] = redacted(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [redacted(v) for v in obj]
    if isinstance(obj, str):
        return scrub(obj)
    return obj


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
    "Config",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainerConfig",
    "VERL_ALIASES",
    "apply_verl_aliases",
    "config_reference",
    "field_docs",
    "is_secret_key",
    "load_config",
    "redacted",
    "scrub",
    "to_dict",
]
