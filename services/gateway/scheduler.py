"""Which prefill and which decode instance serve a request, among those that are up.

``Registry`` holds the configured instances and whether each is up: a probe
task asks every instance's gRPC health service every ``probe_interval_s``
(SERVING: up; NOT_SERVING, as a draining instance answers: down at once; no
answer within the timeout ``probe_misses`` times in a row: down, since one
slow answer from a busy instance is no outage), and a call that fails with
UNAVAILABLE marks its instance down at once, until a probe finds it serving
again. When every instance of a role is down, picks fall back to all of
them: a wrong "down" must not turn into an outage of its own.

The registry also asks each decode instance for its ``GetStats`` every
probe (KV blocks used and total, running batch, queue), the load report
decode-side policies read.

``Scheduler`` is the policy interface. ``LoadAwareScheduler`` (the default)
sends a prompt to the less loaded of two random prefill instances by
outstanding prompt tokens (power of two choices) and a request to the decode
instance with the lowest KV-pool plus batch occupancy; it also decides
conditional disaggregation: a prompt up to ``local_prefill_tokens``, or any
prompt while every prefill instance has ``prefill_full_tokens`` outstanding,
is prefilled on the decode instance itself (``pick_prefill`` returns
``""``). ``RoundRobinScheduler`` cycles through the instances. Both skip
those the request already failed on. The router reports the work it starts
and ends on each instance (``begin``/``end``), which is what the load-aware
policy counts between stats reports. With no prefill instances the cluster is
colocated: every prompt is prefilled on decode.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import random
import socket
import time
from typing import Iterable, Protocol

import grpc

from pdserve.errors import Unavailable
from pdserve.rpc import ChannelPool, health_status
from pdserve.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)


INSTANCE_ROLES = ("prefill", "decode")


async def resolve(entry: str) -> list[str]:
    """The instances behind a configured ``host:port``: one per address its host resolves to (a scaled
    compose service's name resolves to every replica); an IP literal is itself."""
    host, _, port = entry.rpartition(":")
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
        return [entry]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(bare, int(port), type=socket.SOCK_STREAM)
    found = []
    for family, *_, sockaddr in infos:
        address = f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"
        if address not in found:
            found.append(address)
    return found


class Registry:
    def __init__(self, prefill: Iterable[str], decode: Iterable[str], probe_interval_s: float = 1.0,
                 probe_timeout_s: float = 1.0, probe_misses: int = 3, channels: ChannelPool | None = None,
                 resolver=resolve) -> None:
        self.configured = {"prefill": tuple(prefill), "decode": tuple(decode)}
        # Configured entries as last resolved (until resolved: the entry itself, which gRPC resolves).
        self._resolved: dict[str, list[str]] = {e: [e] for role in INSTANCE_ROLES for e in self.configured[role]}
        self._registered: dict[str, dict[str, float]] = {role: {} for role in INSTANCE_ROLES}  # address -> expiry
        self._resolver = resolver
        self.instances: dict[str, tuple[str, ...]] = {}
        self._refresh_instances()
        self.stats: dict[str, decode_pb2.DecodeStats] = {}  # the last load report of each decode instance
        self._down_events: dict[str, asyncio.Event] = {}
        self._channels = channels
        self._down: set[str] = set()
        self._misses: dict[str, int] = {}
        self.probe_misses = probe_misses
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._task: asyncio.Task | None = None

    def _refresh_instances(self) -> None:
        now = time.monotonic()
        for role in INSTANCE_ROLES:
            registered = self._registered[role]
            for address in [a for a, expiry in registered.items() if expiry < now]:
                log.warning("%s instance %s left: no heartbeat", role, address)
                del registered[address]
            found = [a for e in self.configured[role] for a in self._resolved[e]] + list(registered)
            self.instances[role] = tuple(dict.fromkeys(found))

    async def resolve_configured(self) -> None:
        """Resolves every configured entry again (instances appear and go as a name's addresses change)."""
        for entry in self._resolved:
            try:
                found = await self._resolver(entry)
            except (OSError, ValueError) as exc:
                log.warning("cannot resolve %s (%s); keeping %s", entry, exc, ",".join(self._resolved[entry]))
                continue
            if found and found != self._resolved[entry]:
                log.info("%s resolves to %s", entry, ",".join(found))
                self._resolved[entry] = found
        self._refresh_instances()

    def heartbeat(self, role: str, address: str, interval_s: float, draining: bool = False) -> None:
        """An instance announced itself (``Gateway.Heartbeat``): in the pool for three intervals more, or out
        at once when it drains."""
        registered = self._registered[role]
        if draining:
            if registered.pop(address, None) is not None:
                log.info("%s instance %s left: draining", role, address)
            self.mark_down(address, "draining (heartbeat)")
        else:
            if address not in registered and address not in self.instances[role]:
                log.info("%s instance %s joined", role, address)
            registered[address] = time.monotonic() + 3 * interval_s  # whether it is up: the health probes
        self._refresh_instances()

    def up(self, role: str) -> list[str]:
        return [a for a in self.instances[role] if a not in self._down]

    def is_up(self, address: str) -> bool:
        return address not in self._down

    def candidates(self, role: str, exclude: frozenset[str]) -> list[str]:
        """Where a request may go: up and not yet failed for it; else up; else (all look down) any configured."""
        configured = self.instances[role]
        up = self.up(role)
        found = [a for a in up if a not in exclude] or up or [a for a in configured if a not in exclude] \
            or list(configured)
        if not found:
            raise Unavailable(f"no {role} instance is configured or registered")
        return found

    def down_event(self, address: str) -> asyncio.Event:
        """Set when ``address`` is next marked down: what calls waiting on it race against."""
        event = self._down_events.get(address)
        if event is None:
            event = self._down_events[address] = asyncio.Event()
        return event

    def mark_down(self, address: str, why: str) -> None:
        self.stats.pop(address, None)  # its last load report no longer says anything
        event = self._down_events.pop(address, None)
        if event is not None:
            event.set()  # calls waiting on it give up; later waits get a fresh event
        if address not in self._down:
            log.warning("instance %s marked down: %s", address, why)
            self._down.add(address)

    def _mark_up(self, address: str) -> None:
        if address in self._down:
            log.info("instance %s is serving again", address)
            self._down.discard(address)

    async def _load_report(self, address: str) -> None:
        try:
            self.stats[address] = await decode_pb2_grpc.DecodeStub(self._channels.get(address)).GetStats(
                decode_pb2.GetStatsRequest(), timeout=self.probe_timeout_s)
        except grpc.aio.AioRpcError:
            pass  # liveness is the health check's business; the last report stands

    async def probe_once(self) -> None:
        await self.resolve_configured()
        addresses = [a for role in self.instances.values() for a in role]
        reports = [self._load_report(a) for a in self.instances["decode"]] if self._channels is not None else []
        results = (await asyncio.gather(*(health_status(a, timeout=self.probe_timeout_s) for a in addresses),
                                        *reports))[:len(addresses)]
        for address, status in zip(addresses, results):
            if status == "serving":
                self._misses.pop(address, None)
                self._mark_up(address)
            elif status == "not serving":
                self.mark_down(address, "health check: NOT_SERVING (draining or stopping)")
            else:
                self._misses[address] = self._misses.get(address, 0) + 1
                if self._misses[address] >= self.probe_misses:
                    # A peer silent past the timeout (a partition) may leave our connection to it wedged:
                    # drop it. One that refuses (stopping: its listener closed while its calls finish)
                    # keeps its connections, so those calls can finish.
                    if self._misses[address] == self.probe_misses and status == "silent" \
                            and self._channels is not None:
                        self._channels.reset(address)
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
    policy: str  # its name in the configuration
    reason: str  # why the last pick went where it did (for the trace)

    def pick_prefill(self, prompt_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        """The address of the prefill instance for a prompt of ``prompt_tokens`` ("": prefill on decode)."""

    def pick_decode(self, prompt_tokens: int, max_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        """The address of the decode instance that will hold the request's KV."""

    def begin(self, role: str, address: str, tokens: int) -> None:
        """Work of ``tokens`` (prefill: prompt tokens; decode: KV tokens) started on ``address``."""

    def end(self, role: str, address: str, tokens: int) -> None:
        """That work ended (done, failed or cancelled)."""


class _Outstanding:
    """Work this gateway has started and not yet seen end, per instance: requests and tokens."""

    def __init__(self) -> None:
        self.tokens: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.reason = ""

    def begin(self, role: str, address: str, tokens: int) -> None:
        self.tokens[address] += tokens
        self.requests[address] += 1

    def end(self, role: str, address: str, tokens: int) -> None:
        self.tokens[address] -= tokens
        self.requests[address] -= 1


class RoundRobinScheduler(_Outstanding):
    policy = "round_robin"

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry
        self._turn = {"prefill": 0, "decode": 0}

    def _pick(self, role: str, exclude: frozenset[str]) -> str:
        candidates = self.registry.candidates(role, exclude)
        self._turn[role] += 1
        self.reason = f"round robin: turn {self._turn[role]} of {len(candidates)} instances"
        return candidates[self._turn[role] % len(candidates)]

    def pick_prefill(self, prompt_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        if not self.registry.instances["prefill"]:
            self.reason = "colocated: no prefill instances"
            return ""
        return self._pick("prefill", exclude)

    def pick_decode(self, prompt_tokens: int, max_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        return self._pick("decode", exclude)


class LoadAwareScheduler(_Outstanding):
    policy = "load_aware"

    def __init__(self, registry: Registry, local_prefill_tokens: int = 0, prefill_full_tokens: int = 0,
                 rng: random.Random | None = None) -> None:
        super().__init__()
        self.registry = registry
        self.local_prefill_tokens = local_prefill_tokens
        self.prefill_full_tokens = prefill_full_tokens
        self._rng = rng or random.Random()
        self.local_prefills = 0  # prompts sent to decode by conditional disaggregation

    def pick_prefill(self, prompt_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        if not self.registry.instances["prefill"]:
            self.reason = "colocated: no prefill instances"
            return ""
        if prompt_tokens <= self.local_prefill_tokens:
            self.local_prefills += 1
            self.reason = f"on decode: prompt of {prompt_tokens} tokens <= local_prefill_tokens"
            return ""
        candidates = self.registry.candidates("prefill", exclude)
        pair = self._rng.sample(candidates, 2) if len(candidates) > 1 else candidates
        best = min(pair, key=lambda a: self.tokens[a])
        if self.prefill_full_tokens and self.tokens[best] >= self.prefill_full_tokens:
            self.local_prefills += 1
            self.reason = f"on decode: prefill pool full ({self.tokens[best]} prompt tokens outstanding)"
            return ""  # the prefill pool is full: prefill on decode rather than queue
        self.reason = (f"fewest outstanding prompt tokens of {len(pair)} sampled: "
                       + ", ".join(f"{a}={self.tokens[a]}" for a in pair))
        return best

    def decode_load(self, address: str) -> float:
        """KV-pool plus batch occupancy in [0, 2+]: the larger of this gateway's own count and the instance's
        last report (which also sees other gateways' requests, up to a probe interval old)."""
        stats = self.registry.stats.get(address)
        if stats is None or not stats.kv_blocks_total:
            return float(self.requests[address])  # no report yet: fewest requests in flight
        capacity = stats.kv_blocks_total * stats.kv_block_size
        kv = max(self.tokens[address], stats.kv_blocks_used * stats.kv_block_size) / capacity
        batch = max(self.requests[address], stats.running + stats.ready + stats.queued) / max(1, stats.max_batch)
        return kv + batch

    def pick_decode(self, prompt_tokens: int, max_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        candidates = self.registry.candidates("decode", exclude)
        self._rng.shuffle(candidates)  # ties go to a random one
        loads = {a: self.decode_load(a) for a in candidates}
        best = min(candidates, key=loads.__getitem__)
        self.reason = "lowest KV + batch occupancy: " + ", ".join(f"{a}={v:.2f}" for a, v in loads.items())
        return best
