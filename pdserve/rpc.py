"""gRPC plumbing shared by the three services: servers, channels, health, errors, shutdown.

``PdserveError`` subclasses become status codes here (``rpc_errors``) and
status codes become ``PdserveError`` subclasses again (``error_from_rpc``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from pdserve import telemetry
from pdserve.errors import Internal, PdserveError, error_for_status
from pdserve.tls import NO_AUTH, ClusterAuth

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20
# Trailing metadata of a RESOURCE_EXHAUSTED status: milliseconds after which a retry may succeed.
RETRY_AFTER_KEY = "retry-after-ms"
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted peer is reachable again within a second: grpc's default reconnect backoff grows to 120 s,
    # and a channel waiting it out fails every call with UNAVAILABLE.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A connection whose peer vanished without a reset (a partition, a frozen host) is found dead within
    # ~15 s by HTTP/2 pings, even between calls; servers accept pings that often.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def status_code(err: PdserveError) -> grpc.StatusCode:
    return grpc.StatusCode[err.status]


def error_from_rpc(exc: grpc.RpcError, what: str = "") -> PdserveError:
    """The ``PdserveError`` for a failed call; ``what`` prefixes the message."""
    message = exc.details() or exc.code().name
    retry_after = None
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY and str(value).isdigit():
            retry_after = int(value)
    return error_for_status(exc.code().name, f"{what}: {message}" if what else message, retry_after)


def rpc_errors(method):
    """Turns ``PdserveError`` (and unexpected exceptions) raised by a servicer method into a status, counted
    in the servicer's ``metrics`` (if it has them) by method and code."""

    async def abort(servicer, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if not isinstance(exc, PdserveError):
            log.exception("%s failed", method.__qualname__)
            exc = Internal(f"{type(exc).__name__}: {exc}")
        metrics = getattr(servicer, "metrics", None)  # pdserve.metrics.ServiceMetrics
        if metrics is not None:
            metrics.rpc_failures.labels(method.__name__, exc.status).inc()
        retry_after = getattr(exc, "retry_after_ms", None)
        if retry_after is not None:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(int(retry_after))),))
        await context.abort(status_code(exc), str(exc))

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                await abort(self, context, exc)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            await abort(self, context, exc)

    return unary_wrapper


class _Malformed:
    """What a request that is not a valid protobuf message deserializes to."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the bytes are not that message
            return _Malformed(exc)
    return parse


async def _reject(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid protobuf message: {request.error}")


def _checked(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with a request that fails to parse answered INVALID_ARGUMENT (grpc's own is UNKNOWN)."""
    if handler.request_streaming:
        return handler  # streamed requests (PushKV) take raw bytes and parse them themselves
    if handler.response_streaming:
        behavior = handler.unary_stream

        async def unary_stream(request, context):
            if isinstance(request, _Malformed):
                await _reject(request, context)
            async for item in behavior(request, context):
                yield item

        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer), unary_stream=unary_stream)
    unary = handler.unary_unary

    async def unary_unary(request, context):
        if isinstance(request, _Malformed):
            await _reject(request, context)
        return await unary(request, context)

    return handler._replace(request_deserializer=_tolerant(handler.request_deserializer), unary_unary=unary_unary)


class _Capture:
    """Stands in for a server to catch the handlers a generated ``add_*Servicer_to_server`` registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict) -> None:
        self.name, self.handlers = name, handlers


def add_servicer(add_generated, servicer, server: grpc.aio.Server, raw: Iterable[str] = ()) -> None:
    """Registers ``servicer`` as the generated ``add_generated`` would, except that unparseable requests
    get INVALID_ARGUMENT and the methods named in ``raw`` receive each message's raw bytes."""
    generated = _Capture()
    add_generated(servicer, generated)
    handlers = {name: handler._replace(request_deserializer=None) if name in raw else _checked(handler)
                for name, handler in generated.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(generated.name, handlers),))
    server.add_registered_method_handlers(generated.name, handlers)


class ListenError(OSError):
    """A server could not bind its address (in use, or not an address of this host)."""


# NOTE: grpc sets SO_REUSEPORT on listening sockets by default, so a second process can bind a port that is
# already serving and the kernel then splits connections between the two: a gateway's calls to a prefill
# instance landed on a decode instance sharing its port ("Method not found!"). A port in use must fail to bind.
SERVER_OPTIONS = OPTIONS + [("grpc.so_reuseport", 0)]


