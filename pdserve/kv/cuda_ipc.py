"""Same host, GPU to GPU: a decode instance's KV pool shared with prefill instances by CUDA IPC.

Decode exports its pool's one allocation (``pool_handle``: the IPC handle and the pool's geometry as
plain fields; nothing is unpickled from the network), a prefill instance maps it once per decode
incarnation (``map_pool``) and, for each transfer, copies each layer's K/V straight into the slots of the
blocks decode reserved for it: a device-to-device copy on the same GPU, a peer copy from another GPU of
the host. gRPC carries the transfer's header, one small message per layer range written and the trailer.

No byte crosses a wire or host memory on this path, so its chunks carry no checksum: the copy is a DMA
between device buffers of one host, the failure a checksum guards against (bytes corrupted in transit)
does not exist here.

Who writes when (the invariant that keeps other requests' KV safe): a producer copies only into the
blocks ``Decode.TransferTarget`` returned, only while its PushKV stream for that transfer is open, and
waits for its copies to complete before it closes the stream; decode frees a failed IPC transfer's blocks
only once that stream has ended (or its producer's process, and with it every copy it queued, is gone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.kv.wire import DTYPES, DTYPE_NAMES


def scatter_tokens(pool: torch.Tensor, slots: torch.Tensor, source: torch.Tensor) -> None:
    """``pool[slots] = source`` for (slots, H, D) ``pool`` and (T, H, D) ``source`` (any strides, last dim
    contiguous), on ``pool``'s device and current stream. The rows move as 8-byte words where their layout
    allows: the index kernel handles one element per thread, and 2-byte bf16 elements meant 4x the threads
    and 2-byte loads (as words, 64 scatters of 4 GiB take 2.75 ms on an H200: 1.56 TB/s)."""
    for word in (torch.int64, torch.int32):
        try:
            pool_words, source_words = pool.view(word), source.view(word)
        except RuntimeError:  # a row or an offset not a multiple of the word
            continue
        pool_words.index_copy_(0, slots, source_words)
        return
    pool.index_copy_(0, slots, source)


MAX_COPY_RUNS = 16  # more runs of slots in one chunk than this: one scatter kernel instead of a copy each


def slot_runs(table: list[int], block_size: int, start: int, count: int) -> list[tuple[int, int, int]] | None:
    """Tokens [start, start + count) of a request with block table ``table`` as runs of consecutive slots,
    (offset in the range, first slot, tokens), for ``copy_runs``; None when they are more than
    ``MAX_COPY_RUNS`` (a fragmented table: a copy per block would cost the host more than one scatter).
    Blocks are handed out in order, so a transfer's table is usually one run or a few."""
    runs: list[list[int]] = []
    t, end = start, start + count
    while t < end:
        slot = table[t // block_size] * block_size + t % block_size
        n = min(block_size - t % block_size, end - t)
        if runs and runs[-1][1] + runs[-1][2] == slot:
            runs[-1][2] += n
        elif len(runs) == MAX_COPY_RUNS:
            return None
        else:
            runs.append([t - start, slot, n])
        t += n
    return [(offset, slot, n) for offset, slot, n in runs]


def copy_runs(pool: torch.Tensor, runs: list[tuple[int, int, int]], source: torch.Tensor) -> None:
    """``pool[slots] = source`` for (slots, H, D) ``pool`` and (T, H, D) ``source``, one plain copy per run of
    ``slot_runs``. From host memory into a GPU pool these are DMA copies alone, no kernel. That matters
    when the writer is another process than a forward pass on the same GPU (a KV receiver, or decode,
    beside prefill): kernels of different processes do not run side by side but take turns on the GPU, so
    each scatter kernel paused the pass (on the H200, 8k tokens through four KV receivers: the pass 279 ms
    with scatters, 229 ms with copies, 231 ms without a transfer; session 18)."""
    for offset, slot, n in runs:
        pool[slot:slot + n].copy_(source[offset:offset + n], non_blocking=True)


def device_uuid(device: torch.device) -> str:
    """The UUID of a CUDA device ("" for any other)."""
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


def local_device(uuid: str) -> torch.device | None:
    """This process's CUDA device with that UUID, if it sees one."""
    if not uuid or not torch.cuda.is_available():
        return None
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return torch.device("cuda", index)
    return None


def pool_handle(storage: torch.Tensor, block_size: int) -> dict:
    """The fields of a ``KVPoolHandle`` for the pool tensor ``storage`` (2, layers, slots, H, D)."""
    (_, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
     event_sync) = storage.untyped_storage()._share_cuda_()
    _, num_layers, slots, kv_heads, head_dim = storage.shape
    return dict(device_uuid=device_uuid(storage.device), handle=handle, storage_size_bytes=size_bytes,
                storage_offset_bytes=offset_bytes, ref_counter_handle=ref_handle, ref_counter_offset=ref_offset,
                event_handle=event_handle or b"", event_sync_required=event_sync, num_layers=num_layers,
                slots=slots, kv_heads=kv_heads, head_dim=head_dim, dtype=DTYPE_NAMES[storage.dtype],
                block_size=block_size, layer_ranges=True)


def map_pool(h) -> torch.Tensor:
    """Maps the pool a ``KVPoolHandle`` describes into this process: (2, layers, slots, H, D) on the local
    device with its UUID. Raises ``ValueError`` when this process does not see that GPU."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = local_device(h.device_uuid)
    if device is None:
        raise ValueError(f"GPU {h.device_uuid} is not visible to this process")
    if h.dtype not in DTYPES:
        raise ValueError(f"KV pool dtype {h.dtype!r} unknown")
    shape = (2, h.num_layers, h.slots, h.kv_heads, h.head_dim)
    stride = (h.num_layers * h.slots * h.kv_heads * h.head_dim, h.slots * h.kv_heads * h.head_dim,
              h.kv_heads * h.head_dim, h.head_dim, 1)
    return rebuild_cuda_tensor(torch.Tensor, torch.Size(shape), stride, 0, torch.UntypedStorage, DTYPES[h.dtype],
                               device.index, h.handle, h.storage_size_bytes, h.storage_offset_bytes, False,
                               h.ref_counter_handle, h.ref_counter_offset, h.event_handle or None,
                               h.event_sync_required)


@dataclass(frozen=True)
class MappedPool:
    """A decode instance's pool mapped here, and what its handle said about it."""

    pool: torch.Tensor  # (2, layers, slots, H, D) on this process's view of decode's GPU
    block_size: int
    incarnation: str  # the decode instance's, whose pool this is
    layer_ranges: bool  # it accepts one chunk for several layers (KVChunk.layer_count)


class MappedPools:
    """The decode pools a prefill process has mapped, by decode address. Dropping one (``forget``) unmaps it
    once no transfer still uses it."""

    def __init__(self) -> None:
        self._pools: dict[str, MappedPool] = {}

    def get(self, address: str) -> MappedPool | None:
        return self._pools.get(address)

    def add(self, address: str, handle) -> MappedPool:
        """Maps the pool a ``KVPoolHandle`` describes; ``ValueError`` when it cannot be mapped here."""
        try:
            pool = map_pool(handle)
        except RuntimeError as exc:  # the driver refused the handle
            raise ValueError(str(exc)) from None
        self._pools[address] = MappedPool(pool, handle.block_size, handle.incarnation, handle.layer_ranges)
        return self._pools[address]

    def forget(self, address: str) -> None:
        self._pools.pop(address, None)

    def clear(self) -> None:
        self._pools.clear()

    def __len__(self) -> int:
        return len(self._pools)
