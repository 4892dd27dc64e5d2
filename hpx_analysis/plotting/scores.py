"""Figure of explanation scores: mean deletion and insertion curves with 95% bands per method and model, and the
per-image scores (drawn with seaborn in the paper style), from a :class:`~hpx_analysis.analyzers.scores.ScoreTable`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..analyzers.scores import ScoreTable
from .style import paper_style, save_figure

SCORE_LABELS = {"deletion_auc": "deletion\nAUC", "insertion_auc": "insertion\nAUC", "pointing": "pointing\ngame",
                "energy_pointing": "energy\npointing"}
"""The per-image scores drawn (the random order's AUCs are drawn as curves only), by their axis labels."""
DASHES = ["", (4, 1.5), (1, 1), (3, 1.25, 1.5, 1.25), (5, 1, 1, 1)]
"""Line dashes of the models, in order (cycled)."""


def _curve_frame(table: ScoreTable, curve: str, rows: List[int]) -> "Any":
    """Long-form data of one curve for the entries ``rows``: model, method, image, fraction, probability."""
    import pandas as pd

    values = table.arrays[curve][rows]  # (E', N, steps + 1)
    entries = [table.entries[row] for row in rows]
    return pd.DataFrame({
        "model": np.repeat([e["model"] for e in entries], values[0].size),
        "method": np.repeat([e["method"] for e in entries], values[0].size),
        "fraction": np.tile(np.linspace(0, 1, values.shape[-1]), values.shape[0] * values.shape[1]),
        "probability": values.ravel()})


def _score_frame(table: ScoreTable, model: str) -> "Any":
    """Long-form per-image scores of one model's entries (NaN left out): method, score, value."""
    import pandas as pd

    frames = [pd.DataFrame({"method": entry["method"], "score": SCORE_LABELS[name], "value": table.arrays[name][row]})
              for name in table.scores if name in SCORE_LABELS
              for row, entry in enumerate(table.entries) if entry["model"] == model]
    return pd.concat(frames).dropna()


def plot_scores(table: ScoreTable, stem: Path | str, metadata: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Mean deletion and insertion curves (probability of the target against the fraction of pixels replaced) per
    method (colour) and model (dashes), the random order's in grey, bands the 95% bootstrap interval of the mean over
    images; then per model each per-image score (dots) with its mean and 95% interval (diamonds and bars). Writes
    ``<stem>.pdf/.png/.figure.json``."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D

    options = table.meta["options"]
    bands = {"errorbar": ("ci", 95), "n_boot": options["n_resamples"], "seed": options["seed"]}
    methods = list(dict.fromkeys(entry["method"] for entry in table.entries))
    models = list(dict.fromkeys(entry["model"] for entry in table.entries))
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    dashes = {model: DASHES[i % len(DASHES)] for i, model in enumerate(models)}
    curves = [curve for curve in ("deletion", "insertion") if curve in table.arrays]
    # the random order is the same for every method: one grey curve per model, from its first entry
    first_rows = [next(row for row, entry in enumerate(table.entries) if entry["model"] == model) for model in models]
    with paper_style():
        fig, axes = plt.subplots(1, len(curves) + len(models), figsize=(2.9 * (len(curves) + len(models)) + 1.3, 2.9),
                                 squeeze=False)
        for ax, curve in zip(axes[0], curves):
            sns.lineplot(data=_curve_frame(table, f"random_{curve}", first_rows), x="fraction", y="probability",
                         style="model", dashes=dashes, color="0.55", lw=1.0, err_kws={"alpha": 0.12}, legend=False,
                         ax=ax, **bands)
            sns.lineplot(data=_curve_frame(table, curve, list(range(len(table.entries)))), x="fraction",
                         y="probability", hue="method", palette=palette, style="model", dashes=dashes, lw=1.3,
                         legend=False, ax=ax, **bands)
            start = options["faithfulness"]["deletion_reference" if curve == "deletion" else "insertion_start"]
            ax.set_title(f"{curve} ({'to' if curve == 'deletion' else 'from'} {start})")
            ax.set_xlabel(f"fraction of pixels {'deleted' if curve == 'deletion' else 'inserted'}")
            ax.set_ylabel("probability of the target")
            ax.set_xlim(0, 1)
            ax.set_ylim(bottom=0)
        for ax, model in zip(axes[0, len(curves):], models):
            scores = _score_frame(table, model)
            dodge = len(methods) > 1
            sns.stripplot(data=scores, x="score", y="value", hue="method", palette=palette, hue_order=methods,
                          dodge=dodge, alpha=0.35, size=2.5, jitter=0.12, legend=False, ax=ax)
            # placed like the dots: the hue centres spread over 0.8 - 0.8 / levels of each category's width
            sns.pointplot(data=scores, x="score", y="value", hue="method", palette=palette, hue_order=methods,
                          dodge=0.8 - 0.8 / len(methods) if dodge else False, markers="D", markersize=3.5,
                          linestyle="none", err_kws={"linewidth": 1.0}, capsize=0.08, legend=False, ax=ax, **bands)
            ax.set_title(f"{model}, per image")
            ax.set_xlabel("")
            ax.set_ylabel("score")
            ax.set_ylim(-0.03, 1.03)
        handles = [Line2D([], [], color=palette[method], lw=1.3, label=method) for method in methods]
        if curves:
            if len(models) > 1:
                handles += [Line2D([], [], color="0.2", lw=1.0, label=model, **({"dashes": dashes[model]}
                                                                              if dashes[model] else {}))
                            for model in models]
            handles.append(Line2D([], [], color="0.55", lw=1.0, label="random order"))
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.suptitle(f"explanation scores, n = {len(table.meta['images'])} images; bands and bars: 95% bootstrap CI "
                     "of the mean", fontsize=9)
        fig.tight_layout()
    return save_figure(fig, stem, {**table.meta, **(metadata or {}),
                                   "bands": f"seaborn 95% percentile bootstrap of the mean ({bands['n_boot']} "
                                            f"resamples, seed {bands['seed']})"})


__all__ = ["plot_scores"]
