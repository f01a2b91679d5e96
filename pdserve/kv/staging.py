"""KV out of a GPU forward pass without stalling it: copies on a stream of their own, off the event loop.

A layer's K/V exist on the device as soon as the kernels that compute them have run, which is long
before the host learns of it: the prefill worker thread queues the whole forward pass ahead of the GPU.
A device-to-host copy issued on the compute stream would wait for everything queued before it, and a
host that waits for it stalls the pass. So ``DeviceCopies.submit``, called on the worker thread as each
layer is queued: records an event on the compute stream; makes the copy stream wait for it (the GPU, not
the host); queues the copies there (into pinned host staging, a shared-memory segment, or another
process's KV pool); records a second event; and a waiter thread, blocked on that event (sleeping, not
spinning), tells the event loop when the bytes are in place. Copies run while later layers compute.

The source tensors stay referenced until their copies finished, so the caching allocator does not hand
their memory to the next pass before the copies read it. The copy stream has a high priority: its
kernels (a scatter into a pool) run between the forward pass's, not after all of them (CUDA events
around each copy, ``bench.copy_timeline``: each ran within 1 ms of its layer at either priority).

The waiter learns of a copy as it completes only if no other thread of the process waits for the
device inside a blocking copy: with the prefill worker reading its first token by ``.tolist()`` as a pass
ended, copies finished mid-pass were reported only at its end (from session 7 to 16, the "late"
CUDA IPC scatters and gRPC senders idle through the second half of the pass). The engines move small
tensors through ``pdserve.engine.device_io``, which waits on events instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import threading
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)


class DeviceCopies:
    """One per process and device: the copy stream and its waiter thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # High priority: a copy's kernels get the SMs as soon as the forward pass's current ones end,
        # instead of queueing behind the whole pass (its GEMMs leave no room otherwise).
        self.stream = torch.cuda.Stream(device, priority=-1)
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self.failed: BaseException | None = None  # a CUDA error a copy ran into (the process is stopping)
        self._waiter = threading.Thread(target=self._wait, name="kv-copies", daemon=True)
        self._waiter.start()

    def mark(self) -> torch.cuda.Event:
        """An event recorded on the current stream: what ``submit(..., after=)`` makes later copies wait for."""
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return ready

    def submit(self, work: Callable[[], Iterable[torch.Tensor]], loop: asyncio.AbstractEventLoop | None,
               done: Callable[[], None], after: torch.cuda.Event | None = None) -> None:
        """On any thread: after the work queued so far on the current stream (or, ``after``, an earlier
        ``mark()``: a stage deferred until its transfer opened still waits only for the layer it was
        marked behind), runs ``work()`` (which queues copies and returns the tensors they read) on the
        copy stream; ``done()`` runs on ``loop`` once those copies completed (``loop`` None: on the waiter
        thread, for a ``done`` that is thread-safe and quick: waking the loop for every layer takes the GIL
        from the thread launching the forward pass)."""
        ready = after if after is not None else self.mark()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            sources = work()
            finished = torch.cuda.Event(blocking=True)
            finished.record(self.stream)
        # The sources stay referenced until the copies finished (cheaper than record_stream on each):
        # the allocator cannot hand their memory out meanwhile.
        self._pending.put((finished, loop, done, sources))

    def _wait(self) -> None:
        while (item := self._pending.get()) is not None:
            finished, loop, done, _sources = item
            try:
                finished.synchronize()  # releases the GIL; a blocking event sleeps instead of spinning
            except RuntimeError as exc:
                # A CUDA error is sticky: this process's GPU work can no longer be trusted. Stop it (its
                # calls fail, the gateway retries elsewhere, an orchestrator restarts it) rather than serve
                # on, and fail the copies waited for instead of leaving their transfers hanging.
                log.critical("KV copies failed on %s (%s): stopping this process", self.device, exc)
                self.failed = exc
                os.kill(os.getpid(), signal.SIGTERM)
            if loop is None:
                try:
                    done()
                except Exception:  # noqa: BLE001 - one caller's bug must not stop every later copy's notice
                    log.exception("KV copies: a completion callback failed")
            else:
                try:
                    loop.call_soon_threadsafe(done)
                except RuntimeError:  # the loop closed meanwhile (the service stopped): nobody to tell
                    pass
            # Not held until the next copy lands: ``done`` reaches the transfer's pinned staging (the next
            # transfer would pin a buffer of its own, ~0.3 s a GiB) and ``_sources`` the layer's K/V.
            item = finished = loop = done = _sources = None

    def synchronize(self) -> None:
        """Blocks until every copy queued so far completed (call off the event loop)."""
        self.stream.synchronize()

    def close(self) -> None:
        self._pending.put(None)
        self._waiter.join(timeout=5)
