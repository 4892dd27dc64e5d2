"""Learned filter size relative to the feature map (paper Fig. 5).

Per token mixer, the relative coverage = extent / F, with F the feature-map side at the model's
training resolution, per channel where the layer has a learned window. Extents count taps (pixels),
as a k x k convolution spans k pixels, so a window kept on 7 taps across at F = 7 gives 1.0 like a
7 x 7 convolution:

- HyenaPixel 2D: window ``w(d) = exp(-|delta| d) + shift`` over the tap distances d (pixels) of the
  S x S kernel. Extent = 2 * (largest tap distance with ``w(d) >= threshold``) + 1, capped at the
  kernel extent S; S when no tap of the kernel falls below the threshold; 0 when none reaches it.
  On a square map, truncating at relative size r = coverage (taps with distance <= r * F / 2, see
  ``truncation``) keeps every tap the window keeps, unless the extent was capped at S: r * F / 2 =
  d + 1/2 for the largest kept distance d. It also keeps the taps with d < distance <= d + 1/2 that
  the window drops (off-axis ones when d is a whole number of taps); r = 2 d / F keeps exactly the
  window's taps.
- Hyena 1D (the analogue): the window ``exp(-|delta| t)`` over the T taps of the flattened sequence
  of length L = H*W. Extent = taps from the first to the last one with ``w >= threshold`` (2 * reach
  + 1 for a bidirectional filter, reach + 1 for a causal one, reach the largest kept offset |d|;
  at most T); relative coverage = extent / L, the fraction of the sequence one position sees. Like
  2D, a full bidirectional filter (T = 2L - 1) gives about 2, a full causal one (T = L) 1. For a
  bidirectional filter, truncating the offsets at r = coverage (``hb_cut="offset"``: |d| <= r * L / 2
  = reach + 1/2) keeps exactly the window's taps; a causal one's taps lie on one side, so that takes
  r = (2 * reach + 1) / L, about twice its coverage.
- Attention: 2 (global). Local and separable long convolutions, and the large kernels of SLaK / RepLKNet
  (``large_conv``): k / F (no window, fixed size).
- Hyena N-D (``hyena_nd``, F = L tokens per side): the window (``exp(-t_i |dx|) exp(-t_j |dy|) + shift``, or the
  product form's two 1D windows) laid on the block's quadrants of the centred (2L-1) x (2L-1) canvas, like its
  kernel. Per axis, the 1D rule: taps from the first to the last row (column) holding a tap with
  ``w >= threshold``, over L, so one-sided: reach + 1 for a quarter-plane (causal or anti-causal) block,
  2 * reach + 1 for ``4dir``; the layer's coverage is the larger of the two axes. A full causal window gives 1,
  a full ``4dir`` one (2L-1) / L, about 2.
Other mixers (pooling, identity) are skipped.

Energy coverage, beside the window coverage for every long-filter layer (HyenaPixel 2D, Hyena 1D, ``large_conv``,
``hyena_nd``): per channel, the extent in taps of the smallest centred disc holding a share (default 0.95) of the
kernel's absolute weight, over F, its radius r being a tap distance in pixels; 0 for an all-zero kernel. The extent
counts taps on the scale of the layer's window coverage:

- 2 * r + 1 for kernels laid around their centre: HyenaPixel, the effective kernel of a large convolution and a
  ``4dir`` Hyena N-D block. A flat full ``4dir`` kernel gives (2L-1) / L, as its window does.
- r + 1 for a one-sided Hyena N-D block (quarter-plane: causal ``standard``, anti-causal ``seq``), whose taps lie on
  one side of the centre along each axis, as its window coverage counts reach + 1. A flat full causal kernel gives 1
  in both measures, a kernel on the centre tap alone 1 / L.
- 2 * r + 1 for Hyena 1D, bidirectional or causal (wrapped onto the map, a causal kernel's offsets fill a
  half-plane, which reaches both sides of the centre along a row). Its window coverage is a share of the sequence,
  not a size on the map, so the two measures are not on one scale for Hyena 1D.

2D kernels (HyenaPixel, large convolution, Hyena N-D's kernel on its centred (2L-1) x (2L-1) canvas, F = L) use the
Euclidean tap distance from the kernel centre, and the extent is capped at the kernel's extent along an axis, as the
window extent is: S, or L for a quarter-plane block. A Hyena 1D kernel is wrapped onto the 2D map, each offset d at
its nearest 2D displacement (``inspection.nearest_displacement``, the wrap cut), so all kinds share one axis (1D
extents are not capped).

The energy coverage reads the kernel that ``inspection.kernel`` returns. For SLaK / RepLKNet that is the block's
effective kernel, which includes the small parallel branch: the s x s (and SLaK's K x s, s x K) conv+BN branches see
the same input and their outputs add up, so in eval mode the module is exactly one depthwise K x K convolution whose
kernel is the BN-fused branches zero-padded to K x K and summed (``LargeKernelConv.effective_kernel``; the BN shifts
make a per-channel bias, no tap), and that one kernel is what the block applies while modified or truncated. The
Hyena skip gain (``u * bias``, per channel) is not part of the measured kernel: the layers apply it beside the
convolution (``(u conv K) + u * bias``), ``kernel()`` leaves it out, and kernel modifications and truncation keep it
as it is. It is a pointwise scaling with no spatial extent; folded in it would only add weight to the centre tap,
pulling the energy coverage towards 1 / F by an amount set by the size of the gain rather than by how far the
learned kernel reaches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import HpxError
from ..inspection import MixerInfo, kernel, list_mixers, tap_displacements
from ..models.zoo import default_input_size
from ..results import Result, model_metadata, write_rows_csv

DEFAULT_THRESHOLD = 0.05
DEFAULT_ENERGY_SHARE = 0.95
SUMMARY_COLUMNS = ("mean", "median", "p10", "p90")
ENERGY_COLUMNS = tuple(f"energy_{column}" for column in SUMMARY_COLUMNS)


def energy_extent(kernels: Tensor, distance: Tensor, share: float, max_extent: Optional[float] = None,
                  one_sided: bool = False) -> Tensor:
    """Extent (C,) in taps of the smallest centred disc holding ``share`` of each kernel's absolute weight: 2 * radius
    + 1 across the centre, radius + 1 for a ``one_sided`` (quarter-plane) kernel, whose taps lie on one side of it;
    kernels (C, *S), distance (*S) the tap distances from the centre in pixels. At most ``max_extent`` (None: no cap);
    0 for an all-zero kernel."""
    weights = kernels.abs().flatten(1).double()
    distances, order = torch.sort(distance.flatten().double().to(weights.device))
    cumulative = weights[:, order].cumsum(1)
    total = cumulative[:, -1:]
    holds = cumulative >= share * total * (1 - 1e-12)  # taps at one distance enter together: any of them decides
    radius = distances[holds.int().argmax(1)]
    extent = radius + 1 if one_sided else 2 * radius + 1
    if max_extent is not None:
        extent = extent.clamp(max=max_extent)
    return torch.where(total[:, 0] > 0, extent, torch.zeros_like(extent))


def tap_distance(info: MixerInfo) -> Tensor:
    """Distance in pixels of each tap of a long filter from its centre: (S, S) Euclidean for 2D kernels; (T,) for a
    Hyena 1D kernel, the length of each offset's nearest 2D displacement on the feature map (module docstring)."""
    rows, cols = tap_displacements(info)
    return torch.sqrt(rows.double() ** 2 + cols.double() ** 2)


