"""FGVis: fine-grained visual explanations (Wagner et al., CVPR 2019) as the HyenaPixel paper uses them.

Deletion game: a mask m (N, 3, H, W), initialised to 1, builds the evidence
``e = x * m + r * (1 - m) + noise`` (r: reference image, noise ~ N(0, 0.1^2) redrawn every step) and
SGD minimises ``softmax(model(e))[c] - lambda * ||m||_1``: delete as little as possible so that the
class c loses. Each step the mask gradient is divided by its largest absolute value, after each step
m is clamped to [0, 1], and a sample stops as soon as c ranks lower on the evidence than on the
clean image: for the usual c = clean top-1 (the reference's case) as soon as the evidence's top-1
class differs from c; for a given c that is not the top-1 (the sanity check explains the trained
model's class on randomised models) as soon as one more class outranks it.
lambda starts at 1e-4 and is divided by 10 until a run stops early (6 tries: down to 1e-9, the
default weight of the spravil/FGVis reference). A run that stops at iteration 0, before any
deletion (the noise alone did it), is recorded as ``flipped_by_noise``, not as a success, and ends
the search (lambda plays no part at iteration 0).

Adversarial defense (activation bounds): the output a0 of every bounded nonlinearity on the clean
image is recorded; while optimising, the gradient flowing back through it is zeroed wherever the
current activation lies outside ``[min(a0, 0), max(a0, 0)]``. Which modules are bounded is an
explicit tuple of types, found by ``isinstance`` (``bound_activations``):

* ``"relu"`` (default, the reference's rule): ReLU and ReLU6 modules only. In a MetaFormer these are
  the ``relu`` modules inside timm's ``StarReLU`` (``s * relu(x)**2 + b``) and ``SquaredReLU``, so
  the bound applies to the ReLU's own output ``[0, relu(x0)]``, whose zero marks the kink; the outer
  output is not bounded (with ``b < 0`` its sign no longer tells where the ReLU is active). GELUs
  (ConvNeXt) stay unbounded, as in the reference.
* ``"all"``: also GELU, SiLU, sigmoid, tanh and the other elementwise activations of torch and timm.
  StarReLU / SquaredReLU are still bounded at their inner ReLU: the square and the affine map after
  it are monotone in the ReLU's output, so that is the tensor where the rule keeps its meaning.

Activations inside implicit long filters compute the kernel from positions only and are never bounded.

Images run in batches through the explanation skeleton (:func:`hpx_analysis.analyzers.methods.run_explanation`
on the analysis engine: resume, torchrun), which :class:`FgvisExplainer` gives the lambda search as its step;
within a batch the samples (images x lambda tries) run in batches too. Each sample has its
own noise generator seeded from (image seed, try), so a batched run equals the one-at-a-time run with
the same seeds.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.layers import activations as timm_act
from timm.layers import activations_me as timm_act_me
from torch import Tensor, nn

from ..engine import ItemOutput, RunOutputs
from ..errors import HpxError
from ..results import ArrayField
from .methods import ExplanationBatch, Explainer, ExplanationResult, register_method, run_explanation

RELU_ACTIVATIONS: Tuple[type, ...] = (nn.ReLU, nn.ReLU6)
"""The reference's bounded nonlinearities (it bounds ``torch.nn.ReLU``); ReLU6 follows the same rule."""

ALL_ACTIVATIONS: Tuple[type, ...] = RELU_ACTIVATIONS + (
    nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    timm_act.GELU, timm_act.GELUTanh, timm_act.QuickGELU, timm_act.Swish, timm_act.Mish, timm_act.Sigmoid,
    timm_act.Tanh, timm_act.HardSigmoid, timm_act.HardSwish, timm_act.HardMish, timm_act.PReLU,
    timm_act_me.SwishMe, timm_act_me.MishMe, timm_act_me.HardSigmoidMe, timm_act_me.HardSwishMe,
    timm_act_me.HardMishMe)
