"""``hpx-analyze kernels``: learned long-filter kernels as figures (paper Fig. 7, 11, 12)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from .options import (DEFAULT_DEVICE, DEFAULT_OUT, DEFAULT_SEED, DEFAULT_WEIGHTS, Device, InputSize, Layers, Model,
                      ModelKwargs, Normalisation, Orientation, Out, Seed, Weights, WeightsKey, model_spec,
                      report_written, selected_layers)


def register(app: typer.Typer) -> None:
    app.command("kernels")(kernels)


def _pair(text: Optional[str], what: str) -> Optional[tuple]:
    if text is None:
        return None
    from hpx_analysis.errors import HpxError
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise HpxError(f"{what} must be two integers 'A,B', got '{text}'")
    return int(parts[0]), int(parts[1])


def kernels(
    model: Model = None,
    weights: Weights = DEFAULT_WEIGHTS,
    reduction: Annotated[str, typer.Option(help="mean, abs-mean, top-k (gallery of the --top-k channels "
                                                "with most energy) or a channel index.")] = "mean",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Channels shown per layer with --reduction top-k.")] = 4,
    normalise: Annotated[Normalisation, typer.Option("--normalise", help="maxabs ([-1, 1], diverging map centred "
                                                     "at 0), minmax ([0, 1]) or none.")] = Normalisation.maxabs,
    layers: Layers = None,
    position: Annotated[Optional[str], typer.Option(help="Evaluation pixel ROW,COL of the 1D (Hyena) wrap-around; "
                                                         "default the centre-most pixel.")] = None,
    orientation: Annotated[Orientation, typer.Option(help="kernel: the kernel array, tap c+d drawn at p+d (as the "
                                                          "paper's Fig. 11); response: the weight each input pixel "
                                                          "gets at the evaluation pixel p (tap c+d at p-d; 2D: the "
                                                          "kernel point-reflected).")] = Orientation.kernel,
    input_size: InputSize = None,
    device: Device = DEFAULT_DEVICE,
    out: Out = DEFAULT_OUT,
    seed: Seed = DEFAULT_SEED,
    weights_key: WeightsKey = None,
    model_kwargs: ModelKwargs = None,
) -> None:
    """Plot each long-filter layer's kernel: 2D HyenaPixel kernels and reshaped, wrapped 1D Hyena kernels."""
    from hpx_analysis.analyzers.kernels import compute_kernels
    from hpx_analysis.devices import resolve_device
    from hpx_analysis.plotting import save_figure
    from hpx_analysis.plotting.kernels import plot_kernels

    spec = model_spec(model, weights, weights_key, model_kwargs)
    chosen_reduction = int(reduction) if reduction.lstrip("-").isdigit() else reduction
    result = compute_kernels(spec.load(seed, resolve_device(device)), reduction=chosen_reduction,
                             normalisation=normalise.value, layers=selected_layers(layers), top_k=top_k,
                             position=_pair(position, "--position"), input_size=input_size,
                             orientation=orientation.value)
    stem = Path(out) / f"kernels_{spec.label}"
    report_written([*result.save_files(stem), *save_figure(plot_kernels(result), stem, metadata=result.meta)])
