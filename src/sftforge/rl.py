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

Scope today: one process, transformers ``generate`` (CPU or GPU).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sftforge.config import Config, ConfigError, load_config, redacted, to_dict
from sftforge.evaluate import pad_id as pad_token
from sftforge.grpo import group_advantages, informative_groups, overlong_penalty, policy_loss_sum, token_advantages

ROLLOUT_BACKENDS = ("hf",)


@dataclass
class Prompt:
    id: str
    ids: list[int]
    sample: Any  # evaluate.EvalSample: messages, tools, reference


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
    from sftforge.data import read_rows, resolve_files
    from sftforge.evaluate import render_prompt, samples_from_rows

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


def check_rl_config(cfg: Config) -> None:
    r, a = cfg.rollout, cfg.algorithm
    if r.backend not in ROLLOUT_BACKENDS:
        raise ConfigError(f"rollout.backend={r.backend!r}: supported today: {' | '.join(ROLLOUT_BACKENDS)}.")
    if r.n < 2:
        raise ConfigError(f"rollout.n={r.n}: group-relative advantages need at least 2 responses per prompt.")
    from sftforge.evaluate import ENV_TASKS

    if r.max_turns < 1:
        raise ConfigError(f"rollout.max_turns={r.max_turns} must be >= 1.")
    if r.max_turns > 1 and a.reward not in ENV_TASKS:
        raise ConfigError(
            f"rollout.max_turns={r.max_turns} runs episodes in an environment: set algorithm.reward to one of "
            f"{' | '.join(ENV_TASKS)} (the episode's success is the reward), or rollout.max_turns=1."
        )
    if r.max_turns == 1 and a.reward in ENV_TASKS:
        raise ConfigError(f"algorithm.reward={a.reward} is an environment: set rollout.max_turns > 1 (e.g. 40).")
    if a.mini_batches < 1 or (r.prompts_per_step * r.n) % a.mini_batches:
        raise ConfigError(
            f"algorithm.mini_batches={a.mini_batches} must divide rollout.prompts_per_step × rollout.n = "
            f"{r.prompts_per_step * r.n}."
        )
    if a.clip_ratio_low < 0 or a.clip_ratio_high < 0 or a.clip_ratio_low >= 1:
        raise ConfigError("algorithm.clip_ratio_low must be in [0, 1) and algorithm.clip_ratio_high >= 0.")


