"""Sampling: seeded reproducibility end to end, greedy equivalences, and the sampler's filters."""

from __future__ import annotations

import torch

from pdserve.engine.sampling import SamplingParams, mix64, sample, sample_tokens, token_seed
from pdserve.sdk import AsyncClient
from tests.cluster import reference_greedy

PROMPT = "Write a short poem about autumn leaves."


async def test_same_seed_same_tokens_different_seed_differs(smol_cluster):
    async with AsyncClient(smol_cluster.address) as client:
        kwargs = dict(messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=1.0, top_p=0.95)
        a = await client.generate(seed=1234, **kwargs)
        b = await client.generate(seed=1234, **kwargs)
        c = await client.generate(seed=99, **kwargs)
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert c.token_ids != a.token_ids


async def test_top_k_1_and_temperature_0_are_greedy(smol, smol_cluster):
    ids = smol.info.tokenizer("The three primary colours are")["input_ids"]
    expected = reference_greedy(smol, ids, 16)
    async with AsyncClient(smol_cluster.address) as client:
        top_k_1 = await client.generate(token_ids=ids, max_tokens=16, temperature=1.5, top_k=1, seed=7)
        temp_0 = await client.generate(token_ids=ids, max_tokens=16, temperature=0, seed=7)
    assert top_k_1.token_ids == expected
    assert temp_0.token_ids == expected


def test_sampler_is_a_function_of_seed_and_index():
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=5)
    first = sample(logits, [p, p, p], [0, 1, 2])
    # Batch position does not matter: the same row at the same index gives the same token.
    assert sample(logits[[2, 0, 1]], [p, p, p], [2, 0, 1]) == [first[2], first[0], first[1]]
    assert token_seed(5, 0) != token_seed(5, 1) != token_seed(6, 0)


def test_the_device_hash_is_splitmix64_on_int64_tensors():
    """The Gumbel noise's hash runs on tensors (int64 multiplications wrapping, shifts made logical): it is
    the 64-bit splitmix64 finaliser bit for bit."""
    mask = (1 << 64) - 1

    def reference(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    values = [0, 1, 12345, (1 << 62) + 7, (1 << 63) + 3, mask]
    signed = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
    got = [v & mask for v in mix64(torch.tensor(signed, dtype=torch.long)).tolist()]
    assert got == [reference(v) for v in values]


def test_sampled_tokens_follow_the_softmax():
    """Gumbel-max over 4,000 seeds: each token's frequency is its softmax probability (the draws are fixed
    by the seeds, so this is deterministic)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    expected = torch.softmax(logits[0] / 0.8, dim=-1)
    draws = [sample(logits, [SamplingParams(temperature=0.8, seed=s)], [3])[0] for s in range(4000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert (frequencies - expected).abs().max() < 0.025, (frequencies, expected)


def test_a_batch_is_sampled_on_its_device_and_greedy_rows_keep_their_argmax():
    logits = torch.randn(4, 100)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5, seed=4)]
    argmax = logits.argmax(-1)
    tokens = sample_tokens(logits, params, [0, 1, 2, 3], argmax=argmax)
    assert isinstance(tokens, torch.Tensor) and tokens.device == logits.device
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]
    assert int(tokens[3]) in logits[3].topk(5).indices.tolist()
    assert tokens.tolist() == sample(logits, params, [0, 1, 2, 3])


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0, -10.0]])
    top_k = SamplingParams(temperature=5.0, top_k=2, seed=0)
    seen = {sample(logits, [SamplingParams(temperature=5.0, top_k=2, seed=s)], [0])[0] for s in range(200)}
    assert seen == {0, 1}
    assert top_k.top_k == 2
    # Probabilities ~[0.66, 0.24, 0.09, ...]: top_p=0.5 keeps only the first.
    seen = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.5, seed=s)], [0])[0] for s in range(100)}
    assert seen == {0}


HOSTILE = [dict(temperature=t, top_p=p, top_k=k, seed=s)
           for t in (1e-45, 1e-37, 1e-6, 1e-5, 2e-5, 1.0, 1e30, 3.4e38)
           for p, k, s in ((1e-45, 0, 0), (1.0, 2**31 - 1, 2**64 - 1), (0.5, 1, 3), (1.0, 0, 12345))]


def test_no_accepted_parameters_make_a_row_fail_or_change_its_neighbours():
    """Every accepted combination of sampling values, on ordinary, huge and non-finite logits: sampling never
    raises, and an innocent row's token is the one it gets alone."""
    torch.manual_seed(0)
    rows = [torch.randn(64), torch.randn(64) * 1e30, torch.full((64,), -1e38)]
    rows.append(torch.where(torch.arange(64) % 3 == 0, float("-inf"), torch.randn(64)))
    rows.append(torch.full((64,), float("nan")))
    rows.append(torch.where(torch.arange(64) == 5, float("inf"), torch.randn(64)))
    innocent = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    clean = torch.randn(64)
    alone = sample(clean[None], [innocent], [3])[0]
    for values in HOSTILE:
        hostile = SamplingParams(**values)
        for row in rows:
            tokens = sample(torch.stack([clean, row, clean]), [innocent, hostile, innocent], [3, 7, 3])
            assert tokens[0] == tokens[2] == alone and 0 <= tokens[1] < 64, (values, row[:3])


def test_tiny_temperatures_are_greedy():
    logits = torch.randn(4, 100)
    greedy = logits.argmax(-1).tolist()
    for t in (1e-45, 1e-37, 1e-10, 1e-5):
        assert SamplingParams(temperature=t).greedy
        assert sample(logits, [SamplingParams(temperature=t, seed=s) for s in range(4)], [0, 1, 2, 3]) == greedy
    assert not SamplingParams(temperature=2e-5).greedy


async def test_innocent_requests_beside_the_most_hostile_sampling_values_complete_token_exact(tiny_cluster):
    """Requests with every hostile accepted value share prefill passes and decode batches with greedy ones:
    every request completes, and the greedy ones are token-identical to generate()."""
    import asyncio
    import random

    from tests.conftest import get_loaded

    loaded = get_loaded("preset:tiny-llama")
    rng = random.Random(3)
    prompts = [[rng.randrange(loaded.info.vocab_size) for _ in range(rng.randrange(3, 40))] for _ in range(16)]
    async with AsyncClient(tiny_cluster.address) as client:
        innocent = [client.generate(token_ids=p, max_tokens=24, temperature=0, ignore_eos=True) for p in prompts]
        hostile = [client.generate(token_ids=prompts[i % len(prompts)], max_tokens=24, ignore_eos=True, **values)
                   for i, values in enumerate(HOSTILE)]
        results = await asyncio.gather(*innocent, *hostile)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(loaded, prompt, 24, ignore_eos=True)
    assert all(r.completion_tokens == 24 for r in results)
