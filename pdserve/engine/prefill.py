"""Prefill engine: one prompt forward pass at a time, each layer's K/V handed out as it is produced.

Owns the model on one worker thread. It knows nothing about where the KV goes:
``on_layer`` is called on the event loop for every layer while later layers
still compute, and the caller (a KV sender) takes it from there.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from pdserve.engine.sampling import SamplingParams, sample
from pdserve.kv.wire import DTYPE_NAMES, KVLayout
from pdserve.model import LoadedModel

# on_layer(layer_index, keys, values) with keys/values shaped (1, H, T, D).
LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class LayerCaptureCache(DynamicCache):
    """A DynamicCache that reports each layer's new K/V the moment attention produces it."""

    def __init__(self, config, on_layer: LayerCallback) -> None:
        super().__init__(config=config)
        self._on_layer = on_layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._on_layer(layer_idx, key_states, value_states)
        return keys, values


@dataclass(frozen=True)
class PrefillResult:
    first_token: int
    queue_ms: float
    forward_ms: float
    # CLOCK_MONOTONIC nanoseconds.
    forward_start_ns: int
    forward_end_ns: int


class PrefillEngine:
    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-engine")

    @property
    def info(self):
        return self._loaded.info

    def layout(self, transfer_id: str, num_tokens: int) -> KVLayout:
        """The KV geometry a transfer of ``num_tokens`` prompt tokens announces."""
        kv = self._loaded.info.kv
        return KVLayout(transfer_id, kv.num_layers, num_tokens, kv.kv_heads, kv.head_dim, DTYPE_NAMES[self._loaded.dtype])

    async def prefill(self, token_ids: list[int], sampling: SamplingParams, on_layer: LayerCallback | None) -> PrefillResult:
        """Runs the prompt, calling ``on_layer`` on this event loop per layer; returns the first token."""
        loop = asyncio.get_running_loop()
        enqueued_ns = time.monotonic_ns()

        def forward_thread_callback(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            loop.call_soon_threadsafe(on_layer, layer, k, v)

        callback = forward_thread_callback if on_layer is not None else (lambda *_: None)
        return await loop.run_in_executor(self._executor, self._forward, token_ids, sampling, callback, enqueued_ns)

    def _forward(self, token_ids: list[int], sampling: SamplingParams, callback: LayerCallback,
                 enqueued_ns: int) -> PrefillResult:
        model, device = self._loaded.model, self._loaded.device
        start_ns = time.monotonic_ns()
        with torch.inference_mode():
            input_ids = torch.tensor([token_ids], dtype=torch.long, device=device)  # (1, T)
            cache = LayerCaptureCache(model.config, callback)
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            first = sample(out.logits[:, -1], [sampling], [0])[0]
        end_ns = time.monotonic_ns()
        return PrefillResult(first, (start_ns - enqueued_ns) / 1e6, (end_ns - start_ns) / 1e6, start_ns, end_ns)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
