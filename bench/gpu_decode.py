"""Decode engine throughput against HF ``generate`` in the same run, and step time against the memory floor.

For each concurrency N and each engine mode (``gather``: gather + SDPA; ``flex``: compiled
FlexAttention; ``flex+graphs``: the same step replayed from CUDA graphs, each step launched before the
previous one's tokens reach the host, the fused step forward (``pdserve/engine/step_forward.py``);
``flex+graphs-unfused``: the same with transformers' forward; ``flex+graphs-stepwise``: that, one step at
a time): N requests of ``--prompt`` random tokens each
generating ``--new`` tokens (``ignore_eos``), through the ``DecodeEngine``
in-process (prefilled on the engine itself, then continuous batching over the
paged KV pool), and through one ``model.generate`` over the same N prompts
(equal lengths, so no padding). Decode tokens/s counts tokens after the first,
over the time after the last prompt's prefill (engine) or after a
``max_new_tokens=1`` run's time (HF). The floor of a decode step is the weight
bytes over the device-to-device copy bandwidth measured here. Each mode runs
the same N prompts twice on one engine and reports the second run (the first
compiles modes and captures graphs for the batch sizes it meets).

    python -m bench.gpu_decode --model preset:llama-1b --device cuda --out bench/out/gpu_decode.json

No gRPC: this isolates the engine; the serving benchmark measures the whole system.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

from pdserve.engine.decode import DecodeEngine, DecodeParams
from pdserve.engine.sampling import SamplingParams
from pdserve.model import load_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted once, as weight reads are)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 10
    started = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    # A copy reads and writes nbytes; a weight read only reads: count both directions.
    return 2 * nbytes * reps / (time.perf_counter() - started)


# (paged kernel, CUDA graphs, overlapped steps, fused step)
MODES = {"gather": ("gather", False, False, False), "flex": ("flex", False, False, False),
         "flex+graphs": ("flex", True, True, True), "flex+graphs-unfused": ("flex", True, True, False),
         "flex+graphs-stepwise": ("flex", True, False, False)}


def make_engine(loaded, concurrency: int, prompt: int, new: int, mode: str) -> DecodeEngine:
    kernel, graphs, overlap, fused = MODES[mode]
    tokens = concurrency * (prompt + new + 16)
    return DecodeEngine(loaded, kv_budget=tokens * loaded.info.kv.bytes_per_token(loaded.dtype) + (1 << 24),
                        block_size=16, max_batch=max(concurrency, 1), max_queued=concurrency,
                        prefill_token_budget=8192, prefill_chunk_tokens=0, paged_kernel=kernel, cuda_graphs=graphs,
                        overlap_steps=overlap, fused_forward=fused)


async def engine_run(loaded, prompts: list[list[int]], new: int, mode: str) -> dict:
    """The same prompts twice on one engine; the second run's figures."""
    engine = make_engine(loaded, len(prompts), len(prompts[0]), new, mode)
    engine.start()
    try:
        await generate_all(engine, prompts, new)
        return await generate_all(engine, prompts, new)
    finally:
        await engine.stop()


async def generate_all(engine: DecodeEngine, prompts: list[list[int]], new: int) -> dict:
    greedy = SamplingParams(temperature=0)
    first_done: list[float] = []

    async def one(i: int, prompt: list[int]) -> int:
        seq = await engine.reserve(DecodeParams(f"r{i}", f"r{i}", len(prompt), greedy, frozenset(), new), local=True)
        await engine.prefill_locally(seq, prompt)
        first_done.append(time.perf_counter())
        count = 0
        while (event := await seq.events.get()) is not None:
            if isinstance(event, Exception):
                raise event
            count += 1
        return count

    steps_before, step_s_before = engine.counters.steps, engine.counters.step_seconds
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    end = time.perf_counter()
    steps = engine.counters.steps - steps_before
    in_step_ms = (engine.counters.step_seconds - step_s_before) * 1e3 / max(1, steps)
    decode_s = end - max(first_done)
    generated = sum(counts) - len(prompts)  # tokens after the first
    return {"decode_s": decode_s, "decode_tokens": generated, "tokens_per_s": generated / decode_s,
            "steps": steps, "step_ms": decode_s * 1e3 / max(1, steps), "in_step_ms": in_step_ms,
            "graphs": engine.stats()["cuda_graphs"]}


