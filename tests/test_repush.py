"""Decode fails during the KV transfer: prefill keeps the computed KV and re-pushes it to another decode
instance; the prompt is not computed again and the output is token-exact."""

from __future__ import annotations

import pytest

from pdserve import config as cfg
from pdserve.errors import InvalidArgument
from pdserve.sdk import AsyncClient
from services.decode.server import start_decode
from services.gateway.server import start_gateway
from services.prefill.server import start_prefill
from tests.cluster import reference_greedy
from tests.conftest import get_loaded


@pytest.fixture
async def two_decodes(request):
    loaded = get_loaded("preset:tiny-llama")
    spec = loaded.info.spec
    keep_s = getattr(request, "param", 5.0)
    decodes = [await start_decode(cfg.DecodeConfig(listen="127.0.0.1:0", model=spec), loaded) for _ in range(2)]
    prefill = await start_prefill(cfg.PrefillConfig(listen="127.0.0.1:0", model=spec, kv_keep_s=keep_s), loaded)
    gateway = await start_gateway(cfg.GatewayConfig(
        listen="127.0.0.1:0", internal_listen="127.0.0.1:0", http_listen="", model=spec, prefill=(f"127.0.0.1:{prefill.port}",),
        decode=tuple(f"127.0.0.1:{d.port}" for d in decodes)), loaded.info)
    yield loaded, gateway, prefill, decodes
    for service in (gateway, prefill, *decodes):
        await service.stop(grace=1.0)


def fail_first_transfers(decodes, n: int) -> list:
    """The next ``n`` transfers reaching any of ``decodes`` are refused mid-push, as a dying decode would."""
    budget = [n]
    for service in decodes:
        engine = service.engine
        original = engine.begin_transfer

        def begin(layout, stream=None, _original=original, _engine=engine):
            if budget[0] > 0:
                budget[0] -= 1
                _engine.fail_transfer(layout.transfer_id, InvalidArgument("injected: decode broke mid-transfer"))
                raise InvalidArgument("injected: decode broke mid-transfer")
            return _original(layout, stream) if stream is not None else _original(layout)

        engine.begin_transfer = begin
    return budget


async def test_failed_push_is_repushed_to_another_decode_without_recomputing(two_decodes):
    loaded, gateway, prefill, decodes = two_decodes
    fail_first_transfers(decodes, 1)
    prompt = list(range(40, 90))
    async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
        result = await client.generate(token_ids=prompt, max_tokens=12, temperature=0, ignore_eos=True)
    assert result.token_ids == reference_greedy(loaded, prompt, 12, ignore_eos=True)
    assert prefill.engine.passes == 1  # the prompt was computed once
    completed = [d.engine.counters.transfers_completed for d in decodes]
    assert sorted(completed) == [0, 1]
    for d in decodes:
        assert d.engine.pool.allocator.num_used == 0


async def test_a_repush_that_fails_too_is_kept_again_and_the_prompt_still_computed_once(two_decodes):
    loaded, gateway, prefill, decodes = two_decodes
    fail_first_transfers(decodes, 3)  # the push and two re-pushes break
    prompt = list(range(7, 40))
    async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
        result = await client.generate(token_ids=prompt, max_tokens=10, temperature=0.7, top_p=0.9, seed=3)
        assert prefill.engine.passes == 1
        again = await client.generate(token_ids=prompt, max_tokens=10, temperature=0.7, top_p=0.9, seed=3)
    assert result.token_ids == again.token_ids  # the faults left no trace in the tokens
    for d in decodes:
        assert d.engine.pool.allocator.num_used == 0


@pytest.mark.parametrize("two_decodes", [0.001], indirect=True)
async def test_kept_kv_that_expired_is_computed_again(two_decodes):
    loaded, gateway, prefill, decodes = two_decodes
    fail_first_transfers(decodes, 1)
    prompt = list(range(300, 340))
    async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
        result = await client.generate(token_ids=prompt, max_tokens=8, temperature=0, ignore_eos=True)
    assert result.token_ids == reference_greedy(loaded, prompt, 8, ignore_eos=True)
    assert prefill.engine.passes == 2  # the re-push found nothing kept (NOT_FOUND): prefilled again
