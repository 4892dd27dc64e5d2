"""ERF figures: one panel per model (the paper's Fig. 4/8), per-panel colorbars or one shared scale; with several
layers or input sizes a grid of panels and the area ratios against depth and against input size."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import matplotlib.pyplot as plt
import numpy as np

from ..analyzers.erf import ERFResult
from ..errors import HpxError
from .style import SEQUENTIAL_CMAP, paper_style, save_figure

AGAINST = ("layer", "input_size")  # what :func:`plot_area_ratios` puts on the x axis


def _ratio_text(ratios: dict) -> str:
    parts = [f"t={t}: {'n/a' if value is None else f'{value:.3f}'}" for t, value in ratios.items()]
    return "area ratio " + ", ".join(parts[:2]) + "\n" + ", ".join(parts[2:])


def _fit_text(fit: dict) -> str:
    """Title lines with the Gaussian fit: sigmas in px and, when recorded, relative to the input side."""
    parts = []
    for axis, side in (("x", "W"), ("y", "H")):
        relative = fit.get(f"sigma_{axis}_rel")
        suffix = f" ({relative:.3f} {side})" if relative is not None else ""
        parts.append(f"σ{axis}={fit[f'sigma_{axis}']:.1f} px{suffix}")
    return f"\n{parts[0]}, R²={fit['r2']:.2f}\n{parts[1]}"


def _panel_rows(result: ERFResult) -> List[List[int]]:
    """The result's rows laid out as panels: the layers across when there are several, else the input sizes,
    else every model side by side; the rows of the result come model by model, size by size, layer by layer."""
    count = len(result.labels)
    across = (len(result.layers) if result.several("layer") else len(result.sizes) if result.several("input_size")
              else count)
    return [list(range(start, min(start + across, count))) for start in range(0, count, across)]


def plot_erf(result: ERFResult, shared_scale: bool = False) -> "plt.Figure":
    """Figure with the display map (H, W) of every row of ``result`` (:func:`_panel_rows`: the layout), area ratios
    under each panel; for the kim2023 convention a row with the radial cumulative mass under each row of maps."""
    grid = _panel_rows(result)
    columns = max(len(panels) for panels in grid)
    kim = result.convention == "kim2023"
    colour_label = "ERF share / max" if kim else "log10(ERF + 1) / max"
    with paper_style():
        size = (2.9 * columns + (0.6 if shared_scale else 0), (5.6 if kim else 3.2) * len(grid))
        fig, axes = plt.subplots(len(grid) * (2 if kim else 1), columns, figsize=size, squeeze=False,
                                 constrained_layout=True)
        vmax = float(np.nanmax(result.arrays["display"])) if shared_scale else None
        image, shown_axes = None, []
        for line, panels in enumerate(grid):
            map_axes = axes[line * (2 if kim else 1)]
            shown_axes += list(map_axes[:len(panels)])
            for ax, row in zip(map_axes, panels):
                entry = result.meta["models"][row]
                image = ax.imshow(result.row_map(row, "display"), cmap=SEQUENTIAL_CMAP,
                                  vmin=0.0 if shared_scale else None, vmax=vmax)
                title = result.caption(row)
                fit = entry.get("gaussian", {}) if kim else {}
                if fit.get("sigma_x") is not None and fit.get("r2") is not None:
                    title += _fit_text(fit)
                ax.set_title(title)
                ax.set_xlabel(f"x (px)\n{_ratio_text(entry['area_ratios'])}", fontsize=7)
                ax.set_ylabel("y (px)")
                if not shared_scale:
                    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=colour_label)
            for ax in map_axes[len(panels):]:
                ax.set_axis_off()
            if kim:
                for ax, row in zip(axes[line * 2 + 1], panels):
                    mass = result.arrays["radial_mass"][row]
                    mass = mass[np.isfinite(mass)]  # rows of a smaller input size are padded with NaN
                    side = min(result.row_size(row))
                    ax.plot(range(len(mass)), mass)
                    ax.set_xlabel("radius from centre (px)")
                    top = ax.secondary_xaxis("top", functions=(lambda r, s=side: r / s, lambda f, s=side: f * s))
                    top.set_xlabel("radius / input side", fontsize=7)
                    ax.set_ylabel("cumulative ERF mass")
                    ax.set_ylim(0, 1.02)
                    ax.grid(alpha=0.3)
                for ax in axes[line * 2 + 1][len(panels):]:
                    ax.set_axis_off()
        if shared_scale:
            fig.colorbar(image, ax=shown_axes, fraction=0.03, pad=0.02, label=colour_label)
    return fig


def plot_area_ratios(result: ERFResult, against: str = "layer") -> "plt.Figure":
    """Area ratio at each threshold t (one panel per t) against the layer (``layer``: depth, the layers in the
    result's order) or against the input side (``input_size``: px, log scale); one line per model and each other
    setting (input size, resp. layer) the result holds. Missing ratios (no square exceeds t) leave gaps."""
    if against not in AGAINST:
        raise HpxError(f"area ratios are plotted against {' or '.join(AGAINST)}, not '{against}'")
    entries = result.meta["models"]
    thresholds = list(entries[0]["area_ratios"])
    lines: Dict[str, Dict[float, Dict[str, Any]]] = {}  # line name -> x -> the row's entry
    for row, entry in enumerate(entries):
        side = result.row_size(row)[0]
        if against == "layer":
            name = entry["label"] + (f" @ {side} px" if result.several("input_size") else "")
            x = float(result.layers.index(entry["layer"]))
        else:
            name = entry["label"] + (f" {entry['layer'] or '(output)'}" if result.several("layer") else "")
            x = float(side)
        lines.setdefault(name, {})[x] = entry
    with paper_style():
        fig, axes = plt.subplots(1, len(thresholds), figsize=(2.6 * len(thresholds), 2.8), squeeze=False,
                                 constrained_layout=True, sharey=True)
        for ax, t in zip(axes[0], thresholds):
            for name, points in lines.items():
                xs = sorted(points)
                ys = [np.nan if points[x]["area_ratios"][t] is None else points[x]["area_ratios"][t] for x in xs]
                ax.plot(xs, ys, marker="o", label=name)
            ax.set_title(f"t = {t}")
            ax.grid(alpha=0.3)
            if against == "layer":
                ax.set_xticks(range(len(result.layers)), [layer or "(output)" for layer in result.layers],
                              rotation=45, ha="right")
                ax.set_xlabel("layer (depth)")
            else:
                sides = sorted({result.row_size(row)[0] for row in range(len(entries))})
                ax.set_xscale("log", base=2)
                ax.set_xticks(sides, [str(side) for side in sides])
                ax.minorticks_off()
                ax.set_xlabel("input side (px)")
        axes[0][0].set_ylabel("area ratio")
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    return fig


def save_erf_figure(result: ERFResult, stem: Path | str, shared_scale: bool = False) -> List[Path]:
    """Write ``<stem>.pdf``/``.png`` and ``<stem>.figure.json`` (the result's metadata); where a model has several
    layers also ``<stem>_area_by_layer.*``, several input sizes ``<stem>_area_by_size.*`` (:func:`plot_area_ratios`)."""
    stem = Path(stem)
    meta = {key: value for key, value in result.meta.items() if key != "versions"}
    written = save_figure(plot_erf(result, shared_scale), stem, {**meta, "shared_scale": shared_scale})
    for against, suffix in (("layer", "_area_by_layer"), ("input_size", "_area_by_size")):
        if result.several(against):
            written += save_figure(plot_area_ratios(result, against), stem.with_name(stem.name + suffix), meta)
    return written
