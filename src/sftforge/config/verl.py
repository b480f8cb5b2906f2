"""verl compatibility: the keys of verl's SFT trainers and of its RL scripts (main_ppo, main_dapo), translated to
sftforge's before the dataclasses see them. Owns :data:`VERL_ALIASES` (every verl key: what it becomes and its
converter), :func:`apply_verl_aliases` (the translation, one info line per key) and :func:`verl_rl_table` (the
table of the RL keys in docs/verl.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from sftforge.config.schema import ConfigError, RolloutConfig, coerce
from sftforge.progress import say

# The keys of verl's SFT trainers (verl.trainer.fsdp_sft_trainer with sft_trainer.yaml, and
# verl.trainer.sft_trainer with sft_trainer_engine.yaml and its engine/model/optim groups) are handled before the
# dataclasses see them, in YAML and overrides alike. Each verl key is mapped to ours (one "info: verl key K=V -> ..."
# line on stderr), accepted and ignored when it changes nothing that matters here (one "info: verl key K=V ignored:
# why" line), or refused with a ConfigError that says what to set instead. Keys that already mean the same here
# (model.path, model.enable_gradient_checkpointing, data.micro_batch_size_per_gpu, trainer.n_gpus_per_node, ...) need
# no entry; an entry for such a key only translates verl-only values (trainer.save_freq=-1) and is silent otherwise.
#
# A converter is called as convert(value, ctx): ctx is the whole configuration as given (the YAML file and every
# override, before any renaming), for the few verl keys whose meaning depends on another one (the token budget on
# the sequence-parallel size, resume_mode on resume_from_path). It returns a list of (our key, value) pairs, a string
# (the key is ignored, for that reason), or (pairs, note); it raises _Refused to refuse the key.


class _Refused(ConfigError):
    """Raised by a converter; apply_verl_aliases adds the key and its value to the message."""


_MISSING = object()


def _lookup(ctx: Any, dotted: str, default: Any = _MISSING) -> Any:
    node = ctx
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _given(ctx: Any, dotted: str) -> bool:
    return _lookup(ctx, dotted) is not _MISSING


def _truthy(value: Any, key: str = "data.multiturn.enable") -> bool:
    return coerce(value, bool, key)


def is_unset(value: Any) -> bool:
    """verl's ways of leaving a key empty: null (None or the string), "", [] and {}."""
    return value is None or value in ("", [], {}) or (isinstance(value, str) and value.lower() in ("null", "none"))


def _multiturn(value: Any, ctx: Any) -> list[tuple[str, Any]]:
    # verl's single-turn dataset reads data.prompt_key/data.response_key; its multi-turn one reads messages, which
    # data.format=auto already recognizes (as well as sharegpt/alpaca rows).
    if not _truthy(value):
        return [("data.format", "prompt_response")]
    if _given(ctx, "data.format"):
        return "data.format decides how rows are read"
    return [("data.format", "auto")], "messages rows, recognized by data.messages_key"


def _wandb_env(var: str):
    def apply(value: Any, ctx: Any) -> list[tuple[str, Any]]:
        os.environ.setdefault(var, str(value))  # read by wandb.init when trainer.logger has wandb
        return []

    return apply


def _rename(ours: str, convert=None):
    return lambda value, ctx: [(ours, convert(value) if convert else value)]


def _ignore(why: str):
    return lambda value, ctx: why


def _ignore_unless(is_default, why: str, refusal: str):
    """Ignored (with ``why``) when ``is_default(value)``, else refused with ``refusal``."""

    def apply(value: Any, ctx: Any):
        if is_default(value):
            return why
        raise _Refused(refusal)

    return apply


def _refuse(why: str):
    def apply(value: Any, ctx: Any):
        raise _Refused(why)

    return apply


def _same(key: str, fix):
    """A key we share with verl: ``fix(value)`` translates verl-only values (silent when it returns ``value``)."""
    return lambda value, ctx: [(key, fix(value))]


def _sp_size(ctx: Any) -> int:
    for key in ("trainer.sp_size", "engine.ulysses_sequence_parallel_size", "ulysses_sequence_parallel_size"):
        value = _lookup(ctx, key)
        if value is not _MISSING and value is not None:
            return max(1, coerce(value, int, key))
    return 1


_FSDP = ("fsdp", "fsdp2")
_BF16 = ("bf16", "bfloat16")
_FP32 = ("fp32", "float32")
_NO_MEGATRON = (
    "sftforge has no Megatron/VeOmni backend (tensor, pipeline or expert parallelism); it shards with FSDP2: "
    "set trainer.strategy=fsdp2 (with trainer.sp_size=N for long sequences)."
)


def _strategy(value: Any, ctx: Any):
    if str(value).lower() in _FSDP:
        return [("trainer.strategy", "fsdp2")], "verl's FSDP1 and FSDP2 both become FSDP2 here"
    raise _Refused(_NO_MEGATRON)


def _selector(ok: tuple[str, ...], why: str, refusal: str):
    """Hydra's config-group choice (engine=fsdp, optim=fsdp, model=hf_model) given as a plain string."""

    def apply(value: Any, ctx: Any):
        if str(value).lower() in ok:
            return why
        raise _Refused(refusal)

    return apply


def _offload(value: Any, ctx: Any):
    if not _truthy(value, "offload"):
        return "no offload is the default here too (trainer.offload=false)"
    pairs: list[tuple[str, Any]] = [("trainer.offload", True)]
    if not _given(ctx, "trainer.strategy"):
        pairs.append(("trainer.strategy", "fsdp2"))  # verl offloads FSDP shards; so does trainer.offload
    return pairs, "one switch here for parameters, gradients and optimizer state"


def _fsdp_model_dtype(value: Any, ctx: Any):
    # verl.trainer.fsdp_sft_trainer loads the weights in model_dtype and always trains with FSDP mixed precision
    # (bf16 parameters in compute, fp32 reduction): fp32 master weights + bf16 compute = our model.dtype=bf16.
    if str(value).lower() in _FP32:
        if _given(ctx, "model.dtype") or _given(ctx, "model.fsdp_config.mixed_precision.param_dtype"):
            return "fp32 master weights here too; model.dtype (or mixed_precision.param_dtype) sets the compute dtype"
        return [("model.dtype", "bf16")], "verl's fsdp_sft_trainer computes in bf16 over fp32 master weights"
    raise _Refused(
        "sftforge always keeps fp32 master weights (pure bf16 weights are not supported); drop the key and set "
        "model.dtype=bf16 for bf16 compute."
    )


def _engine_model_dtype(value: Any, ctx: Any):
    if str(value).lower() in _FP32:
        return "fp32 master weights here too; the compute dtype is model.dtype (verl's engine.dtype)"
    return _fsdp_model_dtype(value, ctx)  # refused with the same explanation


def _compute_dtype(value: Any, ctx: Any):
    v = str(value).lower()
    if v in _BF16:
        return [("model.dtype", "bf16")]
    if v in _FP32:
        return [("model.dtype", "fp32")]
    raise _Refused("only bf16 and fp32 compute are supported (no fp16 loss scaling): set model.dtype=bf16.")


def _max_token_len(value: Any, ctx: Any):
    if _given(ctx, "data.use_dynamic_bsz") and not _truthy(
        _lookup(ctx, "data.use_dynamic_bsz"), "data.use_dynamic_bsz"
    ):
        return "verl reads it only with data.use_dynamic_bsz=true (the token budget here is data.max_tokens_per_micro_batch)"
    sp = _sp_size(ctx)
    tokens = coerce(value, int, "data.max_token_len_per_gpu") * sp
    note = "tokens per GPU"
    if sp > 1:
        note += f" × sequence-parallel size {sp}, the tokens of a whole packed micro-batch here"
    return [("data.max_tokens_per_micro_batch", tokens)], note + (
        "; data.micro_batch_size_per_gpu still caps the sequences per micro-batch (verl ignores it with "
        "use_dynamic_bsz)"
    )


