"""``sftforge rl``: GRPO / DAPO on verifiable rewards, from an SFT checkpoint.

One RL step: take ``rollout.prompts_per_step`` prompts (data.train_files rows; the prompt is each row minus its last
assistant turn, which is the reference, as in ``sftforge eval``), sample ``rollout.n`` responses for each with the
current policy, score them with the eval scorer ``algorithm.reward`` (plus DAPO's optional overlong penalty), turn
the rewards into group-relative advantages, drop the groups whose rewards are all equal (dynamic sampling), and
take ``algorithm.mini_batches`` optimizer steps on the clipped token-level objective (grpo.py). Responses are trained
exactly like SFT samples: prompt tokens masked, response tokens trained, logits only at trained positions.

Everything else is the SFT trainer's: the config system, model loading (LoRA/freezing included), AdamW and the
learning-rate schedule, packing/collate, atomic checkpoints with ``trainer.resume``, metrics.jsonl and the HF export
in ``final/``. Sampling is seeded from (trainer.seed, step), so a resumed run samples the same responses as an
uninterrupted one and ends with the same weights.

Multi-turn (``rollout.max_turns`` > 1, ``algorithm.reward`` an environment such as textcraft): each prompt row is an
environment task; ``rollout.n`` episodes per task are played with the sampling policy (tool calls -> observations,
envs/), the episode's success is its reward, and the finished conversation is rendered ONCE with the chat template
and masked exactly like SFT data (assistant turns trained; the task prompt and every observation not).

Several processes (torchrun; trainer.strategy ddp or fsdp2, auto picks as for SFT): each process samples and trains
its share of the groups (every mini-batch split evenly, see :func:`my_groups`), each group is sampled with its own
seed, the token-level loss is divided by the trained-token count over all processes, and the wrapper sums the
gradients — so 2 processes give the same weights as 1. Rollouts use transformers ``generate`` (CPU or GPU) on
:class:`RolloutWeights`: the trained model itself, or under FSDP2 a full copy refreshed from the shards before every
step. A vLLM backend is not implemented (it needs a CUDA machine to be built and tested against).
"""

from __future__ import annotations

import copy
import math
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch

from sftforge import faults
from sftforge.batching import epoch_order
from sftforge.chat import RowError, end_of_turn_token_ids, render_prompt, template_markers
from sftforge.config import Config, ConfigError
from sftforge.data import load_tokenizer, read_rows, resolve_files, tokenize_row
from sftforge.distributed import Lockstep, all_reduce_sum
from sftforge.envs import rollout
from sftforge.evaluation import (
    count_metrics,
    environment,
    evaluate_env,
    evaluate_samples,
    file_rows,
    row_source,
    samples_from_rows,
)
from sftforge.generation import GenerationOptions, Generator, HFBackend, cut_at_stop
from sftforge.generation import pad_id as pad_token
from sftforge.grpo import group_advantages, informative_groups, overlong_penalty, policy_loss_sum, token_advantages
from sftforge.loss import supervised_logprobs
from sftforge.metrics import check_loggers
from sftforge.model import autocast, compute_dtype, load_model
from sftforge.optim import lr_at, set_lr
from sftforge.packing import MicroBatch, collate, split_to_budget
from sftforge.parallel import grad_scale, no_grad_sync, prepare_reference
from sftforge.run import NonFiniteGuard, Run, Signals, Validator, check_paths, clip_gradients, data_fingerprint
from sftforge.scorers import ENV_TASKS, as_score, get_scorer

ROLLOUT_BACKENDS = ("hf",)


@dataclass
class Prompt:
    id: str
    ids: list[int]
    sample: Any  # scorers.EvalSample: messages, tools, reference


@dataclass
class Response:
    """One sampled response (single-turn) or episode (multi-turn), ready to train like an SFT sample."""

    input_ids: list[int]
    loss_mask: list[int]
    """1 on the policy's own tokens (the response; every assistant turn of an episode), 0 on prompt/observations."""
    reward: float
    generated: int
    """Tokens the policy generated (all turns)."""
    truncated: bool
    """Hit rollout.max_response_length (single-turn) or data.max_length (episode) before its end."""


def load_prompts(cfg: Config, tokenizer) -> tuple[list[Prompt], dict[str, int]]:
    """Prompts of data.train_files with data.truncation applied up front; returns (prompts, counts)."""

    d = cfg.data
    rows = [pair for f in resolve_files(d.train_files, "data.train_files") for pair in read_rows(f)]
    samples = samples_from_rows(rows, d, "last")
    prompts, counts = [], {"rows": len(rows), "over_max_length": 0, "truncated": 0, "dropped": 0}
    for s in samples:
        ids = tokenizer(
            render_prompt(tokenizer, s.messages, s.tools, d.chat_template_kwargs), add_special_tokens=False
        )["input_ids"]
        if len(ids) > d.max_length:
            counts["over_max_length"] += 1
            if d.truncation == "error":
                raise ConfigError(
                    f"data.train_files: prompt {s.id} has {len(ids)} tokens, more than data.max_length="
                    f"{d.max_length}. Raise data.max_length, or set data.truncation=left (keep the end of the prompt) "
                    "or drop."
                )
            if d.truncation == "drop":
                counts["dropped"] += 1
                continue
            ids = ids[-d.max_length :] if d.truncation == "left" else ids[: d.max_length]
            counts["truncated"] += 1
        prompts.append(Prompt(s.id, ids, s))
    if not prompts:
        raise ConfigError("data.train_files has no prompts left (every row was dropped by data.truncation=drop).")
    return prompts, counts


