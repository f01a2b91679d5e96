"""Resuming a stream: the gateway continues a request from the tokens the client already has, exactly."""

from __future__ import annotations

import grpc
import pytest

from pdserve.sdk.client import build_request
from pdserve.v1 import gateway_pb2_grpc


async def chunks_of(address: str, request) -> list:
    async with grpc.aio.insecure_channel(address) as channel:
        return [c async for c in gateway_pb2_grpc.GatewayStub(channel).Generate(request)]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.95)])
async def test_a_resumed_stream_continues_with_the_same_tokens_and_text(smol_cluster, sampling):
    args = dict(prompt="Write a short poem about rivers.", max_tokens=40, ignore_eos=True, **sampling)
    full = await chunks_of(smol_cluster.address, build_request(**args))
    assert full[0].HasField("seed") and not full[1].HasField("seed")  # the seed in use, on the first chunk
    tokens = [t for c in full for t in c.token_ids]
    for k in (1, 17, 39):
        request = build_request(seed=full[0].seed, **args)
        request.resume_token_ids.extend(tokens[:k])
        rest = await chunks_of(smol_cluster.address, request)
        assert [c.index for c in rest] == list(range(k, 40))
        assert [t for c in rest for t in c.token_ids] == tokens[k:]
        assert "".join(c.text for c in full[:k]) + "".join(c.text for c in rest) == "".join(c.text for c in full)
        assert rest[-1].usage.completion_tokens == 40


async def test_resume_errors_name_the_field(smol_cluster):
    finished = build_request(token_ids=[1, 2, 3], max_tokens=2, temperature=0)
    finished.resume_token_ids.extend([5, 6])
    unseeded = build_request(token_ids=[1, 2, 3], max_tokens=8, temperature=0.7)  # sampled, no seed
    unseeded.resume_token_ids.extend([5])
    for request, needle in ((finished, "resume_token_ids: the request finished (length) at index 1"),
                            (unseeded, "sampling.seed")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await chunks_of(smol_cluster.address, request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()
