"""The decode server validates every KV push, rejects a bad one precisely, frees it, and keeps serving."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from pdserve.kv import shm
from pdserve.kv.wire import checksum
from pdserve.sdk import AsyncClient
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from tests.cluster import reference_greedy

# tiny-llama: 4 layers, 2 KV heads, head_dim 16, float32.
LAYERS, HEADS, DIM, TOKENS = 4, 2, 16, 5
TOKEN_BYTES = HEADS * DIM * 4
_ids = itertools.count()


def header(tid: str, **overrides) -> decode_pb2.KVMessage:
    fields = dict(transfer_id=tid, num_layers=LAYERS, num_tokens=TOKENS, kv_heads=HEADS, head_dim=DIM, dtype="float32")
    fields.update(overrides)
    return decode_pb2.KVMessage(header=decode_pb2.KVHeader(**fields))


def chunk(layer: int, start: int = 0, count: int = TOKENS, nbytes: int | None = None) -> decode_pb2.KVMessage:
    size = count * TOKEN_BYTES if nbytes is None else nbytes
    return decode_pb2.KVMessage(chunk=decode_pb2.KVChunk(layer=layer, token_start=start, token_count=count,
                                                         key=b"\0" * size, value=b"\0" * size))


def trailer(token: int = 7) -> decode_pb2.KVMessage:
    return decode_pb2.KVMessage(trailer=decode_pb2.KVTrailer(first_token_id=token))


def signed_transfer(tid: str, corrupt_layer: int | None = None) -> list[decode_pb2.KVMessage]:
    """A whole transfer with checksums, each layer's K bytes its own; ``corrupt_layer``: a byte of that layer's
    V flipped after it was signed."""
    messages = [header(tid, checksums=True)]
    for layer in range(LAYERS):
        m = chunk(layer)
        m.chunk.key = bytes([layer + 1]) * len(m.chunk.key)
        m.chunk.checksum = checksum(m.chunk.key, m.chunk.value)
        if layer == corrupt_layer:
            m.chunk.value = b"\1" + m.chunk.value[1:]
        messages.append(m)
    return [*messages, trailer()]


async def check_push_outcome(result, waiting, corrupt_layer: int | None) -> None:
    """A corrupt push failed with DATA_LOSS naming the layer, and so did the request waiting for it; a good one
    delivered every byte and the request generates."""
    if corrupt_layer is not None:
        assert isinstance(result, grpc.aio.AioRpcError), result
        assert result.code() == grpc.StatusCode.DATA_LOSS, result
        assert f"checksum mismatch in layer {corrupt_layer}" in result.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await waiting.read()
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
    else:
        assert isinstance(result, decode_pb2.PushKVReply), result
        assert result.bytes_received == 2 * LAYERS * TOKENS * TOKEN_BYTES
        event = await waiting.read()
        assert event.WhichOneof("event") == "token" and event.token.index == 1  # after prefill's token
        waiting.cancel()


def full_layers() -> list[decode_pb2.KVMessage]:
    return [chunk(layer) for layer in range(LAYERS)]


def another_transfers_segment(tid: str) -> list[decode_pb2.KVMessage]:
    """A stream pointing decode at a real segment that holds another transfer's KV (its name is visible to
    anyone on the host): what it says must not be read into this reservation."""
    segment = shm.Segment.create(shm.SEGMENT_HEADER + 2 * LAYERS * TOKENS * TOKEN_BYTES)
    _segments.append(segment)
    segment.stamp("a-victims-transfer")
    offset = lambda layer: shm.SEGMENT_HEADER + 2 * TOKEN_BYTES * layer * TOKENS  # noqa: E731
    chunks = [decode_pb2.KVMessage(chunk=decode_pb2.KVChunk(layer=layer, token_start=0, token_count=TOKENS,
                                                            shm_offset=offset(layer)))
              for layer in range(LAYERS)]
    return [header(tid, shm_segment=segment.name, checksums=False), *chunks, trailer()]


_segments: list = []


@pytest.fixture(autouse=True, scope="module")
def _remove_segments():
    yield
    for segment in _segments:
        segment.close()
        shm.unlink(segment.name)


CASES = {
    "another transfer's segment": (another_transfers_segment, "does not hold this transfer's KV"),
    "layer count": (lambda tid: [header(tid, num_layers=3), *full_layers(), trailer()], "header.num_layers: got 3, expected 4"),
    "kv heads": (lambda tid: [header(tid, kv_heads=4), *full_layers(), trailer()], "header.kv_heads: got 4, expected 2"),
    "head dim": (lambda tid: [header(tid, head_dim=8), *full_layers(), trailer()], "header.head_dim: got 8, expected 16"),
    "token count": (lambda tid: [header(tid, num_tokens=9), *full_layers(), trailer()], "header.num_tokens: got 9, expected 5"),
    "dtype": (lambda tid: [header(tid, dtype="bfloat16"), *full_layers(), trailer()], "header.dtype: got bfloat16"),
    "unknown dtype": (lambda tid: [header(tid, dtype="int4"), *full_layers(), trailer()], "header.dtype: unsupported"),
    "chunk shape": (lambda tid: [header(tid), chunk(0, nbytes=17), trailer()], "chunk.key: 17 bytes for 5 tokens"),
    "layer out of range": (lambda tid: [header(tid), chunk(4), trailer()], "chunk.layer: 4 outside [0, 4)"),
    "duplicate layer": (lambda tid: [header(tid), chunk(0), chunk(0), trailer()], "duplicate data for layer 0"),
    "gap": (lambda tid: [header(tid), chunk(0, start=2, count=3), trailer()], "gap in layer 0"),
    "missing layers": (lambda tid: [header(tid), chunk(0), chunk(1), trailer()], "layers [2, 3] missing"),
    "no trailer": (lambda tid: [header(tid), *full_layers()], "ended before the KVTrailer"),
    "bad first token": (lambda tid: [header(tid), *full_layers(), trailer(5000)], "first_token_id: 5000 outside"),
    "no header": (lambda tid: [chunk(0), trailer()], "first message must be a KVHeader"),
    "stream index": (lambda tid: [header(tid, num_streams=2, stream_index=2), *full_layers(), trailer()],
                     "header.stream_index: 2 outside [0, 2)"),
    "segment name": (lambda tid: [header(tid, shm_segment="../../etc/passwd"), *full_layers(), trailer()],
                     "is not a pdserve KV segment name"),
    "missing segment": (lambda tid: [header(tid, shm_segment="pdserve-kv-1-0123456789abcdef"), trailer()],
                        "cannot open"),
    "unknown quantization": (lambda tid: [header(tid, quantization="int4"), *full_layers(), trailer()],
                             "header.quantization: 'int4' unsupported"),
    "int8 over shm": (lambda tid: [header(tid, quantization="int8", shm_segment="pdserve-kv-1-0123456789abcdef"),
                                   trailer()], "int8 travels over gRPC only"),
    "layer range over grpc": (lambda tid: [header(tid), decode_pb2.KVMessage(chunk=decode_pb2.KVChunk(
        layer=0, token_start=0, token_count=TOKENS, layer_count=LAYERS)), trailer()],
        "only a CUDA IPC transfer may send"),
    "int8 without scales": (lambda tid: [header(tid, quantization="int8"), chunk(0, nbytes=TOKENS * HEADS * DIM),
                                         trailer()], "chunk.key_scales: 0 bytes"),
}


async def push(stub, messages) -> grpc.aio.AioRpcError | decode_pb2.PushKVReply:
    async def gen():
        for m in messages:
            yield m

    try:
        return await stub.PushKV(gen(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc


async def reserve(stub, tid: str):
    call = stub.Generate(decode_pb2.DecodeRequest(
        request_id=tid, transfer_id=tid, prompt_tokens=TOKENS, max_tokens=4,
        sampling=common_pb2.SamplingParams(temperature=0)))
    first = await call.read()
    assert first.WhichOneof("event") == "reserved"
    return call


async def stats(stub) -> decode_pb2.DecodeStats:
    return await stub.GetStats(decode_pb2.GetStatsRequest())


@pytest.fixture
async def decode_stub(tiny_cluster):
    async with grpc.aio.insecure_channel(tiny_cluster.decode_address) as channel:
        yield decode_pb2_grpc.DecodeStub(channel)


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_push_is_rejected_freed_and_serving_continues(tiny_cluster, decode_stub, case):
    build, message = CASES[case]
    tid = f"bad-{next(_ids)}"
    waiting = await reserve(decode_stub, tid)
    before = await stats(decode_stub)

    result = await push(decode_stub, build(tid))

    assert isinstance(result, grpc.aio.AioRpcError), f"{case}: push was accepted"
    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, result.code(), result.details())
    assert message in result.details()
    if case != "no header":
        # The request waiting for this transfer fails with DATA_LOSS, naming why.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await waiting.read()
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        assert message in info.value.details()
        after = await stats(decode_stub)
        assert after.transfers_rejected == before.transfers_rejected + 1
    else:
        waiting.cancel()
        await asyncio.sleep(0.05)
    after = await stats(decode_stub)
    assert (after.waiting_for_kv, after.ready, after.running, after.kv_blocks_used) == (0, 0, 0, 0), "nothing may stay reserved"
    # ... and the server keeps serving.
    prompt = [11, 12, 13, 14, 15, 16]
    async with AsyncClient(tiny_cluster.address) as client:
        result = await client.generate(token_ids=prompt, max_tokens=6, temperature=0)
    assert result.token_ids == reference_greedy(tiny_cluster.loaded, prompt, 6)


async def test_unknown_transfer_id_is_not_found(decode_stub):
    result = await push(decode_stub, [header("nobody-reserved-this"), *full_layers(), trailer()])
    assert result.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody-reserved-this" in result.details()


async def test_valid_push_completes_and_generates(decode_stub):
    tid = f"good-{next(_ids)}"
    waiting = await reserve(decode_stub, tid)
    reply = await push(decode_stub, [header(tid), *full_layers(), trailer(7)])
    assert reply.bytes_received == 2 * LAYERS * TOKENS * TOKEN_BYTES
    events = []
    while (event := await waiting.read()) is not grpc.aio.EOF:
        events.append(event)
    assert [e.token.index for e in events] == [1, 2, 3]
    assert events[-1].token.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_cancelled_request_mid_transfer_frees_everything(decode_stub):
    tid = f"cancel-{next(_ids)}"
    waiting = await reserve(decode_stub, tid)
    queue: asyncio.Queue = asyncio.Queue()

    async def gen():
        while (m := await queue.get()) is not None:
            yield m

    call = decode_stub.PushKV(gen(), timeout=10)
    await queue.put(header(tid))
    await queue.put(chunk(0))
    await asyncio.sleep(0.1)
    assert (await stats(decode_stub)).waiting_for_kv == 1
    waiting.cancel()  # the gateway gave up on the request
    await asyncio.sleep(0.1)
    await queue.put(chunk(1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.CANCELLED
    after = await stats(decode_stub)
    assert (after.waiting_for_kv, after.ready, after.running, after.kv_blocks_used) == (0, 0, 0, 0)


async def test_corrupt_chunk_is_data_loss_and_frees_everything(decode_stub):
    from pdserve.kv.wire import checksum

    tid = f"corrupt-{next(_ids)}"
    waiting = await reserve(decode_stub, tid)
    messages = [header(tid, checksums=True)]
    for layer in range(LAYERS):
        m = chunk(layer)
        m.chunk.checksum = checksum(m.chunk.key, m.chunk.value)
        messages.append(m)
    messages[2].chunk.value = b"\1" + messages[2].chunk.value[1:]  # one flipped byte in layer 1
    result = await push(decode_stub, [*messages, trailer()])
    assert result.code() == grpc.StatusCode.DATA_LOSS and "checksum mismatch in layer 1" in result.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await waiting.read()
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    after = await stats(decode_stub)
    assert (after.waiting_for_kv, after.kv_blocks_used) == (0, 0)


@pytest.mark.parametrize("cut", ["truncated", "bad length"])
async def test_broken_framing_is_data_loss(tiny_cluster, decode_stub, cut):
    """Bytes that no longer parse as a KVMessage are corruption on the way: DATA_LOSS, so the gateway retries."""
    tid = f"framing-{next(_ids)}"
    waiting = await reserve(decode_stub, tid)
    raw = chunk(0).SerializeToString()
    broken = raw[:len(raw) // 2] if cut == "truncated" else raw[:2] + b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff" + raw[2:]
    async with grpc.aio.insecure_channel(tiny_cluster.decode_address) as channel:
        call = channel.stream_unary("/pdserve.v1.Decode/PushKV", request_serializer=None,
                                    response_deserializer=decode_pb2.PushKVReply.FromString)(timeout=10)
        for message in (header(tid).SerializeToString(), broken, trailer().SerializeToString()):
            await call.write(message)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()
    with pytest.raises(grpc.aio.AioRpcError):
        await waiting.read()
    after = await stats(decode_stub)
    assert (after.waiting_for_kv, after.kv_blocks_used) == (0, 0)


async def test_two_streams_complete_one_transfer(decode_stub):
    tid = f"streams-{next(_ids)}"
    waiting = await reserve(decode_stub, tid)
    even = push(decode_stub, [header(tid, num_streams=2, stream_index=0), chunk(0), chunk(2), trailer(7)])
    odd = push(decode_stub, [header(tid, num_streams=2, stream_index=1), chunk(1), chunk(3), trailer(7)])
    replies = await asyncio.gather(even, odd)
    assert sum(r.bytes_received for r in replies) == 2 * LAYERS * TOKENS * TOKEN_BYTES
    events = []
    while (event := await waiting.read()) is not grpc.aio.EOF:
        events.append(event)
    assert [e.token.index for e in events] == [1, 2, 3]


async def test_rejection_reaches_a_sender_still_writing(tiny_cluster, decode_stub):
    """The sender learns the real code even when the server rejects while it is mid-stream (grpc/grpc#36066)."""
    big = [chunk(0, nbytes=1 << 20)] * 64  # rejected on the first chunk; 64 MiB still to write
    for _ in range(3):
        tid = f"bad-{next(_ids)}"
        waiting = await reserve(decode_stub, tid)
        result = await push(decode_stub, [header(tid), *big, trailer()])
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, (result.code(), result.details())
        with pytest.raises(grpc.aio.AioRpcError):
            await waiting.read()
