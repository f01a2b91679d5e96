"""Which prefill and which decode instance serve a request, among those that are up.

``Registry`` holds the instances (configured, resolved, registered by
heartbeat) and whether each is up: a probe task asks every instance's gRPC
health service for its role every ``probe_interval_s`` (through the channel
calls use while it is up, a fresh one while it is down; SERVING: up; NOT_SERVING, as a draining instance answers, or
another service on its port: down at once; no answer within the timeout
``probe_misses`` times in a row: down, since one slow answer from a busy
instance is no outage), a call that fails with UNAVAILABLE marks its instance
down at once until a probe finds it serving again, and repeated failed calls
eject it for a cooldown. An instance is down until its first probe answers.
When every instance of a role is down, picks fall back to all of them: a
wrong "down" must not turn into an outage of its own.

The registry also asks each instance for its ``GetStats`` every probe (decode:
KV blocks used and total, running batch, queue; prefill: queued tokens), the
load reports policies read, and each report's ``incarnation``, which changes
when an instance restarts on the same address.

``Scheduler`` is the policy interface. ``LoadAwareScheduler`` (the default)
sends a prompt to the less loaded of two random prefill instances by
outstanding prompt tokens (power of two choices) and a request to the decode
instance with the lowest KV-pool plus batch occupancy; it also decides
conditional disaggregation: a prompt up to ``local_prefill_tokens``, or any
prompt while every prefill instance has ``prefill_full_tokens`` outstanding,
is prefilled on the decode instance itself (``pick_prefill`` returns
``""``). ``CacheAwareScheduler`` (the default) adds what instances hold cached,
and prefills on decode a prompt that the picked decode instance holds cached
but for a few tokens. ``RoundRobinScheduler`` cycles through the instances. Both skip
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
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Protocol, Sequence

import grpc

from pdserve.errors import ResourceExhausted, Unavailable
from pdserve.prefix import block_hashes, reusable_blocks
from pdserve.rpc import ChannelPool, health_status
from pdserve.tls import NO_AUTH
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)


INSTANCE_ROLES = ("prefill", "decode")
# The health service each role's instances report SERVING on.
SERVICES = {"prefill": prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name,
            "decode": decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name}
NOT_CHECKED = "not checked yet"


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


@dataclass
class _Outlier:
    """Consecutive failures of calls to one instance, and its ejection (outlier detection, as Envoy does)."""

    failures: int = 0
    ejections: int = 0
    until: float = 0.0


class Registry:
    """The instances a gateway routes to, and whether each is up.

    An instance is *up* once a health check answers SERVING for its role's service (``pdserve.v1.Prefill`` /
    ``pdserve.v1.Decode``), so another program (or another role) on its port is never taken for it. An up
    instance is checked through the pooled channel the gateway's calls use (a broken connection shows); a
    down one through a fresh channel, and the pooled one is replaced when it comes back (calls get a fresh
    connection, not one still backing off from failed attempts). It is down while unknown (never answered yet), draining (NOT_SERVING), answering for another
    service, silent or refusing ``probe_misses`` probes in a row, unreachable on a call, or ejected after
    ``EJECT_AFTER`` failed calls in a row (for a cooldown that doubles with each ejection). Each probe also
    fetches its load report (``GetStats``), whose ``incarnation`` tells a restart on the same address.
    An instance that leaves (heartbeats stop, a draining heartbeat, or its name resolves elsewhere) is
    forgotten: its channels close once their calls finish.
    """

    EJECT_AFTER = 3          # failed calls in a row
    EJECT_BASE_S = 5.0       # first ejection; doubles each time, up to EJECT_MAX_S
    EJECT_MAX_S = 60.0
    MAX_REGISTERED = 1024    # instances registered by heartbeat, per role
    LEFT_GRACE_S = 30.0      # calls still running on an instance that left get this long

    def __init__(self, prefill: Iterable[str], decode: Iterable[str], probe_interval_s: float = 1.0,
                 probe_timeout_s: float = 1.0, probe_misses: int = 3, channels: ChannelPool | None = None,
                 resolver=resolve) -> None:
        self.configured = {"prefill": tuple(prefill), "decode": tuple(decode)}
        # Configured entries as last resolved (until resolved: the entry itself, which gRPC resolves).
        self._resolved: dict[str, list[str]] = {e: [e] for role in INSTANCE_ROLES for e in self.configured[role]}
        self._registered: dict[str, dict[str, float]] = {role: {} for role in INSTANCE_ROLES}  # address -> expiry
        self._resolver = resolver
        self.instances: dict[str, tuple[str, ...]] = {role: () for role in INSTANCE_ROLES}
        self.stats: dict[str, decode_pb2.DecodeStats | prefill_pb2.PrefillStats] = {}  # last load reports
        self.incarnations: dict[str, str] = {}
        self._down_events: dict[str, asyncio.Event] = {}
        self._channels = channels
        self._down: dict[str, str] = {}  # address -> why it is not picked
        self._misses: dict[str, int] = {}
        self._outliers: dict[str, _Outlier] = {}
        self.probe_misses = probe_misses
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()  # set when an instance comes up
        self._refresh_instances()

    @property
    def ready(self) -> bool:
        """A request can be served: a decode instance is up, and a prefill instance too unless there are
        none (colocated)."""
        return bool(self.up("decode")) and (bool(self.up("prefill")) or not self.instances["prefill"])

    def _refresh_instances(self) -> None:
        now = time.monotonic()
        for role in INSTANCE_ROLES:
            registered = self._registered[role]
            for address in [a for a, expiry in registered.items() if expiry < now]:
                log.warning("%s instance %s left: no heartbeat", role, address)
                del registered[address]
            found = tuple(dict.fromkeys([a for e in self.configured[role] for a in self._resolved[e]] + list(registered)))
            for address in set(found) - set(self.instances[role]):
                self._down.setdefault(address, NOT_CHECKED)
            for address in set(self.instances[role]) - set(found):
                self._forget(address)
            self.instances[role] = found

    def _forget(self, address: str) -> None:
        """An instance left: drop what is known of it; its channels close once their calls finish."""
        for table in (self.stats, self.incarnations, self._misses, self._outliers, self._down):
            table.pop(address, None)
        event = self._down_events.pop(address, None)
        if event is not None:
            event.set()
        if self._channels is not None:
            self._channels.reset(address, self.LEFT_GRACE_S)

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
            self.mark_down(address, "draining (heartbeat)", unreachable=False)
        else:
            if address not in registered:
                if len(registered) >= self.MAX_REGISTERED:
                    raise ResourceExhausted(f"{role}: {self.MAX_REGISTERED} instances registered already")
                if address not in self.instances[role]:
                    log.info("%s instance %s joined", role, address)
            registered[address] = time.monotonic() + 3 * interval_s  # whether it is up: the health probes
        self._refresh_instances()

    def up(self, role: str) -> list[str]:
        return [a for a in self.instances[role] if a not in self._down]

    def is_up(self, address: str) -> bool:
        return address not in self._down and any(address in known for known in self.instances.values())

    def candidates(self, role: str, exclude: frozenset[str]) -> list[str]:
        """Where a request may go: up and not yet failed for it; else up; else (all look down) any known."""
        known = self.instances[role]
        up = self.up(role)
        found = [a for a in up if a not in exclude] or up or [a for a in known if a not in exclude] or list(known)
        if not found:
            raise Unavailable(f"no {role} instance is configured or registered")
        return found

    async def wait_up(self, role: str, exclude: frozenset[str], timeout_s: float) -> bool:
        """Waits (up to ``timeout_s``) until an instance of ``role`` outside ``exclude`` is up; True if one is.
        A request that found every instance down waits here for the health checks instead of spending its
        attempts on connections that are refused."""
        deadline = time.monotonic() + timeout_s
        while not [a for a in self.up(role) if a not in exclude]:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    def down_event(self, address: str) -> asyncio.Event:
        """Set when ``address`` is next found unreachable: what calls waiting on it race against."""
        event = self._down_events.get(address)
        if event is None:
            event = self._down_events[address] = asyncio.Event()
        return event

    def mark_down(self, address: str, why: str, unreachable: bool = True) -> None:
        """No new work for ``address``. ``unreachable``: calls waiting on it give up too (``down_event``);
        an instance that is draining or refuses new work still finishes the calls it has."""
        if not any(address in known for known in self.instances.values()):
            return  # not (or no longer) one of ours: nothing to remember
        self.stats.pop(address, None)  # its last load report no longer says anything
        if unreachable:
            event = self._down_events.pop(address, None)
            if event is not None:
                event.set()  # later waits get a fresh event
            # Calls failed because it could not be reached, which the health checks now see for themselves:
            # ejection is for an instance that looks healthy and fails its calls anyway.
            self._outliers.pop(address, None)
        if self._down.get(address, NOT_CHECKED) == NOT_CHECKED:
            log.warning("instance %s marked down: %s", address, why)
        self._down[address] = why

    def _mark_up(self, address: str) -> None:
        if address in self._down:
            why = self._down.pop(address)
            log.info("instance %s is serving%s", address, "" if why == NOT_CHECKED else " again")
            self._changed.set()

    def report(self, address: str, ok: bool) -> None:
        """A call to ``address`` succeeded or failed (through the instance's fault, not the request's):
        ``EJECT_AFTER`` failures in a row eject it for a while, however well it answers health checks."""
        outlier = self._outliers.setdefault(address, _Outlier())
        if ok:
            outlier.failures = 0
            return
        if address in self._down:
            return  # not picked already: calls that were in flight when it went down count for nothing
        outlier.failures += 1
        if outlier.failures >= self.EJECT_AFTER:
            outlier.failures = 0
            outlier.ejections += 1
            cooldown = min(self.EJECT_MAX_S, self.EJECT_BASE_S * 2 ** (outlier.ejections - 1))
            outlier.until = time.monotonic() + cooldown
            self.mark_down(address, f"ejected for {cooldown:g} s: {self.EJECT_AFTER} failed calls in a row",
                           unreachable=False)

    async def _load_report(self, role: str, address: str) -> None:
        try:
            channel = self._channels.get(address)
            if role == "decode":
                report = await decode_pb2_grpc.DecodeStub(channel).GetStats(
                    decode_pb2.GetStatsRequest(), timeout=self.probe_timeout_s)
            else:
                report = await prefill_pb2_grpc.PrefillStub(channel).GetStats(
                    prefill_pb2.PrefillStatsRequest(), timeout=self.probe_timeout_s)
        except grpc.aio.AioRpcError:
            return  # liveness is the health check's business; the last report stands
        if address not in set(self.instances[role]):
            return  # left meanwhile
        known = self.incarnations.get(address)
        if known and report.incarnation and report.incarnation != known:
            log.warning("%s instance %s restarted (incarnation %s, was %s)", role, address, report.incarnation, known)
            self._outliers.pop(address, None)
        self.incarnations[address] = report.incarnation
        self.stats[address] = report

    async def _probe(self, role: str, address: str) -> None:
        # Up: through the pooled channel, so a broken connection that calls would take shows. Down: through
        # a fresh one (the pooled one may be wedged or backing off), and it is replaced when the instance
        # comes back, so calls get a fresh connection too.
        down = address in self._down
        channel = self._channels.get(address) if self._channels is not None and not down else None
        auth = self._channels.auth if self._channels is not None else NO_AUTH
        status = await health_status(address, SERVICES[role], timeout=self.probe_timeout_s, channel=channel, auth=auth)
        if address not in set(self.instances[role]):
            return  # left while we asked
        if status == "serving":
            self._misses.pop(address, None)
            if self._channels is not None:
                # Back from a real outage: calls connect afresh, and those already running on the old
                # connection (sent while every instance looked down) get a grace to finish. One never
                # checked before has nothing wrong with its connection: calls already use it.
                if down and self._down.get(address) != NOT_CHECKED:
                    self._channels.reset(address, self.LEFT_GRACE_S)
                await self._load_report(role, address)  # a restart (new incarnation) ends an ejection
            outlier = self._outliers.get(address)
            if outlier is not None and outlier.until > time.monotonic():
                return  # ejected: no work until its cooldown ends
            self._mark_up(address)
        elif status == "not serving":
            self.mark_down(address, "health check: NOT_SERVING (draining or stopping)", unreachable=False)
        elif status == "wrong service":
            self.mark_down(address, f"health check: it does not serve {SERVICES[role]} (another program on its port?)")
        else:
            misses = self._misses[address] = self._misses.get(address, 0) + 1
            if misses >= self.probe_misses or address in self._down:
                # A peer silent past the timeout (a partition) may leave our connection to it wedged:
                # drop it. One that refuses (stopping: its listener closed while its calls finish)
                # keeps its connections, so those calls can finish.
                if misses == self.probe_misses and status == "silent" and self._channels is not None:
                    self._channels.reset(address)
                self.mark_down(address, f"health check: no answer {misses} times in a row")

    async def probe_once(self) -> None:
        await self.resolve_configured()
        await asyncio.gather(*(self._probe(role, a) for role in INSTANCE_ROLES for a in self.instances[role]))

    def start(self, on_probe: Callable[[], Awaitable[None]] | None = None) -> None:
        """Probes every ``probe_interval_s`` in a task; ``on_probe`` runs after each round."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(self.probe_interval_s)
                try:
                    await self.probe_once()
                    if on_probe is not None:
                        await on_probe()
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
    # After a pick_prefill that answered "" for a prompt a decode instance holds cached: the most prompt tokens
    # the decode instance may compute (it takes the KV by transfer if its cache leaves more); 0 otherwise.
    local_max_uncached: int

    def pick_prefill(self, prompt: Sequence[int], exclude: frozenset[str] = frozenset(), local: bool = True) -> str:
        """The address of the prefill instance for ``prompt`` (its token ids; "": prefill on decode, never
        without ``local`` unless there are no prefill instances)."""

    def pick_decode(self, prompt: Sequence[int], max_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        """The address of the decode instance that will hold the request's KV."""

    def routed(self, role: str, address: str, prompt: Sequence[int]) -> None:
        """``prompt`` went to ``address``: it will hold the prompt's prefix blocks (cache-aware routing)."""

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
        self.local_max_uncached = 0

    def begin(self, role: str, address: str, tokens: int) -> None:
        self.tokens[address] += tokens
        self.requests[address] += 1

    def end(self, role: str, address: str, tokens: int) -> None:
        self.tokens[address] -= tokens
        self.requests[address] -= 1

    def routed(self, role: str, address: str, prompt: Sequence[int]) -> None:
        pass


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

    def pick_prefill(self, prompt: Sequence[int], exclude: frozenset[str] = frozenset(), local: bool = True) -> str:
        if not self.registry.instances["prefill"]:
            self.reason = "colocated: no prefill instances"
            return ""
        return self._pick("prefill", exclude)

    def pick_decode(self, prompt: Sequence[int], max_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
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

    def pick_prefill(self, prompt: Sequence[int], exclude: frozenset[str] = frozenset(), local: bool = True) -> str:
        prompt_tokens = len(prompt)
        self.local_max_uncached = 0
        if not self.registry.instances["prefill"]:
            self.reason = "colocated: no prefill instances"
            return ""
        if local and prompt_tokens <= self.local_prefill_tokens:
            self.local_prefills += 1
            self.reason = f"on decode: prompt of {prompt_tokens} tokens <= local_prefill_tokens"
            return ""
        candidates = self.registry.candidates("prefill", exclude)
        pair = self._rng.sample(candidates, 2) if len(candidates) > 1 else candidates
        best = min(pair, key=lambda a: self.tokens[a])
        if local and self.prefill_full_tokens and self.tokens[best] >= self.prefill_full_tokens:
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

    def pick_decode(self, prompt: Sequence[int], max_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        candidates = self.registry.candidates("decode", exclude)
        self._rng.shuffle(candidates)  # ties go to a random one
        loads = {a: self.decode_load(a) for a in candidates}
        best = min(candidates, key=loads.__getitem__)
        self.reason = "lowest KV + batch occupancy: " + ", ".join(f"{a}={v:.2f}" for a, v in loads.items())
        return best


class PrefixIndex:
    """Which prefix blocks each instance holds, approximately: the keys its last load report lists
    (``cached_blocks``, at most ``CACHED_KEYS_REPORTED``) and those of the prompts this gateway sent it
    since (at most ``ROUTED_KEYS`` an instance, the oldest forgotten first), which cover the probe
    interval's lag. Keys are ``pdserve.prefix.block_hashes`` at the instance's block size."""

    ROUTED_KEYS = 8192

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._routed: dict[str, collections.OrderedDict[int, None]] = collections.defaultdict(collections.OrderedDict)
        self._reported: dict[str, tuple[object, frozenset[int]]] = {}  # address -> (its report, the keys in it)
        self._incarnation: dict[str, str] = {}  # of the instance the routed keys were sent to

    def _current(self, address: str) -> None:
        """Forgets the keys routed to an instance that restarted since (its cache started empty)."""
        incarnation = self.registry.incarnations.get(address, "")
        if self._incarnation.get(address) != incarnation:
            self._routed.pop(address, None)
            self._incarnation[address] = incarnation

    @staticmethod
    def block_size(stats) -> int:
        if stats is None:
            return 0
        return getattr(stats, "kv_block_size", 0) or getattr(stats, "prefix_block_size", 0)

    def _keys_reported(self, address: str) -> frozenset[int]:
        stats = self.registry.stats.get(address)
        if stats is None:
            return frozenset()
        seen = self._reported.get(address)
        if seen is None or seen[0] is not stats:
            seen = (stats, frozenset(stats.cached_blocks))
            self._reported[address] = seen
        return seen[1]

    def hit_tokens(self, address: str, prompt: Sequence[int], keys: dict[int, list[int]]) -> int:
        """Tokens of ``prompt``'s longest prefix ``address`` should hold (``keys``: the prompt's keys by block
        size, filled as needed)."""
        size = self.block_size(self.registry.stats.get(address))
        if not size:
            return 0
        if size not in keys:
            keys[size] = block_hashes(prompt, size, reusable_blocks(len(prompt), size))
        self._current(address)
        reported, routed = self._keys_reported(address), self._routed.get(address, {})
        found = 0
        for key in keys[size]:
            if key not in reported and key not in routed:
                break
            found += 1
        return found * size

    def routed(self, address: str, prompt: Sequence[int]) -> None:
        size = self.block_size(self.registry.stats.get(address))
        if not size:
            return
        self._current(address)
        table = self._routed[address]
        for key in block_hashes(prompt, size):
            table[key] = None
            table.move_to_end(key)
        while len(table) > self.ROUTED_KEYS:
            table.popitem(last=False)


class CacheAwareScheduler(LoadAwareScheduler):
    """Load-aware, and where instances hold a prefix of the prompt cached, that counts: a prompt goes to the
    prefill instance with the fewest tokens to compute (outstanding prompt tokens plus the prompt's tokens
    it does not hold cached), and to the decode instance with the lowest occupancy less ``DECODE_HIT_WEIGHT``
    times the share of the prompt it holds (a whole prompt cached outweighs half a pool's occupancy).
    Conditional disaggregation by cache hit: a prompt that decode instance holds cached but for at most
    ``local_uncached_tokens`` (and for at least half of it: a conversation's next turn, say) is prefilled
    there: only the rest is computed and no KV moves. With no prefix cached anywhere it picks as
    ``LoadAwareScheduler`` does."""

    policy = "cache_aware"
    DECODE_HIT_WEIGHT = 0.5

    def __init__(self, registry: Registry, local_prefill_tokens: int = 0, prefill_full_tokens: int = 0,
                 rng: random.Random | None = None, local_uncached_tokens: int = 0) -> None:
        super().__init__(registry, local_prefill_tokens, prefill_full_tokens, rng)
        self.index = PrefixIndex(registry)
        self.local_uncached_tokens = local_uncached_tokens
        self.last_hit_tokens = {"prefill": 0, "decode": 0}  # what the last pick expected to hit

    def routed(self, role: str, address: str, prompt: Sequence[int]) -> None:
        self.index.routed(address, prompt)

    def pick_prefill(self, prompt: Sequence[int], exclude: frozenset[str] = frozenset(), local: bool = True) -> str:
        keys: dict[int, list[int]] = {}
        if local and self.registry.instances["prefill"] and self.local_uncached_tokens:
            candidates, hits, score = self._decode_scores(prompt, exclude, keys)
            best = min(candidates, key=score.__getitem__, default="")
            uncached = len(prompt) - hits.get(best, 0)
            if best and 2 * hits[best] >= len(prompt) and uncached <= self.local_uncached_tokens:
                self.local_prefills += 1
                self.last_hit_tokens["prefill"] = 0
                self.reason = (f"on decode: {best} holds {hits[best]} of the prompt's {len(prompt)} tokens cached, "
                               f"{uncached} to compute <= local_uncached_tokens")
                self.local_max_uncached = self.local_uncached_tokens  # if its cache holds less: by transfer
                return ""
        if self.registry.instances["prefill"] and len(prompt) > self.local_prefill_tokens:
            candidates = self.registry.candidates("prefill", exclude)
            hits = {a: self.index.hit_tokens(a, prompt, keys) for a in candidates}
            if any(hits.values()):
                cost = {a: self.tokens[a] + len(prompt) - hits[a] for a in candidates}
                best = min(candidates, key=cost.__getitem__)
                if not (local and self.prefill_full_tokens and self.tokens[best] >= self.prefill_full_tokens):
                    self.local_max_uncached = 0
                    self.last_hit_tokens["prefill"] = hits[best]
                    self.reason = ("fewest tokens to compute (outstanding + uncached): "
                                   + ", ".join(f"{a}={cost[a]} ({hits[a]} cached)" for a in candidates))
                    return best
        self.last_hit_tokens["prefill"] = 0
        return super().pick_prefill(prompt, exclude, local)

    def _decode_scores(self, prompt: Sequence[int], exclude: frozenset[str],
                       keys: dict[int, list[int]]) -> tuple[list[str], dict[str, int], dict[str, float]]:
        """The decode candidates, the prompt tokens each holds cached, and each one's score (lowest wins)."""
        candidates = self.registry.candidates("decode", exclude)
        hits = {a: self.index.hit_tokens(a, prompt, keys) for a in candidates}
        score = {a: self.decode_load(a) - self.DECODE_HIT_WEIGHT * hits[a] / max(1, len(prompt)) for a in candidates}
        return candidates, hits, score

    def pick_decode(self, prompt: Sequence[int], max_tokens: int, exclude: frozenset[str] = frozenset()) -> str:
        candidates, hits, score = self._decode_scores(prompt, exclude, {})
        if not any(hits.values()):
            self.last_hit_tokens["decode"] = 0
            return super().pick_decode(prompt, max_tokens, exclude)
        self._rng.shuffle(candidates)
        best = min(candidates, key=score.__getitem__)
        self.last_hit_tokens["decode"] = hits[best]
        self.reason = ("lowest occupancy less cached share: "
                       + ", ".join(f"{a}={score[a]:.2f} ({hits[a]} cached)" for a in candidates))
        return best
