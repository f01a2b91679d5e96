"""How fast Python gRPC moves bytes on loopback, against raw TCP, and what limits it.

The KV transfer over gRPC reaches 0.5-0.75x raw TCP on the H200 host (bench/RESULTS.md). This asks what
gRPC itself allows, without pdserve's code in the way: a sync client streams ``--total`` bytes in
``--message``-byte messages (one pre-made bytes object, sent again and again) over 1..n channels, each its
own TCP connection, to a grpc.aio server that counts them (as decode's PushKV reads them), in

* one receiving process for every stream (as one decode instance receives a transfer's streams), or
* one receiving process per stream (what the streams could do without sharing a receiver's GIL and loop),
* one synchronous server (a thread per stream instead of one event loop),

with grpc's default HTTP/2 settings and with larger frames and windows; then, to size the designs that
would take the KV streams out of one process's GIL before building them, a sending process per stream
(as prefill could send from processes of its own) with one receiver or one per stream, and the same over
mutual TLS (as cluster members talk; certificates from ``pdserve.tls.make_certificates``); beside raw TCP
on the same host: asyncio (as bench.transfer's "raw TCP x1") and blocking sockets in threads
(``sendall``/``recv_into``, no copy out to Python objects).

    python -m bench.grpc_ceiling [--streams 1,4,8] [--total-mib 1024] [--settings default] [--out ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from pdserve.service import tune_malloc
from pdserve.tls import make_certificates

METHOD = "/bench.Sink/Push"
BASE = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
TUNED = [("grpc.http2.max_frame_size", (16 << 20) - 1), ("grpc.http2.lookahead_bytes", 64 << 20),
         ("grpc.http2.bdp_probe", 0), ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
         ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20)]
SETTINGS = {"default": [], "big frames+windows": TUNED}


def _member(certs: str, role: str):
    from bench.transfer import member_auth

    return member_auth(certs, role)


def _channel(port: int, options: list, certs: str, index: int) -> grpc.Channel:
    """A synchronous channel on a connection of its own (``index``), plaintext or, with ``certs``, mutual TLS."""
    address, opts = f"127.0.0.1:{port}", BASE + options + [("grpc.channel_id", index)]
    return _member(certs, "prefill").sync_channel(address, opts) if certs else grpc.insecure_channel(address, opts)


def _listen(server, certs: str) -> int:
    """``server`` (aio or sync) on a port of 127.0.0.1: plaintext or, with ``certs``, mutual TLS."""
    if certs:
        return server.add_secure_port("127.0.0.1:0", _member(certs, "decode").server_credentials())
    return server.add_insecure_port("127.0.0.1:0")


def _grpc_sink(options: list, certs: str, ports: mp.Queue) -> None:
    tune_malloc()

    async def main() -> None:
        async def push(requests, context):
            n = 0
            async for message in requests:
                n += len(message)
            return n.to_bytes(8, "little")

        handler = grpc.method_handlers_generic_handler(
            "bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(push)})
        server = grpc.aio.server(options=BASE + options)
        server.add_generic_rpc_handlers((handler,))
        ports.put(_listen(server, certs))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _tcp_sink(ports: mp.Queue) -> None:
    """Accepts connections; each: an 8-byte length, that many bytes read into one buffer, a one-byte ack."""
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])

    def serve(conn: socket.socket) -> None:
        buf = memoryview(bytearray(4 << 20))
        with conn:
            while head := conn.recv(8, socket.MSG_WAITALL):
                left = int.from_bytes(head, "little")
                while left:
                    left -= conn.recv_into(buf, min(left, len(buf)))
                conn.sendall(b"k")

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _grpc_sync_sink(options: list, certs: str, ports: mp.Queue) -> None:
    """The same sink as a synchronous server: each stream read on a thread of its pool (grpc releases the
    GIL while it waits for the next message)."""
    from concurrent.futures import ThreadPoolExecutor

    tune_malloc()

    def push(requests, context):
        return sum(len(message) for message in requests).to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler("bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(push)})
    server = grpc.server(ThreadPoolExecutor(16), options=BASE + options)
    server.add_generic_rpc_handlers((handler,))
    ports.put(_listen(server, certs))
    server.start()
    server.wait_for_termination()


def _start(target, *args) -> tuple[mp.Process, int]:
    spawn = mp.get_context("spawn")  # a fresh interpreter: no grpc state inherited from this process
    ports = spawn.Queue()
    process = spawn.Process(target=target, args=(*args, ports), daemon=True)
    process.start()
    return process, ports.get(timeout=60)


def _messages(payload: bytes, count: int):
    for _ in range(count):
        yield payload


def _sender(port: int, options: list, certs: str, index: int, count: int, message: int, rounds: int,
            go, moved: mp.Queue) -> None:
    """A sending process: one channel, ``rounds`` streams of ``count`` messages, each round started at ``go``."""
    channel = _channel(port, options, certs, index)
    payload = bytes(message)
    for _ in range(rounds):
        go.wait()
        moved.put(int.from_bytes(channel.stream_unary(METHOD).future(_messages(payload, count)).result(), "little"))
    channel.close()


def grpc_gbps(streams: int, options: list, per_stream_receiver: bool, total: int, message: int,
              repeats: int, sink=_grpc_sink, certs: str = "", per_stream_sender: bool = False) -> float:
    sinks = [_start(sink, options, certs) for _ in range(streams if per_stream_receiver else 1)]
    per_stream = total // message // streams
    rates = []
    try:
        if per_stream_sender:
            spawn = mp.get_context("spawn")
            go, moved = spawn.Barrier(streams + 1), spawn.Queue()
            senders = [spawn.Process(target=_sender, daemon=True, args=(
                sinks[i % len(sinks)][1], options, certs, i, per_stream, message, repeats + 1, go, moved))
                for i in range(streams)]
            for p in senders:
                p.start()
            try:
                for _ in range(repeats + 1):  # the first warms the connections up
                    go.wait(timeout=120)
                    started = time.perf_counter()
                    done = sum(moved.get(timeout=120) for _ in range(streams))
                    rates.append(done / (time.perf_counter() - started) / 1e9)
            finally:
                for p in senders:
                    p.kill()
        else:
            channels = [_channel(sinks[i % len(sinks)][1], options, certs, i) for i in range(streams)]
            payload = bytes(message)
            try:
                for _ in range(repeats + 1):  # the first warms the connections up
                    started = time.perf_counter()
                    calls = [c.stream_unary(METHOD).future(_messages(payload, per_stream)) for c in channels]
                    done = sum(int.from_bytes(call.result(), "little") for call in calls)
                    rates.append(done / (time.perf_counter() - started) / 1e9)
            finally:
                for c in channels:
                    c.close()
    finally:
        for process, _ in sinks:
            process.kill()
    return statistics.median(rates[1:])


def tcp_threads_gbps(streams: int, total: int, message: int, repeats: int) -> float:
    """Blocking sockets, a thread per connection, the same buffer sent with ``sendall``."""
    process, port = _start(_tcp_sink)
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    payload = memoryview(bytes(message))
    per_stream = total // streams

    def send(conn: socket.socket) -> None:
        conn.sendall(per_stream.to_bytes(8, "little"))
        left = per_stream
        while left:
            n = min(left, message)
            conn.sendall(payload[:n])
            left -= n
        conn.recv(1)

    rates = []
    try:
        for _ in range(repeats + 1):
            started = time.perf_counter()
            workers = [threading.Thread(target=send, args=(c,)) for c in conns]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            rates.append(per_stream * streams / (time.perf_counter() - started) / 1e9)
    finally:
        for c in conns:
            c.close()
        process.kill()
    return statistics.median(rates[1:])


def tcp_asyncio_gbps(total: int, repeats: int) -> float:
    """bench.transfer's raw TCP x1: one asyncio connection, 1 MiB writes, read and dropped by an asyncio
    sink in another process."""
    from bench.transfer import raw_tcp_seconds

    process, port = _start(_asyncio_sink)

    async def timed() -> list[float]:
        return [await raw_tcp_seconds(port, total) for _ in range(repeats + 1)][1:]

    try:
        return total / statistics.median(asyncio.run(timed())) / 1e9
    finally:
        process.kill()


def _asyncio_sink(ports: mp.Queue) -> None:
    from bench.transfer import tcp_sink

    async def main() -> None:
        server = await asyncio.start_server(tcp_sink, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--total-mib", type=int, default=1024)
    parser.add_argument("--message-mib", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"HTTP/2 settings to try, of {list(SETTINGS)}")
    parser.add_argument("--out", default="bench/out/grpc_ceiling.json")
    args = parser.parse_args(argv)
    tune_malloc()
    total, message = args.total_mib << 20, args.message_mib << 20
    rows = []
    tls = tempfile.mkdtemp(prefix="pdserve-ceiling-certs-")
    make_certificates(tls)

    def add(path: str, streams: int, gbps: float) -> None:
        rows.append({"path": path, "streams": streams, "GB/s": gbps})
        print(f"{path:58s} x{streams}: {gbps:6.2f} GB/s", flush=True)

    add("raw TCP, asyncio (bench.transfer's ceiling)", 1, tcp_asyncio_gbps(total, args.repeats))
    for streams in (int(s) for s in args.streams.split(",")):
        add("raw TCP, blocking sockets in threads", streams, tcp_threads_gbps(streams, total, message, args.repeats))
        for name in args.settings.split(","):
            for per_stream in (False, True):
                if per_stream and streams == 1:
                    continue
                path = f"gRPC {name}, {'a receiver per stream' if per_stream else 'one receiver'}"
                add(path, streams, grpc_gbps(streams, SETTINGS[name], per_stream, total, message, args.repeats))
        add("gRPC default, one synchronous receiver (threads)", streams,
            grpc_gbps(streams, [], False, total, message, args.repeats, _grpc_sync_sink))
        # The designs that would take the streams out of one process: which side's process caps them, and TLS.
        for label, certs in (("default", ""), ("mTLS", tls)):
            for senders, receivers in ((False, False), (True, False), (True, True)):
                if streams == 1 and (senders or receivers) or (not certs and not senders):
                    continue  # one stream: one of each; plaintext with one sender: measured above
                path = (f"gRPC {label}, {'a sender per stream' if senders else 'one sender'}, "
                        f"{'a receiver per stream' if receivers else 'one receiver'}")
                add(path, streams, grpc_gbps(streams, [], receivers, total, message, args.repeats, certs=certs,
                                             per_stream_sender=senders))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "grpc": grpc.__version__,
                               "message_bytes": message, "total_bytes": total, "rows": rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
