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


def _same_layout(results: Sequence[CoverageResult]) -> bool:
    """Whether every result covers the same blocks in the same stages."""
    first = results[0].arrays
    return all(np.array_equal(r.arrays["index"], first["index"]) and np.array_equal(r.arrays["stage"], first["stage"])
               for r in results[1:])


def relative_depth(result: CoverageResult) -> np.ndarray:
    """(N,) each covered block's position through the network, (index + 1/2) / (last index + 1), in (0, 1)."""
    index = result.arrays["index"]
    return (index + 0.5) / (index.max() + 1)


def plot_coverage(results: Sequence[CoverageResult]) -> plt.Figure:
    """x: block index through the network, or the relative depth (:func:`relative_depth`) when the models' blocks
    and stages differ (SLaK-T's 18 blocks beside RepLKNet-31B's 24); y: relative coverage (mean over channels,
    10-90% band) and, dashed with squares in the model's colour, the energy coverage (mean over channels) of its
    long-filter layers where the result has one. Stage boundaries: dotted grey verticals with S labels for a
    shared layout, else short ticks at the top in each model's colour."""
    shared = _same_layout(results)
    with paper_style():
        fig, ax = plt.subplots(figsize=(7.5, 3.0), constrained_layout=True)
        for result in results:
            x = result.arrays["index"] + 1 if shared else relative_depth(result)
            line, = ax.plot(x, result.arrays["mean"], marker="o", markersize=3, label=result.model_name)
            ax.fill_between(x, result.arrays["p10"], result.arrays["p90"], color=line.get_color(), alpha=0.2,
                            linewidth=0)
            if "energy_mean" in result.arrays:   # NaN (a gap) for mixers without a long filter
                ax.plot(x, result.arrays["energy_mean"], marker="s", markersize=3, linestyle="--", linewidth=0.8,
                        color=line.get_color())
            stages = result.arrays["stage"]
            for boundary in np.flatnonzero(np.diff(stages)):
                middle = (x[boundary] + x[boundary + 1]) / 2
                if shared:
                    ax.axvline(middle, color="0.5", linestyle=":", linewidth=0.8)
                else:
                    ax.axvline(middle, ymin=0.94, color=line.get_color(), linewidth=1.2)
            if shared and result is results[0]:
                for stage in np.unique(stages):
                    ax.text(x[stages == stage].mean(), 1.0, f"S{int(stage) + 1}", transform=ax.get_xaxis_transform(),
                            ha="center", va="bottom")
        ax.axhline(1.0, color="0.7", linewidth=0.6)
        ax.set_xlabel("block index through the network" if shared else
                      "relative depth (block / blocks; ticks at the top: stage boundaries)")
        threshold = results[0].meta["threshold"]
        ax.set_ylabel(f"relative coverage (window ≥ {threshold:g})")
        ax.set_ylim(bottom=0)
        if shared:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xlim(0, 1)
        handles, labels = ax.get_legend_handles_labels()
        band = Patch(color="0.5", alpha=0.3, label="10-90% of channels")
        extra = [band]
        shares = {r.meta["energy_share"] for r in results if "energy_mean" in r.arrays}
        if shares:
            share = ", ".join(f"{s:.0%}" for s in sorted(shares))
            extra.append(Line2D([], [], color="0.4", marker="s", markersize=3, linestyle="--", linewidth=0.8,
                                label=f"energy coverage (disc holding {share} of |kernel|)"))
        ax.legend(handles + extra, labels + [h.get_label() for h in extra], loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)  # outside the axes: inside it hides the lines near the top (attention at 2)
    return fig
