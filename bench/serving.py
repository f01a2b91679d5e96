"""Serving benchmark, in the style of `vllm bench serve`.

Sends a request mix (``bench.workloads``: uniform, chat-like, or with periodic
long prompts) with Poisson arrivals at one or more ``--request-rate`` values
(or a fixed ``--concurrency``) and ``ignore_eos``, to a running gateway
(``--address``) or to configurations it starts itself and compares on the
same cores (``--start disagg,colocated,colocated-chunked``, see
``bench.configs``). Measures on the client: TTFT, TPOT, ITL and end-to-end
latency (mean/p50/p90/p99), request and output-token throughput, and goodput
(requests per second meeting both the TTFT and the TPOT SLO, as DistServe
defines it). Shows a progress bar, prints markdown tables, writes JSON and PNG
plots (latency CDFs; throughput and p99 ITL against request rate).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.configs import CONFIGS
from bench.workloads import DATASETS, Workload
from pdserve.errors import PdserveError
from pdserve.sdk import AsyncClient


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    cached_tokens: int = 0     # prompt tokens a prefix cache supplied (not computed)
    kv_bytes: int = 0          # KV bytes transferred prefill -> decode
    kv_cached_tokens: int = 0  # prompt tokens decode held already (not transferred, or not computed there)
    token_ids: list[int] = field(default_factory=list)

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": sum(ordered) / len(ordered)}


async def _one(client: AsyncClient, prompt: list[int], max_tokens: int) -> RequestResult:
    result = RequestResult(prompt_tokens=len(prompt))
    start = last = time.perf_counter()
    try:
        async for chunk in client.stream(token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
            now = time.perf_counter()
            if chunk.token_ids:
                if result.output_tokens == 0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                result.output_tokens += len(chunk.token_ids)
                result.token_ids += chunk.token_ids
                last = now
            if chunk.finish_reason is not None:
                timings = chunk.server_timings
                result.cached_tokens = int(timings.get("cached_tokens", 0))
                result.kv_bytes = int(timings.get("kv_bytes", 0))
                result.kv_cached_tokens = int(timings.get("kv_cached_tokens", 0))
    except PdserveError as exc:
        result.error = f"{exc.status}: {exc}"
    result.e2e_s = last - start
    return result


async def run(address: str, workload: Workload, vocab_size: int, progress: bool = True,
              api_key: str | None = None) -> tuple[list[RequestResult], float]:
    """Runs the workload; returns per-request results and the wall time. A multiturn workload's arrivals
    are conversations, whose turns follow one another."""
    multiturn = workload.dataset == "multiturn"
    units = workload.conversations(vocab_size) if multiturn else workload.requests(vocab_size)
    total = sum(len(c) for c in units) if multiturn else len(units)
    rng = random.Random(workload.seed + 1)
    limit = asyncio.Semaphore(workload.concurrency) if workload.concurrency > 0 else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="[bench] requests", unit="req", file=sys.stderr, leave=False)

    async def one(prompt, max_tokens):
        if limit is None:
            r = await _one(client, prompt, max_tokens)
        else:
            async with limit:
                r = await _one(client, prompt, max_tokens)
        if bar is not None:
            bar.update(1)
        return r

    async def conversation(turns) -> list[RequestResult]:
        """multiturn: each turn's prompt is the conversation so far and the new user tokens."""
        history, out = [], []
        for user, max_tokens in turns:
            prompt = history + user
            out.append(await one(prompt, max_tokens))
            if out[-1].error:
                break  # the conversation cannot go on without the answer
            history = prompt + out[-1].token_ids
        return out

    async with AsyncClient(address, api_key=api_key) as client:
        started = time.perf_counter()
        tasks = []
        for item in units:
            tasks.append(asyncio.create_task(conversation(item) if multiturn else one(*item)))
            if workload.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(workload.request_rate))
        done = await asyncio.gather(*tasks)
        results = [r for group in done for r in group] if multiturn else done
        wall = time.perf_counter() - started
    if bar is not None:
        bar.close()
    return results, wall


def summarize(results: list[RequestResult], wall_s: float, ttft_slo_s: float, tpot_slo_s: float) -> dict:
    ok = [r for r in results if not r.error]
    good = [r for r in ok if r.ttft_s <= ttft_slo_s and r.tpot_s <= tpot_slo_s]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error}),
        "wall_s": wall_s,
        "request_throughput": len(ok) / wall_s,
        "output_token_throughput": output_tokens / wall_s,
        "goodput": len(good) / wall_s,
        "slo": {"ttft_s": ttft_slo_s, "tpot_s": tpot_slo_s},
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "tpot_s": percentiles([r.tpot_s for r in ok if r.output_tokens > 1]),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
        # Prefix caching: prompt tokens sent, those computed (not supplied by a cache), KV bytes moved.
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "prompt_tokens_computed": sum(r.prompt_tokens - r.cached_tokens for r in ok),
        "cache_hit_rate": sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok)),
        "kv_hit_rate": sum(r.kv_cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok)),
        "kv_bytes": sum(r.kv_bytes for r in ok),
    }


