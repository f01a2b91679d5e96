"""Prefill engine: waiting prompts packed into one forward pass, long prompts in chunks.

Every forward pass takes a *batch plan* (``plan_batch``): from the queue, in
arrival order, segments of prompts up to ``token_budget`` tokens, a prompt
longer than ``chunk_tokens`` contributing one chunk per pass. The segments are
packed into one row (no padding); each segment attends to its own prompt
only, including the earlier chunks it keeps from previous passes:
``SegmentPrefillCache`` and the ``pdserve_paged`` attention run flash
attention over variable-length segments on a GPU (one call for every segment
that starts a prompt, one per segment continuing one, reading its earlier
chunks' KV in place from the prompt's own buffer) and SDPA per segment on a
CPU; float32 on a GPU packs them under one block-diagonal causal mask
(``PackedPrefillCache``). Each layer's new K/V is handed to
``on_layer`` on the worker thread as soon as it is computed (on a GPU: queued),
while later layers still compute, and the first token is sampled when a
prompt's last chunk has run.

The engine owns the model on one worker thread, which a colocated decode
engine may share (then decode steps and prefill passes alternate on it:
Sarathi-style interleaving when chunks are small). It knows nothing about
where the KV goes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from pdserve.aio import ByteBudget, cancel_and_wait
from pdserve.engine.admission import DEADLINE_MARGIN
from pdserve.engine.device_io import upload
from pdserve.engine.fused_forward import FusedForward, fused_supported
from pdserve.engine.paged_attention import PackedSegments, paged_attention, use_paged_attention
from pdserve.engine.prefix_store import Prefix, PrefixStore
from pdserve.engine.recent_fit import RecentFit
from pdserve.engine.sampling import SamplingParams, sample
from pdserve.errors import Cancelled, ResourceExhausted
from pdserve.kv.wire import DTYPE_NAMES, KVLayout
from pdserve.model import LoadedModel

log = logging.getLogger(__name__)

# on_layer(layer_index, token_start, keys, values) with keys/values shaped (1, H, count, D), called on the
# engine's worker thread in the middle of the forward pass: it must not block (see pdserve.kv.transport).
LayerCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class PrefillResult:
    first_token: int
    queue_ms: float    # from submission to the first forward pass that included the prompt
    forward_ms: float  # from that pass's start to the end of the prompt's last pass
    passes: int
    # CLOCK_MONOTONIC nanoseconds.
    forward_start_ns: int
    forward_end_ns: int
    cached_tokens: int = 0  # prompt tokens a cached prefix supplied (not computed)


@dataclass(eq=False)
class PrefillJob:
    token_ids: list[int]
    sampling: SamplingParams
    on_layer: LayerCallback | None
    future: asyncio.Future
    first_index: int = 0  # the sampling index of the token this prefill produces
    done: int = 0  # tokens already prefilled (a cached prefix counts)
    cached: int = 0  # tokens of a cached prefix it starts with (``prefix``), never computed here
    prefix: Prefix | None = None
    emit_from: int = 0  # on_layer gets the KV of tokens from here on (cached ones too, at its first pass)
    keep: bool = False  # keep every token's KV to the end (for the prefix store)
    passes: int = 0
    cancelled: bool = False
    kv: KVBytes | None = None  # its KV's share of the in-flight budget (None: the KV stays here)
    name: str = ""  # for log lines: the request id
    enqueued_ns: int = field(default_factory=time.monotonic_ns)
    start_ns: int = 0
    # Per layer: earlier chunks' K/V, kept only while later chunks remain ((1, H, T, D) on a CPU, (T, H, D)
    # on a GPU, where attention reads them in place).
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.token_ids) - self.done

    @property
    def started(self) -> bool:
        return self.done > self.cached

    def buffers(self, layer: int, like: torch.Tensor, token_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V buffers for the whole prompt, ``(T, H, D)`` (token-major) or ``(1, H, T,
        D)``, allocated at the first pass (layers come in order), the cached prefix copied in."""
        if len(self.keys) <= layer:
            heads, dim = like.shape[1], like.shape[3]
            total = len(self.token_ids)
            shape = (total, heads, dim) if token_major else (1, heads, total, dim)
            k = torch.empty(shape, dtype=like.dtype, device=like.device)
            v = torch.empty(shape, dtype=like.dtype, device=like.device)
            if self.cached:
                pk, pv = self.prefix.load(layer)
                if token_major:
                    k[:self.cached], v[:self.cached] = pk, pv
                else:
                    k[0, :, :self.cached], v[0, :, :self.cached] = pk.transpose(0, 1), pv.transpose(0, 1)
            self.keys.append(k)
            self.values.append(v)
        return self.keys[layer], self.values[layer]

    def replay(self, layer: int, token_major: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """At its first pass: the cached KV on_layer must get too (tokens emit_from..cached), ``(1, H, n, D)``."""
        if self.emit_from >= self.cached:
            return None
        k, v = self.keys[layer], self.values[layer]
        if token_major:
            return (k[self.emit_from:self.cached].transpose(0, 1)[None],
                    v[self.emit_from:self.cached].transpose(0, 1)[None])
        return k[:, :, self.emit_from:self.cached], v[:, :, self.emit_from:self.cached]


class PassTimes:
    """Recent forward passes fitted as ``seconds = overhead + per_token * tokens + per_pair * pairs``, where
    ``pairs`` counts the query-key pairs attention scores (a chunk deep into a long prompt attends to
    everything before it): exponentially weighted least squares (``RecentFit``). A pass of a few tokens
    costs mostly its overhead, a full one its tokens, a late chunk of a long prompt its attention: a rate
    alone misjudges all three. ``dense``: attention scores every query of the pass against every key of it
    (a packed pass under one block-diagonal mask), not each segment against its own prompt's."""

    def __init__(self, decay: float = 0.95, dense: bool = False) -> None:
        self.dense = dense
        self._fit = RecentFit(3, decay)

    def features(self, segments: Sequence[tuple[int, int]]) -> tuple[float, float, float]:
        """(1, tokens, query-key pairs / 1e6) of a pass of (start, count) segments."""
        tokens = sum(c for _, c in segments)
        if self.dense:
            pairs = tokens * sum(s + c for s, c in segments)
        else:
            pairs = sum(c * (s + (c + 1) / 2) for s, c in segments)
        return 1.0, float(tokens), pairs / 1e6

    def add(self, segments: Sequence[tuple[int, int]], seconds: float) -> None:
        self._fit.add(self.features(segments), seconds)

    @property
    def tokens_per_s(self) -> float:
        return self._fit.sum_x[1] / self._fit.sum_y if self._fit.sum_y else 0.0

    def seconds(self, segments: Sequence[tuple[int, int]]) -> float | None:
        """A pass of (start, count) segments (None before the first pass; passes too alike to tell the
        terms apart: at the mean rate per token)."""
        fit = self._fit
        if not fit.sum_y:
            return None
        x = self.features(segments)
        predicted = fit.predict(x)
        if predicted is None:
            return x[1] * fit.sum_y / fit.sum_x[1] if fit.sum_x[1] else fit.sum_y
        return predicted


@dataclass(eq=False)
class _Planned:
    """A queued prompt as ``plan_batch`` sees it, for simulating the queue ahead."""

    token_ids: range
    done: int = 0
    cancelled: bool = False
    cached: int = 0

    @property
    def remaining(self) -> int:
        return len(self.token_ids) - self.done

    @property
    def started(self) -> bool:
        return self.done > self.cached


@dataclass(eq=False)
class KVBytes:
    """The bytes one prompt's KV holds in an in-flight ``ByteBudget``: taken before its first pass, released
    by whoever ends the transfer (delivered, failed, or a kept copy dropped). Both idempotent."""

    budget: ByteBudget
    size: int
    held: bool = False

    def take(self) -> bool:
        if not self.held:
            self.held = self.budget.take(self.size)
        return self.held

    def release(self) -> None:
        if self.held:
            self.held = False
            self.budget.release(self.size)


@dataclass(frozen=True)
class Segment:
    job: PrefillJob
    start: int  # first prompt token of this chunk
    count: int

    @property
    def last(self) -> bool:
        return self.start + self.count == len(self.job.token_ids)


MIN_CHUNK = 16  # a pass's time limit never cuts a long prompt's chunk below this many tokens


@dataclass(frozen=True)
class PassLimit:
    """The longest a planned pass should take: ``max_s`` seconds by ``seconds`` (``PassTimes.seconds``, the
    recent passes' fit; None before the first pass: no limit yet)."""

    seconds: Callable[[Sequence[tuple[int, int]]], float | None]
    max_s: float

    @property
    def known(self) -> bool:
        """Whether there are pass times to go by (none before the first pass)."""
        return self.seconds([(0, 1)]) is not None

    def fit(self, plan: Sequence[Segment], start: int, want: int, max_s: float) -> int:
        """The most tokens, up to ``want``, of a segment from prompt token ``start`` that keep ``plan`` and it
        within ``max_s`` seconds (0 if none do)."""
        shape = [(seg.start, seg.count) for seg in plan]

        def within(count: int) -> bool:
            seconds = self.seconds([*shape, (start, count)])
            return seconds is None or seconds <= max_s

        if within(want):
            return want
        lo, hi = 0, want - 1  # the largest count within: binary search (the cost grows with the count)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if within(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo


def plan_batch(queue: Sequence[PrefillJob], token_budget: int, chunk_tokens: int, max_partial: int = 2,
               start: Callable[[PrefillJob], bool] = lambda job: True, limit: PassLimit | None = None) -> list[Segment]:
    """The segments of the next forward pass, at most ``token_budget`` tokens (a lone whole prompt excepted)
    and, with a ``limit``, at most about ``limit.max_s`` seconds.

    Chunked (``chunk_tokens > 0``), in this order while the budget lasts:

    1. the oldest prompt already being chunked: its next chunk (long prompts always progress), within half
       the time limit when others wait;
    2. prompts not yet started that fit in one chunk, in arrival order, whole: short prompts never wait
       behind long ones (the first that would overrun the time limit waits for the next pass, and so do
       those behind it);
    3. the other prompts being chunked: a chunk each;
    4. long prompts not yet started, in arrival order, a chunk each, while fewer than ``max_partial``
       prompts are being chunked (each holds its earlier chunks' KV); the first that cannot start ends
       this step, so long prompts start in arrival order.

    A long prompt's chunk may be shorter than ``chunk_tokens`` to fill the budget or to keep the pass within
    the time limit (never below ``MIN_CHUNK`` tokens: then it waits, unless nothing else is planned); the
    limit bounds how long a prompt that arrives waits for its own pass on any hardware (a chunk deep into a
    long prompt costs its attention over everything before it). A prompt alone in the queue is chunked by
    the budget instead (chunks exist so others need not wait: with nobody waiting, a few full passes beat
    many small ones, whose launch overhead a GPU cannot hide) once the limit has pass times to go by: the
    first pass of a cold engine is a chunk (on a 2-core CPU a lone near-context prompt's first 2,048 tokens
    took 7.9 s, and the prompts arriving meanwhile waited for it). Without chunking, whole prompts go in
    arrival order; one that does not fit the room left is passed over for later ones that do, and runs
    alone, even past the budget and the time limit, once nothing is planned before it.

    ``start(job)`` is asked once before a prompt's first segment is planned; False (no room for its KV in
    flight yet, say) passes it over for now.
    """
    live = [job for job in queue if not job.cancelled and job.remaining > 0]
    plan: list[Segment] = []
    room = token_budget
    if len(live) == 1 and chunk_tokens > 0 and (limit is None or limit.known):
        chunk_tokens = max(chunk_tokens, token_budget)  # nobody waits: a lone prompt takes whole passes

    def add(job: PrefillJob, count: int) -> None:
        nonlocal room
        plan.append(Segment(job, job.done, count))
        room -= count

    def fit(job: PrefillJob, want: int, share: float = 1.0) -> int:
        """Tokens of a chunk of the job, up to ``want``, within ``share`` of the time limit: at least
        MIN_CHUNK (or 0), and at least that when nothing is planned yet."""
        if limit is None:
            return want
        count = limit.fit(plan, job.done, want, limit.max_s * share)
        floor = min(want, MIN_CHUNK)
        if not plan:
            return max(count, floor)
        return count if count >= floor else 0

    def fits_whole(job: PrefillJob) -> bool:
        """Whether the job's whole remaining prompt keeps the pass within the time limit (always, first)."""
        return limit is None or not plan or limit.fit(plan, job.done, job.remaining, limit.max_s) == job.remaining

    if chunk_tokens <= 0:
        for job in live:
            if (job.remaining <= room or not plan) and fits_whole(job) and start(job):
                add(job, job.remaining)
            if room <= 0:
                break
        return plan
    partial = [job for job in live if job.started]
    if partial:
        add(partial[0], fit(partial[0], min(partial[0].remaining, chunk_tokens, room), 0.5 if len(live) > 1 else 1.0))
    for job in live:
        if not job.started and job.remaining <= min(chunk_tokens, room):
            if not fits_whole(job):
                break
            if start(job):
                add(job, job.remaining)
    for job in partial[1:]:
        if room > 0 and (count := fit(job, min(job.remaining, chunk_tokens, room))):
            add(job, count)
    for job in live:
        if room <= 0 or len(partial) >= max_partial:
            break
        if not job.started and job.remaining > chunk_tokens:
            count = fit(job, min(job.remaining, chunk_tokens, room))
            if not count or not start(job):
                break
            partial.append(job)
            add(job, count)
    return plan


class PackedPrefillCache:
    """``past_key_values`` for one packed pass: hands out each segment's K/V and keeps what later chunks need."""

    def __init__(self, plan: list[Segment], notify: Callable[[PrefillJob, int, int, torch.Tensor, torch.Tensor], None]) -> None:
        self._plan = plan
        self._notify = notify

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = [], []
        offset = 0
        for seg in self._plan:
            job = seg.job
            k = key_states[:, :, offset:offset + seg.count]
            v = value_states[:, :, offset:offset + seg.count]
            offset += seg.count
            if seg.start > 0 or not seg.last or job.keep:
                kb, vb = job.buffers(layer_idx, k, token_major=False)
                if seg.start > 0:
                    keys.append(kb[:, :, :seg.start])
                    values.append(vb[:, :, :seg.start])
                if not seg.last or job.keep:
                    kb[:, :, seg.start:seg.start + seg.count] = k
                    vb[:, :, seg.start:seg.start + seg.count] = v
                if seg.start == job.cached and (replayed := job.replay(layer_idx, token_major=False)) is not None:
                    self._notify(job, layer_idx, job.emit_from, *replayed)
            keys.append(k)
            values.append(v)
            self._notify(job, layer_idx, seg.start, k, v)
        if len(keys) == 1:
            return keys[0], values[0]
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)


