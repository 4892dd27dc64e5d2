"""``hpx-analyze explain``: FGVis explanations beside captum's attributions (Fig. 9/10), with a sanity check."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from . import options


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
    models = model or ["hpx_former_s18"]
    methods = [m.value for m in method] if method else ["fgvis"]
    from hpx_analysis import distributed
    from hpx_analysis.analyzers.attribution import ExplanationResult, load_inputs
    from hpx_analysis.analyzers.attribution import explain as run_explain
    from hpx_analysis.analyzers.fgvis import FgvisSettings
    from hpx_analysis.analyzers.sanity import sanity_check
    from hpx_analysis.devices import resolve_device
    from hpx_analysis.images import eval_transform, image_sources, model_mean_std
    from hpx_analysis.models.zoo import model_label
    from hpx_analysis.plotting.explain import plot_explanations, plot_sanity

    loader = options.ModelLoader.from_options(weights_key, model_kwargs)
    target_device, rank, _ = distributed.setup(resolve_device(device))
    sources = image_sources(images, num_images, seed)
    settings = FgvisSettings(iterations=iterations, lambda_start=lambda_start, lambda_tries=lambda_tries,
                             reference=reference.value, bounded=bounds, bound_activations=bound_activations.value)
    folder = Path(out) / "explain"
    run_options = {"images": str(images) if images else "skimage samples", "num_images": num_images,
                   "input_size": input_size, "target": target, "reference": reference.value, "seed": seed,
                   "weights": weights}
    resume_dir = Path(out) / "runs" if resume else None
    results: List[ExplanationResult] = []
    for name, source in zip(models, options.weights_per_model(models, weights)):
        net = loader.load(name, source, seed, target_device)
        mean, std = model_mean_std(net)
        transform, _ = eval_transform(net, input_size)
        inputs, names = load_inputs(sources, transform)
        inputs = inputs.to(target_device)
        for chosen in methods:
            method_options = ({"settings": settings, "seed": seed} if chosen == "fgvis" else
                              {"reference": reference.value})
            common = {"target": target, "mean": mean, "std": std, "names": names, "batch_size": batch_size,
                      "resume_dir": resume_dir}
            result = run_explain(net, inputs, chosen, **common, **method_options, progress=True)
            check = (sanity_check(net, inputs, chosen, init_seed=seed + 1, **common, **method_options)
                     if sanity else None)
            if rank != 0:
                continue
            stem = folder / options.safe_filename(f"{model_label(name)}_{chosen}")
            result.meta["cli_options"] = run_options
            result.save(stem)
            results.append(result)
            _report(name, chosen, result)
            if check is not None:
                sanity_stem = folder / options.safe_filename(f"sanity_{model_label(name)}_{chosen}")
                check.save(sanity_stem)
                plot_sanity(check, sanity_stem, {"options": run_options})
                _report_sanity(name, chosen, check)
    distributed.teardown()
    if rank != 0:
        return
    figure = folder / options.safe_filename("explain_" + "+".join(model_label(m) for m in models) + "_"
                                            + "+".join(methods))
    for path in plot_explanations(results, figure, exponent, {"options": run_options}):
        typer.echo(f"wrote {path}")


def _report(model: str, method: str, result: object) -> None:
    from hpx_analysis.models.zoo import model_label
    run_options = result.meta["options"]
    if method != "fgvis":
        return
    typer.echo(f"{model_label(model)} fgvis: gradients bounded at {run_options['bounded_activations']} activation "
               f"layers ({run_options['bound_activations']} rule)" if run_options["bounded"] else
               f"{model_label(model)} fgvis: no activation bounds")
    for image, record in zip(result.meta["images"], result.records):
        status = "" if record["success"] else f"  ({record['note']})"
        typer.echo(f"{model_label(model)} {image}: lambda {record['lambda']:.0e}, {record['iterations']} iterations, "
                   f"class {record['original_class']} p={record['original_prob']:.3f} -> "
                   f"{record['final_class']} p={record['final_prob']:.3f}{status}")


def _report_sanity(model: str, method: str, check: object) -> None:
    import numpy as np
    from hpx_analysis.models.zoo import model_label
    typer.echo(f"sanity {model_label(model)} {method}: Spearman rho with the trained model's maps")
    for step, row in zip(check.steps, check.correlations):
        typer.echo(f"  {step:<20} mean {np.nanmean(row):+.3f}  per image {' '.join(f'{v:+.3f}' for v in row)}")
