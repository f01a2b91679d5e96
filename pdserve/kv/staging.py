"""KV out of a GPU forward pass without stalling it: copies on a stream of their own, off the event loop.

A layer's K/V exist on the device as soon as the kernels that compute them have run, which is long
before the host learns of it: the prefill worker thread queues the whole forward pass ahead of the GPU.
A device-to-host copy issued on the compute stream would wait for everything queued before it, and a
host that waits for it stalls the pass. So ``DeviceCopies.submit``, called on the worker thread as each
layer is queued: records an event on the compute stream; makes the copy stream wait for it (the GPU, not
the host); queues the copies there (into pinned host staging, a shared-memory segment, or another
process's KV pool); records a second event; and a waiter thread, blocked on that event (sleeping, not
spinning), tells the event loop when the bytes are in place. Copies run while later layers compute.

The source tensors are marked as used by the copy stream (``record_stream``), so the caching allocator
does not hand their memory to the next pass before the copies read it.

``encode``: the thread pool that encodes and checksums messages off the event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import torch


class DeviceCopies:
    """One per process and device: the copy stream, its waiter thread, and the encoders."""

    def __init__(self, device: torch.device, encoders: int = 2) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.encode = ThreadPoolExecutor(max_workers=encoders, thread_name_prefix="kv-encode")
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._waiter = threading.Thread(target=self._wait, name="kv-copies", daemon=True)
        self._waiter.start()

    def submit(self, work: Callable[[], Iterable[torch.Tensor]], loop: asyncio.AbstractEventLoop,
               done: Callable[[], None]) -> None:
        """On any thread: after the work queued so far on the current stream, runs ``work()`` (which queues
        copies and returns the tensors they read) on the copy stream; ``done()`` runs on ``loop`` once
        those copies completed."""
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for source in work():
                source.record_stream(self.stream)
            finished = torch.cuda.Event(blocking=True)
            finished.record(self.stream)
        self._pending.put((finished, loop, done))

    def _wait(self) -> None:
        while (item := self._pending.get()) is not None:
            finished, loop, done = item
            finished.synchronize()  # releases the GIL; a blocking event sleeps instead of spinning
            try:
                loop.call_soon_threadsafe(done)
            except RuntimeError:  # the loop closed meanwhile (the service stopped): nobody to tell
                pass

    def synchronize(self) -> None:
        """Blocks until every copy queued so far completed (call off the event loop)."""
        self.stream.synchronize()

    def close(self) -> None:
        self._pending.put(None)
        self._waiter.join(timeout=5)
        self.encode.shutdown(wait=False, cancel_futures=True)
