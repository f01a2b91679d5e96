"""Summarizes a py-spy ``--format raw`` profile (collapsed stacks, ``--threads``, ``--subprocesses``): per
process and thread, its samples and the frames where they were spent (self time), plus the functions that
hold most samples anywhere in their stacks (inclusive). With ``py-spy --gil`` the samples are only those of
the thread holding the GIL: a process's samples over ``rate x seconds`` is how busy its GIL was.

    python -m bench.profile_summary profile.txt [--top 12] [--rate 200] [--seconds 30]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_LOCATION = re.compile(r" \((?:.*/)?([^/]+):\d+\)$")


def short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: lines of one function counted together."""
    return _LOCATION.sub(lambda m: f" ({m.group(1)})", frame.strip())


def parse(path: str):
    """Yields (process, thread, frames root-first, count) per collapsed line."""
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            parts = stack.split(";")
            process = "?"
            while parts and parts[0].startswith("process "):  # a subprocess's stacks start with its parents'
                process = parts.pop(0)
            thread = parts.pop(0) if parts and parts[0].startswith("thread ") else "?"
            frames = [short(f) for f in parts]
            if any(f.startswith("_find_and_load ") for f in frames):
                continue  # importing at startup: not what is profiled
            yield process, thread, frames, int(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--rate", type=float, default=0, help="samples/s (with --seconds: busy share)")
    parser.add_argument("--seconds", type=float, default=0)
    args = parser.parse_args(argv)
    per_thread: dict = collections.defaultdict(collections.Counter)
    inclusive: dict = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for process, thread, frames, count in parse(args.profile):
        key = (process[:90], re.sub(r"\(0x[0-9a-f]+\)", "", thread).strip()[:60])
        totals[key] += count
        per_thread[key][frames[-1] if frames else "?"] += count
        for frame in set(frames):
            inclusive[process[:90]][frame] += count
    by_process = collections.Counter()
    for (process, _), n in totals.items():
        by_process[process] += n
    for process, n in by_process.most_common():
        busy = f" ({100 * n / (args.rate * args.seconds):.0f}% of the wall time)" if args.rate and args.seconds else ""
        print(f"\n## {process}: {n} samples{busy}")
        for (p, thread), tn in totals.most_common():
            if p != process or tn < n / 50:
                continue
            print(f"  {thread}: {tn} samples; self:")
            for frame, c in per_thread[(p, thread)].most_common(args.top):
                print(f"    {c:6d} {100 * c / tn:5.1f}%  {frame[:130]}")
        print("  inclusive (any thread):")
        for frame, c in inclusive[process].most_common(args.top * 2):
            print(f"    {c:6d} {100 * c / n:5.1f}%  {frame[:130]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
