"""``hpx-analyze truncate``: accuracy when one stage's long kernels are cut to a relative size (paper Fig. 6)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from .options import (DEFAULT_DEVICE, DEFAULT_OUT, DEFAULT_RESUME, DEFAULT_SEED, DEFAULT_WEIGHTS, LAYER_FORMS,
                      LAYER_RANGES, Device, HbCut, InputSize, Model, ModelKwargs, Out, Resume, Seed, Shape,
                      StageRenamed, Weights, WeightsKey, layer_groups, layer_texts, model_spec, report_written,
                      runs_dir)


def register(app: typer.Typer) -> None:
    app.command("truncate")(truncate)


MAX_SIZES = 1000
"""Most relative sizes one sweep takes (each costs one evaluation of the image set)."""


def parse_sizes(text: Optional[str]) -> Optional[List[float]]:
    """``start:stop:step`` (stop included) or a comma-separated list of relative sizes; None for the default."""
    from hpx_analysis.errors import HpxError
    if text is None:
        return None
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not (math.isfinite(start) and math.isfinite(stop) and step > 0 and math.isfinite(step)):
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            sizes = [round(start + i * step, 10) for i in range(count)]
        else:
            sizes = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HpxError(f"--sizes must be 'start:stop:step' or a comma list such as '0,0.5,1', got '{text}'") from None
    if not 1 <= len(sizes) <= MAX_SIZES:
        raise HpxError(f"--sizes gives {len(sizes)} sizes; give 1 to {MAX_SIZES} ('{text}')")
    return sizes


def truncate(
    data: Annotated[Path, typer.Option("--data", help="ImageFolder tree (class folders named by "
                                       "ImageNet WordNet ids take timm's index of that id, other names sorted = "
                                       "0, 1, ...), or a flat folder with --labels.")],
    model: Model = None,
    weights: Weights = DEFAULT_WEIGHTS,
    layers: Annotated[Optional[List[str]], typer.Option(
        "--layers", metavar="LAYERS", show_default=False,
        help=f"What to truncate, one curve each: a stage or a block, {LAYER_FORMS}, or {LAYER_RANGES} (the way to "
             "pick blocks of a ViT); comma-separated or repeated. Default (or 'all'): every stage with long filters, "
             "for a ViT all its Hyena N-D blocks together.")] = None,
    stage: StageRenamed = None,
    sizes: Annotated[Optional[str], typer.Option("--sizes", help="Relative filter sizes r: 'start:stop:step' or "
                                                 "'0,0.5,1'. Taps farther than r*F/2 from the centre are zeroed. "
                                                 "Default: 0 to the smallest r that keeps every tap of the swept "
                                                 "stages in steps of 0.1, that r being the last point (the "
                                                 "untruncated model; 2.78 for hpx_former_s18 at 224 px).",
                                                 show_default=False)] = None,
    shape: Annotated[Shape, typer.Option("--shape", help="Kept region: 'disc' or a centred 'square'.")] = Shape.disc,
    hb_cut: Annotated[HbCut, typer.Option("--hb-cut", help="Cut of Hyena 1D (Hb) layers: 'wrap' keeps the offsets "
                                        "whose nearest 2D displacement on the flattened map lies in the disc or "
                                        "square (the 2D cut at pixels at least r*F/2 from the left and right "
                                        "edges); 'offset' keeps |offset| <= r*L/2 on the sequence of L = H*W "
                                        "(full-width rows; disc only).")] = HbCut.wrap,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Labels of a flat --data folder: CSV "
                                                   "'filename,label' (class index or ImageNet WordNet id; Kaggle's "
                                                   "LOC_val_solution.csv works), one label per line in sorted file "
                                                   "order, or the ImageNet devkit (its folder, .tar.gz or "
                                                   "ILSVRC2012_validation_ground_truth.txt beside meta.mat).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate a stratified, seeded subset of N "
                                                 "images.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on an unreadable image instead of "
                                         "skipping and listing it.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 32,
    input_size: InputSize = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading worker processes.")] = 0,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=1, help="Bootstrap resamples for the 95% "
                                           "intervals.")] = 1000,
    resume: Resume = DEFAULT_RESUME,
    device: Device = DEFAULT_DEVICE,
    out: Out = DEFAULT_OUT,
    seed: Seed = DEFAULT_SEED,
    weights_key: WeightsKey = None,
    model_kwargs: ModelKwargs = None,
) -> None:
    """Top-1/top-5 accuracy when the long kernels of a stage are truncated to relative size r (paper Fig. 6).

    Runs unchanged under `torchrun --nproc-per-node N` (each rank a shard of the batches; rank 0 writes).
    """
    from hpx_analysis import distributed
    from hpx_analysis.analyzers.truncation import truncation_sweep
    from hpx_analysis.datasets import labelled_images, stratified_subset
    from hpx_analysis.devices import resolve_device
    from hpx_analysis.images import skipped_line
    from hpx_analysis.plotting.truncation import plot_truncation

    spec = model_spec(model, weights, weights_key, model_kwargs)
    groups, chosen_sizes = layer_groups(layer_texts(layers, stage)), parse_sizes(sizes)
    with distributed.session(resolve_device(device)) as (torch_device, rank, _):
        samples = stratified_subset(labelled_images(data, labels), limit, seed)
        result = truncation_sweep(spec.load(seed, torch_device), samples, groups, chosen_sizes, shape.value,
                                  hb_cut=hb_cut.value, batch_size=batch_size, input_size=input_size,
                                  resume_dir=runs_dir(out, resume), strict=strict, workers=workers,
                                  n_resamples=bootstrap, seed=seed)
    if rank != 0:
        return
    result.meta["inputs"] = {"data": str(Path(data).resolve()), "labels": str(labels) if labels else None,
                             "limit": limit, "images": [s.name for s in samples]}
    if result.meta["skipped"]:
        typer.echo(f"{skipped_line(result.meta['skipped'])} (all are listed in the result's .json)", err=True)
    stem = Path(out) / f"truncate_{spec.label}"
    report_written([*result.save_files(stem), result.write_csv(stem.with_suffix(".csv")), *plot_truncation(result, stem)])
