"""What a command runs over several models, as library functions: load each model in turn, prepare the same
images for it, run the analyzers and collect the results. The ``hpx-analyze`` commands parse their options, call
these and write what they return; from Python they run the same way::

    from hpx_analysis.workflows import ModelSpec, explain_models
    explained = explain_models([ModelSpec("hpx_former_s18", "pretrained")], ["fgvis", "saliency"], sanity=True)

Under ``torchrun`` every rank runs them on its share of the batches and gets the whole results; join the process
group around the call (:func:`hpx_analysis.distributed.session`) and let rank 0 write.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .analyzers.attribution import load_inputs
from .analyzers.attribution import explain as explain_method
from .analyzers.erf import ERFResult, effective_receptive_field
from .analyzers.fgvis import FgvisSettings
from .analyzers.methods import ExplanationResult
from .analyzers.sanity import SanityResult, sanity_check
from .analyzers.scores import (METRICS, FaithfulnessResult, LocalisationResult, ScoreTable, faithfulness,
                               localisation, score_table)
from .boxes import boxes_for_images, read_boxes
from .engine import announce
from .errors import HpxError
from .images import eval_transform, image_sources, model_mean_std, skipped_line
from .layer_names import LayerLike
from .models.zoo import load_model, model_label


@dataclass(frozen=True)
class ModelSpec:
    """A model to load by name: :func:`~hpx_analysis.models.zoo.load_model` ``(name, weights, weights_key=...,
    **kwargs)``; ``weights`` is ``pretrained``, ``random`` or a checkpoint file; ``tag`` tells apart specs of one
    model in one run (:func:`distinct_labels`)."""

    name: str
    weights: str
    weights_key: Optional[str] = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    tag: str = ""

    @property
    def label(self) -> str:
        """The model's short label (a config file's stem, and the tag if any), as in output file names."""
        return model_label(self.name) + (f"-{self.tag}" if self.tag else "")

    def load(self, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
        """The model in eval mode on ``device`` (``seed``: its random weights)."""
        return load_model(self.name, self.weights, seed=seed, device=device, weights_key=self.weights_key,
                          **self.kwargs)


def distinct_labels(specs: Sequence[ModelSpec]) -> List[ModelSpec]:
    """``specs`` with a tag on each whose label another one shares (the weights' name, and its position where that
    is shared too), so their results are not written over one another."""
    def weights_name(spec: ModelSpec) -> str:
        return Path(spec.weights).stem if spec.weights not in ("pretrained", "random") else spec.weights
    labels = [spec.label for spec in specs]
    tagged = [replace(spec, tag=weights_name(spec)) if labels.count(spec.label) > 1 else spec for spec in specs]
    labels = [spec.label for spec in tagged]
    return [replace(spec, tag=f"{spec.tag or 'model'}{index + 1}") if labels.count(spec.label) > 1 else spec
            for index, spec in enumerate(tagged)]


def erf_models(specs: Sequence[ModelSpec], *, images: Optional[Path | str] = None, num_images: int = 50,
               input_size: Union[int, Sequence[int], None] = None,
               layer: Union[LayerLike, List[LayerLike], None] = None, convention: str = "replknet",
               gradient: str = "relu", batch_size: int = 1, amp: Optional[str] = None, seed: int = 0,
               device: str | torch.device = "cpu", resume_dir: Optional[Path | str] = None) -> ERFResult:
    """The effective receptive field of each model on the same images (:func:`~hpx_analysis.images.image_sources`:
    ``num_images`` of the folder ``images``, or the bundled samples), at every input size and layer asked for (a
    list of each), in one result: rows model by model, size by size, layer by layer. Its ``meta["options"]``
    also records the images, seed, weights and device. The other options go to
    :func:`~hpx_analysis.analyzers.erf.effective_receptive_field`."""
    sources = image_sources(images, num_images, seed)
    result = ERFResult.combine([
        effective_receptive_field(spec.load(seed, device), sources, input_size=input_size, layer=layer,
                                  convention=convention, gradient=gradient, batch_size=batch_size, amp=amp,
                                  label=spec.label, resume_dir=resume_dir)
        for spec in specs])
    result.meta["options"].update(images=str(images) if images else "skimage samples", num_images=num_images,
                                  seed=seed, weights=[spec.weights for spec in specs], device=str(device))
    return result


@dataclass
class Explanation:
    """One model's explanation by one method, its randomisation sanity check and its scores when asked for."""

    spec: ModelSpec
    method: str
    result: ExplanationResult
    sanity: Optional[SanityResult] = None
    faithfulness: Optional[FaithfulnessResult] = None
    localisation: Optional[LocalisationResult] = None


