"""Shared-memory segments: the producer's pool reuses them, the consumer's cache maps each once."""

from __future__ import annotations

import os

import pytest

from pdserve.kv import shm


def mine() -> list[str]:
    return [n for n in shm.segment_names() if n.startswith(f"{shm.PREFIX}{os.getpid()}-")]


def test_pool_reuses_released_segments_and_caps_idle_bytes_keeping_the_largest():
    pool = shm.SegmentPool(idle_limit=3 << 20)
    before = set(mine())
    a = pool.acquire(1000)  # rounded up to the 1 MiB minimum
    assert a.size == 1 << 20
    pool.release(a)
    b = pool.acquire(700_000)
    assert b is a and pool.created == 1  # same class: reused, not created
    c = pool.acquire(3 << 20)  # -> 4 MiB class
    assert c.size == 4 << 20
    pool.release(b)
    pool.release(c)  # 1 + 4 MiB idle would exceed 3 MiB: the smallest, b, is unlinked; c stays alone
    assert pool.idle_bytes == 4 << 20 and b.name not in mine() and c.name in mine()
    d = pool.acquire(5 << 20)  # -> 8 MiB: c is too small, a new one
    assert d is not c and d.size == 8 << 20
    pool.discard(d)  # a failed transfer's segment is never reused
    assert d.name not in mine()
    assert pool.acquire(1 << 20) is c and pool.idle_bytes == 0  # the smallest idle one that holds it
    big = pool.acquire(5 << 20)  # -> 8 MiB, over the limit: kept while nothing else is idle
    pool.release(big)
    assert pool.acquire(6 << 20) is big
    pool.release(big)
    pool.release(c)  # 8 + 4 MiB idle: c goes, the large one serves every shorter transfer too
    assert pool.idle_bytes == 8 << 20 and c.name not in mine()
    assert pool.acquire(2 << 20) is big and pool.created == 4  # a (reused as b), c, d, big
    pool.release(big)
    never = shm.SegmentPool(idle_limit=0)
    e = never.acquire(1000)
    never.release(e)
    assert never.idle_bytes == 0 and e.name not in mine()
    pool.close()
    assert set(mine()) == before


def test_cache_maps_once_and_forgets_segments_whose_name_is_gone():
    pool = shm.SegmentPool()
    cache = shm.SegmentCache(capacity=2)
    a, b, c = (pool.acquire(n << 20) for n in (1, 2, 4))
    a.view[:3] = b"abc"
    seen = cache.open(a.name)
    assert cache.open(a.name) is seen and bytes(seen.view[:3]) == b"abc"
    cache.open(b.name)
    pool.discard(a)  # the producer removed it: the next new name drops its mapping
    cache.open(c.name)
    assert len(cache) == 2 and a.name not in cache._maps
    pool.release(b)
    pool.release(c)
    pool.close()


def test_a_mapping_still_read_by_a_stream_is_closed_only_when_the_stream_releases_it():
    pool = shm.SegmentPool()
    cache = shm.SegmentCache(capacity=1)
    a, b = pool.acquire(1 << 20), pool.acquire(1 << 20)
    a.view[:2] = b"hi"
    reading = cache.open(a.name)          # a stream is reading a
    again = cache.open(a.name)            # and a second one
    cache.open(b.name)                    # capacity 1: a is evicted while both read it
    assert bytes(reading.view[:2]) == b"hi"
    cache.release(again)
    assert bytes(reading.view[:2]) == b"hi"
    cache.release(reading)                # the last reader: now it is closed
    with pytest.raises(ValueError):
        reading.view[:2]
    pool.discard(a)
    pool.discard(b)
    pool.close()


def test_sweep_removes_segments_of_dead_producers_only():
    dead = f"{shm.PREFIX}{2**22 + 12345}-{'0' * 16}"  # beyond pid_max on this kernel's default
    open(os.path.join(shm.SHM_DIR, dead), "wb").close()
    pool = shm.SegmentPool()
    live = pool.acquire(1)
    try:
        assert shm.sweep_orphans() >= 1
        assert dead not in shm.segment_names() and live.name in shm.segment_names()
    finally:
        pool.discard(live)
