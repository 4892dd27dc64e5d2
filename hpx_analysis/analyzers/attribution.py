"""Explanations of a classifier's decision per input pixel: captum's attribution methods and FGVis.

Every method returns an :class:`ExplanationResult` with the same two arrays, so explanations of the
same images by different methods and models compare directly:

* ``inputs`` (N, 3, H, W): the images as RGB in [0, 1];
* ``maps`` (N, H, W): non-negative relevance per pixel (larger = more important for the class).

Per-pixel maps: saliency ``max_c |dy/dx|``; integrated gradients ``|sum_c attr|``; occlusion
``max(mean_c attr, 0)`` (the class-score drop when a patch is replaced by the reference); Grad-CAM on
the last stage (``inspection.feature_layer``), ReLU'd and bilinearly upsampled; FGVis the deleted
amount ``mean_c (1 - m)`` (see :mod:`hpx_analysis.analyzers.fgvis`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import HpxError
from ..results import Result, model_metadata

METHODS = ("fgvis", "saliency", "integrated-gradients", "occlusion", "gradcam")
CAPTUM_METHODS = METHODS[1:]
REFERENCES = ("black", "blur", "mean")
BLUR_SIGMA = 10.0


class ExplanationResult(Result):
    """Relevance maps of one method and model: ``maps`` (N, H, W), ``inputs`` (N, 3, H, W) RGB in [0, 1].

    meta: ``method``, ``model``, ``images`` (names), ``targets`` (explained class per image), ``options``.
    """

    kind = "explanation"

    @property
    def maps(self) -> np.ndarray:
        return self.arrays["maps"]

    @property
    def inputs(self) -> np.ndarray:
        return self.arrays["inputs"]

    @property
    def method(self) -> str:
        return self.meta["method"]


class AttributionResult(ExplanationResult):
    """A captum attribution: adds ``attributions`` (N, C, H, W) as captum returned them (C = 1 for Grad-CAM)."""

    kind = "attribution"


def reference_image(images: Tensor, kind: str, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The "deleted" image r for normalised ``images`` (N, 3, H, W), same shape.

    black: a black image through the same normalisation; blur: each image Gaussian-blurred (sigma
    ``BLUR_SIGMA`` pixels); mean: the dataset mean, i.e. zero after normalisation.
    """
    if kind == "black":
        from ..images import normalise
        return normalise(torch.zeros_like(images), mean, std)
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur
        radius = int(min(3 * BLUR_SIGMA, (min(images.shape[-2:]) - 1) // 2))
        return gaussian_blur(images, kernel_size=[2 * radius + 1] * 2, sigma=[BLUR_SIGMA] * 2)
    if kind == "mean":
        return torch.zeros_like(images)
    raise HpxError(f"unknown reference '{kind}'; use one of {', '.join(REFERENCES)}")


def to_rgb(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation: (N, 3, H, W) -> RGB float32 in [0, 1]."""
    mean_t = torch.tensor(mean, device=images.device)[:, None, None]
    std_t = torch.tensor(std, device=images.device)[:, None, None]
    return (images.detach() * std_t + mean_t).clamp(0, 1).float().cpu().numpy()


def load_inputs(sources: Sequence[Any], transform: Callable[[Any], Tensor]) -> Tuple[Tensor, List[str]]:
    """Read ``images.ImageSource`` objects into a normalised batch (N, 3, H, W); unreadable files are
    skipped (their names are left out of the returned list).

    transform: RGB PIL image -> normalised (3, H, W), e.g. the model's evaluation transform
    (``truncation.eval_transform``: resize the shorter side, centre crop).
    """
    from ..images import read_rgb

    tensors, names = [], []
    for source in sources:
        image = read_rgb(source)
        if image is not None:
            tensors.append(transform(image))
            names.append(source.name)
    if not tensors:
        raise HpxError("none of the input images could be read")
    return torch.stack(tensors), names


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 16) -> Tensor:
    """Softmax probabilities (N, classes) of the clean images."""
    return torch.cat([model(chunk).softmax(-1) for chunk in images.split(batch_size)])


def resolve_targets(probs: Tensor, target: Optional[int | Sequence[int]]) -> Tensor:
    """Class per image (N,) from clean probabilities (N, classes): ``target`` (one for all, or one each)
    or the top-1 prediction."""
    if target is None:
        return probs.argmax(-1)
    targets = torch.as_tensor([target] * len(probs) if isinstance(target, int) else list(target),
                              device=probs.device)
    if len(targets) != len(probs) or targets.min() < 0 or targets.max() >= probs.shape[-1]:
        raise HpxError(f"target must be one class index in [0, {probs.shape[-1]}) or one per image")
    return targets


def _grad_cam_layer(model: nn.Module) -> Tuple[str, nn.Module]:
    from ..inspection import feature_layer
    try:
        path = feature_layer(model)
    except ValueError as err:
        raise HpxError(f"gradcam: {err}") from None
    return path, model.get_submodule(path)


def attribute(model: nn.Module, images: Tensor, method: str, *, target: Optional[int | Sequence[int]] = None,
              reference: str = "black", mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
              names: Optional[Sequence[str]] = None, ig_steps: int = 32, occlusion_window: Optional[int] = None,
              batch_size: int = 8) -> AttributionResult:
    """A captum attribution of normalised ``images`` (N, 3, H, W) for ``target`` (default: top-1 class).

    method: saliency | integrated-gradients | occlusion | gradcam. Baselines for integrated gradients
    and occlusion are the ``reference`` image (see :func:`reference_image`). occlusion_window: patch
    side in pixels (default H/8, stride half of it). Grad-CAM uses the last stage's output.
    """
    import captum.attr as ca
    from ..images import model_mean_std

    if method not in CAPTUM_METHODS:
        raise HpxError(f"unknown attribution method '{method}'; use one of {', '.join(CAPTUM_METHODS)}")
    if mean is None or std is None:
        mean, std = model_mean_std(model)
    targets = resolve_targets(predict(model, images), target)
    height, width = images.shape[-2:]
    window = occlusion_window or max(1, height // 8)
    options: Dict[str, Any] = {"reference": reference}
    if method == "integrated-gradients":
        options["ig_steps"] = ig_steps
    if method == "occlusion":
        options.update(occlusion_window=window, occlusion_stride=max(1, window // 2))
    if method == "gradcam":
        options["layer"], layer = _grad_cam_layer(model)
    chunks = []
    for rows in torch.arange(len(images), device=images.device).split(batch_size):
        x, t = images[rows], targets[rows]
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
        chunks.append(attr.detach())
    attributions = torch.cat(chunks)
    maps = {"saliency": lambda a: a.amax(1), "integrated-gradients": lambda a: a.sum(1).abs(),
            "occlusion": lambda a: a.mean(1).clamp(min=0), "gradcam": lambda a: a[:, 0].clamp(min=0)}[method]
    model.zero_grad(set_to_none=True)
    return AttributionResult(
        arrays={"maps": maps(attributions).float().cpu().numpy(), "inputs": to_rgb(images, mean, std),
                "attributions": attributions.float().cpu().numpy()},
        meta={"method": method, "model": model_metadata(model),
              "images": list(names) if names is not None else [str(i) for i in range(len(images))],
              "targets": targets.tolist(), "options": options})


def explain(model: nn.Module, images: Tensor, method: str, **options: Any) -> ExplanationResult:
    """Dispatch to :func:`hpx_analysis.analyzers.fgvis.fgvis` or :func:`attribute` (same keyword options)."""
    if method == "fgvis":
        from .fgvis import fgvis
        return fgvis(model, images, **options)
    return attribute(model, images, method, **options)


__all__ = ["METHODS", "REFERENCES", "ExplanationResult", "AttributionResult", "reference_image", "to_rgb",
           "load_inputs", "predict", "resolve_targets", "attribute", "explain"]