def energy_coverage(info: MixerInfo, share: float) -> Optional[np.ndarray]:
    """Energy coverage per channel (C,) of a long-filter layer (module docstring): the extent of its energy disc on
    the scale of its window coverage (radius + 1 for a one-sided kernel), capped at the kernel's own extent
    (:meth:`~hpx_analysis.models.long_filters.LongFilterBase.extent_cap`), over the map's longer side; None for
    other mixers."""
    filt = info.long_filter
    if filt is None:
        return None
    # one-sided on the map: a causal kernel on the flattened sequence wraps onto both sides of the centre along a row
    one_sided_on_map = filt.one_sided and not filt.on_sequence
    extents = energy_extent(kernel(info).float(), tap_distance(info), share, filt.extent_cap(), one_sided_on_map)
    return (extents / max(info.feature_size)).cpu().numpy()


def channel_coverage(info: MixerInfo, threshold: float) -> Optional[np.ndarray]:
    """Relative coverage of one mixer: per channel (C,), the taps its long filter's window keeps
    (:meth:`~hpx_analysis.models.long_filters.LongFilterBase.window_extent`) over the filter's coverage length (the
    map's longer side, or H * W for a kernel on the flattened sequence); a single value (1,) for a mixer without a
    long filter that has a size (:meth:`~hpx_analysis.inspection.MixerInfo.fixed_coverage`); else None."""
    filt = info.long_filter
    if filt is not None:
        with torch.no_grad():
            extents = filt.window_extent(threshold).float()
        return (extents / filt.coverage_length(info.feature_size)).cpu().numpy()
    fixed = info.fixed_coverage()
    return None if fixed is None else np.array([fixed])


