"""Prefix trees of token sequences: K samples that share prefixes become one sample whose tokens are the trie's nodes.

``data.reasoning_history=per_turn`` renders each assistant turn of a conversation in its own inference context (the
template's render of the conversation before it, the turn as generated), so a K-turn conversation gives K sequences
that share long prefixes and diverge where the template renders history differently from the turn as it was
generated (Qwen3 drops earlier turns' ``<think>``). Merged into one trie over token ids, each shared prefix is a path
computed once; only the divergent branches add tokens.

A tree sample is laid out in depth-first order (a node after its parent) with, per node: its token, its loss-mask
bit (trained in the sequence that trains it), and its parent's index (-1 for the root). Its position is its depth
(the position it has in its own sequence) and it attends to exactly its ancestors and itself (:func:`ancestors`).
The loss of a tree equals the sum of the K sequences' losses: every trained token is trained in exactly one of them
(each expanded sequence trains only its last turn), and a node's prediction depends only on its ancestors, which are
the same tokens at the same positions as in that sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge(sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[list[int], list[int], list[int]]:
    """(ids, loss_mask, parents) of the trie of ``sequences`` ((ids, mask) pairs), depth-first, children in the order
    the sequences first reach them; a node is trained when any sequence trains it (the same token in the same
    context: the same prediction)."""
    children: list[dict[int, int]] = [{}]  # node 0 is a virtual root above the first tokens
    token, mask = [-1], [0]
    for ids, m in sequences:
        if len(ids) != len(m):
            raise ValueError(f"ids ({len(ids)}) and mask ({len(m)}) differ in length")
        node = 0
        for t, bit in zip(ids, m):
            nxt = children[node].get(t)
            if nxt is None:
                nxt = len(token)
                children[node][t] = nxt
                children.append({})
                token.append(t)
                mask.append(0)
            mask[nxt] = mask[nxt] | int(bit)
            node = nxt
    out_ids, out_mask, parents = [], [], []
    stack = [(child, -1) for child in reversed(list(children[0].values()))]
    while stack:
        node, parent = stack.pop()
        me = len(out_ids)
        out_ids.append(token[node])
        out_mask.append(mask[node])
        parents.append(parent)
        stack.extend((child, me) for child in reversed(list(children[node].values())))
    return out_ids, out_mask, parents


def is_chain(parents: Sequence[int]) -> bool:
    """One branch only: node i's parent is i - 1 (a plain sequence)."""
    return all(p == i - 1 for i, p in enumerate(parents))


def depths(parents: Sequence[int]) -> list[int]:
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def shifted_labels(ids: Sequence[int], mask: Sequence[int], parents: Sequence[int], ignore: int) -> list[int]:
    """labels[j] = the trained child token predicted from node j (IGNORE where none): the tree's next-token targets."""
    labels = [ignore] * len(ids)
    for j, p in enumerate(parents):
        if p >= 0 and mask[j]:
            if labels[p] != ignore:
                raise ValueError(f"node {p} has two trained children; a prefix tree trains one target per context")
            labels[p] = ids[j]
    return labels


def ancestors(parents: Sequence[int]) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True iff node j is node i or one of its ancestors."""
    n = len(parents)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            out[i] = out[p]
        out[i, i] = True
    return out


def subtree_ends(parents: Sequence[int]) -> list[int]:
    """Per node j, one past its last descendant: in the depth-first layout a node's subtree is the contiguous range
    [j, end[j]), so node j is an ancestor (or self) of node i iff j <= i < end[j] — the ancestor mask in O(n)
    (attention.flex_row builds its block-sparse mask from it). Refuses a layout that is not depth-first (a node's
    parent must be on the path to the node before it)."""
    end = [i + 1 for i in range(len(parents))]
    path: list[int] = []
    for i, p in enumerate(parents):
        while path and path[-1] != p:
            path.pop()
        if p >= 0 and not path:
            raise ValueError(f"node {i}'s parent {p} is not on the path to node {i - 1}: not a depth-first layout")
        path.append(i)
    for i in range(len(parents) - 1, -1, -1):
        if parents[i] >= 0:
            end[parents[i]] = max(end[parents[i]], end[i])
    return end


__all__ = ["ancestors", "depths", "is_chain", "merge", "shifted_labels", "subtree_ends"]
