"""Window truncation: accuracy when the long kernels of one stage are cut to a relative size (paper Fig. 6).

For a relative size r every long-kernel tap of the stage's HyenaPixel layers whose distance from the
kernel centre exceeds r * F / 2 is zeroed (F: the stage's feature-map side at the evaluation
resolution; a disc, or a centred square with ``shape="square"``). r = 0 keeps only the centre tap
(plus the skip term). On the scale of the coverage analyzer (extent in taps / F), truncating at
r = coverage keeps every tap the learned window keeps (square map, extent not capped at the kernel
size: r * F / 2 = d + 1/2 for the window's largest kept distance d), plus the taps with
d < distance <= d + 1/2 the window drops.

SLaK and RepLKNet large kernels (``large_conv``) are cut the same way on their effective kernel (K x K, the
BN-fused sum of the branches), so a truncated block runs as one depthwise convolution with the masked kernel and
its effective bias (``models.large_kernel.EffectiveKernelFilter``); their coverage K / F keeps every tap at r = K / F
with ``shape="square"``, the inscribed disc with a disc.

Hyena N-D ViTs (``hyena_nd``) are cut the same way on the kernel each block applies, laid on its centred
(2L-1) x (2L-1) canvas (F = L tokens per side; a quadrant, or four for ``4dir``), so r = 0 keeps the centre tap
and the skip. A ViT has one stage: a swept group is then a block or a range of blocks (``S1B1-6``), by default all
its Hyena N-D blocks together, and the activations entering the group's first block are shared.

Hyena 1D layers convolve the row-major flattened map (L = H * W), and their cut is chosen with
``hb_cut``:

- ``"wrap"`` (default): the nearest-wrap mask. Tap offset d is kept when its nearest 2D displacement
  (a, b), a * W + b = d with |b| <= W / 2 (on a tie |b| = W / 2 the one with the smaller |a|, so the
  mask is symmetric in d), lies in the disc (or square) of relative size r, as for HyenaPixel. It is
  still a convolution, and at every evaluation pixel at least r * W / 2 from the left and right edges
  (r * F / 2 on a square map) it weights exactly the pixels of the 2D disc; nearer those edges some
  of its taps wrap to the neighbouring rows.
- ``"offset"``: |d| <= r * L / 2 on the flattened offset, i.e. a band of +-rF/2 full-width rows seen
  from the centre pixel (not on the r axis of the 2D layers; no ``square``). Truncating a
  bidirectional layer at r = its coverage keeps exactly the taps its window keeps.

The default sizes run from 0 in steps of 0.1 to the smallest r that keeps every tap of the swept
stages, which is their last point (the untruncated model).

Work that a truncation cannot change is done once: the activations entering a stage are computed
once per batch and shared by every r (and by every stage of the sweep); sizes that keep the same
taps are evaluated once; the masked kernels replace the filters' kernels (``override_kernel``), so the
implicit filters are evaluated once per run. Per-batch correctness flags are saved in a cache
folder, so an interrupted run resumes; under ``torchrun`` every rank takes every world-th batch and
the flags are all-reduced.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..datasets import LabelledImage
from ..devices import model_placement
from ..engine import Batch, ImageDataset, ItemOutput, RunOutputs, run_batches
from ..errors import HpxError
from ..images import ImageSource, eval_transform
from ..inspection import MixerInfo, kernel, list_mixers, select_mixers
from ..interventions import TOLERANCE, check_cut, kept_taps, relative_tap_distance
from ..layer_names import GroupLike, LayerRef, group_label, group_refs
from ..results import Result, model_metadata, write_rows_csv
from ..statistics import bootstrap_ci

if TYPE_CHECKING:
    from .coverage import CoverageResult

SIZE_STEP = 0.1


class TruncationResult(Result):
    """Accuracy per (stage, relative size) and of the untruncated model, with 95% bootstrap intervals.

    One curve per swept group: a stage, a block or a range of blocks (a ViT has one stage, its blocks).
    arrays: ``stages`` (S,) each group's 0-based stage, ``sizes`` (R,), ``top1``/``top5`` (S, R), ``top1_ci``/``top5_ci``
    (S, R, 2), ``kept_fraction`` (S, R) share of the group's long-kernel taps kept,
    ``reference`` (2,) untruncated top-1/top-5 and ``reference_ci`` (2, 2), ``coverage`` (S,) the
    group's mean learned coverage (coverage analyzer; NaN for a group with Hyena 1D layers unless
    they are bidirectional and cut by offset, or with one-sided Hyena N-D blocks: their coverage is no r of the cut),
    ``top1_correct`` / ``top5_correct`` (1 + S * R,) correct counts, column 0 untruncated, then
    stage-major.
    meta: ``groups`` (labels), ``shape``, ``hb_cut``, ``every_tap_size`` per group (the smallest r keeping every
    tap), ``layer_kinds`` per group, ``sequence_layers`` per group (whether it holds kernels on the flattened map, cut
    by ``hb_cut``), and the evaluation details.
    """

    kind = "truncation"

    @property
    def groups(self) -> List[str]:
        """The swept groups' labels in the paper's numbering (``S3``, ``S1 B1-6``), one per curve."""
        return self.meta.get("groups") or [f"S{int(stage) + 1}" for stage in self.arrays["stages"]]

    def rows(self) -> List[Dict[str, float]]:
        """One row per (group, size), stages numbered from 1 as in the paper."""
        a = self.arrays
        rows = []
        for i, (stage, group) in enumerate(zip(a["stages"], self.groups)):
            for j, size in enumerate(a["sizes"]):
                rows.append({"stage": int(stage) + 1, "layers": group, "relative_size": float(size),
                             "top1": float(a["top1"][i, j]), "top1_low": float(a["top1_ci"][i, j, 0]),
                             "top1_high": float(a["top1_ci"][i, j, 1]), "top5": float(a["top5"][i, j]),
                             "top5_low": float(a["top5_ci"][i, j, 0]), "top5_high": float(a["top5_ci"][i, j, 1]),
                             "kept_fraction": float(a["kept_fraction"][i, j]),
                             "reference_top1": float(a["reference"][0]), "reference_top5": float(a["reference"][1]),
                             "images": int(self.meta["images_evaluated"])})
        return rows

    def write_csv(self, path: Path | str) -> Path:
        """Every number of :meth:`rows` as CSV."""
        return write_rows_csv(self.rows(), path)


def sizes_up_to(every_tap: float, step: float = SIZE_STEP) -> List[float]:
    """0, step, 2 step, ... below ``every_tap``, then ``every_tap`` itself (every tap kept)."""
    grid = [round(step * i, 10) for i in range(int(every_tap / step) + 1)]
    return [size for size in grid if size < every_tap - TOLERANCE] + [every_tap]


def default_sizes(model: nn.Module, stages: Optional[Sequence[GroupLike]] = None, shape: str = "disc",
                  hb_cut: str = "wrap", input_size: Union[int, Sequence[int], None] = None) -> List[float]:
    """The sweep's default sizes: 0 to the smallest r that keeps every tap of the swept ``stages`` (0-based stages,
    blocks or block ranges, :data:`GroupLike`; None: every stage with long filters) in steps of 0.1, that r being
    the last point. input_size: evaluation resolution (the model's default when None)."""
    from ..models.zoo import default_input_size
    size = input_size if input_size is not None else default_input_size(model)
    swept = _swept_layers(model, stages, size)
    return sizes_up_to(max(float(relative_tap_distance(info, shape, hb_cut).max())
                           for group in swept for info in group.layers))


def _distinct_truncations(distances: Sequence[Tensor], sizes: Sequence[float]
                          ) -> Tuple[List[int], List[Optional[Tuple[int, ...]]]]:
    """Per size the index of its distinct tap set, and per distinct set its kept-tap counts
    (None for the set that keeps every tap, i.e. the untruncated model)."""
    keys: List[Optional[Tuple[int, ...]]] = []
    column = []
    for size in sizes:
        counts = tuple(int(kept_taps(d, size).sum()) for d in distances)
        key = None if all(c == d.numel() for c, d in zip(counts, distances)) else counts
        if key not in keys:
            keys.append(key)
        column.append(keys.index(key))
    return column, keys


class _StagePlan:
    """The long-filter layers of one swept group (a stage, a block, a range of blocks), their masks per distinct
    truncation and their base kernels. ``stage``: the group's 0-based stage; ``entry``: the index of the step
    (:func:`_model_steps`) the group's activations enter; ``label``: the group's name in the paper's numbering."""

    def __init__(self, group: "_Group", sizes: Sequence[float], shape: str, hb_cut: str):
        self.label, self.stage, self.entry, self.layers = group.label, group.stage, group.entry, group.layers
        distances = [relative_tap_distance(info, shape, hb_cut) for info in self.layers]
        self.every_tap = max(float(d.max()) for d in distances)  # the smallest size keeping every tap
        self.column, keys = _distinct_truncations(distances, sizes)
        self.full = keys.index(None) if None in keys else None
        self.masks: List[Optional[Dict[int, Tensor]]] = [
            None if key is None else {info.index: kept_taps(d, sizes[self.column.index(k)])
                                      for info, d in zip(self.layers, distances)}
            for k, key in enumerate(keys)]
        total = sum(d.numel() for d in distances)
        self.kept_fraction = [1.0 if self.masks[k] is None else
                              sum(int(m.sum()) for m in self.masks[k].values()) / total for k in self.column]
        self.base = {info.index: kernel(info) for info in self.layers}

    def masked_forward(self, model: nn.Module, entering: Tensor, distinct: int) -> Tensor:
        """Logits (B, classes) with truncation ``distinct`` applied, from the activations entering the group."""
        masks = self.masks[distinct]
        with contextlib.ExitStack() as overrides:
            for info in self.layers:
                base = self.base[info.index]
                mask = masks[info.index].to(base.device, base.dtype)
                overrides.enter_context(info.long_filter.override_kernel(base * mask))
            x = entering
            for step in _model_steps(model).steps[self.entry:]:
                x = step(x)
            return model.forward_head(x)


def _correct(logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Top-1 and top-k (k = min(5, classes)) correctness (B,) as uint8."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return hits[:, 0].to(torch.uint8), hits.any(dim=1).to(torch.uint8)


@torch.no_grad()
def _evaluate_batch(model: nn.Module, images: Tensor, labels: Tensor, plans: Sequence[_StagePlan]
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Correctness (B, 1 + stages * sizes) for top-1 and top-5: column 0 the untruncated model."""
    steps = _model_steps(model)
    x = steps.stem(images)
    entering = []
    for step in steps.steps:
        entering.append(x)
        x = step(x)
    reference = _correct(model.forward_head(x), labels)
    top1, top5 = [reference[0]], [reference[1]]
    for plan in plans:
        distinct = [reference if d == plan.full else
                    _correct(plan.masked_forward(model, entering[plan.entry], d), labels)
                    for d in range(len(plan.masks))]
        top1 += [distinct[d][0] for d in plan.column]
        top5 += [distinct[d][1] for d in plan.column]
    return torch.stack(top1, 1).cpu().numpy(), torch.stack(top5, 1).cpu().numpy()


@dataclass
class _ModelSteps:
    """How a model runs in turn: ``stem``, then ``steps``, then ``forward_head``; ``entry(info)`` is the index of
    the step a layer's input enters (its stage, or its block in a ViT)."""

    stem: Callable[[Tensor], Tensor]
    steps: List[Callable[[Tensor], Tensor]]
    entry: Callable[[MixerInfo], int]


def _model_steps(model: nn.Module) -> _ModelSteps:
    """The model's ``stage_steps()`` where it has one (SLaK and RepLKNet downsample between their ``stages``), else
    ``stem`` and ``stages``; a timm ViT (the Hyena N-D models) steps block by block through its public attributes
    (the tokens entering the first block from ``forward_features``, each block, the final norm after the last)."""
    if hasattr(model, "stage_steps"):
        stem, steps = model.stage_steps()
        return _ModelSteps(stem, list(steps), lambda info: info.stage)
    if hasattr(model, "stages") and hasattr(model, "stem"):
        return _ModelSteps(model.stem, list(model.stages), lambda info: info.stage)
    if isinstance(model, VisionTransformer):
        def embed(x: Tensor) -> Tensor:  # timm's public forward_features, stopped where the first block starts
            return _input_of(model.blocks[0], model.forward_features, x)

        def last_block(x: Tensor) -> Tensor:
            return model.norm(model.blocks[-1](x))

        return _ModelSteps(embed, [*model.blocks[:-1], last_block], lambda info: info.block)
    raise HpxError(f"{type(model).__name__} is neither a model with stages nor a ViT; truncation needs one")


class _Entered(Exception):
    """Carries the input a module was called with, out of the forward pass that called it."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


def _input_of(module: nn.Module, forward: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """The first input ``module`` receives while ``forward(x)`` runs; nothing after it is computed."""
    def stop(_module: nn.Module, args: tuple) -> None:
        raise _Entered(args[0])

    handle = module.register_forward_pre_hook(stop)
    try:
        forward(x)
    except _Entered as entered:
        return entered.value
    finally:
        handle.remove()
    raise HpxError(f"{type(module).__name__} is not called by {getattr(forward, '__name__', 'the forward pass')}")


@dataclass
class _Group:
    """One swept group: its label, 0-based stage, entry step and long-filter layers."""

    label: str
    stage: int
    entry: int
    layers: List[MixerInfo]


def _swept_layers(model: nn.Module, stages: Optional[Sequence[GroupLike]], input_size: Union[int, Sequence[int]]
                  ) -> List[_Group]:
    """The groups to sweep: each entry of ``stages`` (:data:`GroupLike`), or None for every stage with long filters
    (the whole network for a ViT)."""
    steps = _model_steps(model)
    infos = list_mixers(model, input_size)
    layers = [info for info in infos if info.long_filter is not None]
    if not layers:
        raise HpxError("the model has no long filters (HyenaPixel, Hyena, Hyena N-D or large kernels) to truncate")
    groups = [[LayerRef(stage)] for stage in sorted({info.stage for info in layers})] if stages is None else [
        group_refs(group) for group in stages]
    swept = []
    for refs in groups:
        chosen = [info for info in layers if any(ref.matches(info) for ref in refs)]
        select_mixers(infos, refs, long_filters_only=not chosen)  # HpxError: says what is missing
        if len({info.stage for info in chosen}) > 1:
            raise HpxError(f"{group_label(refs)} spans several stages; truncate one stage (or blocks of one) at a time")
        swept.append(_Group(group_label(refs), chosen[0].stage, min(steps.entry(info) for info in chosen), chosen))
    labels = [group.label for group in swept]
    if len(set(labels)) < len(labels):
        raise HpxError(f"a group is given twice: {', '.join(labels)}")
    return swept


def _stage_plans(model: nn.Module, stages: Optional[Sequence[GroupLike]], sizes: Sequence[float], shape: str,
                 input_hw: Tuple[int, int], hb_cut: str = "wrap") -> List[_StagePlan]:
    """One plan per swept group (see :func:`_swept_layers`)."""
    return [_StagePlan(group, sizes, shape, hb_cut) for group in _swept_layers(model, stages, input_hw)]


def truncation_sweep(model: nn.Module, samples: Sequence[LabelledImage], stages: Optional[Sequence[GroupLike]] = None,
                     sizes: Optional[Sequence[float]] = None, shape: str = "disc", *, hb_cut: str = "wrap",
                     batch_size: int = 32, input_size: Optional[int] = None, resume_dir: Optional[Path | str] = None,
                     strict: bool = False, workers: int = 0, n_resamples: int = 1000, seed: int = 0,
                     progress: bool = True) -> TruncationResult:
    """Top-1/top-5 accuracy on ``samples`` for every relative size in ``sizes`` and stage in ``stages``.

    stages: the groups swept, one curve each (:data:`GroupLike`, numbered from 0: stage indices, blocks such as
    ``LayerRef(0, 3)``, block ranges such as ``"S1B1-6"``, or lists of these; None: every stage with long filters,
    for a ViT all its Hyena N-D blocks together). sizes: relative sizes
    (None: :func:`default_sizes`, 0 to every tap kept). hb_cut: ``"wrap"`` (nearest-wrap disc) or
    ``"offset"`` for Hyena 1D layers (module docstring). The model runs on the device of its
    parameters. resume_dir: the run's state is kept under ``resume_dir/<run key>/`` (:mod:`..engine`),
    so a rerun with the same arguments skips finished batches. strict: an unreadable image raises instead of being
    skipped. Under ``torch.distributed`` each rank evaluates every world-th batch; every rank
    returns the full result.
    """
    check_cut(shape, hb_cut)
    if sizes is not None and (not sizes or any(not np.isfinite(s) or s < 0 for s in sizes)):
        raise HpxError("relative sizes must be finite and non-negative")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and samples and max(s.label for s in samples) >= num_classes:
        raise HpxError(f"labels reach {max(s.label for s in samples)} but the model has {num_classes} classes")
    transform, input_hw = eval_transform(model, input_size)
    device = model_placement(model)[0]
    if sizes is None:
        sizes = default_sizes(model, stages, shape, hb_cut, input_hw)
    sizes = [float(s) for s in sizes]
    plans = _stage_plans(model, stages, sizes, shape, input_hw, hb_cut)
    settings = 1 + len(plans) * len(sizes)

    def step(batch: Batch) -> Dict[str, np.ndarray]:
        top1, top5 = _evaluate_batch(model, batch.images.to(device), batch.labels.to(device), plans)
        return {"top1": top1, "top5": top5}

    dataset = ImageDataset([ImageSource(name=s.name, path=s.path) for s in samples], transform,
                           labels=[s.label for s in samples])
    identity = {"analysis": "truncation", "stages": [p.label for p in plans], "sizes": sizes, "shape": shape,
                "hb_cut": hb_cut, "input": list(input_hw)}
    run = run_batches(model, dataset, step, {"top1": ItemOutput((settings,), "int32"),
                                             "top5": ItemOutput((settings,), "int32")},
                      batch_size=batch_size, resume_dir=resume_dir, identity=identity, strict=strict, workers=workers,
                      desc="truncation sweep", progress=progress)
    return _summarise(model, samples, plans, sizes, shape, hb_cut, run,
                      dict(batch_size=batch_size, input_size=list(input_hw), n_resamples=n_resamples, seed=seed,
                           **run.counts, run_key=run.key))


def _coverage_on_r_axis(coverage: CoverageResult, plan: _StagePlan, hb_cut: str) -> float:
    """The group's mean learned coverage where it is a relative size of the cut, else NaN: kernels around their
    centre (HyenaPixel, large kernels, ``4dir`` Hyena N-D); bidirectional sequence kernels (Hyena 1D) under the
    offset cut. A one-sided (causal) kernel's coverage, reach + 1 taps over F, is no r of a centred disc."""
    def on_axis(info: MixerInfo) -> bool:
        filt = info.long_filter
        return not filt.one_sided and (not filt.on_sequence or hb_cut == "offset")

    if not all(map(on_axis, plan.layers)):
        return float("nan")
    return coverage.layers_coverage(info.index for info in plan.layers)


def _summarise(model: nn.Module, samples: Sequence[LabelledImage], plans: Sequence[_StagePlan], sizes: Sequence[float],
               shape: str, hb_cut: str, run: RunOutputs, options: Dict) -> TruncationResult:
    """Accuracies, bootstrap intervals and metadata from the per-image flags (N, 1 + S * R) of the run."""
    from .coverage import compute_coverage
    top1, top5, evaluated = run.arrays["top1"], run.arrays["top5"], run.evaluated
    if not evaluated.any():
        raise HpxError("no image could be read; nothing was evaluated")
    flags = np.concatenate([top1[evaluated].T, top5[evaluated].T])  # (2 * settings, N)
    accuracy = flags.mean(axis=1)
    ci = bootstrap_ci(flags, options["n_resamples"], options["seed"])
    settings = top1.shape[1]
    coverage = compute_coverage(model, input_size=tuple(options["input_size"]))
    shape_sr = (len(plans), len(sizes))
    arrays = {
        "stages": np.array([p.stage for p in plans]), "sizes": np.array(sizes),
        "top1": accuracy[1:settings].reshape(shape_sr), "top5": accuracy[settings + 1:].reshape(shape_sr),
        "top1_ci": ci[1:settings].reshape(*shape_sr, 2), "top5_ci": ci[settings + 1:].reshape(*shape_sr, 2),
        "kept_fraction": np.array([p.kept_fraction for p in plans]),
        "coverage": np.array([_coverage_on_r_axis(coverage, p, hb_cut) for p in plans]),
        "reference": accuracy[[0, settings]], "reference_ci": ci[[0, settings]],
        "top1_correct": top1[evaluated].sum(axis=0), "top5_correct": top5[evaluated].sum(axis=0),
    }
    skipped = [samples[i].name for i in run.unreadable]
    meta = {"model": model_metadata(model), "shape": shape, "hb_cut": hb_cut,
            "stages_paper": [p.stage + 1 for p in plans], "groups": [p.label for p in plans],
            "layers": {p.label: [i.name for i in p.layers] for p in plans},
            "layer_kinds": {p.label: sorted({i.kind for i in p.layers}) for p in plans},
            "sequence_layers": {p.label: any(i.long_filter.on_sequence for i in p.layers) for p in plans},
            "every_tap_size": {p.label: p.every_tap for p in plans},
            "distinct_truncations": {p.label: len(p.masks) for p in plans},
            "images_total": len(samples), "images_evaluated": int(evaluated.sum()),
            "images_skipped": len(skipped), "skipped": skipped, "classes": len({s.label for s in samples}),
            "model_classes": getattr(model, "num_classes", None),
            "options": options}
    return TruncationResult(arrays=arrays, meta=meta)
