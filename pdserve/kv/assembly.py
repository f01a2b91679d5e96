"""Receiving side of one KV transfer: validate every message, write it where it belongs.

Pure logic on tensors (no I/O): the decode servicer feeds it messages, and
each valid chunk goes straight to ``write`` (the decode engine's KV pool,
into the blocks reserved for the request), so no staging copy is kept. Any
violation raises ``InvalidArgument`` naming what was wrong, a checksum
mismatch ``DataLoss``; the caller then fails the transfer and the blocks are
freed. A transfer over several streams shares one assembly: each stream
``attach``es with its header and ends with ``stream_finished``.

A writer that copies on a thread of its own (a GPU pool's ``PoolWriter``) also
verifies the checksums there (``checks_on_write``): xxh3 releases the GIL, and
on the event loop it took a fifth of a receiver's loop time (gRPC at 2 GB/s). The writer
calls each chunk's check before writing it; a mismatch fails the assembly
(``check_alive`` raises it at the stream's next message), and a stream awaits
its writes before it reports its trailer, so no transfer completes unverified.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from pdserve.errors import DataLoss, InvalidArgument, PdserveError
from pdserve.kv.wire import DTYPES, KVChunkData, KVLayout, StreamInfo, checksum, dequantize_int8, from_bytes

MAX_STREAMS = 64

# write(layer, token_start, keys, values) with (count, H, D) tensors; with ``checks_on_write``, a fifth
# argument: a check to call before writing (False: the chunk is corrupt, the transfer failed, write nothing).
ChunkWriter = Callable[..., None]


def check_layout(layout: KVLayout, *, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 num_tokens: int) -> None:
    """Raises unless a transfer's header matches what the receiver serves and reserved."""
    if layout.dtype not in DTYPES:
        raise InvalidArgument(f"header.dtype: unsupported {layout.dtype!r}; expected one of {sorted(DTYPES)}")
    expected = {
        "num_layers": num_layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "num_tokens": num_tokens,
    }
    for name, want in expected.items():
        got = getattr(layout, name)
        if got != want:
            raise InvalidArgument(f"header.{name}: got {got}, expected {want}")
    if DTYPES[layout.dtype] != dtype:
        raise InvalidArgument(f"header.dtype: got {layout.dtype}, this decode instance runs {str(dtype).removeprefix('torch.')}")


def _check_index(stream: StreamInfo) -> None:
    if not 0 <= stream.stream_index < stream.num_streams:
        raise InvalidArgument(f"header.stream_index: {stream.stream_index} outside [0, {stream.num_streams})")


