"""``hpx-analyze erf``: effective receptive fields of one or more models in one figure (Fig. 4/8)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, TypeVar, Union

import typer
from typing_extensions import Annotated

from . import options

if TYPE_CHECKING:
    from hpx_analysis.analyzers.erf import ERFResult
    from hpx_analysis.layer_names import LayerRef

T = TypeVar("T")


def register(app: typer.Typer) -> None:
    app.command("erf")(erf)


def erf(
    context: typer.Context,
    model: options.Models = None,
    weights: options.WeightsPerModel = None,
    images: options.Images = None,
    num_images: options.NumImages = 50,
    input_size: Annotated[Optional[List[str]], typer.Option(
        "--input-size", metavar="SIZES", show_default=False,
        help="Input resolution in px. replknet: images resized bicubic to size x size, no crop (default 1024). "
             "kim2023: the model's timm eval transform (shorter side resized by crop_pct, centre crop) at its "
             "pretrained input size, or at --input-size when given. Several (224,512,1024, or repeated): the same "
             "images at each, one run per size, in one result, with the area ratios against input size.")] = None,
    layers: Annotated[Optional[List[str]], typer.Option(
        "--layers", metavar="LAYERS", show_default=False,
        help=f"Output: a stage's output or a block, {options.LAYER_FORMS}, or any module path "
             "(stages.1.blocks.0.token_mixer). Several (S1,S2,S3,S4, or repeated): every layer's ERF from one "
             "forward pass per batch, in one result, with the area ratios against depth. Default: last stage, "
             "before the final norm and head.")] = None,
    layer: options.LayerRenamed = None,
    convention: Annotated[options.Convention, typer.Option("--convention", help="replknet (paper) or kim2023 "
                          "(OpenERF's protocol).")] = options.Convention.replknet,
    gradient: Annotated[options.Gradient, typer.Option("--gradient", help="The map from the input gradient: relu (the "
                        "references') or abs, its absolute value.")] = options.Gradient.relu,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per backward pass.")] = 1,
    amp: Annotated[Optional[options.Amp], typer.Option("--amp", help="Autocast dtype bf16 or fp16 (GPU; fp16 "
                   "gradients are scaled so the ERF's tails do not flush to zero).")] = None,
    shared_scale: Annotated[bool, typer.Option("--shared-scale/--per-panel", help="One colour scale for all "
                            "panels or a colorbar per panel.")] = False,
    replot: Annotated[Optional[Path], typer.Option("--replot", help="Redraw a saved erf_*.npz without "
                      "recomputing (beside it, or in --out when given).")] = None,
    resume: options.Resume = options.DEFAULT_RESUME,
    device: options.Device = options.DEFAULT_DEVICE,
    out: options.Out = options.DEFAULT_OUT,
    seed: options.Seed = options.DEFAULT_SEED,
    weights_key: options.WeightsKey = None,
    model_kwargs: options.ModelKwargs = None,
) -> None:
    """Effective receptive field (mean input gradient of the centre output) per model, input size and layer, with
    the high-contribution area ratios (kim2023: OpenERF's Gaussian fit and radial masses, in px and relative
    to the input side); writes erf_<models>.pdf/.png and the maps as .npz + .json, and with several layers or
    sizes erf_<models>_area_by_layer / _area_by_size.pdf/.png.
    The running sums are kept under OUT/runs, so an interrupted run resumes when rerun with the same options.
    Runs unchanged under `torchrun --nproc-per-node N` (each rank a shard of the batches; rank 0 writes)."""
    from hpx_analysis.analyzers.erf import ERFResult
    from hpx_analysis.plotting.erf import save_erf_figure

    if replot is not None:
        ignored = [f"--{name.replace('_', '-')}" for name in ("model", "weights", "images", "input_size", "layers")
                   if options.given(context, name)]
        if ignored:
            typer.echo(f"note: --replot redraws the saved result; {', '.join(ignored)} ignored", err=True)
        stem = Path(out) / Path(replot).stem if options.given(context, "out") else Path(replot).with_suffix("")
        options.report_written(save_erf_figure(ERFResult.load(replot), stem, shared_scale))
        return
    from hpx_analysis import distributed
    from hpx_analysis.devices import resolve_device
    from hpx_analysis.workflows import erf_models

    specs = options.model_specs(model, weights, weights_key, model_kwargs)
    outputs = _one_or_all([_output_layer(text) for text in options.layer_texts(layers, layer)])
    sizes = _one_or_all(options.input_sizes(input_size))
    with distributed.session(resolve_device(device)) as (torch_device, rank, _):
        result = erf_models(specs, images=images, num_images=num_images, input_size=sizes, layer=outputs,
                            convention=convention.value, gradient=gradient.value, batch_size=batch_size,
                            amp=amp.value if amp else None, seed=seed, device=torch_device,
                            resume_dir=options.runs_dir(out, resume))
    if rank != 0:
        return
    stem = Path(out) / ("erf_" + options.safe_filename("+".join(spec.label for spec in specs)))
    written = [*result.save_files(stem), *save_erf_figure(result, stem, shared_scale)]
    _report(result)
    options.report_written(written)


def _output_layer(text: str) -> Union["LayerRef", str]:
    """One ``--layers`` item: a stage or block numbered from 1, else a module path."""
    from hpx_analysis.layer_names import LayerRef, is_layer_syntax

    return LayerRef.parse(text) if is_layer_syntax(text) else text


def _one_or_all(items: List[T]) -> Union[T, List[T], None]:
    """None for no item, the item for one, the list for several (the library's forms of one and several)."""
    return None if not items else items[0] if len(items) == 1 else items


def _report(result: "ERFResult") -> None:
    """Per row (model, size, layer): images used and skipped, area ratios, and the Gaussian fit where there is one."""
    for row, entry in enumerate(result.meta["models"]):
        ratios = ", ".join(f"t={t}: {'n/a' if v is None else f'{v:.4f}'}" for t, v in entry["area_ratios"].items())
        typer.echo(f"{result.caption(row)}: {entry['images_used']} images used, "
                   f"{entry['images_skipped_nonfinite']} skipped (non-finite); area ratio {ratios}")
        fit = entry.get("gaussian") or {}
        if fit.get("r2") is not None:
            typer.echo(f"  Gaussian fit (OpenERF): sigma_x {fit['sigma_x']:.2f} px ({fit['sigma_x_rel']:.4f} of W), "
                       f"sigma_y {fit['sigma_y']:.2f} px ({fit['sigma_y_rel']:.4f} of H), R^2 {fit['r2']:.4f}")
