"""Shared-memory segments for same-host KV transfers.

The producer owns segments under ``/dev/shm``, named
``pdserve-kv-<producer pid>-<random>``, and reuses them across transfers
(``SegmentPool``): a transfer takes one at least its size, writes each
chunk's K/V there, and gRPC carries only the chunk's offset and checksum.
The consumer maps each segment read-only once and keeps the mapping
(``SegmentCache``), copying chunks into its KV pool. Reuse is the point:
a fresh segment costs a page fault per 4 KiB on first write and an unmap
after, which measured at half the time of a transfer; a reused one is
already resident and mapped on both sides.

Cleanup on every exit path: a finished transfer's segment goes back to the
pool (idle bytes capped, the rest unlinked); an aborted transfer's segment
is unlinked at once (the peer may still read it, so it is never reused);
``SegmentPool.close`` unlinks the idle ones when the producer stops; a
producer that crashed leaves names whose pid is dead, which
``sweep_orphans`` removes (at every service start and periodically in
decode); the consumer drops mappings whose name is gone. The memory of an
unlinked segment is freed when the last mapping goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import re
import uuid
from collections import OrderedDict
from dataclasses import replace

from pdserve.errors import InvalidArgument
from pdserve.kv.wire import KVChunkData, KVLayout

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "pdserve-kv-"
# The first bytes of a segment name the transfer it holds now (2-byte length, the id): decode reads a
# segment only for the transfer it is stamped with, so a stream cannot point decode at another
# transfer's KV (the name of a segment is visible to anyone on the host).
SEGMENT_HEADER = 512
_NAME = re.compile(r"^pdserve-kv-(\d+)-[0-9a-f]{16}$")


def host_id() -> str:
    """Equal on two processes exactly when they share this kernel and this /dev/shm ("" without one)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        st = os.stat(SHM_DIR)
    except OSError:
        return ""
    return f"{boot}:{st.st_dev}:{st.st_ino}"


class Segment:
    """One mapped segment: ``create`` (producer, writable) or ``open`` (consumer, read-only)."""

    def __init__(self, name: str, fd: int, size: int, writable: bool) -> None:
        self.name = name
        self.size = size
        try:
            # MAP_POPULATE: fault every page in at map time, in one kernel pass, not one trap per page.
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                 prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            os.close(fd)
        self.view = memoryview(self.map)
        self._pinned = 0  # the address cudaHostRegister page-locked, -1 if that failed

    def stamp(self, transfer_id: str) -> None:
        """Marks the segment as holding ``transfer_id``'s KV (the producer, before any chunk is announced)."""
        raw = transfer_id.encode()
        if len(raw) > SEGMENT_HEADER - 2:
            raise InvalidArgument(f"transfer_id: at most {SEGMENT_HEADER - 2} bytes in a shared-memory transfer")
        self.view[:2 + len(raw)] = len(raw).to_bytes(2, "little") + raw

    def bears(self, transfer_id: str) -> bool:
        n = int.from_bytes(self.view[:2], "little")
        return n <= SEGMENT_HEADER - 2 and bytes(self.view[2:2 + n]) == transfer_id.encode()

    def pin_for_cuda(self) -> None:
        """Page-locks the mapping (once per segment; pooled segments keep it) so device-to-host copies
        into it run at pinned speed instead of through a pageable staging buffer."""
        if self._pinned:
            return
        import torch

        ptr = torch.frombuffer(self.map, dtype=torch.uint8).data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.size, 0)
        if int(err) != 0:
            log.warning("cudaHostRegister of KV segment %s failed (%s): pageable copies", self.name, err)
            self._pinned = -1
            return
        self._pinned = ptr

    @classmethod
    def create(cls, size: int) -> "Segment":
        name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, max(size, 1))
        except BaseException:
            os.close(fd)
            unlink(name)
            raise
        return cls(name, fd, max(size, 1), writable=True)

    @classmethod
    def open(cls, name: str) -> "Segment":
        """Maps a peer's segment read-only; ``InvalidArgument`` for anything but ours."""
        if not _NAME.match(name):
            raise InvalidArgument(f"header.shm_segment: {name!r} is not a pdserve KV segment name")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise InvalidArgument(f"header.shm_segment: cannot open {name!r} ({exc.strerror}); "
                                  "is the producer on this host?") from None
        size = os.fstat(fd).st_size
        return cls(name, fd, size, writable=False)

    def close(self) -> None:
        if self._pinned > 0:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self._pinned)
            self._pinned = 0
        # A view still held elsewhere keeps the mapping until it is collected.
        with contextlib.suppress(BufferError):
            self.view.release()
            self.map.close()


