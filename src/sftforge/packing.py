"""Samples -> micro-batches: shifted labels, padding-free packing with per-sample attention, padded collate.

A sample is a pair of lists ``input_ids`` / ``loss_mask`` (1 = the model is trained to predict that token). The
label of position t is ``input_ids[t + 1]`` when ``loss_mask[t + 1] == 1``, else -100 (ignored); the last position of
every sample has no target, so no target ever crosses a sample boundary in a packed row.

Packed rows need an explicit attention structure: transformers 5.23 with sdpa/eager does not isolate samples from
restarting ``position_ids`` alone (measured: 0.74 logit error on the second of two packed samples). The samples'
boundaries go with the micro-batch: ``packed_cu_seqlens`` for sdpa (attention.py runs each sample's causal attention
on its own; no L×L mask exists), ``cu_seq_lens_q/k`` for flash_attention_2, and a block-diagonal causal additive 4D
mask for eager (transformers passes a 4D mask through unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sftforge import prefix_tree
from sftforge.attention import placeholder_mask

IGNORE_INDEX = -100
HOST_KEYS = ("packed_cu_seqlens", "sp_cu_seqlens")
"""Sample boundaries read on the host by the attention (attention.py, ulysses.py): ``MicroBatch.to`` leaves them on the
CPU, so that reading them never waits for the GPU."""


@dataclass
class MicroBatch:
    """Tensors for one forward pass, plus the counts the trainer logs."""

    input_ids: torch.Tensor
    """[B, L] token ids (B = 1 when packed)."""
    labels: torch.Tensor
    """[B, L] next-token targets, IGNORE_INDEX where nothing is trained."""
    position_ids: torch.Tensor
    """[B, L] positions, restarting at 0 for every sample; [3, B, L] (temporal, height, width) when the
    micro-batch has images (vision.py)."""
    attention_mask: torch.Tensor | None
    """[B, L] padding mask (unpacked), [1, 1, L, L] block-diagonal causal mask (packed, eager), or None (packed
    sdpa and flash: the boundaries are in ``extra``)."""
    seq_lens: list[int]
    """Length of every sample in the micro-batch, in row order."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Additional model kwargs (packed_cu_seqlens for sdpa; cu_seq_lens_q/k, max_length_q/k for flash_attention_2)."""
    supervised: torch.Tensor | None = None
    """Flat indices (into [B * L]) of the positions with a target, on the labels' device; computed on the host by
    :meth:`to`, so that the loss gathers them without a device-to-host sync (boolean indexing on the GPU waits for
    the count)."""

    @property
    def n_tokens(self) -> int:
        """Non-padding input tokens."""
        return sum(self.seq_lens)

    @property
    def n_supervised(self) -> int:
        if self.supervised is not None:
            return self.supervised.numel()
        return int((self.labels != IGNORE_INDEX).sum())

    def supervised_index(self) -> torch.Tensor:
        """:attr:`supervised`, computed here when the micro-batch did not come through :meth:`to`."""
        if self.supervised is not None:
            return self.supervised
        return (self.labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)

    def model_inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The decoder's keyword arguments; ``dtype``: the decoder's compute dtype (of the packed-sdpa placeholder)."""
        mask = self.attention_mask
        if mask is None and "packed_cu_seqlens" in self.extra:  # see attention.py: no L×L mask is built
            mask = placeholder_mask(self.input_ids.shape[1], self.input_ids.device, dtype)
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": mask}
        out.update(self.extra)
        return out

    def to(self, device: torch.device | str) -> MicroBatch:
        """On ``device``; to a GPU through pinned host memory, so that the copies do not wait for the device."""
        pin = torch.device(device).type == "cuda"

        def mv(t):
            if not isinstance(t, torch.Tensor):
                return t
            if pin and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        index = self.supervised
        if index is None and self.labels.device.type == "cpu":
            index = self.supervised_index()
        return MicroBatch(
            mv(self.input_ids),
            mv(self.labels),
            mv(self.position_ids),
            mv(self.attention_mask),
            list(self.seq_lens),
            {
                k: v if k in HOST_KEYS else [mv(x) for x in v] if isinstance(v, list) else mv(v)
                for k, v in self.extra.items()
            },
            mv(index),
        )


def _ids_mask(sample: Any) -> tuple[list[int], list[int]]:
    if isinstance(sample, dict):
        return sample["input_ids"], sample["loss_mask"]
    if isinstance(sample, (tuple, list)):
        return sample[0], sample[1]
    return sample.input_ids, sample.loss_mask


def shift_labels(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """labels[t] = input_ids[t+1] if loss_mask[t+1] else IGNORE_INDEX; the last position has no target."""
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"input_ids ({len(input_ids)}) and loss_mask ({len(loss_mask)}) differ in length.")
    labels = [tok if m else IGNORE_INDEX for tok, m in zip(input_ids[1:], loss_mask[1:])]
    labels.append(IGNORE_INDEX)
    return labels


def n_supervised(sample: Any) -> int:
    """Trained targets of one sample after the shift (the first token can never be a target)."""
    _, mask = _ids_mask(sample)
    return sum(1 for m in mask[1:] if m)


def boundaries(seq_lens: Sequence[int]) -> list[int]:
    """Offsets where the samples of a packed row start, and the row's end: [0, l0, l0 + l1, ...]."""
    cu = [0]
    for n in seq_lens:
        cu.append(cu[-1] + n)
    return cu


