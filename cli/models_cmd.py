"""``hpx-analyze models``: the HyenaPixel variants and reference backbones."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("models")(list_models)


def list_models() -> None:
    """List our HyenaPixel variants and the reference backbones with parameter counts and resolution."""
    import timm
    import torch

    from hpx_analysis.models import PUBLISHED
    from hpx_analysis.models.zoo import available_models, count_parameters, default_input_size

    typer.echo(f"{'model':<22}{'params':>10}  {'resolution':<11}{'weights'}")
    for name in available_models():
        with torch.device("meta"):
            model = timm.create_model(name)
        height, width = default_input_size(model)
        source = "published (Spravil/...westai_in1k)" if name in PUBLISHED else (
            "timm hub" if name in timm.list_pretrained(name + "*") or timm.list_pretrained(name + ".*") else "none")
        typer.echo(f"{name:<22}{count_parameters(model) / 1e6:>9.1f}M  {f'{height}x{width}':<11}{source}")
