"""Scores of explanations: faithfulness (deletion and insertion, Petsiuk et al. 2018, RISE) and localisation against
object boxes (pointing game, Zhang et al. 2016; energy pointing game, Wang et al. 2020, Score-CAM).

Any relevance map (N, H, W) at the input resolution can be scored, so every explanation method's result
(:class:`~hpx_analysis.analyzers.methods.ExplanationResult`) is, and so is a map from elsewhere. The protocols are
written out in :func:`faithfulness`, :func:`pointing_game` and :func:`energy_pointing_game`, so that anyone can
recompute the numbers. :class:`ScoreTable` puts the scores of several models and methods on the same images side by
side, with the mean and its 95% bootstrap interval per score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..boxes import box_mask
from ..engine import Batch, ImageDataset, ItemOutput, SumOutput, array_digest, run_batches
from ..errors import HpxError
from ..results import ArrayField, Result, model_metadata
from .methods import REFERENCES, ExplanationResult, batch_target, reference_image, resolve_targets, to_model

METRICS = ("deletion", "insertion", "pointing", "energy-pointing")
"""The scores by their command-line names."""
CURVES = ("deletion", "insertion", "random_deletion", "random_insertion")
"""The curves of :class:`FaithfulnessResult`: map order, then the seeded random order."""
SCALARS = ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc", "pointing",
           "energy_pointing")
"""The per-image scores of :class:`ScoreTable`."""
BLUR_KERNEL_SIZE = 11
BLUR_SIGMA = 5.0
"""RISE's blur: torchvision's ``gaussian_blur(kernel_size=11, sigma=5)`` on the image before normalisation."""

MapsLike = Union[np.ndarray, Tensor, ExplanationResult]
"""Relevance maps (N, H, W) or (N, C, H, W) (averaged over C), or an explanation (its ``maps``)."""


def pixel_maps(maps: MapsLike, count: Optional[int] = None, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """``maps`` as float64 (N, H, W): a channel axis (N, C, H, W) averaged over in float64; one-line errors for
    another image count ``count``, another size ``size`` (H, W) or non-finite values."""
    if isinstance(maps, ExplanationResult):
        maps = maps.maps
    array = (maps.detach().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps)).astype(np.float64)
    if array.ndim == 4:
        array = array.mean(axis=1)
    if array.ndim != 3:
        raise HpxError(f"maps must be (N, H, W) or (N, C, H, W), got shape {array.shape}")
    if count is not None and len(array) != count:
        raise HpxError(f"{len(array)} maps for {count} images")
    if size is not None and array.shape[1:] != tuple(size):
        raise HpxError(f"maps of {array.shape[1]} x {array.shape[2]} px for images of {size[0]} x {size[1]} px: "
                       "maps must be at the input resolution")
    if not np.isfinite(array).all():
        raise HpxError("maps hold non-finite values")
    return array


def pixel_order(relevance: np.ndarray) -> np.ndarray:
    """Flat pixel indices (H * W,) of one map (H, W), most relevant first, ties by flat index."""
    return np.argsort(-relevance.ravel().astype(np.float64), kind="stable")


def random_order(seed: int, index: int, pixels: int) -> np.ndarray:
    """The baseline's pixel order (pixels,) of image ``index``: ``numpy.random.default_rng([seed, index])``'s
    permutation, so it depends on neither the batches nor the other images."""
    return np.random.default_rng([seed, index]).permutation(pixels)


def trapezoid_auc(curves: np.ndarray) -> np.ndarray:
    """Area under curves (..., steps + 1) sampled at x = k / steps, by the trapezoid rule: (...)."""
    steps = curves.shape[-1] - 1
    return (curves[..., :-1] + curves[..., 1:]).sum(-1) / (2 * steps)


def replacement(images: Tensor, kind: str, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The image (N, 3, H, W) whose pixels replace those of normalised ``images`` (N, 3, H, W), normalised.

    black: zeros before normalisation; mean: the normalisation mean (:func:`.methods.reference_image`); blur: RISE's
    blur (:data:`BLUR_KERNEL_SIZE`, :data:`BLUR_SIGMA`) of the image before normalisation, normalised again.
    """
    if kind != "blur":
        return reference_image(images, kind, mean, std)
    from torchvision.transforms.functional import gaussian_blur

    from ..images import normalise
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    blurred = gaussian_blur(images * std_t + mean_t, [BLUR_KERNEL_SIZE] * 2, [BLUR_SIGMA] * 2)
    return normalise(blurred, mean, std)