def block_causal_mask(seq_lens: Sequence[int], kind: str = "bool", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[1, 1, L, L] mask where position q sees position k iff both are in the same sample and k <= q.

    kind="bool": True = attend (what sdpa takes); kind="float": 0 = attend, dtype's min = blocked (eager adds it).
    """
    seg = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(list(seq_lens)))
    n = seg.numel()
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    if kind == "bool":
        return allowed[None, None]
    mask = torch.zeros(n, n, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _images(sample: Any) -> list | None:
    if isinstance(sample, dict):
        return sample.get("images")
    if isinstance(sample, (tuple, list)):
        return None
    return getattr(sample, "images", None)


def _with_images(mb: MicroBatch, samples: Sequence[Any], rows: list[list[int]], vision) -> MicroBatch:
    """A micro-batch whose samples have images: 3-D rotary positions per sample (each restarting at 0, as when the
    sample runs alone), ``pixel_values`` and ``image_grid_thw`` of its images in row order (vision.py)."""
    if vision is None:
        raise ValueError(
            "a micro-batch with images needs the model's vision settings: collate(..., vision=...) "
            "(sftforge.vision.load_vision)."
        )
    images = [im for s in samples for im in _images(s) or ()]
    pos = torch.zeros((3, *mb.input_ids.shape), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for j in members:
            ids, _ = _ids_mask(samples[j])
            grids = [g for _, g in _images(samples[j]) or ()]
            pos[:, r, at : at + len(ids)] = torch.from_numpy(vision.positions(ids, grids))
            at += len(ids)
    mb.position_ids = pos
    mb.extra.update(vision.pixels([b for b, _ in images], [g for _, g in images]))
    return mb


def _parents(sample: Any) -> list[int] | None:
    if isinstance(sample, dict):
        return sample.get("parents")
    if isinstance(sample, (tuple, list)):
        return sample[2] if len(sample) > 2 else None
    return getattr(sample, "parents", None)


def pack_trees(
    samples: Sequence[Any], attn_implementation: str, mask_dtype: torch.dtype, tree_attention: str = "mask"
) -> MicroBatch:
    """One row of prefix-tree samples (prefix_tree.py) and plain ones: each token at the position it has in its own
    sequence (its depth), attending to exactly its ancestors, its target the trained child's token. sdpa: per
    sample, a tree under its [l, l] bool ancestor mask (``tree_attention=mask``) or, with ``flex``, the row's
    ``packed_tree_ends`` (each token's subtree end: one block-sparse flex_attention call, attention.flex_row);
    eager: one additive [1, 1, L, L] mask."""
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"prefix-tree samples (data.reasoning_history=per_turn) need sdpa or eager attention, not "
            f"{attn_implementation}."
        )
    # sdpa: each sample's attention on its own (attention.py), a tree's under its [l, l] ancestor mask; eager: one
    # [1, 1, L, L] additive mask of the row
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    lens: list[int] = []
    blocks = []
    ends: list[int] = []
    flex = attn_implementation == "sdpa" and tree_attention == "flex"
    for s in samples:
        x, m = _ids_mask(s)
        parents = _parents(s) or list(range(-1, len(x) - 1))
        if flex:
            ends += [len(ids) + e for e in prefix_tree.subtree_ends(parents)]
        ids += x
        labels += prefix_tree.shifted_labels(x, m, parents, IGNORE_INDEX)
        pos += prefix_tree.depths(parents)
        lens.append(len(x))
        tree = _parents(s) is not None
        if not flex:
            blocks.append(prefix_tree.ancestors(parents) if tree or attn_implementation == "eager" else None)
    t = lambda v: torch.tensor(v, dtype=torch.long)[None]  # noqa: E731
    if flex:
        extra = {
            "packed_cu_seqlens": torch.tensor(boundaries(lens), dtype=torch.int64),
            "packed_tree_ends": torch.tensor(ends, dtype=torch.int32),
        }
        return MicroBatch(t(ids), t(labels), t(pos), None, lens, extra)
    if attn_implementation == "sdpa":  # chains: None (causal)
        extra = {"packed_cu_seqlens": torch.tensor(boundaries(lens), dtype=torch.int64), "packed_tree_masks": blocks}
        return MicroBatch(t(ids), t(labels), t(pos), None, lens, extra)
    allowed = torch.block_diag(*blocks)
    mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)
    return MicroBatch(t(ids), t(labels), t(pos), mask[None, None], lens)


def pack(
    samples: Sequence[Any],
    attn_implementation: str = "sdpa",
    mask_dtype: torch.dtype = torch.float32,
    vision=None,
    tree_attention: str = "mask",
) -> MicroBatch:
    """Concatenate samples into one row; positions restart per sample; attention never crosses samples.
    ``tree_attention``: mask | flex, how prefix-tree samples attend (model.tree_attention, resolved)."""
    if any(_images(s) for s in samples):
        if any(_parents(s) is not None for s in samples):
            raise ValueError("prefix-tree samples do not take images.")
        return _with_images(
            _pack(samples, attn_implementation, mask_dtype), samples, [list(range(len(samples)))], vision
        )
    return _pack(samples, attn_implementation, mask_dtype, tree_attention)


def _pack(
    samples: Sequence[Any], attn_implementation: str, mask_dtype: torch.dtype, tree_attention: str = "mask"
) -> MicroBatch:
    if any(_parents(s) is not None for s in samples):
        return pack_trees(samples, attn_implementation, mask_dtype, tree_attention)
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    lens: list[int] = []
    for s in samples:
        x, m = _ids_mask(s)
        ids += x
        labels += shift_labels(x, m)
        pos += range(len(x))
        lens.append(len(x))
    cu = boundaries(lens)
    mask, extra = None, {}
    if attn_implementation.startswith("flash"):
        t32 = torch.tensor(cu, dtype=torch.int32)
        extra = {"cu_seq_lens_q": t32, "cu_seq_lens_k": t32, "max_length_q": max(lens), "max_length_k": max(lens)}
    elif attn_implementation == "eager":
        mask = block_causal_mask(lens, "float", mask_dtype)
    elif attn_implementation == "sdpa":
        extra = {"packed_cu_seqlens": torch.tensor(cu, dtype=torch.int64)}
    else:
        raise ValueError(
            f"packing with attn_implementation={attn_implementation!r}: use sdpa, eager or flash_attention_2."
        )
    t = lambda v: torch.tensor(v, dtype=torch.long)[None]  # noqa: E731
    return MicroBatch(t(ids), t(labels), t(pos), mask, lens, extra)


def pad_collate(samples: Sequence[Any], pad_id: int = 0, vision=None) -> MicroBatch:
    """Right-padded [B, max_len] batch with a 2D padding mask (data.packing=false)."""
    if any(_images(s) for s in samples):
        return _with_images(_pad(samples, pad_id), samples, [[j] for j in range(len(samples))], vision)
    return _pad(samples, pad_id)


def _pad(samples: Sequence[Any], pad_id: int) -> MicroBatch:
    if any(_parents(s) is not None for s in samples):
        raise ValueError("prefix-tree samples (data.reasoning_history=per_turn) are packed: set data.packing=true.")
    rows = [_ids_mask(s) for s in samples]
    width = max(len(x) for x, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, m) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(x)] = torch.tensor(shift_labels(x, m))
        attn[i, : len(x)] = 1
    pos = torch.arange(width)[None].expand(len(rows), -1).clone()
    return MicroBatch(ids, labels, pos, attn, [len(x) for x, _ in rows])


def collate(
    samples: Sequence[Any],
    packing: bool = True,
    attn_implementation: str = "sdpa",
    pad_id: int = 0,
    mask_dtype: torch.dtype = torch.float32,
    vision=None,
    tree_attention: str = "mask",
) -> MicroBatch:
    """One micro-batch of ``samples``; ``vision``: the model's vision settings when samples have images;
    ``tree_attention``: mask | flex for prefix-tree samples (attention.resolve_tree_attention)."""
    if packing:
        return pack(samples, attn_implementation, mask_dtype, vision, tree_attention)
    return pad_collate(samples, pad_id, vision)


def padded_tokens(lengths: Sequence[int], packing: bool = True) -> int:
    """Token slots one micro-batch occupies: the sum of lengths when packed, rows × longest row when padded."""
    return sum(lengths) if packing else len(lengths) * max(lengths, default=0)


def split_to_budget(lengths: Sequence[int], max_tokens: int, packing: bool = True) -> list[list[int]]:
    """Split one micro-batch (given its samples' lengths) into groups of indices, each within ``max_tokens``.

    Packed cost = sum of lengths (best-fit decreasing); padded cost = rows × longest row (greedy over lengths sorted
    longest first). A single sample longer than the budget gets a group of its own. max_tokens <= 0 means no bound.
    Every sample lands in exactly one group, so the optimizer step still sees every sequence.
    """
    idx = list(range(len(lengths)))
    if max_tokens <= 0 or not idx:
        return [idx] if idx else []
    order = sorted(idx, key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    if packing:
        room: list[int] = []
        for i in order:
            best = None
            for g, r in enumerate(room):
                if lengths[i] <= r and (best is None or r < room[best]):
                    best = g
            if best is None:
                groups.append([i])
                room.append(max_tokens - lengths[i])
            else:
                groups[best].append(i)
                room[best] -= lengths[i]
    else:
        for i in order:  # longest first: a group's first sample sets its width
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
    return [sorted(g) for g in groups]


__all__ = [
    "IGNORE_INDEX",
    "MicroBatch",
    "pack_trees",
    "block_causal_mask",
    "boundaries",
    "collate",
    "n_supervised",
    "pack",
    "pad_collate",
    "padded_tokens",
    "shift_labels",
    "split_to_budget",
]
