"""``hpx-analyze explain``: FGVis explanations beside captum's attributions (Fig. 9/10), with a sanity check."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from typing_extensions import Annotated

from . import options

if TYPE_CHECKING:
    from hpx_analysis.analyzers.scores import ScoreTable
    from hpx_analysis.workflows import Explanation


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)


def explain(
    model: options.Models = None,
    weights: options.WeightsPerModel = None,
    method: Annotated[Optional[List[options.Method]], typer.Option("--method", help="fgvis, saliency, "
                      "integrated-gradients, occlusion or gradcam; repeat to compare several (default fgvis).")
                      ] = None,
    images: options.Images = None,
    num_images: options.NumImages = 2,
    input_size: options.InputSize = None,
    target: Annotated[Optional[int], typer.Option("--target", help="Class to explain (default: the top-1 "
                      "prediction for each image).")] = None,
    reference: Annotated[options.Reference, typer.Option("--reference", help="Deleted/baseline image: black, "
                         "blur or mean.")] = options.Reference.black,
    iterations: Annotated[int, typer.Option("--iterations", help="FGVis: SGD steps per lambda.")] = 500,
    lambda_start: Annotated[float, typer.Option("--lambda", help="FGVis: first sparsity weight.")] = 1e-4,
    lr: Annotated[float, typer.Option("--lr", help="FGVis: SGD learning rate of the mask (the reference's 0.1).")] = 0.1,
    noise_std: Annotated[float, typer.Option("--noise-std", help="FGVis: std of the Gaussian noise added to "
                         "the evidence each step (the reference's 0.1).")] = 0.1,
    lambda_tries: Annotated[int, typer.Option("--lambda-tries", help="FGVis: lambdas tried, dividing by 10 "
                            "(6: down to 1e-9, the reference's weight).")] = 6,
    bounds: Annotated[bool, typer.Option("--bounds/--no-bounds", help="FGVis: activation-bounded gradients "
                      "(the adversarial defense).")] = True,
    bound_activations: Annotated[options.BoundActivations, typer.Option("--bound-activations", help="FGVis: "
                                 "which nonlinearities are bounded: relu (the reference's rule: ReLUs, in MetaFormers "
                                 "the ReLU inside StarReLU/SquaredReLU) or all (also GELU, SiLU, ...).")
                                 ] = options.BoundActivations.relu,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples (images x lambdas) per batch.")] = 8,
    exponent: Annotated[float, typer.Option("--exponent", min=0.01, max=100.0, callback=options.finite,
                                            help="Display exponent of the FGVis mask.")] = 7.0,
    sanity: Annotated[bool, typer.Option("--sanity", help="Also run the cascading parameter randomisation "
                      "test and report Spearman correlations.")] = False,
    metrics: options.Metrics = None,
    boxes: options.Boxes = None,
    score_steps: Annotated[int, typer.Option("--score-steps", help="Deletion/insertion: steps k = 0..N, each "
                           "replacing k * H * W // N pixels.")] = 100,
    score_batch_size: Annotated[int, typer.Option("--score-batch-size", help="Deletion/insertion: forwards per "
                                "batch (the variants of one or more images; on a CPU at 224 px 4-8 is fastest, on a "
                                "GPU more).")] = 16,
    pointing_tolerance: Annotated[float, typer.Option("--pointing-tolerance", help="Pointing game: a maximum within "
                                  "this many px of a box is a hit (Zhang et al. used 15).")] = 0.0,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=1, help="Bootstrap resamples for the scores' 95% "
                         "intervals.")] = 1000,
    resume: options.Resume = options.DEFAULT_RESUME,
    device: options.Device = options.DEFAULT_DEVICE,
    out: options.Out = options.DEFAULT_OUT,
    seed: options.Seed = options.DEFAULT_SEED,
    weights_key: options.WeightsKey = None,
    model_kwargs: options.ModelKwargs = None,
) -> None:
    """Explain the models' decisions on the same images with FGVis and/or captum methods; one grid figure
    explain_<models>.pdf/.png, one .npz + .json per model and method. Runs are kept under OUT/runs, so a
    rerun with the same options resumes an interrupted run or reuses a finished one.

    With --metrics every explanation is scored (deletion/insertion to --reference, from the blurred image; the
    pointing games against --boxes): scores_<models>_<methods>.npz/.json with every per-image score, curve, mean
    and 95% bootstrap interval, a figure of the mean curves and per-image scores, and a table on the terminal.

    Runs unchanged under `torchrun --nproc-per-node N` (each rank a shard of the images; rank 0 writes).
    """
    from hpx_analysis import distributed
    from hpx_analysis.devices import resolve_device
    from hpx_analysis.plotting.explain import plot_explanations, plot_sanity
    from hpx_analysis.plotting.scores import plot_scores
    from hpx_analysis.workflows import checked_metrics, explain_models, explanation_scores

    specs = options.model_specs(model, weights, weights_key, model_kwargs)
    methods = [m.value for m in method] if method else ["fgvis"]
    scored = checked_metrics(options.listed(metrics), boxes)
    with distributed.session(resolve_device(device)) as (torch_device, rank, _):
        explained = explain_models(specs, methods, images=images, num_images=num_images, input_size=input_size,
                                   target=target, batch_size=batch_size, sanity=sanity, seed=seed, device=torch_device,
                                   resume_dir=options.runs_dir(out, resume), progress=True, reference=reference.value,
                                   iterations=iterations, lambda_start=lambda_start, lambda_tries=lambda_tries, lr=lr,
                                   noise_std=noise_std,
                                   bounded=bounds, bound_activations=bound_activations.value, metrics=scored,
                                   boxes=boxes, score_steps=score_steps, score_batch_size=score_batch_size,
                                   pointing_tolerance=pointing_tolerance)
    if rank != 0:
        return
    run_options = {"images": str(images) if images else "skimage samples", "num_images": num_images,
                   "input_size": input_size, "target": target, "reference": reference.value, "seed": seed,
                   "weights": [spec.weights for spec in specs], "metrics": scored,
                   "boxes": str(boxes) if boxes else None}
    folder, written = Path(out) / "explain", []
    for item in explained:
        item.result.meta["cli_options"] = run_options
        written += item.result.save_files(folder / options.safe_filename(f"{item.spec.label}_{item.method}"))
        _report(item)
        if item.sanity is not None:
            stem = folder / options.safe_filename(f"sanity_{item.spec.label}_{item.method}")
            written += [*item.sanity.save_files(stem), *plot_sanity(item.sanity, stem, {"options": run_options})]
    names = f"{'+'.join(spec.label for spec in specs)}_{'+'.join(methods)}"
    figure = folder / options.safe_filename(f"explain_{names}")
    written += plot_explanations([item.result for item in explained], figure, exponent, {"options": run_options})
    if scored:
        table = explanation_scores(explained, n_resamples=bootstrap, seed=seed)
        table.meta["cli_options"] = run_options
        stem = folder / options.safe_filename(f"scores_{names}")
        written += [*table.save_files(stem), *plot_scores(table, stem, {"options": run_options})]
        _report_scores(table, scored)
    options.report_written(written)


def _report(item: "Explanation") -> None:
    """FGVis: the bounded activations and each image's lambda, iterations and classes; the sanity check's
    Spearman correlations when it ran."""
    import numpy as np

    label, result = item.spec.label, item.result
    if item.method == "fgvis":
        run_options = result.meta["options"]
        typer.echo(f"{label} fgvis: gradients bounded at {run_options['bounded_activations']} activation layers "
                   f"({run_options['bound_activations']} rule)" if run_options["bounded"] else
                   f"{label} fgvis: no activation bounds")
        for image, record in zip(result.meta["images"], result.records):
            status = "" if record["success"] else f"  ({record['note']})"
            typer.echo(f"{label} {image}: lambda {record['lambda']:.0e}, {record['iterations']} iterations, "
                       f"class {record['original_class']} p={record['original_prob']:.3f} -> "
                       f"{record['final_class']} p={record['final_prob']:.3f}{status}")
    if item.sanity is not None:
        typer.echo(f"sanity {label} {item.method}: Spearman rho with the trained model's maps")
        for step, row in zip(item.sanity.steps, item.sanity.correlations):
            typer.echo(f"  {step:<20} mean {np.nanmean(row):+.3f}  per image {' '.join(f'{v:+.3f}' for v in row)}")


SCORE_COLUMNS = {"deletion": ("deletion_auc", "random_deletion_auc"),
                 "insertion": ("insertion_auc", "random_insertion_auc"),
                 "pointing": ("pointing",), "energy-pointing": ("energy_pointing",)}
"""The table's columns of each metric: the score and, for the curves, the random order's."""


def _report_scores(table: "ScoreTable", metrics: List[str]) -> None:
    """One row per model and method: the mean of each score with its 95% bootstrap interval (and, where some images
    have no box, over how many images)."""
    columns = [name for metric in metrics for name in SCORE_COLUMNS[metric]]
    images = len(table.meta["images"])
    rows = [["model", "method", *(name.replace("_auc", " AUC").replace("_", " ") for name in columns)]]
    for row, entry in enumerate(table.entries):
        cells = []
        for name in columns:
            stats = table.summary[name][row]
            count = "" if stats["n"] == images else f" (n={stats['n']})"
            cells.append(f"{stats['mean']:.3f} [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]{count}")
        rows.append([entry["model"], entry["method"], *cells])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    typer.echo(f"explanation scores: mean [95% bootstrap CI] over {images} images; random: a seeded random pixel order")
    for r in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip())