def create_server(listen: str, interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
                  credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server bound to ``listen`` (port 0 picks one); returns it and the port. A port another
    process listens on is refused (``ListenError``), never shared. ``interceptors`` run after tracing's;
    ``credentials``: TLS (``pdserve.tls``), else plaintext."""
    server = grpc.aio.server(options=SERVER_OPTIONS,
                             interceptors=[*telemetry.server_interceptors(), *interceptors])
    try:
        port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    except RuntimeError:  # grpc's "Failed to bind" (in use, or no such address)
        port = 0
    if port == 0:
        raise ListenError(f"cannot listen on {listen}: address in use or not available")
    return server, port


async def start_server(listen: str, service: str, register, ready: bool = True,
                       interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
                       credentials: grpc.ServerCredentials | None = None,
                       ) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Creates a server on ``listen``, lets ``register(server)`` add the servicer, adds health,
    starts it and marks ``service`` SERVING (the process is alive and serves that API) and the overall
    status ``""`` SERVING if ``ready`` (it can serve requests now; ``set_ready`` changes it). Returns
    (server, port, health)."""
    server, port = create_server(listen, interceptors, credentials)
    register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await set_serving(health, [service], True)
    await set_ready(health, ready)
    await server.start()
    return server, port, health


async def set_ready(health: health_aio.HealthServicer, ready: bool) -> None:
    """The overall health status ``""``: whether the server can serve requests now (readiness)."""
    await health.set("", health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING)


async def set_serving(health: health_aio.HealthServicer, services: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *services):
        await health.set(name, status)


async def health_status(address: str, service: str = "", timeout: float = 1.0,
                        channel: grpc.aio.Channel | None = None, auth: ClusterAuth = NO_AUTH) -> str:
    """"serving", "not serving" (the server answered so, e.g. draining), "wrong service" (the server there
    does not serve ``service``: another role, or another program, on that port), "no answer" (refused:
    stopped or stopping) or "silent" (nothing within ``timeout``: partitioned, frozen or overloaded).
    ``channel``: ask through it (a pooled channel, so that "serving" also means the connection calls use
    is up) instead of a fresh one (made with ``auth``)."""
    if channel is None:
        async with auth.channel(address) as fresh:
            return await health_status(address, service, timeout, fresh)
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "silent"
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
            return "wrong service"
        return "no answer"  # refused, or (TLS) a handshake that failed
    return "serving" if reply.status == health_pb2.HealthCheckResponse.SERVING else "not serving"


async def check_health(address: str, service: str = "", timeout: float = 1.0, auth: ClusterAuth = NO_AUTH) -> bool:
    """True when the server at ``address`` reports SERVING."""
    return await health_status(address, service, timeout, auth=auth) == "serving"


def concrete_host(listen: str, wildcard: str) -> str:
    """The host of a ``host:port`` listen address, or ``wildcard`` when it listens on every interface."""
    host = listen.rpartition(":")[0]
    return wildcard if host in ("0.0.0.0", "[::]", "::", "") else host


class ChannelPool:
    """Channels per peer address, reused across requests, made with ``auth`` (this member's TLS identity
    and cluster token). ``lane`` > 0 gives further channels to the same address on their own TCP
    connections (parallel KV streams)."""

    def __init__(self, auth: ClusterAuth = NO_AUTH) -> None:
        self.auth = auth
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        self._sync: dict[tuple[str, int], grpc.Channel] = {}  # synchronous channels (KV pushes, from threads)
        self._closing: set[asyncio.Task] = set()  # channels being closed after a reset

    @staticmethod
    def _options(lane: int) -> list:
        return OPTIONS if lane == 0 else OPTIONS + [("grpc.use_local_subchannel_pool", 1), ("pdserve.lane", lane)]

    def get(self, address: str, lane: int = 0) -> grpc.aio.Channel:
        channel = self._channels.get((address, lane))
        if channel is None:
            channel = self._channels[(address, lane)] = self.auth.channel(address, self._options(lane))
        return channel

    def get_sync(self, address: str, lane: int = 0) -> grpc.Channel:
        """A synchronous channel to ``address`` (its own connection per lane), for calls made from threads."""
        channel = self._sync.get((address, lane))
        if channel is None:
            channel = self._sync[(address, lane)] = self.auth.sync_channel(address, self._options(lane))
        return channel

    def reset(self, address: str, grace_s: float | None = None) -> None:
        """Drops the channels to ``address``: the next ``get`` connects afresh. Without ``grace_s`` their calls
        fail now (a peer cut off without a reset connection, a partition, may leave the old one wedged);
        with it (an instance that left) calls still running get ``grace_s`` to finish first."""
        loop = asyncio.get_running_loop()
        for key in [k for k in self._channels if k[0] == address]:
            task = loop.create_task(self._channels.pop(key).close(grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        for key in [k for k in self._sync if k[0] == address]:
            channel = self._sync.pop(key)
            if grace_s:
                loop.call_later(grace_s, channel.close)
            else:
                channel.close()

    def __contains__(self, address: str) -> bool:
        return any(k[0] == address for k in (*self._channels, *self._sync))

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        sync, self._sync = self._sync, {}
        for channel in sync.values():
            channel.close()
        await asyncio.gather(*(c.close() for c in channels.values()), *self._closing)
