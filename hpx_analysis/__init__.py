"""hpx-analysis: analysis and interpretability toolkit for HyenaPixel vision models.

The main entry points are importable from the package top (``from hpx_analysis import load_model``); the
analyzers and plotting are imported on first use, so ``import hpx_analysis`` stays as light as the model zoo.
"""

from __future__ import annotations

import importlib
from typing import Any, List

from .provenance import code_fingerprint, package_version  # noqa: E402

__version__ = package_version()  # the one version: the installed package's metadata
code_fingerprint()  # the source as this process loads it: run keys refuse once the files change (provenance.py)

from . import models  # noqa: E402,F401  (registers the HyenaPixel entrypoints with timm)

_ENTRY_POINTS = {
    "load_model": "models.zoo", "available_models": "models.zoo", "read_checkpoint": "models.zoo",
    "list_mixers": "inspection", "long_filter_layers": "inspection", "modify_kernels": "interventions",
    "LayerRef": "layer_names",
    "sample_images": "images", "image_sources": "images", "labelled_images": "datasets",
    "effective_receptive_field": "analyzers.erf", "compute_kernels": "analyzers.kernels",
    "compute_coverage": "analyzers.coverage", "truncation_sweep": "analyzers.truncation",
    "truncate_kernels": "interventions", "fgvis": "analyzers.fgvis", "explain": "analyzers.attribution",
    "sanity_check": "analyzers.sanity", "faithfulness": "analyzers.scores", "pointing_game": "analyzers.scores",
    "energy_pointing_game": "analyzers.scores", "localisation": "analyzers.scores", "read_boxes": "boxes",
    "transform_boxes": "boxes", "Result": "results", "HpxError": "errors",
    "ModelSpec": "workflows", "erf_models": "workflows", "explain_models": "workflows",
}

__all__ = sorted(_ENTRY_POINTS) + ["__version__", "models"]


def __getattr__(name: str) -> Any:
    """Import an entry point's module on first access (PEP 562)."""
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'hpx_analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_ENTRY_POINTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_ENTRY_POINTS))
