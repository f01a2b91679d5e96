"""Decode step cost at batch 1: pdserve's engine step against the bare model forward.

(a) bare: ``model(next_token, past_key_values=DynamicCache)`` as ``generate`` runs it;
(b) pdserve step: the decode engine's step over the paged KV pool (step metadata, block-table
    gather + SDPA in the registered attention function, explicit positions, sampler);
(c) engine loop: time per token of one request through ``DecodeEngine`` (executor hop and queues included),
    on CUDA with the flex kernel also with the step replayed from a CUDA graph.
Same process, same threads, after warm-up; medians. ``--profile`` prints the operators that
take the difference between (a) and (b).

    python -m bench.step_overhead [--model default] [--device cpu] [--context 256] [--steps 64] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import DynamicCache

from pdserve.engine.decode import DecodeEngine, DecodeParams
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.paged_attention import StepCache, use_paged_attention
from pdserve.engine.sampling import SamplingParams, sample
from pdserve.model import load_model


def median_ms(fn, steps: int, device: torch.device) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def top_ops(fn, rows: int = 8) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@torch.inference_mode()
def main(args) -> None:
    loaded = load_model(args.model, device=args.device)
    model, info, device = loaded.model, loaded.info, loaded.device
    prompt = torch.arange(100, 100 + args.context, device=device)[None]
    dyn = DynamicCache(config=model.config)
    model(input_ids=prompt, past_key_values=dyn, use_cache=True)
    token = torch.tensor([[42]], device=device)
    greedy = SamplingParams(temperature=0)

    def bare():
        out = model(input_ids=token, past_key_values=dyn, use_cache=True)
        sample(out.logits[:, -1], [greedy], [1])
        dyn.crop(-1)

    pool = KVPool(info.kv, loaded.dtype, device, budget=(args.context + 64) * info.kv.bytes_per_token(loaded.dtype) * 2,
                  kernel=args.kernel)
    table = pool.allocator.allocate(pool.blocks_for(args.context + 1))
    for i, layer in enumerate(dyn.layers):
        pool.write(table, i, 0, layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1))

    def step():
        paged = pool.prepare_step([table], [args.context])
        out = model(input_ids=token, position_ids=torch.tensor([[args.context]], device=device),
                    attention_mask=paged.mask, past_key_values=StepCache(pool, paged), use_cache=True, paged=paged)
        sample(out.logits[:, -1], [greedy], [1])

    bare_ms = median_ms(bare, args.steps, device)
    use_paged_attention(model)
    step_ms = median_ms(step, args.steps, device)
    with ThreadPoolExecutor(1) as worker:  # the engine runs its steps on a worker thread
        thread_ms = median_ms(lambda: worker.submit(torch.inference_mode()(step)).result(), args.steps, device)
    loop_ms, in_step_ms = asyncio.run(engine_loop_ms(loaded, dyn, args, cuda_graphs=False))
    graphs = pool.kernel == "flex" and device.type == "cuda"
    if graphs:
        graph_ms, graph_in_step_ms = asyncio.run(engine_loop_ms(loaded, dyn, args, cuda_graphs=True))
    print(f"model {info.name} {loaded.dtype} on {device}, context {args.context}, threads {torch.get_num_threads()}, "
          f"{pool.kernel} kernel")
    print("| path | ms per token | vs bare |")
    print("| --- | ---: | ---: |")
    for name, ms in (("bare forward (DynamicCache) + sample", bare_ms),
                     ("pdserve step (paged pool: metadata + gather + SDPA + sample)", step_ms),
                     ("the same step on a worker thread", thread_ms),
                     ("DecodeEngine loop, 1 request", loop_ms),
                     ("  of which inside the engine's step", in_step_ms),
                     *((("DecodeEngine loop, CUDA graphs", graph_ms),
                        ("  of which inside the engine's step", graph_in_step_ms)) if graphs else ())):
        print(f"| {name} | {ms:.2f} | {ms / bare_ms:.2f}x |")
    if args.profile:
        model.set_attn_implementation("sdpa")
        print("\nbare forward, top operators:\n" + top_ops(bare))
        use_paged_attention(model)
        print("\npdserve step, top operators:\n" + top_ops(step))


async def engine_loop_ms(loaded, dyn, args, cuda_graphs: bool) -> tuple[float, float]:
    """Per token of one request through the engine, and the engine's own moving average of its step."""
    from pdserve.kv.wire import DTYPE_NAMES, KVLayout, split_layer, token_major

    n = args.steps + 1
    engine = DecodeEngine(loaded, kv_budget=4 * (args.context + n + 64) * loaded.info.kv.bytes_per_token(loaded.dtype),
                          max_batch=1, paged_kernel=args.kernel, cuda_graphs=cuda_graphs)
    engine.start()
    seq = await engine.reserve(DecodeParams("r", "r", args.context, SamplingParams(temperature=0), frozenset(), n + 1))
    kv = loaded.info.kv
    assembly = engine.begin_transfer(KVLayout("r", kv.num_layers, args.context, kv.kv_heads, kv.head_dim,
                                              DTYPE_NAMES[loaded.dtype]))
    for i, layer in enumerate(dyn.layers):
        for chunk in split_layer(i, token_major(layer.keys), token_major(layer.values), 1 << 20):
            assembly.add(chunk)
    engine.complete_transfer("r", 42)
    stamps, counters = [], engine.counters
    while await seq.events.get() is not None:
        stamps.append(time.perf_counter())
        if len(stamps) == 6:  # after warm-up
            steps_before, step_s_before = counters.steps, counters.step_seconds
    in_step_ms = (counters.step_seconds - step_s_before) * 1e3 / max(1, counters.steps - steps_before)
    await engine.stop()
    gaps = [(b - a) * 1e3 for a, b in zip(stamps[5:], stamps[6:])]
    return statistics.median(gaps), in_step_ms


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", default="auto", help="paged attention kernel: auto, gather or flex")
    parser.add_argument("--profile", action="store_true", help="print the top operators of both paths")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    main(parser.parse_args())
