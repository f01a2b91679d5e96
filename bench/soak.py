"""Soak: a cluster under steady load for minutes, instances restarted now and then; nothing leaks.

Starts 2 prefill + 2 decode + 1 gateway (real processes), measures capacity
with a short closed-loop burst, then sends Poisson arrivals at ``--load``
(0.8) of it for ``--duration`` seconds. Every ``--restart-every`` seconds one
prefill or decode instance is restarted, alternately by SIGTERM (it drains)
and by ``kill -9``. Every 5 s it samples each process's resident memory and
open file descriptors (``/proc``). At the end it checks that every request
completed with no error, greedy outputs match a reference computed by the same
cluster before the soak, and that memory and descriptors are flat: for every
process that lived 90 s past its warm-up, the last minute's mean RSS within
``--rss-slack`` of the first minute's, descriptors (other than mapped KV
segments) within 2, and mapped KV segments below their bound. Prints a
table, writes JSON and a PNG plot.

    python -m bench.soak --duration 300 --out bench/out/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from pdserve_cli.cluster import ClusterSpec, LocalCluster
from pdserve.sdk import AsyncClient

PAGE = os.sysconf("SC_PAGE_SIZE")
# Mapped KV segments a process may hold: the consumer's cache (32) plus a producer's idle pool and in-flight
# transfers; what matters is that the count stays below a bound, not that it is constant.
SHM_MAPS_BOUND = 64


def proc_sample(pid: int) -> tuple[float, int, int]:
    """(resident MiB, open file descriptors, of which shared-memory KV segment mappings) of a live process.
    Each mapped segment holds a descriptor (CPython's mmap keeps a dup); the consumer's ``SegmentCache``
    bounds them at its capacity, so they are counted apart from the rest."""
    with open(f"/proc/{pid}/statm") as f:
        rss_pages = int(f.read().split()[1])
    fds = shm = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        with contextlib.suppress(OSError):
            shm += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/pdserve-kv-")
    return rss_pages * PAGE / 2**20, fds, shm


class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        spec = ClusterSpec(model=args.model, prefill=2, decode=2, gateway_port=0, threads=1, max_batch=64,
                           log_level="WARNING", extra_env={"PDSERVE_HEALTH_INTERVAL_S": "0.5",
                                                           "PDSERVE_TOKEN_TIMEOUT_S": "10"})
        self.cluster = LocalCluster(spec, progress=lambda m: print(m, file=sys.stderr))
        self.samples: list[dict] = []      # {t, name, pid, rss_mib, fds}
        self.restarts: list[dict] = []     # {t, name, how}
        self.results: list[dict] = []      # {ok, exact, error, tokens}
        self.prompts: list[list[int]] = []
        self.expected: list[list[int]] = []

    async def one(self, client: AsyncClient, i: int) -> None:
        try:
            result = await client.generate(token_ids=self.prompts[i], max_tokens=self.args.max_tokens,
                                           temperature=0, ignore_eos=True)
            self.results.append({"ok": True, "exact": result.token_ids == self.expected[i], "error": ""})
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            self.results.append({"ok": False, "exact": False, "error": f"{type(exc).__name__}: {exc}"})

    async def sample_loop(self, started: float) -> None:
        while True:
            for m in self.cluster.members:
                if m.process.poll() is None:
                    try:
                        rss, fds, shm = proc_sample(m.process.pid)
                    except OSError:
                        continue
                    self.samples.append({"t": time.monotonic() - started, "name": m.name, "pid": m.process.pid,
                                         "rss_mib": rss, "fds": fds - shm, "shm_maps": shm})
            await asyncio.sleep(5)

    async def restart_loop(self, started: float) -> None:
        victims = ["decode-0", "prefill-1", "decode-1", "prefill-0"]
        n = 0
        while True:
            await asyncio.sleep(self.args.restart_every)
            name, how = victims[n % len(victims)], ("SIGTERM" if n % 2 == 0 else "SIGKILL")
            n += 1
            member = next(m for m in self.cluster.members if m.name == name)
            member.process.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
            await asyncio.to_thread(member.process.wait)
            self.cluster.restart(name)
            self.restarts.append({"t": time.monotonic() - started, "name": name, "how": how})
            print(f"[soak] {time.monotonic() - started:6.1f} s: {name} stopped by {how}, restarted", file=sys.stderr)

    async def capacity(self, client: AsyncClient) -> float:
        """Requests/s the cluster sustains with 16 in flight for ``--calibrate`` seconds."""
        done, stop_at = 0, time.monotonic() + self.args.calibrate

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                await client.generate(token_ids=self.prompts[self.rng.randrange(len(self.prompts))],
                                      max_tokens=self.args.max_tokens, temperature=0, ignore_eos=True)
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(16)))
        return done / (time.monotonic() - started)

    async def run(self) -> dict:
        args = self.args
        try:
            await self.cluster.start()
            await self.cluster.wait_healthy(timeout_s=180)
            async with AsyncClient(self.cluster.gateway_address, timeout=120) as client:
                vocab = (await client.model_info()).vocab_size
                self.prompts = [[self.rng.randrange(100, vocab) for _ in range(self.rng.randint(*args.input_len))]
                                for _ in range(32)]
                self.expected = [(await client.generate(token_ids=p, max_tokens=args.max_tokens, temperature=0,
                                                        ignore_eos=True)).token_ids for p in self.prompts]
                capacity = await self.capacity(client)
                rate = args.load * capacity
                print(f"[soak] capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s for {args.duration:.0f} s",
                      file=sys.stderr)
                started = time.monotonic()
                background = [asyncio.create_task(self.sample_loop(started)),
                              asyncio.create_task(self.restart_loop(started))]
                tasks = []
                while time.monotonic() - started < args.duration:
                    tasks.append(asyncio.create_task(self.one(client, self.rng.randrange(len(self.prompts)))))
                    await asyncio.sleep(self.rng.expovariate(rate))
                for task in background:
                    task.cancel()
                await asyncio.gather(*tasks)
                wall = time.monotonic() - started
        finally:
            self.cluster.stop()
        return self.report(capacity, rate, wall)

    def report(self, capacity: float, rate: float, wall: float) -> dict:
        args = self.args
        errors = [r["error"] for r in self.results if not r["ok"]]
        summary = {
            "date": time.strftime("%Y-%m-%d"), "model": args.model, "duration_s": args.duration, "wall_s": wall,
            "capacity_rps": capacity, "rate_rps": rate, "requests": len(self.results),
            "completed": sum(r["ok"] for r in self.results), "token_exact": sum(r["exact"] for r in self.results),
            "errors": len(errors), "error_kinds": sorted(set(errors))[:10], "restarts": self.restarts,
            "samples": self.samples,
        }
        summary.update(flatness(self.samples, args.warmup, args.rss_slack))
        return summary


def flatness(samples: list[dict], warmup: float, rss_slack: float, min_span: float = 90.0) -> dict:
    """Per process (name and pid: a restart starts a new one) that lived ``min_span`` s past its warm-up: mean
    RSS and descriptors over its first and its last minute (a third of its life if shorter)."""
    lives = {}
    for pid in dict.fromkeys(x["pid"] for x in samples):
        series = [x for x in samples if x["pid"] == pid]
        settled = [x for x in series if x["t"] >= series[0]["t"] + warmup]
        if len(settled) < 4 or settled[-1]["t"] - settled[0]["t"] < min_span:
            continue
        window = min(60.0, (settled[-1]["t"] - settled[0]["t"]) / 3)
        first = [x for x in settled if x["t"] <= settled[0]["t"] + window]
        last = [x for x in settled if x["t"] >= settled[-1]["t"] - window]
        mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
        lives[f"{series[0]['name']} (pid {pid}, {series[0]['t']:.0f}-{series[-1]['t']:.0f} s)"] = {
            "rss_first_mib": mean(first, "rss_mib"), "rss_last_mib": mean(last, "rss_mib"),
            "fds_first": mean(first, "fds"), "fds_last": mean(last, "fds"),
            "rss_max_mib": max(x["rss_mib"] for x in settled),
            "shm_maps_max": max(x.get("shm_maps", 0) for x in settled)}
    return {"memory_and_fds": lives,
            "rss_flat": all(v["rss_last_mib"] <= v["rss_first_mib"] * (1 + rss_slack) for v in lives.values()),
            "fds_flat": all(v["fds_last"] <= v["fds_first"] + 2 for v in lives.values()),
            "shm_maps_bounded": all(v["shm_maps_max"] <= SHM_MAPS_BOUND for v in lives.values())}


def print_report(s: dict) -> None:
    print(f"soak: {s['duration_s']:.0f} s at {s['rate_rps']:.2f} req/s ({s['rate_rps'] / s['capacity_rps']:.0%} of "
          f"{s['capacity_rps']:.2f}), restarts: {len(s['restarts'])}, requests: {s['requests']}, completed: "
          f"{s['completed']}, token-exact: {s['token_exact']}, errors: {s['errors']}, rss flat: {s['rss_flat']}, "
          f"fds flat: {s['fds_flat']}, shm mappings bounded: {s['shm_maps_bounded']}")
    for kind in s["error_kinds"]:
        print(f"  error: {kind}")
    print("\n| process (lifetime in the soak) | RSS first min, MiB | RSS last min, MiB | max | FDs first | FDs last "
          "| KV segment mappings, max |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, v in s["memory_and_fds"].items():
        print(f"| {name} | {v['rss_first_mib']:.1f} | {v['rss_last_mib']:.1f} | {v['rss_max_mib']:.1f} | "
              f"{v['fds_first']:.1f} | {v['fds_last']:.1f} | {v.get('shm_maps_max', 0)} |")


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for i, name in enumerate(sorted({x["name"] for x in s["samples"]})):
        color = f"C{i}"
        for j, pid in enumerate(dict.fromkeys(x["pid"] for x in s["samples"] if x["name"] == name)):
            series = [x for x in s["samples"] if x["pid"] == pid]  # one line per process: a restart breaks it
            label = name if j == 0 else None
            ax1.plot([x["t"] for x in series], [x["rss_mib"] for x in series], ".-", color=color, label=label,
                     markersize=3)
            ax2.plot([x["t"] for x in series], [x["fds"] for x in series], ".-", color=color, label=label,
                     markersize=3)
    for r in s["restarts"]:
        for ax in (ax1, ax2):
            ax.axvline(r["t"], color="grey", alpha=0.3)
    ax1.set_ylabel("resident MiB")
    ax2.set_ylabel("open fds (no KV segments)")
    ax2.set_xlabel("seconds (grey: an instance restarted)")
    ax1.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-json", metavar="JSON", help="report and plot an earlier run's JSON again, and exit")
    parser.add_argument("--model", default="preset:tiny-llama")
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of measured capacity")
    parser.add_argument("--calibrate", type=float, default=20.0, help="seconds of the capacity burst")
    parser.add_argument("--restart-every", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before memory counts as settled")
    parser.add_argument("--rss-slack", type=float, default=0.10, help="allowed growth of mean RSS, first to last")
    parser.add_argument("--input-len", type=lambda t: tuple(int(x) for x in t.split(":")), default=(8, 64))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/out/soak.json")
    args = parser.parse_args(argv)
    if args.from_json:
        summary = json.loads(Path(args.from_json).read_text())
        summary.update(flatness(summary["samples"], args.warmup, args.rss_slack))
        print_report(summary)
        plot(summary, Path(args.from_json).with_suffix(".png"))
        Path(args.from_json).write_text(json.dumps(summary, indent=1))
        return 0
    summary = asyncio.run(Soak(args).run())
    print_report(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    plot(summary, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    ok = summary["errors"] == 0 and summary["completed"] == summary["token_exact"] == summary["requests"] \
        and summary["rss_flat"] and summary["fds_flat"] and summary["shm_maps_bounded"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
