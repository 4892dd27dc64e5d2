"""Explanations of a classifier's decision per input pixel: captum's attribution methods and FGVis.

Every method returns an :class:`ExplanationResult` with the same two arrays, so explanations of the
same images by different methods and models compare directly:

* ``inputs`` (N, 3, H, W): the images as RGB in [0, 1];
* ``maps`` (N, H, W): non-negative relevance per pixel (larger = more important for the class).

Per-pixel maps: saliency ``max_c |dy/dx|``; integrated gradients ``|sum_c attr|``; occlusion
``max(mean_c attr, 0)`` (the class-score drop when a patch is replaced by the reference); Grad-CAM on
the last stage (``inspection.feature_layer``), ReLU'd and bilinearly upsampled; FGVis the deleted
amount ``mean_c (1 - m)`` (see :mod:`hpx_analysis.analyzers.fgvis`).

Each method registers itself by name in :mod:`hpx_analysis.analyzers.methods`, which also holds the
pieces they share; this module registers the captum methods, imports :mod:`~hpx_analysis.analyzers.fgvis`
so that it registers too, and :func:`explain` dispatches by name.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..engine import Batch, ImageDataset, ItemOutput, collate_skipping, run_batches
from ..errors import HpxError
from ..results import model_metadata
from . import fgvis as _fgvis  # noqa: F401  (registers the "fgvis" method)
from .methods import (REFERENCES, ExplanationResult, batch_target, explanation_method, predict, reference_image,
                      register_method, registered_methods, resolve_targets, to_rgb)

CAPTUM_METHODS = ("saliency", "integrated-gradients", "occlusion", "gradcam")


class AttributionResult(ExplanationResult):
    """A captum attribution: adds ``attributions`` (N, C, H, W) as captum returned them (C = 1 for Grad-CAM)."""

    kind = "attribution"


def load_inputs(sources: Sequence[Any], transform: Callable[[Any], Tensor]) -> Tuple[Tensor, List[str]]:
    """Read ``images.ImageSource`` objects into a normalised batch (N, 3, H, W); unreadable files are
    skipped (their names are left out of the returned list).

    transform: RGB PIL image -> normalised (3, H, W), e.g. the model's evaluation transform
    (``images.eval_transform``: resize the shorter side, centre crop).
    """
    dataset = ImageDataset(sources, transform)
    batch = collate_skipping([dataset[i] for i in range(len(dataset))])
    if not len(batch.indices):
        raise HpxError("none of the input images could be read")
    return batch.images, [dataset.name(i) for i in batch.indices.tolist()]


def _grad_cam_layer(model: nn.Module) -> Tuple[str, nn.Module]:
    from ..inspection import feature_layer
    try:
        path = feature_layer(model)
    except ValueError as err:
        raise HpxError(f"gradcam: {err}") from None
    return path, model.get_submodule(path)


def _attribution_maps(method: str, attributions: Tensor) -> Tensor:
    """Per-pixel relevance (B, H, W) from captum's attributions (B, C, H, W) (module docstring)."""
    if method == "saliency":
        return attributions.amax(1)
    if method == "integrated-gradients":
        return attributions.sum(1).abs()
    if method == "occlusion":
        return attributions.mean(1).clamp(min=0)
    return attributions[:, 0].clamp(min=0)


