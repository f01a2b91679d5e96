"""How much of the KV transfer hides behind the prefill forward pass.

Starts decode and prefill in one process (port 0) on the chosen model, then
for each prompt length reserves a request on decode and calls Prefill
directly, reading the per-transfer timestamps both sides report (both are
CLOCK_MONOTONIC on this host). Prints a table and writes JSON.

    python -m bench.kv_overlap [--model default] [--lengths 128,512,2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import grpc

from pdserve.model import load_model
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.cluster import start_cluster


async def one_transfer(cluster, prompt: list[int], tid: str) -> dict:
    async with grpc.aio.insecure_channel(cluster.decode_address) as dch, \
            grpc.aio.insecure_channel(f"127.0.0.1:{cluster.prefill.port}") as pch:
        decode = decode_pb2_grpc.DecodeStub(dch).Generate(decode_pb2.DecodeRequest(
            request_id=tid, transfer_id=tid, prompt_tokens=len(prompt), max_tokens=2,
            sampling=common_pb2.SamplingParams(temperature=0)))
        await decode.read()
        events = [e async for e in prefill_pb2_grpc.PrefillStub(pch).Prefill(prefill_pb2.PrefillRequest(
            request_id=tid, token_ids=prompt, sampling=common_pb2.SamplingParams(temperature=0),
            decode_address=cluster.decode_address, transfer_id=tid))]
        while await decode.read() is not grpc.aio.EOF:
            pass
    d = events[1].transfer_done
    ms = lambda ns: ns / 1e6  # noqa: E731
    return {
        "forward_ms": ms(d.forward_end_ns - d.forward_start_ns),
        "first_layer_at_ms": ms(d.first_chunk_received_ns - d.forward_start_ns),
        "last_layer_after_forward_ms": ms(d.last_chunk_received_ns - d.forward_end_ns),
        "acked_after_forward_ms": ms(d.acked_ns - d.forward_end_ns),
        "kv_bytes": d.bytes,
        "messages": d.messages,
    }


async def main(args) -> None:
    loaded = load_model(args.model)
    cluster = await start_cluster(loaded)
    rows = []
    try:
        vocab = loaded.info.vocab_size
        await one_transfer(cluster, list(range(100, 164)), "warmup")
        for n in args.lengths:
            prompt = [(i * 7919) % (vocab - 200) + 100 for i in range(n)]
            runs = [await one_transfer(cluster, prompt, f"len{n}-{r}") for r in range(args.repeats)]
            row = {"prompt_tokens": n, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
            rows.append(row)
    finally:
        await cluster.stop()
    header = f"{'tokens':>7} {'KV MiB':>7} {'msgs':>5} {'forward ms':>10} {'1st layer at ms':>15} {'last layer - fwd end ms':>23} {'ack - fwd end ms':>16}"
    print(header)
    for r in rows:
        print(f"{r['prompt_tokens']:>7} {r['kv_bytes'] / 2**20:>7.1f} {r['messages']:>5.0f} {r['forward_ms']:>10.1f} "
              f"{r['first_layer_at_ms']:>15.1f} {r['last_layer_after_forward_ms']:>23.1f} {r['acked_after_forward_ms']:>16.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": loaded.info.name, "dtype": str(loaded.dtype), "repeats": args.repeats,
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--lengths", default="128,512,2048", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/out/kv_overlap.json")
    asyncio.run(main(parser.parse_args()))
