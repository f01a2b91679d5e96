"""Service configuration: one frozen dataclass per service.

Every field can be set by a ``PDSERVE_<FIELD>`` environment variable (the
compose-friendly way) and overridden by a ``--field-name`` command-line flag.
Invalid values raise ``ConfigError`` naming the variable or flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

ENV_PREFIX = "PDSERVE_"
DEFAULT_MODEL = "default"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names where it came from."""


@dataclass(frozen=True)
class ModelConfig:
    """What every model-running service shares."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model folder, 'default' (SmolLM2-135M-Instruct) or preset:NAME"})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda, cuda:1"})
    dtype: str = field(default="auto", metadata={"help": "float32, bfloat16, float16 or auto (float32 on cpu, bfloat16 on cuda)"})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads (0: torch's default)"})
    fused_forward: bool = field(default=True, metadata={
        "help": "on a GPU, Llama-shaped models (llama, qwen2) run decode steps and prefill passes through the fused "
                "forward (q/k/v and gate/up one GEMM each; norms, rotary and SiLU compiled): the same math in a "
                "fraction of transformers' kernels; false: transformers' forward"})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype: must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device: must be cpu or cuda[:N], got {self.device!r}")
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0, got {self.threads}")

    @property
    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.device == "cpu" else "bfloat16"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = field(default="127.0.0.1:0", metadata={"help": "address to listen on, host:port (port 0 picks a free one)"})
    shutdown_grace_s: float = field(default=10.0, metadata={"help": "seconds in-flight calls get to finish on shutdown"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_format: str = field(default="text", metadata={
        "help": "text, or json: one object per line with request_id and trace_id"})
    metrics_listen: str = field(default="", metadata={
        "help": "host:port of the Prometheus /metrics endpoint (empty: none; port 0 picks a free one)"})
    port_file: str = field(default="", metadata={
        "help": "once serving, write the bound ports as JSON ({\"port\": N, \"metrics_port\": M}) to this "
                "file (for launchers that listen on port 0)"})
    tls_cert: str = field(default="", metadata={
        "help": "this member's certificate (PEM): its servers use TLS and it presents it to the members it calls"})
    tls_key: str = field(default="", metadata={"help": "the private key of tls_cert (PEM)"})
    tls_ca: str = field(default="", metadata={
        "help": "the cluster's CA (PEM): with it, mutual TLS between members (its servers require a client "
                "certificate from this CA; its calls accept only servers with one)"})
    tls_server_name: str = field(default="pdserve.internal", metadata={
        "help": "the name members' certificates are checked against (they name the cluster, not a host)"})
    cluster_token: str = field(default="", repr=False, metadata={
        "help": "a shared secret every call between members carries and every member's servers require "
                "(health checks exempt): membership without TLS, or on top of it"})

    def __post_init__(self) -> None:
        _check_address("listen", self.listen)
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: must be text or json, got {self.log_format!r}")
        if self.metrics_listen:
            _check_address("metrics_listen", self.metrics_listen)
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s: must be >= 0, got {self.shutdown_grace_s}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key: give both or neither")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("tls_ca: mutual TLS needs this member's own tls_cert and tls_key too")


@dataclass(frozen=True)
class RegistrationConfig:
    """How a prefill or decode instance announces itself to gateways (pdserve.registration)."""

    register_with: tuple[str, ...] = field(default=(), metadata={
        "help": "gateways to announce this instance to, comma-separated host:port of their internal listener "
                "(internal_listen, port 50052 by default): it joins their pool while it sends heartbeats, leaves "
                "when it drains or stops sending"})
    advertise: str = field(default="", metadata={
        "help": "host:port gateways reach this instance at (default: the listen address and bound port; a "
                "wildcard host becomes this machine's hostname)"})
    heartbeat_interval_s: float = field(default=2.0, metadata={"help": "seconds between heartbeats"})

    def __post_init__(self) -> None:
        for addr in self.register_with:
            _check_address("register_with", addr)
        if self.advertise:
            _check_address("advertise", self.advertise)
        if not self.heartbeat_interval_s > 0:
            raise ConfigError(f"heartbeat_interval_s: must be > 0, got {self.heartbeat_interval_s}")


PAGED_KERNELS = ("auto", "gather", "flex")
# GPU decode: one writer thread checking and copying every received chunk capped a transfer over gRPC at
# ~1.9 GB/s on an H200 host; four reached 3.0-3.2 (bench/RESULTS.md, session 15).
KV_WRITE_LANES = 4
KV_TRANSPORTS = ("auto", "grpc", "shm", "cuda_ipc")  # attention over the decode KV pool (pdserve.engine.kv_pool)


@dataclass(frozen=True)
class PrefillBatchConfig:
    """How prompts are packed into prefill forward passes (prefill instances and colocated decode)."""

    prefill_token_budget: int | None = field(default=None, metadata={
        "help": "most prompt tokens in one prefill forward pass (auto: 2048 on cpu, 4096 on a GPU, where a pass "
                "of a few hundred tokens costs mostly its launches)"})
    prefill_chunk_tokens: int | None = field(default=None, metadata={
        "help": "prompts are prefilled in chunks of at most this many tokens, each chunk's KV streamed as it is "
                "computed (0: whole prompts, no chunking; auto: 512 on cpu, 2048 on a GPU)"})
    max_partial_prefills: int = field(default=2, metadata={
        "help": "most long prompts being prefilled chunk by chunk at once (each holds its earlier chunks' KV); "
                "prompts that fit in one chunk are never held back by them"})
    prefill_max_pass_s: float = field(default=1.0, metadata={
        "help": "a prefill forward pass is planned to take at most about this many seconds, by the recent passes' "
                "times (a long prompt's chunks shrink, fewer short prompts join one): a prompt that arrives waits "
                "for at most about one pass before its own starts (0: no limit)"})

    def __post_init__(self) -> None:
        if not self.prefill_max_pass_s >= 0:
            raise ConfigError(f"prefill_max_pass_s: must be >= 0, got {self.prefill_max_pass_s}")
        if self.prefill_token_budget is not None and self.prefill_token_budget < 1:
            raise ConfigError(f"prefill_token_budget: must be >= 1, got {self.prefill_token_budget}")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 0:
            raise ConfigError(f"prefill_chunk_tokens: must be >= 0, got {self.prefill_chunk_tokens}")
        if self.max_partial_prefills < 1:
            raise ConfigError(f"max_partial_prefills: must be >= 1, got {self.max_partial_prefills}")

    def prefill_batch(self, device: str) -> tuple[int, int]:
        """(token budget, chunk tokens) of prefill passes on ``device``, auto values resolved."""
        gpu = device != "cpu"
        budget = self.prefill_token_budget if self.prefill_token_budget is not None else (4096 if gpu else 2048)
        chunk = self.prefill_chunk_tokens if self.prefill_chunk_tokens is not None else (2048 if gpu else 512)
        return budget, chunk


@dataclass(frozen=True)
class PrefillConfig(ServerConfig, ModelConfig, PrefillBatchConfig, RegistrationConfig):
    listen: str = "127.0.0.1:50061"
    max_queued_tokens: int = field(default=65536, metadata={
        "help": "most prompt tokens waiting or being prefilled; beyond it, and for a prompt that would not be "
                "done before its deadline, RESOURCE_EXHAUSTED with a retry-after-ms hint"})
    kv_chunk_bytes: int = field(default=4 << 20, metadata={
        "help": "target bytes of K+V per KV message (gRPC transport; 4 MiB moved 6-17% more than 1 MiB from an "
                "H200 with checksums, bench/RESULTS.md)"})
    kv_transport: str = field(default="auto", metadata={
        "help": "how KV reaches decode: grpc (bytes in gRPC messages), shm (shared memory, same host only), "
                "cuda_ipc (prefill copies into decode's GPU pool, same host, a GPU this process sees), or auto "
                "(cuda_ipc where it can, else shm when the decode instance reports this host, else grpc)"})
    kv_streams: int | None = field(default=None, metadata={
        "help": "parallel gRPC streams (own TCP connections) per transfer (auto: 1 on cpu, where more streams only "
                "share its cores; 4 on a GPU, where they moved 1.7x the bytes of one, bench/RESULTS.md)"})
    kv_senders: int = field(default=0, metadata={
        "help": "processes of their own that send gRPC KV streams (prefill stages a transfer's KV in shared "
                "memory and sends each of them a note per layer range; kv_streams go to them in turn): one "
                "process sends ~4 GB/s at most, and its sender threads take the GIL from the thread launching "
                "the forward pass; 0: this process sends them"})
    kv_checksums: bool = field(default=True, metadata={"help": "an xxh3-64 checksum on every KV message, "
                                                                "verified by decode (DATA_LOSS on mismatch)"})
    kv_inflight_bytes: str = field(default="auto", metadata={
        "help": "most KV bytes of prompts being prefilled or sent at once; further prompts wait (backpressure): "
                "bytes (1GiB), a fraction of free device memory (0.25), or auto (1GiB on cpu, 0.25 of the GPU's "
                "free memory on cuda: 1 GiB is one 8k-token prompt of an 8B model)"})
    kv_keep_s: float = field(default=30.0, metadata={
        "help": "seconds the KV of a prompt whose push to decode failed is kept for a re-push elsewhere "
                "(Prefill.Repush) before it is dropped"})
    kv_quantization: str = field(default="none", metadata={
        "help": "none (exact) or int8: K per channel and V per token as int8 on the wire, ~1/2 (bf16) or ~1/4 "
                "(fp32) of the bytes, NOT token-exact; gRPC only (a same-host decode gets it over gRPC too)"})
    prefix_cache_bytes: str = field(default="1GiB", metadata={
        "help": "prefix cache: recent prompts' KV kept (on the model's device) so a prompt that starts like one "
                "of them computes only the rest; its size (512MiB, 2GiB; 0 turns it off)"})
    prefix_block_size: int = field(default=16, metadata={
        "help": "tokens per prefix-cache block (cached prefixes are whole blocks; match the decode instances' "
                "kv_block_size so routing compares like with like)"})

    def kv_stream_count(self, device: str) -> int:
        """gRPC streams per transfer from a model on ``device``, auto resolved."""
        return self.kv_streams if self.kv_streams is not None else (1 if device == "cpu" else 4)

    def __post_init__(self) -> None:
        ServerConfig.__post_init__(self)
        ModelConfig.__post_init__(self)
        PrefillBatchConfig.__post_init__(self)
        RegistrationConfig.__post_init__(self)
        if self.max_queued_tokens < 1:
            raise ConfigError(f"max_queued_tokens: must be >= 1, got {self.max_queued_tokens}")
        if self.kv_chunk_bytes < 1024:
            raise ConfigError(f"kv_chunk_bytes: must be >= 1024, got {self.kv_chunk_bytes}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ConfigError(f"kv_transport: must be one of {', '.join(KV_TRANSPORTS)}, got {self.kv_transport!r}")
        if not 0 <= self.kv_senders <= 64:
            raise ConfigError(f"kv_senders: must be in [0, 64], got {self.kv_senders}")
        if self.kv_streams is not None and not 1 <= self.kv_streams <= 64:
            raise ConfigError(f"kv_streams: must be in [1, 64], got {self.kv_streams}")
        if not self.kv_keep_s > 0:
            raise ConfigError(f"kv_keep_s: must be > 0, got {self.kv_keep_s}")
        if self.kv_quantization not in ("none", "int8"):
            raise ConfigError(f"kv_quantization: must be none or int8, got {self.kv_quantization!r}")
        if self.kv_quantization != "none" and self.kv_transport == "shm":
            raise ConfigError("kv_quantization: int8 travels over gRPC; it cannot be combined with kv_transport=shm")
        if self.kv_inflight_bytes != "auto":
            try:
                parse_budget(self.kv_inflight_bytes)
            except ValueError as exc:
                raise ConfigError(f"kv_inflight_bytes: {exc}") from None
        if self.prefix_cache_bytes.strip() != "0" and not _SIZE.match(self.prefix_cache_bytes.strip()):
            raise ConfigError(f"prefix_cache_bytes: expected a size such as 512MiB or 2GiB (0: off), got "
                              f"{self.prefix_cache_bytes!r}")
        if self.prefix_block_size < 1:
            raise ConfigError(f"prefix_block_size: must be >= 1, got {self.prefix_block_size}")

    @property
    def kv_inflight_spec(self) -> str:
        if self.kv_inflight_bytes != "auto":
            return self.kv_inflight_bytes
        return "1GiB" if self.device == "cpu" else "0.25"

    @property
    def prefix_cache_limit(self) -> int:
        return 0 if self.prefix_cache_bytes.strip() == "0" else parse_budget(self.prefix_cache_bytes)[0]


@dataclass(frozen=True)
class DecodeConfig(ServerConfig, ModelConfig, PrefillBatchConfig, RegistrationConfig):
    listen: str = "127.0.0.1:50071"
    max_batch: int = field(default=32, metadata={"help": "most requests in the running batch"})
    max_queued: int = field(default=256, metadata={
        "help": "most requests waiting for KV blocks; beyond it requests are refused with RESOURCE_EXHAUSTED"})
    kv_budget: str = field(default="auto", metadata={
        "help": "KV pool size: bytes (512MiB, 4GiB), a fraction of free device memory (0.8), "
                "or auto (1GiB on cpu, 0.9 of free GPU memory on cuda)"})
    kv_block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    kv_lease_s: float = field(default=60.0, metadata={
        "help": "a reservation whose KV transfer shows no progress (no stream, no chunk) for this long is "
                "freed and its request failed with DEADLINE_EXCEEDED (the gateway moves it elsewhere)"})
    kv_transfer_max_s: float = field(default=300.0, metadata={
        "help": "a reservation whose KV is not complete this long after it was made is freed likewise, however "
                "the transfer progresses"})
    paged_kernel: str = field(default="auto", metadata={
        "help": "attention over the KV pool: gather (block-table gather + SDPA), flex (compiled FlexAttention "
                "reading the pool in place), or auto (flex on cuda, gather on cpu)"})
    cuda_graphs: bool = field(default=True, metadata={
        "help": "replay each decode step from a CUDA graph captured per batch size (flex kernel on cuda; "
                "ignored elsewhere)"})
    min_step_interval_ms: float = field(default=0.0, metadata={
        "help": "start decode steps at least this many ms apart (0: back to back): a decode instance sharing its "
                "GPU with a prefill instance (without MPS the GPU time-slices between processes) leaves it to "
                "prefill between steps; every request's TPOT is at least this"})
    kv_receivers: int = field(default=0, metadata={
        "help": "processes of their own that take in gRPC KV streams, each on a port of its own (reported in "
                "GetStats; prefill spreads a transfer's kv_streams over them) and write them into the pool (CUDA "
                "IPC on a GPU, shared memory on a CPU): one process takes in ~4 GB/s at most (its GIL); 0: "
                "this process takes them in"})
    kv_write_lanes: int = field(default=KV_WRITE_LANES, metadata={
        "help": "GPU: threads, each with a CUDA stream, that check received KV chunks' checksums and copy them "
                "into the pool (chunks go to them in turn)"})
    cuda_graph_tokens: int = field(default=16384, metadata={
        "help": "with cuda_graphs, capture at startup the graphs of every batch size for contexts up to this many "
                "tokens (seconds each, before the instance serves: a graph captured under traffic stalls every "
                "request in the batch); longer contexts are captured when first seen; 0: capture only when "
                "first seen"})
    prefix_cache: bool = field(default=True, metadata={
        "help": "prefix cache: a finished request's full KV blocks stay in the pool (evicted, least recently used "
                "first, only when admission needs the room) and a prompt starting the same way reuses them, its "
                "transfer carrying only the rest"})

    def __post_init__(self) -> None:
        ServerConfig.__post_init__(self)
        ModelConfig.__post_init__(self)
        PrefillBatchConfig.__post_init__(self)
        RegistrationConfig.__post_init__(self)
        if self.max_batch < 1:
            raise ConfigError(f"max_batch: must be >= 1, got {self.max_batch}")
        if self.max_queued < 0:
            raise ConfigError(f"max_queued: must be >= 0, got {self.max_queued}")
        if self.kv_block_size < 1:
            raise ConfigError(f"kv_block_size: must be >= 1, got {self.kv_block_size}")
        if not 0 <= self.min_step_interval_ms <= 10_000:
            raise ConfigError(f"min_step_interval_ms: must be in [0, 10000], got {self.min_step_interval_ms}")
        if not 0 <= self.kv_receivers <= 64:
            raise ConfigError(f"kv_receivers: must be in [0, 64], got {self.kv_receivers}")
        if not 1 <= self.kv_write_lanes <= 64:
            raise ConfigError(f"kv_write_lanes: must be in [1, 64], got {self.kv_write_lanes}")
        if self.cuda_graph_tokens < 0:
            raise ConfigError(f"cuda_graph_tokens: must be >= 0, got {self.cuda_graph_tokens}")
        for name in ("kv_lease_s", "kv_transfer_max_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.paged_kernel not in PAGED_KERNELS:
            raise ConfigError(f"paged_kernel: must be one of {', '.join(PAGED_KERNELS)}, got {self.paged_kernel!r}")
        if self.kv_budget != "auto":
            try:
                parse_budget(self.kv_budget)
            except ValueError as exc:
                raise ConfigError(f"kv_budget: {exc}") from None

    @property
    def kv_budget_spec(self) -> str:
        if self.kv_budget != "auto":
            return self.kv_budget
        return "1GiB" if self.device == "cpu" else "0.9"


@dataclass(frozen=True)
class GatewayConfig(ServerConfig):
    listen: str = "127.0.0.1:50051"
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model served (for its tokenizer and limits; no weights are loaded)"})
    prefill: tuple[str, ...] = field(default=("127.0.0.1:50061",), metadata={
        "help": "prefill instances, comma-separated host:port (names resolved like decode's); none configured "
                "or registered: colocated, prompts are prefilled on the decode instances"})
    decode: tuple[str, ...] = field(default=("127.0.0.1:50071",), metadata={
        "help": "decode instances, comma-separated host:port (a name resolving to several addresses, as a "
                "scaled compose service does, is one instance per address); more may join by heartbeats"})
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request leaves it unset"})
    max_stop_strings: int = field(default=16, metadata={"help": "most stop strings per request"})
    max_prompt_chars: int = field(default=0, metadata={
        "help": "longest prompt text (or chat content) accepted, in characters, checked before tokenizing "
                "(0: 32 x the model's context length)"})
    health_interval_s: float = field(default=1.0, metadata={
        "help": "seconds between health checks of every instance (NOT_SERVING or no answer: no new work)"})
    token_timeout_s: float = field(default=30.0, metadata={
        "help": "seconds a decode instance may go without a token before the request moves to another"})
    request_timeout_s: float = field(default=600.0, metadata={
        "help": "the deadline of a request whose client set none (a client's own deadline applies if shorter)"})
    policy: str = field(default="cache_aware", metadata={
        "help": "scheduling: cache_aware (load_aware, and an instance holding a prefix of the prompt cached counts: "
                "prefill by fewest tokens to compute, decode by occupancy less the cached share), load_aware "
                "(prefill: power of two choices by outstanding prompt tokens; decode: lowest KV-pool plus batch "
                "occupancy) or round_robin"})
    local_prefill_tokens: int = field(default=0, metadata={
        "help": "conditional disaggregation: prompts up to this many tokens are prefilled on the decode "
                "instance itself (0: never)"})
    prefill_full_tokens: int = field(default=0, metadata={
        "help": "conditional disaggregation: while every prefill instance has this many prompt tokens "
                "outstanding, prompts are prefilled on decode (0: never)"})
    local_uncached_tokens: int = field(default=256, metadata={
        "help": "conditional disaggregation by cache hit (policy cache_aware): a prompt that the decode instance "
                "picked for it holds cached but for at most this many tokens (and for at least half of it: a "
                "conversation's next turn) is prefilled there, computing only those, moving no KV (0: never)"})

    http_listen: str = field(default="127.0.0.1:8000", metadata={
        "help": "host:port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                "/v1/models, /health); empty: none; port 0 picks a free one"})
    api_keys: tuple[str, ...] = field(default=(), repr=False, metadata={
        "help": "API keys, comma-separated: when set (here or in api_keys_file) clients must send one, as "
                "'Authorization: Bearer KEY' over HTTP and in 'authorization' metadata over gRPC"})
    api_keys_file: str = field(default="", metadata={
        "help": "file of API keys, one per line ('#' comments); keys from both places are accepted"})
    internal_listen: str = field(default="127.0.0.1:50052", metadata={
        "help": "host:port of the cluster-internal API (instances' heartbeats), apart from the client-facing "
                "one; it takes the member TLS settings (tls_*) and cluster_token"})
    open_registration: bool = field(default=False, metadata={
        "help": "accept heartbeats (instances joining) with neither mutual TLS nor a cluster token: anyone who "
                "reaches internal_listen can then join the pool and receive prompts (local development only)"})
    public_tls_cert: str = field(default="", metadata={
        "help": "certificate (PEM) of the client-facing gRPC and HTTP APIs: with it (and public_tls_key) they "
                "use TLS"})
    public_tls_key: str = field(default="", metadata={"help": "the private key of public_tls_cert"})
    public_tls_ca: str = field(default="", metadata={
        "help": "CA (PEM) of client certificates: with it, clients of the public APIs must present one"})

    def __post_init__(self) -> None:
        ServerConfig.__post_init__(self)
        if self.http_listen:
            _check_address("http_listen", self.http_listen)
        _check_address("internal_listen", self.internal_listen)
        if bool(self.public_tls_cert) != bool(self.public_tls_key):
            raise ConfigError("public_tls_cert and public_tls_key: give both or neither")
        if self.public_tls_ca and not self.public_tls_cert:
            raise ConfigError("public_tls_ca: client certificates need TLS (public_tls_cert, public_tls_key)")
        for name in ("prefill", "decode"):
            for addr in getattr(self, name):
                _check_address(name, addr)
        if self.default_max_tokens < 1:
            raise ConfigError(f"default_max_tokens: must be >= 1, got {self.default_max_tokens}")
        if self.max_prompt_chars < 0:
            raise ConfigError(f"max_prompt_chars: must be >= 0, got {self.max_prompt_chars}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("local_prefill_tokens", "prefill_full_tokens", "local_uncached_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("health_interval_s", "token_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")


POLICIES = ("cache_aware", "load_aware", "round_robin")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_budget(text: str) -> tuple[int | None, float | None]:
    """``"512MiB"``/``"2GB"``/``"1000000"`` -> (bytes, None); ``"0.8"`` -> (None, fraction of free memory)."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value < 1:
        return None, value
    m = _SIZE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a size such as 512MiB or 2GiB, or a fraction of free memory in (0, 1), got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()]), None


