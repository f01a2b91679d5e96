"""KV producers: gRPC streams (K/V bytes inline) and same-host shared memory (gRPC carries offsets).

``GrpcKVSender`` spreads a transfer's layers over one ``Decode.PushKV`` stream
per channel it is given (layer ``l`` goes on stream ``l % n``, so each layer
stays in token order on one stream); with channels on separate TCP
connections the streams move bytes in parallel. A pump task per stream turns
each queued layer into ~``chunk_bytes`` messages, encoded by hand
(``encode_chunk``: K/V copied once) and written one at a time, each write
awaiting gRPC flow control: the bytes in flight per stream stay at one
message however slow the receiver is.

``ShmKVSender`` uses one stream for control: each queued layer range's K/V
is copied straight from the layer tensor (device or host) into a segment
from the producer's ``SegmentPool`` at a fixed offset, and one small message
carries that offset and the checksum (no ~1 MiB chunking: the bytes never
pass through gRPC).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import torch

from pdserve import telemetry
from pdserve.errors import Internal, PdserveError
from pdserve.kv.shm import Segment, SegmentPool
from pdserve.kv.transport import KVSender, TransferReceipt
from pdserve.kv.wire import (QUANTIZATIONS, KVLayout, as_bytes_view, checksum, chunk_ranges, encode_chunk,
                             quantize_int8, token_major)
from pdserve.rpc import error_from_rpc
from pdserve.v1 import decode_pb2

_PUSH_KV = "/pdserve.v1.Decode/PushKV"


class _Stream:
    def __init__(self, channel: grpc.aio.Channel, index: int) -> None:
        self.channel = channel
        self.index = index
        self.call = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None


class GrpcKVSender(KVSender):
    transport = "grpc"  # how the bytes travel (metrics label)
    def __init__(self, channels: list[grpc.aio.Channel], address: str, chunk_bytes: int = 1 << 20,
                 checksums: bool = True, timeout_s: float | None = 300.0, quantization: str = "") -> None:
        if not channels:
            raise ValueError("GrpcKVSender needs at least one channel")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: {quantization!r} not one of {QUANTIZATIONS}")
        self._quantization = quantization
        self._streams = [_Stream(c, i) for i, c in enumerate(channels)]
        self._address = address
        self._chunk_bytes = chunk_bytes
        self._checksums = checksums
        self._timeout_s = timeout_s
        self._layout: KVLayout | None = None
        self._bytes = 0
        self._messages = 0
        self._first_sent_ns = 0
        self._acked = False  # every stream's reply arrived: the consumer is done with the transfer
        self.layer_ready_ns: list[int] = []  # per layer: when the forward pass handed over its last chunk
        self.layer_sent_ns: list[int] = []  # per layer: when its last message was handed to the stream

    @property
    def shm_segment(self) -> str:
        return ""

    async def open(self, layout: KVLayout) -> None:
        self._layout = layout
        self.layer_sent_ns = [0] * layout.num_layers
        self.layer_ready_ns = [0] * layout.num_layers
        loop = asyncio.get_running_loop()
        n = len(self._streams)
        for s in self._streams:
            s.call = s.channel.stream_unary(_PUSH_KV, request_serializer=None,
                                            response_deserializer=decode_pb2.PushKVReply.FromString)(
                timeout=self._timeout_s, metadata=telemetry.outgoing())  # decode's span joins the caller's trace
            s.task = loop.create_task(self._pump(s), name=f"kv-push-{layout.transfer_id}-{s.index}")
        header = decode_pb2.KVHeader(transfer_id=layout.transfer_id, num_layers=layout.num_layers,
                                     num_tokens=layout.num_tokens, kv_heads=layout.kv_heads,
                                     head_dim=layout.head_dim, dtype=layout.dtype, num_streams=n,
                                     shm_segment=self.shm_segment, checksums=self._checksums,
                                     quantization=self._quantization)
        for s in self._streams:
            header.stream_index = s.index
            await self._write(s, decode_pb2.KVMessage(header=header).SerializeToString())

    def send_layer(self, layer, token_start, keys, values) -> None:
        self.layer_ready_ns[layer] = time.monotonic_ns()
        self._streams[layer % len(self._streams)].queue.put_nowait((layer, token_start, keys, values))

    async def _write(self, stream: _Stream, message: bytes) -> None:
        try:
            await stream.call.write(message)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"KV push to decode {self._address}") from None
        except asyncio.InvalidStateError:
            # The call already ended (the receiver rejected it); finish() reports why.
            raise Internal("KV push stream closed early") from None

    async def _pump(self, stream: _Stream) -> None:
        lay = self._layout
        # K/V payload bytes: int8 is one byte per element, plus a 4-byte scale per token and per channel.
        per_token = 2 * lay.kv_heads * lay.head_dim + 4 if self._quantization else 2 * lay.token_bytes
        per_chunk = 4 * lay.kv_heads * lay.head_dim if self._quantization else 0
        while (item := await stream.queue.get()) is not None:
            layer, token_start, keys, values = item
            for start, end in chunk_ranges(keys.shape[2], per_token, self._chunk_bytes):
                message = self._encode(layer, token_start, keys, values, start, end)
                sent = time.monotonic_ns()  # handed to the stream (the write returns once it is on its way)
                self._first_sent_ns = self._first_sent_ns or sent
                self.layer_sent_ns[layer] = sent
                await self._write(stream, message)
                self._bytes += (end - start) * per_token + per_chunk
                self._messages += 1

    def _encode(self, layer: int, token_start: int, keys, values, start: int, end: int) -> bytes:
        """One chunk message for tokens [start, end) of (1, H, T, D) ``keys``/``values``."""
        if self._quantization == "int8":  # quantized where the tensors are: a GPU copies a quarter of the bytes out
            k8, v8, ks, vs = quantize_int8(keys[0, :, start:end].transpose(0, 1), values[0, :, start:end].transpose(0, 1))
            parts = [as_bytes_view(t.contiguous().cpu()) for t in (k8, v8, ks, vs)]
            return encode_chunk(layer, token_start + start, end - start, parts[0], parts[1],
                                checksum(*parts) if self._checksums else 0, key_scales=parts[2], value_scales=parts[3])
        k, v = as_bytes_view(token_major(keys[:, :, start:end])), as_bytes_view(token_major(values[:, :, start:end]))
        return encode_chunk(layer, token_start + start, end - start, k, v, checksum(k, v) if self._checksums else 0)

    async def finish(self, first_token: int) -> TransferReceipt:
        for s in self._streams:
            s.queue.put_nowait(None)
        trailer = decode_pb2.KVMessage(trailer=decode_pb2.KVTrailer(first_token_id=first_token)).SerializeToString()
        try:
            replies = await asyncio.gather(*(self._finish_stream(s, trailer) for s in self._streams))
            self._acked = True
        finally:
            self._close()
        return TransferReceipt(
            bytes_sent=self._bytes, layers=sum(1 for t in self.layer_sent_ns if t), messages=self._messages,
            first_chunk_sent_ns=self._first_sent_ns, acked_ns=time.monotonic_ns(),
            first_chunk_received_ns=min(r.first_chunk_received_ns for r in replies),
            last_chunk_received_ns=max(r.last_chunk_received_ns for r in replies),
            layer_ready_ns=tuple(self.layer_ready_ns), layer_sent_ns=tuple(self.layer_sent_ns),
            # each stream reports the layers it carried (0 elsewhere)
            layer_received_ns=tuple(max(t) for t in zip(*(r.layer_received_ns for r in replies))),
            layer_written_ns=tuple(max(t) for t in zip(*(r.layer_written_ns for r in replies))),
        )

    async def _finish_stream(self, s: _Stream, trailer: bytes):
        try:
            await s.task
            await self._write(s, trailer)
            await s.call.done_writing()
            return await s.call
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"KV push to decode {self._address}") from None
        except PdserveError:
            # The stream closed under us: the call's status says why.
            try:
                await s.call
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc, f"KV push to decode {self._address}") from None
            raise

    async def abort(self) -> None:
        for s in self._streams:
            if s.task is not None:
                if s.task.done():
                    if not s.task.cancelled():
                        s.task.exception()  # retrieved: the caller already has the error
                else:
                    s.task.cancel()
            if s.call is not None:
                s.call.cancel()
        self._close()

    def _close(self) -> None:
        pass


class ShmKVSender(GrpcKVSender):
    """Same host: K/V through a shared-memory segment, one gRPC stream for control."""

    transport = "shm"

    def __init__(self, channel: grpc.aio.Channel, address: str, pool: SegmentPool, checksums: bool = True,
                 timeout_s: float | None = 300.0) -> None:
        super().__init__([channel], address, 1 << 62, checksums, timeout_s)
        self._pool = pool
        self._segment: Segment | None = None
        self._buffer: torch.Tensor | None = None

    @property
    def shm_segment(self) -> str:
        return self._segment.name if self._segment else ""

    async def open(self, layout: KVLayout) -> None:
        self._segment = self._pool.acquire(layout.total_bytes)
        self._buffer = torch.frombuffer(self._segment.map, dtype=torch.uint8)
        await super().open(layout)

    def _encode(self, layer: int, token_start: int, keys, values, start: int, end: int) -> bytes:
        lay = self._layout
        count, tb = end - start, lay.token_bytes
        offset = lay.shm_offset(layer, token_start + start)
        shape = (count, lay.kv_heads, lay.head_dim)
        if keys.is_cuda:
            self._segment.pin_for_cuda()
        for i, states in enumerate((keys, values)):
            dst = self._buffer[offset + i * count * tb: offset + (i + 1) * count * tb]
            # (1, H, T, D) -> (T, H, D) straight into the segment: one copy, from the device if need be.
            dst.view(lay.torch_dtype).view(shape).copy_(states[0, :, start:end].transpose(0, 1))
        data = self._segment.view[offset: offset + 2 * count * tb]
        cs = checksum(data[:count * tb], data[count * tb:]) if self._checksums else 0
        return encode_chunk(layer, token_start + start, count, b"", b"", cs, offset)

    def _close(self) -> None:
        if self._segment is not None:
            self._buffer = None
            if self._acked:  # the consumer has read it all: reuse
                self._pool.release(self._segment)
            else:  # failed or aborted: the consumer may still read it, so never reuse it
                self._pool.discard(self._segment)
            self._segment = None
