"""Prefix identity: the hash chain that names a prompt's full KV blocks.

Block ``i`` of a prompt (tokens ``[i * block_size, (i + 1) * block_size)``) is
named by a hash over *every* token up to its end: ``h_i = xxh3_64(h_{i-1} ||
tokens of block i)``. Two prompts share block ``i``'s key exactly when they
share tokens ``0 .. (i + 1) * block_size - 1``, which is when block ``i``'s KV
is the same (KV depends on the token and everything before it). Decode pools,
prefill caches and the gateway's routing index all name blocks this way, so
one prompt's keys mean the same everywhere. Only full blocks have keys.

Pure Python (no torch): the gateway imports it.
"""

from __future__ import annotations

from array import array
from typing import Sequence

import xxhash


def block_hashes(token_ids: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """The keys of the full blocks of ``token_ids`` (at most ``limit`` of them)."""
    full = len(token_ids) // block_size
    if limit is not None:
        full = min(full, limit)
    tokens = array("i", token_ids[:full * block_size]).tobytes()
    step = 4 * block_size
    out, previous = [], b""
    for i in range(full):
        digest = xxhash.xxh3_64_digest(previous + tokens[i * step:(i + 1) * step])
        out.append(int.from_bytes(digest, "little"))
        previous = digest
    return out


def reusable_blocks(prompt_tokens: int, block_size: int) -> int:
    """The most blocks of a prompt a cache may supply: whole blocks that leave at least one prompt token to
    compute (its logits sample the first token; a transfer is never empty)."""
    return max(0, (prompt_tokens - 1) // block_size)


# Keys of cached blocks an instance reports in its stats, at most (8 bytes each): what the gateway's
# cache-aware routing knows of it.
CACHED_KEYS_REPORTED = 4096
