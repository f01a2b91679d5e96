"""Admission of requests into the KV pool and the running batch: fair, bounded and honest.

A request asks for every block it can ever need (prompt + max_tokens) before
its prefill starts, and it will hold them for at most ``steps`` decode steps
once it runs (one token a step). Admission grants blocks in arrival order, with
*backfilling* (EASY, as batch schedulers do): when the request at the head of
the queue does not fit, the step by which enough blocks will be free for it is
computed from the granted requests' ends (its *shadow*), and a later request
that fits now is granted too if it ends before the shadow or uses only blocks
the head will not need then. So small requests are never stuck behind a big
one, and the big one is never delayed by them: it is granted no later than if
nobody had passed it.

Honest refusals: a request is refused at once with ``ResourceExhausted`` when
the queue is full (``max_queued``), or when the wait for blocks and a batch
slot is what would make it finish after its deadline (its ``steps`` at the
recent step time fit the deadline, the wait plus them do not). The refusal's
retry hint is the estimated wait before it could start.

Times are in decode steps (``clock()``: steps taken so far) and converted to
milliseconds with ``step_ms(rows)`` at the batch the request will run in (the
running batch and every request granted or queued, up to ``max_batch``);
estimates assume every granted request runs
to its ``steps`` (an upper bound: requests may stop early).

Pure logic over a ``BlockAllocator``; no tensors, no model.
"""

from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass, field
from typing import Callable

from pdserve.engine.kv_pool import BlockAllocator
from pdserve.errors import InvalidArgument, ResourceExhausted

MIN_HINT_MS = 10
# Estimates are taken this much larger when deciding whether a request would miss its deadline: the step
# time they use trails the batch growing behind it.
DEADLINE_MARGIN = 1.2


@dataclass(eq=False)
class Ticket:
    blocks_total: int  # its block table's length: every block it can need
    steps: int = 1  # decode steps it runs for at most, once running
    blocks: list[int] = field(default_factory=list)  # once granted: its block table
    keys: list[int] = field(default_factory=list)  # its prompt's reusable prefix keys (prefix cache)
    blocks_needed: int = 0  # blocks it takes from the free ones (less a cached prefix it shares), as last seen
    cached_blocks: int = 0  # once granted: its table's first blocks hold a cached prefix (shared or copied)

    def __post_init__(self) -> None:
        self.blocks_needed = self.blocks_total
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: int | None = None  # the step it joined the batch (None: not running yet)
    order: int = 0  # arrival number: granted requests take batch slots in this order

    def end(self, now: int) -> int:
        """The step by which it will have released its blocks at the latest."""
        return (self.started if self.started is not None else now) + self.steps