class FaithfulnessResult(Result):
    """Deletion and insertion curves: ``deletion``, ``insertion`` (N, steps + 1) in the map's pixel order,
    ``random_deletion``, ``random_insertion`` in the seeded random order, the area under each (``deletion_auc``, ...,
    (N,)) and ``targets`` (N,). meta: ``model``, ``method`` (of the scored explanation, when known), ``images``,
    ``options``."""

    kind = "faithfulness"

    deletion = ArrayField()
    insertion = ArrayField()
    random_deletion = ArrayField()
    random_insertion = ArrayField()
    deletion_auc = ArrayField()
    insertion_auc = ArrayField()
    random_deletion_auc = ArrayField()
    random_insertion_auc = ArrayField()
    targets = ArrayField()

    @property
    def steps(self) -> int:
        return self.arrays["deletion"].shape[1] - 1


def _variant_plan(steps: int, pixels: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """What one image's forwards are and where the curves read them.

    Returns the plan (V, 4): per forward (base, substitute, order, count): the ``base`` image with its first
    ``count`` pixels in ``order`` (0: the map's, 1: random) taken from the ``substitute``, both indexing the sources
    (clean, deletion reference, insertion start); and per curve its (steps + 1,) row indices into the plan. The
    clean image, the deletion end (all replaced) and the insertion start are shared by both orders, so
    V = 4 * steps - 1.
    """
    counts = np.arange(steps + 1) * pixels // steps
    plan = [(0, 0, 0, 0), (0, 1, 0, pixels), (2, 2, 0, 0)]  # clean, deletion end, insertion start
    rows = {}
    for order, prefix in ((0, ""), (1, "random_")):
        for curve, (base, substitute, first, last) in (("deletion", (0, 1, 0, 1)), ("insertion", (2, 0, 2, 0))):
            start = len(plan)
            plan += [(base, substitute, order, int(count)) for count in counts[1:-1]]
            rows[prefix + curve] = np.array([first, *range(start, len(plan)), last])
    return np.array(plan, dtype=np.int64), rows


def faithfulness(model: nn.Module, images: Tensor, maps: MapsLike, *, target: Optional[int | Sequence[int]] = None,
                 steps: int = 100, deletion_reference: str = "black", insertion_start: str = "blur",
                 batch_size: int = 16, resume_dir: Optional[Path | str] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, seed: int = 0, names: Optional[Sequence[str]] = None,
                 progress: bool = False) -> FaithfulnessResult:
    """Deletion and insertion curves (RISE) of normalised ``images`` (N, 3, H, W) under relevance ``maps``.

    The protocol:

    - ``images`` are model inputs, normalised with ``mean`` / ``std`` (default the model's); ``x * std + mean`` is
      the image before normalisation. ``maps`` (N, H, W) at the input resolution, or (N, C, H, W) averaged over C
      (in float64), or an explanation result (its ``maps``).
    - Pixel order: the map's pixels, highest first, ties by flat index:
      ``np.argsort(-map.ravel().astype(np.float64), kind="stable")``; the baseline's order for image i is
      ``np.random.default_rng([seed, i]).permutation(H * W)``.
    - At step k = 0..steps the first ``k * H * W // steps`` pixels of the order are replaced, all three channels.
      Deletion replaces them in the image by the ``deletion_reference``: ``black``, zeros before normalisation;
      ``mean``, the normalisation mean; ``blur``, the blurred image. Insertion starts from the
      ``insertion_start`` (same choices; default the blurred image) and puts the image's pixels back. The blur is
      torchvision's ``gaussian_blur(kernel_size=11, sigma=5)`` on the image before normalisation.
    - The score is the softmax probability of the target (``target``: one class or one per image; default the
      clean image's top-1); the AUC is the trapezoid rule over x = k / steps.

    The clean image, the deletion end and the insertion start serve both orders, so an image costs
    4 * steps - 1 forwards (399 at 100 steps: under steps + 1 per curve), run ``batch_size`` at a time; the
    variants of several images share one forward when ``batch_size`` exceeds one image's. On the run layer
    (:func:`..engine.run_batches`): resumable under ``resume_dir`` (keyed on the model, images, maps and every
    option) and sharded under torchrun. Returns a :class:`FaithfulnessResult`.
    """
    from ..images import model_mean_std

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise HpxError(f"steps must be a whole number of at least 1, got {steps!r}")
    for option, kind in (("deletion_reference", deletion_reference), ("insertion_start", insertion_start)):
        if kind not in REFERENCES:
            raise HpxError(f"unknown {option} '{kind}'; use one of {', '.join(REFERENCES)}")
    if seed < 0:
        raise HpxError(f"seed must be non-negative, got {seed}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise HpxError(f"images must be normalised (N, 3, H, W), got shape {tuple(images.shape)}")
    pixels = images.shape[-2] * images.shape[-1]
    if steps > max(pixels, 1000):  # steps beyond the pixel count only repeat curve points, at 4 forwards each
        raise HpxError(f"steps ({steps}) must be at most 1000 or the number of pixels ({pixels})")
    if batch_size < 1:
        raise HpxError(f"batch size must be at least 1, got {batch_size}")
    if min(images.shape[-2:]) <= BLUR_KERNEL_SIZE // 2 and "blur" in (deletion_reference, insertion_start):
        raise HpxError(f"the blur needs images larger than {BLUR_KERNEL_SIZE // 2} px a side")
    if mean is None or std is None:
        mean, std = model_mean_std(model)
    count, (height, width) = len(images), images.shape[-2:]
    relevance = pixel_maps(maps, count, (height, width))
    method = maps.method if isinstance(maps, ExplanationResult) else None
    names = names if names is not None or not isinstance(maps, ExplanationResult) else maps.meta.get("images")
    batch_target(target, range(count), count)  # a wrong number of targets fails before any work
    pixels = height * width
    plan, rows = _variant_plan(steps, pixels)

    @torch.no_grad()
    def step(batch: Batch) -> Dict[str, Tensor]:
        x, indices = to_model(model, batch.images), batch.indices.tolist()
        sources = torch.stack([x, replacement(x, deletion_reference, mean, std),
                               replacement(x, insertion_start, mean, std)], 1)  # (B, 3 sources, 3, H, W)
        ranks = np.empty((len(indices), 2, pixels), dtype=np.int64)  # each pixel's place in each order
        for b, i in enumerate(indices):
            for order, pixel_list in enumerate((pixel_order(relevance[i]), random_order(seed, i, pixels))):
                ranks[b, order, pixel_list] = np.arange(pixels)
        ranks_t = torch.from_numpy(ranks).to(x.device)
        jobs = torch.from_numpy(np.concatenate([np.c_[np.full(len(plan), b), plan] for b in range(len(indices))]))
        probs = []
        for chunk in jobs.to(x.device).split(batch_size):
            image, base, substitute, order, taken = chunk.T
            replaced = (ranks_t[image, order] < taken[:, None]).view(-1, 1, height, width)
            variants = torch.where(replaced, sources[image, substitute], sources[image, base])
            probs.append(model(variants).softmax(-1).double())
        probs = torch.cat(probs).view(len(indices), len(plan), -1)
        targets = resolve_targets(probs[:, 0], batch_target(target, indices, count))
        scores = probs.gather(2, targets.view(-1, 1, 1).expand(-1, len(plan), 1))[..., 0]  # (B, V)
        curves = torch.stack([scores[:, torch.from_numpy(rows[curve]).to(x.device)] for curve in CURVES], 1)
        return {"curves": curves, "targets": targets, "forwards": torch.tensor(len(jobs))}

    outputs = {"curves": ItemOutput((len(CURVES), steps + 1)), "targets": ItemOutput((), "int64"),
               "forwards": SumOutput((), "int64")}
    options = {"steps": steps, "deletion_reference": deletion_reference, "insertion_start": insertion_start,
               "seed": seed, "target": target, "mean": list(mean), "std": list(std), "forward_batch": batch_size,
               "blur": {"kernel_size": BLUR_KERNEL_SIZE, "sigma": BLUR_SIGMA}}
    run = run_batches(model, ImageDataset(images.detach().cpu()), step, outputs,
                      batch_size=max(1, batch_size // len(plan)), resume_dir=resume_dir,
                      identity={"analysis": "faithfulness", "maps": array_digest(relevance), **options},
                      desc="faithfulness", progress=progress)
    curves = {curve: run.arrays["curves"][:, c] for c, curve in enumerate(CURVES)}
    return FaithfulnessResult(
        arrays={**curves, **{f"{curve}_auc": trapezoid_auc(values) for curve, values in curves.items()},
                "targets": run.arrays["targets"]},
        meta={"model": model_metadata(model), "method": method,
              "images": list(names) if names is not None else [str(i) for i in range(count)],
              "options": {**options, "forwards_per_image": int(run.arrays["forwards"]) / max(count, 1), **run.counts,
                          "run_key": run.key}})


# -- localisation --------------------------------------------------------------------------------

BoxesPerImage = Sequence[Optional[np.ndarray]]
"""Per image its boxes (K, 4) ``xmin, ymin, xmax, ymax`` in input pixel-edge coordinates
(:func:`hpx_analysis.boxes.transform_boxes`), or None when it has none."""


def _box_masks(boxes: BoxesPerImage, count: int, size: Tuple[int, int]) -> List[Optional[np.ndarray]]:
    """Per image the mask (H, W) of its boxes (:func:`..boxes.box_mask`), None when it has no box in the input."""
    if len(boxes) != count:
        raise HpxError(f"{len(boxes)} box lists for {count} maps")
    masks = [None if b is None or not len(b) else box_mask(b, size) for b in boxes]
    return [None if m is None or not m.any() else m for m in masks]


def pointing_game(maps: MapsLike, boxes: BoxesPerImage, *, tolerance: float = 0.0) -> np.ndarray:
    """Pointing game (Zhang et al. 2016) per image (N,): 1.0 a hit, 0.0 a miss, NaN for an image with no box or a
    constant map (it has no maximum: an empty explanation points nowhere).

    The map's maximum is its first pixel in flat order among the largest values (``argmax``, the first pixel of
    :func:`faithfulness`'s order); a hit when that pixel lies in a box (its centre inside; :mod:`..boxes`), or within
    ``tolerance`` px of a pixel that does (Euclidean distance between pixel centres; the original uses 15 px).
    """
    from scipy.ndimage import distance_transform_edt

    relevance = pixel_maps(maps)
    hits = np.full(len(relevance), np.nan)
    for i, mask in enumerate(_box_masks(boxes, len(relevance), relevance.shape[1:])):
        if mask is not None and relevance[i].max() > relevance[i].min():
            row, column = np.unravel_index(np.argmax(relevance[i]), mask.shape)
            hits[i] = float(mask[row, column] if tolerance <= 0 else
                            distance_transform_edt(~mask)[row, column] <= tolerance)
    return hits


def energy_pointing_game(maps: MapsLike, boxes: BoxesPerImage) -> np.ndarray:
    """Energy pointing game per image (N,): the share of the map's positive mass ``sum(max(map, 0))`` on the
    pixels inside the boxes; NaN for an image with no box or no positive mass."""
    relevance = np.clip(pixel_maps(maps), 0, None)
    shares = np.full(len(relevance), np.nan)
    for i, mask in enumerate(_box_masks(boxes, len(relevance), relevance.shape[1:])):
        total = relevance[i].sum()
        if mask is not None and total > 0:
            shares[i] = relevance[i][mask].sum() / total
    return shares


class LocalisationResult(Result):
    """Localisation scores per image: ``pointing`` and ``energy_pointing`` (N,) (NaN: no box), ``boxes`` (K, 5): image
    index and ``xmin, ymin, xmax, ymax`` in input pixels. meta: ``method``, ``images``, ``options``."""

    kind = "localisation"

    pointing = ArrayField()
    energy_pointing = ArrayField()


def localisation(maps: MapsLike, boxes: BoxesPerImage, *, tolerance: float = 0.0,
                 names: Optional[Sequence[str]] = None) -> LocalisationResult:
    """:func:`pointing_game` (with ``tolerance``) and :func:`energy_pointing_game` of ``maps`` (N, H, W) against
    ``boxes`` (per image (K, 4) in input pixels, or None), as a :class:`LocalisationResult`."""
    relevance = pixel_maps(maps)
    method = maps.method if isinstance(maps, ExplanationResult) else None
    names = names if names is not None or not isinstance(maps, ExplanationResult) else maps.meta.get("images")
    table = [np.c_[np.full(len(b), i), b] for i, b in enumerate(boxes) if b is not None and len(b)]
    return LocalisationResult(
        arrays={"pointing": pointing_game(relevance, boxes, tolerance=tolerance),
                "energy_pointing": energy_pointing_game(relevance, boxes),
                "boxes": np.concatenate(table) if table else np.zeros((0, 5))},
        meta={"method": method, "images": list(names) if names is not None else [str(i) for i in range(len(boxes))],
              "options": {"tolerance": tolerance}})


# -- several models and methods side by side -----------------------------------------------------

class ScoreTable(Result):
    """Scores of several (model, method) entries on the same images.

    arrays: per score of :data:`SCALARS` that was computed, (E, N) per image (NaN where undefined); the curves of
    :data:`CURVES` (E, N, steps + 1) when faithfulness was scored. meta: ``entries`` (model label and method per
    row), ``images``, ``summary`` (per score and entry: ``mean``, ``ci_low``, ``ci_high`` (95% percentile bootstrap
    of the mean over the images that have the score), ``n``), ``options``.
    """

    kind = "explanation_scores"

    @property
    def entries(self) -> List[Dict[str, str]]:
        return self.meta["entries"]

    @property
    def scores(self) -> List[str]:
        """The per-image scores held, in :data:`SCALARS` order."""
        return [name for name in SCALARS if name in self.arrays]

    @property
    def summary(self) -> Dict[str, List[Dict[str, float]]]:
        return self.meta["summary"]


def score_table(entries: Sequence[Tuple[str, str, Optional[FaithfulnessResult], Optional[LocalisationResult]]], *,
                n_resamples: int = 1000, seed: int = 0) -> ScoreTable:
    """The :class:`ScoreTable` of ``entries``: (model label, method, faithfulness or None, localisation or None),
    each scored on the same images, every entry with the same kinds of score."""
    from ..statistics import bootstrap_ci

    if not entries:
        raise HpxError("no scores to tabulate")
    kinds = {(f is None, loc is None) for _, _, f, loc in entries}
    if len(kinds) != 1 or kinds == {(True, True)}:
        raise HpxError("every entry of a score table needs the same scores")
    first = next(r for r in entries[0][2:] if r is not None)
    counts = {len(r.meta["images"]) for _, _, *results in entries for r in results if r is not None}
    if len(counts) != 1:
        raise HpxError(f"the entries score different numbers of images: {sorted(counts)}")
    arrays: Dict[str, np.ndarray] = {}
    if entries[0][2] is not None:
        if len({f.steps for _, _, f, _ in entries}) != 1:
            raise HpxError("the entries' deletion and insertion curves have different numbers of steps")
        for name in (*CURVES, *SCALARS[:4]):
            arrays[name] = np.stack([f.arrays[name] for _, _, f, _ in entries])
    if entries[0][3] is not None:
        for name in SCALARS[4:]:
            arrays[name] = np.stack([loc.arrays[name] for _, _, _, loc in entries])
    summary: Dict[str, List[Dict[str, float]]] = {}
    for name in (name for name in SCALARS if name in arrays):
        summary[name] = []
        for row in arrays[name]:
            values = row[np.isfinite(row)]
            low, high = bootstrap_ci(values[None], n_resamples, seed)[0] if len(values) else (np.nan, np.nan)
            summary[name].append({"mean": float(values.mean()) if len(values) else np.nan, "ci_low": float(low),
                                  "ci_high": float(high), "n": int(len(values))})
    options: Dict[str, Any] = {"n_resamples": n_resamples, "seed": seed,
                               "ci": "95% percentile bootstrap of the mean over images (scipy.stats.bootstrap)"}
    for label, result in (("faithfulness", entries[0][2]), ("localisation", entries[0][3])):
        if result is not None:
            options[label] = result.meta["options"]
    return ScoreTable(arrays=arrays, meta={"entries": [{"model": label, "method": method}
                                                       for label, method, *_ in entries],
                                           "images": first.meta["images"], "summary": summary, "options": options})


__all__ = ["METRICS", "CURVES", "SCALARS", "BLUR_KERNEL_SIZE", "BLUR_SIGMA", "MapsLike", "pixel_maps", "pixel_order",
           "random_order", "trapezoid_auc", "replacement", "FaithfulnessResult", "faithfulness", "BoxesPerImage",
           "pointing_game", "energy_pointing_game", "LocalisationResult", "localisation", "ScoreTable", "score_table"]
