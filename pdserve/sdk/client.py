"""Async and blocking clients for ``Gateway.Generate``.

Both build the same request (``build_request``) and fold chunks the same way
(``Accumulator``), measuring TTFT and TPOT on the client side. Both resume a
stream that breaks (the gateway restarted, the connection dropped): the
request is sent again with the tokens already received and the seed the first
chunk reported, and the gateway continues at the next index, so the caller
sees every index once, in order (``_Resume``; at most ``resume_attempts``
breaks in a row without a new token).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import grpc
from opentelemetry import propagate, trace

from pdserve.auth import bearer
from pdserve.errors import Cancelled, DataLoss, FailedPrecondition, Internal, PdserveError, Unavailable
from pdserve.rpc import OPTIONS, error_from_rpc
from pdserve.tls import TlsFiles
from pdserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_CLIENT = object()  # a request's timeout when not given: the client's
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass(frozen=True)
class Chunk:
    """One streamed piece: the tokens it carries and the text they completed."""

    request_id: str
    token_ids: list[int]
    index: int
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    server_timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float           # client-side: call start -> first token
    tpot_s: float           # client-side: mean gap between later tokens
    e2e_s: float
    server_timings: dict[str, float]  # fields the gateway set (a zero field is absent)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def build_request(prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                  token_ids: Sequence[int] | None = None, model: str = "", max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int = 0,
                  seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                  request_id: str = "") -> gateway_pb2.GenerateRequest:
    """Exactly one of ``prompt``, ``messages`` (``[{"role", "content"}]``) or ``token_ids``."""
    given = [x is not None for x in (prompt, messages, token_ids)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of prompt, messages or token_ids")
    sampling = common_pb2.SamplingParams(top_k=top_k, stop=list(stop), ignore_eos=ignore_eos)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    request = gateway_pb2.GenerateRequest(model=model, sampling=sampling, request_id=request_id)
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.chat.messages.extend(gateway_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        request.token_ids.ids.extend(token_ids)
    return request


def _chunk(msg: gateway_pb2.GenerateChunk) -> Chunk:
    finish = _FINISH.get(msg.finish_reason)
    timings = {}
    if finish is not None and msg.HasField("timings"):
        timings = {f.name: v for f, v in msg.timings.ListFields()}
    return Chunk(msg.request_id, list(msg.token_ids), msg.index, msg.text, finish,
                 msg.usage.prompt_tokens, msg.usage.completion_tokens, timings)


def _credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> grpc.ChannelCredentials | None:
    """TLS to the gateway when any of the files is given: ``tls_ca`` checks its certificate (the system's
    roots without it), ``tls_cert``/``tls_key`` are this client's own (a gateway requiring client
    certificates); None: plaintext."""
    if not (tls_ca or tls_cert or tls_key):
        return None
    try:
        return TlsFiles.load(tls_cert or "", tls_key or "", tls_ca or "").channel_credentials()
    except ValueError as exc:
        raise FailedPrecondition(str(exc)) from None


def _error(exc: grpc.RpcError) -> PdserveError:
    """The ``PdserveError`` for a failed call (``ResourceExhausted.retry_after_ms`` from the server's hint)."""
    return error_from_rpc(exc)


class Accumulator:
    """Folds streamed chunks into a ``Completion``, timing TTFT and TPOT as they arrive."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_at: float | None = None
        self.last_at = self.started
        self.chunks: list[Chunk] = []

    def add(self, chunk: Chunk) -> None:
        now = time.perf_counter()
        if self.first_at is None and chunk.token_ids:
            self.first_at = now
        self.last_at = now
        self.chunks.append(chunk)

    def completion(self) -> Completion:
        last = self.chunks[-1] if self.chunks else Chunk("", [], 0, "")
        token_ids = [t for c in self.chunks for t in c.token_ids]
        first_at = self.first_at or self.last_at
        return Completion(
            request_id=last.request_id,
            text="".join(c.text for c in self.chunks),
            token_ids=token_ids,
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens or len(token_ids),
            ttft_s=first_at - self.started,
            tpot_s=(self.last_at - first_at) / (len(token_ids) - 1) if len(token_ids) > 1 else 0.0,
            e2e_s=self.last_at - self.started,
            server_timings=last.server_timings,
        )


RESUMABLE = (Unavailable, Internal, Cancelled, DataLoss)  # a broken stream, not an answer about the request


_tracer = trace.get_tracer("pdserve.sdk")


MIN_ATTEMPT_S = 0.25  # a resume is not begun with less time than this left before the deadline


class _Resume:
    """One logical stream across the calls that carry it: what was received, and whether to go on.

    It is one span too (``pdserve.client.generate``, under the caller's current span, recorded by the
    application's tracer provider if it set one), whose context every call carries to the gateway as W3C
    ``traceparent`` metadata; each resume is an event on it."""

    def __init__(self, request: gateway_pb2.GenerateRequest, timeout: float | None, attempts: int,
                 auth: tuple[tuple[str, str], ...] = ()) -> None:
        self.request = request
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.attempts = attempts
        self.received: list[int] = []
        self.in_a_row = 0
        self.span = _tracer.start_span("pdserve.client.generate", kind=trace.SpanKind.CLIENT,
                                       attributes={"rpc.system": "grpc", "rpc.method": "Generate"})
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        self.metadata = (*carrier.items(), *auth) or None

    def end(self, error: BaseException | None = None) -> None:
        span = self.span
        if span.is_recording():
            span.set_attribute("pdserve.request_id", self.request.request_id)
            span.set_attribute("pdserve.completion_tokens", len(self.received))
            if error is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
        span.end()

    def timeout(self) -> float | None:
        return None if self.deadline is None else max(0.001, self.deadline - time.monotonic())

    def seen(self, msg: gateway_pb2.GenerateChunk) -> Chunk:
        if msg.HasField("seed") and not self.request.sampling.HasField("seed"):
            self.request.sampling.seed = msg.seed  # a resume must sample with the same seed
        if msg.request_id and not self.request.request_id:
            self.request.request_id = msg.request_id
        self.received.extend(msg.token_ids)
        if msg.token_ids:
            self.in_a_row = 0
        return _chunk(msg)

    def after(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before resuming after ``exc``; raises the error when the stream is not resumed:
        not resumable, too many in a row, or no time left for another attempt after the wait (the caller
        then learns the cause, say UNAVAILABLE, not the deadline an attempt begun too late would hit)."""
        error = _error(exc)
        self.in_a_row += 1
        step = min(2.0, 0.1 * 2 ** self.in_a_row)
        wait_s = step / 2 + random.uniform(0, step / 2)  # exponential backoff, equal jitter
        if not isinstance(error, RESUMABLE) or self.in_a_row > self.attempts or \
                (self.deadline is not None and time.monotonic() + wait_s + MIN_ATTEMPT_S >= self.deadline):
            raise error from None
        self.span.add_event("resume", {"error": str(error), "tokens_received": len(self.received)})
        del self.request.resume_token_ids[:]
        self.request.resume_token_ids.extend(self.received)
        return wait_s


class AsyncClient:
    """``async with AsyncClient() as c: print((await c.generate("Hi")).text)``"""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = None,
                 resume_attempts: int = 8, api_key: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        """``api_key``: sent with every call when the gateway requires keys (default: ``PDSERVE_API_KEY``).
        ``tls_ca``, ``tls_cert``, ``tls_key``: TLS to the gateway (see ``_credentials``)."""
        self._auth = bearer(os.environ.get("PDSERVE_API_KEY", "") if api_key is None else api_key)
        credentials = _credentials(tls_ca, tls_cert, tls_key)
        self._channel = (grpc.aio.secure_channel(address, credentials, options=OPTIONS) if credentials else
                         grpc.aio.insecure_channel(address, options=OPTIONS))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._timeout = timeout
        self._resume_attempts = resume_attempts

    async def stream(self, prompt: str | None = None, *, timeout: float | None | object = _CLIENT,
                     **kwargs) -> AsyncIterator[Chunk]:
        """Yields chunks as the gateway streams them, resuming a broken stream; see ``build_request``.
        ``timeout``: this request's deadline in seconds (default: the client's)."""
        state = _Resume(build_request(prompt, **kwargs), self._timeout if timeout is _CLIENT else timeout,
                        self._resume_attempts, self._auth)
        error = None
        try:
            while True:
                call = self._stub.Generate(state.request, timeout=state.timeout(), metadata=state.metadata)
                try:
                    async for msg in call:
                        yield state.seen(msg)
                    return
                except grpc.aio.AioRpcError as exc:
                    wait_s = state.after(exc)
                finally:
                    call.cancel()
                await asyncio.sleep(wait_s)
        except GeneratorExit:  # the caller stopped reading: not a failure
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            state.end(error)

    async def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        acc = Accumulator()
        async for chunk in self.stream(prompt, **kwargs):
            acc.add(chunk)
        return acc.completion()

    async def model_info(self) -> gateway_pb2.ModelInfo:
        try:
            return await self._stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=self._timeout,
                                                 metadata=self._auth or None)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class Client:
    """Blocking client: ``Client().generate("Hi").text``."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = None,
                 resume_attempts: int = 8, api_key: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        self._auth = bearer(os.environ.get("PDSERVE_API_KEY", "") if api_key is None else api_key)
        credentials = _credentials(tls_ca, tls_cert, tls_key)
        self._channel = (grpc.secure_channel(address, credentials, options=OPTIONS) if credentials else
                         grpc.insecure_channel(address, options=OPTIONS))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._timeout = timeout
        self._resume_attempts = resume_attempts

    def stream(self, prompt: str | None = None, *, timeout: float | None | object = _CLIENT,
               **kwargs) -> Iterator[Chunk]:
        """Yields chunks as the gateway streams them, resuming a broken stream; see ``build_request``.
        ``timeout``: this request's deadline in seconds (default: the client's)."""
        state = _Resume(build_request(prompt, **kwargs), self._timeout if timeout is _CLIENT else timeout,
                        self._resume_attempts, self._auth)
        error = None
        try:
            while True:
                call = self._stub.Generate(state.request, timeout=state.timeout(), metadata=state.metadata)
                try:
                    for msg in call:
                        yield state.seen(msg)
                    return
                except grpc.RpcError as exc:
                    wait_s = state.after(exc)
                finally:
                    call.cancel()
                time.sleep(wait_s)
        except GeneratorExit:  # the caller stopped reading: not a failure
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            state.end(error)

    def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        acc = Accumulator()
        for chunk in self.stream(prompt, **kwargs):
            acc.add(chunk)
        return acc.completion()

    def model_info(self) -> gateway_pb2.ModelInfo:
        try:
            return self._stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=self._timeout,
                                           metadata=self._auth or None)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
