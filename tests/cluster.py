"""In-process clusters for integration tests: all three services in the test's event loop, on port 0."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve import config as cfg
from pdserve.model import LoadedModel
from pdserve.model.reference import reference_greedy  # noqa: F401 - the tests' reference
from pdserve.service import RunningService
from services.decode.server import start_decode
from services.gateway.server import start_gateway
from services.prefill.server import start_prefill


@dataclass
class InProcessCluster:
    loaded: LoadedModel
    gateway: RunningService
    prefill: RunningService | None  # None: colocated
    decode: RunningService

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (what ``openai.OpenAI(base_url=...)`` takes)."""
        return f"http://127.0.0.1:{self.gateway.http_port}/v1"

    @property
    def decode_address(self) -> str:
        return f"127.0.0.1:{self.decode.port}"

    async def stop(self) -> None:
        for service in (self.gateway, self.prefill, self.decode):
            if service is not None:
                await service.stop(grace=1.0)


def member_tls(folder, role: str) -> dict:
    """The settings of a member presenting ``role``'s certificate from ``pdserve.tls.make_certificates``."""
    return {"tls_cert": f"{folder}/{role}.pem", "tls_key": f"{folder}/{role}-key.pem", "tls_ca": f"{folder}/ca.pem"}


async def start_cluster(loaded: LoadedModel, decode_options: dict | None = None,
                        prefill_options: dict | None = None, colocated: bool = False,
                        gateway_options: dict | None = None, tls_dir=None) -> InProcessCluster:
    """One gateway, one prefill (none if ``colocated``) and one decode server sharing ``loaded``'s weights;
    with ``tls_dir`` (certificates from ``make_certificates``) they talk mutual TLS."""
    if tls_dir is not None:
        decode_options = {**member_tls(tls_dir, "decode"), **(decode_options or {})}
        prefill_options = {**member_tls(tls_dir, "prefill"), **(prefill_options or {})}
        gateway_options = {**member_tls(tls_dir, "gateway"), **(gateway_options or {})}
    decode = await start_decode(
        cfg.DecodeConfig(listen="127.0.0.1:0", model=loaded.info.spec, **(decode_options or {})), loaded)
    prefill = None
    if not colocated:
        prefill = await start_prefill(
            cfg.PrefillConfig(listen="127.0.0.1:0", model=loaded.info.spec, **(prefill_options or {})), loaded)
    gateway = await start_gateway(cfg.GatewayConfig(
        listen="127.0.0.1:0", internal_listen="127.0.0.1:0", model=loaded.info.spec,
        prefill=(f"127.0.0.1:{prefill.port}",) if prefill else (), decode=(f"127.0.0.1:{decode.port}",),
        **{"http_listen": "127.0.0.1:0", **(gateway_options or {})}), loaded.info)
    return InProcessCluster(loaded, gateway, prefill, decode)
