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
   A failure that is not the request's fault (an instance unreachable,
   silent, shutting down, or a KV transfer broken or corrupt) starts a new
   attempt on other instances: steps 1-3 with the prompt plus every token
   delivered so far and a new transfer id, continuing at the next token
   index, so the client sees each index once, in order. Sampling token ``i``
   depends only on (logits, seed, i), so a resumed request continues as the
   first would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from pdserve import telemetry
from pdserve.convert import sampling_to_proto
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import (Cancelled, DataLoss, DeadlineExceeded, Internal, InvalidArgument, NotFound, PdserveError,
                            ResourceExhausted, Unavailable, error_for_status)
from pdserve.metrics import GatewayMetrics
from pdserve.model import ModelInfo
from pdserve.rpc import ChannelPool, error_from_rpc
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from services.gateway.scheduler import Scheduler
from services.gateway.text import IncrementalDetokenizer, StopStrings

log = logging.getLogger(__name__)

# A request that fails on an instance (unreachable, hung, shutting down, or a broken or corrupt KV
# transfer) resumes on others: prompt + the tokens delivered so far are prefilled again and decoding
# continues from the next index, up to this many attempts in all, with jittered exponential backoff.
MAX_ATTEMPTS = 4
KEPT_WAIT_S = 5.0  # how long a failed attempt waits to learn whether prefill kept the KV
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0
RETRYABLE = (Unavailable, DataLoss, Cancelled, Internal, DeadlineExceeded)
# After an instance was found unreachable, the next attempt waits up to this long for the health checks to
# find one of its role up, rather than spend the attempt budget on refused connections.
UNAVAILABLE_WAIT_S = 10.0


# What a client learns of a failure that happened inside the cluster: the kind, not the instance. Messages
# of these kinds come from pdserve's own checks (limits, load, time) and stay, without instance prefixes.
_PREFIXES = re.compile(r"(?:(?:prefill|decode|KV push to decode) [^\s:]+:\d+: )+")
_HIDDEN = {"UNAVAILABLE": "no instance could serve the request", "DATA_LOSS": "the request's KV transfer failed",
           "INTERNAL": "an instance failed the request"}


def for_client(error: PdserveError, request_id: str, attempts: int) -> PdserveError:
    """``error`` as the client sees it: no internal address, kept KV or transfer id. The gateway's log keeps
    the full message (under the request id the client is told)."""
    hidden = _HIDDEN.get(error.status)
    if hidden is not None:
        message = f"{hidden} ({attempts} attempt{'s' * (attempts != 1)}; request_id={request_id})"
    else:
        message = _PREFIXES.sub("", str(error))
    public = error_for_status(error.status, message, getattr(error, "retry_after_ms", None))
    return public


def backoff_s(attempt: int) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt))


class TransferKept(DataLoss):
    """The push to decode failed after prefill computed the prompt's KV; prefill keeps it for a Repush."""

    def __init__(self, message: str, prefill_addr: str, kept_id: str, index: int) -> None:
        super().__init__(message)
        self.prefill_addr = prefill_addr
        self.kept_id = kept_id
        self.index = index  # the request's index of the token prefill sampled with that KV