class Admission:
    def __init__(self, allocator: BlockAllocator, max_queued: int, max_batch: int = 1 << 30,
                 clock: Callable[[], int] = lambda: 0, step_ms: Callable[[int], float] = lambda rows: 0.0,
                 copy_blocks: Callable[[list[int], list[int]], None] | None = None) -> None:
        """``clock()``: decode steps taken so far; ``step_ms(rows)``: time per step of a batch of ``rows``
        requests, by the recent steps (0: unknown yet, so
        no refusal by estimate). ``copy_blocks(src, dst)``: where requests cannot read cached blocks in place,
        a cached block is in one request's table at a time: a granted request takes an idle one as it is and
        copies one another request holds into a block of its own."""
        self._allocator = allocator
        self._copy_blocks = copy_blocks
        self.max_queued = max_queued
        self.max_batch = max_batch
        self._clock = clock
        self._step_ms = step_ms
        self._queue: list[Ticket] = []
        self._granted: set[Ticket] = set()
        self._arrivals = 0
        self.refused = 0
        self.backfilled = 0  # granted ahead of a request that did not fit

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def queued_blocks(self) -> int:
        return sum(t.blocks_needed for t in self._queue)

    def request(self, blocks_needed: int, steps: int = 1, deadline_s: float | None = None,
                keys: list[int] = ()) -> Ticket:
        """A ticket whose ``granted`` future resolves once its blocks are allocated. ``keys``: the prefix keys
        of its prompt's reusable blocks: when it is granted, the blocks of their longest cached prefix head
        its table, shared rather than allocated (with ``copy_blocks``: taken while idle, else copied). Nothing is held while it
        waits: a queued request pinning cached blocks could starve the one ahead of it. Raises
        ``InvalidArgument`` for a request that can never fit and ``ResourceExhausted`` (with a retry hint)
        when it cannot be served in time: the queue is full, or it would finish after ``deadline_s``."""
        capacity = self._allocator.capacity
        if blocks_needed > capacity:
            raise InvalidArgument(f"the request needs {blocks_needed} KV blocks; this instance's pool has {capacity} in all")
        self._arrivals += 1
        ticket = Ticket(blocks_needed, max(1, steps), order=self._arrivals, keys=list(keys))
        self._queue.append(ticket)
        self._admit()
        if not ticket.blocks and len(self._queue) > self.max_queued:
            self._refuse(ticket, f"{len(self._queue) - 1} requests already queued (max_queued {self.max_queued})")
        step_ms = self._batch_step_ms()
        if deadline_s is not None and step_ms > 0:
            wait_ms = (self.estimated_start(ticket) - self._clock()) * step_ms
            run_ms = ticket.steps * step_ms
            # Refused when the wait is what makes it miss its deadline (a request too long for its own
            # deadline is its client's choice: admitted, it streams what it can).
            if run_ms <= deadline_s * 1e3 < (wait_ms + run_ms) * DEADLINE_MARGIN:
                self._refuse(ticket, f"it would finish in about {(wait_ms + run_ms) / 1e3:.1f} s ({wait_ms / 1e3:.1f} "
                                     f"s waiting + {ticket.steps} steps of {step_ms:.0f} ms), after its deadline "
                                     f"({deadline_s:.1f} s)")
        return ticket

    def _batch_step_ms(self) -> float:
        """A step's time in the batch a request admitted now runs in: the running batch and every request
        granted or queued (an upper bound), up to max_batch."""
        return self._step_ms(min(self.max_batch, len(self._granted) + len(self._queue)))

    def _refuse(self, ticket: Ticket, why: str) -> None:
        hint = self.retry_hint_ms(ticket)
        if ticket.blocks:
            self.release(ticket)
        else:
            self._queue.remove(ticket)
        self.refused += 1
        free, capacity = self._allocator.num_free, self._allocator.capacity
        raise ResourceExhausted(f"decode busy: {free} of {capacity} KV blocks free, {len(self._granted)} requests "
                                f"admitted; {why}; retry after about {hint} ms", hint)

    def retry_hint_ms(self, ticket: Ticket) -> int:
        """About how long until ``ticket`` could start (its blocks and a batch slot free)."""
        step_ms = self._batch_step_ms() or 50.0
        return max(MIN_HINT_MS, int((self.estimated_start(ticket) - self._clock()) * step_ms))

    def finish_ms(self, ticket: Ticket) -> float:
        """About how long until ``ticket`` is done: its wait to start and its steps, at the recent step time
        (0: unknown yet)."""
        step_ms = self._batch_step_ms()
        return (self.estimated_start(ticket) - self._clock() + ticket.steps) * step_ms if step_ms else 0.0

    def started(self, ticket: Ticket) -> None:
        """The ticket's request joined the running batch (its ``steps`` count from now)."""
        ticket.started = self._clock()

    def cancel(self, ticket: Ticket) -> None:
        """The request left: drop it from the queue, or give its blocks back."""
        if ticket in self._queue:
            self._queue.remove(ticket)
            ticket.granted.cancel()
            self._admit()  # a large ticket leaving may unblock smaller ones
        elif ticket.blocks:
            self.release(ticket)

    def release(self, ticket: Ticket) -> None:
        """Frees a granted ticket's blocks and admits queued requests that now fit."""
        blocks, ticket.blocks = ticket.blocks, []
        self._granted.discard(ticket)
        self._allocator.free(blocks)
        self._admit()

    def _cost(self, ticket: Ticket) -> tuple[list[int], int]:
        """The cached prefix blocks it would get now, and the blocks granting it would take from the free
        ones: those it allocates, and the cached ones it would hold that nobody holds (idle blocks count as
        free until held). With ``copy_blocks`` that is its whole table: an idle cached block becomes one of
        its own, a held one is copied into a block it allocates."""
        found = self._allocator.match(ticket.keys) if ticket.keys else []
        if self._copy_blocks is None:
            ticket.blocks_needed = ticket.blocks_total - len(found)
            return found, ticket.blocks_needed + sum(self._allocator.idle(found))
        ticket.blocks_needed = ticket.blocks_total
        return found, ticket.blocks_total

    def _grant(self, ticket: Ticket, found: list[int]) -> None:
        idle = self._allocator.idle(found)
        self._allocator.share(found)  # held now: nothing below evicts them
        ticket.cached_blocks = len(found)
        if self._copy_blocks is None:
            ticket.blocks = found + self._allocator.allocate(ticket.blocks_needed)
        else:
            # A block may be in one request's table only: an idle cached block it takes as it is (it stays
            # cached; nobody else can take it while it holds it), a block another request holds it copies.
            fresh = iter(self._allocator.allocate(ticket.blocks_total - sum(idle)))
            table, src, dst = [], [], []
            for block, alone in zip(found, idle):
                if alone:
                    table.append(block)
                else:
                    table.append(next(fresh))
                    src.append(block)
                    dst.append(table[-1])
            table.extend(fresh)
            if src:
                self._copy_blocks(src, dst)
                self._allocator.free(src)
            ticket.blocks = table
        self._granted.add(ticket)
        if not ticket.granted.done():
            ticket.granted.set_result(None)

    def _ends(self) -> list[tuple[int, int]]:
        """(end step, blocks) of every granted ticket, soonest first."""
        now = self._clock()
        return sorted((t.end(now), t.blocks_needed) for t in self._granted)

    def _shadow(self, need: int) -> tuple[int, int]:
        """The step by which ``need`` blocks will be free, and the blocks free beyond ``need`` then."""
        free = self._allocator.num_free
        step = self._clock()
        for end, blocks in self._ends():
            if free >= need:
                break
            step, free = end, free + blocks
        return step, free - need

    def _admit(self) -> None:
        """Grants in arrival order; past the first request that does not fit (the head), grants only what
        cannot delay the head (EASY backfilling)."""
        now = self._clock()
        queue, self._queue = self._queue, []
        head_step = extra = None
        for ticket in queue:
            if ticket.granted.done():
                continue  # cancelled meanwhile
            found, need = self._cost(ticket)  # a request that finished meanwhile may have cached its prefix
            if head_step is None:
                if self._allocator.can_allocate(need):
                    self._grant(ticket, found)
                    continue
                head_step, extra = self._shadow(need)
            elif self._allocator.can_allocate(need) and (now + ticket.steps <= head_step or need <= extra):
                if now + ticket.steps > head_step:
                    extra -= need  # still holding them when the head's turn comes
                self._grant(ticket, found)
                self.backfilled += 1
                continue
            self._queue.append(ticket)

    def estimated_start(self, ticket: Ticket) -> int:
        """The step by which ``ticket`` should start running: when its blocks are free (granted: now; queued:
        when the blocks of every request queued ahead and its own are, ignoring that those ahead release
        theirs too) and a batch slot is (running requests hold theirs to their end; granted and queued
        requests ahead of it take the next free slot in turn and hold it for their steps)."""
        now = self._clock()
        if ticket.blocks:
            blocks_step, ahead = now, []
        else:
            ahead = self._queue[:self._queue.index(ticket)] if ticket in self._queue else list(self._queue)
            blocks_step, surplus = self._shadow(sum(t.blocks_needed for t in ahead) + ticket.blocks_needed)
            if surplus < 0:  # the granted requests' blocks are not enough: those ahead must end too
                blocks_step += max(t.steps for t in ahead)
        running = [t for t in self._granted if t.started is not None]
        waiting = sorted((t for t in self._granted if t.started is None and t.order < ticket.order),
                         key=lambda t: t.order)
        slots = [now] * min(self.max_batch, len(running) + len(waiting) + len(ahead) + 1)
        for t in running:
            heapq.heapreplace(slots, t.started + t.steps)
        for t in [*waiting, *ahead]:
            heapq.heapreplace(slots, slots[0] + t.steps)
        return max(blocks_step, slots[0])
