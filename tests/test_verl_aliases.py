"""verl SFT keys map to ours with one info line each, are ignored with one info line saying why, or fail with a clear
error saying what to set instead. Both verl trainers: verl.trainer.fsdp_sft_trainer (sft_trainer.yaml) and
verl.trainer.sft_trainer (sft_trainer_engine.yaml with its engine / model / optim groups)."""

import functools
import json
import os
import shlex
from pathlib import Path

import pytest

from sftforge.config import VERL_ALIASES, ConfigError, load_config, names_model

ROOT = Path(__file__).resolve().parent.parent

# (override, attribute path, expected value): mapped to our key, one "info: verl key K=V -> ..." line
CASES = [
    ("data.micro_batch_size=4", "data.micro_batch_size_per_gpu", 4),
    ("data.multiturn.enable=false", "data.format", "prompt_response"),
    ("data.multiturn.enable=true", "data.format", "auto"),
    ("data.multiturn.messages_key=conv", "data.messages_key", "conv"),
    ("data.multiturn.tools_key=fns", "data.tools_key", "fns"),
    (
        "data.apply_chat_template_kwargs={enable_thinking: false}",
        "data.chat_template_kwargs",
        {"enable_thinking": False},
    ),
    ("data.pad_mode=no_padding", "data.packing", True),
    ("data.pad_mode=right", "data.packing", False),
    ("data.pad_mode=left_right", "data.packing", False),
    ("data.use_dynamic_bsz=true", "data.max_tokens_per_micro_batch", 8192),
    ("data.max_token_len_per_gpu=4096", "data.max_tokens_per_micro_batch", 4096),
    ("model.partial_pretrain=Qwen/Qwen3-1.7B", "model.path", "Qwen/Qwen3-1.7B"),
    ("model.strategy=fsdp", "trainer.strategy", "fsdp2"),
    ("model.strategy=fsdp2", "trainer.strategy", "fsdp2"),
    ("model.fsdp_config.model_dtype=fp32", "model.dtype", "bf16"),
    ("model.fsdp_config.mixed_precision.param_dtype=bf16", "model.dtype", "bf16"),
    ("model.fsdp_config.cpu_offload=true", "trainer.offload", True),
    ("model.fsdp_config.offload_params=true", "trainer.strategy", "fsdp2"),
    ("model.lora_rank=32", "model.lora.rank", 32),
    ("model.lora_alpha=8", "model.lora.alpha", 8.0),
    ("model.target_modules=all-linear", "model.lora.target_modules", ["all-linear"]),
    ("model.target_modules=[q_proj,v_proj]", "model.lora.target_modules", ["q_proj", "v_proj"]),
    ("model.custom_chat_template=tmpl.jinja", "data.chat_template", "tmpl.jinja"),
    ("optim.lr_warmup_steps_ratio=0.05", "optim.warmup_ratio", 0.05),
    ("optim.lr_warmup_steps=-1", "optim.warmup_steps", 0),
    ("optim.lr_warmup_steps=50", "optim.warmup_steps", 50),
    ("optim.lr_scheduler_type=constant", "optim.lr_scheduler", "constant"),
    ("optim.warmup_style=cosine", "optim.lr_scheduler", "cosine"),
    ("engine.strategy=fsdp", "trainer.strategy", "fsdp2"),
    ("engine.dtype=bfloat16", "model.dtype", "bf16"),
    ("engine.ulysses_sequence_parallel_size=2", "trainer.sp_size", 2),
    ("engine.param_offload=true", "trainer.offload", True),
    ("engine.optimizer_offload=true", "trainer.offload", True),
    ("engine.offload_policy=true", "trainer.offload", True),
    ("trainer.default_local_dir=/tmp/ckpt", "trainer.output_dir", "/tmp/ckpt"),
    ("trainer.total_training_steps=123", "trainer.max_steps", 123),
    ("trainer.total_training_steps=null", "trainer.max_steps", 0),
    ("trainer.resume_mode=disable", "trainer.resume", "never"),
    ("trainer.resume_mode=auto", "trainer.resume", "auto"),
    ("trainer.resume_from_path=/ck/step_10", "trainer.resume", "/ck/step_10"),
    ("trainer.save_freq=-1", "trainer.save_freq", 0),
    ("trainer.test_freq=-1", "trainer.test_freq", 0),
    ("trainer.max_ckpt_to_keep=null", "trainer.max_ckpt_to_keep", 0),
    ("checkpoint.save_contents=[model,hf_model]", "trainer.save_hf", True),
    ("trainer.checkpoint.save_contents=[model,optimizer,extra,hf_model]", "trainer.save_hf", True),
    ("trainer.logger=[console,file]", "trainer.logger", ["console", "jsonl"]),
    ("use_remove_padding=false", "data.packing", False),
    ("model.use_remove_padding=true", "data.packing", True),
    ("ulysses_sequence_parallel_size=1", "data.packing", True),
    ("ulysses_sequence_parallel_size=4", "trainer.sp_size", 4),
]

# accepted, changes nothing that matters here: one "info: verl key K=V ignored: <why>" line
IGNORED = [
    "defaults=[_self_]",
    "data.micro_batch_size=null",
    "data.multiturn.enable_thinking_key=enable_thinking",
    "data.enable_thinking_key=enable_thinking",
    "data.prompt_dict_keys=null",
    "data.response_dict_keys=null",
    "data.train_max_samples=-1",
    "data.val_max_samples=-1",
    "data.balance_dp_token=true",
    "data.custom_cls.path=null",
    "data.custom_cls.name=null",
    "data.use_shm=false",
    "data.num_workers=8",
    "data.ignore_input_ids_mismatch=false",
    "data.use_dynamic_bsz=false",
    "model.fsdp_config.mixed_precision.reduce_dtype=fp32",
    "model.fsdp_config.mixed_precision.buffer_dtype=fp32",
    "model.fsdp_config.wrap_policy.min_num_params=0",
    "model.fsdp_config.wrap_policy.transformer_layer_cls_to_wrap=[Qwen2DecoderLayer]",
    "model.fsdp_config.cpu_offload=false",
    "model.fsdp_config.offload_params=false",
    "model.exclude_modules=null",
    "model.lora_adapter_path=null",
    "model.external_lib=null",
    "model.use_liger=true",
    "model.use_shm=false",
    "model.hf_config_path=null",
    "model.custom_chat_template=null",
    "model.override_config={}",
    "model.enable_activation_offload=false",
    "model.use_fused_kernels=true",
    "model.fused_kernel_options.impl_backend=torch",
    "model.tiled_mlp.enabled=true",
    "model.mtp.enable=false",
    "model.mtp.num_speculative_tokens=1",
    "model._target_=verl.workers.config.HFModelConfig",
    "engine.model_dtype=fp32",
    "engine.wrap_policy.min_num_params=0",
    "engine.fsdp_size=2",
    "engine.reshard_after_forward=true",
    "engine.forward_prefetch=false",
    "engine.use_orig_params=false",
    "engine.seed=42",
    "engine.full_determinism=false",
    "engine.use_torch_compile=true",
    "engine.entropy_from_logits_with_chunking=false",
    "engine.entropy_checkpointing=false",
    "engine.forward_only=false",
    "engine._target_=verl.workers.config.FSDPEngineConfig",
    "optim.optimizer=AdamW",
    "optim.optimizer_impl=torch.optim",
    "optim.total_training_steps=-1",
    "optim.num_cycles=0.5",
    "optim.override_optimizer_config=null",
    "optim._target_=verl.workers.config.FSDPOptimizerConfig",
    "trainer.checkpoint.save_contents=[model,optimizer,extra]",
    "trainer.checkpoint.load_contents=[model,optimizer,extra]",
    "checkpoint.save_contents=[model,optimizer]",
    "checkpoint.load_contents=${checkpoint.save_contents}",
    "checkpoint._target_=verl.trainer.config.CheckpointConfig",
    "trainer.default_hdfs_dir=null",
    "trainer.default_hdfs_dir=hdfs://ns/ckpt",
    "trainer.resume_from_path=null",
    "trainer.profile_interval=[-1,-1]",
    "profiler.tool=nsys",
    "engine=fsdp",
    "optim=fsdp",
    "model=hf_model",
]

