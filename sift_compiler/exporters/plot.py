"""The paper's Figure 3, for measured results: latency against sparsity, dense latency as the ideal.

One line per (transform, engine) through the sparsities measured; the dense model's latency on
each engine is a dashed horizontal line: on hardware that turned every skipped zero into saved
time, every Sparse-IFT variant would sit on it (iso-FLOP).
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from ..io import atomic_path, check_writable
from .bench import BenchResult

_COLORS = {"deepsparse": "tab:blue", "onnxruntime": "tab:orange"}
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def plot_latency(results: Sequence[BenchResult], path: str, title: str = "") -> None:
    """Write the plot to ``path`` (format from the extension: .png, .pdf, .svg), atomically."""
    import matplotlib  # lazy: 0.5 s to import with pyplot, and only sift-bench --plot uses it
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    check_writable(path, "plot")
    series: Dict[Tuple[str, str, str], List[Tuple[float, float]]] = {}  # (family, transform [form], engine)
    dense: Dict[Tuple[str, str], float] = {}
    for r in results:
        if getattr(r, "failed", False):
            continue
        if r.transform == "none":
            dense[(r.family, r.engine)] = r.median_ms
        elif r.sparsity is not None:
            name = f"{r.transform} [{r.form}]" if r.form else r.transform
            series.setdefault((r.family, name, r.engine), []).append((r.sparsity, r.median_ms))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    transforms = sorted({t for _, t, _ in series})
    for (family, transform, engine), points in sorted(series.items()):
        points.sort()
        label = f"{transform} ({engine})" + (f" {family}" if len({f for f, _, _ in series}) > 1 else "")
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=_MARKERS[transforms.index(transform) % 7],
                color=_COLORS.get(engine), label=label)
    for (family, engine), ms in sorted(dense.items()):
        ax.axhline(ms, linestyle="--", color=_COLORS.get(engine, "gray"), linewidth=1,
                   label=f"dense ({engine}): ideal")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("latency per batch (ms, median)")
    ax.set_yscale("log")
    ax.set_title(title or "Sparse-IFT latency against sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)
