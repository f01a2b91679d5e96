"""KV chunk framing: the hand encoder and decoder agree with protobuf, and broken bytes are DataLoss; CUDA IPC
ranges land in their slots."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.kv_pool import KVPool
from pdserve.errors import DataLoss
from pdserve.kv.cuda_ipc import MAX_COPY_RUNS, copy_runs, scatter_tokens, slot_runs
from pdserve.kv.wire import KVChunkData, decode_message, encode_chunk
from pdserve.model.loader import KVShape
from pdserve.v1 import decode_pb2


def test_hand_encoded_chunk_is_the_protobuf_message_and_decodes_to_views():
    key, value = bytes(range(48)), bytes(range(100, 148))
    data = encode_chunk(3, 17, 2, key, value, 0xDEADBEEF12345678, shm_offset=4096)
    parsed = decode_pb2.KVMessage.FromString(data).chunk
    assert (parsed.layer, parsed.token_start, parsed.token_count, parsed.key, parsed.value, parsed.checksum,
            parsed.shm_offset) == (3, 17, 2, key, value, 0xDEADBEEF12345678, 4096)
    kind, chunk = decode_message(data)
    assert kind == "chunk" and isinstance(chunk.key, memoryview)
    assert chunk == KVChunkData(3, 17, 2, key, value, 0xDEADBEEF12345678, 4096)


def test_a_large_chunk_made_without_the_gil_is_the_protobuf_message():
    """Messages past 64 KiB are assembled by ``memmove`` into a fresh bytes object (the GIL released): the
    same bytes protobuf makes, for views of tensors and for bytes alike."""
    key = torch.arange(300_000, dtype=torch.int32).view(torch.uint8)
    value = bytes(range(256)) * 2_000
    data = encode_chunk(31, 8_000, 4_096, memoryview(key.numpy()), value, 2**64 - 1, key_scales=b"s" * 12,
                        value_scales=b"t" * 4)
    expected = decode_pb2.KVMessage(chunk=decode_pb2.KVChunk(
        layer=31, token_start=8_000, token_count=4_096, key=key.numpy().tobytes(), value=value, checksum=2**64 - 1,
        key_scales=b"s" * 12, value_scales=b"t" * 4)).SerializeToString()
    assert type(data) is bytes and len(data) > 1_000_000
    assert data == expected


def test_a_cuda_ipc_note_for_several_layers_round_trips():
    data = encode_chunk(4, 0, 8_192, b"", b"", 0, layer_count=28)
    assert decode_pb2.KVMessage.FromString(data).chunk.layer_count == 28
    kind, chunk = decode_message(data)
    assert (kind, chunk.layer, chunk.layer_count, chunk.token_count) == ("chunk", 4, 28, 8_192)
    assert decode_message(encode_chunk(4, 0, 1, b"", b""))[1].layer_count == 0  # one layer: field left out


def test_any_field_order_and_unknown_fields_decode_like_protobuf():
    message = decode_pb2.KVMessage(chunk=decode_pb2.KVChunk(value=b"vv", key=b"kk", layer=1, checksum=5))
    data = message.SerializeToString()
    # A field this version does not know (number 15, varint) inside the chunk is skipped.
    inner = data[2:] + b"\x78\x01"
    extended = b"\x12" + bytes([len(inner)]) + inner
    for raw in (data, extended):
        kind, chunk = decode_message(raw)
        assert (kind, chunk.layer, bytes(chunk.key), bytes(chunk.value), chunk.checksum) == ("chunk", 1, b"kk", b"vv", 5)


def test_header_and_trailer_decode_through_protobuf():
    kind, header = decode_message(decode_pb2.KVMessage(header=decode_pb2.KVHeader(transfer_id="t")).SerializeToString())
    assert kind == "header" and header.transfer_id == "t"
    kind, trailer = decode_message(decode_pb2.KVMessage(trailer=decode_pb2.KVTrailer(first_token_id=9)).SerializeToString())
    assert kind == "trailer" and trailer.first_token_id == 9
    assert decode_message(b"") == ("", None)


@pytest.mark.parametrize("cut", range(1, 20))
def test_every_truncation_is_data_loss(cut):
    data = encode_chunk(1, 0, 2, b"k" * 8, b"v" * 8, 7)
    with pytest.raises(DataLoss):
        decode_message(data[:-cut])


def test_int8_error_is_within_half_a_step_per_channel_for_k_and_per_token_for_v():
    import torch

    from pdserve.kv.wire import dequantize_int8, quantize_int8

    g = torch.Generator().manual_seed(0)
    k = torch.randn(37, 3, 16, generator=g) * torch.linspace(0.1, 10, 16)  # channels of very different range
    v = torch.randn(37, 3, 16, generator=g) * torch.linspace(0.1, 10, 37)[:, None, None]  # tokens likewise
    k8, v8, ks, vs = quantize_int8(k, v)
    assert (k8.dtype, v8.dtype, ks.shape, vs.shape) == (torch.int8, torch.int8, (3, 16), (37,))
    dk, dv = dequantize_int8(k8, v8, ks, vs, torch.float32)
    assert ((dk - k).abs() <= ks / 2 + 1e-6).all()
    assert ((dv - v).abs() <= vs[:, None, None] / 2 + 1e-6).all()


def test_int8_chunk_carries_its_scales():
    data = encode_chunk(0, 0, 2, b"k" * 4, b"v" * 4, 1, key_scales=b"s" * 8, value_scales=b"t" * 8)
    parsed = decode_pb2.KVMessage.FromString(data).chunk
    assert (parsed.key_scales, parsed.value_scales) == (b"s" * 8, b"t" * 8)
    _, chunk = decode_message(data)
    assert (bytes(chunk.key_scales), bytes(chunk.value_scales)) == (b"s" * 8, b"t" * 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [128, 3])  # 3: rows that are no whole number of words
def test_scatter_tokens_puts_each_token_in_its_slot(dtype, head_dim):
    """A CUDA IPC range lands in decode's reserved slots as 8-byte words where it can: the same bytes as
    ``pool[slots] = source``, from a (T, H, D) view of attention's (H, T, D) states."""
    states = torch.randn(4, 37, head_dim).to(dtype)
    source = states.transpose(0, 1)  # (T, H, D), not contiguous
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:37]
    pool, expected = torch.zeros(64, 4, head_dim, dtype=dtype), torch.zeros(64, 4, head_dim, dtype=dtype)
    expected[slots] = source
    scatter_tokens(pool, slots, source)
    assert torch.equal(pool, expected)


