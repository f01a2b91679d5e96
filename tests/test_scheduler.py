"""Scheduling and membership: load-aware picks, conditional disaggregation, exclusion and fallback, DNS
expansion of configured names, instances joining by heartbeats and leaving when they drain."""

from __future__ import annotations

import asyncio
import random

from pdserve.sdk import AsyncClient
from pdserve.v1 import decode_pb2
from pdserve import config as cfg
from services.decode.server import start_decode
from services.gateway.scheduler import LoadAwareScheduler, Registry, RoundRobinScheduler, resolve
from services.gateway.server import start_gateway
from services.prefill.server import start_prefill
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
    picks = [sched.pick_prefill(range(64)) for _ in range(300)]
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
    assert sched.pick_decode(range(10), 10) == "d1:1"
    registry.stats["d1:1"] = stats(used=10, running=30)  # 0.10 + 0.94 = 1.04
    assert sched.pick_decode(range(10), 10) == "d0:1"
    # Between reports the gateway's own count of what it sent counts too.
    sched.begin("decode", "d0:1", 100 * 16)  # a full pool's worth
    assert sched.pick_decode(range(10), 10) == "d1:1"


def test_decode_without_reports_balances_requests_in_flight():
    sched = LoadAwareScheduler(Registry(P, D), rng=random.Random(1))
    for _ in range(6):
        addr = sched.pick_decode(range(8), 8)
        sched.begin("decode", addr, 16)
    assert sched.requests["d0:1"] == sched.requests["d1:1"] == 3


def test_conditional_disaggregation_short_prompts_and_a_full_prefill_pool():
    sched = LoadAwareScheduler(Registry(P, D), local_prefill_tokens=32, prefill_full_tokens=1000,
                               rng=random.Random(0))
    assert sched.pick_prefill(range(32)) == ""          # short: prefilled on decode
    assert sched.pick_prefill(range(33)) in P
    for addr in P:
        sched.begin("prefill", addr, 1000)       # every prefill instance is full
    assert sched.pick_prefill(range(500)) == ""
    sched.end("prefill", "p2:1", 1000)
    assert sched.pick_prefill(range(500)) in P
    assert sched.local_prefills == 2
    # Off by default.
    assert LoadAwareScheduler(Registry(P, D)).pick_prefill(range(1)) in P


def test_failed_instances_are_avoided_and_all_down_falls_back_to_configured():
    registry = Registry(P, D)
    assert registry.up("decode") == [] and not registry.ready  # nothing is up before a health check says so
    for address in P + D:
        registry._mark_up(address)
    assert registry.ready
    for sched in (LoadAwareScheduler(registry, rng=random.Random(2)), RoundRobinScheduler(registry)):
        assert {sched.pick_decode(range(8), 8, exclude=frozenset({"d0:1"})) for _ in range(10)} == {"d1:1"}
        registry.mark_down("d1:1", "test")
        assert {sched.pick_decode(range(8), 8) for _ in range(10)} == {"d0:1"}
        registry.mark_down("d0:1", "test")
        assert {sched.pick_decode(range(8), 8) for _ in range(20)} <= set(D)  # all look down: any configured one
        registry._mark_up("d0:1")
        registry._mark_up("d1:1")
    assert RoundRobinScheduler(Registry((), D)).pick_prefill(range(8)) == ""  # colocated cluster


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


async def test_configured_names_become_one_instance_per_address_as_they_resolve():
    answers = {"decode-svc:7": [["10.0.0.1:7", "10.0.0.2:7"]], "10.0.0.9:5": [["10.0.0.9:5"]]}

    async def resolver(entry):
        return answers[entry][-1]

    registry = Registry(("10.0.0.9:5",), ("decode-svc:7",), resolver=resolver)
    assert registry.instances["decode"] == ("decode-svc:7",)  # until resolved: the name itself
    await registry.resolve_configured()
    assert registry.instances["decode"] == ("10.0.0.1:7", "10.0.0.2:7")
    answers["decode-svc:7"].append(["10.0.0.2:7", "10.0.0.3:7"])  # scaled: one replica went, one came
    await registry.resolve_configured()
    assert registry.instances["decode"] == ("10.0.0.2:7", "10.0.0.3:7")
    # The real resolver: an IP literal is itself, a name gets its addresses.
    assert await resolve("127.0.0.1:80") == ["127.0.0.1:80"]
    assert "127.0.0.1:80" in await resolve("localhost:80")


