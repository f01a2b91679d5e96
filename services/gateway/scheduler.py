"""Which prefill and which decode instance serve a request, among those that are up.

``Registry`` holds the configured instances and whether each is up: a probe
task asks every instance's gRPC health service every ``probe_interval_s``
(SERVING: up; NOT_SERVING, as a draining instance answers: down at once; no
answer within the timeout ``probe_misses`` times in a row: down, since one
slow answer from a busy instance is no outage), and a call that fails with
UNAVAILABLE marks its instance down at once, until a probe finds it serving
again. When every instance of a role is down, picks fall back to all of
them: a wrong "down" must not turn into an outage of its own.

``Scheduler`` is the seam for load-aware policies; ``RoundRobinScheduler``
cycles through the instances that are up, skipping any the request already
failed on. With no prefill instances the cluster is colocated:
``pick_prefill`` returns ``""`` and prompts are prefilled on the decode
instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Iterable, Protocol

from pdserve.errors import Unavailable
from pdserve.rpc import health_status

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, prefill: Iterable[str], decode: Iterable[str], probe_interval_s: float = 1.0,
                 probe_timeout_s: float = 1.0, probe_misses: int = 3) -> None:
        self.instances = {"prefill": tuple(prefill), "decode": tuple(decode)}
        self._down: set[str] = set()
        self._misses: dict[str, int] = {}
        self.probe_misses = probe_misses
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._task: asyncio.Task | None = None

    def up(self, role: str) -> list[str]:
        return [a for a in self.instances[role] if a not in self._down]

    def is_up(self, address: str) -> bool:
        return address not in self._down

    def mark_down(self, address: str, why: str) -> None:
        if address not in self._down:
            log.warning("instance %s marked down: %s", address, why)
            self._down.add(address)

    def _mark_up(self, address: str) -> None:
        if address in self._down:
            log.info("instance %s is serving again", address)
            self._down.discard(address)

    async def probe_once(self) -> None:
        addresses = [a for role in self.instances.values() for a in role]
        results = await asyncio.gather(*(health_status(a, timeout=self.probe_timeout_s) for a in addresses))
        for address, status in zip(addresses, results):
            if status == "serving":
                self._misses.pop(address, None)
                self._mark_up(address)
            elif status == "not serving":
                self.mark_down(address, "health check: NOT_SERVING (draining or stopping)")
            else:
                self._misses[address] = self._misses.get(address, 0) + 1
                if self._misses[address] >= self.probe_misses:
                    self.mark_down(address, f"health check: no answer {self._misses[address]} times in a row")

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(self.probe_interval_s)
                try:
                    await self.probe_once()
                except Exception:  # a probe must never end the loop
                    log.exception("health probe failed")

        self._task = asyncio.get_running_loop().create_task(loop(), name="registry-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Scheduler(Protocol):
    registry: Registry

    def pick_prefill(self, prompt_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        """The address of the prefill instance for a prompt of ``prompt_tokens`` ("": prefill on decode)."""

    def pick_decode(self, prompt_tokens: int, max_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        """The address of the decode instance that will hold the request's KV."""


class RoundRobinScheduler:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._turn = {"prefill": 0, "decode": 0}

    def _pick(self, role: str, exclude: frozenset[str]) -> str:
        configured = self.registry.instances[role]
        up = self.registry.up(role)
        # Preference: up and not yet failed for this request; up; then (all look down) any configured one.
        candidates = [a for a in up if a not in exclude] or up or \
            [a for a in configured if a not in exclude] or list(configured)
        if not candidates:
            raise Unavailable(f"no {role} instance is configured")
        self._turn[role] += 1
        return candidates[self._turn[role] % len(candidates)]

    def pick_prefill(self, prompt_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        if not self.registry.instances["prefill"]:
            return ""
        return self._pick("prefill", exclude)

    def pick_decode(self, prompt_tokens: int, max_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        return self._pick("decode", exclude)
