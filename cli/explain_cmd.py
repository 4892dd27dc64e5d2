"""``hpx-analyze explain``: FGVis explanations beside captum's attributions (Fig. 9/10), with a sanity check."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

import typer
from typing_extensions import Annotated

from . import options


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)


def explain(
    model: options.Models = None,
    weights: options.Weights = options.DEFAULT_WEIGHTS,
    method: Annotated[Optional[List[str]], typer.Option("--method", help="fgvis, saliency, integrated-gradients, "
                      "occlusion or gradcam; repeat to compare several.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image folder (recursive) or ImageFolder "
                      "tree; default: scikit-image's bundled photographs.")] = None,
    num_images: Annotated[int, typer.Option("--num-images", help="Images to explain (sorted, seeded).")] = 2,
    size: Annotated[Optional[int], typer.Option("--size", help="Input resolution in px (default: the model's "
                    "pretrained resolution); images go through the model's evaluation transform (resize the "
                    "shorter side, centre crop) either way.")] = None,
    target: Annotated[Optional[int], typer.Option("--target", help="Class to explain (default: the top-1 "
                      "prediction for each image).")] = None,
    reference: Annotated[str, typer.Option("--reference", help="Deleted/baseline image: black, blur or mean.")
                         ] = "black",
    iterations: Annotated[int, typer.Option("--iterations", help="FGVis: SGD steps per lambda.")] = 500,
    lambda_start: Annotated[float, typer.Option("--lambda", help="FGVis: first sparsity weight.")] = 1e-4,
    lambda_tries: Annotated[int, typer.Option("--lambda-tries", help="FGVis: lambdas tried, dividing by 10 "
                            "(6: down to 1e-9, the reference's weight).")] = 6,
    bounds: Annotated[bool, typer.Option("--bounds/--no-bounds", help="FGVis: activation-bounded gradients "
                      "(the adversarial defense).")] = True,
    bound_activations: Annotated[str, typer.Option("--bound-activations", help="FGVis: which nonlinearities "
                                 "are bounded: relu (the reference's rule: ReLUs, in MetaFormers the ReLU inside "
                                 "StarReLU/SquaredReLU) or all (also GELU, SiLU, ...).")] = "relu",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples (images x lambdas) per batch.")] = 8,
    exponent: Annotated[float, typer.Option("--exponent", help="Display exponent of the FGVis mask.")] = 7.0,
    sanity: Annotated[bool, typer.Option("--sanity", help="Also run the cascading parameter randomisation "
                      "test and report Spearman correlations.")] = False,
    device: options.Device = options.DEFAULT_DEVICE,
    out: options.Out = options.DEFAULT_OUT,
    seed: options.Seed = options.DEFAULT_SEED,
) -> None:
    """Explain the models' decisions on the same images with FGVis and/or captum methods; one grid figure
    explain_<models>.pdf/.png, one .npz + .json per model and method. Finished results and FGVis partial
    runs are kept in --out, so a rerun with the same options resumes."""
    from hpx_analysis.errors import HpxError

    models = model or ["hpx_former_s18"]
    methods = method or ["fgvis"]
    from hpx_analysis.analyzers.attribution import METHODS, REFERENCES
    unknown = [m for m in methods if m not in METHODS]
    if unknown or reference not in REFERENCES:
        raise HpxError(f"unknown method {unknown[0]!r}; use {', '.join(METHODS)}" if unknown else
                       f"unknown reference {reference!r}; use {', '.join(REFERENCES)}")
    from hpx_analysis.analyzers.fgvis import BOUND_ACTIVATIONS
    if bound_activations not in BOUND_ACTIVATIONS:
        raise HpxError(f"unknown --bound-activations {bound_activations!r}; use {', '.join(BOUND_ACTIVATIONS)}")

    from hpx_analysis.analyzers.attribution import AttributionResult, ExplanationResult, load_inputs
    from hpx_analysis.analyzers.attribution import explain as run_explain
    from hpx_analysis.analyzers.fgvis import FgvisResult, FgvisSettings
    from hpx_analysis.analyzers.sanity import SanityResult, sanity_check
    from hpx_analysis.devices import resolve_device
    from hpx_analysis.images import eval_transform, image_sources, model_mean_std
    from hpx_analysis.models.zoo import load_model, model_label
    from hpx_analysis.results import model_metadata
    from hpx_analysis.plotting.explain import plot_explanations, plot_sanity

    target_device = resolve_device(device)
    sources = image_sources(images, num_images, seed)
    settings = FgvisSettings(iterations=iterations, lambda_start=lambda_start, lambda_tries=lambda_tries,
                             reference=reference, bounded=bounds, bound_activations=bound_activations)
    folder = Path(out) / "explain"
    run_options = {"images": str(images) if images else "skimage samples", "num_images": num_images,
                   "size": size, "target": target, "reference": reference, "seed": seed, "weights": weights}
    results: List[ExplanationResult] = []
    for name in models:
        net = load_model(name, weights, seed=seed, device=target_device)
        mean, std = model_mean_std(net)
        transform, _ = eval_transform(net, size)
        inputs, names = load_inputs(sources, transform)
        inputs = inputs.to(target_device)
        # a retrained checkpoint at the same path must not reuse results: key on the file's content
        model_options = {"weights_sha256": model_metadata(net).get("weights_sha256"), "transform": str(transform)}
        for chosen in methods:
            stem = folder / options.safe_filename(f"{model_label(name)}_{chosen}")
            partial = stem.parent / f"{stem.name}.partial.npz"
            method_options = ({"settings": settings, "seed": seed, "partial": partial,
                               "progress": True} if chosen == "fgvis" else {"reference": reference})
            common = {"target": target, "mean": mean, "std": std, "names": names, "batch_size": batch_size}
            result_type = FgvisResult if chosen == "fgvis" else AttributionResult
            wanted = _jsonable({**run_options, **model_options,
                                **({"fgvis": settings.__dict__} if chosen == "fgvis" else {})})
            result = _cached(stem, result_type, wanted, lambda: run_explain(net, inputs, chosen, **common,
                                                                            **method_options))
            partial.unlink(missing_ok=True)
            results.append(result)
            _report(name, chosen, result)
            if sanity:
                sanity_stem = folder / options.safe_filename(f"sanity_{model_label(name)}_{chosen}")
                check = _cached(sanity_stem, SanityResult, wanted, lambda: sanity_check(
                    net, inputs, chosen, init_seed=seed + 1, **common,
                    **{k: v for k, v in method_options.items() if k not in ("partial", "progress")}))
                plot_sanity(check, sanity_stem, {"options": run_options})
                _report_sanity(name, chosen, check)
    figure = folder / options.safe_filename("explain_" + "+".join(model_label(m) for m in models) + "_"
                                            + "+".join(methods))
    for path in plot_explanations(results, figure, exponent, {"options": run_options}):
        typer.echo(f"wrote {path}")


def _cached(stem: Path, result_type: type, wanted: object, compute: Callable[[], object]) -> object:
    """The result saved at ``stem`` when it was made with the same options, else ``compute()`` saved there."""
    if stem.with_suffix(".npz").is_file() and stem.with_suffix(".json").is_file():
        saved = result_type.load(stem)
        if saved.get("cli_options") == wanted:
            typer.echo(f"reusing {stem.with_suffix('.npz')}")
            return saved
    result = compute()
    result.meta["cli_options"] = wanted
    result.save(stem)
    return result


def _jsonable(value: object) -> object:
    import json
    from hpx_analysis.results import to_jsonable
    return json.loads(json.dumps(to_jsonable(value)))


def _report(model: str, method: str, result: object) -> None:
    from hpx_analysis.models.zoo import model_label
    if method != "fgvis":
        return
    fgvis_options = result.meta["options"]
    typer.echo(f"{model_label(model)} fgvis: gradients bounded at {fgvis_options['bounded_activations']} activation "
               f"layers ({fgvis_options['bound_activations']} rule)" if fgvis_options["bounded"] else
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
