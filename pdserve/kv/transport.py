"""The KV transport contract between a prefill instance (producer) and a decode instance (consumer).

Modelled on vLLM's KV connector: each side has a small interface, and the
docstrings say who calls what, when, and what must hold. A transport moves
one transfer: the prompt KV of one request, from the prefill forward pass
into the decode instance's cache.

Producer side (``KVSender``, one object per transfer, driven by the prefill service):
  1. ``open(layout)`` as the forward pass starts: the pass does not wait for
     it (opening takes a round trip or two to decode, and on a GPU pinning
     host staging), so ``stage`` may be called once ``open`` was called,
     before it completed; those ranges start, in order, when it completes.
     The consumer validates the layout against its reservation; a rejection
     fails ``open`` or surfaces on a later call. ``finish`` comes after
     ``open`` completed.
  2. ``stage(layer, token_start, keys, values)``, once per layer per prompt
     chunk (one chunk unless the prompt is prefilled in chunks), in layer
     order within a chunk and token order within a layer, as soon as the
     layer's K/V are computed -- on a GPU, as soon as their kernels are
     *queued* -- while later layers still compute. It is called on the
     prefill engine's worker thread (or on the loop, re-pushing kept KV),
     must return at once and must never wait for the device: on a GPU it
     queues the copies out of the device on a stream of its own behind an
     event of the compute stream (``pdserve.kv.staging``); sending happens
     in the background, on the loop.
  3. ``finish(first_token)`` after the forward pass: flushes what is queued,
     sends the first sampled token and returns once the consumer acknowledged
     the whole transfer (a ``TransferReceipt``), or raises ``PdserveError``.
  4. ``abort()`` on any failure or cancellation; idempotent; once it returns
     nothing is staged any more and no queued copy is still writing (CUDA IPC
     writes into the consumer's memory: its blocks are only freed after
     this), and the consumer frees everything the transfer staged.

Consumer side (``KVReceiver``, implemented by the decode engine):
  1. ``begin_transfer(layout)`` when a transfer's header arrives; raises
     ``NotFound`` for an unreserved transfer id and ``InvalidArgument`` for a
     layout that does not match the model or the reservation.
  2. Chunks go to the returned ``KVAssembly`` (``add``), which validates each
     and writes it straight into the KV blocks reserved for the request.
     Before each message the transport calls ``KVAssembly.check_alive``: once
     the transfer failed or its request was cancelled, every stream of it
     stops with that reason (and nothing is written into freed blocks).
  3. ``complete_transfer(transfer_id, first_token)`` once the producer
     finished; the request joins the decode batch.
  4. ``fail_transfer(transfer_id, error)`` on any failure: the request's
     blocks are freed and the waiting request fails with ``error``. A
     producer relaying the transfer (``pdserve.kv.relays``) ends a stream
     with a ``KVAbort`` in place of the trailer when it meets a failure
     upstream: the transfer fails with DATA_LOSS naming it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.errors import PdserveError
from pdserve.kv.assembly import KVAssembly
from pdserve.kv.wire import KVLayout


@dataclass(frozen=True)
class TransferReceipt:
    bytes_sent: int
    layers: int
    messages: int
    # CLOCK_MONOTONIC nanoseconds; *_received_ns and layer_written_ns are the consumer's clock
    # (comparable with the producer's on one host only).
    first_chunk_sent_ns: int
    acked_ns: int
    first_chunk_received_ns: int
    last_chunk_received_ns: int
    # Per layer, for its last chunk: handed to the sender by the forward pass, written to the wire
    # (or the segment), arrived at decode, copied into decode's KV pool.
    layer_ready_ns: tuple[int, ...] = ()
    layer_sent_ns: tuple[int, ...] = ()
    layer_received_ns: tuple[int, ...] = ()
    layer_written_ns: tuple[int, ...] = ()
    # open() called, and completed (prefill's clock): the forward pass runs meanwhile.
    open_start_ns: int = 0
    opened_ns: int = 0


class KVSender(abc.ABC):
    """Producer side of one transfer; see the module docstring for the call order."""

    @abc.abstractmethod
    async def open(self, layout: KVLayout) -> None: ...

    @abc.abstractmethod
    def stage(self, layer: int, token_start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Starts moving one layer's (1, H, count, D) K/V of tokens from ``token_start``; any thread; never
        blocks, never waits for the device."""

    @abc.abstractmethod
    async def finish(self, first_token: int) -> TransferReceipt: ...

    @abc.abstractmethod
    async def abort(self) -> None: ...


class KVReceiver(Protocol):
    """Consumer side; see the module docstring for the call order."""

    def begin_transfer(self, layout: KVLayout) -> KVAssembly: ...

    def complete_transfer(self, transfer_id: str, first_token: int) -> None: ...

    def fail_transfer(self, transfer_id: str, error: PdserveError) -> None: ...
