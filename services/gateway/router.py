"""One request's life across the cluster, seen from the gateway.

1. Ask the scheduler for a prefill instance (none: colocated).
2. Open the token stream on a decode instance; it admits the request (all the
   KV blocks it can need, or a wait in its bounded queue) and answers
   ``Reserved``. A full instance answers RESOURCE_EXHAUSTED: try the next one.
3. Call ``Prefill`` with the decode instance's address: prefill pushes the KV
   there and returns the first token, which streams to the client at once.
   Colocated, the decode instance prefills the prompt itself and streams the
   first token as index 0.
4. Relay tokens from the decode stream, detokenizing incrementally and
   applying EOS, stop strings and max_tokens.
5. On finish, error or client cancellation, cancel whatever is still open.
   A transfer that fails with DATA_LOSS before decode produced a token runs
   again (steps 1-3, a new transfer id); the client sees token 0 once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from pdserve.convert import sampling_to_proto
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import DataLoss, Internal, PdserveError, ResourceExhausted
from pdserve.model import ModelInfo
from pdserve.rpc import ChannelPool, error_from_rpc
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from services.gateway.scheduler import Scheduler
from services.gateway.text import IncrementalDetokenizer, StopStrings

log = logging.getLogger(__name__)

# A request whose KV transfer fails (DATA_LOSS: corrupt, or the transfer broke) before decode
# produced a token is prefilled and transferred again, up to this many attempts in all.
TRANSFER_ATTEMPTS = 3


@dataclass(frozen=True)
class GatewayRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Timings:
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    e2e_ms: float = 0.0
    prefill_queue_ms: float = 0.0
    prefill_forward_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    kv_bytes: int = 0
    kv_tail_ms: float = 0.0


@dataclass
class OutputChunk:
    token_ids: list[int]
    index: int
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    completion_tokens: int = 0
    timings: Timings | None = None


@dataclass
class _Output:
    """Turns tokens into chunks: text, EOS, stop strings, max_tokens."""

    request: GatewayRequest
    eos_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer | None
    stops: StopStrings
    count: int = 0
    finish: str | None = None

    def add(self, token: int) -> OutputChunk:
        index = self.count
        self.count += 1
        text, stopped = "", False
        if self.detokenizer is not None:
            text, stopped = self.stops.feed(self.detokenizer.push(token))
        if stopped:
            self.finish = "stop"
        elif token in self.eos_token_ids:
            self.finish = "stop"
        elif self.count >= self.request.max_tokens:
            self.finish = "length"
        if self.finish is not None and not stopped and self.detokenizer is not None:
            tail, hit = self.stops.feed(self.detokenizer.flush())
            text += tail if hit else tail + self.stops.flush()
            if hit:
                self.finish = "stop"
        return OutputChunk([token], index, text, self.finish, self.count)


class Router:
    def __init__(self, info: ModelInfo, scheduler: Scheduler, channels: ChannelPool) -> None:
        self._info = info
        self._scheduler = scheduler
        self._channels = channels

    async def generate(self, req: GatewayRequest) -> AsyncIterator[OutputChunk]:
        started = time.monotonic()
        eos = frozenset() if req.ignore_eos else frozenset(self._info.eos_token_ids)
        tokenizer = self._info.tokenizer
        output = _Output(req, eos, IncrementalDetokenizer(tokenizer) if tokenizer else None, StopStrings(req.stop))
        timings = Timings()
        first_at = 0.0
        chunk = None
        for attempt in range(TRANSFER_ATTEMPTS):
            prefill_addr = self._scheduler.pick_prefill(len(req.prompt_ids))
            local = not prefill_addr  # colocated: the decode instance prefills the prompt itself
            needs_decode = local or req.max_tokens > 1
            transfer_id = f"{req.request_id}/{attempt}"
            decode_addr = ""
            decode_call = prefill_call = transfer_task = None
            try:
                # 1-2. Reserve on decode before any KV can arrive there.
                if needs_decode:
                    decode_addr, decode_call = await self._reserve(req, eos, transfer_id, local)
                if local:
                    event = await self._read(decode_call, f"decode {decode_addr}")
                    if event is None or event.WhichOneof("event") != "token" or event.token.index != 0:
                        raise Internal(f"decode {decode_addr}: expected token 0, got {event}")
                    first_token = event.token.token_id
                else:
                    # 3. Prefill; its first event is the first token.
                    prefill_call = prefill_pb2_grpc.PrefillStub(self._channels.get(prefill_addr)).Prefill(
                        prefill_pb2.PrefillRequest(request_id=req.request_id, token_ids=req.prompt_ids,
                                                   sampling=sampling_to_proto(req.sampling),
                                                   decode_address=decode_addr, transfer_id=transfer_id))
                    event = await self._read(prefill_call, f"prefill {prefill_addr}")
                    if event is None or event.WhichOneof("event") != "first_token":
                        raise Internal(f"prefill {prefill_addr}: expected FirstToken, got {event}")
                    timings.prefill_queue_ms = event.first_token.queue_ms
                    timings.prefill_forward_ms = event.first_token.forward_ms
                    first_token = event.first_token.token_id
                if needs_decode and not local:
                    transfer_task = asyncio.get_running_loop().create_task(
                        self._await_transfer(prefill_call, prefill_addr, decode_call, timings))
                if chunk is None:
                    first_at = time.monotonic()
                    timings.ttft_ms = (first_at - started) * 1e3
                    chunk = output.add(first_token)
                    if chunk.finish_reason is None:
                        yield chunk
                elif first_token != chunk.token_ids[0]:
                    # Sampling is a function of (logits, seed, index): a retry must agree.
                    raise Internal(f"retried prefill sampled token {first_token}, first attempt {chunk.token_ids[0]}")
                # 4. The rest comes from decode.
                while chunk.finish_reason is None:
                    event = await self._read(decode_call, f"decode {decode_addr}")
                    if event is None:
                        if transfer_task is not None and transfer_task.done() and transfer_task.exception():
                            raise transfer_task.exception()
                        raise Internal(f"decode {decode_addr}: token stream ended before the request finished")
                    token = event.token
                    if token.index != output.count:
                        raise Internal(f"decode {decode_addr}: token index {token.index}, expected {output.count}")
                    chunk = output.add(token.token_id)
                    if chunk.finish_reason is None:
                        yield chunk
                finished_at = time.monotonic()
                if transfer_task is not None and output.count > 1:
                    # The transfer was acknowledged before decode could produce token 1;
                    # its receipt is in flight: take it for the timings.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(transfer_task), timeout=1.0)
                timings.e2e_ms = (finished_at - started) * 1e3
                if output.count > 1:
                    timings.tpot_ms = (finished_at - first_at) * 1e3 / (output.count - 1)
                chunk.timings = timings
                yield chunk
                return
            except (grpc.aio.AioRpcError, PdserveError) as exc:
                error = error_from_rpc(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
                if transfer_task is not None and transfer_task.done() and not transfer_task.cancelled():
                    # A failed transfer is the root cause of a failed decode stream.
                    error = transfer_task.exception() or error
                # A corrupt or broken transfer before decode produced anything: transfer again.
                if isinstance(error, DataLoss) and output.count == 1 and attempt + 1 < TRANSFER_ATTEMPTS:
                    log.warning("request_id=%s: KV transfer to %s failed (%s); retrying (attempt %d of %d)",
                                req.request_id, decode_addr, error, attempt + 2, TRANSFER_ATTEMPTS)
                    continue
                raise error from None
            finally:
                # 5. Nothing stays open after the request (or the failed attempt).
                for call in (decode_call, prefill_call):
                    if call is not None and not call.done():
                        call.cancel()
                if transfer_task is not None and not transfer_task.done():
                    transfer_task.cancel()

    async def _reserve(self, req: GatewayRequest, eos: frozenset[int], transfer_id: str, local: bool):
        """Opens the decode stream on an instance with room; tries each instance once before giving up."""
        for attempt in range(self._scheduler.num_decode):
            addr = self._scheduler.pick_decode(len(req.prompt_ids), req.max_tokens)
            call = decode_pb2_grpc.DecodeStub(self._channels.get(addr)).Generate(
                decode_pb2.DecodeRequest(
                    request_id=req.request_id, transfer_id=transfer_id, prompt_tokens=len(req.prompt_ids),
                    sampling=sampling_to_proto(req.sampling), eos_token_ids=sorted(eos),
                    max_tokens=req.max_tokens, prompt_token_ids=req.prompt_ids if local else ()))
            try:
                event = await self._read(call, f"decode {addr}")
            except ResourceExhausted:
                if attempt + 1 < self._scheduler.num_decode:
                    continue  # full: the next instance may have room
                raise
            except BaseException:
                call.cancel()
                raise
            if event is None or event.WhichOneof("event") != "reserved":
                call.cancel()
                raise Internal(f"decode {addr}: expected Reserved, got {event}")
            return addr, call
        raise Internal("no decode instance configured")

    @staticmethod
    async def _read(call, what: str):
        try:
            message = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, what) from None
        return None if message is grpc.aio.EOF else message

    async def _await_transfer(self, prefill_call, prefill_addr: str, decode_call, timings: Timings) -> None:
        """Waits for prefill's TransferDone; if the transfer fails, stops the decode stream too."""
        try:
            event = await self._read(prefill_call, f"prefill {prefill_addr}")
        except PdserveError:
            decode_call.cancel()
            raise
        if event is not None and event.WhichOneof("event") == "transfer_done":
            done = event.transfer_done
            timings.kv_bytes = done.bytes
            timings.kv_transfer_ms = (done.acked_ns - done.first_chunk_sent_ns) / 1e6
            # Both clocks are CLOCK_MONOTONIC: comparable when prefill and decode share a host.
            timings.kv_tail_ms = max(0.0, (done.last_chunk_received_ns - done.forward_end_ns) / 1e6)
