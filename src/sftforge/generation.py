"""Generation: prompts rendered by the training chat template, a backend that produces new token ids, the cut at
the template's end-of-turn tokens (:func:`~sftforge.chat.end_of_turn_token_ids`), decoding.

- ``hf``: ``model.generate`` on LEFT-padded batches (greedy unless ``do_sample``); works with an in-memory model, so
  training can call it every ``trainer.eval_freq`` steps and RL can sample rollouts with it.
- ``vllm``: only when vllm is importable and a GPU is present.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig

from sftforge.chat import end_of_turn_token_ids, render_prompt
from sftforge.config import ConfigError
from sftforge.engine import Engine, supports
from sftforge.loss import has_fast_path
from sftforge.model import autocast


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = False
    """Greedy decoding unless True; temperature and top_p only apply when sampling."""
    batch_size: int = 8
    seed: int = 0


@dataclass
class Generation:
    text: str
    n_tokens: int
    """Generated tokens, the stop token included."""
    hit_max: bool
    """Ended by max_new_tokens without a stop token."""


@dataclass
class GenerationStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Sampling from ``seed`` on the CPU generator and ``device``'s (a GPU), both restored on exit: generation never
    moves the caller's RNG streams (the trainer's dropout, a resume's restored state), nor another GPU's."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        yield


class HFBackend:
    """Generation with the model in memory: :class:`sftforge.engine.Engine` (a KV cache per sequence kept across
    calls, continuous batching) where it supports the model, else ``model.generate`` on left-padded batches, longest
    prompts first (``engine=False`` forces the latter: today's path, for comparisons)."""

    def __init__(self, model, pad_id: int, dtype: str = "fp32", engine: bool = True):
        self.model, self.pad_id, self.dtype = model, pad_id, dtype
        self.on_batch = None  # called with (prompts done, prompts) as they finish (a progress display)
        self.why_not = supports(model) if engine else "engine=False"
        self.engine = Engine(model, dtype) if self.why_not is None else None

    def generate(
        self, prompts: list[list[int]], opts: GenerationOptions, stop_ids: list[int], images=None, vision=None
    ) -> list[list[int]]:
        """``images``: per prompt, None or its (bytes, grid) images, whose placeholders ``prompts`` already expand."""
        if self.engine is not None and not (images and any(images)):
            self.engine.max_batch = max(1, opts.batch_size)
            self.engine.on_progress = (lambda done, total, _tokens: self._done(done, total)) if self.on_batch else None
            return self.engine.generate(
                prompts,
                opts.max_new_tokens,
                stop_ids,
                do_sample=opts.do_sample,
                temperature=opts.temperature,
                top_p=opts.top_p,
                seed=opts.seed,
            )
        model = self.model
        device = next(model.parameters()).device
        cfg = {
            "max_new_tokens": opts.max_new_tokens,
            "do_sample": opts.do_sample,
            "eos_token_id": stop_ids,
            "pad_token_id": self.pad_id,
            "use_cache": True,
        }
        if opts.do_sample:
            cfg.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)
        gen_cfg = GenerationConfig(**cfg)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        was_training = model.training
        model.eval()
        rng = seeded(opts.seed, device) if opts.do_sample else contextlib.nullcontext()
        try:
            with rng, torch.no_grad(), autocast(self.dtype, device):
                for k in range(0, len(order), opts.batch_size):
                    batch = order[k : k + opts.batch_size]
                    width = max(len(prompts[i]) for i in batch)
                    ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for r, i in enumerate(batch):
                        n = len(prompts[i])
                        ids[r, width - n :] = torch.tensor(prompts[i], dtype=torch.long)
                        mask[r, width - n :] = 1
                    if not hasattr(model, "generate"):  # a module of one's own (model.builder)
                        new = greedy_generate(model, ids.to(device), mask.to(device), opts, stop_ids, self.pad_id)
                        for r, i in enumerate(batch):
                            out[i] = new[r].tolist()
                        self._done(k + len(batch), len(order))
                        continue
                    extra = _image_inputs(model, ids, [images[i] for i in batch], vision) if images else {}
                    res = model.generate(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        generation_config=gen_cfg,
                        **{k: v.to(device) for k, v in extra.items()},
                    )
                    for r, i in enumerate(batch):
                        out[i] = res[r, width:].tolist()
                    self._done(k + len(batch), len(order))
        finally:
            model.train(was_training)
        return out

    def _done(self, done: int, total: int) -> None:
        if self.on_batch is not None:
            self.on_batch(done, total)


def _next_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    if has_fast_path(model):  # the decoder, then the head at the last position only
        h = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h[0]
        return model.get_output_embeddings()(h[:, -1])
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    return (logits if logits is not None else out[0])[:, -1]


def greedy_generate(model, ids: torch.Tensor, mask: torch.Tensor, opts: GenerationOptions, stop_ids, pad_id: int):
    """Greedy decoding for a module without ``generate`` (model.builder): the whole sequence through the model at
    every new token (no KV cache: for short answers, such as multiple choice). Returns the new tokens [B, n]."""
    if opts.do_sample:
        raise ConfigError(
            "sampling (--do-sample) needs a model with transformers' generate; this module decodes greedily only."
        )
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = []
    stops = torch.tensor(list(stop_ids), device=ids.device)
    for _ in range(opts.max_new_tokens):
        nxt = _next_logits(model, ids, mask).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        new.append(nxt)
        done |= torch.isin(nxt, stops)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done | torch.isin(nxt, stops)).long()[:, None]], 1)
        if bool(done.all()):
            break
    return torch.stack(new, 1)


