"""Smoke run of the serving benchmark (the full benchmark is not a test)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

from bench.serving import RequestResult, Workload, markdown, percentiles, run, summarize
from pdserve.cli import main as cli_main


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
            "--output-len", "5", "--request-rate", "50", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["summary"]["completed"] == 4
    assert data["summary"]["output_token_throughput"] > 0
