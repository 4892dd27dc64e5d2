"""Loading models the way researchers do: by name, with pretrained, random or local-file weights.

``load_model(name, weights)`` returns an eval-mode ``nn.Module`` whose ``hpx_provenance`` dict
records the model name, where the weights came from and their SHA-256 (saved next to every result).

Where published weights live is known only to timm's pretrained configs (``default_cfgs``: hub id and
file name, or URL). ``pretrained`` looks for that file in the local Hugging Face cache first (no network),
then downloads it unless ``HF_HUB_OFFLINE`` is set, and lets timm load it. Before downloading, one TCP connection
to the download host (or the configured proxy) must open within :data:`PROBE_TIMEOUT_S` seconds, so that a machine
without network fails at once instead of after the hub client's retries (about 27 s). Files are read by timm's
``load_state_dict`` (``weights_only=True``) and loaded strictly, with a one-line error naming the keys
that do not fit. A Hyena N-D model reads its file as a checkpoint of the official training script
(:func:`training_checkpoint`: ``argparse.Namespace`` is the only class it may unpickle) and is configured from
the saved ``args`` and the weights' keys and shapes (:func:`checkpoint_options`); keyword options win.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse, urlsplit

import huggingface_hub
import timm
import torch
from huggingface_hub.constants import PYTORCH_WEIGHTS_NAME, SAFETENSORS_SINGLE_FILE
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from timm.models import (PretrainedCfg, get_arch_pretrained_cfgs, get_pretrained_cfg, is_model_pretrained,
                         split_model_name_tag)
from timm.models._hub import check_cached_file, download_cached_file, hf_split
from torch import nn

from ..errors import HpxError
from .hyenapixel import model_from_config, model_names
from . import hyena_nd, large_kernel
from .hyena_nd import options_from_state_dict, options_from_training_args
from .proxies import PROXY_NAMES

REFERENCE_BACKBONES = ("convformer_s18", "caformer_s18", "convnext_tiny", "resnet50", "vgg16")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
HAND_DOWNLOAD_HOSTS = ("drive.google.com",)
"""Hosts of published weights (SLaK, RepLKNet) that serve a web page, not the file, to a download client."""


def available_models() -> List[str]:
    """Our HyenaPixel variants, the Hyena N-D and large-kernel models, the reference backbones and the demo's proxies."""
    return (model_names() + hyena_nd.model_names() + large_kernel.model_names() + list(REFERENCE_BACKBONES)
            + list(PROXY_NAMES))


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    candidates = timm.list_models()
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
            model = model_from_config(config, **kwargs)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:  # RuntimeError: torch refused a size in it
            raise HpxError(f"invalid model config {name}: {_one_line(err, 200)}") from None
        model.hpx_model_config = config  # what built it: load_model keys the model on this, not on the file's name
        return model
    _check_name(name)
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as err:  # an option the constructor does not take, or a value of the wrong type
        if not kwargs:
            raise
        raise _rejected_options(name, kwargs, err) from None


def _rejected_options(name: str, kwargs: Mapping[str, Any], err: BaseException) -> HpxError:
    """One line naming the options of ``kwargs`` that ``err`` names (all of them when it names none)."""
    named = [key for key in kwargs if f"'{key}'" in str(err)] or list(kwargs)
    shown = ", ".join(f"{key}={kwargs[key]!r}" for key in named)
    return HpxError(f"model '{name}' rejects the option(s) {shown} ({_one_line(err, 160)})")


def _record_build_size(model: nn.Module) -> None:
    """A model that runs only at its build size (timm's ``fixed_input_size``: ViTs), built at another ``img_size``
    than its pretrained config's: that config's input size set to the build size, which the analyzers and
    transforms read."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if cfg.get("fixed_input_size") and isinstance(built, tuple) and tuple(cfg["input_size"][-2:]) != built:
        model.pretrained_cfg = {**cfg, "input_size": (cfg["input_size"][0], *built)}


def _one_line(err: BaseException, limit: int = 240) -> str:
    """An exception as one short line: its type and its message with every run of whitespace collapsed."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message[:limit]}{'...' if len(message) > limit else ''}"


TRAINING_SCRIPT_GLOBALS = (argparse.Namespace,)
"""The only classes a checkpoint may unpickle beyond tensors and containers: the ``args`` that training
scripts (DeiT-style ``main.py``: Hyena N-D, SLaK) save next to the weights."""


def _training_args_allowed() -> Any:
    """Context in which ``weights_only=True`` loading also accepts :data:`TRAINING_SCRIPT_GLOBALS`; anything else
    pickled in a file is still refused, never executed."""
    return torch.serialization.safe_globals(list(TRAINING_SCRIPT_GLOBALS))


