"""Learned long-filter kernels as pictures (paper Fig. 7, 11, 12).

HyenaPixel (2D) layers give one (S, S) panel per layer: the kernel reduced over channels and
normalised; SLaK / RepLKNet large kernels (``large_conv``) likewise, their effective single depthwise kernel
(K, K) (BN-fused sum of the branches; a cross for SLaK), read as a true convolution like HyenaPixel's. Hyena N-D
layers (``hyena_nd``) likewise, their kernel ``k / (2L)`` on a centred (2L-1) x (2L-1) canvas: one quadrant for
causal (offsets >= 0) and anti-causal blocks, the four flips mixed by ``linear_mix`` for ``4dir``.
Hyena (1D) layers run on the row-major flattened feature map, so their 2L-1 taps are
laid out on rows of width F around one evaluation pixel p; taps whose input pixel lies outside the
image for that p are flagged (``outside``): the layer does not use them at p.

Both filters are true convolutions, ``y[p] = sum_d K[c + d] x[p - d]`` (c the centre tap, d a 2D
offset or a 1D offset along the flattened sequence), so the tap of offset d weights input pixel
p - d. Every kind is drawn in one ``orientation``:

- ``kernel`` (default, as the paper's Fig. 11 and 12): the kernel array itself, tap c + d at p + d
  (2D: K as stored; 1D: the taps reshaped to rows of width F).
- ``response``: the weight each input pixel q gets in the output at p, tap c + d at q = p - d
  (2D: K point-reflected through its centre; 1D: the reshaped taps reversed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import HpxError
from ..inspection import MixerInfo, kernel, list_mixers, select_mixers
from ..layer_names import LayerLike, LayerRef
from ..models.zoo import default_input_size
from ..results import Result, model_metadata

REDUCTIONS = ("mean", "abs-mean", "top-k")
NORMALISATIONS = ("maxabs", "minmax", "none")
ORIENTATIONS = ("kernel", "response")
Reduction = Union[str, int]


@dataclass
class WrappedTaps:
    """A 1D kernel laid out on the feature map's rows, seen from one evaluation pixel.

    values: (R, W) tap weights, NaN where no tap lands; outside: (R, W) True for taps that land
    outside the image; first_row: image row of picture row 0 (negative: rows above the image).
    """

    values: np.ndarray
    outside: np.ndarray
    first_row: int


def check_pixel(position: Tuple[int, int], feature_size: Tuple[int, int]) -> Tuple[int, int]:
    """``position`` (row, col) if it lies on an (H, W) map, else HpxError."""
    (row, col), (height, width) = position, feature_size
    if not (0 <= row < height and 0 <= col < width):
        raise HpxError(f"position {row},{col} lies outside the {height}x{width} feature map")
    return row, col


def check_orientation(orientation: str) -> str:
    """``orientation`` if it is one of ORIENTATIONS, else HpxError."""
    if orientation not in ORIENTATIONS:
        raise HpxError(f"unknown orientation {orientation!r}; use {', '.join(ORIENTATIONS)}")
    return orientation


def wrap_taps(taps: np.ndarray, centre: int, feature_size: Tuple[int, int], position: Tuple[int, int],
              orientation: str = "response") -> WrappedTaps:
    """Place taps (T,) of a 1D filter over an (H, W) map flattened row-major, seen from pixel ``position``.

    p = r*W + c. ``response`` (default): the tap at index ``centre + d`` sits on the pixel it weights,
    p - d (true convolution). ``kernel``: it sits at p + d (the kernel array laid out in rows).
    ``outside`` flags taps whose input pixel p - d is off the image. Picture cells before 0 or from
    H*W on continue the row-major grid above/below the image.
    """
    height, width = feature_size
    row, col = check_pixel(position, feature_size)
    evaluation = row * width + col
    offsets = np.arange(len(taps)) - centre
    source = evaluation - offsets
    placed = source if check_orientation(orientation) == "response" else evaluation + offsets
    first_row = int(np.floor(placed.min() / width))
    last_row = int(np.floor(placed.max() / width))
    values = np.full((last_row - first_row + 1, width), np.nan, dtype=np.float64)
    outside = np.zeros(values.shape, dtype=bool)
    local = placed - first_row * width
    values.flat[local] = taps
    outside.flat[local] = (source < 0) | (source >= height * width)
    return WrappedTaps(values, outside, first_row)


def centre_pixel(feature_size: Tuple[int, int]) -> Tuple[int, int]:
    """The centre-most pixel (row, col) of an (H, W) map (the lower-right one of a central 2x2)."""
    return feature_size[0] // 2, feature_size[1] // 2


def scaled_pixel(position: Tuple[int, int], reference: Tuple[int, int], feature_size: Tuple[int, int]
                 ) -> Tuple[int, int]:
    """The pixel of an (H, W) map at the same relative location as ``position`` on a ``reference`` map."""
    return tuple(p * n // r for p, r, n in zip(position, reference, feature_size))


def channel_energy(kernels: Tensor) -> Tensor:
    """Sum of squared weights per channel: (C, *S) -> (C,)."""
    return kernels.flatten(1).pow(2).sum(1)


def reduce_channels(kernels: Tensor, reduction: Reduction, top_k: int = 4) -> Tuple[Tensor, List[int]]:
    """(C, *S) -> (G, *S) panels and the channels shown (-1 for a reduction over all channels).

    reduction: ``mean``, ``abs-mean``, a channel index, or ``top-k`` (the top_k channels by energy).
    """
    channels = kernels.shape[0]
    if reduction == "mean":
        return kernels.mean(0, keepdim=True), [-1]
    if reduction == "abs-mean":
        return kernels.abs().mean(0, keepdim=True), [-1]
    if reduction == "top-k":
        chosen = torch.argsort(channel_energy(kernels), descending=True)[:max(1, top_k)].tolist()
        return kernels[chosen], chosen
    if isinstance(reduction, int) and not isinstance(reduction, bool):
        if not 0 <= reduction < channels:
            raise HpxError(f"channel {reduction} out of range: the layer has {channels} channels")
        return kernels[reduction:reduction + 1], [reduction]
    raise HpxError(f"unknown reduction {reduction!r}; use {', '.join(REDUCTIONS)} or a channel index")


def normalise(panels: Tensor, method: str) -> Tensor:
    """Per panel: ``maxabs`` to [-1, 1] (0 stays 0), ``minmax`` to [0, 1], ``none`` unchanged. (G, *S)."""
    flat = panels.flatten(1)
    if method == "maxabs":
        scale = flat.abs().amax(1).clamp_min(1e-12)
        return panels / scale.view(-1, *[1] * (panels.dim() - 1))
    if method == "minmax":
        low, high = flat.amin(1), flat.amax(1)
        shape = (-1, *[1] * (panels.dim() - 1))
        return (panels - low.view(shape)) / (high - low).clamp_min(1e-12).view(shape)
    if method == "none":
        return panels
    raise HpxError(f"unknown normalisation {method!r}; use {', '.join(NORMALISATIONS)}")


class KernelsResult(Result):
    """Plotted kernel panels per layer.

    arrays ``panels_<i>``: (G, R, W) per chosen layer i (in ``meta['layers']`` order), in the
    orientation ``meta['options']['orientation']``, NaN where no tap lands; ``outside_<i>``: (R, W)
    bool, taps whose input pixel is off the image (1D; all False for 2D);
    ``channels_<i>``: (G,) shown channels, -1 for a reduction over channels.
    """

    kind = "kernels"

    @property
    def layers(self) -> List[Dict[str, Any]]:
        """Per chosen layer: index, stage, block, name, path, kind, feature_size, kernel_size, first_row, position."""
        return self.meta["layers"]

    @property
    def orientation(self) -> str:
        """``kernel`` or ``response`` (module docstring): how every panel is laid out."""
        if "orientation" not in self.meta["options"]:
            raise HpxError("this kernels result predates panel orientations (its 2D and 1D panels were laid out "
                           "differently); rerun `hpx-analyze kernels` to recompute it")
        return self.meta["options"]["orientation"]

    def panels(self, i: int) -> np.ndarray:
        return self.arrays[f"panels_{i}"]

    def outside(self, i: int) -> np.ndarray:
        return self.arrays[f"outside_{i}"]

    def channels(self, i: int) -> np.ndarray:
        return self.arrays[f"channels_{i}"]


def select_layers(infos: List[MixerInfo], layers: Optional[Sequence[LayerLike]]) -> List[MixerInfo]:
    """The long-filter layers among a model's mixers ``infos`` at the stages / blocks ``layers``, numbered
    from 0 (:func:`select_mixers`), in the given order (all when None)."""
    if not any(info.long_filter is not None for info in infos):
        raise HpxError("the model has no long-filter layers (HyenaPixel, Hyena, SLaK / RepLKNet large kernels)")
    return select_mixers(infos, layers, long_filters_only=True)


def compute_kernels(model: nn.Module, *, reduction: Reduction = "mean", normalisation: str = "maxabs",
                    layers: Optional[Sequence[LayerLike]] = None, top_k: int = 4,
                    position: Optional[Tuple[int, int]] = None,
                    input_size: Optional[Union[int, Tuple[int, int]]] = None,
                    orientation: str = "kernel") -> KernelsResult:
    """Reduced, normalised kernels of the model's long-filter layers, ready to plot.

    layers: stages / blocks numbered from 0 (``LayerRef(1, 0)``, ``(1, 0)``, ``1`` for a whole stage, or
    ``"S2 B1"``; :meth:`LayerRef.of`), default all. position: evaluation pixel (row, col) of the
    1D layers' wrap-around on the largest chosen 1D map, moved to the same relative location on
    smaller maps (default: each map's centre-most pixel).
    input_size: resolution giving the feature-map size F (default the model's training resolution).
    orientation: ``kernel`` (the kernel array, tap c + d at p + d) or ``response`` (the weight of each
    input pixel at p, tap c + d at p - d), the same for 2D and 1D layers (module docstring).
    """
    check_orientation(orientation)
    size = input_size if input_size is not None else default_input_size(model)
    chosen = select_layers(list_mixers(model, size), layers)
    sizes_1d = [tuple(info.feature_size) for info in chosen if info.long_filter.on_sequence]
    reference = max(sizes_1d, key=lambda hw: hw[0] * hw[1]) if sizes_1d else None
    arrays: Dict[str, np.ndarray] = {}
    described = []
    for i, info in enumerate(chosen):
        panels, shown = reduce_channels(kernel(info).float().cpu(), reduction, top_k)
        panels = normalise(panels, normalisation).double().numpy()
        entry = {"index": info.index, "stage": info.stage, "block": info.block, "name": info.name,
                 "path": info.path, "kind": info.kind, "feature_size": list(info.feature_size),
                 "kernel_size": list(info.kernel_size), "first_row": 0, "position": None}
        if info.long_filter.on_sequence:  # taps along the flattened map, wrapped onto its rows
            if position is None:
                pixel = centre_pixel(info.feature_size)
            else:
                pixel = scaled_pixel(check_pixel(position, reference), reference, info.feature_size)
            centre = info.long_filter.centre[0]
            wrapped = [wrap_taps(p, centre, info.feature_size, pixel, orientation) for p in panels]
            panels = np.stack([w.values for w in wrapped])
            arrays[f"outside_{i}"] = wrapped[0].outside
            entry.update(first_row=wrapped[0].first_row, position=list(pixel))
        else:
            if orientation == "response":
                panels = np.flip(panels, axis=(-2, -1)).copy()   # weight of input p - d sits at p - d
            arrays[f"outside_{i}"] = np.zeros(panels.shape[1:], dtype=bool)
        arrays[f"panels_{i}"] = panels
        arrays[f"channels_{i}"] = np.asarray(shown, dtype=np.int64)
        described.append(entry)
    meta = {"model": model_metadata(model), "input_size": list(np.broadcast_to(size, (2,)).tolist()),
            "options": {"reduction": reduction, "normalisation": normalisation, "top_k": top_k,
                        "layers": [str(LayerRef.of(ref)) for ref in layers] if layers is not None else None,
                        "position": list(position) if position is not None else None,
                        "orientation": orientation},
            "layers": described}
    return KernelsResult(arrays=arrays, meta=meta)
