"""Engines as pure logic, no servers: KV pool accounting, admission, the prefill batcher, paged decode."""

from __future__ import annotations

import asyncio
import time
import random

import pytest
import torch

from pdserve.engine.decode import DecodeEngine, DecodeParams, FinishReason, SeqState
from pdserve.engine.kv_pool import BlockAllocator, KVPool, blocks_for
from pdserve.engine.device_io import HostCopy, download, upload
from pdserve.engine.prefill import MIN_CHUNK, PassLimit, PassTimes, PrefillEngine, packed_inputs, plan_batch
from pdserve.engine.prefill import _Planned as FakeJob  # what plan_batch reads of a job
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import InvalidArgument, NotFound, ResourceExhausted
from pdserve.kv.wire import DTYPE_NAMES, KVLayout, split_layer, token_major
from pdserve.model.loader import KVShape
from tests.cluster import reference_greedy
from tests.conftest import get_loaded

GREEDY = SamplingParams(temperature=0)

# ---- block allocator and pool -------------------------------------------------------------


def test_allocator_never_hands_out_more_than_it_has_nor_the_null_block():
    alloc = BlockAllocator(9)
    assert alloc.capacity == 8
    a = alloc.allocate(5)
    assert 0 not in a and len(set(a)) == 5
    with pytest.raises(ResourceExhausted, match="4 blocks asked, 3 of 8 free"):
        alloc.allocate(4)
    b = alloc.allocate(3)
    assert alloc.num_free == 0 and alloc.peak_used == 8
    alloc.free(a)
    assert alloc.num_used == 3
    with pytest.raises(AssertionError, match="freed twice"):
        alloc.free(a + b)


def test_allocator_has_no_external_fragmentation():
    # Free every other request: the holes are scattered, yet one large request still fits.
    alloc = BlockAllocator(65)
    held = [alloc.allocate(4) for _ in range(16)]
    for blocks in held[::2]:
        alloc.free(blocks)
    big = alloc.allocate(32)
    assert len(set(big)) == 32 and alloc.num_free == 0


def test_allocator_random_churn_keeps_exact_accounting():
    rng = random.Random(7)
    alloc = BlockAllocator(101)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            alloc.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, 12)
            if alloc.can_allocate(n):
                held.append(alloc.allocate(n))
        owned = [b for blocks in held for b in blocks]
        assert len(owned) == len(set(owned)) == alloc.num_used <= alloc.capacity
    for blocks in held:
        alloc.free(blocks)
    assert alloc.num_free == alloc.capacity


def test_pool_size_stays_within_the_budget_and_reads_back_writes():
    kv = KVShape(num_layers=2, kv_heads=2, head_dim=4)
    per_block = kv.bytes_per_token(torch.float32) * 4
    pool = KVPool(kv, torch.float32, torch.device("cpu"), budget=per_block * 10 + 5, block_size=4)
    assert pool.nbytes <= per_block * 10 + 5 and pool.allocator.capacity == 9
    table = pool.allocator.allocate(blocks_for(10, 4))
    keys, values = torch.randn(10, 2, 4), torch.randn(10, 2, 4)
    pool.write(table, 1, 0, keys[:6], values[:6])
    pool.write(table, 1, 6, keys[6:], values[6:])
    k, v = pool.read(table, 1, 10)
    assert torch.equal(k, keys) and torch.equal(v, values)
    with pytest.raises(ValueError, match="at least 2"):
        KVPool(kv, torch.float32, torch.device("cpu"), budget=per_block, block_size=4)


def test_step_metadata_reads_each_row_through_its_own_table():
    pool = KVPool(KVShape(1, 1, 1), torch.float32, torch.device("cpu"), budget=8 * 2 * 4 * 2, block_size=2)
    step = pool.prepare_step([[3, 1], [2]], positions=[2, 0])
    assert step.write_slots.tolist() == [1 * 2 + 0, 2 * 2 + 0]
    assert step.mask[:, 0, 0].tolist() == [[True, True, True], [True, False, False]]
    # Row 0 reads block 3 then block 1; row 1 reads block 2, then the null block past its length.
    [group] = step.groups
    assert group.gather.tolist() == [[6, 7, 2], [4, 0, 0]] and group.rows is None


