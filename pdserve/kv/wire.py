"""Tensor <-> bytes for KV chunks.

Wire layout: one layer's K (and V) for tokens [start, start + count) as raw
bytes laid out (token, kv_head, head_dim), so a token range is one contiguous
slice. Dtypes travel by torch name. Each chunk carries an xxh3-64 checksum of
its key then value bytes (about 30x faster than zlib.crc32 here).

``encode_chunk`` writes a ``KVMessage{chunk}`` in protobuf wire format by hand
so the K/V bytes are copied once, from the tensor into the message, instead
of through numpy bytes, the protobuf object and its serialization.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import xxhash

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

    @property
    def total_bytes(self) -> int:
        """Bytes of K and V for every token of every layer."""
        return 2 * self.num_layers * self.num_tokens * self.token_bytes

    def shm_offset(self, layer: int, token_start: int) -> int:
        """Where tokens from ``token_start`` of ``layer`` start in a shared-memory segment: per layer,
        chunks lie one after the other, each its K then its V."""
        return 2 * self.token_bytes * (layer * self.num_tokens + token_start)


@dataclass(frozen=True)
class StreamInfo:
    """What a transfer's header says about the stream it opens, beyond the geometry."""

    num_streams: int = 1
    stream_index: int = 0
    shm_segment: str = ""
    checksums: bool = True


@dataclass(frozen=True)
class KVChunkData:
    layer: int
    token_start: int
    token_count: int
    key: bytes | memoryview
    value: bytes | memoryview
    checksum: int = 0
    shm_offset: int = 0


def checksum(key, value) -> int:
    h = xxhash.xxh3_64(key)
    h.update(value)
    return h.intdigest()


def token_major(states: torch.Tensor) -> torch.Tensor:
    """(1, H, T, D) attention states -> contiguous (T, H, D) on the CPU."""
    return states[0].transpose(0, 1).contiguous().cpu()


def chunk_ranges(tokens: int, per_token_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, end) token ranges of about ``chunk_bytes`` each (at least one token)."""
    step = max(1, chunk_bytes // max(1, per_token_bytes))
    for start in range(0, tokens, step):
        yield start, min(tokens, start + step)


def split_layer(layer: int, keys: torch.Tensor, values: torch.Tensor, chunk_bytes: int,
                token_start: int = 0) -> Iterator[KVChunkData]:
    """Yields chunks of about ``chunk_bytes`` (K plus V) for one layer's (T, H, D) tensors of tokens from ``token_start``."""
    per_token = 2 * keys[0].numel() * keys.element_size()
    for start, end in chunk_ranges(keys.shape[0], per_token, chunk_bytes):
        k, v = _to_bytes(keys[start:end]), _to_bytes(values[start:end])
        yield KVChunkData(layer, token_start + start, end - start, k, v, checksum(k, v))


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.view(torch.uint8).numpy().tobytes()


def as_bytes_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(layer: int, token_start: int, token_count: int, key, value, checksum_: int = 0,
                 shm_offset: int = 0) -> bytes:
    """A serialized ``KVMessage{chunk: KVChunk{...}}`` (decode.proto), K/V copied once into it."""
    head = (b"\x08" + _varint(layer) + b"\x10" + _varint(token_start) + b"\x18" + _varint(token_count)
            + b"\x22" + _varint(len(key)))
    mid = b"\x2a" + _varint(len(value))
    tail = b"\x31" + checksum_.to_bytes(8, "little") + (b"\x38" + _varint(shm_offset) if shm_offset else b"")
    size = len(head) + len(key) + len(mid) + len(value) + len(tail)
    return b"".join((b"\x12", _varint(size), head, key, mid, value, tail))


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only view of ``data`` as a tensor; the caller copies it out."""
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)