def check_rl_config(cfg: Config, world_size: int = 1) -> None:
    r, a = cfg.rollout, cfg.algorithm
    if r.backend not in ROLLOUT_BACKENDS:
        raise ConfigError(
            f"rollout.backend={r.backend!r}: supported today: {' | '.join(ROLLOUT_BACKENDS)} (the model "
            "in memory; its engine keeps each episode's KV cache across turns). vLLM rollouts with "
            "weights synced from the trainer are not wired into `sftforge rl` yet; `sftforge eval "
            "--backend vllm` evaluates a saved model with vLLM."
        )
    if r.n < 2:
        raise ConfigError(f"rollout.n={r.n}: group-relative advantages need at least 2 responses per prompt.")

    if r.max_turns < 1:
        raise ConfigError(f"rollout.max_turns={r.max_turns} must be >= 1.")
    if r.max_turns > 1 and a.reward not in ENV_TASKS:
        raise ConfigError(
            f"rollout.max_turns={r.max_turns} runs episodes in an environment: set algorithm.reward to one of "
            f"{' | '.join(ENV_TASKS)} (the episode's success is the reward), or rollout.max_turns=1."
        )
    if r.max_turns == 1 and a.reward in ENV_TASKS:
        raise ConfigError(f"algorithm.reward={a.reward} is an environment: set rollout.max_turns > 1 (e.g. 40).")
    if a.mini_batches < 1 or r.prompts_per_step % (a.mini_batches * world_size):
        raise ConfigError(
            f"rollout.prompts_per_step ({r.prompts_per_step}) must be a multiple of algorithm.mini_batches "
            f"({a.mini_batches}) × processes ({world_size}): every optimizer step trains whole groups, the same number "
            "on every process."
        )
    if a.clip_ratio_low < 0 or a.clip_ratio_high < 0 or a.clip_ratio_low >= 1:
        raise ConfigError("algorithm.clip_ratio_low must be in [0, 1) and algorithm.clip_ratio_high >= 0.")
    if r.val_n > 1 and r.val_temperature == 0:
        raise ConfigError(
            f"rollout.val_n={r.val_n} answers per validation prompt need sampling: set "
            "rollout.val_temperature > 0 (e.g. 1.0; verl's val_kwargs.temperature), or rollout.val_n=1."
        )
    t = cfg.trainer
    if (t.test_freq > 0 or t.val_before_train) and not cfg.data.val_files:
        raise ConfigError(
            "trainer.test_freq / trainer.val_before_train validate on data.val_files, which is empty: set "
            "data.val_files (prompts with their answers, e.g. verl's RL parquet), or trainer.test_freq=0."
        )


