"""The consumer side of one ``PushKV`` stream: raw messages, chunks into the assembly, then the trailer.

Shared by the decode servicer and the transfer benchmark so both run the
same path: ``PushKV`` is registered to take raw bytes (``add_decode_servicer``)
which ``wire.decode_message`` parses with K/V as views, a shared-memory
stream's segment is mapped for the stream's life and each chunk resolved
against it; every chunk goes through ``KVAssembly``.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

import grpc

from pdserve.errors import DataLoss, InvalidArgument
from pdserve.rpc import add_servicer
from pdserve.kv.assembly import KVAssembly
from pdserve.kv.shm import SegmentCache, chunk_from_segment
from pdserve.kv.wire import StreamInfo, decode_message
from pdserve.v1 import decode_pb2, decode_pb2_grpc

# This process's mappings of producers' segments, kept across transfers.
SEGMENTS = SegmentCache()
# How long a rejected push is read to its end before the server answers anyway.
DRAIN_SECONDS = 10.0
MAX_REASON = 1000  # characters of a KVAbort's reason kept


async def receive_stream(messages: AsyncIterator[bytes], assembly: KVAssembly, stream: StreamInfo,
                         on_trailer: Callable[[int], None],
                         writes_issued: Callable[[], Awaitable[None]] | None = None) -> int:
    """Feeds the stream's chunks to ``assembly`` and its trailer's first token to ``on_trailer``;
    returns the K/V bytes this stream carried. Stops with the transfer's failure once it has one.
    ``writes_issued``: when the assembly's writes (and their checksum checks) are queued elsewhere, awaited
    before the trailer is reported (so a transfer completes only once every chunk passed its check) and
    before the stream's shared-memory mapping is released (and so before the producer learns it may reuse
    the segment); not for a CUDA IPC stream, which queues no write."""
    layout = assembly.layout
    if stream.cuda_ipc:  # the producer wrote the pool itself: nothing of this stream is queued on a writer
        writes_issued = None
    segment = SEGMENTS.open(stream.shm_segment) if stream.shm_segment else None
    received = 0
    try:
        if segment is not None and not segment.bears(layout.transfer_id):
            raise InvalidArgument(f"header.shm_segment: {stream.shm_segment} does not hold this transfer's KV")
        async for data in messages:
            assembly.check_alive()
            kind, message = decode_message(data)
            if kind == "chunk":
                chunk = message
                assembly.add(chunk if segment is None else chunk_from_segment(chunk, segment, layout))
                received += 2 * chunk.token_count * layout.token_bytes
            elif kind == "trailer":
                if writes_issued is not None:  # a writer on its own thread checks each chunk: hear its verdicts
                    await writes_issued()
                    assembly.check_alive()
                on_trailer(message.first_token_id)
                return received
            elif kind == "abort":
                raise DataLoss(f"KV transfer failed on its way to decode: {message.reason[:MAX_REASON]}")
            else:
                raise InvalidArgument(f"PushKV: unexpected {kind or 'empty'} message after the header")
        raise InvalidArgument("PushKV: stream ended before the KVTrailer")
    finally:
        if writes_issued is not None:
            await writes_issued()  # no queued write still reads the messages' bytes or the segment
        if segment is not None:
            SEGMENTS.release(segment)


async def drain(messages: AsyncIterator[bytes], limit_s: float = DRAIN_SECONDS) -> None:
    """Reads and discards the rest of a rejected stream, for at most ``limit_s``.

    A grpc.aio client still writing when the server ends the RPC loses the
    server's status and sees ``INTERNAL: Internal error from Core`` instead
    (grpc/grpc#36066), so the sender would never learn *why* (DATA_LOSS,
    INVALID_ARGUMENT). Answering after the sender half-closes keeps the code.
    """
    async def read_all() -> None:
        async for _ in messages:
            pass

    try:
        await asyncio.wait_for(read_all(), limit_s)
    except Exception:  # the sender went away or stalled: answer now
        pass


async def read_header(messages: AsyncIterator[bytes]) -> decode_pb2.KVHeader:
    first = await anext(aiter(messages), None)
    kind, header = decode_message(first) if first is not None else ("", None)
    if kind != "header":
        raise InvalidArgument("PushKV: the first message must be a KVHeader")
    return header


def add_decode_servicer(servicer: decode_pb2_grpc.DecodeServicer, server: grpc.aio.Server) -> None:
    """``add_DecodeServicer_to_server``, except ``PushKV`` gets each message's raw bytes: parsed by
    ``decode_message`` with K/V left in place, and bad framing becomes DATA_LOSS, not INTERNAL."""
    add_servicer(decode_pb2_grpc.add_DecodeServicer_to_server, servicer, server, raw=("PushKV",))
