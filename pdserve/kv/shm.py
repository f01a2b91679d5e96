"""Shared-memory segments for same-host KV transfers.

The producer creates one segment per transfer under ``/dev/shm``, named
``pdserve-kv-<producer pid>-<random>``, and writes each chunk's K/V there;
gRPC carries only the chunk's offset and checksum. The consumer opens the
segment read-only, unlinks its name at once (the mapping keeps the memory
until both ends unmap) and copies chunks into its KV pool.

Cleanup on every exit path: the consumer unlinks on open; the producer
unlinks in ``close`` (transfer finished, aborted or failed); a producer that
crashed before the consumer opened its segment leaves a name whose pid is
dead, which ``sweep_orphans`` (run when a service starts) removes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import uuid
from dataclasses import replace

from pdserve.errors import InvalidArgument
from pdserve.kv.wire import KVChunkData, KVLayout

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "pdserve-kv-"
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
            self.map = mmap.mmap(fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            os.close(fd)
        self.view = memoryview(self.map)

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
        """Maps a peer's segment and unlinks its name; ``InvalidArgument`` for anything but ours."""
        if not _NAME.match(name):
            raise InvalidArgument(f"header.shm_segment: {name!r} is not a pdserve KV segment name")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise InvalidArgument(f"header.shm_segment: cannot open {name!r} ({exc.strerror}); "
                                  "is the producer on this host?") from None
        unlink(name)
        size = os.fstat(fd).st_size
        return cls(name, fd, size, writable=False)

    def close(self) -> None:
        # A view still held elsewhere keeps the mapping until it is collected.
        with contextlib.suppress(BufferError):
            self.view.release()
            self.map.close()


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
    if chunk.token_count < 1 or chunk.shm_offset + 2 * n > segment.size:
        raise InvalidArgument(f"chunk.shm_offset: {chunk.shm_offset} + {2 * n} bytes outside the "
                              f"{segment.size}-byte segment")
    data = segment.view[chunk.shm_offset: chunk.shm_offset + 2 * n]
    return replace(chunk, key=data[:n], value=data[n:])
