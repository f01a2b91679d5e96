"""Continuous batching against what a plain transformers user would run, in one run.

The same mixed-length requests (``bench.workloads`` uniform mix, ignore_eos):

1. through a started pdserve cluster (``--config``, cores pinned), all at once;
2. through the same cluster one at a time (the continuous-batching bar: >= 8x);
3. in this process, after the cluster stopped, with ``model.generate`` one
   request after another (bar: pdserve <= 0.5x its time);
4. with one padded static-batch ``model.generate`` over all of them, left
   padded, every row generating the longest output (bar: pdserve <= 1.0x).

Prints a table and writes JSON. Example::

    python -m bench.vs_hf --num-requests 32 --out bench/out/vs_hf.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.configs import CONFIGS, cluster_spec
from bench.serving import run, summarize
from bench.workloads import Workload
from pdserve_cli.cluster import LocalCluster


async def _through_cluster(spec, workload: Workload, vocab: int) -> dict:
    cluster = LocalCluster(spec, progress=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        await cluster.start()
        await cluster.wait_healthy()
        warm = Workload(num_requests=2, input_len=(16, 64), output_len=(4, 4), seed=99)
        await run(cluster.gateway_address, warm, vocab, progress=False)
        out = {}
        for name, concurrency in (("concurrent", 0), ("sequential", 1)):
            w = Workload(**{**asdict(workload), "concurrency": concurrency})
            results, wall = await run(cluster.gateway_address, w, vocab)
            out[name] = summarize(results, wall, 1e9, 1e9)
            print(f"[vs_hf] pdserve {name}: {wall:.1f} s", file=sys.stderr, flush=True)
        return out
    finally:
        cluster.stop()


@torch.inference_mode()
def _hf(model_spec: str, requests: list[tuple[list[int], int]]) -> dict:
    from pdserve.model import load_model

    loaded = load_model(model_spec)
    model = loaded.model
    common = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    # Warm-up.
    model.generate(torch.tensor([[100] * 16]), max_new_tokens=2, **common)
    started = time.perf_counter()
    for i, (prompt, n) in enumerate(requests):
        ids = torch.tensor([prompt])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, **common)
        print(f"\r[vs_hf] generate one by one: {i + 1}/{len(requests)}", end="", file=sys.stderr, flush=True)
    one_by_one = time.perf_counter() - started
    print(file=sys.stderr)
    width = max(len(p) for p, _ in requests)
    ids = torch.zeros(len(requests), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, _) in enumerate(requests):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    started = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=max(n for _, n in requests), **common)
    static = time.perf_counter() - started
    print(f"[vs_hf] generate one by one {one_by_one:.1f} s, padded static batch {static:.1f} s", file=sys.stderr)
    return {"one_by_one_s": one_by_one, "static_batch_s": static, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--config", choices=CONFIGS, default="disagg")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/out/vs_hf.json")
    args = parser.parse_args(argv)

    from pdserve.model import load_model_info

    vocab = load_model_info(args.model).vocab_size
    workload = Workload(num_requests=args.num_requests, seed=args.seed)
    requests = workload.requests(vocab)
    ours = asyncio.run(_through_cluster(cluster_spec(args.config, args.model), workload, vocab))
    hf = _hf(args.model, requests)
    conc, seq = ours["concurrent"]["wall_s"], ours["sequential"]["wall_s"]
    tokens = sum(n for _, n in requests)
    rows = [
        ("pdserve, all at once", conc, tokens / conc),
        ("pdserve, one at a time", seq, tokens / seq),
        ("HF generate, one by one", hf["one_by_one_s"], tokens / hf["one_by_one_s"]),
        ("HF generate, padded static batch", hf["static_batch_s"], tokens / hf["static_batch_s"]),
    ]
    ratios = {
        "continuous_batching_speedup": seq / conc,           # bar >= 8
        "vs_generate_one_by_one": conc / hf["one_by_one_s"],  # bar <= 0.5
        "vs_static_batch": conc / hf["static_batch_s"],       # bar <= 1.0
    }
    print(f"\n{args.num_requests} requests, {tokens} output tokens, model {args.model}, pdserve config {args.config}\n")
    print("| how | wall s | output tok/s |\n| --- | ---: | ---: |")
    for name, wall, tps in rows:
        print(f"| {name} | {wall:.2f} | {tps:.1f} |")
    print(f"\ncontinuous batching: {ratios['continuous_batching_speedup']:.2f}x one-at-a-time throughput (bar >= 8x)")
    print(f"vs generate one by one: {ratios['vs_generate_one_by_one']:.2f}x the time (bar <= 0.5x)")
    print(f"vs padded static batch: {ratios['vs_static_batch']:.2f}x the time (bar <= 1.0x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "model": args.model,
                               "config": args.config, "output_tokens": tokens, "pdserve": ours, "hf": hf,
                               "ratios": ratios}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