def training_checkpoint(path: os.PathLike | str) -> Dict[str, Any]:
    """The top-level entries of a training script's checkpoint (``model``, ``model_ema``, ``args`` as a dict, ...),
    read without executing pickled code; a bare state dict comes back as ``{"model": state_dict}``."""
    path = Path(path)
    if not path.is_file():
        raise HpxError(f"checkpoint file not found: {path}")
    try:
        with _training_args_allowed():
            data: Any = (timm.models.load_state_dict(str(path)) if path.suffix == ".safetensors" else
                         torch.load(str(path), map_location="cpu", weights_only=True))
    except Exception as err:  # any decoding failure means: not a checkpoint we can read safely
        raise HpxError(f"{path} is not a readable checkpoint ({_one_line(err, 160)})") from None
    if not isinstance(data, Mapping):
        raise HpxError(f"{path} holds no checkpoint dictionary")
    if all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"model": dict(data)}
    entries = dict(data)
    if isinstance(entries.get("args"), argparse.Namespace):
        entries["args"] = vars(entries["args"])
    return entries


def _safetensors_header(path: Path) -> bool:
    """Whether the file starts as safetensors do: a little-endian 8-byte length, then that much JSON."""
    with open(path, "rb") as handle:
        start = handle.read(9)
    return len(start) == 9 and start[8:9] == b"{" and 0 < int.from_bytes(start[:8], "little") < path.stat().st_size


def read_checkpoint(path: os.PathLike | str) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file without executing pickled code, read by timm's ``load_state_dict``.

    Accepts ``.safetensors`` or pickle (``weights_only=True``) files holding a bare state dict or one
    wrapped under ``state_dict``/``model``/``state_dict_ema`` (timm prefers the EMA weights when a file
    holds both); ``module.`` and ``_orig_mod.`` prefixes are stripped.
    """
    path = Path(path)
    if path.is_dir():
        raise HpxError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise HpxError(f"checkpoint file not found: {path}")
    try:
        if path.suffix != ".safetensors" and _safetensors_header(path):  # renamed: timm goes by the name
            from safetensors.torch import load_file
            data: Any = load_file(str(path))
        else:
            with _training_args_allowed():
                data = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # any decoding failure means: not a checkpoint we can read safely
        raise HpxError(f"{path} is not a readable checkpoint ({_one_line(err, 160)})") from None
    if not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise HpxError(f"{path} holds no state dict of tensors")
    return data


def _filter_for(model: nn.Module):
    """The checkpoint filter of the model's timm module (maps original layouts onto timm's), if any."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _describe(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                            name: Optional[str] = None) -> None:
    """Map ``state_dict`` onto the model and load it strictly; mismatches raise one readable HpxError.

    name: the model as the user named it, for messages (default its class name). The filter of the model's module
    may raise KeyError for a key it does not know: timm's filters (ConvNeXt, MetaFormer) look mapped keys up in the
    model's state dict, so a checkpoint of another architecture stops them there; the unmapped keys are then
    compared. Any other error of the filter is one HpxError naming the model, the filter and the error."""
    filter_fn = _filter_for(model)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except KeyError:  # a key of another architecture: the comparison below names the keys that do not fit
            pass
        except Exception as err:
            label = name or type(model).__name__
            raise HpxError(f"checkpoint filter {filter_fn.__module__}.{filter_fn.__qualname__} of model '{label}' "
                           f"failed on {source} ({_one_line(err)})") from err
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


def _pretrained_tags(name: str) -> List[str]:
    """Pretrained tags (``arch.tag`` names) whose weights ``name`` loads, in the order to try them.

    A HyenaPixel model without a tag tries each of its published tags (hpx_former_s18_384 has two
    hub ids); any other name stands for exactly one set of weights, timm's default for an untagged name.
    """
    arch, tag = split_model_name_tag(name)
    if tag or arch not in model_names():
        return [name] if is_model_pretrained(name) else []
    return [tagged for tagged, cfg in get_arch_pretrained_cfgs(arch).items() if cfg.has_weights]


def _hub_filenames(cfg: PretrainedCfg) -> List[str]:
    """The hub file of a pretrained config; without one, the two timm tries (safetensors first)."""
    return [cfg.hf_hub_filename] if cfg.hf_hub_filename else [SAFETENSORS_SINGLE_FILE, PYTORCH_WEIGHTS_NAME]


def _weights_url(cfg: PretrainedCfg) -> str:
    """Where to download the weights of a pretrained config by hand."""
    if not cfg.hf_hub_id:
        return cfg.url
    repo_id, revision = hf_split(cfg.hf_hub_id)
    return huggingface_hub.hf_hub_url(repo_id, _hub_filenames(cfg)[0], revision=revision)