def _dynamic_bsz(value: Any, ctx: Any):
    if not _truthy(value, "data.use_dynamic_bsz"):
        return "micro-batches are data.micro_batch_size_per_gpu sequences (data.max_tokens_per_micro_batch=0: no token budget)"
    if _given(ctx, "data.max_token_len_per_gpu") or _given(ctx, "data.max_tokens_per_micro_batch"):
        return "the token budget is data.max_tokens_per_micro_batch (from data.max_token_len_per_gpu)"
    return [("data.max_tokens_per_micro_batch", 8192 * _sp_size(ctx))], "verl's default max_token_len_per_gpu=8192"


def _pad_mode(value: Any, ctx: Any):
    mode = str(value).lower()
    if mode == "no_padding":
        return [("data.packing", True)]
    if mode in ("right", "left_right"):
        return [("data.packing", False)]
    raise _Refused("data.pad_mode must be no_padding (-> data.packing=true) or right / left_right (-> false).")


def _remove_padding(value: Any, ctx: Any):
    if _given(ctx, "data.pad_mode") or _given(ctx, "data.packing"):
        return "data.pad_mode / data.packing decides packing"
    return [("data.packing", value)]


def _freq(key: str):
    def fix(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "after_each_epoch":
            raise _Refused(
                f"{key} counts steps here: set {key}=N with N the steps per epoch (training samples // "
                f"data.train_batch_size, printed by `sftforge plan`), or {key}=0 for the end of the run only."
            )
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value < 0):
            return 0  # verl's -1: only at the end of the run, our 0
        return value

    return _same(key, fix)


def _keep(value: Any) -> Any:
    if value is None:
        return 0  # verl's null: keep all, our 0 (a negative value stays an error)
    return value


def _logger(value: Any) -> Any:
    names = coerce(value, list, "trainer.logger")
    if "file" not in names:
        return value
    return ["jsonl" if n == "file" else n for n in names]  # verl's file logger: metrics as jsonl


def _device(value: Any) -> Any:
    if str(value).lower() not in ("auto", "cpu", "cuda"):
        raise _Refused("only CUDA GPUs and CPUs are supported: set trainer.device=cuda, cpu or auto.")
    return value


def _resume_mode(value: Any, ctx: Any):
    mode = str(value).lower()
    path = _lookup(ctx, "trainer.resume_from_path", None)
    if mode == "disable":
        return [("trainer.resume", "never")]
    if mode == "auto":
        return [("trainer.resume", "auto" if is_unset(path) else path)]
    if mode == "resume_path":
        if is_unset(path):
            raise _Refused(
                "resume_path needs trainer.resume_from_path (here: trainer.resume=PATH to a step_<N> folder)."
            )
        return [("trainer.resume", path)]
    raise _Refused("trainer.resume_mode is auto | disable | resume_path (here trainer.resume=auto | never | PATH).")


def _resume_from_path(value: Any, ctx: Any):
    if is_unset(value):
        return "no path: trainer.resume (verl's resume_mode) decides"
    if str(_lookup(ctx, "trainer.resume_mode", "auto")).lower() == "disable":
        return "trainer.resume_mode=disable wins (trainer.resume=never)"
    return [("trainer.resume", value)], "a sftforge step_<N> folder (verl's global_step_<N> folders cannot be read)"


_CKPT_PARTS = {"model", "optimizer", "extra", "hf_model"}


def _save_contents(value: Any, ctx: Any):
    if isinstance(value, str) and "${" in value:
        return "a reference to another key"
    parts = set(coerce(value, list, "save_contents"))
    unknown = parts - _CKPT_PARTS
    if unknown:
        raise _Refused(f"unknown part(s) {sorted(unknown)}; verl's parts are model, optimizer, extra, hf_model.")
    why = "sftforge checkpoints always hold the model, the optimizer state and the trainer state (an exact resume)"
    if not {"optimizer", "extra"} <= parts:
        why += ": the optimizer and trainer state are saved anyway"
    if "hf_model" in parts:  # verl writes global_step_N/huggingface; ours: step_N/huggingface
        return [("trainer.save_hf", True)], why + "; hf_model: step_<N>/huggingface/ (trainer.save_hf=true)"
    return why


def _load_contents(value: Any, ctx: Any):
    if isinstance(value, str) and "${" in value:
        return "a reference to another key (a resume loads the whole checkpoint here)"
    parts = set(coerce(value, list, "load_contents"))
    if {"model", "optimizer", "extra"} <= parts:
        return "a resume loads the whole checkpoint here"
    raise _Refused(
        "a resume loads the whole checkpoint (model, optimizer, trainer state); to start afresh from a checkpoint's "
        "weights, export it (`sftforge export STEP_DIR -o DIR`) and set model.path=DIR."
    )


def _output_dir(value: Any, ctx: Any):
    if not isinstance(value, str) or "${" not in value:
        return [("trainer.output_dir", value)]

    def resolve(m: re.Match) -> str:  # verl's default checkpoints/${trainer.project_name}/${trainer.experiment_name}
        found = _lookup(ctx, m.group(1))
        if found is _MISSING or isinstance(found, (dict, list)) or (isinstance(found, str) and "${" in found):
            raise _Refused(f"it refers to {m.group(1)}, which is not set: give trainer.output_dir a plain path.")
        return str(found)

    return [("trainer.output_dir", re.sub(r"\$\{([\w.]+)\}", resolve, value))]


def _warmup_steps(value: Any) -> Any:
    return 0 if value is None or coerce(value, int, "optim.lr_warmup_steps") < 0 else value  # verl's -1: the ratio


def _scheduler(value: Any, ctx: Any):
    if is_unset(value):
        return "null: optim.lr_scheduler decides"
    return [("optim.lr_scheduler", str(value).lower())]


def _target_modules(value: Any) -> Any:
    return [value] if isinstance(value, str) and not value.strip().startswith("[") else value


_NULL = is_unset
_FALSE = lambda v: not _truthy(v, "flag")  # noqa: E731
_HYDRA_TARGET = "hydra's class path of verl's config object"
_NO_TRAINER_SAMPLES = (
    "sftforge trains on whole files: write a subset of the rows to a file (e.g. with `sftforge data convert`), or "
    "bound the run with trainer.max_steps."
)
_WRAP = "FSDP2 shards each decoder layer (then the root) here, whatever the wrap policy"
_PERF = "a verl speed/memory option with no effect on the result; sftforge has its own (see `sftforge config`)"

# verl's per-row thinking switch (both trainers spell it differently)
_ENABLE_THINKING_KEY = (
    "ignored (default column name) or refused",
    _ignore_unless(
        lambda v: is_unset(v) or v == "enable_thinking",
        "a per-row enable_thinking column is not read; data.chat_template_kwargs={enable_thinking: ...} sets it "
        "for every row",
        "a per-row enable_thinking column is not read: set data.chat_template_kwargs={enable_thinking: true} (or "
        "false) for every row.",
    ),
)


