"""What int8 KV on the wire costs in quality, and what it saves in bytes.

For each prompt of a fixed set: prefill it once, then continue greedily from
(a) the exact prompt KV and (b) the same KV after the wire's int8 round trip
(``quantize_int8`` / ``dequantize_int8``, chunked exactly as ``GrpcKVSender``
chunks at the default 1 MiB). Reported:

- bytes on the wire, int8 (with its scales) against the model dtype;
- free-running agreement: generated tokens equal position by position, and
  how many prompts give an identical continuation;
- teacher-forced: feeding the exact path's tokens to both caches, the share
  of steps whose argmax agrees and the largest |logit difference| seen.

    python -m bench.int8_quality [--model default] [--tokens 32] [--dtype auto]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from pdserve.kv.wire import chunk_ranges, dequantize_int8, quantize_int8
from pdserve.model import load_model

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a lighthouse in winter.",
    "What is the capital of Australia, and why is it not Sydney?",
    "List three differences between TCP and UDP.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Give me a Python function that reverses a linked list.",
    "Why do cats purr? Answer briefly.",
    "Describe the water cycle for a ten-year-old.",
    "What are the main causes of inflation?",
    "Suggest a name for a bakery that only sells bread made with rye.",
    "How does a hash table handle collisions?",
    "Write a short, polite email declining a meeting invitation.",
    "What is the difference between weather and climate?",
    "Explain what a prime number is, with two examples.",
    "Recommend three exercises for a stiff lower back.",
]


def round_trip(cache: DynamicCache, chunk_bytes: int = 1 << 20) -> None:
    """In place: every layer's K/V through int8 and back, chunked as the sender chunks."""
    for layer in cache.layers:
        keys, values = layer.keys, layer.values  # (1, H, T, D)
        _, heads, tokens, dim = keys.shape
        per_token = 2 * heads * dim + 4
        for start, end in chunk_ranges(tokens, per_token, chunk_bytes):
            k = keys[0, :, start:end].transpose(0, 1)
            v = values[0, :, start:end].transpose(0, 1)
            dk, dv = dequantize_int8(*quantize_int8(k, v), dtype=keys.dtype)
            keys[0, :, start:end] = dk.transpose(0, 1)
            values[0, :, start:end] = dv.transpose(0, 1)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/out/int8_quality.json")
    args = parser.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = loaded.model, loaded.info.tokenizer
    kv = loaded.info.kv
    rows = []
    for text in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"].to(loaded.device)
        exact = DynamicCache(config=model.config)
        first = model(input_ids=ids, past_key_values=exact, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        quant = copy.deepcopy(exact)
        round_trip(quant)
        runs = {}
        for name, cache in (("exact", copy.deepcopy(exact)), ("int8", copy.deepcopy(quant))):
            token, out = first, [first.item()]
            for _ in range(args.tokens - 1):
                token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                out.append(token.item())
            runs[name] = out
        # Teacher-forced: both caches read the exact path's tokens; compare logits at every step.
        forced = torch.tensor([runs["exact"][:-1]], device=loaded.device)
        le = model(input_ids=forced, past_key_values=exact, use_cache=True).logits[0].float()
        lq = model(input_ids=forced, past_key_values=quant, use_cache=True).logits[0].float()
        same = sum(a == b for a, b in zip(runs["exact"], runs["int8"]))
        rows.append({"prompt_tokens": ids.shape[1], "agree": same / args.tokens,
                     "identical": runs["exact"] == runs["int8"],
                     "forced_argmax_agree": (le.argmax(-1) == lq.argmax(-1)).float().mean().item(),
                     "max_logit_diff": (le - lq).abs().max().item(), "logit_range": (le.max() - le.min()).item()})
        print(f"{ids.shape[1]:4d} prompt tokens: {same}/{args.tokens} tokens agree, teacher-forced argmax "
              f"{100 * rows[-1]['forced_argmax_agree']:.0f}%, max |dlogit| {rows[-1]['max_logit_diff']:.3f}", flush=True)
    t = sum(r["prompt_tokens"] for r in rows)
    native = 2 * kv.num_layers * t * kv.kv_heads * kv.head_dim * loaded.dtype.itemsize
    int8 = sum(kv.num_layers * (2 * r["prompt_tokens"] * kv.kv_heads * kv.head_dim + 4 * r["prompt_tokens"]
                                + 4 * kv.kv_heads * kv.head_dim) for r in rows)
    summary = {"model": loaded.info.name, "dtype": str(loaded.dtype).removeprefix("torch."), "prompts": len(rows),
               "tokens_generated": args.tokens, "bytes_ratio": int8 / native,
               "token_agreement": sum(r["agree"] for r in rows) / len(rows),
               "identical_continuations": sum(r["identical"] for r in rows),
               "forced_argmax_agreement": sum(r["forced_argmax_agree"] for r in rows) / len(rows),
               "max_logit_diff": max(r["max_logit_diff"] for r in rows),
               "median_logit_range": sorted(r["logit_range"] for r in rows)[len(rows) // 2]}
    print("\n| model | dtype | prompts | wire bytes (int8 / exact) | token agreement (free-running) "
          "| identical continuations | argmax agreement (teacher-forced) | max abs logit diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    s = summary
    print(f"| {s['model']} | {s['dtype']} | {s['prompts']} | {s['bytes_ratio']:.3f} | {100 * s['token_agreement']:.1f}% "
          f"| {s['identical_continuations']}/{s['prompts']} | {100 * s['forced_argmax_agreement']:.1f}% "
          f"| {s['max_logit_diff']:.3f} (logit range ~{s['median_logit_range']:.0f}) |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
