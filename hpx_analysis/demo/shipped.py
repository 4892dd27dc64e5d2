"""The trained demo proxies shipped with the package: their key, metadata, selection and loading.

``hpx-analyze demo`` loads the six proxies (three models x two tasks) from ``hpx_analysis/demo/proxies/`` instead of
training them, when each one's **weights key** equals the key of what the current code and configuration would
train. The key is a SHA-256 over exactly what sets the trained weights:

- the training configuration (:class:`.training.TrainingConfig`: steps, batch size, AdamW settings, seed, the
  Hyena N-D filter rate),
- the proxy's full configuration (:func:`..models.proxies.proxy_configuration`: architecture, init options,
  normalisation),
- the task generator's parameters (:func:`.tasks.task_parameters`),
- a fingerprint of only the code the trained weights depend on (:data:`WEIGHTS_FILES`, :data:`WEIGHTS_FUNCTIONS`):
  the modules that build and initialise the three proxies (``models/proxies.py``, ``hyenapixel.py``, ``mixers.py``,
  ``long_filters.py``, ``hyena_nd.py``), the task generator (``demo/tasks.py``), the training loop
  (``demo/training.py``), and, as source text, the functions of otherwise unrelated modules that training calls
  (``images.normalise``, ``images.model_mean_std``, ``models.zoo.load_model``, ``models.zoo.create_model``).

Unlike the demo's cache (keyed on the whole package through :func:`..engine.content_key`), an edit of an analyzer,
the engine, the CLI or the plotting leaves the key unchanged, so the shipped proxies do not go stale with every
commit. What is left out and why is :data:`NOT_FINGERPRINTED` (a test checks that every module the fingerprinted
ones import is one or the other). Library versions are not in the key: the shipped weights are data, the same on
every CPU and with every torch (which trained them is recorded); retraining reproduces the known answers, not the bits.

Each file is an ordinary ``.safetensors`` checkpoint (``hpx-analyze kernels --model proxy_hpx_former --checkpoint
<file>`` loads it) whose metadata holds the key, the training configuration, the proxy configuration, the task
parameters, the code fingerprint and the digest of every fingerprinted part, the training record (held-out accuracy,
final loss, seconds, parameters, torch version) and the SHA-256 of the weights.

Regenerate them after an edit of the fingerprinted code or configuration with ``python -m hpx_analysis.demo.ship``
(:mod:`.ship`); until then ``tests/test_demo.py::test_shipped_proxies_are_what_the_code_and_configuration_produce``
fails and ``hpx-analyze demo`` says in one line which proxies do not fit and why, and trains them.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import HpxError
from ..models.proxies import proxy_configuration
from ..provenance import parts_fingerprint
from ..results import to_jsonable
from .tasks import task_parameters
from .training import TrainingConfig

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIR = Path(__file__).resolve().parent / "proxies"
FORMAT = "hpx-analysis demo proxy 1"
REGENERATE = "python -m hpx_analysis.demo.ship"

WEIGHTS_FILES: Tuple[str, ...] = (
    "models/proxies.py", "models/hyenapixel.py", "models/mixers.py", "models/long_filters.py", "models/hyena_nd.py",
    "demo/tasks.py", "demo/training.py")
"""Files (relative to the package) whose every byte counts: the proxies' architecture and initialisation, the task
generator and the training loop."""
WEIGHTS_FUNCTIONS: Tuple[Tuple[str, str], ...] = (
    ("hpx_analysis.images", "normalise"), ("hpx_analysis.images", "model_mean_std"),
    ("hpx_analysis.models.zoo", "load_model"), ("hpx_analysis.models.zoo", "create_model"))
"""Functions of modules that otherwise do not touch the weights, fingerprinted by their source text: the input
normalisation of every training batch, and the seeded construction (``load_model(name, "random", seed=...)``)."""
NOT_FINGERPRINTED: Dict[str, str] = {
    "hpx_analysis.images": "photograph loading and transforms; only normalise and model_mean_std are fingerprinted",
    "hpx_analysis.models.zoo": "checkpoint and pretrained loading; only load_model and create_model are fingerprinted",
    "hpx_analysis.models": "re-exports",
    "hpx_analysis.models.large_kernel": "SLaK and RepLKNet, no proxy uses them",
    "hpx_analysis.models.native": "native CPU kernels for passes without a gradient; training runs through PyTorch",
    "hpx_analysis.engine": "cache keys (content_key) and progress lines of the demo's own cache",
    "hpx_analysis.storage": "atomic writes of the cache",
    "hpx_analysis.errors": "error messages",
}
"""hpx_analysis modules that fingerprinted code imports but that do not change the trained weights, with why."""


def weights_code(root: Path = PACKAGE_ROOT) -> Dict[str, str]:
    """The code the trained weights depend on, part name -> SHA-256: each of :data:`WEIGHTS_FILES` under ``root``
    and each of :data:`WEIGHTS_FUNCTIONS` (``module:function``, its source text as imported)."""
    return {name: hashlib.sha256(content).hexdigest() for name, content in _weights_parts(root).items()}


def _weights_parts(root: Path) -> Dict[str, bytes]:
    parts = {name: (root / name).read_bytes() for name in WEIGHTS_FILES}
    for module, function in WEIGHTS_FUNCTIONS:
        parts[f"{module}:{function}"] = inspect.getsource(getattr(importlib.import_module(module), function)).encode()
    return parts


def weights_fingerprint(root: Path = PACKAGE_ROOT) -> str:
    """:func:`..provenance.parts_fingerprint` of :func:`weights_code` (part name -> its digest)."""
    return parts_fingerprint(weights_code(root))


def weights_description(config: TrainingConfig, code: Optional[str] = None) -> Dict[str, Any]:
    """Everything a shipped proxy's weights key covers (module docstring), as JSON-able values."""
    return to_jsonable({"training": asdict(config), "proxy": proxy_configuration(config.model),
                        "task": task_parameters(config.task), "code": code or weights_fingerprint()})


