"""Gateway servicer: validates and tokenizes at the edge, then hands a plain request to the router."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import math
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from pdserve import config as cfg
from pdserve.convert import check_address, check_id, check_token_ids, sampling_from_proto
from pdserve.errors import InvalidArgument
from pdserve.logs import bind_request
from pdserve.metrics import GatewayMetrics
from pdserve.model import ModelInfo, load_model_info
from pdserve.rpc import ChannelPool, add_servicer, rpc_errors, set_ready, start_server
from pdserve.service import RunningService, expose_metrics, run_service, service_main
from pdserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.router import GatewayRequest, Router
from services.gateway.scheduler import INSTANCE_ROLES, LoadAwareScheduler, Registry, RoundRobinScheduler
from services.gateway.text import ROLES, encode_chat, encode_prompt

log = logging.getLogger(__name__)

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}
MAX_STOP_CHARS = 256
# A prompt longer than this many characters per token of context cannot fit (max_prompt_chars: 0).
CHARS_PER_TOKEN_LIMIT = 32


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, info: ModelInfo, router: Router, config: cfg.GatewayConfig) -> None:
        self._info = info
        self._router = router
        self._registry = router.registry
        self._config = config
        self._tokenizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.metrics: GatewayMetrics = router.metrics
        self.metrics.gauges(self._gauges)

    def _gauges(self) -> dict:
        registry = self._registry
        instances = {}
        for role in INSTANCE_ROLES:
            up = set(registry.up(role))
            known = set(registry.instances[role])
            instances[(("role", role), ("state", "up"))] = len(up)
            instances[(("role", role), ("state", "down"))] = len(known - up)
        return {"pdserve_requests_running": ("Gateway: requests in progress", self._router.running),
                "pdserve_instances": ("Instances this gateway knows, by role and state", instances)}

    @property
    def max_prompt_chars(self) -> int:
        return self._config.max_prompt_chars or CHARS_PER_TOKEN_LIMIT * self._info.context_length

    async def _prompt_ids(self, request: gateway_pb2.GenerateRequest) -> list[int]:
        """The prompt's token ids. Text is measured before it is tokenized (a prompt far longer than any
        context is refused at once) and tokenized off the event loop, so no prompt stalls other streams."""
        kind = request.WhichOneof("input")
        tokenizer = self._info.tokenizer
        if kind is None:
            raise InvalidArgument("prompt: must not be empty (set prompt, chat or token_ids)")
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            if len(ids) > self._info.context_length:
                raise InvalidArgument(f"prompt: {len(ids)} tokens exceed the model's context length of "
                                      f"{self._info.context_length}")
            check_token_ids(ids, self._info.vocab_size)
            return ids
        if tokenizer is None:
            raise InvalidArgument(f"{kind}: model {self._info.name} has no tokenizer; send token_ids")
        limit = self.max_prompt_chars
        if kind == "prompt":
            if not request.prompt:
                raise InvalidArgument("prompt: must not be empty")
            if len(request.prompt) > limit:
                raise InvalidArgument(f"prompt: {len(request.prompt)} characters exceed the limit of {limit} "
                                      f"(max_prompt_chars)")
            encode = functools.partial(encode_prompt, tokenizer, request.prompt)
        else:
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not messages:
                raise InvalidArgument("chat.messages: must not be empty")
            for i, m in enumerate(messages):
                if m["role"] not in ROLES:
                    raise InvalidArgument(f"chat.messages[{i}].role: must be one of {', '.join(ROLES)}, "
                                          f"got {m['role'][:40]!r}")
            chars = sum(len(m["content"]) for m in messages)
            if chars > limit:
                raise InvalidArgument(f"chat.messages: {chars} characters of content exceed the limit of {limit} "
                                      f"(max_prompt_chars)")
            encode = functools.partial(encode_chat, tokenizer, messages)
        ids = await asyncio.get_running_loop().run_in_executor(self._tokenizing, encode)
        if not ids:
            raise InvalidArgument(f"{kind}: tokenizes to no tokens")
        return ids

    async def _to_request(self, request: gateway_pb2.GenerateRequest) -> GatewayRequest:
        info = self._info
        if request.model and request.model not in (info.name, info.spec):
            raise InvalidArgument(f"model: unknown model {request.model[:100]!r}; this gateway serves {info.name!r}")
        ids = await self._prompt_ids(request)
        context = info.context_length
        room = context - len(ids)
        if room < 1:
            raise InvalidArgument(f"prompt: {len(ids)} tokens leave no room in the model's context length of {context}")
        s = request.sampling
        if s.HasField("max_tokens"):
            max_tokens = s.max_tokens
            if max_tokens < 1:
                raise InvalidArgument(f"sampling.max_tokens: must be >= 1, got {max_tokens}")
            if max_tokens > room:
                raise InvalidArgument(
                    f"sampling.max_tokens: prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = "
                    f"{len(ids) + max_tokens} exceeds the model's context length of {context}")
        else:
            max_tokens = min(self._config.default_max_tokens, room)
        if len(s.stop) > self._config.max_stop_strings:
            raise InvalidArgument(f"sampling.stop: at most {self._config.max_stop_strings} strings, got {len(s.stop)}")
        for i, stop in enumerate(s.stop):
            if not 0 < len(stop) <= MAX_STOP_CHARS:
                raise InvalidArgument(f"sampling.stop[{i}]: must be 1 to {MAX_STOP_CHARS} characters, got {len(stop)}")
        check_id(request.request_id, "request_id", required=False)
        if s.stop and info.tokenizer is None:
            raise InvalidArgument(f"sampling.stop: model {info.name} has no tokenizer to match stop strings")
        sampling = sampling_from_proto(s, default_seed=secrets.randbits(63))
        resume = list(request.resume_token_ids)
        if resume:
            check_token_ids(resume, info.vocab_size, "resume_token_ids")
            if not s.HasField("seed") and sampling.temperature != 0:
                raise InvalidArgument("sampling.seed: resuming a sampled request needs the seed its first chunk "
                                      "reported")
        return GatewayRequest(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_ids=ids,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=tuple(s.stop),
            ignore_eos=s.ignore_eos,
            resume_token_ids=tuple(resume),
        )

    @rpc_errors
    async def Generate(self, request, context):
        req = await self._to_request(request)
        # The client's deadline, or the gateway's own limit when it set none, bounds every hop below.
        remaining = min(context.time_remaining() or math.inf, self._config.request_timeout_s)
        req = dataclasses.replace(req, deadline=time.monotonic() + remaining)
        bind_request(req.request_id)
        log.info("request_id=%s prompt_tokens=%d max_tokens=%d", req.request_id, len(req.prompt_ids), req.max_tokens)
        first = True
        async for chunk in self._router.generate(req):
            out = gateway_pb2.GenerateChunk(request_id=req.request_id, token_ids=chunk.token_ids,
                                            index=chunk.index, text=chunk.text)
            if first:  # what a client needs to resume this stream, should it break
                out.seed = req.sampling.seed
                first = False
            if chunk.finish_reason is not None:
                out.finish_reason = _FINISH[chunk.finish_reason]
                out.usage.prompt_tokens = len(req.prompt_ids)
                out.usage.completion_tokens = chunk.completion_tokens
                if chunk.timings is not None:
                    out.timings.CopyFrom(gateway_pb2.Timings(**vars(chunk.timings)))
                log.info("request_id=%s finished (%s) completion_tokens=%d", req.request_id,
                         chunk.finish_reason, chunk.completion_tokens)
            yield out

    @rpc_errors
    async def Heartbeat(self, request, context):
        if request.role not in INSTANCE_ROLES:
            raise InvalidArgument(f"role: must be one of {', '.join(INSTANCE_ROLES)}, got {request.role[:40]!r}")
        check_address(request.address, "address")
        if not 0 < request.interval_s <= 3600:
            raise InvalidArgument(f"interval_s: must be in (0, 3600], got {request.interval_s}")
        self._registry.heartbeat(request.role, request.address, request.interval_s, request.draining)
        return gateway_pb2.HeartbeatReply()

    @rpc_errors
    async def GetModelInfo(self, request, context):
        info = self._info
        return gateway_pb2.ModelInfo(name=info.name, context_length=info.context_length, vocab_size=info.vocab_size,
                                     has_tokenizer=info.tokenizer is not None,
                                     has_chat_template=info.has_chat_template,
                                     eos_token_ids=list(info.eos_token_ids))


async def start_gateway(config: cfg.GatewayConfig, info: ModelInfo | None = None) -> RunningService:
    """Loads the model's tokenizer and limits (unless given) and starts the server."""
    if info is None:
        info = await asyncio.to_thread(load_model_info, config.model)
    channels = ChannelPool()
    registry = Registry(config.prefill, config.decode, probe_interval_s=config.health_interval_s, channels=channels)
    scheduler = (RoundRobinScheduler(registry) if config.policy == "round_robin" else
                 LoadAwareScheduler(registry, config.local_prefill_tokens, config.prefill_full_tokens))
    router = Router(info, scheduler, channels, token_timeout_s=config.token_timeout_s)
    # Configured names (compose services) resolve to one instance per address; each is checked once now.
    await registry.probe_once()
    servicer = GatewayServicer(info, router, config)
    # Ready (health "") only while a request can be served: a decode instance is up, and a prefill one too
    # unless there are none; the Gateway service itself reports SERVING from the start (alive).
    server, port, health = await start_server(
        config.listen, SERVICE, lambda server: add_servicer(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, server),
        ready=registry.ready)
    log.info("gateway routes to prefill %s, decode %s (%s policy)", ",".join(config.prefill) or "(colocated: on decode)",
             ",".join(config.decode), config.policy)
    if not registry.ready:
        log.info("gateway not ready yet: waiting for %s", "a decode instance" if not registry.up("decode")
                 else "a prefill instance")
    ready = [registry.ready]

    async def update_readiness() -> None:
        if registry.ready != ready[0]:
            ready[0] = registry.ready
            log.info("gateway %s", "ready" if ready[0] else "not ready: no instance of a role is up")
            await set_ready(health, ready[0])

    registry.start(on_probe=update_readiness)
    closers = [channels.close]
    metrics_port = await expose_metrics(config, servicer.metrics, closers)
    # Draining stops the probes first, so nothing turns the gateway ready again while it stops.
    return RunningService("gateway", server, port, health, (SERVICE,), closers, router, drainers=[registry.stop],
                          metrics_port=metrics_port)


def main(argv: list[str] | None = None) -> None:
    service_main("gateway", cfg.GatewayConfig, start_gateway, argv)


def run(args: argparse.Namespace) -> None:
    run_service("gateway", cfg.GatewayConfig, start_gateway, args)
