"""Sampling parameters and the sampler shared by prefill (token 0) and decode (tokens 1..).

Token ``i`` of a request is drawn with noise keyed by ``(seed, i)``: the result
depends only on the logits, the parameters and the index, never on which
instance or batch position computed it. The draw is Gumbel-max (the argmax of
the filtered scores plus Gumbel noise is a sample of their softmax), with the
noise of vocabulary entry ``v`` a counter-based hash of ``(token_seed(seed, i),
v)``: the whole batch is sampled on the logits' device in a few kernels, with
no host synchronisation and no generator state, so a decode step's sampled
tokens, like its greedy ones, can feed the next step on the GPU.

No accepted parameters can make sampling fail, for the row or its batch:
temperatures at or below ``GREEDY_TEMPERATURE`` are greedy (dividing logits by
less overflows float32, as vLLM also treats them), scores are clamped finite
before the softmax, and a row whose logits are not finite (a model that
produced inf or NaN) is taken greedily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdserve.engine.device_io import download, upload
from pdserve.errors import InvalidArgument

_MASK64 = (1 << 64) - 1
GREEDY_TEMPERATURE = 1e-5  # temperatures at or below this are greedy
_SCORE_LIMIT = 1e30  # |logit / temperature| beyond this is clamped (float32 stays finite after the softmax)


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings; ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"sampling.temperature: must be >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"sampling.top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"sampling.top_k: must be >= 0 (0 disables), got {self.top_k}")
        if not 0 <= self.seed <= _MASK64:
            raise InvalidArgument(f"sampling.seed: must be in [0, 2^64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE or self.top_k == 1


def token_seed(seed: int, index: int) -> int:
    """A 63-bit seed for token ``index`` (splitmix64 of the pair)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


_SIGNED = 1 << 63


def _int64(value: int) -> int:
    """A 64-bit pattern as the signed integer torch's int64 holds."""
    return value - (1 << 64) if value >= _SIGNED else value


_GOLDEN, _MIX1, _MIX2 = (_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _srl(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplications wrap, as the 64-bit patterns do)."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def gumbel_noise(seeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise, float32, for vocabulary ids ``ids`` (B, V) of rows seeded ``seeds`` (B, 1): entry
    (b, j) is a function of seeds[b] and ids[b, j] only."""
    bits = mix64(seeds + (ids + 1) * _GOLDEN)
    uniform = (_srl(bits, 40).float() + 0.5) * (1.0 / (1 << 24))  # 24 bits, strictly inside (0, 1)
    return -torch.log(-torch.log(uniform))


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], indices: list[int],
                  argmax: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``logits`` (B, V), as a (B,) int64 tensor on their device, without waiting for
    them; row b uses ``params[b]`` at token ``indices[b]``. ``argmax``: each row's argmax, where the caller
    has it already (a CUDA graph computes it)."""
    chosen = argmax if argmax is not None else torch.argmax(logits, dim=-1)
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if not rows:
        return chosen
    device = logits.device  # the rows' parameters: two small copies
    floats = upload([[params[b].temperature, params[b].top_p] for b in rows], torch.float32, device)
    ints = upload([[b, params[b].top_k, token_seed(params[b].seed, indices[b])] for b in rows], torch.long, device)
    temperature, top_p = floats[:, 0:1], floats[:, 1:2]
    picked, top_k, seeds = ints[:, 0], ints[:, 1:2], ints[:, 2:3]
    raw = logits[picked].float()
    finite = torch.isfinite(raw).all(dim=-1)
    fallback = torch.nan_to_num(raw, nan=-math.inf).argmax(dim=-1)  # nothing to sample from; argmax never fails
    scores = (raw / temperature).clamp(-_SCORE_LIMIT, _SCORE_LIMIT)
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    vocab = scores.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    ordered = ordered.masked_fill(ordered < ordered.gather(1, k - 1), -math.inf)  # top-k (ties at the kth stay)
    probs = torch.softmax(ordered, dim=-1)
    # Top-p: drop a token when the mass before it already reaches top_p; the most likely token always stays.
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p) & (top_p < 1.0)
    ordered = ordered.masked_fill(drop, -math.inf)
    pick = (ordered + gumbel_noise(seeds, order)).argmax(dim=-1, keepdim=True)
    sampled = torch.where(finite, order.gather(1, pick)[:, 0], fallback)
    return chosen.index_put((picked,), sampled)


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """``sample_tokens``, on the host."""
    return download(sample_tokens(logits, params, indices))