def test_heartbeats_join_draining_leaves_at_once_silence_leaves_after_three_intervals(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("services.gateway.scheduler.time.monotonic", lambda: clock[0])
    registry = Registry((), ("d0:1",))
    sched = LoadAwareScheduler(registry, rng=random.Random(0))
    assert sched.pick_prefill(range(100)) == ""  # no prefill instance: colocated
    registry.heartbeat("prefill", "p9:1", interval_s=2.0)
    registry.heartbeat("decode", "d9:1", interval_s=2.0)
    assert registry.instances == {"prefill": ("p9:1",), "decode": ("d0:1", "d9:1")}
    assert sched.pick_prefill(range(100)) == "p9:1"
    clock[0] += 5.0
    registry.heartbeat("decode", "d9:1", interval_s=2.0)  # d9 keeps beating, p9 fell silent
    clock[0] += 1.5  # 6.5 s since p9's last beat > 3 intervals
    registry._refresh_instances()
    assert registry.instances == {"prefill": (), "decode": ("d0:1", "d9:1")}
    registry.heartbeat("decode", "d9:1", interval_s=2.0, draining=True)
    assert registry.instances["decode"] == ("d0:1",) and not registry.is_up("d9:1")


async def test_instances_that_register_serve_requests_and_leave_when_they_drain():
    loaded = get_loaded("preset:tiny-llama")
    token = dict(cluster_token="members-only")  # registration needs membership: here the cluster token
    gateway = await start_gateway(cfg.GatewayConfig(listen="127.0.0.1:0", internal_listen="127.0.0.1:0", http_listen="",
                                                    model=loaded.info.spec, prefill=(), decode=(),
                                                    health_interval_s=0.2, **token), loaded.info)
    announce = dict(register_with=(f"127.0.0.1:{gateway.internal_port}",), heartbeat_interval_s=0.2, **token)
    decode = await start_decode(cfg.DecodeConfig(listen="127.0.0.1:0", model=loaded.info.spec, **announce), loaded)
    prefill = await start_prefill(cfg.PrefillConfig(listen="127.0.0.1:0", model=loaded.info.spec, **announce), loaded)
    registry = gateway.engine.registry
    prompt = list(range(10, 30))
    try:
        for _ in range(50):
            if registry.instances["prefill"] and registry.instances["decode"]:
                break
            await asyncio.sleep(0.05)
        assert registry.instances == {"prefill": (f"127.0.0.1:{prefill.port}",), "decode": (f"127.0.0.1:{decode.port}",)}
        async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
            result = await client.generate(token_ids=prompt, max_tokens=6, temperature=0, ignore_eos=True)
            assert result.token_ids == reference_greedy(loaded, prompt, 6, ignore_eos=True)
            assert decode.engine.counters.transfers_completed == 1
            await prefill.stop(grace=1.0)  # drains: its last heartbeat takes it out at once
            assert registry.instances["prefill"] == ()
            result = await client.generate(token_ids=prompt, max_tokens=6, temperature=0, ignore_eos=True)
            assert result.token_ids == reference_greedy(loaded, prompt, 6, ignore_eos=True)
            assert decode.engine.counters.local_prefills == 1  # no prefill instance left: prefilled on decode
    finally:
        await prefill.stop(grace=0)
        await decode.stop(grace=1.0)
        await gateway.stop(grace=1.0)
