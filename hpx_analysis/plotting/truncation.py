"""Accuracy vs. relative filter size per truncated stage (paper Fig. 6), from a TruncationResult."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from ..analyzers.truncation import TruncationResult
from .style import paper_style, save_figure


def plot_truncation(result: TruncationResult, stem: Path | str) -> List[Path]:
    """Top-1 and top-5 accuracy (%) vs. relative size, one curve per stage with its 95% bootstrap band,
    the untruncated accuracy as a dashed line (grey band: its interval) and each stage's learned
    coverage as a dotted vertical line; top-1 only for models with at most 5 classes (top-5 is then
    always right). Writes ``<stem>.pdf/.png/.figure.json``."""
    import matplotlib.pyplot as plt

    a = result.arrays
    metrics = ("top1",) if (result.meta.get("model_classes") or 1000) <= 5 else ("top1", "top5")
    with paper_style():
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.75 * len(metrics) + 1.2 * (len(metrics) == 1), 2.8),
                                 sharex=True, squeeze=False)
        axes = axes[0]
        colours = plt.get_cmap("tab10")
        for panel, (ax, metric) in enumerate(zip(axes, metrics)):
            low, high = 100 * a["reference_ci"][panel]
            ax.axhspan(low, high, color="0.85", lw=0)
            ax.axhline(100 * a["reference"][panel], color="0.3", ls="--", lw=1, label="untruncated")
            for i, stage in enumerate(a["stages"]):
                colour = colours(int(stage))
                ax.fill_between(a["sizes"], 100 * a[f"{metric}_ci"][i, :, 0], 100 * a[f"{metric}_ci"][i, :, 1],
                                color=colour, alpha=0.2, lw=0)
                ax.plot(a["sizes"], 100 * a[metric][i], color=colour, marker="o", ms=2.5, lw=1.2,
                        label=f"S{int(stage) + 1}")
                if "coverage" in a and np.isfinite(a["coverage"][i]):
                    ax.axvline(a["coverage"][i], color=colour, ls=":", lw=1)
            ax.set_xlabel("relative filter size r (x feature-map side)")
            ax.set_ylabel(f"{'top-1' if metric == 'top1' else 'top-5'} accuracy (%)")
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="truncated stage")
        model = Path(str(result.meta["model"].get("model", ""))).stem
        fig.suptitle(f"{model}, {result.meta['shape']} truncation, n = {result.meta['images_evaluated']} images\n"
                     f"bands: 95% bootstrap CI; dotted: learned coverage", fontsize=9)
        fig.tight_layout()
    return save_figure(fig, stem, metadata=result.meta)
