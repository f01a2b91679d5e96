"""Where a decode step's time goes (issue 16's first step): the decode engine with CUDA graphs, profiled.

For each concurrency, the engine (flex kernel, CUDA graphs) decodes ``--new`` tokens for N prompts once
to warm up (compiles, captures), then again under ``torch.profiler``: the table of device kernels and
host operators by total time, and the split between the time the GPU is busy and the wall time of the
steps (what the host adds between and around replays).

    python -m bench.decode_profile --model preset:llama-8b --concurrency 1,32
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench.gpu_decode import MODES, generate_all, make_engine
from pdserve.model import load_model


async def profiled(loaded, concurrency: int, prompt: int, new: int, mode: str) -> str:
    prompts = [[100 + (i * 7 + j) % 1000 for j in range(prompt)] for i in range(concurrency)]
    engine = make_engine(loaded, concurrency, prompt, new, mode)
    engine.start()
    try:
        await generate_all(engine, prompts, new)  # warm: compiles and captures
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run = await generate_all(engine, prompts, new)
    finally:
        await engine.stop()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    lines = [f"concurrency {concurrency} ({mode}): {run['tokens_per_s']:,.0f} tok/s, {run['step_ms']:.2f} ms/step "
             f"({run['in_step_ms']:.2f} ms inside the step call); GPU busy {device_us / 1e3 / max(1, run['steps']):.2f} "
             f"ms/step",
             events.table(sort_by="self_cuda_time_total", row_limit=12),
             events.table(sort_by="self_cpu_time_total", row_limit=12)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:llama-8b")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--modes", default="flex+graphs", help=f"engine modes: {', '.join(MODES)}")
    args = parser.parse_args(argv)
    loaded = load_model(args.model, device="cuda")
    for mode in args.modes.split(","):
        for n in (int(x) for x in args.concurrency.split(",")):
            print(asyncio.run(profiled(loaded, n, args.prompt, args.new, mode)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