def weights_key(config: TrainingConfig, code: Optional[str] = None) -> str:
    """SHA-256 (hex) of :func:`weights_description`: equal keys, equal trained weights on one machine."""
    blob = json.dumps(weights_description(config, code), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def tensors_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor (sorted by name: name, dtype, shape, bytes), independent of the file layout."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        for part in (name.encode(), str(tensor.dtype).encode(), json.dumps(list(tensor.shape)).encode(),
                     tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def shipped_path(model: str, task: str, folder: Path | str = SHIPPED_DIR) -> Path:
    """Where the shipped proxy ``model`` trained on ``task`` lives."""
    return Path(folder) / f"{model}_{task}.safetensors"


@dataclass
class Shipped:
    """A shipped proxy that fits the current code and configuration: its file and its metadata (parsed)."""

    path: Path
    meta: Dict[str, Any]

    @property
    def record(self) -> Dict[str, Any]:
        return self.meta["record"]


def read_metadata(path: Path) -> Dict[str, Any]:
    """The parsed metadata of a shipped proxy file (JSON values decoded); HpxError when it is none."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
        meta: Dict[str, Any] = {key: json.loads(value) for key, value in raw.items()}
    except Exception as err:  # unreadable file or metadata that is not ours
        raise HpxError(f"{path} is not a shipped demo proxy ({type(err).__name__}: {err})") from None
    if meta.get("format") != FORMAT:
        raise HpxError(f"{path} is not a shipped demo proxy of format '{FORMAT}'")
    return meta


def mismatch(config: TrainingConfig, folder: Path | str = SHIPPED_DIR,
             code: Optional[Dict[str, str]] = None) -> Tuple[Optional[Shipped], str]:
    """(the shipped proxy of ``config``, "") when its key is the current one, else (None, why not): not shipped,
    unreadable, trained with other settings, another architecture or task generator, or which code changed."""
    path = shipped_path(config.model, config.task, folder)
    if not path.is_file():
        return None, "not shipped"
    try:
        meta = read_metadata(path)
    except HpxError as err:
        return None, str(err)
    code = weights_code() if code is None else code
    fingerprint = parts_fingerprint(code)
    if meta.get("key") == weights_key(config, fingerprint):
        return Shipped(path, meta), ""
    wanted = weights_description(config, fingerprint)
    if meta.get("training") != wanted["training"]:
        differ = [f"{k} {meta.get('training', {}).get(k)!r} here {v!r}" for k, v in wanted["training"].items()
                  if meta.get("training", {}).get(k) != v]
        return None, "trained with other settings (" + ", ".join(differ) + ")"
    if meta.get("proxy") != wanted["proxy"]:
        return None, "the proxy's architecture or initialisation changed"
    if meta.get("task_parameters") != wanted["task"]:
        return None, "the task generator changed"
    changed = sorted(name for name in set(code) | set(meta.get("code_parts", {}))
                     if code.get(name) != meta.get("code_parts", {}).get(name))
    return None, "code changed: " + (", ".join(changed) if changed else "the fingerprint")


def load_shipped(shipped: Shipped, seed: int = 0) -> nn.Module:
    """The shipped proxy as an eval-mode model, loaded strictly through the checkpoint path
    (:func:`..models.zoo.load_model`), after checking its weights against the digest in its metadata."""
    from safetensors.torch import load_file
    from ..models.zoo import load_model
    if tensors_digest(load_file(str(shipped.path))) != shipped.meta.get("weights_sha256"):
        raise HpxError(f"{shipped.path} is damaged: its weights do not match the digest in its metadata; "
                       f"reinstall the package, or run `hpx-analyze demo --retrain`")
    return load_model(shipped.meta["training"]["model"], str(shipped.path), seed=seed)


def select_shipped(configs: Mapping[Tuple[str, str], TrainingConfig], folder: Path | str = SHIPPED_DIR
                   ) -> Tuple[Dict[Tuple[str, str], Shipped], Optional[str]]:
    """The shipped proxies that fit ``configs`` ((model, task) -> config), and None or one line saying which do not
    and why (grouped by reason)."""
    code = weights_code()
    found: Dict[Tuple[str, str], Shipped] = {}
    reasons: Dict[str, List[str]] = {}
    for pair, config in configs.items():
        shipped, why = mismatch(config, folder, code)
        if shipped is not None:
            found[pair] = shipped
        else:
            reasons.setdefault(why, []).append("/".join(pair))
    if not reasons:
        return found, None
    parts = [f"{'all' if len(pairs) == len(configs) else ', '.join(pairs)}: {why}" for why, pairs in reasons.items()]
    return found, (f"the shipped demo proxies do not fit this code and configuration ({'; '.join(parts)}); "
                   f"training {'them' if not found else 'those'} as --retrain does")


def metadata_for(config: TrainingConfig, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
                 ) -> Dict[str, str]:
    """The safetensors metadata of a shipped proxy (every value JSON text)."""
    code = weights_code()
    fingerprint = parts_fingerprint(code)
    description = weights_description(config, fingerprint)
    kept = ("accuracy", "final_loss", "seconds", "parameters", "torch")
    meta = {"format": FORMAT, "key": weights_key(config, fingerprint), "training": description["training"],
            "proxy": description["proxy"], "task_parameters": description["task"], "code_fingerprint": fingerprint,
            "code_parts": code, "record": {k: record[k] for k in kept if k in record},
            "weights_sha256": tensors_digest(tensors), "regenerate": REGENERATE}
    return {key: json.dumps(to_jsonable(value), sort_keys=True) for key, value in meta.items()}


def write_shipped(config: TrainingConfig, model: nn.Module, record: Mapping[str, Any], folder: Path) -> Path:
    """Save a trained proxy with its metadata as ``folder/<model>_<task>.safetensors``."""
    from safetensors.torch import save
    from ..storage import write_bytes_atomic
    # one tensor per key: a Hyena N-D filter shares its sine module, which safetensors refuses as shared memory
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    path = shipped_path(config.model, config.task, folder)
    write_bytes_atomic(path, save(tensors, metadata=metadata_for(config, record, tensors)))
    return path
