"""Small host <-> device moves that never wait in the driver for the kernels queued before them.

A blocking copy between pageable host memory and the GPU (``torch.tensor(xs, device=...)``, ``.to(device)``,
``.tolist()``, ``.item()``, ``.cpu()``) first waits for everything queued on its stream. Measured on the
H200 (``bench.copy_timeline``, session 16): while the prefill worker read its first token that way at the
end of an 8k pass, the KV copies' waiter thread, blocked on each copy's event, did not return until the
pass ended -- it learnt of copies that had finished up to 180 ms earlier only then, so the senders had
nothing to send for most of the pass. ``upload`` goes through pinned memory and does not wait;
``download`` waits for the device on an event (sleeping, the GIL released) and then copies what is ready.
"""

from __future__ import annotations

import torch


def upload(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``data`` (a list, or a CPU tensor) as a ``dtype`` tensor on ``device``, without waiting for the device's
    queued work: on a GPU the host copy is pinned and copied asynchronously (the caching host allocator keeps
    it until the copy ran)."""
    host = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor's copy on its way to the host: queued now (into pinned memory, behind the kernels that
    compute it), read later (``tolist`` waits on an event for that copy alone, not for work queued since)."""

    def __init__(self, t: torch.Tensor) -> None:
        self._ready: torch.cuda.Event | None = None
        if t.is_cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event(blocking=True)
            self._ready.record(torch.cuda.current_stream(t.device))
            t = host
        self._host = t

    def tolist(self) -> list:
        if self._ready is not None:
            self._ready.synchronize()  # sleeps, the GIL released
        return self._host.tolist()


def download(t: torch.Tensor) -> list:
    """``t.tolist()``, waiting for the device on an event instead of in a blocking copy."""
    return HostCopy(t).tolist()
