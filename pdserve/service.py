"""What the three services share around their servicers: logging, tracing, metrics, threads, start and
graceful stop.

Graceful stop: health turns NOT_SERVING, the server stops accepting calls and
gives in-flight ones ``grace`` seconds, then the service's engines close.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc

from pdserve import config as cfg
from pdserve import metrics as prom
from pdserve import telemetry
from pdserve.errors import FailedPrecondition, PdserveError
from pdserve.logs import setup_logging
from pdserve.aio import shutdown_signals
from pdserve.rpc import ListenError, set_serving
from pdserve.tls import ClusterAuth

log = logging.getLogger(__name__)


def tune_malloc() -> None:
    """glibc malloc settings that keep big, short-lived buffers (KV messages) off mmap/munmap:
    fresh mmap'd pages fault in on every message, which halves gRPC throughput (DESIGN.md)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)   # glibc's largest allowed value
    mallopt(m_trim_threshold, 256 << 20)
    mallopt(m_top_pad, 64 << 20)


def freeze_startup_objects() -> None:
    """Moves what startup built (modules, the model, tokenizers: ~350k objects) out of the garbage collector's
    full passes. Each full pass scanned all of it with every thread stopped: 0.13 s idle, 0.2-0.33 s under
    load on a 2-core CPU, every ~10 s, and requests on any service's path stalled (refusals the overload
    benchmark expects within 100 ms took 331 ms). Objects created later are collected as before."""
    gc.collect()
    gc.freeze()


def set_torch_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


@dataclass
class RunningService:
    """A started server; ``stop`` shuts it down gracefully."""

    name: str
    server: grpc.aio.Server
    port: int
    health: object
    health_services: tuple[str, ...]
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    engine: Any = None  # the service's engine or router, for tests and stats
    drainers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # first thing on stop
    metrics_port: int = 0  # where /metrics is served (0: not served)
    http_port: int = 0  # the gateway's OpenAI-compatible HTTP API (0: not served)
    internal_port: int = 0  # the gateway's cluster-internal API

    async def stop(self, grace: float | None = 5.0) -> None:
        await set_serving(self.health, self.health_services, False)
        for drain in self.drainers:
            await drain()
        await self.server.stop(grace)
        for close in self.closers:
            await close()


async def serve_until_signal(service: RunningService, grace: float) -> None:
    """Serves until SIGINT/SIGTERM, then stops gracefully; further signals while it drains are ignored."""
    log.info("%s serving on port %d%s", service.name, service.port,
             f" (HTTP API on port {service.http_port})" if service.http_port else "")
    async with shutdown_signals() as stop:
        await stop.wait()
        log.info("%s draining (up to %.0f s for in-flight calls)", service.name, grace)
        await service.stop(grace)
    log.info("%s stopped", service.name)


def write_port_file(path: str, service: RunningService) -> None:
    """``{"port": ..., "metrics_port": ..., "http_port": ..., "internal_port": ...}`` to ``path``, atomically:
    how a launcher that let the service pick free ports (listen on port 0) learns them."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"port": service.port, "metrics_port": service.metrics_port, "http_port": service.http_port,
                   "internal_port": service.internal_port}, f)
    os.replace(tmp, path)


async def load_model_for(config: cfg.ModelConfig):
    """Sets torch threads and loads ``config.model`` off the event loop."""
    from pdserve.model import load_model

    set_torch_threads(config.threads)
    log.info("loading model %s on %s", config.model, config.device)
    return await asyncio.to_thread(load_model, config.model, config.device, config.dtype)


def cluster_auth(config: cfg.ServerConfig) -> ClusterAuth:
    """This member's TLS identity and cluster token, from its settings (``FailedPrecondition`` naming the
    setting whose file cannot be read)."""
    try:
        return ClusterAuth.from_config(config)
    except ValueError as exc:
        raise FailedPrecondition(str(exc)) from None


StartFn = Callable[[Any], Awaitable[RunningService]]
EXIT_ADDRESS_IN_USE = 98  # the exit status of a service that could not bind its address (errno EADDRINUSE)


async def expose_metrics(config: cfg.ServerConfig, metrics: prom.ServiceMetrics,
                         closers: list[Callable[[], Awaitable[None]]]) -> int:
    """Serves ``metrics`` on ``config.metrics_listen`` (if set) until the service stops; returns the port."""
    if not config.metrics_listen:
        return 0
    server = await prom.serve(metrics, config.metrics_listen)
    closers.append(server.close)
    return server.port


def run_service(name: str, config_cls: type, start: StartFn, args: argparse.Namespace) -> None:
    """Builds the config from env and ``args``, starts the service and serves until SIGINT/SIGTERM."""
    try:
        config = cfg.load(config_cls, args)
    except cfg.ConfigError as exc:
        sys.exit(f"error: configuration: {exc}")
    setup_logging(config.log_level, name, config.log_format)
    try:
        telemetry.setup_tracing(f"pdserve-{name}")
    except ValueError as exc:
        sys.exit(f"error: tracing configuration: {exc}")
    tune_malloc()

    async def serve() -> None:
        service = await start(config)
        freeze_startup_objects()
        if config.port_file:
            write_port_file(config.port_file, service)
        await serve_until_signal(service, config.shutdown_grace_s)

    try:
        asyncio.run(serve())
    except ListenError as exc:
        log.error("%s cannot start: %s", name, exc)
        sys.exit(EXIT_ADDRESS_IN_USE)
    except PdserveError as exc:  # e.g. a model that cannot be loaded
        log.error("%s cannot start: %s", name, exc)
        sys.exit(1)
    finally:
        telemetry.shutdown_tracing()  # the last requests' spans are exported before the process ends


def service_main(name: str, config_cls: type, start: StartFn, argv: list[str] | None = None) -> None:
    """``python -m services.<name>``: flags from the config dataclass, then ``run_service``."""
    parser = argparse.ArgumentParser(prog=f"pdserve {name}", description=f"Run a pdserve {name} server.")
    cfg.add_arguments(parser, config_cls)
    run_service(name, config_cls, start, parser.parse_args(argv))
