"""A Llama-shaped model's forward with few kernels, over rows of single tokens.

transformers' forward issues ~38 kernels a layer for a decode token (~30 for a
prefill pass): on an H200 the 8B shape's decode step was 68% GEMMs and ~1,200
kernels of 1-3 us for the rest (norms in six pieces, rotary in ten, separate
residual adds), and a prefill pass of a few hundred tokens took as long as one
of 2,048 (its ~1,000 launches are the host's time). ``FusedForward`` computes
the same forward for Llama-shaped models (Llama, Qwen2: RMSNorm, rotary
embeddings, grouped-query attention, a gated SiLU MLP) from the model's own
weights:

- q/k/v and gate/up are one GEMM each: the modules' weights become views of the
  concatenated tensors (no extra memory; transformers' forward and
  ``generate()`` run the same modules unchanged);
- the residual add and the RMSNorm after it, rotary embedding of q and k (for
  a decode step with the K/V write into the pool), and SiLU-times-up are one
  compiled kernel each on a GPU (``torch.compile``;
  dynamic in the number of rows once a second count is met); elsewhere the same
  functions run eagerly;
- attention is the caller's (``attend``): the decode step's paged attention
  over the pool, a prefill pass's attention over its packed segments.

Each row is one token with its own position: a decode step's rows are requests,
a prefill pass's rows are the pass's tokens. The math is transformers' (float32
norms, the same order of operations); compiled kernels round intermediate
16-bit values differently, so in bfloat16 results differ from the reference by
rounding, and in float32 the tokens are the reference's
(``tests/test_cuda_graphs.py`` on a GPU; ``tests/test_step_forward.py``).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

import torch
import torch.nn.functional as F

# attend(layer index, attention module, q (T, heads, dim), K and V (2, T, kv_heads, dim), or None where they
# went to a store) -> (T, heads * dim)
Attend = Callable[[int, torch.nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "qwen2")


def unsupported(model: torch.nn.Module) -> str | None:
    """Why ``FusedForward`` cannot run ``model`` (None: it can)."""
    config = model.config
    if config.model_type not in SUPPORTED:
        return f"model type {config.model_type!r} (fused: {', '.join(SUPPORTED)})"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    if (getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        return "partial rotary embeddings"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "an unexpected module layout"
    return None


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: in float32, cast back before the weight."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@functools.cache
def _kernels(compiled: bool, heads: int, kv_heads: int, dim: int, eps: float) -> tuple:
    """The fused pieces for one model shape (constants, not arguments, to the compiler): compiled once per
    process on a GPU (the batch dimension turns dynamic when a second batch size is met), eager elsewhere."""

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _rms(x, weight, eps)

    def add_rms(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
        """The residual add and the RMSNorm after it: (normed, new residual)."""
        h = residual + x
        return _rms(h, weight, eps), h

    def rope_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(B, (heads + 2 kv_heads) dim) -> q (B, heads, dim) rotated by (B, dim) cos/sin, and K (rotated)
        and V stacked (2, B, kv_heads, dim), as the pool stores them."""
        rows = qkv.shape[0]
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q, k, v = q.view(rows, heads, dim), k.view(rows, kv_heads, dim), v.view(rows, kv_heads, dim)
        c, s = cos[:, None, :], sin[:, None, :]
        return q * c + _rotate_half(q) * s, torch.stack((k * c + _rotate_half(k) * s, v))

    def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_store: torch.Tensor,
                   v_store: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``rope_split`` whose K (rotated) and V go straight into rows ``slots`` of a pool's (slots, kv_heads,
        dim) K and V storage of one layer, in the same kernel; returns q. (Indexing one whole input in place:
        inductor writes it where it is; a write through a view of the pool copied the layer's storage.)"""
        rows = qkv.shape[0]
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q, k, v = q.view(rows, heads, dim), k.view(rows, kv_heads, dim), v.view(rows, kv_heads, dim)
        c, s = cos[:, None, :], sin[:, None, :]
        k_store.index_put_((slots,), k * c + _rotate_half(k) * s)
        v_store.index_put_((slots,), v)
        return q * c + _rotate_half(q) * s

    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    fns = (rms, add_rms, rope_split, rope_write, silu_mul)
    if not compiled:
        return fns
    return tuple(torch.compile(fn, fullgraph=True) for fn in fns)


def _concat(modules: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for ``modules``; each module's weight (and bias) becomes a view of it."""
    weight = torch.cat([m.weight.detach() for m in modules])
    has_bias = [m.bias is not None for m in modules]
    if any(has_bias) and not all(has_bias):
        raise ValueError("some projections have a bias and some do not")
    bias = torch.cat([m.bias.detach() for m in modules]) if all(has_bias) else None
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[start:start + n], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return weight, bias


class FusedForward:
    """The fused forward of one model (see the module's docstring); ``unsupported(model)`` says which it is not."""

    def __init__(self, model: torch.nn.Module) -> None:
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"the fused forward does not support {why}")
        self._base = base = model.model
        self._lm_head = model.lm_head
        config = model.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self._dim = dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        fused = getattr(model, "_pdserve_fused", None)  # concatenated once per model, shared by engines
        if fused is None:
            with torch.no_grad():
                fused = [(_concat([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]),
                          _concat([l.mlp.gate_proj, l.mlp.up_proj])) for l in base.layers]
            model._pdserve_fused = fused
        self._fused = fused
        device = next(model.parameters()).device
        self._rms, self._add_rms, self._rope_split, self._rope_write, self._silu_mul = _kernels(
            device.type == "cuda", heads, kv_heads, dim, float(config.rms_norm_eps))

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend,
               store: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """(T,) token ids at (T,) positions -> (T, hidden) states after the final norm. ``store``: per layer
        K and V storage (slots, kv_heads, dim) and the (T,) slots the rows' K/V go to, written by the rotary
        kernel itself (a decode step over its pool); ``attend`` then gets None for the K/V."""
        base = self._base
        h = base.embed_tokens(ids)                                       # (T, hidden)
        cos, sin = base.rotary_emb(h[:, None], positions[:, None])      # (T, 1, dim) each
        cos, sin = cos[:, 0], sin[:, 0]
        layers = base.layers
        x, residual = self._rms(h, layers[0].input_layernorm.weight), h
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            (qkv_w, qkv_b), (gu_w, _) = self._fused[i]
            qkv = F.linear(x, qkv_w, qkv_b)
            if store is None:
                q, kv = self._rope_split(qkv, cos, sin)
            else:
                keys, values, slots = store
                q, kv = self._rope_write(qkv, cos, sin, keys[i], values[i], slots), None
            x, residual = self._add_rms(attn.o_proj(attend(i, attn, q, kv)), residual,
                                        layer.post_attention_layernorm.weight)
            mlp = layer.mlp.down_proj(self._silu_mul(F.linear(x, gu_w)))
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else base.norm
            x, residual = self._add_rms(mlp, residual, norm.weight)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(hidden)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Runs the compiled pieces at two row counts (the second makes them dynamic in the rows), so that no
        request waits for the compiler; returns the seconds it took."""
        started = time.perf_counter()
        layer = self._base.layers[0]
        weight = layer.input_layernorm.weight
        (qkv_w, _), (gu_w, _) = self._fused[0]
        for rows in (2, 3):
            x = weight.new_zeros(rows, weight.shape[0])
            self._rms(x, weight)
            self._add_rms(x, x, weight)
            cos = weight.new_zeros(rows, self._dim)
            self._rope_split(weight.new_zeros(rows, qkv_w.shape[0]), cos, cos)
            self._silu_mul(weight.new_zeros(rows, gu_w.shape[0]))
        return time.perf_counter() - started


def fused_supported(model: torch.nn.Module, user: str) -> bool:
    """Whether ``FusedForward`` runs ``model``; where not, logs that ``user`` run transformers' forward, and why."""
    why = unsupported(model)
    if why is not None:
        log.info("%s run transformers' forward: the fused forward does not support %s", user, why)
    return why is None
