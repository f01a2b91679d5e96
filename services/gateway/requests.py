"""From what a client asked to the router's chunks: one request flow behind every front door.

The gRPC API and the OpenAI-compatible HTTP API both turn their message into a ``RequestSpec`` (plain
fields, nothing of either protocol) and hand it to ``Frontend.start``: ``RequestBuilder.build`` checks
every field (naming it as the client's API does: ``FieldNames``), measures text before tokenizing it and
tokenizes it off the event loop, the request gets its deadline, and ``Frontend.stream`` runs it through
the one router. The two doors admit exactly the same requests and produce the same tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
import uuid
from typing import AsyncIterator
from dataclasses import dataclass, field

from pdserve import config as cfg
from pdserve.convert import check_id, check_token_ids
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import InvalidArgument
from pdserve.model import ModelInfo
from pdserve.logs import bind_request
from services.gateway.router import GatewayRequest, OutputChunk, Router
from services.gateway.text import ROLES, Tokenizing, encode_chat, encode_prompt

log = logging.getLogger(__name__)

MAX_STOP_CHARS = 256
# A prompt longer than this many characters per token of context cannot fit (max_prompt_chars: 0).
CHARS_PER_TOKEN_LIMIT = 32
_MASK64 = (1 << 64) - 1


class UnknownModel(InvalidArgument):
    """The request names a model this gateway does not serve (the HTTP API answers 404)."""


@dataclass(frozen=True)
class RequestSpec:
    """A generation request as the client put it, before any check."""

    model: str = ""
    prompt: str | None = None
    messages: list[dict] | None = None  # [{"role", "content"}]
    token_ids: list[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    request_id: str = ""
    resume_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class FieldNames:
    """What the client's API calls each field, for error messages that name it."""

    prompt: str = "prompt"
    messages: str = "messages"
    token_ids: str = "prompt"
    max_tokens: str = "max_tokens"
    temperature: str = "temperature"
    top_p: str = "top_p"
    top_k: str = "top_k"
    seed: str = "seed"
    stop: str = "stop"
    request_id: str = "request_id"
    extra: dict = field(default_factory=dict)


GRPC_NAMES = FieldNames(messages="chat.messages", token_ids="token_ids", max_tokens="sampling.max_tokens",
                        temperature="sampling.temperature", top_p="sampling.top_p", top_k="sampling.top_k",
                        seed="sampling.seed", stop="sampling.stop")


