"""``hpx-analyze models``: the HyenaPixel variants and reference backbones."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("models")(list_models)


def list_models() -> None:
    """List our HyenaPixel variants and the reference backbones with parameter counts and resolution."""
    import timm
    import torch

    from hpx_analysis.models import PROXY_NAMES, PUBLISHED
    from hpx_analysis.models.zoo import available_models, count_parameters, default_input_size

    typer.echo(f"{'model':<22}{'params':>10}  {'resolution':<11}{'weights'}")
    for name in available_models():
        with torch.device("meta"):
            model = timm.create_model(name)
        height, width = default_input_size(model)
        if name in PUBLISHED:
            source = "published (Spravil/...westai_in1k)"
        elif name in PROXY_NAMES:
            source = "trained by `hpx-analyze demo`"
        elif name in timm.list_pretrained(name + "*") or timm.list_pretrained(name + ".*"):
            source = "timm hub"
        else:
            source = "none"
        typer.echo(f"{name:<22}{count_parameters(model) / 1e6:>9.2f}M  {f'{height}x{width}':<11}{source}")
