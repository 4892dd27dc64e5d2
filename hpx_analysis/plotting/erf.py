"""ERF figures: one panel per model (the paper's Fig. 4/8), per-panel colorbars or one shared scale."""

from __future__ import annotations

from pathlib import Path
from typing import List

import matplotlib.pyplot as plt

from ..analyzers.erf import ERFResult
from .style import SEQUENTIAL_CMAP, paper_style, save_figure


def _ratio_text(ratios: dict) -> str:
    parts = [f"t={t}: {'n/a' if value is None else f'{value:.3f}'}" for t, value in ratios.items()]
    return "area ratio " + ", ".join(parts[:2]) + "\n" + ", ".join(parts[2:])


def plot_erf(result: ERFResult, shared_scale: bool = False) -> "plt.Figure":
    """Figure with the display map of every model in ``result``, area ratios under each panel;
    for the kim2023 convention a second row with the radial cumulative mass."""
    count = len(result.labels)
    kim = result.convention == "kim2023"
    colour_label = "ERF share / max" if kim else "log10(ERF + 1) / max"
    with paper_style():
        fig, axes = plt.subplots(2 if kim else 1, count, figsize=(2.9 * count + (0.6 if shared_scale else 0),
                                                                  5.6 if kim else 3.2),
                                 squeeze=False, constrained_layout=True)
        vmax = float(result.arrays["display"].max()) if shared_scale else None
        image = None
        for ax, shown, entry in zip(axes[0], result.arrays["display"], result.meta["models"]):
            image = ax.imshow(shown, cmap=SEQUENTIAL_CMAP, vmin=0.0 if shared_scale else None, vmax=vmax)
            title = entry["label"]
            if kim and entry.get("gaussian", {}).get("sigma_x") is not None:
                fit = entry["gaussian"]
                title += f"\nσx={fit['sigma_x']:.1f}, σy={fit['sigma_y']:.1f}, R²={fit['r2']:.2f}"
            ax.set_title(title)
            ax.set_xlabel(f"x (px)\n{_ratio_text(entry['area_ratios'])}", fontsize=7)
            ax.set_ylabel("y (px)")
            if not shared_scale:
                fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=colour_label)
        if shared_scale:
            fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02, label=colour_label)
        if kim:
            for ax, mass in zip(axes[1], result.arrays["radial_mass"]):
                ax.plot(range(len(mass)), mass)
                ax.set_xlabel("radius from centre (px)")
                ax.set_ylabel("cumulative ERF mass")
                ax.set_ylim(0, 1.02)
                ax.grid(alpha=0.3)
    return fig


def save_erf_figure(result: ERFResult, stem: Path | str, shared_scale: bool = False) -> List[Path]:
    """Write ``<stem>.pdf``/``.png`` and ``<stem>.figure.json`` (the result's metadata)."""
    meta = {key: value for key, value in result.meta.items() if key != "versions"}
    return save_figure(plot_erf(result, shared_scale), stem, {**meta, "shared_scale": shared_scale})
