"""KV transports end to end: token-exact over each, corruption caught and retried, nothing left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import traceback

import grpc
import pytest
import torch

from pdserve import config as cfg
from pdserve.engine.prefill import PrefillEngine
from pdserve.errors import DataLoss, PdserveError
from pdserve.kv import shm, wire
from pdserve.kv.grpc_sender import GrpcKVSender
from pdserve.kv.wire import KVLayout
from pdserve.rpc import ChannelPool
from pdserve.sdk import AsyncClient
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from services.prefill.server import PrefillServicer
from tests.cluster import reference_greedy, start_cluster
from tests.conftest import get_loaded

PROMPTS = [[5, 6, 7], list(range(30, 100)), list(range(200, 241))]


def new_segments(before: set[str]) -> list[str]:
    """This process's segments that were not there before (other tests' running clusters keep theirs)."""
    mine = f"{shm.PREFIX}{os.getpid()}-"
    return [n for n in shm.segment_names() if n.startswith(mine) and n not in before]


async def kv_push_threads(wait_s: float = 3.0) -> list[int]:
    """Threads still inside a KV stream's request generator (``GrpcKVSender._requests``, on gRPC's thread for
    the call) once ``wait_s`` passed: a stream that ended leaves none waiting for ranges."""
    deadline = time.monotonic() + wait_s
    while True:
        busy = [ident for ident, frame in sys._current_frames().items()
                if any(f.f_code is GrpcKVSender._requests.__code__ for f, _ in traceback.walk_stack(frame))]
        if not busy or time.monotonic() > deadline:
            return busy
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("transport,streams", [("grpc", 1), ("grpc", 3), ("shm", 1)])
async def test_every_transport_is_token_exact_with_chunked_prefill(transport, streams):
    loaded = get_loaded("preset:tiny-llama")
    # Every round's KV crosses the transport: the second round's prompts, cached on decode, would otherwise
    # be prefilled there (conditional disaggregation by cache hit).
    cluster = await start_cluster(loaded, prefill_options={"kv_transport": transport, "kv_streams": streams,
                                                           "prefill_chunk_tokens": 16, "kv_chunk_bytes": 4096},
                                  gateway_options={"local_uncached_tokens": 0})
    before = set(shm.segment_names())
    try:
        async with AsyncClient(cluster.address) as client:
            for _ in range(2):  # the second round reuses the first round's segments
                results = await asyncio.gather(*(client.generate(token_ids=p, max_tokens=6, temperature=0,
                                                                 ignore_eos=True) for p in PROMPTS))
                for prompt, result in zip(PROMPTS, results):
                    assert result.token_ids == reference_greedy(loaded, prompt, 6, ignore_eos=True)
        stats = await decode_pb2_grpc.DecodeStub(grpc.aio.insecure_channel(cluster.decode_address)).GetStats(
            decode_pb2.GetStatsRequest())
        assert stats.transfers_completed == 2 * len(PROMPTS) and stats.kv_blocks_used == 0
        if transport == "shm":  # 6 transfers through at most 3 segments, kept for the next ones
            assert 1 <= len(new_segments(before)) <= len(PROMPTS)
    finally:
        await cluster.stop()
    assert not new_segments(before), "a stopped prefill leaves no segment"


async def test_auto_transport_is_shm_on_this_host_and_grpc_for_another(monkeypatch):
    loaded = get_loaded("preset:tiny-llama")
    here = await start_cluster(loaded)
    monkeypatch.setattr("services.decode.server.host_id", lambda: "another-host")
    elsewhere = await start_cluster(loaded)
    channels = ChannelPool()
    servicer = PrefillServicer(PrefillEngine(loaded), channels, cfg.PrefillConfig())
    try:
        assert await servicer._transport(here.decode_address) == "shm"
        assert await servicer._transport(elsewhere.decode_address) == "grpc"
    finally:
        await channels.close()
        await here.stop()
        await elsewhere.stop()


async def test_corrupt_transfer_is_data_loss_and_the_gateway_retries_it(monkeypatch):
    loaded = get_loaded("preset:tiny-llama")
    cluster = await start_cluster(loaded, prefill_options={"kv_transport": "grpc", "kv_streams": 2})
    original = GrpcKVSender._encode
    corrupted = []

    def corrupt_once(self, *args):
        message = original(self, *args)
        if not corrupted:
            corrupted.append(True)
            at = len(message) // 4  # inside the key bytes (K and V are equal halves): flip one bit after the checksum
            message = message[:at] + bytes([message[at] ^ 1]) + message[at + 1:]
        return message

    monkeypatch.setattr(GrpcKVSender, "_encode", corrupt_once)
    try:
        prompt = list(range(40, 90))
        async with AsyncClient(cluster.address) as client:
            result = await client.generate(token_ids=prompt, max_tokens=8, temperature=0, ignore_eos=True)
        assert result.token_ids == reference_greedy(loaded, prompt, 8, ignore_eos=True)
        stats = await decode_pb2_grpc.DecodeStub(grpc.aio.insecure_channel(cluster.decode_address)).GetStats(
            decode_pb2.GetStatsRequest())
        assert corrupted and stats.transfers_rejected == 1 and stats.transfers_completed == 1
        assert stats.kv_blocks_used == 0
    finally:
        await cluster.stop()


class _DyingDecode(decode_pb2_grpc.DecodeServicer):
    """A decode instance that dies mid-transfer: it reads the header and one chunk, then its server stops."""

    def __init__(self) -> None:
        self.server: grpc.aio.Server | None = None
        self.got_chunk = asyncio.Event()

    async def GetStats(self, request, context):
        return decode_pb2.DecodeStats(host_id=shm.host_id())

    async def PushKV(self, request_iterator, context):
        async for message in request_iterator:
            if message.WhichOneof("message") == "chunk":
                self.got_chunk.set()
                await asyncio.sleep(30)  # the server is stopped under us
        return decode_pb2.PushKVReply()


class _ReadingDecode(decode_pb2_grpc.DecodeServicer):
    """Reads every message of a push until the sender ends it."""

    async def PushKV(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        return decode_pb2.PushKVReply()


@contextlib.asynccontextmanager
async def serving_decode(servicer: decode_pb2_grpc.DecodeServicer):
    """``servicer`` as a decode server on port 0: (its address, a channel pool for senders)."""
    server = grpc.aio.server()
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    channels = ChannelPool()
    try:
        yield address, channels
    finally:
        await channels.close()
        await server.stop(0)


async def test_a_push_stream_thread_ends_with_its_transfer():
    """Each KV stream's messages are made on gRPC's thread for the call, which waits there for the transfer's
    next layer: an aborted transfer must not leave it waiting."""
    async with serving_decode(_ReadingDecode()) as (address, channels):
        sender = GrpcKVSender([channels.get_sync(address, lane) for lane in range(2)], address)
        await sender.open(KVLayout("t", num_layers=2, num_tokens=4, kv_heads=2, head_dim=16, dtype="float32"))
        assert len(await kv_push_threads(wait_s=0)) == 2  # both streams wait for their layers
        await sender.abort()
        assert not await kv_push_threads(wait_s=0.8)  # at once, not at the generator's next look at its call


class _RecordingDecode(decode_pb2_grpc.DecodeServicer):
    """Keeps every chunk of a push, in arrival order."""

    def __init__(self) -> None:
        self.chunks: list = []

    async def PushKV(self, request_iterator, context):
        async for message in request_iterator:
            if message.WhichOneof("message") == "chunk":
                self.chunks.append(message.chunk)
        return decode_pb2.PushKVReply(layer_received_ns=[1, 1], layer_written_ns=[1, 1])


async def test_layers_staged_before_the_transfer_opened_go_in_order_once_it_did():
    """The forward pass starts beside ``open`` (it does not wait for decode's round trips): ranges staged
    before the open completed wait for it, then go in the order they were staged, bytes intact."""
    decode = _RecordingDecode()
    opened = asyncio.Event()
    async with serving_decode(decode) as (address, channels):
        sender = GrpcKVSender([channels.get_sync(address)], address)
        original = sender._opening

        async def slow_opening(layout):
            await opened.wait()
            await original(layout)

        sender._opening = slow_opening
        layout = KVLayout("t", num_layers=2, num_tokens=4, kv_heads=2, head_dim=16, dtype="float32")
        opening = asyncio.ensure_future(sender.open(layout))
        kv = [torch.randn(2, 1, 2, 4, 16) for _ in range(2)]  # per layer: K and V, (1, H, T, D)
        await asyncio.to_thread(lambda: [sender.stage(layer, 0, k, v) for layer, (k, v) in enumerate(kv)])
        await asyncio.sleep(0.2)
        assert not decode.chunks and not opening.done()  # staged, held until the transfer is open
        opened.set()
        await opening
        receipt = await sender.finish(7)
        assert [c.layer for c in decode.chunks] == [0, 1]
        for chunk, (k, v) in zip(decode.chunks, kv):
            assert chunk.key == wire.as_bytes_view(k[0].transpose(0, 1).contiguous()).tobytes()
            assert chunk.value == wire.as_bytes_view(v[0].transpose(0, 1).contiguous()).tobytes()
        assert receipt.layer_ready_ns[1] < receipt.opened_ns <= receipt.layer_sent_ns[0]


async def test_a_transfer_aborted_before_it_opened_sends_nothing_it_staged():
    decode = _RecordingDecode()
    async with serving_decode(decode) as (address, channels):
        sender = GrpcKVSender([channels.get_sync(address)], address)
        layout = KVLayout("t", num_layers=1, num_tokens=4, kv_heads=2, head_dim=16, dtype="float32")
        opening = asyncio.ensure_future(sender.open(layout))
        sender.stage(0, 0, torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
        await sender.abort()
        with pytest.raises((grpc.RpcError, PdserveError, asyncio.CancelledError)):
            await opening  # its streams were cancelled under it
        await asyncio.sleep(0.2)
        assert not decode.chunks and not await kv_push_threads()


@pytest.mark.parametrize("transport", ["grpc", "shm"])
async def test_the_forward_pass_runs_while_the_transfer_opens(monkeypatch, transport):
    """A slow open (CUDA IPC's asks decode for the blocks it reserved) delays no prompt's forward pass: the
    pass starts beside it, its layers go once the transfer opened, and decode continues token-exact."""
    original = GrpcKVSender._opening

    async def slow_opening(self, layout):
        await asyncio.sleep(0.5)
        await original(self, layout)

    monkeypatch.setattr(GrpcKVSender, "_opening", slow_opening)
    loaded = get_loaded("preset:tiny-llama")
    cluster = await start_cluster(loaded, prefill_options={"kv_transport": transport, "prefill_chunk_tokens": 16,
                                                           "kv_chunk_bytes": 4096})
    prompt, greedy = PROMPTS[1], common_pb2.SamplingParams(temperature=0)
    try:
        async with grpc.aio.insecure_channel(cluster.decode_address) as dch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{cluster.prefill.port}") as pch:
            call = decode_pb2_grpc.DecodeStub(dch).Generate(decode_pb2.DecodeRequest(
                request_id="o", transfer_id="o/0", prompt_tokens=len(prompt), max_tokens=6, sampling=greedy))
            assert (await call.read()).WhichOneof("event") == "reserved"
            events = [e async for e in prefill_pb2_grpc.PrefillStub(pch).Prefill(prefill_pb2.PrefillRequest(
                request_id="o", token_ids=prompt, sampling=greedy, decode_address=cluster.decode_address,
                transfer_id="o/0"))]
            tokens = [events[0].first_token.token_id]
            while (event := await call.read()) is not grpc.aio.EOF:
                tokens.append(event.token.token_id)
        done = events[-1].transfer_done
        assert done.open_start_ns <= done.forward_start_ns < done.forward_end_ns < done.opened_ns
        assert done.opened_ns - done.open_start_ns >= 0.5e9
        assert tokens == reference_greedy(loaded, prompt, 6)
    finally:
        await cluster.stop()


@pytest.mark.parametrize("tokens,refused_after_s", [(640, 0.0), (3, 0.5)])
async def test_a_transfer_that_fails_to_open_stops_its_forward_pass(monkeypatch, tokens, refused_after_s):
    """Decode refuses the transfer as it opens (CUDA IPC: it restarted, its pool is not the one mapped): the
    prompt's pass, running beside the open, stops instead of computing a prompt nobody can receive, the
    call fails DATA_LOSS (the gateway transfers again elsewhere), and nothing stays in flight. A short
    pass that ended before the refusal fails the same way."""
    async def refused(self, layout):
        await asyncio.sleep(refused_after_s)
        raise DataLoss("decode restarted: the pool mapped here is not its pool any more")

    monkeypatch.setattr(GrpcKVSender, "_opening", refused)
    loaded = get_loaded("preset:tiny-llama")
    cluster = await start_cluster(loaded, prefill_options={"kv_transport": "grpc", "prefill_chunk_tokens": 16,
                                                           "prefill_token_budget": 16})
    prompt, greedy = list(range(10, 10 + tokens)), common_pb2.SamplingParams(temperature=0)  # 640: 40 passes
    try:
        async with grpc.aio.insecure_channel(cluster.decode_address) as dch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{cluster.prefill.port}") as pch:
            call = decode_pb2_grpc.DecodeStub(dch).Generate(decode_pb2.DecodeRequest(
                request_id="f", transfer_id="f/0", prompt_tokens=len(prompt), max_tokens=2, sampling=greedy))
            assert (await call.read()).WhichOneof("event") == "reserved"
            prefill = prefill_pb2_grpc.PrefillStub(pch)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in prefill.Prefill(prefill_pb2.PrefillRequest(
                        request_id="f", token_ids=prompt, sampling=greedy, decode_address=cluster.decode_address,
                        transfer_id="f/0")):
                    pass
            assert failed.value.code() == grpc.StatusCode.DATA_LOSS and "decode restarted" in failed.value.details()
            call.cancel()
            for _ in range(50):
                stats = await prefill.GetStats(prefill_pb2.PrefillStatsRequest())
                if stats.queued_prompts == 0:
                    break
                await asyncio.sleep(0.05)
        assert stats.passes < 40  # stopped, not computed to the end
        assert (stats.queued_prompts, stats.kv_inflight_bytes) == (0, 0)
    finally:
        await cluster.stop()


@pytest.mark.parametrize("transport", ["grpc", "shm"])
async def test_receiver_dying_mid_transfer_leaves_nothing_behind(transport):
    loaded = get_loaded("preset:tiny-llama")
    dying = _DyingDecode()
    server = grpc.aio.server()
    decode_pb2_grpc.add_DecodeServicer_to_server(dying, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = ChannelPool()
    engine = PrefillEngine(loaded)
    servicer = PrefillServicer(engine, channels, cfg.PrefillConfig(kv_transport=transport, kv_chunk_bytes=1024,
                                                                   kv_keep_s=0.3))
    server2 = grpc.aio.server()
    prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server2)
    prefill_port = server2.add_insecure_port("127.0.0.1:0")
    await server2.start()
    before = set(shm.segment_names())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{prefill_port}") as channel:
            call = prefill_pb2_grpc.PrefillStub(channel).Prefill(prefill_pb2.PrefillRequest(
                request_id="r", token_ids=list(range(10, 200)), decode_address=f"127.0.0.1:{port}",
                transfer_id="r/0"))
            await asyncio.wait_for(dying.got_chunk.wait(), 10)
            if transport == "shm":
                assert new_segments(before)  # the segment exists mid-transfer
            await server.stop(0)  # the receiver dies
            events = [event.WhichOneof("event") async for event in call]
            # The prompt was computed: prefill keeps its KV for a re-push elsewhere (Prefill.Repush) and
            # says so; the transfer failed, not this prefill instance.
            assert events == ["first_token", "kv_kept"]
        await asyncio.sleep(0.1)
        assert not new_segments(before), "segment left behind"
        assert servicer.inflight.used > 0 and not await kv_push_threads()  # the kept KV still counts
        await asyncio.sleep(0.4)  # kv_keep_s passed: dropped
        assert servicer.inflight.used == 0
    finally:
        await server2.stop(0)
        await channels.close()
        await engine.close()


async def test_a_slow_receiver_makes_prefill_wait_instead_of_piling_up_kv(tiny_cluster):
    """Backpressure: at most kv_inflight_bytes of unfinished transfers at once, whatever the receiver's speed."""
    loaded = tiny_cluster.loaded
    kv_bytes_per_token = loaded.info.kv.bytes_per_token(loaded.dtype)
    prompt = list(range(10, 110))
    per_request = len(prompt) * kv_bytes_per_token
    received = []

    class SlowDecode(decode_pb2_grpc.DecodeServicer):
        async def GetStats(self, request, context):
            return decode_pb2.DecodeStats()  # no host id: gRPC

        async def PushKV(self, request_iterator, context):
            async for message in request_iterator:
                await asyncio.sleep(0.01)  # a slow reader
                if message.WhichOneof("message") == "trailer":
                    break
            received.append(True)
            return decode_pb2.PushKVReply()

    server = grpc.aio.server()
    decode_pb2_grpc.add_DecodeServicer_to_server(SlowDecode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = ChannelPool()
    engine = PrefillEngine(loaded, kv_inflight_bytes=2 * per_request)
    servicer = PrefillServicer(engine, channels, cfg.PrefillConfig(kv_chunk_bytes=1024, kv_streams=1))
    server2 = grpc.aio.server()
    prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server2)
    prefill_port = server2.add_insecure_port("127.0.0.1:0")
    await server2.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{prefill_port}") as channel:
            stub = prefill_pb2_grpc.PrefillStub(channel)

            async def one(i):
                return [e async for e in stub.Prefill(prefill_pb2.PrefillRequest(
                    request_id=f"r{i}", token_ids=prompt, decode_address=f"127.0.0.1:{port}", transfer_id=f"r{i}"))]

            results = await asyncio.gather(*(one(i) for i in range(8)))
        assert all(len(events) == 2 for events in results) and len(received) == 8
        # Eight requests' KV wanted at once; never more than two transfers' worth held.
        assert servicer.inflight.peak == 2 * per_request and servicer.inflight.used == 0
    finally:
        await server2.stop(0)
        await server.stop(0)
        await channels.close()
        await engine.close()


async def test_int8_wire_moves_a_quarter_of_fp32_bytes_and_keeps_the_first_token():
    """Opt-in int8 is not token-exact, so this checks what it promises: the bytes, and that the request
    decodes; the quality cost is measured by bench/int8_quality.py, not asserted."""
    loaded = get_loaded("preset:tiny-llama")  # float32: 4 heads-dims bytes -> 1, plus scales
    cluster = await start_cluster(loaded, prefill_options={"kv_transport": "auto", "kv_quantization": "int8",
                                                           "kv_chunk_bytes": 4096})
    prompt = list(range(30, 100))
    try:
        async with AsyncClient(cluster.address) as client:
            result = await client.generate(token_ids=prompt, max_tokens=6, temperature=0, ignore_eos=True)
        kv = loaded.info.kv
        exact = 2 * kv.num_layers * len(prompt) * kv.kv_heads * kv.head_dim * 4
        assert exact / 4 < result.server_timings["kv_bytes"] < exact / 3.5
        assert len(result.token_ids) == 6
        assert result.token_ids[0] == reference_greedy(loaded, prompt, 1)[0]  # sampled from prefill's exact logits
    finally:
        await cluster.stop()
