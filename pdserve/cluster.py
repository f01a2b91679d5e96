"""A local cluster: gateway + N prefill + M decode servers as child processes.

With no prefill instances the cluster is colocated: each decode instance
prefills its own prompts (with or without chunked prefill). ``pin_cores``
gives each model-running member its own share of the CPU cores (``taskset``),
so a disaggregated and a colocated cluster can be compared on the same cores.
Used by ``pdserve up``, ``pdserve bench --start`` and the end-to-end tests. Children are started in
dependency order (decode, prefill, gateway), each is polled through the gRPC
health service until SERVING, and ``stop`` sends SIGTERM (gateway first, so
no new work arrives) and waits for graceful exits before killing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from pdserve.rpc import check_health


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ClusterSpec:
    model: str = "default"
    device: str = "cpu"
    dtype: str = "auto"
    prefill: int = 1
    decode: int = 1
    host: str = "127.0.0.1"
    gateway_port: int = 50051  # 0: a free port
    threads: int = 0           # per worker; 0: split the machine's cores between workers
    max_batch: int = 32
    kv_budget: str = "auto"
    prefill_chunk_tokens: int = 512  # 0: no chunked prefill
    prefill_token_budget: int = 2048
    pin_cores: bool = False
    log_level: str = "INFO"
    metrics: bool = False  # each member serves Prometheus /metrics on a free port (Member.metrics_address)
    log_dir: str = ""  # each member's log to <log_dir>/<name>.log instead of this process's stderr
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. OTEL_* (tracing), PDSERVE_LOG_FORMAT
    # Decode instance i < len(decode_netns) runs inside network namespace decode_netns[i][0], listening on
    # host decode_netns[i][1] (fault tests partition it from the others).
    decode_netns: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.prefill < 0 or self.decode < 1:
            raise ValueError("a cluster needs at least one decode instance (and no prefill instance: colocated)")

    @property
    def colocated(self) -> bool:
        return self.prefill == 0

    def describe(self) -> str:
        if self.colocated:
            chunking = f"chunked prefill {self.prefill_chunk_tokens}" if self.prefill_chunk_tokens else "no chunking"
            return f"colocated x{self.decode} ({chunking})"
        return f"disaggregated {self.prefill} prefill + {self.decode} decode"


@dataclass
class Member:
    name: str
    address: str
    process: subprocess.Popen | None
    command: list[str]
    env: dict[str, str]
    metrics_address: str = ""  # host:port of its /metrics, if served


class LocalCluster:
    def __init__(self, spec: ClusterSpec, progress: Callable[[str], None] = lambda _: None) -> None:
        self.spec = spec
        self.members: list[Member] = []
        self._progress = progress

    @property
    def gateway_address(self) -> str:
        return self.members[-1].address

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

    def _spawn(self, name: str, module: str, port: int, args: list[str], cores: list[int] | None = None,
               netns: tuple[str, str] | None = None) -> Member:
        host = netns[1] if netns else self.spec.host
        address = f"{host}:{port}"
        cmd = [sys.executable, "-m", module, "--listen", address, "--log-level", self.spec.log_level, *args]
        metrics_address = f"{host}:{free_port(self.spec.host)}" if self.spec.metrics else ""
        if metrics_address:
            cmd += ["--metrics-listen", metrics_address]
        if cores and shutil.which("taskset"):
            cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
        if netns:
            cmd = ["ip", "netns", "exec", netns[0], *cmd]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.spec.extra_env}
        member = Member(name, address, None, cmd, env, metrics_address)
        member.process = self._popen(member)
        self.members.append(member)
        return member

    def restart(self, name: str) -> Member:
        """Starts member ``name`` again, same command and address, once its old process has exited
        (``wait_healthy`` then waits for it); the gateway's health checks find it serving again."""
        member = next(m for m in self.members if m.name == name)
        if member.process.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {member.process.pid})")
        member.process = self._popen(member)
        return member

    def _popen(self, member: Member) -> subprocess.Popen:
        if not self.spec.log_dir:
            return subprocess.Popen(member.command, env=member.env, stdin=subprocess.DEVNULL)
        os.makedirs(self.spec.log_dir, exist_ok=True)
        with open(os.path.join(self.spec.log_dir, f"{member.name}.log"), "ab") as log_file:
            return subprocess.Popen(member.command, env=member.env, stdin=subprocess.DEVNULL, stderr=log_file)

    def start(self) -> None:
        """Spawns every member; ``wait_healthy`` then waits for them."""
        s = self.spec
        groups = self._core_groups() if s.pin_cores else [None] * (s.prefill + s.decode)
        model_args = ["--model", s.model, "--device", s.device, "--dtype", s.dtype, "--threads", str(self._threads()),
                      "--prefill-chunk-tokens", str(s.prefill_chunk_tokens),
                      "--prefill-token-budget", str(s.prefill_token_budget)]
        decode_args = [*model_args, "--max-batch", str(s.max_batch), "--kv-budget", s.kv_budget]
        decodes = [self._spawn(f"decode-{i}", "services.decode", free_port(s.host), decode_args, groups[i],
                               s.decode_netns[i] if i < len(s.decode_netns) else None)
                   for i in range(s.decode)]
        prefills = [self._spawn(f"prefill-{i}", "services.prefill", free_port(s.host), model_args, groups[s.decode + i])
                    for i in range(s.prefill)]
        gateway_port = s.gateway_port or free_port(s.host)
        self._spawn("gateway", "services.gateway", gateway_port, [
            "--model", s.model,
            "--prefill", ",".join(m.address for m in prefills),
            "--decode", ",".join(m.address for m in decodes),
        ])

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
                if await check_health(member.address, timeout=0.5):
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
        """SIGTERM in reverse start order (gateway first), then SIGKILL what is left."""
        for member in reversed(self.members):
            if member.process.poll() is None:
                member.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for member in reversed(self.members):
            try:
                member.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()