# a real meaning sftforge does not support: ConfigError naming the key, with this hint of what to do
REFUSED = [
    ("model.strategy=megatron", "trainer.strategy=fsdp2"),
    ("engine.strategy=megatron", "trainer.strategy=fsdp2"),
    ("engine=megatron", "Megatron"),
    ("optim=megatron", "Megatron"),
    ("model=custom_model", "model.path"),
    ("engine.tensor_model_parallel_size=2", "remove it"),
    ("engine.model_dtype=bf16", "model.dtype=bf16"),
    ("engine.dtype=float16", "model.dtype=bf16"),
    ("engine.full_determinism=true", "deterministic"),
    ("engine.forward_only=true", "sftforge eval"),
    ("data.prompt_dict_keys=['question']", "data.prompt_key"),
    ("+data.response_dict_keys=['answer']", "data.response_key"),
    ("data.multiturn.enable_thinking_key=think", "data.chat_template_kwargs"),
    ("data.enable_thinking_key=think", "data.chat_template_kwargs"),
    ("data.train_max_samples=100", "trainer.max_steps"),
    ("data.val_max_samples=10", "subset"),
    ("data.custom_cls.path=my_dataset.py", "data.format"),
    ("data.custom_cls.name=MyDataset", "custom classes"),
    ("data.pad_mode=left", "no_padding"),
    ("model.fsdp_config.model_dtype=bf16", "model.dtype=bf16"),
    ("model.fsdp_config.mixed_precision.param_dtype=fp16", "model.dtype=bf16"),
    ("model.fsdp_config.forward_prefetch=true", "model_dtype, wrap_policy"),
    ("model.exclude_modules=[lm_head]", "model.lora.target_modules"),
    ("model.lora_adapter_path=/adapters/a", "model.path"),
    ("model.external_lib=my_models", "model.trust_remote_code"),
    ("model.hf_config_path=/configs/c", "model.path"),
    ("model.override_config={attention_dropout: 0.1}", "config.json"),
    ("model.enable_activation_offload=true", "model.enable_gradient_checkpointing"),
    ("model.mtp.enable=true", "multi-token"),
    ("optim.optimizer=AdamW8bit", "AdamW"),
    ("optim.optimizer_impl=bitsandbytes.optim", "torch.optim.AdamW"),
    ("optim.num_cycles=1.0", "optim.min_lr_ratio"),
    ("optim.override_optimizer_config={bf16_stochastic_round: true}", "optim.betas"),
    ("checkpoint.save_contents=[model,weights]", "hf_model"),
    ("checkpoint.load_contents=[model]", "sftforge export"),
    ("trainer.checkpoint.load_contents=[model]", "model.path"),
    ("trainer.resume_mode=resume_path", "trainer.resume_from_path"),
    ("trainer.resume_mode=latest", "trainer.resume=auto"),
    ("trainer.save_freq=after_each_epoch", "trainer.save_freq=N"),
    ("trainer.test_freq=after_each_epoch", "sftforge plan"),
    ("trainer.device=npu", "trainer.device=cuda"),
    ("trainer.default_local_dir=checkpoints/${trainer.project_name}", "plain path"),
]

# keys verl and sftforge share, with values that mean the same: accepted silently
SILENT = [
    "model.path=/models/m",
    "model.enable_gradient_checkpointing=true",
    "model.trust_remote_code=false",
    "data.micro_batch_size_per_gpu=4",
    "data.train_batch_size=64",
    "data.max_length=2048",
    "data.truncation=error",
    "data.messages_key=messages",
    "data.tools_key=tools",
    "data.prompt_key=question",
    "data.response_key=answer",
    "optim.lr=2e-5",
    "optim.betas=[0.9,0.95]",
    "optim.weight_decay=0.1",
    "optim.clip_grad=1.0",
    "optim.min_lr_ratio=0.1",
    "optim.lr_scheduler=cosine",
    "trainer.total_epochs=2",
    "trainer.seed=1",
    "trainer.save_freq=100",
    "trainer.test_freq=5",
    "trainer.max_ckpt_to_keep=3",
    "trainer.logger=[console,wandb]",
    "trainer.logger=console",
    "trainer.device=cuda",
    "trainer.nnodes=1",
    "trainer.n_gpus_per_node=8",
]


