"""Prefill servicer: protobuf at the edge, the ``PrefillEngine`` and a KV sender behind it."""

from __future__ import annotations

import argparse
import logging
from typing import Awaitable, TypeVar

import grpc

from pdserve import config as cfg
from pdserve.convert import check_id, check_token_ids, sampling_from_proto
from pdserve.engine.prefill import PrefillEngine
from pdserve.errors import Cancelled, DataLoss, InvalidArgument, PdserveError
from pdserve.aio import ByteBudget
from pdserve.kv.grpc_sender import GrpcKVSender, ShmKVSender
from pdserve.kv.shm import SegmentPool, host_id, sweep_orphans
from pdserve.kv.transport import KVSender
from pdserve.model import LoadedModel
from pdserve.registration import start_announcer
from pdserve.rpc import ChannelPool, add_servicer, rpc_errors, start_server
from pdserve.service import RunningService, load_model_for, run_service, service_main
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name
PUSH_TIMEOUT_S = 300.0


async def transfer_step(step: Awaitable[T]) -> T:
    """A push that decode broke or refused fails this transfer, not this instance: it is reported as
    DATA_LOSS (the gateway transfers again, elsewhere if need be), never as the peer's UNAVAILABLE, which
    would make the gateway take this prefill instance for the one that is down."""
    try:
        return await step
    except (Cancelled, DataLoss):
        raise
    except PdserveError as exc:
        raise DataLoss(f"{exc} ({exc.status})") from None


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine, channels: ChannelPool, config: cfg.PrefillConfig) -> None:
        self._engine = engine
        self._channels = channels
        self._config = config
        self.inflight = ByteBudget(config.kv_inflight_limit)  # KV bytes of unfinished transfers
        self._same_host: dict[str, bool] = {}  # decode address -> shares this host's /dev/shm
        self.segments = SegmentPool(idle_limit=config.kv_inflight_limit)

    async def _transport(self, address: str) -> str:
        transport = self._config.kv_transport
        if transport != "auto":
            return transport
        if self._config.kv_quantization != "none":
            return "grpc"  # int8 exists to cut wire bytes; shared memory has none to cut
        if address not in self._same_host:
            here = host_id()
            try:
                stats = await decode_pb2_grpc.DecodeStub(self._channels.get(address)).GetStats(
                    decode_pb2.GetStatsRequest(), timeout=5.0)
                self._same_host[address] = bool(here) and stats.host_id == here
            except grpc.aio.AioRpcError as exc:
                log.warning("decode %s: no host id (%s); sending KV over gRPC", address, exc.code().name)
                return "grpc"
            log.info("decode %s: KV over %s", address, "shared memory" if self._same_host[address] else "gRPC")
        return "shm" if self._same_host[address] else "grpc"

    async def _sender(self, address: str, timeout_s: float) -> KVSender:
        c = self._config
        if await self._transport(address) == "shm":
            return ShmKVSender(self._channels.get(address), address, self.segments, c.kv_checksums, timeout_s)
        channels = [self._channels.get(address, lane) for lane in range(c.kv_streams)]
        return GrpcKVSender(channels, address, c.kv_chunk_bytes, c.kv_checksums, timeout_s,
                            quantization="" if c.kv_quantization == "none" else c.kv_quantization)

    @rpc_errors
    async def Prefill(self, request, context):
        info = self._engine.info
        check_id(request.request_id, "request_id", required=False)
        token_ids = list(request.token_ids)
        check_token_ids(token_ids, info.vocab_size)
        if len(token_ids) > info.context_length:
            raise InvalidArgument(f"token_ids: {len(token_ids)} tokens exceed the context length {info.context_length}")
        sampling = sampling_from_proto(request.sampling)
        if not request.decode_address:
            result = await self._engine.prefill(token_ids, sampling, None, request.first_index)
            yield self._first_token(result)
            return
        problem = cfg.address_problem(request.decode_address)
        if problem:
            raise InvalidArgument(f"decode_address: {problem}")
        check_id(request.transfer_id, "transfer_id")
        layout = self._engine.layout(request.transfer_id, len(token_ids))
        await self.inflight.acquire(layout.total_bytes)
        sender = None
        try:
            # The push may take no longer than the request has left (the gateway's deadline), 300 s at most.
            push_timeout = min(PUSH_TIMEOUT_S, context.time_remaining() or PUSH_TIMEOUT_S)
            sender = await self._sender(request.decode_address, push_timeout)
            await transfer_step(sender.open(layout))
            result = await self._engine.prefill(token_ids, sampling, sender.send_layer, request.first_index)
            log.debug("request_id=%s prefilled %d tokens in %.1f ms", request.request_id, len(token_ids), result.forward_ms)
            yield self._first_token(result)
            receipt = await transfer_step(sender.finish(result.first_token))
            yield prefill_pb2.PrefillEvent(transfer_done=prefill_pb2.TransferDone(
                bytes=receipt.bytes_sent, layers=receipt.layers, messages=receipt.messages,
                forward_start_ns=result.forward_start_ns, forward_end_ns=result.forward_end_ns,
                first_chunk_sent_ns=receipt.first_chunk_sent_ns, acked_ns=receipt.acked_ns,
                first_chunk_received_ns=receipt.first_chunk_received_ns,
                last_chunk_received_ns=receipt.last_chunk_received_ns,
                layer_ready_ns=receipt.layer_ready_ns, layer_sent_ns=receipt.layer_sent_ns,
                layer_received_ns=receipt.layer_received_ns, layer_written_ns=receipt.layer_written_ns))
        except BaseException:
            if sender is not None:
                await sender.abort()
            raise
        finally:
            self.inflight.release(layout.total_bytes)

    @staticmethod
    def _first_token(result) -> prefill_pb2.PrefillEvent:
        return prefill_pb2.PrefillEvent(first_token=prefill_pb2.FirstToken(
            token_id=result.first_token, queue_ms=result.queue_ms, forward_ms=result.forward_ms))


async def start_prefill(config: cfg.PrefillConfig, loaded: LoadedModel | None = None) -> RunningService:
    """Loads the model (unless given) and starts the server; returns when serving."""
    loaded = loaded or await load_model_for(config)
    engine = PrefillEngine(loaded, config.prefill_token_budget, config.prefill_chunk_tokens)
    channels = ChannelPool()
    sweep_orphans()
    servicer = PrefillServicer(engine, channels, config)
    server, port, health = await start_server(
        config.listen, SERVICE, lambda server: add_servicer(prefill_pb2_grpc.add_PrefillServicer_to_server, servicer, server))

    announcer = start_announcer(config, "prefill", config.listen, port)

    async def close() -> None:
        servicer.segments.close()
        await channels.close()
        await engine.close()
        if announcer is not None:
            await announcer.close()

    return RunningService("prefill", server, port, health, (SERVICE,), [close], engine,
                          drainers=[announcer.drain] if announcer else [])


def main(argv: list[str] | None = None) -> None:
    service_main("prefill", cfg.PrefillConfig, start_prefill, argv)


def run(args: argparse.Namespace) -> None:
    run_service("prefill", cfg.PrefillConfig, start_prefill, args)
