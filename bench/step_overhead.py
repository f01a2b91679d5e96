"""Decode step cost at batch 1: pdserve's engine step against the bare model forward.

(a) bare: ``model(next_token, past_key_values=DynamicCache)`` as ``generate`` runs it;
(b) pdserve step: the decode engine's slot cache, 4-D mask, explicit positions and sampler;
(c) engine loop: tokens/s of one request through ``DecodeEngine`` (executor hop and queues included).
Same process, same threads, after warm-up; medians.

    python -m bench.step_overhead [--model default] [--context 256] [--steps 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch
from transformers import DynamicCache

from pdserve.engine.decode import DecodeEngine, DecodeParams
from pdserve.engine.sampling import SamplingParams, sample
from pdserve.engine.slot_cache import SlotKVCache
from pdserve.model import load_model


def median_ms(fn, steps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def main(args) -> None:
    loaded = load_model(args.model)
    model, info = loaded.model, loaded.info
    prompt = torch.arange(100, 100 + args.context)[None]
    dyn = DynamicCache(config=model.config)
    model(input_ids=prompt, past_key_values=dyn, use_cache=True)
    token = torch.tensor([[42]])

    def bare():
        model(input_ids=token, past_key_values=dyn, use_cache=True)
        dyn.crop(-1)

    slot = SlotKVCache(info.kv, loaded.dtype, loaded.device, max_rows=1)
    slot.reserve(1, args.context + 1)
    slot.write_prompt(0, [layer.keys[0].transpose(0, 1) for layer in dyn.layers],
                      [layer.values[0].transpose(0, 1) for layer in dyn.layers])
    positions = torch.tensor([args.context])
    greedy = SamplingParams(temperature=0)

    def step():
        mask = slot.begin_step(positions)
        out = model(input_ids=token, position_ids=positions[:, None], attention_mask=mask,
                    past_key_values=slot, use_cache=True)
        sample(out.logits[:, -1], [greedy], [1])

    bare_ms = median_ms(bare, args.steps)
    step_ms = median_ms(step, args.steps)
    loop_ms = asyncio.run(engine_loop_ms(loaded, dyn, args))
    print(f"model {info.name}, context {args.context}, threads {torch.get_num_threads()}")
    print("| path | ms per token | vs bare |")
    print("| --- | ---: | ---: |")
    for name, ms in (("bare forward (DynamicCache)", bare_ms), ("pdserve step (slot cache + mask + sample)", step_ms),
                     ("DecodeEngine loop, 1 request", loop_ms)):
        print(f"| {name} | {ms:.2f} | {ms / bare_ms:.2f}x |")


async def engine_loop_ms(loaded, dyn, args) -> float:
    from pdserve.kv.wire import DTYPE_NAMES, KVLayout, split_layer, token_major

    engine = DecodeEngine(loaded, max_batch=1)
    engine.start()
    n = args.steps + 1
    seq = engine.reserve(DecodeParams("r", "r", args.context, SamplingParams(temperature=0), frozenset(), n + 1))
    kv = loaded.info.kv
    assembly = engine.begin_transfer(KVLayout("r", kv.num_layers, args.context, kv.kv_heads, kv.head_dim,
                                              DTYPE_NAMES[loaded.dtype]))
    for i, layer in enumerate(dyn.layers):
        for chunk in split_layer(i, token_major(layer.keys), token_major(layer.values), 1 << 20):
            assembly.add(chunk)
    engine.complete_transfer("r", 42)
    stamps = []
    while await seq.events.get() is not None:
        stamps.append(time.perf_counter())
    await engine.stop()
    gaps = [(b - a) * 1e3 for a, b in zip(stamps[5:], stamps[6:])]
    return statistics.median(gaps)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    main(parser.parse_args())
