"""What a feature costs each service: CPU time per generated token and throughput, the feature off against on.

Throughput on a shared 2-core machine moves by several percent between
identical runs; the CPU time each service process spends per token is steadier
and shows where a cost lands. For each mode a 1 prefill + 1 decode cluster
serves the same requests (token ids, fixed lengths, a bounded number in
flight); the CPU time (user + system, from /proc) of every process is read
before and after. Modes alternate for ``--rounds``. Features:

- ``tracing``: ``on`` exports every span (sampling ratio 1.0) over OTLP/HTTP to
  a ``bench.otlp_sink`` process (members plaintext in both modes);
- ``tls``: ``on`` runs the members over mutual TLS (``pdserve up``'s default),
  ``off`` plaintext; every prompt's KV crosses gRPC (``--kv-transport grpc``),
  so the KV path pays for TLS too.

    python -m bench.feature_cost --feature tracing --model preset:tiny-llama --rounds 2
    python -m bench.feature_cost --feature tls --model default --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

from bench.otlp_sink import ReceiverProcess
from pdserve_cli.cluster import ClusterSpec, LocalCluster
from pdserve.sdk import AsyncClient

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def load(address: str, requests: int, prompt_len: int, max_tokens: int, concurrency: int) -> int:
    gate = asyncio.Semaphore(concurrency)
    async with AsyncClient(address) as client:
        async def one(i: int) -> int:
            async with gate:
                ids = [(7 * i + j) % 1000 + 10 for j in range(prompt_len)]
                return (await client.generate(token_ids=ids, max_tokens=max_tokens, ignore_eos=True)).completion_tokens
        return sum(await asyncio.gather(*(one(i) for i in range(requests))))


def run_mode(feature: str, mode: str, args) -> dict:
    receiver = ReceiverProcess() if feature == "tracing" and mode == "on" else None
    with receiver or contextlib.nullcontext():
        env = receiver.env if receiver else {}
        if feature == "tls":
            env = {"PDSERVE_KV_TRANSPORT": "grpc"}
        spec = ClusterSpec(model=args.model, prefill=1, decode=1, gateway_port=0, threads=1, log_level="WARNING",
                           max_batch=args.concurrency, extra_env=env, tls=feature == "tls" and mode == "on")
        cluster = LocalCluster(spec)
        try:
            asyncio.run(cluster.start())
            asyncio.run(cluster.wait_healthy())
            asyncio.run(load(cluster.gateway_address, 4, args.prompt_len, 8, 4))  # warm-up
            before = {m.name: cpu_seconds(m.process.pid) for m in cluster.members}
            started = time.perf_counter()
            tokens = asyncio.run(load(cluster.gateway_address, args.requests, args.prompt_len, args.max_tokens,
                                      args.concurrency))
            wall = time.perf_counter() - started
            after = {m.name: cpu_seconds(m.process.pid) for m in cluster.members}
        finally:
            cluster.stop()
    spans = receiver.report if receiver else ""
    cpu = {name: (after[name] - before[name]) * 1e6 / tokens for name in before}
    return {"mode": mode, "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall, "cpu_us_per_token": cpu,
            "sink": spans}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feature", choices=("tracing", "tls"), default="tracing")
    parser.add_argument("--model", default="preset:tiny-llama")
    parser.add_argument("--modes", default="off,on")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default="", help="JSON results (default bench/out/FEATURE_cost.json)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs = []
    for round_ in range(args.rounds):
        for mode in modes:
            print(f"[feature_cost] round {round_ + 1}: {args.feature} {mode}", file=sys.stderr, flush=True)
            runs.append(run_mode(args.feature, mode, args))
    names = list(runs[0]["cpu_us_per_token"])
    print(f"\n| {args.feature} | tok/s | " + " | ".join(f"{n} CPU µs/token" for n in names) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in names) + " |")
    for r in runs:
        print(f"| {r['mode']} | {r['tok_per_s']:.1f} | "
              + " | ".join(f"{r['cpu_us_per_token'][n]:.0f}" for n in names) + " |")
    by_mode = {m: [r["tok_per_s"] for r in runs if r["mode"] == m] for m in modes}
    if set(by_mode) == {"on", "off"}:
        ratio = statistics.median(by_mode["on"]) / statistics.median(by_mode["off"])
        print(f"\nthroughput, {args.feature} on / off (medians of {args.rounds} rounds): {ratio:.3f}")
    out = Path(args.out or f"bench/out/{args.feature}_cost.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "runs": runs},
                              indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
