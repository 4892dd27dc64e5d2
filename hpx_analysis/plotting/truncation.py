"""Accuracy vs. relative filter size per truncated stage (paper Fig. 6), from a TruncationResult."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from ..analyzers.truncation import TruncationResult
from .style import paper_style, save_figure


def plot_truncation(result: TruncationResult, stem: Path | str) -> List[Path]:
    """Top-1 and top-5 accuracy (%) vs. relative size, one curve per swept stage (or blocks) with its 95% bootstrap band,
    the untruncated accuracy as a dashed line (grey band: its interval), each stage's learned
    coverage as a dotted vertical line (truncating there keeps every tap its window keeps) and, when
    the last size keeps every tap of every stage (the default sweep; it need not lie on the 0.1
    grid), a solid grey line there. Top-1 only for models with at most 5 classes (top-5 is then
    always right). The caption names the cut of Hyena 1D layers. Writes ``<stem>.pdf/.png/.figure.json``."""
    import matplotlib.pyplot as plt

    a = result.arrays
    every_tap = bool(np.all(a["kept_fraction"][:, -1] == 1.0))
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
            for i, group in enumerate(result.groups):
                colour = colours(i)
                ax.fill_between(a["sizes"], 100 * a[f"{metric}_ci"][i, :, 0], 100 * a[f"{metric}_ci"][i, :, 1],
                                color=colour, alpha=0.2, lw=0)
                ax.plot(a["sizes"], 100 * a[metric][i], color=colour, marker="o", ms=2.5, lw=1.2,
                        label=group)
                if "coverage" in a and np.isfinite(a["coverage"][i]):
                    ax.axvline(a["coverage"][i], color=colour, ls=":", lw=1)
            if every_tap:
                ax.axvline(a["sizes"][-1], color="0.6", lw=0.8)
                ax.annotate(f"every tap\nr = {a['sizes'][-1]:.2f}", (a["sizes"][-1], 0.02),
                            xycoords=("data", "axes fraction"), ha="right", va="bottom", fontsize=7, color="0.4",
                            xytext=(-2, 0), textcoords="offset points")
            ax.set_xlabel("relative filter size r (x feature-map side)")
            ax.set_ylabel(f"{'top-1' if metric == 'top1' else 'top-5'} accuracy (%)")
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="truncated")
        model = Path(str(result.meta["model"].get("model", ""))).stem
        sequence_layers = any(result.meta.get("sequence_layers", {}).values())
        hyena = {"wrap": f"1D layers: nearest-wrap {result.meta['shape']}, the 2D one at pixels >= rF/2 from "
                         f"the left and right edges (no coverage line)\n",
                 "offset": "1D layers: |offset| <= rL/2 on the flattened map (full-width rows)\n"}
        fig.suptitle(f"{model}, {result.meta['shape']} truncation, n = {result.meta['images_evaluated']} images\n"
                     f"{hyena.get(result.meta.get('hb_cut'), '') if sequence_layers else ''}"
                     f"bands: 95% bootstrap CI; dotted: learned coverage", fontsize=9)
        fig.tight_layout()
    return save_figure(fig, stem, metadata=result.meta)
