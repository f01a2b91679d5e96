"""Gateway servicer: validates and tokenizes at the edge, then hands a plain request to the router."""

from __future__ import annotations

import argparse
import asyncio
import logging

from pdserve import config as cfg
from pdserve.convert import check_address
from pdserve.auth import ApiKeyInterceptor, ApiKeys
from pdserve.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from pdserve.metrics import GatewayMetrics
from pdserve.model import ModelInfo, load_model_info
from pdserve.rpc import ChannelPool, add_servicer, rpc_errors, set_ready, start_server
from pdserve.service import RunningService, cluster_auth, expose_metrics, run_service, service_main
from pdserve.tls import ClusterAuth, TlsFiles
from pdserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.router import Router
from services.gateway.scheduler import (INSTANCE_ROLES, CacheAwareScheduler, LoadAwareScheduler, Registry,
                                       RoundRobinScheduler)
from services.gateway.requests import GRPC_NAMES, Frontend, RequestSpec

log = logging.getLogger(__name__)

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
INTERNAL_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayInternal"].full_name
_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


def spec_from_proto(request: gateway_pb2.GenerateRequest) -> RequestSpec:
    """The gRPC message's fields, unchecked (``RequestBuilder`` checks them for both front doors)."""
    kind = request.WhichOneof("input")
    s = request.sampling
    return RequestSpec(
        model=request.model,
        prompt=request.prompt if kind == "prompt" else None,
        messages=[{"role": m.role, "content": m.content} for m in request.chat.messages] if kind == "chat" else None,
        token_ids=list(request.token_ids.ids) if kind == "token_ids" else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
        request_id=request.request_id,
        resume_token_ids=tuple(request.resume_token_ids),
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, info: ModelInfo, router: Router, config: cfg.GatewayConfig) -> None:
        self._info = info
        self._router = router
        self._registry = router.registry
        self._config = config
        self.frontend = Frontend(info, router, config)
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

    @rpc_errors
    async def Generate(self, request, context):
        req = await self.frontend.start(spec_from_proto(request), GRPC_NAMES, context.time_remaining())
        first = True
        async for chunk in self.frontend.stream(req):
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
            yield out

    @rpc_errors
    async def GetModelInfo(self, request, context):
        info = self._info
        return gateway_pb2.ModelInfo(name=info.name, context_length=info.context_length, vocab_size=info.vocab_size,
                                     has_tokenizer=info.tokenizer is not None,
                                     has_chat_template=info.has_chat_template,
                                     eos_token_ids=list(info.eos_token_ids))


class InternalServicer(gateway_pb2_grpc.GatewayInternalServicer):
    """The cluster-internal API: instances joining and leaving by heartbeats. Its listener admits only
    members (mutual TLS or the cluster token); with neither, heartbeats are refused unless
    ``open_registration`` says anyone may join (local development)."""

    def __init__(self, registry: Registry, open_to_anyone: bool) -> None:
        self._registry = registry
        self._closed = not open_to_anyone

    @rpc_errors
    async def Heartbeat(self, request, context):
        if self._closed:
            raise Unauthenticated("registration is closed: this gateway admits instances over mutual TLS or with "
                                  "the cluster token (open_registration admits anyone, for local development)")
        if request.role not in INSTANCE_ROLES:
            raise InvalidArgument(f"role: must be one of {', '.join(INSTANCE_ROLES)}, got {request.role[:40]!r}")
        check_address(request.address, "address")
        if not 0 < request.interval_s <= 3600:
            raise InvalidArgument(f"interval_s: must be in (0, 3600], got {request.interval_s}")
        self._registry.heartbeat(request.role, request.address, request.interval_s, request.draining)
        return gateway_pb2.HeartbeatReply()


def _security(config: cfg.GatewayConfig) -> tuple[ClusterAuth, TlsFiles, ApiKeys]:
    """The member identity, the public APIs' TLS and the API keys, from their files; ``FailedPrecondition``
    naming the setting when a file cannot be read."""
    auth = cluster_auth(config)
    try:
        public = TlsFiles.load(config.public_tls_cert, config.public_tls_key, config.public_tls_ca)
    except ValueError as exc:
        raise FailedPrecondition(str(exc).replace("tls_", "public_tls_")) from None
    try:
        keys = ApiKeys(config.api_keys, config.api_keys_file)
    except OSError as exc:
        raise FailedPrecondition(f"api_keys_file: cannot read {config.api_keys_file!r} ({exc.strerror})") from None
    return auth, public, keys


