"""KV transfer benchmark: each transport's GB/s against the ceilings, and what the transfer adds to TTFT.

Part 1, the wire: for each KV shape and prompt length, one transfer of random
K/V (every layer) from the real senders (``GrpcKVSender`` with 1..n streams,
``ShmKVSender``) to a receiver running the decode side's real path (header
checks, checksum verification, segment mapping, ``KVAssembly`` writing into a
preallocated pool tensor), on loopback. Ceilings in the same run: raw asyncio
TCP on one connection (the same bytes in 1 MiB writes) and memcpy into a
preallocated tensor.

Part 2, TTFT: the default model prefills each prompt on a ``PrefillEngine``
while the KV streams to a real decode server; the tail = KV complete at
decode minus forward end. Colocated, decode could start at forward end, so
the overhead of disaggregation is tail / (queue + forward).

    python -m bench.transfer [--lengths 128,512,2048,8192] [--ttft-lengths 128,512,2048] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
import torch

from pdserve.convert import layout_from_proto, stream_info_from_proto
from pdserve.kv.assembly import KVAssembly
from pdserve.kv.grpc_sender import GrpcKVSender, ShmKVSender
from pdserve.kv.receiver import add_decode_servicer, read_header, receive_stream
from pdserve.kv.wire import DTYPE_NAMES, KVLayout
from pdserve.model.loader import KVShape
from pdserve.rpc import OPTIONS, ChannelPool
from pdserve.service import tune_malloc
from pdserve.v1 import decode_pb2, decode_pb2_grpc

SHAPES = {  # name: (KV shape, dtype)
    "SmolLM2-135M fp32": (KVShape(num_layers=30, kv_heads=3, head_dim=64), torch.float32),
    "Llama-1B shape bf16": (KVShape(num_layers=16, kv_heads=8, head_dim=64), torch.bfloat16),
}


class Receiver(decode_pb2_grpc.DecodeServicer):
    """The decode side's transfer path, writing into one preallocated (tokens, H, D) tensor per layer."""

    def __init__(self) -> None:
        self.pool: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.assembly: KVAssembly | None = None

    def prepare(self, kv: KVShape, dtype: torch.dtype, tokens: int) -> None:
        """A pool for this shape, allocated and touched once (as the decode pool is), reused across transfers."""
        shape = (tokens, kv.kv_heads, kv.head_dim)
        if self.pool is None or self.pool[0][0].shape != shape or self.pool[0][0].dtype != dtype \
                or len(self.pool[0]) != kv.num_layers:
            self.pool = ([torch.zeros(shape, dtype=dtype) for _ in range(kv.num_layers)],
                         [torch.zeros(shape, dtype=dtype) for _ in range(kv.num_layers)])
        self.assembly = None

    def _write(self, layer, start, k, v) -> None:
        self.pool[0][layer][start:start + k.shape[0]] = k
        self.pool[1][layer][start:start + v.shape[0]] = v

    async def PushKV(self, request_iterator, context):
        header = await read_header(request_iterator)
        layout, stream = layout_from_proto(header), stream_info_from_proto(header)
        if self.assembly is None:
            self.assembly = KVAssembly(layout, self._write, stream)
        else:
            self.assembly.attach(layout, stream)
        await receive_stream(request_iterator, self.assembly, stream,
                             lambda token: self.assembly.stream_finished(stream.stream_index, token))
        return decode_pb2.PushKVReply(first_chunk_received_ns=self.assembly.first_chunk_ns,
                                      last_chunk_received_ns=self.assembly.last_chunk_ns)


