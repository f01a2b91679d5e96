"""KV receiver processes: a decode instance's gRPC KV streams taken in by processes of their own.

One Python process takes in gRPC at about 4 GB/s however many streams it serves: grpc's Cython layer
handles each message holding the GIL, and the streams share that one GIL (``bench.grpc_ceiling`` on the
H200 host: one receiver 4.8 GB/s over 4 streams, a receiver per stream 7.8, plaintext). With
``kv_receivers`` N, a decode instance starts N receiver processes (``KVReceivers``), each serving
``Decode.PushKV`` on a port of its own with the instance's credentials; ``DecodeStats.kv_receiver_ports``
names them, and a prefill instance sending over gRPC spreads a transfer's streams over them.

A receiver checks every chunk as decode would (``KVAssembly``: order, sizes, checksum) and forwards it the
way a producer on decode's host does: into decode's pool itself by CUDA IPC when the pool is on a GPU
(``IpcKVSender``: the chunk uploaded from pinned memory, scattered into the reserved blocks), through a
shared-memory segment otherwise (``ShmKVSender``). Its stream to decode carries the incoming stream's index
and count, so decode sees one transfer over N streams, as from a producer on its own host, and its rules
hold unchanged: a CUDA IPC stream's writes go only into the blocks ``TransferTarget`` named for that
stream, and a failed transfer's blocks are freed only once every such stream ended.

Failures: a receiver dies with decode (``PR_SET_PDEATHSIG``); decode starts a receiver that died again on
the same port. A transfer a dead receiver carried fails on both sides as one whose producer died: its
queued copies died with its process, decode frees the blocks once the stream ended, prefill's push fails
(and the gateway moves the request).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from pdserve import config as cfg
from pdserve.aio import cancel_quietly
from pdserve.convert import layout_from_proto, stream_info_from_proto
from pdserve.engine.device_io import upload
from pdserve.errors import Cancelled, FailedPrecondition, InvalidArgument, PdserveError
from pdserve.kv.assembly import KVAssembly, check_layout
from pdserve.kv.cuda_ipc import map_pool
from pdserve.kv.grpc_sender import GrpcKVSender, IpcKVSender, ShmKVSender
from pdserve.kv.receiver import add_decode_servicer, drain, read_header, receive_stream
from pdserve.kv.shm import SegmentPool
from pdserve.kv.staging import DeviceCopies
from pdserve.kv.wire import DTYPES, StreamInfo
from pdserve.logs import setup_logging
from pdserve.rpc import ChannelPool, rpc_errors, start_server
from pdserve.tls import ClusterAuth
from pdserve.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
START_TIMEOUT_S = 180.0  # a receiver imports torch and (GPU) maps decode's pool before it serves
WATCH_INTERVAL_S = 1.0
OPEN_WAIT_S = 10.0  # a failing stream waits this long for its stream to decode to open, to tell decode why
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ReceiverSpec:
    """What a receiver process needs of its decode instance (picklable: it crosses to the new process)."""

    config: cfg.DecodeConfig  # listen host, credentials, logging
    decode_port: int
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name of the pool
    max_tokens: int  # the model's context length: no transfer is longer
    incarnation: str  # decode's: its pool handle names it
    pool: dict | None = None  # a GPU pool's ``cuda_ipc.pool_handle`` fields (None: a CPU pool, shared memory)
    block_size: int = 16


def receiver_addresses(decode_address: str, ports) -> list[str]:
    """A decode instance's KV receivers as a producer reaches them (decode's host, their ports), or the
    instance itself when it has none."""
    host = decode_address.rpartition(":")[0]
    return [f"{host}:{port}" for port in ports] or [decode_address]


def _host(listen: str) -> str:
    return listen.rpartition(":")[0]


def decode_target(listen: str, port: int) -> str:
    """Where a process of decode's host reaches it: its listen host, or loopback for a wildcard."""
    host = _host(listen)
    return f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]', '::') else host}:{port}"


