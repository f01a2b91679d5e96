"""CUDA graphs of the decode forward: one replay per step instead of hundreds of kernel launches.

A decode step of a small model on a GPU is launch-bound: the forward is a few
milliseconds of GPU work behind ~650 kernel launches issued by Python (measured
on an H100: 2.3 ms of GPU time in 11-24 ms of wall). ``DecodeGraphs`` captures
the forward of the flex kernel's step once per (padded batch, table width)
bucket, the shapes ``KVPool.flex_metadata`` already pads to (batches to powers of two, tables to
``flex_width``), and replays it.

What a graph reads is fixed at capture: per bucket, one static int64 tensor of
the step's inputs (input tokens, where a row's token comes from the previous
step instead, positions, write slots, the block mask's counts and indices, each
visited block's owner row and index), filled by one asynchronous copy from a
pinned staging buffer; the pool's K/V storage and its mask tables, which the
graph itself writes (``KVPool.write_flex_rows``). The graph ends with each
row's greedy token, written to ``last_out`` (one tensor for every bucket) and
copied to pinned host memory behind an event: nothing on the host waits for
the GPU until the caller asks for the tokens, and the next step may take its
input tokens from ``last_out`` on the device before they reach the host.
Sampled (non-greedy) rows are drawn on the device from the bucket's logits
right after the replay (``sample_tokens``: a few kernels, not captured) and
written into ``last_out`` too, so sampled steps overlap like greedy ones.
``capture_all`` captures every batch bucket for tables up to a length before
traffic (the decode service does, at startup: a capture compiles the flex
kernel for its shape, a second or more);
a bucket met later is captured when first seen. Captures run on the worker
thread that runs steps, sharing one memory pool; ``thread_local`` capture lets
the event loop keep writing transfers into the pool meanwhile. The forward a
graph holds is the engine's ``StepForward`` (the fused step where the model
allows it: ``step_forward.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.kv_pool import NULL_BLOCK, KVPool, PagedStep, _pow2, flex_widths
from pdserve.engine.sampling import SamplingParams, sample_tokens
from pdserve.engine.step_forward import StepForward

log = logging.getLogger(__name__)

# The fields of a bucket's input tensor: (name, length in rows) and (name, length in rows x width).
_ROW_FIELDS = ("tokens", "src", "positions", "write", "counts")
_BLOCK_FIELDS = ("indices", "blocks", "owner", "logical")


def step_input_ids(last_out: torch.Tensor, src: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A step's input tokens: ``last_out[src[b]]`` (the previous step's token of its row src[b], still on the
    device) where ``src[b] >= 0``, else ``tokens[b]``."""
    return torch.where(src >= 0, last_out[src.clamp(min=0)], tokens)


@dataclass
class _Bucket:
    rows: int
    width: int
    inputs: torch.Tensor              # int64 on the device, the fields above in order
    # Pinned twins of inputs, used in turn, each with numpy views of its fields by name.
    staging: tuple[tuple[torch.Tensor, dict[str, np.ndarray]], ...]
    step: PagedStep
    fields: dict[str, torch.Tensor]   # views of inputs by name
    counts: torch.Tensor              # int32 copies of fields "counts" and "indices": the block mask reads these
    indices: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # (rows, vocab), written by each replay


@dataclass
class Launched:
    """A replayed step: its tokens on their way to the host."""

    rows: int
    host: torch.Tensor
    ready: torch.cuda.Event

    def tokens(self) -> list[int]:
        """Each row's token (waits for the step)."""
        self.ready.synchronize()
        return self.host[:self.rows].tolist()