class SegmentPrefillCache:
    """``past_key_values`` for one packed pass on a GPU, whose segments that start a prompt come first.

    Hands each segment's new K/V to ``notify`` and returns the pass's K/V unchanged: the ``pdserve_paged``
    attention runs flash attention over the leading segments as variable-length sequences, and over each
    segment that continues a prompt against that prompt's buffer (earlier chunks and this one, written
    here), read in place: nothing is concatenated.
    """

    def __init__(self, plan: list[Segment], notify: Callable[[PrefillJob, int, int, torch.Tensor, torch.Tensor], None],
                 device: torch.device) -> None:
        self._plan = plan
        self._notify = notify
        fresh = [seg.count for seg in plan if seg.start == 0]
        continuing = [(sum(s.count for s in plan[:i]), seg) for i, seg in enumerate(plan) if seg.start > 0]
        self.segments = PackedSegments(
            fresh_tokens=sum(fresh), fresh_lengths=cumulative(fresh, device), fresh_max=max(fresh, default=0),
            continuing=[(offset, seg.count, seg.start + seg.count, cumulative([seg.count], device),
                         cumulative([seg.start + seg.count], device)) for offset, seg in continuing])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        offset = 0
        prefixes = []
        for seg in self._plan:
            job = seg.job
            k = key_states[:, :, offset:offset + seg.count]
            v = value_states[:, :, offset:offset + seg.count]
            offset += seg.count
            if seg.start > 0 or not seg.last or job.keep:  # the prompt's buffer: this chunk now, the next later
                kb, vb = job.buffers(layer_idx, k, token_major=True)
                end = seg.start + seg.count
                kb[seg.start:end] = k[0].transpose(0, 1)
                vb[seg.start:end] = v[0].transpose(0, 1)
                if seg.start > 0:
                    prefixes.append((kb[:end], vb[:end]))
                if seg.start == job.cached and (replayed := job.replay(layer_idx, token_major=True)) is not None:
                    self._notify(job, layer_idx, job.emit_from, *replayed)
            self._notify(job, layer_idx, seg.start, k, v)
        self.segments.prefixes[layer_idx] = prefixes
        return key_states, value_states


