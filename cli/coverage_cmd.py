"""``hpx-analyze coverage``: learned filter size relative to the feature map (paper Fig. 5)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typing_extensions import Annotated

from .options import (DEFAULT_DEVICE, DEFAULT_OUT, DEFAULT_SEED, Device, InputSize, ModelKwargs, ModelLoader, Models,
                      Out, Seed, WeightsKey, WeightsPerModel, weights_per_model)


def register(app: typer.Typer) -> None:
    app.command("coverage")(coverage)


def coverage(
    model: Models,
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
    from hpx_analysis.models.zoo import model_label
    from hpx_analysis.plotting import save_figure
    from hpx_analysis.plotting.coverage import plot_coverage
    from hpx_analysis.results import to_jsonable

    loader = ModelLoader.from_options(weights_key, model_kwargs)
    target = resolve_device(device)
    out = Path(out)
    results = []
    for name, source in zip(tqdm(model, desc="coverage", unit="model"), weights_per_model(model, weights)):
        result = compute_coverage(loader.load(name, source, seed, target), threshold=threshold,
                                  energy_share=energy_share, input_size=input_size)
        result.save(out / f"coverage_{model_label(name)}")
        results.append(result)
    stem = out / "coverage"
    table = write_table(results, stem.with_suffix(".csv"))
    summary = {"threshold": threshold, "energy_share": energy_share, "models": [r.meta["model"] for r in results],
               "layers": [row for r in results for row in r.rows()]}
    stem.with_suffix(".json").write_text(json.dumps(to_jsonable(summary), indent=2))
    written = save_figure(plot_coverage(results), stem, metadata={"threshold": threshold, "energy_share": energy_share,
                                                                  "input_size": input_size, "models": summary["models"]})
    for path in [table, stem.with_suffix(".json"), *written]:
        typer.echo(str(path))
