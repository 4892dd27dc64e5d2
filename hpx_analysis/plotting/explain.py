"""Figures for explanations (paper Fig. 9/10) and the parameter-randomisation sanity check."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .style import SEQUENTIAL_CMAP, paper_style, save_figure

GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _label(result: Any) -> str:
    model = Path(str(result.meta.get("model", {}).get("model", "model"))).stem
    return f"{model}\n{result.meta['method']}"


def fgvis_panels(inputs: np.ndarray, masks: np.ndarray, exponent: float) -> tuple:
    """Display images of Fig. 9 for RGB ``inputs`` and ``masks`` (N, 3, H, W): the explanation
    ``x * (1 - m') + gray(x) * m'`` (N, H, W, 3) and the mean mask ``mean_c m'`` (N, H, W), m' = m ** exponent."""
    shown = masks.astype(np.float32) ** exponent
    gray = np.einsum("nchw,c->nhw", inputs, GRAY_WEIGHTS)[:, None]
    explanation = inputs * (1 - shown) + gray * shown
    return explanation.transpose(0, 2, 3, 1).clip(0, 1), shown.mean(1)


def plot_explanations(results: Sequence[Any], stem: Path | str, exponent: float = 7.0,
                      metadata: Optional[Dict[str, Any]] = None) -> List[Path]:
    """A grid: one row per image; the input, then per result (model x method) FGVis explanation and
    mean mask, or the relevance map of a captum method. All results must cover the same images."""
    import matplotlib.pyplot as plt

    inputs = results[0].inputs
    columns = 1 + sum(2 if r.method == "fgvis" else 1 for r in results)
    rows = len(inputs)
    with paper_style():
        fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 1.7 * rows + 0.5), squeeze=False)
        for row in range(rows):
            axes[row, 0].imshow(inputs[row].transpose(1, 2, 0))
            axes[row, 0].set_ylabel(str(results[0].meta["images"][row])[:18])
        axes[0, 0].set_title("input")
        column = 1
        for result in results:
            label = _label(result)
            if result.method == "fgvis":
                explanation, mean_mask = fgvis_panels(result.inputs, result.masks, exponent)
                for row in range(rows):
                    axes[row, column].imshow(explanation[row])
                    image = axes[row, column + 1].imshow(mean_mask[row], cmap="gray", vmin=0, vmax=1)
                    fig.colorbar(image, ax=axes[row, column + 1], fraction=0.046, pad=0.03)
                    record = result.records[row]
                    failure = " (noise flip)" if record.get("flipped_by_noise") else " (no flip)"
                    axes[row, column].set_xlabel(f"lambda {record['lambda']:.0e}, {record['iterations']} it"
                                                 + ("" if record["success"] else failure), fontsize=7)
                axes[0, column].set_title(f"{label}\nexplanation")
                axes[0, column + 1].set_title(f"mean mask$^{{{exponent:g}}}$")
                column += 2
            else:
                for row in range(rows):
                    image = axes[row, column].imshow(result.maps[row], cmap=SEQUENTIAL_CMAP)
                    fig.colorbar(image, ax=axes[row, column], fraction=0.046, pad=0.03)
                axes[0, column].set_title(f"{label}\nrelevance")
                column += 1
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
    meta = {"results": [r.meta for r in results], "exponent": exponent, **(metadata or {})}
    return save_figure(fig, stem, meta)


def plot_sanity(result: Any, stem: Path | str, metadata: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Top: the first image's map at every cascade step; bottom: Spearman rho with the trained
    model's maps per step (mean line, one dot per image)."""
    import matplotlib.pyplot as plt

    steps, correlations, maps = result.steps, result.correlations, result.arrays["maps"]
    with paper_style():
        fig = plt.figure(figsize=(max(4.0, 1.1 * len(steps)), 3.8))
        grid = fig.add_gridspec(2, len(steps), height_ratios=[1, 1.4])
        for i, step in enumerate(steps):
            ax = fig.add_subplot(grid[0, i])
            ax.imshow(maps[i, 0], cmap=SEQUENTIAL_CMAP)
            ax.set_title(step, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = fig.add_subplot(grid[1, :])
        positions = np.arange(len(steps))
        for image in range(correlations.shape[1]):
            ax.plot(positions, correlations[:, image], "o", color="0.6", markersize=3)
        ax.plot(positions, np.nanmean(correlations, axis=1), "-", color="C0", label="mean over images")
        ax.set_xticks(positions, steps, rotation=30, ha="right")
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("randomised up to (cascading from the head)")
        ax.set_ylabel("Spearman rho with trained")
        ax.set_title(f"{_label(result).replace(chr(10), ' ')}: parameter randomisation")
        ax.legend(loc="lower left")
        fig.tight_layout()
    return save_figure(fig, stem, {"result": result.meta, **(metadata or {})})


__all__ = ["fgvis_panels", "plot_explanations", "plot_sanity"]