@dataclass(frozen=True)
class GatewayRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    deadline: float | None = None  # time.monotonic() by which the client wants its answer
    resume_token_ids: tuple[int, ...] = ()  # tokens the client already has: the stream continues after them

    def time_left(self) -> float | None:
        """Seconds to the client's deadline (None: none); raises once it has passed."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"request_id={self.request_id}: the client's deadline passed")
        return left


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
    cached_tokens: int = 0
    kv_cached_tokens: int = 0


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
    finish: str | None = None
    tokens: list[int] = field(default_factory=list)  # delivered so far: a resumed attempt's prompt suffix

    @property
    def count(self) -> int:
        return len(self.tokens)

    def add(self, token: int) -> OutputChunk:
        index = self.count
        self.tokens.append(token)
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
    def __init__(self, info: ModelInfo, scheduler: Scheduler, channels: ChannelPool,
                 token_timeout_s: float = 30.0, metrics: GatewayMetrics | None = None) -> None:
        self._info = info
        self._scheduler = scheduler
        self.registry = scheduler.registry
        self._channels = channels
        self._token_timeout_s = token_timeout_s
        self.metrics = metrics or GatewayMetrics()
        self.running = 0  # requests in progress

    async def generate(self, req: GatewayRequest) -> AsyncIterator[OutputChunk]:
        """The request's chunks, across as many attempts as it takes; one ``pdserve.request`` span (under the
        current one: the gateway's RPC) with each failed attempt as a ``retry`` event, and a ``migration``
        event where tokens had been delivered, and the request's latencies in the metrics."""
        span = telemetry.start("pdserve.request", attributes={
            "pdserve.request_id": req.request_id, "pdserve.prompt_tokens": len(req.prompt_ids),
            "pdserve.max_tokens": req.max_tokens, "pdserve.resumed_tokens": len(req.resume_token_ids)})
        metrics = self.metrics
        metrics.prompt_tokens.inc(len(req.prompt_ids))
        outcome = "error"
        last = None
        self.running += 1
        try:
            async for chunk in self._generate(req, span):
                now = time.monotonic()
                if chunk.token_ids:
                    metrics.generation_tokens.inc(len(chunk.token_ids))
                    if last is not None:
                        metrics.itl.observe(now - last)
                    last = now
                if chunk.timings is not None:
                    t = chunk.timings
                    metrics.ttft.observe(t.ttft_ms / 1e3)
                    metrics.e2e.observe(t.e2e_ms / 1e3)
                    if chunk.completion_tokens > 1:
                        metrics.tpot.observe(t.tpot_ms / 1e3)
                    outcome = chunk.finish_reason or "error"
                    if span.is_recording():
                        span.set_attributes({"pdserve.completion_tokens": chunk.completion_tokens,
                                             "pdserve.finish_reason": outcome, "pdserve.ttft_ms": t.ttft_ms,
                                             "pdserve.tpot_ms": t.tpot_ms})
                yield chunk
        except BaseException as exc:
            outcome = getattr(exc, "status", "CANCELLED")
            telemetry.fail(span, exc)
            raise
        finally:
            self.running -= 1
            metrics.requests.labels(outcome).inc()
            span.end()

    async def _generate(self, req: GatewayRequest, span) -> AsyncIterator[OutputChunk]:
        started = time.monotonic()
        eos = frozenset() if req.ignore_eos else frozenset(self._info.eos_token_ids)
        tokenizer = self._info.tokenizer
        output = _Output(req, eos, IncrementalDetokenizer(tokenizer) if tokenizer else None, StopStrings(req.stop))
        for i, token in enumerate(req.resume_token_ids):  # a resumed stream: rebuild text and stop state, emit nothing
            output.add(token)
            if output.finish is not None:
                raise InvalidArgument(f"resume_token_ids: the request finished ({output.finish}) at index {i}; "
                                      "nothing to resume")
        timings = Timings()
        failed: set[str] = set()  # instances this request failed on: the next attempt avoids them
        # The budget is MAX_ATTEMPTS failures in a row without a new token: an attempt that delivered
        # tokens before failing (a second, unrelated fault) starts the count again. Each reset needs a
        # token, so a request makes at most max_tokens * MAX_ATTEMPTS attempts.
        attempt = in_a_row = 0
        kept: TransferKept | None = None  # KV prefill kept after a failed push: the next attempt re-pushes it
        while True:
            if in_a_row:
                await asyncio.sleep(min(backoff_s(in_a_row), req.time_left() or BACKOFF_CAP_S))
            req.time_left()  # no attempt starts past the client's deadline
            before = output.count
            try:
                async for chunk in self._attempt(req, eos, output, timings, attempt, failed, started, kept, span):
                    yield chunk
                return
            except PdserveError as error:
                # Usable only while no token came after the one prefill sampled with that KV.
                kept = error if isinstance(error, TransferKept) and output.count == error.index + 1 else None
                in_a_row = 1 if output.count > before else in_a_row + 1
                if not isinstance(error, RETRYABLE) or in_a_row == MAX_ATTEMPTS:
                    if isinstance(error, RETRYABLE):
                        log.warning("request_id=%s: failed after %d attempts: %s", req.request_id, attempt + 1, error)
                    raise for_client(error, req.request_id, attempt + 1) from None
                self.metrics.retries.labels(error.status).inc()
                span.add_event("retry", {"attempt": attempt + 1, "error": str(error), "status": error.status,
                                         "tokens_delivered": output.count, "kv_kept": kept is not None})
                if output.count > len(req.resume_token_ids) and kept is None:  # generation moves elsewhere
                    self.metrics.migrations.inc()
                    span.add_event("migration", {"tokens_delivered": output.count})
                log.warning("request_id=%s: attempt %d failed after %d tokens (%d of %d in a row without a "
                            "token: %s); resuming elsewhere", req.request_id, attempt + 1, output.count, in_a_row,
                            MAX_ATTEMPTS, error)
                if isinstance(error, Unavailable):
                    await self._wait_for_instances(req)
            attempt += 1

    async def _wait_for_instances(self, req: GatewayRequest) -> None:
        """Waits until every role the next attempt needs has an instance up (at most UNAVAILABLE_WAIT_S, and
        never past the deadline)."""
        for role in ("prefill", "decode"):
            if self.registry.instances[role] and not self.registry.up(role):
                left = req.time_left()
                await self.registry.wait_up(role, frozenset(), min(UNAVAILABLE_WAIT_S, left or UNAVAILABLE_WAIT_S))

    async def _attempt(self, req: GatewayRequest, eos: frozenset[int], output: _Output, timings: Timings,
                       attempt: int, failed: set[str], started: float,
                       kept: TransferKept | None = None, request_span=None) -> AsyncIterator[OutputChunk]:
        """One try at the rest of the request: prompt + the tokens delivered so far, prefilled and decoded on
        instances picked now; token indices continue from ``output.count``. With ``kept``, the prompt's KV
        (and the token sampled with it, already delivered) is re-pushed by the prefill instance that kept it
        to a decode instance picked now, instead of computed again."""
        delivered = kept.index if kept is not None else output.count
        prompt = req.prompt_ids + output.tokens[:delivered]
        remaining = req.max_tokens - delivered
        span = telemetry.start("pdserve.attempt", request_span, attributes={
            "pdserve.attempt": attempt, "pdserve.prompt_tokens": len(prompt), "pdserve.first_index": delivered})
        schedule = telemetry.start("pdserve.schedule", span, attributes={"pdserve.policy": self._scheduler.policy})
        if kept is not None:
            prefill_addr, why = kept.prefill_addr, "re-push: the instance that kept the prompt's KV"
        else:
            prefill_addr = self._scheduler.pick_prefill(prompt, frozenset(failed))
            why = self._scheduler.reason
        local = not prefill_addr  # colocated: the decode instance prefills the prompt itself
        # Prefilled on decode for its cache: only if that cache leaves at most this many tokens to compute.
        local_limit = self._scheduler.local_max_uncached if local else 0
        if schedule.is_recording():
            schedule.set_attributes({"pdserve.prefill.instance": prefill_addr or "(on decode)",
                                     "pdserve.prefill.reason": why, "pdserve.avoiding": sorted(failed)})
        needs_decode = local or remaining > 1
        # Unguessable: a transfer id is what lets KV into a reservation and, kept after a failed push, out
        # of prefill again (and two requests may share a client-chosen request id).
        transfer_id = secrets.token_hex(16)
        decode_addr = ""
        decode_ms = 0.0  # decode's estimate of its share, once it reserved
        skip = 0  # prompt tokens decode holds cached: the transfer carries the rest
        decode_call = prefill_call = transfer_task = None
        load: list[tuple[str, str, int]] = []  # work begun on instances by this attempt (the scheduler counts it)

        def begin(role: str, address: str, tokens: int) -> None:
            self._scheduler.begin(role, address, tokens)
            load.append((role, address, tokens))

        def end(role: str, address: str, tokens: int) -> None:
            load.remove((role, address, tokens))
            self._scheduler.end(role, address, tokens)

        metadata = telemetry.outgoing(span)  # the remote spans hang under this attempt's
        try:
            # 1-2. Reserve on decode before any KV can arrive there.
            try:
                if needs_decode:
                    decode_addr, decode_call, decode_ms, decode_cached, by_transfer = await self._reserve(
                        req, eos, prompt, remaining, delivered, transfer_id, local, failed, begin, end, metadata,
                        schedule, cache=kept is None, local_limit=local_limit)
                    if by_transfer:  # decode's cache held less than the index said: prefill elsewhere after all
                        local = False
                        prefill_addr = self._scheduler.pick_prefill(prompt, frozenset(failed), local=False)
                        why = self._scheduler.reason
                        schedule.add_event("prefill.pick", {"instance": prefill_addr, "reason": why,
                                                            "decode_cached_tokens": decode_cached})
                        if schedule.is_recording():
                            schedule.set_attributes({"pdserve.prefill.instance": prefill_addr,
                                                     "pdserve.prefill.reason": why})
                    # Prefilled on decode: its cached prefix is not computed. Else: not transferred.
                    timings.cached_tokens = decode_cached if local else 0
                    timings.kv_cached_tokens = decode_cached
                    skip = 0 if local else decode_cached
            except BaseException as exc:
                telemetry.fail(schedule, exc)
                raise
            finally:
                schedule.end()
            if span.is_recording():
                span.set_attributes({"pdserve.prefill.instance": prefill_addr or "(on decode)",
                                     "pdserve.decode.instance": decode_addr, "pdserve.kv_repush": kept is not None})
            if kept is not None:
                # 3'. Re-push the kept KV; the token sampled with it was delivered already.
                self.metrics.repushes.inc()
                prefill_call = prefill_pb2_grpc.PrefillStub(self._channels.get(prefill_addr)).Repush(
                    prefill_pb2.RepushRequest(request_id=req.request_id, kept_id=kept.kept_id,
                                              decode_address=decode_addr, transfer_id=transfer_id),
                    timeout=req.time_left(), metadata=metadata)
            elif local:
                event = await self._read(decode_call, "decode", decode_addr, failed)
                if event is None or event.WhichOneof("event") != "token" or event.token.index != delivered:
                    raise Internal(f"decode {decode_addr}: expected token {delivered}, got {event}")
                first_token = event.token.token_id
            else:
                # 3. Prefill; its first event is the first token. A busy instance refuses at once: try the next.
                refused: set[str] = set()
                while True:
                    begin("prefill", prefill_addr, len(prompt))
                    left = req.time_left()
                    # Prefill gets what the deadline leaves after decode's share (0: no estimate yet).
                    budget_ms = max(1.0, left * 1e3 - decode_ms) if left is not None and decode_ms else 0.0
                    prefill_call = prefill_pb2_grpc.PrefillStub(self._channels.get(prefill_addr)).Prefill(
                        prefill_pb2.PrefillRequest(request_id=req.request_id, token_ids=prompt,
                                                   sampling=sampling_to_proto(req.sampling), first_index=delivered,
                                                   decode_address=decode_addr, transfer_id=transfer_id,
                                                   budget_ms=budget_ms, skip_tokens=skip),
                        timeout=left, metadata=metadata)
                    try:
                        event = await self._read(prefill_call, "prefill", prefill_addr, failed)
                        break
                    except ResourceExhausted:
                        end("prefill", prefill_addr, len(prompt))
                        refused.add(prefill_addr)
                        span.add_event("prefill.refused", {"instance": prefill_addr})
                        prefill_addr = self._scheduler.pick_prefill(prompt, frozenset(failed | refused))
                        if not prefill_addr or prefill_addr in refused:
                            raise  # every prefill instance is busy: the client gets the refusal and its hint
                if event is None or event.WhichOneof("event") != "first_token":
                    raise Internal(f"prefill {prefill_addr}: expected FirstToken, got {event}")
                end("prefill", prefill_addr, len(prompt))  # its forward pass is done; the KV may still travel
                self.registry.report(prefill_addr, ok=True)
                self._scheduler.routed("prefill", prefill_addr, prompt)
                timings.cached_tokens = event.first_token.cached_tokens
                if event.first_token.cached_tokens:
                    self.metrics.prefix_hit_tokens.labels("prefill").inc(event.first_token.cached_tokens)
                if span.is_recording():
                    span.set_attribute("pdserve.prefill.prefix_hit_tokens", event.first_token.cached_tokens)
                if delivered == 0:
                    timings.prefill_queue_ms = event.first_token.queue_ms
                    timings.prefill_forward_ms = event.first_token.forward_ms
                first_token = event.first_token.token_id
            if needs_decode and not local:
                transfer_task = asyncio.get_running_loop().create_task(
                    self._await_transfer(prefill_call, prefill_addr, decode_call, decode_addr, timings, failed,
                                         delivered))
            if kept is not None:
                chunk = OutputChunk([], delivered, "")  # nothing new to deliver before decode's tokens
            else:
                if delivered == 0:
                    timings.ttft_ms = (time.monotonic() - started) * 1e3
                span.add_event("first_token", {"index": delivered})
                chunk = output.add(first_token)
                if chunk.finish_reason is None:
                    yield chunk
            # 4. The rest comes from decode; a decode instance silent for token_timeout_s is treated as hung.
            while chunk.finish_reason is None:
                event = await self._read(decode_call, "decode", decode_addr, failed, self._token_timeout_s)
                if event is None:
                    if transfer_task is not None and transfer_task.done() and transfer_task.exception():
                        raise transfer_task.exception()
                    failed.add(decode_addr)
                    raise Internal(f"decode {decode_addr}: token stream ended before the request finished")
                token = event.token
                if token.index != output.count:
                    raise Internal(f"decode {decode_addr}: token index {token.index}, expected {output.count}")
                if output.count == delivered + 1:
                    self.registry.report(decode_addr, ok=True)  # its first token: the instance works
                chunk = output.add(token.token_id)
                if chunk.finish_reason is None:
                    yield chunk
            finished_at = time.monotonic()
            if transfer_task is not None and output.count > delivered + 1:
                # The transfer was acknowledged before decode could produce its first token;
                # its receipt is in flight: take it for the timings.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(transfer_task), timeout=1.0)
            timings.e2e_ms = (finished_at - started) * 1e3
            if output.count > 1:
                timings.tpot_ms = (finished_at - started - timings.ttft_ms / 1e3) * 1e3 / (output.count - 1)
            chunk.timings = timings
            if span.is_recording():
                span.set_attributes({"pdserve.tokens": output.count - delivered, "pdserve.kv_bytes": timings.kv_bytes,
                                     "pdserve.kv_transfer_ms": timings.kv_transfer_ms})
            yield chunk
        except PdserveError as error:
            telemetry.fail(span, error)
            if transfer_task is not None and not transfer_task.done() and output.count == delivered + 1:
                # Decode failed before its first token: prefill's push is failing too, and it may keep the
                # KV for a re-push. Its answer comes within moments of the connection dropping.
                with contextlib.suppress(Exception, asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(transfer_task), timeout=KEPT_WAIT_S)
            if transfer_task is not None and transfer_task.done() and not transfer_task.cancelled() \
                    and transfer_task.exception() is not None:
                raise transfer_task.exception() from None  # a failed transfer is the root cause
            raise error
        finally:
            span.end()
            # 5. Nothing stays open after the request (or the failed attempt), nothing stays counted.
            for role, address, tokens in list(load):
                end(role, address, tokens)
            for call in (decode_call, prefill_call):
                if call is not None and not call.done():
                    call.cancel()
            if transfer_task is not None:
                if not transfer_task.done():
                    transfer_task.cancel()
                elif not transfer_task.cancelled():
                    transfer_task.exception()  # retrieved: the attempt already failed or finished

    async def _reserve(self, req: GatewayRequest, eos: frozenset[int], prompt: list[int], remaining: int,
                       delivered: int, transfer_id: str, local: bool, failed: set[str], begin, end, metadata,
                       schedule, cache: bool = True, local_limit: int = 0):
        """Opens the decode stream on an instance with room; tries each instance that is up once,
        those this request failed on last. The work counts on the instance from the moment it is picked
        (``begin``), so requests picking at the same time spread out; a refusal takes it back (``end``).
        Each pick and refusal is an event on the ``schedule`` span. With ``cache``, decode learns the prompt's
        tokens and may answer that it holds a prefix of its KV already (returned: those tokens). With
        ``local_limit``, a ``local`` request whose cached prefix leaves more than that to compute takes its
        KV by transfer instead (returned last: whether it does)."""
        kv_tokens = len(prompt) + remaining
        tried: set[str] = set()
        last_error: PdserveError | None = None
        while True:
            addr = self._scheduler.pick_decode(prompt, remaining, frozenset(failed | tried))
            if addr in tried:
                addr = self._scheduler.pick_decode(prompt, remaining, frozenset(tried))
            if addr in tried:  # every instance that is up was tried
                raise last_error or Unavailable("no decode instance could take the request")
            tried.add(addr)
            schedule.add_event("decode.pick", {"instance": addr, "reason": self._scheduler.reason})
            if schedule.is_recording():
                schedule.set_attributes({"pdserve.decode.instance": addr, "pdserve.decode.reason": self._scheduler.reason})
            begin("decode", addr, kv_tokens)
            call = decode_pb2_grpc.DecodeStub(self._channels.get(addr)).Generate(
                decode_pb2.DecodeRequest(
                    request_id=req.request_id, transfer_id=transfer_id, prompt_tokens=len(prompt),
                    sampling=sampling_to_proto(req.sampling), eos_token_ids=sorted(eos),
                    max_tokens=remaining, first_index=delivered, prompt_token_ids=prompt if local else (),
                    cache_token_ids=prompt if cache and not local else (), local_max_uncached=local_limit),
                timeout=req.time_left(), metadata=metadata)
            try:
                event = await self._read(call, "decode", addr, failed)
            except (ResourceExhausted, Unavailable) as exc:
                call.cancel()
                end("decode", addr, kv_tokens)
                schedule.add_event("decode.refused", {"instance": addr, "error": str(exc)})
                last_error = exc  # full or gone: the next instance may take it
                continue
            except BaseException:
                call.cancel()
                raise
            if event is None or event.WhichOneof("event") != "reserved":
                call.cancel()
                raise Internal(f"decode {addr}: expected Reserved, got {event}")
            cached = event.reserved.cached_tokens if cache else 0
            if cached >= len(prompt):
                call.cancel()
                raise Internal(f"decode {addr}: {cached} cached tokens of a {len(prompt)}-token prompt")
            self._scheduler.routed("decode", addr, prompt)
            if cached:
                self.metrics.prefix_hit_tokens.labels("decode").inc(cached)
            if schedule.is_recording():
                schedule.set_attributes({"pdserve.decode.prefix_hit_tokens": cached})
            return addr, call, event.reserved.finish_ms, cached, event.reserved.by_transfer

    async def _read_unless_down(self, call, address: str):
        """``call.read()``, unless the registry marks ``address`` down first (its health checks stopped being
        answered: a partitioned or frozen instance): then UNAVAILABLE. Waits that have no timeout of their
        own (a reservation queued on decode, a prompt queued on prefill) end this way."""
        read = asyncio.ensure_future(call.read())
        down = asyncio.ensure_future(self.registry.down_event(address).wait())
        try:
            await asyncio.wait({read, down}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            read.cancel()
            raise
        finally:
            down.cancel()
        if not read.done():
            read.cancel()
            raise Unavailable(f"{address}: marked down (health checks unanswered) while waiting for it")
        return read.result()

    async def _read(self, call, role: str, address: str, failed: set[str], timeout: float | None = None,
                    blame_data_loss: str | None = None):
        """The call's next message (None at its end). A failure names the instance; one that is unreachable
        or silent past ``timeout`` is marked down, and the instance a retryable failure is blamed on (for
        DATA_LOSS, ``blame_data_loss`` if given) is avoided by this request's next attempt and counts
        towards its ejection. Without a timeout the wait ends when the registry marks the instance down.
        An answer that the method does not exist there means another program (or role) holds the address:
        the instance is unavailable, not the request invalid."""
        try:
            message = await (self._read_unless_down(call, address) if timeout is None
                             else asyncio.wait_for(call.read(), timeout))
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError in a read pending on a call we cancelled (a failed transfer stops
            # the decode stream): that ends this attempt, not the task, unless the task itself is cancelled.
            task = asyncio.current_task()
            if call.cancelled() and not (task is not None and getattr(task, "cancelling", lambda: 0)()):
                raise Cancelled(f"{role} {address}: call cancelled by the gateway") from None
            raise
        except Unavailable:
            failed.add(address)
            raise
        except asyncio.TimeoutError:
            failed.add(address)
            self.registry.report(address, ok=False)
            self.registry.mark_down(address, f"no token for {timeout:.0f} s")
            raise DeadlineExceeded(f"{role} {address}: no token for {timeout:.0f} s") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                error = Unavailable(f"{role} {address}: the server there does not serve the {role} API "
                                    "(another program on its port?)")
                self._channels.reset(address)
            else:
                error = error_from_rpc(exc, f"{role} {address}")
            if isinstance(error, RETRYABLE) and not (isinstance(error, Cancelled) and call.cancelled()):
                blamed = blame_data_loss if isinstance(error, DataLoss) and blame_data_loss else address
                failed.add(blamed)
                self.registry.report(blamed, ok=False)
            if isinstance(error, Unavailable):
                self.registry.mark_down(address, str(error))
            raise error from None
        return None if message is grpc.aio.EOF else message

    async def _await_transfer(self, prefill_call, prefill_addr: str, decode_call, decode_addr: str,
                              timings: Timings, failed: set[str], index: int) -> None:
        """Waits for prefill's TransferDone; if the transfer fails, stops the decode stream too. Prefill
        reports a push that decode broke or refused as DATA_LOSS (or keeps the KV): that is the decode
        instance's failure, and the next attempt avoids it."""
        try:
            event = await self._read(prefill_call, "prefill", prefill_addr, failed, blame_data_loss=decode_addr)
        except NotFound as exc:  # a Repush whose kept KV expired: the next attempt prefills again
            decode_call.cancel()
            raise DataLoss(str(exc)) from None
        except PdserveError:
            decode_call.cancel()
            raise
        if event is not None and event.WhichOneof("event") == "kv_kept":
            failed.add(decode_addr)
            self.registry.report(decode_addr, ok=False)
            decode_call.cancel()
            kv = event.kv_kept
            raise TransferKept(f"prefill {prefill_addr}: KV push failed ({kv.reason}); KV kept as {kv.kept_id}",
                               prefill_addr, kv.kept_id, index)
        if event is not None and event.WhichOneof("event") == "transfer_done":
            done = event.transfer_done
            timings.kv_bytes = done.bytes
            timings.kv_transfer_ms = (done.acked_ns - done.first_chunk_sent_ns) / 1e6
            # Both clocks are CLOCK_MONOTONIC: comparable when prefill and decode share a host.
            timings.kv_tail_ms = max(0.0, (done.last_chunk_received_ns - done.forward_end_ns) / 1e6)