VERL_ALIASES: dict[str, tuple[str, Any]] = {
    # --- data (both trainers) ---
    "data.micro_batch_size": (
        "data.micro_batch_size_per_gpu",
        lambda v, ctx: (
            "null: data.micro_batch_size_per_gpu decides" if v is None else [("data.micro_batch_size_per_gpu", v)]
        ),
    ),
    "data.multiturn.enable": ("data.format=prompt_response when false, else data.format=auto", _multiturn),
    "data.multiturn.messages_key": ("data.messages_key", _rename("data.messages_key")),
    "data.multiturn.tools_key": ("data.tools_key", _rename("data.tools_key")),
    "data.multiturn.enable_thinking_key": _ENABLE_THINKING_KEY,
    "data.enable_thinking_key": _ENABLE_THINKING_KEY,
    "data.prompt_dict_keys": (
        "refused unless null",
        _ignore_unless(
            _NULL,
            "null: data.prompt_key is a column of its own",
            "prompts are read from a top-level column only (data.prompt_key): copy the nested field into a column of "
            "its own (e.g. df['question'] = df['extra_info'].str['question'] in pandas) and set data.prompt_key to it.",
        ),
    ),
    "data.response_dict_keys": (
        "refused unless null",
        _ignore_unless(
            _NULL,
            "null: data.response_key is a column of its own",
            "responses are read from a top-level column only (data.response_key): copy the nested field into a "
            "column of its own (e.g. df['answer'] = df['extra_info'].str['answer'] in pandas) and set "
            "data.response_key to it.",
        ),
    ),
    "data.train_max_samples": (
        "refused unless -1",
        _ignore_unless(lambda v: v is None or int(v) < 0, "-1: the whole file, as here", _NO_TRAINER_SAMPLES),
    ),
    "data.val_max_samples": (
        "refused unless -1",
        _ignore_unless(lambda v: v is None or int(v) < 0, "-1: the whole file, as here", _NO_TRAINER_SAMPLES),
    ),
    "data.balance_dp_token": (
        "ignored",
        _ignore("the loss is always normalized by the supervised tokens of the whole step, over all ranks"),
    ),
    "data.custom_cls.path": (
        "refused unless null",
        _ignore_unless(
            _NULL,
            "null: no custom dataset class",
            "custom dataset classes are not loaded: convert the rows to messages / prompt_response / sharegpt / "
            "alpaca (`sftforge data convert`) and set data.format; RL prompts are read as verl's RL parquet (prompt, "
            "reward_model.ground_truth, data_source) or messages rows with an answer column.",
        ),
    ),
    "data.custom_cls.name": (
        "refused unless null",
        _ignore_unless(
            _NULL, "null: no custom dataset class", "see data.custom_cls.path: custom classes are not loaded."
        ),
    ),
    "data.use_shm": ("ignored", _ignore("shared-memory loading is a verl speed-up; files are read directly")),
    "data.num_workers": ("ignored", _ignore("data is tokenized before training (data.num_proc processes)")),
    "data.apply_chat_template_kwargs": ("data.chat_template_kwargs", _rename("data.chat_template_kwargs")),
    "data.ignore_input_ids_mismatch": (
        "ignored",
        _ignore("each conversation is rendered once as a whole, so there is no per-turn concatenation to mismatch"),
    ),
    "data.pad_mode": ("data.packing", _pad_mode),
    "data.use_dynamic_bsz": ("data.max_tokens_per_micro_batch", _dynamic_bsz),
    "data.max_token_len_per_gpu": ("data.max_tokens_per_micro_batch", _max_token_len),
    # --- model: verl.trainer.fsdp_sft_trainer ---
    "model.partial_pretrain": ("model.path", _rename("model.path")),
    "model.strategy": ("trainer.strategy=fsdp2", _strategy),
    "model.fsdp_config.model_dtype": ("model.dtype", _fsdp_model_dtype),
    "model.fsdp_config.mixed_precision.param_dtype": ("model.dtype", _compute_dtype),
    "model.fsdp_config.mixed_precision.reduce_dtype": ("ignored", _ignore("gradients are reduced in fp32 here")),
    "model.fsdp_config.mixed_precision.buffer_dtype": ("ignored", _ignore("buffers stay in fp32 here")),
    "model.fsdp_config.wrap_policy.min_num_params": ("ignored", _ignore(_WRAP)),
    "model.fsdp_config.wrap_policy.*": ("ignored", _ignore(_WRAP)),
    "model.fsdp_config.cpu_offload": ("trainer.offload", _offload),
    "model.fsdp_config.offload_params": ("trainer.offload", _offload),
    "model.fsdp_config.*": (
        "refused",
        _refuse("verl's fsdp_sft_trainer reads only model_dtype, wrap_policy, cpu_offload and offload_params here."),
    ),
    "model.lora_rank": ("model.lora.rank", _rename("model.lora.rank")),
    "model.lora_alpha": ("model.lora.alpha", _rename("model.lora.alpha")),
    "model.target_modules": ("model.lora.target_modules", _rename("model.lora.target_modules", _target_modules)),
    "model.exclude_modules": (
        "refused unless null",
        _ignore_unless(
            _NULL,
            "null: nothing excluded",
            "list the modules to adapt in model.lora.target_modules instead (e.g. [q_proj,k_proj,v_proj,o_proj]).",
        ),
    ),
    "model.lora_adapter_path": (
        "refused unless null",
        _ignore_unless(
            _NULL,
            "null: a new adapter",
            "training on from an existing LoRA adapter is not supported: merge it into the base model and set "
            "model.path to the merged folder (model.lora.rank=N then trains a new adapter).",
        ),
    ),
    "model.external_lib": (
        "refused unless null",
        _ignore_unless(
            _NULL,
            "null: no extra module",
            "no extra Python module is imported from this key: the model loads with transformers' Auto classes (set "
            "model.trust_remote_code=true for a hub model that ships its own code), or set model.builder="
            "package.module:function to build your own module.",
        ),
    ),
    "model.use_liger": (
        "ignored",
        _ignore(
            "Liger kernels are not used; the LM head + cross-entropy run in chunks (model.loss_chunk_size), same loss"
        ),
    ),
    "model.use_shm": ("ignored", _ignore("shared-memory loading is a verl speed-up; the model is read directly")),
    "use_remove_padding": ("data.packing", _remove_padding),
    "ulysses_sequence_parallel_size": ("trainer.sp_size", _rename("trainer.sp_size")),
    # --- model: verl.trainer.sft_trainer (model/hf_model.yaml) ---
    "model.use_remove_padding": ("data.packing", _remove_padding),
    "model.hf_config_path": (
        "refused unless null",
        _ignore_unless(
            _NULL,
            "null: model.path's config.json",
            "the config is model.path's config.json: point model.path at a folder with that config.json.",
        ),
    ),
    "model.custom_chat_template": (
        "data.chat_template",
        lambda v, ctx: "null: the tokenizer's template" if is_unset(v) else [("data.chat_template", v)],
    ),
    "model.override_config": (
        "refused unless empty",
        _ignore_unless(
            _NULL,
            "empty: the model's own config",
            "model config overrides are not applied: edit config.json in a copy of the model folder and set "
            "model.path to it.",
        ),
    ),
    "model.enable_activation_offload": (
        "refused unless false",
        _ignore_unless(
            _FALSE,
            "false: no activation offload",
            "activation offload is not supported: use model.enable_gradient_checkpointing=true, trainer.sp_size=N or "
            "trainer.offload=true to save memory.",
        ),
    ),
    "model.use_fused_kernels": (
        "ignored",
        _ignore(_PERF + " (the LM head + loss run in chunks: model.loss_chunk_size)"),
    ),
    "model.fused_kernel_options.*": ("ignored", _ignore(_PERF)),
    "model.tiled_mlp.*": (
        "ignored",
        _ignore(_PERF + " (for long sequences: trainer.sp_size, model.enable_gradient_checkpointing)"),
    ),
    "model.mtp.enable": (
        "refused unless false",
        _ignore_unless(
            _FALSE, "false: no multi-token prediction", "multi-token prediction (MTP) heads are not trained here."
        ),
    ),
    "model.mtp.*": ("ignored", _ignore("multi-token prediction is off (model.mtp.enable)")),
    "model._target_": ("ignored", _ignore(_HYDRA_TARGET)),
    # --- engine (verl.trainer.sft_trainer: engine/fsdp.yaml) ---
    "engine.strategy": ("trainer.strategy=fsdp2", _strategy),
    "engine.model_dtype": ("ignored or refused", _engine_model_dtype),
    "engine.dtype": ("model.dtype", _compute_dtype),
    "engine.ulysses_sequence_parallel_size": ("trainer.sp_size", _rename("trainer.sp_size")),
    "engine.param_offload": ("trainer.offload", _offload),
    "engine.optimizer_offload": ("trainer.offload", _offload),
    "engine.offload_policy": ("trainer.offload", _offload),
    "engine.wrap_policy.*": ("ignored", _ignore(_WRAP)),
    "engine.fsdp_size": (
        "ignored",
        _ignore("FSDP2 shards over every data-parallel rank here (no hybrid sharding); same result"),
    ),
    "engine.reshard_after_forward": ("ignored", _ignore(_PERF)),
    "engine.forward_prefetch": ("ignored", _ignore(_PERF)),
    "engine.use_orig_params": ("ignored", _ignore("an FSDP1 option; FSDP2 always keeps the original parameters")),
    "engine.seed": ("ignored", _ignore("trainer.seed seeds the data order and dropout here")),
    "engine.full_determinism": (
        "refused unless false",
        _ignore_unless(
            _FALSE,
            "false: the default run",
            "there is no full-determinism switch: set torch's deterministic options yourself.",
        ),
    ),
    "engine.use_torch_compile": (
        "ignored",
        _ignore("verl compiles its entropy kernel only; model.compile=true compiles the decoder layers here"),
    ),
    "engine.entropy_from_logits_with_chunking": ("ignored", _ignore("an entropy metric option of verl's RL trainers")),
    "engine.entropy_checkpointing": ("ignored", _ignore("an entropy metric option of verl's RL trainers")),
    "engine.forward_only": (
        "refused unless false",
        _ignore_unless(
            _FALSE, "false: training", "a forward-only engine trains nothing: use `sftforge eval` to score a model."
        ),
    ),
    "engine._target_": ("ignored", _ignore(_HYDRA_TARGET)),
    "engine.*": (
        "refused",
        _refuse(
            "not a verl FSDP-engine option sftforge knows; Megatron/VeOmni engine keys have no equivalent (sftforge "
            "shards with FSDP2: trainer.strategy=fsdp2, trainer.sp_size=N): remove it."
        ),
    ),
    # --- optim (optim/fsdp.yaml, both trainers) ---
    "optim.lr_warmup_steps_ratio": ("optim.warmup_ratio", _rename("optim.warmup_ratio")),
    "optim.lr_warmup_steps": ("optim.warmup_steps", _rename("optim.warmup_steps", _warmup_steps)),
    "optim.lr_scheduler_type": ("optim.lr_scheduler", _scheduler),
    "optim.warmup_style": ("optim.lr_scheduler", _scheduler),
    "optim.optimizer": (
        "refused unless AdamW",
        _ignore_unless(
            lambda v: str(v).lower() == "adamw",
            "torch AdamW here too",
            "the optimizer is torch's AdamW (optim.implementation picks its kernel): drop the key.",
        ),
    ),
    "optim.optimizer_impl": (
        "refused unless torch.optim",
        _ignore_unless(
            lambda v: str(v) == "torch.optim",
            "torch.optim here too",
            "the optimizer is torch.optim.AdamW (no torchao / bitsandbytes optimizers): drop the key.",
        ),
    ),
    "optim.total_training_steps": ("ignored", _ignore("filled in by the trainer (trainer.max_steps or the epochs)")),
    "optim.num_cycles": (
        "refused unless 0.5",
        _ignore_unless(
            lambda v: float(v) == 0.5,
            "0.5: a half cosine, as here",
            "the cosine schedule is a single half cycle (num_cycles=0.5); optim.min_lr_ratio sets where it ends.",
        ),
    ),
    "optim.override_optimizer_config": (
        "refused unless null",
        _ignore_unless(
            _NULL,
            "null: AdamW with the optim.* settings only",
            "extra optimizer arguments are not passed: use optim.betas, optim.eps, optim.weight_decay.",
        ),
    ),
    "optim._target_": ("ignored", _ignore(_HYDRA_TARGET)),
    # --- checkpoint (trainer.checkpoint in fsdp_sft_trainer, checkpoint in sft_trainer) ---
    "trainer.checkpoint.save_contents": ("trainer.save_hf with hf_model, else ignored", _save_contents),
    "trainer.checkpoint.load_contents": ("ignored or refused", _load_contents),
    "checkpoint.save_contents": ("trainer.save_hf with hf_model, else ignored", _save_contents),
    "checkpoint.load_contents": ("ignored or refused", _load_contents),
    "checkpoint._target_": ("ignored", _ignore(_HYDRA_TARGET)),
    # --- trainer ---
    "trainer.default_local_dir": ("trainer.output_dir", _output_dir),
    "trainer.default_hdfs_dir": (
        "ignored",
        lambda v, ctx: (
            "null: no HDFS copy"
            if is_unset(v)
            else "checkpoints stay in trainer.output_dir; copy them to HDFS yourself"
        ),
    ),
    "trainer.total_training_steps": (
        "trainer.max_steps",
        _rename("trainer.max_steps", lambda v: 0 if v is None else v),
    ),
    "trainer.resume_mode": ("trainer.resume", _resume_mode),
    "trainer.resume_from_path": ("trainer.resume", _resume_from_path),
    "trainer.project_name": ("$WANDB_PROJECT (wandb's project)", _wandb_env("WANDB_PROJECT")),
    "trainer.experiment_name": ("$WANDB_NAME (wandb's run name)", _wandb_env("WANDB_NAME")),
    "trainer.profile_interval": ("ignored", _ignore("no profiler here")),
    # keys we share with verl, with verl-only values translated (silent otherwise)
    "trainer.save_freq": ("trainer.save_freq", _freq("trainer.save_freq")),
    "trainer.test_freq": ("trainer.test_freq", _freq("trainer.test_freq")),
    "trainer.max_ckpt_to_keep": ("trainer.max_ckpt_to_keep", _same("trainer.max_ckpt_to_keep", _keep)),
    "trainer.logger": ("trainer.logger", _same("trainer.logger", _logger)),
    "trainer.device": ("trainer.device", _same("trainer.device", _device)),
    # --- whole sections, after the keys under them ---
    "defaults": ("ignored", _ignore("hydra's list of config groups; their keys are read where they are given")),
    "profiler.*": ("ignored", _ignore("no profiler here")),
    "engine": (
        "ignored or refused",
        _selector(("fsdp",), "the FSDP engine: trainer.strategy (FSDP2 or DDP)", _NO_MEGATRON),
    ),
    "optim": (
        "ignored or refused",
        _selector(("fsdp",), "torch AdamW, set by the optim.* keys", _NO_MEGATRON),
    ),
    "model": (
        "ignored or refused",
        _selector(
            ("hf_model",),
            "a Hugging Face model, set by the model.* keys",
            "the model is a Hugging Face folder or hub id (model.path).",
        ),
    ),
}
"""verl key -> (what it becomes, converter). A key ending in ``.*`` stands for every key under that section that no
exact entry handled; the plain section names (engine, optim, model) are hydra's group choices (engine=fsdp) and apply
only to a string value."""


