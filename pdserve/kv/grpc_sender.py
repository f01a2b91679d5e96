"""KV producers: gRPC streams (K/V bytes inline), same-host shared memory (gRPC carries offsets), and CUDA IPC
(prefill writes into decode's pool; gRPC carries only which layers are written).

``GrpcKVSender`` spreads a transfer's layers over one ``Decode.PushKV`` stream
per channel it is given (layer ``l`` goes on stream ``l % n``, so each layer
stays in token order on one stream); with channels on separate TCP
connections the streams move bytes in parallel. The streams are synchronous
gRPC calls whose requests come from a generator on gRPC's own thread per
call: it turns each staged layer into ~``chunk_bytes`` messages, encoded by
hand (``encode_chunk``: K/V copied once) and sent one at a time, each send
awaiting gRPC flow control, so the bytes in flight per stream stay at one
message however slow the receiver is. Why threads: grpc.aio sends on the
event loop and holds the GIL through the socket write (its batch call does
the write inline), so every thread of the process, the one launching the
forward pass included, waited for the bytes of every message; a synchronous
call releases the GIL while it writes, and the streams write in parallel.

``ShmKVSender`` uses one stream for control: each layer range's K/V go into a
segment from the producer's ``SegmentPool`` at a fixed offset, and one small
message carries that offset and the checksum.

``IpcKVSender`` (a GPU decode pool on this host): each layer range is copied
device to device into the slots of the blocks decode reserved (see
``pdserve.kv.cuda_ipc``); one small message per range says it is written.

Where the K/V start (``stage``, on the prefill worker thread as each layer is
queued): on a CPU the tensors go to their stream as they are; on a GPU the
copies (into pinned host staging, the segment, or decode's pool) are queued on
``DeviceCopies``' stream behind an event, so they run while later layers
compute, and the range goes to its stream once its bytes are in place.
Encoding and checksums run on the stream's thread, never on the event loop.
The transfer's host staging is one pinned buffer of its size (held within the
prefill instance's in-flight budget), laid out as a shared-memory segment is.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from pdserve import telemetry
from pdserve.errors import Cancelled, DataLoss, Internal, InvalidArgument, PdserveError
from pdserve.kv.cuda_ipc import copy_runs, scatter_tokens, slot_runs
from pdserve.kv.shm import SEGMENT_HEADER, Segment, SegmentPool
from pdserve.kv.staging import DeviceCopies
from pdserve.kv.transport import KVSender, TransferReceipt
from pdserve.kv.wire import (QUANTIZATIONS, KVLayout, as_bytes_view, checksum, chunk_ranges, encode_chunk,
                             quantize_int8, token_major)
from pdserve.rpc import error_from_rpc
from pdserve.v1 import decode_pb2, decode_pb2_grpc

_PUSH_KV = "/pdserve.v1.Decode/PushKV"


@dataclass
class _Range:
    """A layer's K/V for tokens [start, start + count), ready to encode: CPU tensors (1, H, T, D), or host
    views (T, H, D) that a device copy filled, or, int8 from a GPU, per-chunk quantized host tensors."""

    layer: int
    start: int
    count: int
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    quantized: list | None = None  # [(start, end, k8, v8, k_scales, v_scales)] per chunk, host tensors


_FINISH = object()  # a stream's queue: every range was queued, send the trailer
_STOP = object()  # aborted: end the stream now


class _Stream:
    """One ``PushKV`` call: its ranges (a thread-safe queue the request generator reads on gRPC's thread) and
    its outcome on the event loop (``started``: the header is sent; ``reply``: decode's answer)."""

    def __init__(self, channel: grpc.Channel, index: int) -> None:
        self.channel = channel
        self.index = index
        self.call: grpc.Future | None = None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.started: asyncio.Future | None = None
        self.reply: asyncio.Future | None = None
        self.bytes = 0  # K/V bytes sent
        self.messages = 0


def _settle(futures: tuple[asyncio.Future | None, ...], call: grpc.Future) -> None:
    """On the loop, once a call ended: its result, or its error (a ``grpc.RpcError``), into the futures
    still pending."""
    for future in futures:
        if future is None or future.done():
            continue
        if call.cancelled():
            future.cancel()
        elif call.exception() is not None:
            future.set_exception(call.exception())
        else:
            future.set_result(call.result())


def _retrieve(future: asyncio.Future) -> None:
    """Marks a stream future's error as seen: an aborted transfer's streams fail, and nobody awaits them."""
    if not future.cancelled():
        future.exception()


class GrpcKVSender(KVSender):
    transport = "grpc"  # how the bytes travel (metrics label)
    host_staging = True  # on a GPU, K/V go through host memory (``_host_buffer``)

    def __init__(self, channels: list[grpc.Channel], address: str, chunk_bytes: int = 4 << 20,
                 checksums: bool = True, timeout_s: float | None = 300.0, quantization: str = "",
                 copies: DeviceCopies | None = None, stream_of: tuple[int, int] | None = None,
                 stream_metadata: list[tuple] | None = None) -> None:
        if not channels:
            raise ValueError("GrpcKVSender needs at least one channel")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: {quantization!r} not one of {QUANTIZATIONS}")
        self._quantization = quantization
        # (index, count): this sender's one stream is that stream of a transfer over several (a KV receiver
        # forwarding the stream it took in); by default the channels' streams are all of the transfer's.
        if stream_of is not None and len(channels) != 1:
            raise ValueError("stream_of: a sender with one channel only")
        first, self._stream_count = stream_of or (0, len(channels))
        # Per stream, more call metadata (a KV sender process learns where to send the stream on).
        self._stream_metadata = stream_metadata or [()] * len(channels)
        self._streams = [_Stream(c, first + i) for i, c in enumerate(channels)]
        self._address = address
        self._chunk_bytes = chunk_bytes
        self._checksums = checksums
        self._timeout_s = timeout_s
        self._copies = copies  # a GPU's copy stream (None: tensors staged on the CPU)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._layout: KVLayout | None = None
        self._host: torch.Tensor | None = None  # GPU: the transfer's pinned staging (uint8, segment layout)
        self._lock = threading.RLock()  # stage() (worker thread) against open()'s end and abort() (loop)
        self._aborted = False
        # stage() calls that came before open() completed (the forward pass starts beside the open): their
        # work starts, in order, once the transfer is open. Each keeps its ready time and, on a GPU, an event
        # recorded behind its layer when it was staged, so its copies still wait only for that layer.
        self._opened = False
        self._deferred: list[tuple] = []
        self._ranges = 0  # staged so far (any thread)
        self._landed = 0  # of which the bytes are in place (any thread, under the lock)
        self._all_landed = asyncio.Event()
        self._finish_waiting = False  # finish() waits for the last ranges to land (set under the lock)
        self._first_sent_ns = 0
        self._open_start_ns = self._opened_ns = 0
        self._trailer = b""  # set by finish(): the streams' last message
        self._failure: BaseException | None = None  # a message that could not be made (finish() reports it)
        self._acked = False  # every stream's reply arrived: the consumer is done with the transfer
        self.layer_ready_ns: list[int] = []  # per layer: when the forward pass handed over its last chunk
        self.layer_sent_ns: list[int] = []  # per layer: when its last message was handed to the stream

    # ---- what each kind of sender adds to the header and does with a range --------------------------

    def _header_fields(self) -> dict:
        return {"quantization": self._quantization}

    def _host_buffer(self, layout: KVLayout) -> torch.Tensor | None:
        """GPU, exact K/V: pinned host memory the device copies land in (segment layout)."""
        if self._quantization:
            return None  # int8 chunks are quantized on the device, each into its own pinned tensors
        return torch.empty(layout.total_bytes, dtype=torch.uint8, pin_memory=True)

    def _device_work(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> _Range:
        """On the copy stream: the copies of one range out of the device; returns what they fill."""
        count = keys.shape[2]
        k, v = keys[0].transpose(0, 1), values[0].transpose(0, 1)  # (T, H, D) views
        if self._quantization:
            parts = []
            for s, e in chunk_ranges(count, self._per_token_bytes(), self._chunk_bytes):
                quantized = quantize_int8(k[s:e], v[s:e])
                host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in quantized]
                for h, t in zip(host, quantized):
                    h.copy_(t, non_blocking=True)
                parts.append((s, e, *host))
            return _Range(layer, start, count, quantized=parts)
        host_k, host_v = self._host_views(layer, start, count)
        host_k.copy_(k, non_blocking=True)
        host_v.copy_(v, non_blocking=True)
        return _Range(layer, start, count, host_k, host_v)

    def _host_views(self, layer: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H, D) views of the staging where tokens [start, start + count) of ``layer`` go: K, then V."""
        lay = self._layout
        offset, n = lay.shm_offset(layer, start), count * lay.token_bytes
        shape = (count, lay.kv_heads, lay.head_dim)
        region = self._host[offset:offset + 2 * n]
        return region[:n].view(lay.torch_dtype).view(shape), region[n:].view(lay.torch_dtype).view(shape)

    def _group(self, s: _Stream, r: _Range) -> tuple[list[_Range], object]:
        """The ranges one pass of a stream's generator sends, starting with ``r``, and what it took from the
        queue but does not send with them (None: nothing)."""
        return [r], None

    def _messages_for(self, ranges: list[_Range]) -> list[tuple[list[int], int, object]]:
        """(layers it carries, K/V bytes it carries, how to make it) for each message of a group of ranges."""
        (r,) = ranges
        if r.quantized is not None:
            return [([r.layer], self._wire_bytes(r, p[0], p[1]), lambda p=p: self._encode_quantized(r.layer, r.start, *p))
                    for p in r.quantized]
        per_token = self._per_token_bytes()
        return [([r.layer], self._wire_bytes(r, s, e), lambda s=s, e=e: self._encode(r, s, e))
                for s, e in chunk_ranges(r.count, per_token, self._chunk_bytes)]

    def _encode(self, r: _Range, start: int, end: int) -> bytes:
        """One chunk message for tokens [start, end) of the range."""
        if r.keys.dim() == 4:  # CPU: (1, H, T, D) straight from the forward pass
            if self._quantization:
                k8, v8, ks, vs = quantize_int8(r.keys[0, :, start:end].transpose(0, 1),
                                               r.values[0, :, start:end].transpose(0, 1))
                return self._encode_quantized(r.layer, r.start, start, end, k8, v8, ks, vs)
            k = as_bytes_view(token_major(r.keys[:, :, start:end]))
            v = as_bytes_view(token_major(r.values[:, :, start:end]))
        else:  # host staging (T, H, D)
            k, v = as_bytes_view(r.keys[start:end]), as_bytes_view(r.values[start:end])
        return encode_chunk(r.layer, r.start + start, end - start, k, v, checksum(k, v) if self._checksums else 0)

    def _encode_quantized(self, layer: int, token_start: int, start: int, end: int, k8, v8, ks, vs) -> bytes:
        parts = [as_bytes_view(t.contiguous().cpu()) for t in (k8, v8, ks, vs)]
        return encode_chunk(layer, token_start + start, end - start, parts[0], parts[1],
                            checksum(*parts) if self._checksums else 0, key_scales=parts[2], value_scales=parts[3])

    def _per_token_bytes(self) -> int:
        """K/V payload bytes per token: int8 is one byte per element plus a 4-byte scale per token."""
        lay = self._layout
        return 2 * lay.kv_heads * lay.head_dim + 4 if self._quantization else 2 * lay.token_bytes

    def _wire_bytes(self, r: _Range, start: int, end: int) -> int:
        """K/V payload of one message for tokens [start, end) (int8: plus a 4-byte scale per channel)."""
        lay = self._layout
        return (end - start) * self._per_token_bytes() + (4 * lay.kv_heads * lay.head_dim if self._quantization else 0)

    # ---- the transfer ------------------------------------------------------------------------------

    async def open(self, layout: KVLayout) -> None:
        self._open_start_ns = time.monotonic_ns()
        self._layout = layout
        self._loop = asyncio.get_running_loop()
        self.layer_sent_ns = [0] * layout.num_layers
        self.layer_ready_ns = [0] * layout.num_layers
        if self._copies is not None and self.host_staging:  # pinning takes a while the first time: not on the loop
            self._host = await asyncio.to_thread(self._host_buffer, layout)
        if self._aborted:  # meanwhile (the open runs beside the forward pass, which may fail first)
            self._close()
            raise Cancelled("KV transfer aborted before it opened")
        header = decode_pb2.KVHeader(transfer_id=layout.transfer_id, num_layers=layout.num_layers,
                                     num_tokens=layout.num_tokens, kv_heads=layout.kv_heads,
                                     head_dim=layout.head_dim, dtype=layout.dtype, num_streams=self._stream_count,
                                     checksums=self._checksums, **self._header_fields())
        metadata = telemetry.outgoing() or ()  # decode's span joins the caller's trace
        first = self._streams[0].index
        for s in self._streams:
            header.stream_index = s.index
            s.started, s.reply = self._loop.create_future(), self._loop.create_future()
            s.started.add_done_callback(_retrieve)
            s.reply.add_done_callback(_retrieve)
            push = s.channel.stream_unary(_PUSH_KV, request_serializer=None,
                                          response_deserializer=decode_pb2.PushKVReply.FromString)
            s.call = push.future(self._requests(s, decode_pb2.KVMessage(header=header).SerializeToString()),
                                 timeout=self._timeout_s,
                                 metadata=(*metadata, *self._stream_metadata[s.index - first]) or None)
            s.call.add_done_callback(lambda call, s=s: self._call_soon(_settle, (s.started, s.reply), call))
        try:  # every header is on its way (a decode that cannot be reached fails the transfer here)
            await asyncio.gather(*(s.started for s in self._streams), self._opening(layout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"KV push to decode {self._address}") from None
        self._opened_ns = time.monotonic_ns()
        with self._lock:
            if not self._deferred:
                self._opened = True
        if not self._opened:  # layers staged meanwhile start now, off the loop (GPU: ~0.15 ms a layer)
            await asyncio.to_thread(self._start_deferred)

    def _start_deferred(self) -> None:
        with self._lock:  # a stage() meanwhile waits, and comes after these
            if not self._aborted:
                for item in self._deferred:
                    self._start(*item)
            self._deferred.clear()
            self._opened = True

    async def _opening(self, layout: KVLayout) -> None:
        """What a kind of sender does while the headers go out."""

    def _awaitable(self, call: grpc.Future) -> asyncio.Future:
        """A synchronous call's outcome on the event loop."""
        future = self._loop.create_future()
        call.add_done_callback(lambda c: self._call_soon(_settle, (future,), c))
        return future

    def _call_soon(self, callback, *args) -> None:
        """``callback(*args)`` on the event loop, from any thread (not at all once the loop closed)."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed meanwhile (the service stopped): nobody to tell
            pass

    def _requests(self, s: _Stream, header: bytes):
        """A stream's messages, made on gRPC's thread for the call as it asks for each (after the previous one
        was sent): the header, each queued range's messages, the trailer."""
        yield header
        self._call_soon(lambda: s.started.done() or s.started.set_result(None))
        pending = None
        while True:
            if pending is not None:
                r, pending = pending, None
            else:
                try:
                    r = s.queue.get(timeout=1.0)
                except queue.Empty:
                    if s.call is not None and s.call.done():
                        return  # the call ended under us (decode answered early, a deadline passed)
                    continue
            if r is _STOP:
                return
            if r is _FINISH:
                yield self._trailer
                return
            if isinstance(r, bytes):  # fail(): a KVAbort ends the stream
                yield r
                return
            group, pending = self._group(s, r)
            for layers, nbytes, make in self._messages_for(group):
                try:
                    message = make()
                except Exception as exc:  # noqa: BLE001 - finish() reports it; the stream ends without a trailer
                    self._failure = exc
                    return
                sent = time.monotonic_ns()  # handed to the stream (the generator resumes once it was sent)
                self._first_sent_ns = self._first_sent_ns or sent
                for layer in layers:
                    self.layer_sent_ns[layer] = sent
                yield message
                s.bytes += nbytes  # per stream: each has its own thread
                s.messages += 1

    def stage(self, layer: int, token_start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """May come before ``open`` completed (once it was called): the range then waits for it."""
        ready_ns = time.monotonic_ns()
        with self._lock:
            if self._aborted:
                return
            self._ranges += 1
            if not self._opened:
                on_device = self._copies is not None and keys.is_cuda
                self._deferred.append((layer, token_start, keys, values, ready_ns,
                                       self._copies.mark() if on_device else None))
                return
            self._start(layer, token_start, keys, values, ready_ns)

    def _start(self, layer: int, token_start: int, keys: torch.Tensor, values: torch.Tensor, ready_ns: int,
               after: torch.cuda.Event | None = None) -> None:
        """Under the lock (abort() waits for every copy queued before it), once open: a range's copies queued
        (GPU), or the range to its stream (CPU)."""
        if not self._through_copies(keys):
            self._staged(_Range(layer, token_start, keys.shape[2], keys, values), ready_ns)
            return
        staged: list[_Range] = []

        def work():
            staged.append(self._device_work(layer, token_start, keys, values))
            return keys, values

        self._copies.submit(work, None, lambda: self._staged(staged[0], ready_ns), after)

    def _through_copies(self, keys: torch.Tensor) -> bool:
        """Whether a range goes through the copy stream (``_device_work``) before its stream sends it."""
        return self._copies is not None and keys.is_cuda

    def _staged(self, r: _Range, ready_ns: int) -> None:
        """On the thread that learnt it (the copies' waiter, or the stager on a CPU): a range's bytes are where
        its messages are made from; it goes straight to its stream's thread. The loop hears of it only if
        ``finish`` waits for the last ranges to land."""
        failed = self._copies is not None and self._copies.failed is not None
        if not failed:
            self.layer_ready_ns[r.layer] = ready_ns
            self._streams[r.layer % len(self._streams)].queue.put(r)
        with self._lock:
            self._landed += 1
            wake = self._finish_waiting and (failed or self._landed == self._ranges)
        if wake:
            self._call_soon(self._all_landed.set)  # finish() reports a failure

    async def finish(self, first_token: int) -> TransferReceipt:
        while True:  # every staged range's bytes are in place before the end marker
            with self._lock:
                if self._landed >= self._ranges:
                    break
                self._all_landed.clear()
                self._finish_waiting = True
            await self._all_landed.wait()
        if self._copies is not None and self._copies.failed is not None:
            raise Internal(f"KV copies on the GPU failed: {self._copies.failed}")
        trailer = decode_pb2.KVTrailer(first_token_id=first_token)
        self._trailer = decode_pb2.KVMessage(trailer=trailer).SerializeToString()
        for s in self._streams:
            s.queue.put(_FINISH)
        try:
            replies = await asyncio.gather(*(self._reply(s) for s in self._streams))
            self._acked = True
        finally:
            self._close()
        if all(r.layer_sent_ns for r in replies):  # relayed: the relays' sends are the wire's
            self.layer_sent_ns = [max(t) for t in zip(*(r.layer_sent_ns for r in replies))]
        return TransferReceipt(
            bytes_sent=sum(s.bytes for s in self._streams), layers=sum(1 for t in self.layer_sent_ns if t),
            messages=sum(s.messages for s in self._streams),
            first_chunk_sent_ns=self._first_sent_ns, acked_ns=time.monotonic_ns(),
            first_chunk_received_ns=min(r.first_chunk_received_ns for r in replies),
            last_chunk_received_ns=max(r.last_chunk_received_ns for r in replies),
            layer_ready_ns=tuple(self.layer_ready_ns), layer_sent_ns=tuple(self.layer_sent_ns),
            # each stream reports the layers it carried (0 elsewhere)
            layer_received_ns=tuple(max(t) for t in zip(*(r.layer_received_ns for r in replies))),
            layer_written_ns=tuple(max(t) for t in zip(*(r.layer_written_ns for r in replies))),
            open_start_ns=self._open_start_ns, opened_ns=self._opened_ns,
        )

    async def _reply(self, s: _Stream):
        try:
            return await s.reply
        except grpc.RpcError as exc:
            if self._failure is not None:
                raise Internal(f"KV message for decode {self._address} could not be made: {self._failure}") from None
            raise error_from_rpc(exc, f"KV push to decode {self._address}") from None

    async def fail(self, reason: str, wait_s: float = 5.0) -> None:
        """Ends the transfer telling the consumer why: after the ranges already queued, a ``KVAbort`` in place of
        the trailer on every stream (the consumer fails the transfer with DATA_LOSS naming ``reason``); waits up
        to ``wait_s`` for the consumer's answers, then ``abort``. For a producer relaying a transfer, whose
        consumer would otherwise learn only of a cancelled stream, or nothing if its header had not arrived."""
        await self._stop_staging()  # what is queued is complete before the consumer frees the blocks
        message = decode_pb2.KVMessage(abort=decode_pb2.KVAbort(reason=reason)).SerializeToString()
        started = [s for s in self._streams if s.call is not None]
        for s in started:
            s.queue.put(message)
        if started:
            await asyncio.wait([s.reply for s in started], timeout=wait_s)
        await self.abort()

    async def abort(self) -> None:
        """Stops the transfer: no range is staged after this, and (GPU) every copy already queued completed
        before the streams are cancelled, so nothing is written anywhere once it returns."""
        await self._stop_staging()
        for s in self._streams:
            s.queue.put(_STOP)
            if s.call is not None:
                s.call.cancel()
        self._close()

    async def _stop_staging(self) -> None:
        """No range is staged after this, and (GPU) every copy already queued has completed."""
        with self._lock:
            self._aborted = True
            self._deferred.clear()
        if self._copies is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._copies.synchronize)

    def _close(self) -> None:
        self._host = None  # pinned staging back to torch's host cache


class ShmKVSender(GrpcKVSender):
    """Same host: K/V through a shared-memory segment, gRPC streams for control (one, to a decode instance;
    one per KV sender process, which sends each on over gRPC: ``pdserve.kv.relays``)."""

    transport = "shm"

    def __init__(self, channels: list[grpc.Channel], address: str, pool: SegmentPool, checksums: bool = True,
                 timeout_s: float | None = 300.0, copies: DeviceCopies | None = None,
                 stream_of: tuple[int, int] | None = None, stream_metadata: list[tuple] | None = None,
                 transport: str = "shm") -> None:
        super().__init__(channels, address, 1 << 62, checksums, timeout_s, copies=copies, stream_of=stream_of,
                         stream_metadata=stream_metadata)
        self.transport = transport  # "grpc" through KV sender processes
        self._pool = pool
        self._segment: Segment | None = None

    def _header_fields(self) -> dict:
        return {"shm_segment": self._segment.name}

    def _host_buffer(self, layout: KVLayout) -> torch.Tensor:
        self._segment.pin_for_cuda()  # device copies land in it at pinned speed
        return torch.frombuffer(self._segment.map, dtype=torch.uint8, offset=SEGMENT_HEADER)

    async def open(self, layout: KVLayout) -> None:
        self._segment = self._pool.acquire(SEGMENT_HEADER + layout.total_bytes)
        self._segment.stamp(layout.transfer_id)
        if self._copies is None:
            self._host = torch.frombuffer(self._segment.map, dtype=torch.uint8, offset=SEGMENT_HEADER)
        await super().open(layout)

    def _messages_for(self, ranges: list[_Range]) -> list[tuple[list[int], int, object]]:
        (r,) = ranges  # the whole range: one offset
        return [([r.layer], self._wire_bytes(r, 0, r.count), lambda: self._offset_message(r))]

    def _offset_message(self, r: _Range) -> bytes:
        lay = self._layout
        if r.keys.dim() == 4:  # CPU: copy (1, H, T, D) into the segment here
            host_k, host_v = self._host_views(r.layer, r.start, r.count)
            host_k.copy_(r.keys[0].transpose(0, 1))
            host_v.copy_(r.values[0].transpose(0, 1))
        offset, n = SEGMENT_HEADER + lay.shm_offset(r.layer, r.start), r.count * lay.token_bytes
        data = self._segment.view[offset:offset + 2 * n]
        cs = checksum(data[:n], data[n:]) if self._checksums else 0
        return encode_chunk(r.layer, r.start, r.count, b"", b"", cs, offset)

    def _close(self) -> None:
        self._host = None
        if self._segment is not None:
            if self._acked:  # the consumer has read it all: reuse
                self._pool.release(self._segment)
            else:  # failed or aborted: the consumer may still read it, so never reuse it
                self._pool.discard(self._segment)
            self._segment = None


class IpcKVSender(GrpcKVSender):
    """Same host, decode's pool on a GPU this process sees: each range copied device to device into the slots
    of the blocks decode reserved; one stream carries which ranges are written."""

    transport = "cuda_ipc"

    host_staging = False

    def __init__(self, channel: grpc.Channel, address: str, pool: torch.Tensor, block_size: int,
                 incarnation: str, copies: DeviceCopies, timeout_s: float | None = 300.0,
                 layer_ranges: bool = False, stream_of: tuple[int, int] | None = None) -> None:
        super().__init__([channel], address, 1 << 62, False, timeout_s, copies=copies, stream_of=stream_of)
        self._layer_ranges = layer_ranges  # decode takes one note for several layers (its pool handle says)
        self._pool = pool  # decode's (2, layers, slots, H, D), mapped into this process
        self._block_size = block_size
        self._incarnation = incarnation  # of the decode instance whose pool this is
        self._blocks: list[int] = []  # decode's blocks for the transfer, in token order
        self._slots: torch.Tensor | None = None  # (prompt tokens,) on the pool's device, filled on the copy stream
        self._host_slots: torch.Tensor | None = None  # their pinned source, kept until the transfer ends

    def _header_fields(self) -> dict:
        return {"cuda_ipc": True}

    async def _opening(self, layout: KVLayout) -> None:
        # Decode answers once the stream's header arrived (it frees the blocks only after that stream ended):
        # asked at once, the round trip overlaps the header's.
        try:
            target = await self._awaitable(decode_pb2_grpc.DecodeStub(self._streams[0].channel).TransferTarget.future(
                decode_pb2.TransferTargetRequest(transfer_id=layout.transfer_id, stream_index=self._streams[0].index),
                timeout=10))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"KV push to decode {self._address}") from None
        if target.incarnation != self._incarnation:
            raise DataLoss(f"decode {self._address} restarted: the pool mapped here is not its pool any more")
        self._blocks = list(target.blocks)
        blocks = torch.tensor(self._blocks, dtype=torch.long)
        tokens = torch.arange(layout.num_tokens)
        if len(blocks) * self._block_size < layout.num_tokens:
            raise InvalidArgument(f"decode {self._address}: {len(blocks)} blocks for {layout.num_tokens} tokens")
        slots = blocks[tokens // self._block_size] * self._block_size + tokens % self._block_size
        if int(slots.max()) >= self._pool.shape[2]:
            raise InvalidArgument(f"decode {self._address}: a block outside its pool")
        # To the device on the copy stream, which the scatters follow: a pageable copy on the current stream
        # would wait for the forward passes queued there.
        self._host_slots = slots.pin_memory()
        with torch.cuda.stream(self._copies.stream):
            self._slots = self._host_slots.to(self._pool.device, non_blocking=True)

    def _through_copies(self, keys: torch.Tensor) -> bool:
        return True  # into the pool on the copy stream, from the device or (a KV receiver) pinned host memory

    def _device_work(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> _Range:
        count = keys.shape[2]
        slots = self._slots[start:start + count]
        # A KV receiver's chunk is pinned host memory: DMA copies alone where the blocks run in order.
        runs = None if keys.is_cuda else slot_runs(self._blocks, self._block_size, start, count)
        for i, states in enumerate((keys, values)):
            source = states[0].transpose(0, 1)  # (T, H, D)
            if runs is not None:
                copy_runs(self._pool[i, layer], runs, source)
                continue
            if source.device != self._pool.device:  # another GPU of this host (peer copy), or pinned memory
                source = source.to(self._pool.device, non_blocking=True)
            scatter_tokens(self._pool[i, layer], slots, source)
        return _Range(layer, start, count)

    def _group(self, s: _Stream, r: _Range) -> tuple[list[_Range], object]:
        """Every range already landed that continues ``r`` (the next layers, the same tokens) goes in one note,
        if decode takes such notes: when layers land faster than notes are sent (a prompt's whole KV staged
        at once), one message instead of one per layer."""
        group = [r]
        while self._layer_ranges:
            try:
                more = s.queue.get_nowait()
            except queue.Empty:
                break
            if not (isinstance(more, _Range) and more.layer == group[-1].layer + 1
                    and (more.start, more.count) == (r.start, r.count)):
                return group, more
            group.append(more)
        return group, None

    def _messages_for(self, ranges: list[_Range]) -> list[tuple[list[int], int, object]]:
        r = ranges[0]
        count = len(ranges) if len(ranges) > 1 else 0
        return [([g.layer for g in ranges], sum(self._wire_bytes(g, 0, g.count) for g in ranges),
                 lambda: encode_chunk(r.layer, r.start, r.count, b"", b"", 0, layer_count=count))]

    def _wire_bytes(self, r: _Range, start: int, end: int) -> int:
        return 2 * (end - start) * self._layout.token_bytes  # what moved, if not over the wire
