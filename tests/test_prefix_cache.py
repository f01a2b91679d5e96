"""Prefix caching: a prompt that starts like an earlier one computes and receives only the rest, with the
same tokens as without the cache — in the decode pool, in the prefill instance, on the wire and in routing."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from pdserve import config as cfg
from pdserve.engine.admission import Admission
from pdserve.engine.kv_pool import BlockAllocator
from pdserve.engine.prefill import PrefillEngine
from pdserve.engine.prefix_store import PrefixStore
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import ResourceExhausted
from pdserve.prefix import block_hashes, reusable_blocks
from pdserve.sdk import AsyncClient
from services.decode.server import start_decode
from services.gateway.server import start_gateway
from services.prefill.server import start_prefill
from tests.cluster import reference_greedy, start_cluster
from tests.conftest import get_loaded

TINY = "preset:tiny-llama"
GREEDY = SamplingParams(temperature=0.0)


def words(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


# ---- the pieces -----------------------------------------------------------------------------------------


def test_prefix_keys_name_a_block_by_everything_before_it():
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2 and block_hashes(list(range(33)), 16) == a  # only full blocks have keys
    assert block_hashes([99] + list(range(1, 40)), 16)[1] != a[1]  # a different first token: every key differs
    assert block_hashes(list(range(16)) + [7] * 24, 16)[0] == a[0]
    assert reusable_blocks(32, 16) == 1 and reusable_blocks(33, 16) == 2  # never the prompt's last token


def test_the_pool_keeps_finished_blocks_shares_them_and_evicts_the_least_recently_used():
    alloc = BlockAllocator(9, prefix_cache=True)  # blocks 1..8
    a, b = alloc.allocate(3), alloc.allocate(3)
    assert (a, b) == ([1, 2, 3], [4, 5, 6])
    assert alloc.cache(a, [11, 12, 13]) == 3 and alloc.cache(b[:2], [14, 15]) == 2
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_cached == 5 and alloc.num_free == 8  # cached and idle: free to allocate
    shared = alloc.match([11, 12, 99])
    assert shared == [1, 2]
    alloc.share(shared)
    assert alloc.num_free == 6  # held again: not evictable
    taken = alloc.allocate(5)  # the 3 uncached free blocks, then idle ones, least recently used first
    assert taken == [6, 7, 8, 3, 5] and alloc.evicted == 2
    assert alloc.match([11, 12, 13]) == [1, 2] and alloc.match([14]) == [4] and alloc.match([15]) == []
    with pytest.raises(ResourceExhausted):
        alloc.allocate(2)  # 1 left (block 4): caching never hands out a held block
    alloc.free(shared)
    alloc.free(taken)
    assert alloc.num_free == 8 and alloc.num_used == 0
    with pytest.raises(AssertionError):
        alloc.free(shared)  # freed twice


async def test_where_a_block_may_be_in_one_table_only_an_idle_hit_is_taken_and_a_held_one_copied():
    """The flex kernel's case: a cached block nobody holds joins the request's table as it is, one another
    request holds is copied; either way the hit costs no more blocks than a miss (a pool full of running
    requests used to evict the cached prefix to make room for copies of it: ~1 hit in 24 under pressure)."""
    alloc = BlockAllocator(13, prefix_cache=True)  # blocks 1..12
    copies = []
    admission = Admission(alloc, max_queued=8, copy_blocks=lambda src, dst: copies.append((src, dst)))
    first = admission.request(4, keys=[1, 2])
    await first.granted
    cached = first.blocks[:3]
    alloc.cache(first.blocks, [1, 2, 3])
    admission.release(first)  # its 3 full blocks cached, idle
    second = admission.request(4, keys=[1, 2])
    await second.granted
    assert second.cached_blocks == 2 and second.blocks[:2] == cached[:2] and copies == []  # taken
    third = admission.request(4, keys=[1, 2])
    await third.granted
    assert third.cached_blocks == 2 and copies == [(cached[:2], third.blocks[:2])]  # held: copied
    assert not set(third.blocks) & set(second.blocks)  # one table per block
    fourth = admission.request(4, keys=[1, 2])  # 12 blocks: 4 + 4 + 4, the hit costs nothing extra
    await fourth.granted
    assert fourth.cached_blocks == 2 and alloc.num_free == 0
    for ticket in (second, third, fourth):
        admission.release(ticket)
    assert alloc.num_used == 0 and alloc.match([1, 2, 3]) == cached[:2]  # block 3 was evicted for the fourth


def test_the_prefill_store_finds_the_longest_prefix_and_drops_turns_a_later_one_covers():
    store = PrefixStore(budget_bytes=10_000, block_size=4)
    kv = lambda n: [torch.zeros(n, 1, 2)]  # noqa: E731 - (T, H, D), 8 bytes a token a tensor
    turn1, turn2 = list(range(10)), list(range(10)) + [50, 51, 52, 53, 54, 55]
    store.insert(turn1, kv(10), kv(10), token_major=True)
    hit = store.lookup(turn2)
    assert hit.tokens == 8 and hit.source.load(0, 8)[0].shape == (8, 1, 2)
    store.insert(turn2, kv(16), kv(16), token_major=True)
    assert len(store) == 1  # turn 1 is a prefix of turn 2: kept once
    assert store.lookup(turn2 + [1]).tokens == 16 and store.lookup([5] * 20) is None
    small = PrefixStore(budget_bytes=300, block_size=4)
    for start in range(5):
        small.insert([start] * 8, kv(8), kv(8), token_major=True)  # 128 bytes each
    assert len(small) == 2 and small.evicted == 3 and small.lookup([4] * 9).tokens == 8


async def test_the_prefill_engine_computes_only_the_uncached_suffix_with_the_same_kv_and_token():
    loaded = get_loaded(TINY)
    rng = random.Random(1)
    shared, tail = words(rng, loaded.info.vocab_size, 70), words(rng, loaded.info.vocab_size, 25)

    async def run(engine, prompt, emit_from=None):
        got = {}

        def on_layer(layer, start, k, v):
            got.setdefault(layer, []).append((start, k.clone(), v.clone()))

        result = await engine.prefill(prompt, GREEDY, on_layer, emit_from=emit_from)
        return result, got

    cold = PrefillEngine(loaded, token_budget=64, chunk_tokens=32)
    warm = PrefillEngine(loaded, token_budget=64, chunk_tokens=32, prefix_store=PrefixStore(1 << 30, 16))
    try:
        await run(warm, shared)
        expected, all_kv = await run(cold, shared + tail)
        cached = computed = 0
        for emit_from in (None, 0, 90):  # the first computed token, all (cached ones replayed), past the cache
            result, got = await run(warm, shared + tail, emit_from)
            assert result.first_token == expected.first_token and result.cached_tokens in (64, 80)
            cached, computed = cached + result.cached_tokens, computed + 95 - result.cached_tokens
            start = result.cached_tokens if emit_from is None else emit_from
            for layer, chunks in got.items():
                assert chunks[0][0] == start
                k = torch.cat([c[1] for c in chunks], dim=2)
                ref = torch.cat([c[1] for c in all_kv[layer]], dim=2)[:, :, start:]
                assert k.shape == ref.shape and torch.allclose(k, ref, atol=1e-5)
        assert warm.computed_tokens == 70 + computed and warm.cached_tokens == cached == 64 + 80 + 80
    finally:
        await cold.close()
        await warm.close()


# ---- through the system -------------------------------------------------------------------------------


async def conversation(address: str, turns: list[list[int]], max_tokens: int):
    """Turn k's prompt: the whole conversation so far (earlier prompts and answers) and the new user tokens."""
    history, results = [], []
    async with AsyncClient(address) as client:
        for user in turns:
            prompt = history + user
            result = await client.generate(token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
            results.append((prompt, result))
            history = prompt + result.token_ids
    return results


@pytest.mark.parametrize("prefill_cache,decode_cache,local", [
    ("0", False, 0), ("1GiB", False, 0), ("0", True, 0), ("1GiB", True, 0), ("1GiB", True, 256),
    ("1GiB", False, 256)], ids=["off", "prefill-only", "decode-only", "both", "both-local", "local-declined"])
async def test_a_multi_turn_conversation_is_token_identical_with_the_cache_and_moves_only_new_kv(
        smol, prefill_cache, decode_cache, local):
    """``local``: conditional disaggregation by cache hit (the default): a turn whose history the decode
    instance holds is prefilled there, computing only the new tokens and moving no KV. Where the gateway's
    index says decode holds it but it does not (here: its cache is off), decode declines and the turn is
    prefilled on a prefill instance and transferred, as without it."""
    rng = random.Random(7)
    turns = [words(rng, smol.info.vocab_size, n) for n in (90, 20, 30, 25)]
    cluster = await start_cluster(smol, decode_options={"prefix_cache": decode_cache},
                                  prefill_options={"prefix_cache_bytes": prefill_cache},
                                  gateway_options={"local_uncached_tokens": local})
    try:
        results = await conversation(cluster.address, turns, 10)
        prefill, decode = cluster.prefill.engine, cluster.decode.engine.stats()
        tried_locally = cluster.gateway.engine._scheduler.local_prefills
    finally:
        await cluster.stop()
    for prompt, result in results:
        assert result.token_ids == reference_greedy(smol, prompt, 10, ignore_eos=True)
    prompt_tokens = sum(len(p) for p, _ in results)
    kv_bytes = [r.server_timings.get("kv_bytes", 0) for _, r in results]  # a zero field is absent
    token_bytes = smol.info.kv.bytes_per_token(smol.dtype)
    if local:  # turns after the first went to decode for its cache (and, without one, came back)
        assert tried_locally == 3
    if local and decode_cache:  # turns after the first: on decode, from its cached history
        assert decode["local_prefills"] == 3 and kv_bytes[1:] == [0, 0, 0]
        assert prefill.computed_tokens == len(results[0][0])
        computed = [len(p) - r.server_timings.get("cached_tokens", 0) for p, r in results[1:]]
        assert all(n <= len(user) + 10 + 16 for n, user in zip(computed, turns[1:]))  # new tokens, a block at most
        return
    assert decode["local_prefills"] == 0
    if prefill_cache != "0":  # each turn computes little more than its new tokens
        assert prefill.cached_tokens >= prompt_tokens - sum(map(len, turns)) - 10 * 3 - 3 * 16
        assert prefill.computed_tokens + prefill.cached_tokens == prompt_tokens
    else:
        assert prefill.cached_tokens == 0 and prefill.computed_tokens == prompt_tokens
    if decode_cache:  # each later turn receives only the KV decode does not hold
        assert decode["prefix_hit_tokens"] > 0
        for (prompt, _), sent in zip(results[1:], kv_bytes[1:]):
            assert sent < len(prompt) * token_bytes / 2
    else:
        assert decode["prefix_hit_tokens"] == 0
        assert all(sent >= len(p) * token_bytes for (p, _), sent in zip(results, kv_bytes))
    assert decode["kv_blocks_used"] == 0


@pytest.mark.parametrize("kernel", ["gather", "flex"])  # shared in place / copied into the request's blocks
async def test_concurrent_requests_sharing_a_prefix_under_eviction_pressure_stay_exact_and_are_never_refused(kernel):
    """A pool of a few requests' worth: requests share a system prompt, blocks are evicted to admit others,
    a shared block is never evicted while a request reads it."""
    loaded = get_loaded(TINY)
    rng = random.Random(3)
    system = words(rng, loaded.info.vocab_size, 48)
    prompts = [system + words(rng, loaded.info.vocab_size, rng.randrange(5, 40)) for _ in range(24)]
    prompts += [words(rng, loaded.info.vocab_size, 60) for _ in range(8)]  # strangers, to push the cache out
    block_bytes = loaded.info.kv.bytes_per_token(loaded.dtype) * 16
    cluster = await start_cluster(loaded, colocated=True, decode_options={
        "kv_budget": str(block_bytes * 40), "max_batch": 6, "prefill_chunk_tokens": 32, "paged_kernel": kernel})
    try:
        async with AsyncClient(cluster.address) as client:
            results = await asyncio.gather(*[client.generate(token_ids=p, max_tokens=12, temperature=0, ignore_eos=True)
                                             for p in prompts])
        stats = cluster.decode.engine.stats()
    finally:
        await cluster.stop()
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(loaded, prompt, 12, ignore_eos=True)
    assert stats["prefix_hit_tokens"] >= 10 * 48 and stats["kv_blocks_evicted"] > 0  # most after the first few
    assert stats["refused"] == 0 and stats["kv_blocks_used"] == 0


async def test_seeded_sampling_is_identical_with_a_cached_prefix():
    loaded = get_loaded(TINY)
    rng = random.Random(5)
    prompt = words(rng, loaded.info.vocab_size, 64)
    outputs = {}
    for on in (False, True):
        cluster = await start_cluster(loaded, decode_options={"prefix_cache": on},
                                      prefill_options={"prefix_cache_bytes": "1GiB" if on else "0"})
        try:
            async with AsyncClient(cluster.address) as client:
                outputs[on] = [(await client.generate(token_ids=prompt + [200 + i], max_tokens=16, temperature=0.9,
                                                      top_p=0.9, seed=11)).token_ids for i in range(3)]
            if on:
                assert cluster.decode.engine.stats()["prefix_hit_tokens"] == 2 * 64
        finally:
            await cluster.stop()
    assert outputs[True] == outputs[False]


async def two_decode_cluster(loaded, policy: str):
    decodes = [await start_decode(cfg.DecodeConfig(listen="127.0.0.1:0", model=loaded.info.spec), loaded)
               for _ in range(2)]
    prefill = await start_prefill(cfg.PrefillConfig(listen="127.0.0.1:0", model=loaded.info.spec), loaded)
    gateway = await start_gateway(cfg.GatewayConfig(
        listen="127.0.0.1:0", internal_listen="127.0.0.1:0", http_listen="", model=loaded.info.spec, policy=policy,
        prefill=(f"127.0.0.1:{prefill.port}",), decode=tuple(f"127.0.0.1:{d.port}" for d in decodes),
        health_interval_s=0.1), loaded.info)
    return gateway, prefill, decodes


async def test_cache_aware_routing_sends_a_prefix_where_it_is_cached():
    loaded = get_loaded(TINY)
    rng = random.Random(9)
    systems = [words(rng, loaded.info.vocab_size, 64) for _ in range(2)]
    gateway, prefill, decodes = await two_decode_cluster(loaded, "cache_aware")
    try:
        await asyncio.sleep(0.3)  # a probe round: the instances' block sizes are known
        async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
            for i in range(12):
                prompt = systems[i % 2] + words(rng, loaded.info.vocab_size, 8)
                result = await client.generate(token_ids=prompt, max_tokens=4, temperature=0, ignore_eos=True)
                assert result.token_ids == reference_greedy(loaded, prompt, 4, ignore_eos=True)
        hits = [d.engine.stats()["prefix_hit_tokens"] for d in decodes]
        reason = gateway.engine._scheduler.reason
        metrics = gateway.engine.metrics.prefix_hit_tokens.labels("decode")._value.get()
    finally:
        await gateway.stop(grace=0.5)
        await prefill.stop(grace=0.5)
        for d in decodes:
            await d.stop(grace=0.5)
    # After each system prompt's first request, every request goes where its prefix is: all hit.
    assert sum(hits) == 10 * 64 == metrics and "cached" in reason


async def test_requests_waiting_for_blocks_hold_no_cached_blocks_so_they_cannot_starve_the_one_ahead():
    """Queued requests whose prompts are cached used to hold those blocks while they waited: with a small
    pool the request at the head could then never fit (none free, none evictable) and, not ending before
    it, the others were never let past it: a deadlock until every deadline passed."""
    from pdserve.engine.admission import Admission

    alloc = BlockAllocator(11, prefix_cache=True)  # 10 blocks
    for keys in ([1, 2, 3], [4, 5, 6]):  # two cached prompts, idle
        blocks = alloc.allocate(3)
        alloc.cache(blocks, keys)
        alloc.free(blocks)
    admission = Admission(alloc, max_queued=8)
    running = admission.request(4, steps=10)
    head = admission.request(8, steps=10)
    behind = [admission.request(5, steps=100, keys=keys) for keys in ([1, 2, 3], [4, 5, 6])]
    assert running.blocks and not head.blocks and not any(t.blocks for t in behind)
    assert alloc.num_free == 6  # the cached blocks are still free to evict: nobody holds them while waiting
    admission.started(running)
    admission.release(running)
    assert len(head.blocks) == 8 and head.granted.done()
    admission.release(head)
    assert all(t.granted.done() for t in behind)
    assert sum(t.cached_blocks for t in behind) < 6  # the head's grant evicted some of the cached blocks