def my_groups(k: int, mini_batches: int, world_size: int, rank: int) -> list[int]:
    """Indices (in the step's prompt list) of this process's groups. Mini-batch m = the groups g with g % M == m;
    group g belongs to process (g // M) % world, so every process holds the same number of groups of every mini-batch
    and the union over processes is the one-process step."""
    return [g for g in range(k) if (g // mini_batches) % world_size == rank]


def step_prompts(prompts: list, step: int, cfg: Config) -> list:
    """The prompts of RL step ``step``: consecutive slices of a per-epoch shuffle (trainer.seed + epoch)."""

    k = cfg.rollout.prompts_per_step
    per_epoch = max(1, len(prompts) // k)
    epoch, b = divmod(step, per_epoch)
    order = epoch_order(len(prompts), cfg.trainer.seed, epoch, cfg.data.shuffle)
    return [prompts[int(i)] for i in order[b * k : (b + 1) * k]]


class Sampler:
    """``rollout.n`` sampled responses per prompt with transformers generate, cut at the end-of-turn token."""

    def __init__(self, model, tokenizer, cfg: Config):

        self.tokenizer, self.cfg = tokenizer, cfg
        pad = pad_token(tokenizer)
        self.backend = HFBackend(model, pad, cfg.model.dtype, cfg.rollout.kv_cache)
        r = cfg.rollout
        self.opts = GenerationOptions(
            max_new_tokens=r.max_response_length,
            temperature=r.temperature,
            top_p=r.top_p,
            do_sample=True,
            batch_size=max(1, r.n * r.prompts_per_step),
        )
        self.stop_ids = end_of_turn_token_ids(tokenizer, cfg.data.chat_template_kwargs)

    def sample(self, prompts: list[Prompt], seeds: list[int]) -> list[list[tuple[list[int], str, bool]]]:
        """``rollout.n`` responses per prompt, each prompt's group sampled with its own seed (so a group's responses
        do not depend on which other prompts share the process)."""
        n = self.cfg.rollout.n
        if self.backend.engine is not None:
            self.backend.engine.reset()  # a new step: keys and values of the last step's weights are stale
        groups = []
        for prompt, seed in zip(prompts, seeds):
            self.opts.seed = seed
            raw = self.backend.generate([prompt.ids] * n, self.opts, self.stop_ids)  # its own RNG (seeded)
            group = []
            for toks in raw:
                ids, body, stopped = cut_at_stop(toks, self.stop_ids)
                group.append((ids, self.tokenizer.decode(body, skip_special_tokens=False), not stopped))
            groups.append(group)
        return groups


def score_groups(groups, prompts: list[Prompt], cfg: Config, scorer) -> list[list[Response]]:

    a, r = cfg.algorithm, cfg.rollout
    out = []
    for prompt, group in zip(prompts, groups):
        scored = []
        for ids, text, truncated in group:
            reward = as_score(scorer(text, prompt.sample))["score"]
            if a.overlong_buffer > 0:
                length = torch.tensor([len(ids)])
                reward += float(
                    overlong_penalty(length, r.max_response_length, a.overlong_buffer, a.overlong_penalty)[0]
                )
            mask = [0] * len(prompt.ids) + [1] * len(ids)
            scored.append(Response(prompt.ids + ids, mask, reward, len(ids), truncated))
        out.append(scored)
    return out


# ---- multi-turn episodes (rollout.max_turns > 1) ---------------------------------------------------------------------


def load_env_tasks(cfg: Config, check: bool = True):
    """(tasks, make_env, workers) of the environment algorithm.reward from the rows of data.train_files; ``check``:
    the environment's sandbox too."""

    rows = [pair for f in resolve_files(cfg.data.train_files, "data.train_files") for pair in read_rows(f)]
    return environment(cfg.algorithm.reward, rows, cfg, check)


def episode_response(episode, tokenizer, cfg: Config, markers) -> Response | None:
    """An episode's conversation rendered ONCE with the chat template, masked exactly like SFT data: every assistant
    turn trained, the first prompt and every observation (tool / user message) not. Longer than data.max_length: the
    first data.max_length tokens (counted as truncated). None when the conversation cannot be rendered."""

    row = {"messages": episode.messages, "tools": episode.tools}
    try:
        sample = tokenize_row(episode.task_id, row, tokenizer, cfg.data, markers)
    except RowError:
        return None
    ids, mask, cut = sample.input_ids, sample.loss_mask, len(sample.input_ids) > cfg.data.max_length
    if cut:
        ids, mask = ids[: cfg.data.max_length], mask[: cfg.data.max_length]
    generated = sum(getattr(g, "n_tokens", 0) for g in episode.generations)
    return Response(ids, mask, float(episode.success), generated, cut)


class EpisodeSampler:
    """``rollout.n`` episodes per task in the environment, the policy sampling each turn with transformers generate."""

    def __init__(self, model, tokenizer, cfg: Config, make_env, workers: int = 1):

        r = cfg.rollout
        pad = pad_token(tokenizer)
        opts = GenerationOptions(
            max_new_tokens=r.max_response_length,
            temperature=r.temperature,
            top_p=r.top_p,
            do_sample=True,
            batch_size=max(1, r.n * r.prompts_per_step),
        )
        self.generator = Generator(
            HFBackend(model, pad, cfg.model.dtype, cfg.rollout.kv_cache), tokenizer, opts, cfg.data.chat_template_kwargs
        )
        self.tokenizer, self.cfg, self.make_env, self.workers = tokenizer, cfg, make_env, workers
        self.markers = template_markers(tokenizer, cfg.data.chat_template_kwargs)
        self.unrenderable = 0

    def sample(self, tasks: list, seeds: list[int]) -> list[list[Response]]:

        n = self.cfg.rollout.n
        if self.generator.backend.engine is not None:
            self.generator.backend.engine.reset()  # a new step: keys and values of the last step's weights are stale
        groups = []
        for task, seed in zip(tasks, seeds):
            self.generator.opts.seed = seed
            with torch.random.fork_rng(devices=[]):  # the environment's own draws, if any
                episodes = rollout(
                    self.make_env,
                    [task] * n,
                    self.generator.chat,
                    max_turns=self.cfg.rollout.max_turns,
                    workers=self.workers,
                )
            group = []
            for ep in episodes:
                resp = episode_response(ep, self.tokenizer, self.cfg, self.markers)
                if resp is None:
                    self.unrenderable += 1
                    resp = Response([], [], 0.0, 0, False)  # keeps the group's shape; trains nothing
                group.append(resp)
            groups.append(group)
        return groups


class RolloutWeights:
    """The weights rollouts sample with.

    One process or DDP: the trained model itself (every process holds all of it). FSDP2: a plain copy of the model on
    every process, in the compute dtype and without gradients, refreshed from the shards by :meth:`sync` before each
    step's rollouts. Rollouts cannot run on the sharded model: each of its forwards is a collective (the layer's
    all-gather), and processes generate different numbers of tokens. The copy costs one full set of weights per
    process; the refresh gathers one parameter at a time (never the whole model twice), all of them the first time and
    then only the trainable ones (LoRA: the frozen base is gathered once, not every step)."""

    def __init__(self, model: torch.nn.Module, sharded: bool, dtype: torch.dtype):
        self.sharded, self.synced = sharded, False
        self.module = model
        if sharded:  # before fully_shard turns the parameters into shards
            self.module = copy.deepcopy(model).requires_grad_(False)
            for p in self.module.parameters():  # the weights only: buffers (RoPE's inv_freq) keep their fp32
                p.data = p.data.to(dtype)

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s current weights (FSDP2 shards: gathered) into the rollout copy. Collective under FSDP2:
        every process calls it at the same point."""
        if not self.sharded:
            return
        mine = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad or not self.synced:  # the same on every process: the collectives stay in step
                mine[name].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)
        self.synced = True


@torch.no_grad()
def _logprobs(forward, micro_batches, ranks: int, dummy) -> list[torch.Tensor]:
    """log π at the trained positions of each micro-batch. ``ranks`` processes run them in lockstep (FSDP2's forward
    is a collective): a process with fewer micro-batches runs the ``dummy`` one until the busiest is done."""
    return [forward(mb)[0] for _, mb, _ in Lockstep(micro_batches, ranks, lambda: dummy)][: len(micro_batches)]


@dataclass
class StepContext:
    """What every RL step trains with: ``engine`` is the model under its strategy (parallel.build_engine: behaviour
    log-probs and the loss), ``model`` the HF module under it (gradient clipping), ``ref_model`` an unwrapped copy in
    eval mode (reference log-probs for the KL term) or None; ``guard`` (run.NonFiniteGuard) decides what a non-finite
    update does (trainer.nan_policy), without one it is skipped. The rest is derived once: the device, the factor on
    the loss, and the weight-0 micro-batch of a process with fewer micro-batches than the busiest."""

    engine: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ref_model: torch.nn.Module | None
    cfg: Config
    pad_id: int
    world_size: int = 1
    guard: NonFiniteGuard | None = None

    def __post_init__(self):
        c = self.cfg
        self.device = next(self.model.parameters()).device
        self.scale = grad_scale(self.engine, self.world_size)  # the wrappers average over processes; the loss sums
        self.mask_dtype = compute_dtype(c.model.dtype)
        pad = self.pad_id
        self.dummy = collate([([pad, pad], [0, 1])], c.data.packing, c.model.attn_implementation, pad, self.mask_dtype)
        self.dummy = self.dummy.to(self.device)

    def batch(self, seqs: list[tuple]) -> MicroBatch:
        """One micro-batch of (input_ids, loss_mask, advantage) sequences, on the device."""
        c = self.cfg
        pairs = [(s[0], s[1]) for s in seqs]
        return collate(pairs, c.data.packing, c.model.attn_implementation, self.pad_id, self.mask_dtype).to(self.device)


@dataclass
class MiniBatch:
    """One optimizer step's share of this process: its micro-batches as sequences (input_ids, loss_mask, advantage)
    and collated, the trained-token count of all processes, and the log-probs of the behaviour policy (``old``) and of
    the reference model (``ref``, None without the KL term) per micro-batch."""

    micro: list[list[tuple]]
    batches: list[MicroBatch]
    n_tok: float
    old: list[torch.Tensor]
    ref: list[torch.Tensor] | None


@dataclass
class StepTotals:
    """This process's sums over the updates of a step, reduced over processes by :meth:`metrics`."""

    loss: float = 0.0
    tokens: int = 0
    clipped: int = 0
    entropy: float = 0.0
    kl: float = 0.0
    grad_norm: float = 0.0  # the largest of the step's updates
    updates: int = 0
    calls: int = 0  # micro-batches run so far (fault injection's index)

    def metrics(self) -> dict[str, Any]:
        loss, tokens, clipped, ent, kl = all_reduce_sum(self.loss, self.tokens, self.clipped, self.entropy, self.kl)
        t = max(tokens, 1)
        out = {
            "loss": loss / t,
            "grad_norm": self.grad_norm,
            "clip_fraction": clipped / t,
            "entropy": ent / t,
            "kl": kl / t,
            "trained_tokens": int(tokens),
            "updates": self.updates,
        }
        if self.updates == 0:
            out["skipped"] = True
        return out


def reward_metrics(groups: list[list[Response]], cfg: Config) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(advantages, keep, metrics): the group-relative advantages, the groups dynamic sampling keeps (those whose
    rewards differ) and the reward statistics over all processes."""
    a = cfg.algorithm
    rewards = torch.tensor([[resp.reward for resp in g] for g in groups], dtype=torch.float32).reshape(len(groups), -1)
    adv = group_advantages(rewards, a.scale_by_std) if len(groups) else rewards
    keep = torch.ones(len(groups), dtype=torch.bool)
    if a.dynamic_sampling and len(groups):
        keep = informative_groups(rewards)
    r_sum, r_sq, n_resp, solved, kept, gen, cut = all_reduce_sum(
        float(rewards.sum()),
        float((rewards**2).sum()),
        float(rewards.numel()),
        float((rewards.max(dim=1).values >= 1.0).sum()) if len(groups) else 0.0,
        float(keep.sum()),
        float(sum(r.generated for g in groups for r in g)),
        float(sum(r.truncated for g in groups for r in g)),
    )
    n_groups = n_resp / max(cfg.rollout.n, 1)
    mean = r_sum / max(n_resp, 1)
    metrics: dict[str, Any] = {
        "reward_mean": mean,
        "reward_std": math.sqrt(max(r_sq / max(n_resp, 1) - mean * mean, 0.0)),
        "solved_groups": solved / max(n_groups, 1),
        "kept_groups": int(kept),
        "response_length": gen / max(n_resp, 1),
        "truncated_responses": int(cut),
    }
    return adv, keep, metrics


def plan_mini_batches(ctx: StepContext, groups, group_ids: list[int], adv, keep) -> list[MiniBatch]:
    """The step's algorithm.mini_batches mini-batches: mini-batch m trains the kept groups g with g % M == m, as
    micro-batches of data.micro_batch_size_per_gpu sequences (split further under data.max_tokens_per_micro_batch);
    one whose groups were all dropped, on every process, is left out. The behaviour log-probs are taken here, all
    BEFORE the first update of the step: later mini-batches are off-policy and the clipped ratio keeps them close."""
    a, d = ctx.cfg.algorithm, ctx.cfg.data
    plan = []
    for m in range(a.mini_batches):
        seqs = [
            (resp.input_ids, resp.loss_mask, float(adv[i, j]))
            for i, g in enumerate(group_ids)
            if g % a.mini_batches == m and bool(keep[i])
            for j, resp in enumerate(groups[i])
            if any(resp.loss_mask[1:])
        ]
        micro = []
        for k in range(0, len(seqs), d.micro_batch_size_per_gpu):
            part = seqs[k : k + d.micro_batch_size_per_gpu]
            for group in split_to_budget([len(x[0]) for x in part], d.max_tokens_per_micro_batch, d.packing):
                micro.append([part[i] for i in group])
        (n_tok,) = all_reduce_sum(float(sum(sum(s[1][1:]) for s in seqs)))  # trained positions of all processes
        if n_tok == 0:
            continue  # every group of this mini-batch was dropped, on every process
        batches = [ctx.batch(mb) for mb in micro]
        plan.append(MiniBatch(micro, batches, n_tok, *behaviour_logprobs(ctx, batches)))
    return plan


def behaviour_logprobs(
    ctx: StepContext, batches: list[MicroBatch]
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """(old, ref): the log-probs of the policy as it sampled (the engine in eval mode; a collective under FSDP2) and of
    the reference model (None without one)."""
    engine, chunk = ctx.engine, ctx.cfg.model.loss_chunk_size
    was = engine.training
    engine.eval()
    try:
        with autocast(ctx.cfg.model.dtype, ctx.device):
            old = _logprobs(lambda mb: engine(mb, logprobs=True), batches, ctx.world_size, ctx.dummy)
            ref = None
            if ctx.ref_model is not None:  # a plain copy on every process: no collective, no dummy needed
                ref = _logprobs(lambda mb: supervised_logprobs(ctx.ref_model, mb, chunk), batches, 1, None)
    finally:
        engine.train(was)
    return old, ref


def policy_update(ctx: StepContext, mini: MiniBatch, step: int, totals: StepTotals) -> None:
    """One optimizer step on ``mini`` (every process runs as many micro-batches as the busiest, the extra ones with
    weight 0); applied when its loss and gradient norm are finite on every process, else trainer.nan_policy decides."""
    a, cfg, engine = ctx.cfg.algorithm, ctx.cfg, ctx.engine
    ctx.optimizer.zero_grad(set_to_none=True)
    update_loss = 0.0
    steps = Lockstep(mini.batches, ctx.world_size, lambda: ctx.dummy)
    for k, mb, real in steps:
        faults.before_micro_batch(step + 1, totals.calls)
        totals.calls += 1
        with no_grad_sync(engine, sync=steps.last(k)), autocast(cfg.model.dtype, ctx.device):
            logp, entropy = engine(mb, logprobs=True)
            if real:
                seqs = mini.micro[k]
                adv_tok = token_advantages(torch.tensor([s[2] for s in seqs]), [sum(s[1][1:]) for s in seqs])
                ref = mini.ref[k] if mini.ref is not None else None
                loss, st = policy_loss_sum(
                    logp,
                    mini.old[k],
                    adv_tok.to(ctx.device),
                    a.clip_ratio_low,
                    a.clip_ratio_high,
                    a.kl_coef,
                    ref,
                    a.clip_ratio_c,
                )
            else:
                loss = logp.sum() * 0.0
            (loss * ctx.scale / mini.n_tok).backward()
        if real:
            update_loss += float(loss.detach())
            totals.loss += float(loss.detach())
            totals.tokens += st.tokens
            totals.clipped += st.clipped_tokens
            totals.entropy += float(entropy.detach().sum())
            totals.kl += st.kl_sum
    norm = clip_gradients(ctx.model, cfg.optim.clip_grad)
    totals.grad_norm = max(totals.grad_norm, norm)
    if ctx.guard is not None:  # the model still holds the state after ``step`` steps until an update is applied
        ok = ctx.guard.ok(step, update_loss / mini.n_tok, norm, can_save=totals.updates == 0)
    else:
        ok = math.isfinite(norm)
    if ok:
        ctx.optimizer.step()
        totals.updates += 1
    ctx.optimizer.zero_grad(set_to_none=True)


def rl_step(
    ctx: StepContext, groups: list[list[Response]], group_ids: list[int], lr: float, step: int = 0
) -> dict[str, Any]:
    """Advantages, dynamic sampling and algorithm.mini_batches optimizer steps on this process's groups (global
    indices ``group_ids``); returns the step's metrics over all processes. ``step``: the 0-based RL step (messages,
    fault injection)."""
    adv, keep, metrics = reward_metrics(groups, ctx.cfg)
    set_lr(ctx.optimizer, lr)
    plan = plan_mini_batches(ctx, groups, group_ids, adv, keep)
    totals = StepTotals()
    for mini in plan:
        policy_update(ctx, mini, step, totals)
    metrics.update(totals.metrics())
    return metrics


def evaluate_policy(model, tokenizer, prompts: list[Prompt], cfg: Config, scorer) -> float:
    """Mean reward of greedy responses (the held-out score reported before/after RL)."""

    pad = pad_token(tokenizer)
    stop = end_of_turn_token_ids(tokenizer, cfg.data.chat_template_kwargs)
    opts = GenerationOptions(max_new_tokens=cfg.rollout.max_response_length, batch_size=64)
    raw = HFBackend(model, pad, cfg.model.dtype, cfg.rollout.kv_cache).generate([p.ids for p in prompts], opts, stop)
    total = 0.0
    for p, toks in zip(prompts, raw):
        text = tokenizer.decode(cut_at_stop(toks, stop)[1], skip_special_tokens=False)
        total += as_score(scorer(text, p.sample))["score"]
    return total / max(len(prompts), 1)


def validate(
    model, tokenizer, cfg: Config, rows: list[tuple], step: int, rank: int = 0, world_size: int = 1
) -> dict[str, float]:
    """Score the policy on data.val_files: rollout.val_n answers per prompt (greedy, or sampled at
    rollout.val_temperature, seeded by step), single-turn or episodes in the environment; each process takes its
    share of the prompts and the per-prompt sums are added over processes. Returns ``val_score`` (the mean), mean@K /
    pass@k when rollout.val_n > 1 and the same per data_source, all prefixed ``val_``."""
    r, k = cfg.rollout, cfg.rollout.val_n
    mine = list(range(rank, len(rows), world_size))
    opts = GenerationOptions(
        max_new_tokens=r.max_response_length,
        temperature=r.val_temperature or 1.0,
        top_p=r.val_top_p,
        do_sample=r.val_temperature > 0,
        batch_size=64,
        seed=cfg.trainer.seed * 1_000_003 + step * 1_009 + rank,
    )
    backend = HFBackend(model, pad_token(tokenizer), cfg.model.dtype, cfg.rollout.kv_cache)
    generator = Generator(backend, tokenizer, opts, cfg.data.chat_template_kwargs)
    sums, rights = [0.0] * len(rows), [0.0] * len(rows)
    if mine:
        share = [rows[i] for i in mine]
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # training's random state is not touched
            if cfg.rollout.max_turns > 1:
                result = evaluate_env(generator, share, cfg, cfg.algorithm.reward, r.max_turns, k)
            else:
                result = evaluate_samples(generator, samples_from_rows(share, cfg.data), cfg.algorithm.reward, k)
        for j, rec in enumerate(result.records):
            i = mine[rec.get("problem", j)]
            sums[i] += float(rec["score"])
            rights[i] += float(rec["score"]) >= 0.5
    totals = all_reduce_sum(*sums, *rights)
    sums, rights = totals[: len(rows)], [round(x) for x in totals[len(rows) :]]
    out = {"val_score": sum(sums) / (k * max(len(rows), 1))}
    groups = {"": list(range(len(rows)))}
    for i, (_, row, *_rest) in enumerate(rows):
        if source := row_source(row):
            groups.setdefault(f"{source['data_source']}_", []).append(i)
    for prefix, idx in groups.items():
        metrics = count_metrics([sums[i] for i in idx], [rights[i] for i in idx], k)
        if prefix and k == 1:
            out[f"val_{prefix}score"] = metrics["accuracy"]
        for name, value in metrics.items():
            if "@" in name and not name.endswith("_ci95"):
                out[f"val_{prefix}{name}"] = value
    return out


class RolloutValidator(Validator):
    """rl's validation: the policy's answers to data.val_files scored (:func:`validate`, with the rollout weights
    synced first), each validation a line and an event of its own in metrics.jsonl. The loop asks after the step's
    record is logged and its checkpoint saved (an interrupted run stops without validating)."""

    digits = 3  # of val_s

    def __init__(self, run: Run, total: int, policy: RolloutWeights, model, tokenizer, rows: list[tuple]):
        super().__init__(run, total, bool(rows))
        self.policy, self.model, self.tokenizer, self.rows = policy, model, tokenizer, rows

    def measure(self, done: int) -> dict[str, Any]:
        r = self.run
        self.policy.sync(self.model)  # FSDP2: the weights after step ``done`` (collective)
        return validate(self.policy.module, self.tokenizer, r.cfg, self.rows, done, r.rank, r.world_size)

    def report(self, done: int, numbers: dict[str, Any], record: dict[str, Any] | None) -> None:
        shown = "  ".join(
            f"{k.removeprefix('val_')} {v:.3f}" for k, v in numbers.items() if k != "val_s" and k.count("_") <= 1
        )
        self.run.log.log_validation(
            done,
            numbers,
            f"validation {'before step 1' if done == 0 else f'after step {done}'}"
            f" ({len(self.rows)} prompts × {self.run.cfg.rollout.val_n}): {shown}",
        )


def rl(cfg: Config, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Run GRPO/DAPO per ``cfg`` (one process, or several under torchrun); returns a summary."""
    with Run(cfg) as run:
        return _rl(run, model, tokenizer)


@dataclass
class RLData:
    """What `sftforge rl` trains and validates on: ``prompts`` (single-turn prompts; environment tasks when
    rollout.max_turns > 1, with ``env`` = (make_env, workers) for :class:`EpisodeSampler`), their ``counts`` (rows,
    truncated, dropped) and the rows of data.val_files (checked now: a bad row is said before training, not after the
    first trainer.test_freq steps)."""

    prompts: list
    counts: dict[str, int]
    env: tuple | None
    val_rows: list[tuple]


def load_rl_data(cfg: Config, tokenizer) -> RLData:
    """The prompts or environment tasks of data.train_files and the rows of data.val_files (:class:`RLData`)."""
    multi_turn, env = cfg.rollout.max_turns > 1, None
    if multi_turn:
        prompts, make_env, workers = load_env_tasks(cfg)
        env = (make_env, workers)
        counts = {"rows": len(prompts), "over_max_length": 0, "truncated": 0, "dropped": 0}
    else:
        prompts, counts = load_prompts(cfg, tokenizer)
    val_rows = file_rows(cfg.data.val_files, "data.val_files") if cfg.data.val_files else []
    if val_rows and multi_turn:
        environment(cfg.algorithm.reward, val_rows, cfg)
    elif val_rows:
        samples_from_rows(val_rows, cfg.data)
    return RLData(prompts, counts, env, val_rows)


def _plan_json(run: Run, prompts: int, per_epoch: int, total: int, strategy: str) -> dict[str, Any]:
    """plan.json of an RL run: its prompts, steps and layout."""
    r = run.cfg.rollout
    return {
        "prompts": prompts,
        "steps_per_epoch": per_epoch,
        "total_steps": total,
        "prompts_per_step": r.prompts_per_step,
        "responses_per_prompt": r.n,
        "world_size": run.world_size,
        "strategy": strategy,
        "device": str(run.device),
    }


def _record(run: Run, done: int, epoch: int, lr: float, metrics, gen_tokens: float, rollout_s, train_s) -> dict:
    """The record of RL step ``done``: the step's metrics and its rollout / training throughput and times."""
    return {
        "step": done,
        "epoch": epoch,
        "lr": lr,
        **metrics,
        "rollout_tokens_per_s": gen_tokens / max(rollout_s, 1e-9),
        "train_tokens_per_s": metrics["trained_tokens"] / max(train_s, 1e-9),
        "tokens_per_s": metrics["trained_tokens"] / max(train_s, 1e-9),
        "rollout_s": round(rollout_s, 4),
        "train_s": round(train_s, 4),
        "elapsed_s": round(run.elapsed(), 4),
    }


def _rl(run: Run, model, tokenizer) -> dict[str, Any]:
    cfg, t = run.cfg, run.cfg.trainer
    check_rl_config(cfg, run.world_size)
    check_loggers(t.logger)
    check_paths(cfg, model=model is None)  # before the (slow) model and data loading
    strategy = run.strategy()
    if t.offload:
        raise ConfigError("sftforge rl does not support trainer.offload=true yet; set trainer.offload=false.")
    if t.sp_size > 1:
        raise ConfigError("sftforge rl does not support trainer.sp_size > 1 yet; set trainer.sp_size=1.")
    multi_turn = cfg.rollout.max_turns > 1
    scorer = None if multi_turn else get_scorer(cfg.algorithm.reward)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    data = load_rl_data(cfg, tokenizer)
    prompts, counts, val_rows = data.prompts, data.counts, data.val_rows
    per_epoch = max(1, len(prompts) // cfg.rollout.prompts_per_step)
    total = t.max_steps if t.max_steps > 0 else t.total_epochs * per_epoch
    run.prepare_output()
    run.write_json("plan.json", _plan_json(run, len(prompts), per_epoch, total, strategy))
    rollout_copy: list[RolloutWeights] = []
    keep_copy = lambda m: rollout_copy.append(RolloutWeights(m, strategy == "fsdp2", compute_dtype(cfg.model.dtype)))  # noqa: E731
    model, engine, optimizer = run.build(model, before_engine=keep_copy, console=False)
    policy = rollout_copy[0]
    ref_model = None
    if cfg.algorithm.kl_coef > 0:
        ref_model = prepare_reference(load_model(cfg.model, run.device), cfg)
    ctx = StepContext(engine, model, optimizer, ref_model, cfg, pad_token(tokenizer), run.world_size, run.guard)
    checkpointer = run.checkpointer(
        lambda done: {"epoch": (done - 1) // per_epoch, "index_in_epoch": (done - 1) % per_epoch + 1}, tokenizer
    )
    start = run.resume(checkpointer, data_fingerprint(prompts))
    stop = run.stop_step(start, total)
    run.open_log(
        total,
        start,
        f"sftforge rl: {len(prompts)} prompts ({counts['truncated']} truncated, {counts['dropped']} dropped by "
        f"data.truncation), {total} steps of {cfg.rollout.prompts_per_step} prompts × {cfg.rollout.n} responses, "
        f"{run.world_size} process(es) (trainer.strategy={strategy})",
    )
    if multi_turn:
        sampler = EpisodeSampler(policy.module, tokenizer, cfg, *data.env)
    else:
        sampler = Sampler(policy.module, tokenizer, cfg)
    mine = my_groups(cfg.rollout.prompts_per_step, cfg.algorithm.mini_batches, run.world_size, run.rank)
    record, interrupted = {}, 0
    validator = RolloutValidator(run, total, policy, model, tokenizer, val_rows)
    validator.before_train(start)
    with Signals() as signals:
        for step in range(start, stop):
            batch = step_prompts(prompts, step, cfg)
            ids = [g for g in mine if g < len(batch)]
            local = [batch[g] for g in ids]
            seeds = [(t.seed * 1_000_003 + step) * 1_009 + g for g in ids]  # per group: the same on any layout
            r0 = time.perf_counter()
            policy.sync(model)  # FSDP2: the rollout copy takes the weights of the last update (or of the resume)
            groups = (
                sampler.sample(local, seeds)
                if multi_turn
                else score_groups(sampler.sample(local, seeds), local, cfg, scorer)
            )
            rollout_s = time.perf_counter() - r0
            t1 = time.perf_counter()
            lr = lr_at(step, total, cfg.optim)
            metrics = rl_step(ctx, groups, ids, lr, step)
            train_s = time.perf_counter() - t1
            (gen_tokens,) = all_reduce_sum(float(sum(r.generated for g in groups for r in g)))
            done = step + 1
            record = _record(run, done, step // per_epoch, lr, metrics, gen_tokens, rollout_s, train_s)
            interrupted = run.end_step(record, signals, checkpointer, done, stop)
            if interrupted:
                stop = done
                break
            validator.after_step(done, record)  # after the step's record and checkpoint
    end: dict[str, Any] = {"train_runtime_s": round(run.runtime(), 4)}
    if interrupted:
        end["interrupted_by"] = signal.Signals(interrupted).name
    final_dir = run.finish(tokenizer, stop == total, end)
    return {
        "step": stop,
        "total_steps": total,
        "metrics": record,
        "validation": validator.last,
        "output_dir": str(run.out),
        "final_dir": str(final_dir) if final_dir else None,
        "prompts": counts,
        "interrupted": interrupted,
        "skipped_steps": run.guard.skipped,
    }


__all__ = [
    "EpisodeSampler",
    "MiniBatch",
    "Prompt",
    "Response",
    "RolloutValidator",
    "RLData",
    "RolloutWeights",
    "Sampler",
    "StepContext",
    "StepTotals",
    "behaviour_logprobs",
    "check_rl_config",
    "episode_response",
    "evaluate_policy",
    "load_env_tasks",
    "load_prompts",
    "load_rl_data",
    "my_groups",
    "plan_mini_batches",
    "policy_update",
    "reward_metrics",
    "rl",
    "rl_step",
    "score_groups",
    "step_prompts",
]