async def start_gateway(config: cfg.GatewayConfig, info: ModelInfo | None = None) -> RunningService:
    """Loads the model's tokenizer and limits (unless given) and starts the servers: the client-facing
    gRPC API (``listen``), the OpenAI-compatible HTTP API (``http_listen``) and the internal API
    (``internal_listen``)."""
    auth, public, keys = _security(config)
    if info is None:
        info = await asyncio.to_thread(load_model_info, config.model)
    channels = ChannelPool(auth)
    registry = Registry(config.prefill, config.decode, probe_interval_s=config.health_interval_s, channels=channels)
    policies = {"round_robin": lambda: RoundRobinScheduler(registry),
                "load_aware": lambda: LoadAwareScheduler(registry, config.local_prefill_tokens,
                                                         config.prefill_full_tokens),
                "cache_aware": lambda: CacheAwareScheduler(registry, config.local_prefill_tokens,
                                                           config.prefill_full_tokens,
                                                           local_uncached_tokens=config.local_uncached_tokens)}
    scheduler = policies[config.policy]()
    router = Router(info, scheduler, channels, token_timeout_s=config.token_timeout_s)
    # Configured names (compose services) resolve to one instance per address; each is checked once now.
    await registry.probe_once()
    servicer = GatewayServicer(info, router, config)
    client_methods = frozenset(f"/{SERVICE}/{m}" for m in ("Generate", "GetModelInfo"))
    closers = [channels.close]  # what stopping closes after the client-facing server (the metrics' server too)
    started: list = []  # what a failed start stops again
    try:
        # Ready (health "") only while a request can be served: a decode instance is up, and a prefill one too
        # unless there are none; the Gateway service itself reports SERVING from the start (alive).
        server, port, health = await start_server(
            config.listen, SERVICE,
            lambda server: add_servicer(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, server),
            ready=registry.ready, interceptors=[ApiKeyInterceptor(keys, client_methods)],
            credentials=public.server_credentials(require_client_certs=True) if public.enabled else None)
        started.append(lambda: server.stop(None))
        internal_servicer = InternalServicer(registry, open_to_anyone=config.open_registration or auth.authenticated)
        internal, internal_port, _ = await start_server(
            config.internal_listen, INTERNAL_SERVICE,
            lambda server: add_servicer(gateway_pb2_grpc.add_GatewayInternalServicer_to_server, internal_servicer,
                                        server),
            interceptors=auth.server_interceptors(), credentials=auth.server_credentials())
        # It closes after the client-facing one: instances' draining heartbeats still arrive meanwhile.
        closers.insert(0, lambda: internal.stop(1.0))
        started.append(lambda: internal.stop(None))
        metrics_port = await expose_metrics(config, servicer.metrics, closers)
        drainers = [registry.stop]
        http_port = 0
        if config.http_listen:
            from pdserve.http import start_http
            from services.gateway.openai_api import OpenAIApi

            api = OpenAIApi(servicer.frontend, keys, lambda: registry.ready,
                            max_body_bytes=8 * servicer.frontend.requests.max_prompt_chars + (1 << 20))
            ssl = None
            if public.enabled:
                ssl = {"certfile": config.public_tls_cert, "keyfile": config.public_tls_key}
                if config.public_tls_ca:
                    ssl.update(ca_certs=config.public_tls_ca, cert_reqs=2)  # ssl.CERT_REQUIRED
            http = await start_http(api.app(), config.http_listen, ssl=ssl)
            http_port = http.port
            drainers.append(http.close)  # in-flight HTTP requests finish before the gRPC server stops
    except BaseException:
        for stop in [*started, *closers]:
            await stop()
        raise
    log.info("gateway routes to prefill %s, decode %s (%s policy)", ",".join(config.prefill) or "(colocated: on decode)",
             ",".join(config.decode), config.policy)
    log.info("gateway security: API keys %s; public APIs %s; members %s; registration %s",
             f"required ({keys.count})" if keys.required else "off",
             ("TLS with client certificates" if config.public_tls_ca else "TLS") if public.enabled else "plaintext",
             ("mutual TLS" + (" + cluster token" if auth.token else "")) if auth.mutual_tls else
             ("cluster token" if auth.token else "unauthenticated"),
             "members only" if auth.authenticated else ("OPEN to anyone" if config.open_registration else "closed"))
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
    # Draining stops the probes first, so nothing turns the gateway ready again while it stops.
    return RunningService("gateway", server, port, health, (SERVICE,), closers, router, drainers=drainers,
                          metrics_port=metrics_port, http_port=http_port, internal_port=internal_port)


def main(argv: list[str] | None = None) -> None:
    service_main("gateway", cfg.GatewayConfig, start_gateway, argv)


def run(args: argparse.Namespace) -> None:
    run_service("gateway", cfg.GatewayConfig, start_gateway, args)
