"""KV relay processes: a transfer's gRPC streams sent and taken in by processes of their own.

One Python process moves gRPC at about 4 GB/s however many streams it runs: grpc's Cython layer copies
each message holding the GIL, and the streams share that one GIL -- on the prefill side with the thread
launching the forward pass too (``bench.grpc_ceiling`` on the H200 host, plaintext: one receiving process
4.8 GB/s over 4 streams, one per stream 7.8, and a sending process per stream too 10.4; session 17). So
both ends can hand their streams to processes of their own, each serving ``Decode.PushKV``:

* **KV receivers** (decode's ``kv_receivers``): each listens on a port of its own on decode's host, with
  decode's credentials; ``DecodeStats.kv_receiver_ports`` names them and a prefill instance spreads a
  transfer's gRPC streams over them. A receiver checks every chunk as decode would (``KVAssembly``:
  order, sizes, checksum) and forwards it the way a producer on decode's host does: written into decode's
  pool by CUDA IPC when the pool is on a GPU (``IpcKVSender``: each chunk pinned, then copied into the
  reserved blocks' runs of slots by DMA, no kernel), through a shared-memory segment otherwise
  (``ShmKVSender``).
* **KV senders** (prefill's ``kv_senders``): each listens on loopback. Prefill stages a transfer's KV in
  a shared-memory segment as for a same-host decode (on a GPU the copy stream writes it, pinned) and
  sends each sender one small message per layer range, on a stream of the transfer; the sender encodes
  the range from the segment and sends it on over gRPC (``GrpcKVSender``: chunks, checksums) to where
  the stream's ``pdserve-kv-forward`` metadata says (a decode instance or its receiver).

A relay's stream keeps the incoming stream's index and count, so decode sees one transfer over N streams
and its rules hold unchanged: a CUDA IPC stream writes only into the blocks ``TransferTarget`` named for
that stream, and a failed transfer's blocks are freed only once every such stream ended. A relay that
meets a failure (a corrupt chunk, its producer gone) ends its stream on with a ``KVAbort`` naming it.

Failures: relays die with their instance (``PR_SET_PDEATHSIG``), which starts one that died again on
the same port (``RelayProcesses``) and meanwhile leaves it out of the ports it reports and sends through.
A transfer a dead relay carried fails as one whose producer died: its queued copies died with it, decode
frees the blocks once the stream ended, prefill's push fails, and the gateway moves the request (prefill
learns decode's receivers again after a failed transfer). The instance's ``/metrics`` counts its relays
running and down (``pdserve_kv_relays``) and those replaced (``pdserve_kv_relay_restarts_total``); what
they carry shows in decode's and prefill's transfer metrics.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from prometheus_client import Counter

from pdserve import config as cfg
from pdserve.aio import cancel_quietly
from pdserve.convert import address_problem, layout_from_proto, stream_info_from_proto
from pdserve.errors import Cancelled, FailedPrecondition, InvalidArgument, PdserveError
from pdserve.kv.assembly import KVAssembly, check_layout
from pdserve.kv.cuda_ipc import map_pool
from pdserve.kv.grpc_sender import GrpcKVSender, IpcKVSender, ShmKVSender
from pdserve.kv.receiver import SEGMENTS, add_decode_servicer, drain, read_header, receive_stream
from pdserve.kv.shm import SegmentPool, sweep_orphans
from pdserve.kv.staging import DeviceCopies
from pdserve.kv.wire import DTYPES, KVLayout, StreamInfo
from pdserve.logs import setup_logging
from pdserve.metrics import ServiceMetrics
from pdserve.rpc import ChannelPool, concrete_host, rpc_errors, start_server
from pdserve.tls import ClusterAuth
from pdserve.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
FORWARD_KEY = "pdserve-kv-forward"  # a stream to a KV sender: where it goes on (host:port)
START_TIMEOUT_S = 180.0  # a relay imports torch and (GPU) maps decode's pool before it serves
WATCH_INTERVAL_S = 1.0
OPEN_WAIT_S = 10.0  # a failing relayed stream waits this long for its stream on to open, to tell why
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ReceiverSpec:
    """What a KV receiver needs of its decode instance (picklable: it crosses to the new process)."""

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
    role = "kv-receiver"

    @property
    def listen_host(self) -> str:
        return self.config.listen.rpartition(":")[0]  # reached from other hosts, as decode is

    def servicer(self) -> "ReceiverServicer":
        return ReceiverServicer(self)


@dataclass(frozen=True)
class SenderSpec:
    """What a KV sender needs of its prefill instance."""

    config: cfg.PrefillConfig  # credentials, chunk size, checksums, quantization, logging
    role = "kv-sender"
    listen_host = "127.0.0.1"  # only its prefill instance talks to it

    def servicer(self) -> "SenderServicer":
        return SenderServicer(self)


def receiver_addresses(decode_address: str, ports) -> list[str]:
    """A decode instance's KV receivers as a producer reaches them (decode's host, their ports), or the
    instance itself when it has none."""
    host = decode_address.rpartition(":")[0]
    return [f"{host}:{port}" for port in ports] or [decode_address]


def decode_target(listen: str, port: int) -> str:
    """Where a process of decode's host reaches it: its listen host, or loopback for a wildcard."""
    return f"{concrete_host(listen, '127.0.0.1')}:{port}"


