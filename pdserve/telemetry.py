"""Distributed tracing: OpenTelemetry, configured by the standard ``OTEL_*`` variables.

Tracing is on when an exporter is configured (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp|console``)
and ``OTEL_SDK_DISABLED`` is not true. Off, nothing is installed: no gRPC
interceptor, and every span below is the API's non-recording one.

Context crosses processes as W3C ``traceparent`` in gRPC metadata: servers
take it in ``ServerSpans``, an aio interceptor that opens the RPC's span
(health checks and the periodic probes left out), and callers put the span a
call belongs to into the call's metadata (``outgoing``). The OpenTelemetry
gRPC instrumentation's aio server interceptor does the same but keeps the
span's context attached across the yields of a streaming handler, so a stream
closed from another context (every decode stream the gateway cancels) logs a
"Failed to detach context" traceback (open-telemetry/opentelemetry-python-
contrib#2357); here the context is attached once in the RPC's own task and
never detached, since that task ends with the RPC. Spans that
describe work timed elsewhere (a forward pass, a KV transfer with its
per-layer timestamps) are recorded after the fact from monotonic timestamps
(``at``), so the hot paths never touch the tracer.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Iterable, Sequence

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

TRACER_NAME = "pdserve"
# RPCs that run on a timer, not for a request: a trace each would bury the requests' traces.
UNTRACED_METHODS = ("Check", "Watch", "GetStats", "Heartbeat")

tracer = trace.get_tracer(TRACER_NAME)


def enabled() -> bool:
    """True once a recording tracer provider is installed in this process (``setup_tracing`` does)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def wanted(env: dict | None = None) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces to be exported."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter(env: dict):
    kind = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: pdserve supports otlp, console or none, got {kind!r}")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: grpc or http/protobuf, got {protocol!r}")
    return OTLPSpanExporter()  # endpoint, headers, certificates, timeout: from the OTEL_EXPORTER_OTLP_* variables


class _ServiceNameOnSpans(SpanProcessor):
    """Copies ``service.name`` onto every span: some viewers (Phoenix) show span attributes, not the resource."""

    def __init__(self, service: str) -> None:
        self._service = service

    def on_start(self, span, parent_context=None) -> None:
        span.set_attribute("service.name", self._service)


def setup_tracing(service: str, env: dict | None = None):
    """Installs a tracer provider exporting to the configured backend, if the environment asks for one.
    ``service`` names this process unless ``OTEL_SERVICE_NAME`` does. Returns the provider (None: off)."""
    env = os.environ if env is None else env
    if not wanted(env):
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service})
    name = str(resource.attributes.get(SERVICE_NAME, service))
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG
    provider.add_span_processor(_ServiceNameOnSpans(name))
    provider.add_span_processor(BatchSpanProcessor(_exporter(env)))
    trace.set_tracer_provider(provider)
    log.info("tracing on: service.name=%s, exporter %s, sampler %s", name,
             env.get("OTEL_TRACES_EXPORTER", "otlp") or "otlp", provider.sampler.get_description())
    return provider


def shutdown_tracing() -> None:
    """Flushes and stops the exporter (at service stop): spans of the last requests are not lost."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


class ServerSpans(grpc.aio.ServerInterceptor):
    """A SERVER span per RPC (but ``UNTRACED_METHODS``), child of the caller's ``traceparent``, current while
    the handler runs, ended with the RPC's status code."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None or method.rpartition("/")[2] in UNTRACED_METHODS:
            return handler
        service, _, name = method.lstrip("/").rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

        def begin(context) -> Span:
            parent = propagate.extract({k: v for k, v in context.invocation_metadata() or ()})
            span = tracer.start_span(method, context=parent, kind=SpanKind.SERVER, attributes=attributes)
            otel_context.attach(trace.set_span_in_context(span, parent))  # this RPC's task only: never detached
            return span

        def end(span: Span, context, error: BaseException | None) -> None:
            code = context.code()
            if code is None and error is not None and not isinstance(error, (GeneratorExit, grpc.aio.AbortError)):
                code = grpc.StatusCode.UNKNOWN
            code = code or grpc.StatusCode.OK
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {context.details() or error or ''}"))
            span.end()

        def unary(behavior):
            async def call(request, context):
                span, error = begin(context), None
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    end(span, context, error)
            return call

        def streaming(behavior):
            async def call(request, context):
                span, error = begin(context), None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    end(span, context, error)
            return call

        if handler.unary_unary:
            return handler._replace(unary_unary=unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=unary(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=streaming(handler.unary_stream))
        return handler._replace(stream_stream=streaming(handler.stream_stream))


def server_interceptors() -> list:
    """The gRPC aio server interceptors for tracing (none when it is off)."""
    return [ServerSpans()] if enabled() else []


def outgoing(span: Span | None = None) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying ``span``'s context (default: the current span) to the callee; None when
    there is nothing to carry."""
    if not enabled():
        return None
    carrier: dict[str, str] = {}
    context = trace.set_span_in_context(span) if span is not None else None
    propagate.inject(carrier, context=context)
    return tuple(carrier.items()) or None


def start(name: str, parent: Span | None = None, kind: SpanKind = SpanKind.INTERNAL,
          attributes: dict | None = None, start_ns: int | None = None) -> Span:
    """A span under ``parent`` (default: the current span), ended by the caller. Not made current: spans
    that live across the yields of an async generator must not change the context."""
    context = trace.set_span_in_context(parent) if parent is not None else None
    return tracer.start_span(name, context=context, kind=kind, attributes=attributes, start_time=start_ns)


def wall_ns(monotonic_ns: int) -> int:
    """A ``time.monotonic_ns()`` timestamp on the wall clock spans use."""
    return monotonic_ns + time.time_ns() - time.monotonic_ns()


def at(name: str, start_mono_ns: int, end_mono_ns: int, parent: Span | None = None,
       attributes: dict | None = None, events: Iterable[tuple[str, int, dict]] = ()) -> None:
    """Records a finished span from monotonic timestamps; ``events`` are (name, monotonic ns, attributes)."""
    if not start_mono_ns or not enabled():
        return
    span = start(name, parent, attributes=attributes, start_ns=wall_ns(start_mono_ns))
    for event, when, attrs in events:
        if when:
            span.add_event(event, attrs, timestamp=wall_ns(when))
    span.end(end_time=wall_ns(max(end_mono_ns, start_mono_ns)))


def fail(span: Span, error: BaseException) -> None:
    """Marks ``span`` failed with ``error`` (its status code, if it is a PdserveError)."""
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, f"{getattr(error, 'status', type(error).__name__)}: {error}"))


def current_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span as hex, or ("", "")."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def layer_events(ready_ns: Sequence[int], sent_ns: Sequence[int], received_ns: Sequence[int],
                 written_ns: Sequence[int]) -> list[tuple[str, int, dict]]:
    """One event per layer of a KV transfer, at the moment decode wrote it into its pool, with the
    layer's ready/sent/received/written offsets from the layer being ready (ms)."""
    events = []
    for layer, written in enumerate(written_ns):
        ready = ready_ns[layer] if layer < len(ready_ns) else 0
        attrs = {"layer": layer}
        for key, when in (("sent_ms", sent_ns), ("received_ms", received_ns), ("written_ms", written_ns)):
            if ready and layer < len(when) and when[layer]:
                attrs[key] = round((when[layer] - ready) / 1e6, 3)
        events.append(("kv.layer", written or ready, attrs))
    return events
