"""A prefill instance's prefix cache: recent prompts' KV, so a prompt that starts like one of them computes
only the rest.

Each entry is one computed prompt's KV (per layer, the buffers the prefill engine filled), named by the
prefix keys of its full blocks (``pdserve.prefix.block_hashes``). A lookup walks a new prompt's keys and
takes the entry holding the longest run of them; the engine copies that prefix into the new prompt's
buffers and computes from there. An entry whose blocks a newer entry covers entirely (the previous turn of
a conversation, say) is dropped when the newer one arrives; beyond ``budget_bytes`` the least recently used
entries go. Lives on the event loop; the engine's worker thread only reads tensors an entry holds (a
dropped entry's tensors live on while a copy from them runs).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Sequence

import torch

from pdserve.prefix import block_hashes, reusable_blocks


@dataclass(eq=False)
class CachedPrompt:
    """One prompt's KV: ``keys[layer]``/``values[layer]`` for its tokens, token-major ``(T, H, D)`` or
    head-major ``(1, H, T, D)``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    token_major: bool
    block_keys: list[int]
    nbytes: int

    def load(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, H, D)`` K and V of its first ``tokens`` tokens of ``layer``."""
        k, v = self.keys[layer], self.values[layer]
        if self.token_major:
            return k[:tokens], v[:tokens]
        return k[0, :, :tokens].transpose(0, 1), v[0, :, :tokens].transpose(0, 1)


@dataclass(frozen=True)
class Prefix:
    """KV a prompt starts with, ``tokens`` of it: ``source.load(layer, tokens)``."""

    tokens: int
    source: object  # anything with load(layer, tokens) -> (K, V), each (tokens, H, D)

    def load(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.load(layer, self.tokens)


class PrefixStore:
    def __init__(self, budget_bytes: int, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError(f"prefix cache block size must be >= 1, got {block_size}")
        self.budget_bytes = budget_bytes
        self.block_size = block_size
        self._entries: collections.OrderedDict[CachedPrompt, None] = collections.OrderedDict()  # LRU first
        self._by_key: dict[int, CachedPrompt] = {}
        self.nbytes = 0
        self.hits = self.lookups = self.hit_tokens = self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token_ids: Sequence[int], keys: list[int] | None = None) -> Prefix | None:
        """The longest cached prefix of a prompt (whole blocks, never the prompt's last token), or None."""
        self.lookups += 1
        if not self._entries or self.budget_bytes <= 0:
            return None
        if keys is None:
            keys = block_hashes(token_ids, self.block_size, reusable_blocks(len(token_ids), self.block_size))
        best, found = None, 0
        for i, key in enumerate(keys):
            entry = self._by_key.get(key)
            if entry is None:
                break
            best, found = entry, i + 1
        if best is None:
            return None
        self._entries.move_to_end(best)
        self.hits += 1
        self.hit_tokens += found * self.block_size
        return Prefix(found * self.block_size, best)

    def insert(self, token_ids: Sequence[int], keys: list[torch.Tensor], values: list[torch.Tensor],
               token_major: bool) -> None:
        """Keeps a computed prompt's KV (its buffers, not a copy) under its full blocks' keys."""
        if self.budget_bytes <= 0:
            return
        block_keys = block_hashes(token_ids, self.block_size)
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if not block_keys or nbytes > self.budget_bytes:
            return
        entry = CachedPrompt(keys, values, token_major, block_keys, nbytes)
        # Entries this one covers entirely (an earlier turn of the same conversation) are redundant now.
        covered = {self._by_key.get(key) for key in block_keys} - {None}
        for old in covered:
            if old.block_keys == block_keys[:len(old.block_keys)]:
                self._drop(old)
        for key in block_keys:
            self._by_key[key] = entry  # the newest entry answers for a shared key
        self._entries[entry] = None
        self.nbytes += nbytes
        while self.nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))
            self.evicted += 1

    def _drop(self, entry: CachedPrompt) -> None:
        del self._entries[entry]
        self.nbytes -= entry.nbytes
        for key in entry.block_keys:
            if self._by_key.get(key) is entry:
                del self._by_key[key]
        # Keys it shared with older entries that are still cached answer for those again.
        for other in reversed(self._entries):
            for key in other.block_keys:
                self._by_key.setdefault(key, other)

    def cached_keys(self, limit: int) -> list[int]:
        """Up to ``limit`` block keys cached here, the most recently used last (what routing is told)."""
        out: list[int] = []
        for entry in reversed(self._entries):
            out.extend(reversed(entry.block_keys))
            if len(out) >= limit:
                break
        return list(reversed(out[:limit]))