def _staged_as_computed(t: torch.Tensor) -> torch.Tensor:
    """A chunk's (T, H, D) K or V as a forward pass hands it to a sender: (1, H, T, D) (a view)."""
    return t.transpose(0, 1).unsqueeze(0)


class _Relay(decode_pb2_grpc.DecodeServicer):
    """``PushKV`` only: each incoming stream checked (``KVAssembly``) and forwarded by a sender of its own."""

    def __init__(self, config, role: str) -> None:
        self._channels = ChannelPool(ClusterAuth.from_config(config))
        self._role = role

    def _check(self, layout: KVLayout, stream: StreamInfo) -> None:
        """Raises unless this relay takes such a stream."""

    def _sender(self, layout: KVLayout, stream: StreamInfo, context) -> GrpcKVSender:
        raise NotImplementedError

    def _hold(self, stream: StreamInfo):
        """What the stream's chunks need kept until its sender finished (``_let_go``)."""
        return None

    def _let_go(self, held) -> None:
        pass

    def _forward(self, sender: GrpcKVSender, layer: int, start: int, keys: torch.Tensor,
                 values: torch.Tensor) -> None:
        """A checked chunk's (T, H, D) K/V to the sender (on the loop; returns at once)."""
        sender.stage(layer, start, _staged_as_computed(keys), _staged_as_computed(values))

    def _reply(self, received: int, assembly: KVAssembly, receipt) -> decode_pb2.PushKVReply:
        raise NotImplementedError

    def close(self) -> None:
        """The process is stopping: what it holds goes (a receiver's idle shared-memory segments)."""

    @rpc_errors
    async def PushKV(self, request_iterator, context):
        sender = opening = held = None
        try:
            header = await read_header(request_iterator)
            layout, stream = layout_from_proto(header), stream_info_from_proto(header)
            self._check(layout, stream)
            held = self._hold(stream)
            sender = self._sender(layout, stream, context)
            opening = asyncio.ensure_future(sender.open(layout))  # chunks staged meanwhile start once open

            def forward(layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
                if opening.done():
                    opening.result()  # the stream on was refused: stop now
                self._forward(sender, layer, start, keys, values)

            assembly = KVAssembly(layout, forward, stream)
            first: list[int] = []
            received = await receive_stream(request_iterator, assembly, stream, on_trailer=first.append)
            await opening
            return self._reply(received, assembly, await sender.finish(first[0]))
        except BaseException as exc:
            if sender is not None:
                # The consumer hears why (once the stream on is open): a corrupt chunk, or the producer gone.
                await asyncio.wait([opening], timeout=OPEN_WAIT_S)
                reason = str(exc) if isinstance(exc, PdserveError) else "its producer's stream broke"
                await sender.fail(f"at {self._role} {os.getpid()}: {reason}")
            await cancel_quietly(opening)
            if isinstance(exc, PdserveError) and not isinstance(exc, Cancelled):
                log.warning("KV stream refused: %s", exc)
                await drain(request_iterator)  # the producer hears the status (grpc/grpc#36066)
            raise
        finally:
            if held is not None:
                self._let_go(held)


class ReceiverServicer(_Relay):
    """A KV receiver: gRPC chunks in, into decode's pool (CUDA IPC, or shared memory) out."""

    def __init__(self, spec: ReceiverSpec) -> None:
        super().__init__(spec.config, spec.role)
        self._spec = spec
        self._target = decode_target(spec.config.listen, spec.decode_port)
        self._pool: torch.Tensor | None = None
        self._copies: DeviceCopies | None = None
        self._segments: SegmentPool | None = None
        if spec.pool is not None:
            self._pool = map_pool(SimpleNamespace(**spec.pool))
            self._copies = DeviceCopies(self._pool.device)
        else:
            self._segments = SegmentPool()

    def _check(self, layout: KVLayout, stream: StreamInfo) -> None:
        if stream.cuda_ipc or stream.shm_segment:
            raise InvalidArgument("header: a KV receiver takes K/V bytes in the stream (gRPC), not a shared-memory "
                                  "segment or CUDA IPC")
        s = self._spec
        if not 0 < layout.num_tokens <= s.max_tokens:
            raise InvalidArgument(f"header.num_tokens: {layout.num_tokens} outside [1, {s.max_tokens}] (the "
                                  "model's context)")
        check_layout(layout, num_layers=s.num_layers, kv_heads=s.kv_heads, head_dim=s.head_dim,
                     dtype=DTYPES[s.dtype], num_tokens=layout.num_tokens)

    def _sender(self, layout: KVLayout, stream: StreamInfo, context) -> GrpcKVSender:
        channel = self._channels.get_sync(self._target)
        of = (stream.stream_index, stream.num_streams)
        if self._pool is not None:
            return IpcKVSender(channel, self._target, self._pool, self._spec.block_size, self._spec.incarnation,
                               self._copies, context.time_remaining(), stream_of=of)
        return ShmKVSender([channel], self._target, self._segments, stream.checksums, context.time_remaining(),
                           stream_of=of)

    def close(self) -> None:
        if self._segments is not None:
            self._segments.close()
        if self._copies is not None:
            self._copies.close()

    def _forward(self, sender, layer, start, keys, values) -> None:
        if self._pool is not None:  # copied into decode's pool from pinned memory, on the copy stream
            keys, values = keys.pin_memory(), values.pin_memory()
        super()._forward(sender, layer, start, keys, values)

    def _reply(self, received, assembly, receipt) -> decode_pb2.PushKVReply:
        return decode_pb2.PushKVReply(
            bytes_received=received, first_chunk_received_ns=assembly.first_chunk_ns,
            last_chunk_received_ns=assembly.last_chunk_ns, layer_received_ns=assembly.layer_received_ns,
            layer_written_ns=receipt.layer_written_ns)


class SenderServicer(_Relay):
    """A KV sender: layer ranges of its prefill instance's shared-memory staging in, gRPC chunks out."""

    def __init__(self, spec: SenderSpec) -> None:
        super().__init__(spec.config, spec.role)
        self._config = spec.config

    def _check(self, layout: KVLayout, stream: StreamInfo) -> None:
        if not stream.shm_segment:
            raise InvalidArgument("header.shm_segment: a KV sender sends from its prefill instance's shared memory")

    def _sender(self, layout: KVLayout, stream: StreamInfo, context) -> GrpcKVSender:
        target = dict(context.invocation_metadata()).get(FORWARD_KEY, "")
        problem = address_problem(target)
        if problem:
            raise InvalidArgument(f"{FORWARD_KEY} metadata: {problem}")
        c = self._config
        # A connection of its own per stream index: the streams of one transfer move in parallel.
        return GrpcKVSender([self._channels.get_sync(target, stream.stream_index)], target, c.kv_chunk_bytes,
                            c.kv_checksums, context.time_remaining(),
                            quantization="" if c.kv_quantization == "none" else c.kv_quantization,
                            stream_of=(stream.stream_index, stream.num_streams))

    def _hold(self, stream: StreamInfo):
        # The chunks are views of the segment, read by the sender's thread until it finished: the mapping is
        # held (a user of its own) until the stream ends, whatever ``receive_stream`` does with its own.
        return SEGMENTS.open(stream.shm_segment)

    def _let_go(self, held) -> None:
        SEGMENTS.release(held)

    def _reply(self, received, assembly, receipt) -> decode_pb2.PushKVReply:
        return decode_pb2.PushKVReply(
            bytes_received=receipt.bytes_sent, first_chunk_received_ns=receipt.first_chunk_received_ns,
            last_chunk_received_ns=receipt.last_chunk_received_ns, layer_received_ns=receipt.layer_received_ns,
            layer_written_ns=receipt.layer_written_ns, layer_sent_ns=receipt.layer_sent_ns)


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux: the parent stops it on its way out
        pass
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _serve(spec, index: int, port: int, parent: int) -> None:
    """A relay process: serves until SIGTERM (or killed); prints its port on stdout once serving."""
    _die_with_parent(parent)
    # A terminal's Ctrl-C reaches the whole process group; the instance drains its streams and then stops
    # its relays (SIGTERM), so a relay does not stop under a stream the instance still serves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(spec.config.log_level, f"{spec.role}-{index}", spec.config.log_format)
    torch.set_num_threads(1)

    async def serve() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        servicer = spec.servicer()
        auth = ClusterAuth.from_config(spec.config)
        server, bound, _ = await start_server(f"{spec.listen_host}:{port}", SERVICE,
                                              lambda server: add_decode_servicer(servicer, server),
                                              credentials=auth.server_credentials(),
                                              interceptors=auth.server_interceptors())
        print(bound, flush=True)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing more for the instance to read
        await stop.wait()
        await server.stop(None)  # its streams fail, as their producers' would if it died
        servicer.close()

    asyncio.run(serve())


class RelayProcesses:
    """An instance's relay processes (``ReceiverSpec`` or ``SenderSpec``): started before it serves, started
    again when one dies (on its port), stopped with it. ``live_ports`` (what ``GetStats`` reports, and what a
    prefill instance sends through) leaves a dead one out meanwhile, so transfers go around it.

    Each is ``python -m pdserve.kv.relays ROLE INDEX PORT PARENT`` (what ``ps`` shows), its spec pickled on
    its stdin: a fresh interpreter (nothing forked from a process holding CUDA or gRPC threads), and no
    helper process of ``multiprocessing``'s left in the instance's process group."""

    def __init__(self, spec: ReceiverSpec | SenderSpec, count: int, metrics: ServiceMetrics | None = None) -> None:
        self._spec = spec
        self._processes: list[subprocess.Popen | None] = [None] * count
        self.ports: list[int] = [0] * count
        self._serving: set[int] = set()  # indexes of relays that said they serve (and may have died since)
        self._watcher: asyncio.Task | None = None
        self._restarts = None
        if metrics is not None:  # in the instance's /metrics: how many serve, and how often one had to be replaced
            metrics.gauges(self._gauges)
            self._restarts = Counter("pdserve_kv_relay_restarts", "KV relay processes that exited and were started "
                                     "again", ["role"], registry=metrics.registry).labels(spec.role)

    async def start(self) -> None:
        await asyncio.gather(*(self._start(i) for i in range(len(self.ports))))
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name=self._spec.role)
        log.info("%ss: %d processes on ports %s", self._spec.role, len(self.ports), ", ".join(map(str, self.ports)))

    async def _start(self, index: int) -> None:
        # Started from the event loop's thread: the child's PR_SET_PDEATHSIG fires when the thread that
        # started it ends, and this one lives as long as the instance.
        self._serving.discard(index)
        process = subprocess.Popen([sys.executable, "-m", "pdserve.kv.relays", self._spec.role, str(index),
                                    str(self.ports[index]), str(os.getpid())], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE)
        self._processes[index] = process
        try:
            process.stdin.write(pickle.dumps(self._spec))
            process.stdin.close()
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), START_TIMEOUT_S)
            if not line.strip():
                raise EOFError("exited")
            self.ports[index] = int(line)
            self._serving.add(index)
        except (OSError, EOFError, ValueError, asyncio.TimeoutError) as exc:  # it exited (it logged why), or hangs
            process.kill()
            raise FailedPrecondition(f"{self._spec.role} {index} did not start (exit code {process.poll()}): "
                                     f"{exc or 'no answer in ' + str(START_TIMEOUT_S) + ' s'}") from None
        finally:
            process.stdout.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for index, process in enumerate(self._processes):
                if process is None or process.poll() is None:
                    continue
                log.warning("%s %d (port %d) exited with %s; starting it again", self._spec.role, index,
                            self.ports[index], process.returncode)
                if self._restarts is not None:
                    self._restarts.inc()
                sweep_orphans()  # the segments it held
                try:
                    await self._start(index)
                except FailedPrecondition as exc:
                    log.error("%s; trying again", exc)

    def _gauges(self) -> dict:
        running, role = len(self.live_ports()), self._spec.role
        return {"pdserve_kv_relays": ("KV relay processes of this instance (kv_senders, kv_receivers) by state "
                                      "(down: exited, being started again)",
                                      {(("role", role), ("state", "running")): running,
                                       (("role", role), ("state", "down")): len(self.ports) - running})}

    def live_ports(self) -> list[int]:
        """The ports of the relays running now (one that died is left out until it serves again)."""
        return [self.ports[i] for i, process in enumerate(self._processes)
                if i in self._serving and process.poll() is None]

    async def close(self) -> None:
        await cancel_quietly(self._watcher)
        for process in self._processes:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in self._processes:
            if process is not None:
                try:
                    await asyncio.to_thread(process.wait, 5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    await asyncio.to_thread(process.wait, 5)
        sweep_orphans()  # what one that had to be killed held


def main(argv: list[str] | None = None) -> None:
    """``python -m pdserve.kv.relays ROLE INDEX PORT PARENT``, the spec pickled on stdin (``RelayProcesses``)."""
    _, index, port, parent = argv or sys.argv[1:]
    spec = pickle.load(sys.stdin.buffer)
    _serve(spec, int(index), int(port), int(parent))


if __name__ == "__main__":
    main()
