"""HTTP on a service's own event loop, beside its gRPC server: uvicorn serving an ASGI app.

Every service's Prometheus endpoint uses it, and the gateway's OpenAI-compatible API. Hardened for an open
network: a request whose head has not arrived within ``HEAD_TIMEOUT_S`` is dropped (half-sent requests
cannot pile up), at most ``max_connections`` are served at once (503 beyond), idle keep-alive connections
close after ``KEEP_ALIVE_S``, and no thread is spent per connection. uvicorn's own signal handling is not
used: the service's shutdown owns the signals (``pdserve.aio.shutdown_signals``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pdserve.rpc import ListenError

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5


class _HeadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request head has not arrived in time."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(HEAD_TIMEOUT_S, self._head_late)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self._head_timer is not None:  # a request's head was parsed
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.cycle is None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


@dataclass
class HttpServer:
    server: uvicorn.Server
    port: int
    _main: asyncio.Task

    async def close(self) -> None:
        """Stops accepting, lets requests in progress finish (uvicorn's graceful shutdown), then returns."""
        self.server.should_exit = True
        await self._main
        await self.server.shutdown()


def _bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: a port in use must fail
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {listen}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def start_http(app, listen: str, *, max_connections: int = 256, ssl: dict | None = None) -> HttpServer:
    """Serves ``app`` (ASGI) on ``listen`` (host:port; port 0 picks one) on this event loop. ``ssl``:
    uvicorn's ``ssl_*`` settings (certfile, keyfile, ca_certs, cert_reqs)."""
    sock = _bind(listen)
    config = uvicorn.Config(app, http=_HeadDeadline, lifespan="off", log_config=None, access_log=False,
                            timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=max_connections,
                            timeout_graceful_shutdown=5, **{f"ssl_{k}": v for k, v in (ssl or {}).items()})
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    main = asyncio.get_running_loop().create_task(server.main_loop(), name=f"http-{listen}")
    return HttpServer(server, sock.getsockname()[1], main)
