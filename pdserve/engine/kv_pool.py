"""The decode instance's KV memory: a fixed budget cut into fixed-size blocks.

``BlockAllocator`` is the accounting (pure Python, no tensors). ``KVPool``
owns the storage: per layer, one K and one V tensor of
``num_blocks * block_size`` token slots laid out (slot, kv_head, head_dim), the
same token-major layout KV travels in, so a transfer's chunk is written by a
plain copy per run of consecutive slots (blocks are handed out in order), no
kernel, or one indexed copy into a fragmented table. Block 0 is the null
block: never handed out, zero-filled, and where every padded read points, so
attention never reads uninitialised memory. A request owns a block table (its
block ids in token order); token ``t`` lives in slot
``table[t // block_size] * block_size + t % block_size``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import torch

from pdserve.config import PAGED_KERNELS, parse_budget
from pdserve.engine.device_io import upload
from pdserve.errors import ResourceExhausted
from pdserve.kv.cuda_ipc import copy_runs, slot_runs
from pdserve.model.loader import KVShape

NULL_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockAllocator:
    """Hands out block ids 1..num_blocks-1 (0 is the null block); never more than exist.

    With the prefix cache on, a finished request's full blocks stay *cached* under their prefix key
    (``pdserve.prefix.block_hashes``) instead of going back free: a later request whose prompt starts the
    same way ``share``s them (reference-counted) rather than receiving their KV again. A cached block no
    request holds is *idle*: it counts as free, and ``allocate`` evicts idle blocks, least recently used
    first, once the free list is empty, so caching never refuses a request that would otherwise fit. A
    cached block is only ever read: requests write their new KV into blocks of their own.
    """

    def __init__(self, num_blocks: int, prefix_cache: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        # Lowest ids first: recently freed blocks are reused first (LIFO), which keeps pages warm.
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._by_key: dict[int, int] = {}      # prefix key -> cached block
        self._key_of: dict[int, int] = {}      # cached block -> its key
        self._holders: dict[int, int] = {}     # cached block -> requests holding it
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # held by none, LRU first
        self.peak_used = 0
        self.evicted = 0

    @property
    def capacity(self) -> int:
        """Blocks that can be handed out."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out now: free, or cached and held by nobody (evicted when taken)."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise ResourceExhausted(f"KV pool: {n} blocks asked, {self.num_free} of {self.capacity} free")
        take = min(n, len(self._free))
        blocks = [self._free.pop() for _ in range(take)]
        while len(blocks) < n:  # evict the least recently used idle cached blocks
            block, _ = self._idle.popitem(last=False)
            del self._by_key[self._key_of.pop(block)], self._holders[block]
            self.evicted += 1
            blocks.append(block)
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Gives back one request's hold on each block: an uncached block is free again, a cached one idle
        once nobody holds it."""
        for block in reversed(blocks):
            if block in self._key_of:
                self._holders[block] -= 1
                if self._holders[block] == 0:
                    self._idle[block] = None
                elif self._holders[block] < 0:
                    raise AssertionError("KV pool: a cached block was freed twice")
            else:
                self._free.append(block)
        if len(self._free) + self.num_cached > self.capacity:
            raise AssertionError("KV pool: a block was freed twice")

    def match(self, keys: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of ``keys`` (block i's key, in order)."""
        found = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def idle(self, blocks: list[int]) -> list[bool]:
        """Which of these cached blocks nobody holds (they count as free until shared)."""
        return [block in self._idle for block in blocks]

    def share(self, blocks: list[int]) -> None:
        """One more request holds these cached blocks (``match``'s answer): they cannot be evicted until it
        ``free``s them."""
        for block in blocks:
            self._holders[block] += 1
            self._idle.pop(block, None)

    def cache(self, blocks: list[int], keys: list[int]) -> int:
        """Names a held request's first full blocks by their prefix keys (``keys[i]`` is block ``blocks[i]``'s,
        and every token of it is written), so they stay cached when it frees them. A block already cached, or
        whose key another block holds, is left as it is. Returns the blocks newly cached."""
        if not self.prefix_cache:
            return 0
        added = 0
        for block, key in zip(blocks, keys):
            if block in self._key_of or key in self._by_key:
                continue
            self._by_key[key], self._key_of[block], self._holders[block] = block, key, 1
            added += 1
        return added

    def cached_keys(self, limit: int) -> list[int]:
        """Up to ``limit`` keys of cached blocks, most recently used last (what routing is told)."""
        held = [self._key_of[b] for b in self._key_of if b not in self._idle]
        idle = [self._key_of[b] for b in self._idle]
        return (idle + held)[-limit:]


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


