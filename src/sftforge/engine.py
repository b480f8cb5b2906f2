"""Generation that computes each token's keys and values once: a KV cache per sequence, kept across calls, and
continuous batching.

``model.generate`` on a left-padded batch recomputes a conversation's whole prompt at every call (the prompt of turn k
is prefilled again at turns k+1, k+2, ...), and runs a batch at the pace of its longest member. Here:

* **Slots.** Every sequence owns a slot of one cache (:class:`SlotCache`): per layer, K and V buffers of shape
  [slots, kv_heads, capacity, head_dim], the sequence's tokens at positions 0..n-1 of its slot. The sequences being
  decoded occupy slots 0..S-1, so a decode step attends over a view of the buffers (no copy); a finished sequence
  swaps places with the last active one and leaves the batch at once, and a waiting prompt takes its place
  (continuous batching). The decoder module is called with the cache object, whose ``update`` writes each layer's
  new keys and values into the slots, and a boolean mask built here ([S, 1, T, width], each row its own length);
  attention is torch's sdpa with grouped key/value heads (:func:`grouped_attention`, selected for the engine's calls
  only), which reads the slot views in place. The prompts admitted together are prefilled in one forward (padded, up
  to PREFILL_TOKENS). The LM head runs on the last position of each row only.
* **Prefixes.** A finished sequence's slot is kept with its token ids. A new prompt first looks for the kept
  sequence with which it shares the longest token prefix, crops that slot to the shared part and computes only the
  rest: the next turn of an episode (the conversation re-rendered by the chat template, the one render that also
  makes the training row) prefills the turn's observation and header only. Where the template rewrites earlier
  turns, or the text of a sampled answer re-tokenizes differently, the shared prefix is shorter and the difference is
  recomputed, and counted (``Stats.recomputed``): the cache never decides what the model sees, the render does.
  Identical prompts in one call (``rollout.n`` samples of one prompt) are prefilled once and their slots forked.
* **Stale weights.** The kept slots are dropped whenever the model's parameters have changed since they were
  computed (:meth:`Engine._weights_version`), and by :meth:`Engine.reset`, which RL calls before every step's
  rollouts.
* **Sampling.** Every sequence samples from its own generator, seeded from the call's seed, a checksum of its prompt
  ids and which copy of that prompt it is: the draws do not depend on which other sequences share a decode step, nor
  on their order; the turns of an episode (different prompts) draw differently. Greedy decoding takes the argmax, as ``generate`` does.

Supported: decoder-only models with ``get_decoder()`` and a linear head whose layers all use full attention, with
the sdpa or eager attention (the engine's own replaces either for its calls), not compiled. Others (sliding-window
or linear-attention layers, soft-capped logits or sinks, flash_attention_2, compiled layers, a module of one's own,
images) keep ``model.generate`` (:func:`supports` says why).
"""

from __future__ import annotations

import inspect
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sftforge.loss import has_fast_path
from sftforge.model import autocast

ATTENTIONS = ("sdpa", "eager", "sftforge_packed_sdpa")  # the last: attention.py's, plain sdpa outside packed rows
ENGINE_ATTENTION = "sftforge_engine"
PREFILL_TOKENS = 8192  # tokens (padding included) of one prefill forward: several prompts' at once, up to this


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """Attention of the engine's rows: q [n, Hq, t, D] over the slot views k/v [n, Hkv, width, D] under the engine's
    boolean mask [n, 1, t, width], torch's sdpa with grouped key/value heads (``enable_gqa``): the keys and values are
    read in place, not copied once per query head as transformers' sdpa does with a mask (repeat_kv). Returns
    [n, t, Hq, D] and no weights, as transformers' attention functions do."""
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ENGINE_ATTENTION, grouped_attention)