def test_slot_runs_cover_each_token_once_and_copy_runs_puts_it_in_its_slot():
    """A chunk from the host lands by plain copies, one per run of consecutive slots of its block table
    (blocks handed out in order, a few out of place, and a chunk starting mid-block)."""
    block_size, table = 4, [3, 4, 5, 9, 1, 2, 7]
    tokens = len(table) * block_size
    slots = torch.tensor([table[t // block_size] * block_size + t % block_size for t in range(tokens)])
    for start, count in [(0, tokens), (2, 13), (5, 1), (8, 4)]:
        runs = slot_runs(table, block_size, start, count)
        covered = [slot + i for _, slot, n in runs for i in range(n)]
        assert covered == slots[start:start + count].tolist()
        assert sum(n for _, _, n in runs) == count and [o for o, _, _ in runs] == sorted({o for o, _, _ in runs})
        source = torch.randn(count, 2, 3)
        pool, expected = torch.zeros(40, 2, 3), torch.zeros(40, 2, 3)
        expected[slots[start:start + count]] = source
        copy_runs(pool, runs, source)
        assert torch.equal(pool, expected)
    assert slot_runs(table, block_size, 0, tokens) == [(0, 12, 12), (12, 36, 4), (16, 4, 8), (24, 28, 4)]
    # Fragmented beyond MAX_COPY_RUNS runs: None (one scatter instead), and a pool writes it all the same.
    scattered = list(range(2 * MAX_COPY_RUNS + 1, 0, -2))
    assert slot_runs(scattered, block_size, 0, len(scattered) * block_size) is None
    assert len(slot_runs(scattered[:MAX_COPY_RUNS], block_size, 0, MAX_COPY_RUNS * block_size)) == MAX_COPY_RUNS
    kv = KVShape(num_layers=1, kv_heads=2, head_dim=3)
    pool = KVPool(kv, torch.float32, torch.device("cpu"), budget=kv.bytes_per_token(torch.float32) * 40 * block_size,
                  block_size=block_size)
    for blocks in (scattered, table):
        keys, values = torch.randn(len(blocks) * block_size, 2, 3), torch.randn(len(blocks) * block_size, 2, 3)
        pool.write(blocks, 0, 0, keys, values)
        assert all(torch.equal(a, b) for a, b in zip(pool.read(blocks, 0, len(keys)), (keys, values)))
