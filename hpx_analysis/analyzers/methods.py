"""What every explanation method shares, and the registry that names them.

An explanation method is a function ``method(model, images, **options) -> ExplanationResult`` of a
classifier and normalised images (N, 3, H, W); it registers itself under its name with
:func:`register_method`, and :func:`explanation_method` looks it up. This module imports no other
analyzer, so the imports stay acyclic: ``methods`` <- ``fgvis`` <- ``attribution`` (the captum
methods, which also imports ``fgvis`` so that it is registered, and
:func:`~hpx_analysis.analyzers.attribution.explain`, which dispatches by name) <- ``sanity``.

Shared pieces: the result type (:class:`ExplanationResult`: ``maps`` (N, H, W) non-negative relevance,
``inputs`` (N, 3, H, W) RGB in [0, 1]), the reference ("deleted") image, the undoing of the
normalisation, the clean prediction and the explained class per image.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import HpxError
from ..results import Result

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


__all__ = ["REFERENCES", "BLUR_SIGMA", "ExplanationResult", "ExplanationMethod", "register_method",
           "registered_methods", "explanation_method", "reference_image", "to_rgb", "predict", "resolve_targets",
           "batch_target"]
