"""Kernel grids from a :class:`~hpx_analysis.analyzers.kernels.KernelsResult` (paper Fig. 7, 11, 12)."""

from __future__ import annotations

from typing import List, Tuple

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Polygon

from ..analyzers.kernels import KernelsResult
from .style import DIVERGING_CMAP, SEQUENTIAL_CMAP, paper_style

OUTSIDE_COLOUR = "0.8"   # taps that land outside the image for the evaluation pixel
PANEL_INCHES = 1.6
ORIENTATION_LABELS = {   # figure titles; c: centre tap, p: evaluation pixel, d: offset
    "kernel": "kernel orientation\n(kernel array: tap c+d at p+d)",
    "response": "response orientation\n(weight of input p-d at p: tap c+d at p-d)",
}


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
    """One panel per layer (and shown channel) with a shared colorbar, titled with the orientation;
    1D panels outline the taps that read image pixels, mark the evaluation pixel p and grey the taps
    whose input pixel falls outside the image."""
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
                _mark_wrap(ax, layer, panel, outside)
                if col == 0:
                    ax.set_ylabel(f"rows of width {layer['feature_size'][1]}")
            ax.set_title(_title(result, i, g))
            ax.set_xticks([])
            ax.set_yticks([])
        label = {"maxabs": "weight / max |weight|", "minmax": "min-max normalised weight"}.get(normalisation, "weight")
        fig.colorbar(image, ax=axes, shrink=0.8, label=label)
        fig.suptitle(ORIENTATION_LABELS[result.orientation])
    return fig


def _mark_wrap(ax: plt.Axes, layer: dict, panel: np.ndarray, outside: np.ndarray) -> None:
    """On a wrapped 1D panel (R, W): grey the out-of-image taps, outline the taps that read image pixels
    (the image itself in response orientation, the image reflected through p along the flattened
    sequence in kernel orientation) and mark the evaluation pixel p."""
    width = layer["feature_size"][1]
    top = -layer["first_row"]
    ax.imshow(np.where(outside, 1.0, np.nan), cmap=ListedColormap([OUTSIDE_COLOUR]), vmin=0, vmax=1)
    reading = np.flatnonzero(~outside & ~np.isnan(panel))   # one contiguous run of cells
    ax.add_patch(Polygon(_span_outline(reading[0], reading[-1], width), closed=True, fill=False,
                         edgecolor="black", linewidth=0.8))
    row, col = layer["position"]
    ax.plot(col, top + row, marker="+", color="black", markersize=5)


def _span_outline(first: int, last: int, width: int) -> List[Tuple[float, float]]:
    """(x, y) corners of the outline of picture cells first..last (row-major, rows of ``width``)."""
    first_row, first_col = divmod(first, width)
    last_row, last_col = divmod(last, width)
    if first_row == last_row:
        corners = [(first_col, first_row), (last_col + 1, first_row), (last_col + 1, first_row + 1),
                   (first_col, first_row + 1)]
    else:
        corners = [(first_col, first_row), (width, first_row), (width, last_row), (last_col + 1, last_row),
                   (last_col + 1, last_row + 1), (0, last_row + 1), (0, first_row + 1), (first_col, first_row + 1)]
    return [(x - 0.5, y - 0.5) for x, y in corners]
