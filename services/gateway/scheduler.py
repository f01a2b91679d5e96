"""Which prefill and which decode instance serve a request.

``Scheduler`` is the seam for load-aware policies; ``RoundRobinScheduler``
cycles through the configured instances. With no prefill instances the
cluster is colocated: ``pick_prefill`` returns ``""`` and prompts are
prefilled on the decode instance.
"""

from __future__ import annotations

import itertools
from typing import Protocol


class Scheduler(Protocol):
    num_decode: int

    def pick_prefill(self, prompt_tokens: int) -> str:
        """The address of the prefill instance for a prompt of ``prompt_tokens`` ("": prefill on decode)."""

    def pick_decode(self, prompt_tokens: int, max_tokens: int) -> str:
        """The address of the decode instance that will hold the request's KV."""


class RoundRobinScheduler:
    def __init__(self, prefill: tuple[str, ...], decode: tuple[str, ...]) -> None:
        self._prefill = itertools.cycle(prefill or ("",))
        self._decode = itertools.cycle(decode)
        self.num_decode = len(decode)

    def pick_prefill(self, prompt_tokens: int) -> str:
        return next(self._prefill)

    def pick_decode(self, prompt_tokens: int, max_tokens: int) -> str:
        return next(self._decode)
