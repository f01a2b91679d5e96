"""Scheduling policies as pure logic: load-aware picks, conditional disaggregation, exclusion and fallback."""

from __future__ import annotations

import asyncio
import random

from pdserve.sdk import AsyncClient
from pdserve.v1 import decode_pb2
from services.gateway.scheduler import LoadAwareScheduler, Registry, RoundRobinScheduler
from tests.cluster import reference_greedy, start_cluster
from tests.conftest import get_loaded

P = ("p0:1", "p1:1", "p2:1")
D = ("d0:1", "d1:1")


def stats(used: int, running: int, total: int = 100, max_batch: int = 32, queued: int = 0) -> decode_pb2.DecodeStats:
    return decode_pb2.DecodeStats(kv_blocks_total=total, kv_blocks_used=used, kv_block_size=16, running=running,
                                  max_batch=max_batch, queued=queued)


def test_prefill_goes_to_the_less_loaded_of_two_random_choices():
    sched = LoadAwareScheduler(Registry(P, D), rng=random.Random(0))
    sched.begin("prefill", "p0:1", 5000)
    sched.begin("prefill", "p1:1", 100)
    picks = [sched.pick_prefill(64) for _ in range(300)]
    # The busiest instance only wins a pair it is not in: never.
    assert "p0:1" not in picks
    # p1 (100 outstanding) loses every pair with idle p2 and wins none against it.
    assert picks.count("p2:1") > picks.count("p1:1") > 0
    sched.end("prefill", "p0:1", 5000)
    sched.end("prefill", "p1:1", 100)
    assert sum(sched.tokens.values()) == 0 and sum(sched.requests.values()) == 0


def test_decode_goes_where_kv_pool_and_batch_are_least_occupied():
    registry = Registry(P, D)
    sched = LoadAwareScheduler(registry, rng=random.Random(0))
    registry.stats = {"d0:1": stats(used=80, running=4), "d1:1": stats(used=10, running=20)}
    # d0: 0.80 + 4/32 = 0.925; d1: 0.10 + 20/32 = 0.725
    assert sched.pick_decode(10, 10) == "d1:1"
    registry.stats["d1:1"] = stats(used=10, running=30)  # 0.10 + 0.94 = 1.04
    assert sched.pick_decode(10, 10) == "d0:1"
    # Between reports the gateway's own count of what it sent counts too.
    sched.begin("decode", "d0:1", 100 * 16)  # a full pool's worth
    assert sched.pick_decode(10, 10) == "d1:1"


def test_decode_without_reports_balances_requests_in_flight():
    sched = LoadAwareScheduler(Registry(P, D), rng=random.Random(1))
    for _ in range(6):
        addr = sched.pick_decode(8, 8)
        sched.begin("decode", addr, 16)
    assert sched.requests["d0:1"] == sched.requests["d1:1"] == 3


def test_conditional_disaggregation_short_prompts_and_a_full_prefill_pool():
    sched = LoadAwareScheduler(Registry(P, D), local_prefill_tokens=32, prefill_full_tokens=1000,
                               rng=random.Random(0))
    assert sched.pick_prefill(32) == ""          # short: prefilled on decode
    assert sched.pick_prefill(33) in P
    for addr in P:
        sched.begin("prefill", addr, 1000)       # every prefill instance is full
    assert sched.pick_prefill(500) == ""
    sched.end("prefill", "p2:1", 1000)
    assert sched.pick_prefill(500) in P
    assert sched.local_prefills == 2
    # Off by default.
    assert LoadAwareScheduler(Registry(P, D)).pick_prefill(1) in P


def test_failed_instances_are_avoided_and_all_down_falls_back_to_configured():
    registry = Registry(P, D)
    for sched in (LoadAwareScheduler(registry, rng=random.Random(2)), RoundRobinScheduler(registry)):
        assert {sched.pick_decode(8, 8, exclude=frozenset({"d0:1"})) for _ in range(10)} == {"d1:1"}
        registry.mark_down("d1:1", "test")
        assert {sched.pick_decode(8, 8) for _ in range(10)} == {"d0:1"}
        registry.mark_down("d0:1", "test")
        assert {sched.pick_decode(8, 8) for _ in range(20)} <= set(D)  # all look down: any configured one
        registry._mark_up("d0:1")
        registry._mark_up("d1:1")
    assert RoundRobinScheduler(Registry((), D)).pick_prefill(8) == ""  # colocated cluster


async def test_short_prompts_prefill_on_decode_long_ones_on_prefill_all_exact():
    loaded = get_loaded("preset:tiny-llama")
    cluster = await start_cluster(loaded, gateway_options={"local_prefill_tokens": 16})
    prompts = [[7] * 5, list(range(3, 40)), [9, 8, 7] * 5, list(range(100, 160))]
    try:
        async with AsyncClient(cluster.address) as client:
            results = await asyncio.gather(*(client.generate(token_ids=p, max_tokens=8, temperature=0,
                                                             ignore_eos=True) for p in prompts))
        for prompt, result in zip(prompts, results):
            assert result.token_ids == reference_greedy(loaded, prompt, 8, ignore_eos=True)
        assert cluster.decode.engine.counters.local_prefills == 2  # the two prompts of <= 16 tokens
        assert cluster.decode.engine.counters.transfers_completed == 2
        scheduler = cluster.gateway.engine._scheduler
        assert scheduler.local_prefills == 2
        assert sum(scheduler.tokens.values()) == 0 and sum(scheduler.requests.values()) == 0
    finally:
        await cluster.stop()
