"""CUDA-graph decode steps give the same tokens as eager ones (runs where a GPU is present; CI has none)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from pdserve.engine.decode import DecodeEngine, DecodeParams
from pdserve.engine.sampling import SamplingParams
from pdserve.model import load_model
from tests.cluster import reference_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


async def run(loaded, prompts: dict[str, list[int]], max_tokens: dict[str, int], graphs: bool, sampling) -> tuple:
    kv = loaded.info.kv
    engine = DecodeEngine(loaded, kv_budget=8192 * kv.bytes_per_token(loaded.dtype), block_size=16, max_batch=8,
                          paged_kernel="flex", cuda_graphs=graphs)
    engine.start()

    async def one(tid: str, prompt: list[int], delay: float) -> list[int]:
        await asyncio.sleep(delay)  # requests join and leave at different steps: batch buckets change
        params = sampling[tid] if isinstance(sampling, dict) else sampling
        seq = await engine.reserve(DecodeParams(tid, tid, len(prompt), params, frozenset(), max_tokens[tid]),
                                   local=True)
        await engine.prefill_locally(seq, prompt)
        tokens = []
        while (event := await seq.events.get()) is not None:
            tokens.append(event.token_id)
        return tokens

    outputs = await asyncio.gather(*(one(tid, p, 0.01 * i) for i, (tid, p) in enumerate(prompts.items())))
    captured = engine.stats()["cuda_graphs"]
    if graphs:
        assert engine.counters.peak_running > 1, "the requests never shared a step"
    # With graphs, steps overlap, sampled ones too: each launched before the previous one's tokens reached the host.
    assert (engine.counters.overlapped_steps > 0) is graphs
    await engine.stop()
    assert engine.pool.allocator.num_used == 0
    return dict(zip(prompts, outputs)), captured


@pytest.mark.parametrize("spec", ["preset:tiny-llama", "preset:tiny-qwen2"])
def test_graphed_decode_matches_eager_and_generate(spec):
    loaded = load_model(spec, device="cuda", dtype="float32")
    rng = random.Random(spec)
    lengths = [5, 90, 33, 17, 64, 3, 120]
    prompts = {f"r{i}": [rng.randrange(loaded.info.vocab_size) for _ in range(n)] for i, n in enumerate(lengths)}
    max_tokens = {tid: 24 + 7 * (i % 4) for i, tid in enumerate(prompts)}  # long enough to overlap the next ones
    greedy = SamplingParams(temperature=0)
    graphed, captured = asyncio.run(run(loaded, prompts, max_tokens, True, greedy))
    eager, none = asyncio.run(run(loaded, prompts, max_tokens, False, greedy))
    assert captured >= 2 and none == 0  # batch buckets changed (tables of these lengths share one width)
    assert graphed == eager
    for tid, prompt in prompts.items():
        assert graphed[tid] == reference_greedy(loaded, prompt, max_tokens[tid], ignore_eos=True), tid
    # Seeded sampling reads the graph's logits the same way.
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    assert asyncio.run(run(loaded, prompts, max_tokens, True, seeded))[0] == \
        asyncio.run(run(loaded, prompts, max_tokens, False, seeded))[0]
    # Greedy and sampled rows in one batch (sampled on the device after the replay, in the step's stream).
    mixed = {tid: seeded if i % 3 == 1 else greedy for i, tid in enumerate(prompts)}
    assert asyncio.run(run(loaded, prompts, max_tokens, True, mixed))[0] == \
        asyncio.run(run(loaded, prompts, max_tokens, False, mixed))[0]


def test_graphs_captured_at_startup_serve_every_batch_without_capturing_again():
    loaded = load_model("preset:tiny-llama", device="cuda", dtype="float32")
    rng = random.Random(3)
    prompts = {f"r{i}": [rng.randrange(loaded.info.vocab_size) for _ in range(n)] for i, n in
               enumerate([5, 90, 33, 17, 64, 3, 120])}
    max_tokens = {tid: 6 + 7 * (i % 4) for i, tid in enumerate(prompts)}

    async def main():
        engine = DecodeEngine(loaded, kv_budget=8192 * loaded.info.kv.bytes_per_token(loaded.dtype), block_size=16,
                              max_batch=8, paged_kernel="flex")
        await engine.capture_graphs(1024)  # 64 blocks: one table width, batches 1, 2, 4 and 8
        captured = engine.stats()["cuda_graphs"]
        engine.start()
        outputs = {}
        for tid, prompt in prompts.items():
            seq = await engine.reserve(DecodeParams(tid, tid, len(prompt), SamplingParams(temperature=0), frozenset(),
                                                    max_tokens[tid]), local=True)
            await engine.prefill_locally(seq, prompt)
            outputs[tid] = seq
        tokens = {}
        for tid, seq in outputs.items():
            tokens[tid] = []
            while (event := await seq.events.get()) is not None:
                tokens[tid].append(event.token_id)
        after = engine.stats()["cuda_graphs"]
        await engine.stop()
        return captured, after, tokens

    captured, after, tokens = asyncio.run(main())
    assert captured == 4 and after == captured
    for tid, prompt in prompts.items():
        assert tokens[tid] == reference_greedy(loaded, prompt, max_tokens[tid], ignore_eos=True), tid


def test_the_sampling_hash_is_the_same_bits_on_the_gpu():
    """Token i of a seeded request is the same whichever device samples it: the Gumbel noise's integer hash
    (int64 multiplications wrapping) gives the CPU's bits on the GPU, and so does the noise."""
    from pdserve.engine.sampling import gumbel_noise, mix64

    values = torch.tensor([0, 1, 12345, (1 << 62) + 7, -(1 << 63) + 3, -1, 0x5DEECE66D], dtype=torch.long)
    assert mix64(values.cuda()).cpu().tolist() == mix64(values).tolist()
    seeds = torch.tensor([[7], [1 << 40]], dtype=torch.long)
    ids = torch.arange(1000, dtype=torch.long).repeat(2, 1)
    torch.testing.assert_close(gumbel_noise(seeds.cuda(), ids.cuda()).cpu(), gumbel_noise(seeds, ids))