def markdown(summary: dict) -> str:
    lines = [
        f"requests {summary['completed']}/{summary['requests']} completed in {summary['wall_s']:.2f} s; "
        f"{summary['request_throughput']:.2f} req/s, {summary['output_token_throughput']:.1f} output tok/s, "
        f"goodput {summary['goodput']:.2f} req/s (TTFT <= {summary['slo']['ttft_s'] * 1e3:.0f} ms, "
        f"TPOT <= {summary['slo']['tpot_s'] * 1e3:.0f} ms)",
        "",
        "| metric (ms) | mean | p50 | p90 | p99 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        p = summary[name]
        lines.append(f"| {name[:-2].upper()} | {p['mean'] * 1e3:.1f} | {p['p50'] * 1e3:.1f} | {p['p90'] * 1e3:.1f} | {p['p99'] * 1e3:.1f} |")
    lines += ["", f"prompt tokens {summary['prompt_tokens']}, computed {summary['prompt_tokens_computed']} "
                  f"(cache hit rate {summary['cache_hit_rate']:.1%}); KV moved {summary['kv_bytes'] / 2**20:.1f} MiB "
                  f"(decode held {summary['kv_hit_rate']:.1%} of prompt tokens)"]
    return "\n".join(lines)


def samples(results: list[RequestResult]) -> dict[str, list[float]]:
    """Raw per-request (and per-token, for ITL) latencies, for CDF plots."""
    ok = [r for r in results if not r.error]
    return {"ttft_s": [r.ttft_s for r in ok], "itl_s": [x for r in ok for x in r.itl_s], "e2e_s": [r.e2e_s for r in ok]}


def comparison(runs: list[dict]) -> str:
    """One row per run: the figures that compare configurations."""
    lines = ["| run | req/s | out tok/s | goodput | TTFT p50 | TTFT p99 | TPOT p50 | ITL p50 | ITL p99 | E2E p99 | "
             "prompt tok computed | cache hit | KV MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        s = run["summary"]
        ms = lambda name, q: f"{s[name][q] * 1e3:.0f}"  # noqa: E731
        lines.append(f"| {run['label']} | {s['request_throughput']:.2f} | {s['output_token_throughput']:.1f} | "
                     f"{s['goodput']:.2f} | {ms('ttft_s', 'p50')} | {ms('ttft_s', 'p99')} | {ms('tpot_s', 'p50')} | "
                     f"{ms('itl_s', 'p50')} | {ms('itl_s', 'p99')} | {ms('e2e_s', 'p99')} | "
                     f"{s['prompt_tokens_computed']} | {s['cache_hit_rate']:.1%} | {s['kv_bytes'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n(latencies in ms)"


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def _rates(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051", help="gateway address (unless --start)")
    parser.add_argument("--api-key", default=None, help="API key for a gateway that requires one [env PDSERVE_API_KEY]")
    parser.add_argument("--start", default="", help="configurations to start and compare, comma-separated: "
                        f"{', '.join(CONFIGS)} (cores pinned; see bench/configs.py)")
    parser.add_argument("--model", default="default", help="model for --start")
    parser.add_argument("--device", default="cpu", help="device for --start")
    parser.add_argument("--prefill-device", default="", help="--start: the prefill instances' device (default --device)")
    parser.add_argument("--decode-device", default="", help="--start: the decode instances' device (default --device)")
    parser.add_argument("--kv-budget", default="auto", help="--start: each decode instance's KV pool (e.g. 30GiB)")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk of colocated-chunked")
    parser.add_argument("--cluster-logs", default="", metavar="DIR",
                        help="--start: each member's log, at DEBUG (a line per prefill pass, per decode request), "
                             "in DIR/<config>/<member>.log")
    parser.add_argument("--step-interval-ms", type=float, default=20.0,
                        help="disagg-paced: the decode instance's --min-step-interval-ms")
    parser.add_argument("--local-prefill-tokens", type=int, default=64,
                        help="disagg-local: prompts up to this many tokens are prefilled on decode")
    parser.add_argument("--max-batch", type=int, default=64, help="decode batch limit for --start")
    parser.add_argument("--dataset", choices=DATASETS, default="uniform", help="request mix (bench/workloads.py)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", type=_range, default=(32, 256), help="prompt tokens, N or MIN:MAX")
    parser.add_argument("--output-len", type=_range, default=(16, 64), help="output tokens, N or MIN:MAX")
    parser.add_argument("--long-len", type=_range, default=(1024, 1536), help="long prompts of the long mix")
    parser.add_argument("--long-every", type=int, default=8, help="every Nth prompt of the long mix is long")
    parser.add_argument("--prefix-len", type=_range, default=(512, 1024),
                        help="shared-prefix: system prompt tokens; multiturn: each conversation's opening context")
    parser.add_argument("--prefixes", type=int, default=4, help="shared-prefix: distinct system prompts")
    parser.add_argument("--turns", type=int, default=4, help="multiturn: turns per conversation")
    parser.add_argument("--request-rate", type=_rates, default=[float("inf")],
                        help="requests/s (Poisson), comma-separated for a sweep; inf: all at once")
    parser.add_argument("--concurrency", type=int, default=0, help="at most this many in flight (0: no limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=200.0)
    parser.add_argument("--out", default="bench/out/serving.json", help="JSON results; plots go beside it")
    parser.add_argument("--no-plots", action="store_true")


async def _bench_address(address: str, workloads: list[Workload], args, label: str, config: str) -> list[dict]:
    async with AsyncClient(address, api_key=args.api_key) as client:
        info = await client.model_info()
        # Warm-up: the first requests pay one-time costs (allocations, kernel selection).
        await asyncio.gather(*[client.generate(token_ids=list(range(100, 100 + n)), max_tokens=4, ignore_eos=True)
                               for n in (16, 64)])
    runs = []
    for workload in workloads:
        results, wall = await run(address, workload, info.vocab_size, api_key=args.api_key)
        summary = summarize(results, wall, args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
        rate = workload.request_rate
        runs.append({"label": f"{label} @ {rate:g} req/s" if rate != float("inf") else label, "config": config,
                     "request_rate": rate if rate != float("inf") else "inf",
                     "workload": {k: (str(v) if v == float("inf") else v) for k, v in asdict(workload).items()},
                     "summary": summary, "samples": samples(results)})
        print(f"\n### {runs[-1]['label']}\n\n{markdown(summary)}", flush=True)
    return runs


async def _bench_started(name: str, workloads: list[Workload], args) -> list[dict]:
    from bench.configs import cluster_spec
    from bench.otlp_sink import ReceiverProcess
    from pdserve_cli.cluster import LocalCluster

    # A traced configuration exports every span to an OTLP receiver in its own process.
    receiver = ReceiverProcess() if name.endswith("-traced") else None
    try:
        with receiver or contextlib.nullcontext():
            spec = cluster_spec(name, args.model, device=args.device, chunk=args.chunk, max_batch=args.max_batch,
                                local=args.local_prefill_tokens, tracing_env=receiver.env if receiver else None,
                                kv_budget=args.kv_budget, prefill_device=args.prefill_device,
                                decode_device=args.decode_device, step_interval_ms=args.step_interval_ms)
            if args.cluster_logs:
                spec = replace(spec, log_level="DEBUG", log_dir=os.path.join(args.cluster_logs, name))
            cluster = LocalCluster(spec, progress=lambda m: print(m, file=sys.stderr, flush=True))
            print(f"[bench] starting {name}: {spec.describe()}", file=sys.stderr, flush=True)
            try:
                await cluster.start()
                await cluster.wait_healthy()
                return await _bench_address(cluster.gateway_address, workloads, args, name, name)
            finally:
                cluster.stop()
    finally:
        if receiver is not None:
            print(f"[bench] {name}: OTLP receiver {receiver.report}", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    workloads = [Workload(args.num_requests, args.dataset, args.input_len, args.output_len, args.long_len,
                          args.long_every, rate, args.concurrency, args.seed, args.prefix_len, args.prefixes,
                          args.turns) for rate in args.request_rate]
    configs = [c.strip() for c in args.start.split(",") if c.strip()]

    async def go() -> list[dict]:
        if not configs:
            return await _bench_address(args.address, workloads, args, args.address, "running cluster")
        runs = []
        for name in configs:
            runs += await _bench_started(name, workloads, args)
        return runs

    runs = asyncio.run(go())
    if len(runs) > 1:
        print(f"\n### comparison ({args.dataset} mix)\n\n{comparison(runs)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                               "dataset": args.dataset, "runs": runs}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_plots:
        from bench import plots

        print(f"wrote {plots.latency_cdfs(runs, out.with_suffix('.cdf.png'))}", file=sys.stderr)
        if len(args.request_rate) > 1:
            print(f"wrote {plots.rate_sweep(runs, out.with_suffix('.rates.png'))}", file=sys.stderr)
    return 0 if all(run["summary"]["failed"] == 0 for run in runs) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
