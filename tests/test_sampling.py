"""Sampling: seeded reproducibility end to end, greedy equivalences, and the sampler's filters."""

from __future__ import annotations

import torch

from pdserve.engine.sampling import SamplingParams, sample, token_seed
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


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0, -10.0]])
    top_k = SamplingParams(temperature=5.0, top_k=2, seed=0)
    seen = {sample(logits, [SamplingParams(temperature=5.0, top_k=2, seed=s)], [0])[0] for s in range(200)}
    assert seen == {0, 1}
    assert top_k.top_k == 2
    # Probabilities ~[0.66, 0.24, 0.09, ...]: top_p=0.5 keeps only the first.
    seen = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.5, seed=s)], [0])[0] for s in range(100)}
    assert seen == {0}
