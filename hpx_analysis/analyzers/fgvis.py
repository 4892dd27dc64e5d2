"""FGVis: fine-grained visual explanations (Wagner et al., CVPR 2019) as the HyenaPixel paper uses them.

Deletion game: a mask m (N, 3, H, W), initialised to 1, builds the evidence
``e = x * m + r * (1 - m) + noise`` (r: reference image, noise ~ N(0, 0.1^2) redrawn every step) and
SGD minimises ``softmax(model(e))[c] - lambda * ||m||_1``: delete as little as possible so that the
class c loses. Each step the mask gradient is divided by its largest absolute value, after each step
m is clamped to [0, 1], and a sample stops as soon as the evidence's top-1 class differs from c.
lambda starts at 1e-4 and is divided by 10 until a run stops early.

Adversarial defense (activation bounds): the output a0 of every nonlinearity on the clean image is
recorded; while optimising, the gradient flowing back through that nonlinearity is zeroed wherever
the current activation lies outside ``[min(a0, 0), max(a0, 0)]``. Nonlinearities are found by module
type: torch's and timm's activation layers and MetaFormer's StarReLU / SquaredReLU.

Samples (images x lambda tries) run in batches; each has its own noise generator seeded from
(image seed, try), so a batched run equals the one-at-a-time run with the same seeds.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import HpxError
from ..results import model_metadata, to_jsonable
from .attribution import ExplanationResult, predict, reference_image, resolve_targets, to_rgb

_TORCH_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                      nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
                      nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)


@functools.lru_cache(maxsize=1)
def activation_types() -> Tuple[type, ...]:
    """Module classes treated as nonlinearities: torch's, every activation class in timm's activation
    modules and its ``get_act_layer`` registry, and MetaFormer's StarReLU / SquaredReLU."""
    import timm.layers.activations as timm_act
    import timm.layers.activations_me as timm_act_me
    import timm.layers.create_act as create_act
    from timm.models.metaformer import SquaredReLU, StarReLU

    found = set(_TORCH_ACTIVATIONS) | {StarReLU, SquaredReLU}
    for module in (timm_act, timm_act_me):
        found |= {obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__}
    for registry in (create_act._ACT_LAYER_DEFAULT, getattr(create_act, "_ACT_LAYER_ME", {})):
        found |= {cls for cls in registry.values() if isinstance(cls, type)}
    found.discard(nn.Identity)
    return tuple(sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__name__}"))


