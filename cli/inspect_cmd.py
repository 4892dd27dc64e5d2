"""``hpx-analyze inspect``: a model's token-mixing layers, feature-map sizes and long-filter kernels."""

from __future__ import annotations

import typer

from . import options


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_model)


def inspect_model(
    model: options.Model = None,
    weights: options.Weights = options.DEFAULT_WEIGHTS,
    input_size: options.InputSize = None,
    layers: options.Layers = None,
    seed: options.Seed = options.DEFAULT_SEED,
    weights_key: options.WeightsKey = None,
    model_kwargs: options.ModelKwargs = None,
) -> None:
    """List the token-mixing layers (stage and block numbered from 1 as in the paper), their kind,
    feature-map size at --input-size and kernel size. Weights only matter for the loading checks (--weights random
    lists a model without its published weights)."""
    from hpx_analysis.inspection import list_mixers, select_mixers
    from hpx_analysis.models.zoo import default_input_size

    net = options.model_spec(model, weights, weights_key, model_kwargs).load(seed)
    resolution = input_size or default_input_size(net)[0]
    chosen = select_mixers(list_mixers(net, resolution), options.selected_layers(layers))
    typer.echo(f"{'layer':<8}{'kind':<21}{'feature map':<13}{'kernel':<11}path")
    for info in chosen:
        feature = "x".join(map(str, info.feature_size)) if info.feature_size else "-"
        kernel = "x".join(map(str, info.kernel_size)) if info.kernel_size else "-"
        typer.echo(f"{info.name:<8}{info.kind:<21}{feature:<13}{kernel:<11}{info.path}")
