"""The cluster configurations the serving benchmark can start and compare, on the same cores.

- ``disagg``: 1 prefill + 1 decode, each pinned to its own half of the cores.
- ``colocated``: one engine on all cores that prefills whole prompts between
  decode steps (no chunking): a long prompt stalls every running request.
- ``colocated-chunked``: the same engine with chunked prefill (Sarathi-style):
  decode steps interleave with prefill chunks of ``chunk`` tokens.
- ``disagg-local``: ``disagg`` with conditional disaggregation: prompts up to
  ``local`` tokens are prefilled on the decode instance.
- ``disagg-2x2`` / ``disagg-2x2-rr``: 2 prefill + 2 decode instances sharing
  the cores, with the load-aware scheduler / round robin.
- ``disagg-2x2-cache``: ``disagg-2x2`` with the cache-aware scheduler (the
  default policy).
- ``disagg-nocache`` / ``disagg-2x2-nocache``: ``disagg`` / ``disagg-2x2`` with
  prefix caching off in both pools (every prompt computed and sent whole).
- ``disagg-paced``: ``disagg`` whose decode starts steps at least
  ``step_interval_ms`` apart (``--min-step-interval-ms``): prefill and decode
  sharing one GPU without MPS, where the GPU time-slices between the processes.
- ``disagg-traced``: ``disagg`` with ``tracing_env`` (tracing on at sampling
  ratio 1.0, every span exported to a receiver the benchmark starts:
  ``bench.otlp_sink.ReceiverProcess``).
"""

from __future__ import annotations

from pdserve_cli.cluster import ClusterSpec

CONFIGS = ("disagg", "disagg-paced", "colocated", "colocated-chunked", "disagg-local", "disagg-2x2", "disagg-2x2-rr", "disagg-traced",
           "disagg-2x2-cache", "disagg-nocache", "disagg-2x2-nocache")
# Prefix caching off on every instance (decode pools and prefill caches).
NO_CACHE = {"PDSERVE_PREFIX_CACHE": "false", "PDSERVE_PREFIX_CACHE_BYTES": "0"}


def cluster_spec(name: str, model: str, device: str = "cpu", dtype: str = "auto", chunk: int = 256,
                 max_batch: int = 64, kv_budget: str = "auto", local: int = 64,
                 tracing_env: dict[str, str] | None = None, prefill_device: str = "",
                 decode_device: str = "", step_interval_ms: float = 20.0) -> ClusterSpec:
    common = dict(model=model, device=device, dtype=dtype, gateway_port=0, pin_cores=device == "cpu",
                  max_batch=max_batch, kv_budget=kv_budget, log_level="WARNING", prefill_device=prefill_device,
                  decode_device=decode_device)
    if name in ("disagg", "disagg-nocache"):
        return ClusterSpec(prefill=1, decode=1,
                           extra_env=dict(NO_CACHE) if name.endswith("-nocache") else {}, **common)
    if name == "disagg-paced":
        return ClusterSpec(prefill=1, decode=1,
                           extra_env={"PDSERVE_MIN_STEP_INTERVAL_MS": str(step_interval_ms)}, **common)
    if name == "disagg-traced":
        if not tracing_env:
            raise ValueError("disagg-traced needs tracing_env (where the spans go)")
        return ClusterSpec(prefill=1, decode=1, extra_env=tracing_env, **common)
    if name == "disagg-local":
        return ClusterSpec(prefill=1, decode=1,
                           extra_env={"PDSERVE_LOCAL_PREFILL_TOKENS": str(local)}, **common)
    if name in ("disagg-2x2", "disagg-2x2-rr", "disagg-2x2-cache", "disagg-2x2-nocache"):
        policy = {"disagg-2x2-rr": "round_robin", "disagg-2x2-cache": "cache_aware"}.get(name, "load_aware")
        env = {"PDSERVE_POLICY": policy, **(NO_CACHE if name.endswith("-nocache") else {})}
        return ClusterSpec(prefill=2, decode=2, extra_env=env, **common)
    if name == "colocated":
        return ClusterSpec(prefill=0, decode=1, prefill_chunk_tokens=0, **common)
    if name == "colocated-chunked":
        return ClusterSpec(prefill=0, decode=1, prefill_chunk_tokens=chunk, prefill_token_budget=chunk, **common)
    raise ValueError(f"unknown configuration {name!r}; one of {', '.join(CONFIGS)}")