def test_a_long_row_does_not_pad_short_ones_to_its_length():
    """A gather step pads rows to the longest of their group: short rows share one, a near-context row
    reads alone (a small request beside an 8k-token one used to gather 8k tokens a layer), and attention
    gives every row the same output either way."""
    kv = KVShape(2, 2, 8)
    pool = KVPool(kv, torch.float32, torch.device("cpu"), budget=kv.bytes_per_token(torch.float32) * 4000,
                  block_size=16)
    torch.manual_seed(0)
    pool.storage.normal_()
    tables = [list(range(1, 5)), list(range(5, 150)), list(range(150, 152))]
    positions = [40, 2300, 20]
    step = pool.prepare_step(tables, positions)
    assert [(None if g.rows is None else g.rows.tolist(), g.gather.shape[1]) for g in step.groups] == \
        [([0, 2], 41), ([1], 2301)]
    from pdserve.engine.paged_attention import paged_attention
    query = torch.randn(3, 2, 1, 8)
    module = torch.nn.Module()
    out, _ = paged_attention(module, query, pool.keys[0], pool.values[0], None, paged=step)
    for row, (table, p) in enumerate(zip(tables, positions)):
        alone = pool.prepare_step([table], [p])
        expect, _ = paged_attention(module, query[row:row + 1], pool.keys[0], pool.values[0], None, paged=alone)
        torch.testing.assert_close(out[row:row + 1], expect)


def test_flex_step_mask_is_exactly_each_rows_own_tokens():
    pool = KVPool(KVShape(1, 1, 1), torch.float32, torch.device("cpu"), budget=8 * 2 * 4 * 2, block_size=2,
                  kernel="flex")
    step = pool.prepare_step([[3, 1], [2]], positions=[2, 0])
    assert step.write_slots.tolist() == [1 * 2 + 0, 2 * 2 + 0] and not step.groups
    # Block sparsity: the kernel visits only each row's own blocks.
    counts, indices = step.block_mask.kv_num_blocks[:, 0, 0].tolist(), step.block_mask.kv_indices[:, 0, 0].tolist()
    assert [indices[b][:n] for b, n in enumerate(counts)] == [[3, 1], [2]]
    allowed = [[bool(step.block_mask.mask_mod(torch.tensor(b), 0, 0, torch.tensor(slot))) for slot in range(8)]
               for b in range(2)]
    # Row 0: tokens 0,1 in block 3 (slots 6,7) and token 2 in block 1 (slot 2); row 1: token 0 in block 2 (slot 4).
    assert [s for s in range(8) if allowed[0][s]] == [2, 6, 7] and [s for s in range(8) if allowed[1][s]] == [4]


# ---- the prefill batcher ------------------------------------------------------------------


def plan_of(jobs, budget, chunk, max_partial=2, start=lambda job: True, limit=None):
    return [(jobs.index(s.job), s.start, s.count) for s in plan_batch(jobs, budget, chunk, max_partial, start, limit)]


def test_batcher_packs_whole_prompts_up_to_the_budget():
    jobs = [FakeJob([0] * n) for n in (300, 500, 400, 100)]
    assert plan_of(jobs, 1000, 0) == [(0, 0, 300), (1, 0, 500), (3, 0, 100)]  # 400 would not fit: passed over
    jobs[0].done, jobs[1].done, jobs[3].done = 300, 500, 100
    assert plan_of(jobs, 1000, 0) == [(2, 0, 400)]
    assert plan_of([FakeJob([0] * 3000)], 1000, 0) == [(0, 0, 3000)]  # alone, past the budget


def test_batcher_chunks_long_prompts_and_fills_the_budget():
    jobs = [FakeJob([0] * 1300), FakeJob([0] * 200), FakeJob([0] * 900)]
    assert plan_of(jobs, 1024, 512) == [(1, 0, 200), (0, 0, 512), (2, 0, 312)]
    jobs[0].done, jobs[1].done, jobs[2].done = 512, 200, 312
    assert plan_of(jobs, 1024, 512) == [(0, 512, 512), (2, 312, 512)]
    jobs[0].cancelled = True
    assert plan_of(jobs, 1024, 512) == [(2, 312, 588)]  # alone now: the rest in one pass, chunk or not


