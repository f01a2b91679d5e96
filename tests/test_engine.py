"""Decode engine and slot cache as pure logic: no servers."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pdserve.engine.decode import DecodeEngine, DecodeParams, FinishReason
from pdserve.engine.prefill import PrefillEngine
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.slot_cache import SlotKVCache
from pdserve.errors import InvalidArgument, NotFound, ResourceExhausted
from pdserve.kv.wire import DTYPE_NAMES, KVLayout, split_layer, token_major
from pdserve.model.loader import KVShape
from tests.cluster import reference_greedy
from tests.conftest import get_loaded


def test_slot_cache_growth_keeps_every_row():
    kv = KVShape(num_layers=2, kv_heads=2, head_dim=4)
    cache = SlotKVCache(kv, torch.float32, torch.device("cpu"), max_rows=8)
    prompts = []
    for row, tokens in enumerate([3, 70, 5]):
        keys = [torch.randn(tokens, 2, 4) for _ in range(2)]
        values = [torch.randn(tokens, 2, 4) for _ in range(2)]
        cache.reserve(row + 1, tokens + 1)
        cache.write_prompt(row, keys, values)
        prompts.append((keys, values))
    assert cache.capacity[0] >= 3 and cache.capacity[1] >= 71
    cache.move_row(2, 0, 5)  # row 0 leaves, the last row fills its place
    # A step writing each row's next token right after its own prompt.
    cache.begin_step(torch.tensor([5, 70]))
    k, v = cache.update(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4), layer_idx=1)
    for row, (keys, values) in [(0, prompts[2]), (1, prompts[1])]:
        tokens = keys[0].shape[0]
        assert torch.equal(k[row, :, :tokens], keys[1].transpose(0, 1))
        assert torch.equal(v[row, :, :tokens], values[1].transpose(0, 1))
        assert torch.equal(k[row, :, tokens], torch.zeros(2, 4))


def test_step_mask_lets_each_row_see_only_its_own_tokens():
    cache = SlotKVCache(KVShape(1, 1, 2), torch.float32, torch.device("cpu"), max_rows=4)
    mask = cache.begin_step(torch.tensor([2, 0, 4]))
    assert mask.shape == (3, 1, 1, 5)
    assert mask[:, 0, 0].tolist() == [[True, True, True, False, False], [True, False, False, False, False], [True] * 5]


def params(tid: str, prompt: int, max_tokens: int = 8, **kw) -> DecodeParams:
    return DecodeParams(tid, tid, prompt, SamplingParams(temperature=0), frozenset(), max_tokens, **kw)


async def test_reservation_limits():
    engine = DecodeEngine(get_loaded("preset:tiny-llama"), max_batch=2, max_waiting=2)
    engine.reserve(params("a", 4))
    with pytest.raises(InvalidArgument, match="already reserved"):
        engine.reserve(params("a", 4))
    with pytest.raises(InvalidArgument, match="context length 2048"):
        engine.reserve(params("b", 2000, max_tokens=100))
    engine.reserve(params("c", 4))
    with pytest.raises(ResourceExhausted):
        engine.reserve(params("d", 4))
    with pytest.raises(NotFound):
        engine.begin_transfer(KVLayout("zzz", 4, 4, 2, 16, "float32"))


async def test_batch_of_two_with_max_batch_one_runs_one_after_the_other():
    loaded = get_loaded("preset:tiny-llama")
    engine = DecodeEngine(loaded, max_batch=1)
    prefill = PrefillEngine(loaded)
    engine.start()
    prompts = {"x": [5, 6, 7], "y": list(range(40, 90))}
    seqs = {}
    for tid, prompt in prompts.items():
        seqs[tid] = engine.reserve(params(tid, len(prompt), max_tokens=6))
        kv = loaded.info.kv
        assembly = engine.begin_transfer(KVLayout(tid, kv.num_layers, len(prompt), kv.kv_heads, kv.head_dim,
                                                  DTYPE_NAMES[loaded.dtype]))

        def on_layer(layer, k, v, assembly=assembly):
            for chunk in split_layer(layer, token_major(k), token_major(v), 4096):
                assembly.add(chunk)

        result = await prefill.prefill(prompt, SamplingParams(temperature=0), on_layer)
        await asyncio.sleep(0)  # let the last layer callbacks run
        engine.complete_transfer(tid, result.first_token)
        seqs[tid].first = result.first_token
    outputs = {}
    for tid, seq in seqs.items():
        events = []
        while (event := await seq.events.get()) is not None:
            events.append(event)
        outputs[tid] = [seq.first] + [e.token_id for e in events]
        assert events[-1].finish is FinishReason.LENGTH
    await engine.stop()
    prefill.close()
    assert engine.counters.peak_running == 1
    for tid, prompt in prompts.items():
        assert outputs[tid] == reference_greedy(loaded, prompt, 6)