def checked_metrics(metrics: Sequence[str], boxes: Optional[Path | str]) -> List[str]:
    """``metrics`` (of ``scores.METRICS``) without repeats, in order; one-line errors for an unknown one and for
    the pointing games without ``boxes``."""
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown:
        raise HpxError(f"unknown metric '{unknown[0]}'; use one or more of {', '.join(METRICS)}")
    if boxes is None and {"pointing", "energy-pointing"} & set(metrics):
        raise HpxError("the pointing games need object boxes: give --boxes PATH (ImageNet's val XMLs, their .tgz, "
                       "or a CSV filename,xmin,ymin,xmax,ymax)")
    return list(dict.fromkeys(metrics))


def explain_models(specs: Sequence[ModelSpec], methods: Sequence[str] = ("fgvis",), *,
                   images: Optional[Path | str] = None, num_images: int = 2, input_size: Optional[int] = None,
                   target: Optional[int] = None, batch_size: int = 8, sanity: bool = False, seed: int = 0,
                   device: str | torch.device = "cpu", resume_dir: Optional[Path | str] = None,
                   progress: bool = False, metrics: Sequence[str] = (), boxes: Optional[Path | str] = None,
                   score_steps: int = 100, score_batch_size: int = 16, pointing_tolerance: float = 0.0,
                   **settings: Any) -> List[Explanation]:
    """Each model's decisions on the same images explained by each method (``attribution.METHODS``), model by model.

    Each model reads the images (as :func:`erf_models`) through its own evaluation transform (``input_size``: its
    side). settings: :class:`~hpx_analysis.analyzers.fgvis.FgvisSettings` fields (``iterations``,
    ``lambda_start``, ``reference``, ...); ``reference`` is also the baseline of the captum methods, ``seed`` FGVis's
    noise seed. sanity: also run the cascading parameter randomisation test
    (:func:`~hpx_analysis.analyzers.sanity.sanity_check`, new weights from ``seed + 1``). resume_dir, batch_size,
    target: as for :func:`~hpx_analysis.analyzers.attribution.explain`.

    metrics: also score every explanation (``scores.METRICS``): ``deletion`` / ``insertion`` run
    :func:`~hpx_analysis.analyzers.scores.faithfulness` (``score_steps`` steps, ``score_batch_size`` forwards at a
    time, deleting to ``reference``, its random order seeded by ``seed``), ``pointing`` / ``energy-pointing``
    :func:`~hpx_analysis.analyzers.scores.localisation` (``pointing_tolerance`` px) against the ``boxes`` file
    (:func:`~hpx_analysis.boxes.read_boxes`), mapped through each model's evaluation transform.
    """
    metrics = checked_metrics(metrics, boxes)
    sources = image_sources(images, num_images, seed)
    pointing = bool({"pointing", "energy-pointing"} & set(metrics))
    box_file = read_boxes(boxes, [source.name for source in sources]) if pointing else None
    fgvis_settings = FgvisSettings(**settings)
    explained = []
    for spec in specs:
        model = spec.load(seed, device)
        mean, std = model_mean_std(model)
        transform = eval_transform(model, input_size)[0]
        inputs, names = load_inputs(sources, transform)
        if len(names) < len(sources):
            read = set(names)
            announce(f"{spec.label}: {skipped_line([source.name for source in sources if source.name not in read])}")
        inputs = inputs.to(device)
        common = {"target": target, "mean": mean, "std": std, "names": names, "batch_size": batch_size,
                  "resume_dir": resume_dir}
        located = None
        if pointing:
            by_name = {source.name: source for source in sources}
            located = boxes_for_images(box_file, [by_name[name] for name in names], transform)
            if all(found is None for found in located):
                raise HpxError(f"none of the {len(names)} images has a box in {boxes} (boxes are matched by file "
                               "name without its extension)")
        for method in methods:
            options = ({"settings": fgvis_settings, "seed": seed} if method == "fgvis" else
                       {"reference": fgvis_settings.reference})
            result = explain_method(model, inputs, method, **common, **options, progress=progress)
            check = sanity_check(model, inputs, method, init_seed=seed + 1, **common, **options) if sanity else None
            item = Explanation(spec, method, result, check)
            if {"deletion", "insertion"} & set(metrics):
                item.faithfulness = faithfulness(model, inputs, result, target=target, steps=score_steps,
                                                 deletion_reference=fgvis_settings.reference,
                                                 batch_size=score_batch_size, resume_dir=resume_dir, mean=mean,
                                                 std=std, seed=seed, progress=progress)
            if located is not None:
                item.localisation = localisation(result, located, tolerance=pointing_tolerance)
            explained.append(item)
    return explained


def explanation_scores(explained: Sequence[Explanation], *, n_resamples: int = 1000, seed: int = 0) -> ScoreTable:
    """The scores of explanations scored by :func:`explain_models` (``metrics``) side by side, with means and
    95% bootstrap intervals (:func:`~hpx_analysis.analyzers.scores.score_table`)."""
    return score_table([(item.spec.label, item.method, item.faithfulness, item.localisation) for item in explained],
                       n_resamples=n_resamples, seed=seed)


__all__ = ["ModelSpec", "distinct_labels", "erf_models", "Explanation", "checked_metrics", "explain_models",
           "explanation_scores"]
