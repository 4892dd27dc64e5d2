"""Figures of the demo: example images of the proxy tasks and the proxies' held-out accuracies.

The demo is an app over the library, so its figures live here and use only the library's plot style
(:mod:`hpx_analysis.plotting` never imports the demo)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping

import numpy as np

from ..plotting import paper_style
from .tasks import TASKS, TaskBatch

if TYPE_CHECKING:
    import matplotlib.pyplot as plt


def plot_task_examples(batches: Mapping[str, TaskBatch]) -> "plt.Figure":
    """One row per task: its example images (N, 3, H, W) titled with their class names."""
    import matplotlib.pyplot as plt

    with paper_style():
        columns = max(len(b.labels) for b in batches.values())
        fig, axes = plt.subplots(len(batches), columns, figsize=(1.5 * columns, 1.7 * len(batches)), squeeze=False)
        for row, (task, batch) in enumerate(batches.items()):
            for col, ax in enumerate(axes[row]):
                ax.set_xticks([])
                ax.set_yticks([])
                if col >= len(batch.labels):
                    ax.axis("off")
                    continue
                ax.imshow(batch.images[col].permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_title(TASKS[task].classes[int(batch.labels[col])].replace("_", " "), fontsize=8)
            axes[row, 0].set_ylabel(f"{task}\n({TASKS[task].scope})")
        fig.tight_layout()
    return fig


def plot_accuracies(accuracy: Mapping[str, Dict[str, float]]) -> "plt.Figure":
    """Grouped bars: held-out accuracy (%) per task, one bar per model, chance (50%) dashed."""
    import matplotlib.pyplot as plt

    with paper_style():
        models = list(accuracy)
        tasks = list(next(iter(accuracy.values())))
        fig, ax = plt.subplots(figsize=(3.6, 3.0))
        width = 0.8 / len(models)
        positions = np.arange(len(tasks))
        for i, model in enumerate(models):
            values = [100 * accuracy[model][t] for t in tasks]
            bars = ax.bar(positions + (i - (len(models) - 1) / 2) * width, values, width, label=model)
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.axhline(50, color="0.3", linestyle="--", linewidth=0.8, label="chance")
        ax.set_xticks(positions, tasks)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_ylim(0, 110)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
        fig.tight_layout()
    return fig
