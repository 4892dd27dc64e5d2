"""Result objects: every analyzer returns one; it saves and loads itself as ``<stem>.npz`` + ``<stem>.json``.

The ``.npz`` holds the arrays, the ``.json`` the metadata (model, weights source and hash, inputs,
options, library versions) and the scalar results, so a figure can be redrawn without recomputing.
"""

from __future__ import annotations

import csv
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Type, TypeVar

import numpy as np

R = TypeVar("R", bound="Result")


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Flat records (the first one's keys are the columns) as a CSV file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def library_versions() -> Dict[str, str]:
    """Versions of the libraries that shape a result."""
    import importlib.metadata as md
    versions = {"python": platform.python_version()}
    for dist in ("hpx-analysis", "torch", "timm", "captum", "numpy", "scipy", "matplotlib"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def model_metadata(model: Any) -> Dict[str, Any]:
    """Provenance of a model loaded with :func:`hpx_analysis.models.zoo.load_model`."""
    provenance = dict(getattr(model, "hpx_provenance", {}) or {})
    provenance.setdefault("model", type(model).__name__)
    return provenance


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class Result:
    """Base of all analyzer results: ``arrays`` (name -> ndarray) and ``meta`` (JSON-serialisable).

    Subclasses set ``kind`` (the analyzer's name) and add typed accessors over arrays/meta.
    """

    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "result"

    def save(self, stem: Path | str) -> Path:
        """Write ``<stem>.npz`` and ``<stem>.json``; returns the ``.npz`` path."""
        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        npz = stem.with_suffix(".npz")
        np.savez_compressed(npz, **{k: np.asarray(v) for k, v in self.arrays.items()})
        meta = {"kind": self.kind, "versions": library_versions(), **self.meta}
        stem.with_suffix(".json").write_text(json.dumps(to_jsonable(meta), indent=2, sort_keys=False))
        return npz

    @classmethod
    def load(cls: Type[R], path: Path | str) -> R:
        """Read a result written by :meth:`save` (``path``: the .npz, the .json or the stem)."""
        stem = Path(path)
        if stem.suffix in (".npz", ".json"):
            stem = stem.with_suffix("")
        npz, meta_path = stem.with_suffix(".npz"), stem.with_suffix(".json")
        if not npz.is_file() or not meta_path.is_file():
            from .errors import HpxError
            raise HpxError(f"no saved result at {stem} (need {npz.name} and {meta_path.name})")
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(meta_path.read_text())
        if cls.kind != "result" and meta.get("kind") != cls.kind:
            from .errors import HpxError
            raise HpxError(f"{npz} holds a '{meta.get('kind')}' result, not '{cls.kind}'")
        return cls(arrays=arrays, meta=meta)

    def get(self, key: str, default: Optional[Any] = None) -> Any:
        return self.meta.get(key, default)
