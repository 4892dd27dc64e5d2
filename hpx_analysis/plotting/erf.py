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


def _fit_text(fit: dict) -> str:
    """Title lines with the Gaussian fit: sigmas in px and, when recorded, relative to the input side."""
    parts = []
    for axis, side in (("x", "W"), ("y", "H")):
        relative = fit.get(f"sigma_{axis}_rel")
        suffix = f" ({relative:.3f} {side})" if relative is not None else ""
        parts.append(f"σ{axis}={fit[f'sigma_{axis}']:.1f} px{suffix}")
    return f"\n{parts[0]}, R²={fit['r2']:.2f}\n{parts[1]}"


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
            fit = entry.get("gaussian", {}) if kim else {}
            if fit.get("sigma_x") is not None and fit.get("r2") is not None:
                title += _fit_text(fit)
            ax.set_title(title)
            ax.set_xlabel(f"x (px)\n{_ratio_text(entry['area_ratios'])}", fontsize=7)
            ax.set_ylabel("y (px)")
            if not shared_scale:
                fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=colour_label)
        if shared_scale:
            fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02, label=colour_label)
        if kim:
            side = min(result.arrays["maps"].shape[1:])
            for ax, mass in zip(axes[1], result.arrays["radial_mass"]):
                ax.plot(range(len(mass)), mass)
                ax.set_xlabel("radius from centre (px)")
                top = ax.secondary_xaxis("top", functions=(lambda r: r / side, lambda f: f * side))
                top.set_xlabel("radius / input side", fontsize=7)
                ax.set_ylabel("cumulative ERF mass")
                ax.set_ylim(0, 1.02)
                ax.grid(alpha=0.3)
    return fig


def save_erf_figure(result: ERFResult, stem: Path | str, shared_scale: bool = False) -> List[Path]:
    """Write ``<stem>.pdf``/``.png`` and ``<stem>.figure.json`` (the result's metadata)."""
    meta = {key: value for key, value in result.meta.items() if key != "versions"}
    return save_figure(plot_erf(result, shared_scale), stem, {**meta, "shared_scale": shared_scale})