@torch.inference_mode()
def hf_run(loaded, prompts: list[list[int]], new: int) -> dict:
    model, device = loaded.model, loaded.device
    ids = torch.tensor(prompts, device=device)
    common = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    model.generate(ids, max_new_tokens=2, **common)
    sync(device)
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **common)
    sync(device)
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=new, **common)
    sync(device)
    total_s = time.perf_counter() - started
    decode_s = total_s - prefill_s
    generated = len(prompts) * (new - 1)
    return {"decode_s": decode_s, "decode_tokens": generated, "tokens_per_s": generated / decode_s,
            "step_ms": decode_s * 1e3 / (new - 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:llama-1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", default="1,32,128")
    parser.add_argument("--modes", default="gather,flex,flex+graphs", help=f"engine modes to compare: {', '.join(MODES)}")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--out", default="bench/out/gpu_decode.json")
    args = parser.parse_args(argv)

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    device = loaded.device
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    bandwidth = copy_bandwidth(device)
    floor_ms = weight_bytes / bandwidth * 1e3
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} {loaded.dtype} on {name}: weights {weight_bytes / 2**30:.2f} GiB, copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s, floor {floor_ms:.2f} ms/step", flush=True)
    gen = torch.Generator().manual_seed(0)
    modes = args.modes.split(",")
    for mode in modes:  # compiles the flex kernel once per process for the shapes met below
        warm = torch.randint(100, loaded.info.vocab_size, (3, args.prompt), generator=gen).tolist()
        asyncio.run(engine_run(loaded, warm, 4, mode))
    rows = []
    for n in [int(x) for x in args.concurrency.split(",")]:
        prompts = torch.randint(100, loaded.info.vocab_size, (n, args.prompt), generator=gen).tolist()
        row = {"concurrency": n, "hf_generate": hf_run(loaded, prompts, args.new)}
        for mode in modes:
            row[mode] = asyncio.run(engine_run(loaded, prompts, args.new, mode))
        rows.append(row)
        print(f"N={n}: " + ", ".join(f"pdserve[{k}] {row[k]['tokens_per_s']:.0f} tok/s ({row[k]['step_ms']:.2f} ms/step, "
                                     f"{row[k]['in_step_ms']:.2f} in the step)" for k in modes)
              + f", HF generate {row['hf_generate']['tokens_per_s']:.0f} tok/s ({row['hf_generate']['step_ms']:.2f} ms/step)",
              flush=True)
    print(f"\n| concurrency | mode | pdserve tok/s | HF generate tok/s | ratio | pdserve ms/step (in step) | HF ms/step "
          f"| step / floor ({floor_ms:.2f} ms) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        h = r["hf_generate"]
        for mode in modes:
            o = r[mode]
            print(f"| {r['concurrency']} | {mode} | {o['tokens_per_s']:.0f} | {h['tokens_per_s']:.0f} | "
                  f"{o['tokens_per_s'] / h['tokens_per_s']:.2f}x | {o['step_ms']:.2f} ({o['in_step_ms']:.2f}) | "
                  f"{h['step_ms']:.2f} | {o['step_ms'] / floor_ms:.1f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": name, "model": args.model,
                               "dtype": str(loaded.dtype), "torch": torch.__version__, "weight_bytes": weight_bytes,
                               "copy_bandwidth_Bps": bandwidth, "floor_ms": floor_ms, "prompt": args.prompt,
                               "new": args.new, "rows": rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
