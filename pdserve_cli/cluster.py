"""A local cluster: gateway + N prefill + M decode servers as child processes.

With no prefill instances the cluster is colocated: each decode instance
prefills its own prompts (with or without chunked prefill). ``pin_cores``
gives each model-running member its own share of the CPU cores (``taskset``),
so a disaggregated and a colocated cluster can be compared on the same cores.
Used by ``pdserve up``, ``pdserve bench --start`` and the end-to-end tests.

Children are started in dependency order: decode and prefill, then the
gateway, given their addresses once they serve (each writes a port file
then). Ports are picked free and outside the kernel's ephemeral range
(``free_port``); a port taken meanwhile fails the member's bind loudly (never
shared) and another is tried. Each member is polled through the gRPC health
service until SERVING (the gateway: until it is ready, i.e. reaches an
instance of every role). ``stop`` sends SIGTERM to the gateway and waits for
it to drain before stopping the rest, then kills what is left and removes any
shared-memory segment a killed member left.

Members talk over mutual TLS by default (``tls``): the first start makes a
development CA and certificates in ``certs_dir`` (``~/.cache/pdserve/certs``)
and later starts reuse them. The gateway's client-facing APIs stay plaintext
on localhost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from pdserve.kv.shm import sweep_orphans
from pdserve.rpc import check_health
from pdserve.service import EXIT_ADDRESS_IN_USE
from pdserve.tls import NO_AUTH, ClusterAuth, TlsFiles, make_certificates
from pdserve.v1 import decode_pb2, prefill_pb2

DECODE_SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
PREFILL_SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name
DEFAULT_CERTS_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pdserve", "certs")


def ensure_certificates(folder: str, progress: Callable[[str], None] = lambda _: None) -> str:
    """The development CA and member certificates in ``folder``, made there on first use (in a fresh folder
    renamed into place, so clusters starting at once agree on one CA)."""
    needed = [f"{name}.pem" for name in ("ca", "gateway", "prefill", "decode", "client")]
    if not os.path.exists(folder):
        progress(f"[up] making a development CA and certificates for mutual TLS in {folder}")
        parent = os.path.dirname(os.path.abspath(folder))
        os.makedirs(parent, exist_ok=True)
        fresh = tempfile.mkdtemp(prefix=".certs-", dir=parent)
        make_certificates(fresh)
        try:
            os.rename(fresh, folder)
        except OSError:  # another start made it meanwhile
            shutil.rmtree(fresh, ignore_errors=True)
    missing = [name for name in needed if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise RuntimeError(f"{folder} lacks {', '.join(missing)} (remove it to have new certificates made, or "
                           f"run `pdserve certs {folder}`)")
    return folder


def _ephemeral_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, outside the kernel's ephemeral range. A client that keeps reconnecting to a port in
    that range while nothing listens there (a restarting instance) may be handed that very port as its own
    source port: the socket connects to itself, holds the port, and the restart cannot bind it."""
    low, high = _ephemeral_ports()
    ranges = [r for r in (range(10000, low), range(high + 1, 65536)) if len(r)]
    for _ in range(200):
        port = random.choice(random.choice(ranges))
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # every guess taken: any free port
        s.bind((host, 0))
        return s.getsockname()[1]


def _auto(value: int | None) -> str:
    """A member's flag value: None is the member's own default for its device."""
    return "auto" if value is None else str(value)


@dataclass(frozen=True)
class ClusterSpec:
    model: str = "default"
    device: str = "cpu"
    prefill_device: str = ""  # the prefill instances' device ("": device), e.g. cuda:0
    decode_device: str = ""   # the decode instances' device ("": device), e.g. cuda:1
    dtype: str = "auto"
    prefill: int = 1
    decode: int = 1
    host: str = "127.0.0.1"
    gateway_port: int = 50051  # 0: a free port
    http_port: int | None = None  # the gateway's OpenAI-compatible HTTP API (None: off; 0: a free port)
    threads: int = 0           # per worker; 0: split the machine's cores between workers
    max_batch: int = 32
    kv_budget: str = "auto"
    prefill_chunk_tokens: int | None = None  # 0: no chunked prefill; None: the members' default for their device
    prefill_token_budget: int | None = None
    pin_cores: bool = False
    log_level: str = "INFO"
    metrics: bool = False  # each member serves Prometheus /metrics on a free port (Member.metrics_address)
    log_dir: str = ""  # each member's log to <log_dir>/<name>.log instead of this process's stderr
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. OTEL_* (tracing), PDSERVE_LOG_FORMAT
    # Decode instance i < len(decode_netns) runs inside network namespace decode_netns[i][0], listening on
    # host decode_netns[i][1] (fault tests partition it from the others).
    decode_netns: tuple[tuple[str, str], ...] = ()
    # Extra flags of prefill instance i < len(prefill_args) (e.g. a transport each, for the benchmarks).
    prefill_args: tuple[tuple[str, ...], ...] = ()
    tls: bool = True  # mutual TLS between the members
    certs_dir: str = ""  # where the development CA and certificates are (made on first use); "": DEFAULT_CERTS_DIR

    def __post_init__(self) -> None:
        if self.prefill < 0 or self.decode < 1:
            raise ValueError("a cluster needs at least one decode instance (and no prefill instance: colocated)")

    @property
    def colocated(self) -> bool:
        return self.prefill == 0

    def describe(self) -> str:
        if self.colocated:
            chunk = self.prefill_chunk_tokens
            chunking = "no chunking" if chunk == 0 else f"chunked prefill {_auto(chunk)}"
            return f"colocated x{self.decode} ({chunking})"
        return f"disaggregated {self.prefill} prefill + {self.decode} decode"


