"""Received KV into a GPU pool without the event loop waiting on a copy, and without queueing behind steps.

A transfer's chunks arrive on the event loop as host bytes (gRPC messages, a shared-memory segment). On a
GPU, ``PoolWriter`` copies them into the pool on a thread and a CUDA stream of its own: the loop only
queues the write, and the copies run beside the decode steps instead of after them on the compute stream.

One FIFO orders everything that touches a transfer's blocks: its writes, then ``after_writes`` (an event
recorded on the write stream once every write queued before it was issued). A request joins the batch
with that event, and the step's stream waits on it (on the device, not the host), so it never reads KV
still being copied; a transfer's blocks are handed back to the pool only through it too, with the compute
stream waiting on the event first, so no late copy lands in blocks another request owns.

The chunks' checksums are verified on that thread too, just before each write (xxh3 releases the GIL).

On a CPU there is nothing to overlap: the pool writes in place, on the loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from pdserve.engine.kv_pool import KVPool


class PoolWriter:
    def __init__(self, pool: KVPool) -> None:
        self._pool = pool
        self._stream = torch.cuda.Stream(pool.device)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-pool-writer")

    def write(self, table: list[int], layer: int, start: int, keys: torch.Tensor, values: torch.Tensor,
              check: Callable[[], bool] | None = None) -> None:
        """Queues the write of (T, H, D) host K/V of tokens [start, start + T); the source may be reused once
        the write was issued (a pageable source is staged by the driver as the copy is issued). ``check``
        (the chunk's checksum, ``KVAssembly``'s ``checks_on_write``) runs first, here, off the event loop: the
        write happens only if it returns True."""
        self._thread.submit(self._write, table, layer, start, keys, values, check)

    def _write(self, table, layer, start, keys, values, check) -> None:
        if check is not None and not check():
            return
        with torch.cuda.stream(self._stream):
            self._pool.write(table, layer, start, keys, values)

    def after_writes(self, loop: asyncio.AbstractEventLoop, then: Callable[[torch.cuda.Event], None]) -> None:
        """``then(event)`` on ``loop`` once every write queued so far was issued; ``event`` completes when they
        have run on the device."""
        def record() -> None:
            event = torch.cuda.Event()
            event.record(self._stream)
            loop.call_soon_threadsafe(then, event)

        self._thread.submit(record)

    async def issued(self) -> None:
        """Returns once every write queued so far was issued (their sources are no longer read)."""
        await asyncio.wrap_future(self._thread.submit(lambda: None))

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=False)
