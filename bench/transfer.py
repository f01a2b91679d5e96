"""KV transfer benchmark: each transport's GB/s against the ceilings, and what the transfer adds to TTFT.

Part 1, the wire: for each KV shape and prompt length, one transfer of random
K/V (every layer) from the real senders (``GrpcKVSender`` with 1..n streams,
``ShmKVSender``) to a receiver running the decode side's real path (header
checks, checksum verification, segment mapping, ``KVAssembly`` writing into a
preallocated pool tensor), on loopback. The receivers run in their own
process, as a decode server does (``--same-process`` puts them on the
sender's event loop), each process with its share of the cores' torch
threads, as ``pdserve up`` gives them. Ceilings in the same run: raw asyncio
TCP on one connection to that process (the same bytes in 1 MiB writes, read
and dropped) and memcpy into a preallocated tensor. ``shm`` reuses the
producer's pooled segment (steady state); ``shm, fresh segment`` creates and
unlinks one per transfer.

On a GPU (``--device cuda``) the layers start on the device and the senders
stage them as the services do (a copy stream into pinned host memory, the
segment, or, ``cuda_ipc``, scattered into the receiver's pool, which it
exports by CUDA IPC: 16-token blocks in a shuffled order, as reserved blocks
are); device-to-host ceilings are measured beside them.

Part 2, TTFT: one decode and one prefill process per transport (real
services); each prompt is reserved on decode and prefilled straight on the
prefill instance of that transport while its KV streams; the tail = KV
complete at decode minus forward end. Colocated, decode could start at
the end of a pass that moved no KV, so the overhead of disaggregation is
(queue + forward + tail) / (queue + forward of the same instance's prefills
without a transfer, in the same run) - 1: a transfer that slows the pass
itself (its sender threads taking the GIL from the thread launching it)
counts; tail / (queue + forward), what the tail alone adds, is reported too.
The transfer opens beside the pass (as a prefill server opens it): an open
that outlasts the pass shows in the tail; "open" and when it completed are
reported too.

    python -m bench.transfer [--lengths 128,512,2048,8192] [--ttft-lengths 128,512,2048] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from pdserve.config import KV_WRITE_LANES
from pdserve.convert import layout_from_proto, stream_info_from_proto
from pdserve.engine.pool_writer import PoolWriter
from pdserve.kv.assembly import KVAssembly
from pdserve.kv.cuda_ipc import map_pool
from pdserve.kv.grpc_sender import GrpcKVSender, IpcKVSender, ShmKVSender
from pdserve.kv.receiver import add_decode_servicer, read_header, receive_stream
from pdserve.kv.shm import SegmentPool
from pdserve.kv.staging import DeviceCopies
from pdserve.kv.wire import DTYPE_NAMES, KVLayout
from pdserve.model.loader import KVShape
from pdserve.rpc import OPTIONS, ChannelPool
from pdserve.tls import NO_AUTH, ClusterAuth, TlsFiles, make_certificates
from pdserve.service import set_torch_threads, tune_malloc
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

SHAPES = {  # name: (KV shape, dtype)
    "SmolLM2-135M fp32": (KVShape(num_layers=30, kv_heads=3, head_dim=64), torch.float32),
    "Llama-1B shape bf16": (KVShape(num_layers=16, kv_heads=8, head_dim=64), torch.bfloat16),
    "Llama-8B shape bf16": (KVShape(num_layers=32, kv_heads=8, head_dim=128), torch.bfloat16),
}


BLOCK = 16


class Receiver(decode_pb2_grpc.DecodeServicer):
    """The decode side's transfer path, writing into one preallocated (2, layers, tokens, H, D) pool; on a
    GPU the pool is exported by CUDA IPC and a transfer's "reserved blocks" are its 16-token blocks in a
    shuffled order."""

    def __init__(self, device: str = "cpu", write_lanes: int = KV_WRITE_LANES) -> None:
        self.device = torch.device(device)
        self.storage: torch.Tensor | None = None
        self.pool: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.assemblies: dict[str, KVAssembly] = {}
        # Decode's GPU path: received chunks checked and copied into the pool on a thread and stream of their own.
        self.writer = PoolWriter(self, write_lanes) if self.device.type == "cuda" else None

    def _prepare(self, layout: KVLayout) -> None:
        """A pool for this geometry, allocated and touched once (as the decode pool is), reused across transfers."""
        shape = (2, layout.num_layers, layout.num_tokens, layout.kv_heads, layout.head_dim)
        if self.storage is None or tuple(self.storage.shape) != shape or self.storage.dtype != layout.torch_dtype:
            self.storage = None
            self.storage = torch.zeros(shape, dtype=layout.torch_dtype, device=self.device)
            self.pool = list(self.storage[0]), list(self.storage[1])

    def write(self, _table, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """As ``KVPool.write`` (the table is the identity here): from host memory on a GPU, as decode does."""
        self.pool[0][layer][start:start + k.shape[0]] = k.to(self.device, non_blocking=True)
        self.pool[1][layer][start:start + v.shape[0]] = v.to(self.device, non_blocking=True)

    async def GetKVPool(self, request, context):
        from pdserve.kv.cuda_ipc import pool_handle

        return decode_pb2.KVPoolHandle(incarnation="bench", **pool_handle(self.storage, BLOCK))

    async def TransferTarget(self, request, context):
        blocks = torch.randperm(self.storage.shape[2] // BLOCK, generator=torch.Generator().manual_seed(0))
        return decode_pb2.TransferTargetReply(blocks=blocks.tolist(), incarnation="bench")


    async def PushKV(self, request_iterator, context):
        header = await read_header(request_iterator)
        if header.transfer_id.startswith(DROPPED):  # the sender's ceiling: messages read and dropped
            async for _ in request_iterator:
                pass
            return decode_pb2.PushKVReply()
        layout, stream = layout_from_proto(header), stream_info_from_proto(header)
        assembly = self.assemblies.get(layout.transfer_id)
        if assembly is None:
            self._prepare(layout)
            if self.writer is not None and not stream.cuda_ipc:  # as decode: checked and written on a thread
                assembly = KVAssembly(layout, lambda layer, start, k, v, check: self.writer.write(
                    None, layer, start, k, v, check), stream, checks_on_write=True)
            else:
                assembly = KVAssembly(layout, lambda layer, start, k, v: self.write(None, layer, start, k, v), stream)
            self.assemblies[layout.transfer_id] = assembly
        else:
            assembly.attach(layout, stream)

        def on_trailer(token: int) -> None:
            if assembly.stream_finished(stream.stream_index, token):
                del self.assemblies[layout.transfer_id]

        await receive_stream(request_iterator, assembly, stream, on_trailer,
                             writes_issued=self.writer.issued if self.writer is not None else None)
        return decode_pb2.PushKVReply(first_chunk_received_ns=assembly.first_chunk_ns,
                                      last_chunk_received_ns=assembly.last_chunk_ns,
                                      layer_received_ns=assembly.layer_received_ns,
                                      layer_written_ns=assembly.layer_written_ns)


_transfer_ids = itertools.count()
DROPPED = "dropped-"  # a transfer id the receiver reads and drops (no parsing, checks or writes)


async def one_transfer(make_sender, layout: KVLayout, layers: list[tuple[torch.Tensor, torch.Tensor]],
                       phases: list | None = None, dropped: bool = False) -> float:
    """Seconds for one transfer of ``layers``; with ``phases``, appends where its time went (ms from the
    start: the stream open and ready to stage, the first message handed to a stream, every layer staged, the
    last message handed to a stream, acked; and the ms spent inside ``stage()`` calls). ``dropped``: the
    receiver reads the messages and drops them."""
    sender = make_sender()
    layout = dataclasses.replace(layout, transfer_id=f"{DROPPED if dropped else 'bench-'}{next(_transfer_ids)}")
    started = time.monotonic_ns()
    await sender.open(layout)
    opened = time.monotonic_ns()

    in_stage = 0  # ns spent inside stage() (its own work, or waiting for the GIL)

    def stage_all() -> None:  # from a thread, as the prefill worker stages each layer it queued
        nonlocal in_stage
        for i, (k, v) in enumerate(layers):
            t = time.monotonic_ns()
            sender.stage(i, 0, k, v)
            in_stage += time.monotonic_ns() - t

    await asyncio.to_thread(stage_all)
    staged = time.monotonic_ns()
    receipt = await sender.finish(0)
    done = time.monotonic_ns()
    if phases is not None:
        phases.append({"open": (opened - started) / 1e6, "first sent": (receipt.first_chunk_sent_ns - started) / 1e6,
                       "staged": (staged - started) / 1e6, "in stage()": in_stage / 1e6,
                       "last sent": (max(receipt.layer_sent_ns) - started) / 1e6, "acked": (done - started) / 1e6})
    return (done - started) / 1e9


async def tcp_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Raw TCP receiver: an 8-byte length, that many bytes read and dropped, a one-byte ack; repeat."""
    try:
        while head := await reader.readexactly(8):
            left = int.from_bytes(head, "little")
            while left:
                left -= len(await reader.read(min(left, 1 << 20)))
            writer.write(b"k")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def raw_tcp_seconds(port: int, nbytes: int, chunk: int = 1 << 20) -> float:
    """One asyncio TCP connection on loopback: the same bytes, written in ``chunk``-byte pieces, until acked."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = bytes(chunk)
    started = time.perf_counter()
    writer.write(nbytes.to_bytes(8, "little"))
    sent = 0
    while sent < nbytes:
        n = min(chunk, nbytes - sent)
        writer.write(payload[:n])
        sent += n
        await writer.drain()
    await reader.readexactly(1)
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


def member_tls(certs: str, role: str) -> dict:
    """A member's mutual-TLS settings (``tls_cert``, ``tls_key``, ``tls_ca``) from ``make_certificates`` output."""
    return {"tls_cert": f"{certs}/{role}.pem", "tls_key": f"{certs}/{role}-key.pem", "tls_ca": f"{certs}/ca.pem"}


