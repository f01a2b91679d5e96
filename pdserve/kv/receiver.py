"""The consumer side of one ``PushKV`` stream, after its header: chunks into the assembly, then the trailer.

Shared by the decode servicer and the transfer benchmark so both run the
same path: a shared-memory stream's segment is mapped for the stream's life
and each chunk resolved against it; every chunk goes through ``KVAssembly``.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from pdserve.convert import chunk_from_proto
from pdserve.errors import InvalidArgument
from pdserve.kv.assembly import KVAssembly
from pdserve.kv.shm import Segment, chunk_from_segment
from pdserve.kv.wire import StreamInfo
from pdserve.v1 import decode_pb2

# How long a rejected push is read to its end before the server answers anyway.
DRAIN_SECONDS = 10.0


async def receive_stream(messages: AsyncIterator[decode_pb2.KVMessage], assembly: KVAssembly, stream: StreamInfo,
                         on_trailer: Callable[[int], None], before_message: Callable[[], None] = lambda: None) -> int:
    """Feeds the stream's chunks to ``assembly`` and its trailer's first token to ``on_trailer``;
    returns the K/V bytes this stream carried. ``before_message`` may raise to stop the stream."""
    layout = assembly.layout
    segment = Segment.open(stream.shm_segment) if stream.shm_segment else None
    received = 0
    try:
        async for message in messages:
            before_message()
            kind = message.WhichOneof("message")
            if kind == "chunk":
                chunk = chunk_from_proto(message.chunk)
                assembly.add(chunk if segment is None else chunk_from_segment(chunk, segment, layout))
                received += 2 * chunk.token_count * layout.token_bytes
            elif kind == "trailer":
                on_trailer(message.trailer.first_token_id)
                return received
            else:
                raise InvalidArgument(f"PushKV: unexpected {kind or 'empty'} message after the header")
        raise InvalidArgument("PushKV: stream ended before the KVTrailer")
    finally:
        if segment is not None:
            segment.close()


async def drain(messages: AsyncIterator[decode_pb2.KVMessage], limit_s: float = DRAIN_SECONDS) -> None:
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