# ------------------------------------------------------------------------------------------------------------------
# verl's RL keys (verl.trainer.main_ppo / recipe.dapo.main_dapo; the DAPO and ReTool scripts of verl-project/
# verl-recipe): each maps to ours, is ignored saying why, or is refused saying what to do instead.

_RL_ENGINE = "a vLLM/SGLang engine setting; rollouts run with transformers generate on the trained weights here"
_NO_CRITIC = (
    "PPO with a critic (algorithm.adv_estimator=gae) is not implemented: use algorithm.adv_estimator=grpo "
    "(group-relative advantages, no critic), which is what sftforge rl trains."
)
_RAY = "processes are started by torchrun here, not Ray"


def _is_rl(ctx: Any) -> bool:
    """The configuration is one of verl's RL scripts (it has the actor/rollout section)."""
    return _given(ctx, "actor_rollout_ref")


def _train_batch_size(value: Any, ctx: Any):
    if _is_rl(ctx) and not _given(ctx, "rollout.prompts_per_step"):
        return [("data.train_batch_size", value), ("rollout.prompts_per_step", value)], "verl's RL: prompts per step"
    return [("data.train_batch_size", value)]


def _mini_batch(value: Any, ctx: Any):
    prompts = _lookup(ctx, "rollout.prompts_per_step", None) or _lookup(ctx, "data.train_batch_size", None)
    if prompts is None:
        prompts = RolloutConfig.prompts_per_step
    mini, prompts = coerce(value, int, "ppo_mini_batch_size"), coerce(prompts, int, "data.train_batch_size")
    if mini < 1 or prompts % mini:
        raise _Refused(
            f"the prompts per step ({prompts}) must be a multiple of it: each optimizer step trains "
            "ppo_mini_batch_size whole groups here (algorithm.mini_batches = prompts per step / it)."
        )
    return [("algorithm.mini_batches", prompts // mini)], f"{prompts} prompts per step / {mini} per optimizer step"


def _max_prompt_length(value: Any, ctx: Any):
    length = coerce(value, int, "data.max_prompt_length")
    if _truthy(_lookup(ctx, "actor_rollout_ref.rollout.multi_turn.enable", False), "multi_turn.enable"):
        response = _lookup(ctx, "data.max_response_length", None) or 0
        return [("data.max_length", length + coerce(response, int, "data.max_response_length"))], (
            "multi-turn: data.max_length caps a whole episode here, prompt + responses + tool outputs"
        )
    return [("data.max_length", length)], "sftforge rl refuses (or truncates, data.truncation) longer prompts"


def _filter_overlong(value: Any, ctx: Any):
    if not _truthy(value, "data.filter_overlong_prompts"):
        return "data.truncation decides what a prompt longer than data.max_length does (error by default)"
    return [("data.truncation", "drop")], (
        "verl drops them before its data.truncation applies, so this wins over data.truncation; counted in the log"
    )


def _adv_estimator(value: Any, ctx: Any):
    if str(value).lower() == "grpo":
        return "group-relative advantages here too (÷ the group's std unless algorithm.scale_by_std=false)"
    if str(value).lower() == "gae":
        raise _Refused(_NO_CRITIC)
    raise _Refused(
        "only grpo (group-relative advantages; algorithm.scale_by_std=false gives Dr. GRPO's mean-centred "
        "form) is implemented: set algorithm.adv_estimator=grpo."
    )


def _kl_in_reward(value: Any, ctx: Any):
    if not _truthy(value, "algorithm.use_kl_in_reward"):
        return "no KL penalty in the reward (a KL loss term is algorithm.kl_coef)"
    raise _Refused(
        "the KL to the reference is a loss term here, not a reward penalty: set algorithm.kl_coef=C "
        "(verl's actor.use_kl_loss=true with kl_loss_coef=C)."
    )


def _use_kl_loss(value: Any, ctx: Any):
    if not _truthy(value, "actor_rollout_ref.actor.use_kl_loss"):
        return "no KL loss and no reference model (algorithm.kl_coef=0), as here by default"
    coef = _lookup(ctx, "actor_rollout_ref.actor.kl_loss_coef", None)
    return [("algorithm.kl_coef", 0.001 if coef is None else coef)], "the k3 KL to the initial model, as a loss term"


def _kl_loss_coef(value: Any, ctx: Any):
    if _truthy(_lookup(ctx, "actor_rollout_ref.actor.use_kl_loss", False), "actor_rollout_ref.actor.use_kl_loss"):
        return "read with actor_rollout_ref.actor.use_kl_loss=true (algorithm.kl_coef)"
    return "verl applies it only with actor_rollout_ref.actor.use_kl_loss=true"


def _clip_ratio(value: Any, ctx: Any):
    pairs = [
        (f"algorithm.clip_ratio_{side}", value)
        for side in ("low", "high")
        if not _given(ctx, f"actor_rollout_ref.actor.clip_ratio_{side}")
    ]
    return pairs or "clip_ratio_low / clip_ratio_high, given too, decide"


def _actor_dynamic_bsz(value: Any, ctx: Any):
    if not _truthy(value, "use_dynamic_bsz"):
        return "micro-batches are data.micro_batch_size_per_gpu sequences"
    if _given(ctx, "actor_rollout_ref.actor.ppo_max_token_len_per_gpu"):
        return "the token budget is data.max_tokens_per_micro_batch (from ppo_max_token_len_per_gpu)"
    return [("data.max_tokens_per_micro_batch", 16384)], "verl's default ppo_max_token_len_per_gpu=16384"


def _actor_token_len(value: Any, ctx: Any):
    if not _truthy(_lookup(ctx, "actor_rollout_ref.actor.use_dynamic_bsz", False), "use_dynamic_bsz"):
        return "verl reads it only with actor_rollout_ref.actor.use_dynamic_bsz=true"
    return [("data.max_tokens_per_micro_batch", value)], "packed tokens per micro-batch"


def _rollout_name(value: Any, ctx: Any):
    return f"rollouts run with transformers generate (rollout.backend=hf); a {value} backend is not implemented"


def _val_do_sample(value: Any, ctx: Any):
    if _truthy(value, "val_kwargs.do_sample"):
        return "validation samples at rollout.val_temperature (val_kwargs.temperature)"
    n = _lookup(ctx, "actor_rollout_ref.rollout.val_kwargs.n", 1)
    if n is not None and coerce(n, int, "val_kwargs.n") > 1:
        return "val_kwargs.n > 1 samples anyway, at val_kwargs.temperature (as verl's async rollouts of ReTool do)"
    return [("rollout.val_temperature", 0.0)], "greedy validation"


def _tool_config(value: Any, ctx: Any):
    """verl's tool config YAML: its SandboxFusion code_interpreter becomes the code_math environment's sandbox."""
    try:
        tools = (yaml.safe_load(open(str(value), encoding="utf-8")) or {}).get("tools") or []
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise _Refused(
            f"cannot read the tool config ({type(e).__name__}): give its path, or drop the key and set "
            "algorithm.reward=code_math with sandbox.* keys for the code_interpreter tool."
        ) from None
    for tool in tools:
        schema = ((tool or {}).get("tool_schema") or {}).get("function") or {}
        conf = (tool or {}).get("config") or {}
        if schema.get("name") != "code_interpreter":
            raise _Refused(
                f"tool {schema.get('name')!r}: the one tool environment here is code_interpreter "
                "(algorithm.reward=code_math); remove the others from the tool config."
            )
        pairs: list[tuple[str, Any]] = []
        if conf.get("sandbox_fusion_url"):
            pairs += [("sandbox.backend", "fusion"), ("sandbox.fusion_url", conf["sandbox_fusion_url"])]
        elif "sandbox_fusion" in str(tool.get("class_name", "")).lower() or "daytona" in str(tool.get("class_name")):
            raise _Refused(
                f"{tool.get('class_name')} needs a sandbox_fusion_url (Daytona is not supported); or drop "
                "the key: algorithm.reward=code_math runs the code in bubblewrap here."
            )
        for theirs, ours in (
            ("default_timeout", "sandbox.wall_time_s"),
            ("memory_limit_mb", "sandbox.memory_mb"),
            ("rate_limit", "sandbox.max_concurrent"),
        ):
            if conf.get(theirs) is not None:
                pairs.append((ours, conf[theirs]))
        if not _given(ctx, "algorithm.reward"):
            pairs.append(("algorithm.reward", "code_math"))
        return pairs, "the code_interpreter tool: the code_math environment and its sandbox"
    raise _Refused("the tool config lists no tool: the code tool here is algorithm.reward=code_math.")


def _overlong(part: str, prefix: str):
    """reward_model.overlong_buffer.* / ...reward_kwargs.overlong_buffer_cfg.*: DAPO's soft overlong penalty."""

    def apply(value: Any, ctx: Any):
        on = _truthy(_lookup(ctx, f"{prefix}.enable", False), f"{prefix}.enable")
        if part == "enable":
            if not on:
                return "off, as algorithm.overlong_buffer=0 here by default"
            if not _given(ctx, f"{prefix}.len"):
                raise _Refused(f"it needs {prefix}.len, the tokens of the ramp (algorithm.overlong_buffer).")
            return "on: its len and penalty_factor are algorithm.overlong_buffer and algorithm.overlong_penalty"
        if not on:
            return f"verl applies it only with {prefix}.enable=true"
        return [({"len": "algorithm.overlong_buffer", "penalty_factor": "algorithm.overlong_penalty"}[part], value)]

    return apply


def _reward_manager(value: Any, ctx: Any):
    name = str(value.get("name") if isinstance(value, dict) else value).lower()
    if name in ("naive", "dapo", "none"):
        return (
            "algorithm.reward scores each response (dapo's overlong penalty: algorithm.overlong_buffer, "
            "dynamic sampling: algorithm.dynamic_sampling)"
        )
    raise _Refused(f"reward manager {name!r} has no equivalent: the reward is algorithm.reward's score of each answer.")


def _custom_reward(value: Any, ctx: Any):
    if is_unset(value):
        return "null: algorithm.reward decides"
    if Path(str(value)).name == "retool.py":
        return [("algorithm.reward", "code_math")], (
            "ReTool's compute_score (math_dapo on the last \\boxed{}) is code_math's math-verify check here; its "
            "penalty on wrong answers by turn count is not applied"
        )
    raise _Refused(
        "verl's compute_score(data_source, solution_str, ground_truth, extra_info) files are not loaded: "
        "write fn(generation, sample) -> float (sample.reference is the ground truth, sample.row the row "
        "with data_source and extra_info) and set algorithm.reward=package.module:fn."
    )


def _ppo_epochs(value: Any, ctx: Any):
    if coerce(value, int, "ppo_epochs") == 1:
        return "each rollout batch is trained once, in algorithm.mini_batches optimizer steps"
    raise _Refused("each rollout batch is trained once here: use algorithm.mini_batches for more optimizer steps.")


_VERL_RL: dict[str, tuple[str, Any]] = {
    # --- data ---
    "data.train_batch_size": ("data.train_batch_size; verl's RL: rollout.prompts_per_step", _train_batch_size),
    "data.max_prompt_length": ("data.max_length (multi-turn: + data.max_response_length)", _max_prompt_length),
    "data.max_response_length": ("rollout.max_response_length (per turn)", _rename("rollout.max_response_length")),
    "data.gen_batch_size": (
        "ignored",
        _ignore(
            "dynamic sampling here drops the groups whose rewards are all equal from the step; "
            "it does not generate more batches to refill it (kept_groups is logged)"
        ),
    ),
    "data.return_raw_chat": (
        "ignored",
        _ignore("prompts are always rendered from the messages by the chat template here"),
    ),
    "data.filter_overlong_prompts": ("data.truncation=drop when true", _filter_overlong),
    "data.val_batch_size": ("ignored", _ignore("validation generates in batches of 64")),
    "data.dataloader_num_workers": ("ignored", _ignore("prompts are read and rendered once, before the first step")),
    # --- algorithm ---
    "algorithm.adv_estimator": ("grpo: ours; gae and others refused", _adv_estimator),
    "algorithm.norm_adv_by_std_in_grpo": ("algorithm.scale_by_std", _rename("algorithm.scale_by_std")),
    "algorithm.use_kl_in_reward": ("ignored when false; refused (use algorithm.kl_coef)", _kl_in_reward),
    "algorithm.kl_penalty": ("ignored", _ignore("the in-reward KL's estimator; the KL loss here is k3")),
    "algorithm.kl_ctrl.*": (
        "ignored: the in-reward KL (use_kl_in_reward=false)",
        _ignore("the in-reward KL controller, used only with use_kl_in_reward=true"),
    ),
    "algorithm.gamma": ("ignored", _ignore("GAE's discount: no critic here (grpo)")),
    "algorithm.lam": ("ignored", _ignore("GAE's lambda: no critic here (grpo)")),
    "algorithm.filter_groups.enable": ("algorithm.dynamic_sampling", _rename("algorithm.dynamic_sampling")),
    "algorithm.filter_groups.metric": (
        "ignored",
        _ignore("groups are filtered on the reward (algorithm.reward's score)"),
    ),
    "algorithm.filter_groups.max_num_gen_batches": (
        "ignored",
        _ignore("no refill: dropped groups are not replaced by more generation batches"),
    ),
    "algorithm.filter_groups.max_inflight_gen_batches": ("ignored", _ignore("no refill batches here")),
    "algorithm.rollout_correction.*": (
        "ignored",
        _ignore(
            "old log-probs are recomputed by the trained model itself here: no rollout/training mismatch to correct"
        ),
    ),
    # --- actor_rollout_ref.model ---
    "actor_rollout_ref.model.path": ("model.path", _rename("model.path")),
    "actor_rollout_ref.model.tokenizer_path": ("model.tokenizer_path", _rename("model.tokenizer_path")),
    "actor_rollout_ref.model.use_remove_padding": ("data.packing", _remove_padding),
    "actor_rollout_ref.model.enable_gradient_checkpointing": (
        "model.enable_gradient_checkpointing",
        _rename("model.enable_gradient_checkpointing"),
    ),
    "actor_rollout_ref.model.trust_remote_code": ("model.trust_remote_code", _rename("model.trust_remote_code")),
    "actor_rollout_ref.model.lora_rank": ("model.lora.rank", _rename("model.lora.rank")),
    "actor_rollout_ref.model.lora_alpha": ("model.lora.alpha", _rename("model.lora.alpha")),
    "actor_rollout_ref.model.target_modules": (
        "model.lora.target_modules",
        _rename("model.lora.target_modules", _target_modules),
    ),
    "actor_rollout_ref.model.custom_chat_template": VERL_ALIASES["model.custom_chat_template"],
    "actor_rollout_ref.model.override_config.*": (
        "refused",
        _refuse(
            "model config overrides are not applied: edit config.json in a copy of the model folder and set model.path "
            "to it."
        ),
    ),
    "actor_rollout_ref.model.external_lib": VERL_ALIASES["model.external_lib"],
    "actor_rollout_ref.model.use_fused_kernels": VERL_ALIASES["model.use_fused_kernels"],
    "actor_rollout_ref.model.use_shm": VERL_ALIASES["model.use_shm"],
    "actor_rollout_ref.model.*": ("refused", _refuse("not a verl model option sftforge knows: remove it.")),
    # --- actor_rollout_ref.actor ---
    "actor_rollout_ref.actor.strategy": ("trainer.strategy=fsdp2", _strategy),
    "actor_rollout_ref.actor.clip_ratio_low": ("algorithm.clip_ratio_low", _rename("algorithm.clip_ratio_low")),
    "actor_rollout_ref.actor.clip_ratio_high": ("algorithm.clip_ratio_high", _rename("algorithm.clip_ratio_high")),
    "actor_rollout_ref.actor.clip_ratio": ("algorithm.clip_ratio_low and _high", _clip_ratio),
    "actor_rollout_ref.actor.clip_ratio_c": ("algorithm.clip_ratio_c (dual clip)", _rename("algorithm.clip_ratio_c")),
    "actor_rollout_ref.actor.use_kl_loss": ("algorithm.kl_coef (= kl_loss_coef) when true", _use_kl_loss),
    "actor_rollout_ref.actor.kl_loss_coef": ("algorithm.kl_coef, with use_kl_loss=true", _kl_loss_coef),
    "actor_rollout_ref.actor.kl_loss_type": (
        "ignored for low_var_kl / k3, else refused",
        _ignore_unless(
            lambda v: str(v).lower() in ("low_var_kl", "k3"),
            "the k3 estimator (verl's low_var_kl) here",
            "the KL loss is the k3 estimator (verl's low_var_kl): drop the key.",
        ),
    ),
    "actor_rollout_ref.actor.loss_agg_mode": (
        "ignored for token-mean, else refused",
        _ignore_unless(
            lambda v: str(v).lower() == "token-mean",
            "token-mean here: the loss is divided by the trained tokens of the whole step, over all processes",
            "the loss is token-mean over the whole step here (DAPO's choice): drop the key.",
        ),
    ),
    "actor_rollout_ref.actor.entropy_coeff": (
        "ignored when 0, else refused",
        _ignore_unless(lambda v: float(v) == 0, "0: no entropy bonus", "there is no entropy bonus here: set it to 0."),
    ),
    "actor_rollout_ref.actor.grad_clip": ("optim.clip_grad", _rename("optim.clip_grad")),
    "actor_rollout_ref.actor.ppo_mini_batch_size": ("algorithm.mini_batches = prompts per step / it", _mini_batch),
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": (
        "data.micro_batch_size_per_gpu",
        _rename("data.micro_batch_size_per_gpu"),
    ),
    "actor_rollout_ref.actor.ppo_micro_batch_size": VERL_ALIASES["data.micro_batch_size"],
    "actor_rollout_ref.actor.use_dynamic_bsz": ("data.max_tokens_per_micro_batch", _actor_dynamic_bsz),
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": ("data.max_tokens_per_micro_batch", _actor_token_len),
    "actor_rollout_ref.actor.ppo_epochs": ("ignored when 1, else refused", _ppo_epochs),
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size": ("trainer.sp_size", _rename("trainer.sp_size")),
    "actor_rollout_ref.actor.fsdp_config.param_offload": ("trainer.offload", _offload),
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload": ("trainer.offload", _offload),
    "actor_rollout_ref.actor.fsdp_config.model_dtype": ("ignored or refused", _engine_model_dtype),
    "actor_rollout_ref.actor.fsdp_config.*": ("ignored", _ignore(_WRAP + "; " + _PERF)),
    "actor_rollout_ref.actor.use_torch_compile": VERL_ALIASES["engine.use_torch_compile"],
    "actor_rollout_ref.actor.entropy_checkpointing": ("ignored", _ignore("an entropy metric option")),
    "actor_rollout_ref.actor.entropy_from_logits_with_chunking": ("ignored", _ignore("an entropy metric option")),
    "actor_rollout_ref.actor.checkpoint.save_contents": VERL_ALIASES["checkpoint.save_contents"],
    "actor_rollout_ref.actor.checkpoint.load_contents": VERL_ALIASES["checkpoint.load_contents"],
    "actor_rollout_ref.actor.megatron.*": ("refused", _refuse(_NO_MEGATRON)),
    "actor_rollout_ref.actor.*": ("refused", _refuse("not a verl actor option sftforge knows: remove it.")),
    # --- actor_rollout_ref.ref: the reference model ---
    "actor_rollout_ref.ref.*": (
        "ignored",
        _ignore(
            "the reference model (loaded when algorithm.kl_coef > 0) is the initial policy, batched like the actor"
        ),
    ),
    # --- actor_rollout_ref.rollout ---
    "actor_rollout_ref.rollout.name": ("ignored: rollout.backend=hf", _rollout_name),
    "actor_rollout_ref.rollout.n": ("rollout.n", _rename("rollout.n")),
    "actor_rollout_ref.rollout.temperature": ("rollout.temperature", _rename("rollout.temperature")),
    "actor_rollout_ref.rollout.top_p": ("rollout.top_p", _rename("rollout.top_p")),
    "actor_rollout_ref.rollout.top_k": (
        "ignored when -1 or 0, else refused",
        _ignore_unless(lambda v: int(v) <= 0, "no top-k here", "there is no top-k sampling here: use rollout.top_p."),
    ),
    "actor_rollout_ref.rollout.do_sample": (
        "ignored when true, else refused",
        _ignore_unless(_truthy, "rollouts sample (rollout.temperature)", "GRPO needs sampled responses: drop the key."),
    ),
    "actor_rollout_ref.rollout.response_length": (
        "rollout.max_response_length",
        _rename("rollout.max_response_length"),
    ),
    "actor_rollout_ref.rollout.prompt_length": ("ignored", _ignore("data.max_length bounds the prompts")),
    "actor_rollout_ref.rollout.ignore_eos": (
        "ignored when false, else refused",
        _ignore_unless(
            _FALSE, "responses end at the end-of-turn token", "responses always end at the end-of-turn token here."
        ),
    ),
    "actor_rollout_ref.rollout.val_kwargs.n": ("rollout.val_n", _rename("rollout.val_n")),
    "actor_rollout_ref.rollout.val_kwargs.temperature": ("rollout.val_temperature", _rename("rollout.val_temperature")),
    "actor_rollout_ref.rollout.val_kwargs.top_p": ("rollout.val_top_p", _rename("rollout.val_top_p")),
    "actor_rollout_ref.rollout.val_kwargs.do_sample": ("rollout.val_temperature=0 when false (n = 1)", _val_do_sample),
    "actor_rollout_ref.rollout.multi_turn.enable": (
        "ignored: rollout.max_turns > 1 with an environment",
        _ignore(
            "episodes run when rollout.max_turns > 1 and algorithm.reward is an environment (code_math, textcraft)"
        ),
    ),
    "actor_rollout_ref.rollout.multi_turn.max_assistant_turns": ("rollout.max_turns", _rename("rollout.max_turns")),
    "actor_rollout_ref.rollout.multi_turn.max_user_turns": (
        "ignored",
        _ignore("an episode ends after rollout.max_turns assistant turns (each tool output is the turn between)"),
    ),
    "actor_rollout_ref.rollout.multi_turn.tool_config_path": (
        "algorithm.reward=code_math; SandboxFusion: sandbox.backend=fusion, sandbox.fusion_url, limits",
        _tool_config,
    ),
    "actor_rollout_ref.rollout.multi_turn.format": (
        "ignored for hermes, else refused",
        _ignore_unless(
            lambda v: str(v).lower() == "hermes",
            "tool calls are read as <tool_call> JSON (hermes) here",
            "tool calls are read as hermes-style <tool_call> JSON only.",
        ),
    ),
    "actor_rollout_ref.rollout.multi_turn.max_parallel_calls": (
        "ignored",
        _ignore("every call of a turn runs, concurrently (sandbox.max_concurrent)"),
    ),
    "actor_rollout_ref.rollout.multi_turn.max_tool_response_length": (
        "sandbox.observation_chars",
        _rename("sandbox.observation_chars"),
    ),
    "actor_rollout_ref.rollout.multi_turn.tool_response_truncate_side": (
        "ignored",
        _ignore("an observation keeps the start of the output, and says how much was cut"),
    ),
    "actor_rollout_ref.rollout.multi_turn.*": ("ignored", _ignore("a verl agent-loop setting with no effect here")),
    "actor_rollout_ref.rollout.agent.*": ("ignored", _ignore("a verl agent-loop setting with no effect here")),
    "actor_rollout_ref.rollout.*": ("ignored", _ignore(_RL_ENGINE)),
    "actor_rollout_ref.hybrid_engine": ("ignored", _ignore("the trained model samples its own rollouts here")),
    "actor_rollout_ref.nccl_timeout": ("ignored", _ignore("torch.distributed's default timeout applies")),
    # --- reward ---
    "reward_model.enable": (
        "ignored when false, else refused",
        _ignore_unless(
            _FALSE,
            "no reward model: algorithm.reward scores the answers",
            "model-based rewards are not supported: algorithm.reward=package.module:fn scores an answer.",
        ),
    ),
    "reward_model.reward_manager": ("ignored for naive / dapo, else refused", _reward_manager),
    "reward.reward_manager.name": ("ignored for naive / dapo, else refused", _reward_manager),
    "custom_reward_function.path": ("algorithm.reward (retool.py: code_math), else refused", _custom_reward),
    "reward.custom_reward_function.path": ("algorithm.reward (retool.py: code_math), else refused", _custom_reward),
    "custom_reward_function.name": ("ignored", _ignore("read with custom_reward_function.path")),
    "reward.custom_reward_function.name": ("ignored", _ignore("read with custom_reward_function.path")),
    "reward_model.launch_reward_fn_async": ("ignored", _ignore("answers are scored as they are generated")),
    "reward_model.*": (
        "refused",
        _refuse(
            "not a verl reward option sftforge knows (model-based rewards are not supported: algorithm.reward scores an "
            "answer): remove it."
        ),
    ),
    "reward.*": (
        "refused",
        _refuse("not a verl reward option sftforge knows (algorithm.reward scores an answer): remove it."),
    ),
    "trainer.critic_warmup": (
        "ignored when 0, else refused",
        _ignore_unless(lambda v: int(v) == 0, "0: no critic", _NO_CRITIC),
    ),
    "critic.*": ("refused", _refuse(_NO_CRITIC)),
    # --- trainer, ray ---
    "trainer.balance_batch": ("ignored", _ignore("micro-batches are packed to data.max_tokens_per_micro_batch")),
    "trainer.log_val_generations": (
        "ignored",
        _ignore("validation logs its scores; `sftforge eval -o FILE --samples K` writes every answer"),
    ),
    "trainer.rollout_data_dir": ("ignored", _ignore("rollouts are not dumped; `sftforge eval -o FILE` writes answers")),
    "trainer.validation_data_dir": ("ignored", _ignore("`sftforge eval -o FILE` writes every validation answer")),
    "trainer.val_only": (
        "ignored when false, else refused",
        _ignore_unless(
            _FALSE, "false: training", "validation alone is `sftforge eval --task TASK --samples K --do-sample`."
        ),
    ),
    "trainer.del_local_ckpt_after_load": ("ignored", _ignore("checkpoints are pruned by trainer.max_ckpt_to_keep")),
    "trainer.esi_redundant_time": ("ignored", _ignore("a cluster preemption margin; SIGTERM saves a checkpoint here")),
    "ray_init.*": ("ignored", _ignore(_RAY)),
    "ray_kwargs.*": ("ignored", _ignore(_RAY)),
    "global_profiler.*": ("ignored", _ignore("no profiler here")),
    "transfer_queue.*": ("ignored", _ignore(_RAY)),
}
for _prefix in (
    "reward_model.overlong_buffer",
    "reward_model.reward_kwargs.overlong_buffer_cfg",
    "reward.reward_kwargs.overlong_buffer_cfg",
):
    _VERL_RL[f"{_prefix}.enable"] = ("on: its len and penalty_factor; off: ignored", _overlong("enable", _prefix))
    _VERL_RL[f"{_prefix}.len"] = ("algorithm.overlong_buffer (with enable=true)", _overlong("len", _prefix))
    _VERL_RL[f"{_prefix}.penalty_factor"] = (
        "algorithm.overlong_penalty (with enable=true)",
        _overlong("penalty_factor", _prefix),
    )
    _VERL_RL[f"{_prefix}.log"] = ("ignored", _ignore("the penalty is part of the logged reward"))
for _key in ("reward_model.reward_kwargs.max_resp_len", "reward.reward_kwargs.max_resp_len"):
    _VERL_RL[_key] = ("ignored", _ignore("the ramp ends at rollout.max_response_length"))
for _name in ("lr", "weight_decay", "betas", "eps", "min_lr_ratio", "clip_grad"):
    _VERL_RL[f"actor_rollout_ref.actor.optim.{_name}"] = (f"optim.{_name}", _rename(f"optim.{_name}"))
for _name in (
    "lr_warmup_steps",
    "lr_warmup_steps_ratio",
    "warmup_style",
    "lr_scheduler_type",
    "total_training_steps",
    "optimizer",
    "optimizer_impl",
    "num_cycles",
    "override_optimizer_config",
):
    _VERL_RL[f"actor_rollout_ref.actor.optim.{_name}"] = VERL_ALIASES[f"optim.{_name}"]
_VERL_RL["actor_rollout_ref.rollout.val_kwargs.top_k"] = _VERL_RL["actor_rollout_ref.rollout.top_k"]
_VERL_RL["actor_rollout_ref.actor.optim.*"] = (
    "refused",
    _refuse("not a verl optimizer option sftforge knows (AdamW: optim.* keys): remove it."),
)
_VERL_RL["actor_rollout_ref.actor.*"] = _VERL_RL.pop("actor_rollout_ref.actor.*")  # after the sections under it
VERL_RL_KEYS = tuple(_VERL_RL)
"""verl's RL keys, in the table order of docs/verl.md (:func:`verl_rl_table`)."""
VERL_ALIASES.update(_VERL_RL)


def verl_rl_table() -> str:
    """The table of verl's RL keys in docs/verl.md: what each becomes here, or why it is ignored or refused."""
    rows = ["| verl key (RL: main_ppo, main_dapo) | here |", "|---|---|"]
    for key, (what, convert) in _VERL_RL.items():
        if what in ("ignored", "refused"):  # the reason, as the info line or the error says it
            try:
                what = f"ignored: {convert('x', {})}"
            except _Refused as e:
                what = f"refused: {e}"
        rows.append(f"| `{key}` | {what.replace('|', '/')} |")
    return "\n".join(rows)


def _pop_path(d: dict, parts: list[str]) -> tuple[bool, Any]:
    node = d
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    if not isinstance(node, dict) or parts[-1] not in node:
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


def dotted_leaves(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted (key, value) of every leaf of a nested mapping (an empty mapping counts as a leaf)."""
    if not isinstance(d, dict) or (not d and prefix):
        return [(prefix, d)]
    out = []
    for k, v in d.items():
        out += dotted_leaves(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _convert(verl_key: str, value: Any, ctx: Any) -> list[tuple[str, Any]] | str | tuple[list, str]:
    entry = VERL_ALIASES.get(verl_key)
    if entry is None:  # a leaf under a ".*" section
        entry = next(VERL_ALIASES[k] for k in VERL_ALIASES if k.endswith(".*") and verl_key.startswith(k[:-1]))
    try:
        return entry[1](value, ctx)
    except _Refused as e:
        raise ConfigError(f"verl key {verl_key}={value!r} is not supported: {e}") from None
    except (ValueError, TypeError) as e:  # a value of the wrong type (ConfigError from coerce, int("x"), ...)
        raise ConfigError(f"verl key {verl_key}={value!r}: wrong type of value ({e}).") from None


def _matches(raw: dict) -> list[tuple[str, Any]]:
    """The (verl key, value) pairs of ``raw`` that VERL_ALIASES handles, in the table's order."""
    found: list[tuple[str, Any]] = []
    leaves = dict(dotted_leaves(raw))
    for verl_key in VERL_ALIASES:
        if verl_key.endswith(".*"):
            section = verl_key[:-1]
            for key, value in leaves.items():
                if key.startswith(section) and key not in VERL_ALIASES and not any(f[0] == key for f in found):
                    found.append((key, value))
            continue
        value = _lookup(raw, verl_key)
        if value is _MISSING:
            continue
        if "." not in verl_key and isinstance(value, dict):
            continue  # a section of ours or verl's (model: {...}), not a group choice
        found.append((verl_key, value))
    return found


def apply_verl_aliases(raw: dict, log=None, ctx: Any = None) -> dict:
    """Handle verl's keys in a nested mapping (in place, returned): rename each to ours or drop it, one info line per
    key (none for a shared key whose value needs no translation); raise :class:`ConfigError` for a verl setting with
    no equivalent. ``ctx`` is the whole configuration as given (default ``raw``), read for keys that depend on others.
    """
    if not isinstance(raw, dict):
        return raw
    log = log or say  # one process speaks for the run under torchrun
    ctx = raw if ctx is None else ctx
    for verl_key, given in _matches(raw):
        out = _convert(verl_key, given, ctx)
        _pop_path(raw, verl_key.split("."))
        if isinstance(out, str):
            log(f"info: verl key {verl_key}={given!r} ignored: {out}")
            continue
        mapped, note = out if isinstance(out, tuple) else (out, "")
        for key, new in mapped:
            _set_path(raw, key, new)
        if mapped == [(verl_key, given)]:
            continue  # a key we share with verl, value as it is
        ours = VERL_ALIASES.get(verl_key, ("",))[0]
        shown = ", ".join(f"{k}={v!r}" for k, v in mapped) or ours
        log(f"info: verl key {verl_key}={given!r} -> {shown}" + (f" ({note})" if note else ""))
    return raw


def drops_overlong_prompts(ctx: Any) -> bool:
    """verl's data.filter_overlong_prompts=true is given in ``ctx``: it means data.truncation=drop whatever order the
    keys have, since verl filters before its data.truncation applies."""
    return _truthy(_lookup(ctx, "data.filter_overlong_prompts", False), "data.filter_overlong_prompts")


__all__ = [
    "VERL_ALIASES",
    "VERL_RL_KEYS",
    "apply_verl_aliases",
    "dotted_leaves",
    "drops_overlong_prompts",
    "is_unset",
    "verl_rl_table",
]