def member_auth(certs: str, role: str) -> ClusterAuth:
    """A member's mutual-TLS identity from ``pdserve.tls.make_certificates`` output."""
    return ClusterAuth(TlsFiles.load(*member_tls(certs, role).values()))


async def start_receivers(device: str = "cpu", certs: str = "", write_lanes: int = KV_WRITE_LANES
                          ) -> tuple[Receiver, list, int, int, int]:
    """The gRPC receiver and the raw TCP sink on port 0 of this loop, and with ``certs`` the same receiver
    behind mutual TLS too: (receiver, servers, grpc port, tcp port, mTLS grpc port or 0)."""
    receiver = Receiver(device, write_lanes)
    servers = []
    ports = []
    for auth in ([NO_AUTH, member_auth(certs, "decode")] if certs else [NO_AUTH]):
        server = grpc.aio.server(options=OPTIONS)
        add_decode_servicer(receiver, server)
        credentials = auth.server_credentials()
        ports.append(server.add_secure_port("127.0.0.1:0", credentials) if credentials else
                     server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    sink = await asyncio.start_server(tcp_sink, "127.0.0.1", 0)
    return receiver, [*servers, sink], ports[0], sink.sockets[0].getsockname()[1], ports[1] if certs else 0


async def stop_receivers(servers) -> None:
    *grpc_servers, sink = servers
    sink.close()
    for server in grpc_servers:
        await server.stop(0)


async def serve_receivers(device: str, certs: str, write_lanes: int = KV_WRITE_LANES) -> None:
    """``--serve``: the receivers in their own process (the deployment's shape: decode is another
    process); prints the ports, runs until stdin closes."""
    _, servers, grpc_port, tcp_port, tls_port = await start_receivers(device, certs, write_lanes)
    print(grpc_port, tcp_port, tls_port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await stop_receivers(servers)


class Relays:
    """The relayed wire path (``grpc xN relays``): N KV sender processes (as prefill's ``kv_senders``, for the
    whole run) sending from (on a GPU, pinned) shared-memory staging to N KV receiver processes (as decode's
    ``kv_receivers``), which write into the receiver's pool by CUDA IPC (on a CPU, through shared memory);
    started again for each pool (they map it), as the services' are for one decode instance."""

    def __init__(self, count: int, receiver_port: int, certs: str) -> None:
        from pdserve import config as cfg

        self.count = count
        self._receiver_port = receiver_port
        self._decode = cfg.DecodeConfig(listen="127.0.0.1:0", log_level="WARNING",
                                        **(member_tls(certs, "decode") if certs else {}))
        self._prefill = cfg.PrefillConfig(listen="127.0.0.1:0", log_level="WARNING",
                                          **(member_tls(certs, "prefill") if certs else {}))
        self._senders = self._receivers = None

    async def map(self, handle, kv: KVShape, dtype: torch.dtype, tokens: int) -> None:
        from pdserve.kv.relays import ReceiverSpec, RelayProcesses, SenderSpec

        if self._senders is None:
            self._senders = RelayProcesses(SenderSpec(self._prefill), self.count)
            await self._senders.start()
        if self._receivers is not None:
            await self._receivers.close()
        pool = None if handle is None else {f.name: getattr(handle, f.name) for f in handle.DESCRIPTOR.fields
                                            if f.name != "incarnation"}
        self._receivers = RelayProcesses(ReceiverSpec(
            self._decode, self._receiver_port, kv.num_layers, kv.kv_heads, kv.head_dim, DTYPE_NAMES[dtype], tokens,
            "bench", pool=pool, block_size=BLOCK), self.count)
        await self._receivers.start()

    def sender(self, channels: ChannelPool, address: str, segments: SegmentPool, copies) -> ShmKVSender:
        from pdserve.kv.relays import FORWARD_KEY

        ports, targets = self._senders.ports, self._receivers.ports
        return ShmKVSender([channels.get_sync(f"127.0.0.1:{port}") for port in ports], address, segments, False,
                           copies=copies, stream_metadata=[((FORWARD_KEY, f"127.0.0.1:{t}"),) for t in targets],
                           transport="grpc")

    async def close(self) -> None:
        for relays in (self._senders, self._receivers):
            if relays is not None:
                await relays.close()


def memcpy_seconds(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return min(times)


def d2h_seconds(nbytes: int, pinned: bool) -> float:
    """Device to host: one copy of ``nbytes`` into a pinned (or pageable) host tensor, best of 3."""
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


async def wire(args) -> list[dict]:
    child = None
    certs = ""
    if args.tls:  # the gRPC paths again over mutual TLS, as members talk by default
        certs = tempfile.mkdtemp(prefix="pdserve-bench-certs-")
        make_certificates(certs)
    if args.same_process:
        receiver, servers, grpc_port, tcp_port, tls_port = await start_receivers(args.device, certs, args.write_lanes)
    else:
        receiver, servers = None, None
        child = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.transfer", "--serve",
                                                     "--threads", str(args.threads), "--device", args.device,
                                                     "--certs", certs, "--write-lanes", str(args.write_lanes),
                                                     stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        grpc_port, tcp_port, tls_port = map(int, (await child.stdout.readline()).split())
    address = f"127.0.0.1:{grpc_port}"
    channels = ChannelPool()
    tls_address = f"127.0.0.1:{tls_port}"
    tls_channels = ChannelPool(member_auth(certs, "prefill")) if certs else None
    gpu = args.device.startswith("cuda")
    copies = DeviceCopies(torch.device(args.device)) if gpu else None
    paths = {f"grpc x{n}": (lambda n=n: GrpcKVSender([channels.get_sync(address, lane) for lane in range(n)], address,
                                                     copies=copies))
             for n in args.streams}
    paths["grpc x1, no checksum"] = lambda: GrpcKVSender([channels.get_sync(address)], address, checksums=False,
                                                         copies=copies)
    # Where gRPC's time goes (--paths picks them): the sender alone, and without checksums.
    n = max(args.streams)
    paths[f"grpc x{n} (receiver drops)"] = paths[f"grpc x{n}"]
    paths[f"grpc x{n} (no checksum)"] = lambda: GrpcKVSender([channels.get_sync(address, lane) for lane in range(n)],
                                                            address, checksums=False, copies=copies)
    dropped = {f"grpc x{n} (receiver drops)"}
    if tls_channels is not None:
        paths.update({f"grpc x{n}, mTLS": (lambda n=n: GrpcKVSender(
            [tls_channels.get_sync(tls_address, lane) for lane in range(n)], tls_address, copies=copies))
            for n in args.streams})
    segments = SegmentPool()
    # steady state: the segment is reused
    paths["shm"] = lambda: ShmKVSender([channels.get_sync(address)], address, segments, copies=copies)
    paths["shm, fresh segment"] = lambda: ShmKVSender([channels.get_sync(address)], address, SegmentPool(idle_limit=0),
                                                      copies=copies)
    warm_up = paths["grpc x1"] if "grpc x1" in paths else next(iter(paths.values()))
    mapped: dict = {}
    relays = None
    if gpu and not args.same_process:
        paths["cuda_ipc"] = lambda: IpcKVSender(channels.get_sync(address), address, mapped["pool"], BLOCK, "bench",
                                                copies, layer_ranges=mapped["layer_ranges"])
    if not args.same_process:
        # Through relay processes at both ends, over mutual TLS with --tls (as members talk by default).
        relays = Relays(n, tls_port or grpc_port, certs)
        relay_channels = tls_channels or channels
        relayed = f"grpc x{n} relays{' mTLS' if certs else ''}"
        paths[relayed] = lambda: relays.sender(relay_channels, address, segments, copies)
    if args.paths:
        unknown = set(args.paths) - set(paths)
        if unknown:
            raise SystemExit(f"--paths: unknown {sorted(unknown)}; this run has {sorted(paths)}")
        paths = {name: paths[name] for name in args.paths}
    if relays is not None and relayed not in paths:
        relays = None
    rows = []
    try:
        for shape_name, (kv, dtype) in ((n, SHAPES[n]) for n in args.shapes):
            for tokens in args.lengths:
                layout = KVLayout("bench", kv.num_layers, tokens, kv.kv_heads, kv.head_dim, DTYPE_NAMES[dtype])
                layers = [(torch.randn(1, kv.kv_heads, tokens, kv.head_dim).to(args.device, dtype),
                           torch.randn(1, kv.kv_heads, tokens, kv.head_dim).to(args.device, dtype))
                          for _ in range(kv.num_layers)]
                nbytes = layout.total_bytes
                row = {"shape": shape_name, "tokens": tokens, "bytes": nbytes}
                await one_transfer(warm_up, layout, layers)  # warm-up: the receiver's pool for this shape
                if gpu and ("cuda_ipc" in paths or relays is not None):  # its pool for this shape, mapped here
                    handle = await decode_pb2_grpc.DecodeStub(channels.get(address)).GetKVPool(
                        decode_pb2.GetKVPoolRequest())
                    mapped.clear()
                    torch.cuda.synchronize()
                    mapped["pool"], mapped["layer_ranges"] = map_pool(handle), handle.layer_ranges
                if relays is not None:  # (re)started for this pool: the receivers map it (a CPU's: shared memory)
                    await relays.map(handle if gpu else None, kv, dtype, tokens)
                row["phases"] = {}
                for name, make in paths.items():
                    drop = name in dropped
                    await one_transfer(make, layout, layers, dropped=drop)  # steady state (a segment made and pinned)
                    phases: list[dict] = []
                    times = [await one_transfer(make, layout, layers, phases, drop) for _ in range(args.repeats)]
                    row["phases"][name] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
                    if receiver is not None and not drop:  # in another process, the checksums vouch for the bytes
                        if gpu:
                            torch.cuda.synchronize()  # the pool writer's copies
                        assert torch.equal(receiver.pool[0][-1], layers[-1][0][0].transpose(0, 1)), name
                    if name == "cuda_ipc" or (gpu and name == relayed):  # scattered into the shuffled blocks
                        pool, slots = mapped["pool"], ipc_slots(tokens)
                        torch.cuda.synchronize()
                        assert torch.equal(pool[0, -1][slots], layers[-1][0][0].transpose(0, 1)), name
                    row[name] = nbytes / statistics.median(times) / 1e9
                row["raw TCP x1"] = nbytes / statistics.median([await raw_tcp_seconds(tcp_port, nbytes)
                                                                for _ in range(args.repeats)]) / 1e9
                row["memcpy"] = nbytes / memcpy_seconds(nbytes) / 1e9
                if args.device.startswith("cuda"):
                    row["D2H pinned"] = nbytes / d2h_seconds(nbytes, pinned=True) / 1e9
                    row["D2H pageable"] = nbytes / d2h_seconds(nbytes, pinned=False) / 1e9
                rows.append(row)
                print(f"{shape_name} {tokens} tokens ({nbytes / 2**20:.1f} MiB): "
                      + ", ".join(f"{k} {v:.2f} GB/s" for k, v in row.items() if isinstance(v, float)), flush=True)
                for name, p in row["phases"].items():
                    print(f"  {name}: ms from the start: " + ", ".join(f"{k} {v:.2f}" for k, v in p.items()),
                          flush=True)
    finally:
        mapped.clear()
        if relays is not None:
            await relays.close()
        segments.close()
        if copies is not None:
            copies.close()
        await channels.close()
        if tls_channels is not None:
            await tls_channels.close()
            shutil.rmtree(certs, ignore_errors=True)
        if child is not None:
            child.stdin.close()
            await child.wait()
        else:
            await stop_receivers(servers)
    return rows


def ipc_slots(tokens: int) -> torch.Tensor:
    """Where the receiver's TransferTarget puts tokens [0, tokens) (its shuffled 16-token blocks)."""
    blocks = torch.randperm(tokens // BLOCK, generator=torch.Generator().manual_seed(0))
    t = torch.arange(tokens)
    return (blocks[t // BLOCK] * BLOCK + t % BLOCK).to("cuda")


async def prefill_alone(auth, prefill: str, prompt: list[int], tid: str) -> float:
    """Queue + forward ms of one prefill moving no KV (no decode address): the colocated baseline."""
    from pdserve.v1 import common_pb2

    async with auth.channel(prefill) as pch:
        events = [e async for e in prefill_pb2_grpc.PrefillStub(pch).Prefill(prefill_pb2.PrefillRequest(
            request_id=tid, token_ids=prompt, sampling=common_pb2.SamplingParams(temperature=0)))]
    return events[0].first_token.queue_ms + events[0].first_token.forward_ms


async def prefill_timed(auth, decode: str, prefill: str, prompt: list[int], tid: str) -> dict:
    """One prefill straight to a prefill server (a decode reservation first, as the gateway makes): its
    queue and forward times, what the transfer added after the forward pass (KV complete at decode minus
    forward end; one host's clock) and, per layer, ms after the forward pass started that its last chunk
    was ready, sent, received, written. ``auth``: the cluster's (``LocalCluster.auth``)."""
    from pdserve.v1 import common_pb2

    greedy = common_pb2.SamplingParams(temperature=0)
    async with auth.channel(decode) as dch, auth.channel(prefill) as pch:  # the cluster's mutual TLS
        call = decode_pb2_grpc.DecodeStub(dch).Generate(decode_pb2.DecodeRequest(
            request_id=tid, transfer_id=tid, prompt_tokens=len(prompt), max_tokens=2, sampling=greedy))
        await call.read()  # reserved
        events = [e async for e in prefill_pb2_grpc.PrefillStub(pch).Prefill(prefill_pb2.PrefillRequest(
            request_id=tid, token_ids=prompt, sampling=greedy, decode_address=decode, transfer_id=tid))]
        while await call.read() is not grpc.aio.EOF:
            pass
    first, done = events[0].first_token, events[-1].transfer_done
    t0 = done.forward_start_ns

    def ms(ns: int) -> float:
        return (ns - t0) / 1e6

    return {"queue_ms": first.queue_ms, "forward_ms": first.forward_ms, "bytes": done.bytes,
            "open_ms": (done.opened_ns - done.open_start_ns) / 1e6, "opened_at_ms": ms(done.opened_ns),
            "transfer_ms": (done.acked_ns - done.first_chunk_sent_ns) / 1e6,
            "tail_ms": max(0.0, (done.last_chunk_received_ns - done.forward_end_ns) / 1e6),
            "layers": [{"ready": ms(a), "sent": ms(b), "received": ms(c), "written": ms(d)} for a, b, c, d in
                       zip(done.layer_ready_ns, done.layer_sent_ns, done.layer_received_ns, done.layer_written_ns)]}


TTFT_TRANSPORTS = (("grpc x1", ("--kv-transport", "grpc", "--kv-streams", "1")),
                   ("grpc x4", ("--kv-transport", "grpc", "--kv-streams", "4")),
                   ("grpc x8", ("--kv-transport", "grpc", "--kv-streams", "8")),
                   ("shm", ("--kv-transport", "shm")),
                   ("cuda_ipc", ("--kv-transport", "cuda_ipc")))


def distinct_prompt(vocab: int, tokens: int, key: tuple[int, ...]) -> list[int]:
    """A random prompt of ``tokens`` ids, one per ``key``: no two share a prefix block."""
    seed = hash((tokens, *key)) & 0x7FFFFFFF
    return torch.randint(100, vocab, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


async def ttft(args) -> list[dict]:
    from pdserve_cli.cluster import ClusterSpec, LocalCluster
    from pdserve.model import load_model_info

    transports = [t for t in TTFT_TRANSPORTS if t[0] in args.ttft_transports
                  and (args.device.startswith("cuda") or t[0] != "cuda_ipc")]
    spec = ClusterSpec(model=args.model, device=args.device, prefill=len(transports), decode=1, gateway_port=0,
                       threads=args.threads, prefill_chunk_tokens=args.chunk, kv_budget=args.kv_budget,
                       prefill_token_budget=max(max(args.ttft_lengths), 2048), log_level="WARNING", tls=not args.plaintext,
                       prefill_args=tuple((*flags, *args.prefill_flags.split()) for _, flags in transports))
    cluster = LocalCluster(spec, progress=lambda m: print(m, file=sys.stderr, flush=True))
    vocab = load_model_info(args.model).vocab_size
    rows = []
    try:
        await cluster.start()
        await cluster.wait_healthy(timeout_s=600)
        decode = next(m.address for m in cluster.members if m.name == "decode-0")
        async with cluster.auth.channel(decode) as channel:  # PDSERVE_KV_RECEIVERS: decode's KV receivers
            receivers = len((await decode_pb2_grpc.DecodeStub(channel).GetStats(decode_pb2.GetStatsRequest(),
                                                                                timeout=10)).kv_receiver_ports)
        async with cluster.auth.channel(next(m.address for m in cluster.members if m.name == "prefill-0")) as channel:
            senders = len((await prefill_pb2_grpc.PrefillStub(channel).GetStats(prefill_pb2.PrefillStatsRequest(),
                                                                                timeout=10)).kv_sender_ports)
        print(f"decode-0: {receivers} KV receiver processes; prefill-0: {senders} KV sender processes",
              file=sys.stderr, flush=True)
        for i, (name, _) in enumerate(transports):
            prefill = next(m.address for m in cluster.members if m.name == f"prefill-{i}")
            for tokens in args.ttft_lengths:
                # A prompt of its own each time: a repeated one would be served from prefill's prefix cache.
                await prefill_timed(cluster.auth, decode, prefill, distinct_prompt(vocab, tokens, (i, 0)),
                                    f"ttft-{name}-{tokens}-0".replace(" ", ""))  # the first warms up
                profilers = profile_members(args.profile_members, args.profile_flags.split(), cluster,
                                            (f"prefill-{i}", "decode-0"), f"{name}_{tokens}"
                                            ) if tokens == args.overlap_length else []
                try:
                    samples = [await prefill_timed(cluster.auth, decode, prefill,
                                                   distinct_prompt(vocab, tokens, (i, r)),
                                                   f"ttft-{name}-{tokens}-{r}".replace(" ", ""))
                               for r in range(1, args.repeats + 1)]
                finally:
                    stop_profilers(profilers)
                # Without a transfer: a warm-up first (a pass with no layer callback may take another path
                # the first time), distinct prompts too (keys apart from the samples': hash(-1) == hash(-2)).
                alone = [await prefill_alone(cluster.auth, prefill, distinct_prompt(vocab, tokens, (i, 1000 + r)),
                                             f"alone-{name}-{tokens}-{r}".replace(" ", ""))
                         for r in range(args.repeats + 1)]
                alone = statistics.median(alone[1:])
                forward = statistics.median(x["forward_ms"] for x in samples)
                queue = statistics.median(x["queue_ms"] for x in samples)
                tail = statistics.median(x["tail_ms"] for x in samples)
                row = {"transport": name, "kv_receivers": receivers, "kv_senders": senders, "tokens": tokens,
                       "kv_bytes": samples[0]["bytes"], "forward_ms": forward,
                       "queue_ms": queue, "transfer_ms": statistics.median(x["transfer_ms"] for x in samples),
                       "tail_ms": tail, "alone_ms": alone, "overhead": (queue + forward + tail) / alone - 1,
                       "tail_share": tail / (forward + queue),
                       "sample_overheads": [(x["queue_ms"] + x["forward_ms"] + x["tail_ms"]) / alone - 1
                                            for x in samples],
                       "open_ms": statistics.median(x["open_ms"] for x in samples),
                       "opened_at_ms": statistics.median(x["opened_at_ms"] for x in samples)}
                if tokens == args.overlap_length:
                    row["timeline"] = {"forward_ms": forward, "layers": samples[-1]["layers"]}
                rows.append(row)
                print(f"{name} {tokens} tokens: forward {forward:.1f} ms, open {row['open_ms']:.1f} ms (done "
                      f"{row['opened_at_ms']:.1f} ms after the pass began), transfer {row['transfer_ms']:.1f} ms, "
                      f"tail after forward {tail:.1f} ms; without a transfer {alone:.1f} ms: TTFT overhead "
                      f"{100 * row['overhead']:.1f}% (samples {min(row['sample_overheads']):.1%} to "
                      f"{max(row['sample_overheads']):.1%})", flush=True)
    finally:
        cluster.stop()
    return rows


def profile_members(folder: str, flags: list[str], cluster, names: tuple[str, ...], tag: str) -> list:
    """With ``folder``: py-spy (``--threads``, raw stacks, only running threads) attached to each named member
    until ``stop_profilers``: where a TTFT sample's time goes in the serving processes themselves."""
    if not folder:
        return []
    py_spy = shutil.which("py-spy") or str(Path(sys.prefix) / "bin" / "py-spy")
    Path(folder).mkdir(parents=True, exist_ok=True)
    profilers = []
    for member in (m for m in cluster.members if m.name in names):
        out = Path(folder) / f"profile_ttft_{tag}_{member.name}.txt".replace(" ", "_")
        profilers.append(subprocess.Popen([py_spy, "record", "--nonblocking", "--threads", *flags, "-r", "200",
                                           "-f", "raw", "-o", str(out), "--pid", str(member.process.pid)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # attached before the samples start
    return profilers


def stop_profilers(profilers: list) -> None:
    for p in profilers:
        p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    for p in profilers:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def print_timeline(row: dict) -> None:
    t = row["timeline"]
    layers = t["layers"]
    shown = sorted({*range(0, len(layers), max(1, len(layers) // 8)), len(layers) - 1})
    print(f"\nPer-layer timeline, {row['transport']}, {row['tokens']} tokens: ms after the forward pass started "
          f"(it ended at {t['forward_ms']:.1f} ms)\n")
    print("| layer | ready at prefill | sent | received at decode | written into the pool | written - ready |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for i in shown:
        x = layers[i]
        print(f"| {i} | {x['ready']:.1f} | {x['sent']:.1f} | {x['received']:.1f} | {x['written']:.1f} "
              f"| {x['written'] - x['ready']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,512,2048,8192")
    parser.add_argument("--ttft-lengths", default="128,512,2048,8190")
    parser.add_argument("--overlap-length", type=int, default=2048,
                        help="TTFT length whose per-layer timeline is printed")
    parser.add_argument("--streams", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="default")
    parser.add_argument("--shapes", type=lambda t: t.split(","), default=["SmolLM2-135M fp32", "Llama-1B shape bf16"],
                        help=f"wire: KV shapes, from {', '.join(SHAPES)}")
    parser.add_argument("--chunk", type=int, default=0, help="TTFT: the prefill instances' chunk size (0: whole)")
    parser.add_argument("--kv-budget", default="auto", help="TTFT: the decode instance's KV pool")
    parser.add_argument("--prefill-flags", default="",
                        help="TTFT: more flags for every prefill instance (e.g. '--kv-chunk-bytes 16777216')")
    parser.add_argument("--profile-members", default="", metavar="DIR",
                        help="TTFT: py-spy on the prefill and decode members during the --overlap-length samples, raw "
                             "stacks into DIR (summarize with bench.profile_summary)")
    parser.add_argument("--profile-flags", default="", help="TTFT: more py-spy flags, e.g. --gil")
    parser.add_argument("--plaintext", action="store_true",
                        help="TTFT: the cluster's members talk without mutual TLS (its default), to see what TLS costs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paths", type=lambda t: re.split(r",(?! )", t), default=[],
                        help="wire: only these paths (names as in the table, e.g. 'grpc x4,cuda_ipc')")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-wire", action="store_true")
    parser.add_argument("--ttft-transports", type=lambda t: t.split(","),
                        default=[t for t, _ in TTFT_TRANSPORTS if t != "grpc x8"],
                        help="TTFT: transports, one prefill instance each")
    parser.add_argument("--out", default="bench/out/transfer.json")
    parser.add_argument("--same-process", action="store_true",
                        help="receivers on the sender's event loop (default: their own process, as decode is)")
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) // 2),
                        help="torch threads per process (as `pdserve up` splits the cores between services)")
    parser.add_argument("--write-lanes", type=int, default=KV_WRITE_LANES,
                        help="GPU: the receiver's pool-writer lanes (decode's kv_write_lanes)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--certs", default="", help=argparse.SUPPRESS)
    parser.add_argument("--tls", action="store_true",
                        help="the gRPC paths over mutual TLS too (a development CA made for the run)")
    args = parser.parse_args(argv)
    if args.write_lanes != KV_WRITE_LANES:  # the TTFT cluster's decode too
        os.environ["PDSERVE_KV_WRITE_LANES"] = str(args.write_lanes)
    tune_malloc()  # as the services do
    set_torch_threads(args.threads)
    if args.serve:
        asyncio.run(serve_receivers(args.device, args.certs, args.write_lanes))
        return 0
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.ttft_lengths = [int(x) for x in args.ttft_lengths.split(",")]
    args.streams = [int(x) for x in args.streams.split(",")]

    wire_rows = [] if args.skip_wire else asyncio.run(wire(args))
    if wire_rows:
        paths = [k for k in wire_rows[0] if isinstance(wire_rows[0][k], float)]
        print("\n| KV shape | tokens | MiB | " + " | ".join(f"{p} GB/s" for p in paths) + " |")
        print("| --- | ---: | ---: | " + " | ".join("---:" for _ in paths) + " |")
        for r in wire_rows:
            print(f"| {r['shape']} | {r['tokens']} | {r['bytes'] / 2**20:.1f} | "
                  + " | ".join(f"{r[p]:.2f}" for p in paths) + " |")
    ttft_rows = [] if args.skip_ttft else asyncio.run(ttft(args))
    if ttft_rows:
        print("\n| transport | tokens | KV MiB | without a transfer ms | queue + forward ms | open ms (beside the pass) "
              "| transfer ms | tail after forward ms | tail / (queue + forward) | TTFT overhead |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in ttft_rows:
            print(f"| {r['transport']} | {r['tokens']} | {r['kv_bytes'] / 2**20:.1f} | {r['alone_ms']:.1f} | "
                  f"{r['queue_ms'] + r['forward_ms']:.1f} | {r['open_ms']:.1f} | {r['transfer_ms']:.1f} | {r['tail_ms']:.1f} | "
                  f"{100 * r['tail_share']:.1f}% | {100 * r['overhead']:.1f}% |")
        for r in ttft_rows:
            if "timeline" in r:
                print_timeline(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "wire": wire_rows, "ttft": ttft_rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