class _NoConnection(Exception):
    """A download failed for want of a connection (not a missing file): no other download will work either."""


PROBE_TIMEOUT_S = 3.0
"""Seconds the connection probe before a download waits for the host (name look-up and TCP connect together)."""


def _download_url(cfg: PretrainedCfg) -> str:
    """The URL whose host a download of ``cfg``'s weights contacts first: the hub endpoint, or the config's URL."""
    return huggingface_hub.constants.ENDPOINT if cfg.hf_hub_id else (cfg.url or "")


def _probe_connection(url: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`_NoConnection` unless a TCP connection to ``url``'s host (or to the HTTP(S) proxy the
    environment names for it, as the download clients use) opens within ``timeout`` seconds, name look-up included.
    The hub client retries a failed connection for about 27 s; without network this fails in ``timeout``."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = proxy_parts.hostname or host
        port = proxy_parts.port or (1080 if proxy_parts.scheme.startswith("socks") else 80)
    outcome: Dict[str, Optional[BaseException]] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except BaseException as err:  # any failure to connect (conftest's guard raises a RuntimeError) counts
            outcome["error"] = err
        else:
            outcome["ok"] = None

    worker = threading.Thread(target=connect, name="hpx-connection-probe", daemon=True)  # a name look-up can hang
    worker.start()
    worker.join(timeout)
    if "ok" not in outcome:
        cause = outcome.get("error")
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else f"no answer within {timeout:g} s"
        raise _NoConnection from OSError(f"cannot reach {host}:{port} ({detail})")


def _weights_file(cfg: PretrainedCfg, cached_only: bool) -> Optional[Path]:
    """The weights file of a pretrained config from the local cache (``cached_only``: no network at all)
    or downloaded; None when the cache lacks it or the hub has no such repository or file."""
    if not cached_only and (cfg.hf_hub_id or not check_cached_file(cfg.url, check_hash=False)):
        _probe_connection(_download_url(cfg))  # a download will contact the host (timm reuses a file it has)
    if not cfg.hf_hub_id:
        if cached_only and not check_cached_file(cfg.url):
            return None
        try:
            return Path(download_cached_file(cfg.url))
        except OSError as err:
            raise _NoConnection from err
    repo_id, revision = hf_split(cfg.hf_hub_id)
    for filename in _hub_filenames(cfg):
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                                        local_files_only=cached_only))
        except LocalEntryNotFoundError as err:  # downloading, this means that the hub did not answer
            if not cached_only:
                raise _NoConnection from err
        except HfHubHTTPError:  # repository, revision or file missing on the hub
            continue
    return None


def _find_pretrained(name: str) -> Tuple[str, Path]:
    """(pretrained tag, local weights file) of ``name``: every tag from the local cache, then every tag
    downloaded (unless ``HF_HUB_OFFLINE``); a one-line HpxError naming the URLs when none is found."""
    tags = _pretrained_tags(name)
    if not tags:
        published = ", ".join(n for n in model_names() if _pretrained_tags(n))
        raise HpxError(f"no published weights for '{name}'; HyenaPixel models with published weights: {published}")
    url = get_pretrained_cfg(tags[0]).url or ""
    if urlparse(url).hostname in HAND_DOWNLOAD_HOSTS:
        raise HpxError(f"pretrained weights for '{name}' are on {urlparse(url).hostname}, which no download client "
                       f"reaches; download {url} in a browser and pass it with --checkpoint PATH (Python: weights=PATH)")
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    try:
        for cached_only in (True,) if offline else (True, False):
            for tag in tags:
                path = _weights_file(get_pretrained_cfg(tag), cached_only)
                if path is not None:
                    return tag, path
        reason = "HF_HUB_OFFLINE is set" if offline else "the hub has none of them"
    except _NoConnection as err:
        reason = f"the download failed ({_one_line(err.__cause__, 120)})"
    urls = " or ".join(_weights_url(get_pretrained_cfg(tag)) for tag in tags)
    raise HpxError(f"pretrained weights for '{name}' are not in the local cache and {reason}; "
                   f"download {urls} and pass it with --checkpoint PATH (Python: weights=PATH)")


