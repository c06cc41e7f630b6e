"""PNG figures of a sweep: Pareto fronts of quality vs cache bytes, per-layer fidelity, keep-rate heatmaps,
where the bytes go. Each function draws one figure to `path` (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from kvtrain.eval.metrics import pareto_front

MARKERS = {"low": "o", "mid": "s", "high": "^", "trained": "*"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_with_side_legend(plt, fig, ax, path: Path) -> None:
    """Grid, the legend to the right of the axes (many series would hide the points), saved and closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto(points: Sequence[dict[str, Any]], path: Path, *, title: str, quality: str, lower_is_better: bool,
           full_quality: float | None) -> None:
    """`points`: dicts with method, budget, fraction (cache bytes / 16-bit full cache) and quality."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = list(dict.fromkeys(p["method"] for p in points))
    palette = plt.cm.tab10 if len(methods) <= 10 else plt.cm.tab20  # no colour shared by two methods
    colors = {m: palette(i % palette.N) for i, m in enumerate(methods)}
    for p in points:
        ax.scatter(p["fraction"], p["quality"], color=colors[p["method"]], marker=MARKERS.get(p["budget"], "D"),
                   s=70 if p["budget"] == "trained" else 40, zorder=3)
    sign = -1.0 if lower_is_better else 1.0
    front = pareto_front([(p["fraction"], sign * p["quality"]) for p in points])
    ax.plot([points[i]["fraction"] for i in front], [points[i]["quality"] for i in front], color="0.3", lw=1,
            ls="--", zorder=2, label="Pareto front")
    if full_quality is not None:
        ax.axhline(full_quality, color="0.5", lw=1, ls=":", label="full cache")
    for m in methods:
        ax.scatter([], [], color=colors[m], label=m)
    for budget, marker in MARKERS.items():
        if any(p["budget"] == budget for p in points):
            ax.scatter([], [], color="0.4", marker=marker, label=f"budget {budget}")
    ax.set_xscale("log")
    ax.set_xlabel("cache bytes per token / 16-bit full cache (log)")
    ax.set_ylabel(quality + (" (lower is better)" if lower_is_better else ""))
    ax.set_title(title)
    _save_with_side_legend(plt, fig, ax, path)


def per_layer(series: dict[str, Sequence[float]], path: Path, *, title: str, ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (label, values) in enumerate(series.items()):  # tab20: no colour repeats before 20 lines
        ax.plot(range(len(values)), values, marker=".", label=label, color=plt.cm.tab20(i % 20))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _save_with_side_legend(plt, fig, ax, path)


def heatmap(values: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str], path: Path, *,
            title: str, xlabel: str = "", annotate: bool = True) -> None:
    """Values in [0, 1] (keep rates); NaN cells (not measured) are left blank."""
    import numpy as np

    plt = _pyplot()
    data = np.array(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * len(columns) if not annotate else 2.5 + 1.1 * len(columns),
                                    1.2 + 0.32 * len(rows)))
    image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=45 if annotate else 90, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if annotate:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if data[i, j] < 0.6 else "black")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bytes_breakdown(rows: dict[str, dict[str, float]], full16: float, path: Path, *, title: str) -> None:
    """Horizontal stacked bars of bytes per token by part, with the 16-bit full cache as a line."""
    plt = _pyplot()
    parts = list(dict.fromkeys(p for parts in rows.values() for p in parts))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.3 * len(rows)))
    labels = list(rows)
    left = [0.0] * len(labels)
    for k, part in enumerate(parts):
        widths = [rows[label].get(part, 0.0) for label in labels]
        ax.barh(labels, widths, left=left, color=plt.cm.tab10(k % 10), label=part)
        left = [a + b for a, b in zip(left, widths)]
    ax.axvline(full16, color="0.3", ls="--", lw=1, label="16-bit full cache")
    ax.set_xlabel("bytes per token seen (16-bit equivalent)")
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