async def one_transfer(make_sender, layout: KVLayout, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    sender = make_sender()
    started = time.perf_counter()
    await sender.open(layout)
    for i, (k, v) in enumerate(layers):
        sender.send_layer(i, 0, k, v)
    await sender.finish(0)
    return time.perf_counter() - started


async def raw_tcp_seconds(nbytes: int, chunk: int = 1 << 20) -> float:
    """One asyncio TCP connection on loopback: the same bytes, written in ``chunk``-byte pieces, read and counted."""
    done = asyncio.Event()
    got = 0

    async def handle(reader, writer):
        nonlocal got
        while got < nbytes:
            data = await reader.read(1 << 20)
            if not data:
                break
            got += len(data)
        done.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    payload = bytes(chunk)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    sent = 0
    while sent < nbytes:
        writer.write(payload[:min(chunk, nbytes - sent)])
        sent += min(chunk, nbytes - sent)
        await writer.drain()
    await done.wait()
    elapsed = time.perf_counter() - started
    writer.close()
    server.close()
    await server.wait_closed()
    return elapsed


def memcpy_seconds(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return min(times)


async def wire(args) -> list[dict]:
    receiver = Receiver()
    server = grpc.aio.server(options=OPTIONS)
    add_decode_servicer(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    channels = ChannelPool()
    paths = {f"grpc x{n}": (lambda n=n: GrpcKVSender([channels.get(address, lane) for lane in range(n)], address))
             for n in args.streams}
    paths["grpc x1, no checksum"] = lambda: GrpcKVSender([channels.get(address)], address, checksums=False)
    paths["shm"] = lambda: ShmKVSender(channels.get(address), address)
    rows = []
    try:
        for shape_name, (kv, dtype) in SHAPES.items():
            for tokens in args.lengths:
                layout = KVLayout("bench", kv.num_layers, tokens, kv.kv_heads, kv.head_dim, DTYPE_NAMES[dtype])
                layers = [(torch.randn(1, kv.kv_heads, tokens, kv.head_dim).to(dtype),
                           torch.randn(1, kv.kv_heads, tokens, kv.head_dim).to(dtype)) for _ in range(kv.num_layers)]
                nbytes = layout.total_bytes
                row = {"shape": shape_name, "tokens": tokens, "bytes": nbytes}
                for name, make in paths.items():
                    times = []
                    for _ in range(args.repeats):
                        receiver.prepare(kv, dtype, tokens)
                        times.append(await one_transfer(make, layout, layers))
                    assert torch.equal(receiver.pool[0][-1], layers[-1][0][0].transpose(0, 1)), name
                    row[name] = nbytes / statistics.median(times) / 1e9
                row["raw TCP x1"] = nbytes / statistics.median([await raw_tcp_seconds(nbytes)
                                                                for _ in range(args.repeats)]) / 1e9
                row["memcpy"] = nbytes / memcpy_seconds(nbytes) / 1e9
                rows.append(row)
                print(f"{shape_name} {tokens} tokens ({nbytes / 2**20:.1f} MiB): "
                      + ", ".join(f"{k} {v:.2f} GB/s" for k, v in row.items() if isinstance(v, float)), flush=True)
    finally:
        await channels.close()
        await server.stop(0)
    return rows


async def ttft(args) -> list[dict]:
    from tests.cluster import start_cluster  # in-process services on port 0

    from pdserve.model import load_model
    from pdserve.sdk import AsyncClient

    loaded = load_model(args.model, device=args.device)
    rows = []
    for transport, streams in (("grpc", 1), ("grpc", 2), ("shm", 1)):
        cluster = await start_cluster(loaded, prefill_options={"kv_transport": transport, "kv_streams": streams,
                                                               "prefill_chunk_tokens": 0,
                                                               "prefill_token_budget": max(args.ttft_lengths)},
                                      decode_options={"kv_budget": "4GiB"})
        try:
            async with AsyncClient(cluster.address) as client:
                for tokens in args.ttft_lengths:
                    prompt = torch.randint(100, loaded.info.vocab_size, (tokens,),
                                           generator=torch.Generator().manual_seed(tokens)).tolist()
                    samples = []
                    for _ in range(args.repeats + 1):
                        result = await client.generate(token_ids=prompt, max_tokens=2, temperature=0, ignore_eos=True)
                        samples.append(result.server_timings)
                    t = samples[1:]  # the first warms up
                    forward = statistics.median(s["prefill_forward_ms"] for s in t)
                    queue = statistics.median(s.get("prefill_queue_ms", 0.0) for s in t)
                    tail = statistics.median(s.get("kv_tail_ms", 0.0) for s in t)
                    row = {"transport": f"{transport} x{streams}" if transport == "grpc" else transport,
                           "tokens": tokens, "kv_bytes": t[0]["kv_bytes"], "forward_ms": forward, "queue_ms": queue,
                           "transfer_ms": statistics.median(s.get("kv_transfer_ms", 0.0) for s in t), "tail_ms": tail,
                           "overhead": tail / (forward + queue)}
                    rows.append(row)
                    print(f"{row['transport']} {tokens} tokens: forward {forward:.1f} ms, transfer "
                          f"{row['transfer_ms']:.1f} ms, tail after forward {tail:.1f} ms "
                          f"({100 * row['overhead']:.1f}% of TTFT)", flush=True)
        finally:
            await cluster.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,512,2048,8192")
    parser.add_argument("--ttft-lengths", default="128,512,2048")
    parser.add_argument("--streams", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--out", default="bench/out/transfer.json")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.ttft_lengths = [int(x) for x in args.ttft_lengths.split(",")]
    args.streams = [int(x) for x in args.streams.split(",")]
    tune_malloc()  # as the services do

    wire_rows = asyncio.run(wire(args))
    paths = [k for k in wire_rows[0] if isinstance(wire_rows[0][k], float)]
    print("\n| KV shape | tokens | MiB | " + " | ".join(f"{p} GB/s" for p in paths) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in paths) + " |")
    for r in wire_rows:
        print(f"| {r['shape']} | {r['tokens']} | {r['bytes'] / 2**20:.1f} | "
              + " | ".join(f"{r[p]:.2f}" for p in paths) + " |")
    ttft_rows = [] if args.skip_ttft else asyncio.run(ttft(args))
    if ttft_rows:
        print("\n| transport | tokens | KV MiB | queue + forward ms | transfer ms | tail after forward ms | TTFT overhead |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in ttft_rows:
            print(f"| {r['transport']} | {r['tokens']} | {r['kv_bytes'] / 2**20:.1f} | "
                  f"{r['queue_ms'] + r['forward_ms']:.1f} | {r['transfer_ms']:.1f} | {r['tail_ms']:.1f} | "
                  f"{100 * r['overhead']:.1f}% |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "wire": wire_rows, "ttft": ttft_rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