def cumulative(lengths: list[int], device: torch.device) -> torch.Tensor:
    """(len + 1,) int32 cumulative sequence lengths, as variable-length attention takes them."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return upload(out, torch.int32, device)


def packed_inputs(plan: list[Segment], device: torch.device,
                  dense_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids and position_ids (1, S), and the (1, 1, S, S_kv) mask of a packed pass (without
    ``dense_mask``: a (1, 1, 1, 1) stand-in, for attention that keeps segments apart itself)."""
    ids = [t for seg in plan for t in seg.job.token_ids[seg.start:seg.start + seg.count]]
    positions = [p for seg in plan for p in range(seg.start, seg.start + seg.count)]
    as_tensor = lambda xs: upload([xs], torch.long, device)  # noqa: E731
    if not dense_mask:
        return as_tensor(ids), as_tensor(positions), torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    total_q = len(ids)
    total_kv = sum(seg.start + seg.count for seg in plan)
    mask = torch.zeros(total_q, total_kv, dtype=torch.bool)
    q0 = kv0 = 0
    for seg in plan:
        span = seg.start + seg.count
        q = torch.arange(seg.count)[:, None] + seg.start  # each query's position
        kv = torch.arange(span)[None, :]
        mask[q0:q0 + seg.count, kv0:kv0 + span] = kv <= q
        q0 += seg.count
        kv0 += span
    return as_tensor(ids), as_tensor(positions), upload(mask[None, None], torch.bool, device)


