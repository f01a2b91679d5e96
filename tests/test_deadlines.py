"""The client's deadline bounds every hop: the request ends with DEADLINE_EXCEEDED and nothing stays held."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.errors import DeadlineExceeded
from pdserve.sdk import AsyncClient
from pdserve.v1 import decode_pb2, decode_pb2_grpc
from tests.cluster import start_cluster
from tests.conftest import get_loaded


async def test_client_deadline_ends_the_request_everywhere(tiny_cluster):
    async with AsyncClient(tiny_cluster.address, timeout=0.5) as client:
        with pytest.raises(DeadlineExceeded):
            await client.generate(token_ids=[3, 4, 5], max_tokens=2000, temperature=0, ignore_eos=True)
    async with grpc.aio.insecure_channel(tiny_cluster.decode_address) as channel:
        stub = decode_pb2_grpc.DecodeStub(channel)
        for _ in range(100):  # the decode side saw its own deadline pass and freed the request's blocks
            stats = await stub.GetStats(decode_pb2.GetStatsRequest())
            if (stats.running, stats.waiting_for_kv, stats.kv_blocks_used) == (0, 0, 0):
                break
            await asyncio.sleep(0.05)
        assert (stats.running, stats.waiting_for_kv, stats.kv_blocks_used) == (0, 0, 0)


async def test_a_request_without_a_client_deadline_gets_the_gateways_own():
    cluster = await start_cluster(get_loaded("preset:tiny-llama"), gateway_options={"request_timeout_s": 0.5})
    try:
        async with AsyncClient(cluster.address) as client:  # no timeout of its own
            with pytest.raises(DeadlineExceeded, match="deadline"):
                await client.generate(token_ids=[3, 4, 5], max_tokens=2000, temperature=0, ignore_eos=True)
            done = await client.generate(token_ids=[3, 4, 5], max_tokens=4, temperature=0, ignore_eos=True)
        assert len(done.token_ids) == 4
    finally:
        await cluster.stop()
