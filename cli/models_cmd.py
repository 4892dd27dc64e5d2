"""``hpx-analyze models``: the HyenaPixel variants and reference backbones."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("models")(list_models)


def list_models() -> None:
    """List our HyenaPixel variants, the Hyena N-D models and the reference backbones with parameter counts and
    resolution."""
    import timm
    import torch

    from hpx_analysis.models import PROXY_NAMES, PUBLISHED, hyena_nd, large_kernel
    from hpx_analysis.models.zoo import available_models, count_parameters, default_input_size

    names = available_models()
    column = max(map(len, names)) + 2
    typer.echo(f"{'model':<{column}}{'params':>10}  {'resolution':<11}{'weights'}")
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name)
        height, width = default_input_size(model)
        if name in PUBLISHED:
            source = "published (Spravil/...westai_in1k)"
        elif name in PROXY_NAMES:
            source = "shipped (`hpx-analyze demo`)"
        elif name in hyena_nd.model_names():
            source = "none published (train with the official script, load with --checkpoint)"
        elif name in large_kernel.model_names():
            source = "Google Drive (download, load with --checkpoint)"
        elif name in timm.list_pretrained(name + "*") or timm.list_pretrained(name + ".*"):
            source = "timm hub"
        else:
            source = "none"
        typer.echo(f"{name:<{column}}{count_parameters(model) / 1e6:>9.2f}M  {f'{height}x{width}':<11}{source}")
