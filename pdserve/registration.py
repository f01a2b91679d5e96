"""A prefill or decode instance announcing itself to gateways (``GatewayInternal.Heartbeat``, on each
gateway's internal listener, with this member's TLS identity and cluster token).

While it runs, the instance sends each gateway in ``register_with`` a
heartbeat every ``heartbeat_interval_s``; a gateway keeps it in its pool while
heartbeats come (three missed: out) and takes it out at once when the last
one says ``draining``, which ``drain`` sends when the instance begins to stop.
A gateway that is down is retried at the next beat; its first failure and its
recovery are logged once each.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc

from pdserve import config as cfg
from pdserve.aio import cancel_and_wait
from pdserve.rpc import ChannelPool, concrete_host
from pdserve.tls import NO_AUTH, ClusterAuth
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)


def advertised_address(config: cfg.RegistrationConfig, listen: str, port: int) -> str:
    """Where gateways reach this instance: ``advertise``, else the listen host and the bound port."""
    if config.advertise:
        return config.advertise
    return f"{concrete_host(listen, socket.gethostname())}:{port}"


class Announcer:
    def __init__(self, role: str, address: str, gateways: tuple[str, ...], interval_s: float,
                 auth: ClusterAuth = NO_AUTH) -> None:
        self.role = role
        self.address = address
        self.gateways = gateways
        self.interval_s = interval_s
        self._channels = ChannelPool(auth)
        self._failing: set[str] = set()
        self._task: asyncio.Task | None = None

    async def _beat(self, gateway: str, draining: bool = False) -> None:
        request = gateway_pb2.HeartbeatRequest(role=self.role, address=self.address, draining=draining,
                                               interval_s=self.interval_s)
        try:
            await gateway_pb2_grpc.GatewayInternalStub(self._channels.get(gateway)).Heartbeat(
                request, timeout=min(self.interval_s, 5.0))
        except grpc.aio.AioRpcError as exc:
            if gateway not in self._failing:
                log.warning("heartbeat to gateway %s failed (%s: %s); retrying every %.1f s", gateway,
                            exc.code().name, exc.details(), self.interval_s)
                self._failing.add(gateway)
            return
        if gateway in self._failing:
            log.info("heartbeat to gateway %s is answered again", gateway)
            self._failing.discard(gateway)

    def start(self) -> None:
        async def loop() -> None:
            log.info("announcing %s %s to %s every %.1f s", self.role, self.address, ",".join(self.gateways),
                     self.interval_s)
            while True:
                await asyncio.gather(*(self._beat(g) for g in self.gateways))
                await asyncio.sleep(self.interval_s)

        self._task = asyncio.get_running_loop().create_task(loop(), name="heartbeats")

    async def drain(self) -> None:
        """Stops the heartbeats and tells every gateway this instance takes no new work."""
        await cancel_and_wait(self._task)
        self._task = None
        await asyncio.gather(*(self._beat(g, draining=True) for g in self.gateways))

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        await self._channels.close()


def start_announcer(config: cfg.RegistrationConfig, role: str, listen: str, port: int,
                    auth: ClusterAuth = NO_AUTH) -> Announcer | None:
    if not config.register_with:
        return None
    announcer = Announcer(role, advertised_address(config, listen, port), config.register_with,
                          config.heartbeat_interval_s, auth)
    announcer.start()
    return announcer
