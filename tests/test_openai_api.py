"""The OpenAI-compatible HTTP API, driven by the official ``openai`` package against real clusters."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import openai
import pytest

from pdserve import config as cfg
from pdserve.errors import Unauthenticated
from pdserve.sdk import AsyncClient
from services.gateway.server import start_gateway
from tests.cluster import reference_greedy, start_cluster
from tests.conftest import get_loaded

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


_CLIENTS: list[openai.AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def _close_clients():
    """Every client's connections are closed at the end of its test. One left to the garbage collector closes
    its socket in asyncio's transport finalizer without unregistering it from the event loop's selector; the
    next socket given that descriptor number (a server's listener, say) is then never polled."""
    yield
    while _CLIENTS:
        await _CLIENTS.pop().close()


def openai_client(base_url: str, api_key: str = "unused", **kw) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, **kw)
    _CLIENTS.append(client)
    return client


def client_for(cluster, api_key: str = "unused", **kw) -> openai.AsyncOpenAI:
    return openai_client(cluster.http_url, api_key, **kw)


async def test_chat_is_token_identical_to_the_grpc_api_streamed_or_not(smol, smol_cluster):
    name = smol.info.name
    async with AsyncClient(smol_cluster.address) as grpc_client:
        expected = await grpc_client.generate(messages=QUESTION, max_tokens=24, temperature=0)
    api = client_for(smol_cluster)
    reply = await api.chat.completions.create(model=name, messages=QUESTION, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens,
                                                                          expected.completion_tokens)
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    assert reply.model == name and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")

    stream = await api.chat.completions.create(model=name, messages=QUESTION, max_tokens=24, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


async def test_completions_from_text_and_token_ids_match_the_reference(smol, smol_cluster):
    tok = smol.info.tokenizer
    prompt = "The three primary colours are"
    ids = tok(prompt)["input_ids"]
    expected = reference_greedy(smol, ids, 16)
    api = client_for(smol_cluster)
    for given in (prompt, ids, [ids], [prompt]):
        reply = await api.completions.create(model=smol.info.name, prompt=given, max_tokens=16, temperature=0)
        assert reply.choices[0].text == tok.decode(expected, skip_special_tokens=True)
        assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected)
        assert reply.object == "text_completion"
    stream = await api.completions.create(model=smol.info.name, prompt=prompt, max_tokens=16, temperature=0,
                                          stream=True)
    text = "".join([c.choices[0].text async for c in stream])
    assert text == tok.decode(expected, skip_special_tokens=True)


