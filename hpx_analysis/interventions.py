"""Interventions: temporary edits of a model's kernels and weights, each undone exactly on exit.

- :func:`modify_kernels` applies a function to chosen layers' applied long kernels (the filters' kernel
  modifiers; a modified large-kernel block runs as one convolution with its effective kernel and bias).
- :func:`truncate_kernels` keeps only the taps of chosen layers within a relative size r of the feature map (the
  window truncation of the paper's Fig. 6), with the cut geometry :func:`relative_tap_distance`.
- :func:`cut_short_convs` keeps only the centre tap of chosen stages' short (5x5) depthwise kernels.

While a kernel edit is active the engine's run keys include the edited kernels, so no cached run of the unedited
model is served (:func:`hpx_analysis.engine.kernel_edits_digest`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, List, Sequence, Union

import torch
from torch import Tensor, nn

from .errors import HpxError
from .inspection import MixerInfo, list_mixers, long_filter, long_filter_layers, select_mixers
from .layer_names import GroupLike, LayerLike, group_refs
from .models.mixers import HyenaPixelMixer

SHAPES = ("disc", "square")
HB_CUTS = ("wrap", "offset")
TOLERANCE = 1e-9  # sizes given in decimals (0.3 = 0.30000000000000004) keep taps exactly on the border


LayerSelector = Union[None, Iterable[LayerLike], Callable[[MixerInfo], bool]]
"""Which layers: None (all long-filter layers), stages and blocks numbered from 0, or a predicate on MixerInfo."""


@contextlib.contextmanager
def modify_kernels(model: nn.Module, modifier: Callable[[Tensor, MixerInfo], Tensor],
                   layers: LayerSelector = None, input_size: Union[int, Sequence[int], None] = None
                   ) -> Iterator[List[MixerInfo]]:
    """Apply ``modifier(kernel, info) -> kernel`` to the long filters of the chosen layers inside the block.

    layers: None (all long-filter layers), stages and blocks numbered from 0 (``[LayerRef(2, 0)]``, ``[2]``
    for all of stage 3, ``[(2, 0)]``, ``["S3 B1"]``; :func:`select_mixers`), or a predicate on MixerInfo.
    input_size: resolution for ``info.feature_size`` (needed by size-dependent modifiers).
    Yields the modified layers. On exit every filter gets its previous modifier back, so the
    model computes exactly what it computed before; cached kernel FFTs are refreshed. A modified
    ``large_conv`` block runs as one convolution with its effective kernel and bias (its branches again on exit).
    """
    if callable(layers):
        chosen = [info for info in long_filter_layers(model, input_size) if layers(info)]
    else:
        chosen = select_mixers(list_mixers(model, input_size), layers, long_filters_only=True)
    previous = [(info.long_filter, info.long_filter.kernel_modifier) for info in chosen]
    try:
        for info in chosen:
            inner = info.long_filter.kernel_modifier

            def apply(k: Tensor, _info: MixerInfo = info, _inner=inner) -> Tensor:
                return modifier(_inner(k) if _inner is not None else k, _info)

            info.long_filter.kernel_modifier = apply
        yield chosen
    finally:
        for filt, old in previous:
            filt.kernel_modifier = old




@contextlib.contextmanager
def cut_short_convs(model: nn.Module, stages: Iterable[int]) -> Iterator[List[MixerInfo]]:
    """Inside the block the depthwise (short, 5x5) kernels (C, 1, k, k) of the HyenaPixel mixers in the
    0-based ``stages`` keep only their centre tap, so the gated short path only scales each channel;
    the long filters are untouched. Yields the cut layers; on exit the saved weights are copied back,
    bit for bit, also when the block raises."""
    wanted = set(stages)
    chosen = [info for info in list_mixers(model) if info.stage in wanted and isinstance(info.module, HyenaPixelMixer)]
    missing = wanted - {info.stage for info in chosen}
    if missing:
        raise HpxError(f"no HyenaPixel mixer in stage(s) {', '.join(str(stage + 1) for stage in sorted(missing))}")
    convs = [info.module.depthwise_conv for info in chosen]
    saved = [conv.weight.detach().clone() for conv in convs]
    try:
        with torch.no_grad():
            for conv in convs:
                off_centre = torch.ones_like(conv.weight, dtype=torch.bool)
                off_centre[..., conv.weight.shape[-2] // 2, conv.weight.shape[-1] // 2] = False
                conv.weight.masked_fill_(off_centre, 0.0)
        yield chosen
    finally:
        with torch.no_grad():
            for conv, weight in zip(convs, saved):
                conv.weight.copy_(weight)


def check_cut(shape: str, hb_cut: str) -> None:
    """HpxError unless ``shape`` is one of SHAPES and ``hb_cut`` one of HB_CUTS."""
    if shape not in SHAPES:
        raise HpxError(f"unknown truncation shape '{shape}'; use {' or '.join(SHAPES)}")
    if hb_cut not in HB_CUTS:
        raise HpxError(f"unknown Hyena 1D cut '{hb_cut}'; use {' or '.join(HB_CUTS)}")


def relative_tap_distance(info: MixerInfo, shape: str = "disc", hb_cut: str = "wrap") -> Tensor:
    """Distance of each tap from the kernel centre relative to half the feature map: (S, S) or (T,).

    Every family by its tap displacements on the feature map (:meth:`LongFilterBase.tap_displacements`): Euclidean
    (``disc``) or Chebyshev (``square``) displacement over (H/2, W/2); a kernel on the flattened sequence (Hyena 1D)
    with ``hb_cut="wrap"`` the same for each offset's nearest 2D displacement, with ``"offset"`` |offset| / (L/2),
    L = H * W (``disc`` only). A tap is kept at relative size r when this is <= r.
    """
    check_cut(shape, hb_cut)
    if info.feature_size is None:
        raise ValueError("layer info lacks feature_size: list the layers with an input_size")
    filt, (height, width) = long_filter(info), info.feature_size
    if filt.on_sequence and hb_cut == "offset":
        if shape == "square":
            raise HpxError("the offset cut of Hyena 1D layers has no square shape; use the wrap cut or a disc")
        return filt.tap_offsets()[0].abs().double() / (height * width / 2)
    rows, cols = filt.tap_displacements(info.feature_size)
    dy, dx = rows.abs().double() / (height / 2), cols.abs().double() / (width / 2)
    return torch.sqrt(dy ** 2 + dx ** 2) if shape == "disc" else torch.maximum(dy, dx)


def kept_taps(distance: Tensor, size: float) -> Tensor:
    """Boolean mask of the taps kept at relative size ``size``, from :func:`relative_tap_distance`."""
    return distance <= size + TOLERANCE


@contextlib.contextmanager
def truncate_kernels(model: nn.Module, stages: Sequence[GroupLike], size: float, shape: str = "disc",
                     input_size: Union[int, Sequence[int], None] = None, hb_cut: str = "wrap"
                     ) -> Iterator[List[MixerInfo]]:
    """Inside the block the long kernels of ``stages`` (0-based stages, blocks or block ranges, :data:`GroupLike`)
    keep only the taps within relative size ``size`` at resolution ``input_size`` (the model's default when None);
    restored on exit. hb_cut: ``"wrap"`` or ``"offset"`` for Hyena 1D layers (:func:`relative_tap_distance`)."""
    from .models.zoo import default_input_size

    def cut(k: Tensor, info: MixerInfo) -> Tensor:
        return k * kept_taps(relative_tap_distance(info, shape, hb_cut), size).to(k.device, k.dtype)

    wanted = [ref for group in stages for ref in group_refs(group)]
    with modify_kernels(model, cut, layers=lambda info: any(ref.matches(info) for ref in wanted),
                        input_size=input_size if input_size is not None else default_input_size(model)) as chosen:
        yield chosen


__all__ = ["SHAPES", "HB_CUTS", "TOLERANCE", "LayerSelector", "modify_kernels", "cut_short_convs", "check_cut",
           "relative_tap_distance", "kept_taps", "truncate_kernels"]
