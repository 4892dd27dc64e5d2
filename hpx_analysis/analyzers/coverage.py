"""Learned filter size relative to the feature map (paper Fig. 5).

Per token mixer, the relative coverage = diameter / F, with F the feature-map side at the model's
training resolution, per channel where the layer has a learned window:

- HyenaPixel 2D: window ``w(d) = exp(-|delta| d) + shift`` over the tap distances d (pixels) of the
  S x S kernel. Diameter = 2 * (largest tap distance with ``w(d) >= threshold``), capped at the
  kernel extent S; S when no tap of the kernel falls below the threshold; 0 when none reaches it.
- Hyena 1D (the analogue): the window ``exp(-|delta| t)`` over the taps of the flattened sequence of
  length L = H*W. Reach = largest tap offset |d| (in sequence positions) with ``w >= threshold``;
  relative coverage = (2 * reach for bidirectional, reach for causal) / L, capped at T / L for T
  taps (T / L when no tap falls below), i.e. the fraction of the sequence one position sees on
  both sides. Like 2D, a full bidirectional filter gives about 2 (each position sees the whole
  sequence from anywhere), a full causal one 1.
- Attention: 2 (global). Local and separable long convolutions: k / F (no window, fixed size).
Other mixers (pooling, identity) are skipped.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import HpxError
from ..inspection import (ATTENTION, HYENA_1D, HYENAPIXEL_2D, LOCAL_CONV, SEPARABLE_LONG_CONV, MixerInfo,
                          list_mixers, window, window_parameters)
from ..models.zoo import default_input_size
from ..results import Result, model_metadata

DEFAULT_THRESHOLD = 0.05
ATTENTION_COVERAGE = 2.0
SUMMARY_COLUMNS = ("mean", "median", "p10", "p90")


def window_diameter_2d(windows: Tensor, distance: Tensor, threshold: float) -> Tensor:
    """Diameter (C,) in pixels of HyenaPixel windows (C, S, S) over tap distances (S, S)."""
    size = distance.shape[-1]
    above = windows >= threshold
    reach = torch.where(above, distance.expand_as(windows), torch.zeros_like(windows)).flatten(1).amax(1)
    diameter = torch.clamp(2 * reach, max=size)
    diameter = torch.where(above.flatten(1).any(1), diameter, torch.zeros_like(diameter))
    return torch.where(above.flatten(1).all(1), torch.full_like(diameter, size), diameter)


def window_coverage_1d(windows: Tensor, centre: int, sequence_length: int, threshold: float) -> Tensor:
    """Relative coverage (C,) of Hyena windows (C, T) with offset 0 at tap ``centre``, over a sequence of L."""
    taps = windows.shape[-1]
    offsets = (torch.arange(taps, device=windows.device) - centre).abs().to(windows.dtype)
    above = windows >= threshold
    reach = torch.where(above, offsets.expand_as(windows), torch.zeros_like(windows)).amax(1)
    sides = 2 if centre > 0 else 1
    coverage = torch.clamp(sides * reach, max=taps) / sequence_length
    return torch.where(above.all(1), torch.full_like(coverage, taps / sequence_length), coverage)


def channel_coverage(info: MixerInfo, threshold: float) -> Optional[np.ndarray]:
    """Relative coverage per channel (C,) or a single value (1,) of one mixer; None for mixers without a size."""
    height, width = info.feature_size
    side = max(height, width)
    if info.kind == HYENAPIXEL_2D:
        diameters = window_diameter_2d(window(info).float(), window_parameters(info)["distance"].float(), threshold)
        return (diameters / side).cpu().numpy()
    if info.kind == HYENA_1D:
        coverage = window_coverage_1d(window(info).float(), info.long_filter.centre[0], height * width, threshold)
        return coverage.cpu().numpy()
    if info.kind == ATTENTION:
        return np.array([ATTENTION_COVERAGE])
    if info.kind in (LOCAL_CONV, SEPARABLE_LONG_CONV):
        return np.array([max(info.kernel_size) / side])
    return None


class CoverageResult(Result):
    """Relative coverage per mixer of one model, in forward order.

    arrays (one entry per covered mixer): ``mean``, ``median``, ``p10``, ``p90`` over channels,
    ``stage`` (0-based), ``block`` (0-based), ``index`` (block index through the network),
    ``feature_side`` (F); ``channels_<j>``: per-channel coverage of the j-th entry.
    meta ``layers``: name, path, kind per entry; ``threshold``; ``input_size``.
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
        """Average over the layers of a 0-based stage of one per-layer statistic (mean/median/p10/p90).

        kinds: only layers of these mixer kinds (e.g. ``("hyenapixel_2d",)``); NaN if none match.
        """
        if statistic not in SUMMARY_COLUMNS:
            raise HpxError(f"unknown statistic {statistic!r}; use {', '.join(SUMMARY_COLUMNS)}")
        chosen = [j for j, layer in enumerate(self.layers)
                  if int(self.arrays["stage"][j]) == stage and (kinds is None or layer["kind"] in kinds)]
        return float(np.mean(self.arrays[statistic][chosen])) if chosen else float("nan")

    def rows(self) -> List[Dict[str, Any]]:
        """One flat record per covered mixer (the CSV rows)."""
        return [{"model": self.model_name, "index": int(self.arrays["index"][j]),
                 "stage": int(self.arrays["stage"][j]), "block": int(self.arrays["block"][j]),
                 "name": layer["name"], "kind": layer["kind"], "feature_side": int(self.arrays["feature_side"][j]),
                 **{column: float(self.arrays[column][j]) for column in SUMMARY_COLUMNS}}
                for j, layer in enumerate(self.layers)]