def _image_inputs(model, ids: torch.Tensor, images: list, vision) -> dict:
    """pixel_values and image_grid_thw of a generate batch (rows in order), and the image-token mask the model
    needs to place its 3-D positions (mm_token_type_ids: 1 at image tokens)."""
    flat = [im for row in images for im in row or ()]
    if not flat:
        return {}
    out = vision.pixels([b for b, _ in flat], [g for _, g in flat])
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # (through a peft wrapper)
    if "mm_token_type_ids" in inspect.signature(inner.forward).parameters:  # (transformers that need it told)
        out["mm_token_type_ids"] = (ids == vision.image_token_id).int()
    return out


class VLLMBackend:
    """vLLM on a GPU, loaded from the model folder or hub id."""

    def __init__(self, model_path: str, dtype: str = "fp32", trust_remote_code: bool = False):
        check_vllm()
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            dtype="bfloat16" if dtype == "bf16" else "float32",
            trust_remote_code=trust_remote_code,
            skip_tokenizer_init=False,
        )

    def generate(
        self, prompts: list[list[int]], opts: GenerationOptions, stop_ids: list[int], images=None, vision=None
    ) -> list[list[int]]:
        from vllm import SamplingParams

        if images and any(images):
            raise ConfigError("--backend vllm: prompts with images are not supported here yet; use --backend hf.")

        params = SamplingParams(
            max_tokens=opts.max_new_tokens,
            temperature=opts.temperature if opts.do_sample else 0.0,
            top_p=opts.top_p if opts.do_sample else 1.0,
            stop_token_ids=stop_ids,
            seed=opts.seed,
            skip_special_tokens=False,
        )
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def check_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError("--backend vllm needs the vllm package (pip install vllm); use --backend hf.") from None
    if not torch.cuda.is_available():
        raise ConfigError("--backend vllm needs a CUDA GPU and none is available; use --backend hf.")


class Generator:
    """Renders conversations with the chat template, runs a backend, cuts at the end-of-turn token, decodes."""

    def __init__(
        self,
        backend,
        tokenizer,
        opts: GenerationOptions | None = None,
        template_kwargs: dict | None = None,
        vision=None,
    ):
        self.backend, self.tokenizer, self.vision = backend, tokenizer, vision
        self.opts = opts or GenerationOptions()
        self.template_kwargs = template_kwargs or {}
        self.stop_ids = end_of_turn_token_ids(tokenizer, self.template_kwargs)
        self.stats = GenerationStats()

    def prompt(self, messages: list[dict], tools: list | None = None) -> str:
        return render_prompt(self.tokenizer, messages, tools, self.template_kwargs)

    def generate(self, prompts: list[str], images: list | None = None) -> list[Generation]:
        """``images``: per prompt, None or its (bytes, grid) images (vision.Vision.load), in placeholder order."""
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if images and any(images):
            if self.vision is None:
                raise ConfigError("prompts with images need a vision-language model (its config has a vision_config).")
            ids = [
                self.vision.expand(np.asarray(x), np.zeros(len(x), np.uint8), [g for _, g in im])[0].tolist()
                if im
                else x
                for x, im in zip(ids, images)
            ]
        t0 = time.perf_counter()
        new = (
            self.backend.generate(ids, self.opts, self.stop_ids, images, self.vision)
            if images and any(images)
            else self.backend.generate(ids, self.opts, self.stop_ids)
        )
        self.stats.seconds += time.perf_counter() - t0
        out = []
        for toks in new:
            kept, body, stopped = cut_at_stop(toks, self.stop_ids)
            self.stats.tokens += len(kept)
            text = self.tokenizer.decode(body, skip_special_tokens=False)
            out.append(Generation(text, len(kept), not stopped and len(kept) >= self.opts.max_new_tokens))
        return out

    def chat(self, conversations: list[tuple[list[dict], list | None]]) -> list[Generation]:
        return self.generate([self.prompt(m, t) for m, t in conversations])


def cut_at_stop(tokens: list[int], stop_ids) -> tuple[list[int], list[int], bool]:
    """(generated tokens up to and including the first stop token, the same without it, whether a stop was found)."""
    cut = next((j for j, t in enumerate(tokens) if t in stop_ids), None)
    if cut is None:
        return list(tokens), list(tokens), False
    return list(tokens[: cut + 1]), list(tokens[:cut]), True


def pad_id(tokenizer) -> int:
    """The id left-padded batches use: the tokenizer's pad token, else its eos, else 0."""
    ids = (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
    return next((i for i in ids if i is not None), 0)


def hf_generator(
    model, tokenizer, opts: GenerationOptions | None = None, template_kwargs=None, dtype="fp32", vision=None
):
    pad = pad_id(tokenizer)
    return Generator(HFBackend(model, pad, dtype), tokenizer, opts, template_kwargs, vision)
