"""Kernel grids from a :class:`~hpx_analysis.analyzers.kernels.KernelsResult` (paper Fig. 7, 11, 12)."""

from __future__ import annotations

from typing import List, Tuple

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle

from ..analyzers.kernels import KernelsResult
from .style import DIVERGING_CMAP, SEQUENTIAL_CMAP, paper_style

OUTSIDE_COLOUR = "0.8"   # taps that land outside the image for the evaluation pixel
PANEL_INCHES = 1.6


def panel_layout(result: KernelsResult) -> List[Tuple[int, int, int, int]]:
    """(row, col, layer i, panel g) per panel: stages x blocks for a full single-panel run, one row of
    hand-picked layers, or one row per layer with its channel gallery."""
    layers = result.layers
    galleries = max(len(result.channels(i)) for i in range(len(layers)))
    if galleries > 1:
        return [(i, g, i, g) for i in range(len(layers)) for g in range(len(result.channels(i)))]
    if result.meta["options"]["layers"] is not None:
        return [(0, i, i, 0) for i in range(len(layers))]
    stages = sorted({layer["stage"] for layer in layers})
    return [(stages.index(layer["stage"]), layer["block"], i, 0) for i, layer in enumerate(layers)]


def _title(result: KernelsResult, i: int, g: int) -> str:
    layer = result.layers[i]
    channel = int(result.channels(i)[g])
    text = f"{layer['name']}, F={max(layer['feature_size'])}"
    return text + (f", ch {channel}" if channel >= 0 else "")


def plot_kernels(result: KernelsResult) -> plt.Figure:
    """One panel per layer (and shown channel) with a shared colorbar; 1D panels mark the image area,
    the evaluation pixel and (grey) the taps that fall outside the image."""
    normalisation = result.meta["options"]["normalisation"]
    diverging = normalisation != "minmax"
    cmap = plt.get_cmap(DIVERGING_CMAP if diverging else SEQUENTIAL_CMAP).with_extremes(bad=(0, 0, 0, 0))
    if normalisation == "none":
        bound = max(np.nanmax(np.abs(result.panels(i))) for i in range(len(result.layers)))
        limits = (-bound, bound)
    else:
        limits = (-1.0, 1.0) if diverging else (0.0, 1.0)
    layout = panel_layout(result)
    rows, cols = max(r for r, *_ in layout) + 1, max(c for _, c, *_ in layout) + 1
    with paper_style():
        fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES * cols + 0.8, PANEL_INCHES * rows * 1.1),
                                 squeeze=False, constrained_layout=True)
        for ax in axes.flat:
            ax.set_axis_off()
        image = None
        for row, col, i, g in layout:
            ax = axes[row, col]
            ax.set_axis_on()
            panel = result.panels(i)[g]
            outside = result.outside(i)
            image = ax.imshow(np.where(outside, np.nan, panel), cmap=cmap, vmin=limits[0], vmax=limits[1])
            layer = result.layers[i]
            if layer["position"] is not None:
                _mark_wrap(ax, layer, outside)
                if col == 0:
                    ax.set_ylabel(f"rows of width {layer['feature_size'][1]}")
            ax.set_title(_title(result, i, g))
            ax.set_xticks([])
            ax.set_yticks([])
        label = {"maxabs": "weight / max |weight|", "minmax": "min-max normalised weight"}.get(normalisation, "weight")
        fig.colorbar(image, ax=axes, shrink=0.8, label=label)
    return fig


def _mark_wrap(ax: plt.Axes, layer: dict, outside: np.ndarray) -> None:
    """Grey out-of-image taps, outline the image area and dot the evaluation pixel of a wrapped 1D panel."""
    height, width = layer["feature_size"]
    top = -layer["first_row"]
    ax.imshow(np.where(outside, 1.0, np.nan), cmap=ListedColormap([OUTSIDE_COLOUR]), vmin=0, vmax=1)
    ax.add_patch(Rectangle((-0.5, top - 0.5), width, height, fill=False, edgecolor="black", linewidth=0.8))
    row, col = layer["position"]
    ax.plot(col, top + row, marker="+", color="black", markersize=5)