def test_short_prompts_never_wait_behind_long_ones_and_long_ones_always_progress():
    """The issue's case: four near-context prompts, then short ones. Short prompts go in the next pass; the
    oldest long prompt gets a chunk every pass however many short ones come; at most max_partial long
    prompts are being chunked at once (each holds its earlier chunks' KV)."""
    longs = [FakeJob([0] * 8191) for _ in range(4)]
    jobs = longs + [FakeJob([0] * 40) for _ in range(3)]
    assert plan_of(jobs, 2048, 512) == [(4, 0, 40), (5, 0, 40), (6, 0, 40), (0, 0, 512), (1, 0, 512)]
    longs[0].done = longs[1].done = 512
    flood = longs + [FakeJob([0] * 500) for _ in range(10)]
    plan = plan_of(flood, 2048, 512)
    assert plan[0] == (0, 512, 512)  # the oldest long prompt first
    assert [p for p in plan if p[0] >= 4] == [(4, 0, 500), (5, 0, 500), (6, 0, 500)]  # then short prompts
    assert plan[-1] == (1, 512, 36) and sum(p[2] for p in plan) == 2048  # the other long one fills the rest
    # Only two long prompts chunked at once; the next starts when one is done.
    assert {p[0] for p in plan_of(longs, 2048, 512)} == {0, 1}
    longs[0].done = 8191
    assert {p[0] for p in plan_of(longs, 2048, 512)} == {1, 2}


def test_passes_are_planned_within_the_time_limit():
    """A chunk deep into a long prompt costs its attention over everything before it: the chunk shrinks so
    the pass keeps to the limit (on a 2-core CPU a 512-token chunk at depth 8k took ~8 s, and every prompt
    arriving waited for it), short prompts still join, and nothing is starved."""
    cost = PassTimes()  # 10 ms a pass, 1 ms a token, 1 s per million query-key pairs
    for segments in ([(0, 10)], [(0, 200)], [(4000, 100)], [(0, 50), (2000, 300)], [(7000, 512)]):
        x = cost.features(segments)
        cost.add(segments, 0.01 + 1e-3 * x[1] + 1.0 * x[2])
    limit = PassLimit(cost.seconds, 1.0)
    deep = FakeJob([0] * 8191)
    deep.done = 7000
    alone = plan_of([deep], 2048, 512, limit=limit)
    assert alone[0][:2] == (0, 7000) and 100 < alone[0][2] < 512  # alone: the whole limit
    assert 0.9 < cost.seconds([(7000, alone[0][2])]) <= 1.0
    shorts = [FakeJob([0] * 40) for _ in range(30)]
    plan = plan_of([deep, *shorts], 2048, 512, limit=limit)
    seconds = cost.seconds([(start, count) for _, start, count in plan])
    assert plan[0][:2] == (0, 7000) and cost.seconds([(7000, plan[0][2])]) <= 0.5  # half while others wait
    assert 0.9 < seconds <= 1.0 and len(plan) > 2  # short prompts fill the rest, in arrival order
    assert [i for i, _, _ in plan[1:]] == list(range(1, len(plan)))
    # However deep, a long prompt keeps progressing (MIN_CHUNK tokens when alone), and a short prompt that
    # alone overruns the limit still runs when nothing is planned before it.
    deeper = FakeJob([0] * 10**6)
    deeper.done = 900_000
    assert plan_of([deeper], 2048, 512, limit=limit) == [(0, 900_000, MIN_CHUNK)]
    assert plan_of([FakeJob([0] * 500)], 2048, 512, limit=PassLimit(cost.seconds, 0.01)) == [(0, 0, 500)]
    # A cold engine (no pass timed yet) does not know what a budget-sized pass costs: a lone long prompt's
    # first pass is a chunk, then whole passes within the limit.
    cold = PassLimit(PassTimes().seconds, 1.0)
    assert plan_of([FakeJob([0] * 8191)], 2048, 512, limit=cold) == [(0, 0, 512)]
    assert plan_of([FakeJob([0] * 8191)], 2048, 512) == [(0, 0, 2048)]


def test_prompts_start_only_when_their_kv_fits_in_flight():
    jobs = [FakeJob([0] * 1000), FakeJob([0] * 1000), FakeJob([0] * 50)]
    blocked = {id(jobs[0])}
    # The first long prompt cannot start: the second does not pass it (long prompts start in order); the
    # short one does.
    assert plan_of(jobs, 2048, 512, start=lambda job: id(job) not in blocked) == [(2, 0, 50)]
    # Unchunked: any prompt that can start goes.
    assert plan_of(jobs, 2048, 0, start=lambda job: id(job) not in blocked) == [(1, 0, 1000), (2, 0, 50)]