async def test_stop_strings_and_seeded_sampling(smol, smol_cluster):
    api = client_for(smol_cluster)
    name = smol.info.name
    full = await api.chat.completions.create(model=name, messages=QUESTION, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = text.split()[2]  # a word from the middle of the answer
    cut = await api.chat.completions.create(model=name, messages=QUESTION, max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(stop)]

    poem = [{"role": "user", "content": "Write a short poem about the sea."}]

    async def sample(seed: int) -> str:
        reply = await api.chat.completions.create(model=name, messages=poem, max_tokens=16, temperature=1.0,
                                                  top_p=0.95, seed=seed)
        return reply.choices[0].message.content

    first, again, other = await sample(7), await sample(7), await sample(8)
    assert first == again
    assert first != other
    async with AsyncClient(smol_cluster.address) as grpc_client:  # the same seed on the gRPC API: same tokens
        via_grpc = await grpc_client.generate(messages=poem, max_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    assert via_grpc.text == first


async def test_every_error_has_its_status_and_openai_shape(smol, smol_cluster):
    api = client_for(smol_cluster)
    name = smol.info.name
    cases = [
        (dict(model=name, messages=QUESTION, temperature=-1), 400, "temperature"),
        (dict(model=name, messages=QUESTION, n=2), 400, "n: only n=1"),
        (dict(model=name, messages=QUESTION, max_tokens=0), 400, "max_tokens"),
        (dict(model=name, messages=QUESTION, max_completion_tokens=10**6), 400, "max_completion_tokens"),
        (dict(model=name, messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
        (dict(model=name, messages=[]), 400, "messages"),
        (dict(model=name, messages=QUESTION, logprobs=True), 400, "logprobs"),
        (dict(model=name, messages=QUESTION, stop=["x"] * 17), 400, "stop"),
        (dict(model="no-such-model", messages=QUESTION), 404, "unknown model"),
    ]
    for kwargs, status, needle in cases:
        with pytest.raises(openai.APIStatusError) as failed:
            await api.chat.completions.create(**kwargs)
        assert failed.value.status_code == status, kwargs
        body = failed.value.body
        assert needle in body["message"], body
        assert body["type"] == "invalid_request_error" and "param" in body
    with pytest.raises(openai.BadRequestError) as failed:
        await api.completions.create(model=name, prompt=["one", "two"])
    assert "one prompt per request" in failed.value.body["message"]
    with pytest.raises(openai.BadRequestError) as failed:
        await api.chat.completions.create(model=name, messages="not a list")
    assert failed.value.body["message"].startswith("messages:")
    url = smol_cluster.http_url
    with pytest.raises(urllib.error.HTTPError) as raw:  # not JSON at all
        await asyncio.to_thread(urllib.request.urlopen, urllib.request.Request(
            f"{url}/chat/completions", data=b"{nope", headers={"content-type": "application/json"}), timeout=10)
    assert raw.value.code == 400 and "error" in json.loads(raw.value.read())
    with pytest.raises(urllib.error.HTTPError) as raw:
        await asyncio.to_thread(urllib.request.urlopen, f"{url}/nowhere", timeout=10)
    assert raw.value.code == 404 and json.loads(raw.value.read())["error"]["message"]
    models = await api.models.list()
    assert [m.id for m in models.data] == [name]
    health = await asyncio.to_thread(urllib.request.urlopen, url.removesuffix("/v1") + "/health", timeout=10)
    assert health.status == 200


async def test_api_keys_guard_http_and_grpc(smol, smol_cluster, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team B\nkey-from-file\n")
    cluster = smol_cluster
    gateway = await start_gateway(cfg.GatewayConfig(
        listen="127.0.0.1:0", internal_listen="127.0.0.1:0", http_listen="127.0.0.1:0", model=smol.info.spec, prefill=(f"127.0.0.1:{cluster.prefill.port}",),
        decode=(cluster.decode_address,), api_keys=("key-one",), api_keys_file=str(keys_file)), smol.info)
    base = f"http://127.0.0.1:{gateway.http_port}/v1"
    try:
        for key in ("", "wrong", "key-one-but-longer", "key-on"):
            api = openai_client(base, key or "-")
            with pytest.raises(openai.AuthenticationError) as refused:
                await api.chat.completions.create(model=smol.info.name, messages=QUESTION, max_tokens=2)
            assert refused.value.status_code == 401 and "API key" in refused.value.body["message"]
            with pytest.raises(openai.AuthenticationError):
                await api.models.list()
        for key in ("key-one", "key-from-file"):
            api = openai_client(base, key)
            reply = await api.chat.completions.create(model=smol.info.name, messages=QUESTION, max_tokens=2)
            assert reply.usage.completion_tokens == 2
        health = await asyncio.to_thread(urllib.request.urlopen, base.removesuffix("/v1") + "/health", timeout=10)
        assert health.status == 200  # probes need no key
        address = f"127.0.0.1:{gateway.port}"
        for key in ("", "wrong"):
            async with AsyncClient(address, api_key=key) as grpc_client:
                with pytest.raises(Unauthenticated):
                    await grpc_client.generate("Hi", max_tokens=2)
                with pytest.raises(Unauthenticated):
                    await grpc_client.model_info()
        async with AsyncClient(address, api_key="key-from-file") as grpc_client:
            assert (await grpc_client.generate("Hi", max_tokens=2)).completion_tokens == 2
    finally:
        await gateway.stop(grace=1.0)


async def test_overload_is_429_with_retry_after():
    loaded = get_loaded("preset:tiny-llama")
    kv_token_bytes = loaded.info.kv.bytes_per_token(loaded.dtype)
    budget = 33 * 16 * kv_token_bytes  # one request of 500 tokens (32 blocks) holds the whole pool
    cluster = await start_cluster(loaded, decode_options={"kv_budget": str(budget), "kv_block_size": 16,
                                                          "max_queued": 0})
    api = client_for(cluster)
    try:
        hog = await api.completions.create(model=loaded.info.name, prompt=list(range(1, 21)), max_tokens=480,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        first = await hog.__anext__()
        assert first.choices[0].finish_reason is None
        with pytest.raises(openai.RateLimitError) as refused:
            await api.completions.create(model=loaded.info.name, prompt=list(range(1, 21)), max_tokens=480,
                                         extra_body={"ignore_eos": True})
        assert refused.value.status_code == 429
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert "retry after" in refused.value.body["message"] and "127.0.0.1" not in refused.value.body["message"]
        assert refused.value.body["type"] == "rate_limit_error"
        await hog.close()
    finally:
        await cluster.stop()


async def test_a_client_that_disconnects_mid_stream_frees_its_kv(tiny_cluster):
    cluster = tiny_cluster
    engine = cluster.decode.engine
    api = client_for(cluster)
    context = cluster.loaded.info.context_length
    stream = await api.completions.create(model=cluster.loaded.info.name, prompt=list(range(1, 40)),
                                          max_tokens=context - 40, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    assert engine.stats()["kv_blocks_used"] > 0
    await stream.close()  # the connection goes; nothing of the request may stay
    for _ in range(100):
        stats = engine.stats()
        if stats["kv_blocks_used"] == 0 and stats["running"] == 0 and cluster.gateway.engine.running == 0:
            break
        await asyncio.sleep(0.05)
    assert (stats["kv_blocks_used"], stats["running"], cluster.gateway.engine.running) == (0, 0, 0)
