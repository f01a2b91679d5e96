"""The decode batch's KV: row r of every layer belongs to the r-th running request.

Rows stay dense (a leaving request's row is filled by the last one), so the
batch's K/V is always a view ``[:B, :, :L]`` with no gather. Storage grows by
doubling, in rows and in tokens. The model calls ``update`` once per layer per
step, as it would on a transformers ``Cache``; a 4-D boolean mask keeps each
row attending to its own length.
"""

from __future__ import annotations

import torch

from pdserve.model.loader import KVShape

_TOKEN_ALIGN = 64


class SlotKVCache:
    def __init__(self, kv: KVShape, dtype: torch.dtype, device: torch.device, max_rows: int) -> None:
        self._kv = kv
        self._max_rows = max_rows
        self._dtype = dtype
        self._device = device
        self._keys: list[torch.Tensor] = []    # per layer (rows, H, T, D)
        self._values: list[torch.Tensor] = []
        self._alloc(rows=0, tokens=0)
        self._batch = 0
        self._rows = torch.empty(0, dtype=torch.long)
        self._positions = torch.empty(0, dtype=torch.long)
        self._length = 0

    def _alloc(self, rows: int, tokens: int) -> None:
        old_k, old_v = self._keys, self._values
        shape = (rows, self._kv.kv_heads, tokens, self._kv.head_dim)
        self._keys = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self._kv.num_layers)]
        self._values = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self._kv.num_layers)]
        for new, old in zip(self._keys + self._values, old_k + old_v):
            r, t = min(rows, old.shape[0]), min(tokens, old.shape[2])
            new[:r, :, :t] = old[:r, :, :t]

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, tokens) allocated now."""
        return self._keys[0].shape[0], self._keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._keys + self._values)

    def reserve(self, rows: int, tokens: int) -> None:
        """Grows storage (doubling) to hold ``rows`` requests of ``tokens`` tokens each."""
        have_rows, have_tokens = self.capacity
        if rows <= have_rows and tokens <= have_tokens:
            return
        new_rows = min(self._max_rows, max(rows, 2 * have_rows)) if rows > have_rows else have_rows
        new_tokens = have_tokens if tokens <= have_tokens else max(tokens, 2 * have_tokens)
        new_tokens = -(-new_tokens // _TOKEN_ALIGN) * _TOKEN_ALIGN
        self._alloc(new_rows, new_tokens)

    def write_prompt(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copies a transfer's staged (T, H, D) tensors into ``row``."""
        tokens = keys[0].shape[0]
        for layer in range(self._kv.num_layers):
            self._keys[layer][row, :, :tokens] = keys[layer].transpose(0, 1)
            self._values[layer][row, :, :tokens] = values[layer].transpose(0, 1)

    def move_row(self, src: int, dst: int, tokens: int) -> None:
        for t in self._keys + self._values:
            t[dst, :, :tokens] = t[src, :, :tokens]

    def begin_step(self, positions: torch.Tensor) -> torch.Tensor:
        """Prepares a step writing one token per row at ``positions`` (B,); returns the (B, 1, 1, L) mask."""
        self._batch = positions.shape[0]
        self._positions = positions.to(self._device)
        self._rows = torch.arange(self._batch, device=self._device)
        self._length = int(positions.max()) + 1
        self.reserve(self._batch, self._length)
        span = torch.arange(self._length, device=self._device)
        return (span[None, :] <= self._positions[:, None])[:, None, None, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Writes the step's (B, H, 1, D) K/V and returns the batch's (B, H, L, D) views."""
        k, v = self._keys[layer_idx], self._values[layer_idx]
        k[self._rows, :, self._positions] = key_states[:, :, 0]
        v[self._rows, :, self._positions] = value_states[:, :, 0]
        return k[: self._batch, :, : self._length], v[: self._batch, :, : self._length]