class DecodeGraphs:
    def __init__(self, forward: StepForward, pool: KVPool, max_rows: int) -> None:
        if pool.kernel != "flex" or pool.device.type != "cuda":
            raise ValueError("CUDA graphs need the flex paged kernel on a CUDA device")
        self._forward = forward
        self._pool = pool
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._memory = torch.cuda.graph_pool_handle()
        rows = _pow2(max_rows)
        self.last_out = torch.zeros(rows, dtype=torch.long, device=pool.device)  # every step's greedy tokens
        # Host copies of last_out, used in turn: a step's tokens are read while the next one's are copied.
        self._host = [torch.zeros(rows, dtype=torch.long).pin_memory() for _ in range(2)]
        self._turn = 0

    @property
    def captured(self) -> int:
        return len(self._buckets)

    def launch(self, tokens: list[int], src: list[int], tables: list[list[int]], positions: list[int],
               params: list[SamplingParams], indices: list[int]) -> Launched:
        """Queues one decode step and returns at once. Row b's input token is ``last_out[src[b]]`` (the
        previous step's row src[b]) where ``src[b] >= 0``, else ``tokens[b]``; its output token is sampled
        with ``params[b]`` at token ``indices[b]`` (greedy rows: the graph's argmax; sampled rows: drawn on
        the device after the replay, into ``last_out`` as well)."""
        meta = self._pool.flex_metadata(tables, positions)
        bucket = self._buckets.get((meta.padded_rows, meta.width)) or self._capture(meta.padded_rows, meta.width)
        rows, n, k = meta.padded_rows, len(tokens), len(meta.blocks)
        # Staging buffer `turn` was last copied from two launches ago; the caller has collected that step.
        staging, fields = bucket.staging[self._turn]
        host = self._host[self._turn]
        self._turn ^= 1
        fields["tokens"][:n], fields["tokens"][n:] = tokens, 0
        fields["src"][:n], fields["src"][n:] = src, -1
        fields["positions"][:n], fields["positions"][n:] = positions, 0
        fields["write"][:] = meta.write
        fields["counts"][:] = meta.counts
        fields["indices"][:] = meta.indices.ravel()
        fields["blocks"][:k], fields["blocks"][k:] = meta.blocks, NULL_BLOCK
        fields["owner"][:k], fields["owner"][k:] = meta.owner, -1
        fields["logical"][:k], fields["logical"][k:] = meta.logical, 0
        stream = torch.cuda.current_stream(self._pool.device)
        bucket.inputs.copy_(staging, non_blocking=True)
        bucket.graph.replay()
        if not all(p.greedy for p in params):
            self.last_out[:n] = sample_tokens(bucket.logits[:n], params, indices, argmax=self.last_out[:n])
        host[:rows].copy_(self.last_out[:rows], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
        return Launched(n, host, ready)

    @torch.inference_mode()
    def capture_all(self, max_rows: int, max_tokens: int) -> None:
        """Captures, before any traffic, the step of every padded batch up to ``max_rows`` for tables of up
        to ``max_tokens`` tokens (each capture compiles the flex kernel for its shape: seconds, which a
        step capturing lazily would add to the requests in it). Longer tables are captured when first seen."""
        rows = [1 << i for i in range(_pow2(max_rows).bit_length())]
        widths = flex_widths(self._pool.blocks_for(max_tokens))
        shapes = [(r, w) for w in widths for r in rows if (r, w) not in self._buckets]
        started = time.perf_counter()
        for i, (r, w) in enumerate(shapes, 1):
            self._capture(r, w)
            log.info("decode CUDA graphs: %d of %d captured (batch %d, %d blocks per row), %.0f s so far", i,
                     len(shapes), r, w, time.perf_counter() - started)

    def _body(self, bucket: _Bucket, write_out: bool = True) -> torch.Tensor:
        f = bucket.fields
        self._pool.write_flex_rows(f["blocks"], f["owner"], f["logical"], f["positions"])
        bucket.counts.copy_(f["counts"])
        bucket.indices.copy_(f["indices"].view(bucket.rows, bucket.width))
        logits = self._forward(step_input_ids(self.last_out, f["src"], f["tokens"]), f["positions"], bucket.step)
        if write_out:
            self.last_out[:bucket.rows].copy_(logits.argmax(dim=-1))
        return logits

    def _capture(self, rows: int, width: int) -> _Bucket:
        started = time.perf_counter()
        device = self._pool.device
        sizes = [rows] * len(_ROW_FIELDS) + [rows * width] * len(_BLOCK_FIELDS)
        inputs = torch.zeros(sum(sizes), dtype=torch.long, device=device)
        fields = dict(zip(_ROW_FIELDS + _BLOCK_FIELDS, inputs.split(sizes)))
        # Zeros everywhere: no row visits a block, every row writes into the null block.
        counts = torch.zeros(rows, dtype=torch.int32, device=device)
        indices = torch.zeros(rows, width, dtype=torch.int32, device=device)
        step = PagedStep(fields["write"], torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=device),
                         block_mask=self._pool.block_mask(counts, indices))
        staging = []
        for _ in range(2):
            pinned = torch.zeros(sum(sizes), dtype=torch.long).pin_memory()
            staging.append((pinned, dict(zip(_ROW_FIELDS + _BLOCK_FIELDS, np.split(pinned.numpy(),
                                                                               np.cumsum(sizes)[:-1])))))
        bucket = _Bucket(rows, width, inputs, tuple(staging), step, fields, counts, indices)
        # Warm up on a side stream (compiles the flex kernel for this shape), then capture. The warm-up
        # leaves last_out alone: the step being launched may read the previous step's tokens from it.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(bucket, write_out=False)
        torch.cuda.current_stream(device).wait_stream(side)
        side.synchronize()
        warmed = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory, capture_error_mode="thread_local"):
            bucket.logits = self._body(bucket)
        bucket.graph = graph
        self._buckets[(rows, width)] = bucket
        log.info("captured the decode step for batch %d, %d blocks per row, in %.2f s (%.2f s of it compiling "
                 "and warming up)", rows, width, time.perf_counter() - started, warmed - started)
        return bucket
