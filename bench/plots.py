"""PNG plots of serving benchmark runs: latency CDFs, and throughput / p99 ITL against request rate."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdfs(runs: list[dict], path: Path) -> Path:
    """One panel per metric (TTFT, ITL, E2E), one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric in zip(axes, ("ttft_s", "itl_s", "e2e_s")):
        for run in runs:
            values = sorted(run["samples"][metric])
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step([v * 1e3 for v in values], ys, where="post", label=run["label"])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(f"{metric[:-2].upper()} (ms, log)")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rate_sweep(runs: list[dict], path: Path) -> Path:
    """Output tokens/s and p99 ITL against request rate, one line per configuration."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_config: dict[str, list[dict]] = {}
    for run in runs:
        by_config.setdefault(run["config"], []).append(run)
    for config, items in by_config.items():
        items = sorted(items, key=lambda r: r["request_rate"])
        rates = [r["request_rate"] for r in items]
        left.plot(rates, [r["summary"]["output_token_throughput"] for r in items], marker="o", label=config)
        right.plot(rates, [r["summary"]["itl_s"]["p99"] * 1e3 for r in items], marker="o", label=config)
    left.set_xlabel("request rate (req/s)")
    left.set_ylabel("output tokens/s")
    right.set_xlabel("request rate (req/s)")
    right.set_ylabel("p99 ITL (ms)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
