"""A receiver whose pool writes run on a thread of their own (a GPU decode's ``PoolWriter``) checks the
chunks' checksums there, and a transfer still completes only once every chunk passed."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pdserve.errors import DataLoss
from pdserve.kv.assembly import KVAssembly
from pdserve.kv.receiver import receive_stream
from pdserve.kv.wire import KVLayout, StreamInfo, checksum, encode_chunk
from pdserve.v1 import decode_pb2

LAYERS, TOKENS, HEADS, DIM = 3, 4, 2, 8
LAYOUT = KVLayout("t", LAYERS, TOKENS, HEADS, DIM, "float32")


def messages(corrupt_layer: int | None = None) -> list[bytes]:
    out = []
    for layer in range(LAYERS):
        k = torch.full((TOKENS, HEADS, DIM), float(layer)).numpy().tobytes()
        v = torch.full((TOKENS, HEADS, DIM), -float(layer)).numpy().tobytes()
        sum_ = checksum(k, v)
        if layer == corrupt_layer:
            v = b"\1" + v[1:]  # one byte flipped after the checksum was taken
        out.append(encode_chunk(layer, 0, TOKENS, k, v, sum_))
    out.append(decode_pb2.KVMessage(trailer=decode_pb2.KVTrailer(first_token_id=5)).SerializeToString())
    return out


class ThreadWriter:
    """Writes (and checks) on one thread, only once the stream was read up to its trailer: every chunk is
    queued before the first check runs."""

    def __init__(self) -> None:
        self.thread = ThreadPoolExecutor(max_workers=1)
        self.gate = threading.Event()
        self.written: list[int] = []
        self.checked_on: set[str] = set()
        self.events: list[str] = []

    def write(self, layer, start, k, v, check) -> None:
        def run() -> None:
            assert self.gate.wait(10)
            self.checked_on.add(threading.current_thread().name)
            if check():
                self.written.append(layer)
                assert torch.equal(k, torch.full_like(k, float(layer)))
            self.events.append(f"checked {layer}")

        self.thread.submit(run)

    async def issued(self) -> None:
        await asyncio.wrap_future(self.thread.submit(lambda: None))


async def receive(data: list[bytes], writer: ThreadWriter) -> int:
    async def stream():
        for m in data:
            if m is data[-1]:
                writer.gate.set()  # every chunk before it was handed to the assembly
            yield m

    assembly = KVAssembly(LAYOUT, writer.write, StreamInfo(checksums=True), checks_on_write=True)
    return await receive_stream(stream(), assembly, StreamInfo(checksums=True),
                                on_trailer=lambda token: writer.events.append(f"trailer {token}"),
                                writes_issued=writer.issued)


async def test_checks_run_on_the_writer_thread_and_the_trailer_waits_for_them():
    writer = ThreadWriter()
    received = await receive(messages(), writer)
    assert received == 2 * LAYERS * TOKENS * HEADS * DIM * 4
    assert writer.written == [0, 1, 2]
    assert writer.events == ["checked 0", "checked 1", "checked 2", "trailer 5"]
    assert writer.checked_on and threading.main_thread().name not in writer.checked_on


async def test_a_corrupt_chunk_found_on_the_writer_thread_fails_the_stream_before_its_trailer():
    writer = ThreadWriter()
    with pytest.raises(DataLoss, match=r"checksum mismatch in layer 1 tokens \[0, 4\)"):
        await receive(messages(corrupt_layer=1), writer)
    assert writer.written == [0, 2]  # the corrupt chunk is never written
    assert not any(e.startswith("trailer") for e in writer.events)  # the transfer never completed


def test_a_cuda_ipc_note_covers_a_range_of_layers_and_no_more():
    from pdserve.errors import InvalidArgument
    from pdserve.kv.wire import KVChunkData

    ipc = StreamInfo(checksums=False, cuda_ipc=True)
    assembly = KVAssembly(LAYOUT, lambda *a: pytest.fail("a CUDA IPC transfer writes nothing here"), ipc)
    assembly.add(KVChunkData(0, 0, TOKENS, b"", b"", layer_count=2))  # layers 0 and 1
    assembly.add(KVChunkData(2, 0, TOKENS, b"", b""))
    assembly.finish(first_token=5, vocab_size=10)  # every layer holds every token
    assert all(assembly.layer_received_ns)

    assembly = KVAssembly(LAYOUT, lambda *a: None, ipc)
    with pytest.raises(InvalidArgument, match=r"layers \[2, 4\) outside \[0, 3\)"):
        assembly.add(KVChunkData(2, 0, TOKENS, b"", b"", layer_count=2))
    assembly.add(KVChunkData(0, 0, TOKENS, b"", b"", layer_count=3))
    with pytest.raises(InvalidArgument, match="duplicate data for layer 1"):
        assembly.add(KVChunkData(1, 0, TOKENS, b"", b"", layer_count=2))
