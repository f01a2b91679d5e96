"""Per-layer KV streaming: layers reach decode while prefill's forward pass is still running."""

from __future__ import annotations

import grpc

from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc


async def test_first_layer_reaches_decode_before_the_forward_pass_ends(smol, smol_cluster):
    prompt = smol.info.tokenizer("The history of astronomy " * 150)["input_ids"]  # ~750 tokens
    tid = "overlap-1"
    async with grpc.aio.insecure_channel(smol_cluster.decode_address) as dch, \
            grpc.aio.insecure_channel(f"127.0.0.1:{smol_cluster.prefill.port}") as pch:
        decode = decode_pb2_grpc.DecodeStub(dch).Generate(decode_pb2.DecodeRequest(
            request_id=tid, transfer_id=tid, prompt_tokens=len(prompt), max_tokens=3,
            sampling=common_pb2.SamplingParams(temperature=0)))
        assert (await decode.read()).WhichOneof("event") == "reserved"
        events = [e async for e in prefill_pb2_grpc.PrefillStub(pch).Prefill(prefill_pb2.PrefillRequest(
            request_id=tid, token_ids=prompt, sampling=common_pb2.SamplingParams(temperature=0),
            decode_address=smol_cluster.decode_address, transfer_id=tid))]
        tokens = []
        while (event := await decode.read()) is not grpc.aio.EOF:
            tokens.append(event)
    first, done = events[0].first_token, events[1].transfer_done
    assert done.layers == smol.info.kv.num_layers
    assert done.bytes == len(prompt) * smol.info.kv.bytes_per_token(smol.dtype)
    # Both clocks are CLOCK_MONOTONIC on this host.
    assert done.forward_start_ns < done.first_chunk_received_ns < done.forward_end_ns
    # Most of the KV was on the decode side before the forward pass finished.
    forward = done.forward_end_ns - done.forward_start_ns
    assert done.first_chunk_received_ns - done.forward_start_ns < forward / 2
    assert first.forward_ms > 0
    # Every layer: ready at prefill <= sent <= arrived at decode <= written into its pool, and all but the
    # last layer were written before the forward pass ended (the transfer hides behind it).
    per_layer = list(zip(done.layer_ready_ns, done.layer_sent_ns, done.layer_received_ns, done.layer_written_ns))
    assert len(per_layer) == smol.info.kv.num_layers
    assert all(0 < ready <= sent <= received <= written for ready, sent, received, written in per_layer)
    assert sum(written < done.forward_end_ns for *_, written in per_layer) >= len(per_layer) - 1
    assert [t.token.index for t in tokens] == [1, 2]