def step_prompts(prompts: list, step: int, cfg: Config) -> list:
    """The prompts of RL step ``step``: consecutive slices of a per-epoch shuffle (trainer.seed + epoch)."""
    from sftforge.train import epoch_order

    k = cfg.rollout.prompts_per_step
    per_epoch = max(1, len(prompts) // k)
    epoch, b = divmod(step, per_epoch)
    order = epoch_order(len(prompts), cfg.trainer.seed, epoch, cfg.data.shuffle)
    return [prompts[i] for i in order[b * k : (b + 1) * k]]


class Sampler:
    """``rollout.n`` sampled responses per prompt with transformers generate, cut at the end-of-turn token."""

    def __init__(self, model, tokenizer, cfg: Config):
        from sftforge.chat import end_of_turn_token_ids
        from sftforge.evaluate import GenerationOptions, HFBackend

        self.tokenizer, self.cfg = tokenizer, cfg
        pad = pad_token(tokenizer)
        self.backend = HFBackend(model, pad, cfg.model.dtype)
        r = cfg.rollout
        self.opts = GenerationOptions(
            max_new_tokens=r.max_response_length, temperature=r.temperature, top_p=r.top_p, do_sample=True,
            batch_size=max(1, r.n * r.prompts_per_step),
        )  # fmt: skip
        self.stop_ids = end_of_turn_token_ids(tokenizer, cfg.data.chat_template_kwargs)

    def sample(self, prompts: list[Prompt], seed: int) -> list[list[tuple[list[int], str, bool]]]:
        n = self.cfg.rollout.n
        self.opts.seed = seed
        with torch.random.fork_rng(devices=[]):  # the sampling stream never disturbs the trainer's RNG
            raw = self.backend.generate([p.ids for p in prompts for _ in range(n)], self.opts, self.stop_ids)
        groups = []
        for i in range(len(prompts)):
            group = []
            for toks in raw[i * n : (i + 1) * n]:
                cut = next((j for j, t in enumerate(toks) if t in self.stop_ids), None)
                ids = toks if cut is None else toks[: cut + 1]
                text = self.tokenizer.decode(ids if cut is None else ids[:-1], skip_special_tokens=False)
                group.append((ids, text, cut is None))
            groups.append(group)
        return groups


def score_groups(groups, prompts: list[Prompt], cfg: Config, scorer) -> list[list[Response]]:
    from sftforge.evaluate import _as_score

    a, r = cfg.algorithm, cfg.rollout
    out = []
    for prompt, group in zip(prompts, groups):
        scored = []
        for ids, text, truncated in group:
            reward = _as_score(scorer(text, prompt.sample))["score"]
            if a.overlong_buffer > 0:
                reward += float(overlong_penalty(torch.tensor([len(ids)]), r.max_response_length, a.overlong_buffer,
                                                 a.overlong_penalty)[0])  # fmt: skip
            mask = [0] * len(prompt.ids) + [1] * len(ids)
            scored.append(Response(prompt.ids + ids, mask, reward, len(ids), truncated))
        out.append(scored)
    return out


# ---- multi-turn episodes (rollout.max_turns > 1) ---------------------------------------------------------------------


def load_env_tasks(cfg: Config):
    """(tasks, make_env) of the environment algorithm.reward from the rows of data.train_files."""
    from sftforge.data import read_rows, resolve_files
    from sftforge.envs.textcraft import TextCraftEnv, load_tasks

    rows = [pair for f in resolve_files(cfg.data.train_files, "data.train_files") for pair in read_rows(f)]
    tasks, book = load_tasks(rows, cfg.data)
    return tasks, lambda: TextCraftEnv(book)


def episode_response(episode, tokenizer, cfg: Config, markers) -> Response | None:
    """An episode's conversation rendered ONCE with the chat template, masked exactly like SFT data: every assistant
    turn trained, the first prompt and every observation (tool / user message) not. Longer than data.max_length: the
    first data.max_length tokens (counted as truncated). None when the conversation cannot be rendered."""
    from sftforge.chat import RowError
    from sftforge.data import _tokenize_row

    row = {"messages": episode.messages, "tools": episode.tools}
    try:
        sample = _tokenize_row(episode.task_id, row, tokenizer, cfg.data, markers)
    except RowError:
        return None
    ids, mask, cut = sample.input_ids, sample.loss_mask, len(sample.input_ids) > cfg.data.max_length
    if cut:
        ids, mask = ids[: cfg.data.max_length], mask[: cfg.data.max_length]
    generated = sum(getattr(g, "n_tokens", 0) for g in episode.generations)
    return Response(ids, mask, float(episode.success), generated, cut)


class EpisodeSampler:
    """``rollout.n`` episodes per task in the environment, the policy sampling each turn with transformers generate."""

    def __init__(self, model, tokenizer, cfg: Config, make_env):
        from sftforge.chat import template_markers
        from sftforge.evaluate import GenerationOptions, Generator, HFBackend

        r = cfg.rollout
        pad = pad_token(tokenizer)
        opts = GenerationOptions(max_new_tokens=r.max_response_length, temperature=r.temperature, top_p=r.top_p,
                                 do_sample=True, batch_size=max(1, r.n * r.prompts_per_step))  # fmt: skip
        self.generator = Generator(
            HFBackend(model, pad, cfg.model.dtype), tokenizer, opts, cfg.data.chat_template_kwargs
        )
        self.tokenizer, self.cfg, self.make_env = tokenizer, cfg, make_env
        self.markers = template_markers(tokenizer, cfg.data.chat_template_kwargs)
        self.unrenderable = 0

    def sample(self, tasks: list, seed: int) -> list[list[Response]]:
        from sftforge.envs import rollout

        n = self.cfg.rollout.n
        self.generator.opts.seed = seed
        with torch.random.fork_rng(devices=[]):
            episodes = rollout(self.make_env, [t for t in tasks for _ in range(n)], self.generator.chat,
                               max_turns=self.cfg.rollout.max_turns)  # fmt: skip
        groups = []
        for i in range(len(tasks)):
            group = []
            for ep in episodes[i * n : (i + 1) * n]:
                resp = episode_response(ep, self.tokenizer, self.cfg, self.markers)
                if resp is None:
                    self.unrenderable += 1
                    resp = Response([], [], 0.0, 0, False)  # keeps the group's shape; trains nothing
                group.append(resp)
            groups.append(group)
        return groups


@torch.no_grad()
def _logprobs(model, micro_batches, chunk: int) -> list[torch.Tensor]:
    from sftforge.loss import supervised_logprobs

    was = model.training
    model.eval()
    try:
        return [supervised_logprobs(model, mb, chunk)[0] for mb in micro_batches]
    finally:
        model.train(was)


def rl_step(model, optimizer, ref_model, groups: list[list[Response]], cfg: Config, pad_id: int,
            lr: float) -> dict[str, Any]:  # fmt: skip
    """Advantages, dynamic sampling and algorithm.mini_batches optimizer steps; returns the step's metrics."""
    from sftforge.loss import supervised_logprobs
    from sftforge.model import autocast
    from sftforge.optim import set_lr
    from sftforge.packing import collate

    a, d = cfg.algorithm, cfg.data
    device = next(model.parameters()).device
    rewards = torch.tensor([[resp.reward for resp in g] for g in groups], dtype=torch.float32)
    adv = group_advantages(rewards, a.scale_by_std)
    keep = informative_groups(rewards) if a.dynamic_sampling else torch.ones(len(groups), dtype=torch.bool)
    seqs = []  # (input_ids, loss_mask, advantage) of every kept response
    for gi in torch.nonzero(keep).flatten().tolist():
        for ri, resp in enumerate(groups[gi]):
            if any(resp.loss_mask[1:]):
                seqs.append((resp.input_ids, resp.loss_mask, float(adv[gi, ri])))
    metrics: dict[str, Any] = {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "solved_groups": float((rewards.max(dim=1).values >= 1.0).float().mean()),
        "kept_groups": int(keep.sum()), "response_length": sum(r.generated for g in groups for r in g) / max(1, rewards.numel()),
        "truncated_responses": sum(r.truncated for g in groups for r in g),
    }  # fmt: skip
    if not seqs:
        metrics.update(loss=0.0, grad_norm=0.0, clip_fraction=0.0, entropy=0.0, kl=0.0, trained_tokens=0, skipped=True)
        return metrics
    mbs = d.micro_batch_size_per_gpu
    n_mini = min(a.mini_batches, len(seqs))
    per_mini = math.ceil(len(seqs) / n_mini)
    set_lr(optimizer, lr)
    totals = {"loss": 0.0, "tokens": 0, "clipped": 0, "entropy": 0.0, "kl": 0.0, "grad_norm": 0.0}
    # the behaviour policy's log-probs, before any update of this step (one pass over every micro-batch)
    minis = [seqs[k : k + per_mini] for k in range(0, len(seqs), per_mini)]
    batches = [[chunk[j : j + mbs] for j in range(0, len(chunk), mbs)] for chunk in minis]
    collated = [[collate([(s[0], s[1]) for s in mb], d.packing, cfg.model.attn_implementation, pad_id, torch.float32)
                 .to(device) for mb in mini] for mini in batches]  # fmt: skip
    chunk = cfg.model.loss_chunk_size
    with autocast(cfg.model.dtype, device):
        old = [_logprobs(model, mini, chunk) for mini in collated]
        ref = [_logprobs(ref_model, mini, chunk) for mini in collated] if ref_model is not None else None
    for m, (mini, mini_mbs) in enumerate(zip(batches, collated)):
        n_tok = sum(sum(s[1][1:]) for s in sum(mini, []))  # trained positions (targets), as in packing
        optimizer.zero_grad(set_to_none=True)
        for k, (samples, mb) in enumerate(zip(mini, mini_mbs)):
            adv_tok = token_advantages(torch.tensor([s[2] for s in samples]), [sum(s[1][1:]) for s in samples])
            adv_tok = adv_tok.to(device)
            with autocast(cfg.model.dtype, device):
                logp, entropy = supervised_logprobs(model, mb, chunk)
                loss, st = policy_loss_sum(logp, old[m][k], adv_tok, a.clip_ratio_low, a.clip_ratio_high, a.kl_coef,
                                           ref[m][k] if ref is not None else None)  # fmt: skip
            (loss / max(n_tok, 1)).backward()
            totals["loss"] += float(loss.detach())
            totals["tokens"] += st.tokens
            totals["clipped"] += st.clipped_tokens
            totals["entropy"] += float(entropy.detach().sum())
            totals["kl"] += st.kl_sum
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        totals["grad_norm"] = max(totals["grad_norm"], norm)
        if math.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    t = max(totals["tokens"], 1)
    metrics.update(
        loss=totals["loss"] / t, grad_norm=totals["grad_norm"], clip_fraction=totals["clipped"] / t,
        entropy=totals["entropy"] / t, kl=totals["kl"] / t, trained_tokens=totals["tokens"],
    )  # fmt: skip
    return metrics


def evaluate_policy(model, tokenizer, prompts: list[Prompt], cfg: Config, scorer) -> float:
    """Mean reward of greedy responses (the held-out score reported before/after RL)."""
    from sftforge.chat import end_of_turn_token_ids
    from sftforge.evaluate import GenerationOptions, HFBackend, _as_score

    pad = pad_token(tokenizer)
    stop = end_of_turn_token_ids(tokenizer, cfg.data.chat_template_kwargs)
    opts = GenerationOptions(max_new_tokens=cfg.rollout.max_response_length, batch_size=64)
    raw = HFBackend(model, pad, cfg.model.dtype).generate([p.ids for p in prompts], opts, stop)
    total = 0.0
    for p, toks in zip(prompts, raw):
        cut = next((j for j, t in enumerate(toks) if t in stop), None)
        text = tokenizer.decode(toks if cut is None else toks[:cut], skip_special_tokens=False)
        total += _as_score(scorer(text, p.sample))["score"]
    return total / max(len(prompts), 1)


def rl(cfg: Config, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Run GRPO/DAPO per ``cfg``; returns a summary (steps, last metrics, output_dir, final_dir)."""
    from sftforge.checkpoint import (
        child,
        clean_incomplete,
        load_any,
        prune_checkpoints,
        resolve_resume,
        save_checkpoint,
    )
    from sftforge.data import load_tokenizer
    from sftforge.evaluate import get_scorer
    from sftforge.lora import export_model, prepare_model
    from sftforge.metrics import MetricsLogger, check_loggers
    from sftforge.model import compute_dtype, load_model
    from sftforge.optim import build_optimizer, lr_at
    from sftforge.train import _device, _eos_ids, world

    t = cfg.trainer
    check_rl_config(cfg)
    check_loggers(t.logger)
    if world()[0] > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("sftforge rl runs on one process today; launch it without torchrun.")
    multi_turn = cfg.rollout.max_turns > 1
    scorer = None if multi_turn else get_scorer(cfg.algorithm.reward)
    device = _device(t.device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    if multi_turn:
        prompts, make_env = load_env_tasks(cfg)
        counts = {"rows": len(prompts), "over_max_length": 0, "truncated": 0, "dropped": 0}
    else:
        prompts, counts = load_prompts(cfg, tokenizer)
    total = t.max_steps if t.max_steps > 0 else t.total_epochs * max(1, len(prompts) // cfg.rollout.prompts_per_step)
    out = Path(t.output_dir)
    saved_config = redacted(to_dict(cfg))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "metrics.jsonl", "final"):
        child(out, name)
    clean_incomplete(out)
    child(out, "config.yaml").write_text(yaml.safe_dump(saved_config, sort_keys=False))
    model = model if model is not None else load_model(cfg.model, device)
    model = prepare_model(model, cfg.model, console=None)
    ref_model = None
    if cfg.algorithm.kl_coef > 0:
        ref_model = load_model(cfg.model, device)
        ref_model.requires_grad_(False)
    optimizer = build_optimizer(model, cfg.optim)
    pad_id = pad_token(tokenizer)
    start = 0
    ckpt = resolve_resume(t.resume, out)
    if ckpt is not None:
        start = int(load_any(ckpt, model, optimizer)["step"])
    stop = t.stop_at_step if start < t.stop_at_step < total else total
    log = MetricsLogger(out, t.logger, total, t.log_freq, start, saved_config)
    log.print(f"sftforge rl: {len(prompts)} prompts ({counts['truncated']} truncated, {counts['dropped']} dropped by "
              f"data.truncation), {total} steps of {cfg.rollout.prompts_per_step} prompts × {cfg.rollout.n} responses"
              + (f"; resumed from {ckpt} at step {start}" if ckpt is not None else ""))  # fmt: skip
    sampler = EpisodeSampler(model, tokenizer, cfg, make_env) if multi_turn else Sampler(model, tokenizer, cfg)
    t0, record = time.perf_counter(), {}
    for step in range(start, stop):
        batch = step_prompts(prompts, step, cfg)
        r0 = time.perf_counter()
        seed = t.seed * 1_000_003 + step
        if multi_turn:
            groups = sampler.sample(batch, seed)
        else:
            groups = score_groups(sampler.sample(batch, seed), batch, cfg, scorer)
        rollout_s = time.perf_counter() - r0
        t1 = time.perf_counter()
        metrics = rl_step(model, optimizer, ref_model, groups, cfg, pad_id, lr_at(step, total, cfg.optim))
        train_s = time.perf_counter() - t1
        gen_tokens = sum(r.generated for g in groups for r in g)
        record = {"step": step + 1, "epoch": step // max(1, len(prompts) // cfg.rollout.prompts_per_step), "lr": lr_at(step, total, cfg.optim), **metrics,
                  "rollout_tokens_per_s": gen_tokens / max(rollout_s, 1e-9),
                  "train_tokens_per_s": metrics["trained_tokens"] / max(train_s, 1e-9),
                  "tokens_per_s": metrics["trained_tokens"] / max(train_s, 1e-9),
                  "elapsed_s": round(time.perf_counter() - t0, 4)}  # fmt: skip
        log.log_step(record)
        done = step + 1
        if done == stop or (t.save_freq > 0 and done % t.save_freq == 0):
            save_checkpoint(out, done, model, optimizer, {"epoch": 0, "index_in_epoch": done}, saved_config)
            prune_checkpoints(out, t.max_ckpt_to_keep)
    finished = stop == total
    final_dir = None
    if finished:
        final_dir = export_model(model, out / "final", tokenizer, _eos_ids(tokenizer, cfg), compute_dtype(cfg.model.dtype),
                                 adapter_dir=out / "final" / "adapter", base_path=cfg.model.path)  # fmt: skip
    log.close({"train_runtime_s": round(time.perf_counter() - t0, 4)})
    return {"step": stop, "total_steps": total, "metrics": record, "output_dir": str(out),
            "final_dir": str(final_dir) if final_dir else None, "prompts": counts}  # fmt: skip


def rl_main(path: str | None, overrides: list[str]) -> int:
    """Entry point of ``sftforge rl CONFIG [key=value ...]``."""
    rl(load_config(path, list(overrides or [])))
    return 0


__all__ = ["EpisodeSampler", "Prompt", "Response", "Sampler", "episode_response", "load_env_tasks", "check_rl_config", "evaluate_policy", "load_prompts", "rl", "rl_main",
           "rl_step", "score_groups", "step_prompts"]  # fmt: skip
