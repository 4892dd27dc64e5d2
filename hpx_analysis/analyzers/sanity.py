"""Model-parameter randomisation test (Adebayo et al., NeurIPS 2018) for any explanation method.

The trained weights are replaced by freshly initialised ones group by group, cascading from the head
down to the stem; after each step the explanation is recomputed and compared with the trained
model's by Spearman rank correlation of the per-pixel maps. An explanation that depends on what the
model learned decorrelates as layers are randomised. Every step explains the same class per image
(the given target, or the trained model's top-1), so the loss of correlation is not mixed with a
change of the explained class.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, is_dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
from scipy.stats import spearmanr
from torch import Tensor, nn

from ..devices import model_placement
from ..errors import HpxError
from ..results import ArrayField, Result, model_metadata
from .attribution import explain
from .methods import predict, resolve_targets, to_model


class SanityResult(Result):
    """``correlations`` (S + 1, N): Spearman rho of each step's maps with the trained model's (row 0 = 1);
    ``maps`` (S + 1, N, H, W); meta ``steps``: "trained" then the randomised groups, head first;
    ``targets`` (S + 1, N): the class each step explained."""

    kind = "sanity"

    correlations = ArrayField()

    @property
    def steps(self) -> List[str]:
        return self.meta["steps"]


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def cascade_groups(model: nn.Module) -> List[str]:
    """Module paths randomised one after another, from the head down: the top-level children with
    parameters, with sequential containers (``stages``, ``features``) split into their members."""
    groups = []
    for name, child in model.named_children():
        if not _has_parameters(child):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            groups += [f"{name}.{sub}" for sub, member in child.named_children() if _has_parameters(member)]
        else:
            groups.append(name)
    return groups[::-1]


def _fresh_model(model: nn.Module, seed: int) -> nn.Module:
    """``model``'s architecture with random weights: its name and the constructor options it was built with (read
    from a checkpoint, then given), seeded."""
    from ..models.zoo import load_model
    provenance = model_metadata(model)
    name = provenance.get("model")
    if not getattr(model, "hpx_provenance", None) or not name:
        raise HpxError("sanity check needs a model from load_model, or pass random_model= (same architecture)")
    options = {**provenance.get("options_from_checkpoint", {}), **provenance.get("options_given", {})}
    return load_model(name, "random", seed=seed, device=model_placement(model)[0], **options)


def sanity_check(model: nn.Module, images: Tensor, method: str, *, random_model: Optional[nn.Module] = None,
                 init_seed: int = 1, target: Optional[int | Sequence[int]] = None, **options: Any) -> SanityResult:
    """Cascading randomisation of ``model`` for normalised ``images`` (N, 3, H, W).

    random_model: an untrained model of the same architecture supplying the new weights (default:
    ``load_model(<same name>, "random", seed=init_seed)``). target: the class explained at every step
    (one for all or one per image; default: the trained model's top-1 per image). options go to
    :func:`attribution.explain` (with ``resume_dir`` every step's run is kept and reused: its key holds
    that step's weights). ``model`` is not modified.
    """
    fresh = random_model if random_model is not None else _fresh_model(model, init_seed)
    targets = resolve_targets(predict(model, to_model(model, images)), target).tolist()
    randomised = copy.deepcopy(model)
    steps = ["trained"] + cascade_groups(model)
    maps, step_targets = [], []
    for step in steps:
        if step != "trained":
            try:
                randomised.get_submodule(step).load_state_dict(fresh.get_submodule(step).state_dict())
            except (AttributeError, RuntimeError) as err:
                raise HpxError(f"random model does not match at {step}: {str(err).splitlines()[0]}") from None
        explanation = explain(randomised, images, method, target=targets, **options)
        maps.append(explanation.maps)
        step_targets.append(explanation.meta["targets"])
    stacked = np.stack(maps)
    correlations = np.array([[spearmanr(step_map.ravel(), trained.ravel()).statistic
                              for step_map, trained in zip(step_maps, stacked[0])] for step_maps in stacked])
    return SanityResult(arrays={"correlations": correlations.astype(np.float64), "maps": stacked},
                        meta={"method": method, "model": model_metadata(model), "steps": steps, "init_seed": init_seed,
                              "targets": step_targets, "options": {"target": target, **{
                                  k: asdict(v) if is_dataclass(v) else v for k, v in options.items()
                                  if k not in ("names", "resume_dir", "progress")}},
                              "images": list(options.get("names") or range(len(images)))})


__all__ = ["SanityResult", "cascade_groups", "sanity_check"]