def attribute(model: nn.Module, images: Tensor, method: str, *, target: Optional[int | Sequence[int]] = None,
              reference: str = "black", mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
              names: Optional[Sequence[str]] = None, ig_steps: int = 32, occlusion_window: Optional[int] = None,
              batch_size: int = 8, resume_dir: Optional[Path | str] = None, progress: bool = False) -> AttributionResult:
    """A captum attribution of normalised ``images`` (N, 3, H, W) for ``target`` (default: top-1 class).

    method: saliency | integrated-gradients | occlusion | gradcam. Baselines for integrated gradients
    and occlusion are the ``reference`` image (see :func:`reference_image`). occlusion_window: patch
    side in pixels (default H/8, stride half of it). Grad-CAM uses the last stage's output.
    batch_size: images per engine batch (:func:`..engine.run_batches`); resume_dir: the run's state is
    kept under ``resume_dir/<run key>/``, so an interrupted run resumes and a finished one is reused.
    Under ``torch.distributed`` each rank explains every world-th batch; every rank returns the full result.
    """
    import captum.attr as ca
    from ..images import model_mean_std

    if method not in CAPTUM_METHODS:
        raise HpxError(f"unknown attribution method '{method}'; use one of {', '.join(CAPTUM_METHODS)}")
    if mean is None or std is None:
        mean, std = model_mean_std(model)
    count = len(images)
    batch_target(target, range(count), count)  # a wrong number of targets fails before any work
    height, width = images.shape[-2:]
    window = occlusion_window or max(1, height // 8)
    options: Dict[str, Any] = {"reference": reference}
    if method == "integrated-gradients":
        options["ig_steps"] = ig_steps
    if method == "occlusion":
        options.update(occlusion_window=window, occlusion_stride=max(1, window // 2))
    if method == "gradcam":
        options["layer"], layer = _grad_cam_layer(model)

    def step(batch: Batch) -> Dict[str, Tensor]:
        x = batch.images.to(images.device)
        t = resolve_targets(predict(model, x), batch_target(target, batch.indices.tolist(), count))
        baseline = reference_image(x, reference, mean, std)
        if method == "saliency":
            attr = ca.Saliency(model).attribute(x.detach().requires_grad_(), target=t, abs=True)
        elif method == "integrated-gradients":
            attr = ca.IntegratedGradients(model).attribute(x, baselines=baseline, target=t, n_steps=ig_steps,
                                                           internal_batch_size=batch_size * ig_steps)
        elif method == "occlusion":
            attr = ca.Occlusion(model).attribute(x, sliding_window_shapes=(3, window, window),
                                                 strides=(3, options["occlusion_stride"], options["occlusion_stride"]),
                                                 baselines=baseline, target=t, perturbations_per_eval=16)
        else:
            cam = ca.LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
            attr = ca.LayerAttribution.interpolate(cam, (height, width), interpolate_mode="bilinear")
        attr = attr.detach().float()
        return {"maps": _attribution_maps(method, attr), "attributions": attr, "targets": t}

    channels = 1 if method == "gradcam" else images.shape[1]
    outputs = {"maps": ItemOutput((height, width), "float32"),
               "attributions": ItemOutput((channels, height, width), "float32"), "targets": ItemOutput((), "int64")}
    identity = {"analysis": "attribution", "method": method, **options, "target": target, "mean": list(mean),
                "std": list(std)}
    run = run_batches(model, ImageDataset(images.detach().cpu()), step, outputs, batch_size=batch_size,
                      resume_dir=resume_dir, identity=identity, desc=method, progress=progress)
    return AttributionResult(
        arrays={"maps": run.arrays["maps"], "inputs": to_rgb(images, mean, std),
                "attributions": run.arrays["attributions"]},
        meta={"method": method, "model": model_metadata(model),
              "images": list(names) if names is not None else [str(i) for i in range(count)],
              "targets": run.arrays["targets"].tolist(), "options": {**options, **run.counts, "run_key": run.key}})


for _name in CAPTUM_METHODS:
    register_method(_name)(partial(attribute, method=_name))

METHODS = registered_methods()
"""Every explanation method by name: "fgvis" and the captum methods."""


def explain(model: nn.Module, images: Tensor, method: str, **options: Any) -> ExplanationResult:
    """Run the registered ``method`` (see ``METHODS``) on normalised ``images`` (N, 3, H, W): FGVis
    (:func:`hpx_analysis.analyzers.fgvis.fgvis`) or :func:`attribute` (same keyword options)."""
    return explanation_method(method)(model, images, **options)


__all__ = ["METHODS", "CAPTUM_METHODS", "REFERENCES", "ExplanationResult", "AttributionResult",
           "reference_image", "to_rgb", "load_inputs", "predict", "resolve_targets", "attribute", "explain"]