MAX_ADDRESS_CHARS = 261  # a 253-character host name, ":" and a port, or a bracketed IPv6 literal
_HOST = re.compile(r"^([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])$")


def address_problem(address: str) -> str | None:
    """Why ``address`` is not host:port (a host name, IPv4 or bracketed IPv6 literal, and a port), or None."""
    if len(address) > MAX_ADDRESS_CHARS:
        return f"at most {MAX_ADDRESS_CHARS} characters, got {len(address)}"
    host, sep, port = address.rpartition(":")
    if not sep or not _HOST.match(host) or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"expected host:port, got {address[:100]!r}"
    return None


def _check_address(name: str, addr: str) -> None:
    problem = address_problem(addr)
    if problem:
        raise ConfigError(f"{name}: {problem}")


C = TypeVar("C")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds a ``--field-name`` flag for every field of a config dataclass."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None:
            default = "auto"
        if isinstance(default, tuple):
            default = ",".join(default)
        help_text = f.metadata.get("help", "")
        parser.add_argument(flag, dest=f.name, default=None, help=f"{help_text} [env {env}; default {default}]")


def load(cls: type[C], args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> C:
    """Builds ``cls`` from defaults, then ``PDSERVE_*`` variables, then flags."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw, source = None, None
        env = ENV_PREFIX + f.name.upper()
        # An empty variable means unset, except for lists, where it means empty.
        if env in environ and (environ[env] != "" or typing.get_origin(hints[f.name]) is tuple):
            raw, source = environ[env], env
        flag_value = getattr(args, f.name, None) if args is not None else None
        if flag_value is not None:
            raw, source = flag_value, "--" + f.name.replace("_", "-")
        if raw is not None:
            values[f.name] = _parse(hints[f.name], raw, source)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def _parse(hint: Any, raw: Any, source: str) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint == int | None:  # "auto" (or unset): the default for the device
            return None if raw.strip().lower() == "auto" else int(raw)
        if hint is float:
            return float(raw)
        if origin is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if hint is str or isinstance(hint, types.UnionType):
            return raw
    except ValueError:
        raise ConfigError(f"{source}: cannot parse {raw!r} as {getattr(hint, '__name__', hint)}") from None
    return raw
