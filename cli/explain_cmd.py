"""``hpx-analyze explain``: FGVis explanations beside captum's attributions (Fig. 9/10), with a sanity check."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from typing_extensions import Annotated

from . import options

if TYPE_CHECKING:
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
    lambda_tries: Annotated[int, typer.Option("--lambda-tries", help="FGVis: lambdas tried, dividing by 10 "
                            "(6: down to 1e-9, the reference's weight).")] = 6,
    bounds: Annotated[bool, typer.Option("--bounds/--no-bounds", help="FGVis: activation-bounded gradients "
                      "(the adversarial defense).")] = True,
    bound_activations: Annotated[options.BoundActivations, typer.Option("--bound-activations", help="FGVis: "
                                 "which nonlinearities are bounded: relu (the reference's rule: ReLUs, in MetaFormers "
                                 "the ReLU inside StarReLU/SquaredReLU) or all (also GELU, SiLU, ...).")
                                 ] = options.BoundActivations.relu,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples (images x lambdas) per batch.")] = 8,
    exponent: Annotated[float, typer.Option("--exponent", help="Display exponent of the FGVis mask.")] = 7.0,
    sanity: Annotated[bool, typer.Option("--sanity", help="Also run the cascading parameter randomisation "
                      "test and report Spearman correlations.")] = False,
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

    Runs unchanged under `torchrun --nproc-per-node N` (each rank a shard of the images; rank 0 writes).
    """
    from hpx_analysis import distributed
    from hpx_analysis.devices import resolve_device
    from hpx_analysis.plotting.explain import plot_explanations, plot_sanity
    from hpx_analysis.workflows import explain_models

    specs = options.model_specs(model, weights, weights_key, model_kwargs)
    methods = [m.value for m in method] if method else ["fgvis"]
    with distributed.session(resolve_device(device)) as (torch_device, rank, _):
        explained = explain_models(specs, methods, images=images, num_images=num_images, input_size=input_size,
                                   target=target, batch_size=batch_size, sanity=sanity, seed=seed, device=torch_device,
                                   resume_dir=options.runs_dir(out, resume), progress=True, reference=reference.value,
                                   iterations=iterations, lambda_start=lambda_start, lambda_tries=lambda_tries,
                                   bounded=bounds, bound_activations=bound_activations.value)
    if rank != 0:
        return
    run_options = {"images": str(images) if images else "skimage samples", "num_images": num_images,
                   "input_size": input_size, "target": target, "reference": reference.value, "seed": seed,
                   "weights": [spec.weights for spec in specs]}
    folder, written = Path(out) / "explain", []
    for item in explained:
        item.result.meta["cli_options"] = run_options
        written += item.result.save_files(folder / options.safe_filename(f"{item.spec.label}_{item.method}"))
        _report(item)
        if item.sanity is not None:
            stem = folder / options.safe_filename(f"sanity_{item.spec.label}_{item.method}")
            written += [*item.sanity.save_files(stem), *plot_sanity(item.sanity, stem, {"options": run_options})]
    figure = folder / options.safe_filename(f"explain_{'+'.join(spec.label for spec in specs)}_{'+'.join(methods)}")
    written += plot_explanations([item.result for item in explained], figure, exponent, {"options": run_options})
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
