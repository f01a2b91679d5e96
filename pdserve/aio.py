"""Small asyncio helpers shared by the engines and services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import AsyncIterator, Awaitable, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancels ``task`` (if any) and waits until it has finished unwinding."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def cancel_quietly(task: asyncio.Future | None) -> None:
    """Cancels ``task`` (if any, and still running) and waits until it ended, whatever its outcome: an error it
    ended with is marked seen, not raised (for a caller already handling a failure of its own)."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled():
        task.exception()


async def unless_failed(main: Awaitable[T], guard: asyncio.Future) -> T:
    """``await main``, with ``guard`` running beside it: should ``guard`` fail (or be cancelled) before
    ``main`` finished, ``main`` is cancelled and ``guard``'s error raised. A ``guard`` that succeeds, or is
    still running when ``main`` finishes, is left as it is; ``main`` never outlives this call."""
    task = asyncio.ensure_future(main)
    try:
        await asyncio.wait((task, guard), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and guard.done() and (guard.cancelled() or guard.exception() is not None):
            await cancel_quietly(task)
            guard.result()  # raises its error
        return await task
    finally:
        if not task.done():  # this call was cancelled
            await cancel_quietly(task)


@contextlib.asynccontextmanager
async def shutdown_signals(on_repeat: Callable[[signal.Signals], None] | None = None) -> AsyncIterator[asyncio.Event]:
    """An event set by the first SIGINT or SIGTERM while the context lasts. Later ones go to ``on_repeat``
    (default: logged and ignored), never to the default action that would end the process mid-drain: a
    terminal's Ctrl-C reaches every process of its group, and a launcher may send SIGTERM after it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def handle(sig: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()
        elif on_repeat is not None:
            on_repeat(sig)
        else:
            log.info("%s ignored: already stopping", sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class ByteBudget:
    """Bytes held at once stay within ``limit``; a single holder larger than the limit may hold it alone.

    Non-blocking: ``take`` succeeds or not, and whoever waits for room learns of it from ``on_release``
    (the prefill engine re-plans), so the waiting order is the waiter's policy, not this counter's.
    """

    def __init__(self, limit: int, on_release: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._on_release = on_release

    def fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def take(self, n: int) -> bool:
        if not self.fits(n):
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def release(self, n: int) -> None:
        self.used -= n
        self._on_release()