"""Every elementwise nonlinearity of torch and timm (StarReLU / SquaredReLU: through their inner ReLU)."""

BOUND_ACTIVATIONS: Dict[str, Tuple[type, ...]] = {"relu": RELU_ACTIVATIONS, "all": ALL_ACTIVATIONS}


def type_names(types: Sequence[type]) -> List[str]:
    """Qualified class names, for metadata."""
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in types]


def activation_modules(model: nn.Module, types: Sequence[type] = RELU_ACTIVATIONS) -> List[Tuple[str, nn.Module]]:
    """(path, module) of the modules of ``types`` whose output depends on the image.

    A listed type nested inside another listed one is left to the outer; modules inside implicit long
    filters compute the kernel from positions only and are left out.
    """
    from ..models.long_filters import LongFilterBase

    types = tuple(types)
    skip_prefixes: List[str] = []
    found = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in skip_prefixes):
            continue
        inside = f"{path}." if path else ""  # the prefix of every submodule's path
        if isinstance(module, LongFilterBase):
            skip_prefixes.append(inside)
        elif isinstance(module, types):
            found.append((path, module))
            skip_prefixes.append(inside)
    return found


class ActivationBounds:
    """Forward hooks that record activations (``recording``) or bound their gradients (otherwise).

    Bounds are stored per (module, call) for all N clean images; :meth:`select` picks the rows
    (image index per sample of the current batch) the next forward passes use.
    """

    def __init__(self, model: nn.Module, types: Sequence[type] = RELU_ACTIVATIONS) -> None:
        self.modules = activation_modules(model, types)
        self.recording = False
        self.bounded = True
        self._calls: Dict[str, int] = {}
        self._recorded: Dict[Tuple[str, int], List[Tensor]] = {}
        self._lower_all: Dict[Tuple[str, int], Tensor] = {}
        self._upper_all: Dict[Tuple[str, int], Tensor] = {}
        self._lower: Dict[Tuple[str, int], Tensor] = {}
        self._upper: Dict[Tuple[str, int], Tensor] = {}
        self._handles = [model.register_forward_pre_hook(self._reset_calls)]
        self._handles += [module.register_forward_hook(self._hook(path)) for path, module in self.modules]

    def _reset_calls(self, _module: nn.Module, _args: tuple) -> None:
        self._calls = {}

    def _hook(self, path: str):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> Optional[Tensor]:
            if not isinstance(output, Tensor):
                return None
            call = self._calls.get(path, 0)
            self._calls[path] = call + 1
            key = (path, call)
            if self.recording:
                self._recorded.setdefault(key, []).append(output.detach().clone())
                return None
            if not self.bounded:
                return None
            lower, upper = self._lower[key], self._upper[key]
            if lower.shape != output.shape:
                raise HpxError(f"activation {path} changed shape {tuple(lower.shape)} -> {tuple(output.shape)}; "
                               "activation bounds need batch-first activations of fixed size")
            keep = (output >= lower) & (output <= upper)
            return torch.where(keep, output, output.detach())
        return hook

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """Inside: forwards (in order, any chunking) record the clean activations of all N images."""
        self.recording, self._recorded = True, {}
        try:
            yield
        finally:
            self.recording = False
        for key, chunks in self._recorded.items():
            clean = torch.cat(chunks)
            self._lower_all[key], self._upper_all[key] = clean.clamp(max=0), clean.clamp(min=0)
        self._recorded = {}

    def select(self, rows: Tensor) -> None:
        """Bounds for a batch whose sample i explains clean image ``rows[i]``."""
        self._lower = {key: value[rows] for key, value in self._lower_all.items()}
        self._upper = {key: value[rows] for key, value in self._upper_all.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def activation_bounds(model: nn.Module, types: Sequence[type] = RELU_ACTIVATIONS) -> Iterator[ActivationBounds]:
    """``with activation_bounds(model) as bounds:`` hooks on the modules of ``types`` installed inside,
    removed on exit."""
    bounds = ActivationBounds(model, types)
    try:
        yield bounds
    finally:
        bounds.remove()


@dataclass(frozen=True)
class FgvisSettings:
    """Optimisation settings (defaults: the paper's). bound_activations: a key of ``BOUND_ACTIVATIONS``."""

    iterations: int = 500
    lr: float = 0.1
    noise_std: float = 0.1
    lambda_start: float = 1e-4
    lambda_factor: float = 0.1
    lambda_tries: int = 6
    reference: str = "black"
    bounded: bool = True
    bound_activations: str = "relu"

    def lambda_of(self, attempt: int) -> float:
        return self.lambda_start * self.lambda_factor ** attempt


@dataclass
class _Outcome:
    """One (image, lambda try) optimisation: final mask (3, H, W) and what happened."""

    mask: Tensor
    iterations: int
    stopped: bool
    final_class: int
    final_prob: float
    final_target_prob: float

    @property
    def flipped_by_noise(self) -> bool:
        """The target lost its rank at iteration 0, before any deletion (mask all ones): the noise did it."""
        return self.stopped and self.iterations == 0


def sample_seed(image_seed: int, attempt: int) -> int:
    """Noise seed of one (image, lambda try) sample."""
    return int(np.random.SeedSequence([image_seed, attempt]).generate_state(1)[0])


class NoiseStreams:
    """Per-sample Gaussian noise that does not depend on which other samples share the batch.

    Each sample has its own generator and draws ``chunk`` steps of noise at a time, so a batch of
    B samples costs B random calls per ``chunk`` steps instead of one per step. The generators are the CPU's
    whatever ``device`` is (CUDA's would give other numbers for the same seed), so a GPU run optimises with the
    noise a CPU run uses.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], std: float, device: torch.device,
                 chunk: int = 16) -> None:
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.shape, self.std, self.device, self.chunk = tuple(shape), std, device, chunk
        self.blocks: List[Optional[Tensor]] = [None] * len(seeds)

    def draw(self, samples: Sequence[int], step: int) -> Tensor:
        """Noise (len(samples), *shape) of ``step`` for the given sample indices."""
        offset = step % self.chunk
        if offset == 0:
            for i in samples:
                self.blocks[i] = torch.randn((self.chunk, *self.shape), generator=self.generators[i]).mul_(
                    self.std).to(self.device)
        return torch.stack([self.blocks[i][offset] for i in samples])


def class_ranks(probs: Tensor, targets: Tensor) -> Tensor:
    """Rank (B,) of each target class in probabilities (B, classes): how many classes score higher (0 = top-1)."""
    return (probs > probs.gather(1, targets[:, None])).sum(-1)


def optimise_masks(model: nn.Module, bounds: ActivationBounds, images: Tensor, references: Tensor,
                   targets: Tensor, lambdas: Tensor, seeds: Sequence[int], rows: Tensor,
                   settings: FgvisSettings, target_ranks: Optional[Tensor] = None,
                   tries: Optional[Tensor] = None) -> List[Optional[_Outcome]]:
    """Run the deletion game for a batch of B samples; each stops on its own, when its target ranks
    lower than ``target_ranks`` (B,), its rank on the clean image (default 0: the target is the top-1).

    images, references: (B, 3, H, W) normalised; targets (B,) classes; lambdas (B,); seeds: B noise
    seeds; rows (B,): clean-image index of each sample (selects its activation bounds). tries (B,): the lambda
    try of each sample; when a sample stops, the samples of the same image with a later try (a smaller lambda),
    which the search can no longer choose, are dropped at once and get None.
    """
    count = len(images)
    clean_ranks = target_ranks if target_ranks is not None else torch.zeros_like(targets)
    noise_streams = NoiseStreams(seeds, images.shape[1:], settings.noise_std, images.device)
    masks = torch.ones_like(images)
    active = torch.arange(count, device=images.device)
    outcomes: List[Optional[_Outcome]] = [None] * count
    bounds.select(rows)
    for step in range(settings.iterations + 1):
        noise = noise_streams.draw(active.tolist(), step)
        mask = masks[active].requires_grad_(True)
        evidence = images[active] * mask + references[active] * (1 - mask) + noise
        probs = model(evidence).softmax(-1)
        target_probs = probs.gather(1, targets[active, None])[:, 0]
        top_prob, top_class = probs.detach().max(-1)
        outranked = class_ranks(probs.detach(), targets[active]) > clean_ranks[active]
        finished = outranked | (step == settings.iterations)
        for i in finished.nonzero()[:, 0].tolist():
            outcomes[int(active[i])] = _Outcome(
                mask.detach()[i].clone(), step, bool(outranked[i]), int(top_class[i]),
                float(top_prob[i]), float(target_probs[i].detach()))
        if tries is not None and bool(outranked.any()):  # later tries of an image whose earlier try stopped
            stopped = active[outranked]
            same_image = rows[active][:, None] == rows[stopped][None, :]
            finished = finished | (same_image & (tries[active][:, None] > tries[stopped][None, :])).any(1)
        if bool(finished.all()):
            break
        loss = (target_probs - lambdas[active] * mask.abs().sum((1, 2, 3)))[~finished].sum()
        (grad,) = torch.autograd.grad(loss, mask)
        grad = grad / grad.abs().amax((1, 2, 3), keepdim=True).clamp_min(1e-12)
        keep = ~finished
        active = active[keep]
        masks[active] = (mask.detach()[keep] - settings.lr * grad[keep]).clamp(0, 1)
        if not bool(keep.all()):
            bounds.select(rows[active])
    return outcomes  # type: ignore[return-value]


class FgvisResult(ExplanationResult):
    """FGVis masks: ``masks`` (N, 3, H, W) in [0, 1] (0 = deleted), ``maps`` = mean_c(1 - m) (N, H, W),
    ``inputs`` (N, 3, H, W) RGB. meta ``records``: per image lambda, iterations, success, flipped_by_noise, classes,
    the target's clean rank (0 = top-1), probabilities, note."""

    kind = "fgvis"

    masks = ArrayField()

    @property
    def records(self) -> List[Dict[str, Any]]:
        return self.meta["records"]


def lambda_search(model: nn.Module, bounds: ActivationBounds, images: Tensor, references: Tensor, targets: Tensor,
                  clean_ranks: Tensor, seeds: Sequence[int], settings: FgvisSettings,
                  max_samples: Optional[int] = None) -> List[Tuple[int, _Outcome]]:
    """The lambda search for B images: per image the chosen try and its outcome (the first try whose run
    stops, i.e. the largest lambda that flips, else the last try).

    images, references: (B, 3, H, W) normalised; targets, clean_ranks (B,); seeds: B image seeds; the
    bounds hold the clean activations of these B images. Samples (image, try) run side by side, each stopping on
    its own: all B x tries at once, or ``max_samples`` at a time in (image, try) order; an image's tries after a
    stopped one are dropped (running) or not started, as the search cannot choose them. Side by side, the tries
    whose lambda is too large to flip (they run all iterations) share their iterations with the others instead of
    running before them.
    """
    outcomes: Dict[Tuple[int, int], Optional[_Outcome]] = {}
    jobs = [(n, t) for n in range(len(images)) for t in range(settings.lambda_tries)]

    def first_stop(n: int) -> Optional[int]:
        return min((t for (m, t), o in outcomes.items() if m == n and o is not None and o.stopped), default=None)

    def pending() -> List[Tuple[int, int]]:
        found = {n: first_stop(n) for n in range(len(images))}
        return [(n, t) for n, t in jobs if (n, t) not in outcomes and (found[n] is None or t < found[n])]

    while todo := pending()[:max_samples or len(jobs)]:
        rows = torch.tensor([n for n, _ in todo], device=images.device)
        lambdas = torch.tensor([settings.lambda_of(t) for _, t in todo], device=images.device)
        results = optimise_masks(model, bounds, images[rows], references[rows], targets[rows], lambdas,
                                 [sample_seed(seeds[n], t) for n, t in todo], rows, settings, clean_ranks[rows],
                                 tries=torch.tensor([t for _, t in todo], device=images.device))
        outcomes.update(zip(todo, results))
    chosen = []
    for n in range(len(images)):
        stop = first_stop(n)
        attempt = stop if stop is not None else settings.lambda_tries - 1
        chosen.append((attempt, outcomes[(n, attempt)]))
    return chosen


RECORD_OUTPUTS: Dict[str, ItemOutput] = {
    "success": ItemOutput((), "int64"), "flipped_by_noise": ItemOutput((), "int64"), "tries": ItemOutput((), "int64"),
    "iterations": ItemOutput((), "int64"), "original_rank": ItemOutput((), "int64"), "original_prob": ItemOutput(),
    "final_class": ItemOutput((), "int64"), "final_prob": ItemOutput(), "final_target_prob": ItemOutput()}
"""The numeric fields of an image's record, one engine output each (its ``original_class`` is the run's target;
lambda and note follow from them)."""


def _records(arrays: Dict[str, np.ndarray], settings: FgvisSettings) -> List[Dict[str, Any]]:
    """Per image the record of its chosen try, from the run's record arrays (N,) (``RECORD_OUTPUTS``) and
    ``targets`` (N,)."""
    last_lambda = settings.lambda_of(settings.lambda_tries - 1)
    records = []
    for n in range(len(arrays["targets"])):
        fields = {name: (float if spec.dtype == "float64" else int)(arrays[name][n])
                  for name, spec in RECORD_OUTPUTS.items()}
        success, flipped = bool(fields.pop("success")), bool(fields.pop("flipped_by_noise"))
        if flipped:
            note = (f"the noise alone (std {settings.noise_std:g}) changed the class at iteration 0, before any "
                    "deletion: not a success, mask all ones")
        else:
            note = "" if success else f"no lambda down to {last_lambda:g} lowered the class's rank; kept the last mask"
        records.append({"lambda": settings.lambda_of(fields["tries"] - 1), "success": success,
                        "flipped_by_noise": flipped, "original_class": int(arrays["targets"][n]), **fields,
                        "note": note})
    return records


class FgvisExplainer(Explainer):
    """FGVis' part of :func:`~hpx_analysis.analyzers.methods.run_explanation`: the clean pass records the
    activation bounds, the step runs the lambda search per batch; maps ``mean_c (1 - m)`` (B, H, W)."""

    result_type = FgvisResult

    def __init__(self, bounds: ActivationBounds, types: Sequence[type], settings: FgvisSettings, seeds: List[int],
                 batch_size: int, size: Tuple[int, int]) -> None:
        super().__init__("fgvis", {**asdict(settings), "batch_size": batch_size,
                                   "bound_activation_types": type_names(types),
                                   "bounded_activations": len(bounds.modules) if settings.bounded else 0},
                         {"masks": ItemOutput((3, *size), "float32"), **RECORD_OUTPUTS})
        self.bounds, self.settings, self.seeds = bounds, settings, seeds

    def keyed(self) -> Dict[str, Any]:
        return {"seeds": self.seeds}

    def clean_pass(self) -> ContextManager[None]:
        return self.bounds.record()

    def step(self, batch: ExplanationBatch) -> Dict[str, Tensor]:
        clean_ranks = class_ranks(batch.probs, batch.targets)
        chosen = lambda_search(batch.model, self.bounds, batch.images, batch.reference(self.settings.reference),
                               batch.targets, clean_ranks, [self.seeds[i] for i in batch.indices], self.settings)
        outcomes = [outcome for _, outcome in chosen]
        masks = torch.stack([o.mask for o in outcomes]).float()
        return {"maps": (1 - masks).mean(1), "masks": masks,
                "success": torch.tensor([o.stopped and not o.flipped_by_noise for o in outcomes]),
                "flipped_by_noise": torch.tensor([o.flipped_by_noise for o in outcomes]),
                "tries": torch.tensor([attempt + 1 for attempt, _ in chosen]),
                "iterations": torch.tensor([o.iterations for o in outcomes]), "original_rank": clean_ranks,
                "original_prob": batch.probs.gather(1, batch.targets[:, None])[:, 0].double(),
                "final_class": torch.tensor([o.final_class for o in outcomes]),
                "final_prob": torch.tensor([o.final_prob for o in outcomes], dtype=torch.float64),
                "final_target_prob": torch.tensor([o.final_target_prob for o in outcomes], dtype=torch.float64)}

    def finish(self, run: RunOutputs) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        return {"masks": run.arrays["masks"]}, {"seeds": self.seeds, "records": _records(run.arrays, self.settings)}


@register_method("fgvis")
def fgvis(model: nn.Module, images: Tensor, *, target: Optional[int | Sequence[int]] = None,
          seed: int | Sequence[int] = 0, settings: FgvisSettings = FgvisSettings(), batch_size: int = 8,
          mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
          names: Optional[Sequence[str]] = None, resume_dir: Optional[Path | str] = None,
          activation_types: Optional[Sequence[type]] = None, progress: bool = False) -> FgvisResult:
    """FGVis masks for normalised ``images`` (N, 3, H, W) with the lambda search.

    target: class to delete, one for all or one per image (default: top-1 of the clean image; a run
    stops when the target ranks lower than on the clean image, see the module docstring). seed: one
    seed (image n uses seed + n) or one per image. batch_size: images per engine batch
    (:func:`..engine.run_batches`); all lambda tries of a batch's images are optimised side by side
    (batch_size x lambda_tries samples, :func:`lambda_search`), each stopping on its own, and every image keeps
    the first try that stops (the largest lambda that flips), as a one-at-a-time search would; the batch size
    does not change the result. activation_types: the bounded module types,
    overriding ``BOUND_ACTIVATIONS[settings.bound_activations]``. The other options are
    :func:`~hpx_analysis.analyzers.methods.run_explanation`'s (resume, device, torchrun). The model is left
    unchanged (hooks removed, no gradients stored).
    """
    if settings.iterations < 0 or settings.lambda_tries < 1 or batch_size < 1:
        raise HpxError("iterations must be >= 0, lambda tries >= 1 and batch size >= 1")
    for name, value, positive in (("learning rate (--lr)", settings.lr, True),
                                  ("first lambda (--lambda)", settings.lambda_start, True),
                                  ("noise std (--noise-std)", settings.noise_std, False)):
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise HpxError(f"the FGVis {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    if settings.bound_activations not in BOUND_ACTIVATIONS:
        raise HpxError(f"unknown bound activations '{settings.bound_activations}'; use {', '.join(BOUND_ACTIVATIONS)}")
    types = tuple(activation_types) if activation_types is not None else BOUND_ACTIVATIONS[settings.bound_activations]
    count = len(images)
    seeds = [seed + n for n in range(count)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != count:
        raise HpxError(f"got {len(seeds)} seeds for {count} images")
    with activation_bounds(model, types) as bounds:
        bounds.bounded = settings.bounded
        explainer = FgvisExplainer(bounds, types, settings, seeds, batch_size, tuple(images.shape[-2:]))
        return run_explanation(model, images, explainer, target=target, mean=mean, std=std, names=names,
                               batch_size=batch_size, resume_dir=resume_dir, progress=progress)


__all__ = ["RELU_ACTIVATIONS", "ALL_ACTIVATIONS", "BOUND_ACTIVATIONS", "type_names", "activation_modules",
           "ActivationBounds", "activation_bounds", "FgvisSettings", "NoiseStreams", "FgvisResult", "optimise_masks",
           "sample_seed", "lambda_search", "RECORD_OUTPUTS", "FgvisExplainer", "fgvis"]
