"""Admission into the decode KV pool: arrival order with backfilling (small requests pass a big one that does
not fit, never delaying it), honest refusals (queue full, or past the request's deadline) with a retry hint
that says when it could start."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.admission import Admission
from pdserve.engine.kv_pool import BlockAllocator
from pdserve.errors import InvalidArgument, ResourceExhausted


class Clock:
    """Decode steps: the engine's step counter."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self) -> int:
        return self.steps


def make(blocks: int, max_queued: int = 16, max_batch: int = 64, step_ms: float = 0.0):
    clock = Clock()
    return Admission(BlockAllocator(blocks + 1), max_queued, max_batch, clock=clock, step_ms=lambda rows: step_ms), clock


async def test_small_requests_pass_a_big_one_that_does_not_fit_yet():
    """The issue's case: three hogs (max_tokens 8000) fill most of the pool; small requests behind the third
    must not wait for it."""
    admission, clock = make(1455)
    hogs = [admission.request(500, steps=8000) for _ in range(3)]
    assert [h.granted.done() for h in hogs] == [True, True, False]  # 455 left: the third waits
    smalls = [admission.request(2, steps=64) for _ in range(100)]
    assert all(s.granted.done() for s in smalls)  # they end long before the third hog could start
    assert admission.backfilled == 100 and admission.queued == 1


async def test_backfilling_never_delays_the_head():
    admission, clock = make(10)
    running = admission.request(6, steps=100)
    admission.started(running)
    head = admission.request(8, steps=10)  # needs 8: 4 free, so its turn is when `running` ends (step 100)
    long_small = admission.request(3, steps=500)  # fits now, but would hold 3 at step 100 where 2 are spare
    short_small = admission.request(2, steps=50)  # fits now and ends by step 50: granted
    assert not head.granted.done() and short_small.granted.done() and not long_small.granted.done()
    spare = admission.request(2, steps=500)  # the head leaves 2 spare at step 100: granted
    assert spare.granted.done() and not long_small.granted.done()
    clock.steps = 50
    admission.release(short_small)
    clock.steps = 100
    admission.release(running)
    assert head.granted.done()  # on time: nothing that passed it took what it needed
    assert not long_small.granted.done()  # 10 - 8 - 2 = 0 left


async def test_blocks_the_head_will_not_need_may_go_to_a_long_request():
    admission, clock = make(20)
    running = admission.request(15, steps=100)
    admission.started(running)
    head = admission.request(12, steps=10)   # at step 100: 20 free, 8 to spare
    spare = admission.request(5, steps=10_000)  # ends long after, but the head leaves 8 spare: granted
    too_big = admission.request(4, steps=10_000)  # 8 - 5 = 3 spare left: waits
    assert not head.granted.done() and spare.granted.done() and not too_big.granted.done()
    clock.steps = 100
    admission.release(running)
    assert head.granted.done() and not too_big.granted.done()  # 20 - 5 - 12 = 3 free


async def test_queue_full_is_refused_with_a_hint_of_when_it_could_start():
    admission, clock = make(10, max_queued=1, step_ms=20.0)
    running = admission.request(10, steps=50)
    admission.started(running)
    queued = admission.request(4, steps=10)
    with pytest.raises(ResourceExhausted, match="1 requests already queued") as refused:
        admission.request(4, steps=10)
    # Its blocks come free when `running` ends (50 steps) -- the queued one's too: 50 steps of 20 ms.
    assert refused.value.retry_after_ms == 50 * 20 and admission.refused == 1
    with pytest.raises(InvalidArgument, match="needs 11 KV blocks"):
        admission.request(11)
    clock.steps = 50
    admission.release(running)
    assert queued.granted.done() and admission.queued == 0


async def test_a_request_that_would_finish_after_its_deadline_is_refused_at_once():
    admission, clock = make(10, step_ms=10.0)
    running = admission.request(8, steps=300)
    admission.started(running)
    # Needs 4 blocks: free at step 300 (3 s), then 100 steps (1 s): 4 s.
    with pytest.raises(ResourceExhausted, match="after its deadline") as refused:
        admission.request(4, steps=100, deadline_s=3.5)
    assert refused.value.retry_after_ms == 300 * 10  # when it could start
    ok = admission.request(4, steps=100, deadline_s=5.0)  # fits its deadline (with the 20% margin): queued
    assert not ok.granted.done() and admission.queued == 1
    # Too long for its own deadline even with no wait: the client's choice, not a refusal for load.
    assert admission.request(1, steps=1000, deadline_s=1.0).granted.done()
    # Step time unknown (nothing ran yet): no refusal by estimate.
    fresh, _ = make(2)
    fresh.request(2, steps=10)
    assert not fresh.request(2, steps=10, deadline_s=0.001).granted.done()


async def test_batch_slots_count_in_the_wait():
    admission, clock = make(100, max_batch=2, step_ms=10.0)
    a, b = admission.request(1, steps=100), admission.request(1, steps=200)
    admission.started(a)
    admission.started(b)
    # Blocks are plentiful, but both slots are held: the next request starts at step 100 at the earliest.
    c = admission.request(1, steps=10)
    assert c.granted.done()  # granted blocks (it waits for a slot in the engine's ready queue)
    assert admission.estimated_start(c) == 100  # the first slot to free
    assert admission.finish_ms(c) == (100 + 10) * 10.0  # what the gateway leaves prefill the rest of
    with pytest.raises(ResourceExhausted, match="after its deadline"):
        admission.request(1, steps=10, deadline_s=1.0)  # slot at step 110 (after c): 1.2 s > 1 s


async def test_cancel_while_queued_lets_the_next_in():
    admission, _ = make(4)
    a = admission.request(3, steps=5)
    big, small = admission.request(4, steps=5), admission.request(1, steps=5)
    assert small.granted.done()  # backfilled: ends with a, before big could start
    admission.cancel(big)
    assert big.granted.cancelled() and admission.queued == 0
    admission.cancel(a)
    admission.cancel(small)
    assert admission._allocator.num_free == 4


async def test_simulated_churn_nobody_starves_and_blocks_are_exact():
    """A decode loop in miniature: random requests arrive, run their steps and leave. Every request is
    granted eventually; a request that waited at the head of the queue is granted no later than its shadow
    estimate when it first became the head (backfilling never delayed it); the allocator's count is exact."""
    rng = random.Random(7)
    admission, clock = make(200, max_queued=1000)
    running: list = []
    head_promise: dict = {}
    waiting: list = []
    for step in range(8000):
        clock.steps = step
        for ticket in [t for t in running if t.end(step) <= step]:
            running.remove(ticket)
            admission.release(ticket)
        if step < 3000 and rng.random() < 0.08:
            big = rng.random() < 0.1
            waiting.append(admission.request(rng.randint(60, 150) if big else rng.randint(1, 10),
                                             steps=rng.randint(50, 300) if big else rng.randint(1, 40)))
        for ticket in [t for t in waiting if t.granted.done()]:
            waiting.remove(ticket)
            if ticket in head_promise:
                assert step <= head_promise.pop(ticket), "a backfilled request delayed the head"
            admission.started(ticket)
            running.append(ticket)
        if admission._queue:
            head = admission._queue[0]
            head_promise.setdefault(head, admission._shadow(head.blocks_needed)[0])
        assert admission._allocator.num_used == sum(t.blocks_needed for t in running)
    assert not waiting and not admission._queue and admission.backfilled > 0
