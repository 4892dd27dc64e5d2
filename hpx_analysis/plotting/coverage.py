"""Relative filter-size coverage through the network (paper Fig. 5), one line per model."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ..analyzers.coverage import CoverageResult
from .style import paper_style


def plot_coverage(results: Sequence[CoverageResult]) -> plt.Figure:
    """x: block index through the network; y: relative coverage (mean over channels, 10-90% band) and, dashed with
    squares in the model's colour, the energy coverage (mean over channels) of its long-filter layers where the
    result has one; dotted verticals mark stage boundaries (of the first model)."""
    with paper_style():
        fig, ax = plt.subplots(figsize=(5.5, 3.0), constrained_layout=True)
        for result in results:
            x = result.arrays["index"] + 1
            line, = ax.plot(x, result.arrays["mean"], marker="o", markersize=3, label=result.model_name)
            ax.fill_between(x, result.arrays["p10"], result.arrays["p90"], color=line.get_color(), alpha=0.2,
                            linewidth=0)
            if "energy_mean" in result.arrays:   # NaN (a gap) for mixers without a long filter
                ax.plot(x, result.arrays["energy_mean"], marker="s", markersize=3, linestyle="--", linewidth=0.8,
                        color=line.get_color())
        stages = results[0].arrays["stage"]
        index = results[0].arrays["index"] + 1
        for boundary in np.flatnonzero(np.diff(stages)):
            ax.axvline((index[boundary] + index[boundary + 1]) / 2, color="0.5", linestyle=":", linewidth=0.8)
        for stage in np.unique(stages):
            centre = index[stages == stage].mean()
            ax.text(centre, 1.0, f"S{int(stage) + 1}", transform=ax.get_xaxis_transform(), ha="center", va="bottom")
        ax.axhline(1.0, color="0.7", linewidth=0.6)
        ax.set_xlabel("block index through the network")
        threshold = results[0].meta["threshold"]
        ax.set_ylabel(f"relative coverage (window ≥ {threshold:g})")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = ax.get_legend_handles_labels()
        band = Patch(color="0.5", alpha=0.3, label="10-90% of channels")
        extra = [band]
        shares = {r.meta["energy_share"] for r in results if "energy_mean" in r.arrays}
        if shares:
            share = ", ".join(f"{s:.0%}" for s in sorted(shares))
            extra.append(Line2D([], [], color="0.4", marker="s", markersize=3, linestyle="--", linewidth=0.8,
                                label=f"energy coverage (disc holding {share} of |kernel|)"))
        ax.legend(handles + extra, labels + [h.get_label() for h in extra], loc="upper left", frameon=False)
    return fig
