"""A decode step's forward pass: one token per row, K/V written into and read from the pool.

``transformers_step`` runs the model's own forward with ``StepCache`` and the
paged attention (``paged_attention``): any causal LM, and the reference every
other path is held to. ``FusedStep`` runs ``FusedForward`` (Llama-shaped
models, a fraction of the kernels) with the same paged attention, each layer's
K and V written into the pool by its rotary kernel.
"""

from __future__ import annotations

from typing import Callable

import torch

from pdserve.engine.fused_forward import FusedForward, fused_supported
from pdserve.engine.kv_pool import KVPool, PagedStep
from pdserve.engine.paged_attention import StepCache, paged_attention

# (ids (B,), positions (B,), step) -> logits (B, vocab)
StepForward = Callable[[torch.Tensor, torch.Tensor, PagedStep], torch.Tensor]


def transformers_step(model: torch.nn.Module, pool: KVPool) -> StepForward:
    """The model's own forward over the pool (any causal LM switched to the paged attention)."""

    def forward(ids: torch.Tensor, positions: torch.Tensor, step: PagedStep) -> torch.Tensor:
        out = model(input_ids=ids[:, None], position_ids=positions[:, None], attention_mask=step.mask,
                    past_key_values=StepCache(pool, step), use_cache=True, paged=step)
        return out.logits[:, -1]

    return forward


class FusedStep:
    """A decode step of a Llama-shaped model through ``FusedForward``."""

    def __init__(self, model: torch.nn.Module, pool: KVPool) -> None:
        self._forward = FusedForward(model)
        self._pool = pool

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, step: PagedStep) -> torch.Tensor:
        pool = self._pool

        def attend(layer: int, module: torch.nn.Module, q: torch.Tensor, kv: None) -> torch.Tensor:
            out, _ = paged_attention(module, q[:, :, None], pool.keys[layer], pool.values[layer], None,
                                     scaling=module.scaling, paged=step)
            return out.reshape(out.shape[0], -1)

        # Each layer's K and V are written into the pool by the rotary kernel (one kernel less a layer).
        store = (pool.keys, pool.values, step.write_slots)
        return self._forward.logits(self._forward.hidden(ids, positions, attend, store))


def step_forward(model: torch.nn.Module, pool: KVPool, fused: bool) -> StepForward:
    """``FusedStep`` where asked for and the model is supported, else ``transformers_step``."""
    if fused and fused_supported(model, "decode steps"):
        return FusedStep(model, pool)
    return transformers_step(model, pool)