# A flex step's block tables are padded to one of these widths (blocks per row): 64 x powers of 4. Each width
# is a shape the kernel compiles and a CUDA graph is captured for, per padded batch; the flex kernel visits
# only a row's own blocks, so a wider table costs bytes of step metadata (4 x 8 bytes a row and block), not
# attention. Three widths cover tables of up to 1,024 blocks (16k tokens of 16).
FLEX_MIN_WIDTH = 64


def flex_width(blocks: int) -> int:
    """The table width a flex step with rows of up to ``blocks`` blocks is padded to."""
    return flex_widths(blocks)[-1]


def flex_widths(blocks: int) -> list[int]:
    """Every table width up to the one rows of ``blocks`` blocks are padded to, smallest first."""
    widths = [FLEX_MIN_WIDTH]
    while widths[-1] < blocks:
        widths.append(widths[-1] * 4)
    return widths


# Gather steps pad the rows of a group to its longest row; rows up to this many tokens share one group, longer
# ones are grouped by length (powers of two), so one near-context row does not pad every other row to its
# length (on a 2-core CPU, a batch of small requests beside one 8k-token row stepped in 0.4-1.6 s).
GATHER_GROUP_TOKENS = 1024


@dataclass(frozen=True)
class GatherGroup:
    """Rows of a gather step read together: ``gather`` (b, L) slots of each row's tokens 0..L-1 (the null slot
    past its length), ``mask`` (b, 1, 1, L) True where it may attend. ``rows``: the batch rows (None: all)."""

    gather: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor | None = None


@dataclass(frozen=True)
class PagedStep:
    """Where one decode step writes and reads, computed once and shared by every layer.

    ``groups`` drive the gather + SDPA kernel; ``block_mask`` (a FlexAttention ``BlockMask`` over the
    pool's slots) drives the flex kernel. ``mask`` is what the model's ``attention_mask`` argument gets: a
    4-D mask transformers passes through (the kernels take what they read from the step).
    """

    write_slots: torch.Tensor                 # (B,) the slot of each row's new token
    mask: torch.Tensor                        # (B, 1, 1, L) True where a row may attend (one gather group), else (B, 1, 1, 1)
    groups: list[GatherGroup] = field(default_factory=list)  # gather: the batch's rows, by length
    block_mask: object | None = None          # flex: row b reads its own blocks, positions 0..positions[b]


@dataclass(frozen=True)
class FlexMetadata:
    """One flex step on the host, rows padded to ``padded_rows`` and tables to ``width`` blocks (int64 arrays)."""

    padded_rows: int
    width: int
    counts: np.ndarray       # per padded row: blocks it visits (padded rows: none)
    indices: np.ndarray      # (padded_rows, width): the blocks, null-padded
    write: np.ndarray        # per padded row: the slot of its new token (padded rows: the null block's first)
    blocks: np.ndarray       # every block the real rows visit, then for each its row and table index
    owner: np.ndarray
    logical: np.ndarray
    positions: np.ndarray    # per real row: its newest token's position


