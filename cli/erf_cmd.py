"""``hpx-analyze erf``: effective receptive fields of one or more models in one figure (Fig. 4/8)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from . import options


def register(app: typer.Typer) -> None:
    app.command("erf")(erf)


def _stem_name(models: List[str]) -> str:
    """``erf_<models>``: the models' labels joined with '+', filesystem-safe."""
    from hpx_analysis.models.zoo import model_label
    return "erf_" + options.safe_filename("+".join(model_label(m) for m in models))


def erf(
    model: options.Models = None,
    weights: options.WeightsPerModel = None,
    images: options.Images = None,
    num_images: options.NumImages = 50,
    input_size: Annotated[Optional[int], typer.Option("--input-size", help="Input resolution in px. replknet: "
                          "images resized bicubic to size x size, no crop (default 1024). kim2023: the model's timm "
                          "eval transform (shorter side resized by crop_pct, centre crop) at its pretrained input "
                          "size, or at --input-size when given.")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="Output: a stage's output or a block, numbered "
                     "from 1 as in the paper (S2, 2, S2B1, 2.1), or a module path (stages.1, stages.1.blocks.0: "
                     "from 0, as the modules). Default: last stage, before the final norm and head.")] = None,
    convention: Annotated[options.Convention, typer.Option("--convention", help="replknet (paper) or kim2023 "
                          "(OpenERF's protocol).")] = options.Convention.replknet,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per backward pass.")] = 1,
    amp: Annotated[Optional[options.Amp], typer.Option("--amp", help="Autocast dtype bf16 or fp16 (GPU).")] = None,
    shared_scale: Annotated[bool, typer.Option("--shared-scale/--per-panel", help="One colour scale for all "
                            "panels or a colorbar per panel.")] = False,
    replot: Annotated[Optional[Path], typer.Option("--replot", help="Redraw a saved erf_*.npz without "
                      "recomputing.")] = None,
    resume: options.Resume = options.DEFAULT_RESUME,
    device: options.Device = options.DEFAULT_DEVICE,
    out: options.Out = options.DEFAULT_OUT,
    seed: options.Seed = options.DEFAULT_SEED,
    weights_key: options.WeightsKey = None,
    model_kwargs: options.ModelKwargs = None,
) -> None:
    """Effective receptive field (mean input gradient of the centre output) per model, with the
    high-contribution area ratios (kim2023: OpenERF's Gaussian fit and radial masses, in px and relative
    to the input side); writes erf_<models>.pdf/.png and the maps as .npz + .json.
    The running sums are kept under OUT/runs, so an interrupted run resumes when rerun with the same options.
    Runs unchanged under `torchrun --nproc-per-node N` (each rank a shard of the batches; rank 0 writes)."""
    from hpx_analysis import distributed
    from hpx_analysis.analyzers.erf import ERFResult, effective_receptive_field
    from hpx_analysis.errors import HpxError
    from hpx_analysis.inspection import LayerRef, is_layer_syntax
    from hpx_analysis.plotting.erf import save_erf_figure

    if replot is not None:
        result = ERFResult.load(replot)
        stem = Path(replot).with_suffix("")
        for path in save_erf_figure(result, stem, shared_scale):
            typer.echo(f"wrote {path}")
        return
    if not model:
        raise HpxError("give at least one --model (or --replot a saved result)")

    from hpx_analysis.devices import resolve_device
    from hpx_analysis.images import image_sources
    from hpx_analysis.models.zoo import model_label

    loader = options.ModelLoader.from_options(weights_key, model_kwargs)
    target, rank, _ = distributed.setup(resolve_device(device))
    sources = image_sources(images, num_images, seed)
    output = LayerRef.parse(layer) if layer is not None and is_layer_syntax(layer) else layer
    results = []
    for name, source in zip(model, options.weights_per_model(model, weights)):
        net = loader.load(name, source, seed, target)
        results.append(effective_receptive_field(net, sources, input_size=input_size, layer=output,
                                                 convention=convention.value, batch_size=batch_size,
                                                 amp=amp.value if amp else None, label=model_label(name),
                                                 resume_dir=Path(out) / "runs" if resume else None))
    distributed.teardown()
    if rank != 0:
        return
    result = ERFResult.combine(results)
    result.meta["options"].update(images=str(images) if images else "skimage samples", num_images=num_images,
                                  seed=seed, weights=weights, device=str(target))
    stem = Path(out) / _stem_name(model)
    written = [result.save(stem), stem.with_suffix(".json")] + save_erf_figure(result, stem, shared_scale)
    for entry in result.meta["models"]:
        ratios = ", ".join(f"t={t}: {'n/a' if v is None else f'{v:.4f}'}" for t, v in entry["area_ratios"].items())
        typer.echo(f"{entry['label']}: {entry['images_used']} images used, "
                   f"{entry['images_skipped_nonfinite']} skipped (non-finite); area ratio {ratios}")
        fit = entry.get("gaussian") or {}
        if fit.get("r2") is not None:
            typer.echo(f"  Gaussian fit (OpenERF): sigma_x {fit['sigma_x']:.2f} px ({fit['sigma_x_rel']:.4f} of W), "
                       f"sigma_y {fit['sigma_y']:.2f} px ({fit['sigma_y_rel']:.4f} of H), R^2 {fit['r2']:.4f}")
    for path in written:
        typer.echo(f"wrote {path}")