def _load_pretrained(name: str, **kwargs: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model with its published weights, loaded by timm from the file :func:`_find_pretrained` found;
    and their provenance."""
    tag, path = _find_pretrained(name)
    try:
        model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except Exception as err:  # a file timm cannot read, a state dict that does not fit, a rejected option: one line
        if kwargs and isinstance(err, TypeError):
            raise _rejected_options(name, kwargs, err) from None
        raise HpxError(f"published weights {path} of '{tag}' do not load ({_one_line(err)})") from None
    return model, {"pretrained_tag": tag, "weights_file": str(path), "weights_sha256": _sha256(path)}


def _json_value(value: Any) -> Any:
    """A training-script argument as JSON can hold it (paths and other objects as text)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return str(value)


def checkpoint_options(name: str, entries: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Constructor options of ``name`` that a checkpoint fixes: for a Hyena N-D model, those its keys and shapes
    show (class count, filter form, window), overridden by the official training script's ``args``; none for
    other models."""
    if split_model_name_tag(name)[0] not in hyena_nd.model_names():
        return {}
    return {**options_from_state_dict(state_dict), **options_from_training_args(entries.get("args") or {})}


def _checkpoint_weights(name: str, path: str, weights_key: Optional[str]
                        ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
    """(state dict, options read from the file, provenance) of a checkpoint file for model ``name``.

    A Hyena N-D model, or any model given ``weights_key``, reads the file as a training script's checkpoint
    (:func:`training_checkpoint`) and takes the weights under ``weights_key`` (default ``model``).
    """
    if weights_key is None and split_model_name_tag(name)[0] not in hyena_nd.model_names():
        return read_checkpoint(path), {}, {}
    entries = training_checkpoint(path)
    key = weights_key or "model"
    state_dict = entries.get(key)
    if not isinstance(state_dict, Mapping) or not state_dict or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        held = ", ".join(k for k, v in entries.items() if isinstance(v, Mapping)) or "none"
        raise HpxError(f"{path} has no state dict under '{key}' (entries holding dictionaries: {held})")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    source: Dict[str, Any] = {"weights_key": key}
    if entries.get("args"):
        source["checkpoint_args"] = {k: _json_value(v) for k, v in entries["args"].items()}
    return state_dict, checkpoint_options(name, entries, state_dict), source


def load_model(name: str, weights: str = "random", *, seed: int = 0, device: str | torch.device = "cpu",
               weights_key: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """A model in eval mode with weights from ``pretrained`` (cache/hub), ``random`` (seeded) or a file.

    name: a registered model (``hpx_analysis.models.model_names()``, any timm model, optionally with a
    pretrained tag ``name.tag``) or a config ``.json``.
    kwargs go to the model constructor (e.g. ``num_classes``, ``long_kernel_sizes``); for a checkpoint of a
    training script they win over the options read from it (:func:`checkpoint_options`).
    weights_key: the entry of a training script's checkpoint that holds the weights (``model`` by default,
    e.g. ``model_ema``).
    The returned model has ``hpx_provenance``: model, weights source, SHA-256 of the weights file, the constructor
    options given (``options_given``), for a configured checkpoint those read from it (``options_from_checkpoint``)
    and for a model config file its content (``config``). A model that runs only at its build size and is built at
    another ``img_size`` has that size as its pretrained config's ``input_size``. Options the constructor rejects
    raise a one-line HpxError naming them.
    """
    provenance: Dict[str, Any] = {"model": name, "weights": weights, "seed": seed}
    if weights == "pretrained":
        if name.endswith(".json"):
            raise HpxError(f"a model config ({name}) has no published weights; use --weights random or a checkpoint "
                           "file (Python: weights='random' or a path)")
        _check_name(name)
        model, source = _load_pretrained(name, **kwargs)
        provenance.update(source)
    elif weights == "random":
        torch.manual_seed(seed)
        model = create_model(name, **kwargs)
    elif Path(weights).suffix in CHECKPOINT_SUFFIXES or Path(weights).exists():
        state_dict, options, source = _checkpoint_weights(name, weights, weights_key)
        model = create_model(name, **{**options, **kwargs})
        load_state_dict_checked(model, state_dict, str(weights), name)
        provenance.update(weights="file", weights_file=str(Path(weights).resolve()),
                          weights_sha256=_sha256(Path(weights)), **source)
        if options:
            provenance["options_from_checkpoint"] = options
    else:
        raise HpxError(f"weights must be 'pretrained', 'random' or a checkpoint file "
                       f"({', '.join(CHECKPOINT_SUFFIXES)}); got '{weights}'")
    if kwargs:
        provenance["options_given"] = kwargs
    if name.endswith(".json"):  # the architecture is the file's content (an edit can keep every weight's shape)
        provenance["config"] = model.hpx_model_config
    _record_build_size(model)
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


__all__ = ["REFERENCE_BACKBONES", "available_models", "create_model", "read_checkpoint", "load_model",
           "training_checkpoint", "checkpoint_options", "model_label",
           "load_state_dict_checked", "default_input_size", "count_parameters"]
