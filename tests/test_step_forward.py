"""The fused forward computes transformers' forward: a decode step's logits and the K/V it writes into the
pool, a packed and chunked prefill pass's first tokens and the K/V it hands on (on the CPU its pieces run
eagerly; on a GPU, compiled and graphed, tests/test_cuda_graphs.py holds decode to ``generate()`` token for
token)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from pdserve.engine.kv_pool import KVPool
from pdserve.engine.paged_attention import use_paged_attention
from pdserve.engine.fused_forward import unsupported
from pdserve.engine.prefill import PrefillEngine
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.step_forward import FusedStep, step_forward, transformers_step
from pdserve.model import load_model


def pools(loaded, kernel: str) -> tuple[KVPool, KVPool, list[list[int]], list[int]]:
    """Two pools holding the same earlier K/V of three requests of different lengths."""
    kv, block = loaded.info.kv, 4
    budget = 64 * block * kv.bytes_per_token(loaded.dtype)
    a, b = (KVPool(kv, loaded.dtype, loaded.device, budget, block, kernel) for _ in range(2))
    positions = [0, 9, 30]  # where each row's new token goes: tokens before it are cached
    tables = [a.allocator.allocate(a.blocks_for(p + 1)) for p in positions]
    gen = torch.Generator().manual_seed(0)
    for table, p in zip(tables, positions):
        for layer in range(kv.num_layers):
            keys = torch.randn(p, kv.kv_heads, kv.head_dim, generator=gen).to(loaded.dtype)
            values = torch.randn(p, kv.kv_heads, kv.head_dim, generator=gen).to(loaded.dtype)
            if p:
                a.write(table, layer, 0, keys, values)
                b.write(table, layer, 0, keys, values)
    return a, b, tables, positions


@pytest.mark.parametrize("spec", ["preset:tiny-llama", "preset:tiny-qwen2"])
@pytest.mark.parametrize("kernel", ["gather", "flex"])
def test_fused_step_computes_the_transformers_step(spec, kernel):
    loaded = load_model(spec, device="cpu", dtype="float32")
    use_paged_attention(loaded.model)
    reference_pool, fused_pool, tables, positions = pools(loaded, kernel)
    rng = random.Random(spec)
    ids = torch.tensor([rng.randrange(loaded.info.vocab_size) for _ in tables])
    pos = torch.tensor(positions)
    with torch.inference_mode():
        expected = transformers_step(loaded.model, reference_pool)(ids, pos, reference_pool.prepare_step(tables, positions))
        fused = FusedStep(loaded.model, fused_pool)
        got = fused(ids, pos, fused_pool.prepare_step(tables, positions))
        # The model's own modules now read views of the fused weights: its forward is unchanged.
        again = transformers_step(loaded.model, reference_pool)(ids, pos, reference_pool.prepare_step(tables, positions))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    assert loaded.model.model.layers[0].self_attn.k_proj.weight.untyped_storage().data_ptr() == \
        loaded.model.model.layers[0].self_attn.q_proj.weight.untyped_storage().data_ptr()
    for layer in range(loaded.info.kv.num_layers):  # the step's K/V landed in the same slots
        for table, p in zip(tables, positions):
            k_ref, v_ref = reference_pool.read(table, layer, p + 1)
            k, v = fused_pool.read(table, layer, p + 1)
            torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)


def test_models_the_fused_step_does_not_know_run_transformers_forward():
    loaded = load_model("preset:tiny-gpt2", device="cpu", dtype="float32")
    pool = KVPool(loaded.info.kv, loaded.dtype, loaded.device, 1 << 20, 4, "gather")
    assert "gpt2" in unsupported(loaded.model)
    assert not isinstance(step_forward(loaded.model, pool, fused=True), FusedStep)
    with pytest.raises(ValueError, match="does not support"):
        FusedStep(loaded.model, pool)
    assert PrefillEngine(loaded, fused_forward=True)._fused is None


@pytest.mark.parametrize("spec", ["preset:tiny-llama", "preset:tiny-qwen2"])
def test_fused_prefill_passes_compute_transformers_passes(spec):
    """Prompts packed into passes and chunked across them: the fused forward gives the same first tokens and
    hands on each chunk of every layer's K/V as transformers' forward does."""
    loaded = load_model(spec, device="cpu", dtype="float32")
    rng = random.Random(5)
    batch = [[rng.randrange(loaded.info.vocab_size) for _ in range(n)] for n in [7, 150, 40, 96, 1, 300]]

    async def run(fused: bool) -> tuple[list[int], list[dict]]:
        engine = PrefillEngine(loaded, token_budget=128, chunk_tokens=48, max_pass_s=0, fused_forward=fused)
        assert (engine._fused is not None) is fused
        await engine.warm_up()
        kv: list[dict] = [{} for _ in batch]

        def keep(i: int):
            def on_layer(layer, start, k, v) -> None:
                kv[i][(layer, start)] = (k.clone(), v.clone())
            return on_layer

        results = await asyncio.gather(*(engine.prefill(p, SamplingParams(temperature=0), keep(i))
                                         for i, p in enumerate(batch)))
        await engine.close()
        assert engine.passes > 3  # packed and chunked
        return [r.first_token for r in results], kv

    fused_tokens, fused_kv = asyncio.run(run(True))
    tokens, kv = asyncio.run(run(False))
    assert fused_tokens == tokens
    for a, b in zip(fused_kv, kv):
        assert a.keys() == b.keys()  # no time limit: the same passes either way
        for key in a:
            for x, y in zip(a[key], b[key]):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
