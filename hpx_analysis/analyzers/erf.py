"""Effective receptive field (ERF): how much each input pixel moves the centre output of a layer.

Two conventions:

* ``replknet`` (the paper's Fig. 4/8, after RepLKNet): inputs resized bicubic to ``input_size``
  squared (default 1024 px), no crop; scalar = sum over channels of ``relu`` of the feature at the
  spatial centre (H//2, W//2) ((B, N, C) tokens: the leading class/register tokens dropped, the rest a
  square grid);
  per-image map = ``relu(d scalar / d input)`` summed over RGB (``gradient="abs"``: ``|d scalar / d input|``,
  the question of RepLKNet issue #62); mean over images. Display map
  ``log10(map + 1) / max``; high-contribution area ratios at t = 0.2, 0.3, 0.5, 0.99 by RepLKNet's
  ``get_rectangle`` (:func:`area_ratios`).
* ``kim2023`` (Kim et al. 2023 as implemented by OpenERF 0.6.1, ``openerf/erf.py:compute_erf``):

  - inputs: the model's timm eval transform (``resolve_model_data_config`` + ``create_transform``:
    resize the shorter side to size / crop_pct, centre crop, normalise) at its pretrained input size,
    or at ``input_size`` when given (``data.py:build_timm_eval_transform``);
  - scalar: channel mean of the centre feature, (H//2, W//2) of (B, C, H, W) maps; for (B, N, C)
    tokens the leading class/register tokens are dropped and the centre of the square token grid is
    ((g-1)//2, (g-1)//2), the upper left of the central 2x2 on even grids (``feature_ops.py``);
  - map: ``relu`` of the input gradient averaged over RGB (``gradient="abs"``: the absolute value of that
    average), summed over images, normalised to sum 1;
  - Gaussian fit (``fit.py:fit_2d_gaussian``): ``amp * exp(-(x-xc)^2/(2 sx^2) - (y-yc)^2/(2 sy^2))
    / (2 pi sx sy)``, no rotation, no offset, x = column, y = row (px); start amp = 2,
    xc = 0.8 (W-1)/2, yc = 0.8 (H-1)/2, sx = max(W/10, 1e-3)/1.5, sy = max(H/6, 1e-3)/1.5; bounds
    amp >= 0, 0 <= xc <= W-1, 0 <= yc <= H-1, sx, sy >= 1e-6; R^2 = 1 - var(residual) / var(map);
  - radial mass (``metrics.py:compute_erf_metrics``): share of the map within Euclidean distance
    r <= 5, 10, 20, 30, 40, 60, 80 px of the centre pixel (H//2, W//2).

  Sigmas are reported in px and relative to the input side (sx / W, sy / H), radial masses at the
  OpenERF radii in px and at radii given as fractions of the shorter input side (ours; OpenERF has
  px only), so runs at different resolutions compare. Deliberate differences from OpenERF: the fit
  runs scipy's bounded ``curve_fit`` (trust region reflective, tolerances 1e-12) instead of lmfit's
  Levenberg-Marquardt with bound transforms; both find the same least-squares optimum, which lmfit's
  default tolerance meets to within about 1e-4 (relative sigma, absolute R^2) on the maps checked.
  Images are batched (independent in eval mode) and summed in float64; non-finite gradients are
  skipped; the output is the model's last stage (``feature_info``), which is OpenERF's
  ``forward_features`` for MetaFormers such as the HyenaPixel family, and 4D outputs are read in the
  layout timm reports (OpenERF reads the 4D output of ``forward_features`` of models with a
  ``patch_embed`` as tokens).

Both conventions take the centre on the spatial axes of the output: timm's ``output_fmt`` for a model's
feature outputs ((B, H, W, C) in Swin and MambaOut), else (B, C, H, W) maps and (B, N, C) tokens; an
output whose layout cannot be told is refused.

Several layers and input sizes in one call: every layer's ERF comes from one forward pass per batch (hooks
read each layer's centre as its output appears; the pass stops once the last of them has run) and one backward
pass per layer (the graph kept between them), summed in one run; each input size is its own run (other inputs).
The result has one row per model, input size and layer (:class:`ERFResult`).

Images whose gradient is not finite are skipped and counted, unreadable files too. The run goes
through :func:`hpx_analysis.engine.run_batches`: eval mode with frozen parameters (no weight
gradients), images read one batch at a time; with ``resume_dir`` the running sums are saved (every
minute and whenever the run stops) and a rerun with the same arguments continues where the last one
stopped; under ``torchrun`` each rank sums every world-th batch and the sums are all-reduced.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from timm.layers import Format
from torch import Tensor, nn

from ..devices import model_placement
from ..engine import Batch, ImageDataset, SumOutput, run_batches
from ..errors import HpxError
from ..images import ImageSource, eval_transform, model_mean_std
from ..inspection import feature_layer, feature_modules, layer_module
from ..layer_names import LAYER_SYNTAX, LayerLike, LayerRef, is_layer_syntax
from ..models.frozen import fused_frozen
from ..models.zoo import default_input_size
from ..results import Result, model_metadata

CONVENTIONS = ("replknet", "kim2023")
GRADIENTS = ("relu", "abs")  # the map from the input gradient: relu (the references') or its absolute value
AREA_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
REPLKNET_SIZE = 1024  # px, the replknet default input side
OPENERF_RADII = (5, 10, 20, 30, 40, 60, 80)  # px, OpenERF's radial-mass radii
RELATIVE_RADII = (0.05, 0.1, 0.25, 0.5)  # fractions of the shorter input side
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _StopForward(Exception):
    """Raised by the output hook: nothing after the analysed layer needs computing."""


# -- metrics -----------------------------------------------------------------------------------

def display_map(erf_map: np.ndarray, convention: str = "replknet") -> np.ndarray:
    """The map as shown: ``log10(map + 1) / max`` (replknet) or ``map / max`` (kim2023); (H, W)."""
    shown = np.log10(erf_map + 1.0) if convention == "replknet" else np.asarray(erf_map, dtype=np.float64)
    peak = shown.max()
    return shown / peak if peak > 0 else shown


def area_ratios(display: np.ndarray, thresholds: Sequence[float] = AREA_THRESHOLDS) -> Dict[str, Optional[float]]:
    """High-contribution area ratio per threshold t, by the rule of RepLKNet's ``get_rectangle``
    (``erf/analyze_erf.py``): the first i = 1, 2, ..., H//2 - 1 whose square
    ``display[H//2-i : H//2+i+1, W//2-i : W//2+i+1]`` (side s = 2i+1) has
    ``sum(square) / sum(display) > t`` gives ``s / H * s / W``; None when no i does.

    So the centre pixel alone (i = 0) never counts, nor does the full image: the largest square has side
    H - 1 (H even) or H - 2 (H odd), and the bound follows H alone (wider maps keep squares of at most that
    side). Squares are summed as numpy slices and the share is a quotient, as in the reference, so equal
    maps give equal decisions. Deviation: on maps so much taller than wide that a square would leave the
    image (i > (W-1)//2), the reference's slice is clipped or wraps around and it reports an area it did
    not sum (over 1 at worst); we stop there (None beyond). An all-zero map gives None everywhere (the
    reference divides 0 by 0). display: (H, W), non-negative."""
    height, width = display.shape
    cy, cx = height // 2, width // 2
    ratios: Dict[str, Optional[float]] = {f"{t:g}": None for t in thresholds}
    total = np.sum(display)
    pending = list(thresholds) if total > 0 else []
    for i in range(1, min(cy - 1, (width - 1) // 2) + 1):
        if not pending:
            break
        share = np.sum(display[cy - i:cy + i + 1, cx - i:cx + i + 1]) / total
        side = 2 * i + 1
        for t in [t for t in pending if share > t]:
            ratios[f"{t:g}"] = side / height * side / width
            pending.remove(t)
    return ratios


def mass_within(erf_map: np.ndarray, radii: Sequence[float]) -> np.ndarray:
    """Share of the map's total within Euclidean distance r (px) of the centre pixel (H//2, W//2),
    per radius: (len(radii),); zeros for an all-zero map."""
    height, width = erf_map.shape
    yy, xx = np.indices(erf_map.shape)
    distance = np.sqrt((yy - height // 2) ** 2 + (xx - width // 2) ** 2).ravel()
    order = np.argsort(distance, kind="stable")
    cumulative = np.concatenate([[0.0], np.cumsum(erf_map.ravel()[order])])
    total = cumulative[-1]
    inside = np.searchsorted(distance[order], np.asarray(radii, dtype=np.float64), side="right")
    return cumulative[inside] / total if total > 0 else np.zeros(len(inside))


def radial_mass(erf_map: np.ndarray) -> np.ndarray:
    """:func:`mass_within` at r = 0, 1, ..., R px, R the largest distance rounded up: (R+1,)."""
    height, width = erf_map.shape
    largest = np.sqrt((height // 2) ** 2 + (width // 2) ** 2)  # the corner (0, 0) is the farthest pixel
    return mass_within(erf_map, np.arange(int(np.ceil(largest)) + 1))


def _openerf_gaussian(mesh: Tuple[np.ndarray, np.ndarray], amplitude: float, x0: float, y0: float,
                      sigma_x: float, sigma_y: float) -> np.ndarray:
    """``amplitude`` times the unit-volume axis-aligned Gaussian on mesh (x, y), each (H, W): (H*W,)."""
    xx, yy = mesh
    exponent = (xx - x0) ** 2 / (2 * sigma_x ** 2) + (yy - y0) ** 2 / (2 * sigma_y ** 2)
    return (amplitude * np.exp(-exponent) / (2 * np.pi * sigma_x * sigma_y)).ravel()


def gaussian_fit(erf_map: np.ndarray) -> Dict[str, Optional[float]]:
    """OpenERF's 2D Gaussian fit (module docstring: model, start, bounds, R^2) of ``erf_map`` (H, W)
    normalised to sum 1, by scipy's bounded least squares. Returns amplitude, centre x0 (column),
    y0 (row), sigma_x, sigma_y in px, sigma_x_rel = sigma_x / W, sigma_y_rel = sigma_y / H and r2;
    all None when the map is empty, smaller than 2x2 or the fit fails."""
    from scipy.optimize import curve_fit

    keys = ("amplitude", "x0", "y0", "sigma_x", "sigma_y", "sigma_x_rel", "sigma_y_rel", "r2")
    failed: Dict[str, Optional[float]] = dict.fromkeys(keys)
    total = erf_map.sum()
    if not np.isfinite(total) or total <= 0 or min(erf_map.shape) < 2:
        return failed
    data = (erf_map / total).ravel()
    height, width = erf_map.shape
    mesh = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    start = (2.0, 0.8 * (width - 1) / 2, 0.8 * (height - 1) / 2,
             max(width / 10, 1e-3) / 1.5, max(height / 6, 1e-3) / 1.5)
    bounds = ((0.0, 0.0, 0.0, 1e-6, 1e-6), (np.inf, width - 1.0, height - 1.0, np.inf, np.inf))
    try:
        params, _ = curve_fit(_openerf_gaussian, mesh, data, p0=start, bounds=bounds,
                              ftol=1e-12, xtol=1e-12, gtol=1e-12, max_nfev=10000)
    except (RuntimeError, ValueError):
        return failed
    residual = data - _openerf_gaussian(mesh, *params)
    amplitude, x0, y0, sigma_x, sigma_y = (float(p) for p in params)
    return {"amplitude": amplitude, "x0": x0, "y0": y0, "sigma_x": sigma_x, "sigma_y": sigma_y,
            "sigma_x_rel": sigma_x / width, "sigma_y_rel": sigma_y / height,
            "r2": float(1 - residual.var() / data.var()) if data.var() > 0 else None}


def radial_mass_summary(erf_map: np.ndarray) -> Dict[str, Dict[str, float]]:
    """Radial mass of ``erf_map`` (H, W) at OpenERF's radii in px (``px``, keyed by the radius) and at
    fractions of the shorter side (``relative``, keyed by the fraction)."""
    side = min(erf_map.shape)
    return {"px": {str(r): float(m) for r, m in zip(OPENERF_RADII, mass_within(erf_map, OPENERF_RADII))},
            "relative": {f"{f:g}": float(m) for f, m in
                         zip(RELATIVE_RADII, mass_within(erf_map, [f * side for f in RELATIVE_RADII]))}}


# -- result --------------------------------------------------------------------------------------

ROW_OPTIONS = ("layer", "input_size", "size_override", "transform")
"""Options that describe one row; a result's ``options`` keeps them only while every row has the same value."""


def _stack_rows(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Arrays (n_i, *shape_i) stacked along the rows: (sum n_i, *largest shape), NaN beyond a row's own shape."""
    if len({part.shape[1:] for part in parts}) == 1:
        return np.concatenate(parts)
    shape = np.max([part.shape[1:] for part in parts], axis=0)
    stacked = np.full((sum(len(part) for part in parts), *shape), np.nan, dtype=np.result_type(*parts))
    start = 0
    for part in parts:
        stacked[(slice(start, start + len(part)), *(slice(0, side) for side in part.shape[1:]))] = part
        start += len(part)
    return stacked


class ERFResult(Result):
    """ERFs of one or more models, layers and input sizes: one row per (model, input size, layer), in that order.

    arrays: ``maps`` (R, H, W) float64 raw mean maps (kim2023: normalised to sum 1), ``display`` (R, H, W) display
    maps, ``used`` / ``skipped`` (R,) image counts, ``radial_mass`` (R, K) at r = 0, 1, ... px (kim2023 only).
    Rows of different input sizes are padded with NaN to the largest (H, W); :meth:`row_map` gives a row's own.
    meta: ``convention``, ``models`` (the rows: label, model metadata, layer, ``input_size`` [H, W] of the map,
    ``size_override`` the requested side or None, ``transform`` the preprocessing, image counts, area_ratios,
    ``run_key`` (None without a resume folder); kim2023: ``gaussian`` (:func:`gaussian_fit`) and ``radial_mass``
    (:func:`radial_mass_summary`)), ``inputs`` (image names), ``options`` (``layers`` the module paths,
    ``input_sizes`` the requested sides (None: the default), ``gradient``, convention, batching; the runs'
    ``world_size`` and ``batches_total`` / ``batches_resumed`` / ``batches_computed``, summed over the runs of
    every size and model; and :data:`ROW_OPTIONS` where all rows agree, as in every one-layer, one-size result).
    Results saved before several layers and sizes load and draw as they are (one size, rows without
    ``input_size``).
    """

    kind = "erf"

    @property
    def labels(self) -> List[str]:
        """The model label of every row."""
        return [entry["label"] for entry in self.meta["models"]]

    @property
    def convention(self) -> str:
        return self.meta["convention"]

    def row_size(self, row: int) -> Tuple[int, int]:
        """(H, W) of row ``row``'s map (the arrays' for results saved before rows recorded it)."""
        height, width = self.meta["models"][row].get("input_size") or self.arrays["maps"].shape[1:]
        return int(height), int(width)

    def row_map(self, row: int, name: str = "maps") -> np.ndarray:
        """Row ``row`` of the (R, H, W) array ``name`` (``maps`` or ``display``) at its own size: (H, W)."""
        height, width = self.row_size(row)
        return self.arrays[name][row, :height, :width]

    @property
    def layers(self) -> List[str]:
        """The layers of the rows, each once, in order."""
        return list(dict.fromkeys(entry["layer"] for entry in self.meta["models"]))

    @property
    def sizes(self) -> List[Tuple[int, int]]:
        """The (H, W) of the rows, each once, in order."""
        return list(dict.fromkeys(self.row_size(row) for row in range(len(self.labels))))

    def several(self, what: str) -> bool:
        """Whether some model has rows at several layers (``what="layer"``) or input sizes (``"input_size"``); models
        each read at their own one layer (their last stages, say) do not count."""
        seen: Dict[str, set] = {}
        for row, entry in enumerate(self.meta["models"]):
            seen.setdefault(entry["label"], set()).add(entry["layer"] if what == "layer" else self.row_size(row))
        return max(len(values) for values in seen.values()) > 1

    def caption(self, row: int) -> str:
        """Row ``row``'s label, with its layer and input side where a model has several."""
        entry = self.meta["models"][row]
        layer = f" {entry['layer'] or '(output)'}" if self.several("layer") else ""
        size = f" @ {self.row_size(row)[0]} px" if self.several("input_size") else ""
        return entry["label"] + layer + size

    @classmethod
    def combine(cls, results: Sequence["ERFResult"]) -> "ERFResult":
        """One result holding the rows of several results (same convention and gradient), in order."""
        if (len({r.convention for r in results}) != 1
                or len({r.meta["options"].get("gradient") for r in results}) != 1):
            raise HpxError("ERFs to combine must share the convention and the gradient")
        arrays = {key: _stack_rows([r.arrays[key] for r in results]) for key in results[0].arrays}
        meta = dict(results[0].meta)
        meta["models"] = [entry for r in results for entry in r.meta["models"]]
        meta["options"] = {key: value for key, value in meta["options"].items()
                           if key not in ROW_OPTIONS or all(entry.get(key) == meta["models"][0].get(key)
                                                            for entry in meta["models"])}
        for count in ("batches_total", "batches_resumed", "batches_computed"):  # the runs of all results
            if all(count in r.meta["options"] for r in results):
                meta["options"][count] = sum(r.meta["options"][count] for r in results)
        return cls(arrays=arrays, meta=meta)


# -- computation ---------------------------------------------------------------------------------

def resolve_output_layer(model: nn.Module, layer: Union[LayerRef, int, str, None]) -> str:
    """Module path of the ERF output. None: the last stage (before norm and head). A LayerRef, a stage
    index or stage / block text (``1``, ``"1"``, ``"1.0"``, ``"S2"``, ``"stages.1"``: numbers from 0, as in
    the Python API; ``S2`` is the paper's label): that stage's output (``stages.1``) or block
    (``stages.1.blocks.0``), :func:`~hpx_analysis.inspection.layer_module`. Any other text: that module
    path ("" = the whole model)."""
    if layer is None:
        try:
            return feature_layer(model)
        except ValueError as err:
            raise HpxError(str(err)) from None
    if isinstance(layer, str) and not is_layer_syntax(layer):
        names = dict(model.named_modules())
        if layer not in names:
            raise HpxError(f"model has no layer '{layer}'; name a stage or block ({LAYER_SYNTAX}) or a module "
                           f"path such as {', '.join(list(names)[1:4])}")
        return layer
    return layer_module(model, layer)


def _prefix_tokens(model: nn.Module) -> int:
    """Leading non-spatial tokens of a token model: ``num_prefix_tokens``, else one per class and
    distillation token plus the register tokens (OpenERF's rule)."""
    explicit = getattr(model, "num_prefix_tokens", None)
    if explicit is not None:
        return int(explicit)
    flagged = sum(getattr(model, name, None) is not None for name in ("cls_token", "dist_token"))
    return flagged + int(getattr(model, "num_reg_tokens", None) or 0)


def _centre_token(tokens: Tensor, prefix: int) -> Tensor:
    """Features (B, C) of the centre token of (B, N, C) tokens (kim2023): the ``prefix`` leading tokens
    dropped, the rest a square g x g grid, row = column = (g-1)//2 (upper left of the central 2x2 on
    even grids)."""
    spatial = tokens.shape[1] - prefix
    side = int(round(spatial ** 0.5))
    if prefix < 0 or spatial <= 0 or side * side != spatial:
        raise HpxError(f"{tokens.shape[1]} tokens with {prefix} prefix tokens do not form a square grid")
    middle = (side - 1) // 2
    return tokens[:, prefix + middle * side + middle]


def _nchw_or_nlc(model: nn.Module, layer: str, feature: Tensor) -> Tensor:
    """``layer``'s output as (B, C, H, W) maps or (B, N, C) tokens.

    The layout is timm's ``output_fmt`` (``timm.layers.Format``) for the model's feature outputs (its
    ``feature_info`` modules; NHWC in Swin and MambaOut); models that report none or NCHW keep timm's
    defaults, (B, C, H, W) maps and (B, N, C) tokens, at every layer. Refused where the layout cannot be
    told: other layers of a model with another format, or an output of a rank the layout does not have.
    """
    reported = getattr(model, "output_fmt", None) or Format.NCHW
    try:
        declared = Format(reported)
    except ValueError:
        raise HpxError(f"{type(model).__name__} reports output_fmt '{reported}', which is no layout timm "
                       f"knows ({', '.join(f.value for f in Format)})") from None
    if declared is not Format.NCHW:
        features = feature_modules(model)
        if layer not in features:
            raise HpxError(f"cannot tell the layout of layer '{layer}': {type(model).__name__} reports "
                           f"{declared.value} only for its feature outputs ({', '.join(features)}); name one")
        layout: Optional[Format] = declared
    else:
        layout = {4: Format.NCHW, 3: Format.NLC}.get(feature.dim())
    if layout is None or feature.dim() != len(layout.value):  # one letter per dimension
        raise HpxError(f"layer '{layer}' gives a {tuple(feature.shape)} output, not the "
                       f"{layout.value if layout else '(B, C, H, W) or (B, N, C)'} feature map the ERF needs")
    if layout is Format.NHWC:
        return feature.permute(0, 3, 1, 2)
    return feature.transpose(1, 2) if layout is Format.NCL else feature


def _centre_scalar(model: nn.Module, layer: str, output: Any, convention: str) -> Tensor:
    """The ERF's scalar for a batch: ``layer``'s output (a tensor, or a tuple led by one) read at the spatial
    centre in the layout timm reports for it (:func:`_nchw_or_nlc`: (B, H, W, C) in Swin and MambaOut); replknet
    sums ``relu`` of the centre features, kim2023 their channel means; 0-d, summed over the batch."""
    feature = _nchw_or_nlc(model, layer, (output[0] if isinstance(output, (tuple, list)) else output).float())
    if feature.dim() == 3 and convention == "kim2023":
        centre = _centre_token(feature, _prefix_tokens(model))
    else:
        if feature.dim() == 3:  # (B, N, C) tokens -> (B, C, h, w) on a square grid, without class/register tokens
            feature = feature[:, _prefix_tokens(model):]
            side = int(round(feature.shape[1] ** 0.5))
            feature = feature.transpose(1, 2).reshape(feature.shape[0], -1, side, feature.shape[1] // side)
        centre = feature[:, :, feature.shape[-2] // 2, feature.shape[-1] // 2]
    return torch.relu(centre).sum() if convention == "replknet" else centre.mean(dim=1).sum()


def _check_choices(convention: str, gradient: str) -> None:
    """A one-line HpxError for an unknown convention or gradient."""
    if convention not in CONVENTIONS:
        raise HpxError(f"unknown ERF convention '{convention}'; use {' or '.join(CONVENTIONS)}")
    if gradient not in GRADIENTS:
        raise HpxError(f"unknown ERF gradient '{gradient}'; use {' or '.join(GRADIENTS)}")


FP16_FIRST_SCALE = 2.0 ** 12
"""The first factor on the centre scalar of an fp16 pass (:func:`_input_gradient`)."""


def _input_gradient(scalar: Tensor, x: Tensor, retain_graph: bool, fp16: bool) -> Tensor:
    """Gradient (B, 3, H, W) float32 of the 0-d ``scalar`` with respect to the leaf ``x``, by ``backward(inputs=[x])``
    (``autograd.grad`` fails under FlopCounterMode).

    ``fp16``: the pass ran under float16 autocast, whose gradients flush to zero below 6e-8, and the ERF's far
    tails lie there (the tiny test model: 3% of its pixels). As torch's GradScaler does for training, the scalar is
    multiplied by a factor (first :data:`FP16_FIRST_SCALE`) and the gradient divided by it; a gradient with an
    inf or NaN (an overflow in float16 on the way) is recomputed with the factor 16 times smaller, down to 1."""
    if not fp16:
        scalar.backward(inputs=[x], retain_graph=retain_graph)
        grad, x.grad = x.grad.float(), None
        return grad
    scale = FP16_FIRST_SCALE
    while True:
        (scalar * scale).backward(inputs=[x], retain_graph=True)  # kept for a retry
        grad, x.grad = x.grad.float(), None
        if bool(torch.isfinite(grad).all()):
            return grad / scale
        if scale <= 1:
            raise HpxError("the fp16 gradients overflow even unscaled; use --amp bf16 or no --amp")
        scale /= 16


def erf_gradient_maps_by_layer(model: nn.Module, inputs: Tensor, layers: Sequence[str],
                               convention: str = "replknet", amp_dtype: Optional[torch.dtype] = None,
                               gradient: str = "relu") -> Tensor:
    """Per-image ERF maps of each layer, (L, B, H, W), for normalised inputs (B, 3, H, W) on the model's device.

    One forward pass: a hook on each layer turns its first output into the centre scalar
    (:func:`_centre_scalar`) as it appears, and the pass stops once every layer has given one. Then one backward
    pass per layer, in order, the graph kept for the next. Images in a batch are independent in eval mode, so one
    backward pass of the summed centre scalars gives every image's gradient g (B, 3, H, W); the map is
    ``gradient`` (``relu`` or ``abs``) of g summed over RGB (replknet) or of g averaged over RGB (kim2023).
    Frozen StarReLUs and HyenaPixel gatings run fused (:func:`..models.frozen.fused_frozen`): the same values to
    float32 rounding, fewer memory passes.
    """
    _check_choices(convention, gradient)
    scalars: Dict[str, Tensor] = {}

    def reader(layer: str) -> Callable[[nn.Module, tuple, Any], None]:
        def read(_module: nn.Module, _args: tuple, output: Any) -> None:
            if layer not in scalars:
                scalars[layer] = _centre_scalar(model, layer, output, convention)
            if len(scalars) == len(layers):
                raise _StopForward
        return read

    handles = [model.get_submodule(layer).register_forward_hook(reader(layer)) for layer in layers]
    x = inputs.detach().clone().requires_grad_(True)
    autocast = (torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    try:
        with torch.enable_grad(), autocast, fused_frozen(model):
            try:
                model(x)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    unused = [layer for layer in layers if layer not in scalars]
    if unused:
        raise HpxError(f"layer '{unused[0]}' is not used in the model's forward pass; choose another layer")
    nonlinearity = torch.relu if gradient == "relu" else torch.abs
    maps = []
    for index, layer in enumerate(layers):
        grad = _input_gradient(scalars[layer], x, index < len(layers) - 1, amp_dtype == torch.float16)
        maps.append(nonlinearity(grad).sum(dim=1) if convention == "replknet" else nonlinearity(grad.mean(dim=1)))
    return torch.stack(maps)


def erf_gradient_maps(model: nn.Module, inputs: Tensor, layer: str, convention: str = "replknet",
                      amp_dtype: Optional[torch.dtype] = None, gradient: str = "relu") -> Tensor:
    """Per-image ERF maps (B, H, W) of one layer for inputs (B, 3, H, W): :func:`erf_gradient_maps_by_layer`."""
    return erf_gradient_maps_by_layer(model, inputs, [layer], convention, amp_dtype, gradient)[0]


def _runs_only_at_build_size(model: nn.Module) -> bool:
    """Whether timm's pretrained config marks the model ``fixed_input_size`` (ViTs)."""
    return bool((getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size"))


def _input_transform(model: nn.Module, convention: str, input_size: Optional[int]
                     ) -> Tuple[Callable[[Any], Tensor], Tuple[int, int], str]:
    """The per-image preprocessing of ``convention``: PIL RGB image -> normalised (3, H, W), the
    (H, W) it gives, and a one-line description. replknet: bicubic resize to ``input_size`` (default
    1024, or the build size of a model that runs only there: timm's ``fixed_input_size``, e.g. ViTs) squared,
    no crop; kim2023: timm's eval transform at the pretrained (or ``input_size``) size."""
    if convention == "kim2023":
        transform, size = eval_transform(model, input_size)
        return transform, size, " ".join(repr(transform).split())
    fixed = _runs_only_at_build_size(model)
    side = input_size or (default_input_size(model)[0] if fixed else REPLKNET_SIZE)
    transform, size = eval_transform(model, side, crop=False, interpolation="bicubic")
    mean, std = model_mean_std(model)
    why = f" (the model runs only at its build size, not at {REPLKNET_SIZE} px)" if fixed and not input_size else ""
    return transform, size, f"bicubic resize to {side}x{side}{why}, no crop, normalise mean={mean} std={std}"


def effective_receptive_field(model: nn.Module, images: Union[Sequence[ImageSource], Tensor], *,
                              input_size: Union[int, Sequence[int], None] = None,
                              layer: Union[LayerLike, List[LayerLike], None] = None, convention: str = "replknet",
                              gradient: str = "relu", batch_size: int = 1, amp: Optional[str] = None,
                              label: Optional[str] = None, resume_dir: Optional[Path] = None,
                              progress: bool = True) -> ERFResult:
    """Mean ERF of ``model`` (on its own device) over ``images``, at one or more layers and input sizes.

    images: image sources or a tensor (N, 3, H, W) already prepared (one size). Sources are preprocessed per
    convention (module docstring): replknet resizes to ``input_size`` squared (None: 1024 px) without crop,
    kim2023 applies the model's timm eval transform at its pretrained input size, or at ``input_size`` when given;
    a list of sizes runs each (one run per size). layer: the output, a stage or block numbered from 0
    (``LayerRef(1)``, ``1`` or ``(1, 0)``) or a module path, see :func:`resolve_output_layer`; a list of them gives
    every layer's ERF from one forward pass per batch and one backward pass per layer, in one run.
    gradient: ``relu`` (the references') or ``abs``, applied to the input gradient (module docstring).
    amp: None, "bf16" or "fp16" (autocast on the model's device). resume_dir: the running sums are kept
    under ``resume_dir/<run key>/`` (:mod:`hpx_analysis.engine`), so a rerun with equal arguments resumes
    (a finished run is reused). Under ``torch.distributed`` every rank returns the full result.
    Returns an :class:`ERFResult` with one row per input size and layer (size-major).
    """
    _check_choices(convention, gradient)
    if amp is not None and amp not in AMP_DTYPES:
        raise HpxError(f"unknown autocast dtype '{amp}'; use {', '.join(AMP_DTYPES)}")
    sizes = list(input_size) if isinstance(input_size, (list, tuple)) else [input_size]
    for index, size in enumerate(sizes):
        if size is not None and size < 1:
            raise HpxError(f"input size must be a positive number of pixels, got {size}")
        if size in sizes[:index]:
            raise HpxError(f"input size {size} is given twice")
    if isinstance(images, Tensor) and len(sizes) > 1:
        raise HpxError("a prepared image tensor has one size; pass image files or arrays to compare input sizes")
    if len(sizes) > 1 and _runs_only_at_build_size(model):
        raise HpxError(f"{model_metadata(model).get('model')} runs only at its build size, so it takes one input "
                       f"size, not {len(sizes)}")
    paths = [resolve_output_layer(model, item) for item in (layer if isinstance(layer, list) else [layer])]
    if not paths:
        raise HpxError("no layer given: name at least one, or None for the last stage")
    for index, path in enumerate(paths):
        if path in paths[:index]:
            raise HpxError(f"layer '{path}' is named twice")
    settings = {"layers": paths, "input_sizes": sizes, "convention": convention, "gradient": gradient,
                "batch_size": batch_size, "amp": amp}
    label = label or str(model_metadata(model).get("model"))
    return ERFResult.combine([_erf_at_size(model, images, size, settings, label, resume_dir,
                                           progress) for size in sizes])


def _erf_at_size(model: nn.Module, images: Union[Sequence[ImageSource], Tensor], size: Optional[int],
                 settings: Dict[str, Any], label: str, resume_dir: Optional[Path], progress: bool) -> ERFResult:
    """The ERFs of ``settings["layers"]`` at input side ``size`` (one run): one row per layer."""
    if isinstance(images, Tensor):
        dataset, description = ImageDataset(images), "none (tensor given)"
        height, width = (int(side) for side in images.shape[-2:])
    else:
        transform, (height, width), description = _input_transform(model, settings["convention"], size)
        dataset = ImageDataset(images, transform)
    if not len(dataset):
        raise HpxError("no images to compute the ERF over")
    paths, convention = settings["layers"], settings["convention"]
    device = model_placement(model)[0]
    shared = {"input_size": [height, width], "size_override": size, "transform": description}

    def step(batch: Batch) -> Dict[str, Tensor]:
        """Per layer: the batch's sum of finite maps (L, H, W) float64, its counts of finite and non-finite maps
        (L,)."""
        maps = erf_gradient_maps_by_layer(model, batch.images.to(device), paths, convention,
                                          AMP_DTYPES.get(settings["amp"]), settings["gradient"]).double()
        finite = torch.isfinite(maps).flatten(2).all(dim=2)  # (L, B)
        return {"sum": torch.where(finite[:, :, None, None], maps, 0.0).sum(dim=1), "used": finite.sum(dim=1),
                "skipped_nonfinite": (~finite).sum(dim=1)}

    count = len(paths)
    run = run_batches(model, dataset, step, {"sum": SumOutput((count, height, width)),
                                             "used": SumOutput((count,), "int64"),
                                             "skipped_nonfinite": SumOutput((count,), "int64")},
                      batch_size=settings["batch_size"], resume_dir=resume_dir,
                      identity={"analysis": "erf", **shared,  # the other sizes asked for leave this run's sums alone
                                **{key: value for key, value in settings.items() if key != "input_sizes"}},
                      desc=f"ERF {label}" + (f" at {size} px" if len(settings["input_sizes"]) > 1 else ""),
                      progress=progress)
    rows, arrays = [], []
    for index, path in enumerate(paths):
        used, skipped = int(run.arrays["used"][index]), int(run.arrays["skipped_nonfinite"][index])
        if used == 0:
            raise HpxError(f"no image gave a finite ERF for {label} at layer '{path}' ({skipped} skipped, "
                           f"{len(run.unreadable)} unreadable)")
        mean_map = run.arrays["sum"][index] / used
        if convention == "kim2023":
            mean_map = mean_map / mean_map.sum() if mean_map.sum() > 0 else mean_map
        shown = display_map(mean_map, convention)
        row = {"maps": mean_map, "display": shown.astype(np.float32), "used": used, "skipped": skipped}
        entry: Dict[str, Any] = {"label": label, "model": model_metadata(model), "layer": path, **shared,
                                 "images_used": used, "images_skipped_nonfinite": skipped,
                                 "images_unreadable": len(run.unreadable), "area_ratios": area_ratios(shown),
                                 "run_key": run.key}
        if convention == "kim2023":
            row["radial_mass"] = radial_mass(mean_map)
            entry["gaussian"] = gaussian_fit(mean_map)
            entry["radial_mass"] = radial_mass_summary(mean_map)
        rows.append(entry)
        arrays.append(row)
    one_layer = {"layer": paths[0]} if count == 1 else {}
    return ERFResult(arrays={key: np.stack([row[key] for row in arrays]) for key in arrays[0]},
                     meta={"convention": convention, "models": rows,
                           "inputs": [dataset.name(i) for i in range(len(dataset))],
                           "options": {**settings, **shared, **one_layer, **run.counts}})


__all__ = ["AREA_THRESHOLDS", "CONVENTIONS", "GRADIENTS", "OPENERF_RADII", "RELATIVE_RADII", "REPLKNET_SIZE",
           "ROW_OPTIONS", "ERFResult", "area_ratios", "display_map", "effective_receptive_field",
           "erf_gradient_maps", "erf_gradient_maps_by_layer",
           "gaussian_fit", "mass_within", "radial_mass", "radial_mass_summary",
           "resolve_output_layer"]