def activation_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, module) of the outermost activation layers whose output depends on the image.

    An activation nested in another (StarReLU's inner ReLU) is covered by the outer one; activations
    inside implicit long filters compute the kernel from positions only and are left out.
    """
    from ..models.long_filters import LongFilterBase

    types = activation_types()
    skip_prefixes: List[str] = []
    found = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in skip_prefixes):
            continue
        if isinstance(module, LongFilterBase):
            skip_prefixes.append(path + ".")
        elif isinstance(module, types):
            found.append((path, module))
            skip_prefixes.append(path + ".")
    return found


class ActivationBounds:
    """Forward hooks that record activations (``recording``) or bound their gradients (otherwise).

    Bounds are stored per (module, call) for all N clean images; :meth:`select` picks the rows
    (image index per sample of the current batch) the next forward passes use.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = activation_modules(model)
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
def activation_bounds(model: nn.Module) -> Iterator[ActivationBounds]:
    """``with activation_bounds(model) as bounds:`` hooks installed inside, removed on exit."""
    bounds = ActivationBounds(model)
    try:
        yield bounds
    finally:
        bounds.remove()


@dataclass(frozen=True)
class FgvisSettings:
    """Optimisation settings (defaults: the paper's)."""

    iterations: int = 500
    lr: float = 0.1
    noise_std: float = 0.1
    lambda_start: float = 1e-4
    lambda_factor: float = 0.1
    lambda_tries: int = 5
    reference: str = "black"
    bounded: bool = True

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


def sample_seed(image_seed: int, attempt: int) -> int:
    """Noise seed of one (image, lambda try) sample."""
    return int(np.random.SeedSequence([image_seed, attempt]).generate_state(1)[0])


class NoiseStreams:
    """Per-sample Gaussian noise that does not depend on which other samples share the batch.

    Each sample has its own generator and draws ``chunk`` steps of noise at a time, so a batch of
    B samples costs B random calls per ``chunk`` steps instead of one per step.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], std: float, device: torch.device,
                 chunk: int = 16) -> None:
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        self.shape, self.std, self.device, self.chunk = tuple(shape), std, device, chunk
        self.blocks: List[Optional[Tensor]] = [None] * len(seeds)

    def draw(self, samples: Sequence[int], step: int) -> Tensor:
        """Noise (len(samples), *shape) of ``step`` for the given sample indices."""
        offset = step % self.chunk
        if offset == 0:
            for i in samples:
                self.blocks[i] = torch.randn((self.chunk, *self.shape), generator=self.generators[i],
                                             device=self.device).mul_(self.std)
        return torch.stack([self.blocks[i][offset] for i in samples])


def optimise_masks(model: nn.Module, bounds: ActivationBounds, images: Tensor, references: Tensor,
                   targets: Tensor, lambdas: Tensor, seeds: Sequence[int], rows: Tensor,
                   settings: FgvisSettings) -> List[_Outcome]:
    """Run the deletion game for a batch of B samples; each stops on its own.

    images, references: (B, 3, H, W) normalised; targets (B,) classes; lambdas (B,); seeds: B noise
    seeds; rows (B,): clean-image index of each sample (selects its activation bounds).
    """
    count = len(images)
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
        finished = (top_class != targets[active]) | (step == settings.iterations)
        for i in finished.nonzero()[:, 0].tolist():
            outcomes[int(active[i])] = _Outcome(
                mask.detach()[i].clone(), step, bool(top_class[i] != targets[active[i]]), int(top_class[i]),
                float(top_prob[i]), float(target_probs[i].detach()))
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
    ``inputs`` (N, 3, H, W) RGB. meta ``records``: per image lambda, iterations, success, classes, probabilities."""

    kind = "fgvis"

    @property
    def masks(self) -> np.ndarray:
        return self.arrays["masks"]

    @property
    def records(self) -> List[Dict[str, Any]]:
        return self.meta["records"]


def _signature(model: nn.Module, images: Tensor, targets: Tensor, seeds: Sequence[int],
               settings: FgvisSettings) -> str:
    digest = hashlib.sha256(images.detach().float().cpu().numpy().tobytes())
    digest.update(json.dumps(to_jsonable([model_metadata(model), targets.tolist(), list(seeds), asdict(settings)]),
                             sort_keys=True).encode())
    return digest.hexdigest()


def _save_partial(path: Path, signature: str, outcomes: Dict[Tuple[int, int], _Outcome]) -> None:
    keys = sorted(outcomes)
    scalars = [[o.iterations, o.stopped, o.final_class, o.final_prob, o.final_target_prob]
               for o in (outcomes[k] for k in keys)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, signature=np.array(signature), keys=np.array(keys, dtype=np.int64).reshape(-1, 2),
             masks=torch.stack([outcomes[k].mask for k in keys]).cpu().numpy(), scalars=np.array(scalars, float))
    tmp.replace(path)


def _load_partial(path: Path, signature: str, device: torch.device) -> Dict[Tuple[int, int], _Outcome]:
    if not path.is_file():
        return {}
    with np.load(path) as data:
        if str(data["signature"]) != signature:
            return {}
        return {(int(k[0]), int(k[1])): _Outcome(torch.from_numpy(m).to(device), int(s[0]), bool(s[1]), int(s[2]),
                                                 float(s[3]), float(s[4]))
                for k, m, s in zip(data["keys"], data["masks"], data["scalars"])}


def fgvis(model: nn.Module, images: Tensor, *, target: Optional[int | Sequence[int]] = None,
          seed: int | Sequence[int] = 0, settings: FgvisSettings = FgvisSettings(), batch_size: int = 8,
          mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
          names: Optional[Sequence[str]] = None, partial: Optional[Path | str] = None,
          progress: bool = False) -> FgvisResult:
    """FGVis masks for normalised ``images`` (N, 3, H, W) with the lambda search.

    target: class to delete (default: top-1 of the clean image). seed: one seed (image n uses seed + n)
    or one per image. batch_size: samples (images x lambda tries) optimised together; 1 runs the search
    one at a time and stops at the first lambda that succeeds, larger batches try several lambdas at
    once and keep the same (first successful) one. partial: a file for finished samples, so an
    interrupted run resumes. The model is left unchanged (hooks removed, no gradients stored).
    """
    from tqdm.auto import tqdm
    from ..images import model_mean_std

    if settings.iterations < 0 or settings.lambda_tries < 1 or batch_size < 1:
        raise HpxError("iterations must be >= 0, lambda tries >= 1 and batch size >= 1")
    if mean is None or std is None:
        mean, std = model_mean_std(model)
    count = len(images)
    seeds = [seed + n for n in range(count)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != count:
        raise HpxError(f"got {len(seeds)} seeds for {count} images")
    references = reference_image(images, settings.reference, mean, std)
    with activation_bounds(model) as bounds:
        bounds.bounded = settings.bounded
        with bounds.record():
            probs = predict(model, images, batch_size)
        targets = resolve_targets(probs, target)
        signature = _signature(model, images, targets, seeds, settings)
        partial_path = Path(partial) if partial is not None else None
        outcomes = _load_partial(partial_path, signature, images.device) if partial_path else {}
        jobs = [(n, t) for n in range(count) for t in range(settings.lambda_tries)]

        def first_success(n: int) -> Optional[int]:
            return min((t for (m, t), o in outcomes.items() if m == n and o.stopped), default=None)

        def pending() -> List[Tuple[int, int]]:
            found = {n: first_success(n) for n in range(count)}
            return [(n, t) for n, t in jobs if (n, t) not in outcomes and (found[n] is None or t < found[n])]

        bar = tqdm(total=len(jobs), desc="fgvis", unit="run", disable=not progress)
        bar.update(len(jobs) - len(pending()))
        while todo := pending()[:batch_size]:
            rows = torch.tensor([n for n, _ in todo], device=images.device)
            lambdas = torch.tensor([settings.lambda_of(t) for _, t in todo], device=images.device)
            results = optimise_masks(model, bounds, images[rows], references[rows],
                                     targets[rows], lambdas, [sample_seed(seeds[n], t) for n, t in todo], rows,
                                     settings)
            outcomes.update(zip(todo, results))
            if partial_path is not None:
                _save_partial(partial_path, signature, outcomes)
            bar.update(len(jobs) - len(pending()) - bar.n)
        bar.close()
    model.zero_grad(set_to_none=True)

    chosen, records = [], []
    for n in range(count):
        attempt = first_success(n)
        outcome = outcomes[(n, attempt if attempt is not None else settings.lambda_tries - 1)]
        chosen.append(outcome.mask)
        records.append({
            "lambda": settings.lambda_of(attempt if attempt is not None else settings.lambda_tries - 1),
            "success": attempt is not None, "tries": (attempt + 1) if attempt is not None else settings.lambda_tries,
            "iterations": outcome.iterations,
            "original_class": int(targets[n]), "original_prob": float(probs[n, targets[n]]),
            "final_class": outcome.final_class, "final_prob": outcome.final_prob,
            "final_target_prob": outcome.final_target_prob,
            "note": "" if attempt is not None else f"no lambda down to {settings.lambda_of(settings.lambda_tries - 1):g} "
                                                   "changed the class; kept the last mask"})
    masks = torch.stack(chosen)
    return FgvisResult(
        arrays={"masks": masks.float().cpu().numpy(), "maps": (1 - masks).mean(1).float().cpu().numpy(),
                "inputs": to_rgb(images, mean, std)},
        meta={"method": "fgvis", "model": model_metadata(model),
              "images": list(names) if names is not None else [str(i) for i in range(count)],
              "targets": targets.tolist(), "seeds": seeds, "records": records,
              "options": {**asdict(settings), "batch_size": batch_size,
                          "bounded_activations": len(activation_modules(model)) if settings.bounded else 0}})


__all__ = ["activation_types", "activation_modules", "ActivationBounds", "activation_bounds", "FgvisSettings",
           "NoiseStreams",
           "FgvisResult", "optimise_masks", "sample_seed", "fgvis"]
