"""Tensor <-> bytes for KV chunks.

Wire layout: one layer's K (and V) for tokens [start, start + count) as raw
bytes laid out (token, kv_head, head_dim), so a token range is one contiguous
slice. Dtypes travel by torch name. Each chunk carries an xxh3-64 checksum of
its key then value bytes (about 30x faster than zlib.crc32 here).

``encode_chunk`` writes a ``KVMessage{chunk}`` in protobuf wire format by hand
so the K/V bytes are copied once, from the tensor into the message, instead
of through numpy bytes, the protobuf object and its serialization;
``decode_message`` reads one back with K/V as views of the received bytes.
Anything that does not parse is ``DataLoss``: framing corrupted on the way.
"""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import xxhash
from google.protobuf.message import DecodeError

from pdserve.errors import DataLoss
from pdserve.v1 import decode_pb2

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
    quantization: str = ""  # "" exact, or "int8" (see quantize_int8)
    cuda_ipc: bool = False  # the producer writes into the consumer's pool itself; chunks carry no bytes


@dataclass(frozen=True)
class KVChunkData:
    layer: int
    token_start: int
    token_count: int
    key: bytes | memoryview
    value: bytes | memoryview
    checksum: int = 0
    shm_offset: int = 0
    key_scales: bytes | memoryview = b""
    value_scales: bytes | memoryview = b""
    layer_count: int = 0  # CUDA IPC: layers [layer, layer + layer_count) (0 or 1: one layer)


QUANTIZATIONS = ("", "int8")


def checksum(*parts) -> int:
    """xxh3-64 over the parts in order (key, value, then any scales)."""
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.intdigest()


def quantize_int8(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, H, D) K/V -> int8 K with a float32 scale per channel (H, D) over these tokens, int8 V with a
    float32 scale per token (T,): symmetric, scale = absmax / 127. Returns (k8, v8, k_scales, v_scales)."""
    k, v = keys.float(), values.float()
    k_scales = k.abs().amax(dim=0).clamp_min(1e-12) / 127
    v_scales = v.abs().amax(dim=(1, 2)).clamp_min(1e-12) / 127
    k8 = (k / k_scales).round_().clamp_(-127, 127).to(torch.int8)
    v8 = (v / v_scales[:, None, None]).round_().clamp_(-127, 127).to(torch.int8)
    return k8, v8, k_scales, v_scales


def dequantize_int8(k8: torch.Tensor, v8: torch.Tensor, k_scales: torch.Tensor, v_scales: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (k8.float() * k_scales).to(dtype), (v8.float() * v_scales[:, None, None]).to(dtype)


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
                 shm_offset: int = 0, key_scales=b"", value_scales=b"", layer_count: int = 0) -> bytes:
    """A serialized ``KVMessage{chunk: KVChunk{...}}`` (decode.proto), K/V copied once into it."""
    head = (b"\x08" + _varint(layer) + b"\x10" + _varint(token_start) + b"\x18" + _varint(token_count)
            + b"\x22" + _varint(len(key)))
    mid = b"\x2a" + _varint(len(value))
    tail = b"\x31" + checksum_.to_bytes(8, "little") + (b"\x38" + _varint(shm_offset) if shm_offset else b"")
    parts = [head, key, mid, value, tail]
    if len(key_scales) or len(value_scales):
        parts += [b"\x42" + _varint(len(key_scales)), key_scales, b"\x4a" + _varint(len(value_scales)), value_scales]
    if layer_count:
        parts.append(b"\x50" + _varint(layer_count))
    body = sum(len(p) for p in parts)
    return _join((b"\x12", _varint(body), *parts))


try:  # CPython: a bytes object of a given size, its contents not yet written
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _new_bytes.restype = ctypes.py_object
except AttributeError:  # pragma: no cover - another interpreter
    _new_bytes = None

_UNLOCKED_JOIN_BYTES = 64 << 10


def _join(parts) -> bytes:
    """``b"".join(parts)``, with the copies of a large message made without the GIL.

    A KV message is megabytes, and ``b"".join`` copies it holding the GIL: every other thread of the
    process (the prefill worker launching the forward pass, the other streams) waits for each copy. Here
    the bytes object is made empty and filled by ``ctypes.memmove``, which releases the GIL; nothing else
    sees the object before it is complete (it is new and referenced only here)."""
    total = sum(len(p) for p in parts)
    if _new_bytes is None or total < _UNLOCKED_JOIN_BYTES:
        return b"".join(parts)
    out = _new_bytes(None, total)
    at = ctypes.cast(out, ctypes.c_void_p).value
    for part in parts:
        n = len(part)
        if n:
            ctypes.memmove(at, np.frombuffer(part, dtype=np.uint8).ctypes.data, n)
            at += n
    return out


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only view of ``data`` as a tensor; the caller copies it out."""
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise DataLoss("KV message: truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


_CHUNK_VARINTS = {1: "layer", 2: "token_start", 3: "token_count", 7: "shm_offset", 10: "layer_count"}
_CHUNK_BYTES = {4: "key", 5: "value", 8: "key_scales", 9: "value_scales"}


def _decode_chunk(buf: memoryview) -> KVChunkData:
    """A ``KVChunk`` in protobuf wire format, any field order, unknown fields skipped; K/V stay views."""
    fields = {"layer": 0, "token_start": 0, "token_count": 0, "key": b"", "value": b"", "checksum": 0, "shm_offset": 0,
              "key_scales": b"", "value_scales": b"", "layer_count": 0}
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            if number in _CHUNK_VARINTS:
                fields[_CHUNK_VARINTS[number]] = value
        elif wire_type == 1:
            if pos + 8 > end:
                raise DataLoss("KV message: truncated fixed64")
            if number == 6:
                fields["checksum"] = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wire_type == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > end:
                raise DataLoss(f"KV message: field {number} claims {size} bytes, {end - pos} left")
            if number in _CHUNK_BYTES:
                fields[_CHUNK_BYTES[number]] = buf[pos:pos + size]
            pos += size
        elif wire_type == 5:
            pos += 4
        else:
            raise DataLoss(f"KV message: wire type {wire_type} in field {number}")
    if pos != end:
        raise DataLoss("KV message: truncated field")
    if max(fields["layer"], fields["token_start"], fields["token_count"], fields["layer_count"]) >= 1 << 32:
        raise DataLoss("KV message: a uint32 field out of range")
    return KVChunkData(**fields)


def decode_message(data: bytes) -> tuple[str, object]:
    """A serialized ``KVMessage`` -> (kind, payload): ("chunk", KVChunkData with K/V views of ``data``),
    ("header", KVHeader), ("trailer", KVTrailer), ("abort", KVAbort) or ("", None) for an empty message."""
    buf = memoryview(data)
    if len(buf) > 1 and buf[0] == 0x12:  # the one chunk field, as every pdserve sender writes it
        size, pos = _read_varint(buf, 1)
        if pos + size == len(buf):
            return "chunk", _decode_chunk(buf[pos:])
    try:
        message = decode_pb2.KVMessage.FromString(data)
    except DecodeError as exc:
        raise DataLoss(f"KV message: does not parse ({exc})") from None
    kind = message.WhichOneof("message")
    if kind == "chunk":
        c = message.chunk
        return kind, KVChunkData(c.layer, c.token_start, c.token_count, c.key, c.value, c.checksum, c.shm_offset,
                                 c.key_scales, c.value_scales)
    return kind or "", getattr(message, kind) if kind else None
