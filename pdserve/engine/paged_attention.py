"""Attention that reads K/V through block tables, registered with transformers.

``use_paged_attention(model)`` switches a model to the ``pdserve_paged``
attention implementation. A decode step passes ``past_key_values=StepCache``
and ``paged=PagedStep``: each layer's ``StepCache.update`` scatters the new
token's K/V into the pool and hands attention the pool itself; the attention
function gathers each row's tokens through the step's block tables and runs
SDPA with a per-row length mask (``gather`` kernel, the CPU default), or
FlexAttention reads the pool in place through a block mask over the rows' own
blocks (``flex`` kernel, the GPU default: compiled, block-sparse, no gather
copy). A prefill pass passes ``segments=PackedSegments`` instead: flash
attention over its packed segments as variable-length sequences on a GPU in
16-bit floats, SDPA over each segment elsewhere (``SegmentPrefillCache``).
Calls with neither (a prefill pass with its own 4-D mask, float32 on a GPU;
``generate()``) fall through to transformers' SDPA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pdserve.engine.kv_pool import KVPool, PagedStep

ATTENTION_NAME = "pdserve_paged"


@dataclass
class PackedSegments:
    """A packed prefill pass on a GPU (``SegmentPrefillCache``): the segments that start a prompt come first
    and attend among themselves as variable-length sequences; each later one continues a prompt and
    attends to that prompt's buffer (its earlier chunks and itself), read in place."""

    fresh_tokens: int            # query tokens of the leading segments
    fresh_lengths: torch.Tensor  # (n + 1,) int32 cumulative lengths of the leading segments
    fresh_max: int
    # Per continuing segment: (query offset, tokens, tokens with its prefix, cumulative q, cumulative k).
    continuing: list[tuple[int, int, int, torch.Tensor, torch.Tensor]]
    prefixes: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # per layer


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  max_q: int, max_k: int, scale: float | None) -> torch.Tensor:
    """Causal flash attention over packed variable-length sequences, (T, H, D) each, grouped-query heads as
    they come. With fewer queries than keys the causal mask is aligned to the last key (a chunk attends to
    its prompt's earlier tokens and causally to itself)."""
    return torch.ops.aten._flash_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q,
                                                   max_k, 0.0, True, False, scale=scale)[0]


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """What ``_flash_varlen`` computes for one sequence, with SDPA (a CPU, or float32): (T, H, D) each, the
    causal mask aligned to the last key."""
    n, m = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    gqa = qh.shape[1] != kh.shape[1]
    if n == m:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def _segments_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        segments: PackedSegments, scaling: float | None) -> torch.Tensor:
    q = query[0].transpose(0, 1)  # (S, Hq, D)
    out = torch.empty_like(q)
    n = segments.fresh_tokens
    flash = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    if n and flash:
        out[:n] = _flash_varlen(q[:n], key[0, :, :n].transpose(0, 1), value[0, :, :n].transpose(0, 1),
                                segments.fresh_lengths, segments.fresh_lengths, segments.fresh_max,
                                segments.fresh_max, scaling)
    elif n:  # each segment on its own: no query scores another prompt's keys
        bounds = segments.fresh_lengths.tolist()
        for a, b in zip(bounds, bounds[1:]):
            out[a:b] = _sdpa_causal(q[a:b], key[0, :, a:b].transpose(0, 1), value[0, :, a:b].transpose(0, 1), scaling)
    for (offset, count, total, cu_q, cu_k), (keys, values) in zip(segments.continuing,
                                                                   segments.prefixes[module.layer_idx]):
        if flash:
            out[offset:offset + count] = _flash_varlen(q[offset:offset + count], keys, values, cu_q, cu_k, count,
                                                       total, scaling)
        else:
            out[offset:offset + count] = _sdpa_causal(q[offset:offset + count], keys, values, scaling)
    return out[None]  # (1, S, Hq, D)


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    paged: PagedStep | None = None, segments: PackedSegments | None = None, **kwargs):
    if segments is not None:
        return _segments_attention(module, query, key, value, segments, scaling), None
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
    out = None
    for group in paged.groups:  # rows by length: each gathers up to its own longest row
        q = query if group.rows is None else query[group.rows]
        k = key[group.gather].transpose(1, 2)  # (b, H, L, D)
        v = value[group.gather].transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scaling, enable_gqa=gqa)
        if group.rows is None:
            out = o
        else:
            out = query.new_empty(query.shape[0], query.shape[1], 1, v.shape[-1]) if out is None else out
            out[group.rows] = o
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _flex(compiled: bool):
    """FlexAttention, compiled on a GPU; eager elsewhere (an unfused reference implementation: tests only)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    # Static shapes (the step pads the batch to a power of two, the table to a flex_width): one compile per
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
