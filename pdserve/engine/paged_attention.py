"""Attention that reads K/V through block tables, registered with transformers.

``use_paged_attention(model)`` switches a model to the ``pdserve_paged``
attention implementation. A decode step passes ``past_key_values=StepCache``
and ``paged=PagedStep``: each layer's ``StepCache.update`` scatters the new
token's K/V into the pool and hands attention the pool itself; the attention
function gathers each row's tokens through the step's block tables and runs
SDPA with a per-row length mask (``gather`` kernel, the CPU default), or
FlexAttention reads the pool in place through a block mask over the rows' own
blocks (``flex`` kernel, the GPU default: compiled, block-sparse, no gather
copy). Calls without ``paged`` (a colocated engine's
prefill, with its own 4-D mask; ``generate()``) fall through to transformers' SDPA.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pdserve.engine.kv_pool import KVPool, PagedStep

ATTENTION_NAME = "pdserve_paged"


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    paged: PagedStep | None = None, **kwargs):
    if paged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    # key/value: the pool's (slots, H, D) storage for this layer. query: (B, Hq, 1, D).
    gqa = query.shape[1] != key.shape[1]
    if paged.block_mask is not None:
        rows = query.shape[0]
        padded_rows = paged.block_mask.kv_num_blocks.shape[0]
        if padded_rows > rows:  # the block mask's batch is padded to a compiled shape
            query = torch.cat([query, query.new_zeros((padded_rows - rows, *query.shape[1:]))])
        out = _flex(query.is_cuda)(query, key.permute(1, 0, 2)[None], value.permute(1, 0, 2)[None],
                                   block_mask=paged.block_mask, scale=scaling, enable_gqa=gqa)
        return out[:rows].transpose(1, 2).contiguous(), None
    k = key[paged.gather].transpose(1, 2)  # (B, H, L, D)
    v = value[paged.gather].transpose(1, 2)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=paged.mask, scale=scaling,
                                         enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _flex(compiled: bool):
    """FlexAttention, compiled on a GPU; eager elsewhere (an unfused reference implementation: tests only)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    # Static shapes (the step pads batch and table width to powers of two): one compile per
    # (batch, width) bucket, so allow more recompiles than dynamo's default of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


AttentionInterface.register(ATTENTION_NAME, paged_attention)
# Calls that let transformers build the mask (generate() on a switched model) get SDPA's.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_paged_attention(model: torch.nn.Module) -> None:
    model.set_attn_implementation(ATTENTION_NAME)


class StepCache:
    """The ``past_key_values`` of one decode step over a ``KVPool``."""

    def __init__(self, pool: KVPool, step: PagedStep) -> None:
        self._pool = pool
        self._step = step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Writes the step's (B, H, 1, D) K/V; returns the layer's whole storage for ``paged_attention``."""
        keys, values = self._pool.keys[layer_idx], self._pool.values[layer_idx]
        keys[self._step.write_slots] = key_states[:, :, 0]
        values[self._step.write_slots] = value_states[:, :, 0]
        return keys, values
