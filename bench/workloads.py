"""Request mixes for the serving benchmark: (prompt token ids, output tokens) per request.

- ``uniform``: prompt and output lengths uniform in the given ranges.
- ``chat``: a chat-like mix, lengths log-normal around a short median with a
  long tail (like ShareGPT conversations), clipped to the ranges.
- ``long``: the uniform mix, with every ``long_every``-th prompt a long one
  (``long_len`` tokens, >= 1k): the mix where a colocated engine's decode
  stalls behind prefill.
- ``shared-prefix``: ``prefixes`` system prompts of ``prefix_len`` tokens, each
  request one of them (in turn) followed by a question of ``input_len`` tokens:
  agents and RAG sharing long instructions.
- ``multiturn``: conversations of ``turns`` turns; a turn's prompt is the whole
  conversation so far (earlier prompts and the answers the server gave) and a
  new user message of ``input_len`` tokens (the first opens with ``prefix_len``
  tokens of its own context); ``request_rate`` is conversations a second, and
  ``num_requests`` counts turns.

Prompts are random token ids (above 100, clear of special tokens); the
benchmark sends them with ``ignore_eos`` so each request makes its output length.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

DATASETS = ("uniform", "chat", "long", "shared-prefix", "multiturn")


@dataclass(frozen=True)
class Workload:
    num_requests: int = 32
    dataset: str = "uniform"
    input_len: tuple[int, int] = (32, 256)   # inclusive
    output_len: tuple[int, int] = (16, 64)
    long_len: tuple[int, int] = (1024, 1536)
    long_every: int = 8
    request_rate: float = float("inf")       # requests/s, Poisson; inf: all at once
    concurrency: int = 0                     # >0: at most this many in flight
    seed: int = 0
    prefix_len: tuple[int, int] = (512, 1024)  # shared-prefix: system prompts; multiturn: each opening context
    prefixes: int = 4                        # shared-prefix: distinct system prompts
    turns: int = 4                           # multiturn: turns per conversation

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: one of {', '.join(DATASETS)}, got {self.dataset!r}")

    def lengths(self) -> list[tuple[int, int]]:
        rng = random.Random(self.seed)
        out = []
        for i in range(self.num_requests):
            if self.dataset == "chat":
                prompt = _lognormal(rng, self.input_len, sigma=0.8)
                output = _lognormal(rng, self.output_len, sigma=0.6)
            else:
                prompt, output = rng.randint(*self.input_len), rng.randint(*self.output_len)
                if self.dataset == "long" and i % self.long_every == self.long_every // 2:
                    prompt = rng.randint(*self.long_len)
            out.append((prompt, output))
        return out

    def requests(self, vocab_size: int) -> list[tuple[list[int], int]]:
        """Independent requests (every mix but multiturn): (prompt, output tokens)."""
        if self.dataset == "multiturn":
            raise ValueError("multiturn requests depend on earlier answers: use conversations()")
        rng = random.Random(self.seed + 7)
        tokens = lambda n: [rng.randrange(100, vocab_size) for _ in range(n)]  # noqa: E731
        if self.dataset == "shared-prefix":
            systems = [tokens(rng.randint(*self.prefix_len)) for _ in range(self.prefixes)]
            return [(systems[i % self.prefixes] + tokens(n), m) for i, (n, m) in enumerate(self.lengths())]
        return [(tokens(n), m) for n, m in self.lengths()]

    def conversations(self, vocab_size: int) -> list[list[tuple[list[int], int]]]:
        """multiturn: per conversation, per turn, (new user tokens, output tokens); the first turn's user
        tokens open with the conversation's own context."""
        rng = random.Random(self.seed + 7)
        tokens = lambda n: [rng.randrange(100, vocab_size) for _ in range(n)]  # noqa: E731
        lengths = self.lengths()
        out = []
        for start in range(0, len(lengths), self.turns):
            turns = [(tokens(n), m) for n, m in lengths[start:start + self.turns]]
            turns[0] = (tokens(rng.randint(*self.prefix_len)) + turns[0][0], turns[0][1])
            out.append(turns)
        return out


def _lognormal(rng: random.Random, bounds: tuple[int, int], sigma: float) -> int:
    lo, hi = bounds
    median = math.sqrt(lo * hi) if lo > 0 else hi / 4
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))