def supports(model) -> str | None:
    """None when the engine can run ``model``; else why not (then ``model.generate`` runs)."""
    if not hasattr(model, "generate") or not has_fast_path(model):
        return "the module has no generate / get_decoder"
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is None or getattr(config, "vision_config", None) is not None:
        return "a vision-language model"
    if getattr(text, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layers of kinds {sorted(kinds)}"
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return "sliding-window attention"
    impl = getattr(text, "_attn_implementation", None) or "eager"
    if impl not in ATTENTIONS:
        return f"attn_implementation={impl}"
    if getattr(text, "attn_logit_softcapping", None) or getattr(text, "model_type", "") in ("gpt_oss",):
        return "attention with logit soft-capping or sinks"
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
        return "compiled layers (model.compile: the cache's Python bookkeeping would recompile them every step)"
    return None


@dataclass
class Stats:
    prefill: int = 0
    """Tokens computed from a prompt (not generated)."""
    reused: int = 0
    """Prompt tokens found in a kept slot (not computed again)."""
    recomputed: int = 0
    """Kept tokens that the new prompt did not share (cropped from their slot)."""
    generated: int = 0
    forwards: int = 0
    seconds: float = 0.0


class SlotCache:
    """Per layer, K and V of every slot: [slots, kv_heads, capacity, head_dim], grown by doubling. ``update`` is what
    the model's attention layers call; before each forward the engine sets the rows it covers (``start``, ``count``),
    where each row writes (``positions``) and how many keys the attention sees (``width``)."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.slots, self.capacity = 0, 0
        self.start, self.count, self.width = 0, 0, 0
        self.positions: list[int] = []
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None

    def reserve(self, slots: int, capacity: int) -> None:
        """Room for ``slots`` slots of ``capacity`` tokens (the buffers are reallocated, their contents kept)."""
        new_slots, new_capacity = self.slots, self.capacity
        if new_slots < slots:  # (growth by half: fewer copies than one slot at a time, less slack than doubling)
            new_slots = max(8, -(-max(slots, self.slots * 3 // 2) // 8) * 8)
        if new_capacity < capacity:
            new_capacity = max(256, -(-max(capacity, self.capacity * 3 // 2) // 256) * 256)
        if (new_slots, new_capacity) == (self.slots, self.capacity):
            return
        self.slots, self.capacity = new_slots, new_capacity
        for store in (self.k, self.v):
            for layer, buf in store.items():
                grown = buf.new_zeros((new_slots, buf.shape[1], new_capacity, buf.shape[3]))
                grown[: buf.shape[0], :, : buf.shape[2]] = buf
                store[layer] = grown

    def _buffer(self, store: dict[int, torch.Tensor], layer: int, like: torch.Tensor) -> torch.Tensor:
        buf = store.get(layer)
        if buf is None or buf.dtype != like.dtype:
            store[layer] = buf = like.new_zeros((self.slots, like.shape[1], self.capacity, like.shape[3]))
        return buf

    def set_rows(self, start: int, positions: list[int], new: int, device) -> None:
        """The next forward covers slots start..start+len(positions)-1, ``new`` tokens each, row r's at positions[r]
        onwards (rows with fewer new tokens are padded: their extra keys and values land past the row's end, where
        nothing attends to them, and are overwritten later)."""
        self.start, self.count, self.positions = start, len(positions), positions
        self.width = max(positions) + new
        if len(positions) > 1:
            rows = torch.arange(start, start + len(positions), device=device)[:, None]
            pos = torch.tensor(positions, device=device)[:, None] + torch.arange(new, device=device)[None, :]
            self._index = (rows, pos)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self._buffer(self.k, layer_idx, key), self._buffer(self.v, layer_idx, value)
        s, n, t = self.start, self.count, key.shape[2]
        if n == 1:  # one row: a slice
            p = self.positions[0]
            k[s, :, p : p + t] = key[0]
            v[s, :, p : p + t] = value[0]
        else:  # rows at their own positions: [n, t] indices, the values as [n, t, heads, dim]
            rows, pos = self._index
            k[rows, :, pos] = key.transpose(1, 2)
            v[rows, :, pos] = value.transpose(1, 2)
        return k[s : s + n, :, : self.width], v[s : s + n, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly

    def copy(self, src: int, dst: int, length: int) -> None:
        for store in (self.k, self.v):
            for buf in store.values():
                buf[dst, :, :length] = buf[src, :, :length]

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        if a == b:
            return
        n = max(length_a, length_b)
        for store in (self.k, self.v):
            for buf in store.values():
                tmp = buf[a, :, :n].clone()
                buf[a, :, :n] = buf[b, :, :n]
                buf[b, :, :n] = tmp


@dataclass
class _Seq:
    """A sequence in a slot: its token ids (those whose keys and values are in the slot: ``ids[:cached]``)."""

    ids: list[int]
    cached: int = 0
    request: int = -1  # index in the call's prompts; -1: kept from an earlier call
    generator: torch.Generator | None = None
    new: list[int] = field(default_factory=list)
    age: int = 0


def _shared(a, b) -> int:
    """Length of the common prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


class Engine:
    """Continuous batching over a :class:`SlotCache`, prefixes kept across calls (see the module docstring)."""

    def __init__(self, model, dtype: str = "fp32", max_batch: int = 64, max_cache_bytes: int | None = None) -> None:
        self.model, self.dtype, self.max_batch = model, dtype, max(1, max_batch)
        device = next(model.parameters()).device
        if max_cache_bytes is None:  # a GPU: a third of its free memory; the CPU: 4 GiB
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 12 << 30
            max_cache_bytes = free // 3
        self.max_cache_bytes = max_cache_bytes
        self._call_size = 0
        self._claims: dict[int, int] = {}
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        _register()
        # the decoder's configs, whose attention the engine's forwards switch to grouped_attention (and back)
        configs = {
            id(m.config): m.config
            for m in self.decoder.modules()
            if getattr(getattr(m, "config", None), "_attn_implementation", None) in ATTENTIONS
        }
        self._configs = [(c, c._attn_implementation) for c in configs.values()]
        self.cache = SlotCache()
        self.seqs: list[_Seq | None] = []  # per slot; active sequences in slots 0..active-1
        self.active = 0
        self.stats = Stats()
        self._weights: tuple | None = None
        self.on_progress: Callable[[int, int, int], None] | None = None  # (done, total, generated tokens)

    # -- bookkeeping -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _weights_version(self) -> tuple:
        """Changes when the weights do: the parameters' in-place version counters (a weight sync's copy_) and a
        checksum of their first elements (torch's fused AdamW updates without bumping the counters)."""
        params = list(self.model.parameters())
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # a DTensor: its shard, no collective
        sums = torch.stack([t.reshape(-1)[:8].float().sum() for t in local]).cpu()
        return tuple(p._version for p in params), tuple(sums.tolist())

    def reset(self) -> None:
        """Forget every kept slot (the buffers stay allocated)."""
        self.seqs = [None] * len(self.seqs)
        self.active = 0

    def _free_slot(self) -> int:
        """Slot ``active`` made free for a new sequence: an empty slot moved there, else a new one, else the oldest
        kept sequence's (:meth:`_slot_limit`)."""
        empty = next((i for i in range(self.active, len(self.seqs)) if self.seqs[i] is None), None)
        if empty is None and len(self.seqs) < self._slot_limit():
            self.seqs.append(None)
            self.cache.reserve(len(self.seqs), 0)
            empty = len(self.seqs) - 1
        if empty is None:
            empty = max(range(self.active, len(self.seqs)), key=lambda i: self.seqs[i].age)
            self.seqs[empty] = None
        self._swap(empty, self.active)
        return self.active

    def _slot_limit(self) -> int:
        """Slots the cache may hold: every sequence of the call plus a batch (the next turn of each episode finds its
        conversation kept), within ``max_cache_bytes`` at the current capacity, and never fewer than a batch + 1."""
        want = max(2 * self.max_batch, self._call_size + self.max_batch)
        per_slot = sum(
            b.shape[1] * b.shape[2] * b.shape[3] * b.element_size()
            for st in (self.cache.k, self.cache.v)
            for b in st.values()
        )
        if per_slot:
            want = min(want, max(self.max_batch + 1, self.max_cache_bytes // per_slot))
        return want

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        la = self.seqs[a].cached if self.seqs[a] else 0
        lb = self.seqs[b].cached if self.seqs[b] else 0
        if la or lb:
            self.cache.swap(a, b, la, lb)
        self.seqs[a], self.seqs[b] = self.seqs[b], self.seqs[a]

    def _grow(self, tokens: int) -> None:
        self.cache.reserve(len(self.seqs), tokens)

    # -- model calls -----------------------------------------------------------------------------------------------
    def _forward(self, start: int, rows: list[list[int]], positions: list[int], device) -> torch.Tensor:
        """Run slots start..start+len(rows)-1, row r's tokens ``rows[r]`` at positions[r] onwards (padded to the
        longest); returns the next-token logits [n, vocab] (fp32) at each row's last token."""
        n, t = len(rows), max(map(len, rows))
        ids = torch.zeros((n, t), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        ids = ids.to(device)
        self._grow(max(positions) + t)
        self.cache.set_rows(start, positions, t, device)
        pos = torch.tensor(positions, device=device)[:, None] + torch.arange(t, device=device)[None, :]
        mask = (torch.arange(self.cache.width, device=device)[None, None, :] <= pos[:, :, None])[:, None]
        for c, _ in self._configs:
            c._attn_implementation = ENGINE_ATTENTION
        try:
            out = self.decoder(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{self._cache_kw: self.cache}
            )
        finally:
            for c, impl in self._configs:
                c._attn_implementation = impl
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        self.stats.forwards += 1
        last = torch.tensor([len(row) - 1 for row in rows], device=h.device)
        return self.head(h[torch.arange(n, device=h.device), last]).float()

    def _prefill(self, slots: list[int], device) -> dict[int, torch.Tensor]:
        """Compute the uncached tokens of ``slots`` (consecutive), several rows per forward up to PREFILL_TOKENS
        (with padding); returns each slot's next-token logits."""
        out = {}
        k = 0
        while k < len(slots):
            j, longest = k, 0
            while j < len(slots):
                seq = self.seqs[slots[j]]
                longest = max(longest, len(seq.ids) - seq.cached)
                if j > k and longest * (j - k + 1) > PREFILL_TOKENS:
                    break
                j += 1
            chunk = slots[k:j]
            seqs = [self.seqs[s] for s in chunk]
            logits = self._forward(chunk[0], [q.ids[q.cached :] for q in seqs], [q.cached for q in seqs], device)
            for s, q, row in zip(chunk, seqs, logits):
                self.stats.prefill += len(q.ids) - q.cached
                q.cached = len(q.ids)
                out[s] = row
            k = j
        return out

    # -- the call --------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stop_ids,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[int]]:
        """New tokens for every prompt (up to and including a stop token, or ``max_new_tokens`` of them)."""
        if any(not p for p in prompts):
            raise ValueError("an empty prompt: the engine continues a prompt of at least one token")
        if max_new_tokens <= 0 or not prompts:
            return [[] for _ in prompts]
        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        version = self._weights_version()
        if version != self._weights:
            self.reset()
            self._weights = version
        for seq in self.seqs:
            if seq is not None:
                seq.age += 1
        self._call_size = len(prompts)
        stops = set(int(s) for s in stop_ids)
        out: list[list[int]] = [[] for _ in prompts]
        # identical prompts share one prefill; the longest first
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(tuple(p), []).append(i)
        copy = {i: j for g in groups.values() for j, i in enumerate(g)}  # which copy of its prompt each one is
        waiting = sorted(groups.values(), key=lambda g: -len(prompts[g[0]]))
        waiting = [g[k : k + self.max_batch] for g in waiting for k in range(0, len(g), self.max_batch)]
        # each kept slot goes to the prompt that shares the most with it (its own conversation's next turn), the
        # others copy the part they share (a system prompt) and leave it in place
        self._claims: dict[int, int] = {}
        best: dict[int, int] = {}
        for g in waiting:
            for q in self.seqs:
                if q is not None:
                    n = _shared(q.ids[: q.cached], prompts[g[0]])
                    if n > best.get(id(q), 0):
                        best[id(q)], self._claims[id(q)] = n, g[0]
        done = 0
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.dtype, device):
                last_logits: dict[int, torch.Tensor] = {}  # slot -> next-token logits
                while waiting or self.active:
                    placed = []
                    while waiting and self.active + len(waiting[0]) <= self.max_batch:
                        group = waiting.pop(0)
                        placed.append((group, self._place(group, prompts)))
                    if placed:
                        first = self._prefill([slot for _, slot in placed], device)
                        for group, slot in placed:
                            self._start(group, slot, first[slot], device, seed, copy, do_sample, last_logits)
                    logits = torch.stack([last_logits[s] for s in range(self.active)])
                    tokens = self._sample(logits, do_sample, temperature, top_p)
                    finished = []
                    for s in range(self.active):
                        seq, tok = self.seqs[s], tokens[s]
                        seq.ids.append(tok)
                        seq.new.append(tok)
                        if tok in stops or len(seq.new) >= max_new_tokens:
                            finished.append(s)
                    self.stats.generated += self.active
                    for s in reversed(finished):  # highest first: the swaps keep lower slots in place
                        seq = self.seqs[s]
                        out[seq.request] = seq.new
                        seq.new, seq.request, seq.generator, seq.age = [], -1, None, 0
                        last = self.active - 1
                        self._swap(s, last)
                        self.active -= 1
                        done += 1
                    if finished and self.on_progress is not None:
                        self.on_progress(done, len(prompts), self.stats.generated)
                    if self.active:
                        seqs = self.seqs[: self.active]
                        logits = self._forward(0, [[q.ids[-1]] for q in seqs], [q.cached for q in seqs], device)
                        for s in range(self.active):
                            self.seqs[s].cached += 1
                            last_logits[s] = logits[s]
        finally:
            self.model.train(was)
        self.stats.seconds += time.perf_counter() - t0
        return out

    def _place(self, group: list[int], prompts) -> int:
        """A slot (at index ``active``) for the first of ``group`` (indices of identical prompts), holding the longest
        prefix of it that a kept slot has: the kept slot itself when this prompt claimed it, else a copy of the
        shared part. Returns the slot; its remaining tokens are computed by :meth:`_prefill`."""
        ids = list(prompts[group[0]])
        best, best_n = None, 0
        for i in range(self.active, len(self.seqs)):
            seq = self.seqs[i]
            if seq is not None:
                n = _shared(seq.ids[: seq.cached], ids)
                if n > best_n:
                    best, best_n = i, n
        keep = min(best_n, len(ids) - 1)  # at least one token to compute: its logits start the answer
        if best is not None and self._claims.get(id(self.seqs[best])) == group[0]:  # its own: the slot is taken
            self._swap(best, self.active)
            slot = self.active
            self.stats.reused += keep
            self.stats.recomputed += self.seqs[slot].cached - keep  # what the new render does not share
            self.seqs[slot].ids, self.seqs[slot].cached = ids, keep
        elif best is not None and keep > 0:  # a shared beginning: copied, the kept one stays for its claimant
            source = self.seqs[best]
            source.age, age = -1, source.age  # not the one evicted to make room
            slot = self._free_slot()
            source.age = age
            src = next(i for i, q in enumerate(self.seqs) if q is source)
            self.cache.copy(src, slot, keep)
            self.seqs[slot] = _Seq(ids, keep)
            self.stats.reused += keep
        else:
            slot = self._free_slot()
            self.seqs[slot] = _Seq(ids)
        self.active += 1
        return slot

    def _start(
        self,
        group: list[int],
        slot: int,
        logits: torch.Tensor,
        device,
        seed: int,
        copy: dict[int, int],
        do_sample: bool,
        last_logits,
    ) -> None:
        """The sequences of ``group`` begin: the first in ``slot`` (prefilled), the others forked from it."""
        first = self.seqs[slot]
        for j, request in enumerate(group):
            if j:
                s = self._free_slot()
                self.cache.copy(slot, s, first.cached)
                self.seqs[s] = _Seq(list(first.ids), first.cached)
                self.active += 1
            else:
                s = slot
            seq = self.seqs[s]
            seq.request, seq.new, seq.age = request, [], 0
            if do_sample:  # seeded by what it continues: the same draws whatever else runs, in whatever order
                seq.generator = torch.Generator(device=device)
                key = zlib.crc32(np.asarray(first.ids, dtype=np.int64).tobytes())
                seq.generator.manual_seed((seed * 1_000_003 + key * 10_007 + copy[request]) % (1 << 63))
            last_logits[s] = logits

    def _sample(self, logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float) -> list[int]:
        if not do_sample:
            return logits.argmax(-1).tolist()
        logits = logits / max(temperature, 1e-6)
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p (>= 1 token)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        return [int(torch.multinomial(probs[s], 1, generator=self.seqs[s].generator)) for s in range(len(probs))]


__all__ = ["ATTENTIONS", "Engine", "SlotCache", "Stats", "supports"]