class RequestBuilder:
    def __init__(self, info: ModelInfo, config: cfg.GatewayConfig) -> None:
        self.info = info
        self._config = config
        self._tokenizing = Tokenizing(info.tokenizer) if info.tokenizer is not None else None

    @property
    def max_prompt_chars(self) -> int:
        return self._config.max_prompt_chars or CHARS_PER_TOKEN_LIMIT * self.info.context_length

    def check_model(self, model: str) -> None:
        info = self.info
        if model and model not in (info.name, info.spec):
            raise UnknownModel(f"model: unknown model {model[:100]!r}; this gateway serves {info.name!r}")

    async def build(self, spec: RequestSpec, names: FieldNames = FieldNames()) -> GatewayRequest:
        """Checks every field (``InvalidArgument`` naming it and the limit), tokenizes, fills defaults."""
        info = self.info
        self.check_model(spec.model)
        check_id(spec.request_id, names.request_id, required=False)
        sampling = self._sampling(spec, names)
        stop = self._stop(spec, names)
        ids = await self._prompt_ids(spec, names)
        context = info.context_length
        room = context - len(ids)
        if room < 1:
            raise InvalidArgument(f"prompt: {len(ids)} tokens leave no room in the model's context length of {context}")
        if spec.max_tokens is not None:
            if spec.max_tokens < 1:
                raise InvalidArgument(f"{names.max_tokens}: must be >= 1, got {spec.max_tokens}")
            if spec.max_tokens > room:
                raise InvalidArgument(
                    f"{names.max_tokens}: prompt ({len(ids)} tokens) + max_tokens ({spec.max_tokens}) = "
                    f"{len(ids) + spec.max_tokens} exceeds the model's context length of {context}")
            max_tokens = spec.max_tokens
        else:
            max_tokens = min(self._config.default_max_tokens, room)
        resume = list(spec.resume_token_ids)
        if resume:
            check_token_ids(resume, info.vocab_size, "resume_token_ids")
            if spec.seed is None and sampling.temperature != 0:
                raise InvalidArgument(f"{names.seed}: resuming a sampled request needs the seed its first chunk "
                                      "reported")
        return GatewayRequest(request_id=spec.request_id or uuid.uuid4().hex, prompt_ids=ids, sampling=sampling,
                              max_tokens=max_tokens, stop=stop, ignore_eos=spec.ignore_eos,
                              resume_token_ids=tuple(resume))

    def _sampling(self, spec: RequestSpec, names: FieldNames) -> SamplingParams:
        temperature = 1.0 if spec.temperature is None else spec.temperature
        top_p = 1.0 if spec.top_p is None else spec.top_p
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"{names.temperature}: must be >= 0, got {temperature}")
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidArgument(f"{names.top_p}: must be in (0, 1], got {top_p}")
        if spec.top_k < 0:
            raise InvalidArgument(f"{names.top_k}: must be >= 0 (0 disables), got {spec.top_k}")
        if spec.seed is not None and not 0 <= spec.seed <= _MASK64:
            raise InvalidArgument(f"{names.seed}: must be in [0, 2^64), got {spec.seed}")
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=spec.top_k, seed=seed)

    def _stop(self, spec: RequestSpec, names: FieldNames) -> tuple[str, ...]:
        limit = self._config.max_stop_strings
        if len(spec.stop) > limit:
            raise InvalidArgument(f"{names.stop}: at most {limit} strings, got {len(spec.stop)}")
        for i, stop in enumerate(spec.stop):
            if not 0 < len(stop) <= MAX_STOP_CHARS:
                raise InvalidArgument(f"{names.stop}[{i}]: must be 1 to {MAX_STOP_CHARS} characters, got {len(stop)}")
        if spec.stop and self.info.tokenizer is None:
            raise InvalidArgument(f"{names.stop}: model {self.info.name} has no tokenizer to match stop strings")
        return tuple(spec.stop)

    async def _prompt_ids(self, spec: RequestSpec, names: FieldNames) -> list[int]:
        """The prompt's token ids. Text is measured before it is tokenized (a prompt far longer than any
        context is refused at once) and tokenized off the event loop, so no prompt stalls other streams."""
        info, tokenizer = self.info, self.info.tokenizer
        given = [x is not None for x in (spec.prompt, spec.messages, spec.token_ids)]
        if sum(given) != 1:
            raise InvalidArgument(f"{names.prompt}: must not be empty (set exactly one of a prompt, messages or "
                                  "token ids)")
        if spec.token_ids is not None:
            ids = list(spec.token_ids)
            if len(ids) > info.context_length:
                raise InvalidArgument(f"prompt: {len(ids)} tokens exceed the model's context length of "
                                      f"{info.context_length}")
            check_token_ids(ids, info.vocab_size, names.token_ids)
            return ids
        kind = names.prompt if spec.prompt is not None else names.messages
        if tokenizer is None:
            raise InvalidArgument(f"{kind}: model {info.name} has no tokenizer; send token ids")
        limit = self.max_prompt_chars
        if spec.prompt is not None:
            if not spec.prompt:
                raise InvalidArgument(f"{names.prompt}: must not be empty")
            if len(spec.prompt) > limit:
                raise InvalidArgument(f"{names.prompt}: {len(spec.prompt)} characters exceed the limit of {limit} "
                                      "(max_prompt_chars)")
            encode, text = encode_prompt, spec.prompt
        else:
            messages = spec.messages
            if not messages:
                raise InvalidArgument(f"{names.messages}: must not be empty")
            for i, m in enumerate(messages):
                if m.get("role") not in ROLES:
                    raise InvalidArgument(f"{names.messages}[{i}].role: must be one of {', '.join(ROLES)}, "
                                          f"got {str(m.get('role'))[:40]!r}")
                if not isinstance(m.get("content"), str):
                    raise InvalidArgument(f"{names.messages}[{i}].content: must be text")
            chars = sum(len(m["content"]) for m in messages)
            if chars > limit:
                raise InvalidArgument(f"{names.messages}: {chars} characters of content exceed the limit of {limit} "
                                      "(max_prompt_chars)")
            encode, text = encode_chat, [{"role": m["role"], "content": m["content"]} for m in messages]
        ids = await self._tokenizing.run(encode, text)
        if not ids:
            raise InvalidArgument(f"{kind}: tokenizes to no tokens")
        return ids


class Frontend:
    """What a front door calls: ``start`` a request from a ``RequestSpec``, then ``stream`` its chunks."""

    def __init__(self, info: ModelInfo, router: Router, config: cfg.GatewayConfig) -> None:
        self.info = info
        self.router = router
        self.config = config
        self.requests = RequestBuilder(info, config)

    async def start(self, spec: RequestSpec, names: FieldNames = FieldNames(),
                    time_remaining: float | None = None) -> GatewayRequest:
        """The checked request, its deadline the client's (``time_remaining`` seconds) or the gateway's own
        limit when it set none; the task's log lines carry its id from here on."""
        req = await self.requests.build(spec, names)
        remaining = min(time_remaining or math.inf, self.config.request_timeout_s)
        req = dataclasses.replace(req, deadline=time.monotonic() + remaining)
        bind_request(req.request_id)
        log.info("request_id=%s prompt_tokens=%d max_tokens=%d", req.request_id, len(req.prompt_ids), req.max_tokens)
        return req

    async def stream(self, req: GatewayRequest) -> AsyncIterator[OutputChunk]:
        async for chunk in self.router.generate(req):
            if chunk.finish_reason is not None:
                log.info("request_id=%s finished (%s) completion_tokens=%d", req.request_id,
                         chunk.finish_reason, chunk.completion_tokens)
            yield chunk
