"""The chart: samples/s per case, one panel per data set, horizontal bars on a log scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"limit": "#7f7f7f", "lavender": "#8e6bbf", "peer": "#e08a3c"}


def draw(results: dict[str, Any], path: Path, title: str) -> str | None:
    """Write the PNG; returns why not if matplotlib is missing (``pip install -e .[bench]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    panels = []
    for name, info in results["datasets"].items():
        cases = [c for c in results["cases"] if c["dataset"] == name and "samples_per_s" in c]
        if cases:
            panels.append((name, info, cases))
    heights = [max(1.2, 0.32 * len(cases) + 0.8) for _, _, cases in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(11, sum(heights)), gridspec_kw={"height_ratios": heights}
    )
    axes = axes if len(panels) > 1 else [axes]
    for ax, (name, info, cases) in zip(axes, panels, strict=True):
        labels = [c["case"] for c in cases][::-1]
        values = [c["samples_per_s"] for c in cases][::-1]
        colors = [COLORS[c["group"]] for c in cases][::-1]
        bars = ax.barh(labels, values, color=colors)
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 3, max(values) * 8)
        for bar, value in zip(bars, values, strict=True):
            if value >= 1e6:
                text = f"{value / 1e6:.2f} M/s"
            else:
                text = f"{value / 1e3:.1f} k/s" if value >= 1e3 else f"{value:.0f}/s"
            ax.text(value * 1.1, bar.get_y() + bar.get_height() / 2, text, va="center",
                    fontsize=8)  # fmt: skip
        ax.set_title(f"{name}: {info['rows']:,} rows of {info['description']}", fontsize=10,
                     loc="left")  # fmt: skip
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="x", which="major", alpha=0.3)
    axes[-1].set_xlabel("samples/s (log scale; median of repetitions)")
    fig.legend(
        handles=[Patch(color=c, label=g) for g, c in COLORS.items()],
        loc="upper right", fontsize=8,
    )  # fmt: skip
    fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
