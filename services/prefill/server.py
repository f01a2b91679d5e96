"""Prefill servicer: protobuf at the edge, the ``PrefillEngine`` and a KV sender behind it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import secrets
from dataclasses import dataclass
from typing import Awaitable, TypeVar

import grpc

from pdserve import config as cfg
from pdserve.aio import cancel_quietly, unless_failed
from pdserve import telemetry
from pdserve.convert import check_address, check_id, check_token_ids, sampling_from_proto
from pdserve.engine.kv_pool import budget_bytes
from pdserve.engine.prefill import KVBytes, PrefillEngine
from pdserve.engine.prefix_store import PrefixStore
from pdserve.errors import Cancelled, DataLoss, FailedPrecondition, InvalidArgument, NotFound, PdserveError
from pdserve.kv.cuda_ipc import MappedPools, local_device
from pdserve.kv.grpc_sender import GrpcKVSender, IpcKVSender, ShmKVSender
from pdserve.kv.relays import FORWARD_KEY, RelayProcesses, SenderSpec, receiver_addresses
from pdserve.kv.shm import SegmentPool, host_id, sweep_orphans
from pdserve.kv.staging import DeviceCopies
from pdserve.kv.transport import KVSender
from pdserve.kv.wire import KVLayout
from pdserve.logs import bind_request
from pdserve.metrics import PrefillMetrics
from pdserve.model import LoadedModel
from pdserve.prefix import CACHED_KEYS_REPORTED
from pdserve.registration import start_announcer
from pdserve.rpc import ChannelPool, add_servicer, error_from_rpc, rpc_errors, start_server
from pdserve.service import RunningService, cluster_auth, expose_metrics, load_model_for, run_service, service_main
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name
PUSH_TIMEOUT_S = 300.0


def push_timeout(context) -> float:
    """A push may take no longer than the request has left (the gateway's deadline), 300 s at most."""
    return min(PUSH_TIMEOUT_S, context.time_remaining() or PUSH_TIMEOUT_S)


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


@dataclass(eq=False)
class _Kept:
    """A computed transfer whose push failed: its KV, chunk by chunk, and the prefill's result."""

    kept_id: str
    layout: KVLayout
    chunks: list
    result: object  # PrefillResult: the first token and the forward's timestamps
    kv: KVBytes  # its bytes in the in-flight budget, held while it is kept
    expiry: asyncio.TimerHandle | None = None


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine, channels: ChannelPool, config: cfg.PrefillConfig) -> None:
        self._engine = engine
        self._channels = channels
        self._config = config
        self.inflight = engine.inflight  # KV bytes of unfinished transfers
        self.incarnation = secrets.token_hex(8)  # a restart on the same address is a new instance
        self._transports: dict[str, str] = {}  # decode address -> how KV reaches it
        self._grpc_targets_of: dict[str, list[str]] = {}  # decode address -> its KV receivers' (or itself)
        self.kv_senders: RelayProcesses | None = None  # its KV sender processes
        self._pools = MappedPools()  # decode pools this process writes into (CUDA IPC)
        self._device_copies: DeviceCopies | None = None
        # Idle shared-memory segments stay within the in-flight budget, and within host memory's default.
        self.segments = SegmentPool(idle_limit=min(engine.inflight.limit, SegmentPool.IDLE_LIMIT))
        self._kept: dict[str, _Kept] = {}  # by the failed transfer's id
        self.metrics = PrefillMetrics()
        self.metrics.gauges(self._gauges)

    def _gauges(self) -> dict:
        return {
            "pdserve_prefill_queue_prompts": ("Prefill: prompts queued or in a forward pass", self._engine.queued_prompts),
            "pdserve_prefill_queue_tokens": ("Prefill: prompt tokens not yet prefilled", self._engine.queued_tokens),
            "pdserve_kv_inflight_bytes": ("Prefill: KV bytes of unfinished or kept transfers", self.inflight.used),
            "pdserve_kv_kept_transfers": ("Prefill: transfers whose KV is kept for a re-push", len(self._kept)),
            "pdserve_prefill_prompt_tokens": ("Prefill: prompt tokens by where their KV came from (computed by a "
                                              "forward pass, or cached: the prefix cache)",
                                              {(("source", "computed"),): self._engine.computed_tokens,
                                               (("source", "cached"),): self._engine.cached_tokens}),
            "pdserve_prefix_cache_bytes": ("Prefill: bytes of KV in the prefix cache",
                                           store.nbytes if (store := self._engine.prefix_store) else 0),
        }

    def _observe(self, result, token_count: int) -> None:
        """The forward pass in the metrics and, as spans under the current one, in the trace."""
        m = self.metrics
        m.queue.observe(result.queue_ms / 1e3)
        m.forward.observe(result.forward_ms / 1e3)
        m.prompt_tokens.inc(token_count)
        queued_ns = result.forward_start_ns - int(result.queue_ms * 1e6)
        telemetry.at("prefill.queue", queued_ns, result.forward_start_ns)
        telemetry.at("prefill.forward", result.forward_start_ns, result.forward_end_ns,
                     attributes={"pdserve.prompt_tokens": token_count, "pdserve.passes": result.passes,
                                 "pdserve.prefix_hit_tokens": result.cached_tokens,
                                 "pdserve.forward_ms": round(result.forward_ms, 3)})

    def _transferred(self, receipt, transport: str, forward_end_ns: int = 0) -> None:
        """A delivered transfer in the metrics and, as a ``kv.transfer`` span with an event per layer
        (received/written offsets compare decode's clock with ours: meaningful on one host), in the trace.
        The span runs from the first chunk sent to decode's acknowledgement, so it overlaps the forward pass;
        ``pdserve.kv.after_forward_ms`` is what the transfer added after the pass ended."""
        m = self.metrics
        seconds = max(0, receipt.acked_ns - receipt.first_chunk_sent_ns) / 1e9
        m.transfers.labels("done").inc()
        m.transfer_bytes.labels(transport).inc(receipt.bytes_sent)
        m.transfer_size.observe(receipt.bytes_sent)
        m.transfer_seconds.observe(seconds)
        if not telemetry.enabled():
            return
        attributes = {"pdserve.kv.bytes": receipt.bytes_sent, "pdserve.kv.layers": receipt.layers,
                      "pdserve.kv.messages": receipt.messages, "pdserve.kv.transport": transport,
                      "pdserve.kv.gb_per_s": round(receipt.bytes_sent / seconds / 1e9, 3) if seconds else 0.0}
        if forward_end_ns:  # not for a re-push: its forward pass was long ago
            attributes["pdserve.kv.after_forward_ms"] = round(max(0, receipt.acked_ns - forward_end_ns) / 1e6, 3)
        telemetry.at("kv.transfer", receipt.first_chunk_sent_ns, receipt.acked_ns, attributes=attributes,
                     events=telemetry.layer_events(receipt.layer_ready_ns, receipt.layer_sent_ns,
                                                   receipt.layer_received_ns, receipt.layer_written_ns))

    async def _transport(self, address: str) -> str:
        """How KV reaches the decode instance at ``address``: the configured transport, or (auto) CUDA IPC
        when it shares this host and its pool is on a GPU this process sees, shared memory when it shares
        this host, gRPC otherwise. Learned once per address (again after a failed transfer there)."""
        transport = self._config.kv_transport
        if transport != "auto":
            return transport
        if self._config.kv_quantization != "none":
            return "grpc"  # int8 exists to cut wire bytes; shared memory has none to cut
        if address not in self._transports:
            stats = await self._decode_stats(address)
            if stats is None:
                return "grpc"
            here = host_id()
            same_host = bool(here) and stats.host_id == here
            gpu = same_host and self._engine.device.type == "cuda" and local_device(stats.cuda_device) is not None
            self._transports[address] = "cuda_ipc" if gpu else "shm" if same_host else "grpc"
            log.info("decode %s: KV over %s", address, self._transports[address])
        return self._transports[address]

    async def _decode_stats(self, address: str):
        """The decode instance's ``GetStats`` (its host, GPU and KV receivers), or None if it did not answer.
        Its KV receivers are noted on the way (``_grpc_targets``)."""
        try:
            stats = await decode_pb2_grpc.DecodeStub(self._channels.get(address)).GetStats(
                decode_pb2.GetStatsRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            log.warning("decode %s: no stats (%s); sending KV over gRPC to it", address, exc.code().name)
            return None
        self._grpc_targets_of[address] = receiver_addresses(address, stats.kv_receiver_ports)
        return stats

    async def _grpc_targets(self, address: str) -> list[str]:
        """Where a transfer's gRPC streams go: the decode instance's KV receiver processes, or the instance
        itself. Learned once per address (again after a failed transfer there)."""
        if address not in self._grpc_targets_of and await self._decode_stats(address) is None:
            return [address]
        return self._grpc_targets_of[address]

    async def _pool(self, address: str):
        """Decode's KV pool mapped into this process (CUDA IPC), once per decode incarnation."""
        mapped = self._pools.get(address)
        if mapped is None:
            try:
                handle = await decode_pb2_grpc.DecodeStub(self._channels.get(address)).GetKVPool(
                    decode_pb2.GetKVPoolRequest(), timeout=10.0)
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc, f"decode {address}") from None
            try:
                mapped = self._pools.add(address, handle)
            except ValueError as exc:
                raise FailedPrecondition(f"decode {address}: its KV pool cannot be mapped here ({exc})") from None
            log.info("decode %s: KV pool mapped (CUDA IPC, %.1f GiB)", address, mapped.pool.nbytes / 2**30)
        return mapped

    def forget(self, address: str) -> None:
        """A transfer to ``address`` failed: learn its transport again and unmap its pool (it may have
        restarted: a new pool, or none)."""
        self._transports.pop(address, None)
        self._grpc_targets_of.pop(address, None)
        self._pools.forget(address)

    def _copies(self) -> DeviceCopies | None:
        device = self._engine.device
        if device.type != "cuda":
            return None
        if self._device_copies is None:
            self._device_copies = DeviceCopies(device)
        return self._device_copies

    async def _sender(self, address: str, timeout_s: float) -> KVSender:
        c = self._config
        transport = await self._transport(address)
        if transport == "cuda_ipc":
            try:
                mapped = await self._pool(address)
                return IpcKVSender(self._channels.get_sync(address), address, mapped.pool, mapped.block_size,
                                   mapped.incarnation, self._copies(), timeout_s, layer_ranges=mapped.layer_ranges)
            except FailedPrecondition as exc:
                if self._config.kv_transport == "cuda_ipc":
                    raise
                log.warning("%s; KV over shared memory instead", exc)
                self._transports[address] = transport = "shm"
        if transport == "shm":
            return ShmKVSender([self._channels.get_sync(address)], address, self.segments, c.kv_checksums, timeout_s,
                               copies=self._copies())
        # The streams go to decode's KV receivers in turn (a connection of its own each), or all to decode.
        targets = await self._grpc_targets(address)
        streams = c.kv_stream_count(self._engine.device.type)
        ports = self.kv_senders.live_ports() if self.kv_senders else []
        if ports:
            # Sent by this instance's KV sender processes (in turn), from shared-memory staging, each stream on
            # to its target; the wire's checksums are theirs. (With none running, this process sends.)
            channels = [self._channels.get_sync(f"127.0.0.1:{ports[i % len(ports)]}", i // len(ports))
                        for i in range(streams)]
            return ShmKVSender(channels, address, self.segments, False, timeout_s, copies=self._copies(),
                               stream_metadata=[((FORWARD_KEY, targets[i % len(targets)]),) for i in range(streams)],
                               transport="grpc")
        channels = [self._channels.get_sync(targets[i % len(targets)], i // len(targets)) for i in range(streams)]
        return GrpcKVSender(channels, address, c.kv_chunk_bytes, c.kv_checksums, timeout_s,
                            quantization="" if c.kv_quantization == "none" else c.kv_quantization,
                            copies=self._copies())

    @rpc_errors
    async def Prefill(self, request, context):
        info = self._engine.info
        check_id(request.request_id, "request_id", required=False)
        bind_request(request.request_id)
        token_ids = list(request.token_ids)
        check_token_ids(token_ids, info.vocab_size)
        if len(token_ids) > info.context_length:
            raise InvalidArgument(f"token_ids: {len(token_ids)} tokens exceed the context length {info.context_length}")
        if request.first_index >= len(token_ids):
            raise InvalidArgument(f"first_index: {request.first_index} tokens delivered must be part of the prompt "
                                  f"({len(token_ids)} tokens)")
        sampling = sampling_from_proto(request.sampling)
        budget = context.time_remaining()
        if request.budget_ms > 0:  # what the request's deadline leaves after decode's share
            budget = min(budget or math.inf, request.budget_ms / 1e3)
        self._engine.check_admission(len(token_ids), budget)
        name = request.request_id
        if not request.decode_address:
            result = await self._engine.prefill(token_ids, sampling, None, request.first_index, name=name)
            self._observe(result, len(token_ids))
            yield self._first_token(result)
            return
        check_address(request.decode_address, "decode_address")
        check_id(request.transfer_id, "transfer_id")
        skip = request.skip_tokens  # decode holds these tokens' KV already: the transfer starts after them
        if skip >= len(token_ids):
            raise InvalidArgument(f"skip_tokens: {skip} must leave some of the prompt's {len(token_ids)} tokens to send")
        layout = self._engine.layout(request.transfer_id, len(token_ids) - skip)
        kv = KVBytes(self.inflight, layout.total_bytes)
        sender = opening = None
        kept = False
        chunks: list = []  # the prompt's KV, chunk by chunk: kept until decode acknowledges it
        try:
            sender = await self._sender(request.decode_address, push_timeout(context))
            # The pass does not wait for the open (round trips to decode, pinning staging): layers staged
            # before it completed start when it does. An open that fails stops the pass.
            opening = asyncio.ensure_future(transfer_step(sender.open(layout)))

            def on_layer(layer, start, keys, values) -> None:  # on the engine's worker thread, mid-pass
                chunks.append((layer, start - skip, keys, values))
                sender.stage(layer, start - skip, keys, values)

            result = await unless_failed(self._engine.prefill(token_ids, sampling, on_layer, request.first_index,
                                                              kv, name, emit_from=skip), opening)
            # An open that fails fails the call, before or after a short pass ended alike (nothing was sent).
            await opening
            self._observe(result, len(token_ids))
            log.debug("request_id=%s prefilled %d tokens in %.1f ms", request.request_id, len(token_ids), result.forward_ms)
            yield self._first_token(result)
            try:
                receipt = await transfer_step(sender.finish(result.first_token))
            except DataLoss as exc:
                if skip:  # a part of a prompt's KV helps only a decode holding the rest: nothing to keep
                    raise
                await sender.abort()
                self.forget(request.decode_address)
                kept = True
                self.metrics.transfers.labels("kept").inc()
                yield self._keep(_Kept(request.transfer_id, layout, chunks, result, kv), str(exc))
                return
            self._transferred(receipt, sender.transport, result.forward_end_ns)
            yield self._transfer_done(receipt, result)
        except BaseException as exc:
            await cancel_quietly(opening)  # its own failure, if it failed, is the one being handled
            if sender is not None:
                self.metrics.transfers.labels("failed").inc()
                await sender.abort()
            if isinstance(exc, DataLoss):  # the transfer broke (not a cancellation): learn the decode anew
                self.forget(request.decode_address)
            raise
        finally:
            if not kept:
                kv.release()

    @rpc_errors
    async def Repush(self, request, context):
        check_id(request.request_id, "request_id", required=False)
        bind_request(request.request_id)
        check_id(request.kept_id, "kept_id")
        check_address(request.decode_address, "decode_address")
        check_id(request.transfer_id, "transfer_id")
        kept = self._kept.pop(request.kept_id, None)
        if kept is None:
            raise NotFound(f"kept_id: no KV kept as {request.kept_id!r} (delivered, or expired after "
                           f"{self._config.kv_keep_s:g} s)")
        kept.expiry.cancel()
        layout = dataclasses.replace(kept.layout, transfer_id=request.transfer_id)
        sender = None
        delivered = False
        try:
            sender = await self._sender(request.decode_address, push_timeout(context))
            await transfer_step(sender.open(layout))
            for chunk in kept.chunks:
                sender.stage(*chunk)
            receipt = await transfer_step(sender.finish(kept.result.first_token))
            delivered = True
            self._transferred(receipt, sender.transport)
            yield self._transfer_done(receipt, kept.result)
        except DataLoss as exc:
            if sender is not None:
                await sender.abort()
            self.forget(request.decode_address)
            yield self._keep(kept, str(exc))
        except BaseException:
            if sender is not None:
                await sender.abort()
            if not delivered:
                self._keep(kept, "the re-push was interrupted")
            raise
        finally:
            if delivered:
                kept.kv.release()

    def _keep(self, kept: _Kept, reason: str) -> prefill_pb2.PrefillEvent:
        """Holds a computed transfer's KV (and its bytes of the in-flight budget) for kv_keep_s."""
        keep_s = self._config.kv_keep_s

        def expire() -> None:
            if self._kept.pop(kept.kept_id, None) is not None:
                kept.kv.release()

        kept.expiry = asyncio.get_running_loop().call_later(keep_s, expire)
        self._kept[kept.kept_id] = kept
        log.info("KV of %s kept for %g s after a failed push (%s)", kept.kept_id, keep_s, reason)
        return prefill_pb2.PrefillEvent(kv_kept=prefill_pb2.KVKept(kept_id=kept.kept_id, reason=reason,
                                                                   expires_in_s=keep_s))

    def close(self) -> None:
        self.segments.close()
        self._pools.clear()
        if self._device_copies is not None:
            self._device_copies.close()

    @rpc_errors
    async def GetStats(self, request, context):
        engine, store = self._engine, self._engine.prefix_store
        return prefill_pb2.PrefillStats(
            incarnation=self.incarnation, queued_prompts=engine.queued_prompts, queued_tokens=engine.queued_tokens,
            max_queued_tokens=engine.max_queued_tokens, tokens_per_s=engine.tokens_per_s, passes=engine.passes,
            refused=engine.refused, kv_inflight_bytes=self.inflight.used, kv_pools_mapped=len(self._pools),
            kv_sender_ports=self.kv_senders.live_ports() if self.kv_senders else (),
            computed_tokens=engine.computed_tokens, cached_tokens=engine.cached_tokens,
            prefix_cache_bytes=store.nbytes if store else 0, prefix_block_size=store.block_size if store else 0,
            cached_blocks=store.cached_keys(CACHED_KEYS_REPORTED) if store else ())

    @staticmethod
    def _transfer_done(receipt, result) -> prefill_pb2.PrefillEvent:
        return prefill_pb2.PrefillEvent(transfer_done=prefill_pb2.TransferDone(
            bytes=receipt.bytes_sent, layers=receipt.layers, messages=receipt.messages,
            forward_start_ns=result.forward_start_ns, forward_end_ns=result.forward_end_ns,
            first_chunk_sent_ns=receipt.first_chunk_sent_ns, acked_ns=receipt.acked_ns,
            open_start_ns=receipt.open_start_ns, opened_ns=receipt.opened_ns,
            first_chunk_received_ns=receipt.first_chunk_received_ns,
            last_chunk_received_ns=receipt.last_chunk_received_ns,
            layer_ready_ns=receipt.layer_ready_ns, layer_sent_ns=receipt.layer_sent_ns,
            layer_received_ns=receipt.layer_received_ns, layer_written_ns=receipt.layer_written_ns))

    @staticmethod
    def _first_token(result) -> prefill_pb2.PrefillEvent:
        return prefill_pb2.PrefillEvent(first_token=prefill_pb2.FirstToken(
            token_id=result.first_token, queue_ms=result.queue_ms, forward_ms=result.forward_ms,
            cached_tokens=result.cached_tokens))


async def start_prefill(config: cfg.PrefillConfig, loaded: LoadedModel | None = None) -> RunningService:
    """Loads the model (unless given) and starts the server; returns when serving."""
    loaded = loaded or await load_model_for(config)
    store = PrefixStore(config.prefix_cache_limit, config.prefix_block_size) if config.prefix_cache_limit else None
    engine = PrefillEngine(loaded, *config.prefill_batch(loaded.device.type),
                           max_partial=config.max_partial_prefills, max_queued_tokens=config.max_queued_tokens,
                           kv_inflight_bytes=budget_bytes(config.kv_inflight_spec, loaded.device), prefix_store=store,
                           max_pass_s=config.prefill_max_pass_s,
                           fused_forward=None if config.fused_forward else False)
    await engine.warm_up()
    log.info("KV in flight: at most %.1f GiB (%s)", engine.inflight.limit / 2**30, config.kv_inflight_spec)
    auth = cluster_auth(config)
    channels = ChannelPool(auth)
    sweep_orphans()
    servicer = PrefillServicer(engine, channels, config)
    senders = None
    if config.kv_senders:
        senders = RelayProcesses(SenderSpec(config), config.kv_senders, servicer.metrics)
        try:
            await senders.start()
        except BaseException:
            await senders.close()
            await engine.close()
            raise
        servicer.kv_senders = senders
    server, port, health = await start_server(
        config.listen, SERVICE, lambda server: add_servicer(prefill_pb2_grpc.add_PrefillServicer_to_server, servicer, server),
        credentials=auth.server_credentials(), interceptors=auth.server_interceptors())

    announcer = start_announcer(config, "prefill", config.listen, port, auth)

    async def close() -> None:
        servicer.close()
        if senders is not None:
            await senders.close()
        await channels.close()
        await engine.close()
        if announcer is not None:
            await announcer.close()

    closers = [close]
    metrics_port = await expose_metrics(config, servicer.metrics, closers)
    return RunningService("prefill", server, port, health, (SERVICE,), closers, engine,
                          drainers=[announcer.drain] if announcer else [], metrics_port=metrics_port)


def main(argv: list[str] | None = None) -> None:
    service_main("prefill", cfg.PrefillConfig, start_prefill, argv)


def run(args: argparse.Namespace) -> None:
    run_service("prefill", cfg.PrefillConfig, start_prefill, args)
