"""Admission under overload, through the whole system: bounded memory, a clear refusal, nothing hangs or leaks."""

from __future__ import annotations

import asyncio
import random

from pdserve.errors import ResourceExhausted
from pdserve.sdk import AsyncClient
from tests.cluster import reference_greedy, start_cluster
from tests.conftest import get_loaded


async def test_overload_completes_or_refuses_every_request_and_the_pool_drains():
    loaded = get_loaded("preset:tiny-llama")
    kv_token_bytes = loaded.info.kv.bytes_per_token(loaded.dtype)
    # Room for 4 requests of (<= 60 prompt + 40 output) tokens at a time (7 blocks of 16 each), 4 more may queue.
    budget = (4 * 7 + 1) * 16 * kv_token_bytes
    cluster = await start_cluster(loaded, decode_options={"kv_budget": str(budget), "kv_block_size": 16,
                                                          "max_queued": 4, "max_batch": 8})
    engine = cluster.decode.engine
    rng = random.Random(4)
    requests = [[rng.randrange(loaded.info.vocab_size) for _ in range(rng.randint(20, 60))] for _ in range(24)]
    peaks: list[int] = []

    async def watch() -> None:
        while True:
            peaks.append(engine.stats()["kv_blocks_used"])
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        async with AsyncClient(cluster.address) as client:
            outcomes = await asyncio.wait_for(asyncio.gather(
                *[client.generate(token_ids=p, max_tokens=40, temperature=0, ignore_eos=True) for p in requests],
                return_exceptions=True), timeout=120)
        await asyncio.sleep(0.1)
        stats = engine.stats()
    finally:
        watcher.cancel()
        await cluster.stop()
    completed = [(p, o) for p, o in zip(requests, outcomes) if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, ResourceExhausted) for o in refused), refused
    assert all(o.retry_after_ms and o.retry_after_ms > 0 and "retry after" in str(o) for o in refused)
    # All 24 arrive at once: 4 run, 4 queue, the rest are refused; queued ones finish later.
    assert len(completed) >= 8 and len(refused) >= 8 and len(completed) + len(refused) == 24
    assert stats["refused"] == len(refused)
    for prompt, result in completed:
        assert result.token_ids == reference_greedy(loaded, prompt, 40, ignore_eos=True)
    assert max(peaks) <= stats["kv_blocks_total"] and stats["kv_blocks_peak"] <= stats["kv_blocks_total"]
    assert stats["kv_cache_bytes"] <= budget
    assert (stats["kv_blocks_used"], stats["queued"], stats["running"], stats["waiting_for_kv"]) == (0, 0, 0, 0)


async def test_a_request_larger_than_the_whole_pool_is_invalid_not_queued():
    loaded = get_loaded("preset:tiny-llama")
    budget = 5 * 16 * loaded.info.kv.bytes_per_token(loaded.dtype)
    cluster = await start_cluster(loaded, decode_options={"kv_budget": str(budget), "kv_block_size": 16})
    try:
        async with AsyncClient(cluster.address) as client:
            try:
                await client.generate(token_ids=list(range(10, 90)), max_tokens=10, temperature=0)
            except Exception as exc:  # noqa: BLE001 - inspected below
                error = exc
    finally:
        await cluster.stop()
    assert error.status == "INVALID_ARGUMENT" and "needs 6 KV blocks" in str(error) and "4 in all" in str(error)
