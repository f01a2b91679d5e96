"""Prometheus metrics: one registry per service, served on HTTP ``/metrics`` (``metrics_listen``).

Names follow Prometheus conventions (``pdserve_`` prefix, base units, ``_total``
counters, ``_seconds``/``_bytes`` suffixes). Latencies a request produces are
histograms observed where they happen; state an engine already keeps (queue
depths, batch size, KV pool use) is read only when Prometheus scrapes
(``Gauges``), so the hot paths pay nothing for it.
"""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

# Latency buckets (seconds): sub-millisecond GPU steps up to minute-long CPU requests.
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
           60.0, 120.0)
BYTES = tuple(float(2 ** k) for k in range(16, 34, 2))  # 64 KiB .. 8 GiB


class Gauges:
    """Gauges read from a callable at scrape time: ``{name: (help, value or {labels: value})}``."""

    def __init__(self, read: Callable[[], dict]) -> None:
        self._read = read

    def collect(self):
        for name, (help_text, value) in self._read().items():
            if isinstance(value, dict):
                labels = sorted({k for key in value for k, _ in key})
                family = GaugeMetricFamily(name, help_text, labels=labels)
                for key, v in value.items():
                    family.add_metric([dict(key)[k] for k in labels], v)
            else:
                family = GaugeMetricFamily(name, help_text, value=value)
            yield family


class ServiceMetrics:
    """What every service counts: failed RPCs by method and status code."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_failures = Counter("pdserve_rpc_failures", "RPCs this service answered with an error status",
                                    ["method", "code"], registry=self.registry)

    def gauges(self, read: Callable[[], dict]) -> None:
        self.registry.register(Gauges(read))


class GatewayMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "Gateway: request received to first token",
                              buckets=LATENCY, registry=r)
        self.tpot = Histogram("pdserve_time_per_output_token_seconds",
                              "Gateway: mean time per output token after the first, per request",
                              buckets=LATENCY, registry=r)
        self.itl = Histogram("pdserve_inter_token_latency_seconds", "Gateway: time between consecutive tokens",
                             buckets=LATENCY, registry=r)
        self.e2e = Histogram("pdserve_request_duration_seconds", "Gateway: request received to last token",
                             buckets=LATENCY, registry=r)
        self.requests = Counter("pdserve_requests", "Requests finished, by finish reason (stop, length) or "
                                "status code", ["outcome"], registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of requests received", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Tokens streamed to clients", registry=r)
        self.retries = Counter("pdserve_retries", "Attempts started again after a failure, by the error's status",
                               ["code"], registry=r)
        self.migrations = Counter("pdserve_migrations", "Requests moved to another decode instance mid-generation",
                                  registry=r)
        self.repushes = Counter("pdserve_kv_repushes", "Transfers re-pushed from KV prefill kept", registry=r)
        self.prefix_hit_tokens = Counter("pdserve_prefix_hit_tokens", "Prompt tokens whose KV an instance's "
                                         "prefix cache held (prefill: not computed; decode: not transferred)",
                                         ["role"], registry=r)


class PrefillMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.queue = Histogram("pdserve_prefill_queue_seconds", "Prefill: prompt queued before its first forward pass",
                               buckets=LATENCY, registry=r)
        self.forward = Histogram("pdserve_prefill_forward_seconds", "Prefill: forward pass of a prompt",
                                 buckets=LATENCY, registry=r)
        self.prompt_tokens = Counter("pdserve_prefill_tokens", "Prompt tokens prefilled", registry=r)
        self.transfer_seconds = Histogram("pdserve_kv_transfer_seconds",
                                          "KV transfer: first chunk sent to decode's acknowledgement",
                                          buckets=LATENCY, registry=r)
        self.transfer_size = Histogram("pdserve_kv_transfer_size_bytes", "KV bytes per transfer", buckets=BYTES,
                                       registry=r)
        self.transfer_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes pushed to decode instances",
                                      ["transport"], registry=r)
        self.transfers = Counter("pdserve_kv_transfers", "KV transfers by result (done, kept, failed)", ["result"],
                                 registry=r)


class DecodeMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.admission = Histogram("pdserve_decode_admission_seconds",
                                   "Decode: request arrived to KV blocks reserved (queue wait)", buckets=LATENCY,
                                   registry=r)
        self.kv_received = Counter("pdserve_kv_received_bytes", "KV bytes received from prefill instances",
                                   registry=r)


def metrics_app(metrics: ServiceMetrics):
    """An ASGI app answering ``GET /metrics`` with the registry in Prometheus text (404 elsewhere)."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def endpoint(request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", endpoint, methods=["GET"])])


async def serve(metrics: ServiceMetrics, listen: str):
    """Serves ``/metrics`` on ``listen`` (host:port; port 0 picks one) on this event loop; returns the
    ``pdserve.http.HttpServer``."""
    from pdserve.http import start_http

    server = await start_http(metrics_app(metrics), listen, max_connections=64)
    log.info("metrics on http://%s/metrics", f"{listen.rpartition(':')[0]}:{server.port}")
    return server
