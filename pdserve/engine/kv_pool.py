"""The decode instance's KV memory: a fixed budget cut into fixed-size blocks.

``BlockAllocator`` is the accounting (pure Python, no tensors). ``KVPool``
owns the storage: per layer, one K and one V tensor of
``num_blocks * block_size`` token slots laid out (slot, kv_head, head_dim), the
same token-major layout KV travels in, so writing a transfer's chunk is one
indexed copy. Block 0 is the null block: never handed out, zero-filled, and
where every padded read points, so attention never reads uninitialised
memory. A request owns a block table (its block ids in token order); token
``t`` lives in slot ``table[t // block_size] * block_size + t % block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.config import PAGED_KERNELS, parse_budget
from pdserve.errors import ResourceExhausted
from pdserve.model.loader import KVShape

NULL_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockAllocator:
    """Hands out block ids 1..num_blocks-1 (0 is the null block); never more than exist."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        # Lowest ids first: recently freed blocks are reused first (LIFO), which keeps pages warm.
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self.peak_used = 0

    @property
    def capacity(self) -> int:
        """Blocks that can be handed out."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise ResourceExhausted(f"KV pool: {n} blocks asked, {len(self._free)} of {self.capacity} free")
        blocks = [self._free.pop() for _ in range(n)]
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        if len(self._free) > self.capacity:
            raise AssertionError("KV pool: a block was freed twice")


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the pool will live: the GPU's, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("cannot read MemAvailable from /proc/meminfo")


def budget_bytes(text: str, device: torch.device) -> int:
    size, fraction = parse_budget(text)
    return size if size is not None else int(fraction * free_memory_bytes(device))


def resolve_kernel(name: str, device: torch.device) -> str:
    """``auto`` is FlexAttention on a GPU (a fused kernel reading the pool in place), gather + SDPA elsewhere."""
    if name not in PAGED_KERNELS:
        raise ValueError(f"paged kernel must be one of {', '.join(PAGED_KERNELS)}, got {name!r}")
    if name == "auto":
        return "flex" if device.type == "cuda" else "gather"
    return name


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class PagedStep:
    """Where one decode step writes and reads, computed once and shared by every layer.

    ``gather``/``mask`` drive the gather + SDPA kernel; ``block_mask`` (a FlexAttention
    ``BlockMask`` over the pool's slots) drives the flex kernel. ``mask`` is what the
    model's ``attention_mask`` argument gets: a 4-D mask transformers passes through.
    """

    write_slots: torch.Tensor                 # (B,) the slot of each row's new token
    mask: torch.Tensor                        # (B, 1, 1, L) True where a row may attend (gather), (B, 1, 1, 1) (flex)
    gather: torch.Tensor | None = None        # (B, L) slots of each row's tokens 0..L-1 (null slot past its length)
    block_mask: object | None = None          # flex: row b reads its own blocks, positions 0..positions[b]


class KVPool:
    def __init__(self, kv: KVShape, dtype: torch.dtype, device: torch.device, budget: int,
                 block_size: int = 16, kernel: str = "auto") -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.kv = kv
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.block_bytes = kv.bytes_per_token(dtype) * block_size
        num_blocks = budget // self.block_bytes
        if num_blocks < 2:
            raise ValueError(f"a KV budget of {budget} bytes holds {num_blocks} blocks of {self.block_bytes} bytes; "
                             "at least 2 are needed")
        self.allocator = BlockAllocator(num_blocks)
        slots = num_blocks * block_size
        shape = (slots, kv.kv_heads, kv.head_dim)
        # torch.empty: pages are only touched when KV is written there.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(kv.num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(kv.num_layers)]
        for t in self.keys + self.values:
            t[:block_size].zero_()
        self.kernel = resolve_kernel(kernel, device)
        if self.kernel == "flex":
            # Per step, for every block: the batch row owning it (-1: none) and its index in
            # that row's table; per row, its newest position. The mask reads these in the kernel.
            self._owner = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
            self._logical = torch.zeros(num_blocks, dtype=torch.int32, device=device)
            self._last = torch.zeros(num_blocks, dtype=torch.int32, device=device)
            owner, logical, last = self._owner, self._logical, self._last

            def mask_mod(b, h, q_idx, kv_idx):  # one function for the pool's life: compiled once
                block = kv_idx // block_size
                return (owner[block] == b) & (logical[block] * block_size + kv_idx % block_size <= last[b])

            self._mask_mod = mask_mod

    @property
    def nbytes(self) -> int:
        """Bytes of storage, null block included: never more than the budget."""
        return self.allocator.num_blocks * self.block_bytes

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def slots(self, table: list[int], start: int, count: int) -> torch.Tensor:
        """The slots of tokens [start, start + count) of a request with block table ``table``."""
        t = torch.arange(start, start + count)
        blocks = torch.tensor(table, dtype=torch.long)[t // self.block_size]
        return (blocks * self.block_size + t % self.block_size).to(self.device)

    def write(self, table: list[int], layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores (T, H, D) K/V of tokens [start, start + T) of layer ``layer``."""
        slots = self.slots(table, start, keys.shape[0])
        self.keys[layer][slots] = keys.to(self.device, non_blocking=True)
        self.values[layer][slots] = values.to(self.device, non_blocking=True)

    def read(self, table: list[int], layer: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H, D) copies of tokens [0, count) of layer ``layer`` (tests and debugging)."""
        slots = self.slots(table, 0, count)
        return self.keys[layer][slots], self.values[layer][slots]

    def prepare_step(self, tables: list[list[int]], positions: list[int]) -> PagedStep:
        """Row b writes its new token at ``positions[b]`` and attends to tokens 0..positions[b]."""
        if self.kernel == "flex":
            return self._flex_step(tables, positions)
        bs = self.block_size
        length = max(positions) + 1
        width = blocks_for(length, bs)
        padded = torch.zeros(len(tables), width, dtype=torch.long)
        for row, table in enumerate(tables):
            n = min(len(table), width)
            padded[row, :n] = torch.tensor(table[:n], dtype=torch.long)
        t = torch.arange(length)
        pos = torch.tensor(positions, dtype=torch.long)
        slots = padded[:, t // bs] * bs + t % bs                    # (B, L)
        mask = t[None, :] <= pos[:, None]                            # (B, L)
        gather = torch.where(mask, slots, torch.zeros_like(slots))   # null block past each length
        write = slots[torch.arange(len(tables)), pos]
        device = self.device
        return PagedStep(write.to(device), mask[:, None, None, :].to(device), gather=gather.to(device))

    def _flex_step(self, tables: list[list[int]], positions: list[int]) -> PagedStep:
        from torch.nn.attention.flex_attention import BlockMask

        bs, rows = self.block_size, len(tables)
        used = [blocks_for(p + 1, bs) for p in positions]
        # The compiled kernel is specialised to static shapes (flex decoding needs a static batch):
        # rows and table width are padded to powers of two so few shapes ever compile. Padded rows
        # have no blocks; the attention function drops their output.
        padded_rows, width = _pow2(rows), _pow2(max(used))
        counts = used + [0] * (padded_rows - rows)
        indices, flat, owner, logical = [], [], [], []
        for row, (table, n) in enumerate(zip(tables, used)):
            indices += table[:n] + [0] * (width - n)
            flat += table[:n]
            owner += [row] * n
            logical += range(n)
        indices += [0] * (width * (padded_rows - rows))
        write = [table[p // bs] * bs + p % bs for table, p in zip(tables, positions)]
        # Everything the step needs on the device in one host-to-device copy, then sliced.
        parts = (counts, indices, flat, owner, logical, positions, write)
        packed = torch.tensor([x for part in parts for x in part], dtype=torch.long).to(self.device)
        counts_t, indices_t, flat_t, owner_t, logical_t, last_t, write_t = packed.split([len(p) for p in parts])
        self._owner.fill_(-1)
        self._owner[flat_t] = owner_t.int()
        self._logical[flat_t] = logical_t.int()
        self._last[:rows] = last_t.int()
        block_mask = BlockMask.from_kv_blocks(
            counts_t.int()[:, None, None], indices_t.int().view(padded_rows, 1, 1, width),
            BLOCK_SIZE=(128, bs), mask_mod=self._mask_mod, seq_lengths=(1, self.allocator.num_blocks * bs),
            compute_q_blocks=False)
        return PagedStep(write_t, torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=self.device),
                         block_mask=block_mask)
