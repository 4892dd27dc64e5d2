"""Relative filter-size coverage through the network (paper Fig. 5), one line per model."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ..analyzers.coverage import CoverageResult
from .style import paper_style


def plot_coverage(results: Sequence[CoverageResult]) -> plt.Figure:
    """x: block index through the network; y: relative coverage (mean over channels, 10-90% band);
    dotted verticals mark stage boundaries (of the first model)."""
    with paper_style():
        fig, ax = plt.subplots(figsize=(5.5, 3.0), constrained_layout=True)
        for result in results:
            x = result.arrays["index"] + 1
            line, = ax.plot(x, result.arrays["mean"], marker="o", markersize=3, label=result.model_name)
            ax.fill_between(x, result.arrays["p10"], result.arrays["p90"], color=line.get_color(), alpha=0.2,
                            linewidth=0)
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
        ax.legend(handles + [band], labels + [band.get_label()], loc="upper left", frameon=False)
    return fig