# verl's RL keys (main_ppo / main_dapo; the DAPO and ReTool scripts of verl-project/verl-recipe, 21892b9)
RL_CASES = [
    ("data.max_prompt_length=2048", "data.max_length", 2048),
    ("data.max_response_length=16384", "rollout.max_response_length", 16384),
    ("data.filter_overlong_prompts=true", "data.truncation", "drop"),
    ("algorithm.norm_adv_by_std_in_grpo=false", "algorithm.scale_by_std", False),
    ("algorithm.filter_groups.enable=false", "algorithm.dynamic_sampling", False),
    ("actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct", "model.path", "Qwen/Qwen2.5-7B-Instruct"),
    ("actor_rollout_ref.model.tokenizer_path=/tok", "model.tokenizer_path", "/tok"),
    ("actor_rollout_ref.model.use_remove_padding=false", "data.packing", False),
    ("actor_rollout_ref.model.enable_gradient_checkpointing=true", "model.enable_gradient_checkpointing", True),
    ("actor_rollout_ref.model.trust_remote_code=true", "model.trust_remote_code", True),
    ("actor_rollout_ref.model.lora_rank=8", "model.lora.rank", 8),
    ("actor_rollout_ref.model.lora_alpha=16", "model.lora.alpha", 16.0),
    ("actor_rollout_ref.model.target_modules=all-linear", "model.lora.target_modules", ["all-linear"]),
    ("actor_rollout_ref.model.custom_chat_template=t.jinja", "data.chat_template", "t.jinja"),
    ("actor_rollout_ref.actor.strategy=fsdp", "trainer.strategy", "fsdp2"),
    ("actor_rollout_ref.actor.clip_ratio_low=0.2", "algorithm.clip_ratio_low", 0.2),
    ("actor_rollout_ref.actor.clip_ratio_high=0.28", "algorithm.clip_ratio_high", 0.28),
    ("actor_rollout_ref.actor.clip_ratio=0.3", "algorithm.clip_ratio_high", 0.3),
    ("actor_rollout_ref.actor.clip_ratio_c=10.0", "algorithm.clip_ratio_c", 10.0),
    ("actor_rollout_ref.actor.use_kl_loss=true", "algorithm.kl_coef", 0.001),
    ("actor_rollout_ref.actor.grad_clip=1.0", "optim.clip_grad", 1.0),
    ("actor_rollout_ref.actor.ppo_mini_batch_size=2", "algorithm.mini_batches", 4),  # 8 prompts per step / 2
    ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "data.micro_batch_size_per_gpu", 4),
    ("actor_rollout_ref.actor.ppo_micro_batch_size=4", "data.micro_batch_size_per_gpu", 4),
    ("actor_rollout_ref.actor.use_dynamic_bsz=true", "data.max_tokens_per_micro_batch", 16384),
    ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2", "trainer.sp_size", 2),
    ("actor_rollout_ref.actor.fsdp_config.param_offload=true", "trainer.offload", True),
    ("actor_rollout_ref.actor.fsdp_config.optimizer_offload=true", "trainer.offload", True),
    ("actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]", "trainer.save_hf", True),
    ("actor_rollout_ref.actor.optim.lr=1e-6", "optim.lr", 1e-6),
    ("actor_rollout_ref.actor.optim.weight_decay=0.1", "optim.weight_decay", 0.1),
    ("actor_rollout_ref.actor.optim.betas=[0.9,0.99]", "optim.betas", [0.9, 0.99]),
    ("actor_rollout_ref.actor.optim.eps=1e-6", "optim.eps", 1e-6),
    ("actor_rollout_ref.actor.optim.min_lr_ratio=0.1", "optim.min_lr_ratio", 0.1),
    ("actor_rollout_ref.actor.optim.clip_grad=0.5", "optim.clip_grad", 0.5),
    ("actor_rollout_ref.actor.optim.lr_warmup_steps=10", "optim.warmup_steps", 10),
    ("actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.1", "optim.warmup_ratio", 0.1),
    ("actor_rollout_ref.actor.optim.warmup_style=constant", "optim.lr_scheduler", "constant"),
    ("actor_rollout_ref.actor.optim.lr_scheduler_type=cosine", "optim.lr_scheduler", "cosine"),
    ("actor_rollout_ref.rollout.n=16", "rollout.n", 16),
    ("actor_rollout_ref.rollout.temperature=0.8", "rollout.temperature", 0.8),
    ("actor_rollout_ref.rollout.top_p=0.9", "rollout.top_p", 0.9),
    ("actor_rollout_ref.rollout.response_length=512", "rollout.max_response_length", 512),
    ("actor_rollout_ref.rollout.val_kwargs.n=30", "rollout.val_n", 30),
    ("actor_rollout_ref.rollout.val_kwargs.temperature=1.0", "rollout.val_temperature", 1.0),
    ("actor_rollout_ref.rollout.val_kwargs.top_p=0.7", "rollout.val_top_p", 0.7),
    ("actor_rollout_ref.rollout.val_kwargs.do_sample=false", "rollout.val_temperature", 0.0),
    ("actor_rollout_ref.rollout.multi_turn.max_assistant_turns=8", "rollout.max_turns", 8),
    ("actor_rollout_ref.rollout.multi_turn.max_tool_response_length=256", "sandbox.observation_chars", 256),
    ("custom_reward_function.path=recipe/retool/retool.py", "algorithm.reward", "code_math"),
    ("reward.custom_reward_function.path=recipe/retool/retool.py", "algorithm.reward", "code_math"),
]
RL_IGNORED = [
    "data.gen_batch_size=1536", "data.return_raw_chat=true", "data.filter_overlong_prompts=false",
    "data.val_batch_size=64", "data.dataloader_num_workers=8", "algorithm.adv_estimator=grpo",
    "algorithm.use_kl_in_reward=false", "algorithm.kl_penalty=kl", "algorithm.kl_ctrl.kl_coef=0.0", "algorithm.gamma=1.0",
    "algorithm.lam=1.0", "algorithm.filter_groups.metric=acc", "algorithm.filter_groups.max_num_gen_batches=10",
    "algorithm.filter_groups.max_inflight_gen_batches=1", "algorithm.rollout_correction.rollout_is=sequence",
    "actor_rollout_ref.model.use_fused_kernels=true", "actor_rollout_ref.model.use_shm=false",
    "actor_rollout_ref.model.external_lib=null", "actor_rollout_ref.actor.use_kl_loss=false",
    "actor_rollout_ref.actor.kl_loss_coef=0.0", "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
    "actor_rollout_ref.actor.loss_agg_mode=token-mean", "actor_rollout_ref.actor.entropy_coeff=0",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=22528", "actor_rollout_ref.actor.ppo_epochs=1",
    "actor_rollout_ref.actor.use_dynamic_bsz=false", "actor_rollout_ref.actor.fsdp_config.param_offload=false",
    "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32", "actor_rollout_ref.actor.fsdp_config.fsdp_size=-1",
    "actor_rollout_ref.actor.use_torch_compile=false", "actor_rollout_ref.actor.entropy_checkpointing=true",
    "actor_rollout_ref.actor.entropy_from_logits_with_chunking=true", "actor_rollout_ref.actor.optim.total_training_steps=-1",
    "actor_rollout_ref.actor.optim.optimizer=AdamW", "actor_rollout_ref.actor.optim.optimizer_impl=torch.optim",
    "actor_rollout_ref.actor.optim.num_cycles=0.5", "actor_rollout_ref.actor.optim.override_optimizer_config=null",
    "actor_rollout_ref.actor.checkpoint.load_contents=[model,optimizer,extra]",
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=73728", "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.top_k=-1", "actor_rollout_ref.rollout.do_sample=true",
    "actor_rollout_ref.rollout.prompt_length=2048", "actor_rollout_ref.rollout.ignore_eos=false",
    "actor_rollout_ref.rollout.val_kwargs.top_k=-1", "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
    "actor_rollout_ref.rollout.multi_turn.enable=true", "actor_rollout_ref.rollout.multi_turn.max_user_turns=8",
    "actor_rollout_ref.rollout.multi_turn.format=hermes", "actor_rollout_ref.rollout.multi_turn.max_parallel_calls=1",
    "actor_rollout_ref.rollout.multi_turn.tool_response_truncate_side=middle",
    "actor_rollout_ref.rollout.multi_turn.tokenization_sanity_check_mode=strict",
    "actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent", "actor_rollout_ref.rollout.mode=async",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.9", "actor_rollout_ref.rollout.tensor_model_parallel_size=4",
    "actor_rollout_ref.hybrid_engine=true", "actor_rollout_ref.nccl_timeout=7200", "reward_model.enable=false",
    "reward_model.reward_manager=dapo", "reward.reward_manager.name=naive", "custom_reward_function.name=compute_score",
    "reward.custom_reward_function.name=compute_score", "custom_reward_function.path=null",
    "reward_model.launch_reward_fn_async=false", "trainer.critic_warmup=0", "trainer.balance_batch=true",
    "trainer.log_val_generations=20", "trainer.rollout_data_dir=null", "trainer.validation_data_dir=null",
    "trainer.val_only=false", "trainer.del_local_ckpt_after_load=false", "trainer.esi_redundant_time=0",
    "ray_init.num_cpus=null", "ray_kwargs.ray_init.num_cpus=null", "global_profiler.tool=nsys",
    "transfer_queue.enable=false", "reward_model.overlong_buffer.enable=false", "reward_model.overlong_buffer.len=4096",
    "reward_model.overlong_buffer.penalty_factor=1.0", "reward_model.overlong_buffer.log=false",
    "reward_model.reward_kwargs.overlong_buffer_cfg.enable=false",
    "reward_model.reward_kwargs.overlong_buffer_cfg.len=4096",
    "reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0",
    "reward_model.reward_kwargs.overlong_buffer_cfg.log=false", "reward.reward_kwargs.overlong_buffer_cfg.enable=false",
    "reward.reward_kwargs.overlong_buffer_cfg.len=0", "reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=0.0",
    "reward.reward_kwargs.overlong_buffer_cfg.log=false", "reward_model.reward_kwargs.max_resp_len=8192",
    "reward.reward_kwargs.max_resp_len=8192",
]  # fmt: skip
RL_REFUSED = [
    ("algorithm.adv_estimator=gae", "PPO with a critic"),
    ("algorithm.adv_estimator=rloo", "only grpo"),
    ("algorithm.use_kl_in_reward=true", "set algorithm.kl_coef=C"),
    ("actor_rollout_ref.model.override_config.max_position_embeddings=32768", "edit config.json"),
    ("actor_rollout_ref.model.use_liger=true", "not a verl model option"),
    ("actor_rollout_ref.actor.kl_loss_type=mse", "k3 estimator"),
    ("actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean", "token-mean over the whole step"),
    ("actor_rollout_ref.actor.entropy_coeff=0.001", "no entropy bonus"),
    ("actor_rollout_ref.actor.ppo_mini_batch_size=3", "must be a multiple of it"),
    ("actor_rollout_ref.actor.ppo_epochs=2", "algorithm.mini_batches"),
    ("actor_rollout_ref.actor.fsdp_config.model_dtype=bfloat16", "fp32 master weights"),
    ("actor_rollout_ref.actor.megatron.tensor_model_parallel_size=4", "no Megatron"),
    ("actor_rollout_ref.actor.policy_loss.loss_mode=gspo", "not a verl actor option"),
    ("actor_rollout_ref.actor.optim.lr_decay_style=constant", "not a verl optimizer option"),
    ("actor_rollout_ref.rollout.top_k=20", "no top-k"),
    ("actor_rollout_ref.rollout.do_sample=false", "GRPO needs sampled responses"),
    ("actor_rollout_ref.rollout.ignore_eos=true", "end-of-turn token"),
    ("actor_rollout_ref.rollout.multi_turn.format=gpt-oss", "hermes-style"),
    ("actor_rollout_ref.rollout.multi_turn.tool_config_path=/nonexistent/tools.yaml", "cannot read the tool config"),
    ("reward_model.enable=true", "model-based rewards are not supported"),
    ("reward_model.reward_manager=prime", "has no equivalent"),
    ("reward.reward_manager.name=batch", "has no equivalent"),
    ("custom_reward_function.path=my_reward.py", "set algorithm.reward=package.module:fn"),
    ("reward.custom_reward_function.path=my_reward.py", "set algorithm.reward=package.module:fn"),
    ("reward_model.model.path=rm", "model-based rewards are not supported"),
    ("reward.num_workers=8", "not a verl reward option"),
    ("reward_model.overlong_buffer.enable=true", "needs reward_model.overlong_buffer.len"),
    ("trainer.critic_warmup=20", "PPO with a critic"),
    ("critic.optim.lr=2e-6", "PPO with a critic"),
    ("trainer.val_only=true", "sftforge eval"),
]
RL_SILENT = ["data.train_batch_size=64", "trainer.val_before_train=true"]
CASES += RL_CASES
IGNORED += RL_IGNORED
REFUSED += RL_REFUSED


