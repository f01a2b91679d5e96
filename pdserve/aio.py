"""Small asyncio helpers shared by the engines and services."""

from __future__ import annotations

import asyncio
import collections
import contextlib


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancels ``task`` (if any) and waits until it has finished unwinding."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class ByteBudget:
    """Bytes held at once stay within ``limit``; a single holder larger than the limit runs alone.

    ``acquire`` waits (FIFO) until the bytes fit, so a slow consumer downstream
    makes producers wait instead of piling up memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    async def acquire(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self._take(n)
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as we were cancelled
            else:
                self._waiters.remove((n, fut))
            raise

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        self.used -= n
        while self._waiters and self._fits(self._waiters[0][0]):
            n, fut = self._waiters.popleft()
            self._take(n)
            fut.set_result(None)