def test_packed_mask_keeps_segments_apart_and_sees_earlier_chunks():
    a, b = FakeJob([1, 2, 3, 4, 5]), FakeJob([7, 8])
    a.done = 3
    plan = plan_batch([a, b], 10, 0)
    ids, positions, mask = packed_inputs(plan, torch.device("cpu"))
    assert ids.tolist() == [[4, 5, 7, 8]] and positions.tolist() == [[3, 4, 0, 1]]
    assert mask[0, 0].int().tolist() == [
        [1, 1, 1, 1, 0, 0, 0],  # a's token 3 sees a's 0..3
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],  # b's token 0 sees only itself
        [0, 0, 0, 0, 0, 1, 1],
    ]


# ---- engines on a real (tiny) model -------------------------------------------------------


def make_decode(loaded, budget_tokens: int = 4096, **kw) -> DecodeEngine:
    return DecodeEngine(loaded, kv_budget=budget_tokens * loaded.info.kv.bytes_per_token(loaded.dtype), **kw)


def params(tid: str, prompt: int, max_tokens: int = 8, **kw) -> DecodeParams:
    return DecodeParams(tid, tid, prompt, GREEDY, frozenset(), max_tokens, **kw)


async def test_reservation_limits():
    engine = make_decode(get_loaded("preset:tiny-llama"), budget_tokens=64, block_size=16, max_queued=1)
    await engine.reserve(params("a", 4))
    with pytest.raises(InvalidArgument, match="already reserved"):
        await engine.reserve(params("a", 4))
    with pytest.raises(InvalidArgument, match="context length 2048"):
        await engine.reserve(params("b", 2000, max_tokens=100))
    with pytest.raises(InvalidArgument, match="needs 5 KV blocks"):
        await engine.reserve(params("c", 70))
    big = asyncio.ensure_future(engine.reserve(params("d", 40, max_tokens=8)))  # 3 blocks: 2 free, so it queues
    await asyncio.sleep(0)
    small = await engine.reserve(params("e", 4))  # 1 block, ends no later than "d" could start: passes it
    with pytest.raises(ResourceExhausted, match="retry after about"):  # 2 blocks: would queue, queue is full
        await engine.reserve(params("f", 20))
    engine.release(small)
    with pytest.raises(NotFound):
        engine.begin_transfer(KVLayout("zzz", 4, 4, 2, 16, "float32"))
    big.cancel()
    await asyncio.sleep(0)
    assert engine.stats()["queued"] == 0


async def prefill_into(engine: DecodeEngine, prefill: PrefillEngine, tid: str, prompt: list[int]) -> int:
    kv = engine.info.kv
    assembly = engine.begin_transfer(KVLayout(tid, kv.num_layers, len(prompt), kv.kv_heads, kv.head_dim,
                                              DTYPE_NAMES[engine.pool.dtype]))

    loop = asyncio.get_running_loop()

    def add(layer, start, k, v):
        for chunk in split_layer(layer, token_major(k), token_major(v), 4096, start):
            assembly.add(chunk)

    def on_layer(layer, start, k, v):  # on the worker thread: the assembly lives on the loop
        loop.call_soon_threadsafe(add, layer, start, k, v)

    result = await prefill.prefill(prompt, GREEDY, on_layer)
    engine.complete_transfer(tid, result.first_token)
    return result.first_token


async def drain(seq) -> list:
    events = []
    while (event := await seq.events.get()) is not None:
        events.append(event)
    return events


