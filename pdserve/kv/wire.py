"""Tensor <-> bytes for KV chunks.

Wire layout: one layer's K (and V) for tokens [start, start + count) as raw
bytes laid out (token, kv_head, head_dim), so a token range is one contiguous
slice. Dtypes travel by torch name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# NOTE: torch.frombuffer warns on read-only buffers (protobuf bytes); we only
# read from them, copying into the staging tensors right away.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(frozen=True)
class KVLayout:
    """The geometry a transfer announces in its header."""

    transfer_id: str
    num_layers: int
    num_tokens: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def token_bytes(self) -> int:
        """Bytes of K (or V) for one token of one layer."""
        return self.kv_heads * self.head_dim * self.torch_dtype.itemsize


@dataclass(frozen=True)
class KVChunkData:
    layer: int
    token_start: int
    token_count: int
    key: bytes
    value: bytes


def token_major(states: torch.Tensor) -> torch.Tensor:
    """(1, H, T, D) attention states -> contiguous (T, H, D) on the CPU."""
    return states[0].transpose(0, 1).contiguous().cpu()


def split_layer(layer: int, keys: torch.Tensor, values: torch.Tensor, chunk_bytes: int,
                token_start: int = 0) -> Iterator[KVChunkData]:
    """Yields chunks of about ``chunk_bytes`` (K plus V) for one layer's (T, H, D) tensors of tokens from ``token_start``."""
    tokens = keys.shape[0]
    per_token = 2 * keys[0].numel() * keys.element_size()
    step = max(1, chunk_bytes // max(1, per_token))
    for start in range(0, tokens, step):
        end = min(tokens, start + step)
        yield KVChunkData(layer, token_start + start, end - start, _to_bytes(keys[start:end]), _to_bytes(values[start:end]))


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only view of ``data`` as a tensor; the caller copies it out."""
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)
