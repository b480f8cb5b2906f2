"""A user file for sftforge's model.builder: a frozen Qwen3-shaped base plus gated knowledge-memory modules (the
ExplicitLM workflow). Nothing in sftforge imports this file unless a config names it:

    model.builder=examples/custom_module/memory.py:build

``build(model, cfg)`` gets the base loaded from model.path (a transformers Qwen3ForCausalLM) and returns the module
to train. Each decoder layer gets a memory read: the layer's output attends over a bank of learned slots
(``memory_bank``), a gate (``memory_gate``) decides per token how much of it to take, and ``gated_memory_fusion``
mixes it into the residual stream through ``memory_norm``. The fusion starts at zero, so the built model computes
exactly what the base computes until training moves it.

What sftforge's fast path needs (see docs/custom-models.md): ``get_decoder()`` whose forward takes
input_ids / position_ids / attention_mask (and passes any other keyword on to the base's layers: packed attention
travels that way) and returns ``last_hidden_state``; ``get_output_embeddings()`` (the LM head) and
``get_input_embeddings()``. ``forward`` returns logits for generation and for users.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast


class GatedMemory(nn.Module):
    """One layer's memory: read = softmax(norm(h) · bankᵀ / √d) · bank; h + σ(gate(h)) · fusion([h, read])."""

    def __init__(self, hidden: int, slots: int):
        super().__init__()
        self.memory_bank = nn.Parameter(torch.randn(slots, hidden) * hidden**-0.5)
        self.memory_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.memory_gate = nn.Linear(hidden, 1)
        self.gated_memory_fusion = nn.Linear(2 * hidden, hidden)
        nn.init.zeros_(self.gated_memory_fusion.weight)  # the built model starts as the base
        nn.init.zeros_(self.gated_memory_fusion.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q = self.memory_norm(h)
        read = torch.softmax(q @ self.memory_bank.t() * q.shape[-1] ** -0.5, dim=-1) @ self.memory_bank
        gate = torch.sigmoid(self.memory_gate(q))
        return h + gate * self.gated_memory_fusion(torch.cat([q, read], dim=-1))


class MemoryLayer(nn.Module):
    """A base decoder layer followed by its memory (the layer's own forward is called unchanged)."""

    def __init__(self, layer: nn.Module, memory: GatedMemory):
        super().__init__()
        self.layer, self.memory = layer, memory

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (self.memory(out[0]), *out[1:])
        return self.memory(out)


class MemoryLM(nn.Module):
    """The base causal LM with a memory after every decoder layer."""

    def __init__(self, base: nn.Module, slots: int = 64):
        super().__init__()
        self.base = base
        hidden = base.config.hidden_size
        layers = base.model.layers
        for i in range(len(layers)):
            layers[i] = MemoryLayer(layers[i], GatedMemory(hidden, slots))
        self.config = base.config

    def get_decoder(self) -> nn.Module:
        return self.base.model  # its layers now hold the memories

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs) -> torch.Tensor:
        out: BaseModelOutputWithPast = self.base.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
        )
        return self.base.lm_head(out.last_hidden_state)


def build(model, cfg) -> nn.Module:
    """sftforge's model.builder entry point: ``model`` is the base from model.path, ``cfg`` the resolved config."""
    if model is None:
        raise ValueError("this builder adds memories to a base model: set model.path")
    return MemoryLM(model, slots=64)
