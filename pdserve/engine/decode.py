"""Decode engine: continuous batching over requests whose KV arrived from prefill.

Every step, finished and cancelled requests leave the batch, requests whose
KV is complete join it (up to ``max_batch``), and one forward pass produces
the next token of every running request. The engine owns the model and the
slot cache on one worker thread; everything else (reservations, transfers,
token queues) lives on the event loop. It knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pdserve.engine.sampling import SamplingParams, sample
from pdserve.engine.slot_cache import SlotKVCache
from pdserve.errors import Cancelled, DataLoss, InvalidArgument, NotFound, PdserveError, ResourceExhausted
from pdserve.kv.assembly import KVAssembly, check_layout
from pdserve.kv.wire import KVLayout
from pdserve.model import LoadedModel

log = logging.getLogger(__name__)


class FinishReason(enum.Enum):
    STOP = "stop"      # an end-of-sequence token
    LENGTH = "length"  # max_tokens reached


class SeqState(enum.Enum):
    WAITING_KV = "waiting_kv"
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


@dataclass(eq=False)
class DecodeSequence:
    params: DecodeParams
    state: SeqState = SeqState.WAITING_KV
    next_index: int = 1   # the index of the token the next step produces
    last_token: int = -1  # input of the next step; its KV is not cached yet
    kv_len: int = 0       # tokens whose KV is in the cache
    cancelled: bool = False
    transfer: KVAssembly | None = None
    # TokenOut per token, then None at the end, or a PdserveError.
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def finish_reason(self, token: int) -> FinishReason | None:
        if token in self.params.eos_token_ids:
            return FinishReason.STOP
        if self.next_index + 1 >= self.params.max_tokens:
            return FinishReason.LENGTH
        return None


@dataclass
class DecodeCounters:
    peak_running: int = 0
    steps: int = 0
    tokens_generated: int = 0
    transfers_completed: int = 0
    transfers_rejected: int = 0


class DecodeEngine:
    def __init__(self, loaded: LoadedModel, max_batch: int = 32, max_waiting: int = 256) -> None:
        self._loaded = loaded
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._cache = SlotKVCache(loaded.info.kv, loaded.dtype, loaded.device, max_rows=max_batch)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-engine")
        self._waiting: dict[str, DecodeSequence] = {}   # by transfer id, until the KV lands
        self._ready: collections.deque[DecodeSequence] = collections.deque()
        self._running: list[DecodeSequence] = []        # row r of the cache = _running[r]
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.counters = DecodeCounters()

    @property
    def info(self):
        return self._loaded.info

    # ---- event-loop side: reservations and transfers -------------------------------------

    def reserve(self, params: DecodeParams) -> DecodeSequence:
        """Registers a request that will receive its KV under ``params.transfer_id``."""
        if params.transfer_id in self._waiting:
            raise InvalidArgument(f"transfer_id: {params.transfer_id!r} is already reserved")
        if params.prompt_tokens < 1:
            raise InvalidArgument("prompt_tokens: must be >= 1")
        if params.max_tokens < 2:
            raise InvalidArgument(f"max_tokens: decode needs >= 2 (prefill samples the first), got {params.max_tokens}")
        limit = self.info.context_length
        if params.prompt_tokens + params.max_tokens > limit:
            raise InvalidArgument(
                f"max_tokens: prompt_tokens ({params.prompt_tokens}) + max_tokens ({params.max_tokens}) exceeds the context length {limit}"
            )
        if len(self._waiting) + len(self._ready) >= self.max_waiting:
            raise ResourceExhausted(f"decode: {self.max_waiting} requests already waiting; retry later")
        seq = DecodeSequence(params)
        self._waiting[params.transfer_id] = seq
        return seq

    def begin_transfer(self, layout: KVLayout) -> KVAssembly:
        """Validates a transfer's header against the reservation; returns where its chunks go."""
        seq = self._waiting.get(layout.transfer_id)
        if seq is None:
            raise NotFound(f"transfer_id: {layout.transfer_id!r} is not reserved on this decode instance")
        if seq.transfer is not None:
            raise InvalidArgument(f"transfer_id: {layout.transfer_id!r} already has a transfer in progress")
        kv = self.info.kv
        try:
            check_layout(layout, num_layers=kv.num_layers, kv_heads=kv.kv_heads, head_dim=kv.head_dim,
                         dtype=self._loaded.dtype, num_tokens=seq.params.prompt_tokens)
        except InvalidArgument as exc:
            self.fail_transfer(layout.transfer_id, DataLoss(f"KV transfer rejected: {exc}"))
            raise
        seq.transfer = KVAssembly(layout, self._loaded.device)
        return seq.transfer

    def check_transfer_alive(self, transfer_id: str) -> None:
        """Raises ``Cancelled`` once the request a transfer feeds has gone."""
        seq = self._waiting.get(transfer_id)
        if seq is None or seq.cancelled:
            raise Cancelled(f"transfer {transfer_id!r}: the request was cancelled")

    def complete_transfer(self, transfer_id: str, first_token: int) -> None:
        """All layers landed: the request joins the batch at the next step."""
        seq = self._waiting[transfer_id]
        seq.transfer.finish(first_token, self.info.vocab_size)
        del self._waiting[transfer_id]
        self.counters.transfers_completed += 1
        seq.last_token = first_token
        seq.kv_len = seq.params.prompt_tokens
        # The first token may already end the request.
        if first_token in seq.params.eos_token_ids:
            self._finish(seq, None)
            return
        seq.state = SeqState.READY
        self._ready.append(seq)
        self._wake.set()

    def fail_transfer(self, transfer_id: str, error: PdserveError) -> None:
        """A transfer broke: free what it staged and fail its request."""
        seq = self._waiting.pop(transfer_id, None)
        if seq is None:
            return
        self.counters.transfers_rejected += 1
        seq.transfer = None
        seq.state = SeqState.FINISHED
        seq.events.put_nowait(error)

    def release(self, seq: DecodeSequence) -> None:
        """The request's caller is gone: free everything it holds (the running row at the next step)."""
        if seq.state is SeqState.FINISHED:
            return
        seq.cancelled = True
        if seq.state is SeqState.WAITING_KV:
            # NOTE: a PushKV handler still holding seq.transfer stops at its next chunk
            # (check_transfer_alive) and drops the staging with it.
            self._waiting.pop(seq.params.transfer_id, None)
            seq.state = SeqState.FINISHED
        elif seq.state is SeqState.READY:
            self._ready.remove(seq)
            seq.state = SeqState.FINISHED
        else:
            self._wake.set()  # the loop drops the row

    def _finish(self, seq: DecodeSequence, token: TokenOut | None) -> None:
        if token is not None:
            seq.events.put_nowait(token)
        seq.events.put_nowait(None)
        seq.state = SeqState.FINISHED
        seq.transfer = None

    def stats(self) -> dict[str, int]:
        staging = sum(s.transfer.nbytes for s in self._waiting.values() if s.transfer is not None)
        staging += sum(s.transfer.nbytes for s in self._ready if s.transfer is not None)
        return {
            "running": sum(1 for s in self._running if s.state is SeqState.RUNNING and not s.cancelled),
            "waiting_for_kv": len(self._waiting),
            "ready": len(self._ready),
            "max_batch": self.max_batch,
            "kv_cache_bytes": self._cache.nbytes + staging,
            **vars(self.counters),
        }

    # ---- the batch loop -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="decode-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for seq in list(self._waiting.values()) + list(self._ready) + self._running:
            if seq.state is not SeqState.FINISHED:
                seq.state = SeqState.FINISHED
                seq.events.put_nowait(Cancelled("decode instance shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            leaving = [r for r, s in enumerate(self._running) if s.state is SeqState.FINISHED or s.cancelled]
            room = self.max_batch - (len(self._running) - len(leaving))
            joining = [self._ready.popleft() for _ in range(min(room, len(self._ready)))]
            if not joining and len(leaving) == len(self._running):
                if leaving:
                    await loop.run_in_executor(self._executor, self._compact, leaving)
                    continue
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                tokens = await loop.run_in_executor(self._executor, self._step, leaving, joining)
            except Exception as exc:  # a failed forward fails the batch, not the server
                log.exception("decode step failed")
                for seq in self._running:
                    if seq.state is not SeqState.FINISHED:
                        seq.state = SeqState.FINISHED
                        seq.events.put_nowait(PdserveError(f"decode step failed: {exc}"))
                continue
            self._postprocess(tokens)

    @torch.inference_mode()
    def _compact(self, leaving: list[int]) -> None:
        """Drops rows ``leaving`` (ascending), filling each hole with the last row."""
        for row in reversed(leaving):
            last = len(self._running) - 1
            if row != last:
                self._cache.move_row(last, row, self._running[last].kv_len)
                self._running[row] = self._running[last]
            self._running.pop()

    @torch.inference_mode()
    def _step(self, leaving: list[int], joining: list[DecodeSequence]) -> list[int]:
        """Runs on the engine thread: batch membership changes, then one forward pass."""
        # 1. leave, 2. join, 3. forward, 4. sample.
        self._compact(leaving)
        for seq in joining:
            row = len(self._running)
            self._cache.reserve(row + 1, seq.kv_len + 1)
            self._cache.write_prompt(row, seq.transfer.keys, seq.transfer.values)
            seq.transfer = None
            seq.state = SeqState.RUNNING
            self._running.append(seq)
        batch = self._running
        device = self._loaded.device
        input_ids = torch.tensor([[s.last_token] for s in batch], dtype=torch.long, device=device)  # (B, 1)
        positions = torch.tensor([s.kv_len for s in batch], dtype=torch.long)  # (B,)
        mask = self._cache.begin_step(positions)  # (B, 1, 1, L)
        out = self._loaded.model(input_ids=input_ids, position_ids=positions[:, None].to(device),
                                 attention_mask=mask, past_key_values=self._cache, use_cache=True)
        return sample(out.logits[:, -1], [s.params.sampling for s in batch], [s.next_index for s in batch])

    def _postprocess(self, tokens: list[int]) -> None:
        self.counters.steps += 1
        self.counters.peak_running = max(self.counters.peak_running, len(self._running))
        for seq, token in zip(self._running, tokens):
            seq.kv_len += 1  # the step cached last_token's KV
            if seq.cancelled or seq.state is SeqState.FINISHED:
                continue
            self.counters.tokens_generated += 1
            out = TokenOut(token, seq.next_index, seq.finish_reason(token))
            seq.last_token = token
            seq.next_index += 1
            if out.finish is not None:
                self._finish(seq, out)
            else:
                seq.events.put_nowait(out)
