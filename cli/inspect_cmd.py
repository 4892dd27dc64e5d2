"""``hpx-analyze inspect``: a model's token-mixing layers, feature-map sizes and long-filter kernels."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from . import options


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_model)


def inspect_model(
    model: options.Model,
    weights: options.Weights = "random",
    size: Annotated[Optional[int], typer.Option("--size", help="Input resolution in px (default: the model's).")] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Only these stages or blocks, numbered from 1 as "
                      "in the paper: S3, S3B2, 3.2 (comma-separated), or module paths stages.2.blocks.1 (from 0). "
                      "Default: all.")] = None,
    seed: options.Seed = options.DEFAULT_SEED,
) -> None:
    """List the token-mixing layers (stage and block numbered from 1 as in the paper), their kind,
    feature-map size at --size and kernel size. Weights only matter for the loading checks."""
    from hpx_analysis.inspection import list_mixers, parse_layers, select_mixers
    from hpx_analysis.models.zoo import default_input_size, load_model

    net = load_model(model, weights, seed=seed)
    resolution = size or default_input_size(net)[0]
    chosen = select_mixers(list_mixers(net, resolution), parse_layers(layers))
    typer.echo(f"{'layer':<8}{'kind':<21}{'feature map':<13}{'kernel':<11}path")
    for info in chosen:
        feature = "x".join(map(str, info.feature_size)) if info.feature_size else "-"
        kernel = "x".join(map(str, info.kernel_size)) if info.kernel_size else "-"
        typer.echo(f"{info.name:<8}{info.kind:<21}{feature:<13}{kernel:<11}{info.path}")
