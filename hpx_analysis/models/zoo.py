"""Loading models the way researchers do: by name, with pretrained, random or local-file weights.

``load_model(name, weights)`` returns an eval-mode ``nn.Module`` whose ``hpx_provenance`` dict
records the model name, where the weights came from and their SHA-256 (saved next to every result).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import timm
import torch
from torch import nn

from ..errors import HpxError
from .hyenapixel import HUB_FILENAME, HUB_REPOS, MODEL_NAMES, model_from_config
from .proxies import PROXY_NAMES

REFERENCE_BACKBONES = ("convformer_s18", "caformer_s18", "convnext_tiny", "resnet50", "vgg16")
WEIGHT_MODES = ("pretrained", "random")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")


def available_models() -> List[str]:
    """Our HyenaPixel variants, the reference backbones and the demo's proxy models."""
    return list(MODEL_NAMES) + list(REFERENCE_BACKBONES) + list(PROXY_NAMES)


def _check_name(name: str) -> None:
    if name in MODEL_NAMES or timm.is_model(name):
        return
    candidates = sorted(set(MODEL_NAMES) | set(timm.list_models()))
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `hpx-analyze models` lists the supported ones"
    raise HpxError(f"unknown model '{name}'{hint}")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """An untrained model by registered name, or from a model config ``.json`` file (tiny configs)."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise HpxError(f"model config file not found: {name}")
        try:
            config = json.loads(path.read_text())
            return model_from_config(config, **kwargs)
        except (ValueError, KeyError, TypeError) as err:
            raise HpxError(f"invalid model config {name}: {err}") from None
    _check_name(name)
    return timm.create_model(name, **kwargs)


def read_checkpoint(path: os.PathLike | str) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file without executing pickled code.

    Accepts ``.safetensors`` or pickle (``weights_only=True``) files holding a bare state dict or one
    wrapped under ``state_dict``/``model``/``state_dict_ema``; strips ``module.`` prefixes. A flat file
    whose weights sit under a ``state_dict.`` prefix (the golden files) is unwrapped too.
    """
    path = Path(path)
    if not path.is_file():
        raise HpxError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            data: Any = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # any decoding failure means: not a checkpoint we can read safely
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HpxError(f"{path} is not a readable checkpoint ({type(err).__name__}: {first_line[:160]})") from None
    for key in WRAPPER_KEYS:
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise HpxError(f"{path} holds no state dict of tensors")
    if any(k.startswith("state_dict.") for k in data):
        data = {k[len("state_dict."):]: v for k, v in data.items() if k.startswith("state_dict.")}
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in data.items()}


def _filter_for(model: nn.Module):
    """The checkpoint filter of the model's timm module (maps original layouts onto timm's), if any."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _describe(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Map ``state_dict`` onto the model and load it strictly; mismatches raise one readable HpxError."""
    filter_fn = _filter_for(model)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception:  # a foreign filter that chokes on keys it does not know: compare unmapped keys
            pass
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        parts = [f"{label} {_describe(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise HpxError(f"checkpoint {source} does not fit this architecture: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_pretrained(name: str) -> Path:
    """Local path of the published checkpoint of ``name`` (hub download, or the local HF cache offline)."""
    from huggingface_hub import hf_hub_download
    repos = HUB_REPOS.get(name)
    if not repos:
        raise HpxError(f"no published weights for '{name}'; published: {', '.join(HUB_REPOS)}")
    with _hub_offline_if_unreachable():
        for repo in repos:
            try:
                return Path(hf_hub_download(repo, HUB_FILENAME))
            except Exception:  # not cached while offline, repository missing, network error: try the next
                continue
    urls = " or ".join(f"https://huggingface.co/{repo}/resolve/main/{HUB_FILENAME}" for repo in repos)
    raise HpxError(f"pretrained weights for '{name}' are neither in the local Hugging Face cache nor reachable; "
                   f"download {urls} and pass it with --checkpoint PATH (Python: weights=PATH)")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (avoids minutes of client retries when offline)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_if_unreachable() -> Iterator[None]:
    """Put the Hugging Face client in offline mode (cache only) while the hub cannot be reached."""
    from huggingface_hub import constants
    previous = constants.HF_HUB_OFFLINE
    if not previous and not _hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _timm_pretrained(name: str, **kwargs: Any) -> nn.Module:
    try:
        with _hub_offline_if_unreachable():
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:
        cfg = timm.models.get_pretrained_cfg(name)
        where = f"hub repository {cfg.hf_hub_id}" if cfg is not None and cfg.hf_hub_id else "its timm source"
        raise HpxError(f"pretrained weights for '{name}' could not be loaded from {where} "
                       f"({type(err).__name__}); download them and pass --checkpoint PATH") from None


def load_model(name: str, weights: str = "random", *, seed: int = 0, device: str | torch.device = "cpu",
               **kwargs: Any) -> nn.Module:
    """A model in eval mode with weights from ``pretrained`` (hub/cache), ``random`` (seeded) or a file.

    name: a registered model (``hpx_analysis.models.MODEL_NAMES``, any timm model) or a config ``.json``.
    kwargs go to the model constructor (e.g. ``num_classes``, ``long_kernel_sizes``).
    The returned model has ``hpx_provenance``: model, weights source, SHA-256 of the weights file.
    """
    provenance: Dict[str, Any] = {"model": name, "weights": weights, "seed": seed}
    if weights == "pretrained":
        if name in HUB_REPOS:
            path = _download_pretrained(name)
            model = create_model(name, **kwargs)
            load_state_dict_checked(model, read_checkpoint(path), str(path))
            provenance.update(weights_file=str(path), weights_sha256=_sha256(path))
        else:
            _check_name(name)
            model = _timm_pretrained(name, **kwargs)
            cfg = getattr(model, "pretrained_cfg", {}) or {}
            provenance.update(weights_file=cfg.get("hf_hub_id") or cfg.get("url"), weights_sha256=None)
    elif weights == "random":
        torch.manual_seed(seed)
        model = create_model(name, **kwargs)
    elif Path(weights).suffix in CHECKPOINT_SUFFIXES or Path(weights).exists():
        state_dict = read_checkpoint(weights)
        model = create_model(name, **kwargs)
        load_state_dict_checked(model, state_dict, str(weights))
        provenance.update(weights="file", weights_file=str(Path(weights).resolve()),
                          weights_sha256=_sha256(Path(weights)))
    else:
        raise HpxError(f"weights must be 'pretrained', 'random' or a checkpoint file "
                       f"({', '.join(CHECKPOINT_SUFFIXES)}); got '{weights}'")
    model.hpx_provenance = provenance
    return model.to(device).eval()


def model_label(name: str) -> str:
    """Short label of a model argument: the registered name, or a config file's stem."""
    return Path(name).stem if name.endswith(".json") else name


def default_input_size(model: nn.Module) -> Tuple[int, int]:
    """(H, W) the model was trained at, from its pretrained config (224x224 when unknown)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return int(size[-2]), int(size[-1])


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["REFERENCE_BACKBONES", "available_models", "create_model", "read_checkpoint", "load_model", "model_label",
           "load_state_dict_checked", "default_input_size", "count_parameters"]