class PrefillEngine:
    """Owns the model's prefill passes: a queue of prompts, planned pass by pass (``plan_batch``).

    Bounded and honest: at most ``max_queued_tokens`` prompt tokens wait; a prompt that would overflow
    them, or that would not be done before its deadline at the recent throughput, is refused at once with
    ``ResourceExhausted`` and a retry hint (``check_admission``). A prompt whose KV leaves this instance
    holds its bytes in ``inflight`` (a ``ByteBudget``) from its first pass until its transfer is over: a
    prompt starts only when they fit, so a slow consumer cannot make memory grow; short prompts may start
    ahead of a long one waiting for room, until it has waited ``BYTES_AGING_S``.
    """

    BYTES_AGING_S = 5.0
    MAX_PLANNED_PASSES = 2048  # an admission estimate plans at most this many passes one by one

    def __init__(self, loaded: LoadedModel, token_budget: int = 2048, chunk_tokens: int = 512,
                 executor: Executor | None = None, max_partial: int = 2, max_queued_tokens: int = 65536,
                 kv_inflight_bytes: int = 1 << 30, prefix_store: PrefixStore | None = None,
                 max_pass_s: float = 1.0, fused_forward: bool | None = None,
                 segment_attention: bool | None = None) -> None:
        self._loaded = loaded
        self.prefix_store = prefix_store  # recent prompts' KV, reused by prompts that start the same way
        self.computed_tokens = 0  # prompt tokens computed by forward passes
        self.cached_tokens = 0    # prompt tokens a cached prefix supplied instead
        self.token_budget = token_budget
        self.chunk_tokens = chunk_tokens
        self.max_partial = max_partial
        self.max_queued_tokens = max_queued_tokens
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-engine")
        self._queue: list[PrefillJob] = []
        self._wake = asyncio.Event()
        self.inflight = ByteBudget(kv_inflight_bytes, on_release=self._wake.set)
        self._task: asyncio.Task | None = None
        self.passes = 0
        self._last_end_ns = 0  # when the previous pass ended (DEBUG: the idle gap between passes)
        self.peak_batch = 0  # most prompts in one pass
        self.refused = 0
        # Attention over each segment on its own, through the attention function pdserve registers with
        # transformers: flash attention over variable-length segments on a GPU in 16-bit floats, SDPA per
        # segment on a CPU (one dense block-diagonal mask made every query score every key of the pass: a
        # short prompt beside a chunk deep into a long one paid for its depth). Float32 on a GPU keeps the
        # dense mask (flash attention has no float32 kernel). ``segment_attention=False``: the dense mask anyway
        # (the reference the GPU tests hold segment attention to).
        segments_possible = loaded.device.type == "cpu" or loaded.dtype in (torch.bfloat16, torch.float16)
        if segment_attention and not segments_possible:
            raise ValueError("segment attention needs a CPU or 16-bit floats on a GPU")
        self.segment_attention = segments_possible if segment_attention is None else segment_attention
        if self.segment_attention:
            use_paged_attention(loaded.model)
        # Passes with segment attention run the fused forward (``FusedForward``: a fraction of transformers'
        # kernel launches, which are the time of a GPU pass of a few hundred tokens) where the model allows:
        # by default on a GPU (on a CPU a pass is compute-bound, and transformers' forward is the reference).
        fuse = loaded.device.type == "cuda" if fused_forward is None else fused_forward
        self._fused = (FusedForward(loaded.model)
                       if fuse and self.segment_attention and fused_supported(loaded.model, "prefill passes") else None)
        self.pass_times = PassTimes(dense=not self.segment_attention)  # recent passes' cost, for estimates and limits
        # Passes planned to take at most about max_pass_s: a prompt that arrives waits for at most about one.
        self._limit = PassLimit(self.pass_times.seconds, max_pass_s) if max_pass_s > 0 else None

    @property
    def info(self):
        return self._loaded.info

    async def warm_up(self) -> None:
        """Compiles the fused forward's kernels before traffic (seconds on a GPU, once); no-op without it."""
        if self._fused is not None:
            took = await asyncio.get_running_loop().run_in_executor(self._executor, self._fused.warm_up)
            log.info("fused forward compiled in %.1f s", took)

    @property
    def device(self):
        return self._loaded.device

    @property
    def queued_prompts(self) -> int:
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return sum(job.remaining for job in self._queue)

    def layout(self, transfer_id: str, num_tokens: int) -> KVLayout:
        """The KV geometry a transfer of ``num_tokens`` prompt tokens announces."""
        kv = self._loaded.info.kv
        return KVLayout(transfer_id, kv.num_layers, num_tokens, kv.kv_heads, kv.head_dim, DTYPE_NAMES[self._loaded.dtype])

    @property
    def tokens_per_s(self) -> float:
        return self.pass_times.tokens_per_s

    def estimated_s(self, tokens: int, horizon_s: float = math.inf, alone: bool = False) -> float | None:
        """Seconds until a prompt of ``tokens`` queued now would be done: the queue's next passes planned as
        ``plan_batch`` would plan them, each timed by the recent passes (None before the first pass;
        ``alone``: with nothing ahead of it). Planning stops once the passes add up past ``horizon_s``."""
        if self.pass_times.seconds([(0, 1)]) is None:
            return None
        queue = [] if alone else [_Planned(range(len(job.token_ids)), job.done, cached=job.cached)
                                  for job in self._queue if not job.cancelled]
        mine = _Planned(range(tokens))
        queue.append(mine)
        total = 0.0
        for _ in range(self.MAX_PLANNED_PASSES):
            if not mine.remaining or total > horizon_s:
                return total
            plan = plan_batch(queue, self.token_budget, self.chunk_tokens, self.max_partial, limit=self._limit)
            total += self.pass_times.seconds([(seg.start, seg.count) for seg in plan])
            for seg in plan:
                seg.job.done += seg.count
        # Too many passes to plan one by one: the rest of the queue up to it at the recent rate.
        ahead = sum(job.remaining for job in queue[:queue.index(mine) + 1])
        return total + ahead / max(self.pass_times.tokens_per_s, 1e-9)

    def check_admission(self, tokens: int, deadline_s: float | None = None) -> None:
        """Raises ``ResourceExhausted`` (with a retry hint) unless a prompt of ``tokens`` can queue now and,
        by the recent passes, the queue ahead of it does not push it past ``deadline_s`` seconds."""
        queued = self.queued_tokens
        full = queued + tokens > self.max_queued_tokens
        if not full and deadline_s is None:
            return
        horizon = deadline_s * DEADLINE_MARGIN if deadline_s is not None else 3600.0
        estimate = self.estimated_s(tokens, horizon)
        alone = self.estimated_s(tokens, horizon, alone=True) if estimate is not None else 0.0
        hint_ms = round(max(0.01, min(estimate or 1.0, 3600) - alone) * 1e3)
        if full:
            why = f"{queued} prompt tokens queued, at most {self.max_queued_tokens}"
        elif deadline_s is not None and estimate is not None and alone <= deadline_s < estimate * DEADLINE_MARGIN:
            why = (f"it would be done in about {estimate:.1f} s ({queued} tokens queued, {self.tokens_per_s:.0f} "
                   f"tokens/s lately), after its deadline ({deadline_s:.1f} s)")
        else:
            return
        self.refused += 1
        raise ResourceExhausted(f"prefill busy: {why}; retry after about {hint_ms} ms", hint_ms)

    async def prefill(self, token_ids: list[int], sampling: SamplingParams,
                      on_layer: LayerCallback | None = None, first_index: int = 0,
                      kv: KVBytes | None = None, name: str = "", prefix: Prefix | None = None,
                      emit_from: int | None = None) -> PrefillResult:
        """Queues the prompt; ``on_layer`` gets every chunk of every layer on the worker thread, as it is computed
        (it must not block: post to the loop what needs it); returns the first token (token ``first_index`` of the request: a resumed request's prompt ends with the ones delivered).
        ``kv``: the bytes its KV will hold in ``inflight`` (taken before its first pass; the caller releases
        them once the KV is delivered or dropped).

        The prompt starts from ``prefix`` (KV of its first tokens held elsewhere: a decode pool's cached
        blocks), else from the longest prefix in this engine's ``prefix_store``; only the rest is computed.
        ``on_layer`` gets tokens from ``emit_from`` on (default: the first computed one; earlier, and the
        cached ones in between come at the first pass too)."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            # A fresh context: the loop serves every request, so it must not carry this one's request id
            # and trace into its log lines.
            self._task = contextvars.Context().run(loop.create_task, self._loop(), name="prefill-loop")
        job = PrefillJob(list(token_ids), sampling, on_layer, loop.create_future(), first_index, kv=kv, name=name)
        if prefix is None and self.prefix_store is not None:
            prefix = self.prefix_store.lookup(job.token_ids)
        if prefix is not None and 0 < prefix.tokens < len(job.token_ids):
            job.prefix, job.cached = prefix, prefix.tokens
            job.done = job.cached
        job.emit_from = job.cached if emit_from is None else min(emit_from, len(job.token_ids))
        job.keep = self.prefix_store is not None
        self.cached_tokens += job.cached
        self._queue.append(job)
        self._wake.set()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancelled = True  # dropped from the queue before the next pass
            raise

    def _starter(self) -> Callable[[PrefillJob], bool]:
        """``plan_batch``'s ``start``: a prompt starts once its KV bytes fit in flight; others may start
        ahead of one waiting for room until it has waited BYTES_AGING_S."""
        now = time.monotonic_ns()
        aged = next((job for job in self._queue if not job.started and not job.cancelled and job.kv is not None
                     and not job.kv.held and not self.inflight.fits(job.kv.size)
                     and now - job.enqueued_ns > self.BYTES_AGING_S * 1e9), None)

        def start(job: PrefillJob) -> bool:
            if job.kv is None or job.kv.held:
                return True
            if aged is not None and job is not aged:
                return False
            return job.kv.take()

        return start

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._queue = [job for job in self._queue if not job.cancelled]
            plan = plan_batch(self._queue, self.token_budget, self.chunk_tokens, self.max_partial, self._starter(),
                              self._limit)
            if not plan:
                self._wake.clear()
                await self._wake.wait()
                continue

            def notify(job: PrefillJob, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
                if job.on_layer is None or job.cancelled:  # on the worker thread
                    return
                if start < job.emit_from:  # computed again here, but the consumer holds it already
                    skip = job.emit_from - start
                    if skip >= k.shape[2]:
                        return
                    k, v, start = k[:, :, skip:], v[:, :, skip:], job.emit_from
                job.on_layer(layer, start, k, v)

            shape = [(seg.start, seg.count) for seg in plan]
            expected_s = self.pass_times.seconds(shape)
            try:
                firsts, start_ns, end_ns = await loop.run_in_executor(self._executor, self._forward, plan, notify)
            except Exception as exc:  # a failed pass fails its prompts, not the server
                log.exception("prefill pass failed (%d prompts: %s)", len(plan),
                              ", ".join(sorted({seg.job.name for seg in plan})))
                for seg in plan:
                    self._finish(seg.job, exc=exc)
                continue
            self.passes += 1
            self.peak_batch = max(self.peak_batch, len(plan))
            self.pass_times.add(shape, (end_ns - start_ns) / 1e9)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("pass %d: %s in %.0f ms (fit said %s ms), %.0f ms after the previous pass ended, %d queued",
                          self.passes, " ".join(f"{seg.job.name}[{seg.start}+{seg.count}]" for seg in plan),
                          (end_ns - start_ns) / 1e6, "-" if expected_s is None else f"{expected_s * 1e3:.0f}",
                          (start_ns - self._last_end_ns) / 1e6 if self._last_end_ns else 0.0, len(self._queue))
            self._last_end_ns = end_ns
            for seg in plan:
                job = seg.job
                job.passes += 1
                job.done += seg.count
                job.start_ns = job.start_ns or start_ns
                if seg.last:
                    self._finish(job, PrefillResult(
                        firsts[job], (job.start_ns - job.enqueued_ns) / 1e6, (end_ns - job.start_ns) / 1e6,
                        job.passes, job.start_ns, end_ns, job.cached))

    def _finish(self, job: PrefillJob, result: PrefillResult | None = None, exc: BaseException | None = None) -> None:
        if result is not None and job.keep and job.keys:
            self.prefix_store.insert(job.token_ids, job.keys, job.values, token_major=self.segment_attention)
        if result is not None:
            self.computed_tokens += len(job.token_ids) - job.cached
        job.keys, job.values, job.prefix = [], [], None
        if job in self._queue:
            self._queue.remove(job)
        if job.future.done() or job.cancelled:
            return  # nobody awaits a cancelled job's future
        if exc is not None:
            job.future.set_exception(exc)
        else:
            # What on_layer posted to the loop during the pass was queued before this; it runs first.
            asyncio.get_running_loop().call_soon(job.future.set_result, result)

    @torch.inference_mode()
    def _forward(self, plan: list[Segment], notify) -> tuple[dict[PrefillJob, int], int, int]:
        """Runs on the engine thread: one packed pass; returns first tokens of prompts that completed."""
        start_ns = time.monotonic_ns()
        device = self._loaded.device
        if self.segment_attention:
            plan = sorted(plan, key=lambda seg: seg.start > 0)  # segments that start a prompt first
        input_ids, position_ids, mask = packed_inputs(plan, device, dense_mask=not self.segment_attention)
        ends, finishing, offset = [], [], 0
        for seg in plan:
            offset += seg.count
            if seg.last:
                ends.append(offset - 1)
                finishing.append(seg.job)
        keep = upload(ends, torch.long, device) if ends else 1
        if self._fused is not None:
            logits = self._fused_pass(plan, notify, input_ids[0], position_ids[0], keep if finishing else None)
        else:
            if self.segment_attention:
                cache = SegmentPrefillCache(plan, notify, device)
                extra = {"segments": cache.segments}
            else:
                cache, extra = PackedPrefillCache(plan, notify), {}
            logits = self._loaded.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                                        past_key_values=cache, use_cache=True, logits_to_keep=keep,
                                        **extra).logits[0]
        firsts = {}
        if finishing:
            tokens = sample(logits, [job.sampling for job in finishing], [job.first_index for job in finishing])
            firsts = dict(zip(finishing, tokens))
        return firsts, start_ns, time.monotonic_ns()

    def _fused_pass(self, plan: list[Segment], notify, ids: torch.Tensor, positions: torch.Tensor,
                    keep: torch.Tensor | None) -> torch.Tensor | None:
        """A packed pass through ``FusedForward``: each layer's K/V to ``SegmentPrefillCache``, attention over
        the segments; the logits of the rows in ``keep`` (None: no prompt finishes, no logits)."""
        cache = SegmentPrefillCache(plan, notify, ids.device)

        def attend(layer: int, module: torch.nn.Module, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            keys, values = cache.update(kv[0].transpose(0, 1)[None], kv[1].transpose(0, 1)[None], layer)
            out, _ = paged_attention(module, q.transpose(0, 1)[None], keys, values, None, scaling=module.scaling,
                                     segments=cache.segments)
            return out.reshape(q.shape[0], -1)

        hidden = self._fused.hidden(ids, positions, attend)
        return None if keep is None else self._fused.logits(hidden[keep])

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(Cancelled("prefill engine shutting down"))
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
