"""When each layer's KV copy runs on the GPU, against when the forward pass computed that layer.

The transfer benchmarks' per-layer timelines show copies queued mid-pass landing only as the pass ends
(CUDA IPC scatters since session 7, gRPC's device-to-host copies too at 8k). Host timestamps cannot say
whether the copy ran late on the device or was learnt of late on the host, so this records CUDA timing
events: on the compute stream as each layer is handed over (the layer is computed when it completes),
and on the copy stream around each layer's copies (``DeviceCopies.submit``, as the senders queue them).
One prefill (``PrefillEngine``; whole, as the TTFT benchmark runs it, and in chunks of 2,048, the GPU
default) per case:

- ``host``: transposed to (T, H, D) into pinned host memory, as the gRPC and shared-memory senders do
  (a kernel makes the source contiguous, then a device-to-host copy);
- ``device``: scattered into a pool's slots on the same GPU, as the CUDA IPC sender does (a kernel);

each with the engine reading its first token (and uploading its inputs) as it does (``event``:
``pdserve.engine.device_io``) and as it did before session 16 (``tolist``: blocking copies, which wait in
the driver for the pass).

    python -m bench.copy_timeline --model preset:llama-8b --tokens 8192 --out bench/out/copy_timeline.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from bench.prefill import Consumer
import pdserve.engine.prefill as prefill_module
import pdserve.engine.sampling as sampling_module
from pdserve.engine.prefill import PrefillEngine
from pdserve.engine.sampling import SamplingParams
from pdserve.kv.staging import DeviceCopies
from pdserve.model import load_model

CASES = ("host", "device")


class Timeline(Consumer):
    """Each layer's copies, queued as a sender queues them (``bench.prefill.Consumer``'s), with timing events
    around them."""

    def __init__(self, kind: str, loaded, tokens: int, copies: DeviceCopies) -> None:
        super().__init__(kind, loaded, tokens, copies)
        self.copies, self.device = copies, loaded.device
        self.start = torch.cuda.Event(enable_timing=True)
        self.layers: dict[int, dict] = {}
        self.t0 = 0.0

    def begin(self) -> None:
        self.start.record(torch.cuda.current_stream(self.device))
        self.t0 = time.perf_counter()

    def take(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The engine's ``on_layer``."""
        computed = torch.cuda.Event(enable_timing=True)
        computed.record(torch.cuda.current_stream(self.device))
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        entry = self.layers[layer] = {"queued_host_ms": (time.perf_counter() - self.t0) * 1e3,
                                      "events": (computed, began, ended)}

        def work():
            began.record(self.copies.stream)
            self.copy(layer, start, k, v)
            ended.record(self.copies.stream)
            return k, v

        def landed() -> None:  # on the waiter thread, as the gRPC sender learns of it
            entry["landed_host_ms"] = (time.perf_counter() - self.t0) * 1e3

        self.copies.submit(work, None, landed)

    def rows(self, pass_ms: float) -> list[dict]:
        torch.cuda.synchronize(self.device)
        out = []
        for layer in sorted(self.layers):
            e = self.layers[layer]
            computed, began, ended = (self.start.elapsed_time(x) for x in e["events"])
            out.append({"layer": layer, "queued_host_ms": e["queued_host_ms"], "computed_ms": computed,
                        "copy_began_ms": began, "copy_ended_ms": ended, "landed_host_ms": e.get("landed_host_ms", 0.0)})
        return out


async def one_case(engine, loaded, tokens: int, kind: str, copies: DeviceCopies, repeats: int) -> dict:
    g = torch.Generator().manual_seed(7)
    runs = []
    for _ in range(repeats + 1):
        prompt = torch.randint(100, loaded.info.vocab_size, (tokens,), generator=g).tolist()
        timeline = Timeline(kind, loaded, tokens, copies)
        torch.cuda.synchronize(loaded.device)
        timeline.begin()
        await engine.prefill(prompt, SamplingParams(temperature=0), timeline.take)
        pass_ms = (time.perf_counter() - timeline.t0) * 1e3
        copies.synchronize()
        await asyncio.sleep(0.05)  # the waiter thread's last notices
        runs.append({"pass_ms": pass_ms, "layers": timeline.rows(pass_ms)})
    runs = runs[1:]  # the first warms up
    late = [max(r["copy_ended_ms"] - r["computed_ms"] for r in run["layers"]) for run in runs]
    return {"pass_ms": statistics.median(r["pass_ms"] for r in runs), "worst_copy_after_layer_ms": statistics.median(late),
            "layers": runs[-1]["layers"]}


WAITS = {  # how the engine moves its inputs to the device and its first token back
    "event": (prefill_module.upload, sampling_module.download),
    "tolist": (lambda data, dtype, device: torch.tensor(data, dtype=dtype, device=device), lambda t: t.tolist()),
}


async def run(args) -> dict:
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    copies = DeviceCopies(loaded.device)
    results = []
    for chunk in args.chunks:
        engine = PrefillEngine(loaded, token_budget=max(args.tokens, 2048), chunk_tokens=chunk)
        await engine.warm_up()
        try:
            for wait in args.waits:
                prefill_module.upload, sampling_module.download = WAITS[wait]
                for kind in args.cases:
                    r = await one_case(engine, loaded, args.tokens, kind, copies, args.repeats)
                    r.update(case=kind, chunk=chunk, wait=wait)
                    results.append(r)
                    print_case(r)
        finally:
            prefill_module.upload, sampling_module.download = WAITS["event"]
            await engine.close()
    copies.close()
    return {"date": time.strftime("%Y-%m-%d"), "model": args.model, "tokens": args.tokens,
            "gpu": torch.cuda.get_device_name(loaded.device), "torch": torch.__version__, "cases": results}


def print_case(r: dict) -> None:
    layers = r["layers"]
    print(f"\n{r['case']}, chunk {r['chunk']}, wait {r['wait']}: pass {r['pass_ms']:.1f} ms (host), worst copy end "
          f"after its layer was computed {r['worst_copy_after_layer_ms']:.1f} ms (median of runs); ms after the "
          f"pass was queued, GPU clock but for 'queued' and 'landed'\n")
    print("| layer | queued (host) | computed (GPU) | copy began | copy ended | landed (host) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    shown = sorted({*range(0, len(layers), max(1, len(layers) // 8)), len(layers) - 1})
    for i in shown:
        x = layers[i]
        print(f"| {x['layer']} | {x['queued_host_ms']:.1f} | {x['computed_ms']:.1f} | {x['copy_began_ms']:.1f} "
              f"| {x['copy_ended_ms']:.1f} | {x['landed_host_ms']:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:llama-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--cases", type=lambda t: t.split(","), default=list(CASES))
    parser.add_argument("--chunks", type=lambda t: [int(x) for x in t.split(",")], default=[0, 2048])
    parser.add_argument("--waits", type=lambda t: t.split(","), default=list(WAITS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/out/copy_timeline.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("copy_timeline: needs a CUDA device")
    report = asyncio.run(run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
