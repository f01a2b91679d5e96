"""Overload: twice the decode instance's KV capacity at once, against a started cluster.

The decode KV budget is sized for ``--capacity`` requests of the workload's
longest shape and ``--max-queued`` may wait; ``2 x capacity`` requests arrive
at once. Checks and reports what the issue's bar asks: KV memory stays within
the budget (decode stats polled every 20 ms), every request either completes
or is refused with RESOURCE_EXHAUSTED, none hangs (a deadline), and the pool is
empty afterwards.

    python -m bench.overload --capacity 8 --out bench/out/overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import torch

from bench.workloads import Workload
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import ResourceExhausted
from pdserve.model import load_model_info
from pdserve.sdk import AsyncClient
from pdserve.v1 import decode_pb2, decode_pb2_grpc


async def go(args) -> dict:
    info = load_model_info(args.model)
    workload = Workload(num_requests=2 * args.capacity, input_len=(64, 256), output_len=(32, 64), seed=5)
    block, worst = 16, 256 + 64
    blocks_each = -(-worst // block)
    budget = (args.capacity * blocks_each + 1) * block * info.kv.bytes_per_token(torch.float32)  # CPU: float32
    spec = ClusterSpec(model=args.model, gateway_port=0, kv_budget=str(budget), max_batch=64, pin_cores=True,
                       log_level="WARNING", extra_env={"PDSERVE_MAX_QUEUED": str(args.max_queued)})
    cluster = LocalCluster(spec, progress=lambda m: print(m, file=sys.stderr, flush=True))
    cluster.start()
    try:
        await cluster.wait_healthy()
        decode = next(m.address for m in cluster.members if m.name.startswith("decode"))
        stub = decode_pb2_grpc.DecodeStub(grpc.aio.insecure_channel(decode))
        samples: list[decode_pb2.DecodeStats] = []

        async def poll() -> None:
            while True:
                samples.append(await stub.GetStats(decode_pb2.GetStatsRequest()))
                await asyncio.sleep(0.02)

        poller = asyncio.create_task(poll())
        started = time.perf_counter()
        async with AsyncClient(cluster.gateway_address) as client:
            calls = [client.generate(token_ids=p, max_tokens=n, temperature=0, ignore_eos=True)
                     for p, n in workload.requests(info.vocab_size)]
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=args.deadline_s)
        wall = time.perf_counter() - started
        await asyncio.sleep(0.2)
        poller.cancel()
        final = await stub.GetStats(decode_pb2.GetStatsRequest())
    finally:
        cluster.stop()
    refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
    other_errors = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException) and not isinstance(o, ResourceExhausted)]
    return {
        "requests": len(outcomes), "completed": sum(not isinstance(o, BaseException) for o in outcomes),
        "refused": len(refused), "other_errors": other_errors, "wall_s": wall,
        "retry_after_ms": sorted(o.retry_after_ms for o in refused if o.retry_after_ms is not None),
        "kv_budget_bytes": budget, "kv_pool_bytes": final.kv_cache_bytes, "blocks_total": final.kv_blocks_total,
        "peak_blocks_used_polled": max(s.kv_blocks_used for s in samples), "peak_blocks_used": final.kv_blocks_peak,
        "peak_queued": max(s.queued for s in samples), "peak_running": final.peak_running,
        "after": {"blocks_used": final.kv_blocks_used, "queued": final.queued, "running": final.running,
                  "waiting_for_kv": final.waiting_for_kv},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--capacity", type=int, default=8, help="requests the KV budget holds at once")
    parser.add_argument("--max-queued", type=int, default=4)
    parser.add_argument("--deadline-s", type=float, default=600)
    parser.add_argument("--out", default="bench/out/overload.json")
    args = parser.parse_args(argv)
    result = asyncio.run(go(args))
    ok = (result["completed"] + result["refused"] == result["requests"] and not result["other_errors"]
          and result["kv_pool_bytes"] <= result["kv_budget_bytes"]
          and result["peak_blocks_used"] <= result["blocks_total"]
          and result["after"] == {"blocks_used": 0, "queued": 0, "running": 0, "waiting_for_kv": 0})
    print(json.dumps(result, indent=1))
    print(f"overload bar: {'HOLDS' if ok else 'MISSED'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), **result,
                               "holds": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
