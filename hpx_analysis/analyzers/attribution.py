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
pieces they share and the skeleton every method runs in (:func:`~hpx_analysis.analyzers.methods.run_explanation`);
this module registers the captum methods, one :class:`CaptumExplainer` each (how captum attributes a batch,
how its attributions become maps), imports :mod:`~hpx_analysis.analyzers.fgvis` so that it registers too,
and :func:`explain` dispatches by name.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch import Tensor, nn

from ..engine import ImageDataset, ItemOutput, RunOutputs, collate_skipping
from ..errors import HpxError
from . import fgvis as _fgvis  # noqa: F401  (registers the "fgvis" method)
from .methods import (REFERENCES, ExplanationBatch, Explainer, ExplanationResult, explanation_method, predict,
                      reference_image, register_method, registered_methods, resolve_targets, run_explanation, to_rgb)


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


@dataclass(frozen=True)
class CaptumSettings:
    """The captum methods' options, each method reading its own: ``reference``, the baseline image of integrated
    gradients and occlusion (:func:`reference_image`); ``ig_steps``; ``occlusion_window``, the patch side in
    pixels (None: H/8, stride half of it)."""

    reference: str = "black"
    ig_steps: int = 32
    occlusion_window: Optional[int] = None


class CaptumExplainer(Explainer):
    """One captum method: a subclass says how captum attributes a batch (:meth:`attribution`) and how its
    attributions become per-pixel maps (:meth:`to_maps`); the step keeps both."""

    name: ClassVar[str]
    channels: ClassVar[int] = 3
    """Channels C of the attributions (N, C, H, W)."""
    result_type = AttributionResult

    def __init__(self, model: nn.Module, size: Tuple[int, int], settings: CaptumSettings) -> None:
        super().__init__(self.name, {"reference": settings.reference, **self.configure(model, size, settings)},
                         {"attributions": ItemOutput((self.channels, *size), "float32")})

    def configure(self, model: nn.Module, size: Tuple[int, int], settings: CaptumSettings) -> Dict[str, Any]:
        """The method's own options for ``model`` and images of ``size`` (H, W), besides the reference."""
        return {}

    @abstractmethod
    def attribution(self, batch: ExplanationBatch) -> Tensor:
        """captum's attributions (B, C, H, W) of the batch for its targets."""

    @staticmethod
    @abstractmethod
    def to_maps(attributions: Tensor) -> Tensor:
        """Per-pixel relevance (B, H, W) from attributions (B, C, H, W)."""

    def step(self, batch: ExplanationBatch) -> Dict[str, Tensor]:
        attributions = self.attribution(batch).detach().float()
        return {"maps": self.to_maps(attributions), "attributions": attributions}

    def finish(self, run: RunOutputs) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        return {"attributions": run.arrays["attributions"]}, {}


class Saliency(CaptumExplainer):
    """Input gradients; map ``max_c |dy/dx|``."""

    name = "saliency"

    def attribution(self, batch: ExplanationBatch) -> Tensor:
        import captum.attr as ca
        return ca.Saliency(batch.model).attribute(batch.images.detach().requires_grad_(), target=batch.targets,
                                                  abs=True)

    @staticmethod
    def to_maps(attributions: Tensor) -> Tensor:
        return attributions.amax(1)


class IntegratedGradients(CaptumExplainer):
    """Integrated gradients from the reference image, all steps in one pass; map ``|sum_c attr|``."""

    name = "integrated-gradients"

    def configure(self, model: nn.Module, size: Tuple[int, int], settings: CaptumSettings) -> Dict[str, Any]:
        return {"ig_steps": settings.ig_steps}

    def attribution(self, batch: ExplanationBatch) -> Tensor:
        import captum.attr as ca
        steps = self.options["ig_steps"]
        return ca.IntegratedGradients(batch.model).attribute(
            batch.images, baselines=batch.reference(self.options["reference"]), target=batch.targets, n_steps=steps,
            internal_batch_size=len(batch.images) * steps)

    @staticmethod
    def to_maps(attributions: Tensor) -> Tensor:
        return attributions.sum(1).abs()