class KVPool:
    def __init__(self, kv: KVShape, dtype: torch.dtype, device: torch.device, budget: int,
                 block_size: int = 16, kernel: str = "auto", prefix_cache: bool = False) -> None:
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
        self.allocator = BlockAllocator(num_blocks, prefix_cache)
        slots = num_blocks * block_size
        shape = (slots, kv.kv_heads, kv.head_dim)
        self.kernel = resolve_kernel(kernel, device)
        # The flex kernel weighs a visited block's unwritten, masked slots by zero, and uninitialised memory
        # may hold NaN bit patterns (0 x NaN is NaN): zeros for it (on a GPU one fast memset; a host pool
        # reuses earlier tensors' memory, where a whole-suite CI run found them). The gather kernel reads only
        # written slots (the null block past each row's length): on the host, torch.empty, whose pages are
        # only touched when KV is written there.
        alloc = torch.zeros if device.type == "cuda" or self.kernel == "flex" else torch.empty
        # One allocation for every layer's K and V: (2, layers, slots, H, D). On a GPU it is what a prefill
        # instance on the same host maps (CUDA IPC, ``export_ipc``) to write transfers straight into.
        self.storage = alloc((2, kv.num_layers, *shape), dtype=dtype, device=device)
        self.keys, self.values = list(self.storage[0]), list(self.storage[1])
        for t in self.keys + self.values:
            t[:block_size].zero_()
        if self.kernel == "flex":
            # Per step, for every block: the batch row owning it (-1: none) and its index in that row's
            # table; per row, its newest position. The mask reads these in the kernel; they live outside
            # any step's tensors, so a captured CUDA graph reads the step it is replayed for.
            self._owner = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
            self._logical = torch.zeros(num_blocks, dtype=torch.int32, device=device)
            self._last = torch.zeros(_pow2(num_blocks), dtype=torch.int32, device=device)
            owner, logical, last = self._owner, self._logical, self._last

            def mask_mod(b, h, q_idx, kv_idx):  # one function for the pool's life: compiled once
                block = kv_idx // block_size
                return (owner[block] == b) & (logical[block] * block_size + kv_idx % block_size <= last[b])

            self.mask_mod = mask_mod

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
        """Stores (T, H, D) K/V of tokens [start, start + T) of layer ``layer``: from the host (a transfer's
        chunk) a copy per run of consecutive slots, no kernel (``cuda_ipc.copy_runs``); from the device (a
        colocated prefill), or into a fragmented table, one indexed copy."""
        runs = slot_runs(table, self.block_size, start, keys.shape[0]) if keys.device.type == "cpu" else None
        if runs is not None:
            copy_runs(self.keys[layer], runs, keys)
            copy_runs(self.values[layer], runs, values)
            return
        slots = self.slots(table, start, keys.shape[0])
        self.keys[layer][slots] = keys.to(self.device, non_blocking=True)
        self.values[layer][slots] = values.to(self.device, non_blocking=True)

    @property
    def shares_blocks(self) -> bool:
        """Whether requests may read the same cached block in place. The flex kernel's mask gives each block
        one owning row a step, so there a request takes an idle cached block as it is and copies one another request holds
        (``copy_blocks``, at device bandwidth); gather + SDPA reads any block any row's table lists."""
        return self.kernel != "flex"

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Block ``dst[i]`` of every layer's K and V becomes a copy of block ``src[i]``."""
        tokens = len(src) * self.block_size
        s, d = self.slots(src, 0, tokens), self.slots(dst, 0, tokens)
        self.storage[:, :, d] = self.storage[:, :, s]

    def read(self, table: list[int], layer: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H, D) copies of tokens [0, count) of layer ``layer`` (tests and debugging)."""
        slots = self.slots(table, 0, count)
        return self.keys[layer][slots], self.values[layer][slots]

    def prepare_step(self, tables: list[list[int]], positions: list[int]) -> PagedStep:
        """Row b writes its new token at ``positions[b]`` and attends to tokens 0..positions[b]."""
        if self.kernel == "flex":
            return self._flex_step(tables, positions)
        device = self.device
        write = upload(self.write_slots(tables, positions), torch.long, device)
        by_length: dict[int, list[int]] = {}
        for row, p in enumerate(positions):
            by_length.setdefault(max(GATHER_GROUP_TOKENS, _pow2(p + 1)), []).append(row)
        if len(by_length) == 1:
            group = self._gather_group(tables, positions)
            return PagedStep(write, group.mask, groups=[group])
        groups = [self._gather_group([tables[r] for r in rows], [positions[r] for r in rows], rows)
                  for _, rows in sorted(by_length.items())]
        return PagedStep(write, torch.ones(len(tables), 1, 1, 1, dtype=torch.bool, device=device),
                         groups=groups)

    def write_slots(self, tables: list[list[int]], positions: list[int]) -> list[int]:
        """The slot of each row's token at ``positions[b]`` (where a step writes its new token)."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for table, p in zip(tables, positions)]

    def _gather_group(self, tables: list[list[int]], positions: list[int], rows: list[int] | None = None) -> GatherGroup:
        bs = self.block_size
        length = max(positions) + 1
        width = blocks_for(length, bs)
        padded = torch.zeros(len(tables), width, dtype=torch.long)
        for row, table in enumerate(tables):
            n = min(len(table), width)
            padded[row, :n] = torch.tensor(table[:n], dtype=torch.long)
        t = torch.arange(length)
        pos = torch.tensor(positions, dtype=torch.long)
        slots = padded[:, t // bs] * bs + t % bs                    # (b, L)
        mask = t[None, :] <= pos[:, None]                            # (b, L)
        gather = torch.where(mask, slots, torch.zeros_like(slots))   # null block past each length
        device = self.device
        return GatherGroup(upload(gather, torch.long, device), upload(mask[:, None, None, :], torch.bool, device),
                           None if rows is None else upload(rows, torch.long, device))

    def flex_metadata(self, tables: list[list[int]], positions: list[int]) -> FlexMetadata:
        """The flex kernel's view of a step on the host, padded to a compiled shape."""
        bs, rows = self.block_size, len(tables)
        used = np.array([blocks_for(p + 1, bs) for p in positions], dtype=np.int64)
        # The compiled kernel is specialised to static shapes (flex decoding needs a static batch): rows
        # are padded to a power of two and tables to a ``flex_width``, so few shapes ever compile. Padded
        # rows list no blocks (they read nothing) and write their token into the null block, which the
        # flex kernel never reads; their output is dropped.
        padded_rows, width = _pow2(rows), flex_width(int(used.max()))
        counts = np.zeros(padded_rows, dtype=np.int64)
        counts[:rows] = used
        indices = np.full((padded_rows, width), NULL_BLOCK, dtype=np.int64)
        for row, (table, n) in enumerate(zip(tables, used.tolist())):
            indices[row, :n] = table[:n]
        blocks = indices[:rows][np.arange(width) < used[:, None]]  # row by row, in table order
        starts = np.cumsum(used) - used
        write = np.zeros(padded_rows, dtype=np.int64)
        write[:rows] = self.write_slots(tables, positions)
        return FlexMetadata(padded_rows, width, counts=counts, indices=indices, write=write, blocks=blocks,
                            owner=np.repeat(np.arange(rows), used),
                            logical=np.arange(len(blocks)) - np.repeat(starts, used),
                            positions=np.asarray(positions, dtype=np.int64))

    def load_flex_rows(self, meta: FlexMetadata) -> None:
        """Writes which row owns each block and each row's newest position, where the mask reads them."""
        packed = torch.from_numpy(np.concatenate([meta.blocks, meta.owner, meta.logical, meta.positions]))
        self.write_flex_rows(*upload(packed, torch.long, self.device).split(
            [len(meta.blocks), len(meta.owner), len(meta.logical), len(meta.positions)]))

    def write_flex_rows(self, blocks: torch.Tensor, owner: torch.Tensor, logical: torch.Tensor,
                        last: torch.Tensor) -> None:
        """The mask's tables from device tensors: ``owner[i]`` is the row of block ``blocks[i]`` and ``logical[i]``
        its index in that row's table (entries naming the null block, owner -1, are padding); ``last[b]`` is
        row b's newest position. Kernels only: a CUDA graph captures it."""
        self._owner.fill_(-1)
        self._owner[blocks.long()] = owner.int()
        self._logical[blocks.long()] = logical.int()
        self._last[:last.shape[0]] = last.int()

    def block_mask(self, counts: torch.Tensor, indices: torch.Tensor):
        """A FlexAttention block mask over the pool's slots: row b visits blocks indices[b, :counts[b]]."""
        from torch.nn.attention.flex_attention import BlockMask

        rows, width = indices.shape
        return BlockMask.from_kv_blocks(
            counts.view(rows, 1, 1), indices.view(rows, 1, 1, width), BLOCK_SIZE=(128, self.block_size),
            mask_mod=self.mask_mod, seq_lengths=(1, self.allocator.num_blocks * self.block_size),
            compute_q_blocks=False)

    def _flex_step(self, tables: list[list[int]], positions: list[int]) -> PagedStep:
        meta = self.flex_metadata(tables, positions)
        self.load_flex_rows(meta)
        rows = meta.padded_rows
        packed = upload(torch.from_numpy(np.concatenate([meta.counts, meta.indices.ravel(), meta.write])), torch.long,
                        self.device)
        counts, indices, write = packed.split([rows, rows * meta.width, rows])
        return PagedStep(write[:len(tables)], torch.ones(len(tables), 1, 1, 1, dtype=torch.bool, device=self.device),
                         block_mask=self.block_mask(counts.int(), indices.int().view(rows, meta.width)))
