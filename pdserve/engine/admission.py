"""Admission of requests into the KV pool: first come, first served, with a bounded queue.

A request asks for all the blocks it can ever need (prompt + max_tokens)
before its prefill starts. If the pool has them and nobody is queued ahead,
they are granted at once; otherwise the request waits in a FIFO queue of at
most ``max_queued``; beyond that it is refused with ``ResourceExhausted``
carrying a retry hint. Freed blocks go to the head of the queue first, so a
large request is never starved by smaller ones behind it.

Pure logic over a ``BlockAllocator``; no tensors, no model.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Callable

from pdserve.engine.kv_pool import BlockAllocator
from pdserve.errors import InvalidArgument, ResourceExhausted


@dataclass(eq=False)
class Ticket:
    blocks_needed: int
    blocks: list[int] = field(default_factory=list)
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission:
    def __init__(self, allocator: BlockAllocator, max_queued: int,
                 retry_hint_ms: Callable[[int], int] | None = None) -> None:
        """``retry_hint_ms(shortfall)``: how long until ``shortfall`` more blocks are likely free."""
        self._allocator = allocator
        self.max_queued = max_queued
        self._retry_hint_ms = retry_hint_ms or (lambda shortfall: 1000)
        self._queue: collections.deque[Ticket] = collections.deque()
        self.refused = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def queued_blocks(self) -> int:
        return sum(t.blocks_needed for t in self._queue)

    def request(self, blocks_needed: int) -> Ticket:
        """A ticket whose ``granted`` future resolves once its blocks are allocated; raises when it cannot wait."""
        capacity = self._allocator.capacity
        if blocks_needed > capacity:
            raise InvalidArgument(f"the request needs {blocks_needed} KV blocks; this instance's pool has {capacity} in all")
        ticket = Ticket(blocks_needed)
        if not self._queue and self._allocator.can_allocate(blocks_needed):
            self._grant(ticket)
            return ticket
        if len(self._queue) >= self.max_queued:
            self.refused += 1
            shortfall = self.queued_blocks + blocks_needed - self._allocator.num_free
            hint = self._retry_hint_ms(shortfall)
            raise ResourceExhausted(
                f"decode KV pool full: {self._allocator.num_free} of {capacity} blocks free, {len(self._queue)} "
                f"requests already queued (max_queued {self.max_queued}); retry after about {hint} ms", hint)
        self._queue.append(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The request left: drop it from the queue, or give its blocks back."""
        if ticket in self._queue:
            self._queue.remove(ticket)
            ticket.granted.cancel()
            self._admit()  # a large ticket leaving the head may unblock smaller ones
        elif ticket.blocks:
            self.release(ticket)

    def release(self, ticket: Ticket) -> None:
        """Frees a granted ticket's blocks and admits queued requests that now fit."""
        blocks, ticket.blocks = ticket.blocks, []
        self._allocator.free(blocks)
        self._admit()

    def _grant(self, ticket: Ticket) -> None:
        ticket.blocks = self._allocator.allocate(ticket.blocks_needed)
        if not ticket.granted.done():
            ticket.granted.set_result(None)

    def _admit(self) -> None:
        while self._queue and self._allocator.can_allocate(self._queue[0].blocks_needed):
            self._grant(self._queue.popleft())