class SegmentPool:
    """The producer's segments: ``acquire`` one for a transfer, ``release`` it after the consumer
    acknowledged, ``discard`` it after a failure. Sizes are rounded up to a power of two (>= 1 MiB)
    so transfers of similar length share segments, and a transfer takes the smallest idle segment that
    holds it; at most ``idle_limit`` bytes stay idle (the smallest go first), except that one segment larger
    than that stays when nothing else is idle (0: none ever stays): a prompt's KV of 1 GiB is a 2 GiB
    segment, and creating (and on a GPU host page-locking) one per transfer took seconds."""

    MIN_SIZE = 1 << 20
    IDLE_LIMIT = 1 << 30

    def __init__(self, idle_limit: int = IDLE_LIMIT) -> None:
        self.idle_limit = idle_limit
        self._idle: dict[int, list[Segment]] = {}
        self.idle_bytes = 0
        self.created = 0

    def acquire(self, size: int) -> Segment:
        """An idle segment of at least ``size`` bytes (the smallest), or a new one of its size class."""
        size_class = max(self.MIN_SIZE, 1 << (max(size, 1) - 1).bit_length())
        fits = [c for c, idle in self._idle.items() if idle and c >= size_class]
        if fits:
            c = min(fits)
            self.idle_bytes -= c
            return self._idle[c].pop()
        self.created += 1
        return Segment.create(size_class)

    def release(self, segment: Segment) -> None:
        """Idle for the next transfer. Beyond ``idle_limit`` the smallest idle segments go first: a large one
        serves every shorter transfer too (and on a GPU host pinning it again took seconds: 8 GiB, ~5 s)."""
        if self.idle_limit == 0:
            self.discard(segment)
            return
        self._idle.setdefault(segment.size, []).append(segment)
        self.idle_bytes += segment.size
        while self.idle_bytes > self.idle_limit:
            sizes = sorted(c for c, idle in self._idle.items() if idle)
            if len(sizes) == 1 and len(self._idle[sizes[0]]) == 1:
                break  # one segment larger than the limit stays when nothing else is idle
            self.idle_bytes -= sizes[0]
            self.discard(self._idle[sizes[0]].pop())

    @staticmethod
    def discard(segment: Segment) -> None:
        unlink(segment.name)
        segment.close()

    def close(self) -> None:
        for segments in self._idle.values():
            for segment in segments:
                self.discard(segment)
        self._idle.clear()
        self.idle_bytes = 0


class SegmentCache:
    """The consumer's mappings of producers' segments, by name, least recently used evicted.

    ``open`` hands out a mapping for one stream and ``release`` takes it back: a mapping evicted (or whose
    file its producer removed) while a stream still reads it is closed when that stream releases it, never
    under it."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._maps: OrderedDict[str, Segment] = OrderedDict()
        self._users: dict[int, int] = {}  # id(segment) -> streams reading it
        self._retired: set[int] = set()   # ids of segments out of the cache, closed at their last release

    def open(self, name: str) -> Segment:
        segment = self._maps.get(name)
        if segment is not None:
            self._maps.move_to_end(name)
        else:
            # A new name: first forget mappings of segments their producer removed (or that were swept).
            for gone in [n for n in self._maps if not os.path.exists(os.path.join(SHM_DIR, n))]:
                self._retire(self._maps.pop(gone))
            segment = self._maps[name] = Segment.open(name)
            while len(self._maps) > self.capacity:
                self._retire(self._maps.popitem(last=False)[1])
        self._users[id(segment)] = self._users.get(id(segment), 0) + 1
        return segment

    def release(self, segment: Segment) -> None:
        users = self._users.pop(id(segment), 1) - 1
        if users > 0:
            self._users[id(segment)] = users
        elif id(segment) in self._retired:
            self._retired.discard(id(segment))
            segment.close()

    def _retire(self, segment: Segment) -> None:
        if self._users.get(id(segment)):
            self._retired.add(id(segment))  # closed by the last stream reading it
        else:
            segment.close()

    def forget(self, name: str) -> None:
        segment = self._maps.pop(name, None)
        if segment is not None:
            self._retire(segment)

    def __len__(self) -> int:
        return len(self._maps)


def unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans() -> int:
    """Removes segments whose producer process is gone; returns how many."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    removed = 0
    for name in names:
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            unlink(name)
            removed += 1
    if removed:
        log.info("removed %d orphaned KV segments from %s", removed, SHM_DIR)
    return removed


async def sweep_periodically(period_s: float = 60.0) -> None:
    """``sweep_orphans`` every ``period_s``: a producer that crashed while its peer kept running."""
    while True:
        await asyncio.sleep(period_s)
        sweep_orphans()


def segment_names() -> list[str]:
    """This host's pdserve KV segments now (tests and operators)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except OSError:
        return []


def chunk_from_segment(chunk: KVChunkData, segment: Segment, layout: KVLayout) -> KVChunkData:
    """The chunk with its K/V read from ``segment`` at its offset (views, no copy)."""
    n = chunk.token_count * layout.token_bytes
    if chunk.key or chunk.value:
        raise InvalidArgument("chunk: inline key/value bytes in a shared-memory transfer")
    if chunk.token_count < 1 or chunk.shm_offset < SEGMENT_HEADER or chunk.shm_offset + 2 * n > segment.size:
        raise InvalidArgument(f"chunk.shm_offset: {chunk.shm_offset} + {2 * n} bytes outside the "
                              f"{segment.size}-byte segment")
    data = segment.view[chunk.shm_offset: chunk.shm_offset + 2 * n]
    return replace(chunk, key=data[:n], value=data[n:])