class CoverageResult(Result):
    """Relative coverage per mixer of one model, in forward order.

    arrays (one entry per covered mixer): ``mean``, ``median``, ``p10``, ``p90`` over channels,
    ``stage`` (0-based), ``block`` (0-based), ``index`` (block index through the network),
    ``feature_side`` (F); ``channels_<j>``: per-channel coverage of the j-th entry; energy coverage
    ``energy_mean``, ``energy_median``, ``energy_p10``, ``energy_p90`` (NaN for mixers without a long filter) and
    ``energy_channels_<j>`` (long-filter entries only).
    meta ``layers``: name, path, kind per entry; ``threshold``; ``energy_share``; ``input_size``.
    """

    kind = "coverage"

    @property
    def model_name(self) -> str:
        """The model's registered name, or the stem of its config file."""
        from ..models.zoo import model_label
        return model_label(str(self.meta["model"]["model"]))

    @property
    def layers(self) -> List[Dict[str, Any]]:
        return self.meta["layers"]

    def stage_coverage(self, stage: int, statistic: str = "mean", kinds: Optional[Sequence[str]] = None) -> float:
        """Average over the layers of a 0-based stage of one per-layer statistic (mean/median/p10/p90, or the
        energy coverage's ``energy_mean`` ...).

        kinds: only layers of these mixer kinds (e.g. ``("hyenapixel_2d",)``); NaN if none match.
        """
        chosen = [int(self.arrays["index"][j]) for j, layer in enumerate(self.layers)
                  if int(self.arrays["stage"][j]) == stage and (kinds is None or layer["kind"] in kinds)]
        return self.layers_coverage(chosen, statistic)

    def layers_coverage(self, indices: Iterable[int], statistic: str = "mean") -> float:
        """Average of one per-layer statistic (as :meth:`stage_coverage`) over the covered mixers whose ``index``
        (``MixerInfo.index``) is in ``indices``; NaN if none is."""
        if statistic not in SUMMARY_COLUMNS + ENERGY_COLUMNS:
            raise HpxError(f"unknown statistic {statistic!r}; use {', '.join(SUMMARY_COLUMNS + ENERGY_COLUMNS)}")
        wanted = set(indices)
        chosen = [j for j, index in enumerate(self.arrays["index"]) if int(index) in wanted]
        return float(np.mean(self.arrays[statistic][chosen])) if chosen else float("nan")

    def rows(self) -> List[Dict[str, Any]]:
        """One flat record per covered mixer (the CSV rows)."""
        return [{"model": self.model_name, "index": int(self.arrays["index"][j]),
                 "stage": int(self.arrays["stage"][j]), "block": int(self.arrays["block"][j]),
                 "name": layer["name"], "kind": layer["kind"], "feature_side": int(self.arrays["feature_side"][j]),
                 **{column: float(self.arrays[column][j]) for column in SUMMARY_COLUMNS + ENERGY_COLUMNS
                    if column in self.arrays}}
                for j, layer in enumerate(self.layers)]


def _summary(values: Optional[np.ndarray], prefix: str = "") -> Dict[str, float]:
    """Mean, median, p10, p90 of per-channel values (all NaN for None), keys with ``prefix``."""
    if values is None:
        return {prefix + column: float("nan") for column in SUMMARY_COLUMNS}
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {prefix + "mean": values.mean(), prefix + "median": median, prefix + "p10": p10, prefix + "p90": p90}


def compute_coverage(model: nn.Module, *, threshold: float = DEFAULT_THRESHOLD,
                     energy_share: float = DEFAULT_ENERGY_SHARE,
                     input_size: Optional[Union[int, Tuple[int, int]]] = None) -> CoverageResult:
    """Relative feature-map coverage of every token mixer (see the module docstring for the conventions).

    energy_share: share of a long kernel's absolute weight its energy-coverage disc holds.
    input_size: resolution defining F (default the model's training resolution, 224 -> F = 56, 28, 14, 7).
    """
    if not 0 < threshold < 1:
        raise HpxError(f"threshold must lie in (0, 1), got {threshold}")
    if not 0 < energy_share <= 1:
        raise HpxError(f"energy share must lie in (0, 1], got {energy_share}")
    size = input_size if input_size is not None else default_input_size(model)
    summaries: Dict[str, List[float]] = {key: [] for key in SUMMARY_COLUMNS + ENERGY_COLUMNS + (
        "stage", "block", "index", "feature_side")}
    arrays: Dict[str, np.ndarray] = {}
    layers = []
    with torch.no_grad():
        infos = list_mixers(model, size)
    for info in infos:
        values = channel_coverage(info, threshold)
        if values is None:
            continue
        energy = energy_coverage(info, energy_share)
        arrays[f"channels_{len(layers)}"] = values
        if energy is not None:
            arrays[f"energy_channels_{len(layers)}"] = energy
        entry = {**_summary(values), **_summary(energy, "energy_"), "stage": info.stage, "block": info.block,
                 "index": info.index, "feature_side": max(info.feature_size)}
        for key, value in entry.items():
            summaries[key].append(value)
        layers.append({"name": info.name, "path": info.path, "kind": info.kind,
                       "feature_size": list(info.feature_size)})
    if not layers:
        raise HpxError("the model has no token mixers with a filter size (HyenaPixel, Hyena, attention, convolution)")
    arrays.update({key: np.asarray(values) for key, values in summaries.items()})
    meta = {"model": model_metadata(model), "threshold": threshold, "energy_share": energy_share,
            "input_size": list(np.broadcast_to(size, (2,)).tolist()), "layers": layers}
    return CoverageResult(arrays=arrays, meta=meta)


def write_table(results: Sequence[CoverageResult], path: Path | str) -> Path:
    """Per-layer summaries of several models as one CSV."""
    return write_rows_csv([row for result in results for row in result.rows()], path)
