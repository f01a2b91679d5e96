"""Colocated serving (one engine prefills and decodes) and chunked prefill, through the whole system."""

from __future__ import annotations

import asyncio
import random

import pytest

from pdserve.sdk import AsyncClient
from tests.cluster import reference_greedy, start_cluster
from tests.conftest import get_loaded


def mixed_prompts(vocab: int, seed: int, lengths=(3, 40, 130, 300)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]


async def generate_all(address: str, prompts: list[list[int]], max_tokens: int):
    async with AsyncClient(address) as client:
        return await asyncio.gather(*[client.generate(token_ids=p, max_tokens=max_tokens, temperature=0) for p in prompts])


@pytest.mark.parametrize("chunk", [0, 64], ids=["whole-prompts", "chunked"])
async def test_colocated_default_model_matches_generate(smol, chunk):
    cluster = await start_cluster(smol, colocated=True,
                                  decode_options={"prefill_chunk_tokens": chunk, "prefill_token_budget": 128})
    prompts = mixed_prompts(smol.info.vocab_size, chunk)
    try:
        results = await generate_all(cluster.address, prompts, 12)
        stats = cluster.decode.engine.stats()
    finally:
        await cluster.stop()
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(smol, prompt, 12)
    assert stats["local_prefills"] == len(prompts) and stats["transfers_completed"] == 0
    assert stats["kv_blocks_used"] == 0


async def test_colocated_max_tokens_one_and_eos_on_the_first_token():
    loaded = get_loaded("preset:tiny-llama")
    cluster = await start_cluster(loaded, colocated=True)
    try:
        async with AsyncClient(cluster.address) as client:
            one = await client.generate(token_ids=[5, 6, 7], max_tokens=1, temperature=0)
    finally:
        await cluster.stop()
    assert one.token_ids == reference_greedy(loaded, [5, 6, 7], 1) and one.finish_reason == "length"


async def test_disaggregated_chunked_prefill_streams_each_chunk_and_stays_exact(smol):
    # Prompts longer than the chunk go out chunk by chunk, several prompts share a pass.
    cluster = await start_cluster(smol, prefill_options={"prefill_chunk_tokens": 64, "prefill_token_budget": 96,
                                                         "kv_chunk_bytes": 64 << 10})
    prompts = mixed_prompts(smol.info.vocab_size, 3, lengths=(200, 17, 65, 64, 150))
    try:
        results = await generate_all(cluster.address, prompts, 10)
        engine = cluster.prefill.engine
    finally:
        await cluster.stop()
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(smol, prompt, 10)
        assert result.server_timings["kv_bytes"] == len(prompt) * smol.info.kv.bytes_per_token(smol.dtype)
    assert engine.peak_batch > 1
    # No pass went over the token budget, and the 200-token prompt took at least 4 chunks.
    assert engine.passes >= max(-(-sum(map(len, prompts)) // 96), 4)
