"""Prefill engine against a bare causal forward of the same model, with each layer's KV streamed out.

For each case the engine prefills the prompts (``PrefillEngine``, the service's engine) while a consumer
takes every layer as a transfer would: ``none`` (the KV stays where the pass left it), ``host`` (copied
to pinned host memory on a copy stream behind an event, as the gRPC and shared-memory senders do) or
``device`` (scattered into a KV pool on the same GPU, as the CUDA IPC sender does). The bare forward is
``model(input_ids, logits_to_keep=1)`` on one prompt of the same total length (SDPA, causal, no mask).
Tokens/s are medians of ``--repeats`` timed runs after a warm-up, CUDA-synchronized; ratios come from
the same run.

    python -m bench.prefill --model preset:llama-8b --device cuda --out bench/out/prefill.json
    python -m bench.prefill ... --profile 8192   # torch.profiler: where one chunked 8k prefill spends its time
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pdserve.engine.prefill import PrefillEngine
from pdserve.engine.sampling import SamplingParams
from pdserve.kv.cuda_ipc import scatter_tokens
from pdserve.kv.staging import DeviceCopies
from pdserve.model import load_model

GREEDY = SamplingParams(temperature=0)


class Consumer:
    """Takes each layer's K/V as the prefill worker hands it over (``on_layer``), as a sender would."""

    def __init__(self, kind: str, loaded, max_tokens: int, copies: DeviceCopies | None) -> None:
        self.kind = kind
        self._copies = copies
        kv = loaded.info.kv
        shape = (kv.num_layers, max_tokens, kv.kv_heads, kv.head_dim)
        self._landed = self._staged = 0
        self._all = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if kind == "host":
            self._k = torch.empty(shape, dtype=loaded.dtype, pin_memory=True)
            self._v = torch.empty(shape, dtype=loaded.dtype, pin_memory=True)
        elif kind == "device":
            self._k = torch.empty(shape, dtype=loaded.dtype, device=loaded.device)
            self._v = torch.empty(shape, dtype=loaded.dtype, device=loaded.device)
            self._slots = torch.randperm(max_tokens, device=loaded.device)  # scattered, as blocks are

    def on_layer(self, offset: int):
        def take(layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
            if self.kind == "none":
                return
            lo = offset + start
            self._staged += 1

            def work():
                self.copy(layer, lo, k, v)
                return k, v

            self._copies.submit(work, self._loop, self._one_landed)
        return take

    def copy(self, layer: int, lo: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """On the copy stream: one layer's (1, H, T, D) K/V of tokens from ``lo`` to where this consumer keeps
        them (pinned host memory, token-major; or a pool's shuffled slots on the device)."""
        count = k.shape[2]
        if self.kind == "host":
            self._k[layer, lo:lo + count].copy_(k[0].transpose(0, 1), non_blocking=True)
            self._v[layer, lo:lo + count].copy_(v[0].transpose(0, 1), non_blocking=True)
        else:
            slots = self._slots[lo:lo + count]
            scatter_tokens(self._k[layer], slots, k[0].transpose(0, 1))
            scatter_tokens(self._v[layer], slots, v[0].transpose(0, 1))

    def _one_landed(self) -> None:
        self._landed += 1
        if self._landed == self._staged:
            self._all.set()

    async def drained(self) -> None:
        while self._landed < self._staged:
            self._all.clear()
            await self._all.wait()


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare_seconds(loaded, tokens: int, repeats: int) -> float:
    ids = torch.randint(100, loaded.info.vocab_size, (1, tokens), device=loaded.device)
    times = []
    for _ in range(repeats + 1):
        synchronize(loaded.device)
        t = time.perf_counter()
        loaded.model(input_ids=ids, logits_to_keep=1)
        synchronize(loaded.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


async def engine_seconds(loaded, lengths: list[int], chunk: int, budget: int, consumer: str, repeats: int,
                         copies: DeviceCopies | None) -> float:
    """``consumer``: where each layer's KV goes (none, host, device), with ``/transformers``: the engine on
    transformers' forward instead of the fused one."""
    consumer, _, forward = consumer.partition("/")
    engine = PrefillEngine(loaded, token_budget=budget, chunk_tokens=chunk, max_partial=8,
                           fused_forward=False if forward == "transformers" else None)
    await engine.warm_up()
    g = torch.Generator().manual_seed(1)
    batch = [torch.randint(100, loaded.info.vocab_size, (n,), generator=g).tolist() for n in lengths]
    times = []
    try:
        for _ in range(repeats + 1):
            sink = Consumer(consumer, loaded, sum(lengths), copies)
            offsets = [sum(lengths[:i]) for i in range(len(lengths))]
            synchronize(loaded.device)
            t = time.perf_counter()
            await asyncio.gather(*(engine.prefill(p, GREEDY, sink.on_layer(o)) for p, o in zip(batch, offsets)))
            await sink.drained()
            synchronize(loaded.device)
            times.append(time.perf_counter() - t)
    finally:
        await engine.close()
    return statistics.median(times[1:] or times)


CASES = [  # (name, prompt lengths, chunk tokens, token budget)
    ("512", [512], 512, 2048),
    ("2k, chunk 512", [2048], 512, 2048),
    ("2k, whole", [2048], 0, 8192),
    ("8k, chunk 512", [8192], 512, 2048),
    ("8k, whole", [8192], 0, 8192),
    ("8 x 256 packed", [256] * 8, 512, 2048),
    ("2 x 8k, chunk 512", [8192] * 2, 512, 2048),  # two at once: each chunked by 512
]


async def run(args) -> dict:
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    copies = DeviceCopies(loaded.device) if loaded.device.type == "cuda" else None
    rows = []
    bare: dict[int, float] = {}
    for name, lengths, chunk, budget in CASES:
        total = sum(lengths)
        if total not in bare:
            bare[total] = bare_seconds(loaded, total, args.repeats)
        row = {"case": name, "tokens": total, "bare_tokens_per_s": total / bare[total]}
        for consumer in args.consumers:
            seconds = await engine_seconds(loaded, lengths, chunk, budget, consumer, args.repeats, copies)
            row[f"{consumer}_tokens_per_s"] = total / seconds
            row[f"{consumer}_vs_bare"] = bare[total] / seconds
        rows.append(row)
        print(f"{name}: bare {row['bare_tokens_per_s']:,.0f} tok/s; "
              + ", ".join(f"{c} {row[f'{c}_tokens_per_s']:,.0f} ({row[f'{c}_vs_bare']:.2f}x)" for c in args.consumers),
              flush=True)
    profile = await profile_case(loaded, args.profile, copies) if args.profile else None
    if copies is not None:
        copies.close()
    return {"date": time.strftime("%Y-%m-%d"), "model": args.model, "device": str(loaded.device),
            "dtype": str(loaded.dtype), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else "",
            "rows": rows, "profile": profile}


async def profile_case(loaded, tokens: int, copies) -> str:
    """One chunked prefill of ``tokens`` streaming every layer to host memory, under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    await engine_seconds(loaded, [tokens], 512, 2048, "host", 0, copies)  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if loaded.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        await engine_seconds(loaded, [tokens], 512, 2048, "host", 0, copies)
    key = "cuda_time_total" if loaded.device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    print(table)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:llama-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--consumers", type=lambda t: t.split(","), default=["none", "host", "device", "device/transformers"],
                        help="where each layer's KV goes: none, host, device; NAME/transformers: the same on "
                             "transformers' forward instead of the fused one")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="TOKENS")
    parser.add_argument("--out", default="bench/out/prefill.json")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    print("\n| case | tokens | bare forward tok/s | " + " | ".join(f"engine, KV {c}: tok/s (x bare)" for c in args.consumers)
          + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in args.consumers) + " |")
    for r in report["rows"]:
        print(f"| {r['case']} | {r['tokens']} | {r['bare_tokens_per_s']:,.0f} | "
              + " | ".join(f"{r[f'{c}_tokens_per_s']:,.0f} ({r[f'{c}_vs_bare']:.2f}x)" for c in args.consumers) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
