"""Bad input gets INVALID_ARGUMENT naming the field and the limit, and disturbs nobody."""

from __future__ import annotations

import pytest

from pdserve.sdk import AsyncClient, InvalidArgument
from tests.cluster import reference_greedy

CONTEXT = 8192  # SmolLM2-135M's context length

BAD_REQUESTS = [
    (dict(prompt=""), ["prompt", "empty"]),
    (dict(messages=[]), ["chat.messages", "empty"]),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), ["chat.messages[0].role", "user"]),
    (dict(token_ids=[]), ["token_ids", "empty"]),
    (dict(token_ids=[1, 2, 10**6]), ["token_ids", "1000000", "[0, 49152)"]),
    (dict(prompt="hello", max_tokens=CONTEXT), ["sampling.max_tokens", "context length of 8192"]),
    (dict(token_ids=[1] * (CONTEXT + 5)), ["prompt", "8197 tokens", "8192"]),
    (dict(prompt="hello", max_tokens=0), ["sampling.max_tokens", ">= 1", "0"]),
    (dict(prompt="hello", max_tokens=-3), ["sampling.max_tokens", ">= 1", "-3"]),
    (dict(prompt="hello", temperature=-0.5), ["sampling.temperature", ">= 0", "-0.5"]),
    (dict(prompt="hello", top_p=0.0), ["sampling.top_p", "(0, 1]"]),
    (dict(prompt="hello", top_p=1.5), ["sampling.top_p", "(0, 1]", "1.5"]),
    (dict(prompt="hello", top_k=-1), ["sampling.top_k", ">= 0"]),
    (dict(prompt="hello", model="llama-70b"), ["model", "llama-70b", "SmolLM2-135M-Instruct"]),
    (dict(prompt="hello", stop=[""]), ["sampling.stop[0]", "1 to 256"]),
]


@pytest.mark.parametrize("kwargs,needles", BAD_REQUESTS, ids=[str(k)[:60] for k, _ in BAD_REQUESTS])
async def test_bad_request_is_invalid_argument_naming_field_and_limit(smol_cluster, kwargs, needles):
    async with AsyncClient(smol_cluster.address) as client:
        with pytest.raises(InvalidArgument) as info:
            await client.generate(**kwargs)
    for needle in needles:
        assert needle in str(info.value)


async def test_bad_requests_do_not_disturb_a_streaming_request(smol, smol_cluster):
    prompt = smol.info.tokenizer("In the beginning of the twentieth century,")["input_ids"]
    async with AsyncClient(smol_cluster.address) as client:
        chunks = []
        stream = client.stream(token_ids=prompt, max_tokens=40, temperature=0, ignore_eos=True)
        chunks.append(await anext(stream))  # streaming has begun
        for kwargs, _ in BAD_REQUESTS:
            with pytest.raises(InvalidArgument):
                await client.generate(**kwargs)
        async for chunk in stream:
            chunks.append(chunk)
    tokens = [t for c in chunks for t in c.token_ids]
    assert [c.index for c in chunks] == list(range(40))
    assert chunks[-1].finish_reason == "length"
    assert tokens == reference_greedy(smol, prompt, 40, ignore_eos=True)