@dataclass
class Member:
    name: str
    host: str
    process: subprocess.Popen | None
    args: list[str]  # the command, but for its --listen address
    env: dict[str, str]
    port_file: str
    health_service: str  # what "serving" is asked of (the gateway: "" = ready)
    wrap: list[str] = field(default_factory=list)  # taskset, ip netns exec
    port: int = 0  # a restart binds the same one
    port_chosen: bool = False  # by the launcher (another is tried if it turns out to be taken)
    metrics_port: int = 0
    http_port: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"{self.host}:{self.metrics_port}" if self.metrics_port else ""

    @property
    def command(self) -> list[str]:
        return [*self.wrap, *self.args, "--listen", f"{self.host}:{self.port}"]


class LocalCluster:
    def __init__(self, spec: ClusterSpec, progress: Callable[[str], None] = lambda _: None) -> None:
        self.spec = spec
        self.members: list[Member] = []
        self._progress = progress
        self._run_dir: str | None = None  # the members' port files
        self.auth = NO_AUTH  # what this process presents to the members (a client certificate with TLS)

    def _tls_args(self, role: str) -> list[str]:
        if not self.spec.tls:
            return []
        folder = self.spec.certs_dir or DEFAULT_CERTS_DIR
        return ["--tls-cert", os.path.join(folder, f"{role}.pem"), "--tls-key", os.path.join(folder, f"{role}-key.pem"),
                "--tls-ca", os.path.join(folder, "ca.pem")]

    @property
    def gateway_address(self) -> str:
        return self.members[-1].address

    @property
    def http_url(self) -> str:
        """The gateway's OpenAI-compatible API (``http://host:port/v1``; empty when off)."""
        gateway = self.members[-1]
        return f"http://{gateway.host}:{gateway.http_port}/v1" if gateway.http_port else ""

    def _core_groups(self) -> list[list[int]]:
        """The cores of each model-running member, in spawn order (decode first), split evenly."""
        cores = sorted(os.sched_getaffinity(0))
        workers = self.spec.prefill + self.spec.decode
        share = max(1, len(cores) // workers)
        return [cores[(i * share) % len(cores):(i * share) % len(cores) + share] for i in range(workers)]

    def _threads(self) -> int:
        if self.spec.threads:
            return self.spec.threads
        return max(1, len(os.sched_getaffinity(0)) // (self.spec.prefill + self.spec.decode))

    def _spawn(self, name: str, module: str, args: list[str], cores: list[int] | None = None,
               netns: tuple[str, str] | None = None, port: int = 0, health_service: str = "") -> Member:
        host = netns[1] if netns else self.spec.host
        if self._run_dir is None:
            self._run_dir = tempfile.mkdtemp(prefix="pdserve-cluster-")
        port_file = os.path.join(self._run_dir, f"{name}.json")
        cmd = [sys.executable, "-m", module, "--log-level", self.spec.log_level, *args, "--port-file", port_file]
        if self.spec.metrics:
            cmd += ["--metrics-listen", f"{host}:0"]
        wrap = []
        if netns:
            wrap = ["ip", "netns", "exec", netns[0]]
        if cores and shutil.which("taskset"):
            wrap = [*wrap, "taskset", "-c", ",".join(map(str, cores))]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.spec.extra_env}
        member = Member(name, host, None, cmd, env, port_file, health_service, wrap, port or free_port(), not port)
        member.process = self._popen(member)
        self.members.append(member)
        return member

    def restart(self, name: str) -> Member:
        """Starts member ``name`` again, same command and address, once its old process has exited
        (``wait_healthy`` then waits for it); the gateway's health checks find it serving again."""
        member = next(m for m in self.members if m.name == name)
        if member.process.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {member.process.pid})")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(member.port_file)
        member.process = self._popen(member)
        return member

    def _popen(self, member: Member) -> subprocess.Popen:
        if not self.spec.log_dir:
            return subprocess.Popen(member.command, env=member.env, stdin=subprocess.DEVNULL)
        os.makedirs(self.spec.log_dir, exist_ok=True)
        with open(os.path.join(self.spec.log_dir, f"{member.name}.log"), "ab") as log_file:
            return subprocess.Popen(member.command, env=member.env, stdin=subprocess.DEVNULL, stderr=log_file)

    async def _bound(self, members: list[Member], timeout_s: float) -> None:
        """Waits until each of ``members`` wrote its port file (it serves); raises if one exits first."""
        deadline = time.monotonic() + timeout_s
        last_report = time.monotonic()
        pending = list(members)
        retries = 3 * len(members)
        while pending:
            for member in list(pending):
                code = member.process.poll()
                if code == EXIT_ADDRESS_IN_USE and member.port_chosen and retries > 0:
                    retries -= 1  # taken between our check and its bind: another port
                    member.port = free_port()
                    member.process = self._popen(member)
                    continue
                if code is not None:
                    raise RuntimeError(f"{member.name} exited with code {code} before serving (see its log above)")
                try:
                    with open(member.port_file) as f:
                        ports = json.load(f)
                except (FileNotFoundError, ValueError):
                    continue
                member.port, member.metrics_port = ports["port"], ports.get("metrics_port", 0)
                member.http_port = ports.get("http_port", 0)
                pending.remove(member)
            if not pending:
                return
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"not serving after {timeout_s:.0f} s: {', '.join(m.name for m in pending)}")
            if now - last_report > 10:
                self._progress(f"[up] waiting for {', '.join(m.name for m in pending)} (loading the model)")
                last_report = now
            await asyncio.sleep(0.1)

    async def start(self, timeout_s: float = 300.0) -> None:
        """Spawns decode and prefill members, waits until they serve (their ports known), then spawns the
        gateway with their addresses; ``wait_healthy`` then waits until every member is ready."""
        s = self.spec
        if s.tls:
            folder = ensure_certificates(s.certs_dir or DEFAULT_CERTS_DIR, self._progress)
            self.auth = ClusterAuth(TlsFiles.load(os.path.join(folder, "client.pem"),
                                                  os.path.join(folder, "client-key.pem"), os.path.join(folder, "ca.pem")))
        groups = self._core_groups() if s.pin_cores else [None] * (s.prefill + s.decode)
        model_args = ["--model", s.model, "--dtype", s.dtype, "--threads", str(self._threads()),
                      "--prefill-chunk-tokens", _auto(s.prefill_chunk_tokens),
                      "--prefill-token-budget", _auto(s.prefill_token_budget)]
        decode_args = [*model_args, "--device", s.decode_device or s.device, "--max-batch", str(s.max_batch),
                       "--kv-budget", s.kv_budget, *self._tls_args("decode")]
        model_args = [*model_args, "--device", s.prefill_device or s.device, *self._tls_args("prefill")]
        decodes = [self._spawn(f"decode-{i}", "services.decode", decode_args, groups[i],
                               s.decode_netns[i] if i < len(s.decode_netns) else None, health_service=DECODE_SERVICE)
                   for i in range(s.decode)]
        prefills = [self._spawn(f"prefill-{i}", "services.prefill",
                                [*model_args, *(s.prefill_args[i] if i < len(s.prefill_args) else ())],
                                groups[s.decode + i], health_service=PREFILL_SERVICE)
                    for i in range(s.prefill)]
        await self._bound(decodes + prefills, timeout_s)
        gateway = self._spawn("gateway", "services.gateway", [
            "--model", s.model,
            "--prefill", ",".join(m.address for m in prefills),
            "--decode", ",".join(m.address for m in decodes),
            "--http-listen", "" if s.http_port is None else f"{s.host}:{s.http_port}",
            "--internal-listen", f"{s.host}:0",
            *self._tls_args("gateway"),
        ], port=s.gateway_port)
        await self._bound([gateway], timeout_s)

    async def wait_healthy(self, timeout_s: float = 300.0) -> None:
        """Returns once every member reports SERVING; raises if one exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.members)
        last_report = 0.0
        while pending:
            for member in list(pending):
                code = member.process.poll()
                if code is not None:
                    raise RuntimeError(f"{member.name} exited with code {code} before becoming healthy (see its log above)")
                # The gateway's client-facing API is plaintext; the instances want a member's certificate.
                auth = NO_AUTH if member.name == "gateway" else self.auth
                if await check_health(member.address, member.health_service, timeout=0.5, auth=auth):
                    self._progress(f"[up] {member.name} serving on {member.address}")
                    pending.remove(member)
            if not pending:
                return
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"not healthy after {timeout_s:.0f} s: {', '.join(m.name for m in pending)}")
            if now - last_report > 10:
                self._progress(f"[up] waiting for {', '.join(m.name for m in pending)} (loading the model)")
                last_report = now
            await asyncio.sleep(0.2)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stops the gateway first (SIGTERM; it drains its requests, up to ``timeout_s``), then the rest
        likewise, then kills whatever is left, and removes shared-memory segments a killed member left.
        Members that already got a signal (a terminal's Ctrl-C reaches the whole process group) ignore this
        one and go on draining."""
        gateway = [m for m in self.members if m.name == "gateway"]
        for phase in (gateway, [m for m in self.members if m.name != "gateway"]):
            for member in phase:
                if member.process.poll() is None:
                    member.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for member in phase:
                try:
                    member.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    member.process.kill()
                    member.process.wait()
        self.kill()

    def kill(self) -> None:
        """SIGKILL to every member still running; removes the segments they leave and the port files."""
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                member.process.kill()
                member.process.wait()
        sweep_orphans()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
