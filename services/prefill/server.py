"""Prefill servicer: protobuf at the edge, the ``PrefillEngine`` and a KV sender behind it."""

from __future__ import annotations

import argparse
import logging

from pdserve import config as cfg
from pdserve.convert import check_token_ids, sampling_from_proto
from pdserve.engine.prefill import PrefillEngine
from pdserve.errors import InvalidArgument
from pdserve.kv.grpc_sender import GrpcKVSender
from pdserve.model import LoadedModel
from pdserve.rpc import ChannelPool, rpc_errors, start_server
from pdserve.service import RunningService, load_model_for, run_service, service_main
from pdserve.v1 import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine, channels: ChannelPool, chunk_bytes: int) -> None:
        self._engine = engine
        self._channels = channels
        self._chunk_bytes = chunk_bytes

    @rpc_errors
    async def Prefill(self, request, context):
        info = self._engine.info
        token_ids = list(request.token_ids)
        check_token_ids(token_ids, info.vocab_size)
        if len(token_ids) > info.context_length:
            raise InvalidArgument(f"token_ids: {len(token_ids)} tokens exceed the context length {info.context_length}")
        sampling = sampling_from_proto(request.sampling)
        sender = None
        if request.decode_address:
            if not request.transfer_id:
                raise InvalidArgument("transfer_id: must not be empty when decode_address is set")
            sender = GrpcKVSender(self._channels.get(request.decode_address), request.decode_address, self._chunk_bytes)
        try:
            if sender is not None:
                await sender.open(self._engine.layout(request.transfer_id, len(token_ids)))
            result = await self._engine.prefill(token_ids, sampling, sender.send_layer if sender else None)
            log.debug("request_id=%s prefilled %d tokens in %.1f ms", request.request_id, len(token_ids), result.forward_ms)
            yield prefill_pb2.PrefillEvent(first_token=prefill_pb2.FirstToken(
                token_id=result.first_token, queue_ms=result.queue_ms, forward_ms=result.forward_ms))
            if sender is not None:
                receipt = await sender.finish(result.first_token)
                yield prefill_pb2.PrefillEvent(transfer_done=prefill_pb2.TransferDone(
                    bytes=receipt.bytes_sent, layers=receipt.layers, messages=receipt.messages,
                    forward_start_ns=result.forward_start_ns, forward_end_ns=result.forward_end_ns,
                    first_chunk_sent_ns=receipt.first_chunk_sent_ns, acked_ns=receipt.acked_ns,
                    first_chunk_received_ns=receipt.first_chunk_received_ns,
                    last_chunk_received_ns=receipt.last_chunk_received_ns))
        except BaseException:
            if sender is not None:
                await sender.abort()
            raise


async def start_prefill(config: cfg.PrefillConfig, loaded: LoadedModel | None = None) -> RunningService:
    """Loads the model (unless given) and starts the server; returns when serving."""
    loaded = loaded or await load_model_for(config)
    engine = PrefillEngine(loaded, config.prefill_token_budget, config.prefill_chunk_tokens)
    channels = ChannelPool()
    servicer = PrefillServicer(engine, channels, config.kv_chunk_bytes)
    server, port, health = await start_server(
        config.listen, SERVICE, lambda server: prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server))

    async def close() -> None:
        await channels.close()
        await engine.close()

    return RunningService("prefill", server, port, health, (SERVICE,), [close], engine)


def main(argv: list[str] | None = None) -> None:
    service_main("prefill", cfg.PrefillConfig, start_prefill, argv)


def run(args: argparse.Namespace) -> None:
    run_service("prefill", cfg.PrefillConfig, start_prefill, args)