def _get(cfg, dotted):
    return functools.reduce(getattr, dotted.split("."), cfg)


def _key(override):
    return override.split("=", 1)[0].lstrip("+")


@pytest.fixture(autouse=True)
def _no_wandb_env(monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_NAME", raising=False)


@pytest.mark.parametrize("override,attr,expected", CASES, ids=[c[0] for c in CASES])
def test_alias_maps_with_one_info_line(override, attr, expected, capsys):
    cfg = load_config(None, [override])
    assert _get(cfg, attr) == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"info: verl key {_key(override)}=") and " -> " in err[0]


@pytest.mark.parametrize("override", IGNORED)
def test_harmless_key_is_ignored_with_one_info_line(override, capsys):
    assert load_config(None, [override]) == load_config(None, [])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"info: verl key {_key(override)}=") and " ignored: " in err[0]
    assert len(err[0].split(" ignored: ", 1)[1]) > 10  # says why


@pytest.mark.parametrize("override,hint", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_key_is_refused_with_what_to_do(override, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"verl key {_key(override)}=" in str(e.value) and hint in str(e.value)


@pytest.mark.parametrize("override", SILENT)
def test_shared_keys_are_silent(override, capsys):
    load_config(None, [override])
    assert capsys.readouterr().err == ""


def test_every_alias_has_a_case():
    covered = {_key(o) for o in [c[0] for c in CASES] + IGNORED + [r[0] for r in REFUSED] + SILENT}
    covered |= {"trainer.project_name", "trainer.experiment_name"}  # test_project_and_experiment_name_...
    covered |= {"data.train_batch_size"}  # silent in an SFT config; test_rl_scripts_train_batch_size_is_prompts
    missing = []
    for key in VERL_ALIASES:
        if key.endswith(".*"):  # a section: a case with a key under it that no exact entry handles
            if not any(c.startswith(key[:-1]) and c not in VERL_ALIASES for c in covered):
                missing.append(key)
        elif key not in covered:
            missing.append(key)
    assert not missing
    shared = {"data.train_batch_size"}  # ours and verl's; an RL script's means prompts per step (tested below)
    assert not {_key(o) for o in SILENT} & {k for k in VERL_ALIASES if not k.startswith("trainer.")} - shared


def test_project_and_experiment_name_name_the_wandb_run(capsys):
    load_config(None, ["trainer.project_name=textcraft", "trainer.experiment_name=qwen3-sft"])
    assert os.environ["WANDB_PROJECT"] == "textcraft" and os.environ["WANDB_NAME"] == "qwen3-sft"
    assert capsys.readouterr().err.count("info: verl key") == 2


def test_native_verl_keys_need_no_alias(capsys):
    cfg = load_config(None, ["model.enable_gradient_checkpointing=true", "trainer.logger=[console,wandb]"])
    assert cfg.model.enable_gradient_checkpointing and cfg.trainer.logger == ["console", "wandb"]
    assert capsys.readouterr().err == ""


def test_ulysses_is_sp_size():
    assert load_config(None, ["ulysses_sequence_parallel_size=2"]).trainer.sp_size == 2


# ------------------------------------------------------------------------------------------------------------------
# Real verl command lines, pasted as they are (the torchrun ... -m verl.trainer.xxx prefix dropped, shell variables
# given values).


def _verl_args(command: str, **env: str) -> list[str]:
    for name, value in env.items():
        command = command.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return [a for a in shlex.split(command.replace("\\\n", " ")) if "=" in a]


# volcengine/verl examples/sft/multiturn/run_qwen_05_sp2.sh (verl.trainer.fsdp_sft_trainer)
OLD_MULTITURN_SP2 = """
    data.train_files=$HOME/data/multiturn/train.parquet \\
    data.val_files=$HOME/data/multiturn/test.parquet \\
    data.multiturn.enable=true \\
    data.multiturn.messages_key=messages \\
    data.micro_batch_size=4 \\
    model.partial_pretrain=Qwen/Qwen2.5-0.5B-Instruct \\
    trainer.default_local_dir=$save_path \\
    trainer.project_name=multiturn-sft \\
    trainer.experiment_name=multiturn-sft-qwen-2.5-0.5b-instruct-sp2 \\
    trainer.logger=console \\
    trainer.total_training_steps=1 $@ \\
    ulysses_sequence_parallel_size=2 \\
    use_remove_padding=true
"""

# volcengine/verl examples/sft/gsm8k/run_qwen_05_peft.sh (verl.trainer.fsdp_sft_trainer)
OLD_GSM8K_PEFT = """
    data.train_files=$HOME/data/gsm8k/train.parquet \\
    data.val_files=$HOME/data/gsm8k/test.parquet \\
    data.prompt_key=extra_info \\
    data.response_key=extra_info \\
    optim.lr=1e-4 \\
    data.prompt_dict_keys=['question'] \\
    +data.response_dict_keys=['answer'] \\
    data.micro_batch_size_per_gpu=4 \\
    model.partial_pretrain=Qwen/Qwen2.5-0.5B-Instruct \\
    trainer.default_local_dir=$save_path \\
    trainer.project_name=gsm8k-sft \\
    trainer.experiment_name=gsm8k-sft-qwen-2.5-0.5b-instruct \\
    trainer.logger=console \\
    trainer.total_epochs=1 $@ \\
    model.lora_rank=32\\
    model.lora_alpha=16 \\
    model.target_modules=all-linear
"""

# volcengine/verl examples/sft/vlm/run_qwen3_vl_2b.sh (verl.trainer.sft_trainer, BACKEND=fsdp: $FSDP_ENGINE_CONFIG
# spliced in where ${ENGINE_CONFIG} stands)
NEW_ENGINE_FSDP = """
    data.train_files="${TRAIN_FILES}" \\
    data.train_batch_size=96 \\
    data.max_length=2048 \\
    data.pad_mode=${PAD_MODE} \\
    data.truncation=error \\
    data.use_dynamic_bsz=True \\
    data.max_token_len_per_gpu=65536 \\
    model.path=$MODEL_ID \\
    model.use_remove_padding=${USE_REMOVE_PADDING} \\
    engine=${backend} \\
    optim=${backend} \\
    optim.lr=2e-5 \\
    optim.lr_warmup_steps_ratio=0.01 \\
    optim.weight_decay=0.1 \\
    optim.betas="[0.9,0.95]" \\
    optim.clip_grad=1.0 \\
    optim.min_lr_ratio=0.1 \\
    optim.warmup_style=cosine \\
    engine.ulysses_sequence_parallel_size=${SP_SIZE} \\
    engine.strategy=${FSDP_STRATEGY} \\
    engine.fsdp_size=${FSDP_SIZE} \\
    trainer.test_freq=-1 \\
    trainer.save_freq=4000 \\
    trainer.logger=['console','wandb'] \\
    trainer.project_name="${project_name}" \\
    trainer.experiment_name="${exp_name}" \\
    trainer.total_epochs=10 \\
    trainer.default_local_dir="${CKPT_HOME}" \\
    trainer.resume_mode=${RESUME_MODE} \\
    trainer.max_ckpt_to_keep=5 \\
    checkpoint.save_contents=[model,optimizer,extra]
"""

# volcengine/verl tests/special_npu/run_qwen2_5_05b_sft_peft_sp2.sh (verl.trainer.sft_trainer with LoRA)
NEW_ENGINE_PEFT = """
    data.train_files=$TRAIN_FILES \\
    data.val_files=$VAL_FILES \\
    data.pad_mode=no_padding \\
    data.truncation=error \\
    data.use_dynamic_bsz=True \\
    data.max_token_len_per_gpu=2048 \\
    data.messages_key=messages \\
    model.path=$MODEL_PATH \\
    model.use_remove_padding=True \\
    model.lora_rank=32 \\
    model.lora_alpha=16 \\
    model.target_modules=all-linear \\
    engine=fsdp \\
    optim=fsdp \\
    optim.lr=1e-5 \\
    optim.lr_warmup_steps_ratio=0.2 \\
    optim.weight_decay=0.1 \\
    optim.betas="[0.9,0.95]" \\
    optim.clip_grad=1.0 \\
    optim.min_lr_ratio=0.1 \\
    optim.lr_scheduler_type=cosine \\
    engine.ulysses_sequence_parallel_size=2 \\
    engine.strategy=fsdp2 \\
    engine.fsdp_size=2 \\
    trainer.test_freq=after_each_epoch \\
    trainer.save_freq=-1 \\
    trainer.logger=['console','file'] \\
    trainer.project_name=gsm8k-sft \\
    trainer.experiment_name=gsm8k-sft-qwen-2.5-0.5b-instruct \\
    trainer.total_epochs=2 \\
    trainer.total_training_steps=2 \\
    trainer.default_local_dir="${ckpts_home}" \\
    trainer.resume_mode=${RESUME_MODE} \\
"""


def test_old_fsdp_sft_trainer_multiturn_sp2_line(capsys):
    args = _verl_args(OLD_MULTITURN_SP2, HOME="/home/u", save_path="/ckpt/run", **{"@": ""})
    assert names_model(args)
    cfg = load_config(None, args)
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.data.train_files == "/home/u/data/multiturn/train.parquet" and cfg.data.format == "auto"
    assert cfg.data.micro_batch_size_per_gpu == 4 and cfg.data.messages_key == "messages"
    assert cfg.trainer.sp_size == 2 and cfg.data.packing is True
    assert cfg.trainer.output_dir == "/ckpt/run" and cfg.trainer.max_steps == 1 and cfg.trainer.logger == ["console"]
    assert os.environ["WANDB_PROJECT"] == "multiturn-sft"
    assert capsys.readouterr().err.count("info: verl key") == 10  # one per verl-only key


def test_old_fsdp_sft_trainer_gsm8k_peft_line():
    args = _verl_args(OLD_GSM8K_PEFT, HOME="/home/u", save_path="/ckpt/peft", **{"@": ""})
    with pytest.raises(ConfigError, match=r"verl key data\.prompt_dict_keys=\['question'\].*data\.prompt_key"):
        load_config(None, args)
    # with the nested fields copied into columns of their own, as the message says, the rest is accepted
    args = [a for a in args if "dict_keys" not in a and "extra_info" not in a]
    cfg = load_config(None, args + ["data.prompt_key=question", "data.response_key=answer"])
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.trainer.output_dir == "/ckpt/peft"
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (32, 16.0, ["all-linear"])
    assert cfg.optim.lr == 1e-4 and cfg.data.micro_batch_size_per_gpu == 4 and cfg.trainer.total_epochs == 1


def test_new_sft_trainer_engine_line(capsys):
    env = dict(TRAIN_FILES="/d/train.parquet", PAD_MODE="no_padding", MODEL_ID="/models/Qwen3-VL-2B-Instruct",
               USE_REMOVE_PADDING="True", backend="fsdp", SP_SIZE="2", FSDP_STRATEGY="fsdp2", FSDP_SIZE="-1",
               project_name="verl_sft_test", exp_name="pokemon", CKPT_HOME="/ckpt/pokemon", RESUME_MODE="auto")  # fmt: skip
    args = _verl_args(NEW_ENGINE_FSDP, **env)
    assert names_model(args)
    cfg = load_config(None, args)
    assert cfg.model.path == "/models/Qwen3-VL-2B-Instruct" and cfg.data.train_batch_size == 96
    assert cfg.trainer.strategy == "fsdp2" and cfg.trainer.sp_size == 2 and cfg.data.packing is True
    assert cfg.data.max_tokens_per_micro_batch == 65536 * 2  # verl's per-GPU budget × the sp group
    assert cfg.trainer.output_dir == "/ckpt/pokemon" and cfg.trainer.resume == "auto"
    assert cfg.trainer.save_freq == 4000 and cfg.trainer.test_freq == 0 and cfg.trainer.max_ckpt_to_keep == 5
    assert cfg.optim.lr_scheduler == "cosine" and cfg.optim.warmup_ratio == 0.01 and cfg.optim.min_lr_ratio == 0.1
    assert cfg.optim.betas == [0.9, 0.95] and cfg.trainer.logger == ["console", "wandb"]
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("info: verl key ") for line in err) and len(err) == 17


def test_new_sft_trainer_peft_line():
    args = _verl_args(NEW_ENGINE_PEFT, TRAIN_FILES="/d/t.parquet", VAL_FILES="/d/v.parquet", MODEL_PATH="/m",
                      ckpts_home="/ckpt/x", RESUME_MODE="disable")  # fmt: skip
    with pytest.raises(ConfigError, match="trainer.test_freq='after_each_epoch'.*trainer.test_freq=N"):
        load_config(None, args)
    cfg = load_config(None, [a if not a.startswith("trainer.test_freq=") else "trainer.test_freq=0" for a in args])
    assert cfg.model.lora.rank == 32 and cfg.trainer.sp_size == 2 and cfg.trainer.strategy == "fsdp2"
    assert cfg.data.max_tokens_per_micro_batch == 4096 and cfg.trainer.resume == "never"
    assert cfg.trainer.logger == ["console", "jsonl"] and cfg.trainer.max_steps == 2 and cfg.trainer.save_freq == 0


# ------------------------------------------------------------------------------------------------------------------
# Keys whose meaning depends on another: the same result in either order.


@pytest.mark.parametrize("reverse", [False, True])
def test_resume_mode_and_path(reverse):
    def resume(*args):
        return load_config(None, list(reversed(args)) if reverse else list(args)).trainer.resume

    assert resume("trainer.resume_mode=resume_path", "trainer.resume_from_path=/c/step_5") == "/c/step_5"
    assert resume("trainer.resume_mode=auto", "trainer.resume_from_path=/c/step_5") == "/c/step_5"
    assert resume("trainer.resume_mode=disable", "trainer.resume_from_path=/c/step_5") == "never"


@pytest.mark.parametrize("reverse", [False, True])
def test_token_budget_depends_on_sp_and_dynamic_bsz(reverse):
    def tokens(*args):
        return load_config(None, list(reversed(args)) if reverse else list(args)).data.max_tokens_per_micro_batch

    assert tokens("data.max_token_len_per_gpu=1000", "ulysses_sequence_parallel_size=4") == 4000
    assert tokens("data.max_token_len_per_gpu=1000", "trainer.sp_size=2") == 2000
    assert tokens("data.max_token_len_per_gpu=1000", "data.use_dynamic_bsz=false") == 0
    assert tokens("data.max_token_len_per_gpu=1000", "data.use_dynamic_bsz=true") == 1000


@pytest.mark.parametrize("reverse", [False, True])
def test_pad_mode_wins_over_use_remove_padding(reverse):
    args = ["data.pad_mode=right", "model.use_remove_padding=true"]
    assert load_config(None, args[::-1] if reverse else args).data.packing is False


def test_model_dtype_keeps_an_explicit_model_dtype():
    assert load_config(None, ["model.dtype=fp32", "model.fsdp_config.model_dtype=fp32"]).model.dtype == "fp32"


def test_offload_keeps_an_explicit_strategy():
    cfg = load_config(None, ["trainer.strategy=ddp", "engine.param_offload=true"])
    assert cfg.trainer.offload and cfg.trainer.strategy == "ddp"  # left to parallel.py to explain


def test_default_local_dir_resolves_verls_interpolation():
    cfg = load_config(None, ["trainer.project_name=p", "trainer.experiment_name=e",
                             "trainer.default_local_dir=checkpoints/${trainer.project_name}/${trainer.experiment_name}"])  # fmt: skip
    assert cfg.trainer.output_dir == "checkpoints/p/e"


def test_model_strategy_fsdp_and_megatron():
    assert load_config(None, ["model.strategy=fsdp"]).trainer.strategy == "fsdp2"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.strategy=megatron"])
    msg = str(e.value)
    assert msg.startswith("verl key model.strategy='megatron' is not supported:")
    assert "Megatron" in msg and "trainer.strategy=fsdp2" in msg and "trainer.sp_size" in msg


def test_refused_key_message_says_what_to_set():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.prompt_dict_keys=['question']"])
    assert str(e.value) == (
        "verl key data.prompt_dict_keys=['question'] is not supported: prompts are read from a top-level column only "
        "(data.prompt_key): copy the nested field into a column of its own (e.g. df['question'] = "
        "df['extra_info'].str['question'] in pandas) and set data.prompt_key to it."
    )


def test_wrong_type_names_the_verl_key():
    with pytest.raises(ConfigError, match=r"verl key data\.train_max_samples='many': wrong type"):
        load_config(None, ["data.train_max_samples=many"])


# ------------------------------------------------------------------------------------------------------------------
# names_model: does the command line name a model (else `sftforge train` runs the built-in demo)?


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["model.partial_pretrain=/m", "data.train_files=/d.parquet"], True),
        (["+model.path=/m"], True),
        (["model.path=/m"], True),
        (["model={path: /m}"], True),
        (["data.train_files=/d.parquet", "trainer.max_steps=3"], False),
        ([], False),
        (["model.path="], False),
        (["model.partial_pretrain=null"], False),
        (["model.path=/m", "model.path="], False),  # the last one wins, as in load_config
        (["model.tokenizer_path=/m"], False),
        (["not-an-override", "model.partial_pretrain=/m"], True),
    ],
)
def test_names_model(overrides, named, capsys):
    assert names_model(overrides) is named
    assert capsys.readouterr().err == ""  # no info lines