class Occlusion(CaptumExplainer):
    """Class-score drop when a square patch is replaced by the reference; map ``max(mean_c attr, 0)``."""

    name = "occlusion"

    def configure(self, model: nn.Module, size: Tuple[int, int], settings: CaptumSettings) -> Dict[str, Any]:
        window = settings.occlusion_window or max(1, size[0] // 8)
        return {"occlusion_window": window, "occlusion_stride": max(1, window // 2)}

    def attribution(self, batch: ExplanationBatch) -> Tensor:
        import captum.attr as ca
        window, stride = self.options["occlusion_window"], self.options["occlusion_stride"]
        return ca.Occlusion(batch.model).attribute(
            batch.images, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
            baselines=batch.reference(self.options["reference"]), target=batch.targets, perturbations_per_eval=16)

    @staticmethod
    def to_maps(attributions: Tensor) -> Tensor:
        return attributions.mean(1).clamp(min=0)


class GradCam(CaptumExplainer):
    """Grad-CAM on the last stage's output (``inspection.feature_layer``), bilinearly upsampled; map its ReLU."""

    name = "gradcam"
    channels = 1

    def configure(self, model: nn.Module, size: Tuple[int, int], settings: CaptumSettings) -> Dict[str, Any]:
        from ..inspection import feature_layer
        try:
            return {"layer": feature_layer(model)}
        except ValueError as err:
            raise HpxError(f"gradcam: {err}") from None

    def attribution(self, batch: ExplanationBatch) -> Tensor:
        import captum.attr as ca
        layer = batch.model.get_submodule(self.options["layer"])
        cam = ca.LayerGradCam(batch.model, layer).attribute(batch.images, target=batch.targets,
                                                            relu_attributions=True)
        return ca.LayerAttribution.interpolate(cam, tuple(batch.images.shape[-2:]), interpolate_mode="bilinear")

    @staticmethod
    def to_maps(attributions: Tensor) -> Tensor:
        return attributions[:, 0].clamp(min=0)


CAPTUM_EXPLAINERS: Dict[str, type[CaptumExplainer]] = {
    cls.name: cls for cls in (Saliency, IntegratedGradients, Occlusion, GradCam)}
CAPTUM_METHODS = tuple(CAPTUM_EXPLAINERS)


def attribute(model: nn.Module, images: Tensor, method: str, *, target: Optional[int | Sequence[int]] = None,
              reference: str = "black", mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
              names: Optional[Sequence[str]] = None, ig_steps: int = 32, occlusion_window: Optional[int] = None,
              batch_size: int = 8, resume_dir: Optional[Path | str] = None, progress: bool = False) -> AttributionResult:
    """A captum attribution of normalised ``images`` (N, 3, H, W) for ``target`` (default: top-1 class).

    method: saliency | integrated-gradients | occlusion | gradcam (``CAPTUM_EXPLAINERS``). Baselines for
    integrated gradients and occlusion are the ``reference`` image (see :func:`reference_image`).
    occlusion_window: patch side in pixels (default H/8, stride half of it). Grad-CAM uses the last stage's
    output. The other options are :func:`~hpx_analysis.analyzers.methods.run_explanation`'s (batches, resume,
    device, torchrun).
    """
    if method not in CAPTUM_EXPLAINERS:
        raise HpxError(f"unknown attribution method '{method}'; use one of {', '.join(CAPTUM_METHODS)}")
    explainer = CAPTUM_EXPLAINERS[method](model, tuple(images.shape[-2:]),
                                          CaptumSettings(reference, ig_steps, occlusion_window))
    return run_explanation(model, images, explainer, target=target, mean=mean, std=std, names=names,
                           batch_size=batch_size, resume_dir=resume_dir, progress=progress)


for _name in CAPTUM_METHODS:
    register_method(_name)(partial(attribute, method=_name))

METHODS = registered_methods()
"""Every explanation method by name: "fgvis" and the captum methods."""


def explain(model: nn.Module, images: Tensor, method: str, **options: Any) -> ExplanationResult:
    """Run the registered ``method`` (see ``METHODS``) on normalised ``images`` (N, 3, H, W): FGVis
    (:func:`hpx_analysis.analyzers.fgvis.fgvis`) or :func:`attribute` (same keyword options)."""
    return explanation_method(method)(model, images, **options)


__all__ = ["METHODS", "CAPTUM_METHODS", "CAPTUM_EXPLAINERS", "REFERENCES", "ExplanationResult", "AttributionResult",
           "CaptumSettings", "CaptumExplainer", "reference_image", "to_rgb", "load_inputs", "predict",
           "resolve_targets", "attribute", "explain"]
