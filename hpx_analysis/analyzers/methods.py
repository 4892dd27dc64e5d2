"""What every explanation method shares, and the registry that names them.

An explanation method is a function ``method(model, images, **options) -> ExplanationResult`` of a
classifier and normalised images (N, 3, H, W); it registers itself under its name with
:func:`register_method`, and :func:`explanation_method` looks it up. This module imports no other
analyzer, so the imports stay acyclic: ``methods`` <- ``fgvis`` <- ``attribution`` (the captum
methods, which also imports ``fgvis`` so that it is registered, and
:func:`~hpx_analysis.analyzers.attribution.explain`, which dispatches by name) <- ``sanity``.

The skeleton of every method is :func:`run_explanation`, as pytorch-grad-cam's ``BaseCAM`` is the skeleton
of its CAMs: it owns the normalisation default, the target checks, the run layer
(:func:`hpx_analysis.engine.run_batches`: batches, resume, torchrun), the device (the model's) and the
result; a method supplies only an :class:`Explainer`, its step per batch. A method that is a step alone
registers with :func:`register_step`.

Shared pieces: the result type (:class:`ExplanationResult`: ``maps`` (N, H, W) non-negative relevance,
``inputs`` (N, 3, H, W) RGB in [0, 1]), the reference ("deleted") image, the undoing of the
normalisation, the clean prediction and the explained class per image.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import (Any, Callable, ClassVar, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple, Type,
                    TypeVar)

import numpy as np
import torch
from torch import Tensor, nn

from ..devices import model_placement
from ..engine import Batch, ImageDataset, ItemOutput, RunOutputs, run_batches
from ..errors import HpxError
from ..provenance import function_fingerprint
from ..results import ArrayField, Result, model_metadata

REFERENCES = ("black", "blur", "mean")
BLUR_SIGMA = 10.0


class ExplanationResult(Result):
    """Relevance maps of one method and model: ``maps`` (N, H, W), ``inputs`` (N, 3, H, W) RGB in [0, 1].

    meta: ``method``, ``model``, ``images`` (names), ``targets`` (explained class per image), ``options``.
    """

    kind = "explanation"

    maps = ArrayField()
    inputs = ArrayField()

    @property
    def method(self) -> str:
        return self.meta["method"]


ExplanationMethod = Callable[..., ExplanationResult]
"""``method(model, images, **options)``: explain normalised ``images`` (N, 3, H, W)."""

Method = TypeVar("Method", bound=ExplanationMethod)

_REGISTRY: Dict[str, ExplanationMethod] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    """``@register_method(name)``: list a method under ``name`` (each name once); returns it unchanged."""
    def register(method: Method) -> Method:
        if name in _REGISTRY:
            raise ValueError(f"explanation method '{name}' is already registered")
        _REGISTRY[name] = method
        return method
    return register


def registered_methods() -> Tuple[str, ...]:
    """Names of the registered methods, in registration order."""
    return tuple(_REGISTRY)


def explanation_method(name: str) -> ExplanationMethod:
    """The method registered under ``name``."""
    if name not in _REGISTRY:
        raise HpxError(f"unknown explanation method '{name}'; use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


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


def batch_target(target: Optional[int | Sequence[int]], indices: Sequence[int],
                 count: int) -> Optional[int | List[int]]:
    """The ``target`` option of :func:`resolve_targets` for the images at dataset ``indices`` of ``count``:
    None and one class for all pass through, one class per image is indexed."""
    if target is None or isinstance(target, int):
        return target
    targets = list(target)
    if len(targets) != count:
        raise HpxError(f"target must be one class index or one per image: got {len(targets)} for {count} images")
    return [int(targets[i]) for i in indices]


def to_model(model: nn.Module, images: Tensor) -> Tensor:
    """``images`` (N, 3, H, W) on the device and in the dtype of the model's parameters."""
    return images.to(*model_placement(model))


@dataclass
class ExplanationBatch:
    """One engine batch as a method's step sees it.

    images (B, 3, H, W): normalised, on the model's device and in its dtype; probs (B, classes): softmax of the
    clean images; targets (B,): the class explained per image; indices: each image's index in the inputs;
    mean, std: the normalisation.
    """

    model: nn.Module
    images: Tensor
    probs: Tensor
    targets: Tensor
    indices: List[int]
    mean: Sequence[float]
    std: Sequence[float]

    def reference(self, kind: str) -> Tensor:
        """The reference image (B, 3, H, W) of each image (:func:`reference_image`)."""
        return reference_image(self.images, kind, self.mean, self.std)


