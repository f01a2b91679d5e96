"""Serving benchmark client, in the style of `vllm bench serve`.

Sends requests to a running gateway with Poisson arrivals at ``--request-rate``
(or a fixed ``--concurrency``), random token-id prompts of uniform random
lengths, and ``ignore_eos`` so every request produces its output length.
Measures on the client: TTFT, TPOT, ITL and end-to-end latency (p50/p90/p99),
request and output-token throughput, and goodput (requests per second that
meet both the TTFT and the TPOT SLO, as DistServe defines it). Prints a
markdown table and writes JSON.

Not yet here (issue 3): chat-like and long-prompt mixes, PNG plots, starting
the configurations to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pdserve.errors import PdserveError
from pdserve.sdk import AsyncClient


@dataclass(frozen=True)
class Workload:
    num_requests: int = 32
    input_len: tuple[int, int] = (32, 256)   # uniform, inclusive
    output_len: tuple[int, int] = (16, 64)
    request_rate: float = float("inf")       # requests/s, Poisson; inf: all at once
    concurrency: int = 0                     # >0: at most this many in flight
    seed: int = 0

    def requests(self, vocab_size: int) -> list[tuple[list[int], int]]:
        rng = random.Random(self.seed)
        return [([rng.randrange(100, vocab_size) for _ in range(rng.randint(*self.input_len))],
                 rng.randint(*self.output_len)) for _ in range(self.num_requests)]


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

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
                last = now
    except PdserveError as exc:
        result.error = f"{exc.status}: {exc}"
    result.e2e_s = last - start
    return result


async def run(address: str, workload: Workload, vocab_size: int, progress: bool = True) -> tuple[list[RequestResult], float]:
    """Runs the workload; returns per-request results and the wall time."""
    requests = workload.requests(vocab_size)
    rng = random.Random(workload.seed + 1)
    limit = asyncio.Semaphore(workload.concurrency) if workload.concurrency > 0 else None
    done = 0

    async def one(prompt, max_tokens):
        nonlocal done
        if limit is None:
            r = await _one(client, prompt, max_tokens)
        else:
            async with limit:
                r = await _one(client, prompt, max_tokens)
        done += 1
        if progress:
            print(f"\r[bench] {done}/{len(requests)} requests done", end="", file=sys.stderr, flush=True)
        return r

    async with AsyncClient(address) as client:
        started = time.perf_counter()
        tasks = []
        for prompt, max_tokens in requests:
            tasks.append(asyncio.create_task(one(prompt, max_tokens)))
            if workload.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(workload.request_rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    if progress:
        print(file=sys.stderr)
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
    return "\n".join(lines)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051", help="gateway address")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", type=_range, default=(32, 256), help="prompt tokens, N or MIN:MAX")
    parser.add_argument("--output-len", type=_range, default=(16, 64), help="output tokens, N or MIN:MAX")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    parser.add_argument("--concurrency", type=int, default=0, help="at most this many in flight (0: no limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=200.0)
    parser.add_argument("--out", default="bench/out/serving.json", help="JSON results")


def main(args: argparse.Namespace) -> int:
    workload = Workload(args.num_requests, args.input_len, args.output_len, args.request_rate, args.concurrency, args.seed)

    async def go():
        async with AsyncClient(args.address) as client:
            info = await client.model_info()
        return await run(args.address, workload, info.vocab_size)

    results, wall = asyncio.run(go())
    summary = summarize(results, wall, args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
    print(markdown(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workload_json = {k: (str(v) if v == float("inf") else v) for k, v in asdict(workload).items()}
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "address": args.address, "workload": workload_json,
                               "summary": summary}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
