"""Sampling parameters and the sampler shared by prefill (token 0) and decode (tokens 1..).

Token ``i`` of a request is drawn from a generator seeded by ``(seed, i)``:
the result depends only on the logits, the parameters and the index, never on
which instance or batch position computed it.

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


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int],
           greedy: list[int] | None = None) -> list[int]:
    """One token per row of ``logits`` (B, V); row b uses ``params[b]`` at token ``indices[b]``. ``greedy``:
    each row's argmax, where the caller has it already (a CUDA graph computes it on the device)."""
    chosen = list(greedy) if greedy is not None else torch.argmax(logits, dim=-1).tolist()  # greedy rows first
    for row, (p, index) in enumerate(zip(params, indices)):
        if not p.greedy:
            chosen[row] = _sample_row(logits[row], p, index)
    return chosen


def _sample_row(logits: torch.Tensor, p: SamplingParams, index: int) -> int:
    raw = logits.float()  # (V,)
    if not bool(torch.isfinite(raw).all()):  # nothing to sample from; argmax never fails
        return int(torch.nan_to_num(raw, nan=-math.inf).argmax())
    scores = (raw / p.temperature).clamp(-_SCORE_LIMIT, _SCORE_LIMIT)
    if p.top_k > 0 and p.top_k < scores.numel():
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the most
        # likely token always stays.
        drop = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= p.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, -math.inf))
    probs = torch.softmax(scores, dim=-1).cpu()
    gen = torch.Generator(device="cpu").manual_seed(token_seed(p.seed, index))
    return int(torch.multinomial(probs, 1, generator=gen).item())