class KVAssembly:
    """Collects one transfer; per layer, chunks must arrive in token order without gaps or repeats."""

    def __init__(self, layout: KVLayout, write: ChunkWriter, stream: StreamInfo = StreamInfo(),
                 checks_on_write: bool = False) -> None:
        if not 1 <= stream.num_streams <= MAX_STREAMS:
            raise InvalidArgument(f"header.num_streams: {stream.num_streams} outside [1, {MAX_STREAMS}]")
        _check_index(stream)
        self.layout = layout
        self.stream = stream
        self._write = write
        self._checks_on_write = checks_on_write
        self._next_token = [0] * layout.num_layers
        self._streams_open = {stream.stream_index}
        self._streams_done: set[int] = set()
        self.streams_live = 0  # streams whose handler is still running (the consumer counts them)
        self._first_token: int | None = None
        self.first_chunk_ns = 0
        self.last_chunk_ns = 0
        self.layer_received_ns = [0] * layout.num_layers  # when each layer's last chunk arrived
        self.layer_written_ns = [0] * layout.num_layers  # when each layer's last token was written
        self.failure: PdserveError | None = None

    def fail(self, error: PdserveError) -> None:
        """The transfer is over (broken, or its request gone): every stream of it stops with ``error``."""
        self.failure = self.failure or error

    def check_alive(self) -> None:
        """Raises the transfer's failure, so no stream writes into blocks that were freed."""
        if self.failure is not None:
            raise self.failure

    def attach(self, layout: KVLayout, stream: StreamInfo) -> None:
        """Another stream of the same transfer announced itself."""
        if layout != self.layout or (stream.num_streams, stream.checksums, stream.quantization) != (
                self.stream.num_streams, self.stream.checksums, self.stream.quantization):
            raise InvalidArgument(f"header: stream {stream.stream_index} of transfer {layout.transfer_id!r} "
                                  "disagrees with the transfer's first header")
        _check_index(stream)
        if stream.stream_index in self._streams_open:
            raise InvalidArgument(f"transfer_id: {layout.transfer_id!r} already has stream {stream.stream_index}")
        self._streams_open.add(stream.stream_index)

    def has_stream(self, stream_index: int) -> bool:
        """Whether that stream of the transfer announced itself."""
        return stream_index in self._streams_open

    def add(self, chunk: KVChunkData) -> None:
        if chunk.layer_count > 1:  # CUDA IPC: one note for several layers written alike
            if not self.stream.cuda_ipc:
                raise InvalidArgument(f"chunk.layer_count: {chunk.layer_count} layers in one chunk, which only a CUDA "
                                      "IPC transfer may send")
            if chunk.layer + chunk.layer_count > self.layout.num_layers:
                raise InvalidArgument(f"chunk: layers [{chunk.layer}, {chunk.layer + chunk.layer_count}) outside "
                                      f"[0, {self.layout.num_layers})")
            for layer in range(chunk.layer, chunk.layer + chunk.layer_count):
                self.add(dataclasses.replace(chunk, layer=layer, layer_count=1))
            return
        arrived = time.monotonic_ns()
        self.check_alive()
        lay = self.layout
        if not 0 <= chunk.layer < lay.num_layers:
            raise InvalidArgument(f"chunk.layer: {chunk.layer} outside [0, {lay.num_layers})")
        expected_start = self._next_token[chunk.layer]
        if chunk.token_count < 1:
            raise InvalidArgument(f"chunk.token_count: must be >= 1, got {chunk.token_count} (layer {chunk.layer})")
        if chunk.token_start < expected_start:
            raise InvalidArgument(
                f"chunk: duplicate data for layer {chunk.layer} tokens [{chunk.token_start}, "
                f"{chunk.token_start + chunk.token_count}); tokens before {expected_start} already received"
            )
        if chunk.token_start > expected_start:
            raise InvalidArgument(
                f"chunk: gap in layer {chunk.layer}: expected token_start {expected_start}, got {chunk.token_start}"
            )
        end = chunk.token_start + chunk.token_count
        if end > lay.num_tokens:
            raise InvalidArgument(f"chunk: layer {chunk.layer} tokens up to {end} exceed header.num_tokens {lay.num_tokens}")
        if self.stream.cuda_ipc:  # the producer wrote this range into the pool itself, complete before it said so
            if len(chunk.key) or len(chunk.value) or chunk.shm_offset:
                raise InvalidArgument("chunk: bytes in a CUDA IPC transfer (its producer writes into the pool)")
        else:
            self._write_chunk(chunk, lay, end)
        self._next_token[chunk.layer] = end
        now = time.monotonic_ns()
        self.first_chunk_ns = self.first_chunk_ns or arrived
        self.last_chunk_ns = now
        if end == lay.num_tokens:
            self.layer_received_ns[chunk.layer] = arrived
            self.layer_written_ns[chunk.layer] = now

    def _write_chunk(self, chunk: KVChunkData, lay: KVLayout, end: int) -> None:
        """Checks a chunk's bytes (sizes, checksum) and writes them."""
        int8 = self.stream.quantization == "int8"
        itemsize = 1 if int8 else lay.torch_dtype.itemsize
        want = chunk.token_count * lay.kv_heads * lay.head_dim * itemsize
        expected = {"key": want, "value": want}
        if int8:
            expected.update(key_scales=lay.kv_heads * lay.head_dim * 4, value_scales=chunk.token_count * 4)
        for name, size in expected.items():
            got = len(getattr(chunk, name))
            if got != size:
                raise InvalidArgument(
                    f"chunk.{name}: {got} bytes for {chunk.token_count} tokens of layer {chunk.layer}; expected "
                    f"{size} ({lay.kv_heads} heads x {lay.head_dim} dims x {itemsize} bytes per token"
                    f"{', int8' if int8 else ''})")
        parts = (chunk.key, chunk.value, chunk.key_scales, chunk.value_scales) if int8 else (chunk.key, chunk.value)
        def mismatch(layer: int = chunk.layer, start: int = chunk.token_start) -> DataLoss:
            return DataLoss(f"chunk: checksum mismatch in layer {layer} tokens [{start}, {end})")

        check = None
        if self.stream.checksums and not self._checks_on_write:
            if checksum(*parts) != chunk.checksum:
                raise mismatch()
        elif self.stream.checksums:
            def check(expected: int = chunk.checksum) -> bool:  # on the writer's thread
                if checksum(*parts) == expected:
                    return True
                self.fail(mismatch())
                return False
        shape = (chunk.token_count, lay.kv_heads, lay.head_dim)
        if int8:
            k, v = dequantize_int8(from_bytes(chunk.key, torch.int8, shape), from_bytes(chunk.value, torch.int8, shape),
                                   from_bytes(chunk.key_scales, torch.float32, shape[1:]),
                                   from_bytes(chunk.value_scales, torch.float32, shape[:1]), lay.torch_dtype)
        else:
            k, v = from_bytes(chunk.key, lay.torch_dtype, shape), from_bytes(chunk.value, lay.torch_dtype, shape)
        if self._checks_on_write:
            self._write(chunk.layer, chunk.token_start, k, v, check)
        else:
            self._write(chunk.layer, chunk.token_start, k, v)

    def stream_finished(self, stream_index: int, first_token: int) -> bool:
        """One stream's trailer arrived; True once every stream's has."""
        if self._first_token is not None and first_token != self._first_token:
            raise InvalidArgument(f"trailer.first_token_id: {first_token} on stream {stream_index}, "
                                  f"{self._first_token} on another")
        self._first_token = first_token
        self._streams_done.add(stream_index)
        return len(self._streams_done) == self.stream.num_streams

    def finish(self, first_token: int, vocab_size: int) -> None:
        """Raises unless every layer holds every token and the first token is valid."""
        missing = [i for i, n in enumerate(self._next_token) if n != self.layout.num_tokens]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise InvalidArgument(f"transfer incomplete: layers [{shown}] missing tokens ({len(missing)} of {self.layout.num_layers} layers)")
        if not 0 <= first_token < vocab_size:
            raise InvalidArgument(f"trailer.first_token_id: {first_token} outside the vocabulary [0, {vocab_size})")
