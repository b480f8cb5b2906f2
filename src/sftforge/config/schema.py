"""The configuration's shape: one dataclass per section (model, data, optim, trainer, rollout, algorithm, sandbox)
under :class:`Config`, each field with its type, default and help text, and :class:`ConfigError`.

The string literal written under a field is its help text (read back by ``sftforge.config.load.field_docs``), so the
config reference (docs/config.md) and ``--help`` come from this one file. A field that takes one of a fixed set of strings is
typed ``Literal[...]``: :data:`CHOICES` is derived from those types, and validation checks them from there only.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from sftforge.redact import REDACTED, is_secret_key


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
    """Hugging Face model: a local folder, a hub id, a .gguf file (or a folder holding one; needs the gguf extra),
    or a folder with only config.json + tokenizer files (random init, see model.init_seed)."""
    tokenizer_path: str = ""
    """Tokenizer folder or hub id; empty means model.path."""
    gguf_file: str = ""
    """model.path is a folder with several .gguf files: the one to load (model.path may also name the .gguf file
    itself). GGUF weights are dequantized to fp32, trained like any model, exported as safetensors."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """auto | bf16 | fp32. bf16: bf16 compute, fp32 master weights and optimizer state. auto: bf16 on a GPU that
    supports it, fp32 on the CPU. fp32 on a GPU computes matmuls in TF32."""
    attn_implementation: str = "sdpa"
    """sdpa | eager | flash_attention_2 (needs flash-attn installed)."""
    tree_attention: Literal["auto", "mask", "flex"] = "auto"
    """data.reasoning_history=per_turn with sdpa: how a prefix tree attends to its ancestors. mask: each tree under
    its own [l, l] ancestor mask (any device); flex: one flex_attention call per packed row, block-sparse, from each
    token's subtree end (CUDA only: torch's flex_attention has no backward on CPU); auto: flex on CUDA, else mask."""
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
    builder: str = ""
    """Your own model: package.module:function or path/to/file.py:function, called as function(model, cfg) with the
    model loaded from model.path (None when model.path is empty) and the resolved config; it returns the
    torch.nn.Module to train. Imported only because this key names it. See docs/custom-models.md."""
    init_checkpoint: str = ""
    """Weights loaded into the (built) model before training: a .safetensors file, or a .pt/.pth state dict read
    with torch.load(weights_only=True) (a pickle that needs code is refused)."""
    init_checkpoint_strict: bool = True
    """Missing or unexpected keys in model.init_checkpoint are an error (false: listed as a warning)."""


@dataclass
class DataConfig:
    train_files: Any = None
    """Training data: a path, a glob, a list of paths, or a verl-style string "['a.parquet','b.parquet']"."""
    val_files: Any = None
    """Validation data, same forms as data.train_files; empty means no validation. sftforge rl: prompts (verl's RL
    parquet as is) scored with algorithm.reward, see trainer.test_freq."""
    eval_files: Any = None
    """Generation-eval data scored every trainer.eval_freq steps with trainer.eval_task (same forms as
    data.train_files); the prompt is each row minus its last assistant turn, that turn is the reference."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_response"] = "auto"
    """auto | messages | sharegpt | alpaca | prompt_response. auto detects it from each row's keys."""
    messages_key: str = "messages"
    """Column holding OpenAI-style messages (list of {role, content, tool_calls?}) or its JSON string."""
    tools_key: str = "tools"
    """Column holding the tools schema (list or JSON string) passed to the chat template."""
    images_key: str = "images"
    """Column of a row's images (paths relative to the data file, bytes, base64 or data URLs), placed where its
    messages say <image> (the verl / LLaMA-Factory form). Messages may instead hold image parts ({"type": "image",
    "image": ...} or OpenAI's image_url); both are detected."""
    image_processor: str = ""
    """Image processor settings of a vision-language model: a preprocessor_config.json or its folder; empty: the
    one beside the tokenizer or the model."""
    image_min_pixels: int = 0
    """Smallest image area (pixels) after resizing; 0 = the image processor's min_pixels."""
    image_max_pixels: int = 0
    """Largest image area (pixels) after resizing (fewer image tokens, less memory); 0 = the processor's."""
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
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """assistant | last_assistant | all: which tokens get loss. A message's own "train"/"loss_mask" wins."""
    reasoning_history: Literal["template", "per_turn"] = "template"
    """template | per_turn. template: one render of the whole conversation (earlier turns as the template shows
    history: Qwen3 drops their <think>). per_turn: every trained assistant turn in its own inference context (the
    render of the conversation before it + the turn as generated), the K contexts merged into one prefix tree (shared
    prefixes once). Needs data.packing=true, sdpa or eager, data.train_on=assistant, trainer.sp_size=1."""
    max_length: int = 4096
    """Maximum tokens per sample; longer samples follow data.truncation."""
    truncation: Literal["error", "left", "right", "drop"] = "error"
    """error | left | right | drop, applied to samples longer than data.max_length, decided before training."""
    bad_rows: Literal["error", "skip"] = "error"
    """error: stop at the first malformed row; skip: drop it and report counts per reason."""
    empty_assistant_turns: Literal["error", "keep"] = "error"
    """error | keep. An assistant message with no content and no tool calls teaches the model to end its turn at
    once. error: such a row is a bad row (data.bad_rows: refused, or skipped and counted); keep: train it as it is
    (counted in the data report)."""
    num_proc: str = "auto"
    """Processes used to tokenize: a number, or auto (the usable cores; one per 4 MiB of input for small files)."""
    cache_dir: str = ""
    """Tokenization cache folder; empty means $SFTFORGE_CACHE or ~/.cache/sftforge; "none" disables it (the
    samples then go to a temporary store for this run only)."""
    cache_wait_s: int = 3600
    """Seconds to wait for another process writing the same cache entry (another rank of this job, or another job)
    before failing with a message that names it."""
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
    lr_scheduler: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """cosine | linear | constant | wsd."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a share of optim.lr."""
    decay_ratio: float = 0.1
    """wsd only: share of total steps spent in the final decay."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
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
    """Validate every N steps (0 = only at the end). sftforge rl: generate on data.val_files' prompts and score them
    with algorithm.reward (rollout.val_n answers each)."""
    val_before_train: bool = False
    """Validate once before the first step as well (verl's trainer.val_before_train): sftforge train's val_loss,
    sftforge rl's scores on data.val_files."""
    eval_freq: int = 0
    """Generate on data.eval_files and score with trainer.eval_task every N steps and at the end (0 = never); logs
    eval_accuracy in metrics.jsonl. Greedy, up to 256 new tokens."""
    eval_task: str = "exact"
    """Scorer of trainer.eval_freq: exact | gsm8k | math | mcq | tool_call | textcraft | code_math | module:function."""
    log_freq: int = 1
    """Print one summary line every N steps."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir) | never | PATH to a step_<N> folder."""
    max_ckpt_to_keep: int = 0
    """Keep only the newest N complete step_<N> checkpoints in trainer.output_dir, counting those of earlier runs
    there (0 = keep all). The newest complete checkpoint is never deleted."""
    save_hf: bool = False
    """Each step_<N>/ checkpoint also holds huggingface/: the model as final/ has it (safetensors, config, tokenizer,
    generation config; LoRA: merged, the adapter in huggingface/adapter), written and pruned with the checkpoint, so
    that model.path=OUTPUT/step_<N>/huggingface starts RL or eval from step N (verl's layout)."""
    nan_policy: Literal["error", "skip_step"] = "error"
    """error: stop before the optimizer step when the loss or gradient norm is not finite (NaN/inf), naming the step
    (the last good state is saved); skip_step: drop that step's update, count it and log it in metrics.jsonl."""
    stop_at_step: int = 0
    """End the run after this step as if interrupted (checkpoint written, schedule unchanged). Ignored by a run that
    resumes at or after this step, so rerunning the same command continues to the end."""
    logger: list = field(default_factory=lambda: ["console", "jsonl"])
    """Any of console | jsonl | tensorboard | wandb | swanlab (wandb and swanlab: optional packages). metrics.jsonl is
    written whatever this says (it is the run's record, read by sftforge report and a resume); jsonl is accepted."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto | cpu | cuda."""
    n_gpus_per_node: int = 0
    """GPUs per node (0 = every visible GPU, 1 on CPU). World size = trainer.n_gpus_per_node × trainer.nnodes, used by
    `sftforge plan` and trainer.preset (a torchrun launch uses its own world size)."""
    nnodes: int = 1
    """Number of nodes (see trainer.n_gpus_per_node)."""
    preset: Literal["none", "auto"] = "none"
    """none | auto. auto picks data.micro_batch_size_per_gpu and model.enable_gradient_checkpointing to fit the GPU
    memory with the highest estimated throughput; `sftforge plan` explains the choice."""
    gpu_memory: str = ""
    """Memory per GPU for trainer.preset=auto and `sftforge plan`, e.g. 80GB; empty = the visible GPU's."""
    strategy: Literal["auto", "none", "ddp", "fsdp2"] = "auto"
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
    """1 = single-turn; > 1 = episodes in the environment named by algorithm.reward (textcraft, code_math)."""
    backend: str = "hf"
    """hf: the model in memory, CPU and GPU: sftforge's engine (each episode's KV cache kept across turns, a prompt's
    rollout.n samples prefilled once, continuous batching; sftforge.engine) where the model allows it, else
    transformers generate. (vllm is not yet wired into `sftforge rl`.)"""
    kv_cache: bool = True
    """true: the engine keeps each episode's KV cache across turns (see rollout.backend); false: transformers generate
    re-prefills the whole conversation every turn (the path before it: for comparisons, or a model it mis-serves)."""
    val_n: int = 1
    """Answers per validation prompt (data.val_files, every trainer.test_freq steps): > 1 logs mean@K and pass@k with
    intervals, per data_source (verl's val_kwargs.n; needs rollout.val_temperature > 0)."""
    val_temperature: float = 0.0
    """Validation sampling temperature; 0 = greedy."""
    val_top_p: float = 1.0
    """Validation nucleus sampling threshold (with rollout.val_temperature > 0)."""


@dataclass
class AlgorithmConfig:
    """`sftforge rl` only: the GRPO / DAPO objective."""

    reward: str = "exact"
    """Scorer: exact | gsm8k | math (math-verify: \\boxed{}, equivalence) | mcq | tool_call | module:function; or an
    environment (multi-turn; success is the reward): textcraft | code_math (math with a sandboxed code_interpreter)."""
    clip_ratio_low: float = 0.2
    """Lower clip of the policy ratio: 1 - clip_ratio_low."""
    clip_ratio_high: float = 0.28
    """Upper clip of the policy ratio: 1 + clip_ratio_high (DAPO's clip-higher)."""
    clip_ratio_c: float = 0.0
    """Dual clip (> 1; 0 = off): a token with a negative advantage A loses at most -clip_ratio_c·A (verl's
    clip_ratio_c: 3 by default there, 10 in its DAPO scripts)."""
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
class SandboxConfig:
    """Where a model's code runs: the code_interpreter tool of `sftforge rl` / `sftforge eval`, and `sftforge sandbox
    run`. Every limit applies to one call (one program)."""

    backend: Literal["bwrap", "rlimits_only", "fusion"] = "bwrap"
    """bwrap (bubblewrap: namespaces + limits; no network, no view of your files) | rlimits_only (NO isolation: only
    the limits, a scratch folder and an empty environment; warns on every run; for machines without user namespaces)
    | fusion (a SandboxFusion server at sandbox.fusion_url, as verl's ReTool uses: its isolation is the server's)."""
    fusion_url: str = ""
    """sandbox.backend=fusion: the server's run_code endpoint, e.g. http://sandbox:8080/run_code (verl's
    ``sandbox_fusion_url``). It gets wall_time_s as run_timeout and memory_mb as memory_limit_MB; the other limits
    are the server's."""
    interpreter: str = "/usr/bin/python3"
    """The Python that runs the code, inside the sandbox (its /usr is mounted read-only: what it has installed, e.g.
    sympy or numpy, the code may import)."""
    wall_time_s: float = 10.0
    """Seconds from start to kill, children included."""
    cpu_time_s: int = 10
    """CPU seconds of the program (SIGXCPU, then SIGKILL a second later)."""
    memory_mb: int = 1024
    """Address space of each process, in MiB."""
    max_processes: int = 16
    """Processes and threads the program may run at once (bwrap only: without namespaces it cannot be counted)."""
    scratch_mb: int = 64
    """Size of the one folder the program may write, in MiB: /sandbox (its working directory, /tmp and TMPDIR), in
    memory, private to the call and gone with it."""
    max_output_bytes: int = 65536
    """stdout + stderr read; past it the program is killed (the output limit)."""
    observation_chars: int = 1024
    """Characters of output a tool observation shows the model; the cut is said in the text."""
    max_concurrent: int = 0
    """Tool calls of one rollout turn run at once; 0 = the number of CPU cores."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


def choices(cls: type | None = None, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Every ``Literal``-typed field as dotted key -> its allowed strings, in the order the dataclasses declare them
    (the order the choices are listed in an error message)."""
    cls = cls or Config
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out.update(choices(typ, f"{prefix}{f.name}."))
        elif typing.get_origin(typ) is Literal:
            out[f"{prefix}{f.name}"] = typing.get_args(typ)
    return out


CHOICES: dict[str, tuple[str, ...]] = choices()
"""Dotted key -> allowed strings of every choice-valued field, derived from the ``Literal`` annotations above."""


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field's type, or explain why not."""
    if typ is Any:
        return value
    if isinstance(typ, str):  # postponed annotations
        typ = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict, "Any": Any}[typ]
        if typ is Any:
            return value
    if typing.get_origin(typ) is Literal:
        # A choice is read as a string here; validate() checks it against the choices with every other problem, so
        # one run of the command lists them all (and a bad choice reads the same from YAML, an override or code).
        typ = str
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


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


__all__ = [
    "CHOICES",
    "AlgorithmConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "SandboxConfig",
    "TrainerConfig",
    "choices",
    "coerce",
    "to_dict",
]