def compute_coverage(model: nn.Module, *, threshold: float = DEFAULT_THRESHOLD,
                     input_size: Optional[Union[int, Tuple[int, int]]] = None) -> CoverageResult:
    """Relative feature-map coverage of every token mixer (see the module docstring for the conventions).

    input_size: resolution defining F (default the model's training resolution, 224 -> F = 56, 28, 14, 7).
    """
    if not 0 < threshold < 1:
        raise HpxError(f"threshold must lie in (0, 1), got {threshold}")
    size = input_size if input_size is not None else default_input_size(model)
    summaries: Dict[str, List[float]] = {key: [] for key in SUMMARY_COLUMNS + ("stage", "block", "index",
                                                                             "feature_side")}
    arrays: Dict[str, np.ndarray] = {}
    layers = []
    with torch.no_grad():
        infos = list_mixers(model, size)
    for info in infos:
        values = channel_coverage(info, threshold)
        if values is None:
            continue
        arrays[f"channels_{len(layers)}"] = values
        p10, median, p90 = np.percentile(values, [10, 50, 90])
        for key, value in (("mean", values.mean()), ("median", median), ("p10", p10), ("p90", p90),
                           ("stage", info.stage), ("block", info.block), ("index", info.index),
                           ("feature_side", max(info.feature_size))):
            summaries[key].append(value)
        layers.append({"name": info.name, "path": info.path, "kind": info.kind,
                       "feature_size": list(info.feature_size)})
    if not layers:
        raise HpxError("the model has no token mixers with a filter size (HyenaPixel, Hyena, attention, convolution)")
    arrays.update({key: np.asarray(values) for key, values in summaries.items()})
    meta = {"model": model_metadata(model), "threshold": threshold,
            "input_size": list(np.broadcast_to(size, (2,)).tolist()), "layers": layers}
    return CoverageResult(arrays=arrays, meta=meta)


def write_table(results: Sequence[CoverageResult], path: Path | str) -> Path:
    """Per-layer summaries of several models as one CSV."""
    rows = [row for result in results for row in result.rows()]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