def test_cli_train_with_verls_model_key_trains_not_the_demo(tmp_path, capsys, monkeypatch):
    """`sftforge train model.partial_pretrain=... data.train_files=...` (no config file) is a training run: it fails on
    the missing model folder instead of starting the built-in demo."""
    from sftforge import demo
    from sftforge.cli import main

    def no_demo(overrides):
        raise AssertionError(f"the demo ran for {overrides}")

    monkeypatch.setattr(demo, "run_demo", no_demo)
    rc = main(["train", f"model.partial_pretrain={tmp_path / 'no-model'}", f"data.train_files={tmp_path / 'd.parquet'}",
               f"trainer.default_local_dir={tmp_path / 'out'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and ("no-model" in err or "d.parquet" in err), err
    with pytest.raises(AssertionError, match="the demo ran"):  # the guard works: no model under any name -> demo
        main(["train", "trainer.max_steps=1"])


def test_names_model_has_no_side_effects():
    names_model(["trainer.project_name=p", "model.partial_pretrain=/m"])
    assert "WANDB_PROJECT" not in os.environ


# ------------------------------------------------------------------------------------------------------------------
# YAML files


def test_aliases_in_yaml_nested_sections(tmp_path):
    p = tmp_path / "verl.yaml"
    p.write_text(
        "data:\n  micro_batch_size: 2\n  multiturn:\n    enable: true\n    messages_key: msgs\n"
        "model:\n  partial_pretrain: some/model\n  use_remove_padding: true\n"
        "trainer:\n  default_local_dir: out\n  total_training_steps: 7\n"
        "use_remove_padding: true\nulysses_sequence_parallel_size: 1\n"
    )
    cfg = load_config(p)
    assert cfg.data.micro_batch_size_per_gpu == 2 and cfg.data.messages_key == "msgs"
    assert cfg.model.path == "some/model" and cfg.trainer.output_dir == "out" and cfg.trainer.max_steps == 7


def test_verl_sections_in_yaml(tmp_path):
    p = tmp_path / "verl.yaml"
    p.write_text(
        "defaults:\n  - optim: fsdp\n  - _self_\n"
        "data:\n  train_batch_size: 32\n  micro_batch_size: null\n  micro_batch_size_per_gpu: 4\n"
        "  custom_cls: {path: null, name: null}\n  multiturn: {enable: true, enable_thinking_key: enable_thinking}\n"
        "model:\n  partial_pretrain: some/model\n  lora_rank: 8\n  strategy: fsdp2\n"
        "  fsdp_config:\n    model_dtype: fp32\n    wrap_policy: {min_num_params: 0}\n    cpu_offload: false\n"
        "    offload_params: false\n"
        "engine: {strategy: fsdp, _target_: verl.workers.config.FSDPEngineConfig}\n"
        "optim: {lr: 1.0e-5, lr_scheduler_type: constant, warmup_style: null}\n"
        "trainer:\n  project_name: p\n  experiment_name: e\n"
        "  default_local_dir: checkpoints/${trainer.project_name}/${trainer.experiment_name}\n"
        "  save_freq: -1\n  max_ckpt_to_keep: null\n  resume_mode: auto\n  resume_from_path: null\n"
        "  checkpoint: {save_contents: [model, optimizer, extra], load_contents: '${trainer.checkpoint.save_contents}'}\n"
    )
    cfg = load_config(p, ["trainer.resume_mode=disable"])
    assert cfg.model.path == "some/model" and cfg.model.lora.rank == 8 and cfg.model.dtype == "bf16"
    assert cfg.trainer.strategy == "fsdp2" and cfg.optim.lr_scheduler == "constant"
    assert cfg.trainer.output_dir == "checkpoints/p/e" and cfg.trainer.save_freq == 0
    assert cfg.trainer.resume == "never" and cfg.data.micro_batch_size_per_gpu == 4
    p.write_text("engine:\n  strategy: fsdp\n  tensor_model_parallel_size: 2\n")
    with pytest.raises(ConfigError, match="verl key engine.tensor_model_parallel_size=2"):
        load_config(p)


def test_verl_textcraft_example_matches_the_native_one():
    verl = load_config(ROOT / "examples" / "textcraft_verl.yaml")
    ours = load_config(ROOT / "examples" / "textcraft_qwen3.yaml")
    for key in ("data.train_batch_size", "data.micro_batch_size_per_gpu", "data.max_length", "optim.lr",
                "optim.warmup_ratio", "optim.lr_scheduler", "trainer.total_epochs", "data.packing"):  # fmt: skip
        assert _get(verl, key) == _get(ours, key), key


# verl-recipe 21892b9 retool/run_qwen2_7b_dapo.sh, its overrides as written (shell variables given their values)
RETOOL_7B = """
algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False algorithm.kl_ctrl.kl_coef=0.0
data.train_files=['dapo.parquet'] data.val_files=['aime_2025.parquet','aime_2024.parquet'] data.return_raw_chat=True
data.train_batch_size=64 data.max_prompt_length=2048 data.max_response_length=16384 data.filter_overlong_prompts=True
data.truncation=error data.custom_cls.path=null
custom_reward_function.path=recipe/retool/retool.py custom_reward_function.name=compute_score
actor_rollout_ref.model.path=/models/multiturn-sft-qwen-2.5-7b-instruct/global_step_372
actor_rollout_ref.model.use_remove_padding=True actor_rollout_ref.model.enable_gradient_checkpointing=True
actor_rollout_ref.actor.use_kl_loss=False actor_rollout_ref.actor.kl_loss_coef=0.0
actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28
actor_rollout_ref.actor.clip_ratio_c=10.0 actor_rollout_ref.actor.optim.lr=1e-6
actor_rollout_ref.actor.use_dynamic_bsz=True actor_rollout_ref.actor.ppo_mini_batch_size=16
actor_rollout_ref.actor.ppo_max_token_len_per_gpu=18432 actor_rollout_ref.actor.ulysses_sequence_parallel_size=4
actor_rollout_ref.actor.fsdp_config.param_offload=True actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=73728 actor_rollout_ref.rollout.name=vllm
actor_rollout_ref.rollout.mode=async actor_rollout_ref.rollout.tensor_model_parallel_size=4
actor_rollout_ref.rollout.multi_turn.enable=True actor_rollout_ref.rollout.multi_turn.max_user_turns=16
actor_rollout_ref.rollout.multi_turn.max_assistant_turns=16 actor_rollout_ref.rollout.multi_turn.tool_config_path=TOOLS
actor_rollout_ref.rollout.multi_turn.format=hermes actor_rollout_ref.rollout.gpu_memory_utilization=0.9
actor_rollout_ref.rollout.n=16 actor_rollout_ref.rollout.val_kwargs.top_p=0.6
actor_rollout_ref.rollout.val_kwargs.temperature=1.0 actor_rollout_ref.rollout.val_kwargs.n=30
trainer.logger=['console','wandb'] trainer.project_name=retool trainer.experiment_name=qwen2.5-7b_dapo
trainer.n_gpus_per_node=8 trainer.val_before_train=True trainer.log_val_generations=20 trainer.nnodes=1
trainer.save_freq=20 trainer.default_local_dir=/ckpt/retool trainer.test_freq=10 trainer.total_epochs=1
"""
SANDBOX_FUSION_TOOLS = """tools:
  - class_name: "recipe.retool.retool.CustomSandboxFusionTool"
    config:
      sandbox_fusion_url: "http://localhost:8080/run_code"
      num_workers: 128
      enable_global_rate_limit: true
      rate_limit: 128
      default_timeout: 30
      default_language: "python"
      memory_limit_mb: 1024
      type: native
    tool_schema:
      type: "function"
      function:
        name: "code_interpreter"
        description: "A tool for executing code."
        parameters: {type: "object", properties: {code: {type: "string", description: "The code to execute."}},
                     required: ["code"]}
"""


def test_verls_retool_dapo_script_reads_as_is(tmp_path, capsys):
    """Every key of the ReTool DAPO script is mapped or explained; its SandboxFusion tool config becomes the code_math
    environment on that server; the RL meaning of data.train_batch_size (prompts per step) is kept."""
    tools = tmp_path / "sandbox_fusion_tool_config.yaml"
    tools.write_text(SANDBOX_FUSION_TOOLS)
    cfg = load_config(None, shlex.split(RETOOL_7B.replace("TOOLS", str(tools))))
    assert (cfg.model.path, cfg.algorithm.reward, cfg.rollout.max_turns) == (
        "/models/multiturn-sft-qwen-2.5-7b-instruct/global_step_372",
        "code_math",
        16,
    )
    assert (cfg.rollout.n, cfg.rollout.prompts_per_step, cfg.algorithm.mini_batches) == (16, 64, 4)
    assert (cfg.rollout.val_n, cfg.rollout.val_temperature, cfg.rollout.val_top_p) == (30, 1.0, 0.6)
    assert (cfg.algorithm.clip_ratio_low, cfg.algorithm.clip_ratio_high, cfg.algorithm.clip_ratio_c) == (0.2, 0.28, 10)
    assert cfg.algorithm.kl_coef == 0.0 and cfg.data.max_length == 2048 + 16384
    assert cfg.data.truncation == "drop"  # verl filters overlong prompts before its data.truncation=error applies
    assert (cfg.sandbox.backend, cfg.sandbox.fusion_url) == ("fusion", "http://localhost:8080/run_code")
    assert (cfg.sandbox.wall_time_s, cfg.sandbox.memory_mb, cfg.sandbox.max_concurrent) == (30, 1024, 128)
    assert cfg.trainer.val_before_train and cfg.trainer.test_freq == 10 and cfg.data.max_tokens_per_micro_batch == 18432
    err = capsys.readouterr().err
    assert (
        "info: verl key actor_rollout_ref.rollout.name='vllm' ignored: rollouts run with transformers generate" in err
    )
    assert "info: verl key data.train_batch_size=64 -> data.train_batch_size=64, rollout.prompts_per_step=64" in err


def test_rl_scripts_train_batch_size_is_prompts_per_step_but_sft_keeps_its_meaning(capsys):
    assert load_config(None, ["data.train_batch_size=64"]).rollout.prompts_per_step == 8  # an SFT config: silent
    assert capsys.readouterr().err == ""
    rl = load_config(None, ["data.train_batch_size=64", "actor_rollout_ref.rollout.n=4"])
    assert rl.rollout.prompts_per_step == 64 and rl.data.train_batch_size == 64


def test_the_docs_have_the_rl_key_table():
    from sftforge.config import verl_rl_table

    assert verl_rl_table() in (ROOT / "docs" / "verl.md").read_text()


@pytest.mark.parametrize("order", [0, 1])
def test_filter_overlong_prompts_drops_whatever_the_order_of_data_truncation(order):
    keys = ["data.filter_overlong_prompts=true", "data.truncation=left"]
    assert load_config(None, keys[::-1] if order else keys).data.truncation == "drop"
    assert load_config(None, ["data.filter_overlong_prompts=false", "data.truncation=left"]).data.truncation == "left"


def test_sftforge_plan_reads_the_retool_script(tmp_path, model_config_dir, tokenizer_dirs, capsys):
    """`sftforge plan` on the pasted ReTool DAPO script (its data in verl's parquet layout): the rollout sizes of the
    script, and the two settings sftforge rl refuses today (offload, Ulysses) as errors, as `sftforge rl` would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sftforge.cli import main

    tools = tmp_path / "sandbox_fusion_tool_config.yaml"
    tools.write_text(SANDBOX_FUSION_TOOLS)
    rows = [{"data_source": "aime", "prompt": [{"role": "user", "content": f"Compute {i} * 7."}],
             "reward_model": {"style": "rule", "ground_truth": str(7 * i)}} for i in range(128)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:30]), tmp_path / "aime.parquet")
    script = RETOOL_7B.replace("TOOLS", str(tools)).replace("['dapo.parquet']", str(tmp_path / "dapo.parquet"))
    script = script.replace("['aime_2025.parquet','aime_2024.parquet']", str(tmp_path / "aime.parquet"))
    args = [*shlex.split(script), f"actor_rollout_ref.model.path={model_config_dir / 'qwen3-tiny'}",
            f"model.tokenizer_path={tokenizer_dirs['qwen2.5']}", "trainer.logger=[console]"]  # fmt: skip
    assert main(["plan", *args, "--json", "--gpu-memory", "80GB"]) == 2
    p = json.loads(capsys.readouterr().out)
    assert (p["prompts"], p["prompts_per_step"], p["responses_per_step"], p["world_size"]) == (128, 64, 1024, 8)
    assert (p["steps_per_epoch"], p["total_steps"], p["optimizer_steps"]) == (2, 2, 8)
    assert p["sequence_tokens_max"] == 2048 + 16384 and p["max_turns"] == 16 and p["val_responses"] == 30 * 30
    assert p["num_validations"] == 1 + 1 and p["memory"]["sharded_over"] == 8
    assert any("trainer.offload" in e for e in p["errors"]) and any("trainer.sp_size" in e for e in p["errors"])
    assert any("SandboxFusion server" in n for n in p["notes"])
