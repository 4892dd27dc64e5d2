"""Training the proxy models on a proxy task on CPU, with a cache keyed by everything that sets the result.

A trained proxy is saved as ``<cache>/<model>_<task>_<key>.safetensors`` plus a ``.json`` record
(configuration, held-out accuracy, time), and loads back through the normal checkpoint path
(:func:`hpx_analysis.models.zoo.load_model`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import announce, content_key
from ..errors import HpxError
from ..images import model_mean_std, normalise
from ..models.proxies import PROXY_NAMES, proxy_configuration
from ..storage import move_aside, write_bytes_atomic, write_text_atomic
from .tasks import TASKS, sample_task, task_parameters

EVAL_SEED_OFFSET = 1_000_000  # held-out images come from seeds no training batch uses


@dataclass(frozen=True)
class TrainingConfig:
    """One proxy training run: AdamW at a constant learning rate on freshly generated batches; the Hyena N-D
    filter networks at ``filter_lr_scale`` times that rate (:func:`parameter_groups`)."""

    model: str
    task: str
    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    eval_images: int = 512
    filter_lr_scale: float = 1.0

    def key(self) -> str:
        """Content key of everything the trained weights depend on (names the cached checkpoint): this training
        configuration, the proxy's full configuration (architecture, init options), the task generator's
        parameters and, through :func:`..engine.content_key`, the package's code and version."""
        return content_key({"training": asdict(self), "proxy": proxy_configuration(self.model),
                            "task": task_parameters(self.task)}, length=10)

    def stem(self) -> str:
        return f"{self.model}_{self.task}_{self.key()}"


@torch.no_grad()
def task_accuracy(model: nn.Module, task: str, count: int, seed: int, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``count`` held-out images of ``task`` (seed offset from training)."""
    batch = sample_task(task, count, EVAL_SEED_OFFSET + seed)
    mean, std = model_mean_std(model)
    inputs = normalise(batch.images, mean, std)
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, count, batch_size):
        logits = model(inputs[start:start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == batch.labels[start:start + batch_size]).sum())
    return correct / count


def parameter_groups(model: nn.Module, config: TrainingConfig) -> List[Dict[str, Any]]:
    """AdamW parameter groups: the Hyena N-D mixers' filter networks (sine MLPs, positions, windows; not the skip
    gain ``bias``) at ``config.filter_lr_scale`` times ``config.lr``, when the model has any, then the rest."""
    from ..models.hyena_nd import HyenaNDMixer
    slow = {id(p) for module in model.modules() if isinstance(module, HyenaNDMixer)
            for name, p in module.filter_fn.named_parameters() if name != "bias"}
    rest = [{"params": [p for p in model.parameters() if id(p) not in slow]}]
    if not slow:
        return rest
    filters = [p for p in model.parameters() if id(p) in slow]
    return rest + [{"params": filters, "lr": config.lr * config.filter_lr_scale}]


def fit_on_task(model: nn.Module, config: TrainingConfig, desc: str = "train", progress: bool = True) -> List[float]:
    """Train ``model`` in place on freshly generated batches of ``config.task`` (``config``'s steps, batch
    size, AdamW settings and seed; ``config.model`` is not used); leaves it in eval mode. Returns the
    per-step losses."""
    from tqdm.auto import tqdm

    model.train()
    mean, std = model_mean_std(model)
    optimiser = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    losses: List[float] = []
    bar = tqdm(range(config.steps), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        batch = sample_task(config.task, config.batch_size, config.seed * 10_000_000 + step)
        loss = F.cross_entropy(model(normalise(batch.images, mean, std)), batch.labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    bar.close()
    model.eval()
    return losses


def train_proxy(config: TrainingConfig, progress: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """Train ``config.model`` from its seeded initialisation; returns the eval-mode model and a record
    (config, held-out accuracy, final loss, seconds)."""
    from ..models.zoo import load_model

    if config.model not in PROXY_NAMES:
        raise HpxError(f"unknown proxy model '{config.model}'; known: {', '.join(PROXY_NAMES)}")
    if config.task not in TASKS:
        raise HpxError(f"unknown proxy task '{config.task}'; known: {', '.join(TASKS)}")
    if config.steps < 1:
        raise HpxError(f"training steps must be positive, got {config.steps}")
    model = load_model(config.model, "random", seed=config.seed)
    started = time.perf_counter()
    losses = fit_on_task(model, config, desc=f"train {config.model} on {config.task}", progress=progress)
    record = {"config": asdict(config), "seconds": round(time.perf_counter() - started, 1),
              "final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "accuracy": task_accuracy(model, config.task, config.eval_images, config.seed),
              "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
    return model, record


def load_or_train(config: TrainingConfig, cache_dir: Path | str, progress: bool = True
                  ) -> Tuple[nn.Module, Dict[str, Any], Path]:
    """The trained proxy of ``config`` from ``cache_dir`` when there, else trained and saved there.

    Returns (eval-mode model loaded through the checkpoint path, training record with ``cached`` True when it
    was reused, checkpoint file).
    """
    from safetensors.torch import save
    from ..models.zoo import load_model

    cache_dir = Path(cache_dir)
    checkpoint = cache_dir / f"{config.stem()}.safetensors"
    record_file = checkpoint.with_suffix(".json")
    record = _cached_record(checkpoint, record_file)
    if record is None:
        model, record = train_proxy(config, progress)
        # one tensor per key: a Hyena N-D filter shares its sine module, which safetensors refuses as shared memory
        weights = save({k: v.clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()})
        write_bytes_atomic(checkpoint, weights)  # the checkpoint first, then the record that names its digest
        record["checkpoint_sha256"] = hashlib.sha256(weights).hexdigest()
        write_text_atomic(record_file, json.dumps(record, indent=1))
        record["cached"] = False
    else:
        announce(f"reusing the trained proxy {checkpoint} (its key covers the configuration, the task and the code)")
        record["cached"] = True
    return load_model(config.model, str(checkpoint), seed=config.seed), record, checkpoint


def _cached_record(checkpoint: Path, record_file: Path) -> Optional[Dict[str, Any]]:
    """The training record of a cached proxy when its checkpoint is the one the record names (by SHA-256), else
    None: nothing cached, or a pair left by an interrupted or foreign write, which is moved aside."""
    if not (checkpoint.is_file() and record_file.is_file()):
        return None
    try:
        record = json.loads(record_file.read_text())
        matches = record.get("checkpoint_sha256") == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    except (ValueError, UnicodeDecodeError, AttributeError):
        matches = False
    if matches:
        return record
    for path in (record_file, checkpoint):
        move_aside(path, "the cached proxy's checkpoint and record do not match")
    return None
