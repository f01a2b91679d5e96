"""KV producer over one gRPC client stream (``Decode.PushKV``) to the decode instance.

Layers (or, for a prompt prefilled in chunks, each chunk of each layer) queue
as the forward pass produces them; a pump task turns each into
~``chunk_bytes`` messages and writes them, awaiting gRPC flow control, while
the forward pass goes on.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from pdserve.convert import chunk_to_proto, layout_to_proto
from pdserve.errors import Internal
from pdserve.kv.transport import KVSender, TransferReceipt
from pdserve.kv.wire import KVLayout, split_layer, token_major
from pdserve.rpc import error_from_rpc
from pdserve.v1 import decode_pb2, decode_pb2_grpc


class GrpcKVSender(KVSender):
    def __init__(self, channel: grpc.aio.Channel, address: str, chunk_bytes: int = 1 << 20,
                 timeout_s: float | None = 300.0) -> None:
        self._stub = decode_pb2_grpc.DecodeStub(channel)
        self._address = address
        self._chunk_bytes = chunk_bytes
        self._timeout_s = timeout_s
        self._call = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pump_task: asyncio.Task | None = None
        self._layout: KVLayout | None = None
        self._bytes = 0
        self._messages = 0
        self._layers = 0
        self._first_sent_ns = 0

    async def open(self, layout: KVLayout) -> None:
        self._layout = layout
        self._call = self._stub.PushKV(timeout=self._timeout_s)
        self._pump_task = asyncio.get_running_loop().create_task(self._pump(), name=f"kv-push-{layout.transfer_id}")
        await self._write(decode_pb2.KVMessage(header=layout_to_proto(layout)))

    def send_layer(self, layer, token_start, keys, values) -> None:
        self._queue.put_nowait((layer, token_start, keys, values))

    async def _write(self, message: decode_pb2.KVMessage) -> None:
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"KV push to decode {self._address}") from None
        except asyncio.InvalidStateError:
            # The call already ended (the receiver rejected it); finish() reports why.
            raise Internal("KV push stream closed early") from None

    async def _pump(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            layer, token_start, keys, values = item
            for chunk in split_layer(layer, token_major(keys), token_major(values), self._chunk_bytes, token_start):
                if not self._first_sent_ns:
                    self._first_sent_ns = time.monotonic_ns()
                await self._write(chunk_to_proto(chunk))
                self._bytes += len(chunk.key) + len(chunk.value)
                self._messages += 1
            if token_start + keys.shape[2] == self._layout.num_tokens:
                self._layers += 1  # the layer is complete

    async def finish(self, first_token: int) -> TransferReceipt:
        self._queue.put_nowait(None)
        try:
            await self._pump_task
            await self._write(decode_pb2.KVMessage(trailer=decode_pb2.KVTrailer(first_token_id=first_token)))
            await self._call.done_writing()
            reply = await self._call
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"KV push to decode {self._address}") from None
        except Internal:
            # The stream closed under us: the call's status says why.
            try:
                await self._call
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc, f"KV push to decode {self._address}") from None
            raise
        return TransferReceipt(
            bytes_sent=self._bytes, layers=self._layers, messages=self._messages,
            first_chunk_sent_ns=self._first_sent_ns, acked_ns=time.monotonic_ns(),
            first_chunk_received_ns=reply.first_chunk_received_ns,
            last_chunk_received_ns=reply.last_chunk_received_ns,
        )

    async def abort(self) -> None:
        if self._pump_task is not None:
            if self._pump_task.done():
                if not self._pump_task.cancelled():
                    self._pump_task.exception()  # retrieved: the caller already has the error
            else:
                self._pump_task.cancel()
        if self._call is not None:
            self._call.cancel()
