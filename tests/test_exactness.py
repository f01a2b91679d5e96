"""Greedy output through gateway -> prefill -> KV stream -> decode equals single-process generate()."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from pdserve.sdk import AsyncClient
from pdserve.v1 import decode_pb2, decode_pb2_grpc
from tests.cluster import reference_greedy, start_cluster
from tests.conftest import get_loaded

CHATS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Translate 'good morning' into Spanish, French and German.",
    "You are a helpful assistant. Summarise the plot of Romeo and Juliet in a few sentences, "
    "mentioning the two families, the balcony scene and how the story ends.",
]
PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
]


def chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def test_default_model_concurrent_prompts_match_generate(smol, smol_cluster):
    tok = smol.info.tokenizer
    max_tokens = 32
    async with AsyncClient(smol_cluster.address) as client:
        calls = [client.generate(messages=[{"role": "user", "content": c}], max_tokens=max_tokens, temperature=0)
                 for c in CHATS]
        calls += [client.generate(prompt=p, max_tokens=max_tokens, temperature=0) for p in PROMPTS]
        results = await asyncio.gather(*calls)
    prompt_ids = [chat_ids(tok, c) for c in CHATS] + [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids), "prompts of different lengths"
    for ids, result in zip(prompt_ids, results):
        expected = reference_greedy(smol, ids, max_tokens)
        assert result.token_ids == expected
        assert result.prompt_tokens == len(ids)
        assert result.text == tok.decode(expected, skip_special_tokens=True)
        assert result.finish_reason == ("stop" if expected[-1] in smol.info.eos_token_ids else "length")
    assert "Paris" in results[1].text


@pytest.mark.parametrize("spec", ["preset:tiny-llama", "preset:tiny-qwen2", "preset:tiny-gpt2"])
async def test_random_presets_match_generate(spec):
    loaded = get_loaded(spec)
    cluster = await start_cluster(loaded)
    rng = random.Random(spec)
    prompts = [[rng.randrange(loaded.info.vocab_size) for _ in range(n)] for n in (1, 7, 33, 150)]
    try:
        async with AsyncClient(cluster.address) as client:
            results = await asyncio.gather(*[client.generate(token_ids=p, max_tokens=24, temperature=0) for p in prompts])
    finally:
        await cluster.stop()
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(loaded, prompt, 24)
        assert result.finish_reason == "length"


async def test_sixteen_concurrent_mixed_requests_batch_continuously(smol, smol_cluster):
    rng = random.Random(16)
    vocab = smol.info.vocab_size
    requests = [([rng.randrange(100, vocab) for _ in range(rng.randint(4, 160))], rng.randint(6, 40)) for _ in range(16)]
    stub = decode_pb2_grpc.DecodeStub(grpc.aio.insecure_channel(smol_cluster.decode_address))
    observed: list[int] = []

    async def watch_batch() -> None:
        while True:
            observed.append((await stub.GetStats(decode_pb2.GetStatsRequest())).running)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_batch())
    async with AsyncClient(smol_cluster.address) as client:
        results = await asyncio.gather(*[client.generate(token_ids=p, max_tokens=n, temperature=0) for p, n in requests])
    watcher.cancel()
    assert max(observed) > 1, "the decode batch never held more than one request"
    # Requests joined and left at different steps: batch size took several values.
    assert len(set(observed)) > 2
    for (prompt, n), result in zip(requests, results):
        assert result.token_ids == reference_greedy(smol, prompt, n)


async def test_kv_split_into_many_chunks_per_layer_stays_exact():
    loaded = get_loaded("preset:tiny-llama")
    # Every layer goes out in 1 KiB messages.
    cluster = await start_cluster(loaded, prefill_options={"kv_chunk_bytes": 1024})
    prompt = list(range(3, 203))
    try:
        async with AsyncClient(cluster.address) as client:
            result = await client.generate(token_ids=prompt, max_tokens=12, temperature=0)
    finally:
        await cluster.stop()
    # 4 layers x 200 tokens x 2 heads x 16 dims x 4 bytes x (K+V): 51 KiB a layer, ~50 messages each.
    assert result.server_timings["kv_bytes"] == 4 * 200 * 2 * 16 * 4 * 2
    assert result.token_ids == reference_greedy(loaded, prompt, 12)


async def test_ignore_eos_generates_past_the_end_of_sequence(smol, smol_cluster):
    ids = chat_ids(smol.info.tokenizer, "Hi!")
    stops_early = reference_greedy(smol, ids, 40)
    assert len(stops_early) < 40 and stops_early[-1] in smol.info.eos_token_ids
    async with AsyncClient(smol_cluster.address) as client:
        normal = await client.generate(token_ids=ids, max_tokens=40, temperature=0)
        ignoring = await client.generate(token_ids=ids, max_tokens=40, temperature=0, ignore_eos=True)
    assert normal.token_ids == stops_early and normal.finish_reason == "stop"
    assert ignoring.token_ids == reference_greedy(smol, ids, 40, ignore_eos=True)
    assert ignoring.finish_reason == "length"
