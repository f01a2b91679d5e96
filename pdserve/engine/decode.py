"""Decode engine: continuous batching over requests whose KV lives in a paged pool.

A request's life here: ``reserve`` asks admission for every KV block it can
ever need (prompt + max_tokens; waiting in a bounded queue when the pool is
full), its prompt KV is written straight into those blocks (by a transfer
from a prefill instance, or by ``prefill_locally`` on this engine's own
model), it joins the running batch, and each step produces one token of every
running request. Finished and cancelled requests leave the batch and their
blocks go back to the pool.

Growth policy: all blocks are reserved up front, so a running request never
needs memory the pool cannot give and nothing is ever preempted; the price is
that blocks for tokens a request never generates (it stopped early) sit idle
until it finishes. We chose this over preempt-and-recompute because, in a
disaggregated system, recomputing means a second round trip through a
prefill instance and a second KV transfer, and because admission decisions
(which the gateway relies on) stay exact.

The model runs on one worker thread (shared with the local prefill engine,
so prefill passes and decode steps alternate); reservations, transfers and
token queues live on the event loop. Pool blocks are written by transfers on
the event loop only while their request is not running, and by steps on the
worker; a running request's blocks are freed only between steps. It knows
nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from pdserve.config import KV_WRITE_LANES
from pdserve.engine.admission import Admission, Ticket
from pdserve.engine.cuda_graphs import DecodeGraphs, step_input_ids
from pdserve.engine.device_io import HostCopy, upload
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.paged_attention import use_paged_attention
from pdserve.engine.step_forward import step_forward, transformers_step
from pdserve.engine.pool_writer import PoolWriter
from pdserve.engine.prefill import PrefillEngine
from pdserve.engine.prefix_store import Prefix
from pdserve.engine.recent_fit import RecentFit
from pdserve.prefix import block_hashes, reusable_blocks
from pdserve.aio import cancel_and_wait
from pdserve.engine.sampling import SamplingParams, sample_tokens
from pdserve.errors import Cancelled, DataLoss, DeadlineExceeded, InvalidArgument, NotFound, PdserveError
from pdserve.kv.assembly import KVAssembly, check_layout
from pdserve.kv.wire import KVLayout, StreamInfo
from pdserve.model import LoadedModel

log = logging.getLogger(__name__)


class FinishReason(enum.Enum):
    STOP = "stop"      # an end-of-sequence token
    LENGTH = "length"  # max_tokens reached


class SeqState(enum.Enum):
    QUEUED = "queued"          # waiting for KV blocks
    WAITING_KV = "waiting_kv"  # blocks granted, prompt KV being written
    READY = "ready"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenOut:
    token_id: int
    index: int
    finish: FinishReason | None


@dataclass(frozen=True)
class DecodeParams:
    request_id: str
    transfer_id: str
    prompt_tokens: int
    sampling: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int  # completion tokens in all, counting the one prefill sampled
    first_index: int = 0  # the request's index of the token prefill sampled (tokens delivered before: resumed)
    # The prompt's tokens, when known: its longest cached prefix is reused (the transfer, or the local
    # prefill, supplies only the rest) and its blocks stay cached for later prompts.
    token_ids: tuple[int, ...] = ()


@dataclass(eq=False)
class DecodeSequence:
    params: DecodeParams
    ticket: Ticket | None = None  # the KV blocks it holds (ticket.blocks)
    state: SeqState = SeqState.QUEUED
    local: bool = False   # prefilled by this engine, not by a transfer
    next_index: int = 1   # the index of the token the next step produces
    last_token: int = -1  # input of the next step; its KV is not cached yet
    kv_len: int = 0       # tokens whose KV is in the cache
    cached: int = 0       # prompt tokens whose KV cached prefix blocks supplied (a whole number of blocks)
    fed: list[int] = field(default_factory=list)  # tokens the steps wrote KV for, after the prompt
    kv_written: object = None  # GPU: the event after which its received KV is in the pool (the step waits on it)
    # Its life here, CLOCK_MONOTONIC ns (0: not yet): granted, KV complete, joined the batch (a DEBUG line
    # at the end says where its time went).
    granted_ns: int = 0
    ready_ns: int = 0
    joined_ns: int = 0
    pool_writes: bool = False  # GPU: a transfer wrote into its blocks through the PoolWriter
    cancelled: bool = False
    transfer: KVAssembly | None = None
    # TokenOut per token, then None at the end, or a PdserveError.
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def blocks(self) -> list[int]:
        return self.ticket.blocks

    def transfer_blocks(self, block_size: int) -> list[int]:
        """The blocks a transfer writes: those after the cached prefix (its token 0 is prompt token
        ``cached``, the first token of one of these)."""
        return self.ticket.blocks[self.cached // block_size:]

    def finish_reason(self, token: int) -> FinishReason | None:
        if token in self.params.eos_token_ids:
            return FinishReason.STOP
        if self.next_index + 1 >= self.params.max_tokens:
            return FinishReason.LENGTH
        return None


@dataclass(eq=False)
class _Step:
    """A launched decode step: its rows, and their tokens once ``collect`` (on the worker thread) returns them."""

    batch: list[DecodeSequence]
    collect: Callable[[], list[int]]


@dataclass
class DecodeCounters:
    peak_running: int = 0
    steps: int = 0
    overlapped_steps: int = 0  # launched before the previous step's tokens reached the host
    step_seconds: float = 0.0  # time inside forward steps (the worker's share of the loop)
    tokens_generated: int = 0
    transfers_completed: int = 0
    transfers_rejected: int = 0
    local_prefills: int = 0
    leases_expired: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose KV came from cached blocks
    prompt_tokens: int = 0      # prompt tokens of requests admitted


@dataclass(frozen=True)
class _PoolPrefix:
    """A request's cached prefix blocks in the pool, as the prefill engine loads a prefix."""

    pool: KVPool
    blocks: list[int]

    def load(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.read(self.blocks, layer, tokens)


class StepTimes:
    """Recent decode steps as a request sees them, from one step's start to the next's (the forward pass and
    whatever the loop did before the next: on a busy 2-core host up to as much again), fitted as ``ms =
    base + per_row * rows`` by exponentially weighted least squares: a request admitted behind a queue runs
    in a fuller batch than the one stepping now (under a flood the plain median said 146 ms a step while
    requests in the full batch saw 240-370 ms). Steps over ``outlier`` x the recent median are left out (a
    kernel compiled or a CUDA graph captured: seconds, once)."""

    def __init__(self, decay: float = 0.97, outlier: float = 5.0) -> None:
        self.outlier = outlier
        self._recent: collections.deque[float] = collections.deque(maxlen=64)
        self._fit = RecentFit(2, decay)

    def add(self, rows: int, ms: float) -> None:
        self._recent.append(ms)
        if ms <= self.outlier * statistics.median(self._recent):
            self._fit.add((1.0, float(rows)), ms)

    def ms(self, rows: int | None = None) -> float:
        """A step of ``rows`` requests (None, or batches too alike to fit: the recent mean); 0 before the
        first step."""
        fit = self._fit
        if not fit.sum_x[0]:
            return 0.0
        predicted = fit.predict((1.0, float(rows))) if rows is not None else None
        return fit.sum_y / fit.sum_x[0] if predicted is None else predicted


class DecodeEngine:
    def __init__(self, loaded: LoadedModel, *, kv_budget: int, block_size: int = 16, max_batch: int = 32,
                 max_queued: int = 256, prefill_token_budget: int = 2048, prefill_chunk_tokens: int = 512,
                 max_partial_prefills: int = 2, prefill_max_pass_s: float = 1.0, paged_kernel: str = "auto",
                 kv_lease_s: float = 60.0,
                 kv_transfer_max_s: float = 300.0, cuda_graphs: bool = True, prefix_cache: bool = False,
                 overlap_steps: bool | None = None, fused_forward: bool = True,
                 min_step_interval_ms: float = 0.0, kv_write_lanes: int = KV_WRITE_LANES) -> None:
        self.kv_lease_s = kv_lease_s
        self.kv_transfer_max_s = kv_transfer_max_s
        # Steps start at least this far apart (a decode sharing its GPU with prefill: see DecodeConfig).
        self.min_step_interval_s = min_step_interval_ms / 1e3
        self._loaded = loaded
        self.max_batch = max_batch
        self.pool = KVPool(loaded.info.kv, loaded.dtype, loaded.device, kv_budget, block_size, paged_kernel,
                           prefix_cache=prefix_cache)
        # GPU: received KV is written into the pool on threads and streams of its own.
        self._writer = PoolWriter(self.pool, kv_write_lanes) if self.pool.device.type == "cuda" else None
        self.admission = Admission(self.pool.allocator, max_queued, max_batch, clock=lambda: self.counters.steps,
                                   step_ms=self.step_ms,
                                   copy_blocks=None if self.pool.shares_blocks else self.pool.copy_blocks)
        use_paged_attention(loaded.model)
        # Decode steps replayed from CUDA graphs where they can be (the flex kernel on a GPU).
        # Eager steps run transformers' own forward (the reference); graphed ones the fused step where the model
        # is supported (``fused_forward``): the same math in a fraction of the kernels.
        self._forward = transformers_step(loaded.model, self.pool)
        self._graphs = (DecodeGraphs(step_forward(loaded.model, self.pool, fused_forward), self.pool, max_batch)
                        if cuda_graphs and self.pool.kernel == "flex" and self.pool.device.type == "cuda" else None)
        # Each step's tokens, where the next step reads its inputs when steps overlap.
        self._last_out = (self._graphs.last_out if self._graphs is not None
                          else torch.zeros(max_batch, dtype=torch.long, device=loaded.device))
        # Overlapped steps: step n+1 is launched before step n's tokens reach the host, so the GPU never
        # waits for the host between steps. Default: where launching returns before the GPU is done (CUDA
        # graphs); an eager step on the CPU computes as it launches, and overlapping would only hold back
        # its tokens a step.
        self._overlap = self._graphs is not None if overlap_steps is None else overlap_steps
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-engine")
        # Prompts prefilled here (colocated serving) share the worker thread with decode steps.
        self.local_prefill = PrefillEngine(loaded, prefill_token_budget, prefill_chunk_tokens, executor=self._executor,
                                           max_partial=max_partial_prefills, max_pass_s=prefill_max_pass_s,
                                           fused_forward=None if fused_forward else False)
        self._waiting: dict[str, DecodeSequence] = {}   # by transfer id: blocks granted, KV not complete
        self._transfer_began = asyncio.Event()          # a transfer's first header arrived
        # Failed CUDA IPC transfers whose producer may still write into their blocks: freed when their
        # stream ends (by the assembly's id).
        self._quarantined: dict[int, DecodeSequence] = {}
        self._ready: collections.deque[DecodeSequence] = collections.deque()
        self._running: list[DecodeSequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.step_times = StepTimes()  # what admission's estimates take
        self.counters = DecodeCounters()

    @property
    def info(self):
        return self._loaded.info

    def step_ms(self, rows: int | None = None) -> float:
        """A decode step's time, start to start, in a batch of ``rows`` requests (None: on average), by the
        recent steps (0 before the first)."""
        return self.step_times.ms(rows)

    # ---- event-loop side: admission and transfers ------------------------------------------

    def check(self, params: DecodeParams, local: bool = False) -> None:
        """Raises ``InvalidArgument`` for a request this instance can never serve."""
        if params.prompt_tokens < 1:
            raise InvalidArgument("prompt_tokens: must be >= 1")
        if local and params.max_tokens < 1:
            raise InvalidArgument(f"max_tokens: must be >= 1, got {params.max_tokens}")
        if not local and params.max_tokens < 2:
            raise InvalidArgument(f"max_tokens: decode needs >= 2 (prefill samples the first), got {params.max_tokens}")
        limit = self.info.context_length
        if params.prompt_tokens + params.max_tokens > limit:
            raise InvalidArgument(
                f"max_tokens: prompt_tokens ({params.prompt_tokens}) + max_tokens ({params.max_tokens}) exceeds the context length {limit}"
            )
        if params.first_index >= params.prompt_tokens:
            raise InvalidArgument(f"first_index: {params.first_index} tokens delivered must be part of the prompt "
                                  f"({params.prompt_tokens} tokens)")
        if params.token_ids and len(params.token_ids) != params.prompt_tokens:
            raise InvalidArgument(f"prompt token ids: {len(params.token_ids)} tokens, prompt_tokens says "
                                  f"{params.prompt_tokens}")

    def kv_tokens(self, params: DecodeParams) -> int:
        """Tokens whose KV a request can ever hold: the prompt and every completion token but the last."""
        return params.prompt_tokens + params.max_tokens - 1

    async def reserve(self, params: DecodeParams, local: bool = False,
                      deadline_s: float | None = None) -> DecodeSequence:
        """Admits a request: returns once its KV blocks are granted (waiting in the admission queue if needed).

        Raises ``InvalidArgument`` for a request that can never fit and ``ResourceExhausted`` (with a retry
        hint) when it cannot be served in time: the queue is full, or by the recent step time it would finish
        after ``deadline_s`` (seconds from now). A transfer may arrive under ``params.transfer_id`` once this
        returns.
        """
        self.check(params, local)
        if not local and params.transfer_id in self._waiting:
            raise InvalidArgument(f"transfer_id: {params.transfer_id!r} is already reserved")
        steps = params.max_tokens if local else params.max_tokens - 1  # prefill samples the first elsewhere
        ticket = self.admission.request(self.pool.blocks_for(self.kv_tokens(params)), steps, deadline_s,
                                        keys=self._prefix_keys(params))
        seq = DecodeSequence(params, ticket, local=local)
        try:
            await ticket.granted
        except asyncio.CancelledError:
            self.admission.cancel(ticket)
            raise
        if not local and params.transfer_id in self._waiting:  # the same id was admitted while we queued
            self.admission.release(ticket)
            raise InvalidArgument(f"transfer_id: {params.transfer_id!r} is already reserved")
        seq.state = SeqState.WAITING_KV
        seq.granted_ns = time.monotonic_ns()
        seq.cached = ticket.cached_blocks * self.pool.block_size
        self.counters.prompt_tokens += params.prompt_tokens
        self.counters.prefix_hit_tokens += seq.cached
        if not local:
            self._expect(seq)
        return seq

    def expect_transfer(self, seq: DecodeSequence) -> None:
        """A request reserved to prefill here takes its KV by transfer instead (under its transfer id: its
        cached prefix left too much to compute here)."""
        tid = seq.params.transfer_id
        if seq.state is not SeqState.WAITING_KV or not seq.local:
            raise InvalidArgument(f"transfer_id: {tid!r}: the request is not waiting to prefill here")
        if not tid:
            raise InvalidArgument("transfer_id: required for a transfer")
        if tid in self._waiting:
            raise InvalidArgument(f"transfer_id: {tid!r} is already reserved")
        seq.local = False
        self._expect(seq)

    def _expect(self, seq: DecodeSequence) -> None:
        """Registers a granted request's transfer, under its lease."""
        self._waiting[seq.params.transfer_id] = seq
        asyncio.get_running_loop().call_later(self.kv_lease_s, self._check_lease, seq, time.monotonic_ns())

    def _prefix_keys(self, params: DecodeParams) -> list[int]:
        """The prefix keys of the prompt's reusable blocks (none without the cache)."""
        if not self.pool.allocator.prefix_cache or not params.token_ids:
            return []
        bs = self.pool.block_size
        return block_hashes(params.token_ids, bs, reusable_blocks(params.prompt_tokens, bs))

    def _cache_blocks(self, seq: DecodeSequence) -> None:
        """Names the full blocks of a request's written KV by their prefix keys, before it frees them."""
        if not self.pool.allocator.prefix_cache or not seq.params.token_ids or seq.kv_len <= 0:
            return
        tokens = [*seq.params.token_ids, *seq.fed][:seq.kv_len]
        bs = self.pool.block_size
        self.pool.allocator.cache(seq.blocks, block_hashes(tokens, bs))

    def _check_lease(self, seq: DecodeSequence, reserved_ns: int) -> None:
        """The reservation's lease: a transfer silent (no stream, no chunk) for kv_lease_s, or not complete
        kv_transfer_max_s after the reservation however it progresses (a transfer trickling a chunk at a
        time cannot hold blocks for longer), is failed and its blocks freed. Chunks are written on this
        loop, so none is being written now, and the assembly refuses any later one
        (``KVAssembly.check_alive``)."""
        tid = seq.params.transfer_id
        if self._waiting.get(tid) is not seq:
            return  # completed, failed or cancelled meanwhile
        now = time.monotonic_ns()
        last = max(reserved_ns, seq.transfer.last_chunk_ns if seq.transfer is not None else 0)
        silent_left = self.kv_lease_s - (now - last) / 1e9
        total_left = self.kv_transfer_max_s - (now - reserved_ns) / 1e9
        if silent_left > 0 and total_left > 0:
            asyncio.get_running_loop().call_later(min(silent_left, total_left), self._check_lease, seq, reserved_ns)
            return
        self.counters.leases_expired += 1
        if silent_left <= 0:
            why = f"transfer {tid!r}: no KV arrived for {self.kv_lease_s:g} s; reservation released"
        else:
            why = f"transfer {tid!r}: KV not complete {self.kv_transfer_max_s:g} s after the reservation; released"
        self.fail_transfer(tid, DeadlineExceeded(why))

    async def prefill_locally(self, seq: DecodeSequence, token_ids: list[int]) -> None:
        """Runs the prompt on this engine, writing its KV into the request's blocks; emits token 0."""
        if len(token_ids) != seq.params.prompt_tokens:
            raise InvalidArgument(f"prompt_token_ids: {len(token_ids)} tokens, prompt_tokens says {seq.params.prompt_tokens}")

        loop = asyncio.get_running_loop()

        def write(layer: int, start: int, k, v) -> None:
            if seq.state is SeqState.WAITING_KV:  # on the loop: a release cannot free the blocks under it
                self.pool.write(seq.blocks, layer, start, k[0].transpose(0, 1), v[0].transpose(0, 1))

        def on_layer(layer: int, start: int, k, v) -> None:  # on the worker thread, mid-pass
            loop.call_soon_threadsafe(write, layer, start, k, v)

        prefix = None
        if seq.cached:  # the prompt starts with cached blocks of this pool: compute only the rest
            blocks, pool = list(seq.blocks), self.pool
            prefix = Prefix(seq.cached, _PoolPrefix(pool, blocks))
        result = await self.local_prefill.prefill(token_ids, seq.params.sampling, on_layer, seq.params.first_index,
                                                  prefix=prefix)
        if seq.state is not SeqState.WAITING_KV:
            return  # released meanwhile
        self.counters.local_prefills += 1
        token = result.first_token
        finish = FinishReason.STOP if token in seq.params.eos_token_ids else (
            FinishReason.LENGTH if seq.params.max_tokens <= 1 else None)
        first = TokenOut(token, seq.params.first_index, finish)
        if finish is not None:
            self._finish(seq, first)
            return
        seq.events.put_nowait(first)
        self._kv_complete(seq, result.first_token)

    def begin_transfer(self, layout: KVLayout, stream: StreamInfo = StreamInfo()) -> KVAssembly:
        """Validates a transfer stream's header against the reservation; returns where its chunks go
        (the same assembly for every stream of one transfer)."""
        seq = self._waiting.get(layout.transfer_id)
        if seq is None:
            raise NotFound(f"transfer_id: {layout.transfer_id!r} is not reserved on this decode instance")
        if seq.transfer is not None:
            if seq.transfer.stream.num_streams == 1:
                raise InvalidArgument(f"transfer_id: {layout.transfer_id!r} already has a transfer in progress")
            seq.transfer.attach(layout, stream)
            self._transfer_began.set()
            return seq.transfer
        kv = self.info.kv
        try:
            check_layout(layout, num_layers=kv.num_layers, kv_heads=kv.kv_heads, head_dim=kv.head_dim,
                         dtype=self._loaded.dtype, num_tokens=seq.params.prompt_tokens - seq.cached)
            if stream.cuda_ipc and self.pool.device.type != "cuda":
                raise InvalidArgument("header.cuda_ipc: this decode instance's KV pool is not on a GPU")
            blocks = seq.transfer_blocks(self.pool.block_size)
            if self._writer is not None and not stream.cuda_ipc:  # checked and written on its own thread and stream
                writer, seq.pool_writes = self._writer, True
                seq.transfer = KVAssembly(
                    layout, lambda layer, start, k, v, check: writer.write(blocks, layer, start, k, v, check), stream,
                    checks_on_write=True)
            else:
                seq.transfer = KVAssembly(
                    layout, lambda layer, start, k, v: self.pool.write(blocks, layer, start, k, v), stream)
        except InvalidArgument as exc:
            self.fail_transfer(layout.transfer_id, DataLoss(f"KV transfer rejected: {exc}"))
            raise
        self._transfer_began.set()
        return seq.transfer

    async def writes_issued(self) -> None:
        """Returns once every pool write queued so far was issued (GPU; at once on a CPU, which writes in
        place): their sources may be released."""
        if self._writer is not None:
            await self._writer.issued()

    def stream_began(self, assembly: KVAssembly) -> None:
        """A PushKV handler took one of the transfer's streams (it calls ``stream_ended`` when it returns)."""
        assembly.streams_live += 1

    def stream_ended(self, assembly: KVAssembly) -> None:
        """A PushKV handler returned. The blocks of a failed transfer whose producer writes into the pool
        itself (CUDA IPC) are freed only now that its stream is over: no copy of it is in flight."""
        assembly.streams_live -= 1
        seq = self._quarantined.get(id(assembly))
        if seq is not None and assembly.streams_live <= 0:
            del self._quarantined[id(assembly)]
            self._free(seq)

    async def transfer_target(self, transfer_id: str, stream_index: int = 0, wait_s: float = 10.0) -> list[int]:
        """The blocks of a CUDA IPC transfer, once the asking producer's stream of it is open (waiting up to
        ``wait_s`` for its header: the producer asks right after sending it). A producer writes only into
        these, only while its stream is open (and so counted: failed, the blocks stay until it ended)."""
        deadline = time.monotonic() + wait_s
        while True:
            seq = self._waiting.get(transfer_id)
            if seq is None:
                raise NotFound(f"transfer_id: {transfer_id!r} is not reserved on this decode instance")
            if seq.transfer is not None:
                if not seq.transfer.stream.cuda_ipc or not seq.transfer.streams_live:
                    raise InvalidArgument(f"transfer_id: {transfer_id!r} has no open CUDA IPC stream")
                if seq.transfer.has_stream(stream_index):
                    return seq.transfer_blocks(self.pool.block_size)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotFound(f"transfer_id: {transfer_id!r}: no CUDA IPC stream {stream_index} opened within "
                               f"{wait_s:g} s")
            self._transfer_began.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._transfer_began.wait(), left)

    def complete_transfer(self, transfer_id: str, first_token: int, stream_index: int = 0) -> None:
        """A stream's trailer arrived; once every stream's has, the request joins the batch at the next step."""
        seq = self._waiting[transfer_id]
        if not seq.transfer.stream_finished(stream_index, first_token):
            return
        seq.transfer.finish(first_token, self.info.vocab_size)
        del self._waiting[transfer_id]
        seq.transfer = None
        self.counters.transfers_completed += 1
        # The first token may already end the request.
        if first_token in seq.params.eos_token_ids:
            self._finish(seq, None)
            return
        if seq.pool_writes:  # joins once its writes were issued, with the event they complete by
            self._writer.after_writes(asyncio.get_running_loop(),
                                      lambda event: self._kv_complete(seq, first_token, event))
            return
        self._kv_complete(seq, first_token)

    def _kv_complete(self, seq: DecodeSequence, first_token: int, written=None) -> None:
        if seq.state is not SeqState.WAITING_KV:
            return  # released meanwhile
        seq.kv_written = written
        seq.last_token = first_token
        seq.kv_len = seq.params.prompt_tokens
        seq.state = SeqState.READY
        seq.ready_ns = time.monotonic_ns()
        self._ready.append(seq)
        self._wake.set()

    def fail_transfer(self, transfer_id: str, error: PdserveError) -> None:
        """A transfer broke: free the request's blocks and fail it."""
        seq = self._waiting.pop(transfer_id, None)
        if seq is None:
            return
        self.counters.transfers_rejected += 1
        self._drop_transfer(seq, error)
        seq.events.put_nowait(error)

    def _drop_transfer(self, seq: DecodeSequence, error: PdserveError) -> None:
        """Ends a request's transfer and frees its blocks: now, or, when its producer writes into the pool
        itself and its stream is still open, once that stream ends (``stream_ended``)."""
        transfer = seq.transfer
        if transfer is not None:
            transfer.fail(error)  # the transfer's streams stop with the same reason
            if transfer.stream.cuda_ipc and transfer.streams_live > 0:
                seq.state = SeqState.FINISHED
                self._quarantined[id(transfer)] = seq
                return
        self._free(seq)

    def release(self, seq: DecodeSequence) -> None:
        """The request's caller is gone: free everything it holds (a running request's blocks after this step)."""
        if seq.state is SeqState.FINISHED:
            return
        seq.cancelled = True
        if seq.state is SeqState.QUEUED:
            self.admission.cancel(seq.ticket)
            seq.state = SeqState.FINISHED
        elif seq.state is SeqState.WAITING_KV:
            # A PushKV handler still holding seq.transfer stops at its next message (KVAssembly.check_alive);
            # chunks are written on this loop, so none lands after this.
            if not seq.local:
                self._waiting.pop(seq.params.transfer_id, None)
            self._drop_transfer(seq, Cancelled(f"transfer {seq.params.transfer_id!r}: the request was cancelled"))
        elif seq.state is SeqState.READY:
            self._ready.remove(seq)
            self._free(seq)
        else:
            self._wake.set()  # the loop drops the row and frees its blocks

    def _free(self, seq: DecodeSequence) -> None:
        if seq.granted_ns and log.isEnabledFor(logging.DEBUG):
            now = time.monotonic_ns()
            ms = lambda a, b: (b - a) / 1e6 if a and b else -1.0  # noqa: E731
            log.debug("request_id=%s done here%s: KV %.0f ms after the grant, batch slot %.0f ms after the KV, "
                      "%d steps in %.0f ms", seq.params.request_id, " (cancelled)" if seq.cancelled else "",
                      ms(seq.granted_ns, seq.ready_ns), ms(seq.ready_ns, seq.joined_ns), len(seq.fed),
                      ms(seq.joined_ns, now))
            seq.granted_ns = 0  # said once
        seq.state = SeqState.FINISHED
        seq.transfer = None
        if seq.ticket is None or not seq.ticket.blocks:
            return
        if seq.pool_writes:
            # Blocks a transfer wrote through the PoolWriter go back once its writes were issued, and the
            # compute stream waits for them to land before it touches the blocks again.
            seq.pool_writes = False
            ticket = seq.ticket

            def release(written) -> None:
                torch.cuda.current_stream(self.pool.device).wait_event(written)
                self._cache_blocks(seq)
                self.admission.release(ticket)

            self._writer.after_writes(asyncio.get_running_loop(), release)
            return
        self._cache_blocks(seq)
        self.admission.release(seq.ticket)

    def _finish(self, seq: DecodeSequence, token: TokenOut | None) -> None:
        """The request is complete; its blocks are freed now unless a step may still write them."""
        if token is not None:
            seq.events.put_nowait(token)
        seq.events.put_nowait(None)
        if seq.state is SeqState.RUNNING:
            seq.state = SeqState.FINISHED  # blocks freed when the loop drops the row
        else:
            self._free(seq)

    def stats(self) -> dict[str, int | float]:
        alloc = self.pool.allocator
        return {
            "running": sum(1 for s in self._running if s.state is SeqState.RUNNING and not s.cancelled),
            "waiting_for_kv": len(self._waiting),
            "ready": len(self._ready),
            "queued": self.admission.queued,
            "max_batch": self.max_batch,
            "kv_cache_bytes": self.pool.nbytes,
            "kv_blocks_total": alloc.capacity,
            "kv_blocks_used": alloc.num_used,
            "kv_blocks_peak": alloc.peak_used,
            "kv_blocks_cached": alloc.num_cached,
            "kv_blocks_evicted": alloc.evicted,
            "kv_block_size": self.pool.block_size,
            "refused": self.admission.refused,
            "cuda_graphs": self._graphs.captured if self._graphs is not None else 0,
            "step_ms": self.step_ms(),
            **vars(self.counters),
        }

    # ---- the batch loop -------------------------------------------------------------------

    async def capture_graphs(self, max_tokens: int) -> None:
        """Captures the CUDA graphs of every batch size for tables of up to ``max_tokens`` tokens (capped at the
        context length) before traffic arrives; no-op without graphs."""
        if self._graphs is not None and max_tokens > 0:
            tokens = min(max_tokens, self.info.context_length)
            await asyncio.get_running_loop().run_in_executor(self._executor, self._graphs.capture_all,
                                                             self.max_batch, tokens)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="decode-loop")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self.local_prefill.close()
        for seq in list(self._waiting.values()) + list(self._ready) + self._running:
            if seq.state is not SeqState.FINISHED:
                seq.state = SeqState.FINISHED
                seq.events.put_nowait(Cancelled("decode instance shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._writer is not None:
            self._writer.close()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        previous, previous_batch = None, []  # when the previous step started (unless the loop went idle since), its batch
        inflight: _Step | None = None  # launched, tokens not collected yet (overlapped steps only)
        previous_captured = 0  # CUDA graphs captured when the previous step was launched
        while True:
            if previous is not None and self.min_step_interval_s > 0:
                await asyncio.sleep(previous + self.min_step_interval_s - time.perf_counter())
            # Between steps: leave (freeing blocks, once no step in flight writes them), then join.
            busy = {id(seq) for seq in inflight.batch} if inflight is not None else set()
            staying = []
            for seq in self._running:
                if (seq.state is SeqState.FINISHED or seq.cancelled) and id(seq) not in busy:
                    self._free(seq)
                else:
                    staying.append(seq)
            self._running = staying
            while self._ready and len(self._running) < self.max_batch:
                seq = self._ready.popleft()
                seq.state = SeqState.RUNNING
                seq.joined_ns = time.monotonic_ns()
                self.admission.started(seq.ticket)
                self._running.append(seq)
            launched = [seq for seq in self._running if self._steps_next(seq, busy)]
            if not launched and inflight is None:
                previous = None
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.perf_counter()
            # A step that captured a CUDA graph (and compiled the flex kernel for it) took seconds, once:
            # fitted, it would make admission refuse requests long after.
            captured = self._graphs.captured if self._graphs is not None else 0
            if launched and previous is not None and captured == previous_captured:
                self.step_times.add(len(previous_batch), (started - previous) * 1e3)
            previous, previous_batch = (started, launched) if launched else (None, [])
            previous_captured = captured
            called = time.perf_counter()
            try:
                inflight, done, tokens = await loop.run_in_executor(self._executor, self._advance, launched, inflight)
            except Exception as exc:  # a failed forward fails its batch, not the server
                log.exception("decode step failed")
                for seq in launched + (inflight.batch if inflight is not None else []):
                    if seq.state is not SeqState.FINISHED:
                        seq.events.put_nowait(PdserveError(f"decode step failed: {exc}"))
                        seq.state = SeqState.FINISHED
                inflight, previous = None, None
                continue
            self.counters.step_seconds += time.perf_counter() - called
            if done is not None:
                self._postprocess(done.batch, tokens)

    @staticmethod
    def _steps_next(seq: DecodeSequence, busy: set[int]) -> bool:
        """Whether the running request takes a row in the next step. One in the step in flight whose token
        there is its last by length sits out; one whose token there turns out to end it (an EOS) cannot be
        told yet and takes a row whose token is dropped (its reservation has room for it)."""
        if seq.state is not SeqState.RUNNING or seq.cancelled:
            return False
        return id(seq) not in busy or seq.next_index + 1 < seq.params.max_tokens

    def _advance(self, batch: list[DecodeSequence], inflight: _Step | None) -> tuple[_Step | None, _Step | None, list[int]]:
        """On the worker thread: launches a step of ``batch`` (if any), then collects the step to collect (the
        one in flight when steps overlap, else this one). Returns (the step now in flight, the step
        collected, its tokens)."""
        step = self._launch(batch, inflight) if batch else None
        if step is not None and not self._overlap:
            return None, step, step.collect()
        if inflight is None:
            return step, None, []
        return step, inflight, inflight.collect()

    @torch.inference_mode()
    def _launch(self, batch: list[DecodeSequence], inflight: _Step | None) -> _Step:
        """Runs on the engine thread: one forward pass over ``batch``, one token each, sampled on the device. A
        request also in ``inflight`` (its token not on the host yet) takes its input token from that step's
        output on the device and is one position further than the host knows."""
        for seq in batch:
            if seq.kv_written is not None:  # its received KV lands before this step reads it (device-side wait)
                torch.cuda.current_stream(self.pool.device).wait_event(seq.kv_written)
                seq.kv_written = None
        rows = {id(seq): row for row, seq in enumerate(inflight.batch)} if inflight is not None else {}
        src = [rows.get(id(seq), -1) for seq in batch]
        ahead = [int(row >= 0) for row in src]
        positions = [seq.kv_len + a for seq, a in zip(batch, ahead)]
        tokens = [0 if a else seq.last_token for seq, a in zip(batch, ahead)]
        params = [seq.params.sampling for seq in batch]
        indices = [seq.params.first_index + seq.next_index + a for seq, a in zip(batch, ahead)]
        self.counters.overlapped_steps += inflight is not None
        tables = [seq.blocks for seq in batch]
        if self._graphs is not None:
            launched = self._graphs.launch(tokens, src, tables, positions, params, indices)
            return _Step(batch, launched.tokens)
        device = self._loaded.device
        step = self.pool.prepare_step(tables, positions)
        ids = upload(tokens, torch.long, device)
        if any(ahead):
            ids = step_input_ids(self._last_out, upload(src, torch.long, device), ids)
        logits = self._forward(ids, upload(positions, torch.long, device), step)
        chosen = sample_tokens(logits, params, indices)
        if self._overlap:  # the next step may read these on the device
            self._last_out[:len(batch)] = chosen
        return _Step(batch, HostCopy(chosen).tolist)

    def _postprocess(self, batch: list[DecodeSequence], tokens: list[int]) -> None:
        self.counters.steps += 1
        self.counters.peak_running = max(self.counters.peak_running, len(batch))
        for seq, token in zip(batch, tokens):
            seq.kv_len += 1  # the step cached last_token's KV
            seq.fed.append(seq.last_token)
            if seq.cancelled or seq.state is SeqState.FINISHED:
                continue
            self.counters.tokens_generated += 1
            out = TokenOut(token, seq.params.first_index + seq.next_index, seq.finish_reason(token))
            seq.last_token = token
            seq.next_index += 1
            if out.finish is not None:
                self._finish(seq, out)
            else:
                seq.events.put_nowait(out)
