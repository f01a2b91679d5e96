"""Tracing, metrics and logs of a real cluster: three service processes exporting OTLP to a real receiver.

One request from the CLI (the SDK inside) must give one trace holding spans of
the client, the gateway, prefill and decode with the right parents; every
service's /metrics must count it; every log line must be JSON with the
request id and the trace id.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request

import pytest

from pdserve import telemetry
from pdserve_cli.cluster import ClusterSpec, LocalCluster
from bench.otlp_sink import OtlpSink

pytestmark = pytest.mark.slow

MODEL = "preset:tiny-llama"
PROMPT = ",".join(str(t) for t in range(5, 45))  # 40 token ids
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    sink = OtlpSink()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    log_dir = tmp_path_factory.mktemp("logs")
    spec = ClusterSpec(model=MODEL, prefill=1, decode=1, gateway_port=0, threads=1, log_level="INFO", metrics=True,
                       log_dir=str(log_dir), extra_env={**otel, "PDSERVE_LOG_FORMAT": "json"})
    cluster = LocalCluster(spec)
    try:
        asyncio.run(cluster.start())
        asyncio.run(cluster.wait_healthy(timeout_s=180))
        yield cluster, sink, otel, log_dir
    finally:
        cluster.stop()
        sink.close()


def cli_generate(cluster: LocalCluster, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdserve_cli", "generate", "--address", cluster.gateway_address, "--token-ids", PROMPT,
         "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--json", *extra],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def by_name(spans: list[dict], name: str) -> list[dict]:
    return [s for s in spans if s["name"] == name]


def one(spans: list[dict], name: str) -> dict:
    found = by_name(spans, name)
    assert len(found) == 1, f"{name}: {len(found)} spans in {sorted(s['name'] for s in spans)}"
    return found[0]


def test_one_trace_spans_client_gateway_prefill_and_decode(traced):
    cluster, sink, otel, _ = traced
    done = cli_generate(cluster, otel)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["token_ids"]) == MAX_TOKENS
    trace_id = result["trace_id"]
    assert len(trace_id) == 32

    def complete(spans):
        names = {s["name"] for s in spans}
        return {"pdserve generate", "pdserve.request", "kv.transfer", "decode.lifetime",
                "/pdserve.v1.Decode/PushKV"} <= names
    spans = sink.wait_for(trace_id, complete)
    assert {s["service"] for s in spans} == {"pdserve-client", "pdserve-gateway", "pdserve-prefill", "pdserve-decode"}
    for span in spans:  # Phoenix shows span attributes only: the service is on every span too
        assert span["attributes"]["service.name"] == span["service"]
    ids = {s["span_id"]: s for s in spans}

    def parent(span: dict) -> dict:
        return ids[span["parent_id"]]

    root = one(spans, "pdserve generate")
    assert root["parent_id"] == ""
    client = one(spans, "pdserve.client.generate")
    assert parent(client) is root
    gateway_rpc = one(spans, "/pdserve.v1.Gateway/Generate")
    assert parent(gateway_rpc) is client and gateway_rpc["service"] == "pdserve-gateway"
    request = one(spans, "pdserve.request")
    assert parent(request) is gateway_rpc
    assert request["attributes"]["pdserve.completion_tokens"] == MAX_TOKENS
    assert request["attributes"]["pdserve.prompt_tokens"] == 40
    assert request["attributes"]["pdserve.request_id"] == result["request_id"]
    attempt = one(spans, "pdserve.attempt")
    assert parent(attempt) is request
    schedule = one(spans, "pdserve.schedule")
    assert parent(schedule) is attempt
    prefill_member, decode_member = cluster.members[1], cluster.members[0]
    assert schedule["attributes"]["pdserve.prefill.instance"] == prefill_member.address
    assert schedule["attributes"]["pdserve.decode.instance"] == decode_member.address
    assert "occupancy" in schedule["attributes"]["pdserve.decode.reason"]

    prefill_rpc = one(spans, "/pdserve.v1.Prefill/Prefill")
    assert parent(prefill_rpc) is attempt and prefill_rpc["service"] == "pdserve-prefill"
    for name in ("prefill.queue", "prefill.forward", "kv.transfer"):
        assert parent(one(spans, name)) is prefill_rpc, name
    assert one(spans, "prefill.forward")["attributes"]["pdserve.prompt_tokens"] == 40
    transfer = one(spans, "kv.transfer")
    layers = transfer["attributes"]["pdserve.kv.layers"]
    assert transfer["attributes"]["pdserve.kv.bytes"] > 0 and transfer["attributes"]["pdserve.kv.gb_per_s"] > 0
    assert [e["attributes"]["layer"] for e in transfer["events"]] == list(range(layers))

    decode_rpc = one(spans, "/pdserve.v1.Decode/Generate")
    assert parent(decode_rpc) is attempt and decode_rpc["service"] == "pdserve-decode"
    push = by_name(spans, "/pdserve.v1.Decode/PushKV")
    assert push and all(parent(p) is prefill_rpc and p["service"] == "pdserve-decode" for p in push)
    assert parent(one(spans, "decode.admission")) is decode_rpc
    life = one(spans, "decode.lifetime")
    assert parent(life) is decode_rpc
    assert life["attributes"]["pdserve.tokens"] == MAX_TOKENS - 1  # the first token came from prefill
    assert life["attributes"]["pdserve.finish_reason"] == "FINISH_REASON_LENGTH"
    # Probes are not traced: no health check or load report span anywhere.
    assert not [s for s in sink.spans if s["name"].endswith(("/Check", "/Watch", "/GetStats", "/Heartbeat"))]


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        return reply.read().decode()


def value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in /metrics")


def test_every_service_serves_prometheus_metrics(traced):
    cluster, _, otel, _ = traced
    decode, prefill, gateway = (m.metrics_address for m in cluster.members)
    before = value(scrape(gateway), 'pdserve_requests_total{outcome="length"}') if "outcome" in scrape(gateway) else 0
    assert cli_generate(cluster, otel).returncode == 0
    bad = cli_generate(cluster, otel, "--max-tokens", "0")  # refused by the gateway: INVALID_ARGUMENT
    assert bad.returncode != 0

    text = scrape(gateway)
    assert value(text, 'pdserve_requests_total{outcome="length"}') == before + 1
    assert value(text, "pdserve_time_to_first_token_seconds_count") >= 1
    assert value(text, "pdserve_time_per_output_token_seconds_count") >= 1
    assert value(text, "pdserve_inter_token_latency_seconds_count") >= MAX_TOKENS - 1
    assert value(text, 'pdserve_rpc_failures_total{code="INVALID_ARGUMENT",method="Generate"}') == 1
    assert value(text, 'pdserve_instances{role="decode",state="up"}') == 1
    assert value(text, "pdserve_requests_running") == 0
    assert "pdserve_retries_total" in text and "pdserve_migrations_total" in text

    text = scrape(prefill)
    assert value(text, "pdserve_prefill_forward_seconds_count") >= 1
    assert value(text, 'pdserve_kv_transfers_total{result="done"}') >= 1
    assert value(text, "pdserve_kv_transfer_seconds_count") >= 1
    assert value(text, 'pdserve_kv_transfer_bytes_total{transport="shm"}') > 0  # same host: shared memory
    assert value(text, "pdserve_prefill_queue_prompts") == 0

    text = scrape(decode)
    assert value(text, "pdserve_decode_admission_seconds_count") >= 1
    assert value(text, "pdserve_decode_batch_size") == 0
    assert value(text, 'pdserve_kv_pool_blocks{state="used"}') == 0
    assert value(text, 'pdserve_kv_pool_blocks{state="free"}') > 0
    assert value(text, "pdserve_kv_pool_usage_ratio") == 0


def test_json_logs_carry_request_and_trace_ids(traced):
    cluster, sink, otel, log_dir = traced
    done = cli_generate(cluster, otel)
    result = json.loads(done.stdout)
    sink.wait_for(result["trace_id"], lambda spans: any(s["name"] == "pdserve.request" for s in spans))
    lines = {}
    for member in cluster.members:
        path = log_dir / f"{member.name}.log"
        lines[member.name] = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        assert lines[member.name], f"{member.name}: no JSON log lines"
        assert all({"time", "level", "service", "message", "request_id", "trace_id"} <= set(e) for e in lines[member.name])
        # Streams the gateway cancels at a request's end must not log tracing errors ("Failed to detach context").
        assert not [e for e in lines[member.name] if e["level"] == "ERROR"], member.name
    mine = [e for e in lines["gateway"] if e["request_id"] == result["request_id"]]
    assert [e["message"].split()[1] for e in mine][-1] == "finished", mine
    assert {e["trace_id"] for e in mine} == {result["trace_id"]}


def test_tracing_off_installs_nothing():
    assert not telemetry.wanted({})
    assert not telemetry.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"})
    assert not telemetry.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert telemetry.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/traces"})
    if not telemetry.enabled():  # this test process never set tracing up
        assert telemetry.server_interceptors() == [] and telemetry.outgoing() is None
