"""Received KV into a GPU pool without the event loop waiting on a copy, and without queueing behind steps.

A transfer's chunks arrive on the event loop as host bytes (gRPC messages, a shared-memory segment). On a
GPU, ``PoolWriter`` copies them into the pool on a thread and a CUDA stream of its own: the loop only
queues the write, and the copies run beside the decode steps instead of after them on the compute stream.

Writes go to ``lanes`` threads in turn, each a FIFO with a CUDA stream of its own (chunks of one transfer
fill distinct slots: their order does not matter). ``after_writes`` gives an event that completes once
every write queued before it has run, on every lane (each lane records one when it reaches that point; the
last joins them on a stream of its own). A request joins the batch with that event, and the step's
stream waits on it (on the device, not the host), so it never reads KV still being copied; a transfer's
blocks are handed back to the pool only through it too, with the compute stream waiting on the event
first, so no late copy lands in blocks another request owns.

The chunks' checksums are verified on the lanes too, just before each write (xxh3 releases the GIL, and
so does a host-to-device copy: several lanes check and copy in parallel).

On a CPU there is nothing to overlap: the pool writes in place, on the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from pdserve.config import KV_WRITE_LANES
from pdserve.engine.kv_pool import KVPool


class PoolWriter:
    def __init__(self, pool: KVPool, lanes: int = KV_WRITE_LANES) -> None:
        if lanes < 1:
            raise ValueError(f"lanes: {lanes} must be at least 1")
        self._pool = pool
        self._lanes = [(torch.cuda.Stream(pool.device), ThreadPoolExecutor(1, thread_name_prefix=f"kv-pool-writer-{i}"))
                       for i in range(lanes)]
        self._joins = torch.cuda.Stream(pool.device)  # where after_writes joins several lanes' events
        self._turn = itertools.count()

    def write(self, table: list[int], layer: int, start: int, keys: torch.Tensor, values: torch.Tensor,
              check: Callable[[], bool] | None = None) -> None:
        """Queues the write of (T, H, D) host K/V of tokens [start, start + T); the source may be reused once
        the write was issued (a pageable source is staged by the driver as the copy is issued). ``check``
        (the chunk's checksum, ``KVAssembly``'s ``checks_on_write``) runs first, on the lane, off the event
        loop: the write happens only if it returns True."""
        stream, thread = self._lanes[next(self._turn) % len(self._lanes)]
        thread.submit(self._write, stream, table, layer, start, keys, values, check)

    def _write(self, stream, table, layer, start, keys, values, check) -> None:
        if check is not None and not check():
            return
        with torch.cuda.stream(stream):
            self._pool.write(table, layer, start, keys, values)

    def after_writes(self, loop: asyncio.AbstractEventLoop, then: Callable[[torch.cuda.Event], None]) -> None:
        """``then(event)`` on ``loop`` once every write queued so far was issued; ``event`` completes when they
        have run on the device."""
        recorded: list[torch.cuda.Event] = []
        lock = threading.Lock()

        def record(stream: torch.cuda.Stream) -> None:
            event = torch.cuda.Event()
            event.record(stream)
            with lock:
                recorded.append(event)
                if len(recorded) < len(self._lanes):
                    return
            if len(recorded) > 1:  # the last lane there: one event after all of them
                for e in recorded:
                    self._joins.wait_event(e)
                event = torch.cuda.Event()
                event.record(self._joins)
            loop.call_soon_threadsafe(then, event)

        for stream, thread in self._lanes:
            thread.submit(record, stream)

    async def issued(self) -> None:
        """Returns once every write queued so far was issued (their sources are no longer read)."""
        await asyncio.gather(*(asyncio.wrap_future(thread.submit(lambda: None)) for _, thread in self._lanes))

    def close(self) -> None:
        for _, thread in self._lanes:
            thread.shutdown(wait=True, cancel_futures=False)