async def generate_locally(engine: DecodeEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Starts the engine, prefills each prompt on it (colocated) and decodes them together; stops it. Each
    request's tokens, the first included."""
    engine.start()

    async def one(i, prompt):
        seq = await engine.reserve(params(f"l{i}", len(prompt), max_tokens=max_tokens), local=True)
        await engine.prefill_locally(seq, prompt)
        return [e.token_id for e in await drain(seq)]

    try:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        await engine.stop()


@pytest.mark.parametrize("spec,kernel", [("preset:tiny-llama", "gather"), ("preset:tiny-gpt2", "gather"),
                                         ("preset:tiny-llama", "flex")])
async def test_chunked_packed_prefill_into_paged_decode_matches_generate(spec, kernel):
    loaded = get_loaded(spec)
    engine = make_decode(loaded, block_size=4, paged_kernel=kernel)
    prefill = PrefillEngine(loaded, token_budget=48, chunk_tokens=32)  # several prompts a pass, long ones chunked
    engine.start()
    rng = random.Random(spec)
    prompts = {f"r{i}": [rng.randrange(loaded.info.vocab_size) for _ in range(n)] for i, n in enumerate([5, 90, 33, 17, 64])}
    seqs = {tid: await engine.reserve(params(tid, len(p), max_tokens=7)) for tid, p in prompts.items()}
    firsts = await asyncio.gather(*(prefill_into(engine, prefill, tid, p) for tid, p in prompts.items()))
    outputs = {tid: [first] + [e.token_id for e in await drain(seqs[tid])] for tid, first in zip(prompts, firsts)}
    await engine.stop()
    await prefill.close()
    assert prefill.peak_batch > 1 and prefill.passes < len(prompts) + 5
    for tid, prompt in prompts.items():
        assert outputs[tid] == reference_greedy(loaded, prompt, 7, ignore_eos=True), tid
    assert engine.pool.allocator.num_used == 0


async def test_batch_of_two_with_max_batch_one_runs_one_after_the_other():
    loaded = get_loaded("preset:tiny-llama")
    engine = make_decode(loaded, max_batch=1)
    prefill = PrefillEngine(loaded)
    engine.start()
    prompts = {"x": [5, 6, 7], "y": list(range(40, 90))}
    outputs = {}
    for tid, prompt in prompts.items():
        seq = await engine.reserve(params(tid, len(prompt), max_tokens=6))
        first = await prefill_into(engine, prefill, tid, prompt)
        outputs[tid] = (first, seq)
    for tid, (first, seq) in outputs.items():
        events = await drain(seq)
        assert events[-1].finish is FinishReason.LENGTH
        assert [first] + [e.token_id for e in events] == reference_greedy(loaded, prompts[tid], 6, ignore_eos=True)
    await engine.stop()
    await prefill.close()
    assert engine.counters.peak_running == 1


@pytest.mark.parametrize("kernel", ["gather", "flex"])
async def test_decode_is_exact_over_a_pool_whose_memory_held_nan(kernel, monkeypatch):
    """A host pool is allocated where earlier tensors lived, and those bytes may read as NaN. A flex row reads
    the unwritten slots of its last block (masked: weighed by 0, but 0 x NaN is NaN): in a CI run of the whole
    suite one request's tokens after the first came out 0, 0, 0 until its own writes covered them. Every
    kernel must decode exactly over a pool allocated from such memory."""
    loaded = get_loaded("preset:tiny-llama")
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    engine = make_decode(loaded, block_size=16, paged_kernel=kernel)
    monkeypatch.undo()
    prompts = [list(range(3, 3 + n)) for n in (5, 21, 40)]  # each ends inside a block
    for prompt, out in zip(prompts, await generate_locally(engine, prompts, max_tokens=6)):
        assert out == reference_greedy(loaded, prompt, 6, ignore_eos=True)


@pytest.mark.parametrize("chunk", [0, 16])
async def test_local_prefill_with_and_without_chunks_matches_generate(chunk):
    loaded = get_loaded("preset:tiny-qwen2")
    engine = make_decode(loaded, prefill_token_budget=32, prefill_chunk_tokens=chunk)
    prompts = [list(range(3, 3 + n)) for n in (70, 4, 25)]
    for prompt, out in zip(prompts, await generate_locally(engine, prompts, max_tokens=5)):
        assert out == reference_greedy(loaded, prompt, 5, ignore_eos=True)
    assert engine.counters.local_prefills == 3 and engine.pool.allocator.num_used == 0


@pytest.mark.parametrize("kernel", ["gather", "flex"])
async def test_overlapped_steps_give_every_request_the_tokens_of_one_step_at_a_time(kernel):
    """Overlapped steps (on by default with CUDA graphs) launch step n+1 before step n's tokens reach the
    host: a greedy row's next input comes from the device, a request ending by length at step n sits out
    n+1, one ending by an EOS takes a row whose token is dropped, and a sampled row's token, drawn on the
    device, feeds the next step as a greedy one does. Forced on here, on the CPU: the same tokens and ends as steps one at a time, through joins
    mid-run (max_batch 3 for 7 requests), EOS, length, seeded sampling and a cancellation, and every
    block back at the end."""
    loaded = get_loaded("preset:tiny-llama")
    rng = random.Random(kernel)
    prompts = [[rng.randrange(loaded.info.vocab_size) for _ in range(rng.randint(3, 30))] for _ in range(7)]
    eos = {}
    out = reference_greedy(loaded, prompts[1], 12, ignore_eos=True)
    stop = next(i for i in range(3, 12) if out[i] not in out[:i])
    eos[1] = frozenset({out[stop]})  # request 1 ends by EOS at its token `stop`
    # Sampled requests join last, beside greedy ones.
    sampled = {5: SamplingParams(temperature=0.9, seed=5), 6: SamplingParams(temperature=0.7, top_k=20, seed=9)}

    async def run(overlap: bool):
        engine = make_decode(loaded, block_size=4, paged_kernel=kernel, max_batch=3, overlap_steps=overlap)
        prefill = PrefillEngine(loaded)
        engine.start()

        async def one(i: int):
            await asyncio.sleep(0.02 * i)
            seq = await engine.reserve(DecodeParams(f"r{i}", f"r{i}", len(prompts[i]), sampled.get(i, GREEDY),
                                                    eos.get(i, frozenset()), 12 if i != 3 else 2))
            first = await prefill_into(engine, prefill, f"r{i}", prompts[i])
            events = []
            while (event := await seq.events.get()) is not None:
                events.append(event)
                if i == 4 and len(events) == 3:
                    engine.release(seq)
                    break
            return [first] + [e.token_id for e in events], events[-1].finish

        results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        for _ in range(100):
            if engine.pool.allocator.num_used == 0:
                break
            await asyncio.sleep(0.01)
        used = engine.pool.allocator.num_used
        assert engine.counters.overlapped_steps >= (3 if overlap else 0) and engine.counters.steps >= 12
        await engine.stop()
        await prefill.close()
        return results, used

    stepwise, used = await run(False)
    overlapped, used_overlapped = await run(True)
    assert overlapped == stepwise and used == used_overlapped == 0
    assert stepwise[1][1] is FinishReason.STOP and len(stepwise[1][0]) == stop + 1
    assert stepwise[3] == (reference_greedy(loaded, prompts[3], 2, ignore_eos=True), FinishReason.LENGTH)
    for i in (0, 2):
        assert stepwise[i] == (reference_greedy(loaded, prompts[i], 12, ignore_eos=True), FinishReason.LENGTH)


async def test_step_time_is_what_a_request_sees_start_to_start():
    """Admission converts steps to seconds with the step time: on a busy host the loop's own work between
    passes (streams, transfers) was missing from it, and requests admitted at the edge of their deadline
    missed it (issue 13's flood). 200 ms of loop work after every pass (a tiny model's pass takes a few)
    shows in the step time."""
    engine = make_decode(get_loaded("preset:tiny-llama"))
    postprocess = engine._postprocess

    def slow_postprocess(batch, tokens):
        time.sleep(0.2)  # blocking the loop, as a busy one is between passes
        postprocess(batch, tokens)

    engine._postprocess = slow_postprocess
    engine.start()
    seq = await engine.reserve(params("busy", 8, max_tokens=8), local=True)
    await engine.prefill_locally(seq, list(range(3, 11)))
    await drain(seq)
    await engine.stop()
    assert engine.step_ms() >= 200


async def test_paced_steps_start_at_least_the_interval_apart_and_keep_the_tokens():
    """A decode sharing its GPU with prefill paces its steps (--min-step-interval-ms): steps start at least
    the interval apart (the first token is prefill's, the first step follows it at once), and the tokens
    are the unpaced ones."""
    loaded = get_loaded("preset:tiny-llama")
    prompt = list(range(3, 11))
    engine = make_decode(loaded, min_step_interval_ms=60)
    engine.start()
    seq = await engine.reserve(params("paced", len(prompt), max_tokens=8), local=True)
    await engine.prefill_locally(seq, prompt)
    arrivals, tokens = [], []
    while (event := await seq.events.get()) is not None:
        arrivals.append(time.perf_counter())
        tokens.append(event.token_id)
    await engine.stop()
    # Tokens 2..8 come from steps 1..7, each started >= 60 ms after the one before (a step's own few ms of
    # compute may vary between the first and the last).
    assert len(tokens) == 8 and arrivals[-1] - arrivals[1] >= 6 * 0.060 - 0.03 and engine.step_ms() >= 59
    assert tokens == reference_greedy(loaded, prompt, 8, ignore_eos=True)


def test_step_times_tell_a_full_batch_from_a_small_one_and_ignore_one_off_spikes():
    from pdserve.engine.decode import StepTimes

    times = StepTimes()
    assert times.ms(8) == 0.0  # nothing seen yet: no refusal by estimate
    for rows in [1, 4, 8, 16, 32, 2, 24, 12] * 4:
        times.add(rows, 50.0 + 5.0 * rows)  # 50 ms a step, 5 ms a row
    times.add(32, 5000.0)  # a CUDA graph captured: once
    assert abs(times.ms(32) - 210.0) < 1.0 and abs(times.ms(1) - 55.0) < 1.0


async def test_cancelled_requests_give_their_blocks_back_in_every_state():
    loaded = get_loaded("preset:tiny-llama")
    engine = make_decode(loaded, budget_tokens=256, block_size=16, max_queued=4)
    prefill = PrefillEngine(loaded)
    engine.start()
    running = await engine.reserve(params("run", 8, max_tokens=200))
    await prefill_into(engine, prefill, "run", list(range(8)))
    waiting = await engine.reserve(params("wait", 8, max_tokens=8))      # blocks granted, no KV yet
    queued = asyncio.ensure_future(engine.reserve(params("q", 200, max_tokens=8)))  # no room: queued
    await asyncio.sleep(0.05)
    assert engine.stats()["queued"] == 1 and running.state is SeqState.RUNNING
    queued.cancel()
    engine.release(waiting)
    engine.release(running)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if engine.pool.allocator.num_used == 0:
            break
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["queued"] == 0
    await engine.stop()
    await prefill.close()


async def test_a_reservation_whose_kv_never_comes_or_trickles_is_freed_when_its_lease_expires():
    from pdserve.errors import DeadlineExceeded
    from pdserve.kv.wire import KVChunkData, checksum

    loaded = get_loaded("preset:tiny-llama")
    engine = make_decode(loaded, kv_lease_s=0.3, kv_transfer_max_s=0.6)
    engine.start()
    kv = loaded.info.kv
    never = await engine.reserve(params("never", 8))
    trickles = await engine.reserve(params("trickles", 8))
    assembly = engine.begin_transfer(KVLayout("trickles", kv.num_layers, 8, kv.kv_heads, kv.head_dim,
                                              DTYPE_NAMES[loaded.dtype]))
    row = bytes(kv.kv_heads * kv.head_dim * loaded.dtype.itemsize)
    # One token every 50 ms: never silent for the 0.3 s lease, never complete either: it is failed 0.6 s after
    # the reservation however it progresses.
    first = asyncio.get_running_loop().time()
    with pytest.raises(DeadlineExceeded):
        for layer in range(kv.num_layers):
            for token in range(8):
                assembly.add(KVChunkData(layer, token, 1, row, row, checksum(row, row)))
                await asyncio.sleep(0.05)
    assert 0.5 < asyncio.get_running_loop().time() - first < 0.9
    with pytest.raises(DeadlineExceeded, match="no KV arrived"):
        raise await asyncio.wait_for(never.events.get(), 2)
    with pytest.raises(DeadlineExceeded, match="not complete 0.6 s after the reservation"):
        raise await asyncio.wait_for(trickles.events.get(), 2)
    stats = engine.stats()
    assert (stats["waiting_for_kv"], stats["kv_blocks_used"], stats["leases_expired"]) == (0, 0, 2)
    await engine.stop()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_device_io_moves_values_to_the_device_and_back(device):
    ids = upload([[1, 2], [3, 4]], torch.long, torch.device(device))
    assert ids.device.type == device and ids.dtype == torch.long
    pending = HostCopy(ids * 2)  # queued now, read later
    more = ids + 1  # work queued meanwhile
    assert pending.tolist() == [[2, 4], [6, 8]]
    assert download(more) == [[2, 3], [4, 5]]
    assert download(upload([0.5, -1.0], torch.float32, device)) == [0.5, -1.0]