class ReceiverServicer(decode_pb2_grpc.DecodeServicer):
    """``PushKV`` only: each incoming stream checked and forwarded into decode's pool."""

    def __init__(self, spec: ReceiverSpec) -> None:
        self._spec = spec
        self._target = decode_target(spec.config.listen, spec.decode_port)
        self._channels = ChannelPool(ClusterAuth.from_config(spec.config))
        self._pool: torch.Tensor | None = None
        self._copies: DeviceCopies | None = None
        self._segments: SegmentPool | None = None
        if spec.pool is not None:
            self._pool = map_pool(SimpleNamespace(**spec.pool))
            self._copies = DeviceCopies(self._pool.device)
        else:
            self._segments = SegmentPool()

    def _sender(self, stream: StreamInfo, timeout_s: float | None) -> GrpcKVSender:
        channel = self._channels.get_sync(self._target)
        of = (stream.stream_index, stream.num_streams)
        if self._pool is not None:
            return IpcKVSender(channel, self._target, self._pool, self._spec.block_size, self._spec.incarnation,
                               self._copies, timeout_s, stream_of=of)
        return ShmKVSender(channel, self._target, self._segments, stream.checksums, timeout_s, stream_of=of)

    @rpc_errors
    async def PushKV(self, request_iterator, context):
        sender = opening = None
        try:
            header = await read_header(request_iterator)
            layout, stream = layout_from_proto(header), stream_info_from_proto(header)
            if stream.cuda_ipc or stream.shm_segment:
                raise InvalidArgument("header: a KV receiver takes K/V bytes in the stream (gRPC), not "
                                      "a shared-memory segment or CUDA IPC")
            s = self._spec
            if not 0 < layout.num_tokens <= s.max_tokens:
                raise InvalidArgument(f"header.num_tokens: {layout.num_tokens} outside [1, {s.max_tokens}] (the "
                                      "model's context)")
            check_layout(layout, num_layers=s.num_layers, kv_heads=s.kv_heads, head_dim=s.head_dim,
                         dtype=DTYPES[s.dtype], num_tokens=layout.num_tokens)
            sender = self._sender(stream, context.time_remaining())
            opening = asyncio.ensure_future(sender.open(layout))  # chunks staged meanwhile start once open
            device = None if self._pool is None else self._pool.device

            def forward(layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
                """A checked chunk's (T, H, D) K/V on to decode (staged as the forward pass's (1, H, T, D))."""
                if opening.done():
                    opening.result()  # decode refused the stream: stop now
                if device is not None:  # from pinned memory, on this process's stream; the scatter follows it
                    keys, values = upload(keys, keys.dtype, device), upload(values, values.dtype, device)
                sender.stage(layer, start, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0))

            assembly = KVAssembly(layout, forward, stream)
            first: list[int] = []
            received = await receive_stream(request_iterator, assembly, stream, on_trailer=first.append)
            await opening
            receipt = await sender.finish(first[0])
            return decode_pb2.PushKVReply(
                bytes_received=received, first_chunk_received_ns=assembly.first_chunk_ns,
                last_chunk_received_ns=assembly.last_chunk_ns, layer_received_ns=assembly.layer_received_ns,
                layer_written_ns=receipt.layer_written_ns)
        except BaseException as exc:
            if sender is not None:
                # Decode hears why (its header out first): a corrupt chunk, or the producer gone.
                await asyncio.wait([opening], timeout=OPEN_WAIT_S)
                reason = str(exc) if isinstance(exc, PdserveError) else "its producer's stream broke"
                await sender.fail(f"at KV receiver: {reason}")
            await cancel_quietly(opening)
            if isinstance(exc, PdserveError) and not isinstance(exc, Cancelled):
                log.warning("KV stream to decode refused: %s", exc)
                await drain(request_iterator)  # the producer hears the status (grpc/grpc#36066)
            raise


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux: the parent stops it on its way out
        pass
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _main(spec: ReceiverSpec, index: int, port: int, parent: int, conn) -> None:
    """A receiver process: serves until killed; sends its port on ``conn`` once serving."""
    _die_with_parent(parent)
    setup_logging(spec.config.log_level, f"decode-kv-receiver-{index}", spec.config.log_format)
    torch.set_num_threads(1)

    async def serve() -> None:
        servicer = ReceiverServicer(spec)
        auth = ClusterAuth.from_config(spec.config)
        server, bound, _ = await start_server(f"{_host(spec.config.listen)}:{port}", SERVICE,
                                              lambda server: add_decode_servicer(servicer, server),
                                              credentials=auth.server_credentials(),
                                              interceptors=auth.server_interceptors())
        conn.send(bound)
        conn.close()
        await server.wait_for_termination()

    asyncio.run(serve())


class KVReceivers:
    """A decode instance's receiver processes: started before it serves, started again when one dies, stopped
    with it. ``ports`` (what ``GetStats`` reports) holds each one's port."""

    def __init__(self, spec: ReceiverSpec, count: int) -> None:
        self._spec = spec
        self._context = multiprocessing.get_context("spawn")  # never fork a process holding CUDA or gRPC
        self._processes: list = [None] * count
        self.ports: list[int] = [0] * count
        self.restarts = 0
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        await asyncio.gather(*(self._start(i) for i in range(len(self.ports))))
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="kv-receivers")
        log.info("KV receivers: %d processes on ports %s", len(self.ports), ", ".join(map(str, self.ports)))

    async def _start(self, index: int) -> None:
        # Started from the event loop's thread: the child's PR_SET_PDEATHSIG fires when the thread that
        # started it ends, and this one lives as long as the instance.
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_main, name=f"kv-receiver-{index}", daemon=True,
                                        args=(self._spec, index, self.ports[index], os.getpid(), writer))
        process.start()
        writer.close()
        self._processes[index] = process
        try:
            if not await asyncio.to_thread(reader.poll, START_TIMEOUT_S):
                raise TimeoutError(f"not serving after {START_TIMEOUT_S:g} s")
            self.ports[index] = reader.recv()
        except (EOFError, TimeoutError) as exc:  # it exited (it logged why), or hangs
            process.kill()
            raise FailedPrecondition(f"KV receiver {index} did not start (exit code {process.exitcode}): "
                                     f"{exc or 'exited'}") from None
        finally:
            reader.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for index, process in enumerate(self._processes):
                if process is None or process.is_alive():
                    continue
                log.warning("KV receiver %d (port %d) exited with %s; starting it again", index, self.ports[index],
                            process.exitcode)
                self.restarts += 1
                try:
                    await self._start(index)
                except FailedPrecondition as exc:
                    log.error("%s; trying again", exc)

    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p is not None]

    async def close(self) -> None:
        await cancel_quietly(self._watcher)
        for process in self._processes:
            if process is not None and process.is_alive():
                process.terminate()
        for process in self._processes:
            if process is not None:
                await asyncio.to_thread(process.join, 5)
                if process.is_alive():
                    process.kill()
