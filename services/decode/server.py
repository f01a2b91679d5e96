"""Decode servicer: protobuf at the edge, the ``DecodeEngine`` behind it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import time

from pdserve import config as cfg
from pdserve import telemetry
from pdserve.convert import check_id, check_token_ids, layout_from_proto, sampling_from_proto, stream_info_from_proto
from pdserve.engine.decode import DecodeEngine, DecodeParams, FinishReason
from pdserve.engine.kv_pool import budget_bytes
from pdserve.errors import Cancelled, DataLoss, FailedPrecondition, InvalidArgument, PdserveError
from pdserve.kv.assembly import KVAssembly
from pdserve.kv.cuda_ipc import device_uuid, pool_handle
from pdserve.kv.relays import ReceiverSpec, RelayProcesses
from pdserve.kv.wire import DTYPE_NAMES
from pdserve.kv.receiver import DRAIN_SECONDS, add_decode_servicer, drain, read_header, receive_stream
from pdserve.kv.shm import host_id, sweep_orphans, sweep_periodically
from pdserve.logs import bind_request
from pdserve.metrics import DecodeMetrics
from pdserve.prefix import CACHED_KEYS_REPORTED
from pdserve.model import LoadedModel
from pdserve.registration import start_announcer
from pdserve.rpc import rpc_errors, set_ready, start_server
from pdserve.service import RunningService, cluster_auth, expose_metrics, load_model_for, run_service, service_main
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
_FINISH = {FinishReason.STOP: common_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH}


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: DecodeEngine) -> None:
        self._engine = engine
        self._host_id = host_id()
        self.incarnation = secrets.token_hex(8)  # a restart on the same address is a new instance
        self.kv_receivers: RelayProcesses | None = None  # its KV receiver processes
        self.metrics = DecodeMetrics()
        self.metrics.gauges(self._gauges)

    def _gauges(self) -> dict:
        st = self._engine.stats()
        total = st["kv_blocks_total"]
        return {
            "pdserve_decode_batch_size": ("Decode: requests in the running batch", st["running"]),
            "pdserve_decode_queue_depth": ("Decode: requests by where they wait",
                                           {(("state", "admission"),): st["queued"],
                                            (("state", "kv_transfer"),): st["waiting_for_kv"],
                                            (("state", "ready"),): st["ready"]}),
            "pdserve_kv_pool_blocks": ("Decode: KV pool blocks by state (cached: prefix blocks kept after their "
                                       "request; the idle ones count as free too)",
                                       {(("state", "used"),): st["kv_blocks_used"],
                                        (("state", "free"),): total - st["kv_blocks_used"],
                                        (("state", "cached"),): st["kv_blocks_cached"]}),
            "pdserve_prefix_cache_tokens": ("Prompt tokens of admitted requests, by where their KV came from "
                                            "(hit: cached prefix blocks; miss: computed or transferred)",
                                            {(("result", "hit"),): st["prefix_hit_tokens"],
                                             (("result", "miss"),): st["prompt_tokens"] - st["prefix_hit_tokens"]}),
            "pdserve_kv_pool_usage_ratio": ("Decode: share of the KV pool in use",
                                            st["kv_blocks_used"] / total if total else 0.0),
            "pdserve_kv_pool_bytes": ("Decode: size of the KV pool", st["kv_cache_bytes"]),
        }

    def _params(self, request: decode_pb2.DecodeRequest) -> DecodeParams:
        check_id(request.request_id, "request_id")
        check_id(request.transfer_id, "transfer_id",
                 required=not request.prompt_token_ids or request.local_max_uncached > 0)
        vocab = self._engine.info.vocab_size
        bad = [t for t in request.eos_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"eos_token_ids: {bad[0]} outside the vocabulary [0, {vocab})")
        return DecodeParams(
            request_id=request.request_id,
            transfer_id=request.transfer_id,
            prompt_tokens=len(request.prompt_token_ids) or request.prompt_tokens,
            sampling=sampling_from_proto(request.sampling),
            eos_token_ids=frozenset(request.eos_token_ids),
            max_tokens=request.max_tokens,
            first_index=request.first_index,
            token_ids=tuple(request.prompt_token_ids or request.cache_token_ids),
        )

    @rpc_errors
    async def Generate(self, request, context):
        arrived = time.monotonic_ns()
        params = self._params(request)
        bind_request(params.request_id)
        prompt = list(request.prompt_token_ids)
        if prompt:
            check_token_ids(prompt, self._engine.info.vocab_size, "prompt_token_ids")
        elif request.cache_token_ids:
            check_token_ids(list(request.cache_token_ids), self._engine.info.vocab_size, "cache_token_ids")
        seq = await self._engine.reserve(params, local=bool(prompt), deadline_s=context.time_remaining())
        by_transfer = bool(prompt) and request.local_max_uncached > 0 and (
            len(prompt) - seq.cached > request.local_max_uncached or 2 * seq.cached < len(prompt))
        if by_transfer:  # its cached prefix left too much to compute here: the KV comes by transfer
            try:
                self._engine.expect_transfer(seq)
            except BaseException:
                self._engine.release(seq)
                raise
            prompt = []
        reserved = time.monotonic_ns()
        self.metrics.admission.observe((reserved - arrived) / 1e9)
        telemetry.at("decode.admission", arrived, reserved, attributes={"pdserve.kv_blocks": len(seq.blocks),
                                                                        "pdserve.prefix_hit_tokens": seq.cached})
        log.debug("request_id=%s reserved %d KV blocks (%s)", request.request_id, len(seq.blocks),
                  "prefilling here" if prompt else f"transfer {request.transfer_id}")
        # From reserved to the last token: waiting for the KV (or prefilling it here), then in the batch.
        life = telemetry.start("decode.lifetime", attributes={"pdserve.local_prefill": bool(prompt)})
        tokens, first_ns, finish = 0, 0, None
        try:
            yield decode_pb2.DecodeEvent(reserved=decode_pb2.Reserved(
                finish_ms=self._engine.admission.finish_ms(seq.ticket), cached_tokens=seq.cached,
                by_transfer=by_transfer))
            if prompt:
                await self._engine.prefill_locally(seq, prompt)
            while (event := await seq.events.get()) is not None:
                if isinstance(event, PdserveError):
                    raise event
                tokens += 1
                if tokens == 1:
                    first_ns = time.monotonic_ns()
                    life.add_event("first_token", {"index": event.index})
                finish = _FINISH.get(event.finish, common_pb2.FINISH_REASON_UNSPECIFIED)
                yield decode_pb2.DecodeEvent(
                    token=decode_pb2.TokenEvent(token_id=event.token_id, index=event.index, finish_reason=finish)
                )
        except BaseException as exc:
            telemetry.fail(life, exc)
            raise
        finally:
            self._engine.release(seq)
            if life.is_recording():
                tpot_ms = (time.monotonic_ns() - first_ns) / 1e6 / (tokens - 1) if tokens > 1 else 0.0
                life.set_attributes({"pdserve.tokens": tokens, "pdserve.tpot_ms": round(tpot_ms, 3),
                                     "pdserve.finish_reason": common_pb2.FinishReason.Name(finish or 0)})
            life.end()

    @rpc_errors
    async def PushKV(self, request_iterator, context):
        began: list[KVAssembly] = []
        try:
            return await self._push_kv(request_iterator, began)
        except Cancelled:
            raise
        except PdserveError:
            # Read to the end before answering (grpc/grpc#36066). A producer writing into the pool itself
            # (CUDA IPC) may still have copies in flight until it closes its side: the blocks stay
            # reserved until then, however long that takes (bounded by the transfer's own limit).
            ipc = bool(began) and began[0].stream.cuda_ipc
            await drain(request_iterator, self._engine.kv_transfer_max_s if ipc else DRAIN_SECONDS)
            raise
        finally:
            if began:
                self._engine.stream_ended(began[0])

    async def _push_kv(self, request_iterator, began: list) -> decode_pb2.PushKVReply:
        header = await read_header(request_iterator)
        try:
            layout, stream = layout_from_proto(header), stream_info_from_proto(header)
        except InvalidArgument as exc:  # the request waiting for this transfer learns why at once
            self._engine.fail_transfer(header.transfer_id, DataLoss(f"KV transfer rejected: {exc}"))
            raise
        tid = layout.transfer_id
        assembly = self._engine.begin_transfer(layout, stream)
        self._engine.stream_began(assembly)
        began.append(assembly)
        try:
            received = await receive_stream(
                request_iterator, assembly, stream,
                on_trailer=lambda token: self._engine.complete_transfer(tid, token, stream.stream_index),
                writes_issued=self._engine.writes_issued)
        except Cancelled:
            raise
        except PdserveError as exc:
            log.warning("transfer %s rejected: %s", tid, exc)
            self._engine.fail_transfer(tid, exc if isinstance(exc, DataLoss) else DataLoss(f"KV transfer rejected: {exc}"))
            raise
        except BaseException:
            # The sender went away (cancelled stream) or something broke: free it all.
            self._engine.fail_transfer(tid, DataLoss("KV transfer aborted before completion"))
            raise
        self.metrics.kv_received.inc(received)
        return decode_pb2.PushKVReply(
            bytes_received=received,
            first_chunk_received_ns=assembly.first_chunk_ns,
            last_chunk_received_ns=assembly.last_chunk_ns,
            layer_written_ns=assembly.layer_written_ns,
            layer_received_ns=assembly.layer_received_ns,
        )

    @rpc_errors
    async def GetStats(self, request, context):
        return decode_pb2.DecodeStats(**self._engine.stats(), host_id=self._host_id, incarnation=self.incarnation,
                                      cuda_device=device_uuid(self._engine.pool.device),
                                      kv_receiver_ports=self.kv_receivers.live_ports() if self.kv_receivers else (),
                                      cached_blocks=self._engine.pool.allocator.cached_keys(CACHED_KEYS_REPORTED))

    @rpc_errors
    async def GetKVPool(self, request, context):
        pool = self._engine.pool
        if pool.device.type != "cuda":
            raise FailedPrecondition("GetKVPool: this decode instance's KV pool is not on a GPU")
        return decode_pb2.KVPoolHandle(incarnation=self.incarnation, **pool_handle(pool.storage, pool.block_size))

    @rpc_errors
    async def TransferTarget(self, request, context):
        check_id(request.transfer_id, "transfer_id")
        blocks = await self._engine.transfer_target(request.transfer_id, request.stream_index)
        return decode_pb2.TransferTargetReply(blocks=blocks, incarnation=self.incarnation)


def receiver_spec(config: cfg.DecodeConfig, loaded: LoadedModel, engine: DecodeEngine, port: int,
                  incarnation: str) -> ReceiverSpec:
    pool, kv = engine.pool, loaded.info.kv
    return ReceiverSpec(config=config, decode_port=port, num_layers=kv.num_layers, kv_heads=kv.kv_heads,
                        head_dim=kv.head_dim, dtype=DTYPE_NAMES[loaded.dtype], max_tokens=loaded.info.context_length,
                        incarnation=incarnation, block_size=pool.block_size,
                        pool=pool_handle(pool.storage, pool.block_size) if pool.device.type == "cuda" else None)


async def start_decode(config: cfg.DecodeConfig, loaded: LoadedModel | None = None) -> RunningService:
    """Loads the model (unless given), starts the engine and the server; returns when serving."""
    auth = cluster_auth(config)
    loaded = loaded or await load_model_for(config)
    prefill_budget, prefill_chunk = config.prefill_batch(loaded.device.type)
    engine = DecodeEngine(loaded, kv_budget=budget_bytes(config.kv_budget_spec, loaded.device),
                          block_size=config.kv_block_size, max_batch=config.max_batch, max_queued=config.max_queued,
                          prefill_token_budget=prefill_budget, prefill_chunk_tokens=prefill_chunk,
                          max_partial_prefills=config.max_partial_prefills,
                          prefill_max_pass_s=config.prefill_max_pass_s, paged_kernel=config.paged_kernel,
                          kv_lease_s=config.kv_lease_s, kv_transfer_max_s=config.kv_transfer_max_s,
                          cuda_graphs=config.cuda_graphs, prefix_cache=config.prefix_cache,
                          min_step_interval_ms=config.min_step_interval_ms, fused_forward=config.fused_forward,
                          kv_write_lanes=config.kv_write_lanes)
    await engine.capture_graphs(config.cuda_graph_tokens)
    engine.start()
    sweep_orphans()
    sweeper = asyncio.get_running_loop().create_task(sweep_periodically(), name="shm-sweep")
    pool = engine.pool
    log.info("KV pool: %d blocks of %d tokens (%.1f MiB, %s kernel), max_batch %d, max_queued %d",
             pool.allocator.capacity, pool.block_size, pool.nbytes / 2**20, pool.kernel, config.max_batch,
             config.max_queued)
    servicer = DecodeServicer(engine)
    # With KV receivers, ready only once they serve: a prefill instance learns them once, when it first sends.
    server, port, health = await start_server(config.listen, SERVICE, lambda server: add_decode_servicer(servicer, server),
                                              ready=not config.kv_receivers, credentials=auth.server_credentials(),
                                              interceptors=auth.server_interceptors())
    receivers = None
    if config.kv_receivers:
        receivers = RelayProcesses(receiver_spec(config, loaded, engine, port, servicer.incarnation), config.kv_receivers,
                                   servicer.metrics)
        try:
            await receivers.start()
        except BaseException:
            sweeper.cancel()
            await receivers.close()
            await server.stop(None)
            await engine.stop()
            raise
        servicer.kv_receivers = receivers
        await set_ready(health, True)

    announcer = start_announcer(config, "decode", config.listen, port, auth)

    async def close() -> None:
        sweeper.cancel()
        if receivers is not None:
            await receivers.close()
        await engine.stop()
        if announcer is not None:
            await announcer.close()

    closers = [close]
    metrics_port = await expose_metrics(config, servicer.metrics, closers)
    return RunningService("decode", server, port, health, (SERVICE,), closers, engine,
                          drainers=[announcer.drain] if announcer else [], metrics_port=metrics_port)


def main(argv: list[str] | None = None) -> None:
    service_main("decode", cfg.DecodeConfig, start_decode, argv)


def run(args: argparse.Namespace) -> None:
    run_service("decode", cfg.DecodeConfig, start_decode, args)
