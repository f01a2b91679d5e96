"""Smoke run of the serving benchmark (the full benchmark is not a test)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

import pytest

from bench.serving import RequestResult, Workload, markdown, percentiles, run, summarize
from pdserve_cli.main import main as cli_main


def test_percentiles_and_goodput():
    p = percentiles([float(i) for i in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"]) == (51.0, 90.0, 99.0)
    fast = RequestResult(10, output_tokens=5, ttft_s=0.1, e2e_s=0.5)   # TPOT 0.1
    slow = RequestResult(10, output_tokens=5, ttft_s=3.0, e2e_s=3.4)
    failed = RequestResult(10, error="UNAVAILABLE: x")
    s = summarize([fast, slow, failed], wall_s=2.0, ttft_slo_s=1.0, tpot_slo_s=0.2)
    assert (s["completed"], s["failed"], s["goodput"]) == (2, 1, 0.5)
    assert s["output_token_throughput"] == 5.0
    assert "| TTFT |" in markdown(s)


def test_mixes_have_the_promised_shapes():
    long = Workload(num_requests=64, dataset="long", input_len=(32, 128), long_len=(1024, 1100), long_every=8).lengths()
    assert sum(n >= 1024 for n, _ in long) == 8 and all(32 <= n <= 128 for n, _ in long if n < 1024)
    chat = Workload(num_requests=400, dataset="chat", input_len=(16, 1024), output_len=(8, 256)).lengths()
    prompts = sorted(n for n, _ in chat)
    assert 16 <= prompts[0] and prompts[-1] <= 1024
    assert prompts[len(prompts) // 2] < 200 < prompts[-10], "short median, long tail"
    assert Workload(num_requests=5, seed=1).lengths() == Workload(num_requests=5, seed=1).lengths()
    with pytest.raises(ValueError, match="dataset"):
        Workload(dataset="sharegpt")
    shared = Workload(num_requests=12, dataset="shared-prefix", prefixes=3, prefix_len=(40, 40), input_len=(5, 9)).requests(500)
    assert len({tuple(p[:40]) for p, _ in shared}) == 3 and all(45 <= len(p) <= 49 for p, _ in shared)
    talks = Workload(num_requests=10, dataset="multiturn", turns=4, prefix_len=(30, 30), input_len=(5, 5)).conversations(500)
    assert [len(t) for t in talks] == [4, 4, 2] and all(len(t[0][0]) == 35 and len(t[1][0]) == 5 for t in talks)


async def test_a_multiturn_benchmark_sends_each_turn_the_conversation_so_far(tiny_cluster):
    workload = Workload(num_requests=6, dataset="multiturn", turns=3, prefix_len=(40, 40), input_len=(6, 6),
                        output_len=(5, 5), seed=2)
    results, wall = await run(tiny_cluster.address, workload, vocab_size=1024, progress=False)
    assert [r.prompt_tokens for r in results] == [46, 46 + 5 + 6, 46 + 2 * (5 + 6)] * 2
    summary = summarize(results, wall, 10.0, 1.0)
    assert summary["completed"] == 6 and summary["kv_hit_rate"] > 0.3  # later turns' history is cached on decode
    assert summary["prompt_tokens_computed"] < summary["prompt_tokens"]


async def test_benchmark_smoke_against_a_cluster(tiny_cluster):
    workload = Workload(num_requests=8, input_len=(4, 32), output_len=(4, 12), concurrency=4, seed=3)
    results, wall = await run(tiny_cluster.address, workload, vocab_size=1024, progress=False)
    expected = [n for _, n in workload.requests(1024)]
    assert [r.output_tokens for r in results] == expected
    assert all(not r.error and r.ttft_s > 0 and len(r.itl_s) == r.output_tokens - 1 for r in results)
    summary = summarize(results, wall, 10.0, 1.0)
    assert summary["completed"] == 8 and summary["goodput"] > 0


async def test_pdserve_bench_cli(tiny_cluster, tmp_path):
    out = tmp_path / "bench.json"
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        code = await loop.run_in_executor(pool, cli_main, [
            "bench", "--address", tiny_cluster.address, "--num-requests", "4", "--input-len", "8:16",
            "--output-len", "5", "--request-rate", "50,200", "--dataset", "chat", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["request_rate"] for r in data["runs"]] == [50, 200]
    for r in data["runs"]:
        assert r["summary"]["completed"] == 4 and r["summary"]["output_token_throughput"] > 0
        assert len(r["samples"]["itl_s"]) == 4 * 4
    for plot in ("bench.cdf.png", "bench.rates.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_pdserve_bench_starts_and_compares_configurations(tmp_path):
    out = tmp_path / "cmp.json"
    code = cli_main(["bench", "--start", "disagg,colocated-chunked", "--model", "preset:tiny-llama", "--chunk", "32",
                     "--dataset", "long", "--num-requests", "8", "--input-len", "8:32", "--long-len", "100",
                     "--long-every", "4", "--output-len", "6", "--out", str(out)])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["config"] for r in runs] == ["disagg", "colocated-chunked"]
    assert all(r["summary"]["completed"] == 8 for r in runs)


def test_transfer_ttft_runs_against_a_tls_cluster(tmp_path):
    """bench.transfer's TTFT part starts a cluster (mutual TLS, the default) and talks to its members itself:
    it must use the cluster's credentials (it once opened plaintext channels, and failed on the H200)."""
    from bench.transfer import main as transfer_main

    out = tmp_path / "transfer.json"
    code = transfer_main(["--skip-wire", "--model", "preset:tiny-llama", "--ttft-lengths", "40",
                          "--overlap-length", "40", "--ttft-transports", "grpc x1,shm", "--repeats", "1",
                          "--threads", "1", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["ttft"]
    assert [(r["transport"], r["tokens"]) for r in rows] == [("grpc x1", 40), ("shm", 40)]
    assert all(r["kv_bytes"] > 0 and r["forward_ms"] > 0 and r["tail_ms"] >= 0 and r["alone_ms"] > 0 for r in rows)
    assert all(len(r["timeline"]["layers"]) == 4 for r in rows)  # tiny-llama's layers, each timed