class Explainer(ABC):
    """One method's part of :func:`run_explanation` (what a ``BaseCAM`` subclass adds in pytorch-grad-cam): its
    :meth:`step` per batch and, where it needs them, the other hooks.

    method: the registered name; options: every option of the method that shapes its outputs (in the run key
    and saved as ``meta["options"]``); outputs: the engine outputs the step returns besides ``maps`` (H, W).
    """

    result_type: ClassVar[Type[ExplanationResult]] = ExplanationResult

    def __init__(self, method: str, options: Optional[Mapping[str, Any]] = None,
                 outputs: Optional[Mapping[str, ItemOutput]] = None) -> None:
        self.method, self.options, self.outputs = method, dict(options or {}), dict(outputs or {})

    @abstractmethod
    def step(self, batch: ExplanationBatch) -> Mapping[str, Tensor]:
        """The batch's ``maps`` (B, H, W), non-negative, and each of ``outputs`` (B, *shape)."""

    def keyed(self) -> Dict[str, Any]:
        """What the outputs depend on besides the options, for the run key only (default nothing)."""
        return {}

    def clean_pass(self) -> ContextManager[None]:
        """Context of each batch's clean forward pass, the one that predicts ``probs`` (default none)."""
        return contextlib.nullcontext()

    def finish(self, run: RunOutputs) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        """Arrays and metadata the result adds to the shared ones, from the finished run (default none)."""
        return {}, {}


ExplanationStep = Callable[[ExplanationBatch], Mapping[str, Tensor]]
"""``step(batch) -> {"maps": (B, H, W)}``: a method given by its step alone (:func:`register_step`)."""


class StepExplainer(Explainer):
    """The explainer of a method given by its step alone: no options, maps only; the step's code is in the run key
    (it lives outside the package, whose code the key holds anyway)."""

    def __init__(self, method: str, step: ExplanationStep) -> None:
        super().__init__(method)
        self._step = step

    def step(self, batch: ExplanationBatch) -> Mapping[str, Tensor]:
        return self._step(batch)

    def keyed(self) -> Dict[str, Any]:
        return {"step": function_fingerprint(self._step)}


def run_explanation(model: nn.Module, images: Tensor, explainer: Explainer, *,
                    target: Optional[int | Sequence[int]] = None, mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None, names: Optional[Sequence[str]] = None, batch_size: int = 8,
                    resume_dir: Optional[Path | str] = None, progress: bool = False) -> ExplanationResult:
    """Explain normalised ``images`` (N, 3, H, W) with ``explainer``'s step, in engine batches.

    target: the class explained, one for all or one per image (default: the top-1 of each clean image).
    mean, std: the normalisation (default the model's). names: one per image (default "0", "1", ...).
    batch_size: images per engine batch (:func:`..engine.run_batches`); resume_dir: the run's state is kept
    under ``resume_dir/<run key>/``, so an interrupted run resumes and a finished one is reused. Each batch
    runs on the model's device and in its dtype (:func:`to_model`). Under ``torch.distributed`` each rank
    explains every world-th batch; every rank returns the full result: ``explainer.result_type`` with
    ``maps`` (N, H, W) and ``inputs`` (N, 3, H, W) RGB, meta ``method``, ``model``, ``images``, ``targets``
    and ``options`` (the explainer's, the run's batch counts and ``run_key``).
    """
    from ..images import model_mean_std

    if mean is None or std is None:
        mean, std = model_mean_std(model)
    count = len(images)
    batch_target(target, range(count), count)  # a wrong number of targets fails before any work

    def step(batch: Batch) -> Dict[str, Tensor]:
        x, indices = to_model(model, batch.images), batch.indices.tolist()
        with explainer.clean_pass():
            probs = predict(model, x, batch_size)
        targets = resolve_targets(probs, batch_target(target, indices, count))
        return {**explainer.step(ExplanationBatch(model, x, probs, targets, indices, mean, std)), "targets": targets}

    outputs = {"maps": ItemOutput(tuple(images.shape[-2:]), "float32"), **explainer.outputs,
               "targets": ItemOutput((), "int64")}
    identity = {"analysis": "explanation", "method": explainer.method, **explainer.options, **explainer.keyed(),
                "target": target, "mean": list(mean), "std": list(std)}
    run = run_batches(model, ImageDataset(images.detach().cpu()), step, outputs, batch_size=batch_size,
                      resume_dir=resume_dir, identity=identity, desc=explainer.method, progress=progress)
    arrays, meta = explainer.finish(run)
    return explainer.result_type(
        arrays={"maps": run.arrays["maps"], "inputs": to_rgb(images, mean, std), **arrays},
        meta={"method": explainer.method, "model": model_metadata(model),
              "images": list(names) if names is not None else [str(i) for i in range(count)],
              "targets": run.arrays["targets"].tolist(), **meta,
              "options": {**explainer.options, **run.counts, "run_key": run.key}})


def register_step(name: str) -> Callable[[ExplanationStep], ExplanationStep]:
    """``@register_step(name)``: register a method given by its step alone, ``step(batch) -> {"maps": (B, H, W)}``
    (:class:`ExplanationBatch`); ``explain(model, images, name, **options)`` runs it through
    :func:`run_explanation` with its options. Returns the step unchanged. The run key holds the step's code
    (:func:`..provenance.function_fingerprint`), so an edited step is computed afresh."""
    def register(step: ExplanationStep) -> ExplanationStep:
        register_method(name)(partial(run_explanation, explainer=StepExplainer(name, step)))
        return step
    return register


__all__ = ["REFERENCES", "BLUR_SIGMA", "ExplanationResult", "ExplanationMethod", "register_method",
           "registered_methods", "explanation_method", "reference_image", "to_rgb", "predict", "resolve_targets",
           "batch_target", "to_model", "ExplanationBatch", "Explainer", "ExplanationStep", "StepExplainer",
           "run_explanation", "register_step"]
