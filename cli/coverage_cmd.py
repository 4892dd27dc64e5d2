"""``hpx-analyze coverage``: learned filter size relative to the feature map (paper Fig. 5)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typing_extensions import Annotated

from .options import (DEFAULT_DEVICE, DEFAULT_OUT, DEFAULT_SEED, Device, InputSize, ModelKwargs, Models, Out, Seed,
                      WeightsKey, WeightsPerModel, model_specs, report_written)


def register(app: typer.Typer) -> None:
    app.command("coverage")(coverage)


def coverage(
    model: Models = None,
    weights: WeightsPerModel = None,
    threshold: Annotated[float, typer.Option(help="Window value below which a tap counts as switched off.")] = 0.05,
    energy_share: Annotated[float, typer.Option(help="Share of a long kernel's absolute weight that its energy-coverage "
                                                     "disc holds.")] = 0.95,
    input_size: InputSize = None,
    device: Device = DEFAULT_DEVICE,
    out: Out = DEFAULT_OUT,
    seed: Seed = DEFAULT_SEED,
    weights_key: WeightsKey = None,
    model_kwargs: ModelKwargs = None,
) -> None:
    """Relative coverage (window extent in taps / F, as k / F for a k x k conv) of every block of each model:
    figure, CSV and JSON."""
    from tqdm import tqdm

    from hpx_analysis.analyzers.coverage import compute_coverage, write_table
    from hpx_analysis.devices import resolve_device
    from hpx_analysis.plotting import save_figure
    from hpx_analysis.plotting.coverage import plot_coverage
    from hpx_analysis.results import to_jsonable

    specs = model_specs(model, weights, weights_key, model_kwargs)
    target = resolve_device(device)
    results, written = [], []
    for spec in tqdm(specs, desc="coverage", unit="model"):
        results.append(compute_coverage(spec.load(seed, target), threshold=threshold, energy_share=energy_share,
                                        input_size=input_size))
        written += results[-1].save_files(Path(out) / f"coverage_{spec.label}")
    stem = Path(out) / "coverage"
    summary = {"threshold": threshold, "energy_share": energy_share, "models": [r.meta["model"] for r in results],
               "layers": [row for r in results for row in r.rows()]}
    stem.with_suffix(".json").write_text(json.dumps(to_jsonable(summary), indent=2))
    written += [write_table(results, stem.with_suffix(".csv")), stem.with_suffix(".json")]
    figure_meta = {"threshold": threshold, "energy_share": energy_share, "input_size": input_size,
                   "models": summary["models"]}
    written += save_figure(plot_coverage(results), stem, metadata=figure_meta)
    report_written(written)
